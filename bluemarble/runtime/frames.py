"""A framed transport for the cluster's busiest streams, beside gRPC.

A cross-shard trade at a low rate makes about eight round trips on two internal streams:
the coordinator's ``ShardNode.Calls`` to the two primaries (prepare, commit) and the
primaries' ``Replicate`` to their replicas (the escrow, the settlement); and one on the
game server's ``TradeCoordinator.ExecuteTrades``. When the processes go idle between
messages, a round trip on a grpc.aio stream costs this machine two to three times what it
costs on a plain socket (``scripts/bench_message_cost.py``): a message wakes gRPC's own
threads and its completion queue before the event loop. Carried on a plain TCP (or TLS)
connection read by the event loop itself, the same messages cost less CPU and wait less
(docs/benchmarks.md).

The gRPC methods stay as they are (grpcurl, other clients and older nodes use them); this
is a second way to reach the same handlers:

* A node (a control plane) serves the framed listener beside its gRPC port and says so in
  the initial metadata of those streams (:data:`PORT_KEY`). A client that opens one over
  gRPC and sees the key closes it before its first message and dials the framed port on
  the same host instead; later streams to that address dial it directly. A dial counts
  once the server has answered the stream; when dialling fails (a firewall, a TLS port
  dialled in plaintext) the client keeps to gRPC for :data:`RETRY_FRAMES_AFTER_S`.
* One connection carries one stream. Each frame is a 5-byte header (payload length,
  kind) and a payload: the client's OPEN (method and metadata, JSON), the protobuf
  MESSAGEs both ways, the client's HALF_CLOSE, and the server's HEADERS (initial metadata)
  and STATUS (code, details and trailing metadata, as gRPC's). A message is bounded as on
  gRPC (the server's request limit, :data:`~bluemarble.core.limits.MAX_MESSAGE_BYTES` for
  answers); a control frame by :data:`MAX_CONTROL_BYTES`.
* Flow control is TCP's: the server reads a request when the handler asks for it, and
  both ends wait for their write buffer to drain.
* TLS: when the process runs with TLS, the connection is TLS with the same certificate,
  CA and client-certificate rule as the gRPC port, the files re-read as they rotate; the
  handlers see the peer's certificate names as gRPC's ``auth_context`` gives them, so the
  same checks (:class:`~bluemarble.runtime.auth.ClusterPeers`) apply.
* A hung peer: the callers bound each exchange (replication's ack timeout, each call's
  deadline) as they do on gRPC; a client also sends a PING after :data:`KEEPALIVE_S`
  without a frame while it waits for one, and ends the stream UNAVAILABLE when no frame
  arrives within :data:`KEEPALIVE_TIMEOUT_S` more (what gRPC's keepalive does); a client
  that has sent nothing for :data:`KEEPALIVE_S` sends a PING even when it does not read.
  The server closes a stream whose client has sent no frame for :data:`IDLE_TIMEOUT_S`
  while it waits for one (a peer that opens streams and goes silent, or stops in the
  middle of a frame, does not hold a connection for good). TCP keepalive probes close a
  connection whose peer's host vanished.

The client's calls (:class:`FrameCall`) behave as the subset of ``grpc.aio``'s
stream-stream call the clients use (:class:`bluemarble.client.node_calls.CallStream`, the
replication stream), statuses and errors included, so their retry and failover rules are
the same on either transport.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import socket
import ssl
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import structlog
from google.protobuf.message import DecodeError

from bluemarble.core.errors import BlueMarbleError, InvalidArgument, Unavailable
from bluemarble.core.limits import MAX_MESSAGE_BYTES, echo
from bluemarble.runtime import channels, metrics, retry, tls
from bluemarble.runtime.grpc_server import short_message

log = structlog.get_logger(__name__)

EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # (missing from grpc's stubs)

PORT_KEY = "bluemarble-frames-port"
"""Initial-metadata key by which a node offers its framed port on those streams."""

HEADER = struct.Struct("!IB")  # payload length, kind
OPEN, HEADERS, MESSAGE, HALF_CLOSE, STATUS, PING, PONG = 1, 2, 3, 4, 5, 6, 7
_KIND_NAMES = {OPEN: "OPEN", HEADERS: "HEADERS", MESSAGE: "MESSAGE", HALF_CLOSE: "HALF_CLOSE", STATUS: "STATUS",
               PING: "PING", PONG: "PONG"}

MAX_CONTROL_BYTES = 16 * 1024
"""Largest OPEN, HEADERS or STATUS payload."""
MAX_METADATA_ITEMS = 32
OPEN_TIMEOUT_S = 5.0
"""A new connection's TLS handshake and OPEN frame arrive within this, or it is closed."""
DIAL_TIMEOUT_S = 3.0
"""A client's connect, handshake and OPEN within this, or it falls back to gRPC."""
KEEPALIVE_S = 6.0
KEEPALIVE_TIMEOUT_S = 3.0
IDLE_TIMEOUT_S = 30.0
"""A server closes a stream when the frame it waits for (the next one, or the rest of one
begun) has not come within this: a live client sends a PING every :data:`KEEPALIVE_S`."""
RETRY_FRAMES_AFTER_S = 60.0
"""After a failed dial, the client uses gRPC to that address for this long."""
STOP_GRACE_S = 2.0
MAX_CONNECTIONS = 1024
"""Framed connections one server holds at once; more are closed as they arrive (a node
has one per control-plane replica, per replica it feeds, per game server)."""
MAX_CONNECTIONS_PER_HOST = MAX_CONNECTIONS // 4
"""Of those, from one client host at most: one host cannot take them all (its clients
past the bound use gRPC, as clients do when a framed port refuses them)."""


