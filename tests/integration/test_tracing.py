"""Tracing: one cross-shard trade is one trace across the coordinator and both
participants (a control plane against a real etcd, two in-process shard nodes with the
participant RPCs, as in test_trade_coordinator), exported to an in-memory exporter; and
log lines written inside a span carry its trace and span ids.

Tracing is process-global (one tracer provider per process): every server and channel
of this process built while it is on is traced, which is what lets one exporter see
every side of the trade. The fixture turns it off again for the tests that follow."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bluemarble.runtime import channels, logs, tracing
from bluemarble.v1 import trade_pb2_grpc
from tests.conftest import StartControlPlane
from tests.integration.test_trade_coordinator import COMMITTED, cluster, request

EXECUTE = "/bluemarble.v1.TradeCoordinator/ExecuteTrade"
PREPARE = "/bluemarble.v1.ShardNode/Prepare"
COMMIT = "/bluemarble.v1.ShardNode/Commit"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure("bluemarble-test", exporter=exporter, simple=True)
    try:
        yield exporter
    finally:
        tracing.disable()
        exporter.shutdown()


def _kind(span: ReadableSpan) -> str:
    return span.kind.name


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _descends(span: ReadableSpan, ancestor: ReadableSpan, by_id: dict[int, ReadableSpan]) -> bool:
    parent = _parent(span)
    while parent is not None:
        if parent == ancestor.context.span_id:
            return True
        up = by_id.get(parent)
        parent = _parent(up) if up is not None else None
    return False


async def test_one_cross_shard_trade_is_one_trace_across_coordinator_and_participants(
    start_control_plane: StartControlPlane, spans: InMemorySpanExporter,
) -> None:
    async with cluster(start_control_plane) as c:
        a, b = c.players(same_shard=False)
        c.world.seed(a, ["sword"], 0)
        c.world.seed(b, [], 40)
        # A traced client channel: the client's span is the root, ExecuteTrade its child.
        async with channels.channel(c.app.address) as channel:
            stub = trade_pb2_grpc.TradeCoordinatorStub(channel)  # type: ignore[no-untyped-call]
            spans.clear()  # heartbeats and placement before the trade are other traces
            answer = await stub.ExecuteTrade(request("traced-1", a, b, ("sword",), 0, (), 40), timeout=10)
        assert answer.outcome == COMMITTED and answer.cross_shard
    finished = list(spans.get_finished_spans())
    by_id = {s.context.span_id: s for s in finished}

    def named(name: str, kind: str) -> list[ReadableSpan]:
        return [s for s in finished if s.name == name and _kind(s) == kind]

    [client] = named(EXECUTE, "CLIENT")
    [server] = named(EXECUTE, "SERVER")
    assert client.parent is None, "the caller's span is the root of the trade's trace"
    assert _parent(server) == client.context.span_id
    trace_id = client.context.trace_id
    for name in (PREPARE, COMMIT):
        outbound = named(name, "CLIENT")
        inbound = named(name, "SERVER")
        assert len(outbound) == 2 and len(inbound) == 2, (name, [s.name for s in finished])
        for call in outbound:
            assert call.context.trace_id == trace_id
            assert _descends(call, server, by_id), f"{name} was sent outside ExecuteTrade's span"
        # Each participant's span continues the coordinator's call to it.
        assert sorted(_parent(s) or 0 for s in inbound) == sorted(s.context.span_id for s in outbound)
        assert all(s.context.trace_id == trace_id for s in inbound)
    assert all(s.status.is_ok for s in (client, server, *named(PREPARE, "SERVER"), *named(COMMIT, "SERVER")))
    service = server.resource.attributes.get("service.name")
    assert service, "spans name the service that made them"
    # Health checks are not traced.
    assert not [s for s in finished if s.name.startswith("/grpc.health.v1.Health/")]


@pytest.mark.usefixtures("restore_logging")
def test_log_lines_inside_a_span_carry_its_trace_and_span_ids(spans: InMemorySpanExporter) -> None:
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    log = structlog.get_logger("test")
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        log.info("inside")
        logging.getLogger("library").warning("library inside")
    log.info("outside")
    inside, library, outside = (json.loads(line) for line in out.getvalue().splitlines())
    ctx = span.get_span_context()
    for line in (inside, library):
        assert line["trace_id"] == format(ctx.trace_id, "032x")
        assert line["span_id"] == format(ctx.span_id, "016x")
    assert "trace_id" not in outside
    tracing.disable()
    with tracer.start_as_current_span("untraced"):
        log.info("tracing off")
    assert "trace_id" not in json.loads(out.getvalue().splitlines()[-1])
