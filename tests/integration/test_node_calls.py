"""ShardNode.Calls, the stream the routing client multiplexes player calls on, against a
real shard node (agent, storage, data plane, server in this process), a real control plane
and etcd: each call is answered as its unary RPC would be, one call's error leaves the
others and the stream alone, malformed streams end with a clear status, and the client's
:class:`~bluemarble.client.node_calls.CallStream` maps results, opens a new stream after a
break and falls back to unary calls for a node that does not serve Calls."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from bluemarble.api.messages import SHUTTING_DOWN_KEY
from bluemarble.client.node_calls import CallStream
from bluemarble.client.routing import GrpcNodeTransport
from bluemarble.core import errors, limits
from bluemarble.runtime.grpc_server import ServiceBinding, build_server
from bluemarble.v1 import shardnode_pb2, shardnode_pb2_grpc
from shardnode.dataplane import DataPlane
from shardnode.service import ShardNodeService
from tests.conftest import StartControlPlane
from tests.integration.test_data_plane_input import data_node, grant

pytestmark = pytest.mark.integration


def calls(*items: shardnode_pb2.NodeCall) -> shardnode_pb2.NodeCalls:
    return shardnode_pb2.NodeCalls(calls=list(items))


async def collect(stream: grpc.aio.StreamStreamCall, expected: int) -> dict[int, shardnode_pb2.NodeResult]:
    results: dict[int, shardnode_pb2.NodeResult] = {}
    async for message in stream:
        for result in message.results:
            assert result.call_id not in results, "a call answered twice"
            results[result.call_id] = result
        if len(results) >= expected:
            break
    return results


async def test_calls_in_one_message_are_answered_as_their_unary_rpcs_each_with_its_own_status(
    start_control_plane: StartControlPlane, tmp_path: Path
) -> None:
    async with data_node(start_control_plane, tmp_path) as (stub, _):
        stream = stub.Calls()
        await stream.write(calls(
            shardnode_pb2.NodeCall(call_id=1, timeout_ms=5000, grant_items=grant()),
            shardnode_pb2.NodeCall(call_id=2, timeout_ms=5000, grant_items=grant(request_id="g2", item_ids=["a", "a"])),
            shardnode_pb2.NodeCall(call_id=3, timeout_ms=5000,
                                   get_inventory=shardnode_pb2.GetInventoryRequest(player_id="nobody")),
            shardnode_pb2.NodeCall(call_id=4),  # no request at all
            shardnode_pb2.NodeCall(call_id=5, set_player_data=shardnode_pb2.SetPlayerDataRequest(
                request_id="d1", player_id="alice", system="guild", key="name", value=b"owls")),
            shardnode_pb2.NodeCall(call_id=9, timeout_ms=2**32 - 1, get_inventory=shardnode_pb2.GetInventoryRequest(
                player_id="alice")),
        ))  # fmt: skip
        first = await collect(stream, 6)
        assert set(first) == {1, 2, 3, 4, 5, 9}
        assert first[9].error.code == "INVALID_ARGUMENT" and "timeout_ms 4294967295" in first[9].error.message
        assert list(first[1].grant_items.inventory.item_ids) == ["sword"] and not first[1].grant_items.replayed
        assert (first[2].error.code, "lists item 'a' twice" in first[2].error.message) == ("INVALID_ARGUMENT", True)
        assert first[3].error.code == "NOT_FOUND" and "nobody" in first[3].error.message
        assert first[4].error.code == "INVALID_ARGUMENT" and "carries no request" in first[4].error.message
        assert first[5].set_player_data.lsn > 0
        # The stream goes on after those errors: a retry is a replay, the reads see the writes.
        await stream.write(calls(
            shardnode_pb2.NodeCall(call_id=6, grant_items=grant()),
            shardnode_pb2.NodeCall(call_id=7, get_inventory=shardnode_pb2.GetInventoryRequest(player_id="alice")),
            shardnode_pb2.NodeCall(call_id=8, get_player_data=shardnode_pb2.GetPlayerDataRequest(
                player_id="alice", system="guild", key="name")),
        ))  # fmt: skip
        second = await collect(stream, 3)
        assert second[6].grant_items.replayed and second[6].grant_items.lsn == first[1].grant_items.lsn
        assert (list(second[7].get_inventory.item_ids), second[7].get_inventory.gold) == (["sword"], 5)
        assert second[8].get_player_data.found and second[8].get_player_data.value == b"owls"
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK  # half-closed and every call answered: ends OK


async def test_a_message_over_the_limit_ends_the_stream_with_invalid_argument(
    start_control_plane: StartControlPlane, tmp_path: Path
) -> None:
    async with data_node(start_control_plane, tmp_path) as (stub, dp):
        stream = stub.Calls()
        too_many = [shardnode_pb2.NodeCall(call_id=n) for n in range(limits.MAX_NODE_CALLS_PER_MESSAGE + 1)]
        await stream.write(calls(*too_many))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stream:
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 256 per message" in (info.value.details() or "")
        # Undecodable bytes end it the same way, with a message saying what was wrong.
        raw = grpc.aio.insecure_channel(_address_of(dp))
        try:
            bad = raw.stream_stream("/bluemarble.v1.ShardNode/Calls", None, None)()
            await bad.write(b"\x0a\xff")  # field 1, a length running past the end
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in bad:
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid" in (info.value.details() or "")
        finally:
            await raw.close(None)


async def test_a_repeated_call_id_ends_the_stream_after_the_calls_taken_before_it_are_answered(
    start_control_plane: StartControlPlane, tmp_path: Path
) -> None:
    async with data_node(start_control_plane, tmp_path) as (stub, _):
        stream = stub.Calls()
        await stream.write(calls(shardnode_pb2.NodeCall(call_id=1, timeout_ms=5000, grant_items=grant())))
        await stream.write(calls(
            shardnode_pb2.NodeCall(call_id=2, get_inventory=shardnode_pb2.GetInventoryRequest(player_id="alice")),
            shardnode_pb2.NodeCall(call_id=2, get_inventory=shardnode_pb2.GetInventoryRequest(player_id="bob")),
        ))  # fmt: skip
        answered: list[int] = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for message in stream:
                answered.extend(r.call_id for r in message.results)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "call_id 2 appears twice in this message" in (info.value.details() or "")
        assert answered == [1]  # the grant taken before the bad message was answered, nothing of it


def _address_of(dp: DataPlane) -> str:
    return dp._agent.identity.address


async def test_call_stream_maps_errors_and_opens_a_new_stream_after_the_node_restarts(
    start_control_plane: StartControlPlane, tmp_path: Path
) -> None:
    async with data_node(start_control_plane, tmp_path) as (stub, dp):
        address = _address_of(dp)
        stream = CallStream(stub, address)
        try:
            results = await asyncio.gather(*(
                stream.call("grant_items", grant(request_id=f"g{n}", player_id=f"p{n}", item_ids=[f"i{n}"]), 5.0)
                for n in range(40)
            ))  # fmt: skip
            assert sorted(r.inventory.item_ids[0] for r in results) == sorted(f"i{n}" for n in range(40))
            assert stream.streams_opened == 1  # 40 calls, one stream
            with pytest.raises(errors.NotFound, match="nobody"):
                await stream.call("get_inventory", shardnode_pb2.GetInventoryRequest(player_id="nobody"), 5.0)
            with pytest.raises(errors.InvalidArgument, match="twice"):
                await stream.call("grant_items", grant(request_id="x", item_ids=["a", "a"]), 5.0)
            inventory = await stream.call("get_inventory", shardnode_pb2.GetInventoryRequest(player_id="p7"), 5.0)
            assert list(inventory.item_ids) == ["i7"] and stream.streams_opened == 1
        finally:
            await stream.close()
        with pytest.raises(errors.Unavailable):
            await stream.call("get_inventory", shardnode_pb2.GetInventoryRequest(player_id="p7"), 5.0)


async def test_a_broken_stream_fails_its_calls_unavailable_and_the_next_call_reconnects() -> None:
    """A node process that goes away (its server stops) and comes back on the same port."""
    service = _EchoInventory()
    server = await _serve(service, 0)
    port = server.port
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stream = CallStream(shardnode_pb2_grpc.ShardNodeStub(channel), f"127.0.0.1:{port}")  # type: ignore[no-untyped-call]
    try:
        got = await stream.call("get_inventory", shardnode_pb2.GetInventoryRequest(player_id="a"), 5.0)
        assert got.player_id == "a" and stream.streams_opened == 1
        service.hold = asyncio.Event()  # the next call hangs on the node until it goes away
        pending = asyncio.ensure_future(
            stream.call("get_inventory", shardnode_pb2.GetInventoryRequest(player_id="b"), 10.0))
        await asyncio.wait_for(service.holding.wait(), 5)
        await server.grpc.stop(None)
        with pytest.raises(errors.Unavailable, match="unavailable"):
            await asyncio.wait_for(pending, 5)
        service.hold = None
        server = await _serve(service, port)
        for _ in range(100):  # the channel reconnects with backoff: retry as the routing client would
            try:
                got = await stream.call("get_inventory", shardnode_pb2.GetInventoryRequest(player_id="c"), 2.0)
                break
            except errors.Unavailable:
                await asyncio.sleep(0.1)
        assert got.player_id == "c" and stream.streams_opened >= 2
        # A call past its deadline is DEADLINE_EXCEEDED, and the stream still serves the next.
        service.hold = asyncio.Event()
        with pytest.raises(errors.DeadlineExceeded):
            await stream.call("get_inventory", shardnode_pb2.GetInventoryRequest(player_id="d"), 0.2)
        service.hold.set()
        service.hold = None
        got = await stream.call("get_inventory", shardnode_pb2.GetInventoryRequest(player_id="e"), 5.0)
        assert got.player_id == "e"
    finally:
        await stream.close()
        await channel.close(None)
        await server.grpc.stop(None)


async def test_the_transport_falls_back_to_unary_calls_for_a_node_without_calls() -> None:
    service = _EchoInventory(serve_calls=False)
    server = await _serve(service, 0)
    address = f"127.0.0.1:{server.port}"
    transport = GrpcNodeTransport()
    try:
        for player in ("a", "b"):
            got = await transport.get_inventory(address, shardnode_pb2.GetInventoryRequest(player_id=player), 5.0)
            assert got.player_id == player
        assert service.unary_calls == 2 and not transport._streams[address].supported
    finally:
        await transport.close()
        await server.grpc.stop(None)


async def test_a_stream_that_breaks_fails_its_calls_unavailable_whatever_status_it_ends_with() -> None:
    """The calls of a broken stream may or may not have run: UNAVAILABLE, so the routing
    client retries them (with their request ids), as it does a unary call whose node died;
    never the stream's own status (here INTERNAL, from a crash in the node's handler)."""
    service = _EchoInventory(crash_calls=True)
    server = await _serve(service, 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stream = CallStream(shardnode_pb2_grpc.ShardNodeStub(channel), f"127.0.0.1:{server.port}")  # type: ignore[no-untyped-call]
    try:
        with pytest.raises(errors.Unavailable, match=r"stream broke \(INTERNAL"):
            await stream.call("get_inventory", shardnode_pb2.GetInventoryRequest(player_id="a"), 5.0)
        assert stream.supported  # a broken stream is no reason to give it up
    finally:
        await stream.close()
        await channel.close(None)
        await server.grpc.stop(None)


class _EchoInventory(shardnode_pb2_grpc.ShardNodeServicer):
    """GetInventory answers the player id asked for; Calls like the real node's (or not at
    all, as a node of an older release)."""

    def __init__(self, serve_calls: bool = True, crash_calls: bool = False):
        self.serve_calls = serve_calls
        self.crash_calls = crash_calls
        self.hold: asyncio.Event | None = None
        self.holding = asyncio.Event()
        self.unary_calls = 0

    async def _inventory(self, player: str) -> shardnode_pb2.GetInventoryResponse:
        if self.hold is not None:
            self.holding.set()
            await self.hold.wait()
        return shardnode_pb2.GetInventoryResponse(player_id=player)

    async def GetInventory(self, request, context):  # type: ignore[no-untyped-def]
        self.unary_calls += 1
        return await self._inventory(request.player_id)

    async def Calls(self, request_iterator, context):  # type: ignore[no-untyped-def]
        if not self.serve_calls:
            raise NotImplementedError()
        await context.send_initial_metadata(())
        answers: asyncio.Queue[shardnode_pb2.NodeResult] = asyncio.Queue()

        async def one(call: shardnode_pb2.NodeCall) -> None:
            result = shardnode_pb2.NodeResult(call_id=call.call_id)
            result.get_inventory.CopyFrom(await self._inventory(call.get_inventory.player_id))
            await answers.put(result)

        running: set[asyncio.Future[None]] = set()

        async def read() -> None:
            async for message in request_iterator:
                if self.crash_calls:
                    raise RuntimeError("a bug in the node")
                for call in message.calls:
                    task = asyncio.ensure_future(one(call))
                    running.add(task)
                    task.add_done_callback(running.discard)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                got = asyncio.ensure_future(answers.get())
                await asyncio.wait((got, reader), return_when=asyncio.FIRST_COMPLETED)
                if not got.done():
                    got.cancel()
                    reader.result()  # raises what broke the reader
                    return
                yield shardnode_pb2.NodeResults(results=[got.result()])
        finally:
            reader.cancel()


async def _serve(service: shardnode_pb2_grpc.ShardNodeServicer, port: int):  # type: ignore[no-untyped-def]
    return await build_server(
        f"127.0.0.1:{port}",
        [ServiceBinding("bluemarble.v1.ShardNode", service, shardnode_pb2_grpc.add_ShardNodeServicer_to_server)],
    )


class _HeldInventories:
    """A data plane whose GetInventory waits until released (what close_streams must wait for)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.asked: list[str] = []
        self.entered = asyncio.Event()

    async def get_inventory(
        self, player: str, allow_stale: bool, timeout_s: float
    ) -> shardnode_pb2.GetInventoryResponse:
        self.asked.append(player)
        self.entered.set()
        await self.release.wait()
        return shardnode_pb2.GetInventoryResponse(player_id=player)


