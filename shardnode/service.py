"""gRPC servicer of a shard node. Inventories, 2PC and replication arrive with the data
plane (roadmap steps 3 and 4); until then those RPCs answer UNIMPLEMENTED."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc.aio

from bluemarble.core.errors import Unimplemented
from bluemarble.v1 import common_pb2, shardnode_pb2, shardnode_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]


def _later(rpc: str, step: str = "the data plane (roadmap step 3)") -> Unimplemented:
    return Unimplemented(f"{rpc} is not implemented in this release; it comes with {step}")


class ShardNodeService(shardnode_pb2_grpc.ShardNodeServicer):
    def __init__(self, node_id: str, statuses: Callable[[], list[common_pb2.ShardStatus]]):
        self._node_id = node_id
        self._statuses = statuses

    async def GetShardStatus(
        self, request: shardnode_pb2.GetShardStatusRequest, context: Ctx
    ) -> shardnode_pb2.GetShardStatusResponse:
        """What this node holds right now, with each shard's applied log position."""
        return shardnode_pb2.GetShardStatusResponse(node_id=self._node_id, shards=self._statuses())

    async def GetInventory(
        self, request: shardnode_pb2.GetInventoryRequest, context: Ctx
    ) -> shardnode_pb2.GetInventoryResponse:
        raise _later("GetInventory")

    async def GrantItems(
        self, request: shardnode_pb2.GrantItemsRequest, context: Ctx
    ) -> shardnode_pb2.GrantItemsResponse:
        raise _later("GrantItems")

    async def Prepare(
        self, request: shardnode_pb2.PrepareRequest, context: Ctx
    ) -> shardnode_pb2.PrepareResponse:
        raise _later("Prepare", "cross-shard trades (roadmap step 4)")

    async def Commit(
        self, request: shardnode_pb2.CommitRequest, context: Ctx
    ) -> shardnode_pb2.CommitResponse:
        raise _later("Commit", "cross-shard trades (roadmap step 4)")

    async def Abort(
        self, request: shardnode_pb2.AbortRequest, context: Ctx
    ) -> shardnode_pb2.AbortResponse:
        raise _later("Abort", "cross-shard trades (roadmap step 4)")

    async def Replicate(
        self, request_iterator: AsyncIterator[shardnode_pb2.ReplicateBatch], context: Ctx
    ) -> AsyncIterator[shardnode_pb2.ReplicateAck]:
        raise _later("Replicate")
        yield  # pragma: no cover - makes this an async generator

    async def GetSnapshot(
        self, request: shardnode_pb2.GetSnapshotRequest, context: Ctx
    ) -> AsyncIterator[shardnode_pb2.SnapshotChunk]:
        raise _later("GetSnapshot")
        yield  # pragma: no cover - makes this an async generator
