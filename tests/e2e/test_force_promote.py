"""End to end with real processes: a shard whose every copy died stays without a primary,
and `bluemarblectl promote ... --accept-data-loss` gives it one on a live node that holds
none of its data, which then serves writes (the lost data stays lost, as the operator
accepted)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest

from bluemarble.client.routing import RoutingClient
from bluemarble.core.errors import NotFound
from tests.e2e.conftest import ProcessCluster
from tests.e2e.test_data_plane import assignments, eventually, players_on, settled, start

pytestmark = pytest.mark.e2e

SHARDS = 6


def ctl(cluster: ProcessCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bluemarble.cli.bluemarblectl", "--control-plane", cluster.control_planes[0], *args],
        capture_output=True, text=True, timeout=60,
    )


async def test_an_operator_promotes_a_live_node_for_a_shard_whose_copies_all_died(
    process_cluster: ProcessCluster,
) -> None:
    # Two nodes hold every shard (R = 2); both die; a third, empty node joins.
    start(process_cluster, {"n1": "z1", "n2": "z2"}, replication_factor=2, shards=SHARDS)
    await eventually(settled(process_cluster, SHARDS, 2), 40, "every shard to be served, placement settled")
    async with RoutingClient(process_cluster.control_planes) as client:
        await client.wait_ready(20)
        shard = sorted(assignments(process_cluster))[0]
        lost_player, new_player = players_on(client, {shard}, 2, "fp")
        await client.grant_items(lost_player, [f"{lost_player}/relic"], gold=5, deadline_s=20)
        before = assignments(process_cluster)[shard]
        for node in ("n1", "n2"):
            process_cluster.process(node).signal(signal.SIGKILL)
        process_cluster.start_node("n3", "z3")

        def stuck() -> bool:
            return "shard stays PRIMARY_LOST" in process_cluster.log_text("cp-0")

        await eventually(stuck, 30, "the shards to be left without a primary")
        assert assignments(process_cluster)[shard].primary in (before.primary, ""), "a copy without data took over"
        refused = await asyncio.to_thread(ctl, process_cluster, "promote", shard, "n3")
        # The CLI refuses before sending (the server's own refusal: tests/integration/test_fence_promote.py).
        assert refused.returncode == 2 and "needs --accept-data-loss" in refused.stderr, refused.stderr
        done = await asyncio.to_thread(ctl, process_cluster, "promote", shard, "n3", "--accept-data-loss")
        assert done.returncode == 0, done.stdout + done.stderr
        promoted = assignments(process_cluster)[shard]
        assert promoted.primary == "n3" and promoted.epoch > before.epoch, promoted
        assert f"{shard}: primary n3 at epoch {promoted.epoch}" in done.stdout
        # The shard serves again, from n3's (empty) copy: new writes work, the old ones are gone.
        granted = await client.grant_items(new_player, [f"{new_player}/sword"], gold=1, deadline_s=20)
        assert granted.inventory.item_ids == (f"{new_player}/sword",)
        with pytest.raises(NotFound):
            await client.get_inventory(lost_player, deadline_s=10)
        # The other shards stay without a primary: nobody asked for them.
        others = [a for s, a in assignments(process_cluster).items() if s != shard]
        assert all(a.primary != "n3" for a in others)
