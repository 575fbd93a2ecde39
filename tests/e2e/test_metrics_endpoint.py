"""End to end: every process serves Prometheus ``/metrics`` (``--metrics-listen``), and
after one cross-shard trade the metrics the Helm chart's alerts and dashboard query
(docs: the metric names of issue 9) say what happened: the trade by kind and outcome, its
2PC phases, the RPCs by method and code, the registered nodes, exactly one leader, every
shard with a primary, the primaries' replication lag."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Awaitable, Callable

import grpc.aio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bluemarble.client.routing import RoutingClient
from bluemarble.client.trades import TradeClient
from bluemarble.core.trades.model import Outcome
from bluemarble.v1 import common_pb2, trade_pb2, trade_pb2_grpc
from scripts.localcluster import free_port
from tests.e2e.conftest import ProcessCluster
from tests.e2e.test_data_plane import eventually, grant_all, settled

pytestmark = pytest.mark.e2e

SHARDS = 2
NODES = {"m1": "z1", "m2": "z2"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of ``http://127.0.0.1:port/metrics``: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def holds(ports: list[int], check: Callable[[list[Samples]], bool]) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return check(await asyncio.to_thread(lambda: [scrape(p) for p in ports]))

    return condition


async def test_metrics_after_a_cross_shard_trade(process_cluster: ProcessCluster) -> None:
    cluster = process_cluster
    cp_ports = [free_port(), free_port()]
    for port in cp_ports:
        cluster.start_control_plane(
            "--lease-ttl-s", "2", "--replication-factor", "2", "--shards", str(SHARDS),
            "--metrics-listen", f"127.0.0.1:{port}",
        )
    node_ports = {node: free_port() for node in NODES}
    for node, zone in NODES.items():
        cluster.start_node(node, zone, "--metrics-listen", f"127.0.0.1:{node_ports[node]}")
    await eventually(settled(cluster, SHARDS, 2), 40, "both shards served by both nodes")

    async with RoutingClient(cluster.control_planes) as client:
        await client.wait_ready(20)
        by_shard: dict[str, str] = {}
        for i in range(100):
            by_shard.setdefault(client.resolve(f"buyer-{i}").shard_id, f"buyer-{i}")
            if len(by_shard) == SHARDS:
                break
        a, b = sorted(by_shard.values())
        await grant_all(client, {"g-a": (a, ["lamp"], 0), "g-b": (b, [], 50)})
    async with grpc.aio.insecure_channel(cluster.control_planes[0]) as channel:
        stub = trade_pb2_grpc.TradeCoordinatorStub(channel)  # type: ignore[no-untyped-call]
        answer = await stub.ExecuteTrade(trade_pb2.ExecuteTradeRequest(
            trade_id="metrics-1", player_a=a, player_b=b,
            a_gives=common_pb2.Offer(item_ids=["lamp"]), b_gives=common_pb2.Offer(gold=20)), timeout=10)
    assert answer.outcome == common_pb2.TRADE_OUTCOME_COMMITTED and answer.cross_shard
    # A game server's trade client: its ExecuteTrades stream takes the replica's framed port.
    async with TradeClient(cluster.control_planes[:1]) as trades:
        back = await trades.execute_trade("metrics-2", b, a, a_items=["lamp"], deadline_s=10)
    assert back.outcome is Outcome.COMMITTED, back

    coordinator = await asyncio.to_thread(scrape, cp_ports[0])
    assert (value(coordinator, "bluemarble_framed_streams_total", method="ExecuteTrades") or 0) >= 1
    assert (value(coordinator, "bluemarble_trades_total", kind="cross_shard", outcome="committed") or 0) >= 1
    for phase in ("prepare", "decide", "commit", "total"):
        assert (value(coordinator, "bluemarble_trade_phase_seconds_count", phase=phase) or 0) >= 1, phase
    assert (value(coordinator, "bluemarble_rpc_requests_total",
                  method="/bluemarble.v1.TradeCoordinator/ExecuteTrade", code="OK") or 0) >= 1
    assert (value(coordinator, "bluemarble_rpc_duration_seconds_count",
                  method="/bluemarble.v1.TradeCoordinator/ExecuteTrade") or 0) >= 1

    def control_planes_agree(scraped: list[Samples]) -> bool:
        leaders = sorted(value(s, "bluemarble_is_leader") or 0.0 for s in scraped)
        return (
            leaders == [0.0, 1.0]
            and all(value(s, "bluemarble_registered_nodes") == len(NODES) for s in scraped)
            and all(value(s, "bluemarble_shards_without_primary") == 0 for s in scraped)
        )

    await eventually(holds(cp_ports, control_planes_agree), 10,
                     "one leader, both nodes registered and every shard with a primary on both replicas")
    scraped = await asyncio.to_thread(lambda: [scrape(p) for p in cp_ports])
    leader = next(s for s in scraped if value(s, "bluemarble_is_leader") == 1)
    assert (value(leader, "bluemarble_leader_changes_total") or 0) >= 1
    assert (value(leader, "bluemarble_reconcile_rounds_total") or 0) >= 1
    assert (value(leader, "bluemarble_reconcile_moves_total") or 0) >= 1
    assert (value(leader, "bluemarble_assignment_propagation_seconds_count") or 0) >= 1

    def nodes_report(scraped: list[Samples]) -> bool:
        prepared = sum(value(s, "bluemarble_rpc_requests_total", method="/bluemarble.v1.ShardNode/Prepare",
                             code="OK") or 0 for s in scraped)
        committed = sum(value(s, "bluemarble_rpc_requests_total", method="/bluemarble.v1.ShardNode/Commit",
                              code="OK") or 0 for s in scraped)
        lagging = [series(s, "bluemarble_replication_lag_entries") for s in scraped]
        # The coordinator's calls and the replication streams took the nodes' framed ports.
        framed = {method: sum(value(s, "bluemarble_framed_streams_total", method=method) or 0 for s in scraped)
                  for method in ("Calls", "Replicate")}
        # Each node leads one shard (R = 2 on 2 nodes): one lag series each, for that shard.
        return (prepared >= 2 and committed >= 2 and all(len(lag) == 1 for lag in lagging)
                and framed["Calls"] >= 1 and framed["Replicate"] >= 2
                and all(value(s, "bluemarble_trades_in_doubt") == 0 for s in scraped))

    await eventually(holds(list(node_ports.values()), nodes_report), 15,
                     "the participants' Prepare/Commit counts and each primary's lag series")
