"""A participant's durable trade state on one node: trade records and escrows (flow 6), and
the three log operations that change them (prepare, settle, same-shard trade).

Why this module exists: a trade moves items and gold, so its state must be exactly as
durable and as replicated as the inventories it changes (I2). Every change comes through a
log entry (:class:`~bluemarble.v1.shardnode_pb2.TradePrepareOp`, ``TradeSettleOp``,
``LocalTradeOp``) applied by :func:`apply_trade_op`, the same code on the primary and on its
replicas. The primary has already *decided* (the core rules in
:mod:`bluemarble.core.trades.participant`) before it wrote the entry; the op carries the
decision and every value (times, outcome, reason), so a replica applies it without
deciding anything and ends in the primary's state. On the primary the rules' checks are
run once more inside the transaction, as an assertion that the decision still holds (a
refusal there is FailedPrecondition and nothing changes); on a replica a violation is an
entry no primary writes (CorruptRecord).

Tables (see :mod:`shardnode.storage.schema`):

* ``trades``: one row per (shard, trade id): state PREPARED / COMMITTED / ABORTED, the leg
  (encoded TradeLeg; NULL for an ABORTED recorded without an escrow), reason, times, and
  whether the trade was cross-shard. A same-shard trade's row holds player A's leg.
* ``escrows``: one row per PREPARED cross-shard trade: the items (JSON array) and gold its
  player gives, held back until the decision is applied. Escrowed items stay in ``items``
  (they are still the player's, and a grant of their id is still refused); they are only
  unavailable to other trades.

Functions run inside the caller's transaction and never commit.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from bluemarble.api.conversions import (
    leg_from_proto,
    leg_to_proto,
    offer_from_proto,
    participant_state_from_proto,
    participant_state_to_proto,
)
from bluemarble.core import limits
from bluemarble.core.errors import CorruptRecord, FailedPrecondition
from bluemarble.core.ids import PlayerId, ShardId
from bluemarble.core.limits import echo
from bluemarble.core.trades import Holdings, Known, Leg, Outcome, TradeState, check_leg
from bluemarble.v1 import common_pb2, shardnode_pb2

TRADE_PREPARE = "trade_prepare"
TRADE_SETTLE = "trade_settle"
LOCAL_TRADE = "local_trade"
TRADE_KINDS = frozenset({TRADE_PREPARE, TRADE_SETTLE, LOCAL_TRADE})

_STATE_NAME = {TradeState.PREPARED: "PREPARED", TradeState.COMMITTED: "COMMITTED", TradeState.ABORTED: "ABORTED"}
_STATE_OF_NAME = {v: k for k, v in _STATE_NAME.items()}
_OUTCOME_PROTO = {
    Outcome.COMMITTED: common_pb2.TRADE_OUTCOME_COMMITTED,
    Outcome.ABORTED: common_pb2.TRADE_OUTCOME_ABORTED,
}
_OUTCOME_OF_PROTO = {v: k for k, v in _OUTCOME_PROTO.items()}

_COLUMNS = "trade_id, state, leg, reason, prepared_at_ms, deadline_ms, settled_at_ms, cross_shard, lsn"
_SELECT_TRADE = f"SELECT {_COLUMNS} FROM trades WHERE shard_id = ? AND trade_id = ?"
INSERT_TRADE = (
    "INSERT INTO trades (shard_id, trade_id, state, player_id, leg, reason, prepared_at_ms, deadline_ms, "
    "settled_at_ms, cross_shard, lsn) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SETTLE_TRADE = (
    "UPDATE trades SET state = ?, reason = ?, settled_at_ms = ?, lsn = ? WHERE shard_id = ? AND trade_id = ?"
)
INSERT_ESCROW = (
    "INSERT INTO escrows (shard_id, trade_id, player_id, item_ids, gold, state, deadline_ms) "
    "VALUES (?, ?, ?, ?, ?, 'PREPARED', ?)"
)
_DELETE_ESCROW = "DELETE FROM escrows WHERE shard_id = ? AND trade_id = ?"
# INDEXED BY: without statistics SQLite picks the primary key's (shard_id) prefix and
# scans every escrow of the shard, on every prepare and inventory read.
_PLAYER_ESCROWS = (
    "SELECT e.item_ids, e.gold, t.leg FROM escrows AS e INDEXED BY escrows_by_player "
    "LEFT JOIN trades AS t ON t.shard_id = e.shard_id AND t.trade_id = e.trade_id "
    "WHERE e.shard_id = ? AND e.player_id = ?"
)
_SELECT_GOLD = "SELECT gold FROM players WHERE shard_id = ? AND player_id = ?"
_PLAYER_ITEMS = "SELECT item_id FROM items WHERE shard_id = ? AND player_id = ?"
_ITEM_OWNER = "SELECT player_id FROM items WHERE shard_id = ? AND item_id = ?"
_ENSURE_PLAYER = "INSERT INTO players (shard_id, player_id, gold) VALUES (?, ?, 0) ON CONFLICT DO NOTHING"
_SET_GOLD = "UPDATE players SET gold = ? WHERE shard_id = ? AND player_id = ?"
_DELETE_ITEM = "DELETE FROM items WHERE shard_id = ? AND item_id = ? AND player_id = ?"
_INSERT_ITEM = "INSERT INTO items (shard_id, item_id, player_id) VALUES (?, ?, ?)"
# Every escrow this node's shards hold (the partial index trades_prepared: a few at a time).
_PREPARED_LEGS = "SELECT shard_id, trade_id, leg FROM trades WHERE state = 'PREPARED' AND leg IS NOT NULL"
_MOVE_ITEM = "UPDATE items SET player_id = ? WHERE shard_id = ? AND item_id = ? AND player_id = ?"


@dataclass(frozen=True)
class TradeRecord:
    """A participant's durable record of one trade id on one shard."""

    shard_id: ShardId
    trade_id: str
    state: TradeState
    leg: Leg | None
    """The leg escrowed or traded here (A's leg for a same-shard trade); None for an
    ABORTED recorded without an escrow."""
    reason: str
    prepared_at_ms: int
    deadline_ms: int
    """Unix ms after which a PREPARED escrow's participant asks for the decision itself."""
    settled_at_ms: int
    """Unix ms (the primary's clock) at which the outcome was applied; 0 while PREPARED."""
    cross_shard: bool
    lsn: int
    """The entry that last changed the record (0: installed from a snapshot)."""

    def known(self) -> Known:
        """The core rules' view of the record."""
        return Known(self.state, self.leg, self.reason)

    def to_proto(self, node_id: str = "") -> shardnode_pb2.ParticipantTrade:
        message = shardnode_pb2.ParticipantTrade(
            trade_id=self.trade_id,
            shard_id=self.shard_id,
            node_id=node_id,
            state=participant_state_to_proto(self.state),
            reason=self.reason,
            prepared_at_ms=self.prepared_at_ms,
            deadline_ms=self.deadline_ms,
            settled_at_ms=self.settled_at_ms,
            cross_shard=self.cross_shard,
        )
        if self.leg is not None:
            message.leg.CopyFrom(leg_to_proto(self.leg))
        return message


