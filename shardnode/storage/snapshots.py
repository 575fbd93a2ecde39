"""Reading one shard into a ShardSnapshot and writing one back (flow 5: a new replica, or
one whose log is not a prefix of its primary's, bootstraps from a snapshot plus the log
tail).

A snapshot is deterministic: every list is sorted, so two nodes holding the same state
produce equal messages (the replication tests compare them). A snapshot is read either
inside the caller's transaction (:func:`read_snapshot`) or page by page
(:func:`read_snapshot_pages`: the serving node's loop runs between pages); one is written
as batches of rows (:class:`shardnode.storage.node_storage.SnapshotInstall`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from bluemarble.core.errors import CorruptRecord
from bluemarble.core.ids import ShardId
from bluemarble.core.limits import MAX_LOG_COUNTER, echo
from bluemarble.core.replication.position import ZERO, LogPosition
from bluemarble.v1 import shardnode_pb2
from shardnode.storage import records, trades
from shardnode.storage.apply import INSERT_ITEM, INSERT_PLAYER, RECORD_REQUEST

SELECT_TAIL = "SELECT lsn, epoch, payload, written_at_ms FROM log WHERE shard_id = ? ORDER BY lsn DESC LIMIT ?"


def read_snapshot(
    conn: sqlite3.Connection, shard: ShardId, last: LogPosition, max_tail_entries: int, max_tail_bytes: int
) -> shardnode_pb2.ShardSnapshot:
    """The shard's state as of ``last`` (the caller holds a read transaction), with the
    last entries of its log: at most ``max_tail_entries`` and ``max_tail_bytes`` of
    payload, always ending at ``last`` when non-empty."""
    snap = shardnode_pb2.ShardSnapshot(shard_id=shard, last=shardnode_pb2.LogPosition(epoch=last.epoch, lsn=last.lsn))
    by_player: dict[str, shardnode_pb2.SnapshotPlayer] = {}
    for player_id, gold in conn.execute(
        "SELECT player_id, gold FROM players WHERE shard_id = ? ORDER BY player_id", (shard,)
    ):
        by_player[player_id] = snap.players.add(player_id=player_id, gold=gold)
    for player_id, item_id in conn.execute(
        "SELECT player_id, item_id FROM items WHERE shard_id = ? ORDER BY player_id, item_id", (shard,)
    ):
        holder = by_player.get(player_id)
        if holder is None:
            raise CorruptRecord(f"item {echo(item_id)} of {shard} belongs to no player of the shard")
        holder.item_ids.append(item_id)
    for player_id, system, key, value, lsn in conn.execute(
        "SELECT player_id, system, key, value, lsn FROM player_data WHERE shard_id = ? ORDER BY player_id, system, key",
        (shard,),
    ):
        snap.values.add(player_id=player_id, system=system, key=key, value=value, lsn=lsn)
    for request_id, lsn, response in conn.execute(
        "SELECT request_id, lsn, response FROM requests WHERE shard_id = ? ORDER BY request_id", (shard,)
    ):
        snap.requests.add(request_id=request_id, lsn=lsn, response=response)
    snap.tail.extend(_tail(conn, shard, max_tail_entries, max_tail_bytes))
    # Trade records and escrows: a replica bootstrapped from this snapshot and then
    # promoted must hold the escrows.
    snap.trades.extend(trades.snapshot_trades(conn, shard))
    return snap


PAGE_ROWS = 2_000
"""Rows a snapshot page reads at most; a quarter of it for players (with their items) and
trade records, which cost more each (a page of either: about 25 ms here)."""
PAGE_BYTES = 1 << 20
"""About how many bytes of values, answers or payloads a snapshot page reads."""


def read_snapshot_pages(
    conn: sqlite3.Connection,
    shard: ShardId,
    last: LogPosition,
    max_tail_entries: int,
    max_tail_bytes: int,
    *,
    page_rows: int = PAGE_ROWS,
    page_bytes: int = PAGE_BYTES,
) -> Iterator[shardnode_pb2.ShardSnapshot]:
    """:func:`read_snapshot` in pages: partial ShardSnapshot messages, each read by one
    ``next()`` in a few bounded queries (no statement stays open between pages). The
    first page carries the shard and ``last``; each later one rows of one field, the
    fields in field-number order and each field's rows in :func:`read_snapshot`'s order.
    Protobuf appends repeated fields when encodings are concatenated, so the pages'
    encodings joined are byte for byte the encoding of :func:`read_snapshot`'s message,
    and the receiver needs nothing new.

    Rows are read at different moments: the pages make a snapshot only if nothing changed
    the shard between the first page and the last (the caller checks:
    :class:`shardnode.storage.node_storage.SnapshotPages`)."""
    yield shardnode_pb2.ShardSnapshot(shard_id=shard, last=shardnode_pb2.LogPosition(epoch=last.epoch, lsn=last.lsn))
    for players in _pages(conn, _PLAYERS, shard, 1, max(page_rows // 4, 1), page_bytes, _fixed_size):
        page = shardnode_pb2.ShardSnapshot()
        by_player = {player_id: page.players.add(player_id=player_id, gold=gold) for player_id, gold in players}
        for player_id, item_id in conn.execute(_PLAYER_RANGE_ITEMS, (shard, players[0][0], players[-1][0])):
            holder = by_player.get(player_id)
            if holder is None:
                raise CorruptRecord(f"item {echo(item_id)} of {shard} belongs to no player of the shard")
            holder.item_ids.append(item_id)
        yield page
    for values in _pages(conn, _VALUES, shard, 3, page_rows, page_bytes, _value_size):
        page = shardnode_pb2.ShardSnapshot()
        for player_id, system, key, value, lsn in values:
            page.values.add(player_id=player_id, system=system, key=key, value=value, lsn=lsn)
        yield page
    for requests in _pages(conn, _REQUESTS, shard, 1, page_rows, page_bytes, _response_size):
        page = shardnode_pb2.ShardSnapshot()
        for request_id, lsn, response in requests:
            page.requests.add(request_id=request_id, lsn=lsn, response=response)
        yield page
    page = shardnode_pb2.ShardSnapshot()
    page.tail.extend(_tail(conn, shard, max_tail_entries, max_tail_bytes))
    yield page
    for rows in _pages(conn, trades.SNAPSHOT_PAGE, shard, 1, max(page_rows // 4, 1), page_bytes, _fixed_size):
        page = shardnode_pb2.ShardSnapshot()
        page.trades.extend(trades.snapshot_records(shard, rows))
        yield page


_PLAYERS = ("SELECT player_id, gold FROM players WHERE shard_id = ?", "player_id", "player_id")
_PLAYER_RANGE_ITEMS = (
    "SELECT player_id, item_id FROM items WHERE shard_id = ? AND player_id BETWEEN ? AND ? ORDER BY player_id, item_id"
)
_VALUES = (
    "SELECT player_id, system, key, value, lsn FROM player_data WHERE shard_id = ?",
    "(player_id, system, key)",
    "player_id, system, key",
)
_REQUESTS = ("SELECT request_id, lsn, response FROM requests WHERE shard_id = ?", "request_id", "request_id")


def _fixed_size(row: Sequence[Any]) -> int:
    return 64


def _value_size(row: Sequence[Any]) -> int:
    return 64 + len(row[3])


def _response_size(row: Sequence[Any]) -> int:
    return 64 + len(row[2])


def _pages(
    conn: sqlite3.Connection,
    query: tuple[str, str, str],
    shard: ShardId,
    key_columns: int,
    page_rows: int,
    page_bytes: int,
    size_of: Callable[[Sequence[Any]], int],
) -> Iterator[list[Any]]:
    """A table's rows of ``shard`` in key order, as pages of at most ``page_rows`` rows
    and about ``page_bytes`` (``size_of`` each row): ``query`` is (select, key as a row
    value, order), the key its first ``key_columns`` columns. Each page is one statement,
    finished (closed) before the page is handed out."""
    select, key, order = query
    first = f"{select} ORDER BY {order} LIMIT ?"
    marks = ", ".join("?" * key_columns)
    following = f"{select} AND {key} > ({marks}) ORDER BY {order} LIMIT ?"
    after: tuple[Any, ...] | None = None
    while True:
        cursor = conn.execute(first, (shard, page_rows)) if after is None else conn.execute(
            following, (shard, *after, page_rows)
        )
        rows: list[Any] = []
        size = 0
        try:
            for row in cursor:
                rows.append(row)
                size += size_of(row)
                if size >= page_bytes:
                    break
        finally:
            cursor.close()
        if not rows:
            return
        yield rows
        if len(rows) < page_rows and size < page_bytes:
            return  # the statement ran out of rows: that was the last page
        after = tuple(rows[-1][:key_columns])


def _tail(
    conn: sqlite3.Connection, shard: ShardId, max_tail_entries: int, max_tail_bytes: int
) -> list[shardnode_pb2.LogEntry]:
    """The last entries of the shard's log, oldest first: at most ``max_tail_entries``
    and ``max_tail_bytes`` of payload, always ending at the shard's last entry."""
    tail: list[shardnode_pb2.LogEntry] = []
    size = 0
    for lsn, epoch, payload, written_at_ms in conn.execute(SELECT_TAIL, (shard, max(max_tail_entries, 0))):
        size += len(payload)
        if size > max_tail_bytes:
            break
        tail.append(shardnode_pb2.LogEntry(lsn=lsn, epoch=epoch, payload=payload, written_at_ms=written_at_ms))
    tail.reverse()
    return tail


