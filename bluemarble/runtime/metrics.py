"""Prometheus metrics of every BlueMarble process (``--metrics-listen HOST:PORT``).

Every metric a process exposes is declared here, once, so the names the Helm chart's
alerts and dashboard query (``helm/bluemarble``) have one home. Processes create them all
and only update the ones they own: a shard node's trade counters stay at zero, as a
control plane's replication lag does. Names follow Prometheus conventions: a
``bluemarble_`` prefix, base units (seconds), ``_total`` on counters.

Serving is off unless ``--metrics-listen`` is given: :func:`serve` starts
prometheus-client's HTTP server on a daemon thread (it answers ``GET /metrics``), so a
scrape never waits on the event loop.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import Counter, Histogram

# Latency buckets (seconds) for RPCs and trade phases: 0.5 ms .. 10 s.
_LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

# --- every gRPC server (bluemarble.runtime.grpc_server) ---------------------------------
RPC_REQUESTS = Counter(
    "bluemarble_rpc_requests_total",
    "RPCs served, by full method name and gRPC status code.",
    ["method", "code"],
)
RPC_DURATION = Histogram(
    "bluemarble_rpc_duration_seconds",
    "Time to serve an RPC (streams: the stream's lifetime), by full method name.",
    ["method"],
    buckets=_LATENCY_BUCKETS_S,
)


def observe_rpc(method: str, code: str, elapsed_s: float) -> None:
    """Records one served RPC: ``method`` "/pkg.Service/Method", ``code`` a
    grpc.StatusCode name ("OK", "NOT_FOUND", ...)."""
    RPC_REQUESTS.labels(method, code).inc()
    RPC_DURATION.labels(method).observe(elapsed_s)


def serve(listen: str) -> int:
    """Serves ``/metrics`` on ``listen`` ("host:port"; port 0 picks one) from a daemon
    thread and returns the bound port. Raises ``OSError`` when the address cannot be bound."""
    host, _, port = listen.rpartition(":")
    server, _thread = prometheus_client.start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
    return int(server.server_port)
