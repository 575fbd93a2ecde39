"""gRPC servicers of the control plane: thin translations between protobuf and logic.

Each method validates its input (through :mod:`bluemarble.core.validation`), calls the
registry or stores, and builds the response. Errors are BlueMarble exceptions; the
server interceptor maps them to statuses.

Who may call what is checked here, where the request is known (:mod:`bluemarble.runtime.auth`):
admin RPCs (SetConfig, DrainNode, UndrainNode, ForcePromote) need the admin bearer token when one is configured, and
with mutual TLS a node may register, heartbeat and deregister only under the node id its
client certificate names.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc.aio
import structlog

from bluemarble.api.conversions import holds_role, ring_to_proto
from bluemarble.core import limits, validation
from bluemarble.core.errors import (
    AlreadyExists,
    BlueMarbleError,
    CorruptRecord,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)
from bluemarble.core.ids import NodeId, ShardId, shard_index
from bluemarble.core.limits import echo, first_few
from bluemarble.core.ring import Ring
from bluemarble.runtime.auth import ServerAuth
from bluemarble.runtime.clock import Clock, run_with_timeout
from bluemarble.v1 import common_pb2, controlplane_pb2, controlplane_pb2_grpc, shardnode_pb2
from controlplane.server.crash_watch import CrashWatch
from controlplane.server.election import Election, LeaderInfo, refresh_interval_s
from controlplane.server.node_probe import NodeProbe
from controlplane.server.refusals import RegistrationRefusals
from controlplane.server.registry import NodeListing, NodeRegistry, UnreadableNode
from controlplane.server.shard_reports import ShardReports
from controlplane.store import codec
from controlplane.store.config_store import ConfigStore
from controlplane.store.etcd import EtcdStore
from controlplane.store.keys import KeySchema
from controlplane.store.watchcache import PrefixCache

log = structlog.get_logger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]


def _alarm_warning(alarm: str) -> str:
    """The status warning for an etcd alarm."""
    if alarm == "NOSPACE":
        return ("etcd is out of space (NOSPACE alarm) and refuses every write: trades, registrations and failovers "
                "fail until an operator raises --quota-backend-bytes, or compacts and defragments etcd, then "
                "disarms the alarm (etcdctl alarm disarm)")
    if alarm == "CORRUPT":
        return "etcd reports a corrupt member (CORRUPT alarm): replace that member from a healthy one"
    return f"etcd has raised an alarm ({alarm})"


SINGLE_COPY_WARNING = (
    "replication_factor is 1: every shard has a single copy, and its primary alone acknowledges STRONG writes "
    "(inventories and trades would not survive the loss of its node)"
)


@dataclass
class ControlPlaneDeps:
    """What every servicer of one control-plane replica shares."""

    replica_id: str
    keys: KeySchema
    store: EtcdStore
    registry: NodeRegistry
    config: ConfigStore
    clock: Clock
    nodes: PrefixCache[common_pb2.Node]
    assignments: PrefixCache[common_pb2.Assignment]
    ring: PrefixCache[Ring]
    election: Election
    placement_hold: Callable[[], str] = lambda: ""
    """Why this replica's reconciler holds placement moves right now ("" when it does not)."""
    probe: NodeProbe | None = None
    """Asks nodes for their shard statuses (ListAssignments include_status)."""
    crash_watch: CrashWatch | None = None
    """Revokes the lease of a node whose heartbeat stream closed and whose address refuses
    connections (None: only the TTL ends leases)."""
    config_mirror: PrefixCache[common_pb2.ClusterConfig] | None = None
    """The config key's mirror, for HeartbeatResponse.config_revision without an etcd read."""
    reports: ShardReports = field(default_factory=ShardReports)
    auth: ServerAuth = field(default_factory=ServerAuth)
    """The admin token and node-identity checks (default: none, everything allowed)."""
    cluster_uid: str = ""
    """This cluster's identity (etcd's cluster-uid key); nodes whose data dir belongs to
    another are refused."""
    forced: PrefixCache[controlplane_pb2.ForcePromoteRequest] | None = None
    """The ForcePromote requests waiting for the leader (GetClusterStatus lists them)."""
    refusals: RegistrationRefusals = field(init=False)
    """Registrations this replica refused lately (GetClusterStatus words them)."""

    def __post_init__(self) -> None:
        self.refusals = RegistrationRefusals(self.clock)


MAX_SHARD_STATUSES = limits.MAX_SHARD_STATUSES
STATUS_ETCD_TIMEOUT_S = 0.5
"""Budget of GetClusterStatus's etcd reads; past it, the answer comes from the mirrors
(an operator's status call must answer while etcd is down, within a short deadline)."""
START_REVISION_CHECK_TIMEOUT_S = 0.5
"""Budget of WatchAssignments' etcd read that checks a start_revision ahead of the mirror."""
START_REVISION_CATCH_UP_S = 0.5
"""How long WatchAssignments lets this replica's mirror catch up to start_revision before
it starts the stream anyway (the snapshot says the revision it reflects)."""
_KNOWN_ROLES = frozenset(common_pb2.ShardRole.values())
STATUS_PROBE_MAX_NODES = 256
"""Nodes one ListAssignments(include_status) asks directly at most (members with no recent
report here); the others' statuses are missing from the answer."""
STATUS_PROBE_TIMEOUT_S = 1.0
STATUS_COPIES_PROBE_TIMEOUT_S = 0.3
"""GetClusterStatus's budget for asking the nodes (a node that does not answer in time is
judged by its latest heartbeat report): the whole status stays under a second."""
BEHIND_WARNING_MS = 5_000
"""GetClusterStatus warns of a replica whose oldest missing entry is this old."""
STATUS_ANSWERS_REUSED_S = 0.5
"""Status calls that ask the same nodes within this share their answers (and one probe in
flight): a hundred operators' and dashboards' calls at once cost the nodes one round of
GetShardStatus, not a hundred."""


def _retrieve(task: asyncio.Task[object]) -> None:
    """Marks a shared probe's failure as seen: a caller that gave up is not told of it."""
    if not task.cancelled():
        task.exception()


def _silent_note(silent: Sequence[str]) -> str:
    """The clause naming registered nodes a drain did not count because they hold no role
    and do not answer ("" when there are none)."""
    if not silent:
        return ""
    return f" ({first_few(silent)} registered but not answering, so given no copies)"


MAX_TROUBLE_BYTES = 512
MAX_TROUBLE_WARNINGS = 8
"""Nodes whose trouble GetClusterStatus words as a warning, at most (by node id)."""


def _trouble(request: controlplane_pb2.HeartbeatRequest) -> tuple[str, int]:
    """The heartbeat's ``trouble`` and its start, checked: printable text of at most
    :data:`MAX_TROUBLE_BYTES` (shown to operators), a start that is not negative."""
    size = validation.utf8_size(request.trouble, "trouble")
    if size > MAX_TROUBLE_BYTES:
        raise InvalidArgument(f"trouble is {size} bytes long; at most {MAX_TROUBLE_BYTES} are allowed")
    validation.printable_text(request.trouble, "trouble")
    if request.trouble_since_ms < 0:
        raise InvalidArgument(f"trouble_since_ms is {request.trouble_since_ms}; give Unix milliseconds (0: none)")
    return request.trouble, request.trouble_since_ms if request.trouble else 0