class FrameError(Exception):
    """The peer broke the framing (an unknown kind, an oversized or malformed frame)."""


class FrameTooLarge(FrameError):
    """A frame over its bound (the server answers RESOURCE_EXHAUSTED, as gRPC does for an
    oversized message; any other broken framing is INVALID_ARGUMENT)."""


def frame(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), kind) + payload


async def read_frame(reader: asyncio.StreamReader, max_message_bytes: int) -> tuple[int, bytes]:
    """The next frame's kind and payload. Raises FrameError for a frame over its bound,
    ``asyncio.IncompleteReadError`` when the connection ends."""
    length, kind = HEADER.unpack(await reader.readexactly(HEADER.size))
    if kind not in _KIND_NAMES:
        raise FrameError(f"unknown frame kind {kind}")
    limit = max_message_bytes if kind == MESSAGE else MAX_CONTROL_BYTES
    if length > limit:
        raise FrameTooLarge(f"a {_KIND_NAMES[kind]} frame of {length} bytes; the limit is {limit}")
    return kind, (await reader.readexactly(length) if length else b"")


def _control(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _decode_control(payload: bytes) -> dict[str, Any]:
    """An OPEN, HEADERS or STATUS payload: a JSON object, else FrameError (nesting deep
    enough to exhaust the parser's recursion included)."""
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise FrameError(f"a control frame that is not JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise FrameError("a control frame that is not a JSON object")
    return value


def _pairs(value: Any) -> tuple[tuple[str, str], ...]:
    """Metadata pairs from a control frame's JSON (bounded; anything else is dropped)."""
    if not isinstance(value, list):
        return ()
    pairs = []
    for item in value[:MAX_METADATA_ITEMS]:
        if isinstance(item, list) and len(item) == 2 and all(isinstance(p, str) for p in item):
            pairs.append((item[0][:256], item[1][:4096]))
    return tuple(pairs)


def _auth_context(peercert: Mapping[str, Any] | None) -> dict[str, list[bytes]]:
    """What ``grpc.aio.ServicerContext.auth_context()`` gives for the same verified client
    certificate: its Common Name and DNS names (empty without one)."""
    if not peercert:
        return {}
    common = [value.encode() for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"]
    dns = [value.encode() for key, value in peercert.get("subjectAltName", ()) if key == "DNS"]
    return {"x509_common_name": common, "peer_dns": dns, "transport_security_type": [b"ssl"]}


def _tune(writer: asyncio.StreamWriter) -> None:
    """TCP keepalive probes on the connection, so one whose peer's host vanished (no FIN,
    no RST) is closed within about a minute on either end; and no Nagle delay."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


_REFUSALS = retry.FailureLog()
"""Connections refused before their stream (broken framing, too many open): a warning for
the first of a peer's, then a summary every few seconds, so a flood of them does not
flood the log."""


_OPENED = retry.LogThrottle(1.0)
""""framed stream opened" at info at most once a second per method (the rest at debug,
counted in the next line; every one in ``bluemarble_framed_streams_total``)."""


def _peer(writer: asyncio.StreamWriter) -> str:
    name = writer.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        return f"ipv6:[{name[0]}]:{name[1]}" if ":" in str(name[0]) else f"ipv4:{name[0]}:{name[1]}"
    return "unknown"


# --- TLS contexts, rebuilt when the process's TLS files rotate -------------------------

_contexts: dict[bool, tuple[tls.TlsConfig, int, ssl.SSLContext]] = {}
"""Server side (True) and client side: the configuration and generation each context was
built from, and the context."""


def _ssl_context(server: bool, config: tls.TlsConfig | None) -> ssl.SSLContext | None:
    """The SSL context for this process's TLS configuration (None: plaintext), as of the
    files' current generation: rebuilt after a rotation, the previous one kept when the
    new files do not load (:meth:`TlsConfig.material` logs why). The same rules as the
    gRPC port's: the certificate presented both ways, the CA verifying the peer, a client
    certificate required when there is a CA."""
    if config is None:
        return None
    generation = config.current_generation()
    built = _contexts.get(server)
    if built is not None and built[0] is config and built[1] == generation:
        return built[2]
    files = config.files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if files.cert and files.key:
            context.load_cert_chain(files.cert, files.key)
        if files.ca:
            context.load_verify_locations(cafile=str(files.ca))
            if server:
                context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS, as the gRPC port
        elif not server:
            context.load_default_certs()
    except (OSError, ssl.SSLError) as e:
        if built is not None and built[0] is config:
            log.warning("TLS files do not load for the framed transport; keeping the previous ones", error=str(e))
            return built[2]
        raise
    _contexts[server] = (config, generation, context)
    return context


# --- server -----------------------------------------------------------------------------


class _Aborted(Exception):
    """Raised by :meth:`FrameContext.abort`, as grpc.aio's AbortError."""


@dataclass(frozen=True)
class Method:
    """A stream-stream handler the framed server serves: ``handler(requests, context)``
    yields the responses; ``parse`` makes a request from its bytes."""

    handler: Callable[[AsyncIterator[Any], Any], AsyncIterator[Any]]
    parse: Callable[[bytes], Any]


class FrameContext:
    """The part of ``grpc.aio.ServicerContext`` the stream handlers use."""

    def __init__(self, writer: asyncio.StreamWriter, metadata: tuple[tuple[str, str], ...], peer: str,
                 auth: dict[str, list[bytes]]):
        self._writer = writer
        self._metadata = metadata
        self._peer = peer
        self._auth = auth
        self._headers_sent = False
        self.status: tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]] | None = None
        self.task: asyncio.Task[Any] | None = None
        self.waiting_since_s: float | None = None  # when the read of the client's next frame began
        self.watch: asyncio.TimerHandle | None = None

    @property
    def writer(self) -> asyncio.StreamWriter:
        return self._writer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def time_remaining(self) -> float | None:
        return None

    async def send_initial_metadata(self, metadata: Iterable[tuple[str, str]]) -> None:
        if self._headers_sent:
            return
        self._headers_sent = True
        self._writer.write(frame(HEADERS, _control({"metadata": [list(p) for p in metadata]})))
        await self._writer.drain()

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Sequence[tuple[str, str]] = ()) -> None:
        """Ends the stream with ``code``: raises in the handler's task, cancels it when
        called from another task (as a handler's helper that ends the stream does)."""
        if self.status is None:
            self.status = (code, details, tuple(trailing_metadata))
        if self.task is not None and asyncio.current_task() is not self.task:
            self.task.cancel()
        raise _Aborted(details)