# ---- conversions ----


def outcome_to_proto(outcome: Outcome) -> common_pb2.TradeOutcome:
    return _OUTCOME_PROTO[outcome]


def outcome_from_proto(value: int, where: str) -> Outcome:
    """Raises CorruptRecord for an unset or unknown outcome (``where`` names the source)."""
    outcome: Outcome | None = _OUTCOME_OF_PROTO.get(value)  # type: ignore[call-overload]
    if outcome is None:
        raise CorruptRecord(f"{where} carries no trade outcome ({value})")
    return outcome


# ---- reads ----


def _record(shard: str, row: Sequence[Any]) -> TradeRecord:
    trade_id, state, leg, reason, prepared_at_ms, deadline_ms, settled_at_ms, cross_shard, lsn = row
    parsed_state = _STATE_OF_NAME.get(str(state))
    if parsed_state is None:
        raise CorruptRecord(f"trade {echo(trade_id)} of {shard} has state {echo(state)}")
    parsed_leg: Leg | None = None
    if leg is not None:
        try:
            parsed_leg = leg_from_proto(str(trade_id), shardnode_pb2.TradeLeg.FromString(bytes(leg)))
        except DecodeError as e:
            raise CorruptRecord(f"trade {echo(trade_id)} of {shard} holds an undecodable leg") from e
    return TradeRecord(
        ShardId(shard),
        str(trade_id),
        parsed_state,
        parsed_leg,
        str(reason),
        int(prepared_at_ms),
        int(deadline_ms),
        int(settled_at_ms),
        bool(cross_shard),
        int(lsn),
    )


