"""End to end with real processes: R = 3, and the primary dies together with the one
replica that acknowledged a write, while the third copy lags (its disk hangs: a failpoint
file). The lagging copy must not be promoted (it lacks the acknowledged write); the shard
waits, and once the dead nodes come back with their data dirs it is served again with
every acknowledged write (I2, I4: a crash keeps the disk)."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from bluemarble.client.routing import RoutingClient
from bluemarble.client.trades import TradeClient
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


async def _acknowledged_past_a_lagging_copy(cluster: ProcessCluster, client: RoutingClient) -> tuple[DoubleCrash, Path]:
    """Two grants to a player, the second acknowledged by the primary and one replica
    only: the third copy's disk hangs (the failpoint file returned; remove it to end
    the hang)."""
    shard, before = sorted(assignments(cluster).items())[0]
    primary, acker, lagging = before.primary, before.replicas[0], before.replicas[1]
    [player] = players_on(client, {shard}, 1, "dc")
    await client.grant_items(player, [f"{player}/first"], gold=1, deadline_s=30)
    failpoint = cluster.workdir / lagging / HOLD_REPLICATION_FAILPOINT
    failpoint.touch()
    acked = await client.grant_items(player, [f"{player}/acked"], gold=10, deadline_s=30)
    assert f"{player}/acked" in acked.inventory.item_ids
    return DoubleCrash(shard, before.epoch, primary, acker, player), failpoint


async def _waits_for_the_dead_copies(cluster: ProcessCluster, crash: DoubleCrash) -> None:
    """The leader logs that the shard's promotion waits, and the shard keeps its epoch."""
    waits = re.compile(rf"{re.escape(WAITS)}.*\bshard={re.escape(crash.shard)}(\s|$)")
    await eventually(lambda: any(waits.search(line) for line in cluster.log_text("cp-0").splitlines()), 40,
                     f"the leader to wait for the dead copies of {crash.shard} instead of promoting the lagging one")
    assert assignments(cluster)[crash.shard].epoch == crash.epoch, "the lagging copy was promoted"


async def _crash_primary_and_acker(cluster: ProcessCluster, client: RoutingClient) -> DoubleCrash:
    """A write acknowledged past a lagging copy; then the primary and the replica that
    acknowledged it are SIGKILLed, and the leader is seen waiting for them. The third
    copy's disk works again on return."""
    crash, failpoint = await _acknowledged_past_a_lagging_copy(cluster, client)
    for node in (crash.primary, crash.acker):
        cluster.process(node).signal(signal.SIGKILL)
    await _waits_for_the_dead_copies(cluster, crash)
    failpoint.unlink()
    return crash


async def _served_with_every_write(cluster: ProcessCluster, client: RoutingClient, crash: DoubleCrash) -> None:
    def served_again() -> bool:
        a = assignments(cluster).get(crash.shard)
        return a is not None and a.epoch > crash.epoch and bool(a.primary)

    await eventually(served_again, 60, f"{crash.shard} to be served again once a dead node is back")
    inventory = await client.get_inventory(crash.player, deadline_s=30)
    assert sorted(inventory.item_ids) == sorted([f"{crash.player}/first", f"{crash.player}/acked"]), inventory
    assert inventory.gold == 11


async def _started(cluster: ProcessCluster, shards: int) -> None:
    start(cluster, NODES, replication_factor=3, shards=shards)
    await eventually(settled(cluster, shards, 3), 60, "every shard to be served, placement settled")


async def _heal(cluster: ProcessCluster, client: RoutingClient, crash: DoubleCrash, failpoint: Path) -> None:
    """The lagging copy's disk works again and the dead nodes come back with their data
    dirs: the shard is served again with every acknowledged write."""
    await asyncio.to_thread(failpoint.unlink)
    for node in (crash.primary, crash.acker):
        cluster.start_node(node, NODES[node])
    await _served_with_every_write(cluster, client, crash)