class FrameServer:
    """Serves ``methods`` (by their gRPC path, "/bluemarble.v1.ShardNode/Calls") on a
    framed listener. ``max_request_bytes`` bounds a request message as the gRPC port's
    limit does."""

    def __init__(self, methods: Mapping[str, Method], *, max_request_bytes: int):
        self._methods = dict(methods)
        self._max_request_bytes = max_request_bytes
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._per_host: collections.Counter[str] = collections.Counter()
        self._streams: dict[asyncio.Task[Any], FrameContext] = {}
        self._ending: tuple[str, tuple[tuple[str, str], ...]] | None = None
        """Set by :meth:`end_streams`: the status every stream opened afterwards ends with."""
        self._tls: tls.TlsConfig | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listens on ``host:port`` (0: a free port) with the process's TLS configuration
        as it is now (:func:`bluemarble.runtime.tls.current`); returns the port. Raises
        Unavailable when the port cannot be bound."""
        self._tls = tls.current()
        context = _ssl_context(True, self._tls)
        if context is not None:
            context.sni_callback = self._pick_context
        try:
            self._server = await asyncio.start_server(
                self._connection, host.strip("[]"), port, limit=1 << 16, ssl=context,
                ssl_handshake_timeout=OPEN_TIMEOUT_S if context else None)
        except OSError as e:
            raise Unavailable(f"cannot listen on the framed port {host}:{port}: {e.strerror or e}; give "
                              "--frames-port another port, or -1 for none") from e
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def _pick_context(self, connection: ssl.SSLObject, _server_name: str | None, listening: ssl.SSLContext) -> None:
        """Called in each handshake (with or without SNI): the connection takes the context
        of the TLS files as they are now, so a rotated certificate or CA applies to the
        next connection, as on the gRPC port (the listener's own context is the one of
        the files at start)."""
        try:
            current = _ssl_context(True, self._tls)
        except Exception as e:  # the previous context stays (a warning says why)
            log.warning("TLS files do not load for the framed port; this connection uses the previous ones",
                        error=echo(str(e), 200))
            return
        if current is not None and current is not listening:
            connection.context = current

    def end_streams(self, details: str, trailing_metadata: Sequence[tuple[str, str]] = ()) -> int:
        """Ends every open stream at once with UNAVAILABLE ``details`` (for a server that
        is stopping: its clients move elsewhere now, not when the grace runs out), as
        :meth:`bluemarble.runtime.grpc_server.Server.end_streams` does on the gRPC port.
        A stream opened afterwards ends the same way as it opens (a client whose stream
        ended with nothing pending reopens it on its next call, to the same server).
        Returns how many were open."""
        self._ending = (details, tuple(trailing_metadata))
        streams = list(self._streams.items())
        for task, context in streams:
            if context.status is None:
                context.status = (grpc.StatusCode.UNAVAILABLE, details, tuple(trailing_metadata))
            task.cancel()
        return len(streams)

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stops listening; streams still open after ``grace_s`` are cut (the handlers end
        theirs first when the service closes its streams)."""
        if self._server is None:
            return
        self._server.close()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=grace_s)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=1.0)
        self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = _peer(writer)
        host = channels.peer_host(peer)
        if len(self._connections) >= MAX_CONNECTIONS or self._per_host[host] >= MAX_CONNECTIONS_PER_HOST:
            _REFUSALS.failed(f"too many {host}", time.monotonic(), "framed connection refused: too many open",
                             peer=peer, open=len(self._connections), from_host=self._per_host[host],
                             limit=MAX_CONNECTIONS, limit_per_host=MAX_CONNECTIONS_PER_HOST)
            writer.close()
            return
        self._connections.add(task)
        self._per_host[host] += 1
        _tune(writer)
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                kind, payload = await read_frame(reader, self._max_request_bytes)
            if kind != OPEN:
                raise FrameError(f"the first frame is {_KIND_NAMES[kind]}, not OPEN")
            await self._serve(_decode_control(payload), reader, writer, peer)
        except FrameError as e:
            _REFUSALS.failed(f"broken {host}", time.monotonic(), "framed connection refused: the peer broke "
                             "the framing", peer=peer, error=echo(str(e), 200))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError) as e:
            log.debug("framed connection ended", peer=peer, error=type(e).__name__)
        except asyncio.CancelledError:
            pass  # the server is stopping (a cancelled connection task would be logged as an error)
        finally:
            self._connections.discard(task)
            self._per_host[host] -= 1
            if not self._per_host[host]:
                del self._per_host[host]
            writer.close()

    async def _serve(self, opening: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer: str) -> None:
        method_name = opening.get("method")
        method = self._methods.get(method_name) if isinstance(method_name, str) else None
        if method is None:
            await _send_status(writer, grpc.StatusCode.UNIMPLEMENTED,
                               f"method {echo(str(method_name), 100)} is not served on this port")
            return
        if self._ending is not None:
            await _send_status(writer, grpc.StatusCode.UNAVAILABLE, *self._ending)
            return
        peercert = writer.get_extra_info("peercert") if writer.get_extra_info("sslcontext") is not None else None
        context = FrameContext(writer, _pairs(opening.get("metadata")), peer, _auth_context(peercert))
        short = str(method_name).rsplit("/", 1)[-1]
        metrics.FRAMED_STREAMS.labels(short).inc()
        held_back = _OPENED.allow(short, time.monotonic())
        (log.debug if held_back is None else log.info)("framed stream opened", method=short, peer=peer,
                                                       tls=peercert is not None, others_since_last=held_back or None)
        task = context.task = asyncio.current_task()
        assert task is not None
        self._streams[task] = context
        _watch_idle_later(context, short)
        code, details = grpc.StatusCode.OK, ""
        trailers: tuple[tuple[str, str], ...] = ()
        try:
            handler: Any = method.handler(self._requests(reader, context, method.parse), context)  # an async generator
            async with contextlib.aclosing(handler) as responses:
                async for response in responses:
                    if writer.is_closing():
                        return  # the client went away: nobody to answer
                    writer.write(frame(MESSAGE, response.SerializeToString()))
                    await writer.drain()
        except _Aborted:
            assert context.status is not None
            code, details, trailers = context.status
        except asyncio.CancelledError:
            if context.status is None:
                raise
            assert context.task is not None
            context.task.uncancel()  # an abort from another task: the stream ends with its status
            code, details, trailers = context.status
        except BlueMarbleError as e:
            code = grpc.StatusCode[e.status]
            details = short_message(str(e))
        except FrameTooLarge as e:
            code, details = grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
        except FrameError as e:
            code, details = grpc.StatusCode.INVALID_ARGUMENT, f"the client broke the framing: {e}"
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the client went away (or was silent too long): nobody to answer
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("framed stream crashed", error_id=error_id, method=method_name)
            code, details = grpc.StatusCode.INTERNAL, f"internal error (error id {error_id}); see the server log"
        finally:
            self._streams.pop(task, None)
            if context.watch is not None:
                context.watch.cancel()
        await _send_status(writer, code, details, trailers)

    async def _requests(self, reader: asyncio.StreamReader, context: FrameContext,
                        parse: Callable[[bytes], Any]) -> AsyncIterator[Any]:
        """The stream's requests, read as the handler asks for them. A client's keepalive
        PING is answered here: a handler waiting for its next request is reading."""
        while True:
            context.waiting_since_s = time.monotonic()
            kind, payload = await read_frame(reader, self._max_request_bytes)
            context.waiting_since_s = None
            if kind == MESSAGE:
                try:
                    request = parse(payload)
                except DecodeError as e:
                    raise InvalidArgument(f"a request message of {len(payload)} bytes does not parse as "
                                          f"{self._request_name(parse)}") from e
                yield request
            elif kind == HALF_CLOSE:
                return
            elif kind == PING:
                context.writer.write(frame(PONG))
            else:
                raise FrameError(f"unexpected {_KIND_NAMES[kind]} frame from the client")

    @staticmethod
    def _request_name(parse: Callable[[bytes], Any]) -> str:
        owner = getattr(parse, "__self__", None)
        return getattr(owner, "__name__", "the method's request")


