"""The framed transport of ShardNode.Calls and Replicate (bluemarble.runtime.frames), on
loopback sockets: statuses as gRPC's, bad input, the keepalive, mutual TLS and the
certificate checks of the handlers, and the client's choice between a framed port and
gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import structlog
import structlog.testing
from google.protobuf.wrappers_pb2 import BytesValue

from bluemarble.core.errors import NotFound, Unavailable
from bluemarble.runtime import frames, retry, tls
from bluemarble.runtime.auth import ClusterPeers
from bluemarble.runtime.grpc_server import ServiceBinding, build_server
from bluemarble.v1 import shardnode_pb2, shardnode_pb2_grpc
from scripts.dev_certs import DevCerts, make_dev_certs
from shardnode.service import ShardNodeService
from tests.integration.test_security import RecordingDataPlane

ECHO = "/test.Echo/Stream"


async def echo(requests: AsyncIterator[BytesValue], context: Any) -> AsyncIterator[BytesValue]:
    await context.send_initial_metadata((("who", "echo"),))
    async for message in requests:
        if message.value == b"missing":
            raise NotFound("no such thing; ask for another")
        if message.value == b"abort-later":
            async def later() -> None:
                await asyncio.sleep(0.01)
                with contextlib.suppress(Exception):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "going away", trailing_metadata=(("k", "v"),))
            asyncio.get_running_loop().create_task(later())
            continue
        if message.value == b"crash":
            raise RuntimeError("a bug")
        yield message


def events(logged: list[dict[str, Any]]) -> str:
    return " | ".join(str(e.get("event")) for e in logged)


class Recorded(logging.Handler):
    def __init__(self, level: int):
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
async def server() -> AsyncIterator[frames.FrameServer]:
    served = frames.FrameServer({ECHO: frames.Method(echo, BytesValue.FromString)}, max_request_bytes=1024)
    await served.start("127.0.0.1", 0)
    try:
        yield served
    finally:
        await served.stop(0.5)


async def open_echo(server: frames.FrameServer, method: str = ECHO) -> frames.FrameCall:
    return await frames.FrameCall.open("127.0.0.1:1", server.port, method, BytesValue.FromString)


async def test_messages_and_statuses_travel_as_on_grpc(server: frames.FrameServer) -> None:
    call = await open_echo(server)
    assert ("who", "echo") in list(await call.initial_metadata())
    for value in (b"a", b"", b"x" * 1000):
        await call.write(BytesValue(value=value))
        assert (await call.read()).value == value
    await call.done_writing()
    assert await call.read() is frames.EOF
    assert call.done() and await call.code() == grpc.StatusCode.OK

    call = await open_echo(server)
    await call.write(BytesValue(value=b"missing"))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await call.read()
    assert ended.value.code() == grpc.StatusCode.NOT_FOUND and "ask for another" in (ended.value.details() or "")
    with pytest.raises(asyncio.InvalidStateError):
        await call.write(BytesValue(value=b"after the end"))

    # An abort from another task ends the stream with its status and trailers.
    call = await open_echo(server)
    await call.write(BytesValue(value=b"abort-later"))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await call.read()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and ended.value.details() == "going away"
    assert ("k", "v") in list(await call.trailing_metadata())

    # A bug is INTERNAL with an error id, never the exception's text.
    call = await open_echo(server)
    await call.write(BytesValue(value=b"crash"))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await call.read()
    assert ended.value.code() == grpc.StatusCode.INTERNAL and "error id" in (ended.value.details() or "")
    assert "a bug" not in (ended.value.details() or "")


async def test_a_stopping_server_ends_its_streams_at_once(server: frames.FrameServer) -> None:
    call = await open_echo(server)
    await call.initial_metadata()
    reading = asyncio.ensure_future(call.read())
    assert server.end_streams("replica r1 is shutting down", (("bluemarble-shutting-down", "1"),)) == 1
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(reading, 5)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and ended.value.details() == "replica r1 is shutting down"
    assert ("bluemarble-shutting-down", "1") in list(await call.trailing_metadata())
    # A stream opened afterwards (a client reopening on its next call) ends the same way.
    late = await open_echo(server)
    await late.initial_metadata()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(late.wait_for_connection(), 5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert refused.value.details() == "replica r1 is shutting down"
    assert ("bluemarble-shutting-down", "1") in list(await late.trailing_metadata())
    assert server.end_streams("again") == 0


async def test_bad_input_gets_a_status_or_a_closed_connection_and_the_server_serves_on(
    server: frames.FrameServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    call = await open_echo(server, "/test.Echo/" + "Nope" * 100)
    await call.initial_metadata()
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await call.wait_for_connection()
    assert ended.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert len(ended.value.details() or "") < 200  # the long name is not echoed whole

    call = await open_echo(server)
    await call.write(BytesValue(value=b"y" * 2000))  # over the server's 1024-byte request limit
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await call.read()
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1024" in (ended.value.details() or "")

    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(frames.frame(frames.OPEN, b'{"method": "' + ECHO.encode() + b'"}')
                 + frames.frame(frames.MESSAGE, b"\xff\xff\xff"))  # not a BytesValue
    kind = payload = None
    while kind != frames.STATUS:
        kind, payload = await frames.read_frame(reader, 1 << 20)
    assert payload is not None and b"INVALID_ARGUMENT" in payload and b"does not parse as BytesValue" in payload
    writer.close()

    for broken, code, words in ((frames.frame(frames.STATUS, b"{}"), "INVALID_ARGUMENT", b"unexpected STATUS frame"),
                                (frames.frame(frames.OPEN, b"{}"), "INVALID_ARGUMENT", b"unexpected OPEN frame"),
                                (struct.pack("!IB", 0, 99), "INVALID_ARGUMENT", b"unknown frame kind 99")):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(frames.frame(frames.OPEN, b'{"method": "' + ECHO.encode() + b'"}') + broken)
        kind = payload = None
        while kind != frames.STATUS:
            kind, payload = await frames.read_frame(reader, 1 << 20)
        assert payload is not None and f'"code":"{code}"'.encode() in payload and words in payload, payload
        writer.close()

    nested = b"[" * 8000 + b"]" * 8000  # deeper than the JSON parser's recursion allows
    asyncio_errors = Recorded(logging.ERROR)
    logging.getLogger("asyncio").addHandler(asyncio_errors)  # where an exception the server missed goes
    monkeypatch.setattr(frames, "_REFUSALS", retry.FailureLog())
    try:
        with structlog.testing.capture_logs() as logged:
            for garbage in (b"\x00\x00\x00\x05\x63hello", struct.pack("!IB", 1 << 30, frames.OPEN),
                            b"GET / HTTP/1.1\r\n\r\n", frames.frame(frames.MESSAGE, b"no OPEN first"),
                            frames.frame(frames.OPEN, b"[1, 2]"), frames.frame(frames.OPEN, nested),
                            frames.frame(frames.OPEN, b'{"a":' * 2700 + b"1" + b"}" * 2700)):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(garbage)
                assert await asyncio.wait_for(reader.read(), 5) == b"", garbage[:40]  # closed, nothing sent back
                writer.close()
    finally:
        logging.getLogger("asyncio").removeHandler(asyncio_errors)
    assert not asyncio_errors.records, asyncio_errors.records[0].getMessage()[:300]  # no traceback
    refusals = [e["log_level"] for e in logged if "broke the framing" in str(e["event"])]
    assert refusals == ["warning"] + ["debug"] * 6, refusals  # a flood of them is no flood of warnings

    call = await open_echo(server)  # still serving
    await call.write(BytesValue(value=b"ok"))
    assert (await call.read()).value == b"ok"
    call.cancel()


async def test_streams_opened_in_a_burst_log_one_line(
    server: frames.FrameServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(frames, "_OPENED", retry.LogThrottle(60.0))
    with structlog.testing.capture_logs() as logged:
        calls = [await open_echo(server) for _ in range(5)]
        for call in calls:
            await call.initial_metadata()  # served: past the log line
    opened = [e["log_level"] for e in logged if e["event"] == "framed stream opened"]
    assert opened == ["info"] + ["debug"] * 4, opened
    for call in calls:
        call.cancel()


async def test_one_client_host_holds_a_quarter_of_the_connections_at_most(
    server: frames.FrameServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(frames, "MAX_CONNECTIONS_PER_HOST", 3)
    held = [await open_echo(server) for _ in range(3)]
    for call in held:
        await call.initial_metadata()  # served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await asyncio.wait_for(reader.read(), 2) == b""  # the fourth from this host: closed at once, not in 5 s
    writer.close()
    held.pop().cancel()  # one closes: room for the next
    for _ in range(100):
        another = await open_echo(server)
        await another.initial_metadata()
        if not another.done():
            break
        await asyncio.sleep(0.05)  # the server has not seen the cancelled one close yet
    await another.write(BytesValue(value=b"ok"))
    assert (await another.read()).value == b"ok"
    for call in (*held, another):
        call.cancel()


async def test_a_port_in_use_is_a_clear_error(server: frames.FrameServer) -> None:
    taken = frames.FrameServer({}, max_request_bytes=1024)
    expected = rf"cannot listen on the framed port 127.0.0.1:{server.port}: .*--frames-port"
    with pytest.raises(Unavailable, match=expected):
        await taken.start("127.0.0.1", server.port)


async def test_a_peer_that_stops_answering_ends_the_stream_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frames, "KEEPALIVE_S", 0.3)
    monkeypatch.setattr(frames, "KEEPALIVE_TIMEOUT_S", 0.3)
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # as a stopped process: the socket is open, nothing is read or answered

    hung = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = hung.sockets[0].getsockname()[1]
    try:
        call = await frames.FrameCall.open(f"127.0.0.1:{port}", port, ECHO, BytesValue.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(call.read(), 10)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "keepalive" in (ended.value.details() or "")
    finally:
        hung.close()
        for writer in accepted:
            writer.close()


async def test_an_answering_idle_stream_is_kept(server: frames.FrameServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frames, "KEEPALIVE_S", 0.2)
    monkeypatch.setattr(frames, "KEEPALIVE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(frames, "IDLE_TIMEOUT_S", 0.6)
    call = await open_echo(server)
    await call.initial_metadata()
    await asyncio.sleep(1.5)  # nobody reads: nothing is judged, but the client pings (the server would close it)
    reading = asyncio.ensure_future(call.read())
    await asyncio.sleep(1.5)  # several keepalive rounds while a read waits, each answered by the server
    assert not call.done() and not reading.done()
    await call.write(BytesValue(value=b"still here"))
    assert (await reading).value == b"still here"
    call.cancel()


async def test_a_client_that_goes_silent_is_closed(server: frames.FrameServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that opens a stream and sends nothing more, or stops in the middle of a
    frame, holds its connection for IDLE_TIMEOUT_S, not for good (it would hold one of
    the server's MAX_CONNECTIONS)."""
    monkeypatch.setattr(frames, "IDLE_TIMEOUT_S", 0.6)
    opening = frames.frame(frames.OPEN, b'{"method": "' + ECHO.encode() + b'"}')
    for then in (b"", struct.pack("!IB", 500, frames.MESSAGE) + b"x" * 10):
        with structlog.testing.capture_logs() as logged:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(opening + then)
            received = await asyncio.wait_for(reader.read(), 10)  # until the server closes it
        assert b'"code":"UNAVAILABLE"' in received and b"no frame from the client for 0.6 s" in received
        assert "framed stream closed: the client sent nothing it owed" in events(logged)
        writer.close()

    call = await open_echo(server)  # still serving
    await call.write(BytesValue(value=b"ok"))
    assert (await call.read()).value == b"ok"
    call.cancel()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return make_dev_certs(tmp_path_factory.mktemp("certs"), ("n1", "n2"))


