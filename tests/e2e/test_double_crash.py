"""End to end with real processes: R = 3, and the primary dies together with the one
replica that acknowledged a write, while the third copy lags (its disk hangs: a failpoint
file). The lagging copy must not be promoted (it lacks the acknowledged write); the shard
waits, and once the dead nodes come back with their data dirs it is served again with
every acknowledged write (I2, I4: a crash keeps the disk)."""

from __future__ import annotations

import re
import shutil
import signal
from dataclasses import dataclass

import pytest

from bluemarble.client.routing import RoutingClient
from shardnode.dataplane import HOLD_REPLICATION_FAILPOINT
from tests.e2e.conftest import ProcessCluster
from tests.e2e.test_data_plane import assignments, eventually, players_on, settled, start

pytestmark = pytest.mark.e2e

NODES = {"n1": "z1", "n2": "z2", "n3": "z3"}
WAITS = "promotion waits: the replicas that may hold the shard's latest acknowledged writes are down"


@dataclass
class DoubleCrash:
    shard: str
    epoch: int
    primary: str
    acker: str
    player: str


async def _crash_primary_and_acker(cluster: ProcessCluster, client: RoutingClient) -> DoubleCrash:
    """Two grants to a player, the second acknowledged by the primary and one replica
    only (the third copy's disk hangs); then both of those nodes are SIGKILLed, and the
    leader is seen waiting for them. The third copy's disk works again on return."""
    shard, before = sorted(assignments(cluster).items())[0]
    primary, acker, lagging = before.primary, before.replicas[0], before.replicas[1]
    [player] = players_on(client, {shard}, 1, "dc")
    await client.grant_items(player, [f"{player}/first"], gold=1, deadline_s=30)
    failpoint = cluster.workdir / lagging / HOLD_REPLICATION_FAILPOINT
    failpoint.touch()
    acked = await client.grant_items(player, [f"{player}/acked"], gold=10, deadline_s=30)
    assert f"{player}/acked" in acked.inventory.item_ids
    for node in (primary, acker):
        cluster.process(node).signal(signal.SIGKILL)
    await eventually(lambda: WAITS in cluster.log_text("cp-0"), 40,
                     "the leader to wait for the dead copies instead of promoting the lagging one")
    assert assignments(cluster)[shard].epoch == before.epoch, "the lagging copy was promoted"
    failpoint.unlink()
    return DoubleCrash(shard, before.epoch, primary, acker, player)


async def _served_with_every_write(cluster: ProcessCluster, client: RoutingClient, crash: DoubleCrash) -> None:
    def served_again() -> bool:
        a = assignments(cluster).get(crash.shard)
        return a is not None and a.epoch > crash.epoch and bool(a.primary)

    await eventually(served_again, 60, f"{crash.shard} to be served again once a dead node is back")
    inventory = await client.get_inventory(crash.player, deadline_s=30)
    assert sorted(inventory.item_ids) == sorted([f"{crash.player}/first", f"{crash.player}/acked"]), inventory
    assert inventory.gold == 11


async def test_a_lagging_copy_is_not_promoted_over_acknowledged_writes_of_two_dead_nodes(
    process_cluster: ProcessCluster,
) -> None:
    start(process_cluster, NODES, replication_factor=3, shards=4)
    await eventually(settled(process_cluster, 4, 3), 60, "every shard to be served, placement settled")
    async with RoutingClient(process_cluster.control_planes) as client:
        await client.wait_ready(20)
        crash = await _crash_primary_and_acker(process_cluster, client)
        for node in (crash.primary, crash.acker):
            process_cluster.start_node(node, NODES[node])
        await _served_with_every_write(process_cluster, client, crash)


async def test_a_replica_back_with_an_empty_data_dir_does_not_end_the_wait(process_cluster: ProcessCluster) -> None:
    """The replica that acknowledged the write comes back with its disk replaced: it holds
    nothing, so the shard still waits (for the old primary, which holds everything)."""
    start(process_cluster, NODES, replication_factor=3, shards=4)
    await eventually(settled(process_cluster, 4, 3), 60, "every shard to be served, placement settled")
    async with RoutingClient(process_cluster.control_planes) as client:
        await client.wait_ready(20)
        crash = await _crash_primary_and_acker(process_cluster, client)
        shutil.rmtree(process_cluster.workdir / crash.acker)
        process_cluster.start_node(crash.acker, NODES[crash.acker])

        def fenced_again() -> bool:  # the leader asked it for its position: it judged the shard again
            said = re.compile(rf"\]\s+fenced\s.*\bshard={re.escape(crash.shard)}(\s|$)")
            return any(said.search(line) for line in process_cluster.log_text(crash.acker).splitlines())

        await eventually(fenced_again, 40, f"the empty {crash.acker} to be fenced for {crash.shard}")
        assert assignments(process_cluster)[crash.shard].epoch == crash.epoch, "promoted over the lost writes"
        process_cluster.start_node(crash.primary, NODES[crash.primary])
        await _served_with_every_write(process_cluster, client, crash)
