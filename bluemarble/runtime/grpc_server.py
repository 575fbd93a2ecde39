"""The one place that builds a gRPC server for a BlueMarble process.

:func:`build_server` wires the servicers with what every server must have: the error
mapping and request-context interceptor (:func:`with_error_mapping`), ``grpc.health.v1.Health``, server reflection
(so ``grpcurl -plaintext HOST:PORT list`` works), TLS or mutual TLS when the process is
configured for it (:mod:`bluemarble.runtime.tls`), a request size cap sized to the
server's API, keepalive policy, and a guard against undecodable requests
(:func:`guard_decoding`). :meth:`Server.stop_gracefully` flips health to NOT_SERVING, then
lets calls in flight finish within a grace period; :meth:`Server.end_streams` first ends
the response streams that would otherwise hold that grace period to its end.

Every status message a server sends is at most :data:`MAX_STATUS_MESSAGE_CHARS` long: a
message travels in HTTP/2 trailers, and one that echoed a megabyte of input would exceed
the metadata limit and reach the client as RESOURCE_EXHAUSTED instead of the error.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import inspect
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import structlog
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from bluemarble.api.messages import SHUTTING_DOWN_KEY
from bluemarble.core import limits
from bluemarble.core.errors import BlueMarbleError, ResourceExhausted, Unavailable
from bluemarble.core.limits import MAX_MESSAGE_BYTES
from bluemarble.runtime import channels, metrics, retry, tls, tracing

log = structlog.get_logger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]
# grpc's method handlers as the generated code builds them (a namedtuple). grpc-stubs type
# them for the synchronous server only, so they are Any here.
MethodHandler = Any

_RETRYABLE_FAILURES = retry.FailureLog()
_REFUSALS = retry.FailureLog(warn=False)
_QUOTED_OR_NUMBER = re.compile(r"'[^']*'|\"[^\"]*\"|\d+")

MAX_STATUS_MESSAGE_CHARS = 400
"""Longest status message (and logged error) a server sends; longer ones are cut."""

_MAX_DECODE_ERROR_CHARS = 160
_PARSE_ERROR_PREFIX = re.compile(r"^Error parsing message( with type '[^']*')?:?\s*")

SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    # grpc.max_receive_message_length is set per server by build_server.
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Clients ping every 6 s (bluemarble.runtime.channels) to detect hung peers; allow that.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    # The server pings its clients too: a client that froze (SIGSTOP, a hung host) or
    # vanished without a FIN no longer holds its streams and connection for good.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # A connection that has not finished its handshake (TLS, and the client's HTTP/2
    # preface and SETTINGS) in 20 s is closed: gRPC's default, 120 s, lets a client that
    # opens connections and stalls hold them four times as long.
    ("grpc.server_handshake_timeout_ms", 20_000),
    ("grpc.so_reuseport", 0),
)


class _MethodAwarePool:
    """The descriptor pool reflection answers from, finding methods too, and answering
    the API's files with their comments.

    ``grpcurl describe bluemarble.v1.ControlPlane.ListNodes`` asks for the file containing
    a *method*; protobuf's upb pool finds services, messages, fields and enum values but
    not methods, so reflection answered "not found". A method is found here through its
    service. The compiled-in descriptors carry no comments; the files of ``documented``
    (file name -> FileDescriptorProto with source info) are answered from there instead.
    Everything else is the wrapped pool's."""

    def __init__(self, pool: descriptor_pool.DescriptorPool,
                 documented: dict[str, descriptor_pb2.FileDescriptorProto] | None = None):
        self._pool = pool
        self._documented = documented or {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileByName(self, name: str) -> Any:
        return _DocumentedFile(self._pool.FindFileByName(name), self._documented)

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        try:
            return _DocumentedFile(self._pool.FindFileContainingSymbol(symbol), self._documented)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            try:
                found = self._pool.FindServiceByName(service) if service else None
            except KeyError:
                found = None
            if found is not None and method in found.methods_by_name:
                return _DocumentedFile(found.file, self._documented)
            raise


class _DocumentedFile:
    """A file descriptor whose proto (what reflection sends) carries its comments when
    they are known; its dependencies likewise."""

    def __init__(self, file: Any, documented: dict[str, descriptor_pb2.FileDescriptorProto]):
        self._file = file
        self._documented = documented

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    @property
    def dependencies(self) -> list[_DocumentedFile]:
        return [_DocumentedFile(d, self._documented) for d in self._file.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        documented = self._documented.get(self._file.name)
        if documented is None:
            self._file.CopyToProto(proto)
        else:
            proto.CopyFrom(documented)


@functools.cache
def _documented_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """The API's files with their comments (``bluemarble/v1/descriptors.binpb``, written
    by scripts/gen_protos.py beside the stubs), by file name; none if it is missing."""
    try:
        data = importlib.resources.files("bluemarble.v1").joinpath("descriptors.binpb").read_bytes()
        files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    except (OSError, ValueError, DecodeError) as e:
        log.warning("API descriptors with comments not found; reflection answers without them", error=str(e))
        return {}
    return {f.name: f for f in files}


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
"""Server reflection's stable name. grpcio-reflection serves only v1alpha; clients that ask
v1 first (newer grpcurl, Postman, grpcui) get the same service under this name."""


def _install_reflection_v1() -> None:
    """Adds ``grpc/reflection/v1/reflection.proto`` to the default descriptor pool, once:
    v1alpha's file under the v1 package. The two define the same messages, field for
    field, so v1alpha's classes read and write v1's bytes, and reflection can describe
    the v1 service like any other."""
    pool = descriptor_pool.Default()
    name = "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(name)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    file.name, file.package = name, "grpc.reflection.v1"
    file.options.Clear()
    file.options.java_package = "io.grpc.reflection.v1"
    file.options.java_multiple_files = True
    file.options.java_outer_classname = "ServerReflectionProto"
    file.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    for message in file.message_type:
        for field in message.field:
            if field.type_name:  # assigning even "" would mark a scalar as typed
                field.type_name = field.type_name.replace(old, new)
    for service in file.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.AddSerializedFile(file.SerializeToString())


def _add_reflection_v1(servicer: Any, server: Any) -> None:
    """``add_ServerReflectionServicer_to_server`` for v1 (see :data:`REFLECTION_V1`)."""
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, handlers),))
    server.add_registered_method_handlers(REFLECTION_V1, handlers)


