"""End to end: an etcd outage does not move the world.

etcd (a private one, so no other test is disturbed) is paused with SIGSTOP for twice the
lease TTL. Every lease expires while it is paused, every node registers again within a
heartbeat or two once it resumes, and the leader holds moves meanwhile. Every node is
then a new incarnation, so every shard goes through fence-then-promote at a higher epoch
(a node that registers again has lost its roles, flow 1), and ties go to the old
primary: no shard's primary ends on another node.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bluemarble.api.conversions import assignment_from_proto, placement_node_from_proto
from bluemarble.core.ids import ShardId, shard_id
from bluemarble.core.placement import PlacementConfig, violations
from bluemarble.v1 import controlplane_pb2 as pb
from scripts.localcluster import LocalEtcd, wait_until
from tests.e2e.conftest import ProcessCluster

pytestmark = pytest.mark.e2e

TTL_S = 3
NODES = {"n1": "z1", "n2": "z2", "n3": "z3", "n4": "z1"}
SHARDS = 16


@pytest.fixture
def private_cluster(tmp_path: Path) -> Iterator[ProcessCluster]:
    etcd = LocalEtcd(tmp_path / "etcd").start()
    cluster = ProcessCluster(etcd, "pause", tmp_path)
    try:
        yield cluster
    finally:
        if etcd.process is not None:
            etcd.process.signal(signal.SIGCONT)
        cluster.stop_all()
        etcd.kill()


def primaries(r: pb.ListAssignmentsResponse | None) -> dict[str, str]:
    return {} if r is None else {a.shard_id: a.primary for a in r.assignments}


def test_pausing_etcd_for_two_ttls_moves_no_primary(private_cluster: ProcessCluster) -> None:
    cluster = private_cluster
    cp = cluster.start_control_plane("--lease-ttl-s", str(TTL_S), "--replication-factor", "3",
                                     "--shards", str(SHARDS))
    for node, zone in NODES.items():
        cluster.start_node(node, zone)

    def settled() -> bool:
        """Placed and balanced over the four nodes (the one placement checker): the
        leader has nothing left to move, so any later move is the outage's doing."""
        r, nodes = cluster.assignments(cp), cluster.nodes(cp)
        if r is None or {n.node_id for n in nodes} != set(NODES):
            return False
        assignments = {ShardId(a.shard_id): assignment_from_proto(a) for a in r.assignments}
        found = violations(
            assignments, [placement_node_from_proto(n) for n in nodes], PlacementConfig(3, 0),
            shards=[shard_id(i) for i in range(SHARDS)],
        )
        return found == []

    wait_until(settled, 45, "every shard placed and balanced on the four nodes")
    before = primaries(cluster.assignments(cp))
    leases_before = {n.node_id: n.lease_id for n in cluster.nodes(cp)}
    assert set(leases_before) == set(NODES)

    assert cluster.etcd.process is not None
    cluster.etcd.process.signal(signal.SIGSTOP)
    time.sleep(2 * TTL_S)  # the fault itself: etcd is paused for two TTLs
    cluster.etcd.process.signal(signal.SIGCONT)

    # Every lease expired while etcd was paused: each node comes back on a new lease.
    def all_back_on_new_leases() -> bool:
        listed = {n.node_id: n.lease_id for n in cluster.nodes(cp)}
        return set(listed) == set(NODES) and all(listed[n] != leases_before[n] for n in NODES)

    wait_until(all_back_on_new_leases, 30, "every node to register again")
    # Watch the assignments for a while longer than the hold: nothing may move.
    deadline = time.monotonic() + 3 * TTL_S
    while time.monotonic() < deadline:
        now = primaries(cluster.assignments(cp))
        if now:
            moved = {s: (before[s], p) for s, p in now.items() if before.get(s) != p}
            assert not moved, f"{moved}\n--- control plane log ---\n{cluster.log_text('cp-0')[-6000:]}"
        time.sleep(0.1)
    assert primaries(cluster.assignments(cp)) == before
    after = cluster.assignments(cp)
    assert after is not None and all(a.epoch >= 2 for a in after.assignments), "no promotion at a higher epoch"