@contextlib.contextmanager
def identity(certs: DevCerts, name: str, ca: bool = True) -> Iterator[None]:
    tls.configure(tls.TlsConfig(tls.TlsFiles(certs[name].cert, certs[name].key, certs.ca if ca else None)))
    try:
        yield
    finally:
        tls.configure(None)


async def test_under_mutual_tls_the_handlers_see_the_callers_certificate(certs: DevCerts) -> None:
    # The same check as on the gRPC port (test_security): a node ships only its own log.
    recorder = RecordingDataPlane()
    peers = ClusterPeers({"controlplane"}, lambda name: name in {"n1", "n2"}, enabled=True)
    service = ShardNodeService("n1", list, lambda: recorder, peers=peers)  # type: ignore[arg-type, return-value]
    replicate = "/bluemarble.v1.ShardNode/Replicate"
    served = frames.FrameServer({replicate: frames.Method(service.Replicate, shardnode_pb2.ReplicateBatch.FromString)},
                                max_request_bytes=1 << 20)
    with identity(certs, "n1"):
        await served.start("127.0.0.1", 0)

    async def dial() -> frames.FrameCall:  # as the process is configured at the time
        return await frames.FrameCall.open(f"127.0.0.1:{served.port}", served.port, replicate,
                                           shardnode_pb2.ReplicateAck.FromString)

    try:
        with identity(certs, "n2"):
            call = await dial()
            await call.write(shardnode_pb2.ReplicateBatch(primary="n2"))
            assert (await call.read()).replica == "n1"
            await call.write(shardnode_pb2.ReplicateBatch(primary="n1"))  # as another node
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call.read()
        assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "only as itself" in (ended.value.details() or "")
        assert recorder.batches == ["n2"]

        with identity(certs, "admin"):  # a certificate of the CA, but not a node's
            call = await dial()
            await call.write(shardnode_pb2.ReplicateBatch(primary="admin"))
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call.read()
        assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # Without a client certificate, or in plaintext: no stream at all.
        with identity(certs, "n2", ca=True):
            tls.configure(tls.TlsConfig(tls.TlsFiles(None, None, certs.ca)))
            with pytest.raises((OSError, grpc.aio.AioRpcError)):
                call = await dial()
                await call.write(shardnode_pb2.ReplicateBatch(primary="n2"))
                await call.read()
        call = await dial()
        await call.write(shardnode_pb2.ReplicateBatch(primary="n2"))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(recorder.batches) == 1
    finally:
        await served.stop(0.5)