MAX_REFLECTION_NAME_CHARS = 1024
"""Longest file or symbol name a reflection request may ask about: no name of the served
protos comes near it. A longer one is answered NOT_FOUND without being echoed back whole
(the reflection protocol returns each request in ``original_request``)."""


class _BoundedReflection(reflection.aio.ReflectionServicer):  # type: ignore[misc,name-defined]
    """grpcio-reflection's servicer (which echoes a 1 MB name back whole), with names over
    :data:`MAX_REFLECTION_NAME_CHARS` answered NOT_FOUND and cut in the echoed request."""

    async def ServerReflectionInfo(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for request in request_iterator:
            refused = _oversized_reflection(request)
            if refused is not None:
                yield refused
                continue
            async for response in super().ServerReflectionInfo(_just(request), context):
                yield response


async def _just(request: Any) -> AsyncIterator[Any]:
    yield request


def _oversized_reflection(request: Any) -> Any:
    """A NOT_FOUND answer to a reflection request naming something too long, else None."""
    kind = request.WhichOneof("message_request")
    extension = kind == "file_containing_extension"
    name = request.file_containing_extension.containing_type if extension else getattr(request, kind or "host")
    if not isinstance(name, str):  # all_extension_numbers_of_type, list_services: strings too; none else
        name = ""
    longest = max(len(name), len(request.host))
    if longest <= MAX_REFLECTION_NAME_CHARS:
        return None
    echoed = reflection_pb2.ServerReflectionRequest()
    echoed.CopyFrom(request)
    echoed.host = request.host[:100]
    if extension:
        echoed.file_containing_extension.containing_type = name[:100]
    elif name:
        setattr(echoed, kind, name[:100])
    return reflection_pb2.ServerReflectionResponse(
        original_request=echoed,
        error_response=reflection_pb2.ErrorResponse(
            error_code=grpc.StatusCode.NOT_FOUND.value[0],
            error_message=f"no name of {longest} characters is served (names are at most "
                          f"{MAX_REFLECTION_NAME_CHARS})",
        ),
    )


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer plus the generated ``add_XServicer_to_server`` function and full name."""

    full_name: str
    servicer: object
    add_to_server: Callable[[Any, grpc.aio.Server], None]


def _abort_status(err: BlueMarbleError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.status, grpc.StatusCode.INTERNAL)


def short_message(text: str, limit: int = MAX_STATUS_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying so: what a status message may carry."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40]}... (message cut, {len(text)} chars)"


class OpenStreams:
    """The handler tasks of a server's response streams, so that a stopping server can
    end them at once (:meth:`Server.end_streams`) instead of waiting out its grace period
    for streams that never end by themselves (watches, heartbeat streams). Registering
    costs a set insertion per stream, nothing per message."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.reason = ""  # set once the streams are being ended

    def add(self) -> asyncio.Task[Any] | None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        return task

    def discard(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._tasks.discard(task)

    def end(self, reason: str) -> int:
        """Cancels every open stream's handler; each ends UNAVAILABLE with ``reason`` (or
        CANCELLED when the cancel lands in grpc's own code, between two messages). Streams
        opened later end the same way as soon as they start. The number ended."""
        self.reason = reason
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        return len(tasks)


STOPPING_TRAILER = ((SHUTTING_DOWN_KEY, "1"),)
"""Trailing metadata of a stream a server ends because it is shutting down: its clients
log the end at info and move on (:func:`bluemarble.runtime.channels.said_stopping`)."""

RPC_HEADROOM = 256
"""Calls gRPC admits beyond a server's :class:`CallBudget`: room for health checks and
reflection (which the budget does not count) while the budget refuses the rest with its
own message. gRPC refuses past it with "Concurrent RPC limit exceeded!"."""


class CallBudget:
    """The calls and streams a server runs at once, against its limit
    (:data:`~bluemarble.core.limits.MAX_CONCURRENT_RPCS`): a call past it is refused
    RESOURCE_EXHAUSTED before any of its work. One integer each way per call."""

    def __init__(self, limit: int = limits.MAX_CONCURRENT_RPCS):
        assert limit > 0, limit
        self.limit = limit
        self.active = 0
        self.refused = 0

    def take(self, method: str) -> None:
        """Counts one more call, or raises ResourceExhausted when the server runs its limit."""
        if self.active >= self.limit:
            self.refused += 1
            raise ResourceExhausted(
                f"this server is running {self.limit} calls and streams at once (its limit); retry "
                f"{method.rsplit('/', 1)[-1]} after a backoff"
            )
        self.active += 1

    def give_back(self) -> None:
        self.active -= 1


def with_error_mapping(
    servicer: object, full_name: str, streams: OpenStreams | None = None, budget: CallBudget | None = None
) -> object:
    """A copy of ``servicer`` whose RPC methods bind request context for structlog and
    map exceptions to gRPC statuses (the server's one error-mapping interceptor).

    A :class:`BlueMarbleError` becomes its status with its message. Anything else is a
    bug: it is logged with its traceback and answered INTERNAL with an id to find the
    log line, never UNKNOWN. With ``budget``, a call past the server's limit of calls at
    once is refused RESOURCE_EXHAUSTED first. The wrapping happens once per method at registration:
    grpc.aio's ServerInterceptor builds a new handler on every call, which costs more
    than a heartbeat's own work. The same wrapper refuses undecodable requests
    (:func:`guard_decoding` with ``check_requests=False``), so a message crosses one
    wrapper, not two. Response streams are registered in ``streams`` when given.
    """
    service = descriptor_pool.Default().FindServiceByName(full_name)
    wrapped = type(f"Wrapped{service.name}", (), {})()
    for method in service.methods:
        behavior = getattr(servicer, method.name)
        path = f"/{full_name}/{method.name}"
        if method.server_streaming:
            setattr(wrapped, method.name, _wrap_stream(path, behavior, method.client_streaming, streams, budget))
        else:
            setattr(wrapped, method.name, _wrap_unary(path, behavior, method.client_streaming, budget))
    return wrapped


def _code_name(context: Ctx) -> str:
    """The status the call ends with, as far as the servicer set it ("OK" when it did not)."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "OK"


def _bind(method: str, context: Ctx) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(rpc=method.rsplit("/", 1)[-1])


async def _fail(
    method: str, context: Ctx, exc: Exception, started: float
) -> None:
    elapsed_ms = round((time.monotonic() - started) * 1000, 1)
    if type(exc).__name__ == "_ServerStoppedError":
        # grpc.aio ends a stream still open when the server stops (past its grace period)
        # by raising this from the request stream: a shutdown, not a crash. Nothing can be
        # sent any more.
        log.debug("rpc ended: the server stopped", method=method, elapsed_ms=elapsed_ms)
        return
    if type(exc).__name__ == "ExecuteBatchError":
        # gRPC could not send on a call its client already left (it closed its channel or
        # cancelled before the server's first message, e.g. the initial metadata a stream
        # sends at once): nothing broke here, and nobody is left to answer.
        log.debug("rpc ended: the client left", method=method, elapsed_ms=elapsed_ms, error=str(exc)[:200])
        context.set_code(grpc.StatusCode.CANCELLED)
        return
    if isinstance(exc, BlueMarbleError):
        code = _abort_status(exc)
        message = short_message(channels.plain_details(str(exc)))
        if exc.retryable:
            # A dependency that is down fails every call the same way: one warning, then
            # a summary every few seconds (each call at debug), per method and status.
            _RETRYABLE_FAILURES.failed(f"{method} {code.name}", time.monotonic(), "rpc failed", status=code.name,
                                       error=message, elapsed_ms=elapsed_ms, peer=context.peer())
        else:
            # The caller's mistake (bad input, an unknown id): one line, then a summary every
            # few seconds per method, status and kind of refusal (the message without quoted
            # input and numbers), so a client repeating a mistake cannot flood the log while
            # another mistake still shows.
            kind = _QUOTED_OR_NUMBER.sub("", message)[:48]
            _REFUSALS.failed(f"{method} {code.name} {kind}", time.monotonic(), "rpc failed", status=code.name,
                             error=message, elapsed_ms=elapsed_ms, peer=context.peer())
        await context.abort(code, message)
    if isinstance(exc, NotImplementedError):  # the generated servicer's default for a method not overridden
        log.info("rpc refused: not implemented", method=method, peer=context.peer())
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server")
    error_id = uuid.uuid4().hex[:12]
    log.exception("rpc crashed", error_id=error_id, method=method, elapsed_ms=elapsed_ms)
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error in {method} (error id {error_id}); see the server log",
    )


async def _admitted(method: str, request: Any, context: Ctx, client_streaming: bool) -> Any:
    """The request a method may see: a request stream that refuses undecodable messages as
    they come, or the request itself (an undecodable one is refused here)."""
    if client_streaming:
        return _checked_requests(method, request, context)
    if isinstance(request, Undecodable):
        await _refuse_undecodable(method, context, request)
    return request


def _wrap_unary(
    method: str, behavior: Callable[[Any, Ctx], Awaitable[Any]], client_streaming: bool,
    budget: CallBudget | None = None,
) -> Callable[[Any, Ctx], Awaitable[Any]]:
    async def wrapped(request: Any, context: Ctx) -> Any:
        _bind(method, context)
        started = time.monotonic()
        taken = False
        try:
            if budget is not None:
                budget.take(method)
                taken = True
            request = await _admitted(method, request, context, client_streaming)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(method, context, exc, started)
        finally:
            if taken and budget is not None:
                budget.give_back()
            metrics.observe_rpc(method, _code_name(context), time.monotonic() - started)
            structlog.contextvars.clear_contextvars()

    return wrapped


def _wrap_stream(
    method: str, behavior: Callable[[Any, Ctx], Any], client_streaming: bool, streams: OpenStreams | None = None,
    budget: CallBudget | None = None,
) -> Callable[[Any, Ctx], Any]:
    if _writes_responses(behavior):
        return _wrap_unary(method, behavior, client_streaming, budget)

    async def wrapped(request: Any, context: Ctx) -> AsyncIterator[Any]:
        _bind(method, context)
        started = time.monotonic()
        task = streams.add() if streams is not None else None
        taken = False
        try:
            if budget is not None:
                budget.take(method)
                taken = True
            if streams is not None and streams.reason:
                raise asyncio.CancelledError  # opened after the server began to end its streams
            request = await _admitted(method, request, context, client_streaming)
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            if streams is None or not streams.reason:
                raise  # the client went away
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()  # this cancel was ours, and is handled here
            log.debug("stream ended: the server is stopping", method=method)
            await context.abort(grpc.StatusCode.UNAVAILABLE, streams.reason, trailing_metadata=STOPPING_TRAILER)
        except Exception as exc:
            await _fail(method, context, exc, started)
        finally:
            if taken and budget is not None:
                budget.give_back()
            if streams is not None:
                streams.discard(task)
            metrics.observe_rpc(method, _code_name(context), time.monotonic() - started)
            structlog.contextvars.clear_contextvars()

    return wrapped


def _writes_responses(behavior: Callable[[Any, Ctx], Any]) -> bool:
    """True when a response-streaming ``behavior`` is a coroutine that sends its
    responses with ``context.write()`` (grpcio's own servicers, e.g. Health.Watch) rather
    than an async generator that yields them. grpc.aio tells the two apart by the
    handler's kind, so a wrapper must be of the same kind as what it wraps."""
    return inspect.iscoroutinefunction(behavior)


@dataclass(frozen=True)
class Undecodable:
    """Handed to a method instead of a request whose bytes do not parse.

    grpc.aio answers UNKNOWN (and logs a traceback) when a request deserializer raises,
    e.g. protobuf's ``DecodeError`` for a truncated message or a string field that is not
    UTF-8. The deserializers :func:`guard_decoding` installs never raise: they return this,
    and the guarded method refuses it with INVALID_ARGUMENT.
    """

    message_type: str
    error: str

    def describe(self) -> str:
        return (
            f"request is not a valid {self.message_type}: {self.error}; send a complete "
            f"serialized {self.message_type} whose string fields are UTF-8"
        )


def _safe_deserializer(deserialize: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # any failure to parse is the caller's bytes, never a bug here
            # protobuf says "Error parsing message with type 'X': <why>"; keep the why.
            error = _PARSE_ERROR_PREFIX.sub("", str(e)) or type(e).__name__
            return Undecodable(message_type, short_message(error, _MAX_DECODE_ERROR_CHARS))

    return decode


async def _refuse_undecodable(method: str, context: Ctx, bad: Undecodable) -> None:
    log.info(
        "rpc refused: undecodable request",
        rpc=method.rsplit("/", 1)[-1],
        status=grpc.StatusCode.INVALID_ARGUMENT.name,
        error=bad.error,
        peer=context.peer(),
    )
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.describe())


async def _checked_requests(method: str, requests: AsyncIterator[Any], context: Ctx) -> AsyncIterator[Any]:
    """The request stream of a client- or bidi-streaming call; ends the call with
    INVALID_ARGUMENT at the first request that does not parse."""
    async for request in requests:
        if isinstance(request, Undecodable):
            await _refuse_undecodable(method, context, request)
        yield request


def _guard_handler(method: str, message_type: str, handler: MethodHandler, check_requests: bool) -> MethodHandler:
    behavior: Callable[[Any, Ctx], Any] | None = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behavior is not None, method
    deserializer = handler.request_deserializer
    assert deserializer is not None, method

    def requests_of(request: Any, context: Ctx) -> Any:
        if handler.request_streaming:
            return _checked_requests(method, request, context)
        return request

    guarded: Callable[[Any, Ctx], Any]
    if handler.response_streaming and not _writes_responses(behavior):

        async def guarded_stream(request: Any, context: Ctx) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await _refuse_undecodable(method, context, request)
            async for response in behavior(requests_of(request, context), context):
                yield response

        guarded = guarded_stream
    else:

        async def guarded_unary(request: Any, context: Ctx) -> Any:
            if isinstance(request, Undecodable):
                await _refuse_undecodable(method, context, request)
            return await behavior(requests_of(request, context), context)

        guarded = guarded_unary
    kind = (
        ("stream_" if handler.request_streaming else "unary_")
        + ("stream" if handler.response_streaming else "unary")
    )
    # RpcMethodHandler is a namedtuple: keep the serializer and streaming flags.
    if not check_requests:  # the behavior refuses Undecodable itself (with_error_mapping)
        return handler._replace(request_deserializer=_safe_deserializer(deserializer, message_type))
    return handler._replace(
        request_deserializer=_safe_deserializer(deserializer, message_type),
        **{kind: guarded},
    )


class _HandlerRecorder:
    """Stands in for the server while a generated ``add_XServicer_to_server`` runs, so the
    handlers it registers can be guarded (:func:`guard_decoding`) before the real server
    gets them."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, MethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Sequence[MethodHandler]) -> None:
        """Ignored: the same handlers arrive through add_registered_method_handlers."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, MethodHandler]) -> None:
        self.services[service] = dict(handlers)


def guard_decoding(
    server: grpc.aio.Server,
    add_to_server: Callable[[Any, Any], None],
    servicer: object,
    *,
    check_requests: bool = True,
) -> list[str]:
    """Registers ``servicer`` on ``server`` through its generated ``add_to_server`` with
    request deserializers that never raise (:class:`Undecodable`): a request that does
    not parse is answered INVALID_ARGUMENT naming its message type, in unary and streaming
    calls alike, instead of UNKNOWN with a traceback in the log. Returns the full names of
    the services registered.

    Streaming methods must consume requests by iterating them (``async for``), not
    through ``context.read()``, which this guard does not see. ``check_requests=False``
    installs only the deserializers, for a servicer whose methods refuse
    :class:`Undecodable` themselves (those of :func:`with_error_mapping`).
    """
    recorder = _HandlerRecorder()
    add_to_server(servicer, recorder)
    assert recorder.services, "generated add_to_server registered no method handlers"
    pool = descriptor_pool.Default()
    for service, handlers in recorder.services.items():
        guarded = {
            name: _guard_handler(
                f"/{service}/{name}",
                pool.FindMethodByName(f"{service}.{name}").input_type.full_name,
                handler,
                check_requests,
            )
            for name, handler in handlers.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        server.add_registered_method_handlers(service, guarded)  # type: ignore[attr-defined]
    return list(recorder.services)


class HealthServicer(health_aio.HealthServicer):  # type: ignore[misc]
    """grpcio's asyncio health servicer plus ``List``, which grpcio leaves unimplemented
    although the health proto (and so reflection and grpcurl) offers it, and a Check of an
    unknown service that says which ones there are (grpcio's NOT_FOUND has no message)."""

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Ctx) -> health_pb2.HealthCheckResponse:
        statuses: dict[str, int] = self._server_status
        status = statuses.get(request.service)
        if status is None:
            known = ", ".join(repr(name) for name in sorted(statuses)[:8])
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no health status for service {limits.echo(request.service, 128)}; this server reports {known} "
                "('' is the server as a whole)",
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Ctx) -> None:
        """As grpcio's Watch, except that the stream ends (OK) once a graceful stop has
        begun and NOT_SERVING was sent: left open, one watcher held every stop of the
        process for its whole grace period."""
        condition = self._server_watchers[request.service]
        self._watcher_count_by_service[request.service] += 1
        last_status = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last_status:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last_status = status
                    if self._gracefully_shutting_down:
                        return
                    await condition.wait()
        finally:
            self._watcher_count_by_service[request.service] -= 1
            if self._watcher_count_by_service[request.service] == 0:
                del self._server_watchers[request.service]
                del self._watcher_count_by_service[request.service]

    async def List(self, request: health_pb2.HealthListRequest, context: Ctx) -> health_pb2.HealthListResponse:
        """The status of every service this server knows (``""`` is the server as a
        whole), as the proto asks: the same statuses Check and Watch answer with."""
        # grpcio keeps the statuses in this attribute and offers no public reader; a
        # server knows only a handful of services, so the answer is small.
        statuses: dict[str, int] = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in statuses.items()}
        )


