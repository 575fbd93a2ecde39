"""End to end: a trade retried with the same id after its coordinator died at each step
gets one consistent outcome, and its items move at most once (acceptance item 2).

Real processes: two control-plane replicas (the coordinators), three shard nodes (R = 3),
the session's etcd. The coordinator that dies is a replica of its own, SIGKILLed:

* **before the prepares**: it is SIGSTOPped, the trade is sent to it (the request sits
  unread in its socket; the caller times out), then it is SIGKILLed. Nothing was sent
  or written.
* **between the prepares and the decision**: every node's ``hold-replication``
  failpoint is set, so a Prepare is escrowed on the primary but not acknowledged; the
  trade is sent to the replica, which is SIGKILLed once both primaries hold the escrow
  (ListTrades); the failpoint is lifted. Both sides are PREPARED, no decision exists.
* **between the decision and the commits**: the replica runs with the coordinator's
  failpoint ``BLUEMARBLE_TRADE_CRASH_AT=after-decision`` (controlplane/server/trades.py):
  it writes the decision record, then exits before it sends a Commit. Recorded, both
  sides still PREPARED, nobody to send the commits.

Each time the trade is then retried with the same id and terms through the surviving
replica (:class:`TradeClient`, which also skips the dead one), asked once more, and the
inventories are read: the items and gold moved exactly once if the answer is COMMITTED,
not at all if ABORTED; no escrow is left; the recorded decision agrees.

A second test loses a decision record that one side had already applied (etcd restored
from a backup taken before the trade): the other side's termination asks the first side
and commits as well.
"""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import grpc.aio
import pytest

from bluemarble.client.routing import RoutingClient
from bluemarble.client.trades import TradeClient
from bluemarble.core.ids import TradeId
from bluemarble.core.trades.model import Outcome
from bluemarble.runtime.channels import insecure_channel
from bluemarble.runtime.clock import SystemClock
from bluemarble.v1 import (
    common_pb2,
    controlplane_pb2_grpc,
    shardnode_pb2,
    shardnode_pb2_grpc,
    trade_pb2,
    trade_pb2_grpc,
)
from bluemarble.v1 import controlplane_pb2 as pb
from controlplane.server.trades import CRASH_AT_ENV
from controlplane.store.etcd import EtcdStore
from controlplane.store.keys import KeySchema
from controlplane.store.trade_store import TradeStore
from scripts.localcluster import ManagedProcess, wait_until
from shardnode.dataplane import HOLD_REPLICATION_FAILPOINT
from tests.e2e.conftest import ProcessCluster
from tests.e2e.test_data_plane import eventually

pytestmark = pytest.mark.e2e

NODES = {"n1": "z1", "n2": "z2", "n3": "z3"}
CP_FLAGS = ("--lease-ttl-s", "3", "--replication-factor", "3", "--shards", "4")


def placed(cluster: ProcessCluster) -> bool:
    r = cluster.assignments()
    return r is not None and len(r.assignments) == 4 and all(a.primary and len(a.replicas) == 2 for a in r.assignments)


def set_hold(cluster: ProcessCluster, on: bool) -> None:
    for node in NODES:
        path = cluster.workdir / node / HOLD_REPLICATION_FAILPOINT
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)


class Trade:
    """One trade between two players of different shards: a gives its item, b gives gold."""

    def __init__(self, trade_id: str, a: str, b: str, item: str, gold: int):
        self.trade_id, self.a, self.b, self.item, self.gold = trade_id, a, b, item, gold

    def request(self) -> trade_pb2.ExecuteTradeRequest:
        return trade_pb2.ExecuteTradeRequest(
            trade_id=self.trade_id, player_a=self.a, player_b=self.b,
            a_gives=common_pb2.Offer(item_ids=[self.item]), b_gives=common_pb2.Offer(gold=self.gold))

    async def retry(self, client: TradeClient) -> Outcome:
        result = await client.execute_trade(self.trade_id, self.a, self.b, a_items=[self.item], b_gold=self.gold,
                                            deadline_s=30)
        return result.outcome


async def escrows_of(routing: RoutingClient, player: str, trade_id: str) -> list[str]:
    """The states the player's primary holds for ``trade_id`` on the player's shard
    (ListTrades, local view; the node may lead the other side's shard too)."""
    route = routing.resolve(player)
    address = route.addresses.get(route.primary) if route.primary else None
    if address is None:
        return []
    async with insecure_channel(address) as channel:
        stub = shardnode_pb2_grpc.ShardNodeStub(channel)  # type: ignore[no-untyped-call]
        try:
            r = await stub.ListTrades(shardnode_pb2.ListTradesRequest(trade_id=trade_id), timeout=1)
        except grpc.aio.AioRpcError:
            return []
    return [shardnode_pb2.ParticipantTradeState.Name(t.state) for t in r.trades
            if t.trade_id == trade_id and t.shard_id == route.shard_id]


