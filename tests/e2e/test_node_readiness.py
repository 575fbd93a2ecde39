"""End to end: a node's readiness (health of service ``bluemarble.v1.ShardNode``, what the
chart's readiness probe asks) says whether it is registered and its copies are whole,
while the process's own health ("", the liveness probe) stays SERVING throughout."""

from __future__ import annotations

import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bluemarble.v1 import shardnode_pb2, shardnode_pb2_grpc
from scripts.localcluster import wait_until
from tests.e2e.conftest import ProcessCluster

pytestmark = pytest.mark.e2e
READY = "bluemarble.v1.ShardNode"


def health(address: str, service: str) -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def readiness(address: str) -> tuple[bool, str] | None:
    with grpc.insecure_channel(address) as channel:
        try:
            stub = shardnode_pb2_grpc.ShardNodeStub(channel)
            r = stub.GetShardStatus(shardnode_pb2.GetShardStatusRequest(), timeout=2)
        except grpc.RpcError:
            return None
    return r.ready, r.not_ready_reason


def test_a_node_is_ready_only_while_registered(process_cluster: ProcessCluster) -> None:
    process_cluster.start_control_plane("--replication-factor", "1", "--shards", "2", "--lease-ttl-s", "2")
    control_plane = process_cluster.process("cp-0")
    control_plane.stop()
    process_cluster.start_node("n1")
    address = process_cluster.node_addresses["n1"]
    wait_until(lambda: readiness(address) is not None, 30, "the node to serve")
    assert readiness(address) == (False, "not registered with the control plane")
    assert health(address, "") == "SERVING"  # alive: the liveness probe passes
    assert health(address, READY) == "NOT_SERVING"

    control_plane.start()
    wait_until(lambda: health(address, READY) == "SERVING", 60, "the node to become ready")
    assert readiness(address) == (True, "")
    assert "node ready" in process_cluster.log_text("n1")

    # With the control plane gone, the lease may expire (TTL 2 s): not ready, still alive.
    control_plane.signal(signal.SIGKILL)
    wait_until(lambda: health(address, READY) == "NOT_SERVING", 20, "the node to stop being ready")
    state = readiness(address)
    assert state is not None and not state[0] and "lease may have expired" in state[1], state
    assert health(address, "") == "SERVING"
