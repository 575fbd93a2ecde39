"""scripts/dev_cluster.py's supervision: a node that leaves on purpose (exit 0, e.g. after
``bluemarblectl drain``) is dropped and the cluster keeps running, as when it dies; the
control plane's exit stops it unless another replica serves (one it started, or one
restarted on its address by hand); etcd's exit stops it, unless one restarted by hand serves."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.dev_cluster import check_processes
from scripts.localcluster import ManagedProcess


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[ManagedProcess]]:
    processes: list[ManagedProcess] = []
    yield processes
    for proc in processes:
        proc.kill()


def _process(tmp_path: Path, started: list[ManagedProcess], name: str, code: int | None) -> ManagedProcess:
    """A real child that exits with ``code`` at once, or runs until killed (None)."""
    script = "import time; time.sleep(60)" if code is None else f"raise SystemExit({code})"
    proc = ManagedProcess(name, [sys.executable, "-c", script], tmp_path / f"{name}.log").start()
    started.append(proc)
    if code is not None:
        assert proc.proc is not None
        proc.proc.wait(10)
    return proc


NODES = ("node-1", "node-2", "node-3")


def test_a_node_that_exits_0_is_dropped_and_the_rest_keep_running(
    tmp_path: Path, started: list[ManagedProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    cp = _process(tmp_path, started, "controlplane", None)
    n1 = _process(tmp_path, started, "node-1", None)
    drained = _process(tmp_path, started, "node-3", 0)
    watched = [cp, n1, drained]
    assert check_processes(watched, NODES) is None
    assert watched == [cp, n1]
    assert "node-3 left the cluster (exit 0" in capsys.readouterr().out
    assert check_processes(watched, NODES) is None  # reported once
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(("name", "code"), [("controlplane", 0), ("controlplane", 1), ("etcd", 1)])
def test_the_control_plane_or_etcd_exiting_stops_the_cluster(
    tmp_path: Path, started: list[ManagedProcess], capsys: pytest.CaptureFixture[str], name: str, code: int
) -> None:
    running = _process(tmp_path, started, "node-1", None)
    failed = _process(tmp_path, started, name, code)
    assert check_processes([running, failed], NODES) == 1
    assert f"{name} exited unexpectedly (exit {code})" in capsys.readouterr().out


@pytest.mark.parametrize("code", [1, 3, None])  # None: killed by a signal
def test_a_node_that_dies_is_reported_and_the_rest_keep_running(
    tmp_path: Path, started: list[ManagedProcess], capsys: pytest.CaptureFixture[str], code: int | None
) -> None:
    """Its shards fail over to their replicas: what the local cluster is there to show."""
    cp = _process(tmp_path, started, "controlplane", None)
    node = _process(tmp_path, started, "node-2", code)
    if code is None:
        node.kill()
    watched = [cp, node]
    assert node.exit_code() not in (None, 0)
    assert check_processes(watched, NODES) is None
    assert watched == [cp]
    assert "node-2 died (exit" in capsys.readouterr().out


def test_exit_code_is_none_while_running(tmp_path: Path, started: list[ManagedProcess]) -> None:
    node = _process(tmp_path, started, "node-1", None)
    assert node.exit_code() is None
    assert ManagedProcess("x", ["true"], tmp_path / "x.log").exit_code() is None


def test_a_control_plane_replica_that_exits_while_another_serves_is_dropped(
    tmp_path: Path, started: list[ManagedProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """With --control-planes 2 one replica may be stopped or killed: the other takes its
    work over and the cluster goes on; the last one's exit stops it."""
    node = _process(tmp_path, started, "node-1", None)
    other = _process(tmp_path, started, "controlplane-1", None)
    killed = _process(tmp_path, started, "controlplane", 3)
    watched = [node, other, killed]
    assert check_processes(watched, NODES) is None
    assert watched == [node, other]
    assert "controlplane exited (exit 3); controlplane-1 keep serving" in capsys.readouterr().out
    other.kill()
    assert other.proc is not None
    other.proc.wait(10)
    assert check_processes(watched, NODES) == 1
    assert "controlplane-1 exited unexpectedly" in capsys.readouterr().out


def test_the_last_replica_restarted_outside_the_script_keeps_the_cluster_running(
    tmp_path: Path, started: list[ManagedProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """A rolling restart stops the replica this script started and starts another on its
    address: once that one serves, the cluster goes on; if nothing serves, it stops."""
    node = _process(tmp_path, started, "node-1", None)
    stopped = _process(tmp_path, started, "controlplane", 0)
    answers = iter([False, False, True])
    watched = [node, stopped]
    assert check_processes(watched, NODES, lambda: next(answers), wait_s=5) is None
    assert watched == [node]
    assert "a control plane serves at the cluster's addresses" in capsys.readouterr().out
    gone = _process(tmp_path, started, "controlplane-1", 0)
    assert check_processes([node, gone], NODES, lambda: False, wait_s=0.2) == 1
    assert "controlplane-1 exited unexpectedly (exit 0)" in capsys.readouterr().out


def test_etcd_restarted_by_hand_keeps_the_cluster_running_else_its_exit_stops_it(
    tmp_path: Path, started: list[ManagedProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    """An etcd restart drill: the etcd this script started stops, another serves on its
    address; without one, etcd's exit stops the cluster (not a cluster left on a dead etcd)."""
    cp = _process(tmp_path, started, "controlplane", None)
    etcd = _process(tmp_path, started, "etcd", 0)
    answers = iter([False, True])
    watched = [cp, etcd]
    assert check_processes(watched, NODES, lambda: False, 5, lambda: next(answers)) is None
    assert watched == [cp]
    assert "an etcd serves at its address" in capsys.readouterr().out
    gone = _process(tmp_path, started, "etcd", 0)
    assert check_processes([cp, gone], NODES, lambda: True, 0.2, lambda: False) == 1
    assert "etcd exited unexpectedly (exit 0)" in capsys.readouterr().out
