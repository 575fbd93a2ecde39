"""gRPC servicer of a shard node: a thin mapping of ShardNode RPCs onto the
:class:`shardnode.dataplane.DataPlane` (which holds every rule). Trades (Prepare, Commit,
Abort, their TradeBatch, ExecuteLocalTrade, ListTrades) go to
:class:`shardnode.participant.Participant`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import structlog

from bluemarble.api.messages import NODE_CALL_RPCS, SHUTTING_DOWN_KEY
from bluemarble.core import limits, validation
from bluemarble.core.errors import InvalidArgument, PermissionDenied, Unavailable
from bluemarble.core.limits import echo
from bluemarble.core.trades import Outcome
from bluemarble.runtime import frames, multiplex
from bluemarble.runtime.auth import COORDINATOR_CALLS, ClusterPeers, deny_other_node
from bluemarble.v1 import common_pb2, shardnode_pb2, shardnode_pb2_grpc
from shardnode.dataplane import DEFAULT_COMMIT_TIMEOUT_S, DataPlane
from shardnode.participant import Participant

log = structlog.get_logger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]

MAX_CALL_TIMEOUT_S = multiplex.MAX_CALL_WORK_S


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
        peers: ClusterPeers | None = None,
        frames_port: Callable[[], int] = lambda: 0,
    ):
        self._node_id = node_id
        self._frames_port = frames_port
        self._peers = peers or ClusterPeers((), lambda _: True, enabled=False)
        self._statuses = statuses
        self._dataplane = dataplane
        self._incarnation = incarnation
        self._participant = participant
        self._closing = asyncio.Event()

    def close_streams(self) -> None:
        """Shutting down: every Calls stream stops taking calls, answers those in flight
        and ends UNAVAILABLE, so its caller sends the rest elsewhere at once instead of
        to a node that is going away (a stream would otherwise hold the server's
        graceful stop open for its whole grace period). Replicate streams end
        UNAVAILABLE too, between two batches, rather than being cut by the stop."""
        self._closing.set()

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
        reason = dp.not_ready_reason() if dp is not None else "starting"
        return shardnode_pb2.GetShardStatusResponse(
            node_id=self._node_id, shards=shards, incarnation=self._incarnation(), ready=not reason,
            not_ready_reason=reason,
        )

    async def GetInventory(
        self, request: shardnode_pb2.GetInventoryRequest, context: Ctx
    ) -> shardnode_pb2.GetInventoryResponse:
        response: shardnode_pb2.GetInventoryResponse = await self._answer("get_inventory", request, _timeout_s(context))
        return response

    async def GrantItems(
        self, request: shardnode_pb2.GrantItemsRequest, context: Ctx
    ) -> shardnode_pb2.GrantItemsResponse:
        response: shardnode_pb2.GrantItemsResponse = await self._answer("grant_items", request, _timeout_s(context))
        return response

    async def TakeItems(
        self, request: shardnode_pb2.TakeItemsRequest, context: Ctx
    ) -> shardnode_pb2.TakeItemsResponse:
        response: shardnode_pb2.TakeItemsResponse = await self._answer("take_items", request, _timeout_s(context))
        return response

    async def GetPlayerData(
        self, request: shardnode_pb2.GetPlayerDataRequest, context: Ctx
    ) -> shardnode_pb2.GetPlayerDataResponse:
        response: shardnode_pb2.GetPlayerDataResponse = await self._answer(
            "get_player_data", request, _timeout_s(context)
        )
        return response

    async def SetPlayerData(
        self, request: shardnode_pb2.SetPlayerDataRequest, context: Ctx
    ) -> shardnode_pb2.SetPlayerDataResponse:
        response: shardnode_pb2.SetPlayerDataResponse = await self._answer(
            "set_player_data", request, _timeout_s(context)
        )
        return response

    async def Fence(self, request: shardnode_pb2.FenceRequest, context: Ctx) -> shardnode_pb2.FenceResponse:
        await self._peers.require_control_plane(context, "Fence")
        return self._dp().fence(request)

    async def Replicate(
        self, request_iterator: AsyncIterator[shardnode_pb2.ReplicateBatch], context: Ctx
    ) -> AsyncIterator[shardnode_pb2.ReplicateAck]:
        await self._peers.require_node(context, "Replicate")
        await context.send_initial_metadata(self._offer())
        names = self._peers.acting_for(context)
        dp = self._dp()
        closer = asyncio.get_running_loop().create_task(self._end_when_closing(context))
        try:
            async for batch in request_iterator:
                if names is not None and batch.primary not in names:
                    # A node ships only its own log: another node's name would let it
                    # speak for that shard's primary.
                    await deny_other_node(context, "Replicate", batch.primary, names,
                                          f"Replicate as primary {echo(batch.primary, 128)}",
                                          "a node replicates only as itself")
                await dp.hold_if_failpoint()
                yield dp.replicate(batch)
        finally:
            closer.cancel()

    def _offer(self) -> tuple[tuple[str, str], ...]:
        """The initial metadata of a Calls or Replicate stream: this node's framed port,
        when it serves one (bluemarble.runtime.frames)."""
        port = self._frames_port()
        return ((frames.PORT_KEY, str(port)),) if port else ()

    async def _end_when_closing(self, context: Ctx) -> None:
        """Ends the stream of ``context`` UNAVAILABLE once :meth:`close_streams` is called.
        From its own task: the stream's handler may be waiting for its next message."""
        await self._closing.wait()
        log.debug("replication stream closed: shutting down", peer=context.peer())
        with contextlib.suppress(Exception):  # grpc.aio's AbortError: the status is sent
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"node {self._node_id} is shutting down",
                                trailing_metadata=((SHUTTING_DOWN_KEY, "1"),))

    async def Calls(
        self, request_iterator: AsyncIterator[shardnode_pb2.NodeCalls], context: Ctx
    ) -> AsyncIterator[shardnode_pb2.NodeResults]:
        """Player calls multiplexed on one stream (see the proto). Each runs as its own
        task, as its unary RPC would; results finished in the same loop turn share a
        message. The stream ends when the caller half-closes it and every call answered."""
        # At once, so the caller knows the stream is served before it sends a call (and
        # whether it may carry the calls on this node's framed port instead).
        await context.send_initial_metadata(self._offer())
        coordinator = self._peers.is_control_plane(context)

        async def run(call: shardnode_pb2.NodeCall) -> shardnode_pb2.NodeResult:
            return await self._node_call(call, context if not coordinator else None)

        async for message in multiplex.serve_calls(
            request_iterator, calls_of=lambda m: m.calls, run=run,
            results=lambda part: shardnode_pb2.NodeResults(results=part), closing=self._closing,
            what="a Calls message",
        ):
            yield message
        if self._closing.is_set():  # expected at every shutdown: no warning, unlike a failed call
            log.debug("calls stream closed: shutting down", peer=context.peer())
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"node {self._node_id} is shutting down; send its calls to the shard's new primary",
            )

    async def _node_call(self, call: shardnode_pb2.NodeCall, outsider: Ctx | None = None) -> shardnode_pb2.NodeResult:
        """One call of a Calls stream, answered as its unary RPC would be: its response, or
        the status that RPC would have ended with. ``outsider``: the stream's context when
        its caller is not the control plane (its coordinator calls are refused)."""

        def guard(kind: str, method: str) -> None:
            if outsider is not None and kind in COORDINATOR_CALLS:
                raise PermissionDenied(self._peers.refusal(outsider, method, "the control plane"))

        result: shardnode_pb2.NodeResult = await multiplex.answer_call(
            call, shardnode_pb2.NodeResult(call_id=call.call_id), service="bluemarble.v1.ShardNode",
            rpcs=NODE_CALL_RPCS, handle=self._answer, guard=guard, server="node")
        return result

    async def _answer(self, kind: str, request: Any, timeout_s: float) -> Any:
        """The response of the RPC a NodeCall or TradeBatchItem field ``kind`` stands for,
        exactly as that RPC answers ``request``."""
        if kind == "get_inventory":
            player = validation.player_id(request.player_id)
            return await self._dp().get_inventory(player, request.allow_stale, timeout_s)
        if kind == "grant_items":
            return await self._dp().grant(request, timeout_s)
        if kind == "take_items":
            return await self._dp().take(request, timeout_s)
        if kind == "get_player_data":
            return await self._dp().get_player_data(request, timeout_s)
        if kind == "set_player_data":
            return await self._dp().set_player_data(request, timeout_s)
        if kind == "execute_local_trade":
            return await self._trades().execute_local_trade(request, timeout_s)
        if kind == "prepare":
            return await self._trades().prepare(request, timeout_s)
        if kind == "commit":
            return shardnode_pb2.CommitResponse(state=await self._settle(request, Outcome.COMMITTED))
        if kind == "abort":
            return shardnode_pb2.AbortResponse(state=await self._settle(request, Outcome.ABORTED))
        raise AssertionError(f"no RPC for call kind {kind!r}")

    async def GetSnapshot(
        self, request: shardnode_pb2.GetSnapshotRequest, context: Ctx
    ) -> AsyncIterator[shardnode_pb2.SnapshotChunk]:
        await self._peers.require_node(context, "GetSnapshot")
        dp = self._dp()
        async with dp.serving_snapshot():
            async for chunk in dp.snapshot_chunks(request):
                yield chunk

    async def GetEntries(
        self, request: shardnode_pb2.GetEntriesRequest, context: Ctx
    ) -> shardnode_pb2.GetEntriesResponse:
        await self._peers.require_node(context, "GetEntries")
        return self._dp().entries_after(request)

    async def Prepare(self, request: shardnode_pb2.PrepareRequest, context: Ctx) -> shardnode_pb2.PrepareResponse:
        await self._peers.require_control_plane(context, "Prepare")
        response: shardnode_pb2.PrepareResponse = await self._answer("prepare", request, _timeout_s(context))
        return response

    async def Commit(self, request: shardnode_pb2.CommitRequest, context: Ctx) -> shardnode_pb2.CommitResponse:
        await self._peers.require_control_plane(context, "Commit")
        response: shardnode_pb2.CommitResponse = await self._answer("commit", request, _timeout_s(context))
        return response

    async def Abort(self, request: shardnode_pb2.AbortRequest, context: Ctx) -> shardnode_pb2.AbortResponse:
        await self._peers.require_control_plane(context, "Abort")
        response: shardnode_pb2.AbortResponse = await self._answer("abort", request, _timeout_s(context))
        return response

    async def _settle(
        self, request: shardnode_pb2.CommitRequest | shardnode_pb2.AbortRequest, outcome: Outcome
    ) -> shardnode_pb2.ParticipantTradeState:
        return await self._trades().settle(request.trade_id, request.shard_id, request.epoch, outcome)

    async def TradeBatch(
        self, request: shardnode_pb2.TradeBatchRequest, context: Ctx
    ) -> shardnode_pb2.TradeBatchResponse:
        await self._peers.require_control_plane(context, "TradeBatch")
        if not request.items:
            raise InvalidArgument("a trade batch needs at least one item (prepare, commit or abort)")
        if len(request.items) > limits.MAX_TRADE_BATCH_ITEMS:
            raise InvalidArgument(
                f"a trade batch carries {len(request.items)} items; send at most {limits.MAX_TRADE_BATCH_ITEMS}"
            )
        timeout_s = _timeout_s(context)
        # Concurrently, as separate calls would be: the items' writes share one group
        # commit and one replication round, which is the point of batching them.
        results = await asyncio.gather(*(self._batch_item(item, timeout_s) for item in request.items))
        return shardnode_pb2.TradeBatchResponse(results=results)

    async def _batch_item(
        self, item: shardnode_pb2.TradeBatchItem, timeout_s: float
    ) -> shardnode_pb2.TradeBatchResult:
        """One item's answer; its error (as the item's own call would have ended) too."""
        kind = item.WhichOneof("call")
        try:
            if kind is None:
                raise InvalidArgument("a trade batch item carries no call; set prepare, commit or abort")
            result = shardnode_pb2.TradeBatchResult()
            getattr(result, kind).CopyFrom(await self._answer(kind, getattr(item, kind), timeout_s))
            return result
        except Exception as e:  # the status the item's own call would have ended with; the others unharmed
            code, message = multiplex.error_of(e, f"a TradeBatch {kind}", "node")
            return shardnode_pb2.TradeBatchResult(error=shardnode_pb2.TradeBatchError(code=code, message=message))

    async def ExecuteLocalTrade(
        self, request: shardnode_pb2.ExecuteLocalTradeRequest, context: Ctx
    ) -> shardnode_pb2.ExecuteLocalTradeResponse:
        response: shardnode_pb2.ExecuteLocalTradeResponse = await self._answer(
            "execute_local_trade", request, _timeout_s(context)
        )
        return response

    async def ListTrades(
        self, request: shardnode_pb2.ListTradesRequest, context: Ctx
    ) -> shardnode_pb2.ListTradesResponse:
        return self._trades().list_trades(request)


