"""Durable storage of a shard node: one SQLite database per node, every shard in it.

Why one file for all shards: a replication batch carries many shards, and a replica must
make them durable before it acks; with one database that is one commit (one WAL append,
one fsync under ``synchronous=FULL``) for the whole batch. The same holds for the
primary's group commit (:meth:`NodeStorage.write_many`).

What is durable, and when: every public method that changes anything runs in exactly one
``BEGIN IMMEDIATE`` transaction; when it returns, the change is committed. Under the
default ``synchronous=NORMAL`` a commit survives the death of the process (SIGKILL, OOM);
under ``FULL`` it also survives a power loss, at the cost of one fsync per commit
(``scripts/bench_storage.py`` measures both).

Threading: the connection is opened with ``check_same_thread=False`` so the driver may
call from an executor thread, but the class is **not** thread-safe: the driver uses it
from one thread at a time. It also keeps each shard's :class:`ShardMeta` in memory
(loaded at open, updated after each commit), so it must be the only writer of its file;
:meth:`NodeStorage.open` takes a lock on the data dir to make sure of that.

Order of effects on the primary (flow 5): :meth:`write` validates, applies, appends the
log entry and records the request id -> answer, all in one transaction; only then may the
entry be shipped to replicas. A replica applies entries with :meth:`append`, which records
the same answers, so a retry after a failover gets the first answer from the new primary.

A damaged file (SQLite reports SQLITE_CORRUPT or SQLITE_NOTADB) is not an error a node can
serve through: every call touching the damaged pages would fail, for good, while the node
looks healthy to the control plane. :meth:`NodeStorage.open` runs ``PRAGMA quick_check``
and refuses such a file (:class:`StorageDamaged`); damage found later marks the storage
damaged, refuses every later call without touching the file, and tells the process
through :attr:`NodeStorage.on_damaged`, so it leaves service and its shards fail over to
their replicas. Either way the way out is the same: move the data dir away and start the
node empty; it rebuilds its shards from their replicas (snapshot plus log tail).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import structlog

from bluemarble.core import validation
from bluemarble.core.errors import (
    BlueMarbleError,
    CorruptRecord,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from bluemarble.core.ids import PlayerId, ShardId
from bluemarble.core.limits import MAX_LOG_COUNTER, echo
from bluemarble.core.replication.position import ZERO, LogPosition
from bluemarble.core.trades import Holdings
from bluemarble.runtime import retry
from bluemarble.v1 import shardnode_pb2
from shardnode.storage import apply, records, schema, snapshots, trades
from shardnode.storage.records import ShardMeta, WriteResult
from shardnode.storage.writeback import WalWriteback

log = structlog.get_logger(__name__)

DB_FILE = "node.db"
LOCK_FILE = "node.lock"

DEFAULT_SNAPSHOT_TAIL_ENTRIES = 1024
DEFAULT_SNAPSHOT_TAIL_BYTES = 4 << 20
DEFAULT_PRUNE_MAX_ROWS = 100_000
INSTALL_BATCH_ROWS = 2_000
INSTALL_BATCH_BYTES = 1 << 20
"""What one transaction of a snapshot install inserts at most (:class:`SnapshotInstall`):
7-56 ms of a node's event loop here, so heartbeats and other shards' writes go on between
them (one 20 MB snapshot in one transaction held the loop 0.5 s; eight at once cost a
node its lease)."""
INSTALLING = "installing "
"""``node_meta`` key prefix (then the shard id) of a snapshot install under way: a node
that restarts with one drops the shard's partial rows (the primary sends it again)."""
RECLAIMING = "reclaiming "
"""``node_meta`` key prefix (then the shard id) of a copy being reclaimed
(:meth:`NodeStorage.reclaim_step`): its position already says it holds nothing, and the
rows left are deleted batch by batch, or at once before anything is written to the shard."""
_SELECT_SHARDS = "SELECT shard_id, fenced_epoch, last_epoch, last_lsn, first_lsn, synced FROM shards"
_LOG_BOUNDS = "SELECT min(lsn), max(lsn) FROM log WHERE shard_id = ?"
_UPSERT_SHARD = (
    "INSERT INTO shards (shard_id, fenced_epoch, last_epoch, last_lsn, first_lsn, synced) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (shard_id) DO UPDATE SET fenced_epoch = excluded.fenced_epoch, last_epoch = excluded.last_epoch, "
    "last_lsn = excluded.last_lsn, first_lsn = excluded.first_lsn, synced = excluded.synced"
)
_SELECT_DATA = "SELECT value, lsn FROM player_data WHERE shard_id = ? AND player_id = ? AND system = ? AND key = ?"
_SELECT_ENTRIES = (
    "SELECT lsn, epoch, payload, written_at_ms FROM log WHERE shard_id = ? AND lsn >= ? ORDER BY lsn LIMIT ?"
)
_ENTRY_AT = "SELECT epoch, written_at_ms FROM log WHERE shard_id = ? AND lsn = ?"


def _check_epoch(epoch: int) -> None:
    if epoch < 0 or epoch > MAX_LOG_COUNTER:
        raise InvalidArgument(f"epoch is {epoch}; epochs are 0..2^63-1")


@dataclass(slots=True)
class _ShardRow:
    """A shard's row of ``shards`` while a transaction changes it."""

    fenced: int
    last_epoch: int
    last_lsn: int
    first_lsn: int
    synced: bool

    @classmethod
    def of(cls, meta: ShardMeta) -> _ShardRow:
        return cls(meta.fenced_epoch, meta.last.epoch, meta.last.lsn, meta.first_retained_lsn, meta.synced)

    def advance(self, epoch: int, lsn: int) -> None:
        self.last_epoch, self.last_lsn = epoch, lsn
        self.fenced = max(self.fenced, epoch)

    def meta(self, shard: ShardId) -> ShardMeta:
        last = LogPosition(self.last_epoch, self.last_lsn) if self.last_lsn else ZERO
        return ShardMeta(shard, self.fenced, last, self.first_lsn, self.synced)


@dataclass
class _Txn:
    """The shards rows one transaction changes; written back just before COMMIT and
    copied into the in-memory metas only after it succeeds."""

    committed: Mapping[ShardId, ShardMeta]
    rows: dict[ShardId, _ShardRow] = field(default_factory=dict)
    dirty: set[ShardId] = field(default_factory=set)
    forget: set[ShardId] = field(default_factory=set)
    touched: set[ShardId] = field(default_factory=set)
    """Shards whose rows changed though their position did not (install batches)."""
    any_shard: bool = False
    """Rows of shards it cannot name changed (retention across shards)."""
    reclaimed: set[ShardId] = field(default_factory=set)
    """Shards whose reclaim it finished (their marker deleted)."""

    def row(self, shard: ShardId) -> _ShardRow:
        row = self.rows.get(shard)
        if row is None:
            meta = self.committed.get(shard) or records.empty_meta(shard)
            row = self.rows[shard] = _ShardRow.of(meta)
        return row


