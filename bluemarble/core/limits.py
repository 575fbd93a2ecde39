"""Limits on every input, derived from the real constraints they protect (pure).

Each limit says what it protects. Servers size their gRPC receive limits from these,
the cluster config is validated against them, and the ring's size is bounded by what one
etcd request can carry.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest message any BlueMarble channel sends or receives (ring snapshots, snapshots of
shard data). Servers whose API needs less cap their receive size lower (below)."""

CONTROL_PLANE_MAX_REQUEST_BYTES = 1024 * 1024
"""Largest request the control plane accepts. Its biggest request is a heartbeat with
:data:`MAX_SHARD_STATUSES` statuses (about 100 bytes each: ~400 KiB); anything larger is
refused by gRPC before it is parsed, so a 13 MB request costs no server time."""

SHARD_NODE_MAX_REQUEST_BYTES = 8 * 1024 * 1024
"""Largest request a shard node accepts: twice its largest (a replication batch or a
Calls message, 4 MiB of entries or calls plus the one that crosses the line). Every
request in flight is held in memory whole, so this bounds what each costs the node."""

MAX_CONCURRENT_RPCS = 16384
"""Calls and streams one server process (a control-plane replica, a shard node) runs at
once, of every method but health and reflection: past it a new one is refused
RESOURCE_EXHAUSTED at once, before any of its work, and clients retry with backoff (or on
another replica). A node holds a few streams per peer and per game-server process, so
this is far above a healthy cluster's need; it bounds what a flood of calls or of open
streams costs the process (each holds its task and buffers), with every stream's own
bounds (:data:`MAX_NODE_CALLS_IN_FLIGHT`) on top."""

MAX_WATCH_STREAMS = 4096
"""WatchAssignments and WatchRing streams one control-plane replica serves at once (a
node holds two, a game server's routing client two): past it a new one is refused
RESOURCE_EXHAUSTED, and clients move to another replica."""

MAX_SHARD_STATUSES = 4096
"""Shard statuses per heartbeat: a node holds at most one role per shard."""

ETCD_MAX_REQUEST_BYTES = 1536 * 1024
"""etcd's default ``--max-request-bytes`` (1.5 MiB): no single value or transaction may be
larger, whatever the control plane's own limits say."""

RING_BYTES_PER_TOKEN = 24
"""Upper bound of one stored token in the ring's JSON record: a uint64 as a quoted decimal
string (at most 20 digits, 2 quotes) plus a comma and a space."""

RING_OVERHEAD_BYTES = 64 * 1024
"""Room in the ring's etcd request for everything but the tokens (shard ids, field
names, the transaction around it)."""

MAX_RING_TOKENS = (ETCD_MAX_REQUEST_BYTES - RING_OVERHEAD_BYTES) // RING_BYTES_PER_TOKEN
"""Tokens the ring may hold in all (``shard_count * vnodes_per_shard``): the ring is one
etcd value, so it must fit one etcd request. 62,805 tokens: e.g. 418 shards at 150
virtual nodes, or 4,187 shards at 15."""

CONFIG_RANGES: dict[str, tuple[int, int]] = {
    "replication_factor": (1, 7),
    "lease_ttl_s": (2, 300),
    "vnodes_per_shard": (1, 4096),
    "shard_count": (1, 4096),
    "max_moves_per_round": (1, 10_000),
}
"""Inclusive range of each integer setting of the cluster config."""

MAX_SYSTEMS = 64
"""Game systems the consistency table may list."""

MAX_SYSTEM_NAME_BYTES = 64
"""Length of a game system's name (it is a map key in the config record)."""

MAX_ECHO_CHARS = 80
"""Longest piece of a caller's input quoted back in an error message or a log line."""


def echo(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)``, shortened to about ``limit`` characters with its full size noted:
    what error messages and logs may quote of untrusted input."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[:limit]}... ({size} chars)"

def first_few(names: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` of ``names`` (ids, or any labels), and how many more: what a
    message lists of a long list."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


MAX_LOG_COUNTER = 2**63 - 1
"""Largest epoch, lsn or revision a request may carry. The wire types are uint64, but a
node stores them as SQLite INTEGERs and etcd as int64, which hold no more."""

MAX_IN_DOUBT_TRADES = 1000
"""Most escrows one ListInDoubtTrades answer lists (a request for more gets this many)."""

MAX_ITEMS_PER_REQUEST = 256
"""Item ids one grant may carry (a grant is one log entry, replicated in one message)."""

MAX_ITEMS_PER_PLAYER = 10_000
"""Items one player may hold on its shard, counting what pending trades bring. Every
inventory answer lists them all: 10,000 ids of at most 128 bytes stay under the 4 MiB a
default gRPC client accepts."""

MAX_ITEM_ID_BYTES = 128
"""Length of an item id (a primary key in every node's database)."""

MAX_GOLD = 2**53
"""Largest amount of gold one request may move, and one player may hold: every integer up
to 2^53 is exact in a double, so JSON and JavaScript clients read it unchanged."""

MAX_VALUE_BYTES = 64 * 1024
"""Size of one player-data value (it travels in one log entry)."""

MAX_DATA_KEY_BYTES = 128
"""Length of a player-data key."""

MAX_DATA_KEYS_PER_PLAYER = 1024
"""Player-data keys one player holds, over every game system."""

MAX_DATA_BYTES_PER_PLAYER = 1024 * 1024
"""Player data one player holds, over every game system (systems, keys and values)."""

MAX_SHARD_DATA_BYTES = 192 * 1024 * 1024
"""Player data one shard holds: a shard must stay small enough for a snapshot (256 MiB,
with its items and request records) to copy it to a new replica. More players' data
means more shards (``--shards`` of a new cluster)."""

MAX_REQUEST_ID_BYTES = 128
"""Length of an idempotency key (request id, trade id)."""

MAX_TRADE_BATCH_ITEMS = 256
"""Prepare/Commit/Abort calls in one ShardNode.TradeBatch (a coordinator sends at most 64)."""

MAX_NODE_CALLS_PER_MESSAGE = 256
"""Calls in one ShardNode.Calls or TradeCoordinator.ExecuteTrades message (our clients
send at most 64)."""

MAX_NODE_CALLS_IN_FLIGHT = 1024
"""Calls one ShardNode.Calls (or ExecuteTrades) stream may have in flight on the server;
past it the server reads no more of the stream until some finish (flow control reaches
the caller)."""

MAX_NODE_CALLS_MESSAGE_BYTES = 4 * 1024 * 1024
"""Bytes of calls (or results) one Calls or ExecuteTrades message carries, beyond its first."""

DEFAULT_NODE_CALL_TIMEOUT_MS = 10_000
"""A Calls or ExecuteTrades call's deadline when it sets none."""

MAX_NODE_CALL_TIMEOUT_MS = 60_000
"""The longest deadline a Calls or ExecuteTrades call may set (a longer one is refused)."""