def _watch_idle(context: FrameContext, method: str, due_s: float) -> None:
    """A stream's idle timer (every third of :data:`IDLE_TIMEOUT_S`): closes the stream
    when the frame its handler waits for has not come within the timeout. A timer that
    fires a second or more late means this process stalled: the wait starts over."""
    now = time.monotonic()
    since_s = context.waiting_since_s
    if since_s is not None and now - due_s >= 1.0:
        context.waiting_since_s = since_s = now
    if since_s is not None and now - since_s >= IDLE_TIMEOUT_S:
        log.info("framed stream closed: the client sent nothing it owed", method=method, peer=context.peer(),
                 waited_s=round(now - since_s, 1))
        writer = context.writer
        if writer.transport.get_write_buffer_size() == 0:
            writer.write(frame(STATUS, _control({
                "code": grpc.StatusCode.UNAVAILABLE.name, "trailers": [],
                "details": f"no frame from the client for {IDLE_TIMEOUT_S:g} s; the stream is closed"})))
            writer.close()
        else:
            writer.transport.abort()  # it does not read either
        return
    _watch_idle_later(context, method)


def _watch_idle_later(context: FrameContext, method: str) -> None:
    period_s = IDLE_TIMEOUT_S / 3
    context.watch = asyncio.get_running_loop().call_later(
        period_s, _watch_idle, context, method, time.monotonic() + period_s)