class _Rollback(Exception):
    """Leaves a write transaction without committing anything (a refused write)."""


class StorageDamaged(Unavailable):
    """The database file itself is damaged (SQLite: SQLITE_CORRUPT "database disk image is
    malformed", SQLITE_NOTADB "file is not a database"), found at open or while serving.

    Not retryable *on this node*: the damage stays. It is UNAVAILABLE rather than DATA_LOSS
    because the data is not lost to the cluster: once this node leaves service its shards
    fail over to their replicas, and a routing client that retries UNAVAILABLE finds the
    new primary. The message names the node, the file, and what the operator must do."""


STORAGE_FAILING_LIMIT_S = 20.0
"""How long writes may keep failing (a full disk, an I/O error: every write transaction
refused, none committed in between) before the node leaves service (:attr:`NodeStorage.on_failing`).
A primary whose disk is full holds its shards' writes and trades while the control plane
sees a healthy node; leaving lets its replicas take over within seconds."""


_DAMAGE_CODES = frozenset({11, 26})
"""SQLite's primary result codes SQLITE_CORRUPT and SQLITE_NOTADB (extended codes such as
SQLITE_CORRUPT_INDEX share their low byte)."""


def _is_damage(e: sqlite3.DatabaseError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in _DAMAGE_CODES
    text = str(e)  # an error raised without a code (not by SQLite itself)
    return "malformed" in text or "not a database" in text


def _damaged(path: Path, node_id: str | None, what: str) -> StorageDamaged:
    who = f"node {node_id}" if node_id else "this node"
    return StorageDamaged(
        f"{who} cannot serve: its storage {path} is damaged ({what}); move {path.parent} away and start the node "
        "with an empty --data-dir: it rebuilds its shards from their replicas"
    )


_SHARD_DATA_BYTES = (
    "SELECT coalesce(sum(length(system) + length(key) + length(value)), 0) FROM player_data WHERE shard_id = :s"
)


@contextlib.contextmanager
def _sqlite_errors(path: Path, node_id: str | None = None) -> Iterator[None]:
    """Wraps SQLite's errors once, here: a damaged file is StorageDamaged, a full or
    failing disk is retryable (Unavailable), a file that breaks its own constraints is
    CorruptRecord. Misuse (a closed storage) stays a programming error."""
    try:
        yield
    except sqlite3.ProgrammingError:
        raise
    except sqlite3.DatabaseError as e:
        if _is_damage(e):
            raise _damaged(path, node_id, str(e)) from e
        if isinstance(e, sqlite3.OperationalError):
            raise Unavailable(f"node storage {path} cannot be used right now: {e}") from e
        raise CorruptRecord(f"node storage {path}: {e}") from e


QUICK_CHECK_MAX_ERRORS = 3
"""Problems ``PRAGMA quick_check`` reports at most (the first is what the message shows)."""


def _check_integrity(conn: sqlite3.Connection, path: Path, node_id: str | None) -> None:
    """``PRAGMA quick_check``: every page of every b-tree is read and checked (O(pages);
    it leaves out only the index-against-table comparison of ``integrity_check``, which
    costs twice as much). Measured on this project's 2-core machine: 30 ms for a 16 MB
    node.db of 100k items, 0.6-0.8 s for a 250 MB one of 1M. Raises StorageDamaged naming
    the first problem found."""
    rows = conn.execute(f"PRAGMA quick_check({QUICK_CHECK_MAX_ERRORS})").fetchall()
    problems = [line.strip() for (text,) in rows for line in str(text).splitlines() if line.strip()]
    problems = [p for p in problems if p != "ok" and not p.startswith("*** in database")]
    if problems:
        first = problems[0] if len(problems[0]) <= 160 else problems[0][:160] + "..."
        raise _damaged(path, node_id, f"quick_check: {first}")


class SnapshotInstall:
    """A snapshot being installed over several transactions (:meth:`NodeStorage.begin_install`).

    The first transaction deleted the shard's rows and left it empty (position ZERO, not
    synced: the node holds no copy to serve, snapshot or promote from) with an
    ``installing`` marker; each :meth:`step` inserts one batch of rows; :meth:`finish`
    inserts the log tail and sets the shard's position in one last transaction. Until
    then a crash, :meth:`abandon`, or a newer install or drop of the shard leaves the
    shard empty, never partly installed under a position."""

    def __init__(self, storage: NodeStorage, shard: ShardId, snapshot: shardnode_pb2.ShardSnapshot,
                 last: LogPosition, fenced_epoch: int, batches: list[tuple[str, snapshots.Rows]]) -> None:
        self.shard = shard
        self._storage = storage
        self._snapshot = snapshot
        self._last = last
        self._fenced_epoch = fenced_epoch
        self._batches = batches
        self._next = 0

    @property
    def done(self) -> bool:
        """Every batch is in; :meth:`finish` remains."""
        return self._next >= len(self._batches)

    @property
    def current(self) -> bool:
        """Neither finished, abandoned, nor replaced by a newer install or drop of the shard."""
        return self._storage._installs.get(self.shard) is self

    def step(self) -> None:
        """Inserts the next batch, in one transaction. Raises FailedPrecondition when the
        install is no longer current, CorruptRecord when the batch clashes (the caller
        abandons), Unavailable (disk)."""
        self._check_current()
        statement, rows = self._batches[self._next]
        with self._storage._write_txn() as txn:
            txn.touched.add(self.shard)
            try:
                self._storage._conn.executemany(statement, rows)
            except sqlite3.IntegrityError as e:
                raise CorruptRecord(f"the snapshot of {self.shard} lists a row twice") from e
        self._next += 1

    def finish(self) -> ShardMeta:
        """The remaining batches, the log tail and the shard's position, in one
        transaction; the fenced epoch becomes ``max(current, fenced_epoch,
        snapshot.last.epoch)``. Returns the shard's meta."""
        self._check_current()
        storage = self._storage
        with storage._write_txn() as txn:
            conn = storage._conn
            try:
                for statement, rows in self._batches[self._next:]:
                    conn.executemany(statement, rows)
            except sqlite3.IntegrityError as e:
                raise CorruptRecord(f"the snapshot of {self.shard} lists a row twice") from e
            self._next = len(self._batches)
            conn.executemany(apply.INSERT_ENTRY, snapshots.tail_rows(self.shard, self._snapshot))
            schema.delete_meta(conn, INSTALLING + self.shard)
            row = txn.row(self.shard)
            row.fenced = max(row.fenced, self._fenced_epoch, self._last.epoch)
            row.last_epoch, row.last_lsn = self._last.epoch, self._last.lsn
            row.first_lsn = self._snapshot.tail[0].lsn if self._snapshot.tail else self._last.lsn + 1
            txn.dirty.add(self.shard)
        storage._installs.pop(self.shard, None)
        return storage._meta[self.shard]

    def abandon(self) -> None:
        """Deletes what the install inserted, leaving the shard empty; a no-op when it is
        no longer current (a newer install or drop owns the shard's rows)."""
        if not self.current:
            return
        storage = self._storage
        storage._installs.pop(self.shard, None)
        with storage._write_txn() as txn:
            storage._empty_shard(txn, self.shard)
            txn.dirty.add(self.shard)

    def _check_current(self) -> None:
        if not self.current:
            raise FailedPrecondition(f"the install of a snapshot of {self.shard} was replaced or abandoned")


class SnapshotPages:
    """One shard's snapshot read a page at a time (:meth:`NodeStorage.snapshot_pages`),
    each :meth:`next` one short read, so that a large shard does not hold the node's event
    loop for the whole read. Writes may land between pages: every committed write
    transaction counts against the shards it changed (any shard, for one that names
    none), and :meth:`unchanged` says whether none touched this shard since the first
    page, that is whether the pages read make the snapshot of :attr:`last`."""

    def __init__(self, storage: NodeStorage, shard: ShardId, last: LogPosition,
                 pages: Iterator[shardnode_pb2.ShardSnapshot]) -> None:
        self.shard = shard
        self.last = last
        self._storage = storage
        self._mark = storage._change_mark(shard)
        self._pages = pages

    def next(self) -> bytes | None:
        """The next page's encoding, or None after the last."""
        with self._storage._sqlite():
            page = next(self._pages, None)
        return None if page is None else page.SerializeToString()

    def unchanged(self) -> bool:
        """Nothing changed the shard since this read began (its pages are consistent)."""
        storage = self._storage
        return storage._change_mark(self.shard) == self._mark and storage.meta(self.shard).last == self.last


class NodeStorage:
    """Every shard a node holds: players, items, gold, player data, the replicated log,
    applied request ids with their answers, and the 2PC escrows (schema in
    :mod:`shardnode.storage.schema`). Open with :meth:`open`; not thread-safe."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        lock: IO[bytes],
        *,
        log_retention_entries: int,
        request_retention_s: float,
        node_id: str | None = None,
    ) -> None:
        self._conn = conn
        self._path = path
        self._lock = lock
        self._node_id = node_id
        self._log_retention_entries = log_retention_entries
        self._request_retention_ms = int(request_retention_s * 1000)
        self._meta: dict[ShardId, ShardMeta] = {}
        self._damage: StorageDamaged | None = None
        self._files = _file_identities(path)  # what the connection opened: node.db and its WAL
        self._writeback: WalWriteback | None = None
        self._failing_since: float | None = None  # monotonic: the first failed write since the last commit
        self._failing_since_ms = 0  # the same, in Unix milliseconds (0: writes work)
        self._failing_error = ""  # the last failed write's error
        self._failing_reported = False
        self._write_failures = retry.FailureLog()  # one warning, then summaries every few seconds
        self.failing_limit_s = STORAGE_FAILING_LIMIT_S
        self.on_failing: Callable[[Unavailable], None] | None = None
        """Called once, with the last error, when every write has failed for
        :attr:`failing_limit_s` (:data:`STORAGE_FAILING_LIMIT_S`): the process should
        leave service so that its shards fail over. Reads and the file are fine."""
        self.on_damaged: Callable[[StorageDamaged], None] | None = None
        """Called once, with the error, when damage is first found while serving (the call
        that found it raises the same error). The process must leave service: nothing this
        storage answers afterwards is trustworthy, and every later call raises
        StorageDamaged without touching the file."""
        self._installs: dict[ShardId, SnapshotInstall] = {}
        self._generations: dict[ShardId, int] = {}  # committed write transactions that changed the shard
        self._any_shard_changes = 0  # ... that changed rows of shards they did not name
        with self._sqlite():
            self._meta = self._load_meta()
            self._reclaiming = {ShardId(k[len(RECLAIMING):]) for k in schema.meta_keys(self._conn, RECLAIMING)}
        self._drop_interrupted_installs()

    # --- lifecycle -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        synchronous: schema.Synchronous = "NORMAL",
        log_retention_entries: int = 10_000,
        request_retention_s: float = 86_400,
        node_id: str | None = None,
        check_integrity: bool = True,
    ) -> NodeStorage:
        """Opens (creating if needed) ``<data_dir>/node.db``, checks it, and recovers every
        shard's position from it.

        ``log_retention_entries``: entries :meth:`prune` keeps per shard (at least 1).
        ``request_retention_s``: how long :meth:`prune` keeps applied request ids.
        ``node_id``: the node this data dir belongs to. A new database records it, one
        without a record adopts it; one recorded for another node is refused (its data
        and fences are that node's). None skips the check (tools, tests).
        ``check_integrity``: run ``PRAGMA quick_check`` first (O(pages): about 30 ms for
        a node.db of 100k items).
        Raises StorageDamaged when the file is damaged; FailedPrecondition when another
        process holds the data dir, when the file was written by a newer build, or when it
        belongs to another node; CorruptRecord when a shard's recorded bounds do not match
        its log; Unavailable when the data dir or the file cannot be opened.
        """
        if synchronous not in ("NORMAL", "FULL"):
            raise InvalidArgument(f"synchronous is {echo(synchronous)}; use NORMAL or FULL")
        if log_retention_entries < 1:
            raise InvalidArgument(f"log_retention_entries is {log_retention_entries}; keep at least 1 entry")
        if request_retention_s <= 0:
            raise InvalidArgument(f"request_retention_s is {request_retention_s}; it must be positive")
        data_dir = Path(data_dir)
        if data_dir.exists() and not data_dir.is_dir():
            raise FailedPrecondition(
                f"data dir {data_dir} is not a directory; give a directory (it is created if absent)"
            )
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Unavailable(f"cannot create data dir {data_dir}: {e.strerror or e}") from e
        lock = _lock_data_dir(data_dir)
        path = data_dir / DB_FILE
        try:
            _check_can_write(data_dir, path)
        except BaseException:
            lock.close()
            raise
        try:
            with _sqlite_errors(path, node_id):
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=256)
                try:
                    schema.configure(conn, synchronous)
                    if check_integrity:
                        _check_integrity(conn, path, node_id)
                    schema.ensure_schema(conn, str(path))
                    if node_id is not None:
                        schema.claim_node_id(conn, str(data_dir), node_id)
                    storage = cls(
                        conn,
                        path,
                        lock,
                        log_retention_entries=log_retention_entries,
                        request_retention_s=request_retention_s,
                        node_id=node_id,
                    )
                    storage.synchronous = synchronous
                    if synchronous == "NORMAL":  # under FULL every commit fsyncs the WAL itself
                        storage._writeback = WalWriteback(path.with_name(path.name + "-wal")).start()
                    return storage
                except BaseException:
                    conn.close()
                    raise
        except BaseException:
            lock.close()
            raise

    def check_files(self) -> None:
        """Damage (StorageDamaged, :attr:`on_damaged` told) when node.db or its WAL is no
        longer the file this storage opened: deleted, or replaced. SQLite goes on writing
        to the open file, so every commit would succeed while nothing reached the path a
        restart opens. Cheap (two stat calls): the data plane calls it every few seconds."""
        if self._damage is not None:
            return
        now = _file_identities(self._path)
        changed = [name for name, identity in self._files.items() if now.get(name) != identity]
        if not changed:
            return
        missing = [name for name in changed if name not in now]
        what = "deleted" if missing == changed else "replaced"
        self._damage = StorageDamaged(
            f"node storage {', '.join(str(self._path.with_name(n)) for n in changed)} was {what} while the node "
            "ran: its writes no longer reach the data dir, and a restart would not find them"
        )
        if self.on_damaged is not None:
            self.on_damaged(self._damage)

    def close(self) -> None:
        """Closes the database and releases the data dir. Idempotent. Committed writes are
        already durable; closing only checkpoints the WAL into the main file."""
        if self._writeback is not None:
            self._writeback.stop()
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        self._lock.close()

    def __enter__(self) -> NodeStorage:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    synchronous: schema.Synchronous = "NORMAL"
    """The durability the database was opened with (NORMAL: a process crash; FULL: a
    power loss, at an fsync per commit)."""

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def damage(self) -> StorageDamaged | None:
        """The damage found while serving, or None while the file is sound."""
        return self._damage

    @property
    def cluster_uid(self) -> str:
        """The cluster this data belongs to ("" until the node first registered)."""
        with self._sqlite():
            return schema.read_meta(self._conn, schema.CLUSTER_UID_KEY)

    def record_cluster_uid(self, uid: str) -> None:
        """Durably records the cluster this data belongs to (the control plane's answer to
        the node's first registration); later registrations send it, and a control plane
        of another cluster refuses them."""
        with self._sqlite():
            schema.write_meta(self._conn, schema.CLUSTER_UID_KEY, uid)

    # --- shard positions and fences ----------------------------------------------------

    def shards(self) -> dict[ShardId, ShardMeta]:
        """Every shard with any state on disk (data, log, or only a fence)."""
        return dict(self._meta)

    def meta(self, shard: ShardId) -> ShardMeta:
        """The shard's meta; ``(fenced 0, ZERO, first 1)`` for a shard unknown here."""
        return self._meta.get(shard) or records.empty_meta(shard)

    def fence(self, shard: ShardId, epoch: int) -> ShardMeta:
        """Durably raises the shard's fenced epoch to ``max(fenced_epoch, epoch)``; from
        the return on, writes and entries of older primaries are refused (flow 4, step
        one). Returns the shard's meta after the fence. Raises InvalidArgument for an
        epoch outside 0..2^63-1 (SQLite's INTEGER holds no more)."""
        _check_epoch(epoch)
        current = self.meta(shard)
        if epoch <= current.fenced_epoch:
            return current
        with self._write_txn() as txn:
            row = txn.row(shard)
            row.fenced = max(row.fenced, epoch)
            txn.dirty.add(shard)
        return self._meta[shard]

    def mark_synced(self, shard: ShardId) -> ShardMeta:
        """Durably records that this node holds a copy of the shard's log (it caught up
        with a primary, installed a snapshot, or became primary), so after a restart it
        knows it may be promoted even when the log is empty. Idempotent."""
        current = self.meta(shard)
        if current.synced:
            return current
        with self._write_txn() as txn:
            txn.row(shard).synced = True
            txn.dirty.add(shard)
        return self._meta[shard]

    # --- primary side --------------------------------------------------------------------

    def write(self, shard: ShardId, epoch: int, op: shardnode_pb2.WriteOp, now_ms: int) -> WriteResult:
        """Applies one write as the shard's primary at ``epoch``, in one transaction:
        validates it against the current state, applies it, appends the entry
        ``(epoch, last.lsn + 1)`` stamped ``written_at_ms=now_ms``, and records the
        request id with its answer.

        A request id already recorded for the shard returns the recorded result with
        ``replayed=True`` (nothing applied) when the op is the same; the first attempt may
        not have been replicated yet, so the caller waits for its ``lsn`` as for a new
        write. An op without a request id is applied and not recorded.
        Raises InvalidArgument (malformed op), FailedPrecondition (epoch older than the
        shard's fence; item already owned on this node, naming the owner's shard; gold over
        2^53; request id reused for a different op), Unavailable (disk).
        """
        # No savepoint: a refused write rolls the whole (one-write) transaction back.
        with self._write_txn() as txn:
            return self._write_one(txn, shard, epoch, op, now_ms)

    def write_many(
        self, writes: Sequence[tuple[ShardId, int, shardnode_pb2.WriteOp]], now_ms: int
    ) -> list[WriteResult | BlueMarbleError]:
        """:meth:`write` for many writes in one transaction (group commit: one WAL append,
        one fsync under FULL). Each write runs in its own savepoint, in order, and sees the
        ones before it: a refused write is returned as its error, in its place, and undoes
        nothing else. Raises (and commits nothing) only when the storage itself fails."""
        if len(writes) == 1:
            # One write: a refusal rolls the whole transaction back, no savepoint needed.
            shard, epoch, op = writes[0]
            refused: list[BlueMarbleError] = []
            try:
                with self._write_txn() as txn:
                    try:
                        return [self._write_one(txn, shard, epoch, op, now_ms)]
                    except BlueMarbleError as e:
                        refused.append(e)
                        raise _Rollback from e
            except _Rollback:
                return [refused[0]]
        if len(writes) > 1:
            # Optimistically without savepoints (two statements fewer per write); refusals
            # are rare, and one rolls this attempt back whole for the careful path below.
            try:
                with self._write_txn() as txn:
                    return [self._write_one(txn, shard, epoch, op, now_ms) for shard, epoch, op in writes]
            except BlueMarbleError:
                pass
        results: list[WriteResult | BlueMarbleError] = []
        execute = self._conn.execute
        with self._write_txn() as txn:
            for shard, epoch, op in writes:
                execute("SAVEPOINT op")
                try:
                    result = self._write_one(txn, shard, epoch, op, now_ms)
                except BlueMarbleError as e:
                    execute("ROLLBACK TO op")
                    execute("RELEASE op")
                    results.append(e)
                    continue
                execute("RELEASE op")
                results.append(result)
        return results

    def _write_one(
        self, txn: _Txn, shard: ShardId, epoch: int, op: shardnode_pb2.WriteOp, now_ms: int
    ) -> WriteResult:
        if epoch < 1:
            raise InvalidArgument(f"epoch is {epoch}; a primary writes at epoch 1 or later")
        self._finish_reclaim(txn, shard)
        row = txn.row(shard)
        if epoch < row.fenced:
            raise FailedPrecondition(
                f"{shard} is fenced at epoch {row.fenced}; a write at epoch {epoch} is refused "
                "(a newer primary exists)"
            )
        kind = records.check_op(op)
        payload = op.SerializeToString(deterministic=True)
        if op.request_id:
            found = self._conn.execute(apply.SELECT_REQUEST, (shard, op.request_id)).fetchone()
            if found is not None:
                recorded_digest, lsn, response = found
                # NULL digest: recorded from a snapshot whose log no longer holds the op.
                # Answering the recorded result is the safe side: nothing is applied twice.
                if recorded_digest is not None and recorded_digest != records.op_digest(payload):
                    raise FailedPrecondition(
                        f"request id {echo(op.request_id)} was already used for a different request "
                        f"on {shard} (lsn {lsn}); use a new request id for a new request"
                    )
                return WriteResult(lsn, response, True)
        lsn = row.last_lsn + 1
        response = apply.apply_op(self._conn, shard, epoch, lsn, op, kind, primary=True)
        apply.append_entry(self._conn, shard, epoch, lsn, now_ms, payload, op.request_id, response)
        row.advance(epoch, lsn)
        txn.dirty.add(shard)
        return WriteResult(lsn, response, False, payload)

    # --- replica side --------------------------------------------------------------------

    def append(
        self,
        batch: Sequence[tuple[ShardId, Sequence[shardnode_pb2.LogEntry]]],
        fenced: Mapping[ShardId, int],
    ) -> dict[ShardId, LogPosition]:
        """Applies replicated entries of many shards in one transaction (the replica acks
        after it returns), and raises each shard in ``fenced`` to at least that epoch.

        The entries were checked by the replication rules (sender's epoch, ``prev``); they
        are applied as given, recording their request ids and answers as the primary did.
        Items are unique per shard only: two shards of this node may briefly disagree about
        an item while their histories catch up, which a replica must not refuse.
        Returns the new last position of every shard in ``batch`` or ``fenced``.
        Raises (committing nothing) FailedPrecondition when entries do not continue the
        shard's log (lsn gap, older epoch), CorruptRecord for a payload no primary writes,
        InvalidArgument for an epoch or lsn past 2^63-1 (SQLite's INTEGER holds no more).
        """
        for epoch in fenced.values():
            _check_epoch(epoch)
        for _, entries in batch:
            for entry in entries:
                if entry.epoch > MAX_LOG_COUNTER or entry.lsn > MAX_LOG_COUNTER:
                    raise InvalidArgument(
                        f"entry ({entry.epoch}, {entry.lsn}) is past 2^63-1, the largest epoch or lsn; not applied"
                    )
        touched: list[ShardId] = []
        with self._write_txn() as txn:
            for shard, epoch in fenced.items():
                row = txn.row(shard)
                if epoch > row.fenced:
                    row.fenced = epoch
                    txn.dirty.add(shard)
                touched.append(shard)
            for shard, entries in batch:
                if entries:
                    self._finish_reclaim(txn, shard)
                row = txn.row(shard)
                touched.append(shard)
                for entry in entries:
                    self._append_one(shard, row, entry)
                if entries:
                    txn.dirty.add(shard)
        return {shard: self.meta(shard).last for shard in touched}

    def _append_one(self, shard: ShardId, row: _ShardRow, entry: shardnode_pb2.LogEntry) -> None:
        if entry.lsn != row.last_lsn + 1 or entry.epoch < max(row.last_epoch, 1):
            raise FailedPrecondition(
                f"entry ({entry.epoch}, {entry.lsn}) does not continue the log of {shard}, which ends at "
                f"({row.last_epoch}, {row.last_lsn}); it was not applied"
            )
        op, kind = records.decode_op(shard, entry)
        response = apply.apply_op(self._conn, shard, entry.epoch, entry.lsn, op, kind, primary=False)
        apply.append_entry(
            self._conn, shard, entry.epoch, entry.lsn, entry.written_at_ms, entry.payload, op.request_id, response
        )
        row.advance(entry.epoch, entry.lsn)

    # --- the log -------------------------------------------------------------------------

    def entries(
        self, shard: ShardId, from_lsn: int, *, max_entries: int = 512, max_bytes: int = 4 << 20
    ) -> list[shardnode_pb2.LogEntry]:
        """Entries of the shard from ``from_lsn`` on, in order: at most ``max_entries``,
        and no more than ``max_bytes`` of payload (but always at least one entry when any
        exists). Empty when ``from_lsn`` is past the end. Raises FailedPrecondition when
        entries from ``from_lsn`` were pruned (the replica needs a snapshot)."""
        meta = self.meta(shard)
        from_lsn = max(from_lsn, 1)
        if from_lsn > meta.last.lsn:
            return []
        if from_lsn < meta.first_retained_lsn:
            raise FailedPrecondition(
                f"entries of {shard} before lsn {meta.first_retained_lsn} were pruned; "
                f"lsn {from_lsn} can only be reached through a snapshot"
            )
        out: list[shardnode_pb2.LogEntry] = []
        size = 0
        with self._sqlite():
            for lsn, epoch, payload, written_at_ms in self._conn.execute(
                _SELECT_ENTRIES, (shard, from_lsn, max(max_entries, 1))
            ):
                size += len(payload)
                if out and size > max_bytes:
                    break
                out.append(shardnode_pb2.LogEntry(lsn=lsn, epoch=epoch, payload=payload, written_at_ms=written_at_ms))
        return out

    def epoch_at(self, shard: ShardId, lsn: int) -> int | None:
        """Epoch of the entry at ``lsn`` (0 for lsn 0, the empty log's position), or None
        when this node does not know it (never had it, or pruned it). The last entry's
        epoch is known even when it came in a snapshot without a tail."""
        if lsn == 0:
            return 0
        meta = self.meta(shard)
        if lsn == meta.last.lsn:
            return meta.last.epoch
        with self._sqlite():
            found = self._conn.execute(_ENTRY_AT, (shard, lsn)).fetchone()
        return None if found is None else int(found[0])

    def written_at_ms(self, shard: ShardId, lsn: int) -> int | None:
        """Unix ms at which the primary committed the entry at ``lsn``; None when the entry
        is not in this node's log."""
        with self._sqlite():
            found = self._conn.execute(_ENTRY_AT, (shard, lsn)).fetchone()
        return None if found is None else int(found[1])

    # --- reads ---------------------------------------------------------------------------

    def inventory(self, shard: ShardId, player: PlayerId) -> tuple[list[str], int] | None:
        """``(item ids sorted, gold)`` of a player of the shard; None for a player the
        shard never saw."""
        with self._sqlite():
            found = self._conn.execute(apply.SELECT_GOLD, (shard, player)).fetchone()
            if found is None:
                return None
            items = [r[0] for r in self._conn.execute(apply.PLAYER_ITEMS, (shard, player))]
        return items, int(found[0])

    def player_data(self, shard: ShardId, player: PlayerId, system: str, key: str) -> tuple[bytes, int] | None:
        """``(value, lsn of the write that set it)``, or None when the player has no value
        for that system and key."""
        with self._sqlite():
            found = self._conn.execute(_SELECT_DATA, (shard, player, system, key)).fetchone()
        return None if found is None else (bytes(found[0]), int(found[1]))

    def player_data_size(self, shard: ShardId, player: PlayerId, system: str, key: str) -> int | None:
        """The length of one player-data value, or None when it is not set (reads the
        length only, not the value)."""
        with self._sqlite():
            found = self._conn.execute(apply.DATA_SIZE, (shard, player, system, key)).fetchone()
        return None if found is None else int(found[0])

    def player_data_bytes(self, shard: ShardId) -> int:
        """Bytes of player data the shard holds (systems, keys and values)."""
        with self._sqlite():
            return int(self._conn.execute(_SHARD_DATA_BYTES, {"s": shard}).fetchone()[0])

    def recorded(self, shard: ShardId, request_id: str) -> WriteResult | None:
        """The recorded result of a request id on the shard (``replayed=True``), or None."""
        with self._sqlite():
            found = self._conn.execute(apply.SELECT_REQUEST, (shard, request_id)).fetchone()
        return None if found is None else WriteResult(int(found[1]), bytes(found[2]), True)

    def item_owner(self, item_id: str) -> tuple[ShardId, PlayerId] | None:
        """``(shard, player)`` holding the item on this node, across every shard, or None.
        Should two shards hold it (a replica mid catch-up), the lowest shard id is named."""
        with self._sqlite():
            found = self._conn.execute(apply.ITEM_OWNER, (item_id,)).fetchone()
        return None if found is None else (ShardId(found[0]), PlayerId(found[1]))

    # --- snapshots -----------------------------------------------------------------------

    def snapshot(
        self,
        shard: ShardId,
        *,
        max_tail_entries: int = DEFAULT_SNAPSHOT_TAIL_ENTRIES,
        max_tail_bytes: int = DEFAULT_SNAPSHOT_TAIL_BYTES,
    ) -> shardnode_pb2.ShardSnapshot:
        """A consistent copy of one shard, read in one transaction: its players (with
        sorted items), player data, request records, and the last entries of its log (at
        most ``max_tail_entries`` / ``max_tail_bytes`` of payload, always ending at
        ``last``), so the installed copy can serve catch-ups in turn. Every list is sorted,
        so two nodes with the same state produce equal snapshots."""
        with self._sqlite():
            self._conn.execute("BEGIN")
            try:
                return snapshots.read_snapshot(
                    self._conn, shard, self.meta(shard).last, max_tail_entries, max_tail_bytes
                )
            finally:
                self._conn.execute("COMMIT")

    def snapshot_pages(
        self,
        shard: ShardId,
        *,
        max_tail_entries: int = DEFAULT_SNAPSHOT_TAIL_ENTRIES,
        max_tail_bytes: int = DEFAULT_SNAPSHOT_TAIL_BYTES,
        page_rows: int = snapshots.PAGE_ROWS,
        page_bytes: int = snapshots.PAGE_BYTES,
    ) -> SnapshotPages:
        """The shard's snapshot, to read page by page (:class:`SnapshotPages`): the
        caller's loop runs between pages, and the pages are a snapshot only if
        :meth:`SnapshotPages.unchanged` holds once the last is read."""
        last = self.meta(shard).last
        pages = snapshots.read_snapshot_pages(
            self._conn, shard, last, max_tail_entries, max_tail_bytes, page_rows=page_rows, page_bytes=page_bytes
        )
        return SnapshotPages(self, shard, last, pages)

    def _change_mark(self, shard: ShardId) -> tuple[int, int]:
        return self._generations.get(shard, 0), self._any_shard_changes

    def begin_install(
        self,
        snapshot: shardnode_pb2.ShardSnapshot,
        fenced_epoch: int,
        *,
        max_rows: int | None = None,
        max_bytes: int | None = None,
    ) -> SnapshotInstall:
        """Starts replacing everything this node holds of the snapshot's shard (data, log,
        request records, escrows) with the snapshot: checks it, then deletes the shard's
        rows in one transaction (the shard is empty from here on), and returns the install
        to run batch by batch (:class:`SnapshotInstall`). A newer install of the shard, or
        a drop, replaces this one. Raises CorruptRecord (nothing changed) for a snapshot no
        primary produces."""
        shard = ShardId(snapshot.shard_id)
        last = snapshots.check_snapshot(snapshot)
        batches = snapshots.install_batches(
            shard, snapshot, max_rows or INSTALL_BATCH_ROWS, max_bytes or INSTALL_BATCH_BYTES
        )
        with self._write_txn() as txn:
            self._empty_shard(txn, shard)
            schema.put_meta(self._conn, INSTALLING + shard, str(last))
            txn.dirty.add(shard)
        install = self._installs[shard] = SnapshotInstall(self, shard, snapshot, last, fenced_epoch, batches)
        return install

    def install_snapshot(self, snapshot: shardnode_pb2.ShardSnapshot, fenced_epoch: int) -> ShardMeta:
        """:meth:`begin_install` and :meth:`SnapshotInstall.finish` at once (tools, tests):
        the rows go in with the tail, in the install's second transaction. Raises
        CorruptRecord (nothing changed) for a snapshot no primary produces."""
        install = self.begin_install(snapshot, fenced_epoch)
        try:
            return install.finish()
        except BaseException:
            install.abandon()
            raise

    def _drop_interrupted_installs(self) -> None:
        """Empties the shards whose snapshot install a crash interrupted (their markers)."""
        with self._sqlite():
            shards = [ShardId(key[len(INSTALLING):]) for key in schema.meta_keys(self._conn, INSTALLING)]
        for shard in shards:
            with self._write_txn() as txn:
                self._empty_shard(txn, shard)
                txn.dirty.add(shard)
            log.warning("dropped a snapshot a restart interrupted; the shard is copied again from its primary",
                        shard=shard, path=str(self._path))

    def drop_shard(self, shard: ShardId) -> None:
        """Deletes everything this node holds of the shard but its fence: a fenced epoch
        must outlive the data (I1: a node that fenced epoch e refuses older primaries even
        after dropping and re-adding the shard). A shard never fenced disappears entirely."""
        self._installs.pop(shard, None)
        with self._write_txn() as txn:
            row = self._empty_shard(txn, shard)
            if row.fenced:
                txn.dirty.add(shard)
            else:
                self._conn.execute("DELETE FROM shards WHERE shard_id = ?", (shard,))
                txn.rows.pop(shard)
                txn.forget.add(shard)

    def _empty_shard(self, txn: _Txn, shard: ShardId) -> _ShardRow:
        """Deletes the shard's rows and any install marker, and resets its position to
        "holds nothing" (the fence stays); returns its row, not yet marked dirty."""
        self._delete_shard_rows(shard)
        schema.delete_meta(self._conn, INSTALLING + shard)
        if shard in self._reclaiming:
            schema.delete_meta(self._conn, RECLAIMING + shard)
            txn.reclaimed.add(shard)
        row = txn.row(shard)
        row.last_epoch, row.last_lsn, row.first_lsn, row.synced = 0, 0, 1, False
        return row

    def _delete_shard_rows(self, shard: ShardId) -> None:
        for table in schema.SHARD_TABLES:
            self._conn.execute(f"DELETE FROM {table} WHERE shard_id = ?", (shard,))

    # --- reclaiming a copy ---------------------------------------------------------------

    def reclaiming(self) -> frozenset[ShardId]:
        """The shards whose reclaim passed its position step (:meth:`reclaim_step`) and is
        not finished: a restart goes on with them."""
        return frozenset(self._reclaiming)

    def reclaim_step(self, shard: ShardId, max_rows: int) -> bool:
        """One transaction of deleting this node's copy of ``shard`` (a copy without a role
        here that nobody counts on); deletes at most about ``max_rows`` rows. Returns True
        once the copy is gone (its fence stays, as with :meth:`drop_shard`).

        In order: the log from its oldest entry (the copy stays whole, as after a prune:
        a role that arrives meanwhile finds a consistent copy), then, in one transaction,
        the position ("holds nothing", not synced) with a :data:`RECLAIMING` marker, then
        the other rows. From the marker on, a write, replicated entries or a snapshot for
        the shard first delete what is left in their own transaction, and a restart goes
        on where this stopped."""
        budget = max(max_rows, 1)
        started = done = False
        with self._write_txn() as txn:
            if shard in self._reclaiming:
                removed = 0
                for table in schema.SHARD_TABLES:
                    keys = ", ".join(schema.SHARD_TABLE_KEYS[table])
                    removed += self._conn.execute(
                        f"DELETE FROM {table} WHERE ({keys}) IN "  # table and key names from the schema
                        f"(SELECT {keys} FROM {table} WHERE shard_id = ? LIMIT ?)",
                        (shard, budget - removed),
                    ).rowcount
                    if removed >= budget:
                        break
                txn.touched.add(shard)
                if removed < budget:  # nothing was left
                    schema.delete_meta(self._conn, RECLAIMING + shard)
                    txn.reclaimed.add(shard)
                    done = True
            else:
                row = txn.row(shard)
                if row.last_lsn >= row.first_lsn:
                    upto = min(row.last_lsn, row.first_lsn + budget - 1)
                    self._conn.execute("DELETE FROM log WHERE shard_id = ? AND lsn <= ?", (shard, upto))
                    row.first_lsn = upto + 1
                else:
                    row.last_epoch, row.last_lsn, row.first_lsn, row.synced = 0, 0, 1, False
                    schema.put_meta(self._conn, RECLAIMING + shard, "")
                    started = True
                txn.dirty.add(shard)
        if started:
            self._reclaiming.add(shard)
        return done

    def _finish_reclaim(self, txn: _Txn, shard: ShardId) -> None:
        """Inside a write transaction that writes to ``shard``: deletes what is left of a
        reclaimed copy of it first (its position already says it holds nothing)."""
        if shard in self._reclaiming and shard not in txn.reclaimed:
            self._delete_shard_rows(shard)
            schema.delete_meta(self._conn, RECLAIMING + shard)
            txn.reclaimed.add(shard)

    # --- retention -----------------------------------------------------------------------

    def prune(self, now_ms: int, *, max_rows: int = DEFAULT_PRUNE_MAX_ROWS) -> int:
        """Trims each shard's log to its last ``log_retention_entries`` entries and forgets
        request ids recorded more than ``request_retention_s`` before ``now_ms``, removing
        at most about ``max_rows`` rows per call (call again while it returns that many).
        Returns the rows removed."""
        removed = 0
        budget = max(max_rows, 1)
        cutoff_ms = now_ms - self._request_retention_ms
        with self._write_txn() as txn:
            for shard, meta in sorted(self._meta.items()):
                if budget <= removed:
                    break
                keep_from = meta.last.lsn - self._log_retention_entries + 1
                upto = min(keep_from - 1, meta.first_retained_lsn + (budget - removed) - 1)
                if upto < meta.first_retained_lsn:
                    continue
                cursor = self._conn.execute("DELETE FROM log WHERE shard_id = ? AND lsn <= ?", (shard, upto))
                removed += cursor.rowcount
                txn.row(shard).first_lsn = upto + 1
                txn.dirty.add(shard)
            if removed < budget:
                cursor = self._conn.execute(
                    "DELETE FROM requests WHERE (shard_id, request_id) IN (SELECT shard_id, request_id "
                    "FROM requests WHERE recorded_at_ms < ? ORDER BY recorded_at_ms LIMIT ?)",
                    (cutoff_ms, budget - removed),
                )
                removed += cursor.rowcount
                txn.any_shard = txn.any_shard or cursor.rowcount > 0
            # Records of unknown age (installed from a snapshot) start their retention now.
            self._conn.execute("UPDATE requests SET recorded_at_ms = ? WHERE recorded_at_ms IS NULL", (now_ms,))
        return removed

    # --- trades (participant records and escrows; see shardnode/storage/trades.py) --------

    def holdings(self, shard: ShardId, player: PlayerId, receiving: Sequence[str] = ()) -> Holdings:
        """The player's items and gold on the shard, escrowed ones included, what the
        PREPARED trades hold back (empty for a player the shard never saw), and which of
        the ``receiving`` item ids the shard still stores for another player."""
        with self._sqlite():
            return trades.holdings(self._conn, shard, player, receiving)

    def trade(self, shard: ShardId, trade_id: str) -> trades.TradeRecord | None:
        """The shard's record of ``trade_id``, or None."""
        with self._sqlite():
            return trades.load(self._conn, shard, trade_id)

    def trade_records(self, trade_id: str, shards: Collection[ShardId]) -> list[trades.TradeRecord]:
        """The records of ``trade_id`` on those of ``shards`` that hold one."""
        with self._sqlite():
            return trades.records_of(self._conn, trade_id, shards)

    def prepared_trades(
        self, shards: Collection[ShardId], *, due_by_ms: int | None = None, limit: int = 1000
    ) -> list[trades.TradeRecord]:
        """PREPARED records (escrows) of ``shards``, oldest first, at most ``limit``; only
        those whose deadline is at or before ``due_by_ms`` when it is given."""
        with self._sqlite():
            return trades.prepared(self._conn, shards, due_by_ms=due_by_ms, limit=limit)

    def prune_trades(self, now_ms: int, *, max_rows: int = DEFAULT_PRUNE_MAX_ROWS) -> int:
        """Forgets records of trades settled more than ``request_retention_s`` before
        ``now_ms`` (at most ``max_rows``); PREPARED ones are kept. Returns rows removed."""
        with self._write_txn() as txn:
            removed = trades.prune(self._conn, now_ms - self._request_retention_ms, max_rows)
            txn.any_shard = removed > 0
            return removed

    # --- internals -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _sqlite(self) -> Iterator[None]:
        """:func:`_sqlite_errors` for this storage, and the damage latch: once damage is
        found, every later call is refused here without touching the file (a damaged
        b-tree may answer some reads wrongly rather than fail), and :attr:`on_damaged` is
        told once."""
        if self._damage is not None:
            raise StorageDamaged(str(self._damage))
        try:
            with _sqlite_errors(self._path, self._node_id):
                yield
        except StorageDamaged as e:
            if self._damage is None:
                self._damage = e
                if self.on_damaged is not None:
                    self.on_damaged(e)
            raise

    @contextlib.contextmanager
    def _write_txn(self) -> Iterator[_Txn]:
        txn = _Txn(self._meta)
        conn = self._conn
        changes_before = conn.total_changes
        with self._failing_writes(lambda: conn.total_changes > changes_before), self._sqlite():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield txn
                if txn.dirty:
                    conn.executemany(
                        _UPSERT_SHARD,
                        [
                            (s, r.fenced, r.last_epoch, r.last_lsn, r.first_lsn, int(r.synced))
                            for s, r in txn.rows.items()
                            if s in txn.dirty
                        ],
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        named = txn.dirty | txn.touched
        for shard in named:
            self._generations[shard] = self._generations.get(shard, 0) + 1
        if txn.any_shard or (not named and conn.total_changes > changes_before):
            self._any_shard_changes += 1  # a transaction that named no shard: any may have changed
        for shard in txn.forget:
            self._meta.pop(shard, None)
        self._reclaiming -= txn.reclaimed
        for shard in txn.dirty:
            self._meta[shard] = txn.rows[shard].meta(shard)

    @contextlib.contextmanager
    def _failing_writes(self, wrote: Callable[[], bool]) -> Iterator[None]:
        """Times how long write transactions keep failing (not damage, not refusals):
        past :attr:`failing_limit_s` without a commit, :attr:`on_failing` is told once.
        Only a commit that ``wrote`` something ends the failure: an empty transaction
        (a prune with nothing to prune) commits on a full or read-only disk too."""
        try:
            yield
        except StorageDamaged:
            raise
        except Unavailable as e:
            if not isinstance(e.__cause__, sqlite3.OperationalError):
                raise  # not SQLite failing (a refusal of the caller's own)
            now_s = time.monotonic()
            self._write_failures.failed(
                "writes", now_s, "node storage refuses writes; the node leaves service if every write fails "
                "for the limit", error=str(e), limit_s=self.failing_limit_s,
            )
            self._failing_error = str(e)
            if self._failing_since is None:
                self._failing_since = now_s
                self._failing_since_ms = int(time.time() * 1000)
            elif (now_s - self._failing_since >= self.failing_limit_s and not self._failing_reported
                  and self.on_failing is not None):
                self._failing_reported = True
                self.on_failing(e)
            raise
        else:
            if self._failing_since is not None and wrote():
                self._write_failures.recovered("writes", time.monotonic(), "node storage takes writes again")
                self._failing_since = None
                self._failing_since_ms, self._failing_error = 0, ""

    def trouble(self) -> tuple[str, int]:
        """While every write fails: what the last one said, and since when (Unix
        milliseconds) they fail; ("", 0) while writes work. Heartbeats report it."""
        if self._failing_since is None:
            return "", 0
        # What the control plane takes (printable, at most 512 bytes), whatever the path or
        # the error holds: a heartbeat it refused would cost the node its lease.
        trouble = validation.made_printable("storage refuses writes: " + " ".join(self._failing_error.split()), 400)
        return trouble, self._failing_since_ms

    def _load_meta(self) -> dict[ShardId, ShardMeta]:
        metas: dict[ShardId, ShardMeta] = {}
        for shard_id, fenced, last_epoch, last_lsn, first_lsn, synced in self._conn.execute(_SELECT_SHARDS).fetchall():
            shard = ShardId(shard_id)
            low, high = self._conn.execute(_LOG_BOUNDS, (shard,)).fetchone()
            consistent = (low, high) == (first_lsn, last_lsn) if low is not None else first_lsn == last_lsn + 1
            if not consistent or (last_lsn == 0) != (last_epoch == 0) or last_epoch > fenced:
                raise CorruptRecord(
                    f"{self._path}: {shard} records log bounds [{first_lsn}, {last_lsn}] at epoch {last_epoch} "
                    f"(fence {fenced}) but its log holds [{low}, {high}]"
                )
            metas[shard] = _ShardRow(fenced, last_epoch, last_lsn, first_lsn, bool(synced)).meta(shard)
        return metas


MIN_FREE_BYTES = 16 << 20
"""Free space a node needs in its data dir to start: below it, the first writes would fail
and the node would leave service again, after taking roles (a restart loop of handoffs)."""


def _check_can_write(data_dir: Path, path: Path) -> None:
    """FailedPrecondition, before the node registers, when it could not take writes here:
    a directory where node.db or its WAL should be, a read-only file system, or a disk
    with less than :data:`MIN_FREE_BYTES` free."""
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and not file.is_file():
            raise FailedPrecondition(f"{file} is not a regular file; remove it (the node's database lives there)")
    try:
        st = os.statvfs(data_dir)
    except OSError as e:
        raise Unavailable(f"cannot read the file system of data dir {data_dir}: {e.strerror or e}") from e
    if st.f_flag & os.ST_RDONLY:
        raise FailedPrecondition(f"data dir {data_dir} is on a read-only file system; a node writes there")
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE_BYTES:
        raise FailedPrecondition(
            f"data dir {data_dir} has {free / (1 << 20):.1f} MiB free; a node needs at least "
            f"{MIN_FREE_BYTES >> 20} MiB to take writes: free some space or grow the volume, then start it again"
        )


def _file_identities(path: Path) -> dict[str, tuple[int, int]]:
    """(device, inode) of ``path`` and of its WAL, by file name; a file missing is left out."""
    found: dict[str, tuple[int, int]] = {}
    for file in (path, path.with_name(path.name + "-wal")):
        with contextlib.suppress(OSError):
            st = os.stat(file)
            found[file.name] = (st.st_dev, st.st_ino)
    return found


def _lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Takes the data dir for this process (a POSIX record lock on ``node.lock``, which
    the kernel releases when the process dies, however it dies). Two node processes on
    one data dir would each believe their in-memory positions; the second is refused."""
    path = data_dir / LOCK_FILE
    try:
        lock = open(path, "a+b")  # held open for the storage's lifetime
    except OSError as e:
        raise Unavailable(f"cannot open {path}: {e}") from e
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        lock.seek(0)
        holder = lock.read(32).decode("ascii", "replace").strip() or "unknown"
        lock.close()
        raise FailedPrecondition(
            f"data dir {data_dir} is in use by another process (pid {holder}); give each node its own --data-dir"
        ) from e
    lock.truncate(0)
    lock.write(str(os.getpid()).encode("ascii"))
    lock.flush()
    return lock
