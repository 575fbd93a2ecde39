"""The routing client game servers use: call a player's primary directly, from caches.

A game server handles thousands of player requests a second; asking the control plane
where each player lives (``ResolvePlayer``) would put it on every request's path.
:class:`RoutingClient` instead keeps two caches, both followed in the background and
supervised (a broken or silent stream is reopened, on the next control-plane replica
when that one was at fault):

* the ring (:class:`~bluemarble.client.ring_router.RingRouter`, ``WatchRing``):
  player id -> shard;
* every shard's assignment (:class:`AssignmentCache`, ``WatchAssignments`` for all
  nodes): shard -> epoch, primary, replicas, and the nodes' addresses (the stream's
  ``nodes``; ``ListNodes`` fills in an address the stream has not named yet).

A call resolves player -> shard -> primary -> address locally and calls that node over
one cached channel per node address (closed once no assignment names the node).

    from bluemarble.client.routing import RoutingClient

    async with RoutingClient(["127.0.0.1:7000"]) as cluster:
        result = await cluster.grant_items("player-42", ["sword-1", "shield-7"], gold=100)
        print(result.inventory.item_ids, result.inventory.gold, result.replayed)
        inventory = await cluster.get_inventory("player-42")
        await cluster.take_items("player-42", ["shield-7"], gold=30)  # bought at a shop
        await cluster.set_player_data("player-42", "guild", "name", b"Night Owls")
        guild = await cluster.get_player_data("player-42", "guild", "name", allow_stale=True)
        if cluster.same_shard("player-42", "player-7"):
            trade = await cluster.execute_local_trade("trade-9", "player-42", "player-7", a_items=["sword-1"], b_gold=5)

Trades between two players of one shard (:meth:`RoutingClient.execute_local_trade`) go
straight to that shard's primary (``ShardNode.ExecuteLocalTrade``), with the same
redirects and retries as a grant and the trade id as the idempotency key; players on
different shards raise :class:`CrossShardTrade` (the trade needs the coordinator:
:class:`bluemarble.client.trades.TradeClient` does that choice for its callers).

Redirects, failover and retries (all within the call's ``deadline_s``):

* FAILED_PRECONDITION that says the node is not (or no longer) the primary, or its epoch
  is stale (:func:`is_redirect`), UNAVAILABLE, DEADLINE_EXCEEDED and ABORTED are
  retried: the client waits until its assignment cache has moved on from what the
  failed attempt used (a new primary, a new epoch) or a short jittered backoff has
  passed (:mod:`bluemarble.runtime.retry`), resolves again, and retries. An attempt in
  flight to a primary is abandoned as soon as the cache names another primary or epoch
  for its shard. When the deadline passes, the last error is raised.
* INVALID_ARGUMENT, NOT_FOUND and every other status are final: raised at once.
* Writes are idempotent by request id: one id (given, or a fresh uuid4) is used for
  every attempt of one call, so a retried grant is applied once. Writes carry epoch 0
  (the node's current epoch) unless the caller passes an epoch.
* Reads with ``allow_stale`` prefer the primary, and fall back to the shard's replicas
  (in placement order) when the primary fails, does not answer within
  ``stale_primary_timeout_s``, or the shard has no primary; the answer says whether it
  is stale and how far behind its node was.

Bounds: each attempt's timeout is the call's remaining deadline (a primary tried for a
stale read: at most ``stale_primary_timeout_s``); at most ``max_attempts`` attempts per
call that a node answers "not the primary" (the shard keeps moving; other retryable
errors, e.g. a primary whose lease lapsed, are retried until the deadline); backoff
delays ``retry_initial_s`` .. ``retry_max_backoff_s``; one ``ListNodes`` address lookup
in flight, at most one per ``address_lookup_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
import structlog

from bluemarble.api.conversions import cause_from_proto
from bluemarble.api.messages import NODE_CALL_RPCS
from bluemarble.client.control_plane import STREAM_PROGRESS_INTERVAL_MS, ControlPlaneClient, follow_stream
from bluemarble.client.node_calls import CallStream, Unsupported, status_error
from bluemarble.client.ring_router import DEFAULT_STREAM_IDLE_TIMEOUT_S, RingRouter
from bluemarble.core import errors, validation
from bluemarble.core.ids import NodeId, PlayerId, ShardId
from bluemarble.core.limits import echo
from bluemarble.core.trades.model import AbortCause, Offer, Outcome, Trade, validate_trade
from bluemarble.runtime import background, channels, retry, tracing
from bluemarble.runtime.channels import channel as open_channel
from bluemarble.runtime.clock import Clock, SystemClock, run_with_timeout, wait_event
from bluemarble.v1 import common_pb2, controlplane_pb2, shardnode_pb2, shardnode_pb2_grpc

log = structlog.get_logger(__name__)

T = TypeVar("T")

DEFAULT_DEADLINE_S = 5.0
DEFAULT_READY_TIMEOUT_S = 10.0


# ---- values -------------------------------------------------------------------------


@dataclass(frozen=True)
class Inventory:
    """A player's items and gold as one node answered them.

    ``stale`` is True when a replica answered (a read with ``allow_stale``): it may lack
    the newest writes; ``lag_entries`` / ``lag_ms`` say how far behind it knew it was.
    ``served_by`` is the node that answered. ``escrowed_item_ids`` and ``escrowed_gold``
    are what trades not yet settled hold of the player's: neither tradable nor grantable
    away until the trade commits or aborts."""

    player_id: PlayerId
    item_ids: tuple[str, ...]
    gold: int
    shard_id: ShardId
    epoch: int
    stale: bool
    lag_entries: int
    lag_ms: int
    served_by: NodeId
    escrowed_item_ids: tuple[str, ...] = ()
    escrowed_gold: int = 0


@dataclass(frozen=True)
class GrantResult:
    """The answer to a grant (or a take): the inventory after it, its log position, and
    whether this answer is the recorded one of an earlier write with the same request id
    (``replayed``). With a request id of the client's own making it is always False: only
    this call's own attempts used that id. With yours, True says an earlier call with it
    applied the grant, or this call's own first attempt did and a retry (after a connection
    broke under it) got its recorded answer: either way it was applied exactly once. A
    replayed ``inventory`` is the one recorded then, not the current one."""

    inventory: Inventory
    lsn: int
    replayed: bool
    request_id: str


@dataclass(frozen=True)
class PlayerData:
    """A player's value for one game system and key (``value`` None when not set)."""

    player_id: PlayerId
    system: str
    key: str
    value: bytes | None
    shard_id: ShardId
    epoch: int
    lsn: int
    stale: bool
    lag_entries: int
    lag_ms: int
    served_by: NodeId


@dataclass(frozen=True)
class DataWriteResult:
    """The answer to a player-data write. ``consistency`` is the system's model
    (a ``bluemarble.v1.ConsistencyModel`` value): STRONG writes were acknowledged once a
    replica had them, EVENTUAL ones after the primary's local commit. ``replayed`` as in
    :class:`GrantResult`."""

    shard_id: ShardId
    epoch: int
    lsn: int
    replayed: bool
    consistency: int
    request_id: str


