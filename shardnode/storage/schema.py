"""The layout of a shard node's SQLite database (``<data_dir>/node.db``) and how it is
opened: pragmas, creation, and the version check that keeps an older build away from a
newer file.

Every table is keyed by ``shard_id`` first, so one shard's rows are one contiguous range
of each b-tree: a snapshot, an installation or a drop touches that range only. Tables are
``WITHOUT ROWID`` where the primary key is the only way rows are found (one b-tree
instead of two per insert).

The version is kept twice: ``PRAGMA user_version`` (read before anything else, one page
read) and the ``schema_version`` table (one row per migration applied, for people reading
the file with the sqlite3 shell).

Facts about the file as a whole (today: the id of the node it belongs to) live in
``node_meta``, created when missing by :func:`claim_node_id`. It does not bump the version:
a build that does not know the table ignores it and misreads nothing, so rolling the binary
back keeps working (it only loses the id check).
"""

from __future__ import annotations

import sqlite3
from typing import Literal

from bluemarble.core.errors import FailedPrecondition
from bluemarble.core.limits import echo

SCHEMA_VERSION = 2
"""Version this build writes. A database with a higher ``user_version`` is refused; one at
version 1 is migrated in place (:data:`_MIGRATE_V1_TO_V2`)."""

Synchronous = Literal["NORMAL", "FULL"]

_PREPARED_INDEX = "CREATE INDEX trades_prepared ON trades (shard_id, deadline_ms) WHERE state = 'PREPARED'"
"""Files written before it have ``trades_prepared`` over every row, (state, shard_id,
deadline_ms): :func:`_narrow_prepared_index` rebuilds it once. Same name, same queries
served, so the schema version stays: an older build uses either form."""

