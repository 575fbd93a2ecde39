"""A server's limit of calls and streams at once (CallBudget): past it a call is refused
RESOURCE_EXHAUSTED with a message saying what to do, health and reflection still answer,
and a freed slot takes the next call. Real gRPC on 127.0.0.1, no cluster."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bluemarble.core import errors
from bluemarble.runtime.grpc_server import ServiceBinding, build_server
from bluemarble.v1 import common_pb2, trade_pb2, trade_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]


class HeldCoordinator(trade_pb2_grpc.TradeCoordinatorServicer):
    """ExecuteTrade waits for ``release``; ExecuteTrades holds its stream open until the
    client ends it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def ExecuteTrade(self, request: trade_pb2.ExecuteTradeRequest, context: Ctx
                           ) -> trade_pb2.ExecuteTradeResponse:
        self.started += 1
        await self.release.wait()
        return trade_pb2.ExecuteTradeResponse(trade_id=request.trade_id, outcome=common_pb2.TRADE_OUTCOME_COMMITTED)

    async def ExecuteTrades(self, request_iterator: Any, context: Ctx) -> Any:
        self.started += 1
        async for _ in request_iterator:
            pass
        if False:  # an async generator that yields nothing
            yield trade_pb2.TradeResults()


async def test_calls_past_the_limit_are_refused_until_a_slot_frees() -> None:
    servicer = HeldCoordinator()
    server = await build_server("127.0.0.1:0", [ServiceBinding(
        trade_pb2.DESCRIPTOR.services_by_name["TradeCoordinator"].full_name, servicer,
        trade_pb2_grpc.add_TradeCoordinatorServicer_to_server)], max_concurrent_rpcs=2)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = trade_pb2_grpc.TradeCoordinatorStub(channel)  # type: ignore[no-untyped-call]
            request = trade_pb2.ExecuteTradeRequest(trade_id="t1", player_a="a", player_b="b")
            held = asyncio.ensure_future(stub.ExecuteTrade(request, timeout=30))
            stream = stub.ExecuteTrades()  # a stream holds a slot as long as it is open
            await stream.write(trade_pb2.TradeCalls())
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while servicer.started < 2:
                assert loop.time() < deadline, "the two calls never started"
                await asyncio.sleep(0.01)

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ExecuteTrade(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = refused.value.details() or ""
            assert "running 2 calls and streams at once (its limit)" in details and "ExecuteTrade" in details
            assert errors.is_overload(errors.ResourceExhausted(details))
            assert server.budget.refused == 1 and server.budget.active == 2

            health = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING

            stream.cancel()
            servicer.release.set()
            assert (await held).trade_id == "t1"
            deadline = loop.time() + 10
            while server.budget.active:  # the stream's slot comes back once the server sees the cancel
                assert loop.time() < deadline, server.budget.active
                await asyncio.sleep(0.01)
            again = await stub.ExecuteTrade(trade_pb2.ExecuteTradeRequest(trade_id="t2"), timeout=10)
            assert again.trade_id == "t2" and server.budget.active == 0
    finally:
        await server.stop_gracefully(0.1)


def test_an_oversized_message_is_not_an_overload() -> None:
    assert not errors.is_overload(errors.ResourceExhausted("Received message larger than max (9000000 vs. 4194304)"))
    assert not errors.is_overload(errors.Unavailable("node down"))