def _unreadable_node_warnings(unreadable: Sequence[UnreadableNode]) -> list[str]:
    """One warning per key below the nodes prefix that holds no readable Node (at most
    :data:`MAX_TROUBLE_WARNINGS`, by key, then a count): such a key is in no listing and
    names no live node, and one attached to no lease (``lease`` 0; -1: not known) never
    goes by itself."""
    shown = sorted(unreadable, key=lambda u: u.key)
    warnings = []
    for u in shown[:MAX_TROUBLE_WARNINGS]:
        if u.lease == 0:
            fate = "it is attached to no lease, so it never expires: delete it"
        elif u.lease > 0:
            fate = f"it goes when its lease {u.lease:#x} ends, or delete it"
        else:
            fate = "delete it"
        warnings.append(
            f"etcd key {echo(u.key, 160)} holds an unreadable node record (left out of the nodes; a live node "
            f"of that id replaces it when it registers again); {fate}: etcdctl del {echo(u.key, 160)}"
        )
    if len(shown) > MAX_TROUBLE_WARNINGS:
        warnings.append(f"and {len(shown) - MAX_TROUBLE_WARNINGS} more unreadable node records")
    return warnings


def _node_id(node: common_pb2.Node) -> str:
    return node.node_id


def _lost_members(assignments: Sequence[common_pb2.Assignment], leases: Mapping[str, int], shown: int = 5) -> str:
    """For the status warning on shards without a live primary: the members they name
    (primary, replicas, retained copies) that are not registered, or registered again
    since they were given the role ("registered again": a restart, or a lease that ran out),
    with how many such shards name each;
    "" when there is none (a shard not placed yet)."""
    lost: collections.Counter[str] = collections.Counter()
    for a in assignments:
        if not holds_role(a, a.primary, leases):
            lost.update(
                n if n not in leases else f"{n} registered again"
                for n in dict.fromkeys((a.primary, *a.replicas, *a.retained))
                if n and not holds_role(a, n, leases)
            )
    if not lost:
        return ""
    ranked = sorted(lost.items(), key=lambda kv: (-kv[1], kv[0]))  # the most shards first
    named = [f"{n} ({c} shard{'s' if c > 1 else ''})" for n, c in ranked]
    return "; lost members they name: " + first_few(named, shown)


