"""TradeClient: one trade id retried with the same terms to its answer, across replicas,
within its deadline; final errors at once. Against small in-process TradeCoordinators on
127.0.0.1 (real gRPC, no cluster)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from bluemarble.client import trades as trades_module
from bluemarble.client.ring_router import RingRouter
from bluemarble.client.routing import AssignmentCache, ClientClosed, RoutingClient
from bluemarble.client.trades import TradeClient, TradeResult
from bluemarble.core import errors
from bluemarble.core.ids import PlayerId
from bluemarble.core.ring import initial_ring
from bluemarble.core.trades.model import AbortCause, Outcome
from bluemarble.runtime import multiplex
from bluemarble.runtime.grpc_server import ServiceBinding, build_server
from bluemarble.v1 import common_pb2, controlplane_pb2, shardnode_pb2, trade_pb2, trade_pb2_grpc
from scripts.localcluster import free_port
from tests.conftest import wait_for

Ctx = grpc.aio.ServicerContext[Any, Any]
Behaviour = Callable[[int], "tuple[grpc.StatusCode, str] | float | None"]
"""Attempt number (1-based, per server) -> a status to fail with, seconds to hang, or None (answer)."""


def answer_to(request: trade_pb2.ExecuteTradeRequest) -> trade_pb2.ExecuteTradeResponse:
    """COMMITTED; ABORTED for lack of an answer from a side for a trade id "unavailable-*"."""
    if request.trade_id.startswith("unavailable-"):
        return trade_pb2.ExecuteTradeResponse(
            trade_id=request.trade_id, outcome=common_pb2.TRADE_OUTCOME_ABORTED, cross_shard=True,
            reason="shard unavailable (side B: no answer to prepare)",
            abort_cause=common_pb2.TRADE_ABORT_CAUSE_UNAVAILABLE)
    return trade_pb2.ExecuteTradeResponse(
        trade_id=request.trade_id, outcome=common_pb2.TRADE_OUTCOME_COMMITTED, cross_shard=True)


class Coordinator(trade_pb2_grpc.TradeCoordinatorServicer):
    def __init__(self, behaviour: Behaviour):
        self.behaviour = behaviour
        self.requests: list[trade_pb2.ExecuteTradeRequest] = []

    async def ExecuteTrade(self, request: trade_pb2.ExecuteTradeRequest, context: Ctx
                           ) -> trade_pb2.ExecuteTradeResponse:
        self.requests.append(request)
        what = self.behaviour(len(self.requests))
        if isinstance(what, float):
            await asyncio.sleep(what)
        elif what is not None:
            await context.abort(*what)
        return answer_to(request)

    async def GetTrade(self, request: trade_pb2.GetTradeRequest, context: Ctx) -> trade_pb2.GetTradeResponse:
        if request.trade_id == "unknown":
            await context.abort(grpc.StatusCode.NOT_FOUND, "trade unknown is not known")
        return trade_pb2.GetTradeResponse(
            trade_id=request.trade_id, state=trade_pb2.TRADE_STATE_DONE, outcome=common_pb2.TRADE_OUTCOME_ABORTED,
            reason="player-b has 3 gold", decided_by="coordinator cp-0", cross_shard=True, retained=True,
            abort_cause=common_pb2.TRADE_ABORT_CAUSE_REFUSED,
            sides=[shardnode_pb2.ParticipantTrade(
                trade_id=request.trade_id, shard_id="shard-1", node_id="n1",
                state=shardnode_pb2.PARTICIPANT_TRADE_STATE_ABORTED, leg=shardnode_pb2.TradeLeg(player_id="a"))],
        )

    async def ListInDoubtTrades(self, request: trade_pb2.ListInDoubtTradesRequest, context: Ctx
                                ) -> trade_pb2.ListInDoubtTradesResponse:
        return trade_pb2.ListInDoubtTradesResponse(
            trades=[shardnode_pb2.ParticipantTrade(
                trade_id="t9", shard_id="shard-2", node_id="n2", state=shardnode_pb2.PARTICIPANT_TRADE_STATE_PREPARED,
                leg=shardnode_pb2.TradeLeg(player_id="b"), deadline_ms=1234)],
            unreachable_nodes=["n3"])


class StreamingCoordinator(Coordinator):
    """A coordinator that also serves ExecuteTrades (the client's first choice), each call
    behaving as :meth:`Coordinator.ExecuteTrade` does."""

    async def ExecuteTrades(self, request_iterator: Any, context: Ctx) -> Any:
        await context.send_initial_metadata(())

        async def handle(kind: str, request: trade_pb2.ExecuteTradeRequest, timeout_s: float) -> Any:
            self.requests.append(request)
            what = self.behaviour(len(self.requests))
            if isinstance(what, float):
                await asyncio.sleep(what)
            elif what is not None:
                raise errors.from_status_name(what[0].name, what[1])
            return answer_to(request)

        async def run(call: trade_pb2.TradeCall) -> trade_pb2.TradeResult:
            result: trade_pb2.TradeResult = await multiplex.answer_call(
                call, trade_pb2.TradeResult(call_id=call.call_id), service="bluemarble.v1.TradeCoordinator",
                rpcs={"execute_trade": "ExecuteTrade"}, handle=handle)
            return result

        async for message in multiplex.serve_calls(
            request_iterator, calls_of=lambda m: m.calls, run=run,
            results=lambda part: trade_pb2.TradeResults(results=part), what="a message",
        ):
            yield message


@pytest.fixture(params=["stream", "unary"])
async def start(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[Behaviour], Any]]:
    """Starts coordinators; "stream": they serve ExecuteTrades, which the client uses;
    "unary": they do not (an older release), and the client falls back to ExecuteTrade."""
    servers: list[Any] = []
    kind = StreamingCoordinator if request.param == "stream" else Coordinator

    async def run(behaviour: Behaviour) -> tuple[str, Coordinator]:
        servicer = kind(behaviour)
        server = await build_server("127.0.0.1:0", [ServiceBinding(
            trade_pb2.DESCRIPTOR.services_by_name["TradeCoordinator"].full_name, servicer,
            trade_pb2_grpc.add_TradeCoordinatorServicer_to_server)])
        servers.append(server)
        return f"127.0.0.1:{server.port}", servicer

    yield run
    for server in servers:
        await server.stop_gracefully(0.1)


def answer(_: int) -> None:
    return None


async def test_unavailable_is_retried_with_the_same_trade_id_and_terms(start: Any) -> None:
    address, coordinator = await start(lambda n: (grpc.StatusCode.UNAVAILABLE, "etcd unreachable") if n < 3 else None)
    async with TradeClient([address], retry_initial_s=0.01, retry_max_backoff_s=0.02) as client:
        result = await client.execute_trade("t1", "a", "b", a_items=["sword"], b_gold=7, deadline_s=5)
        streamed = isinstance(coordinator, StreamingCoordinator)
        assert [stream.supported for _, stream in client._streams.values()] == [streamed]
    assert result.outcome is Outcome.COMMITTED and result.committed and result.cross_shard
    assert result.attempts == 3
    assert len({r.SerializeToString() for r in coordinator.requests}) == 1, "every attempt sends the same request"
    assert coordinator.requests[0] == trade_pb2.ExecuteTradeRequest(
        trade_id="t1", player_a="a", player_b="b", a_gives=common_pb2.Offer(item_ids=["sword"]),
        b_gives=common_pb2.Offer(gold=7))


async def test_a_dead_replica_is_skipped_for_the_next_address(start: Any) -> None:
    address, coordinator = await start(answer)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: connection refused (UNAVAILABLE)
    async with TradeClient([dead, address], retry_initial_s=0.01, retry_max_backoff_s=0.02) as client:
        result = await client.execute_trade("t2", "a", "b", a_gold=1, deadline_s=5)
    assert result.attempts == 2 and len(coordinator.requests) == 1


async def test_a_hung_replica_costs_one_attempt_timeout_then_the_next_answers(start: Any) -> None:
    hung, _ = await start(lambda n: 5.0)
    address, coordinator = await start(answer)
    async with TradeClient([hung, address], attempt_timeout_s=0.3, retry_initial_s=0.01) as client:
        started = time.monotonic()
        result = await client.execute_trade("t3", "a", "b", a_gold=1, deadline_s=5)
    assert result.attempts == 2 and coordinator.requests[0].trade_id == "t3"
    assert time.monotonic() - started < 2.0


async def test_a_busy_replica_is_retried_on_the_next_address_but_an_oversized_message_is_final(start: Any) -> None:
    busy = "this server is running 16384 calls and streams at once (its limit); retry ExecuteTrade after a backoff"
    first, busy_one = await start(lambda n: (grpc.StatusCode.RESOURCE_EXHAUSTED, busy))
    second, free_one = await start(answer)
    async with TradeClient([first, second], retry_initial_s=0.01, retry_max_backoff_s=0.02) as client:
        result = await client.execute_trade("t5", "a", "b", a_gold=1, deadline_s=5)
    assert result.committed and len(busy_one.requests) == 1 and len(free_one.requests) == 1

    too_big = "Received message larger than max (9000000 vs. 4194304)"
    address, coordinator = await start(lambda n: (grpc.StatusCode.RESOURCE_EXHAUSTED, too_big))
    async with TradeClient([address], retry_initial_s=0.01, retry_max_backoff_s=0.02) as client:
        with pytest.raises(errors.ResourceExhausted, match="larger than max"):
            await client.execute_trade("t6", "a", "b", a_gold=1, deadline_s=5)
    assert len(coordinator.requests) == 1


async def test_final_statuses_are_raised_at_once(start: Any) -> None:
    address, coordinator = await start(
        lambda n: (grpc.StatusCode.INVALID_ARGUMENT, "trade id t4 was already used for a different trade"))
    async with TradeClient([address]) as client:
        with pytest.raises(errors.InvalidArgument, match="different trade"):
            await client.execute_trade("t4", "a", "b", a_gold=1)
    assert len(coordinator.requests) == 1


async def test_bad_terms_are_refused_before_anything_is_sent(start: Any) -> None:
    address, coordinator = await start(answer)
    async with TradeClient([address]) as client:
        with pytest.raises(errors.InvalidArgument):
            await client.execute_trade("t5", "a", "b")  # empty trade
        with pytest.raises(errors.InvalidArgument):
            await client.execute_trade("t6", "a", "a", a_gold=1)  # same player both sides
        with pytest.raises(errors.InvalidArgument):
            await client.execute_trade("t7", "a", "b", a_items=["x"], b_items=["x"])  # an item listed twice
        for deadline_s in (0.0, -1.0, float("nan"), 1e9):
            with pytest.raises(errors.InvalidArgument, match="deadline_s"):
                await client.execute_trade("t8", "a", "b", a_gold=1, deadline_s=deadline_s)
    assert coordinator.requests == []


async def test_the_deadline_bounds_the_retries(start: Any) -> None:
    address, coordinator = await start(lambda n: (grpc.StatusCode.UNAVAILABLE, "no primary for shard-3"))
    async with TradeClient([address], retry_initial_s=0.02, retry_max_backoff_s=0.1) as client:
        started = time.monotonic()
        with pytest.raises(errors.Unavailable, match="no primary"):
            await client.execute_trade("t8", "a", "b", a_gold=1, deadline_s=0.5)
        took_s = time.monotonic() - started
    assert 0.4 <= took_s < 1.5
    assert len(coordinator.requests) >= 3


async def test_a_silent_replica_is_hedged_on_the_next_one(start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A paused replica held each trade for the whole 10 s attempt while the other answered.
    monkeypatch.setattr(trades_module, "HEDGE_AFTER_S", 0.3)
    silent, first = await start(lambda n: 30.0)
    alive, second = await start(answer)
    async with TradeClient([silent, alive]) as client:
        started = time.monotonic()
        result = await client.execute_trade("t-hedge", "a", "b", a_gold=1, deadline_s=20)
        took_s = time.monotonic() - started
    assert result.committed and result.attempts == 1
    assert 0.3 <= took_s < 5.0, took_s
    assert [r.trade_id for r in first.requests] == ["t-hedge"] == [r.trade_id for r in second.requests]


async def test_a_deadline_shorter_than_an_attempt_holds(start: Any) -> None:
    # An attempt was never shorter than 50 ms, so a trade given 10 ms got this answer at 30.
    address, _ = await start(lambda n: 0.03)
    async with TradeClient([address]) as client:
        with pytest.raises(errors.DeadlineExceeded, match="outcome is unknown"):
            await client.execute_trade("t-short", "a", "b", a_gold=1, deadline_s=0.01)


async def test_the_deadline_error_names_the_trade_and_says_its_outcome_is_unknown(start: Any) -> None:
    address, _ = await start(lambda n: 5.0)  # every attempt hangs past its timeout
    async with TradeClient(address, attempt_timeout_s=0.2, retry_initial_s=0.01) as client:  # one string
        with pytest.raises(errors.DeadlineExceeded) as info:
            await client.execute_trade("t-late", "a", "b", a_gold=1, deadline_s=0.6)
    message = str(info.value)
    assert "t-late" in message and "outcome is unknown" in message and address in message
    assert info.value.request_id == "t-late"  # for callers that gather errors, as a grant's names its request id
    assert "a failover or an etcd outage delays it" in message  # not only "the control plane did not answer"


async def test_closing_the_client_fails_trades_in_flight_as_closed(start: Any) -> None:
    address, coordinator = await start(lambda n: 5.0)
    client = TradeClient([address])
    trades = [asyncio.ensure_future(client.execute_trade(f"t-c{i}", "a", "b", a_gold=1, deadline_s=20))
              for i in range(3)]

    async def all_sent() -> bool:
        return len(coordinator.requests) == 3

    await wait_for(all_sent, 5.0, "the three trades to reach the coordinator")
    await client.close()
    results = await asyncio.wait_for(asyncio.gather(*trades, return_exceptions=True), 5)
    # Not a bare CancelledError (a TaskGroup would take it for a cancellation), and final.
    assert all(isinstance(r, ClientClosed) for r in results), results
    assert all("retry it with the same trade id and terms on a new client" in str(r) for r in results)
    assert sorted(r.request_id for r in results) == ["t-c0", "t-c1", "t-c2"]  # type: ignore[union-attr]
    assert len(coordinator.requests) == 3  # nothing sent again
    with pytest.raises(ClientClosed) as after:
        await client.execute_trade("t-after", "a", "b", a_gold=1)
    assert "unknown outcome" not in str(after.value)  # nothing was sent: nothing in doubt
    assert len(coordinator.requests) == 3


async def test_an_aborted_answer_says_whether_the_terms_or_the_cluster_were_the_cause(start: Any) -> None:
    address, _ = await start(answer)
    async with TradeClient([address]) as client:
        committed = await client.execute_trade("t1", "a", "b", a_gold=1, deadline_s=5)
        unavailable = await client.execute_trade("unavailable-1", "a", "b", a_gold=1, deadline_s=5)
        shown = await client.get_trade("t2")
    assert (committed.abort_cause, committed.worth_retrying) == (AbortCause.UNKNOWN, False)
    assert (unavailable.outcome, unavailable.abort_cause) == (Outcome.ABORTED, AbortCause.UNAVAILABLE)
    assert unavailable.worth_retrying and "shard unavailable" in unavailable.reason
    assert (shown.outcome, shown.abort_cause) == (Outcome.ABORTED, AbortCause.REFUSED)


def test_only_a_refusal_of_the_terms_is_not_worth_retrying_under_a_new_id() -> None:
    def result(outcome: Outcome, cause: AbortCause) -> TradeResult:
        return TradeResult("t", outcome, "", True, 1, cause)

    assert [result(Outcome.ABORTED, c).worth_retrying for c in AbortCause] == [
        c in (AbortCause.UNAVAILABLE, AbortCause.CONTENDED) for c in AbortCause]
    assert not result(Outcome.COMMITTED, AbortCause.UNKNOWN).worth_retrying


async def test_aborted_status_is_retried_but_an_aborted_outcome_is_an_answer(start: Any) -> None:
    address, _ = await start(lambda n: (grpc.StatusCode.ABORTED, "lost a race") if n == 1 else None)
    async with TradeClient([address], retry_initial_s=0.01) as client:
        result = await client.execute_trade("t9", "a", "b", a_gold=1, deadline_s=5)
    assert result.attempts == 2


async def test_a_primary_that_moved_is_retried_but_other_preconditions_are_final(start: Any) -> None:
    moved = "ExecuteLocalTrade on shard-1 (node n4): node n4 is not the primary of shard-1; ask the control plane"
    address, coordinator = await start(lambda n: (grpc.StatusCode.FAILED_PRECONDITION, moved) if n == 1 else None)
    async with TradeClient([address], retry_initial_s=0.01) as client:
        assert (await client.execute_trade("t10", "a", "b", a_gold=1, deadline_s=5)).attempts == 2
    address, coordinator = await start(lambda n: (grpc.StatusCode.FAILED_PRECONDITION, "item x is already owned"))
    async with TradeClient([address], retry_initial_s=0.01) as client:
        with pytest.raises(errors.FailedPrecondition, match="already owned"):
            await client.execute_trade("t11", "a", "b", a_gold=1, deadline_s=5)
    assert len(coordinator.requests) == 1


@pytest.mark.parametrize("deadline", [None, "3", -1, 0, float("nan"), True])
async def test_get_trade_and_in_doubt_refuse_a_deadline_that_is_no_number_of_seconds(start: Any, deadline: Any) -> None:
    address, _ = await start(answer)
    async with TradeClient([address]) as client:
        with pytest.raises(errors.InvalidArgument, match="deadline_s"):
            await client.get_trade("t1", deadline_s=deadline)
        with pytest.raises(errors.InvalidArgument, match="deadline_s"):
            await client.in_doubt(deadline_s=deadline)  # (the fake answers both: no error, had they been sent)


async def test_get_trade_and_in_doubt_are_values(start: Any) -> None:
    address, _ = await start(answer)
    async with TradeClient([address]) as client:
        status = await client.get_trade("t1", player_id="a")
        assert status.state == "DONE" and status.outcome is Outcome.ABORTED and status.retained
        assert status.sides[0].state == "ABORTED" and status.sides[0].player_id == "a"
        with pytest.raises(errors.NotFound):
            await client.get_trade("unknown")
        doubt = await client.in_doubt()
        assert [(e.trade_id, e.state, e.deadline_ms) for e in doubt.escrows] == [("t9", "PREPARED", 1234)]
        assert doubt.unreachable_nodes == ("n3",)


# ---- with a routing client: same-shard trades straight to the primary ----

RING = initial_ring(4, 10)
A = "player-a"
MATE = next(p for p in (f"mate-{i}" for i in range(1000)) if RING.shard_for(PlayerId(p)) == RING.shard_for(PlayerId(A)))
FAR = next(p for p in (f"far-{i}" for i in range(1000)) if RING.shard_for(PlayerId(p)) != RING.shard_for(PlayerId(A)))


class Nodes:
    """A fake node transport: ExecuteLocalTrade answers ``answer`` (a response or an error)."""

    def __init__(self, answer: Any):
        self.answer = answer
        self.requests: list[shardnode_pb2.ExecuteLocalTradeRequest] = []

    async def execute_local_trade(self, address: str, request: shardnode_pb2.ExecuteLocalTradeRequest,
                                  timeout_s: float) -> shardnode_pb2.ExecuteLocalTradeResponse:
        self.requests.append(request)
        if isinstance(self.answer, BaseException):
            raise self.answer
        assert isinstance(self.answer, shardnode_pb2.ExecuteLocalTradeResponse)
        return self.answer

    def retain(self, addresses: Any) -> None:
        pass

    async def close(self) -> None:
        pass


def routing_client(nodes: Nodes) -> RoutingClient:
    cache = AssignmentCache()
    cache.apply(controlplane_pb2.WatchAssignmentsResponse(
        revision=1, snapshot=True,
        assignments=[common_pb2.Assignment(shard_id=s, epoch=3, primary="n1") for s in RING.shard_ids],
        nodes=[common_pb2.NodeRef(node_id="n1", address="127.0.0.1:1")]))
    return RoutingClient(None, router=RingRouter.from_ring(RING), assignments=cache, transport=nodes)  # type: ignore[arg-type]


async def test_with_routing_a_same_shard_trade_skips_the_coordinator(start: Any) -> None:
    address, coordinator = await start(answer)
    nodes = Nodes(shardnode_pb2.ExecuteLocalTradeResponse(trade_id="t1", outcome=common_pb2.TRADE_OUTCOME_COMMITTED))
    async with TradeClient([address], routing=routing_client(nodes)) as client:
        result = await client.execute_trade("t1", A, MATE, a_items=["sword"], b_gold=7, deadline_s=5)
    assert (result.outcome, result.cross_shard, result.attempts) == (Outcome.COMMITTED, False, 1)
    assert coordinator.requests == []
    [request] = nodes.requests
    assert (request.trade_id, request.player_a, request.player_b, request.epoch) == ("t1", A, MATE, 3)


async def test_with_routing_a_cross_shard_trade_goes_to_the_coordinator(start: Any) -> None:
    address, coordinator = await start(answer)
    nodes = Nodes(AssertionError("a cross-shard trade reached a node"))
    async with TradeClient([address], routing=routing_client(nodes)) as client:
        result = await client.execute_trade("t2", A, FAR, a_items=["sword"], b_gold=7, deadline_s=5)
    assert result.cross_shard and [r.trade_id for r in coordinator.requests] == ["t2"] and nodes.requests == []


async def test_with_routing_a_primary_whose_ring_puts_them_apart_hands_the_trade_to_the_coordinator(
        start: Any) -> None:
    address, coordinator = await start(answer)
    nodes = Nodes(errors.FailedPrecondition(f"players {A} (shard-0) and {MATE} (shard-3) are on different shards; "
                                            "use TradeCoordinator.ExecuteTrade"))
    async with TradeClient([address], routing=routing_client(nodes)) as client:
        result = await client.execute_trade("t3", A, MATE, a_gold=1, b_items=["gem"], deadline_s=5)
    assert len(nodes.requests) == 1 and [r.trade_id for r in coordinator.requests] == ["t3"]
    assert result.cross_shard and result.committed


async def test_with_routing_final_errors_of_the_primary_are_raised(start: Any) -> None:
    address, coordinator = await start(answer)
    nodes = Nodes(errors.InvalidArgument("trade id t4: trade id reused with different terms"))
    async with TradeClient([address], routing=routing_client(nodes)) as client:
        with pytest.raises(errors.InvalidArgument, match="reused"):
            await client.execute_trade("t4", A, MATE, a_gold=1, deadline_s=5)
    assert coordinator.requests == []


async def test_items_given_as_an_iterator_are_sent_as_given(start: Any) -> None:
    """The terms are read once: an iterator of items, used up by the checks, still sends them."""
    address, coordinator = await start(answer)
    nodes = Nodes(shardnode_pb2.ExecuteLocalTradeResponse(trade_id="t1", outcome=common_pb2.TRADE_OUTCOME_COMMITTED))
    async with TradeClient([address], routing=routing_client(nodes)) as client:
        await client.execute_trade("t1", A, MATE, a_items=(i for i in ["sword"]), b_items=iter(["gem"]), deadline_s=5)
        await client.execute_trade("t2", A, FAR, a_items=(i for i in ["axe"]), b_items=iter(["bow"]), deadline_s=5)
    [local] = nodes.requests
    assert (list(local.a_gives.item_ids), list(local.b_gives.item_ids)) == (["sword"], ["gem"])
    [cross] = coordinator.requests
    assert (list(cross.a_gives.item_ids), list(cross.b_gives.item_ids)) == (["axe"], ["bow"])


async def test_a_trade_client_used_from_another_event_loop_says_so_at_once(start: Any) -> None:
    address, coordinator = await start(answer)
    async with TradeClient([address]) as client:
        await client.execute_trade("t1", "a", "b", a_gold=1, deadline_s=5)

        def elsewhere() -> BaseException | None:
            try:
                asyncio.run(client.execute_trade("t2", "a", "b", a_gold=1, deadline_s=30))
            except BaseException as e:  # returned to the test
                return e
            return None

        started = time.monotonic()
        raised = await asyncio.to_thread(elsewhere)
        assert isinstance(raised, errors.FailedPrecondition) and "event loop" in str(raised), raised
        assert time.monotonic() - started < 5
    assert [r.trade_id for r in coordinator.requests] == ["t1"]


@pytest.mark.parametrize(("call", "message"), [
    (lambda c: c.get_trade(5), "trade_id is a int"),
    (lambda c: c.get_trade("t\ud800"), "lone surrogate"),
    (lambda c: c.get_trade("t1", player_id=None), "player_id is a NoneType"),
    (lambda c: c.in_doubt(0), "limit is 0; give 1..1000"),
    (lambda c: c.in_doubt(2**40), "give 1..1000"),
    (lambda c: c.execute_trade("t1", "a", "b", a_items=None, b_gold=1), "a_items is a NoneType"),
    (lambda c: c.execute_trade("t\ud800", "a", "b", a_gold=1), "lone surrogate"),
    (lambda c: c.execute_trade("t1", "a", "b", a_items=["x\udcff"]), "lone surrogate"),
])
async def test_bad_arguments_are_invalid_argument_before_anything_is_sent(
    start: Any, call: Callable[[TradeClient], Any], message: str
) -> None:
    address, coordinator = await start(answer)
    async with TradeClient([address]) as client:
        with pytest.raises(errors.InvalidArgument, match=message):
            await call(client)
    assert coordinator.requests == []
