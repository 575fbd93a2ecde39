"""End to end with real processes: R = 3, and the primary dies together with the one
replica that acknowledged a write, while the third copy lags (its disk hangs: a failpoint
file). The lagging copy must not be promoted (it lacks the acknowledged write); the shard
waits, and once the dead nodes come back with their data dirs it is served again with
every acknowledged write (I2, I4: a crash keeps the disk)."""

from __future__ import annotations

import signal

import pytest

from bluemarble.client.routing import RoutingClient
from shardnode.dataplane import HOLD_REPLICATION_FAILPOINT
from tests.e2e.conftest import ProcessCluster
from tests.e2e.test_data_plane import assignments, eventually, players_on, settled, start

pytestmark = pytest.mark.e2e

NODES = {"n1": "z1", "n2": "z2", "n3": "z3"}
WAITS = "promotion waits: the replicas that may hold the shard's latest acknowledged writes are down"


async def test_a_lagging_copy_is_not_promoted_over_acknowledged_writes_of_two_dead_nodes(
    process_cluster: ProcessCluster,
) -> None:
    start(process_cluster, NODES, replication_factor=3, shards=4)
    await eventually(settled(process_cluster, 4, 3), 60, "every shard to be served, placement settled")
    async with RoutingClient(process_cluster.control_planes) as client:
        await client.wait_ready(20)
        shard, before = sorted(assignments(process_cluster).items())[0]
        primary, acker, lagging = before.primary, before.replicas[0], before.replicas[1]
        [player] = players_on(client, {shard}, 1, "dc")
        await client.grant_items(player, [f"{player}/first"], gold=1, deadline_s=30)
        # The third copy stops applying: the next write is acknowledged by the primary and
        # the other replica alone (one replica ack per STRONG write).
        failpoint = process_cluster.workdir / lagging / HOLD_REPLICATION_FAILPOINT
        failpoint.touch()
        acked = await client.grant_items(player, [f"{player}/acked"], gold=10, deadline_s=30)
        assert f"{player}/acked" in acked.inventory.item_ids
        for node in (primary, acker):
            process_cluster.process(node).signal(signal.SIGKILL)
        await eventually(lambda: WAITS in process_cluster.log_text("cp-0"), 40,
                         "the leader to wait for the dead copies instead of promoting the lagging one")
        assert assignments(process_cluster)[shard].epoch == before.epoch, "the lagging copy was promoted"
        failpoint.unlink()
        for node in (primary, acker):
            process_cluster.start_node(node, NODES[node])

        def served_again() -> bool:
            a = assignments(process_cluster).get(shard)
            return a is not None and a.epoch > before.epoch and bool(a.primary)

        await eventually(served_again, 60, f"{shard} to be served again once the dead nodes are back")
        inventory = await client.get_inventory(player, deadline_s=30)
        assert sorted(inventory.item_ids) == sorted([f"{player}/first", f"{player}/acked"]), inventory
        assert inventory.gold == 11
