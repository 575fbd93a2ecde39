"""The metrics every process exposes (the names the Helm chart's alerts and dashboard
query), the helpers that update them, and when the OTEL_ environment turns tracing on."""

from __future__ import annotations

import gc

import prometheus_client
import pytest

from bluemarble.runtime import event_loop, metrics, tracing

# The chart's PrometheusRule and dashboard are written against these (docs: issue 9's
# shared decisions). Renaming one breaks an alert silently: change both together.
EXPOSED = {
    "bluemarble_rpc_requests_total": ("counter", ("method", "code")),
    "bluemarble_rpc_duration_seconds": ("histogram", ("method",)),
    "bluemarble_is_leader": ("gauge", ()),
    "bluemarble_leader_changes_total": ("counter", ()),
    "bluemarble_registered_nodes": ("gauge", ()),
    "bluemarble_lease_expirations_total": ("counter", ()),
    "bluemarble_reconcile_rounds_total": ("counter", ()),
    "bluemarble_reconcile_moves_total": ("counter", ()),
    "bluemarble_assignment_propagation_seconds": ("histogram", ()),
    "bluemarble_shards_without_primary": ("gauge", ()),
    "bluemarble_trades_total": ("counter", ("kind", "outcome")),
    "bluemarble_trade_phase_seconds": ("histogram", ("phase",)),
    "bluemarble_framed_streams_total": ("counter", ("method",)),
    "bluemarble_trades_in_doubt": ("gauge", ()),
    "bluemarble_replication_lag_entries": ("gauge", ("shard",)),
    "bluemarble_replication_lag_seconds": ("gauge", ("shard",)),
    "bluemarble_gc_pause_seconds": ("histogram", ("generation",)),
    "bluemarble_event_loop_stalls_total": ("counter", ()),
}


def sample(name: str, **labels: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_every_metric_the_chart_queries_is_registered_with_its_type_and_labels() -> None:
    registered = {}
    for family in prometheus_client.REGISTRY.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        registered[name] = family.type
    for name, (kind, _) in EXPOSED.items():
        assert registered.get(name) == kind, name
    by_name = {m._name + ("_total" if m._type == "counter" else ""): m
               for m in vars(metrics).values() if isinstance(m, prometheus_client.metrics.MetricWrapperBase)}
    for name, (_, labels) in EXPOSED.items():
        assert tuple(by_name[name]._labelnames) == labels, name


def test_observe_rpc_counts_by_method_and_code_and_times_by_method() -> None:
    method = "/bluemarble.v1.Test/Unit"
    before = sample("bluemarble_rpc_requests_total", method=method, code="OK")
    for _ in range(3):
        metrics.observe_rpc(method, "OK", 0.002)
    metrics.observe_rpc(method, "NOT_FOUND", 0.5)
    assert sample("bluemarble_rpc_requests_total", method=method, code="OK") == before + 3
    assert sample("bluemarble_rpc_requests_total", method=method, code="NOT_FOUND") >= 1
    assert sample("bluemarble_rpc_duration_seconds_count", method=method) >= 4
    assert sample("bluemarble_rpc_duration_seconds_bucket", method=method, le="0.0025") >= 3


def test_count_trade_by_kind_and_outcome() -> None:
    def counts() -> list[float]:
        return [sample("bluemarble_trades_total", kind=k, outcome=o)
                for k in ("cross_shard", "same_shard") for o in ("committed", "aborted")]

    before = counts()
    metrics.count_trade(True, True)
    metrics.count_trade(True, False)
    metrics.count_trade(False, True)
    metrics.count_trade(False, True)
    assert [a - b for a, b in zip(counts(), before, strict=True)] == [1, 1, 2, 0]


def test_replication_lag_follows_the_shards_led_and_drops_the_others() -> None:
    lag = metrics.ReplicationLag()
    lag.update({"shard-0000": (5, 0.25), "shard-0001": (0, 0.0)})
    assert sample("bluemarble_replication_lag_entries", shard="shard-0000") == 5
    assert sample("bluemarble_replication_lag_seconds", shard="shard-0000") == 0.25
    lag.update({"shard-0001": (2, 1.5)})
    assert prometheus_client.REGISTRY.get_sample_value("bluemarble_replication_lag_entries",
                                                       {"shard": "shard-0000"}) is None
    assert sample("bluemarble_replication_lag_seconds", shard="shard-0001") == 1.5
    lag.update({})
    assert prometheus_client.REGISTRY.get_sample_value("bluemarble_replication_lag_entries",
                                                       {"shard": "shard-0001"}) is None


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ["console", "otlp"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, ["otlp"]),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, []),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "console"}, ["console"]),
    ],
)
def test_tracing_is_on_only_when_the_otel_environment_asks(env: dict[str, str], exporters: list[str]) -> None:
    assert tracing.exporters_from_env(env) == exporters


