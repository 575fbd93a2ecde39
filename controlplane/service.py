"""gRPC servicers of the control plane: thin translations between protobuf and logic.

Each method validates its input (through :mod:`bluemarble.validation`), calls the
registry or stores, and builds the response. Errors are BlueMarble exceptions; the
server interceptor maps them to statuses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc.aio

from bluemarble.clock import Clock
from bluemarble.errors import Unimplemented
from bluemarble.v1 import common_pb2, controlplane_pb2, controlplane_pb2_grpc, trade_pb2, trade_pb2_grpc
from controlplane.config_store import ConfigStore
from controlplane.etcd import EtcdStore
from controlplane.keys import KeySchema
from controlplane.registry import NodeRegistry

Ctx = grpc.aio.ServicerContext


@dataclass
class ControlPlaneDeps:
    """What every servicer of one control-plane replica shares."""

    replica_id: str
    keys: KeySchema
    store: EtcdStore
    registry: NodeRegistry
    config: ConfigStore
    clock: Clock


def _later(rpc: str, step: str) -> Unimplemented:
    return Unimplemented(f"{rpc} is not implemented in this release; it comes with {step}")


class ControlPlaneService(controlplane_pb2_grpc.ControlPlaneServicer):
    def __init__(self, deps: ControlPlaneDeps):
        self._d = deps

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
        ttl_s = await self._d.registry.heartbeat(request.node_id, request.lease_id)
        return controlplane_pb2.HeartbeatResponse(
            lease_deadline_ms=self._d.clock.wall_ms() + ttl_s * 1000, ttl_ms=ttl_s * 1000
        )

    async def DeregisterNode(
        self, request: controlplane_pb2.DeregisterNodeRequest, context: Ctx
    ) -> controlplane_pb2.DeregisterNodeResponse:
        await self._d.registry.deregister(request.node_id, request.lease_id)
        return controlplane_pb2.DeregisterNodeResponse()

    async def ListNodes(
        self, request: controlplane_pb2.ListNodesRequest, context: Ctx
    ) -> controlplane_pb2.ListNodesResponse:
        nodes, revision = await self._d.registry.list_nodes()
        return controlplane_pb2.ListNodesResponse(nodes=nodes, revision=revision)

    async def GetClusterStatus(
        self, request: controlplane_pb2.GetClusterStatusRequest, context: Ctx
    ) -> controlplane_pb2.GetClusterStatusResponse:
        config, _ = await self._d.config.get()
        nodes, revision = await self._d.registry.list_nodes()
        return controlplane_pb2.GetClusterStatusResponse(
            cluster=self._d.keys.cluster,
            served_by=self._d.replica_id,
            node_count=len(nodes),
            shard_count=config.shard_count,
            etcd_revision=revision,
            etcd_healthy=True,
            config=config,
        )

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

    # ---- later roadmap steps ----

    async def WatchAssignments(
        self, request: controlplane_pb2.WatchAssignmentsRequest, context: Ctx
    ) -> AsyncIterator[controlplane_pb2.WatchAssignmentsResponse]:
        raise _later("WatchAssignments", "ring and placement (roadmap step 2)")
        yield  # pragma: no cover - makes this an async generator

    async def GetRing(self, request: controlplane_pb2.GetRingRequest, context: Ctx) -> common_pb2.Ring:
        raise _later("GetRing", "ring and placement (roadmap step 2)")

    async def WatchRing(
        self, request: controlplane_pb2.WatchRingRequest, context: Ctx
    ) -> AsyncIterator[common_pb2.Ring]:
        raise _later("WatchRing", "ring and placement (roadmap step 2)")
        yield  # pragma: no cover

    async def ResolvePlayer(
        self, request: controlplane_pb2.ResolvePlayerRequest, context: Ctx
    ) -> controlplane_pb2.ResolvePlayerResponse:
        raise _later("ResolvePlayer", "ring and placement (roadmap step 2)")

    async def ListAssignments(
        self, request: controlplane_pb2.ListAssignmentsRequest, context: Ctx
    ) -> controlplane_pb2.ListAssignmentsResponse:
        raise _later("ListAssignments", "ring and placement (roadmap step 2)")

    async def DrainNode(
        self, request: controlplane_pb2.DrainNodeRequest, context: Ctx
    ) -> controlplane_pb2.DrainNodeResponse:
        raise _later("DrainNode", "ring and placement (roadmap step 2)")


class TradeCoordinatorService(trade_pb2_grpc.TradeCoordinatorServicer):
    async def ExecuteTrade(
        self, request: trade_pb2.ExecuteTradeRequest, context: Ctx
    ) -> trade_pb2.ExecuteTradeResponse:
        raise _later("ExecuteTrade", "cross-shard trades (roadmap step 4)")

    async def GetTrade(self, request: trade_pb2.GetTradeRequest, context: Ctx) -> trade_pb2.GetTradeResponse:
        raise _later("GetTrade", "cross-shard trades (roadmap step 4)")



