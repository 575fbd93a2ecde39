"""The coordinator's per-node batching of Prepare/Commit/Abort (controlplane.server.trade_batch),
against a stand-in stub (the adapter boundary): alone a call stays a unary RPC; calls that
pile up behind the in-flight limit travel in one TradeBatch, each with its own answer."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest

from bluemarble.v1 import shardnode_pb2
from controlplane.server.trade_batch import ItemFailed, NodeBatcher


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class Stub:
    """Answers Prepare PREPARED (REFUSED for trade ids starting with "bad"), holds calls
    until ``release`` is set, and records what it was sent."""

    def __init__(self, *, batch_unimplemented: bool = False):
        self.release = asyncio.Event()
        self.release.set()
        self.sent: list[tuple[str, list[str]]] = []
        self.batch_unimplemented = batch_unimplemented

    def _prepared(self, request: shardnode_pb2.PrepareRequest) -> shardnode_pb2.PrepareResponse:
        refused = request.trade_id.startswith("bad")
        vote = shardnode_pb2.TRADE_VOTE_REFUSED if refused else shardnode_pb2.TRADE_VOTE_PREPARED
        return shardnode_pb2.PrepareResponse(vote=vote)

    async def Prepare(self, request: shardnode_pb2.PrepareRequest, timeout: float) -> Any:  # noqa: ASYNC109 (the stub's API)
        self.sent.append(("Prepare", [request.trade_id]))
        await self.release.wait()
        if request.trade_id.startswith("moved"):
            raise _rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "node n1 is not the primary of s-1")
        return self._prepared(request)

    async def Commit(self, request: shardnode_pb2.CommitRequest, timeout: float) -> Any:  # noqa: ASYNC109 (the stub's API)
        self.sent.append(("Commit", [request.trade_id]))
        await self.release.wait()
        return shardnode_pb2.CommitResponse(state=shardnode_pb2.PARTICIPANT_TRADE_STATE_COMMITTED)

    async def TradeBatch(self, request: shardnode_pb2.TradeBatchRequest, timeout: float) -> Any:  # noqa: ASYNC109 (the stub's API)
        self.sent.append(("TradeBatch", [getattr(i, i.WhichOneof("call")).trade_id for i in request.items]))
        if self.batch_unimplemented:
            raise _rpc_error(grpc.StatusCode.UNIMPLEMENTED, "Method not found")
        await self.release.wait()
        results = []
        for item in request.items:
            if item.WhichOneof("call") == "prepare":
                if item.prepare.trade_id.startswith("moved"):
                    error = shardnode_pb2.TradeBatchError(code="FAILED_PRECONDITION", message="not the primary")
                    results.append(shardnode_pb2.TradeBatchResult(error=error))
                else:
                    results.append(shardnode_pb2.TradeBatchResult(prepare=self._prepared(item.prepare)))
            else:
                state = shardnode_pb2.PARTICIPANT_TRADE_STATE_COMMITTED
                results.append(shardnode_pb2.TradeBatchResult(commit=shardnode_pb2.CommitResponse(state=state)))
        return shardnode_pb2.TradeBatchResponse(results=results)


def prepare(trade_id: str) -> shardnode_pb2.PrepareRequest:
    return shardnode_pb2.PrepareRequest(trade_id=trade_id, shard_id="s-1")


async def test_a_lone_call_is_its_own_unary_rpc() -> None:
    stub = Stub()
    batcher = NodeBatcher(lambda: stub)  # type: ignore[arg-type,return-value]
    answer = await batcher.prepare(prepare("t1"), 1.0)
    assert answer.vote == shardnode_pb2.TRADE_VOTE_PREPARED
    commit = await batcher.commit(shardnode_pb2.CommitRequest(trade_id="t1", shard_id="s-1"), 1.0)
    assert commit.state == shardnode_pb2.PARTICIPANT_TRADE_STATE_COMMITTED
    assert stub.sent == [("Prepare", ["t1"]), ("Commit", ["t1"])]
    assert batcher.batched_items == 0


async def _slot_held(timeout_s: float) -> tuple[Stub, NodeBatcher, asyncio.Future[shardnode_pb2.PrepareResponse]]:
    """A batcher with one slot, held by call t0 (its answer waits for ``stub.release``)."""
    stub = Stub()
    stub.release.clear()
    batcher = NodeBatcher(lambda: stub, max_in_flight=1)  # type: ignore[arg-type,return-value]
    first = asyncio.ensure_future(batcher.prepare(prepare("t0"), timeout_s))
    await asyncio.sleep(0)  # the pump runs: t0 goes out alone and holds the only slot
    await asyncio.sleep(0)
    return stub, batcher, first


async def test_calls_behind_the_in_flight_limit_travel_together_each_with_its_answer() -> None:
    stub, batcher, first = await _slot_held(2.0)
    rest = [asyncio.ensure_future(batcher.prepare(prepare(t), 2.0)) for t in ("t1", "bad2", "moved3", "t4")]
    await asyncio.sleep(0)
    assert stub.sent == [("Prepare", ["t0"])]  # the others wait for the slot
    stub.release.set()
    assert (await first).vote == shardnode_pb2.TRADE_VOTE_PREPARED
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert stub.sent[1] == ("TradeBatch", ["t1", "bad2", "moved3", "t4"])
    prepared, refused = results[0], results[1]
    assert isinstance(prepared, shardnode_pb2.PrepareResponse) and prepared.vote == shardnode_pb2.TRADE_VOTE_PREPARED
    assert isinstance(refused, shardnode_pb2.PrepareResponse) and refused.vote == shardnode_pb2.TRADE_VOTE_REFUSED
    assert isinstance(results[2], ItemFailed) and results[2].code == "FAILED_PRECONDITION"
    assert isinstance(results[3], shardnode_pb2.PrepareResponse)
    assert batcher.calls == 2 and batcher.batched_items == 4


async def test_an_item_whose_time_ran_out_in_the_queue_is_not_sent() -> None:
    stub, batcher, first = await _slot_held(5.0)
    with pytest.raises(TimeoutError):
        await batcher.prepare(prepare("late"), 0.05)
    stub.release.set()
    await first
    await batcher.close()
    assert [name for name, ids in stub.sent if "late" in ids] == []


async def test_a_node_without_trade_batch_gets_the_calls_one_by_one() -> None:
    stub = Stub(batch_unimplemented=True)
    batcher = NodeBatcher(lambda: stub, max_in_flight=1)  # type: ignore[arg-type,return-value]
    calls = [asyncio.ensure_future(batcher.prepare(prepare(f"t{i}"), 2.0)) for i in range(3)]
    # The three were made in one loop turn: they go together, are refused, then go alone.
    answers = await asyncio.gather(*calls)
    assert all(a.vote == shardnode_pb2.TRADE_VOTE_PREPARED for a in answers)
    assert stub.sent[0] == ("TradeBatch", ["t0", "t1", "t2"])
    assert sorted(stub.sent[1:]) == [("Prepare", ["t0"]), ("Prepare", ["t1"]), ("Prepare", ["t2"])]