@dataclass(frozen=True)
class LocalTradeResult:
    """The answer of a same-shard trade from its shard's primary: ``outcome`` (COMMITTED,
    or ABORTED with its ``reason``: a player gave what they do not hold), whether it is
    the recorded answer of an earlier attempt with the same trade id (``replayed``: nothing
    moved this time), the shard, the ExecuteLocalTrade attempts this call made, and why an
    ABORTED one was (``abort_cause``: REFUSED, or CONTENDED by other trades not settled
    yet; UNKNOWN in a replayed answer)."""

    trade_id: str
    outcome: Outcome
    reason: str
    replayed: bool
    shard_id: ShardId
    attempts: int
    abort_cause: AbortCause = AbortCause.UNKNOWN

    @property
    def committed(self) -> bool:
        return self.outcome is Outcome.COMMITTED

    @property
    def worth_retrying(self) -> bool:
        """ABORTED because of other trades not settled yet (CONTENDED), not because of the
        terms: the same exchange under a *new* trade id may commit, as for
        :attr:`bluemarble.client.trades.TradeResult.worth_retrying`."""
        return self.outcome is Outcome.ABORTED and self.abort_cause in (AbortCause.UNAVAILABLE, AbortCause.CONTENDED)


class CrossShardTrade(errors.FailedPrecondition):
    """The two players of a trade are on different shards (in this client's ring, or in
    the primary's, whose ring is newer): nothing was written; the trade needs the
    coordinator (``TradeCoordinator.ExecuteTrade``). Final for the routing client."""


_OUTCOMES = {
    common_pb2.TRADE_OUTCOME_COMMITTED: Outcome.COMMITTED,
    common_pb2.TRADE_OUTCOME_ABORTED: Outcome.ABORTED,
}
# How a primary says the players of an ExecuteLocalTrade are not both its shard's
# (shardnode.participant.Participant.execute_local_trade).
_DIFFERENT_SHARDS_MARKER = "are on different shards"


MAX_DEADLINE_S = 3600.0

EPOCH_AHEAD_GRACE_S = 1.0
"""A write naming an epoch newer than any this client and the shard's primary know is
refused as final after this long (the assignment of a real new epoch reaches the client
within a moment of the node)."""


CLOSE_CHECK_S = 0.1
"""A call waiting for the client to be ready notices :meth:`RoutingClient.close` this soon."""


class ClientClosed(errors.FailedPrecondition):
    """The client was closed before, or while, the call ran: final. A write in flight may
    or may not have applied; retry it with the same request or trade id on a new client."""


async def _naming_request(request_id: str, write: Awaitable[T]) -> T:
    """``write``'s answer; when its outcome is unknown (a retryable error after the
    deadline, or the client closed under it), the error names ``request_id`` (also as its
    ``request_id``): the one id a retry may use, since a fresh one would apply it twice."""
    try:
        return await write
    except errors.BlueMarbleError as e:
        if not (e.retryable or isinstance(e, ClientClosed)):
            raise
        error = type(e)(f"{e} (outcome unknown: retry with request_id {echo(request_id)}, never a new one)")
        error.request_id = request_id
        raise error from e


def check_deadline(deadline_s: float) -> float:
    """``deadline_s`` if it is a number of seconds above 0 and at most an hour; else
    InvalidArgument (NaN and infinity too: they would break the event loop's timers)."""
    if isinstance(deadline_s, bool) or not isinstance(deadline_s, int | float) or not 0 < deadline_s <= MAX_DEADLINE_S:
        raise errors.InvalidArgument(f"deadline_s is {deadline_s!r}; give seconds above 0, at most {MAX_DEADLINE_S:g}")
    return float(deadline_s)


@dataclass(frozen=True)
class Route:
    """Where a player's requests go, as the caches said at one moment.

    ``primary`` is None while the shard has no primary (failover in progress);
    ``addresses`` holds the known addresses of the shard's members."""

    player_id: PlayerId
    shard_id: ShardId
    epoch: int
    primary: NodeId | None
    replicas: tuple[NodeId, ...]
    addresses: Mapping[NodeId, str]
    revision: int


@dataclass(frozen=True)
class Target:
    """One node an attempt may call: its id, its address (None while unknown), and
    whether it is the shard's primary."""

    node_id: NodeId
    address: str | None
    primary: bool


# ---- decisions (purely computational) ---------------------------------------------

# FAILED_PRECONDITION answers that are about the caller's data, not about routing: the
# same request sent to the right primary gets the same answer, so retrying is pointless.
_FINAL_PRECONDITION_MARKERS = (
    "owned by", "already owned", "not own item", "escrow", "not enough", "insufficient", "gold to spend",
    "already used for a different",
)
# FAILED_PRECONDITION answers that mean "not here, or not now": a node that does not
# lead the shard (at this epoch), a replica asked for a strong read, a node that fenced
# itself because its lease may have expired. Another primary, or the same one a moment
# later, can serve the request.
_REDIRECT_MARKERS = (
    "primary", "epoch", "replica", "lease", "fenc", "no copy of", "not held", "not hold",
    "not assigned", "not serving", "no longer", "not lead", "re-resolve",
)


def is_redirect(error: errors.BlueMarbleError, echoed: Iterable[str] = ()) -> bool:
    """Whether a FAILED_PRECONDITION from a node means "ask the current primary" (purely
    computational): its message names the primary, an epoch, a replica role, a lease, a
    fence or a node holding no copy of the shard, and nothing about the caller's items or
    gold (an item already owned, a request id reused for another request, too much gold
    are final). ``echoed``: the caller's own inputs (ids), which the message may quote
    and which are left out of the reading: a request id such as "release-1" must not
    make a final refusal read as a lease's."""
    if not isinstance(error, errors.FailedPrecondition):
        return False
    text = str(error)
    for value in sorted({v for v in echoed if v}, key=len, reverse=True):
        for quoted in (echo(value), echo(value, 40)):  # as messages quote untrusted input, long ones shortened
            text = text.replace(quoted, " ")
        # Unquoted, only as a whole token: a player "a" or "mary" leaves "primary" alone.
        text = re.sub(rf"(?<![\w./-]){re.escape(value)}(?![\w./-])", " ", text)
    text = text.lower()
    if any(marker in text for marker in _FINAL_PRECONDITION_MARKERS):
        return False
    return any(marker in text for marker in _REDIRECT_MARKERS)


def should_retry(error: BaseException, echoed: Iterable[str] = ()) -> bool:
    """Whether a failed attempt is worth another one after re-resolving (purely
    computational): redirects (:func:`is_redirect`; ``echoed`` as there), UNAVAILABLE,
    DEADLINE_EXCEEDED, ABORTED and a busy server (:func:`~bluemarble.core.errors.is_overload`)
    are; INVALID_ARGUMENT, NOT_FOUND and everything else are final."""
    if isinstance(error, CrossShardTrade | ClientClosed):
        return False
    if isinstance(error, errors.FailedPrecondition):
        return is_redirect(error, echoed)
    return isinstance(error, errors.Unavailable | errors.DeadlineExceeded | errors.Aborted) or errors.is_overload(error)


def targets_for(route: Route, *, allow_stale: bool) -> list[Target]:
    """The nodes to try for one attempt, in order (purely computational): the primary;
    with ``allow_stale`` then each replica in placement order. Empty when there is
    nobody to ask (no primary, and stale answers not allowed)."""
    found: list[Target] = []
    if route.primary is not None:
        found.append(Target(route.primary, route.addresses.get(route.primary), primary=True))
    if allow_stale:
        found += [Target(r, route.addresses.get(r), primary=False) for r in route.replicas if r != route.primary]
    return found


