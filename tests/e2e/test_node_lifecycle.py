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

from scripts.localcluster import free_port, wait_until
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
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dev_cluster.py"), "--once", "--dir", str(tmp_path),
         "--control-plane-port", str(free_port()), "--node-base-port", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 node(s)" in result.stdout
    for node in ("node-1", "node-2", "node-3"):
        assert node in result.stdout
    assert re.search(r"^leader +cp-0$", result.stdout, re.MULTILINE), result.stdout  # status names the leader
    assert re.search(r"^shards without primary +0$", result.stdout, re.MULTILINE), result.stdout
    assert result.stdout.count("shard-") >= 32  # the shards table and the ring table
    assert "ring version 1, hash xxh3_64" in result.stdout
    assert "etcd stopped" in result.stdout