def load(conn: sqlite3.Connection, shard: ShardId, trade_id: str) -> TradeRecord | None:
    """The shard's record of ``trade_id``, or None."""
    row = conn.execute(_SELECT_TRADE, (shard, trade_id)).fetchone()
    return None if row is None else _record(shard, row)


def records_of(conn: sqlite3.Connection, trade_id: str, shards: Iterable[ShardId]) -> list[TradeRecord]:
    """The records of ``trade_id`` on each of ``shards`` that has one, by shard."""
    out = []
    for shard in sorted(set(shards)):
        found = load(conn, shard, trade_id)
        if found is not None:
            out.append(found)
    return out


def prepared(
    conn: sqlite3.Connection, shards: Iterable[ShardId], *, due_by_ms: int | None = None, limit: int = 1000
) -> list[TradeRecord]:
    """PREPARED records of ``shards`` (those whose deadline is ``<= due_by_ms`` when given),
    oldest prepare first, at most ``limit``."""
    wanted = sorted(set(shards))
    if not wanted or limit <= 0:
        return []
    marks = ",".join("?" * len(wanted))
    query = (
        f"SELECT shard_id, {_COLUMNS} FROM trades WHERE state = 'PREPARED' AND shard_id IN ({marks})"
        + (" AND deadline_ms <= ?" if due_by_ms is not None else "")
        + " ORDER BY prepared_at_ms, trade_id LIMIT ?"
    )
    params: list[object] = [*wanted]
    if due_by_ms is not None:
        params.append(due_by_ms)
    params.append(limit)
    return [_record(row[0], row[1:]) for row in conn.execute(query, params)]


def holdings(
    conn: sqlite3.Connection, shard: ShardId, player: PlayerId, receiving: Sequence[str] = ()
) -> Holdings:
    """The player's holdings on the shard (nothing for a player the shard never saw):
    items and gold including the escrowed ones, what PREPARED trades hold back, and which
    of the ``receiving`` item ids the shard still stores for another player
    (``Holdings.held_by_others``: such an item's move away has not settled here yet)."""
    held_by_others = frozenset(
        item for item in receiving
        if (row := conn.execute(_ITEM_OWNER, (shard, item)).fetchone()) is not None and row[0] != player
    )
    found = conn.execute(_SELECT_GOLD, (shard, player)).fetchone()
    if found is None:
        return Holdings(frozenset(), 0, held_by_others=held_by_others, known=False)
    items = frozenset(r[0] for r in conn.execute(_PLAYER_ITEMS, (shard, player)))
    escrowed: set[str] = set()
    arriving: set[str] = set()
    escrowed_gold = incoming_gold = incoming_items = 0
    for item_ids, gold, leg in conn.execute(_PLAYER_ESCROWS, (shard, player)):
        escrowed.update(json.loads(item_ids))
        escrowed_gold += int(gold)
        receives = _receives(shard, leg)
        incoming_gold += receives.gold
        incoming_items += len(receives.item_ids)
        arriving.update(receives.item_ids)
    return Holdings(items, int(found[0]), frozenset(escrowed), escrowed_gold, held_by_others, incoming_gold,
                    incoming_items=incoming_items, arriving_items=frozenset(arriving))


def arriving(conn: sqlite3.Connection, item_ids: Sequence[str]) -> tuple[str, str, str] | None:
    """The first of ``item_ids`` that a PREPARED trade on any shard of this node would bring
    if it commits, as (item, shard, trade id); None when none is on its way here. A grant
    of such an item would make that commit impossible (the item would be here twice), and
    its trade, COMMITTED on the other side, could never finish on this one."""
    wanted = set(item_ids)
    if not wanted:
        return None
    for shard, trade_id, leg in conn.execute(_PREPARED_LEGS):
        for item in _receives(shard, leg).item_ids:
            if item in wanted:
                return item, str(shard), str(trade_id)
    return None


def incoming(conn: sqlite3.Connection, shard: ShardId, player: PlayerId) -> tuple[int, int]:
    """The gold and the number of items ``player``'s PREPARED trades on ``shard`` would
    bring if they commit."""
    gold = items = 0
    for _, _, leg in conn.execute(_PLAYER_ESCROWS, (shard, player)):
        gold_in, items_in = _received(shard, leg)
        gold, items = gold + gold_in, items + items_in
    return gold, items