async def test_a_retry_after_a_coordinator_crash_at_each_step_has_one_outcome(
    process_cluster: ProcessCluster, cluster_name: str
) -> None:
    survivor = process_cluster.start_control_plane(*CP_FLAGS)
    for node, zone in NODES.items():
        process_cluster.start_node(node, zone)
    wait_until(lambda: placed(process_cluster), 60, "every shard placed with 2 replicas")
    etcd_store = EtcdStore([process_cluster.etcd.endpoint])
    await etcd_store.connect(10)
    store = TradeStore(etcd_store, KeySchema(cluster_name), SystemClock(), retention_s=86400)
    try:
        async with RoutingClient([survivor]) as routing:
            # Pairs of players on different shards, a with one item, b with gold.
            by_shard: dict[str, list[str]] = {}
            for i in range(200):
                by_shard.setdefault(routing.router.shard_for(f"r{i:03d}"), []).append(f"r{i:03d}")
            shards = sorted(by_shard)
            trades = []
            for k, step in enumerate(("before-prepare", "after-prepare", "after-decision")):
                a, b = by_shard[shards[k % len(shards)]][k], by_shard[shards[(k + 1) % len(shards)]][k]
                await routing.grant_items(a, [f"{a}/relic"], gold=10, request_id=f"seed-{a}", deadline_s=20)
                await routing.grant_items(b, [], gold=100, request_id=f"seed-{b}", deadline_s=20)
                trades.append((step, Trade(f"crash-{step}", a, b, f"{a}/relic", 40)))

            async def holdings(player: str) -> tuple[set[str], int]:
                inv = await routing.get_inventory(player, deadline_s=20)
                return set(inv.item_ids), inv.gold

            for step, trade in trades:
                before = {p: await holdings(p) for p in (trade.a, trade.b)}
                crash_env = {CRASH_AT_ENV: "after-decision"} if step == "after-decision" else None
                coordinator = process_cluster.start_control_plane(*CP_FLAGS, env=crash_env)
                proc = process_cluster.processes[-1]
                channel = insecure_channel(coordinator)
                stub = trade_pb2_grpc.TradeCoordinatorStub(channel)  # type: ignore[no-untyped-call]
                await eventually(lambda c=channel: _serves(c), 20, f"{proc.name} to serve")  # type: ignore[misc]
                if step == "before-prepare":
                    os.kill(proc.pid, signal.SIGSTOP)
                    with pytest.raises(grpc.aio.AioRpcError) as stopped:
                        await stub.ExecuteTrade(trade.request(), timeout=1.0)
                    assert stopped.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    proc.kill()
                    assert await escrows_of(routing, trade.a, trade.trade_id) == []
                elif step == "after-decision":
                    with pytest.raises(grpc.aio.AioRpcError):
                        await stub.ExecuteTrade(trade.request(), timeout=20)
                    async def exited(p: ManagedProcess = proc) -> bool:
                        return not p.alive()

                    await eventually(exited, 10, f"{proc.name} to exit at its failpoint")
                    assert proc.proc is not None and proc.proc.wait(5) == 137
                    stored_now = await store.get(trade.trade_id)
                    assert stored_now is not None and stored_now.record.outcome == common_pb2.TRADE_OUTCOME_COMMITTED
                    assert await escrows_of(routing, trade.a, trade.trade_id) == ["PARTICIPANT_TRADE_STATE_PREPARED"]
                    assert await escrows_of(routing, trade.b, trade.trade_id) == ["PARTICIPANT_TRADE_STATE_PREPARED"]
                else:
                    set_hold(process_cluster, True)
                    try:
                        call = asyncio.ensure_future(stub.ExecuteTrade(trade.request(), timeout=20))

                        async def both_escrowed(t: Trade = trade) -> bool:
                            return (await escrows_of(routing, t.a, t.trade_id) == ["PARTICIPANT_TRADE_STATE_PREPARED"]
                                    and await escrows_of(routing, t.b, t.trade_id)
                                    == ["PARTICIPANT_TRADE_STATE_PREPARED"])

                        await eventually(both_escrowed, 10, f"both escrows of {trade.trade_id}")
                        proc.kill()
                    finally:
                        set_hold(process_cluster, False)
                    with pytest.raises(grpc.aio.AioRpcError):
                        await call
                    assert await store.get(trade.trade_id) is None, "the coordinator died before deciding"
                await channel.close(None)

                # The retry, through the dead replica first: the client moves on.
                async with TradeClient([coordinator, survivor], retry_initial_s=0.02) as client:
                    outcome = await trade.retry(client)
                    assert await trade.retry(client) is outcome, "same trade id, same answer"
                    if step == "after-decision":
                        assert outcome is Outcome.COMMITTED, "the recorded decision stands"
                    if step == "before-prepare":
                        assert outcome is Outcome.COMMITTED, "nothing had happened: the retry runs the trade"
                    stored = await store.get(trade.trade_id)
                    assert stored is not None and stored.record.outcome == (
                        common_pb2.TRADE_OUTCOME_COMMITTED if outcome is Outcome.COMMITTED
                        else common_pb2.TRADE_OUTCOME_ABORTED)

                    async def settled(c: TradeClient = client) -> bool:
                        doubt = await c.in_doubt(deadline_s=5)
                        return not doubt.escrows and not doubt.unreachable_nodes

                    await eventually(settled, 15, f"no escrow left after {trade.trade_id}")
                after = {p: await holdings(p) for p in (trade.a, trade.b)}
                (a_items, a_gold), (b_items, b_gold) = before[trade.a], before[trade.b]
                if outcome is Outcome.COMMITTED:
                    expected = {trade.a: (a_items - {trade.item}, a_gold + trade.gold),
                                trade.b: (b_items | {trade.item}, b_gold - trade.gold)}
                else:
                    expected = before
                assert after == expected, f"{step}: {outcome.name} but inventories {after}, before {before}"
    finally:
        set_hold(process_cluster, False)
        await etcd_store.close()


