"""The one place that builds a gRPC server for a BlueMarble process.

:func:`build_server` wires the servicers with what every server must have: the error
mapping and request-context interceptor (:func:`with_error_mapping`), ``grpc.health.v1.Health``, server reflection
(so ``grpcurl -plaintext HOST:PORT list`` works), message size limits and keepalive
policy. :func:`stop_gracefully` flips health to NOT_SERVING, then lets calls in flight
finish within a grace period.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import structlog
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from bluemarble.core.errors import BlueMarbleError
from bluemarble.core.limits import MAX_MESSAGE_BYTES

log = structlog.get_logger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]

SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Clients ping every 10 s to detect dead connections; allow that.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.so_reuseport", 0),
)


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer plus the generated ``add_XServicer_to_server`` function and full name."""

    full_name: str
    servicer: object
    add_to_server: Callable[[Any, grpc.aio.Server], None]


def _abort_status(err: BlueMarbleError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.status, grpc.StatusCode.INTERNAL)


def with_error_mapping(servicer: object, full_name: str) -> object:
    """A copy of ``servicer`` whose RPC methods bind request context for structlog and
    map exceptions to gRPC statuses (the server's one error-mapping interceptor).

    A :class:`BlueMarbleError` becomes its status with its message. Anything else is a
    bug: it is logged with its traceback and answered INTERNAL with an id to find the
    log line, never UNKNOWN. The wrapping happens once per method at registration:
    grpc.aio's ServerInterceptor builds a new handler on every call, which costs more
    than a heartbeat's own work.
    """
    service = descriptor_pool.Default().FindServiceByName(full_name)
    wrapped = type(f"Wrapped{service.name}", (), {})()
    for method in service.methods:
        behavior = getattr(servicer, method.name)
        path = f"/{full_name}/{method.name}"
        wrap = _wrap_stream if method.server_streaming else _wrap_unary
        setattr(wrapped, method.name, wrap(path, behavior))
    return wrapped


def _bind(method: str, context: Ctx) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(rpc=method.rsplit("/", 1)[-1])


async def _fail(
    method: str, context: Ctx, exc: Exception, started: float
) -> None:
    elapsed_ms = round((time.monotonic() - started) * 1000, 1)
    if isinstance(exc, BlueMarbleError):
        code = _abort_status(exc)
        level = log.info if not exc.retryable else log.warning
        level("rpc failed", status=code.name, error=str(exc), elapsed_ms=elapsed_ms, peer=context.peer())
        await context.abort(code, str(exc))
    error_id = uuid.uuid4().hex[:12]
    log.exception("rpc crashed", error_id=error_id, method=method, elapsed_ms=elapsed_ms)
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error in {method} (error id {error_id}); see the server log",
    )


def _wrap_unary(
    method: str, behavior: Callable[[Any, Ctx], Awaitable[Any]]
) -> Callable[[Any, Ctx], Awaitable[Any]]:
    async def wrapped(request: Any, context: Ctx) -> Any:
        _bind(method, context)
        started = time.monotonic()
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(method, context, exc, started)
        finally:
            structlog.contextvars.clear_contextvars()

    return wrapped


def _wrap_stream(
    method: str, behavior: Callable[[Any, Ctx], AsyncIterator[Any]]
) -> Callable[[Any, Ctx], AsyncIterator[Any]]:
    async def wrapped(request: Any, context: Ctx) -> AsyncIterator[Any]:
        _bind(method, context)
        started = time.monotonic()
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(method, context, exc, started)
        finally:
            structlog.contextvars.clear_contextvars()

    return wrapped


class Server:
    """A started gRPC server with its health servicer; see :func:`build_server`."""

    def __init__(self, server: grpc.aio.Server, health: health_aio.HealthServicer, port: int):
        self.grpc = server
        self.health = health
        self.port = port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)

    async def stop_gracefully(self, grace_s: float = 5.0) -> None:
        """NOT_SERVING first (load balancers stop sending), then drain calls for grace_s."""
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(grace_s)


async def build_server(
    listen: str,
    bindings: Iterable[ServiceBinding],
    *,
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
) -> Server:
    """Builds, binds and starts a server on ``listen`` ("host:port"; port 0 picks one).

    Raises :class:`bluemarble.core.errors.Unavailable` when the address cannot be bound.
    """
    from bluemarble.core.errors import Unavailable

    server = grpc.aio.server(interceptors=list(extra_interceptors), options=SERVER_OPTIONS)
    names = []
    for binding in bindings:
        binding.add_to_server(with_error_mapping(binding.servicer, binding.full_name), server)
        names.append(binding.full_name)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in names:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    names += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as e:
        raise Unavailable(f"cannot listen on {listen}: {e}") from e
    if port == 0:
        raise Unavailable(f"cannot listen on {listen}: the address is in use or invalid")
    await server.start()
    return Server(server, health, port)