async def test_a_client_hello_that_arrives_before_the_server_looks_still_gets_its_handshake(
    certs: DevCerts, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A busy node starts a connection's handshake a while after the client sent its hello.
    monkeypatch.setattr(frames, "DIAL_TIMEOUT_S", 2.0)
    original = frames.FrameServer._connection

    async def late(self: frames.FrameServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)
        await original(self, reader, writer)

    monkeypatch.setattr(frames.FrameServer, "_connection", late)
    with identity(certs, "n1"):
        served = frames.FrameServer({ECHO: frames.Method(echo, BytesValue.FromString)}, max_request_bytes=1024)
        await served.start("127.0.0.1", 0)
    try:
        with identity(certs, "n2"):
            call = await frames.FrameCall.open(f"127.0.0.1:{served.port}", served.port, ECHO, BytesValue.FromString)
            await call.write(BytesValue(value=b"over TLS"))
            assert (await call.read()).value == b"over TLS"
            call.cancel()
    finally:
        await served.stop(0.5)


async def test_a_rotated_certificate_applies_to_the_next_connection(
    certs: DevCerts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tls, "RECHECK_S", 0.0)
    cert, key = tmp_path / "server.pem", tmp_path / "server-key.pem"
    shutil.copy(certs["n1"].cert, cert)
    shutil.copy(certs["n1"].key, key)
    tls.configure(tls.TlsConfig(tls.TlsFiles(cert, key, certs.ca)))
    try:
        served = frames.FrameServer({ECHO: frames.Method(echo, BytesValue.FromString)}, max_request_bytes=1024)
        await served.start("127.0.0.1", 0)
    finally:
        tls.configure(None)

    async def server_names() -> set[str]:
        with identity(certs, "n2"):
            call = await frames.FrameCall.open(f"127.0.0.1:{served.port}", served.port, ECHO, BytesValue.FromString)
        peer = call._writer.get_extra_info("peercert")
        await call.write(BytesValue(value=b"x"))
        assert (await call.read()).value == b"x"
        call.cancel()
        return {value for rdn in peer["subject"] for key, value in rdn if key == "commonName"}

    try:
        assert await server_names() == {"n1"}
        shutil.copy(certs["controlplane"].cert, cert)  # renewed under another name, same CA
        shutil.copy(certs["controlplane"].key, key)
        assert await server_names() == {"controlplane"}
    finally:
        await served.stop(0.5)


async def test_a_client_takes_the_offered_port_and_falls_back_to_grpc_when_it_cannot_reach_it(
    certs: DevCerts,
) -> None:
    offered: list[int] = []
    service = ShardNodeService("n1", list, lambda: RecordingDataPlane(),  # type: ignore[arg-type, return-value]
                               frames_port=lambda: offered[0])
    server = await build_server("127.0.0.1:0", [ServiceBinding(
        shardnode_pb2.DESCRIPTOR.services_by_name["ShardNode"].full_name, service,
        shardnode_pb2_grpc.add_ShardNodeServicer_to_server)])
    replicate = "/bluemarble.v1.ShardNode/Replicate"
    served = frames.FrameServer({replicate: frames.Method(service.Replicate, shardnode_pb2.ReplicateBatch.FromString)},
                                max_request_bytes=1 << 20)
    await served.start("127.0.0.1", 0)
    address = f"127.0.0.1:{server.port}"
    channel = grpc.aio.insecure_channel(address)
    stub = shardnode_pb2_grpc.ShardNodeStub(channel)  # type: ignore[no-untyped-call]
    frames._offered.clear()
    frames._refused.clear()
    try:
        async def exchange() -> Any:
            call = await frames.open_stream(address, replicate, shardnode_pb2.ReplicateAck.FromString,
                                            stub.Replicate)
            await call.write(shardnode_pb2.ReplicateBatch(primary="n2"))
            assert (await call.read()).replica == "n1"
            call.cancel()
            return call

        with contextlib.closing(socket.socket()) as unused, structlog.testing.capture_logs() as logged:
            unused.bind(("127.0.0.1", 0))
            offered.append(unused.getsockname()[1])  # offered, but nothing listens there
            assert isinstance(await exchange(), grpc.aio.StreamStreamCall)
        assert "framed port unreachable" in events(logged)
        offered[0] = served.port
        assert isinstance(await exchange(), frames.FrameCall)  # a port not tried before
        assert frames._offered[address] == served.port
        assert isinstance(await exchange(), frames.FrameCall)  # dialled directly now

        # The node restarts on another framed port: the remembered one is refused, quietly,
        # and the gRPC stream offers the new one.
        await served.stop(0.5)
        served = frames.FrameServer(
            {replicate: frames.Method(service.Replicate, shardnode_pb2.ReplicateBatch.FromString)},
            max_request_bytes=1 << 20)
        await served.start("127.0.0.1", 0)
        offered[0] = served.port
        with structlog.testing.capture_logs() as logged:
            assert isinstance(await exchange(), frames.FrameCall)
        assert frames._offered[address] == served.port
        assert "no longer open" in events(logged) and "unreachable" not in events(logged)

        # A framed port this client cannot speak to (TLS, dialled in plaintext) is a failed
        # dial too, though the connection opened: the stream goes over gRPC.
        await served.stop(0.5)
        with identity(certs, "n1"):
            served = frames.FrameServer(
                {replicate: frames.Method(service.Replicate, shardnode_pb2.ReplicateBatch.FromString)},
                max_request_bytes=1 << 20)
            await served.start("127.0.0.1", 0)
        offered[0] = served.port
        with structlog.testing.capture_logs() as logged:
            assert isinstance(await exchange(), grpc.aio.StreamStreamCall)
        assert "framed port unreachable" in events(logged) and address not in frames._offered

        frames.enable(False)
        assert isinstance(await exchange(), grpc.aio.StreamStreamCall)
    finally:
        frames.enable(True)
        frames._offered.clear()
        frames._refused.clear()
        await channel.close()
        await served.stop(0.5)
        await server.stop_gracefully(0.1)
