"""End to end: a control-plane replica stopped with SIGSTOP (hung: its sockets stay open,
nothing fails, nothing answers) costs no node its lease and no shard its primary, and
nodes whose assignment stream was on it follow changes through the other replica
within the documented bound (shardnode.agent: 3 s of silence, then the next address).

2 control-plane replicas, 4 nodes in 3 zones, 8 shards, R = 3, TTL 3 s. Every node is
started with the same ``--control-plane`` list, so all of them register, heartbeat and
open their assignment stream on the first replica, cp-0: that is the one stopped.
"""

from __future__ import annotations

import collections
import re
import signal
import time
from collections.abc import Iterator

import grpc
import pytest

from bluemarble.v1 import common_pb2, controlplane_pb2_grpc
from bluemarble.v1 import controlplane_pb2 as pb
from scripts.localcluster import wait_until
from tests.e2e.conftest import ProcessCluster

pytestmark = pytest.mark.e2e

NODES = {"n1": "z1", "n2": "z2", "n3": "z3", "n4": "z1"}
SHARDS = 8
TTL_S = 3
STOPPED_FOR_S = 9.0  # three TTLs
STREAM_IDLE_TIMEOUT_S = 3.0  # shardnode.agent.DEFAULT_STREAM_IDLE_TIMEOUT_S
# Documented: a silent stream is given up after 3 s and reopened on the next address
# within about 0.1 s. The slack covers this test's polling and a loaded 2-core machine.
DETECTION_BOUND_S = STREAM_IDLE_TIMEOUT_S + 0.1
SLACK_S = 2.0

_REGISTERED = re.compile(r"\bregistered\s+control_plane=(\S+)")
_MOVED = re.compile(r"moving to another control-plane replica\s+failed=(\S+) next=(\S+)")
_LOST = re.compile(r"session state\b.*\bstate=lost\b")


def start(cluster: ProcessCluster) -> None:
    flags = ("--lease-ttl-s", str(TTL_S), "--replication-factor", "3", "--shards", str(SHARDS))
    cluster.start_control_plane(*flags)
    cluster.start_control_plane(*flags)
    for node, zone in NODES.items():
        cluster.start_node(node, zone)
    other = cluster.control_planes[1]
    wait_until(lambda: settled(cluster, set(NODES)), 60, "every shard to be placed, spread and balanced")
    wait_until(lambda: nodes_follow(cluster, other, set(NODES)), 30, "nodes to hold their assignments")


def placed(r: pb.ListAssignmentsResponse | None, live: set[str]) -> bool:
    """Every shard has a live primary and two live replicas, on distinct nodes that span
    as many zones as they can, and primaries are balanced (what placement converges to:
    a placement that is not there yet still has moves, hence epoch changes, to make)."""
    if r is None or len(r.assignments) != SHARDS:
        return False
    zones = len({NODES[n] for n in live})
    for a in r.assignments:
        members = [a.primary, *a.replicas]
        if len(members) != min(3, len(live)) or len(set(members)) != len(members):
            return False
        if any(m not in live for m in members) or len({NODES[m] for m in members}) < min(len(members), zones):
            return False
    primaries = collections.Counter(a.primary for a in r.assignments)
    counts = [primaries.get(n, 0) for n in live]
    return max(counts) - min(counts) <= 1


def settled(cluster: ProcessCluster, live: set[str]) -> bool:
    """Placed, and both replicas list the same assignments."""
    views = [cluster.assignments(address) for address in cluster.control_planes]
    if not all(placed(v, live) for v in views):
        return False
    return all(list(v.assignments) == list(views[0].assignments) for v in views if v is not None)


def expected_roles(r: pb.ListAssignmentsResponse, node: str) -> dict[str, tuple[int, int]]:
    roles = {}
    for a in r.assignments:
        if a.primary == node:
            roles[a.shard_id] = (common_pb2.SHARD_ROLE_PRIMARY, a.epoch)
        elif node in a.replicas:
            roles[a.shard_id] = (common_pb2.SHARD_ROLE_REPLICA, a.epoch)
    return roles


def nodes_follow(cluster: ProcessCluster, address: str, nodes: set[str]) -> bool:
    """Each of ``nodes`` holds (GetShardStatus: what its agent holds) exactly the roles
    and epochs the replica at ``address`` lists for it."""
    r = cluster.assignments(address)
    if r is None:
        return False
    return all(
        cluster.node_statuses(cluster.node_addresses[node]) == expected_roles(r, node) for node in nodes
    )


def control_plane_in_use(log: str) -> str:
    """The control-plane address a node uses now, from its log: where it registered,
    then wherever it moved to."""
    current = ""
    for line in log.splitlines():
        if m := _REGISTERED.search(line):
            current = m.group(1)
        elif m := _MOVED.search(line):
            current = m.group(2)
    return current


def stream_still_on(log: str, address: str) -> bool:
    """Whether the node's assignment stream is still the one it opened after registering
    on ``address`` (no stream of it has failed since)."""
    m = _REGISTERED.search(log)
    return m is not None and m.group(1) == address and "loop=assignments" not in log


@pytest.fixture
def stopped_replica_resumes(process_cluster: ProcessCluster) -> Iterator[ProcessCluster]:
    """Whatever happens in the test, cp-0 is continued before the cluster is stopped."""
    try:
        yield process_cluster
    finally:
        if process_cluster.control_planes:
            process_cluster.process("cp-0").signal(signal.SIGCONT)


