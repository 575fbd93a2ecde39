"""End to end with real processes: a killed node leaves the registry within TTL + 1 s,
a stopped node leaves at once, and the dev cluster command works."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.localcluster import wait_until
from tests.e2e.conftest import ProcessCluster

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_sigkilled_node_disappears_after_its_lease_ttl(process_cluster: ProcessCluster) -> None:
    process_cluster.start_control_plane("--lease-ttl-s", "2")
    victim = process_cluster.start_node("n1")
    process_cluster.start_node("n2")
    wait_until(lambda: process_cluster.list_nodes() == ["n1", "n2"], 20, "two nodes to register")
    victim.signal(signal.SIGKILL)
    # Expected within the TTL (2 s) plus a refresh; 3x that for a loaded machine.
    wait_until(lambda: process_cluster.list_nodes() == ["n2"], 8.0, "the killed node to disappear")
    # The survivor keeps its registration well past a TTL.
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert process_cluster.list_nodes() == ["n2"]
        time.sleep(0.25)


def test_sigtermed_node_deregisters_at_once_and_exits_cleanly(process_cluster: ProcessCluster) -> None:
    process_cluster.start_control_plane("--lease-ttl-s", "10")
    node = process_cluster.start_node("n1")
    wait_until(lambda: process_cluster.list_nodes() == ["n1"], 20, "the node to register")
    node.signal(signal.SIGTERM)
    # Deregistration is immediate; 3 s is generous and still far less than the 10 s TTL.
    wait_until(lambda: process_cluster.list_nodes() == [], 3.0, "the stopped node to disappear")
    assert node.proc is not None and node.proc.wait(10) == 0


def test_node_survives_a_control_plane_replica_loss(process_cluster: ProcessCluster) -> None:
    process_cluster.start_control_plane("--lease-ttl-s", "2")
    second = process_cluster.start_control_plane()
    process_cluster.start_node("n1")
    wait_until(lambda: process_cluster.list_nodes() == ["n1"], 20, "the node to register")
    process_cluster.processes[0].signal(signal.SIGKILL)  # the first replica
    deadline = time.monotonic() + 5  # 2.5 TTLs
    while time.monotonic() < deadline:
        assert process_cluster.list_nodes(second) == ["n1"]
        time.sleep(0.25)


def test_dev_cluster_brings_up_three_nodes_and_stops_cleanly(tmp_path: Path) -> None:
    # Port 0: dev_cluster picks every port itself. A port picked here, free a moment ago,
    # could be handed by the kernel to dev_cluster's etcd too (a CI run saw the control
    # plane fail "Address already in use" so).
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dev_cluster.py"), "--once", "--dir", str(tmp_path),
         "--control-plane-port", "0", "--node-base-port", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 node(s)" in result.stdout
    for node in ("node-1", "node-2", "node-3"):
        assert node in result.stdout
    assert re.search(r"^leader +cp-0$", result.stdout, re.MULTILINE), result.stdout  # status names the leader
    assert re.search(r"^shards without primary +0$", result.stdout, re.MULTILINE), result.stdout
    # Shown once placement is done and the replicas' copies reported: a fresh cluster warns of nothing.
    assert not re.search(r"^warning ", result.stdout, re.MULTILINE), result.stdout
    assert result.stdout.count("shard-") >= 32  # the shards table and the ring table
    assert "ring version 1, hash xxh3_64" in result.stdout
    assert "etcd stopped" in result.stdout


def _placed(process_cluster: ProcessCluster, nodes: set[str], copies: int) -> bool:
    """Every shard has a primary and ``copies`` members, all of them among ``nodes``."""
    listed = process_cluster.assignments()
    if listed is None or not listed.assignments:
        return False
    return all(
        a.primary and len({a.primary, *a.replicas}) == copies and {a.primary, *a.replicas} <= nodes
        for a in listed.assignments
    )


def _leads(cluster: ProcessCluster, node: str) -> bool:
    listed = cluster.assignments()
    return listed is not None and any(a.primary == node for a in listed.assignments)


def _holding(cluster: ProcessCluster) -> set[str]:
    """The nodes that hold a copy of some shard."""
    listed = cluster.assignments()
    return set() if listed is None else {n for a in listed.assignments for n in (a.primary, *a.replicas) if n}


def test_a_sigtermed_node_hands_its_roles_over_before_it_leaves(process_cluster: ProcessCluster) -> None:
    process_cluster.start_control_plane("--lease-ttl-s", "4", "--replication-factor", "2", "--shards", "8")
    leaving = "--leave-timeout-s", "40"
    node = process_cluster.start_node("n1", "z1", *leaving)
    process_cluster.start_node("n2", "z2", *leaving)
    process_cluster.start_node("n3", "z3", *leaving)
    # Placed on all three (the first placement may use the first two to register alone),
    # n1 leading some shard.
    wait_until(
        lambda: _placed(process_cluster, {"n1", "n2", "n3"}, 2) and _holding(process_cluster) == {"n1", "n2", "n3"}
        and _leads(process_cluster, "n1"), 40, "every shard placed on two nodes, all three used, n1 leading some",
    )
    node.signal(signal.SIGTERM)
    # It goes once the control plane has moved every role away (a drain), not at once:
    # its primaries are handed over and its copies made elsewhere first.
    assert node.proc is not None and node.proc.wait(40) == 0
    text = process_cluster.log_text("n1")
    assert "moving this node's roles away first" in text, text[-2000:]
    assert "drained: holding no shard any more; leaving" in text, text[-2000:]
    assert "stopping anyway" not in text
    assert _placed(process_cluster, {"n2", "n3"}, 2), process_cluster.assignments()
    assert process_cluster.list_nodes() == ["n2", "n3"]
    # Gone only once no shard counts on its copy any more: a primary failing next must not
    # wait for it (an outside probe stopped a second node right after a drained one, and a
    # shard stayed without a primary, waiting for the drained node, until it came back).
    listed = process_cluster.assignments()
    assert listed is not None and not [a.shard_id for a in listed.assignments if "n1" in a.retained], listed


def test_a_node_stopped_right_after_a_drained_one_leaves_no_shard_waiting_for_the_drained_one(
    process_cluster: ProcessCluster,
) -> None:
    """A drained node leaves only once no shard keeps it ``retained`` (counting on its copy
    until a staying copy is known to hold what it held). Gone earlier, a shard whose
    primary stopped next waited for it to come back: an outside probe stopped two nodes
    one after the other, and a shard had no primary until the drained one returned."""
    process_cluster.start_control_plane("--lease-ttl-s", "4", "--replication-factor", "2", "--shards", "8")
    leaving = "--leave-timeout-s", "40"
    first = process_cluster.start_node("n1", "z1", *leaving)
    second = process_cluster.start_node("n2", "z2", *leaving)
    process_cluster.start_node("n3", "z3", *leaving)
    wait_until(
        lambda: _placed(process_cluster, {"n1", "n2", "n3"}, 2) and _holding(process_cluster) == {"n1", "n2", "n3"}
        and _leads(process_cluster, "n1") and _leads(process_cluster, "n2"), 40,
        "every shard placed on two nodes, all three used, n1 and n2 leading some",
    )
    first.signal(signal.SIGTERM)
    assert first.proc is not None and first.proc.wait(40) == 0
    second.signal(signal.SIGTERM)  # too few nodes would remain to drain it: it leaves at once
    assert second.proc is not None and second.proc.wait(40) == 0

    def all_on_n3() -> bool:
        listed = process_cluster.assignments()
        return listed is not None and bool(listed.assignments) and all(
            a.primary == "n3" and not a.retained for a in listed.assignments)

    wait_until(all_on_n3, 30, "n3 to lead every shard, no shard waiting for a node that left")


def test_a_sigtermed_node_leaves_at_once_when_no_other_node_could_hold_its_copies(
    process_cluster: ProcessCluster,
) -> None:
    # A long TTL: heartbeats every 10 s. The stopping node asks at once, not at its next beat.
    process_cluster.start_control_plane("--lease-ttl-s", "30", "--replication-factor", "2", "--shards", "4")
    node = process_cluster.start_node("n1", "z1", "--leave-timeout-s", "40")
    process_cluster.start_node("n2", "z2", "--leave-timeout-s", "40")
    wait_until(lambda: _placed(process_cluster, {"n1", "n2"}, 2), 40, "every shard placed on both nodes")
    started = time.monotonic()
    node.signal(signal.SIGTERM)
    assert node.proc is not None and node.proc.wait(40) == 0
    # Declined by a heartbeat sent at the signal, far sooner than the 40 s it may wait.
    assert time.monotonic() - started < 5
    assert "did not drain this node" in process_cluster.log_text("n1")


def test_a_control_plane_replica_stopping_gracefully_costs_its_nodes_no_warning(
    process_cluster: ProcessCluster,
) -> None:
    first = process_cluster.start_control_plane("--lease-ttl-s", "4")
    process_cluster.start_control_plane()
    process_cluster.start_node("n1")
    wait_until(lambda: process_cluster.list_nodes(first) == ["n1"], 20, "the node to register")
    # Its streams open before the stop: a replica gone before the node's first heartbeat
    # reached it is a refused connection, which no node can tell from a crash.
    wait_until(lambda: "node ready" in process_cluster.log_text("n1"), 20, "the node to be ready (its streams open)")
    replica = process_cluster.processes[0]  # cp-0, the node's first address
    replica.signal(signal.SIGTERM)
    assert replica.proc is not None and replica.proc.wait(30) == 0
    # Whichever replica its streams used (they may have gone through the other one from the
    # start: nothing to move then), the node stays registered through the other replica for
    # longer than its lease's 4 s: its heartbeats renewed the lease there.
    second = process_cluster.control_planes[1]
    renewed = time.monotonic() + 5
    while time.monotonic() < renewed:
        assert process_cluster.list_nodes(second) == ["n1"], process_cluster.log_text("n1")[-4000:]
        time.sleep(0.25)
    # The processes log in the console format ("... [warning  ] event ..."): the JSON
    # form this looked for never occurred, so the check could not fail.
    warnings = [line for line in process_cluster.log_text("n1").splitlines() if re.search(r"\[(warning|error)", line)]
    assert not warnings, warnings