def _received(shard: ShardId, leg: bytes | None) -> tuple[int, int]:
    receives = _receives(shard, leg)
    return int(receives.gold), len(receives.item_ids)


def _receives(shard: ShardId, leg: bytes | None) -> common_pb2.Offer:
    """What an escrow's leg receives (nothing for an escrow without its leg)."""
    if leg is None:
        return common_pb2.Offer()
    try:
        return shardnode_pb2.TradeLeg.FromString(bytes(leg)).receives
    except DecodeError as e:
        raise CorruptRecord(f"an escrow of {shard} holds an undecodable leg") from e


# ---- apply ----


def check_trade_op(op: shardnode_pb2.WriteOp, kind: str) -> None:
    """Structural checks of a trade op (both sides of the log): raises CorruptRecord for an
    op no primary writes (no trade id, no leg, no outcome)."""
    if kind == TRADE_PREPARE:
        p = op.trade_prepare
        if not p.trade_id or not p.HasField("leg") or not p.leg.player_id or p.leg.player_id != op.player_id:
            raise CorruptRecord("a trade prepare names no trade id or no leg of its player")
    elif kind == TRADE_SETTLE:
        s = op.trade_settle
        if not s.trade_id:
            raise CorruptRecord("a trade settle names no trade id")
        outcome_from_proto(s.outcome, f"settle of trade {echo(s.trade_id)}")
    else:
        t = op.local_trade
        if not t.trade_id or not t.player_a or not t.player_b or t.player_a != op.player_id:
            raise CorruptRecord("a local trade names no trade id or no players")
        outcome_from_proto(t.outcome, f"local trade {echo(t.trade_id)}")


def apply_trade_op(
    conn: sqlite3.Connection, shard: ShardId, lsn: int, op: shardnode_pb2.WriteOp, kind: str, *, primary: bool
) -> None:
    """Applies a trade op as entry ``lsn`` of ``shard`` (module docstring); the op passed
    :func:`check_trade_op` already (``records.check_op`` on the primary, ``decode_op`` on
    a replica). Raises FailedPrecondition (primary: the op does not hold on the current
    state; nothing changed) or CorruptRecord (replica: an entry no primary writes)."""
    if kind == TRADE_PREPARE:
        _apply_prepare(conn, shard, lsn, op.trade_prepare, primary=primary)
    elif kind == TRADE_SETTLE:
        _apply_settle(conn, shard, lsn, op.trade_settle, primary=primary)
    else:
        _apply_local(conn, shard, lsn, op.local_trade, primary=primary)


class EntryRefused(FailedPrecondition):
    """The primary's state cannot take a trade entry (nothing was written): an escrowed
    item gone, gold out of range, a received item already here."""


def _refuse(primary: bool, lsn: int, shard: ShardId, message: str) -> Exception:
    if primary:
        return EntryRefused(message)
    return CorruptRecord(f"entry {lsn} of {shard}: {message}")


def _apply_prepare(
    conn: sqlite3.Connection, shard: ShardId, lsn: int, p: shardnode_pb2.TradePrepareOp, *, primary: bool
) -> None:
    leg = leg_from_proto(p.trade_id, p.leg)
    if load(conn, shard, p.trade_id) is not None:
        raise _refuse(primary, lsn, shard, f"trade {echo(p.trade_id)} is already known on {shard}; nothing escrowed")
    if primary:
        reason = check_leg(leg, holdings(conn, shard, PlayerId(leg.player)))
        if reason:
            raise FailedPrecondition(f"trade {echo(p.trade_id)} cannot escrow on {shard}: {reason}")
    conn.execute(
        INSERT_TRADE,
        (
            shard,
            p.trade_id,
            "PREPARED",
            leg.player,
            leg_to_proto(leg).SerializeToString(deterministic=True),
            "",
            p.prepared_at_ms,
            p.deadline_ms,
            0,
            1,
            lsn,
        ),
    )
    conn.execute(
        INSERT_ESCROW,
        (shard, p.trade_id, leg.player, json.dumps(sorted(leg.gives.item_ids)), leg.gives.gold, p.deadline_ms),
    )