# ---- the assignment cache -----------------------------------------------------------


@dataclass(frozen=True)
class CachedAssignment:
    shard_id: ShardId
    epoch: int
    primary: NodeId | None
    replicas: tuple[NodeId, ...]


@dataclass(frozen=True)
class AssignmentView:
    """An immutable view of every shard's assignment and the addresses of the nodes
    they name, as of ``revision`` (etcd revision of the last change applied)."""

    revision: int = 0
    assignments: Mapping[ShardId, CachedAssignment] = field(default_factory=lambda: MappingProxyType({}))
    addresses: Mapping[NodeId, str] = field(default_factory=lambda: MappingProxyType({}))

    def named_nodes(self) -> set[NodeId]:
        named: set[NodeId] = set()
        for a in self.assignments.values():
            if a.primary is not None:
                named.add(a.primary)
            named.update(a.replicas)
        return named


class AssignmentCache:
    """Every shard's assignment, as WatchAssignments (node_id "") tells it.

    :meth:`apply` takes one stream message: a snapshot replaces the view, a change
    updates it, a progress message (empty, not a snapshot) changes nothing. ``view`` is
    swapped atomically; :attr:`changed` is an event set (and replaced by a fresh one) on
    every change of an assignment or an address, so a caller that captured it before an
    attempt learns whether the cache moved on since. ``on_addresses`` is told the addresses
    still named after every change (the client closes the channels of the others).
    """

    def __init__(self, on_addresses: Callable[[Collection[str]], None] | None = None):
        self.view = AssignmentView()
        self.synced = asyncio.Event()  # set once the first snapshot is applied
        self.changed = asyncio.Event()
        self.on_addresses = on_addresses
        # Per shard, the future that calls in flight to its primary wait on (see moved()).
        self._moved: dict[ShardId, tuple[int, NodeId | None, asyncio.Future[None]]] = {}

    def apply(self, message: controlplane_pb2.WatchAssignmentsResponse) -> None:
        if not message.snapshot and not message.assignments and not message.removed_shard_ids and not message.nodes:
            return  # progress: the stream is alive, nothing changed
        current = self.view
        if message.snapshot:
            assignments: dict[ShardId, CachedAssignment] = {}
        else:
            assignments = dict(current.assignments)
            if message.revision < current.revision:
                return  # older than what we have (another replica lagging): keep ours
        for shard in message.removed_shard_ids:
            assignments.pop(ShardId(shard), None)
        for a in message.assignments:
            shard = ShardId(a.shard_id)
            assignments[shard] = CachedAssignment(
                shard_id=shard,
                epoch=a.epoch,
                primary=NodeId(a.primary) if a.primary else None,
                replicas=tuple(NodeId(r) for r in a.replicas),
            )
        addresses = dict(current.addresses)
        for ref in message.nodes:
            if ref.address:
                addresses[NodeId(ref.node_id)] = ref.address
        self._install(AssignmentView(message.revision, MappingProxyType(assignments), MappingProxyType(addresses)))
        if message.snapshot and not self.synced.is_set():
            self.synced.set()

    def add_addresses(self, nodes: Iterable[common_pb2.NodeRef | common_pb2.Node]) -> None:
        """Fills in addresses of named nodes the stream has not told (a ListNodes answer);
        never overrides an address the stream gave."""
        current = self.view
        named = current.named_nodes()
        new = {
            NodeId(n.node_id): n.address
            for n in nodes
            if n.address and NodeId(n.node_id) in named and NodeId(n.node_id) not in current.addresses
        }
        if new:
            self._install(
                AssignmentView(current.revision, current.assignments, MappingProxyType({**current.addresses, **new}))
            )

    def _install(self, view: AssignmentView) -> None:
        named = view.named_nodes()
        addresses = {n: a for n, a in view.addresses.items() if n in named}  # forget nodes nobody names
        view = AssignmentView(view.revision, view.assignments, MappingProxyType(addresses))
        moved = view.assignments != self.view.assignments or view.addresses != self.view.addresses
        self.view = view
        if moved:
            self._resolve_moved()
            if self.on_addresses is not None:
                self.on_addresses(set(addresses.values()))
            event, self.changed = self.changed, asyncio.Event()
            event.set()

    def route(self, player_id: PlayerId, shard: ShardId) -> Route:
        """The route of ``player_id`` on ``shard``; Unavailable when the cache holds no
        assignment for the shard (not synced yet, or the shard is being created)."""
        view = self.view
        a = view.assignments.get(shard)
        if a is None:
            if not self.synced.is_set():
                raise errors.Unavailable("the routing client has no assignments yet; retry shortly")
            raise errors.Unavailable(f"{shard} has no assignment yet; retry shortly")
        members = ([a.primary] if a.primary else []) + list(a.replicas)
        return Route(
            player_id=player_id,
            shard_id=shard,
            epoch=a.epoch,
            primary=a.primary,
            replicas=a.replicas,
            addresses=MappingProxyType({m: view.addresses[m] for m in members if m in view.addresses}),
            revision=view.revision,
        )

    def moved(self, shard: ShardId, epoch: int, primary: NodeId | None) -> asyncio.Future[None]:
        """A future done once the shard's assignment names another epoch or primary (or
        none): done already if it does now. One future is shared by every caller that
        waits on the same (shard, epoch, primary); never cancel it."""
        entry = self._moved.get(shard)
        if entry is not None and entry[:2] == (epoch, primary) and not entry[2].done():
            return entry[2]
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        a = self.view.assignments.get(shard)
        if a is None or (a.epoch, a.primary) != (epoch, primary):
            future.set_result(None)
        else:
            self._moved[shard] = (epoch, primary, future)
        return future

    def _resolve_moved(self) -> None:
        for shard, (epoch, primary, future) in list(self._moved.items()):
            a = self.view.assignments.get(shard)
            if a is None or (a.epoch, a.primary) != (epoch, primary):
                del self._moved[shard]
                if not future.done():
                    future.set_result(None)


# ---- the adapter to shard nodes -----------------------------------------------------


class NodeTransport(Protocol):
    """The client's boundary to shard nodes: one call on one node address. Raises the
    mapped :class:`~bluemarble.core.errors.BlueMarbleError` (UNAVAILABLE and
    DEADLINE_EXCEEDED name the address). Tests replace it with a fake."""

    async def get_inventory(
        self, address: str, request: shardnode_pb2.GetInventoryRequest, timeout_s: float
    ) -> shardnode_pb2.GetInventoryResponse: ...

    async def grant_items(
        self, address: str, request: shardnode_pb2.GrantItemsRequest, timeout_s: float
    ) -> shardnode_pb2.GrantItemsResponse: ...

    async def take_items(
        self, address: str, request: shardnode_pb2.TakeItemsRequest, timeout_s: float
    ) -> shardnode_pb2.TakeItemsResponse: ...

    async def get_player_data(
        self, address: str, request: shardnode_pb2.GetPlayerDataRequest, timeout_s: float
    ) -> shardnode_pb2.GetPlayerDataResponse: ...

    async def set_player_data(
        self, address: str, request: shardnode_pb2.SetPlayerDataRequest, timeout_s: float
    ) -> shardnode_pb2.SetPlayerDataResponse: ...

    async def execute_local_trade(
        self, address: str, request: shardnode_pb2.ExecuteLocalTradeRequest, timeout_s: float
    ) -> shardnode_pb2.ExecuteLocalTradeResponse: ...

    def retain(self, addresses: Collection[str]) -> None:
        """Closes the channels of every address not in ``addresses``."""

    async def close(self) -> None: ...