async def _send_status(writer: asyncio.StreamWriter, code: grpc.StatusCode, details: str,
                       trailers: Iterable[tuple[str, str]] = ()) -> None:
    writer.write(frame(STATUS, _control({"code": code.name, "details": details[:2000],
                                         "trailers": [list(p) for p in trailers]})))
    with contextlib.suppress(ConnectionError):
        await writer.drain()


# --- client -----------------------------------------------------------------------------


class FrameCall:
    """A stream on a framed port: the subset of ``grpc.aio.StreamStreamCall`` the
    multiplexed calls (:class:`bluemarble.client.node_calls.CallStream`) and the
    replication stream use, with the same statuses: a read of a stream that ended
    badly raises ``grpc.aio.AioRpcError``, a write to an ended one
    ``asyncio.InvalidStateError``. One reader at a time, as on grpc.aio."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, parse: Callable[[bytes], Any],
                 address: str):
        self._reader = reader
        self._writer = writer
        self._parse = parse
        self._address = address
        self._initial: grpc.aio.Metadata | None = None
        self._buffered: list[Any] = []  # messages that came before the initial metadata was asked for
        self._status: tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]] | None = None
        self._ended = asyncio.Event()
        self._last_frame_s = time.monotonic()
        self._ping_sent_s: float | None = None
        self._last_sent_s = self._last_frame_s  # when this side last sent a frame
        self._half_closed = False
        self._waiting_since_s: float | None = None  # when the read under way began
        self._due_s = self._last_frame_s + KEEPALIVE_S
        self._keepalive = asyncio.get_running_loop().call_later(KEEPALIVE_S, self._check_alive)

    @classmethod
    async def open(cls, address: str, port: int, method: str, parse: Callable[[bytes], Any]) -> FrameCall:
        """Dials ``port`` on the host of ``address`` and opens ``method``. Raises OSError,
        TimeoutError or ssl.SSLError when that fails."""
        host = address.rsplit(":", 1)[0].strip("[]")
        context = _ssl_context(False, tls.current())
        async with asyncio.timeout(DIAL_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=host if context is not None else None, limit=1 << 16)
        _tune(writer)
        writer.write(frame(OPEN, _control({"method": method, "metadata": []})))
        return cls(reader, writer, parse, f"{host}:{port}")

    def _end(self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        if self._status is None:
            self._status = (code, details, trailers)
        self._keepalive.cancel()
        self._ended.set()
        self._writer.close()

    def _check_alive(self) -> None:
        """The keepalive timer. While a read waits, a PING after :data:`KEEPALIVE_S`
        without a frame, and the end of the stream when no frame follows within
        :data:`KEEPALIVE_TIMEOUT_S`. (A stream nobody reads is not judged: its peer owes it
        nothing yet.) A timer that fires a second or more late means this process
        stalled: the peer had no chance to answer, so the wait starts over. Read or not, a
        stream that has sent nothing for :data:`KEEPALIVE_S` sends a PING, so that the
        server, which closes silent streams, keeps it."""
        if self._status is not None:
            return
        now = time.monotonic()
        stalled = now - self._due_s >= 1.0
        if stalled or self._waiting_since_s is None:
            self._ping_sent_s = None
        if self._ping_sent_s is not None and now - self._ping_sent_s >= KEEPALIVE_TIMEOUT_S:
            log.info("framed stream ended: no answer to a keepalive ping", address=self._address,
                     waited_s=round(now - self._ping_sent_s, 2))
            self._end(grpc.StatusCode.UNAVAILABLE,
                      f"{self._address} did not answer a keepalive ping within {KEEPALIVE_TIMEOUT_S:g} s")
            return
        delay_s = KEEPALIVE_S
        if self._waiting_since_s is not None and not stalled:
            quiet_s = now - max(self._last_frame_s, self._waiting_since_s)
            if self._ping_sent_s is None and quiet_s >= KEEPALIVE_S:
                self._send(frame(PING))
                self._ping_sent_s = now
            delay_s = KEEPALIVE_TIMEOUT_S if self._ping_sent_s is not None else max(0.1, KEEPALIVE_S - quiet_s)
        if self._ping_sent_s is None and not self._half_closed:
            # The server closes a stream that stays silent (IDLE_TIMEOUT_S): one that has
            # sent nothing for a while pings, judged or not (the PONG waits for a read).
            sent_s = now - self._last_sent_s
            if sent_s >= KEEPALIVE_S:
                self._send(frame(PING))
                sent_s = 0.0
            delay_s = min(delay_s, max(0.1, KEEPALIVE_S - sent_s))
        self._due_s = now + delay_s
        self._keepalive = asyncio.get_running_loop().call_later(delay_s, self._check_alive)

    async def _next(self) -> None:
        """Reads one frame and takes it in; a broken connection or framing ends the call."""
        self._waiting_since_s = time.monotonic()
        try:
            kind, payload = await read_frame(self._reader, MAX_MESSAGE_BYTES)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self._end(grpc.StatusCode.UNAVAILABLE, f"the connection to {self._address} closed")
            return
        except FrameError as e:
            self._end(grpc.StatusCode.UNAVAILABLE, f"{self._address} broke the framing: {e}")
            return
        finally:
            self._waiting_since_s = None
        self._last_frame_s = time.monotonic()
        self._ping_sent_s = None
        try:
            if kind == MESSAGE:
                self._buffered.append(self._parse(payload))
            elif kind == HEADERS:
                self._initial = grpc.aio.Metadata(*_pairs(_decode_control(payload).get("metadata")))
            elif kind == STATUS:
                status = _decode_control(payload)
                code = grpc.StatusCode.__members__.get(str(status.get("code")), grpc.StatusCode.UNKNOWN)
                self._end(code, str(status.get("details", ""))[:2000], _pairs(status.get("trailers")))
            elif kind != PONG:
                raise FrameError(f"unexpected {_KIND_NAMES[kind]} frame from the server")
        except (FrameError, DecodeError, ValueError, AttributeError) as e:
            self._end(grpc.StatusCode.UNAVAILABLE, f"{self._address} broke the framing: {echo(str(e), 200)}")

    def _error(self) -> grpc.aio.AioRpcError:
        assert self._status is not None
        code, details, trailers = self._status
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details, None)

    async def initial_metadata(self) -> grpc.aio.Metadata:
        while self._initial is None and self._status is None:
            await self._next()
        return self._initial if self._initial is not None else grpc.aio.Metadata()

    async def wait_for_connection(self) -> None:
        if self._status is not None and self._status[0] != grpc.StatusCode.OK:
            raise self._error()

    async def read(self) -> Any:
        while not self._buffered:
            if self._status is not None:
                if self._status[0] == grpc.StatusCode.OK:
                    return EOF
                raise self._error()
            await self._next()
        return self._buffered.pop(0)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[Any]:
        while True:
            message = await self.read()
            if message is EOF:
                return
            yield message

    async def write(self, message: Any) -> None:
        if self._status is not None:
            raise asyncio.InvalidStateError("the stream has ended")
        self._send(frame(MESSAGE, message.SerializeToString()))
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as e:
            self._end(grpc.StatusCode.UNAVAILABLE, f"the connection to {self._address} broke ({type(e).__name__})")
            raise self._error() from e

    def _send(self, data: bytes) -> None:
        self._writer.write(data)
        self._last_sent_s = time.monotonic()

    async def done_writing(self) -> None:
        if self._status is None:
            self._half_closed = True
            self._send(frame(HALF_CLOSE))

    def done(self) -> bool:
        return self._status is not None

    def cancel(self) -> bool:
        if self._status is not None:
            return False
        self._end(grpc.StatusCode.CANCELLED, "cancelled")
        return True

    async def code(self) -> grpc.StatusCode:
        await self._ended.wait()
        assert self._status is not None
        return self._status[0]

    async def details(self) -> str:
        await self._ended.wait()
        assert self._status is not None
        return self._status[1]

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        await self._ended.wait()
        assert self._status is not None
        return grpc.aio.Metadata(*self._status[2])


_NOT_THERE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED)
"""A framed stream that ends at once with these never reached the handler: use gRPC."""

_offered: dict[str, int] = {}
"""Address -> the framed port its node offered (dialled directly next time)."""
_refused: dict[tuple[str, int], float] = {}
"""(address, port) -> until when dialling it is not tried again (it failed)."""
_enabled = True


def enable(on: bool) -> None:
    """Whether this process's clients use framed ports that nodes offer (on by default)."""
    global _enabled
    _enabled = on
    if not on:
        _offered.clear()