class Server:
    """A started gRPC server with its health servicer; see :func:`build_server`."""

    def __init__(self, server: grpc.aio.Server, health: HealthServicer, port: int,
                 streams: OpenStreams | None = None, budget: CallBudget | None = None):
        self.grpc = server
        self.health = health
        self.port = port
        self.streams = streams if streams is not None else OpenStreams()
        self.budget = budget if budget is not None else CallBudget()

    async def set_serving(self, serving: bool, service: str = "") -> None:
        """Sets what ``grpc.health.v1.Health`` reports for ``service`` ("": the process).
        No effect once a graceful stop has begun (everything is NOT_SERVING for good)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(service, status)

    async def end_streams(self, reason: str) -> int:
        """NOT_SERVING, then ends every open response stream of the bound services (and
        any opened from now on) with UNAVAILABLE and ``reason``: for a server whose
        streams carry no work in flight (watches, heartbeats), so that its clients move
        to another server now rather than when the grace period runs out. The number of
        streams ended."""
        await self.health.enter_graceful_shutdown()
        return self.streams.end(reason)

    async def stop_gracefully(self, grace_s: float = 5.0) -> None:
        """NOT_SERVING first (load balancers stop sending), then drain calls for grace_s."""
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(grace_s)


async def check_listen(listen: str) -> None:
    """Binds ``listen`` ("host:port") once and lets it go, as the gRPC server will bind it
    (SO_REUSEADDR, no SO_REUSEPORT). Raises Unavailable naming the address when it cannot
    be resolved or bound (malformed, not local, in use), in the operating system's words:
    gRPC's own failure says only "Failed to bind", after a line of its C core on stderr."""
    host, _, port_text = listen.rpartition(":")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host.strip("[]") or None, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except (OSError, ValueError) as e:
        raise Unavailable(f"cannot listen on {limits.echo(listen)}: {e}") from e