def _apply_settle(
    conn: sqlite3.Connection, shard: ShardId, lsn: int, s: shardnode_pb2.TradeSettleOp, *, primary: bool
) -> None:
    outcome = outcome_from_proto(s.outcome, f"settle of trade {echo(s.trade_id)}")
    record = load(conn, shard, s.trade_id)
    state = TradeState.COMMITTED if outcome is Outcome.COMMITTED else TradeState.ABORTED
    if record is None:
        if outcome is Outcome.COMMITTED:
            raise _refuse(
                primary, lsn, shard, f"COMMITTED for trade {echo(s.trade_id)}, which holds no escrow on {shard}"
            )
        conn.execute(INSERT_TRADE, (shard, s.trade_id, "ABORTED", "", None, s.reason, 0, 0, s.settled_at_ms, 1, lsn))
        return
    if record.state is not TradeState.PREPARED:
        raise _refuse(
            primary,
            lsn,
            shard,
            f"trade {echo(s.trade_id)} is already {record.state.name} on {shard}; {outcome.name} is not applied",
        )
    assert record.leg is not None, "a PREPARED record always holds its leg"
    conn.execute(_DELETE_ESCROW, (shard, s.trade_id))
    if outcome is Outcome.COMMITTED:
        _commit_leg(conn, shard, lsn, record.leg, primary=primary)
    conn.execute(_SETTLE_TRADE, (_STATE_NAME[state], s.reason, s.settled_at_ms, lsn, shard, s.trade_id))


def _commit_leg(conn: sqlite3.Connection, shard: ShardId, lsn: int, leg: Leg, *, primary: bool) -> None:
    """The escrowed ``gives`` leave the player (to the other shard), ``receives`` join."""
    player = leg.player
    for item in leg.gives.item_ids:
        if conn.execute(_DELETE_ITEM, (shard, item, player)).rowcount != 1:
            raise _refuse(primary, lsn, shard, f"player {echo(player)} no longer holds escrowed item {echo(item)}")
    conn.execute(_ENSURE_PLAYER, (shard, player))
    gold = int(conn.execute(_SELECT_GOLD, (shard, player)).fetchone()[0]) - leg.gives.gold + leg.receives.gold
    if gold < 0 or gold > limits.MAX_GOLD:
        raise _refuse(primary, lsn, shard, f"player {echo(player)} would hold {gold} gold")
    conn.execute(_SET_GOLD, (gold, shard, player))
    try:
        conn.executemany(_INSERT_ITEM, [(shard, item, player) for item in leg.receives.item_ids])
    except sqlite3.IntegrityError as e:
        raise _refuse(primary, lsn, shard, f"an item player {echo(player)} receives is already on {shard}") from e


def _apply_local(
    conn: sqlite3.Connection, shard: ShardId, lsn: int, t: shardnode_pb2.LocalTradeOp, *, primary: bool
) -> None:
    outcome = outcome_from_proto(t.outcome, f"local trade {echo(t.trade_id)}")
    if load(conn, shard, t.trade_id) is not None:
        raise _refuse(primary, lsn, shard, f"trade {echo(t.trade_id)} is already known on {shard}")
    a_gives, b_gives = offer_from_proto(t.a_gives), offer_from_proto(t.b_gives)
    leg_a = Leg(t.trade_id, t.player_a, a_gives, b_gives, t.player_b)
    leg_b = Leg(t.trade_id, t.player_b, b_gives, a_gives, t.player_a)
    if outcome is Outcome.COMMITTED:
        if primary:
            a, b = PlayerId(t.player_a), PlayerId(t.player_b)
            reason = check_leg(leg_a, holdings(conn, shard, a)) or check_leg(leg_b, holdings(conn, shard, b))
            if reason:
                raise FailedPrecondition(f"trade {echo(t.trade_id)} cannot be applied on {shard}: {reason}")
        for leg in (leg_a, leg_b):
            conn.execute(_ENSURE_PLAYER, (shard, leg.player))
        for giver, taker, offer in ((t.player_a, t.player_b, a_gives), (t.player_b, t.player_a, b_gives)):
            for item in offer.item_ids:
                if conn.execute(_MOVE_ITEM, (taker, shard, item, giver)).rowcount != 1:
                    raise _refuse(primary, lsn, shard, f"player {echo(giver)} does not hold item {echo(item)}")
        for leg in (leg_a, leg_b):
            gold = (
                int(conn.execute(_SELECT_GOLD, (shard, leg.player)).fetchone()[0])
                - leg.gives.gold
                + leg.receives.gold
            )
            if gold < 0 or gold > limits.MAX_GOLD:
                raise _refuse(primary, lsn, shard, f"player {echo(leg.player)} would hold {gold} gold")
            conn.execute(_SET_GOLD, (gold, shard, leg.player))
    conn.execute(
        INSERT_TRADE,
        (
            shard,
            t.trade_id,
            _STATE_NAME[TradeState.COMMITTED if outcome is Outcome.COMMITTED else TradeState.ABORTED],
            t.player_a,
            leg_to_proto(leg_a).SerializeToString(deterministic=True),
            t.reason,
            0,
            0,
            t.settled_at_ms,
            0,
            lsn,
        ),
    )


