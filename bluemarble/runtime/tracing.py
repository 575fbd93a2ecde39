"""OpenTelemetry tracing set-up shared by every BlueMarble process.

Off by default: with tracing off no interceptor is installed and a call costs nothing
extra. :func:`configure` turns it on when the standard ``OTEL_`` environment asks for it:

* ``OTEL_SDK_DISABLED=true`` keeps it off, whatever else is set;
* ``OTEL_TRACES_EXPORTER`` names the exporters (comma-separated): ``otlp`` (OTLP over
  gRPC, to ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
  default localhost:4317) or ``console`` (spans as JSON on stdout, for debugging);
  ``none`` keeps it off;
* without ``OTEL_TRACES_EXPORTER``, setting ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) means ``otlp``.

The SDK reads the rest itself: ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``
(which override the service name given here), ``OTEL_TRACES_SAMPLER`` (e.g.
``parentbased_traceidratio`` with ``OTEL_TRACES_SAMPLER_ARG=0.01``), the OTLP exporter's
headers, timeout and TLS settings, the batch processor's queue sizes.

Spans: one per RPC served and one per RPC made on a channel of
:func:`bluemarble.runtime.channels.channel`, from opentelemetry-instrumentation-grpc's
grpc.aio interceptors. The client interceptor injects the W3C ``traceparent`` into the
call's metadata and the server interceptor continues it, so one trade is one trace:
ExecuteTrade on the coordinator, its Prepare/Commit calls, and the participants' spans.
Health checks and reflection are not traced (``OTEL_PYTHON_GRPC_EXCLUDED_SERVICES`` adds
more services to skip).
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import trace

_server_interceptors: list[Any] = []
_client_interceptors: list[Any] = []
_enabled = False

UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
"""Services whose calls make no span: probes every few seconds would drown the traces."""


def enabled() -> bool:
    """Whether tracing is on in this process (after :func:`configure`)."""
    return _enabled


def exporters_from_env(env: dict[str, str] | os._Environ[str] | None = None) -> list[str]:
    """The exporter names the ``OTEL_`` environment asks for ([] when tracing stays off);
    see the module docstring. Unknown names are returned as given (:func:`configure`
    refuses them)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if named:
        return [n for n in named if n != "none"]
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return ["otlp"]
    return []


def _span_exporter(name: str) -> Any:
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER names {name!r}; BlueMarble supports otlp, console or none")


def _traced(service: str, excluded: frozenset[str]) -> bool:
    return service not in excluded


def configure(service_name: str, *, exporter: Any = None, simple: bool = False) -> bool:
    """Sets up tracing for this process as ``service_name`` when the environment asks for
    it (see the module docstring), or with ``exporter`` (a SpanExporter, e.g. the SDK's
    InMemorySpanExporter in tests) whatever the environment says. Returns whether
    tracing is on. Call it once, before building servers and channels: their
    interceptors are chosen when they are built.

    Spans are exported in batches off the event loop (BatchSpanProcessor); ``simple``
    exports each span as it ends instead (tests). Raises ``ValueError`` for an exporter
    name it does not know.
    """
    global _enabled
    if exporter is not None:
        exporters = [exporter]
    else:
        exporters = [_span_exporter(name) for name in exporters_from_env()]
    if not exporters:
        return _enabled
    from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    def processor(span_exporter: Any) -> Any:
        return SimpleSpanProcessor(span_exporter) if simple else BatchSpanProcessor(span_exporter)

    active = trace.get_tracer_provider()
    if isinstance(active, TracerProvider):
        # OpenTelemetry sets the global provider once per process: a later call (tests)
        # adds its exporters to it, and its service name stays the first one.
        for span_exporter in exporters:
            active.add_span_processor(processor(span_exporter))
        if _enabled:
            return True
    else:
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
        for span_exporter in exporters:
            provider.add_span_processor(processor(span_exporter))
        trace.set_tracer_provider(provider)
    extra = os.environ.get("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES", "")
    excluded = frozenset([*UNTRACED_SERVICES, *(s.strip() for s in extra.split(",") if s.strip())])

    def server_filter(details: Any) -> bool:
        return _traced(details.method.lstrip("/").split("/", 1)[0], excluded)

    def client_filter(details: Any) -> bool:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        return _traced(method.lstrip("/").split("/", 1)[0], excluded)

    _server_interceptors[:] = [aio_server_interceptor(filter_=server_filter)]  # type: ignore[no-untyped-call]
    _client_interceptors[:] = aio_client_interceptors(filter_=client_filter)  # type: ignore[no-untyped-call]
    _enabled = True
    return True


def disable() -> None:
    """Servers and channels built from now on get no tracing interceptors (those built
    already keep theirs), and log lines no trace ids: for tests that turned tracing on
    in a process shared with others. The global tracer provider stays (OpenTelemetry
    sets it once per process); :func:`configure` turns tracing on again."""
    global _enabled
    _enabled = False
    _server_interceptors.clear()
    _client_interceptors.clear()


def shutdown() -> None:
    """Flushes and stops the exporters (spans still queued are sent, within the SDK's
    timeout). A no-op when tracing is off."""
    provider = trace.get_tracer_provider()
    stop = getattr(provider, "shutdown", None)
    if _enabled and callable(stop):
        stop()


def current_ids() -> tuple[str, str] | None:
    """The (trace id, span id) of the span active in this context, as 32 and 16 hex
    digits, or None when tracing is off or no span is active."""
    if not _enabled:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def server_interceptors() -> list[Any]:
    """grpc.aio server interceptors to install (empty when tracing is off)."""
    return list(_server_interceptors)


def client_interceptors() -> list[Any]:
    """grpc.aio client interceptors for every channel (empty when tracing is off)."""
    return list(_client_interceptors)
