"""End to end: a Commit that a primary acknowledged before any replica had it still ends
applied after that primary dies and a replica is promoted.

Commit and Abort answer after the primary's local commit (shardnode/participant.py,
docs/decisions.md). What makes the outcome final is the decision record plus the escrow,
which Prepare replicated: the promoted replica holds the escrow PREPARED, and applies the
recorded outcome as soon as it serves.

Real processes: one control plane, three shard nodes (R = 3, escrow timeout 120 s), the
session's etcd. The test plays the coordinator itself: Prepare on both players'
primaries, the decision record written create-if-absent (COMMITTED), Commit on B's
primary, then every node but player A's primary holds replication (the
``hold-replication`` failpoint), and Commit is sent to that primary. It must answer while
no replica has the settle; the primary is SIGKILLed, a replica is promoted (the failpoint
is lifted only once the new primary is assigned: the fence came first, so the held batch
of the old epoch is refused), and both sides end COMMITTED with the items and gold moved
once and no escrow left, well before the escrow's deadline: the new primary looks up the
decisions of the escrows it inherited as soon as it serves.
"""

from __future__ import annotations

import time

import grpc.aio
import pytest

from bluemarble.client.routing import Route, RoutingClient
from bluemarble.runtime.channels import insecure_channel
from bluemarble.runtime.clock import SystemClock
from bluemarble.v1 import common_pb2, shardnode_pb2, shardnode_pb2_grpc, trade_pb2
from controlplane.store.etcd import EtcdStore
from controlplane.store.keys import KeySchema
from controlplane.store.trade_store import TradeStore
from scripts.localcluster import wait_until
from shardnode.dataplane import HOLD_REPLICATION_FAILPOINT
from tests.e2e.conftest import ProcessCluster
from tests.e2e.test_data_plane import eventually
from tests.e2e.test_trade_retries import placed

pytestmark = pytest.mark.e2e

NODES = {"n1": "z1", "n2": "z2", "n3": "z3"}
CP_FLAGS = ("--lease-ttl-s", "3", "--replication-factor", "3", "--shards", "4")
TRADE_ID = "settle-before-replication"
ESCROW_TIMEOUT_S = 120
"""Far past the test's waits: the promoted primary settles the escrow it inherited at once
(the decision exists), not at its deadline."""
COMMITTED = shardnode_pb2.PARTICIPANT_TRADE_STATE_COMMITTED


def stub_of(route: Route) -> tuple[grpc.aio.Channel, shardnode_pb2_grpc.ShardNodeStub]:
    assert route.primary is not None
    channel = insecure_channel(route.addresses[route.primary])
    return channel, shardnode_pb2_grpc.ShardNodeStub(channel)  # type: ignore[no-untyped-call]


async def trade_states(routing: RoutingClient, player: str) -> list[int]:
    """What the player's current primary holds for the trade (ListTrades), [] if unknown."""
    try:
        route = routing.resolve(player)
    except Exception:
        return []
    if route.primary is None or route.primary not in route.addresses:
        return []
    async with insecure_channel(route.addresses[route.primary]) as channel:
        stub = shardnode_pb2_grpc.ShardNodeStub(channel)  # type: ignore[no-untyped-call]
        try:
            r = await stub.ListTrades(shardnode_pb2.ListTradesRequest(trade_id=TRADE_ID), timeout=1)
        except grpc.aio.AioRpcError:
            return []
    return [t.state for t in r.trades if t.shard_id == route.shard_id]  # it may lead both shards


