"""End to end: a node that starts while no control-plane replica answers (a leader change,
an etcd restart, a cluster coming up out of order) keeps trying, and serves once one
answers. It used to give up on fetching the ring after a few attempts, and then refused
every data-plane call ("no ring yet") for the rest of its life."""

from __future__ import annotations

import pytest

from bluemarble.client.routing import RoutingClient
from tests.e2e.conftest import ProcessCluster
from tests.e2e.test_data_plane import eventually, settled

pytestmark = pytest.mark.e2e


async def test_a_node_started_before_the_control_plane_serves_once_it_answers(
    process_cluster: ProcessCluster,
) -> None:
    cp = process_cluster.start_control_plane("--replication-factor", "1", "--shards", "2", "--lease-ttl-s", "4")
    control_plane = process_cluster.process("cp-0")
    control_plane.stop()
    node = process_cluster.start_node("n1", "z1")
    await eventually(lambda: "ring not fetched yet" in process_cluster.log_text("n1"), 60,
                     "the node to find no control plane")
    # Past the control-plane client's own retry bounds: it would have given up by now.
    await eventually(lambda: process_cluster.log_text("n1").count("ring not fetched yet") >= 3, 60,
                     "the node to keep trying")
    control_plane.start()
    await eventually(settled(process_cluster, 2, 1), 60, "the cluster to settle")
    async with RoutingClient([cp]) as client:
        granted = await client.grant_items("late-ring", ["late-ring/sword"], gold=5, request_id="late-ring-1",
                                           deadline_s=30)
        assert not granted.replayed
        inventory = await client.get_inventory("late-ring")
        assert list(inventory.item_ids) == ["late-ring/sword"] and inventory.gold == 5
    assert node.alive()