def test_tracing_is_off_by_default_with_no_interceptors(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    if tracing.enabled():
        pytest.skip("an earlier test of this process left tracing on")
    assert tracing.configure("bluemarble-test") is False
    assert tracing.server_interceptors() == [] and tracing.client_interceptors() == []
    assert tracing.current_ids() is None


def test_an_unknown_exporter_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="otlp, console or none"):
        tracing.configure("bluemarble-test")


def test_metrics_listen_is_checked_before_serving() -> None:
    from bluemarble.core.errors import InvalidArgument

    for good in ("127.0.0.1:0", "0.0.0.0:9100", "[::1]:9100", "metrics.local:9100"):
        assert metrics.check_listen(good) == good
    for bad in ("abc", "127.0.0.1:notaport", "127.0.0.1:99999", ":9100"):
        with pytest.raises(InvalidArgument, match="--metrics-listen"):
            metrics.check_listen(bad)


def test_a_server_freezes_its_start_up_heap_and_times_its_collections() -> None:
    def full_collections() -> float:
        return prometheus_client.REGISTRY.get_sample_value(
            "bluemarble_gc_pause_seconds_count", {"generation": "2"}) or 0.0

    async def main() -> float:
        before = full_collections()
        gc.collect()
        return full_collections() - before

    try:
        assert event_loop.run(main(), server=True) == 1
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.callbacks.remove(metrics._time_gc)


def test_a_shard_node_does_not_export_the_control_plane_metrics() -> None:
    try:
        metrics.drop_control_plane_metrics()
        metrics.drop_control_plane_metrics()  # idempotent
        text = prometheus_client.generate_latest().decode()
        assert "bluemarble_is_leader" not in text and "bluemarble_registered_nodes" not in text
        assert "bluemarble_rpc_requests_total" in text or "bluemarble_gc_pause_seconds" in text
    finally:  # the registry is the process's: give the other tests theirs back
        for collector in metrics.CONTROL_PLANE_ONLY:
            prometheus_client.REGISTRY.register(collector)


def _http(port: int, request: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_metrics_server_answers_metrics_only_and_bounds_its_connections() -> None:
    """GET and HEAD /metrics; 404 elsewhere (no full dump for any path); idle connections
    past the cap are closed as they arrive instead of each holding a thread."""
    import socket
    import threading

    port = metrics.serve("127.0.0.1:0", max_connections=4)
    got = _http(port, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert got.startswith(b"HTTP/1.0 200") and b"bluemarble_rpc_requests_total" in got
    head = _http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"bluemarble_" not in head
    for path in (b"/", b"/metricsx", b"/" + b"x" * 10_000):
        answer = _http(port, b"GET " + path + b" HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 404") and b"bluemarble_" not in answer and len(answer) < 2_000
    threads = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(50)]
    try:
        # Past the cap, each is closed at once (recv sees the end); at most 4 are held.
        held = 0
        for conn in idle:
            conn.settimeout(1.0)
            try:
                assert conn.recv(1) == b""
            except TimeoutError:
                held += 1
        assert held <= 4
        assert threading.active_count() <= threads + 4
    finally:
        for conn in idle:
            conn.close()