def field_slices(data: bytes | bytearray, slice_bytes: int) -> Iterator[memoryview]:
    """``data``, an encoded message, cut into consecutive pieces of whole top-level fields,
    each about ``slice_bytes`` (more when one field is larger). Parsing the pieces into one
    message in turn (``MergeFromString``) gives the message parsed at once, so a receiver
    can parse a large snapshot a piece at a time. Raises CorruptRecord for bytes that are
    no message's encoding (a truncated field, an unknown wire type)."""
    view = memoryview(data)
    end = len(view)
    start = position = 0
    while position < end:
        key, position = _varint(view, position)
        wire = key & 7
        if wire == 0:
            _, position = _varint(view, position)
        elif wire == 1:
            position += 8
        elif wire == 2:
            length, position = _varint(view, position)
            position += length
        elif wire == 5:
            position += 4
        else:
            raise CorruptRecord(f"the snapshot holds a field of wire type {wire}, which no snapshot encodes")
        if position > end:
            raise CorruptRecord("the snapshot ends inside a field (truncated)")
        if position - start >= slice_bytes:
            yield view[start:position]
            start = position
    if start < end:
        yield view[start:end]


def _varint(view: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(view) or shift > 63:
            raise CorruptRecord("the snapshot ends inside a field (truncated)")
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def check_snapshot(snapshot: shardnode_pb2.ShardSnapshot) -> LogPosition:
    """The snapshot's last position, once its log tail is checked to be contiguous and to
    end there. Raises CorruptRecord for a snapshot no primary produces."""
    shard = snapshot.shard_id
    if not shard:
        raise CorruptRecord("the snapshot names no shard")
    epoch, lsn = snapshot.last.epoch, snapshot.last.lsn
    if (epoch == 0) != (lsn == 0) or epoch > MAX_LOG_COUNTER or lsn > MAX_LOG_COUNTER:
        # Past 2^63-1 no SQLite INTEGER holds it; the tail's, requests' and values'
        # positions are bounded by this one (checked below).
        raise CorruptRecord(f"the snapshot of {shard} ends at ({epoch}, {lsn}), which is no log position")
    last = LogPosition(epoch, lsn) if lsn else ZERO
    tail = snapshot.tail
    if tail:
        previous_epoch = 1
        for i, entry in enumerate(tail):
            if entry.lsn != tail[0].lsn + i or entry.epoch < previous_epoch or tail[0].lsn < 1:
                raise CorruptRecord(f"the log tail of the snapshot of {shard} is not contiguous at lsn {entry.lsn}")
            previous_epoch = entry.epoch
        if (tail[-1].epoch, tail[-1].lsn) != (epoch, lsn):
            raise CorruptRecord(f"the log tail of the snapshot of {shard} does not end at its last position {last}")
    if any(r.lsn > lsn for r in snapshot.requests) or any(v.lsn > lsn for v in snapshot.values):
        raise CorruptRecord(f"the snapshot of {shard} records a request or value after its last position {last}")
    return last


INSERT_VALUE = "INSERT INTO player_data (shard_id, player_id, system, key, value, lsn) VALUES (?, ?, ?, ?, ?, ?)"
INSERT_REQUEST = RECORD_REQUEST.replace("INSERT OR REPLACE", "INSERT")

Rows = list[tuple[object, ...]]


def install_batches(
    shard: ShardId, snapshot: shardnode_pb2.ShardSnapshot, max_rows: int, max_bytes: int
) -> list[tuple[str, Rows]]:
    """The snapshot's rows for ``shard`` but its log tail, as (statement, rows) batches of
    at most ``max_rows`` rows and about ``max_bytes`` of values and answers, to insert in
    order once the shard's rows are deleted (one transaction each, or all in one). Raises
    CorruptRecord, before anything is written, when the snapshot lists a player, item,
    value, request or trade twice.

    The snapshot carries no op digest or age for its request records; both come back
    from the tail entry at the record's lsn when the tail holds it. Otherwise they stay
    NULL: a retry of that id replays the recorded answer whatever its op (nothing is
    applied twice), and prune starts its retention when it first sees it.
    """
    by_lsn = {e.lsn: e for e in snapshot.tail}

    def request_row(r: shardnode_pb2.SnapshotRequest) -> tuple[object, ...]:
        entry = by_lsn.get(r.lsn)
        if entry is None:
            return (shard, r.request_id, None, r.lsn, r.response, None)
        return (shard, r.request_id, records.op_digest(entry.payload), r.lsn, r.response, entry.written_at_ms)

    players: Rows = [(shard, p.player_id, p.gold) for p in snapshot.players]
    items: Rows = [(shard, item, p.player_id) for p in snapshot.players for item in p.item_ids]
    values: Rows = [(shard, v.player_id, v.system, v.key, v.value, v.lsn) for v in snapshot.values]
    requests: Rows = [request_row(r) for r in snapshot.requests]
    trade_rows, escrow_rows = trades.install_rows(shard, snapshot.trades)
    for what, rows, key in (
        ("player", players, slice(1, 2)),
        ("item", items, slice(1, 2)),
        ("value", values, slice(1, 4)),
        ("request", requests, slice(1, 2)),
        ("trade", trade_rows, slice(1, 2)),
    ):
        if len({row[key] for row in rows}) != len(rows):
            raise CorruptRecord(f"the snapshot of {shard} lists a {what} twice")
    batches: list[tuple[str, Rows]] = []
    for statement, rows, blob in (
        (INSERT_PLAYER, players, None),
        (INSERT_ITEM, items, None),
        (INSERT_VALUE, values, 4),
        (INSERT_REQUEST, requests, 4),
        (trades.INSERT_TRADE, trade_rows, 4),
        (trades.INSERT_ESCROW, escrow_rows, None),
    ):
        batch: Rows = []
        size = 0
        for row in rows:
            if batch and (len(batch) >= max_rows or size >= max_bytes):
                batches.append((statement, batch))
                batch, size = [], 0
            batch.append(row)
            if blob is not None:
                value = row[blob]
                size += len(value) if isinstance(value, bytes) else 0
        if batch:
            batches.append((statement, batch))
    return batches


def tail_rows(shard: ShardId, snapshot: shardnode_pb2.ShardSnapshot) -> Rows:
    """The snapshot's log tail as rows of ``log`` (:data:`INSERT_ENTRY`)."""
    return [(shard, e.lsn, e.epoch, e.written_at_ms, e.payload) for e in snapshot.tail]
