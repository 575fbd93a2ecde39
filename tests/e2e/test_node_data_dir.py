"""End to end with real processes: a node refuses to start, in one line and with a non-zero
exit, on a node.db damaged while it was stopped, on another node's data dir, and on a data
dir that is empty, a file or cannot be created."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.localcluster import free_port, wait_until
from shardnode.main import EXIT_STORAGE_DAMAGED
from tests.e2e.conftest import ProcessCluster

pytestmark = pytest.mark.e2e
PAGE = 4096


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "[error" in line or "error:" in line]


def test_a_node_refuses_another_nodes_data_dir_and_a_db_damaged_while_it_was_stopped(
    process_cluster: ProcessCluster,
) -> None:
    process_cluster.start_control_plane("--lease-ttl-s", "10")
    node = process_cluster.start_node("node-3")
    wait_until(lambda: process_cluster.list_nodes() == ["node-3"], 20, "the node to register")
    address = process_cluster.node_addresses["node-3"]

    def writing() -> bool:  # the node led a shard and wrote its epoch-start entry
        held = process_cluster.shard_status(address)
        return bool(held) and any(s.applied_lsn >= 1 for s in held.values())

    wait_until(writing, 20, "the node to write to its storage")
    node.signal(signal.SIGTERM)
    assert node.proc is not None and node.proc.wait(10) == 0
    data_dir = process_cluster.workdir / "node-3"

    # Another id on node-3's data dir: refused before it registers, naming both ids.
    intruder = process_cluster.start_node("node-7", "z1", "--data-dir", str(data_dir))
    assert intruder.proc is not None and intruder.proc.wait(15) == 1
    errors = _error_lines(process_cluster.log_text("node-7"))
    assert len(errors) == 1 and "belongs to node 'node-3', not 'node-7'" in errors[0], errors
    assert process_cluster.list_nodes() == []

    # The outside probe's damage: three pages in the middle of the stopped node's file.
    with open(data_dir / "node.db", "r+b") as f:
        f.seek(PAGE * 3)
        f.write(random.Random(7).randbytes(PAGE * 3))
    restarted = process_cluster.start_node("node-3")
    assert restarted.proc is not None and restarted.proc.wait(15) == EXIT_STORAGE_DAMAGED
    text = process_cluster.log_text("node-3")
    errors = _error_lines(text)
    assert len(errors) == 1, text
    assert "node node-3 cannot serve" in errors[0] and "is damaged (quick_check: Page" in errors[0], errors
    assert f"move {data_dir} away" in errors[0] and "empty --data-dir" in errors[0], errors
    assert "Traceback" not in text and "recovered shards" not in text
    assert process_cluster.list_nodes() == []


@pytest.mark.parametrize(
    ("data_dir", "code", "words"),
    [
        ("", 2, "--data-dir is empty"),
        ("{file}", 1, "is not a directory"),
        ("/proc/bluemarble-node-test", 1, "cannot create data dir /proc/bluemarble-node-test"),
    ],
)
def test_a_bad_data_dir_is_refused_in_one_line_as_a_data_dir_error(
    tmp_path: Path, data_dir: str, code: int, words: str
) -> None:
    file = tmp_path / "a-file"
    file.write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "shardnode.main", "--node-id", "n1", "--listen", f"127.0.0.1:{free_port()}",
         "--control-plane", "127.0.0.1:1", "--data-dir", data_dir.format(file=file)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env={**os.environ, "BLUEMARBLE_LOG_FORMAT": "console"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    errors = _error_lines(output)
    assert len(errors) == 1 and words in errors[0], output
    assert "cannot serve metrics" not in output and "Traceback" not in output
    assert not (tmp_path / "node.db").exists()  # nothing written into the current directory


def test_a_node_refuses_to_join_another_cluster_with_its_data(process_cluster: ProcessCluster) -> None:
    """A data dir of one cluster, started against another's control plane (same node id;
    here another --cluster on the same etcd, as another etcd would be): refused in one line,
    before it reports a copy, rather than read as the other cluster's shards."""
    process_cluster.start_control_plane("--lease-ttl-s", "10")
    node = process_cluster.start_node("node-1")
    address = process_cluster.node_addresses["node-1"]

    def writing() -> bool:
        held = process_cluster.shard_status(address)
        return bool(held) and any(s.applied_lsn >= 1 for s in held.values())

    wait_until(writing, 20, "the node to write to its storage")
    node.signal(signal.SIGTERM)
    assert node.proc is not None and node.proc.wait(10) == 0
    assert "data dir recorded as this cluster's" in process_cluster.log_text("node-1")

    other = ProcessCluster(process_cluster.etcd, f"{process_cluster.cluster}-other", process_cluster.workdir / "other")
    other.workdir.mkdir()
    try:
        other.start_control_plane("--lease-ttl-s", "10")
        stray = other.start_node("node-1", "z1", "--data-dir", str(process_cluster.workdir / "node-1"))
        assert stray.proc is not None and stray.proc.wait(20) != 0
        errors = _error_lines(other.log_text("node-1"))
        assert len(errors) == 1 and "belongs to another cluster" in errors[0], errors
        assert other.list_nodes() == []
        # Its own cluster still takes it back.
        process_cluster.start_node("node-1")
        wait_until(lambda: process_cluster.list_nodes() == ["node-1"], 20, "the node to rejoin its own cluster")
    finally:
        other.stop_all()