class ControlPlaneService(controlplane_pb2_grpc.ControlPlaneServicer):
    def __init__(self, deps: ControlPlaneDeps):
        self._watch_streams = 0
        self._d = deps
        # The shard ids of the last ring a heartbeat was checked against, by identity:
        # building the set on every heartbeat would cost more than the heartbeat.
        self._ring_shards: tuple[Ring | None, frozenset[str]] = (None, frozenset())
        # The last probe of the members (see _probe_members): what it asked, when it
        # started, and its answers (a task while in flight).
        self._member_probe: tuple[frozenset[tuple[NodeId, str]], float,
                                  asyncio.Task[dict[NodeId, shardnode_pb2.GetShardStatusResponse]]] | None = None

    # ---- node lifecycle ----

    async def RegisterNode(
        self, request: controlplane_pb2.RegisterNodeRequest, context: Ctx
    ) -> controlplane_pb2.RegisterNodeResponse:
        await self._d.auth.node(context, "RegisterNode", request.node_id)
        theirs = validation.cluster_uid(request.cluster_uid)
        if theirs and self._d.cluster_uid and theirs != self._d.cluster_uid:
            refusal = FailedPrecondition(
                f"the data dir of node {echo(request.node_id)} belongs to another cluster (uid {theirs}; this one is "
                f"{self._d.cluster_uid}): its copies mean nothing here. Start it with its own cluster's "
                "control plane, or with an empty data dir to join this one"
            )
            self._refused(request, refusal)
            raise refusal
        config, _ = await self._d.config.get()
        try:
            lease_id, ttl_s = await self._d.registry.register(
                request.node_id,
                request.address,
                request.region,
                request.zone,
                request.capacity,
                config.lease_ttl_s,
            )
        except AlreadyExists as e:  # another process's id or address: worth the operator's eye
            self._refused(request, e)
            raise
        return controlplane_pb2.RegisterNodeResponse(
            lease_id=lease_id,
            ttl_ms=ttl_s * 1000,
            heartbeat_interval_ms=max(ttl_s * 1000 // 3, 100),
            cluster_uid=self._d.cluster_uid,
        )

    def _refused(self, request: controlplane_pb2.RegisterNodeRequest, error: BlueMarbleError) -> None:
        """Notes a refused registration for GetClusterStatus; logs the first of each
        episode (the refused process retries on its own, and would repeat it every try)."""
        if self._d.refusals.refused(request.node_id, request.address, str(error)):
            log.warning("registration refused; status shows it while it goes on", node_id=echo(request.node_id, 64),
                        address=echo(request.address, 128), error=str(error))

    async def Heartbeat(
        self, request: controlplane_pb2.HeartbeatRequest, context: Ctx
    ) -> controlplane_pb2.HeartbeatResponse:
        await self._d.auth.node(context, "Heartbeat", request.node_id)
        return await self._heartbeat(request)

    async def HeartbeatStream(
        self, request_iterator: AsyncIterator[controlplane_pb2.HeartbeatRequest], context: Ctx
    ) -> AsyncIterator[controlplane_pb2.HeartbeatResponse]:
        """Heartbeats over one stream. When the stream ends from the node's side (it
        half-closed, cancelled, or its connection was reset: a dead process's kernel
        closes its sockets), the crash watch checks whether the node is gone
        (:mod:`controlplane.server.crash_watch`). A stream this replica ends with a status
        (NOT_FOUND, bad input) is not the node going away; one ended by this replica's
        shutdown is ignored by the watch, which is closed before the server stops."""
        beating: tuple[NodeId, int] | None = None  # the registration of the last good beat
        ours = False
        allowed = ""  # the node id this stream's caller was last found entitled to
        try:
            async for request in request_iterator:
                try:
                    if request.node_id != allowed or not allowed:
                        await self._d.auth.node(context, "HeartbeatStream", request.node_id)
                        allowed = request.node_id
                    response = await self._heartbeat(request)
                except Exception:
                    ours = True  # this replica ends the stream with a status
                    raise
                beating = (NodeId(request.node_id), request.lease_id)
                yield response
        finally:
            # Reached on the node's half-close, on cancellation (CancelledError or
            # GeneratorExit: the peer went away) and on our own errors (``ours``).
            if not ours and beating is not None and self._d.crash_watch is not None:
                self._d.crash_watch.stream_ended(*beating)

    async def _heartbeat(self, request: controlplane_pb2.HeartbeatRequest) -> controlplane_pb2.HeartbeatResponse:
        self._check_shard_statuses(request.shards)
        trouble, trouble_since_ms = _trouble(request)
        ttl_s = await self._d.registry.heartbeat(request.node_id, request.lease_id)
        node = NodeId(request.node_id)
        now_s = self._d.clock.monotonic_s()
        if self._d.crash_watch is not None:
            self._d.crash_watch.heartbeat(node, request.lease_id)
        # A report is served for two heartbeat intervals (TTL/3 each), then asked anew.
        self._d.reports.record(node, request.lease_id, request.shards, now_s, fresh_s=2 * ttl_s / 3)
        record = self._d.nodes.entries.get(self._d.keys.node(node))
        draining = record is not None and record.state == common_pb2.NODE_STATE_DRAINING
        if record is not None and (record.trouble, record.trouble_since_ms) != (trouble, trouble_since_ms):
            try:
                await self._d.registry.set_trouble(node, request.lease_id, trouble, trouble_since_ms)
            except BlueMarbleError as e:  # the lease is refreshed: the next heartbeat tries again
                log.info("could not record a node's trouble", node_id=node, error=str(e))
        if request.leaving:
            draining = await self._drain_leaving(node)
        config = self._d.config_mirror
        return controlplane_pb2.HeartbeatResponse(
            lease_deadline_ms=self._d.clock.wall_ms() + ttl_s * 1000,
            ttl_ms=ttl_s * 1000,
            draining=draining,
            config_revision=config.mod_revisions.get(self._d.keys.config(), 0) if config is not None else 0,
        )

    async def _drain_leaving(self, node: NodeId) -> bool:
        """A node stopping (its heartbeat says ``leaving``): drained as DrainNode does, so
        its primaries are handed over and its copies made elsewhere before it goes. False
        (it leaves at once, as a crash would) while too few other nodes that are not
        draining could hold the copies: asked again at each of its heartbeats, so a node
        whose drain can no longer finish (the rest of the cluster stopping too) is let go.
        Heartbeats are the node's own calls: no admin token is needed."""
        _, able, silent, factor = await self._copy_holders(node)
        if len(able) < factor:
            log.info("leaving node not drained: too few other nodes for its copies; it leaves at once",
                     node_id=node, other_nodes=len(able), not_answering=silent[:8], replication_factor=factor)
            return False
        await self._d.registry.drain(node)  # idempotent; logs "node draining"
        return True

    def _check_shard_statuses(self, statuses: Sequence[common_pb2.ShardStatus]) -> None:
        """InvalidArgument unless every status names a shard of the current ring, once,
        with a known role, and positions and lags of at most 2^63-1 (what etcd and the
        placement keep). (on_disk_only and serving are flags.)"""
        if len(statuses) > MAX_SHARD_STATUSES:
            raise InvalidArgument(f"heartbeat reports {len(statuses)} shards; at most {MAX_SHARD_STATUSES}")
        if not statuses:
            return
        ring = self._d.ring.entries.get(self._d.keys.ring())
        if self._ring_shards[0] is not ring:
            self._ring_shards = (ring, frozenset(ring.shard_ids) if ring else frozenset())
        known = self._ring_shards[1]
        seen: set[str] = set()
        for i, status in enumerate(statuses):
            where = f"heartbeat shards[{i}]"
            try:
                shard_index(ShardId(status.shard_id))
            except ValueError as e:
                raise InvalidArgument(f"{where}: {e}") from e
            if ring is not None and status.shard_id not in known:
                raise InvalidArgument(
                    f"{where}: {status.shard_id} is not a shard of the ring (version {ring.version} "
                    f"has {len(known)} shards); report only shards assigned to this node"
                )
            if status.shard_id in seen:
                raise InvalidArgument(f"{where}: {status.shard_id} is reported twice; report each shard once")
            seen.add(status.shard_id)
            if status.role not in _KNOWN_ROLES:
                raise InvalidArgument(
                    f"{where}: role {status.role} of {status.shard_id} is not a ShardRole; "
                    "use SHARD_ROLE_PRIMARY (1) or SHARD_ROLE_REPLICA (2)"
                )
            for name in ("epoch", "applied_lsn", "last_epoch", "lag_entries", "lag_ms"):
                validation.log_counter(getattr(status, name), f"{where}.{name}")

    async def DeregisterNode(
        self, request: controlplane_pb2.DeregisterNodeRequest, context: Ctx
    ) -> controlplane_pb2.DeregisterNodeResponse:
        await self._d.auth.node(context, "DeregisterNode", request.node_id)
        await self._d.registry.deregister(request.node_id, request.lease_id)
        return controlplane_pb2.DeregisterNodeResponse()

    async def DrainNode(
        self, request: controlplane_pb2.DrainNodeRequest, context: Ctx
    ) -> controlplane_pb2.DrainNodeResponse:
        await self._d.auth.admin(context, "DrainNode")
        if not request.force:
            await self._check_drain_keeps_copies(validation.node_id(request.node_id))
        node = await self._d.registry.drain(request.node_id)
        return controlplane_pb2.DrainNodeResponse(node=node)

    async def UndrainNode(
        self, request: controlplane_pb2.UndrainNodeRequest, context: Ctx
    ) -> controlplane_pb2.UndrainNodeResponse:
        await self._d.auth.admin(context, "UndrainNode")
        node, was_draining = await self._d.registry.undrain(request.node_id)
        return controlplane_pb2.UndrainNodeResponse(node=node, was_draining=was_draining)

    async def _copy_holders(self, node: NodeId) -> tuple[list[common_pb2.Node], list[str], list[str], int]:
        """The registered nodes (read from etcd, not the mirrors), the nodes besides
        ``node`` that could hold copies, the ones left out because they do not answer, and
        the replication factor. A node counts as placement counts it: not draining, and
        holding a role already or answering a probe now (a registration at an address
        nobody reaches gets no role, so it cannot take the copies a drain moves)."""
        config, _ = await self._d.config.get()
        nodes, _ = await self._d.registry.list_nodes()
        others = {n.node_id: n.address for n in nodes if n.state != common_pb2.NODE_STATE_DRAINING}
        others.pop(node, None)
        holding = {member for a in self._d.assignments.entries.values() for member in (a.primary, *a.replicas)}
        unproven = {NodeId(n): address for n, address in others.items() if n not in holding}
        answered: set[NodeId] = set()
        if unproven and self._d.probe is not None:
            answered = await self._d.probe.reachable(unproven)
        silent: list[str] = sorted(n for n in unproven if n not in answered) if self._d.probe is not None else []
        able = sorted(n for n in others if n not in silent)
        return nodes, able, silent, config.replication_factor

    async def _check_drain_keeps_copies(self, node: NodeId) -> None:
        """Refuses (FailedPrecondition) a drain that would leave fewer nodes able to hold
        copies than replication_factor: every shard of the node would lose a copy for good
        (one drained after another, a cluster ends with single copies). Reads etcd, not the
        mirrors, so two drains sent back to back both count."""
        nodes, able, silent, factor = await self._copy_holders(node)
        target = next((n for n in nodes if n.node_id == node), None)
        if target is None or target.state == common_pb2.NODE_STATE_DRAINING:
            return  # NotFound, or already draining (idempotent): the registry answers
        if len(able) < factor:
            raise FailedPrecondition(
                f"draining {node} would leave {len(able)} node(s) for a replication factor of "
                f"{factor}{_silent_note(silent)}: its shards would lose copies. Add a node or lower "
                "replication_factor first, or drain with force (bluemarblectl drain --force)"
            )

    # ---- reads ----

    async def ListNodes(
        self, request: controlplane_pb2.ListNodesRequest, context: Ctx
    ) -> controlplane_pb2.ListNodesResponse:
        """Every registered node, read from etcd. When etcd does not answer within
        :data:`STATUS_ETCD_TIMEOUT_S`, the nodes the replica's watch saw last, with
        ``stale`` set (as ListAssignments answers): during an etcd outage an operator
        still sees who was registered, marked as such."""
        try:
            nodes, revision = await run_with_timeout(
                self._d.clock, self._d.registry.list_nodes(), STATUS_ETCD_TIMEOUT_S)
        except (Unavailable, TimeoutError) as e:
            cache = self._d.nodes
            if not cache.revision:  # the watch never saw etcd either: nothing to answer with
                raise Unavailable(f"etcd unavailable, and replica {self._d.replica_id} has no copy of the "
                                  "nodes yet; retry shortly") from e
            why = limits.echo(str(e), 200) if str(e) else f"no answer within {STATUS_ETCD_TIMEOUT_S:g} s"
            seen: list[common_pb2.Node] = sorted(cache.entries.values(), key=_node_id)
            return controlplane_pb2.ListNodesResponse(
                nodes=seen, revision=cache.revision, stale=True,
                stale_reason=f"replica {self._d.replica_id} could not read etcd ({why}); these are the nodes its "
                f"watch saw last, as of revision {cache.revision}, and may be out of date",
            )
        return controlplane_pb2.ListNodesResponse(nodes=nodes, revision=revision)

    def _sorted_assignments(self) -> list[common_pb2.Assignment]:
        return sorted(self._d.assignments.entries.values(), key=lambda a: shard_index(ShardId(a.shard_id)))

    async def ListAssignments(
        self, request: controlplane_pb2.ListAssignmentsRequest, context: Ctx
    ) -> controlplane_pb2.ListAssignmentsResponse:
        """The mirror's assignments. While the mirror has lost its etcd watch they are its
        last known state, answered with ``stale`` set rather than UNAVAILABLE: an operator
        (or a node) learns more from the last known placement, marked as such, than from
        an error, and a caller that needs current data can tell and go elsewhere."""
        cache = self._d.assignments
        assignments = self._sorted_assignments()
        response = controlplane_pb2.ListAssignmentsResponse(
            revision=cache.revision, assignments=assignments, nodes=self._node_refs(assignments)
        )
        if request.include_status:
            response.statuses.extend(await self._member_statuses(assignments))
        if not cache.healthy:
            response.stale = True
            response.stale_reason = (
                f"replica {self._d.replica_id} has lost its watch on etcd; these are the "
                f"assignments as of revision {cache.revision} and may be out of date"
            )
        return response

    async def _leader_warning(self, leader: LeaderInfo | None) -> str:
        """A warning when the leader is another replica that has stopped renewing its
        session lease (it died, froze or lost etcd: its key lasts until the lease runs
        out, and status would name it meanwhile), else ''. Renewals come every third of
        the TTL; more than one missed, and a second's rounding, is stopped."""
        if leader is None or not leader.lease_id:
            return ""
        if leader.replica_id == self._d.replica_id:
            if self._d.election.held_lease_id == leader.lease_id:
                return ""  # this replica leads
            # The key of an earlier run of this replica (killed, then started again): it
            # lasts until its lease runs out, and nobody leads meanwhile.
            earlier = True
        else:
            earlier = False
        try:
            remaining_s = await run_with_timeout(
                self._d.clock, self._d.store.lease_ttl(leader.lease_id), STATUS_ETCD_TIMEOUT_S)
        except (BlueMarbleError, TimeoutError):
            return ""  # etcd's answer about the lease is not needed for the rest of the status
        ttl_s = self._d.election.ttl_s
        silent_s = ttl_s - max(remaining_s, 0)
        if earlier:
            return (
                f"the leader key names this replica, {leader.replica_id}, but from an earlier run of it (or a term "
                f"it gave up): no replica leads until that lease runs out (in {max(remaining_s, 0)} s)"
            )
        if silent_s <= refresh_interval_s(ttl_s) + 1.5:
            return ""
        return (
            f"the leader, replica {leader.replica_id}, has not renewed its lease for about {silent_s} s: if it "
            f"stopped, another replica takes over when the lease runs out (in {max(remaining_s, 0)} s)"
        )

    async def _copy_warnings(
        self, assignments: Sequence[common_pb2.Assignment], live: set[str], shard_count: int
    ) -> list[str]:
        """What the live members say of their copies now (as ListAssignments with status
        does): shards with a replica still copying or far behind, and shards whose primary
        does not take writes (catching up as a new primary, or fenced). A placement can be
        complete while its copies are not."""
        silent: set[str] = set()
        members = await self._member_statuses(assignments, STATUS_COPIES_PROBE_TIMEOUT_S, silent)
        statuses = {(m.shard_id, m.node_id): m.status for m in members}
        copying: list[str] = []
        stalled: list[str] = []
        for a in assignments:
            replicas = [statuses.get((a.shard_id, r)) for r in a.replicas if r in live]
            if any(st is not None and (st.copying or not st.serving or st.lag_ms >= BEHIND_WARNING_MS)
                   for st in replicas):
                copying.append(a.shard_id)
            primary = statuses.get((a.shard_id, a.primary)) if a.primary in live else None
            if primary is not None and not primary.serving:
                stalled.append(a.shard_id)
        warnings = []
        if silent:
            led = sum(1 for a in assignments if a.primary in silent)
            warnings.append(
                f"{len(silent)} registered node(s) do not answer: {first_few(sorted(silent))} (stopped, or unreachable "
                f"from this replica; they lead {led} shard(s)). A stopped node's shards fail over once its lease "
                "runs out"
            )
        if copying:
            warnings.append(
                f"{len(copying)} of {shard_count} shards have a replica still copying, or "
                f"{BEHIND_WARNING_MS // 1000} s or more behind: {first_few(copying)} "
                "(bluemarblectl shards shows how far)"
            )
        if stalled:
            warnings.append(
                f"{len(stalled)} of {shard_count} shards have a primary not taking writes (catching up, or fenced): "
                f"{first_few(stalled)}"
            )
        return warnings

    def _node_refs(self, assignments: Sequence[common_pb2.Assignment]) -> list[common_pb2.NodeRef]:
        """NodeRef of every registered node the assignments name, sorted by node id."""
        named = {m for a in assignments for m in (a.primary, *a.replicas) if m}
        refs = []
        for node in sorted(named):
            record = self._d.nodes.entries.get(self._d.keys.node(NodeId(node)))
            if record is not None:
                refs.append(common_pb2.NodeRef(node_id=node, address=record.address))
        return refs

    async def _member_statuses(
        self, assignments: Sequence[common_pb2.Assignment], timeout_s: float = STATUS_PROBE_TIMEOUT_S,
        silent: set[str] | None = None,
    ) -> list[controlplane_pb2.MemberStatus]:
        """Each registered member's status of its shard, as the node answers it now
        (GetShardStatus, short deadline, at most :data:`STATUS_PROBE_MAX_NODES` nodes);
        for a node that does not answer, its latest heartbeat report through this replica
        when recent (``age_ms`` says how old); missing when neither knows. Asked first
        because a report can be a heartbeat interval old, and an operator looking at lag
        wants it now. ``silent``, when given, receives the members that neither answered
        a probe that finished in time nor sent a recent report."""
        now_s = self._d.clock.monotonic_s()
        found: dict[tuple[str, str], tuple[common_pb2.ShardStatus, float]] = {}
        ask: dict[NodeId, str] = {}
        leases: dict[str, int] = {}
        members = [(a.shard_id, m) for a in assignments for m in dict.fromkeys((a.primary, *a.replicas)) if m]
        for _, member in members:
            record = self._d.nodes.entries.get(self._d.keys.node(NodeId(member)))
            if record is None:
                continue
            leases[member] = record.lease_id
            if len(ask) < STATUS_PROBE_MAX_NODES or member in ask:
                ask[NodeId(member)] = record.address
        finished = False
        if ask and self._d.probe is not None:
            answers = await self._probe_members(ask, timeout_s)
            finished = answers is not None
            for node, answer in (answers or {}).items():
                for status in answer.shards:
                    if not status.on_disk_only:
                        found.setdefault((status.shard_id, node), (status, 0.0))
        for shard, member in members:
            if (shard, member) not in found and member in leases:
                latest = self._d.reports.latest(NodeId(member), ShardId(shard), leases[member], now_s)
                if latest is not None:
                    found[(shard, member)] = latest
        if silent is not None and finished:
            heard = {member for _, member in found}
            silent.update(n for n in ask if n not in heard)
        return [
            controlplane_pb2.MemberStatus(
                shard_id=shard, node_id=member, status=found[(shard, member)][0],
                age_ms=int(found[(shard, member)][1] * 1000),
            )
            for shard, member in members
            if (shard, member) in found
        ]

    async def _probe_members(
        self, ask: dict[NodeId, str], timeout_s: float
    ) -> dict[NodeId, shardnode_pb2.GetShardStatusResponse] | None:
        """GetShardStatus of the nodes in ``ask``, within ``timeout_s`` (nodes that did
        not answer are missing; None when the probe itself did not finish in time). A probe
        of the same nodes started less than :data:`STATUS_ANSWERS_REUSED_S` ago is shared,
        in flight or done."""
        assert self._d.probe is not None
        key = frozenset(ask.items())
        now_s = self._d.clock.monotonic_s()
        last = self._member_probe
        if last is not None and last[0] == key and now_s - last[1] < STATUS_ANSWERS_REUSED_S:
            probe = last[2]
        else:
            # Bounded by the longest budget a caller has: a node that does not answer
            # cannot hold the shared probe (or its task) for longer.
            probe = asyncio.ensure_future(
                run_with_timeout(self._d.clock, self._d.probe.statuses(ask), STATUS_PROBE_TIMEOUT_S)
            )
            probe.add_done_callback(_retrieve)
            self._member_probe = (key, now_s, probe)

        async def shared() -> dict[NodeId, shardnode_pb2.GetShardStatusResponse]:
            return await asyncio.shield(probe)  # a caller giving up leaves it to the others

        try:
            return await run_with_timeout(self._d.clock, shared(), timeout_s)
        except TimeoutError:
            return None

    def _ring_now(self) -> Ring:
        ring = self._d.ring.entries.get(self._d.keys.ring())
        if ring is None:
            raise Unavailable("the ring is not loaded yet; retry shortly")
        return ring

    async def GetRing(self, request: controlplane_pb2.GetRingRequest, context: Ctx) -> common_pb2.Ring:
        return ring_to_proto(self._ring_now())

    @contextlib.contextmanager
    def _watch_slot(self, method: str) -> Iterator[None]:
        """Holds one of the replica's :data:`~bluemarble.core.limits.MAX_WATCH_STREAMS`
        stream slots for a watch; raises ResourceExhausted when none is left."""
        if self._watch_streams >= limits.MAX_WATCH_STREAMS:
            raise ResourceExhausted(
                f"this control-plane replica already serves {limits.MAX_WATCH_STREAMS} watch streams; "
                f"retry {method} later or on another replica"
            )
        self._watch_streams += 1
        try:
            yield
        finally:
            self._watch_streams -= 1

    async def WatchRing(
        self, request: controlplane_pb2.WatchRingRequest, context: Ctx
    ) -> AsyncIterator[common_pb2.Ring]:
        with self._watch_slot("WatchRing"):
            async for ring in self._ring_updates(request):
                yield ring

    async def _ring_updates(self, request: controlplane_pb2.WatchRingRequest) -> AsyncIterator[common_pb2.Ring]:
        key = self._d.keys.ring()
        progress = _Progress(self._d.clock, request.progress_interval_ms)
        version = 0  # of the last ring sent on this stream
        async for update in progress.interleave(self._d.ring.subscribe()):
            ring = update.changed.get(key) if update is not None else None
            if ring is not None:
                version = ring.version
                yield ring_to_proto(ring)
            elif progress.due_in_s() <= 0:
                # Progress: a Ring with no shards (never a valid ring) and the version
                # this stream last sent. The stream is alive; the ring has not changed.
                yield common_pb2.Ring(version=version)
            else:
                continue
            progress.sent()

    async def ResolvePlayer(
        self, request: controlplane_pb2.ResolvePlayerRequest, context: Ctx
    ) -> controlplane_pb2.ResolvePlayerResponse:
        player = validation.player_id(request.player_id)
        ring = self._ring_now()
        shard = ring.shard_for(player)
        assignment = self._d.assignments.entries.get(self._d.keys.assignment(shard))
        if assignment is None or not assignment.primary:
            raise Unavailable(f"{shard} has no primary right now (failover in progress?); retry shortly")
        return controlplane_pb2.ResolvePlayerResponse(
            shard_id=shard,
            epoch=assignment.epoch,
            primary=self._node_ref(assignment.primary),
            replicas=[self._node_ref(r) for r in assignment.replicas],
            ring_version=ring.version,
        )

    def _node_ref(self, node_id: str) -> common_pb2.NodeRef:
        record = self._d.nodes.entries.get(self._d.keys.node(NodeId(node_id)))
        return common_pb2.NodeRef(node_id=node_id, address=record.address if record else "")

    async def WatchAssignments(
        self, request: controlplane_pb2.WatchAssignmentsRequest, context: Ctx
    ) -> AsyncIterator[controlplane_pb2.WatchAssignmentsResponse]:
        with self._watch_slot("WatchAssignments"):
            async for response in self._assignment_updates(request):
                yield response

    async def _assignment_updates(
        self, request: controlplane_pb2.WatchAssignmentsRequest
    ) -> AsyncIterator[controlplane_pb2.WatchAssignmentsResponse]:
        node = validation.node_id(request.node_id) if request.node_id else None
        if request.start_revision < 0:
            raise InvalidArgument(f"start_revision is {request.start_revision}; it must be >= 0 (0: no requirement)")
        await self._reach_start_revision(request.start_revision)
        sent: set[str] = set()  # shards this stream has told the watcher about
        progress = _Progress(self._d.clock, request.progress_interval_ms)
        revision = 0  # the last revision this stream has looked at
        async for update in progress.interleave(self._d.assignments.subscribe()):
            if update is None:
                # Progress: no change for this watcher up to `revision`. An empty,
                # non-snapshot message: every client applies it as a no-op.
                yield controlplane_pb2.WatchAssignmentsResponse(revision=revision, snapshot=False)
                progress.sent()
                continue
            revision = max(revision, update.revision)
            response = controlplane_pb2.WatchAssignmentsResponse(
                revision=update.revision, snapshot=update.snapshot
            )
            if update.snapshot:
                previous, sent = sent, set()
            for a in update.changed.values():
                if node is None or node == a.primary or node in a.replicas:
                    response.assignments.append(a)
                    sent.add(a.shard_id)
                elif a.shard_id in sent:
                    sent.discard(a.shard_id)
                    response.removed_shard_ids.append(a.shard_id)
            for key in update.removed:
                shard = self._d.keys.parse_assignment(key)
                if shard in sent:
                    sent.discard(shard)
                    response.removed_shard_ids.append(shard)
            if update.snapshot:
                response.removed_shard_ids.extend(sorted(previous - sent))
            response.nodes.extend(self._node_refs(response.assignments))
            if update.snapshot or response.assignments or response.removed_shard_ids:
                yield response
                progress.sent()
            elif progress.due_in_s() <= 0:  # only changes for other nodes, for a while
                yield controlplane_pb2.WatchAssignmentsResponse(revision=revision, snapshot=False)
                progress.sent()

    async def _reach_start_revision(self, start_revision: int) -> None:
        """Returns once this replica's assignment mirror reflects ``start_revision``, or
        after :data:`START_REVISION_CATCH_UP_S` when it lags (the stream then catches
        up). OutOfRange when etcd itself has not reached ``start_revision``; Unavailable
        when that cannot be checked because etcd does not answer."""
        cache = self._d.assignments
        if start_revision <= cache.revision:
            return
        try:
            current = await run_with_timeout(
                self._d.clock, self._d.store.current_revision(), START_REVISION_CHECK_TIMEOUT_S
            )
        except (Unavailable, TimeoutError) as e:
            raise Unavailable(
                f"start_revision {start_revision} is ahead of this replica's assignments "
                f"(revision {cache.revision}) and etcd cannot be reached to check it; "
                "retry shortly, or pass start_revision 0 to accept older state"
            ) from e
        if start_revision > current:
            raise OutOfRange(
                f"start_revision {start_revision} is ahead of the cluster's revision {current}; "
                "pass a revision this cluster gave you, or 0"
            )
        await cache.wait_for_revision(start_revision, START_REVISION_CATCH_UP_S)

    async def GetClusterStatus(
        self, request: controlplane_pb2.GetClusterStatusRequest, context: Ctx
    ) -> controlplane_pb2.GetClusterStatusResponse:
        """A summary that still answers, within about :data:`STATUS_ETCD_TIMEOUT_S`, while
        etcd is unreachable: then it is built from this replica's mirrors (possibly stale),
        with ``etcd_healthy`` false, no leader and no config. When a mirror has already lost
        its watch, etcd is not even tried."""
        ring = self._d.ring.entries.get(self._d.keys.ring())
        response = controlplane_pb2.GetClusterStatusResponse(
            cluster=self._d.keys.cluster,
            served_by=self._d.replica_id,
            ring_version=ring.version if ring else 0,
        )
        mirrors = (self._d.nodes, self._d.assignments, self._d.ring)
        config: common_pb2.ClusterConfig | None = None
        for mirror in mirrors:
            if not mirror.healthy:
                response.warnings.append(
                    f"this replica's {mirror.name} mirror is not following etcd: "
                    f"{mirror.unhealthy_reason or 'starting'}"
                )
        if all(c.healthy for c in mirrors):

            async def read_etcd() -> tuple[
                common_pb2.ClusterConfig, NodeListing, LeaderInfo | None, list[str]
            ]:
                async def alarms() -> list[str]:
                    # Best effort: with etcd auth, reading alarms takes the root role,
                    # which the control plane's user need not have.
                    try:
                        return await self._d.store.alarms()
                    except BlueMarbleError:
                        return []

                (config, _), listing, leader, raised = await asyncio.gather(
                    self._d.config.get(), self._d.registry.read_nodes(), self._d.election.current_leader(), alarms()
                )
                return config, listing, leader, raised

            try:
                config, listing, leader, alarms = await run_with_timeout(
                    self._d.clock, read_etcd(), STATUS_ETCD_TIMEOUT_S
                )
                response.warnings.extend(_alarm_warning(alarm) for alarm in alarms)
                nodes, revision = listing.nodes, listing.revision
                response.warnings.extend(_unreadable_node_warnings(listing.unreadable))
            except (Unavailable, TimeoutError):
                config = None
        if config is None:
            nodes = list(self._d.nodes.entries.values())
            response.warnings.extend(_unreadable_node_warnings(
                [UnreadableNode(key, r.mod_revision, -1, r.error) for key, r in self._d.nodes.unreadable.items()]))
            response.etcd_healthy = False
            response.etcd_revision = self._d.nodes.revision
            response.warnings.append(
                f"etcd is unreachable from replica {self._d.replica_id}: figures come from its "
                f"mirrors (revision {self._d.nodes.revision}) and may be stale; leader and config unknown"
            )
        else:
            response.config.CopyFrom(config)
            response.leader = leader.replica_id if leader else ""
            response.etcd_revision = revision
            response.etcd_healthy = True
        live = {n.node_id for n in nodes}
        leases = {n.node_id: n.lease_id for n in nodes}
        shard_count = len(ring.shard_ids) if ring else response.config.shard_count
        assignments = list(self._d.assignments.entries.values())
        missing = max(0, shard_count - len(assignments))
        response.node_count = len(nodes)
        response.shard_count = shard_count
        response.shards_without_primary = sum(1 for a in assignments if not holds_role(a, a.primary, leases)) + missing
        eligible = sum(1 for n in nodes if n.state != common_pb2.NODE_STATE_DRAINING)
        if nodes and not eligible:
            # Placement ignores the drains then (there is nowhere to go): every live node
            # keeps holding copies, and no drain can finish.
            eligible = len(nodes)
            response.warnings.append(
                f"every live node ({len(nodes)}) is draining: no drain can finish, there is nowhere to move the "
                "copies; add nodes, or undrain one (bluemarblectl undrain NODE)"
            )
        response.live_nodes_eligible = eligible
        if config is not None:
            wanted = config.replication_factor
            response.effective_replication_factor = min(wanted, eligible)
            response.shards_under_replicated = missing + sum(
                1 for a in assignments
                if holds_role(a, a.primary, leases) + sum(holds_role(a, r, leases) for r in a.replicas) < wanted
            )
            if wanted > eligible:
                response.warnings.append(
                    f"replication_factor is {wanted} but only {eligible} live nodes are eligible: "
                    f"shards have at most {eligible} copies until more nodes join"
                )
            if response.shards_under_replicated:
                response.warnings.append(
                    f"{response.shards_under_replicated} of {shard_count} shards have fewer than "
                    f"{wanted} live copies"
                )
            alone = sum(1 for a in assignments
                        if holds_role(a, a.primary, leases) and not any(holds_role(a, r, leases) for r in a.replicas))
            if wanted == 1:
                response.warnings.append(SINGLE_COPY_WARNING)
            if wanted >= 2 and alone:
                response.warnings.append(
                    f"{alone} of {shard_count} shards have no live replica: their primary alone acknowledges "
                    "STRONG writes (they would not survive its loss) until a replica is placed and caught up"
                )
        if response.shards_without_primary:
            response.warnings.append(
                f"{response.shards_without_primary} of {shard_count} shards have no live primary"
                + _lost_members(assignments, leases)
            )
        now_ms = self._d.clock.wall_ms()
        for n in sorted((n for n in nodes if n.trouble), key=_node_id)[:MAX_TROUBLE_WARNINGS]:
            led = sum(1 for a in assignments if a.primary == n.node_id)
            response.warnings.append(
                f"node {n.node_id} reports: {n.trouble} (for {max(0, now_ms - n.trouble_since_ms) / 1000:.0f} s); "
                f"the writes and trades of the {led} shard(s) it leads fail meanwhile"
            )
        if config is not None:  # etcd answers: the nodes, and a leader elsewhere, are worth asking too
            copies, silent_leader = await asyncio.gather(
                self._copy_warnings(assignments, live, shard_count), self._leader_warning(leader))
            response.warnings.extend(copies)
            if silent_leader:
                response.warnings.append(silent_leader)
        response.warnings.extend(self._forced_warnings())
        response.warnings.extend(self._d.refusals.warnings(self._d.replica_id))
        hold = self._d.placement_hold()
        if hold:
            response.warnings.append(f"the leader holds placement moves while nodes come back: {hold}")
        return response

    def _forced_warnings(self) -> list[str]:
        """One warning per ForcePromote request still waiting for the leader (at most
        :data:`MAX_TROUBLE_WARNINGS`, by shard): an operator whose promote timed out sees
        it stands, and how it ends."""
        if self._d.forced is None:
            return []
        waiting: list[tuple[int, str, str]] = []
        for key, request in self._d.forced.entries.items():
            try:
                shard = self._d.keys.parse_force_promotion(key)
                waiting.append((shard_index(shard), shard, request.node_id))
            except ValueError:  # not a key the control plane wrote: the leader ignores it too
                continue
        return [
            f"a ForcePromote of {shard} to {echo(node, 40)} waits for the leader: it acts once the shard's live "
            "nodes answered its fence; a node coming back with the shard's data ends it, and another promote of "
            "the shard replaces it"
            for _, shard, node in sorted(waiting)[:MAX_TROUBLE_WARNINGS]
        ]

    # ---- config ----

    async def GetConfig(
        self, request: controlplane_pb2.GetConfigRequest, context: Ctx
    ) -> controlplane_pb2.GetConfigResponse:
        config, revision = await self._d.config.get()
        return controlplane_pb2.GetConfigResponse(config=config, revision=revision)

    async def SetConfig(
        self, request: controlplane_pb2.SetConfigRequest, context: Ctx
    ) -> controlplane_pb2.SetConfigResponse:
        await self._d.auth.admin(context, "SetConfig")
        if request.expected_revision < 0:
            raise InvalidArgument(
                f"expected_revision is {request.expected_revision}; give the revision GetConfig returned (0: any)"
            )
        try:
            before: common_pb2.ClusterConfig | None = (await self._d.config.get())[0]
        except CorruptRecord:  # edited by hand: a whole valid config replaces it (ConfigStore.set)
            before = None
        config, revision = await self._d.config.set(request.config, request.expected_revision)
        response = controlplane_pb2.SetConfigResponse(config=config, revision=revision)
        if before is None:
            response.warnings.append("the stored config was unreadable; this one replaced it whole")
            before = config  # nothing to compare with
        if config.lease_ttl_s != before.lease_ttl_s:
            response.warnings.append(
                f"lease_ttl_s {before.lease_ttl_s} -> {config.lease_ttl_s} applies to leases granted from now on: "
                "registered nodes keep their TTL until they register again"
            )
        removed = sorted(set(before.consistency) - set(config.consistency))
        if removed:
            response.warnings.append(
                f"game systems removed: {', '.join(removed)}; players' data under them stays stored but cannot be "
                "read or written until they are added back"
            )
        if config.replication_factor == 1 and before.replication_factor != 1:
            response.warnings.append(SINGLE_COPY_WARNING)
        eligible = sum(1 for n in self._d.nodes.entries.values() if n.state != common_pb2.NODE_STATE_DRAINING)
        if config.replication_factor > eligible:
            response.warnings.append(
                f"replication_factor is {config.replication_factor} but only {eligible} live nodes are "
                f"eligible: shards have at most {eligible} copies until more nodes join"
            )
        return response

    async def ForcePromote(
        self, request: controlplane_pb2.ForcePromoteRequest, context: Ctx
    ) -> controlplane_pb2.ForcePromoteResponse:
        """Records the request under ``force-promote/<shard>`` for the leader, which acts
        on it only for a shard left without a primary because no live node holds its data
        (Reconciler), then waits for the assignment to name the node."""
        await self._d.auth.admin(context, "ForcePromote")
        node = validation.node_id(request.node_id)
        try:
            shard = ShardId(request.shard_id)
            shard_index(shard)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        ring = self._d.ring.entries.get(self._d.keys.ring())
        if ring is None or shard not in ring.shard_ids:
            raise NotFound(f"{shard} is not a shard of the ring")
        before = self._d.assignments.entries.get(self._d.keys.assignment(shard))
        if before is None:
            raise NotFound(f"{shard} has no assignment yet: it gets a primary as soon as a node can take one")
        live = {n.node_id: n for n in self._d.nodes.entries.values()}
        target = live.get(node)
        if target is None:
            raise NotFound(f"node {node} is not registered; name a live node (bluemarblectl nodes)")
        if target.state == common_pb2.NODE_STATE_DRAINING:
            raise FailedPrecondition(f"node {node} is draining; name another node")
        leases = {n: record.lease_id for n, record in live.items()}
        if before.primary == node and holds_role(before, node, leases):  # done already (a retry that worked)
            return controlplane_pb2.ForcePromoteResponse(assignment=before, already_primary=True)
        if holds_role(before, before.primary, leases):
            # A primary registered again since (a restart) lost the role: the leader treats
            # the shard as without one, and may be waiting for an operator's word.
            raise FailedPrecondition(
                f"{shard} has a primary, {before.primary} at epoch {before.epoch}; nothing to force"
            )
        if not request.accept_data_loss:
            raise FailedPrecondition(
                f"{shard} would get whatever {node} holds, and lose what only its lost nodes held; "
                "set accept_data_loss to go ahead (bringing a lost node back with its data dir loses nothing)"
            )
        refusal = await self._empty_target(shard, node, before, live)
        if refusal is not None:
            raise FailedPrecondition(refusal)
        await self._d.store.put(
            self._d.keys.force_promotion(shard),
            codec.encode(controlplane_pb2.ForcePromoteRequest(shard_id=shard, node_id=node, accept_data_loss=True)),
        )
        wait_s = min(FORCE_PROMOTE_WAIT_S, max(0.0, (context.time_remaining() or FORCE_PROMOTE_WAIT_S) - 0.2))
        deadline_s = self._d.clock.monotonic_s() + wait_s
        while True:
            now = self._d.assignments.entries.get(self._d.keys.assignment(shard))
            if now is not None and now.epoch > before.epoch and now.primary:
                if now.primary != node:
                    raise FailedPrecondition(
                        f"{shard} got another primary meanwhile, {now.primary} at epoch {now.epoch} (it held data)"
                    )
                lost = [n for n in dict.fromkeys((before.primary, *before.replicas, *before.retained))
                        if n and n != node and n not in live]
                return controlplane_pb2.ForcePromoteResponse(assignment=now, lost_members=lost)
            remaining_s = deadline_s - self._d.clock.monotonic_s()
            if remaining_s <= 0:
                raise DeadlineExceeded(
                    f"{shard} has no primary yet; the request stays until the leader acts on it "
                    "(it does once the shard's live nodes answered its fence): bluemarblectl status lists it"
                )
            await self._d.assignments.wait_for_revision(self._d.assignments.revision + 1, remaining_s)

    async def _empty_target(
        self, shard: ShardId, node: str, before: common_pb2.Assignment, live: dict[str, common_pb2.Node]
    ) -> str | None:
        """Why ForcePromote refuses ``node``: it answers that it holds no copy of ``shard``
        (an empty data dir, or never a member) while another live member holds one, so
        promoting it would lose that copy too (the leader would not: it keeps waiting).
        None when it holds a copy, does not answer (the leader's fence decides), or no
        live member holds one (then it takes over with nothing, as asked)."""
        if self._d.probe is None:
            return None
        asked = [n for n in dict.fromkeys((node, before.primary, *before.replicas, *before.retained)) if n in live]
        answers = await self._d.probe.statuses({NodeId(n): live[n].address for n in asked})

        def holds(n: str) -> bool:
            copies = answers[NodeId(n)].shards
            return any(s.shard_id == shard and (s.last_epoch, s.applied_lsn) > (0, 0) for s in copies)

        if NodeId(node) not in answers or holds(node):
            return None
        holding = sorted(n for n in asked if n != node and NodeId(n) in answers and holds(n))
        if not holding:
            return None
        return (f"{node} holds no copy of {shard}, and promoting it would also lose what {', '.join(holding)} "
                "hold; name one of those (bluemarblectl shards)")


FORCE_PROMOTE_WAIT_S = 15.0
"""How long ForcePromote waits for the assignment to name the node (less if the call's
deadline is nearer)."""

MIN_PROGRESS_INTERVAL_MS = 500
MAX_PROGRESS_INTERVAL_MS = 60_000


def _progress_interval_s(interval_ms: int) -> float | None:
    """The progress interval a WatchAssignments / WatchRing caller asked for
    (``progress_interval_ms``), in seconds clamped to 500 ms .. 60 s, or None for none.

    A stream that has sent nothing for that long gets a progress message: an empty change
    (for WatchRing, a Ring without shards). A replica stopped with SIGSTOP keeps its
    sockets open, so its streams neither deliver nor fail; with progress messages, a
    client that hears nothing for a few intervals knows the replica is gone (the node
    agent and the ring router ask for 1 s and give up after 3 s). Opt-in, so that clients
    that take every message for a change (grpcurl, older clients) see the stream they
    always saw.
    """
    if interval_ms == 0:
        return None
    return min(max(interval_ms, MIN_PROGRESS_INTERVAL_MS), MAX_PROGRESS_INTERVAL_MS) / 1000


_Item = TypeVar("_Item")


class _Progress:
    """When a watch stream owes its caller a progress message (see
    :func:`_progress_interval_s`): ``interval_s`` after the last message it sent."""

    def __init__(self, clock: Clock, interval_ms: int):
        self._clock = clock
        self.interval_s = _progress_interval_s(interval_ms)
        self._last_sent_s = clock.monotonic_s()

    def due_in_s(self) -> float:
        if self.interval_s is None:  # the caller asked for no progress messages
            return float("inf")
        return self._last_sent_s + self.interval_s - self._clock.monotonic_s()

    def sent(self) -> None:
        self._last_sent_s = self._clock.monotonic_s()

    def interleave(self, updates: AsyncIterator[_Item]) -> AsyncIterator[_Item | None]:
        """``updates`` with a None wherever a progress message is due; ``updates`` itself
        when the caller asked for none (no extra generator on the fan-out's hot path)."""
        if self.interval_s is None:
            return updates
        return _with_progress(updates, self._clock, self.due_in_s, self.interval_s)


async def _with_progress(
    updates: AsyncIterator[_Item],
    clock: Clock,
    progress_due_in_s: Callable[[], float],
    interval_s: float | None,
) -> AsyncIterator[_Item | None]:
    """The items of ``updates`` as they come, and None whenever ``progress_due_in_s()``
    (asked before each wait) elapses on ``clock`` without one: the caller's cue to send a
    progress message. Only the items when ``interval_s`` is None. Closes ``updates`` when
    the caller stops iterating."""
    pending: asyncio.Future[_Item] | None = None
    try:
        if interval_s is None:
            async for item in updates:
                yield item
            return
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(updates))
            timer = asyncio.ensure_future(clock.sleep(progress_due_in_s()))
            try:
                await asyncio.wait((pending, timer), return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()
            if not pending.done():
                yield None
                continue
            done, pending = pending, None
            try:
                item = done.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            # Cancelling the pending read ends the subscription (its own finally runs).
            pending.cancel()
            try:
                await pending
            except (asyncio.CancelledError, StopAsyncIteration):
                pass
        aclose = getattr(updates, "aclose", None)
        if aclose is not None:
            await aclose()
