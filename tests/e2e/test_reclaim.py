"""End to end: a node deletes the copies of shards it no longer holds a role in once the
delay passed (``--reclaim-after-s``), and only those; the players' data stays whole on
the members. One control plane, R = 2, 8 shards, TTL 2 s; two nodes hold every shard,
then a third joins and takes roles from both."""

from __future__ import annotations

import re

import pytest

from bluemarble.client.routing import RoutingClient
from tests.e2e.conftest import ProcessCluster
from tests.e2e.test_data_plane import assert_exactly_once, assignments, eventually, grant_all, settled, start

pytestmark = pytest.mark.e2e

RECLAIM_AFTER_S = "2"


def roles(cluster: ProcessCluster, node: str) -> set[str]:
    return {s for s, a in assignments(cluster).items() if node == a.primary or node in a.replicas}


def reclaimed(cluster: ProcessCluster, node: str) -> set[str]:
    """The shards whose copy ``node`` logged as reclaimed."""
    found = set()
    for line in cluster.log_text(node).splitlines():
        if "reclaimed the copy" in line:
            match = re.search(r"\bshard=(\S+)", line)
            assert match is not None, line
            found.add(match.group(1))
    return found


def disk_only(cluster: ProcessCluster, node: str) -> set[str] | None:
    """The shards ``node`` reports a copy of without a role (None: no answer)."""
    status = cluster.shard_status(cluster.node_addresses[node])
    return None if status is None else {s for s, st in status.items() if st.on_disk_only}


async def test_a_node_deletes_the_copies_it_no_longer_holds_a_role_in(process_cluster: ProcessCluster) -> None:
    cluster = process_cluster
    start(cluster, {}, replication_factor=2)
    for node, zone in (("n1", "z1"), ("n2", "z2")):
        cluster.start_node(node, zone, "--reclaim-after-s", RECLAIM_AFTER_S)
    await eventually(settled(cluster, 8, 2), 40, "every shard served by n1 and n2")
    assert roles(cluster, "n1") == roles(cluster, "n2") == set(assignments(cluster))
    grants = {f"grant-{i}": (f"player-{i}", [f"item-{i}"], i + 1) for i in range(80)}
    async with RoutingClient(cluster.control_planes) as client:
        await client.wait_ready(20)
        await grant_all(client, grants)
        cluster.start_node("n3", "z3", "--reclaim-after-s", RECLAIM_AFTER_S)
        await eventually(lambda: bool(roles(cluster, "n3")), 30, "n3 to get roles")
        await eventually(settled(cluster, 8, 2), 60, "n3 to take its share")
        lost = {node: set(assignments(cluster)) - roles(cluster, node) for node in ("n1", "n2")}
        assert lost["n1"] and lost["n2"], lost  # n3 took roles from both
        for node in ("n1", "n2"):
            await eventually(lambda node=node: lost[node] <= reclaimed(cluster, node)  # type: ignore[misc]
                             and disk_only(cluster, node) == set(), 30, f"{node} to reclaim {sorted(lost[node])}")
            assert reclaimed(cluster, node) == lost[node]  # and nothing it holds a role in
        assert reclaimed(cluster, "n3") == set()
        await assert_exactly_once(client, grants)