# ---- snapshots and retention ----


def snapshot_trades(conn: sqlite3.Connection, shard: ShardId) -> list[shardnode_pb2.ParticipantTrade]:
    """The shard's trade records for a snapshot (``ShardSnapshot.trades``), sorted by trade
    id (deterministic, as the rest of a snapshot). A PREPARED record's escrow is rebuilt
    from its leg on installation."""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM trades WHERE shard_id = ? ORDER BY trade_id", (shard,))
    return snapshot_records(shard, rows)


SNAPSHOT_PAGE = (f"SELECT {_COLUMNS} FROM trades WHERE shard_id = ?", "trade_id", "trade_id")
"""(select, key, order) of the shard's trade records, for a snapshot read in pages
(:func:`shardnode.storage.snapshots.read_snapshot_pages`)."""


def snapshot_records(shard: ShardId, rows: Iterable[Sequence[Any]]) -> list[shardnode_pb2.ParticipantTrade]:
    """Rows of :data:`_COLUMNS` as a snapshot's trade records."""
    return [_record(shard, row).to_proto() for row in rows]


def install_rows(
    shard: ShardId, records: Sequence[shardnode_pb2.ParticipantTrade]
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """A snapshot's trade records as rows of ``trades`` and of ``escrows`` (the PREPARED
    ones' escrows, rebuilt from their legs), for :data:`INSERT_TRADE` and
    :data:`INSERT_ESCROW` into ``shard`` once its rows are deleted. Raises CorruptRecord
    for a malformed record (one listed twice: :func:`~shardnode.storage.snapshots.install_batches`)."""
    trade_rows: list[tuple[object, ...]] = []
    escrow_rows: list[tuple[object, ...]] = []
    for r in records:
        state = participant_state_from_proto(r.state)
        if state is None or not r.trade_id:
            raise CorruptRecord(f"the snapshot of {shard} carries a trade record without id or state")
        leg = leg_from_proto(r.trade_id, r.leg) if r.HasField("leg") else None
        if state is TradeState.PREPARED and leg is None:
            raise CorruptRecord(f"the snapshot of {shard} carries PREPARED trade {echo(r.trade_id)} without leg")
        trade_rows.append(
            (
                shard,
                r.trade_id,
                _STATE_NAME[state],
                leg.player if leg else "",
                leg_to_proto(leg).SerializeToString(deterministic=True) if leg else None,
                r.reason,
                r.prepared_at_ms,
                r.deadline_ms,
                r.settled_at_ms,
                int(r.cross_shard),
                0,  # the entry is not known (the snapshot does not carry it)
            )
        )
        if state is TradeState.PREPARED and leg is not None:
            escrow_rows.append(
                (shard, r.trade_id, leg.player, json.dumps(sorted(leg.gives.item_ids)), leg.gives.gold, r.deadline_ms)
            )
    return trade_rows, escrow_rows


def prune(conn: sqlite3.Connection, cutoff_ms: int, max_rows: int) -> int:
    """Forgets at most ``max_rows`` records of trades settled before ``cutoff_ms`` (never a
    PREPARED one: its escrow waits for the decision). Returns the rows removed."""
    cursor = conn.execute(
        "DELETE FROM trades WHERE (shard_id, trade_id) IN (SELECT shard_id, trade_id FROM trades "
        "WHERE state != 'PREPARED' AND settled_at_ms < ? ORDER BY settled_at_ms LIMIT ?)",
        (cutoff_ms, max(max_rows, 0)),
    )
    return int(cursor.rowcount)