def node_error(e: grpc.aio.AioRpcError, address: str) -> errors.BlueMarbleError:
    """The BlueMarble error for a failed call to the node at ``address``."""
    return status_error(e.code().name, e.details() or e.code().name, address)


class GrpcNodeTransport:
    """:class:`NodeTransport` over grpc.aio: one channel per node address, built by
    :mod:`bluemarble.runtime.channels`, closed by :meth:`retain` once unused.

    With ``streams`` (the default unless tracing is on), calls to a node travel on one
    ``ShardNode.Calls`` stream (:mod:`bluemarble.client.node_calls`): the same answers and
    statuses as the unary RPCs, at a fraction of their CPU on both sides. A node that does
    not serve Calls gets the unary RPCs, and so does every node while tracing is on: a
    span per call, on both sides, needs a call per call."""

    def __init__(self, *, streams: bool | None = None) -> None:
        if streams is None:
            streams = not tracing.enabled()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, shardnode_pb2_grpc.ShardNodeStub] = {}
        self._streams: dict[str, CallStream] = {}
        self._use_streams = streams
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def addresses(self) -> set[str]:
        """Addresses with an open channel."""
        return set(self._channels)

    def _stub(self, address: str) -> shardnode_pb2_grpc.ShardNodeStub:
        if self._closed:
            raise ClientClosed(
                "the routing client was closed; the call did not complete (a write may have applied: "
                "retry it with the same request id on a new client)"
            )
        stub = self._stubs.get(address)
        if stub is not None and channels.outdated(self._channels[address]):
            # Built before the TLS files rotated: it would present the old certificate
            # when it reconnects. New calls get a new channel and Calls stream; the old
            # ones are dropped, and end with the calls on them (see channels.outdated).
            del self._channels[address], self._stubs[address]
            self._streams.pop(address, None)
            stub = None
        if stub is None:
            self._channels[address] = open_channel(address)
            stub = self._stubs[address] = shardnode_pb2_grpc.ShardNodeStub(self._channels[address])  # type: ignore[no-untyped-call]
        return stub

    async def _call(self, address: str, kind: str, request: Any, timeout_s: float) -> Any:
        """``request`` to the node at ``address``: as the NodeCall ``kind`` on the node's
        Calls stream, or as the unary RPC it stands for."""
        stub = self._stub(address)
        if self._use_streams:
            stream = self._streams.get(address)
            if stream is None:
                stream = self._streams[address] = CallStream(stub, address)
            if stream.supported:
                try:
                    return await stream.call(kind, request, timeout_s)
                except Unsupported:
                    pass  # a node of an older release: the unary RPC below
        try:
            return await getattr(stub, NODE_CALL_RPCS[kind])(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise node_error(e, address) from e
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller cancelled us
            if self._closed:
                raise ClientClosed(
                    f"the routing client was closed during a call to node {address}; the call's outcome is "
                    "unknown (a write: retry it with the same request id on a new client)"
                ) from None
            # grpc.aio raises CancelledError in a call whose channel was closed under it
            # (retain() dropped the node): an operating condition, not a cancellation.
            raise errors.Unavailable(
                f"call to node {address} cancelled (the node left the assignments)"
            ) from None

    async def get_inventory(
        self, address: str, request: shardnode_pb2.GetInventoryRequest, timeout_s: float
    ) -> shardnode_pb2.GetInventoryResponse:
        response: shardnode_pb2.GetInventoryResponse = await self._call(address, "get_inventory", request, timeout_s)
        return response

    async def grant_items(
        self, address: str, request: shardnode_pb2.GrantItemsRequest, timeout_s: float
    ) -> shardnode_pb2.GrantItemsResponse:
        response: shardnode_pb2.GrantItemsResponse = await self._call(address, "grant_items", request, timeout_s)
        return response

    async def take_items(
        self, address: str, request: shardnode_pb2.TakeItemsRequest, timeout_s: float
    ) -> shardnode_pb2.TakeItemsResponse:
        response: shardnode_pb2.TakeItemsResponse = await self._call(address, "take_items", request, timeout_s)
        return response

    async def get_player_data(
        self, address: str, request: shardnode_pb2.GetPlayerDataRequest, timeout_s: float
    ) -> shardnode_pb2.GetPlayerDataResponse:
        response: shardnode_pb2.GetPlayerDataResponse = await self._call(address, "get_player_data", request, timeout_s)
        return response

    async def set_player_data(
        self, address: str, request: shardnode_pb2.SetPlayerDataRequest, timeout_s: float
    ) -> shardnode_pb2.SetPlayerDataResponse:
        response: shardnode_pb2.SetPlayerDataResponse = await self._call(address, "set_player_data", request, timeout_s)
        return response

    async def execute_local_trade(
        self, address: str, request: shardnode_pb2.ExecuteLocalTradeRequest, timeout_s: float
    ) -> shardnode_pb2.ExecuteLocalTradeResponse:
        response: shardnode_pb2.ExecuteLocalTradeResponse = await self._call(
            address, "execute_local_trade", request, timeout_s
        )
        return response

    def retain(self, addresses: Collection[str]) -> None:
        for address in [a for a in self._channels if a not in addresses]:
            channel = self._channels.pop(address)
            self._stubs.pop(address, None)
            stream = self._streams.pop(address, None)
            task = asyncio.ensure_future(_close_channel(channel, stream))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            log.debug("closed the channel of a node no assignment names", address=address)

    async def close(self) -> None:
        """Closes every channel; calls in flight and later fail with :class:`ClientClosed`."""
        self._closed = True
        self.retain(())
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _close_channel(channel: grpc.aio.Channel, stream: CallStream | None) -> None:
    if stream is not None:
        await stream.close()
    await channel.close(None)


# ---- the client ---------------------------------------------------------------------


class RoutingClient:
    """Calls shard nodes for players, routing from cached ring and assignments.

    ``control_plane``: a :class:`ControlPlaneClient` (not closed by :meth:`close`) or the
    control-plane addresses, as a list or one comma-separated string (the client builds
    its own and closes it). With None, give
    ``router`` and ``assignments`` already filled (tests, offline tools).

    Use as ``async with RoutingClient(...) as c`` (starts, waits until ready for
    ``ready_timeout_s``, and closes), or await :meth:`start`, :meth:`wait_ready` and
    :meth:`close` yourself. Calls made before the client is ready wait for it within
    their own deadline.
    """

    def __init__(
        self,
        control_plane: ControlPlaneClient | Sequence[str] | None,
        *,
        router: RingRouter | None = None,
        assignments: AssignmentCache | None = None,
        transport: NodeTransport | None = None,
        clock: Clock | None = None,
        max_attempts: int = 64,
        retry_initial_s: float = 0.05,
        retry_max_backoff_s: float = 0.5,
        stale_primary_timeout_s: float = 1.0,
        stream_idle_timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S,
        address_lookup_interval_s: float = 1.0,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    ):
        self._owns_control_plane = control_plane is not None and not isinstance(control_plane, ControlPlaneClient)
        if control_plane is None or isinstance(control_plane, ControlPlaneClient):
            self._control_plane = control_plane
        else:
            self._control_plane = ControlPlaneClient(control_plane, clock=clock)  # splits and checks them
        if self._control_plane is None and (router is None or assignments is None):
            raise ValueError("without a control plane, give a router and an assignment cache")
        self._clock: Clock = clock or (
            self._control_plane.clock if self._control_plane is not None else SystemClock()
        )
        self._transport: NodeTransport = transport or GrpcNodeTransport()
        self.router = router or RingRouter(
            self._control_plane, clock=self._clock, stream_idle_timeout_s=stream_idle_timeout_s
        )
        self.assignments = assignments or AssignmentCache()
        self.assignments.on_addresses = self._transport.retain
        self._max_attempts = max_attempts
        self._policy = retry.RetryPolicy(initial_s=retry_initial_s, max_backoff_s=retry_max_backoff_s, deadline_s=None)
        self._stale_primary_timeout_s = stale_primary_timeout_s
        self._stream_idle_timeout_s = stream_idle_timeout_s
        self._address_lookup_interval_s = address_lookup_interval_s
        self._ready_timeout_s = ready_timeout_s
        self._start_revision = 0
        self._last_lookup_s = -float("inf")
        self._lookup: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ring_ready = asyncio.Event()
        self._ring_error: errors.BlueMarbleError | None = None
        self._started = self._control_plane is None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        if self._control_plane is None:
            self._ring_ready.set()

    # ---- lifecycle ----

    async def start(self) -> None:
        """Starts following the ring and the assignments in the background (returns at
        once; see :meth:`wait_ready`). Idempotent."""
        self._check_open()
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        forever = retry.RetryPolicy(initial_s=0.1, max_backoff_s=2.0, deadline_s=None)
        self._tasks = [
            background.start(
                retry.supervise(
                    self._start_ring, name="routing-ring", policy=forever, clock=self._clock, stop=self._ring_ready
                ),
                "routing-ring",
            ),
            background.start(
                retry.supervise(
                    self._follow_assignments, name="routing-assignments", policy=forever, clock=self._clock
                ),
                "routing-assignments",
            ),
        ]

    @property
    def ready(self) -> bool:
        """True once the client has a ring and a snapshot of the assignments."""
        return self._ring_ready.is_set() and self.assignments.synced.is_set()

    async def wait_ready(self, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Waits until the client has a ring and the assignments; Unavailable after
        ``timeout_s`` (the control plane cannot be reached); FailedPrecondition when the
        client was never started."""
        if not self._started:
            raise errors.FailedPrecondition("the routing client is not started; await client.start() first")
        deadline = self._clock.monotonic_s() + timeout_s
        for event, what in ((self._ring_ready, "the ring"), (self.assignments.synced, "the assignments")):
            while not event.is_set():
                if self._closed:
                    raise ClientClosed("the routing client was closed while it waited for the control plane")
                left_s = deadline - self._clock.monotonic_s()
                if left_s <= 0:
                    cause = "" if self._ring_error is None else f" (last error: {echo(str(self._ring_error), 200)})"
                    raise errors.Unavailable(
                        f"the routing client did not get {what} within {timeout_s:.3g} s; "
                        f"is the control plane reachable?{cause}"
                    )
                await wait_event(self._clock, event, min(left_s, CLOSE_CHECK_S))  # slices: close() ends the wait

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the routing client is closed; make a new one")

    def _check_usable(self) -> None:
        """FailedPrecondition after :meth:`close`, or from another event loop than the one
        the client started on (its streams and channels belong to that loop)."""
        self._check_open()
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            raise errors.FailedPrecondition(
                "the routing client belongs to the event loop it was started on; make one per event loop"
            )

    async def close(self) -> None:
        """Stops following, closes every node channel (and the control-plane client when
        this client built it). Calls made after it raise FailedPrecondition. Idempotent."""
        self._closed = True
        for task in self._tasks:
            await background.stop(task)
        self._tasks = []
        await background.stop(self._lookup)
        await self.router.stop()
        await self._transport.close()
        if self._owns_control_plane and self._control_plane is not None:
            await self._control_plane.close()

    async def __aenter__(self) -> RoutingClient:
        await self.start()
        try:
            await self.wait_ready(self._ready_timeout_s)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _start_ring(self) -> None:
        try:
            await self.router.start()  # fetches the ring, then follows WatchRing itself
        except errors.BlueMarbleError as e:
            self._ring_error = e  # what wait_ready reports if the ring never comes
            raise
        self._ring_ready.set()

    async def _follow_assignments(self) -> None:
        """One WatchAssignments stream (all nodes) into the cache, until it breaks."""
        assert self._control_plane is not None
        request = controlplane_pb2.WatchAssignmentsRequest(
            node_id="", start_revision=self._start_revision, progress_interval_ms=STREAM_PROGRESS_INTERVAL_MS
        )

        def on_message(message: controlplane_pb2.WatchAssignmentsResponse) -> None:
            self.assignments.apply(message)
            self._start_revision = max(self._start_revision, message.revision)

        try:
            await follow_stream(
                self._control_plane,
                lambda stub: stub.WatchAssignments(request),
                controlplane_pb2.WatchAssignmentsResponse,
                on_message,
                clock=self._clock,
                idle_timeout_s=self._stream_idle_timeout_s,
                what="assignment",
            )
        except errors.OutOfRange:
            # The cluster has not reached the revision we saw (e.g. etcd was restored
            # from a backup): take whatever state it has rather than none.
            log.warning("assignment revision ahead of the cluster; re-listing from scratch",
                        start_revision=self._start_revision)
            self._start_revision = 0
            raise

    # ---- resolving ----

    def resolve(self, player_id: str) -> Route:
        """The route of ``player_id`` from the caches: InvalidArgument for a bad player
        id, Unavailable while the caches cannot say (not ready, shard not assigned),
        FailedPrecondition after :meth:`close` (the caches no longer follow the cluster) or
        before :meth:`start`."""
        self._check_open()
        player = validation.player_id(player_id)
        try:
            shard = self.router.shard_for(player)
        except errors.FailedPrecondition as e:
            raise self._no_ring() from e
        return self.assignments.route(player, shard)

    def _no_ring(self) -> errors.BlueMarbleError:
        """Why there is no ring to route by: never started (final), or not yet received."""
        if not self._started:
            return errors.FailedPrecondition(
                "the routing client is not started; await client.start() first (or use it with async with)")
        return errors.Unavailable("the routing client has no ring yet; retry shortly")

    def same_shard(self, player_a: str, player_b: str) -> bool:
        """Whether the two players are on one shard in this client's ring (purely from the
        cache). InvalidArgument for a bad player id, Unavailable before the ring is known,
        FailedPrecondition after :meth:`close`."""
        self._check_open()
        a, b = validation.player_id(player_a), validation.player_id(player_b)
        try:
            return self.router.shard_for(a) == self.router.shard_for(b)
        except errors.FailedPrecondition as e:
            raise self._no_ring() from e

    async def _fill_addresses(self, route: Route, deadline_s: float) -> Route:
        """The route again after asking ListNodes for members whose address the stream
        has not told (at most one lookup in flight, one per lookup interval)."""
        members = ([route.primary] if route.primary else []) + list(route.replicas)
        if all(m in route.addresses for m in members) or self._control_plane is None:
            return route
        now = self._clock.monotonic_s()
        if self._lookup is None or self._lookup.done():
            if now - self._last_lookup_s < self._address_lookup_interval_s:
                return route
            self._last_lookup_s = now
            self._lookup = asyncio.ensure_future(self._lookup_addresses())
        lookup = self._lookup

        async def lookup_done() -> None:
            await asyncio.shield(lookup)

        with contextlib.suppress(TimeoutError, errors.BlueMarbleError):
            await run_with_timeout(self._clock, lookup_done(), max(0.0, deadline_s - now))
        return self.assignments.route(route.player_id, route.shard_id)

    async def _lookup_addresses(self) -> None:
        assert self._control_plane is not None
        try:
            response: controlplane_pb2.ListNodesResponse = await self._control_plane.call(
                lambda s: s.ListNodes, controlplane_pb2.ListNodesRequest(), attempts=1
            )
        except errors.BlueMarbleError as e:
            log.info("node address lookup failed", error=str(e))
            return
        self.assignments.add_addresses(response.nodes)

    # ---- calls ----

    async def get_inventory(
        self, player_id: str, *, allow_stale: bool = False, deadline_s: float = DEFAULT_DEADLINE_S
    ) -> Inventory:
        """The player's items and gold from the shard's primary; with ``allow_stale``
        possibly from a replica (``stale`` set) when the primary fails.

        Raises InvalidArgument (bad player id), NotFound (the shard never saw the
        player), and, once ``deadline_s`` has passed, the last retryable error
        (Unavailable, DeadlineExceeded, FailedPrecondition)."""
        request = shardnode_pb2.GetInventoryRequest(
            player_id=validation.player_id(player_id), allow_stale=validation.flag(allow_stale, "allow_stale"))

        async def call(target: Target, address: str, timeout_s: float) -> Inventory:
            response = await self._transport.get_inventory(address, request, timeout_s)
            return _inventory(response, target.node_id)

        return await self._run(player_id, call, allow_stale=allow_stale, deadline_s=deadline_s, what="GetInventory")

    async def grant_items(
        self,
        player_id: str,
        item_ids: Iterable[str],
        gold: int = 0,
        *,
        request_id: str | None = None,
        epoch: int = 0,
        deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> GrantResult:
        """Gives the player new unique items and gold, on the shard's primary.

        Idempotent by ``request_id`` (a fresh uuid4 when None), which every retry of
        this call reuses: the grant is applied at most once, and a replayed answer says
        so. To retry a grant yourself after this call failed (its deadline passed, its
        outcome unknown), pass it the same ``request_id`` again (the error names it, also
        as its ``request_id`` attribute): a fresh one would grant twice. A request id names
        one write, recorded on the player's shard: reused for another write there it is
        refused (FailedPrecondition), on another shard it is just a new id, so derive it
        from the write itself (an event and the player), never from an event alone. ``epoch`` 0 lets
        the node use its current epoch. Raises InvalidArgument (bad input, checked before
        anything is sent), FailedPrecondition (e.g. an item
        someone already owns, or an ``epoch`` older than the shard's), and after
        ``deadline_s`` the last retryable error."""
        return await self._items_write("grant", player_id, item_ids, gold, request_id, epoch, deadline_s)

    async def take_items(
        self,
        player_id: str,
        item_ids: Iterable[str] = (),
        gold: int = 0,
        *,
        request_id: str | None = None,
        epoch: int = 0,
        deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> GrantResult:
        """Takes items and gold away from the player (a purchase, an item used up), on the
        shard's primary; the answer holds the inventory after it.

        Idempotent by ``request_id`` exactly as :meth:`grant_items` (the same rules for
        reusing it, and the error of a call whose outcome is unknown names it). Raises
        InvalidArgument (bad input, checked before anything is sent: an empty take, more
        than 256 items, gold outside 0..2^53), FailedPrecondition naming the item or the
        amount when the player does not hold it (items and gold escrowed by a trade in
        doubt count as not held), and after ``deadline_s`` the last retryable error."""
        return await self._items_write("take", player_id, item_ids, gold, request_id, epoch, deadline_s)

    async def _items_write(
        self, kind: str, player_id: str, item_ids: Iterable[str], gold: int, request_id: str | None, epoch: int,
        deadline_s: float,
    ) -> GrantResult:
        """:meth:`grant_items` (``kind`` "grant") or :meth:`take_items` ("take")."""
        callers_id = request_id is not None  # else only this call's own attempts use the id
        message = shardnode_pb2.GrantItemsRequest if kind == "grant" else shardnode_pb2.TakeItemsRequest
        request = message(
            request_id=validation.request_id(request_id if request_id is not None else str(uuid.uuid4())),
            player_id=validation.player_id(player_id),
            item_ids=validation.item_ids(item_ids),
            gold=validation.gold(gold),
            epoch=validation.log_counter(epoch, "epoch"),
        )
        if kind == "take" and not request.item_ids and not request.gold:
            raise errors.InvalidArgument("the take is empty; give at least one item id or some gold")

        async def call(target: Target, address: str, timeout_s: float) -> GrantResult:
            if isinstance(request, shardnode_pb2.GrantItemsRequest):
                response: Any = await self._transport.grant_items(address, request, timeout_s)
            else:
                response = await self._transport.take_items(address, request, timeout_s)
            return GrantResult(
                inventory=_inventory(response.inventory, target.node_id),
                lsn=response.lsn,
                replayed=response.replayed and callers_id,
                request_id=request.request_id,
            )

        self._check_usable()  # closed already: nothing was sent, so no outcome is in doubt
        what = "GrantItems" if kind == "grant" else "TakeItems"
        return await _naming_request(request.request_id, self._run(
            player_id, call, allow_stale=False, deadline_s=deadline_s, what=what, epoch=epoch,
            echoed=(request.request_id, player_id, *request.item_ids),
        ))

    async def set_player_data(
        self,
        player_id: str,
        system: str,
        key: str,
        value: bytes,
        *,
        request_id: str | None = None,
        epoch: int = 0,
        deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> DataWriteResult:
        """Sets the player's value for a game system and key, on the shard's primary;
        idempotent by ``request_id`` as :meth:`grant_items`. Raises InvalidArgument (bad
        key or a value over 64 KiB here; a system not in the cluster config from the
        node), and after ``deadline_s`` the last retryable error."""
        callers_id = request_id is not None  # as in grant_items
        request = shardnode_pb2.SetPlayerDataRequest(
            request_id=validation.request_id(request_id if request_id is not None else str(uuid.uuid4())),
            player_id=validation.player_id(player_id),
            system=validation.system_name(system),
            key=validation.data_key(key),
            value=validation.data_value(value),
            epoch=validation.log_counter(epoch, "epoch"),
        )

        async def call(target: Target, address: str, timeout_s: float) -> DataWriteResult:
            r = await self._transport.set_player_data(address, request, timeout_s)
            return DataWriteResult(
                shard_id=ShardId(r.shard_id), epoch=r.epoch, lsn=r.lsn, replayed=r.replayed and callers_id,
                consistency=r.consistency, request_id=request.request_id,
            )

        self._check_usable()  # closed already: nothing was sent, so no outcome is in doubt
        return await _naming_request(request.request_id, self._run(
            player_id, call, allow_stale=False, deadline_s=deadline_s, what="SetPlayerData", epoch=epoch,
            echoed=(request.request_id, player_id, request.system, request.key),
        ))

    async def get_player_data(
        self,
        player_id: str,
        system: str,
        key: str,
        *,
        allow_stale: bool = False,
        deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> PlayerData:
        """The player's value for a game system and key (``value`` None when unset, also
        for a player the shard does not know: data needs no grant first), from the
        primary; with ``allow_stale`` possibly from a replica. Errors as
        :meth:`get_inventory`, except that an unknown player is not NotFound."""
        request = shardnode_pb2.GetPlayerDataRequest(
            player_id=validation.player_id(player_id), system=validation.system_name(system),
            key=validation.data_key(key), allow_stale=validation.flag(allow_stale, "allow_stale"),
        )

        async def call(target: Target, address: str, timeout_s: float) -> PlayerData:
            r = await self._transport.get_player_data(address, request, timeout_s)
            return PlayerData(
                player_id=PlayerId(r.player_id or request.player_id), system=r.system or system, key=r.key or key,
                value=r.value if r.found else None, shard_id=ShardId(r.shard_id), epoch=r.epoch, lsn=r.lsn,
                stale=r.staleness.stale, lag_entries=r.staleness.lag_entries, lag_ms=r.staleness.lag_ms,
                served_by=NodeId(r.staleness.served_by or target.node_id),
            )

        return await self._run(player_id, call, allow_stale=allow_stale, deadline_s=deadline_s, what="GetPlayerData")

    async def execute_local_trade(
        self,
        trade_id: str,
        player_a: str,
        player_b: str,
        a_items: Iterable[str] = (),
        a_gold: int = 0,
        b_items: Iterable[str] = (),
        b_gold: int = 0,
        *,
        deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> LocalTradeResult:
        """A trade between two players of one shard (A gives ``a_items`` and ``a_gold``, B
        gives ``b_items`` and ``b_gold``), run by that shard's primary in one replicated
        write: no coordinator, no etcd. Idempotent by ``trade_id``, which every retry of
        this call reuses (as a request id of :meth:`grant_items`); retries with that id
        through ``TradeCoordinator.ExecuteTrade`` get the same answer, and the other way
        round. Redirects, failover and retries as :meth:`grant_items`. Each attempt
        carries the shard and the epoch this client routed it with.

        Raises InvalidArgument (bad terms: checked here before anything is sent, and by
        the primary, e.g. a trade id already used for another trade), CrossShardTrade
        when the players are on different shards (nothing was written), and after
        ``deadline_s`` the last retryable error (the outcome is then unknown to the
        caller: asking again with the same trade id and terms tells it)."""
        trade = Trade(trade_id, player_a, player_b, Offer(tuple(validation.item_ids(a_items, "a_items")), a_gold),
                      Offer(tuple(validation.item_ids(b_items, "b_items")), b_gold))
        validate_trade(trade)
        player_b_id = validation.player_id(player_b)
        # From the checked terms, not the arguments: an iterator given as items is used up.
        a_gives = common_pb2.Offer(item_ids=trade.a_gives.item_ids, gold=trade.a_gives.gold)
        b_gives = common_pb2.Offer(item_ids=trade.b_gives.item_ids, gold=trade.b_gives.gold)
        attempts = 0

        async def call(target: Target, address: str, timeout_s: float) -> LocalTradeResult:
            nonlocal attempts
            route = self.resolve(player_a)  # the route _run picked ``target`` from, unless the cache moved since
            if route.primary != target.node_id:
                raise errors.Unavailable(f"{route.shard_id} moved away from {target.node_id}; retry shortly")
            try:
                other = self.router.shard_for(player_b_id)
            except errors.FailedPrecondition as e:
                raise errors.Unavailable("the routing client has no ring yet; retry shortly") from e
            if other != route.shard_id:
                raise CrossShardTrade(
                    f"players {echo(player_a)} ({route.shard_id}) and {echo(player_b)} ({other}) are on different "
                    "shards: the trade needs the coordinator"
                )
            request = shardnode_pb2.ExecuteLocalTradeRequest(
                trade_id=trade_id, shard_id=route.shard_id, epoch=route.epoch, player_a=player_a,
                player_b=player_b, a_gives=a_gives, b_gives=b_gives,
            )
            attempts += 1
            try:
                r = await self._transport.execute_local_trade(address, request, timeout_s)
            except errors.FailedPrecondition as e:
                if _DIFFERENT_SHARDS_MARKER in str(e):  # the primary's ring is newer than ours
                    raise CrossShardTrade(str(e)) from e
                raise
            outcome = _OUTCOMES.get(r.outcome)
            if outcome is None:
                raise errors.BlueMarbleError(
                    f"{route.shard_id}'s answer to trade {echo(trade_id)} carries no outcome ({r.outcome})")
            return LocalTradeResult(r.trade_id or trade_id, outcome, r.reason, r.replayed, route.shard_id, attempts,
                                    cause_from_proto(r.abort_cause))

        return await self._run(player_a, call, allow_stale=False, deadline_s=deadline_s, what="ExecuteLocalTrade",
                               echoed=(trade_id, player_a, player_b, *trade.a_gives.item_ids, *trade.b_gives.item_ids))

    # ---- the retry loop ----

    async def _run(
        self,
        player_id: str,
        call: Callable[[Target, str, float], Awaitable[T]],
        *,
        allow_stale: bool,
        deadline_s: float,
        what: str,
        epoch: int = 0,
        echoed: Sequence[str] = (),
    ) -> T:
        """Resolves and calls until an answer, a final error, ``max_attempts`` redirects
        or the deadline (then the last error). ``echoed``: the request's own ids, which a
        node's message may quote (:func:`is_redirect`)."""
        check_deadline(deadline_s)
        self._check_usable()
        clock = self._clock
        started_s = clock.monotonic_s()
        deadline = started_s + deadline_s
        if not self.ready:
            await self.wait_ready(deadline_s)
        backoff = retry.Backoff(self._policy, clock)
        last: errors.BlueMarbleError | None = None
        redirects = 0  # attempts answered "not here": bounded by max_attempts (others by the deadline)
        attempt = 0
        while redirects < self._max_attempts:
            attempt += 1
            changed = self.assignments.changed  # set once the cache moves past this attempt's view
            try:
                route = self.resolve(player_id)
            except errors.BlueMarbleError as e:
                if not should_retry(e, echoed):
                    raise
                last = e
            else:
                if epoch and route.epoch > epoch:  # the caller's epoch can never be served again
                    raise errors.FailedPrecondition(
                        f"epoch {epoch} is older than {route.shard_id}'s current epoch {route.epoch}"
                    )
                try:
                    route = await self._fill_addresses(route, deadline)
                    return await self._attempt(route, call, allow_stale=allow_stale, deadline=deadline,
                                               echoed=echoed)
                except errors.BlueMarbleError as e:
                    if not should_retry(e, echoed):
                        raise
                    if (epoch and route.epoch < epoch and is_redirect(e, echoed)
                            and clock.monotonic_s() - started_s >= EPOCH_AHEAD_GRACE_S):
                        # Neither this client's view nor the node knows the caller's epoch
                        # after a while: it came from nowhere in this cluster (a node's
                        # assignment reaches this client within a moment of the node).
                        raise errors.FailedPrecondition(
                            f"epoch {epoch} is ahead of {route.shard_id}'s current epoch {route.epoch}: no node or "
                            f"assignment has known it for {EPOCH_AHEAD_GRACE_S:g} s; pass the epoch a result or "
                            "resolve() gave, or 0 for the node's own"
                        ) from e
                    if isinstance(e, errors.DeadlineExceeded) and last is not None and deadline <= clock.monotonic_s():
                        # The call's deadline ran out in this attempt (begun with little of
                        # it left): the earlier attempts' reason says more than the clock.
                        break
                    last = e
                    redirects += is_redirect(e, echoed)
            remaining_s = deadline - clock.monotonic_s()
            if remaining_s <= 0:
                break
            log.debug("retrying", what=what, player=player_id, attempt=attempt, error=str(last))
            await wait_event(clock, changed, min(backoff.next_delay_s(), remaining_s))
            if changed.is_set():
                backoff.reset()  # a new view (e.g. a new primary): retry promptly from here on
            if deadline - clock.monotonic_s() <= 0:
                break
        else:
            # Attempts used up before the deadline: the shard kept moving (a failover or
            # drain under way). The last error, a node's "not the primary", would tell the
            # caller to do what this client just did 64 times; this says to retry later.
            assert last is not None
            raise errors.Unavailable(
                f"{what} for player {echo(player_id)} gave up after {attempt} attempts in "
                f"{deadline_s - (deadline - clock.monotonic_s()):.1f} s while its shard's primary kept changing; "
                f"retry later (a write: with the same request id; last error: {last})"
            ) from last
        assert last is not None
        if is_redirect(last, echoed):
            # The deadline ran out while the shard's primary moved: the node's "not the
            # primary" would read as final (FAILED_PRECONDITION); it is not.
            raise errors.Unavailable(
                f"{what} for player {echo(player_id)}: no answer within {deadline_s:.3g} s while its shard's primary "
                f"moved; retry (a write: with the same request id; last error: {last})"
            ) from last
        raise last

    async def _attempt(
        self,
        route: Route,
        call: Callable[[Target, str, float], Awaitable[T]],
        *,
        allow_stale: bool,
        deadline: float,
        echoed: Sequence[str] = (),
    ) -> T:
        """One pass over the route's targets (the primary; with ``allow_stale`` then the
        replicas): the first answer, a final error at once, or the last retryable one."""
        targets = targets_for(route, allow_stale=allow_stale)
        if not targets:
            raise errors.Unavailable(f"{route.shard_id} has no primary right now (failover in progress); retry shortly")
        last: errors.BlueMarbleError | None = None
        for i, target in enumerate(targets):
            remaining_s = deadline - self._clock.monotonic_s()
            if remaining_s <= 0:
                break
            if target.address is None:
                role = "primary" if target.primary else "replica"
                last = errors.Unavailable(
                    f"node {target.node_id}, {route.shard_id}'s {role}, has no known address: it is not registered "
                    "(down, or starting); the shard fails over or waits for it; retry shortly")
                continue
            timeout_s = remaining_s
            if i < len(targets) - 1:  # leave time (half at least) for the replicas a stale read may fall back to
                timeout_s = min(remaining_s / 2, self._stale_primary_timeout_s)
            try:
                return await self._bounded(route, target, call(target, target.address, timeout_s), timeout_s)
            except errors.BlueMarbleError as e:
                if not should_retry(e, echoed):
                    raise
                last = e
        if last is None:
            raise errors.DeadlineExceeded(f"no answer from {route.shard_id} within the deadline")
        raise last

    async def _bounded(self, route: Route, target: Target, work: Awaitable[T], timeout_s: float) -> T:
        """``work`` bounded by ``timeout_s`` on the client's clock; an attempt on the
        primary is abandoned (Unavailable) as soon as the cache names another primary or
        epoch for the shard (safe for writes: they are idempotent by request id).

        On the system clock the call runs in the caller's own task, under
        ``asyncio.timeout``, and a move cancels that task from the shared "moved" future's
        callback: no task, no ``asyncio.wait`` per call (this path is every write's, and
        it cost the client twice a bare unary call). A fake clock takes
        :meth:`_bounded_on_timer` instead."""
        if not isinstance(self._clock, SystemClock):
            return await self._bounded_on_timer(route, target, work, timeout_s)
        moved: asyncio.Future[None] | None = None
        if target.primary:
            moved = self.assignments.moved(route.shard_id, route.epoch, route.primary)
            if moved.done():
                if inspect.iscoroutine(work):
                    work.close()
                raise errors.Unavailable(
                    f"{route.shard_id} moved away from {target.node_id} at epoch {route.epoch} during the call"
                )
        task = asyncio.current_task()
        assert task is not None
        fired = False
        active = True

        def on_moved(_: asyncio.Future[None]) -> None:
            # A callback already scheduled when the attempt ended (the move and the
            # answer in one loop turn) still runs: it must not cancel what the caller
            # does next.
            nonlocal fired
            if active and not fired:
                fired = True
                task.cancel()

        if moved is not None:
            moved.add_done_callback(on_moved)
        try:
            async with asyncio.timeout(timeout_s):
                return await work
        except TimeoutError:
            raise errors.DeadlineExceeded(_silent(target, timeout_s)) from None
        except asyncio.CancelledError:
            if fired and task.uncancel() == 0:  # our own cancellation, nobody else's
                raise errors.Unavailable(
                    f"{route.shard_id} moved away from {target.node_id} at epoch {route.epoch} during the call"
                ) from None
            raise
        finally:
            active = False
            if moved is not None:
                moved.remove_done_callback(on_moved)

    async def _bounded_on_timer(self, route: Route, target: Target, work: Awaitable[T], timeout_s: float) -> T:
        """:meth:`_bounded` for an injected clock: the work as a task, raced against the
        clock's timer and the "moved" future."""
        job = asyncio.ensure_future(work)
        waiters: set[asyncio.Future[Any]] = {job}
        if target.primary:
            waiters.add(self.assignments.moved(route.shard_id, route.epoch, route.primary))
        timer = asyncio.ensure_future(self._clock.sleep(timeout_s))
        waiters.add(timer)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if job.done():
                if not job.cancelled():
                    return job.result()
            elif any(w.done() for w in waiters if w is not job and w is not timer):
                raise errors.Unavailable(
                    f"{route.shard_id} moved away from {target.node_id} at epoch {route.epoch} during the call"
                )
            else:
                raise errors.DeadlineExceeded(_silent(target, timeout_s))
            raise errors.Unavailable(f"call to node {target.node_id} ({target.address}) was cancelled")
        finally:
            timer.cancel()
            if not job.done():
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await job


def _silent(target: Target, timeout_s: float) -> str:
    """What a call whose node did not answer in time says: a primary that stays silent
    (stopped, hung, cut off) loses its shard to a replica once its lease expires."""
    text = (f"node {target.node_id} ({target.address}) did not answer before the call's deadline "
            f"(its last attempt had {timeout_s:.3g} s of it left)")
    if target.primary:
        text += "; if the primary stays silent, a replica takes its shard over once its lease expires"
    return text


def _inventory(r: shardnode_pb2.GetInventoryResponse, asked: NodeId) -> Inventory:
    return Inventory(
        player_id=PlayerId(r.player_id),
        item_ids=tuple(r.item_ids),
        gold=r.gold,
        shard_id=ShardId(r.shard_id),
        epoch=r.epoch,
        stale=r.staleness.stale,
        lag_entries=r.staleness.lag_entries,
        lag_ms=r.staleness.lag_ms,
        served_by=NodeId(r.staleness.served_by or asked),
        escrowed_item_ids=tuple(r.escrowed_item_ids),
        escrowed_gold=r.escrowed_gold,
    )
