"""End to end: a node joins a cluster that is trading, and rebalancing hands it primaries
while trades run. Every trade commits (each pair trades items it owns, so a refusal means
an escrow or a settle went missing in a handoff), and every item and coin ends where the
answers say.

What it guards: a handoff must not leave behind settles its old primary had not shipped
(bluemarble.core.placement.handoff). That loss needs a settle inside its shipping window
(20 ms) at the moment of a handoff: before the fix, a client of 48 trading pairs met it in
one of three joins (trades refused with "does not own item ..."), and this smaller test
passed twice. So a pass here is evidence, not proof; tests/unit/test_leadership.py checks
the rule itself. A new primary that is behind the old one catches up by copying the
entries it lacks (GetEntries), not a snapshot of the whole shard."""

from __future__ import annotations

import asyncio
import collections

import pytest

from bluemarble.client.routing import RoutingClient
from bluemarble.client.trades import TradeClient
from tests.e2e.conftest import ProcessCluster
from tests.e2e.test_data_plane import assignments, eventually, grant_all, settled

pytestmark = pytest.mark.e2e

SHARDS = 8
PAIRS = 16


async def test_a_node_joining_during_trades_takes_primaries_without_refusing_a_trade(
    process_cluster: ProcessCluster,
) -> None:
    cluster = process_cluster
    cluster.start_control_plane("--lease-ttl-s", "5", "--replication-factor", "2", "--shards", str(SHARDS))
    cluster.start_node("n1", "z1")
    cluster.start_node("n2", "z2")
    await eventually(settled(cluster, SHARDS, 2), 60, "every shard served on two nodes")
    players = [f"joiner-{i}" for i in range(2 * PAIRS)]
    grants = {f"seed-{p}": (p, [f"{p}-item-{k}" for k in range(3)], 100) for p in players}
    async with RoutingClient(cluster.control_planes, max_attempts=1000) as routing, \
            TradeClient(cluster.control_planes, routing=routing) as trades:
        await routing.wait_ready(20)
        await grant_all(routing, grants)
        owned = {p: list(items) for p, items, _ in grants.values()}
        gold = dict.fromkeys(players, 100)
        refused: collections.Counter[str] = collections.Counter()
        done = 0
        stop = asyncio.Event()

        async def pair(i: int) -> None:
            nonlocal done
            a, b = players[2 * i], players[2 * i + 1]
            n = 0
            while not stop.is_set():
                giver, taker = (a, b) if n % 2 == 0 else (b, a)
                item = owned[giver][0]
                result = await trades.execute_trade(f"join-{i}-{n}", giver, taker, a_items=[item], b_gold=1,
                                                    deadline_s=60)
                if result.committed:
                    owned[giver].remove(item)
                    owned[taker].append(item)
                    gold[giver] += 1
                    gold[taker] -= 1
                else:
                    refused[result.reason[:80]] += 1
                n += 1
                done += 1

        workers = [asyncio.ensure_future(pair(i)) for i in range(PAIRS)]
        try:
            await eventually(lambda: done >= 200, 60, "trades under way")
            cluster.start_node("n3", "z3")
            await eventually(lambda: any(a.primary == "n3" for a in assignments(cluster).values()), 90,
                             "rebalancing hands n3 primaries")
            await eventually(settled(cluster, SHARDS, 2), 60, "placement settled with n3")
            before = done
            await eventually(lambda: done >= before + 60, 60, "trades after the rebalance")
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
        for worker in workers:
            worker.result()  # a trade that raised (no answer within its deadline) fails the test
        assert not refused, refused
        for player in players:
            inventory = await routing.get_inventory(player)
            assert sorted(inventory.item_ids) == sorted(owned[player]), player
            assert inventory.gold == gold[player], player
            assert not inventory.escrowed_item_ids and inventory.escrowed_gold == 0, player
    # A new primary behind its old one copies the entries it lacks, never the whole shard.
    for node in ("n1", "n2", "n3"):
        assert "lacks; copying a snapshot" not in cluster.log_text(node), node