def test_sigstop_of_the_replica_nodes_use_costs_no_lease_and_no_epoch(
    stopped_replica_resumes: ProcessCluster,
) -> None:
    cluster = stopped_replica_resumes
    start(cluster)
    hung, other = cluster.control_planes
    before = cluster.assignments(other)
    assert before is not None
    placement = {a.shard_id: (a.epoch, a.primary) for a in before.assignments}
    attached = {n for n in NODES if control_plane_in_use(cluster.log_text(n)) == hung}
    assert attached, "no node heartbeats through the first replica: the test would prove nothing"

    cluster.process("cp-0").signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    polls = answered = 0
    try:
        while time.monotonic() - stopped_at < STOPPED_FOR_S:
            polls += 1
            live = cluster.list_nodes(other)
            r = cluster.assignments(other)
            if live is not None and r is not None:
                answered += 1
                assert set(live) == set(NODES), f"{time.monotonic() - stopped_at:.1f} s into the stop: nodes {live}"
                now = {a.shard_id: (a.epoch, a.primary) for a in r.assignments}
                assert now == placement, f"{time.monotonic() - stopped_at:.1f} s into the stop: {now} != {placement}"
            time.sleep(0.1)
    finally:
        cluster.process("cp-0").signal(signal.SIGCONT)
    assert answered >= polls * 0.8 and answered >= 30, f"the other replica answered {answered} of {polls} polls"
    print(f"hung replica stopped {STOPPED_FOR_S:g} s; {answered}/{polls} polls of the other replica; "
          f"nodes attached to it: {sorted(attached)}; leader now: {leader(cluster, other)}")

    # After SIGCONT both replicas agree that nothing happened.
    wait_until(lambda: cluster.list_nodes(hung) is not None, 15, "cp-0 to answer again")
    for address in (hung, other):
        assert set(cluster.list_nodes(address) or ()) == set(NODES)
        r = cluster.assignments(address)
        assert r is not None and {a.shard_id: (a.epoch, a.primary) for a in r.assignments} == placement
    for node in NODES:
        log = cluster.log_text(node)
        assert cluster.process(node).alive(), f"{node} exited:\n{cluster.process(node).log_tail()}"
        assert not _LOST.search(log), f"{node} thought its lease lost:\n{cluster.process(node).log_tail()}"
        if node in attached:  # it left the hung replica for the other one
            assert f"heartbeat to {hung} got no answer" in log, cluster.process(node).log_tail()
            assert control_plane_in_use(log) == other


def test_nodes_follow_a_drain_through_the_other_replica_while_theirs_is_hung(
    stopped_replica_resumes: ProcessCluster,
) -> None:
    cluster = stopped_replica_resumes
    start(cluster)
    hung, other = cluster.control_planes
    r = cluster.assignments(other)
    assert r is not None
    primaries = collections.Counter(a.primary for a in r.assignments)
    target = max(sorted(NODES), key=lambda n: primaries[n])
    others = set(NODES) - {target}
    # Every node opened its assignment stream on cp-0 (where it registered) and it has
    # not broken since.
    watching_hung = {n for n in others if stream_still_on(cluster.log_text(n), hung)}
    assert watching_hung, "no node's assignment stream is on the first replica: the test would prove nothing"

    cluster.process("cp-0").signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        drain(other, target)

        def target_holds_nothing() -> bool:
            r = cluster.assignments(other)
            return r is not None and placed(r, others) and not expected_roles(r, target)

        wait_until(target_holds_nothing, 60, f"the drain of {target} (through {other})", interval_s=0.1)
        final_at = time.monotonic()
        wait_until(lambda: nodes_follow(cluster, other, others), 30, "the other nodes to learn their new roles")
        learned_at = time.monotonic()
    finally:
        cluster.process("cp-0").signal(signal.SIGCONT)

    print(f"drain of {target}: final placement {final_at - stopped_at:.2f} s after the stop, nodes "
          f"{sorted(others)} followed at {learned_at - stopped_at:.2f} s (streams on the hung replica: "
          f"{sorted(watching_hung)}; leader now: {leader(cluster, other)})")
    # They learned through the other replica within the bound: at most DETECTION_BOUND_S
    # after their stream went silent, or right away when the change came later.
    due_at = max(final_at, stopped_at + DETECTION_BOUND_S)
    assert learned_at - due_at <= SLACK_S, (
        f"stopped at 0, final placement at {final_at - stopped_at:.1f} s, nodes followed at "
        f"{learned_at - stopped_at:.1f} s"
    )
    for node in watching_hung:
        log = cluster.log_text(node)
        assert f"assignment stream from {hung} delivered nothing for 3 s" in log, cluster.process(node).log_tail()
        assert not _LOST.search(log), cluster.process(node).log_tail()
    assert cluster.process(target).proc.wait(15) == 0  # type: ignore[union-attr]


def leader(cluster: ProcessCluster, address: str) -> str:
    status = cluster.status(address)
    return status.leader if status is not None else "?"


def drain(address: str, node: str) -> None:
    """DrainNode through ``address`` (retried: the replica may be busy taking over)."""

    def drained() -> bool:
        with grpc.insecure_channel(address) as channel:
            try:
                controlplane_pb2_grpc.ControlPlaneStub(channel).DrainNode(pb.DrainNodeRequest(node_id=node), timeout=5)
            except grpc.RpcError:
                return False
        return True

    wait_until(drained, 30, f"DrainNode({node}) through {address}", interval_s=0.2)