async def build_server(
    listen: str,
    bindings: Iterable[ServiceBinding],
    *,
    max_request_bytes: int = MAX_MESSAGE_BYTES,
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
    not_ready: Iterable[str] = (),
    max_concurrent_rpcs: int = limits.MAX_CONCURRENT_RPCS,
) -> Server:
    """Builds, binds and starts a server on ``listen`` ("host:port"; port 0 picks one).

    ``max_request_bytes`` caps each request message: gRPC refuses a larger one with
    RESOURCE_EXHAUSTED as soon as its length prefix arrives, before it is read or parsed,
    so a huge request costs the server no time. Size it to what the server's API needs
    (:mod:`bluemarble.core.limits`).

    ``max_concurrent_rpcs`` bounds the calls and streams of the bound services running at
    once (:class:`CallBudget`: past it RESOURCE_EXHAUSTED with a message); gRPC itself
    refuses past that plus :data:`RPC_HEADROOM`, which bounds health and reflection too.

    Health reports SERVING for the process ("") and for every bound service, except the
    services named in ``not_ready``: those start NOT_SERVING until the caller says they
    are ready (:meth:`Server.set_serving`).

    The port is TLS when the process has a TLS configuration with a certificate
    (:func:`bluemarble.runtime.tls.configure`), mutual TLS when it also has a CA (a client
    without a certificate signed by it fails the handshake), plaintext otherwise.

    Raises :class:`bluemarble.core.errors.Unavailable` when the address cannot be bound,
    InvalidArgument when TLS is configured without a certificate.
    """
    from bluemarble.core.errors import Unavailable

    assert 0 < max_request_bytes <= MAX_MESSAGE_BYTES, max_request_bytes
    options = [*SERVER_OPTIONS, ("grpc.max_receive_message_length", max_request_bytes)]
    server = grpc.aio.server(
        interceptors=[*tracing.server_interceptors(), *extra_interceptors],
        options=options,
        maximum_concurrent_rpcs=max_concurrent_rpcs + RPC_HEADROOM,
    )
    streams = OpenStreams()
    budget = CallBudget(max_concurrent_rpcs)
    names = []
    for binding in bindings:
        guard_decoding(
            server,
            binding.add_to_server,
            with_error_mapping(binding.servicer, binding.full_name, streams, budget),
            check_requests=False,
        )
        names.append(binding.full_name)
    health = HealthServicer()
    guard_decoding(server, health_pb2_grpc.add_HealthServicer_to_server, health)
    waiting = set(not_ready)
    for name in names:
        await health.set(
            name,
            health_pb2.HealthCheckResponse.NOT_SERVING if name in waiting else health_pb2.HealthCheckResponse.SERVING,
        )
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    _install_reflection_v1()
    names += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, REFLECTION_V1, reflection.SERVICE_NAME]
    reflector = _BoundedReflection(names, pool=_MethodAwarePool(descriptor_pool.Default(), _documented_files()))
    guard_decoding(server, reflection_pb2_grpc.add_ServerReflectionServicer_to_server, reflector)
    guard_decoding(server, _add_reflection_v1, reflector)
    config = tls.current()
    credentials = config.server_credentials() if config is not None else None
    await check_listen(listen)
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as e:
        raise Unavailable(f"cannot listen on {listen}: {e}") from e
    if port == 0:
        raise Unavailable(f"cannot listen on {listen}: the address is in use or invalid")
    await server.start()
    return Server(server, health, port, streams, budget)