async def test_a_node_shutting_down_answers_its_calls_in_flight_then_ends_its_streams_unavailable() -> None:
    held = _HeldInventories()
    service = ShardNodeService("n1", lambda: [], lambda: held)  # type: ignore[arg-type,return-value]
    server = await _serve(service, 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stream = shardnode_pb2_grpc.ShardNodeStub(channel).Calls()  # type: ignore[no-untyped-call]
        await stream.write(calls(shardnode_pb2.NodeCall(
            call_id=1, get_inventory=shardnode_pb2.GetInventoryRequest(player_id="a"))))
        await asyncio.wait_for(held.entered.wait(), 5)
        service.close_streams()
        with contextlib.suppress(grpc.aio.AioRpcError):  # the node may have ended its side already
            await stream.write(calls(shardnode_pb2.NodeCall(
                call_id=2, get_inventory=shardnode_pb2.GetInventoryRequest(player_id="b"))))
        held.release.set()
        answered: list[int] = []

        async def drain() -> None:
            async for message in stream:
                answered.extend(r.call_id for r in message.results if r.WhichOneof("result") == "get_inventory")

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(drain(), 10)
        assert answered == [1] and held.asked == ["a"]  # the call in flight answered, none taken after
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (info.value.details() or "")
    finally:
        await channel.close(None)
        await server.grpc.stop(None)


async def test_a_node_shutting_down_ends_the_replication_streams_it_receives_unavailable() -> None:
    """Not cut by the server's stop (grpc.aio logs that as a warning, and the primary sees
    a bare CANCELLED): ended UNAVAILABLE, saying why, between two batches."""
    held = _HeldInventories()
    service = ShardNodeService("n1", lambda: [], lambda: held)  # type: ignore[arg-type,return-value]
    server = await _serve(service, 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stream = shardnode_pb2_grpc.ShardNodeStub(channel).Replicate(timeout=10)  # type: ignore[no-untyped-call]
        await stream.wait_for_connection()
        service.close_streams()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream.read()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "n1 is shutting down" in (info.value.details() or "")
        # The primary's shipper reads this: the replica is expected back, no need to warn.
        assert (SHUTTING_DOWN_KEY, "1") in tuple(info.value.trailing_metadata() or ())
    finally:
        await channel.close(None)
        await server.grpc.stop(None)


async def test_closing_an_idle_stream_leaves_no_task_behind() -> None:
    """A stream closed while it waits for calls: its waiting task is cancelled with it (a
    task left pending is destroyed later with "Task was destroyed but it is pending!")."""
    service = _EchoInventory()
    server = await _serve(service, 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stream = CallStream(shardnode_pb2_grpc.ShardNodeStub(channel), f"127.0.0.1:{server.port}")  # type: ignore[no-untyped-call]

    def waiting_tasks() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if not t.done() and "Event.wait" in repr(t.get_coro())]

    try:
        before = set(waiting_tasks())
        got = await stream.call("get_inventory", shardnode_pb2.GetInventoryRequest(player_id="a"), 5.0)
        assert got.player_id == "a"
        assert set(waiting_tasks()) - before, "the idle stream waits for its next call"
        await stream.close()
        await asyncio.sleep(0)  # one loop turn: a cancelled task finishes there
        assert not set(waiting_tasks()) - before
    finally:
        await stream.close()
        await channel.close(None)
        await server.grpc.stop(None)


class _LateHeaders(shardnode_pb2_grpc.ShardNodeServicer):
    """A Calls handler that sends its initial metadata only once the client has left: what
    the node's handler meets when a client closes its channel right after opening."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def Calls(self, request_iterator: Any, context: Any) -> Any:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # gRPC cancels the handler as the client leaves; the send races that cancel
        try:
            await context.send_initial_metadata((("x-late", "1"),))
        except Exception as e:
            self.ended.set_result(type(e).__name__)
            raise
        self.ended.set_result("sent")
        return
        yield  # an async generator, as the node's handler


async def test_a_client_that_leaves_before_the_first_message_is_no_crash() -> None:
    """gRPC raises from a send on a call its client has left; that is the client going,
    logged at debug, never "rpc crashed" with a traceback (an outside probe saw a few of
    those per thousand streams opened and dropped at once)."""
    import structlog

    service = _LateHeaders()
    server = await _serve(service, 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        with structlog.testing.capture_logs() as logs:
            stream = shardnode_pb2_grpc.ShardNodeStub(channel).Calls()  # type: ignore[no-untyped-call]
            await stream.write(calls(shardnode_pb2.NodeCall(call_id=1)))
            await asyncio.wait_for(service.started.wait(), 5)
            await channel.close(None)
            raised = await asyncio.wait_for(service.ended, 5)
            for _ in range(50):  # the wrapper logs once the handler has ended
                if any(e["event"].startswith("rpc ") for e in logs):
                    break
                await asyncio.sleep(0.02)
        assert raised == "ExecuteBatchError"
        events = [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("rpc ")]
        assert events == [("rpc ended: the client left", "debug")]
    finally:
        await channel.close(None)
        await server.grpc.stop(None)