async def test_a_lagging_copy_is_not_promoted_over_acknowledged_writes_of_two_dead_nodes(
    process_cluster: ProcessCluster,
) -> None:
    await _started(process_cluster, shards=4)
    async with RoutingClient(process_cluster.control_planes) as client:
        await client.wait_ready(20)
        crash = await _crash_primary_and_acker(process_cluster, client)
        # Nobody can be asked for the waiting shard's escrows: the in-doubt list says it is
        # incomplete rather than "nothing in doubt".
        async with TradeClient(process_cluster.control_planes) as trades:
            listed = await trades.in_doubt(deadline_s=20)
        assert crash.shard in listed.unled_shards and not listed.complete, listed
        for node in (crash.primary, crash.acker):
            process_cluster.start_node(node, NODES[node])
        await _served_with_every_write(process_cluster, client, crash)


async def test_a_replica_that_dies_first_stays_a_member_while_it_may_hold_writes_the_others_lack(
    process_cluster: ProcessCluster,
) -> None:
    """The replica that acknowledged a write dies first, and its lease ends while the
    primary still holds its own: the leader must not drop it from the shard while the
    staying replica lacks the primary's entries (its disk hangs). Dropped, it would no
    longer count as a copy that may hold more once the primary dies too, and the lagging
    copy would be promoted over the acknowledged write. Three shards, one primary a node:
    the failover of the dead replica's own shard leaves the primaries balanced, so no
    rebalancing handoff moves the shard under test meanwhile."""
    await _started(process_cluster, shards=3)
    async with RoutingClient(process_cluster.control_planes) as client:
        await client.wait_ready(20)
        crash, failpoint = await _acknowledged_past_a_lagging_copy(process_cluster, client)
        process_cluster.process(crash.acker).signal(signal.SIGKILL)
        keeps = re.compile(rf"keeping a copy in the shard.*\bshard={re.escape(crash.shard)}(\s|$)")

        def acker_gone() -> bool:
            listed = {n.node_id for n in process_cluster.nodes()}
            if not listed or crash.acker in listed:
                return False
            kept = any(keeps.search(line) for line in process_cluster.log_text("cp-0").splitlines())
            a = assignments(process_cluster)[crash.shard]
            return kept or crash.acker not in (*a.replicas, *a.retained)

        await eventually(acker_gone, 40, f"{crash.acker}'s lease to end and the leader to judge {crash.shard}")
        assert crash.acker in assignments(process_cluster)[crash.shard].retained, "dropped while the other lags"
        process_cluster.process(crash.primary).signal(signal.SIGKILL)
        await _waits_for_the_dead_copies(process_cluster, crash)
        await _heal(process_cluster, client, crash, failpoint)


async def test_a_promoted_replica_that_dies_next_leaves_its_shard_waiting_for_the_old_primary(
    process_cluster: ProcessCluster,
) -> None:
    """The other order: the primary dies first, and the replica that acknowledged the
    write (the greatest position) is promoted; the lagging copy is its only live replica.
    The old primary stays in the record until that replica holds the new primary's log,
    so when the new primary dies too, the shard waits for a dead copy instead of
    promoting the lagging one over the write."""
    await _started(process_cluster, shards=3)
    async with RoutingClient(process_cluster.control_planes) as client:
        await client.wait_ready(20)
        crash, failpoint = await _acknowledged_past_a_lagging_copy(process_cluster, client)
        process_cluster.process(crash.primary).signal(signal.SIGKILL)

        def promoted() -> bool:
            a = assignments(process_cluster)[crash.shard]
            return a.epoch > crash.epoch and a.primary == crash.acker

        await eventually(promoted, 40, f"{crash.acker}, which holds the acknowledged write, to lead {crash.shard}")
        after = assignments(process_cluster)[crash.shard]
        assert crash.primary in after.retained, "the old primary was dropped while the other replica lags"
        process_cluster.process(crash.acker).signal(signal.SIGKILL)
        crash = DoubleCrash(crash.shard, after.epoch, crash.primary, crash.acker, crash.player)
        await _waits_for_the_dead_copies(process_cluster, crash)
        await _heal(process_cluster, client, crash, failpoint)


async def test_a_replica_back_with_an_empty_data_dir_does_not_end_the_wait(process_cluster: ProcessCluster) -> None:
    """The replica that acknowledged the write comes back with its disk replaced: it holds
    nothing, so the shard still waits (for the old primary, which holds everything)."""
    await _started(process_cluster, shards=4)
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
