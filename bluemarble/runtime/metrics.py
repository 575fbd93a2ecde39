"""Prometheus metrics of every BlueMarble process (``--metrics-listen HOST:PORT``).

Every metric a process exposes is declared here, once, so the names the Helm chart's
alerts and dashboard query (``helm/bluemarble``) have one home. Processes create them all
and only update the ones they own: a shard node's trade counters stay at zero, as a
control plane's replication lag does. Names follow Prometheus conventions: a
``bluemarble_`` prefix, base units (seconds), ``_total`` on counters.

Serving is off unless ``--metrics-listen`` is given: :func:`serve` starts a small HTTP
server on a daemon thread (``GET``/``HEAD /metrics``; 404 elsewhere), so a scrape never
waits on the event loop. It runs at most :data:`METRICS_MAX_CONNECTIONS` connections at
once, each dropped after :data:`METRICS_IDLE_TIMEOUT_S` without progress, and closes
the others as they arrive: a thousand idle connections (prometheus-client's own server
runs a thread for each, for ever) cost the process threads, memory and, through the
interpreter's lock, seconds of its event loop.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.server
import socket
import threading
import time
from typing import Any

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from bluemarble.core import validation
from bluemarble.core.errors import InvalidArgument
from bluemarble.runtime.settings import EnvArgumentParser

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


GC_PAUSE = Histogram(
    "bluemarble_gc_pause_seconds",
    "Pauses of the cyclic garbage collector (the whole process stops), by generation "
    "(2: full collections).",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)

EVENT_LOOP_STALLS = Counter(
    "bluemarble_event_loop_stalls_total",
    "Times this process did not run for a second or more (SIGSTOP, a frozen VM, a long "
    "synchronous step, CPU starvation): bluemarble.runtime.stalls.",
)

_gc_started_s: list[float] = [0.0]


def _time_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started_s[0] = time.perf_counter()
    else:
        GC_PAUSE.labels(str(info["generation"])).observe(time.perf_counter() - _gc_started_s[0])


def observe_gc_pauses() -> None:
    """Times every garbage collection of this process into :data:`GC_PAUSE` (once)."""
    if _time_gc not in gc.callbacks:
        gc.callbacks.append(_time_gc)


_rpc_children: dict[tuple[str, str], tuple[Any, Any]] = {}
_rpc_children_lock = threading.Lock()


def observe_rpc(method: str, code: str, elapsed_s: float) -> None:
    """Records one served RPC: ``method`` "/pkg.Service/Method", ``code`` a
    grpc.StatusCode name ("OK", "NOT_FOUND", ...).

    The labelled children are cached per (method, code): ``.labels()`` takes a lock and
    builds a tuple key on every call, which a heartbeat-heavy server pays thousands of
    times a second. Both label sets are bounded (the services' methods, the status codes).
    """
    children = _rpc_children.get((method, code))
    if children is None:
        with _rpc_children_lock:
            children = (RPC_REQUESTS.labels(method, code), RPC_DURATION.labels(method))
            _rpc_children[(method, code)] = children
    children[0].inc()
    children[1].observe(elapsed_s)


# --- control plane -----------------------------------------------------------------------
IS_LEADER = Gauge(
    "bluemarble_is_leader",
    "1 while this control-plane replica holds the leader key (and its lease is valid), else 0.",
)
LEADER_CHANGES = Counter(
    "bluemarble_leader_changes_total",
    "Terms this replica won (summed over replicas: the cluster's leader changes).",
)
REGISTERED_NODES = Gauge(
    "bluemarble_registered_nodes",
    "Node records in this replica's mirror (nodes holding a live lease).",
)
LEASE_EXPIRATIONS = Counter(
    "bluemarble_lease_expirations_total",
    "Node leases that ended without a graceful leave, as this replica saw them: a node "
    "heartbeating on a lease that had expired, or a crashed node's lease revoked early.",
)
RECONCILE_ROUNDS = Counter(
    "bluemarble_reconcile_rounds_total",
    "Reconcile rounds the leader planned (rounds skipped because nothing changed are not counted).",
)
RECONCILE_MOVES = Counter(
    "bluemarble_reconcile_moves_total",
    "Placement moves (promotions, new replicas, handoffs, drains) the leader wrote.",
)
ASSIGNMENT_PROPAGATION = Histogram(
    "bluemarble_assignment_propagation_seconds",
    "From the leader sending a round's assignment writes to etcd until its own mirror "
    "(what every replica's WatchAssignments streams serve) shows them.",
    buckets=_LATENCY_BUCKETS_S,
)
SHARDS_WITHOUT_PRIMARY = Gauge(
    "bluemarble_shards_without_primary",
    "Shards of the ring with no primary in this replica's mirror (no record, none named, or one not "
    "registered in the incarnation given the role).",
)
TRADES = Counter(
    "bluemarble_trades_total",
    "Trades answered, by kind (cross_shard, same_shard) and outcome (committed, aborted). "
    "Control plane: the cross-shard trades it coordinated; shard node: the same-shard trades it "
    "executed, from a client or a coordinator. Each trade is counted once: sum over processes.",
    ["kind", "outcome"],
)
FRAMED_STREAMS = Counter(
    "bluemarble_framed_streams_total",
    "Streams opened on this process's framed port, by method (a shard node's Calls and "
    "Replicate, a control plane's ExecuteTrades). Clients use the port once the server offers "
    "it on the gRPC stream; a count that stays at 0 while the gRPC streams run means they "
    "cannot reach it (a firewall, a NetworkPolicy: their logs say so).",
    ["method"],
)
TRADE_PHASE = Histogram(
    "bluemarble_trade_phase_seconds",
    "Time of each phase of a cross-shard trade at its coordinator: prepare (both legs), "
    "decide (the decision's etcd write), commit (phase 2: both settles), total.",
    ["phase"],
    buckets=_LATENCY_BUCKETS_S,
)
TRADES_IN_DOUBT = Gauge(
    "bluemarble_trades_in_doubt",
    "Control plane (leader): decided cross-shard trades older than the sweep's minimum age "
    "whose phase 2 is still unfinished. Shard node: escrows (PREPARED legs) past their deadline "
    "on the shards it leads (being settled by termination; younger ones are trades in flight).",
)

# --- shard node --------------------------------------------------------------------------
REPLICATION_LAG_ENTRIES = Gauge(
    "bluemarble_replication_lag_entries",
    "Primary's view: log entries its farthest replica is missing, per shard it leads.",
    ["shard"],
)
NODE_READY = Gauge(
    "bluemarble_node_ready",
    "1 while the node is ready (registered, serving as primary of the shards it leads, caught "
    "up on the shards it follows: what its readiness probe reports), else 0.",
    ["node"],
)
REPLICATION_LAG_SECONDS = Gauge(
    "bluemarble_replication_lag_seconds",
    "Primary's view: age of the oldest entry its farthest replica is missing, per shard it leads.",
    ["shard"],
)

# Children of the labelled metrics that hot paths update, resolved once.
CROSS_SHARD_COMMITTED = TRADES.labels("cross_shard", "committed")
CROSS_SHARD_ABORTED = TRADES.labels("cross_shard", "aborted")
SAME_SHARD_COMMITTED = TRADES.labels("same_shard", "committed")
SAME_SHARD_ABORTED = TRADES.labels("same_shard", "aborted")
PHASE_PREPARE = TRADE_PHASE.labels("prepare")
PHASE_DECIDE = TRADE_PHASE.labels("decide")
PHASE_COMMIT = TRADE_PHASE.labels("commit")
PHASE_TOTAL = TRADE_PHASE.labels("total")


def count_trade(cross_shard: bool, committed: bool) -> None:
    """Counts one answered trade in ``bluemarble_trades_total``."""
    if cross_shard:
        (CROSS_SHARD_COMMITTED if committed else CROSS_SHARD_ABORTED).inc()
    else:
        (SAME_SHARD_COMMITTED if committed else SAME_SHARD_ABORTED).inc()


class ReplicationLag:
    """The per-shard lag gauges of one node: :meth:`update` with what the node reports
    about the shards it leads; shards it stopped leading lose their series (a stale lag
    of a shard led elsewhere now would page someone for nothing)."""

    def __init__(self) -> None:
        self._shards: set[str] = set()

    def update(self, lags: dict[str, tuple[int, float]]) -> None:
        """``lags``: shard -> (entries missing, seconds behind) of its farthest replica."""
        for shard in self._shards - lags.keys():
            REPLICATION_LAG_ENTRIES.remove(shard)
            REPLICATION_LAG_SECONDS.remove(shard)
        for shard, (entries, seconds) in lags.items():
            REPLICATION_LAG_ENTRIES.labels(shard).set(entries)
            REPLICATION_LAG_SECONDS.labels(shard).set(seconds)
        self._shards = set(lags)


def add_flag(p: EnvArgumentParser) -> None:
    """The ``--metrics-listen`` flag every BlueMarble process shares."""
    p.add_flag("--metrics-listen", default="", help="serve Prometheus /metrics on host:port (default: off)")


def listen_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The checked ``--metrics-listen`` ("" = off); a malformed one ends the process with
    a usage error naming the flag."""
    if args.metrics_listen:
        try:
            check_listen(args.metrics_listen)
        except InvalidArgument as e:
            p.error(str(e))
    return str(args.metrics_listen)


def check_listen(value: str, flag: str = "--metrics-listen") -> str:
    """``value`` if it is a "host:port" to serve metrics on (port 0: any free port);
    InvalidArgument naming ``flag`` and the expected form otherwise."""
    host, sep, port = value.rpartition(":")
    validation.address(f"{host}:1" if sep and port == "0" else value, flag)
    return value


CONTROL_PLANE_ONLY = (IS_LEADER, LEADER_CHANGES, REGISTERED_NODES, LEASE_EXPIRATIONS, RECONCILE_ROUNDS,
                      RECONCILE_MOVES, ASSIGNMENT_PROPAGATION, SHARDS_WITHOUT_PRIMARY, TRADE_PHASE)
"""Metrics only a control plane sets. Unlabelled ones would show 0 on a shard node's
/metrics (``is_leader 0`` on every node misleads a dashboard): a node drops them."""


def drop_control_plane_metrics() -> None:
    """Unregisters :data:`CONTROL_PLANE_ONLY` from this process's registry (a shard node,
    before it serves /metrics). Idempotent."""
    for collector in CONTROL_PLANE_ONLY:
        with contextlib.suppress(KeyError):
            prometheus_client.REGISTRY.unregister(collector)


METRICS_MAX_CONNECTIONS = 16
"""Connections the metrics server serves at once (a scraper uses one at a time)."""
METRICS_IDLE_TIMEOUT_S = 5.0
"""A connection that sends or takes nothing for this long is closed."""


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    """One request per connection: ``/metrics`` in the format the scraper accepts."""

    timeout = METRICS_IDLE_TIMEOUT_S  # the socket's: a slow or silent client is dropped
    protocol_version = "HTTP/1.0"
    server_version = "bluemarble-metrics"

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        output = encoder(prometheus_client.REGISTRY)
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(output)))
        self.end_headers()
        if body:
            self.wfile.write(output)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: a scrape every few seconds is not news."""


class _MetricsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, max_connections: int):
        self.address_family = family
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _MetricsHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # full: this one is closed at once
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve(listen: str, *, max_connections: int = METRICS_MAX_CONNECTIONS) -> int:
    """Serves ``/metrics`` on ``listen`` ("host:port"; port 0 picks one) from a daemon
    thread and returns the bound port. Raises ``OSError`` when the address cannot be bound."""
    host, _, port = listen.rpartition(":")
    family, _, _, _, address = socket.getaddrinfo(
        host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server = _MetricsServer((str(address[0]), int(address[1])), family, max_connections)
    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()
    return int(server.server_address[1])