def offered_port(metadata: Iterable[tuple[str, Any]] | None) -> int | None:
    """The framed port in a stream's initial metadata, if the server offers one."""
    for key, value in metadata or ():
        if key == PORT_KEY:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            if text.isdigit() and 0 < int(text) < 65536:
                return int(text)
    return None


async def _dial(address: str, port: int, method: str, parse: Callable[[bytes], Any], *,
                remembered: bool = False) -> FrameCall | None:
    """A framed stream, or None when dialling fails (then that port is left alone for
    :data:`RETRY_FRAMES_AFTER_S`). ``remembered``: the port was offered on an earlier
    stream; refused now, the node most likely restarted (on another port, or is down), so
    that is not worth a warning, and the next gRPC stream learns its port again."""
    until_s = _refused.get((address, port))
    if until_s is not None and time.monotonic() < until_s:
        return None
    try:
        call = await FrameCall.open(address, port, method, parse)
        try:
            # The stream is the caller's once the server has answered it: both handlers send
            # their initial metadata at once. A connection that closes first (a TLS port
            # dialled in plaintext, a proxy with no way through) or says nothing is a dial
            # that failed, and the stream goes over gRPC.
            async with asyncio.timeout(DIAL_TIMEOUT_S):
                await call.initial_metadata()
        except BaseException:
            call.cancel()
            raise
        if call.done() and call._status is not None and call._status[0] in _NOT_THERE:
            call.cancel()
            raise ConnectionError(f"{call._status[0].name}: {call._status[1]}")
    except (OSError, TimeoutError, ssl.SSLError) as e:
        _offered.pop(address, None)
        if remembered and isinstance(e, ConnectionRefusedError):
            log.info("framed port no longer open (the node restarted?); asking it over gRPC", address=address,
                     port=port)
            return None
        _refused[(address, port)] = time.monotonic() + RETRY_FRAMES_AFTER_S
        if len(_refused) > 4096:
            _refused.clear()
        log.warning("framed port unreachable; using gRPC for this stream", address=address, port=port,
                    retry_after_s=RETRY_FRAMES_AFTER_S, error=echo(str(e) or type(e).__name__, 200))
        return None
    _refused.pop((address, port), None)
    return call


async def open_stream(address: str, method: str, parse: Callable[[bytes], Any], open_grpc: Callable[[], Any]) -> Any:
    """A stream to ``method`` ("/bluemarble.v1.ShardNode/Calls") at ``address``: framed
    when its node offers a framed port this process can reach, else the gRPC stream
    ``open_grpc()`` gives. ``parse`` makes a response from its bytes. Never raises for a
    framed port that fails: that stream goes over gRPC."""
    if _enabled:
        port = _offered.get(address)
        if port is not None:
            framed = await _dial(address, port, method, parse, remembered=True)
            if framed is not None:
                return framed
    call = open_grpc()
    if not _enabled:
        return call
    try:
        try:
            # Bounded: a hung server sends nothing, and its caller's own bounds apply to the stream.
            async with asyncio.timeout(DIAL_TIMEOUT_S):
                port = offered_port(await asyncio.shield(call.initial_metadata()))
        except Exception:  # the stream's own status, or no answer yet: its caller finds out
            return call
        if port is None:
            return call
        framed = await _dial(address, port, method, parse)
    except asyncio.CancelledError:  # the caller gave up (a client closing): the stream goes too
        call.cancel()
        raise
    if framed is None:
        return call
    _offered[address] = port
    call.cancel()
    return framed
