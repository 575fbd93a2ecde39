"""End to end: a leader frozen with SIGSTOP keeps its key in etcd until its session lease
runs out. Status asked of the other replica meanwhile says the leader has stopped
renewing it (instead of naming it as if all were well), then names the new leader."""

from __future__ import annotations

import signal

import grpc
import pytest

from bluemarble.v1 import controlplane_pb2 as pb
from bluemarble.v1 import controlplane_pb2_grpc
from scripts.localcluster import wait_until
from tests.e2e.conftest import ProcessCluster

pytestmark = pytest.mark.e2e

TTL_S = 9


def status(address: str) -> pb.GetClusterStatusResponse | None:
    with grpc.insecure_channel(address) as channel:
        try:
            answer: pb.GetClusterStatusResponse = controlplane_pb2_grpc.ControlPlaneStub(channel).GetClusterStatus(
                pb.GetClusterStatusRequest(), timeout=5)
        except grpc.RpcError:
            return None
    return answer


def test_status_says_when_the_leader_stopped_renewing_its_lease(process_cluster: ProcessCluster) -> None:
    first = process_cluster.start_control_plane("--lease-ttl-s", str(TTL_S))
    wait_until(lambda: (s := status(first)) is not None and s.leader == "cp-0", 20, "cp-0 to lead")
    second = process_cluster.start_control_plane("--lease-ttl-s", str(TTL_S))
    healthy = status(second)
    assert healthy is not None and healthy.leader == "cp-0"
    assert not [w for w in healthy.warnings if "renewed its lease" in w], healthy.warnings
    process_cluster.process("cp-0").signal(signal.SIGSTOP)
    try:
        seen: list[str] = []

        def warned() -> bool:
            s = status(second)
            seen.extend(w for w in (s.warnings if s is not None and s.leader == "cp-0" else ())
                        if "renewed its lease" in w)
            return bool(seen)

        wait_until(warned, TTL_S, "status from cp-1 to warn of the silent leader")
        assert "the leader, replica cp-0, has not renewed its lease for about" in seen[0], seen[0]
        wait_until(lambda: (s := status(second)) is not None and s.leader == "cp-1", 3 * TTL_S, "cp-1 to lead")
    finally:
        process_cluster.process("cp-0").signal(signal.SIGCONT)


def test_status_after_a_cold_restart_says_the_leader_key_and_the_nodes_are_left_over(
    process_cluster: ProcessCluster,
) -> None:
    """Everything SIGKILLed, then the control plane alone started again under the same
    replica id: until their leases run out, etcd still holds the dead run's leader key and
    the dead nodes' registrations. Status must not read as a healthy cluster meanwhile:
    it says the key is an earlier run's and names the nodes that do not answer."""
    ttl = "20"
    first = process_cluster.start_control_plane("--lease-ttl-s", ttl)
    for node in ("n1", "n2"):
        process_cluster.start_node(node)

    def placed() -> bool:
        s = status(first)
        return s is not None and s.leader == "cp-0" and s.node_count == 2 and not s.shards_without_primary

    wait_until(placed, 30, "cp-0 to lead and both nodes to hold the shards")
    healthy = status(first)
    assert healthy is not None
    left_over = [w for w in healthy.warnings if "earlier run" in w or "do not answer" in w]
    assert not left_over, healthy.warnings
    for name in ("cp-0", "n1", "n2"):
        process_cluster.process(name).signal(signal.SIGKILL)
    again = process_cluster.start_control_plane("--lease-ttl-s", ttl, "--replica-id", "cp-0")
    seen: dict[str, str] = {}

    def warned() -> bool:
        s = status(again)
        for w in s.warnings if s is not None else ():
            for phrase in ("from an earlier run of it", "registered node(s) do not answer"):
                if phrase in w:
                    seen[phrase] = w
        return len(seen) == 2

    wait_until(warned, 15, "status from the restarted cp-0 to warn of the left-over key and nodes")
    assert "the leader key names this replica, cp-0, but from an earlier run of it" in seen["from an earlier run of it"]
    assert "2 registered node(s) do not answer: n1, n2" in seen["registered node(s) do not answer"], seen