async def test_a_commit_acknowledged_before_replication_is_applied_on_the_promoted_replica(
    process_cluster: ProcessCluster, cluster_name: str
) -> None:
    cp = process_cluster.start_control_plane(*CP_FLAGS)
    for node, zone in NODES.items():
        process_cluster.start_node(node, zone, "--trade-escrow-timeout-s", str(ESCROW_TIMEOUT_S))
    wait_until(lambda: placed(process_cluster), 60, "every shard placed with 2 replicas")
    etcd_store = EtcdStore([process_cluster.etcd.endpoint])
    await etcd_store.connect(10)
    store = TradeStore(etcd_store, KeySchema(cluster_name), SystemClock(), retention_s=86400)
    held: list[str] = []
    try:
        async with RoutingClient([cp]) as routing:
            players = [f"p{i:03d}" for i in range(100)]
            a = players[0]
            b = next(p for p in players if routing.router.shard_for(p) != routing.router.shard_for(a))
            item = f"{a}/relic"
            await routing.grant_items(a, [item], gold=10, request_id=f"seed-{a}", deadline_s=20)
            await routing.grant_items(b, [], gold=100, request_id=f"seed-{b}", deadline_s=20)
            route_a, route_b = routing.resolve(a), routing.resolve(b)
            primary = route_a.primary
            assert primary is not None

            # Phase one, as a coordinator: both escrows, replicated (STRONG).
            legs = {
                a: shardnode_pb2.TradeLeg(player_id=a, gives=common_pb2.Offer(item_ids=[item]),
                                          receives=common_pb2.Offer(gold=40), counterpart_player_id=b),
                b: shardnode_pb2.TradeLeg(player_id=b, gives=common_pb2.Offer(gold=40),
                                          receives=common_pb2.Offer(item_ids=[item]), counterpart_player_id=a),
            }
            for player, route in ((a, route_a), (b, route_b)):
                channel, stub = stub_of(route)
                async with channel:
                    vote = await stub.Prepare(shardnode_pb2.PrepareRequest(
                        trade_id=TRADE_ID, shard_id=route.shard_id, epoch=route.epoch, legs=[legs[player]]), timeout=10)
                assert vote.vote == shardnode_pb2.TRADE_VOTE_PREPARED, vote
            request = trade_pb2.ExecuteTradeRequest(trade_id=TRADE_ID, player_a=a, player_b=b,
                                                    a_gives=common_pb2.Offer(item_ids=[item]),
                                                    b_gives=common_pb2.Offer(gold=40))
            record = trade_pb2.TradeRecord(
                trade_id=TRADE_ID, outcome=common_pb2.TRADE_OUTCOME_COMMITTED, decided_by="coordinator test",
                decided_at_ms=int(time.time() * 1000), request=request, shard_a=route_a.shard_id,
                shard_b=route_b.shard_id)
            _, written = await store.create_if_absent(record)
            assert written
            channel, stub = stub_of(route_b)
            async with channel:  # B's side is settled as usual
                answer = await stub.Commit(shardnode_pb2.CommitRequest(
                    trade_id=TRADE_ID, shard_id=route_b.shard_id, epoch=route_b.epoch), timeout=10)
            assert answer.state == COMMITTED

            # No replica takes anything from here on; Commit on A's primary answers anyway.
            for node in NODES:
                if node != primary:
                    (process_cluster.workdir / node / HOLD_REPLICATION_FAILPOINT).touch()
                    held.append(node)
            channel, stub = stub_of(route_a)
            async with channel:
                answer = await stub.Commit(shardnode_pb2.CommitRequest(
                    trade_id=TRADE_ID, shard_id=route_a.shard_id, epoch=route_a.epoch), timeout=3)
            assert answer.state == COMMITTED
            own = process_cluster.shard_status(process_cluster.node_addresses[primary])
            assert own is not None
            for node in held:
                theirs = process_cluster.shard_status(process_cluster.node_addresses[node])
                assert theirs is not None
                assert theirs[route_a.shard_id].applied_lsn < own[route_a.shard_id].applied_lsn, (
                    f"{node} already has the settle: the test did not hold replication")

            process_cluster.process(primary).kill()

            def promoted() -> bool:
                r = process_cluster.assignments()
                return r is not None and any(
                    x.shard_id == route_a.shard_id and x.primary not in ("", primary) and x.epoch > route_a.epoch
                    for x in r.assignments)

            wait_until(promoted, 30, f"a replica of {route_a.shard_id} promoted")
            for node in held:
                (process_cluster.workdir / node / HOLD_REPLICATION_FAILPOINT).unlink(missing_ok=True)
            held.clear()

            async def both_committed() -> bool:
                return await trade_states(routing, a) == [COMMITTED] and await trade_states(routing, b) == [COMMITTED]

            await eventually(both_committed, 30, "both sides COMMITTED on their current primaries")
            new_primary = next(x.primary for x in process_cluster.assignments().assignments  # type: ignore[union-attr]
                               if x.shard_id == route_a.shard_id)
            assert "inherited escrow settled" in process_cluster.log_text(new_primary)
            inv_a = await routing.get_inventory(a, deadline_s=20)
            inv_b = await routing.get_inventory(b, deadline_s=20)
            assert (list(inv_a.item_ids), inv_a.gold) == ([], 50)
            assert (list(inv_b.item_ids), inv_b.gold) == ([item], 60)
    finally:
        for node in held:
            (process_cluster.workdir / node / HOLD_REPLICATION_FAILPOINT).unlink(missing_ok=True)
        await etcd_store.close()
