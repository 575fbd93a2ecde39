"""structlog set-up shared by every BlueMarble process.

Logs go to stderr, one event per line: key=value for people by default, JSON with
``--log-format json`` (what a log pipeline in Kubernetes wants). Request context (rpc
name, peer, node id) is bound through contextvars by the server interceptor, so every
line logged while serving a call carries it.

Libraries log through the stdlib ``logging`` module (etcd3aio, grpc's Python code,
asyncio). The root logger's one handler renders their records with the same processors
and renderer (:class:`structlog.stdlib.ProcessorFormatter`), adding the library's logger
name, so every line of a process has one format. Our own events skip ``logging``
entirely (structlog's PrintLogger): that is the cheaper path, and heartbeats log.

With tracing on (:mod:`bluemarble.runtime.tracing`), every line logged inside a span
carries ``trace_id`` and ``span_id`` (hex, as trace back ends show them), so a log line
leads to its trace and back. Fields that hold for the whole process (a node's
``node_id``) are set once with :func:`bind_process`: unlike contextvars, which the
server clears at the start of every call, they are on every line.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

from bluemarble.core.limits import echo as limits_echo
from bluemarble.runtime import tracing

LogFormat = Literal["auto", "console", "json"]

LEVELS = ("debug", "info", "warning", "error")
"""The values of every process's ``--log-level`` (any case)."""


def level_name(text: str) -> str:
    """``text`` as one of :data:`LEVELS` (lower-cased); the argparse type of ``--log-level``.

    Raises ValueError for anything else (argparse reports it as a usage error)."""
    name = text.strip().lower()
    if name not in LEVELS:
        raise ValueError(f"unknown log level {limits_echo(text)}; use {', '.join(LEVELS)}")
    return name


_process_fields: dict[str, object] = {}


def bind_process(**fields: object) -> None:
    """Adds ``fields`` (e.g. ``node_id``) to every line this process logs from now on;
    a field logged explicitly or bound for a request wins over them."""
    _process_fields.update(fields)


def add_process_fields(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    """structlog processor: the fields of :func:`bind_process`."""
    for key, value in _process_fields.items():
        event.setdefault(key, value)
    return event


def add_trace_ids(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    """structlog processor: ``trace_id`` and ``span_id`` of the active span, when tracing
    is on and a span is active (nothing otherwise: one flag test per line)."""
    if tracing.enabled():
        ids = tracing.current_ids()
        if ids is not None:
            event.setdefault("trace_id", ids[0])
            event.setdefault("span_id", ids[1])
    return event


class _DropLateAnswers(logging.Filter):
    """Drops grpc.aio's error line (with a traceback) for an answer the call could no
    longer take: the client's deadline passed, or it cancelled, while the method ran. The
    client has its DEADLINE_EXCEEDED or CANCELLED already; for the server it is routine
    (an outside check with 1 ms deadlines got one such traceback per few hundred calls)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("ExecuteBatchError raised in core by servicer method")


_GRPC_AIO_LOGGER = "grpc._cython.cygrpc"


def configure(level: str = "info", fmt: LogFormat = "console", *, stream: TextIO | None = None) -> None:
    """Configures structlog and the stdlib root logger (which grpc and etcd3aio use).

    ``stream`` defaults to ``sys.stderr``; ``fmt="auto"`` picks console when it is a
    terminal and JSON otherwise (a container's stderr). Library loggers are shown from WARNING up
    (their INFO lines are noise), or from ``level`` if that is higher. Calling it again
    replaces the previous set-up.
    """
    numeric = logging.getLevelName(level_name(level).upper())
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":  # a person at a terminal reads key=value; a log pipeline wants JSON
        fmt = "console" if out.isatty() else "json"
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_process_fields,
        add_trace_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    rendering: list[structlog.types.Processor] = [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=[*shared, *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
        )
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.WARNING))
    grpc_aio = logging.getLogger(_GRPC_AIO_LOGGER)
    for old_filter in [f for f in grpc_aio.filters if isinstance(f, _DropLateAnswers)]:
        grpc_aio.removeFilter(old_filter)
    if numeric > logging.DEBUG:
        grpc_aio.addFilter(_DropLateAnswers())