async def test_a_lost_decision_that_one_side_applied_is_recovered_by_the_other_sides_termination(
    process_cluster: ProcessCluster, cluster_name: str
) -> None:
    survivor = process_cluster.start_control_plane(*CP_FLAGS)
    for node, zone in NODES.items():
        # Long enough for the test to commit one side and lose the record before the
        # escrows' deadlines, short enough to wait for.
        process_cluster.start_node(node, zone, "--trade-escrow-timeout-s", "8")
    wait_until(lambda: placed(process_cluster), 60, "every shard placed with 2 replicas")
    etcd_store = EtcdStore([process_cluster.etcd.endpoint])
    await etcd_store.connect(10)
    keys = KeySchema(cluster_name)
    store = TradeStore(etcd_store, keys, SystemClock(), retention_s=86400)
    try:
        async with RoutingClient([survivor]) as routing:
            players = [f"q{i:03d}" for i in range(200)]
            a = players[0]
            b = next(p for p in players if routing.resolve(p).shard_id != routing.resolve(a).shard_id)
            await routing.grant_items(a, [f"{a}/relic"], gold=10, request_id=f"seed-{a}", deadline_s=20)
            await routing.grant_items(b, [], gold=100, request_id=f"seed-{b}", deadline_s=20)
            trade = Trade("lost-record", a, b, f"{a}/relic", 40)
            coordinator = process_cluster.start_control_plane(*CP_FLAGS, env={CRASH_AT_ENV: "after-decision"})
            proc = process_cluster.processes[-1]
            async with insecure_channel(coordinator) as channel:
                stub = trade_pb2_grpc.TradeCoordinatorStub(channel)  # type: ignore[no-untyped-call]
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.ExecuteTrade(trade.request(), timeout=20)
            assert proc.proc is not None and proc.proc.wait(10) == 137
            recorded = await store.get(trade.trade_id)
            assert recorded is not None and recorded.record.outcome == common_pb2.TRADE_OUTCOME_COMMITTED

            # a's side applies the decision (as the coordinator would have); b's never hears of it.
            route_a = routing.resolve(a)
            assert route_a.primary is not None
            async with insecure_channel(route_a.addresses[route_a.primary]) as channel:
                node = shardnode_pb2_grpc.ShardNodeStub(channel)  # type: ignore[no-untyped-call]
                done = await node.Commit(shardnode_pb2.CommitRequest(trade_id=trade.trade_id,
                                                                     shard_id=route_a.shard_id), timeout=5)
            assert done.state == shardnode_pb2.PARTICIPANT_TRADE_STATE_COMMITTED
            # etcd loses the record (and its unretained copy), as a restore from an older backup would.
            await etcd_store.delete(keys.trade(TradeId(trade.trade_id)))
            await etcd_store.delete(keys.unretained_trade(TradeId(trade.trade_id)))
            assert await escrows_of(routing, b, trade.trade_id) == ["PARTICIPANT_TRADE_STATE_PREPARED"], (
                "b's escrow must still be held when the record is lost, or the test proves nothing")

            # b's escrow passes its deadline; its termination asks, and finds a's commit.
            async def b_committed() -> bool:
                return await escrows_of(routing, b, trade.trade_id) == ["PARTICIPANT_TRADE_STATE_COMMITTED"]

            await eventually(b_committed, 40, "b's side to settle the trade")
            again = await store.get(trade.trade_id)
            assert again is not None and again.record.outcome == common_pb2.TRADE_OUTCOME_COMMITTED
            assert again.record.decided_by == f"participant {routing.resolve(b).shard_id}"
            assert "the decision record was missing" in again.record.reason
            inventory_a = await routing.get_inventory(a, deadline_s=20)
            inventory_b = await routing.get_inventory(b, deadline_s=20)
            assert (set(inventory_a.item_ids), inventory_a.gold) == (set(), 50)
            assert (set(inventory_b.item_ids), inventory_b.gold) == ({f"{a}/relic"}, 60)
    finally:
        await etcd_store.close()


async def _serves(channel: grpc.aio.Channel) -> bool:
    try:
        await controlplane_pb2_grpc.ControlPlaneStub(channel).GetClusterStatus(  # type: ignore[no-untyped-call]
            pb.GetClusterStatusRequest(), timeout=1)
    except grpc.aio.AioRpcError:
        return False
    return True

