"""gRPC servicer of a shard node: a thin mapping of ShardNode RPCs onto the
:class:`shardnode.dataplane.DataPlane` (which holds every rule). Trades (Prepare, Commit,
Abort, ExecuteLocalTrade, ListTrades) go to :class:`shardnode.participant.Participant`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc.aio

from bluemarble.core import validation
from bluemarble.core.errors import Unavailable
from bluemarble.core.trades import Outcome
from bluemarble.v1 import common_pb2, shardnode_pb2, shardnode_pb2_grpc
from shardnode.dataplane import DEFAULT_COMMIT_TIMEOUT_S, DataPlane
from shardnode.participant import Participant

Ctx = grpc.aio.ServicerContext[Any, Any]

MAX_CALL_TIMEOUT_S = 30.0


def _timeout_s(context: Ctx) -> float:
    """What is left of the caller's deadline (a default when it set none), minus a little
    so the answer reaches the caller before its deadline does."""
    remaining = context.time_remaining()
    if remaining is None:
        return DEFAULT_COMMIT_TIMEOUT_S
    return max(0.01, min(MAX_CALL_TIMEOUT_S, remaining - 0.05))


class ShardNodeService(shardnode_pb2_grpc.ShardNodeServicer):
    def __init__(
        self,
        node_id: str,
        statuses: Callable[[], list[common_pb2.ShardStatus]],
        dataplane: Callable[[], DataPlane | None] = lambda: None,
        incarnation: Callable[[], int] = lambda: 0,
        participant: Callable[[], Participant | None] = lambda: None,
    ):
        self._node_id = node_id
        self._statuses = statuses
        self._dataplane = dataplane
        self._incarnation = incarnation
        self._participant = participant

    def _dp(self) -> DataPlane:
        dp = self._dataplane()
        if dp is None:
            raise Unavailable(f"node {self._node_id} is starting; retry shortly")
        return dp

    def _trades(self) -> Participant:
        participant = self._participant()
        if participant is None:
            raise Unavailable(f"node {self._node_id} is starting; retry shortly")
        return participant

    async def GetShardStatus(
        self, request: shardnode_pb2.GetShardStatusRequest, context: Ctx
    ) -> shardnode_pb2.GetShardStatusResponse:
        """What this node holds right now: its roles, and shards it holds on disk only."""
        dp = self._dataplane()
        shards = dp.statuses(include_disk_only=True) if dp is not None else self._statuses()
        return shardnode_pb2.GetShardStatusResponse(
            node_id=self._node_id, shards=shards, incarnation=self._incarnation()
        )

    async def GetInventory(
        self, request: shardnode_pb2.GetInventoryRequest, context: Ctx
    ) -> shardnode_pb2.GetInventoryResponse:
        player = validation.player_id(request.player_id)
        return await self._dp().get_inventory(player, request.allow_stale, _timeout_s(context))

    async def GrantItems(
        self, request: shardnode_pb2.GrantItemsRequest, context: Ctx
    ) -> shardnode_pb2.GrantItemsResponse:
        return await self._dp().grant(request, _timeout_s(context))

    async def GetPlayerData(
        self, request: shardnode_pb2.GetPlayerDataRequest, context: Ctx
    ) -> shardnode_pb2.GetPlayerDataResponse:
        return await self._dp().get_player_data(request, _timeout_s(context))

    async def SetPlayerData(
        self, request: shardnode_pb2.SetPlayerDataRequest, context: Ctx
    ) -> shardnode_pb2.SetPlayerDataResponse:
        return await self._dp().set_player_data(request, _timeout_s(context))

    async def Fence(self, request: shardnode_pb2.FenceRequest, context: Ctx) -> shardnode_pb2.FenceResponse:
        return self._dp().fence(request)

    async def Replicate(
        self, request_iterator: AsyncIterator[shardnode_pb2.ReplicateBatch], context: Ctx
    ) -> AsyncIterator[shardnode_pb2.ReplicateAck]:
        dp = self._dp()
        async for batch in request_iterator:
            await dp.hold_if_failpoint()
            yield dp.replicate(batch)

    async def GetSnapshot(
        self, request: shardnode_pb2.GetSnapshotRequest, context: Ctx
    ) -> AsyncIterator[shardnode_pb2.SnapshotChunk]:
        for chunk in self._dp().snapshot_chunks(request):
            yield chunk

    async def Prepare(self, request: shardnode_pb2.PrepareRequest, context: Ctx) -> shardnode_pb2.PrepareResponse:
        return await self._trades().prepare(request, _timeout_s(context))

    async def Commit(self, request: shardnode_pb2.CommitRequest, context: Ctx) -> shardnode_pb2.CommitResponse:
        state = await self._trades().settle(
            request.trade_id, request.shard_id, request.epoch, Outcome.COMMITTED
        )
        return shardnode_pb2.CommitResponse(state=state)

    async def Abort(self, request: shardnode_pb2.AbortRequest, context: Ctx) -> shardnode_pb2.AbortResponse:
        state = await self._trades().settle(
            request.trade_id, request.shard_id, request.epoch, Outcome.ABORTED
        )
        return shardnode_pb2.AbortResponse(state=state)

    async def ExecuteLocalTrade(
        self, request: shardnode_pb2.ExecuteLocalTradeRequest, context: Ctx
    ) -> shardnode_pb2.ExecuteLocalTradeResponse:
        return await self._trades().execute_local_trade(request, _timeout_s(context))

    async def ListTrades(
        self, request: shardnode_pb2.ListTradesRequest, context: Ctx
    ) -> shardnode_pb2.ListTradesResponse:
        return self._trades().list_trades(request)