_TABLES_V1 = (
    # Per shard: the fence and the bounds of the log. Kept in one row (rather than read
    # back with MIN/MAX) so a restart reads every shard's position in one scan, and
    # because the fence must outlive the log (drop_shard keeps it).
    # first_lsn is the lowest lsn still in `log` (last_lsn + 1 when the log is empty).
    # synced (0/1): this node holds a copy of the shard's log, made by catching up with a
    # primary or installing a snapshot (so it may be promoted, even with an empty log).
    """
    CREATE TABLE shards (
        shard_id TEXT NOT NULL PRIMARY KEY,
        fenced_epoch INTEGER NOT NULL,
        last_epoch INTEGER NOT NULL,
        last_lsn INTEGER NOT NULL,
        first_lsn INTEGER NOT NULL,
        synced INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    # A player exists once they hold a grant or any player data (gold may be 0).
    """
    CREATE TABLE players (
        shard_id TEXT NOT NULL,
        player_id TEXT NOT NULL,
        gold INTEGER NOT NULL,
        PRIMARY KEY (shard_id, player_id)
    ) WITHOUT ROWID
    """,
    # Items are unique per shard: the key (item_id, shard_id) is the same constraint as
    # (shard_id, item_id), and it also finds an item's owner across the node's shards, so
    # a grant updates two b-trees per item instead of three. Across the shards of one
    # node the primary refuses duplicates (it looks the item up first); a replica does
    # not, because the shards it holds may be at different points of their histories.
    """
    CREATE TABLE items (
        item_id TEXT NOT NULL,
        shard_id TEXT NOT NULL,
        player_id TEXT NOT NULL,
        PRIMARY KEY (item_id, shard_id)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX items_by_player ON items (shard_id, player_id, item_id)",
    # Per-system player data (EVENTUAL systems such as guild or leaderboard). `lsn` is the
    # entry that set the value. `version` is empty today: it is where a vector clock goes
    # when multi-region replication arrives (roadmap step 8), so a merge can compare
    # versions without a schema change.
    """
    CREATE TABLE player_data (
        shard_id TEXT NOT NULL,
        player_id TEXT NOT NULL,
        system TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        lsn INTEGER NOT NULL,
        version BLOB NOT NULL DEFAULT x'',
        PRIMARY KEY (shard_id, player_id, system, key)
    ) WITHOUT ROWID
    """,
    # The append-only replicated log: one encoded WriteOp per entry, with the epoch of the
    # primary that wrote it and its commit time on that primary (for lag in seconds).
    """
    CREATE TABLE log (
        shard_id TEXT NOT NULL,
        lsn INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        written_at_ms INTEGER NOT NULL,
        payload BLOB NOT NULL,
        PRIMARY KEY (shard_id, lsn)
    ) WITHOUT ROWID
    """,
    # Applied request ids and their answers, for idempotent retries. op_digest is a hash of
    # the encoded WriteOp (NULL when unknown: a record installed from a snapshot whose log
    # tail no longer holds the entry). recorded_at_ms is the entry's written_at_ms (NULL
    # when unknown; prune stamps those with its own clock, so they live a full retention).
    """
    CREATE TABLE requests (
        shard_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        op_digest BLOB,
        lsn INTEGER NOT NULL,
        response BLOB NOT NULL,
        recorded_at_ms INTEGER,
        PRIMARY KEY (shard_id, request_id)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX requests_by_age ON requests (recorded_at_ms)",
    # Escrows of the two-phase commit (flow 6; the trades issue gives them their logic):
    # what a prepared trade holds back on this shard until the decision is applied. One
    # row per (trade, player); item_ids is a JSON array of the escrowed item ids; state is
    # the participant's state name (e.g. PREPARED, COMMITTED, ABORTED); deadline_ms (Unix
    # ms) is when the participant starts asking for the decision itself.
    """
    CREATE TABLE escrows (
        shard_id TEXT NOT NULL,
        trade_id TEXT NOT NULL,
        player_id TEXT NOT NULL,
        item_ids TEXT NOT NULL,
        gold INTEGER NOT NULL,
        state TEXT NOT NULL,
        deadline_ms INTEGER NOT NULL,
        PRIMARY KEY (shard_id, trade_id, player_id)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE schema_version (
        version INTEGER NOT NULL PRIMARY KEY,
        note TEXT NOT NULL
    )
    """,
)

_TABLES_V2 = (
    # A participant's record of each trade id (flow 6; shardnode/storage/trades.py):
    # state PREPARED / COMMITTED / ABORTED, the leg (an encoded TradeLeg; NULL for an
    # ABORTED recorded without an escrow; player A's leg for a same-shard trade), the
    # reason of the outcome, the times (Unix ms: prepared_at/deadline of an escrow,
    # settled_at of an outcome, all written by the primary into the log entry so every
    # replica stores the same), and the entry (lsn) that last changed the row (0 when
    # installed from a snapshot). Settled rows are pruned after the request retention;
    # PREPARED rows never are.
    """
    CREATE TABLE trades (
        shard_id TEXT NOT NULL,
        trade_id TEXT NOT NULL,
        state TEXT NOT NULL,
        player_id TEXT NOT NULL,
        leg BLOB,
        reason TEXT NOT NULL,
        prepared_at_ms INTEGER NOT NULL,
        deadline_ms INTEGER NOT NULL,
        settled_at_ms INTEGER NOT NULL,
        cross_shard INTEGER NOT NULL,
        lsn INTEGER NOT NULL,
        PRIMARY KEY (shard_id, trade_id)
    ) WITHOUT ROWID
    """,
    # Only escrows still held: the termination loop's query (a settled row, nearly every
    # row, costs nothing here).
    _PREPARED_INDEX,
    "CREATE INDEX trades_settled ON trades (settled_at_ms) WHERE state != 'PREPARED'",
    # A player's escrows are read on every prepare and inventory read.
    "CREATE INDEX escrows_by_player ON escrows (shard_id, player_id)",
)

_MIGRATE_V1_TO_V2 = _TABLES_V2
"""Version 1 had the ``escrows`` table but never wrote it (no trades yet): version 2 adds
the trade records and the indexes, and keeps every row."""

SHARD_TABLES = ("players", "items", "player_data", "log", "requests", "escrows", "trades")
"""Tables holding a shard's data (everything but its fence in ``shards``)."""
SHARD_TABLE_KEYS = {
    "players": ("shard_id", "player_id"),
    "items": ("item_id", "shard_id"),
    "player_data": ("shard_id", "player_id", "system", "key"),
    "log": ("shard_id", "lsn"),
    "requests": ("shard_id", "request_id"),
    "escrows": ("shard_id", "trade_id", "player_id"),
    "trades": ("shard_id", "trade_id"),
}
"""The primary key of each of :data:`SHARD_TABLES` (a delete of some of a shard's rows
names them by it: the tables have no rowid)."""


WAL_AUTOCHECKPOINT_PAGES = 1000


def configure(conn: sqlite3.Connection, synchronous: Synchronous) -> None:
    """Sets the connection's pragmas. WAL: a commit is one append to the WAL file, and
    readers never block the writer. ``synchronous=NORMAL`` does not fsync on commit: a
    committed transaction survives the death of the process (the WAL is in the OS's page
    cache), not a power loss; ``FULL`` fsyncs the WAL on every commit and survives both.
    """
    # Exclusive locking, set before the first WAL access: the WAL index then lives in the
    # process's memory, not in a shared ``-shm`` file mapped into it, and no transaction
    # takes or releases file locks. With shared locking, commits stalled 67-114 ms a few
    # times a minute on this kind of disk (docs/decisions.md, "node.db is held
    # exclusively"). Only this connection ever opens node.db (the data dir lock).
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise FailedPrecondition(f"node.db cannot use WAL journaling (got {mode!r}); put --data-dir on a local disk")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    # Bounded memory and files: a 32 MiB page cache, and a WAL truncated back to 64 MiB
    # after checkpoints (it may grow past that between them under a burst).
    conn.execute("PRAGMA cache_size=-32768")
    # The commit that crosses WAL_AUTOCHECKPOINT_PAGES copies the WAL into the database
    # file (two fsyncs even under NORMAL): at 1000 pages (4 MiB, SQLite's default) that
    # holds the writer 5-20 ms a few times a second under load, never longer; larger
    # thresholds make rarer, longer pauses. Recovery replays at most ~4 MiB of WAL.
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    conn.execute("PRAGMA journal_size_limit=67108864")
    conn.execute("PRAGMA temp_store=MEMORY")
    # One connection per process writes; the wait only covers a stale connection of the
    # same process (a crash simulated in tests) finishing what it was doing.
    conn.execute("PRAGMA busy_timeout=5000")


def ensure_schema(conn: sqlite3.Connection, path: str) -> None:
    """Creates the schema in an empty database, or checks an existing one's version.

    Raises FailedPrecondition for a database written by a newer build (its layout may
    mean something this build would misread or destroy).
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise FailedPrecondition(
            f"{path} has schema version {version}, newer than this build's {SCHEMA_VERSION}; "
            "run a newer bluemarble-node, or start this one with an empty --data-dir"
        )
    if version == SCHEMA_VERSION:
        _narrow_prepared_index(conn)
        return
    if version == 1:
        _migrate_v1(conn)
        return
    # version 0: a new file.
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("SELECT count(*) FROM sqlite_schema WHERE type = 'table'").fetchone()[0]:
            raise FailedPrecondition(
                f"{path} holds tables but no BlueMarble schema version; it is not a shard node's database"
            )
        for statement in (*_TABLES_V1, *_TABLES_V2):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_version (version, note) VALUES (?, ?)",
            (SCHEMA_VERSION, "shards, players, items, player_data, log, requests, escrows, trades"),
        )
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


_NODE_META = (
    "CREATE TABLE IF NOT EXISTS node_meta (key TEXT NOT NULL PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID"
)
NODE_ID_KEY = "node_id"


def claim_node_id(conn: sqlite3.Connection, data_dir: str, node_id: str) -> None:
    """Records ``node_id`` as the owner of the database, or checks it against the one
    recorded: a file holds one node's data, fences and request records, and another node
    id serving them would register as a new node holding that node's state (and both could
    then serve it). A database without a record (new, or written before records existed)
    adopts ``node_id``. Raises FailedPrecondition naming both ids when they differ."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_NODE_META)
        found = read_meta(conn, NODE_ID_KEY)
        if not found:
            conn.execute("INSERT INTO node_meta (key, value) VALUES (?, ?)", (NODE_ID_KEY, node_id))
        elif found != node_id:
            raise FailedPrecondition(
                f"data dir {data_dir} belongs to node {echo(found)}, not {echo(node_id)}: start it with "
                f"--node-id {echo(found)}, or give node {echo(node_id)} its own data dir (an empty one to "
                "start afresh)"
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


CLUSTER_UID_KEY = "cluster_uid"


def _has_node_meta(conn: sqlite3.Connection) -> bool:
    found = conn.execute("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'node_meta'").fetchone()
    return found is not None


def read_meta(conn: sqlite3.Connection, key: str) -> str:
    """A value of ``node_meta`` ("" when absent, or when the table is not there yet)."""
    if not _has_node_meta(conn):
        return ""
    found = conn.execute("SELECT value FROM node_meta WHERE key = ?", (key,)).fetchone()
    return "" if found is None else str(found[0])


def put_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    """Sets a value of ``node_meta`` inside the caller's transaction."""
    conn.execute(_NODE_META)
    conn.execute(
        "INSERT INTO node_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def delete_meta(conn: sqlite3.Connection, key: str) -> None:
    """Removes a value of ``node_meta`` inside the caller's transaction (none: no-op)."""
    if _has_node_meta(conn):
        conn.execute("DELETE FROM node_meta WHERE key = ?", (key,))


def meta_keys(conn: sqlite3.Connection, prefix: str) -> list[str]:
    """The keys of ``node_meta`` that begin with ``prefix``, sorted."""
    if not _has_node_meta(conn):
        return []
    return [str(k) for (k,) in conn.execute("SELECT key FROM node_meta ORDER BY key") if str(k).startswith(prefix)]


def write_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    """Sets a value of ``node_meta``, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        put_meta(conn, key, value)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _narrow_prepared_index(conn: sqlite3.Connection) -> None:
    """Rebuilds an index ``trades_prepared`` over every trade row as the partial
    :data:`_PREPARED_INDEX`, in one transaction (a crash leaves the old one). Reads the
    table once: 0.54 s for 600,000 rows on a 2-core machine, about 1 s a million."""
    found = conn.execute("SELECT sql FROM sqlite_schema WHERE type = 'index' AND name = 'trades_prepared'").fetchone()
    if found is None or " WHERE " in str(found[0]).upper():
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DROP INDEX trades_prepared")
        conn.execute(_PREPARED_INDEX)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _migrate_v1(conn: sqlite3.Connection) -> None:
    """Version 1 -> 2 in one transaction: adds the trade records (see
    :data:`_MIGRATE_V1_TO_V2`). An older build refuses the migrated file (its version is
    newer), so a rollback of the binary needs the old data dir from a backup."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _MIGRATE_V1_TO_V2:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_version (version, note) VALUES (?, ?)", (2, "trades (participant records), indexes")
        )
        conn.execute("PRAGMA user_version=2")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
