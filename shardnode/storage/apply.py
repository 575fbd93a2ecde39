"""Applying one log entry's WriteOp to a shard's tables: the one code path both the
primary (:meth:`NodeStorage.write`) and its replicas (:meth:`NodeStorage.append`) run, so
they end in the same state and record the same answers.

The functions run inside the caller's transaction and never commit. The primary passes
``primary=True``: the op is checked against the node's state first (items owned anywhere
on this node, the gold cap) and refused with FailedPrecondition before anything changes.
A replica applies what its primary already checked; a violation there means the entry is
not one a primary writes (CorruptRecord), except cross-shard duplicates, which a replica
accepts (its shards may stand at different points of their histories).
"""

from __future__ import annotations

import sqlite3

from bluemarble.core import limits
from bluemarble.core.errors import CorruptRecord, FailedPrecondition, NotFound
from bluemarble.core.ids import PlayerId, ShardId
from bluemarble.core.limits import echo
from bluemarble.v1 import shardnode_pb2
from shardnode.storage import records, trades

# Written once each, so the sqlite3 module's statement cache prepares each once.
SELECT_REQUEST = "SELECT op_digest, lsn, response FROM requests WHERE shard_id = ? AND request_id = ?"
RECORD_REQUEST = (
    "INSERT OR REPLACE INTO requests (shard_id, request_id, op_digest, lsn, response, recorded_at_ms) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
INSERT_ENTRY = "INSERT INTO log (shard_id, lsn, epoch, written_at_ms, payload) VALUES (?, ?, ?, ?, ?)"
ITEM_OWNER = "SELECT shard_id, player_id FROM items WHERE item_id = ? ORDER BY shard_id LIMIT 1"
SELECT_GOLD = "SELECT gold FROM players WHERE shard_id = ? AND player_id = ?"
INSERT_PLAYER = "INSERT INTO players (shard_id, player_id, gold) VALUES (?, ?, ?)"
INSERT_ITEM = "INSERT INTO items (shard_id, item_id, player_id) VALUES (?, ?, ?)"
PLAYER_ITEMS = "SELECT item_id FROM items WHERE shard_id = ? AND player_id = ? ORDER BY item_id"
_ENSURE_PLAYER = "INSERT INTO players (shard_id, player_id, gold) VALUES (?, ?, 0) ON CONFLICT DO NOTHING"
_UPDATE_GOLD = "UPDATE players SET gold = ? WHERE shard_id = ? AND player_id = ?"
_DELETE_ITEM = "DELETE FROM items WHERE shard_id = ? AND item_id = ? AND player_id = ?"
_UPSERT_DATA = (
    "INSERT INTO player_data (shard_id, player_id, system, key, value, lsn) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT DO UPDATE SET value = excluded.value, lsn = excluded.lsn"
)

DATA_SIZE = "SELECT length(value) FROM player_data WHERE shard_id = ? AND player_id = ? AND system = ? AND key = ?"
_PLAYER_DATA_TOTALS = (
    "SELECT count(*), coalesce(sum(length(system) + length(key) + length(value)), 0) FROM player_data "
    "WHERE shard_id = ? AND player_id = ?"
)


def apply_op(
    conn: sqlite3.Connection,
    shard: ShardId,
    epoch: int,
    lsn: int,
    op: shardnode_pb2.WriteOp,
    kind: str,
    *,
    primary: bool,
) -> bytes:
    """Applies ``op`` as the entry ``(epoch, lsn)`` of ``shard``; returns its encoded
    answer (see :mod:`shardnode.storage.records`). Raises FailedPrecondition (primary:
    refused, nothing changed) or CorruptRecord (replica: an entry no primary writes)."""
    if kind == records.EPOCH_START:
        return b""  # a marker in the log: no state, no answer
    if kind in trades.TRADE_KINDS:
        # The answer of a trade is built by the data plane from its decision; the entry
        # records the trade (shardnode/storage/trades.py), not a request.
        trades.apply_trade_op(conn, shard, lsn, op, kind, primary=primary)
        return b""
    player = PlayerId(op.player_id)
    if kind == records.GRANT:
        return _apply_grant(conn, shard, epoch, lsn, player, op.grant, primary=primary)
    if kind == records.TAKE:
        return _apply_take(conn, shard, epoch, lsn, player, op.take, primary=primary)
    data = op.set_data
    previous = conn.execute(DATA_SIZE, (shard, player, data.system, data.key)).fetchone() if primary else None
    conn.execute(_ENSURE_PLAYER, (shard, player))
    conn.execute(_UPSERT_DATA, (shard, player, data.system, data.key, data.value, lsn))
    if primary and (previous is None or len(data.value) > previous[0]):
        _check_data_caps(conn, shard, player, new_key=previous is None)
    return records.set_data_answer(shard, epoch, lsn)


def _check_data_caps(conn: sqlite3.Connection, shard: ShardId, player: PlayerId, *, new_key: bool) -> None:
    """Refuses a write that grows ``player``'s data past its caps (run after the write:
    the refusal rolls it back). A write that does not grow it (a value replaced by one no
    larger) always goes through, so a player over a cap lowered later is not stuck."""
    keys, size = conn.execute(_PLAYER_DATA_TOTALS, (shard, player)).fetchone()
    if new_key and keys > limits.MAX_DATA_KEYS_PER_PLAYER:
        raise FailedPrecondition(
            f"player {echo(player)} of {shard} would hold {keys} player-data keys; "
            f"a player holds at most {limits.MAX_DATA_KEYS_PER_PLAYER} over all game systems"
        )
    if size > limits.MAX_DATA_BYTES_PER_PLAYER:
        raise FailedPrecondition(
            f"player {echo(player)} of {shard} would hold {size} bytes of player data; "
            f"a player holds at most {limits.MAX_DATA_BYTES_PER_PLAYER} over all game systems"
        )


def _apply_grant(
    conn: sqlite3.Connection,
    shard: ShardId,
    epoch: int,
    lsn: int,
    player: PlayerId,
    grant: shardnode_pb2.GrantOp,
    *,
    primary: bool,
) -> bytes:
    execute = conn.execute
    item_ids = list(grant.item_ids)
    if primary:
        for item in item_ids:
            owner = execute(ITEM_OWNER, (item,)).fetchone()
            if owner is not None:
                raise FailedPrecondition(records.owned_elsewhere(
                    item, owner[0], by_this_player=(owner[0], owner[1]) == (shard, player)))
        if (on_its_way := trades.arriving(conn, item_ids)) is not None:
            item, to_shard, trade_id = on_its_way
            raise FailedPrecondition(
                f"item {echo(item)} is already owned: trade {echo(trade_id, 40)} brings it to {to_shard} (not settled "
                "yet); item ids are unique, mint a new one")
    found = execute(SELECT_GOLD, (shard, player)).fetchone()
    gold = grant.gold + (found[0] if found is not None else 0)
    # The primary keeps the headroom the player's pending trades need (their commits must
    # never be refused); a replica applies what its primary decided.
    pending, pending_items = trades.incoming(conn, shard, player) if primary and found is not None else (0, 0)
    if not grant.gold:
        pending = 0  # gold unchanged: the headroom the pending trades reserved still holds
    if gold + pending > limits.MAX_GOLD:
        later = f", and {pending} more once its pending trades settle" if pending else ""
        message = (
            f"player {echo(player)} of {shard} would hold {gold} gold{later}; "
            f"a player holds at most 2^53 ({limits.MAX_GOLD})"
        )
        if primary:
            raise FailedPrecondition(message)
        raise CorruptRecord(f"entry {lsn}: {message}")
    if found is None:
        execute(INSERT_PLAYER, (shard, player, gold))
    elif grant.gold:
        execute(_UPDATE_GOLD, (gold, shard, player))
    if item_ids:
        try:
            conn.executemany(INSERT_ITEM, [(shard, item, player) for item in item_ids])
        except sqlite3.IntegrityError as e:
            # Only a replica gets here (the primary checked every item above).
            raise CorruptRecord(f"entry {lsn} of {shard} grants an item the shard already holds") from e
    held = [r[0] for r in execute(PLAYER_ITEMS, (shard, player))]
    if primary and item_ids and len(held) + pending_items > limits.MAX_ITEMS_PER_PLAYER:
        # Refused after the inserts: the refusal rolls this write back (node_storage).
        raise FailedPrecondition(
            f"player {echo(player)} of {shard} would hold {len(held)} items"
            + (f", and {pending_items} more once its pending trades settle" if pending_items else "")
            + f"; a player holds at most {limits.MAX_ITEMS_PER_PLAYER}"
        )
    return records.grant_answer(shard, epoch, lsn, player, held, gold)


def _apply_take(
    conn: sqlite3.Connection,
    shard: ShardId,
    epoch: int,
    lsn: int,
    player: PlayerId,
    take: shardnode_pb2.TakeOp,
    *,
    primary: bool,
) -> bytes:
    """Removes ``take``'s items and gold from ``player``. The primary refuses (nothing
    changed) an item the player does not hold or that a trade in doubt escrows, and gold
    beyond what the player holds outside escrows: a PREPARED trade's commit must never find
    its escrow gone. A replica applies what its primary decided (CorruptRecord if it cannot)."""

    def refuse(message: str) -> Exception:
        return FailedPrecondition(message) if primary else CorruptRecord(f"entry {lsn} of {shard}: {message}")

    who = f"player {echo(player)} of {shard}"
    found = conn.execute(SELECT_GOLD, (shard, player)).fetchone()
    if found is None:
        message = f"player {echo(player)} is unknown on {shard} (never granted anything); check the player id"
        raise NotFound(message) if primary else CorruptRecord(f"entry {lsn} of {shard}: {message}")
    if primary:
        held = trades.holdings(conn, shard, player)
        for item in take.item_ids:
            if item not in held.items:
                raise refuse(f"{who} does not own item {echo(item)}")
            if item in held.escrowed_items:
                raise refuse(f"item {echo(item)} of {who} is escrowed by a trade in doubt; retry once it settles")
        if take.gold > held.available_gold:
            escrowed = f" ({held.escrowed_gold} more escrowed by trades in doubt)" if held.escrowed_gold else ""
            raise refuse(f"{who} has {held.available_gold} gold to spend{escrowed}; {take.gold} were asked")
    for item in take.item_ids:
        if conn.execute(_DELETE_ITEM, (shard, item, player)).rowcount != 1:
            raise refuse(f"{who} does not own item {echo(item)}")
    gold = int(found[0]) - take.gold
    if gold < 0:
        raise refuse(f"{who} has {found[0]} gold; {take.gold} were asked")
    if take.gold:
        conn.execute(_UPDATE_GOLD, (gold, shard, player))
    items = [r[0] for r in conn.execute(PLAYER_ITEMS, (shard, player))]
    return records.take_answer(shard, epoch, lsn, player, items, gold)


def append_entry(
    conn: sqlite3.Connection,
    shard: ShardId,
    epoch: int,
    lsn: int,
    written_at_ms: int,
    payload: bytes,
    request_id: str,
    response: bytes,
) -> None:
    """Appends the entry to the shard's log and records its request id (if any) with its
    answer, the digest of ``payload`` and ``written_at_ms`` as the record's age."""
    conn.execute(INSERT_ENTRY, (shard, lsn, epoch, written_at_ms, payload))
    if request_id:
        # REPLACE: once the old record was pruned on the primary, a reused id is a new
        # request there; a replica that prunes later follows the primary.
        conn.execute(
            RECORD_REQUEST, (shard, request_id, records.op_digest(payload), lsn, response, written_at_ms)
        )
