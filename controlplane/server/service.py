"""gRPC servicers of the control plane: thin translations between protobuf and logic.

Each method validates its input (through :mod:`bluemarble.core.validation`), calls the
registry or stores, and builds the response. Errors are BlueMarble exceptions; the
server interceptor maps them to statuses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc.aio

from bluemarble.api.conversions import ring_to_proto
from bluemarble.core import validation
from bluemarble.core.errors import InvalidArgument, Unavailable, Unimplemented
from bluemarble.core.ids import NodeId, ShardId, shard_index
from bluemarble.core.ring import Ring
from bluemarble.runtime.clock import Clock
from bluemarble.v1 import common_pb2, controlplane_pb2, controlplane_pb2_grpc, trade_pb2, trade_pb2_grpc
from controlplane.server.election import Election
from controlplane.server.registry import NodeRegistry
from controlplane.store.config_store import ConfigStore
from controlplane.store.etcd import EtcdStore
from controlplane.store.keys import KeySchema
from controlplane.store.watchcache import PrefixCache

Ctx = grpc.aio.ServicerContext[Any, Any]


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


MAX_SHARD_STATUSES = 4096


def _later(rpc: str, step: str) -> Unimplemented:
    return Unimplemented(f"{rpc} is not implemented in this release; it comes with {step}")


class ControlPlaneService(controlplane_pb2_grpc.ControlPlaneServicer):
    def __init__(self, deps: ControlPlaneDeps):
        self._d = deps

    # ---- node lifecycle ----

    async def RegisterNode(
        self, request: controlplane_pb2.RegisterNodeRequest, context: Ctx
    ) -> controlplane_pb2.RegisterNodeResponse:
        config, _ = await self._d.config.get()
        lease_id, ttl_s = await self._d.registry.register(
            request.node_id,
            request.address,
            request.region,
            request.zone,
            request.capacity,
            config.lease_ttl_s,
        )
        return controlplane_pb2.RegisterNodeResponse(
            lease_id=lease_id,
            ttl_ms=ttl_s * 1000,
            heartbeat_interval_ms=max(ttl_s * 1000 // 3, 100),
        )

    async def Heartbeat(
        self, request: controlplane_pb2.HeartbeatRequest, context: Ctx
    ) -> controlplane_pb2.HeartbeatResponse:
        return await self._heartbeat(request)

    async def HeartbeatStream(
        self, request_iterator: AsyncIterator[controlplane_pb2.HeartbeatRequest], context: Ctx
    ) -> AsyncIterator[controlplane_pb2.HeartbeatResponse]:
        async for request in request_iterator:
            yield await self._heartbeat(request)

    async def _heartbeat(self, request: controlplane_pb2.HeartbeatRequest) -> controlplane_pb2.HeartbeatResponse:
        if len(request.shards) > MAX_SHARD_STATUSES:
            raise InvalidArgument(
                f"heartbeat reports {len(request.shards)} shards; at most {MAX_SHARD_STATUSES}"
            )
        for status in request.shards:
            try:
                shard_index(ShardId(status.shard_id))
            except ValueError as e:
                raise InvalidArgument(f"heartbeat shard status: {e}") from e
        ttl_s = await self._d.registry.heartbeat(request.node_id, request.lease_id)
        record = self._d.nodes.entries.get(self._d.keys.node(NodeId(request.node_id)))
        return controlplane_pb2.HeartbeatResponse(
            lease_deadline_ms=self._d.clock.wall_ms() + ttl_s * 1000,
            ttl_ms=ttl_s * 1000,
            draining=record is not None and record.state == common_pb2.NODE_STATE_DRAINING,
        )

    async def DeregisterNode(
        self, request: controlplane_pb2.DeregisterNodeRequest, context: Ctx
    ) -> controlplane_pb2.DeregisterNodeResponse:
        await self._d.registry.deregister(request.node_id, request.lease_id)
        return controlplane_pb2.DeregisterNodeResponse()

    async def DrainNode(
        self, request: controlplane_pb2.DrainNodeRequest, context: Ctx
    ) -> controlplane_pb2.DrainNodeResponse:
        node = await self._d.registry.drain(request.node_id)
        return controlplane_pb2.DrainNodeResponse(node=node)

    # ---- reads ----

    async def ListNodes(
        self, request: controlplane_pb2.ListNodesRequest, context: Ctx
    ) -> controlplane_pb2.ListNodesResponse:
        nodes, revision = await self._d.registry.list_nodes()
        return controlplane_pb2.ListNodesResponse(nodes=nodes, revision=revision)

    def _sorted_assignments(self) -> list[common_pb2.Assignment]:
        return sorted(self._d.assignments.entries.values(), key=lambda a: shard_index(ShardId(a.shard_id)))

    async def ListAssignments(
        self, request: controlplane_pb2.ListAssignmentsRequest, context: Ctx
    ) -> controlplane_pb2.ListAssignmentsResponse:
        self._require_fresh(self._d.assignments)
        return controlplane_pb2.ListAssignmentsResponse(
            revision=self._d.assignments.revision, assignments=self._sorted_assignments()
        )

    def _ring_now(self) -> Ring:
        ring = self._d.ring.entries.get(self._d.keys.ring())
        if ring is None:
            raise Unavailable("the ring is not loaded yet; retry shortly")
        return ring

    async def GetRing(self, request: controlplane_pb2.GetRingRequest, context: Ctx) -> common_pb2.Ring:
        return ring_to_proto(self._ring_now())

    async def WatchRing(
        self, request: controlplane_pb2.WatchRingRequest, context: Ctx
    ) -> AsyncIterator[common_pb2.Ring]:
        key = self._d.keys.ring()
        async for update in self._d.ring.subscribe():
            ring = update.changed.get(key)
            if ring is not None:
                yield ring_to_proto(ring)

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
        node = validation.node_id(request.node_id) if request.node_id else None
        if request.start_revision < 0:
            raise InvalidArgument("start_revision must be >= 0")
        sent: set[str] = set()  # shards this stream has told the watcher about
        async for update in self._d.assignments.subscribe():
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
            if update.snapshot or response.assignments or response.removed_shard_ids:
                yield response

    async def GetClusterStatus(
        self, request: controlplane_pb2.GetClusterStatusRequest, context: Ctx
    ) -> controlplane_pb2.GetClusterStatusResponse:
        """A summary that still answers while etcd is unreachable: then it is built from
        this replica's mirrors (possibly stale), with ``etcd_healthy`` false and no leader."""
        ring = self._d.ring.entries.get(self._d.keys.ring())
        response = controlplane_pb2.GetClusterStatusResponse(
            cluster=self._d.keys.cluster,
            served_by=self._d.replica_id,
            ring_version=ring.version if ring else 0,
        )
        try:
            config, _ = await self._d.config.get()
            nodes, revision = await self._d.registry.list_nodes()
            leader = await self._d.election.current_leader()
        except Unavailable:
            nodes = list(self._d.nodes.entries.values())
            response.etcd_healthy = False
            response.etcd_revision = self._d.nodes.revision
        else:
            response.config.CopyFrom(config)
            response.leader = leader.replica_id if leader else ""
            response.etcd_revision = revision
            response.etcd_healthy = all(
                c.healthy for c in (self._d.nodes, self._d.assignments, self._d.ring)
            )
        live = {n.node_id for n in nodes}
        shard_count = len(ring.shard_ids) if ring else response.config.shard_count
        assignments = list(self._d.assignments.entries.values())
        response.node_count = len(nodes)
        response.shard_count = shard_count
        response.shards_without_primary = sum(1 for a in assignments if a.primary not in live) + max(
            0, shard_count - len(assignments)
        )
        return response

    def _require_fresh(self, cache: PrefixCache[common_pb2.Assignment]) -> None:
        if not cache.healthy:
            raise Unavailable(f"this replica lost its watch on etcd ({cache.name}); retry another")

    # ---- config ----

    async def GetConfig(
        self, request: controlplane_pb2.GetConfigRequest, context: Ctx
    ) -> controlplane_pb2.GetConfigResponse:
        config, revision = await self._d.config.get()
        return controlplane_pb2.GetConfigResponse(config=config, revision=revision)

    async def SetConfig(
        self, request: controlplane_pb2.SetConfigRequest, context: Ctx
    ) -> controlplane_pb2.SetConfigResponse:
        config, revision = await self._d.config.set(request.config, request.expected_revision)
        return controlplane_pb2.SetConfigResponse(config=config, revision=revision)


class TradeCoordinatorService(trade_pb2_grpc.TradeCoordinatorServicer):
    async def ExecuteTrade(
        self, request: trade_pb2.ExecuteTradeRequest, context: Ctx
    ) -> trade_pb2.ExecuteTradeResponse:
        raise _later("ExecuteTrade", "cross-shard trades (roadmap step 4)")

    async def GetTrade(self, request: trade_pb2.GetTradeRequest, context: Ctx) -> trade_pb2.GetTradeResponse:
        raise _later("GetTrade", "cross-shard trades (roadmap step 4)")



