"""Real processes: a control plane and shard nodes started as the console scripts would
be, killed with real signals, always stopped at the end."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from bluemarble.v1 import common_pb2, controlplane_pb2_grpc, shardnode_pb2, shardnode_pb2_grpc
from bluemarble.v1 import controlplane_pb2 as pb
from scripts.localcluster import LocalEtcd, ManagedProcess, free_port, wait_until
from tests.conftest import CALL_FAILED

# A failed test prints this much of each process's log (its captured teardown output).
LOG_TAIL_LINES = 60
LOG_LINE_CHARS = 400


class ProcessCluster:
    def __init__(self, etcd: LocalEtcd, cluster: str, workdir: Path):
        self.etcd = etcd
        self.cluster = cluster
        self.workdir = workdir
        self.processes: list[ManagedProcess] = []
        self.control_planes: list[str] = []
        self.node_addresses: dict[str, str] = {}

    def start_control_plane(self, *extra: str, env: dict[str, str] | None = None) -> str:
        address = f"127.0.0.1:{free_port()}"
        name = f"cp-{len(self.control_planes)}"
        proc = ManagedProcess(
            name,
            [sys.executable, "-m", "controlplane.server.main", "--listen", address, "--etcd", self.etcd.endpoint,
             "--cluster", self.cluster, "--replica-id", name, *extra],
            self.workdir / f"{name}.log",
            env=env,
        ).start()
        self.processes.append(proc)
        self.control_planes.append(address)
        wait_until(lambda: self.list_nodes(address) is not None, 20, f"{name} to serve")
        return address

    def start_node(self, node_id: str, zone: str = "z1", *extra: str) -> ManagedProcess:
        """Starts node ``node_id``; a node started before is restarted with the same
        address and data dir (its old process must be dead)."""
        address = self.node_addresses.get(node_id) or f"127.0.0.1:{free_port()}"
        self.node_addresses[node_id] = address
        starts = sum(1 for p in self.processes if p.name == node_id or p.name.startswith(f"{node_id}#"))
        proc = ManagedProcess(
            node_id if starts == 0 else f"{node_id}#{starts}",
            [sys.executable, "-m", "shardnode.main", "--node-id", node_id,
             "--listen", address, "--control-plane", ",".join(self.control_planes),
             "--data-dir", str(self.workdir / node_id), "--zone", zone, *extra],
            self.workdir / f"{node_id}{'' if starts == 0 else f'.{starts}'}.log",
        ).start()
        self.processes.append(proc)
        return proc

    def list_nodes(self, address: str | None = None) -> list[str] | None:
        with grpc.insecure_channel(address or self.control_planes[0]) as channel:
            try:
                r = controlplane_pb2_grpc.ControlPlaneStub(channel).ListNodes(pb.ListNodesRequest(), timeout=2)
            except grpc.RpcError:
                return None
        return [n.node_id for n in r.nodes]

    def nodes(self, address: str | None = None) -> list[pb.Node]:
        """The node records, or [] when the replica does not answer."""
        with grpc.insecure_channel(address or self.control_planes[0]) as channel:
            try:
                r = controlplane_pb2_grpc.ControlPlaneStub(channel).ListNodes(pb.ListNodesRequest(), timeout=2)
            except grpc.RpcError:
                return []
        return list(r.nodes)

    def assignments(self, address: str | None = None) -> pb.ListAssignmentsResponse | None:
        with grpc.insecure_channel(address or self.control_planes[0]) as channel:
            try:
                return controlplane_pb2_grpc.ControlPlaneStub(channel).ListAssignments(
                    pb.ListAssignmentsRequest(), timeout=2
                )
            except grpc.RpcError:
                return None

    def status(self, address: str) -> pb.GetClusterStatusResponse | None:
        with grpc.insecure_channel(address) as channel:
            try:
                return controlplane_pb2_grpc.ControlPlaneStub(channel).GetClusterStatus(
                    pb.GetClusterStatusRequest(), timeout=2
                )
            except grpc.RpcError:
                return None

    def node_statuses(self, address: str) -> dict[str, tuple[int, int]] | None:
        """shard -> (role, epoch) of the roles the node at ``address`` reports."""
        held = self.shard_status(address)
        return None if held is None else {s.shard_id: (s.role, s.epoch) for s in held.values() if not s.on_disk_only}

    def shard_status(self, address: str) -> dict[str, common_pb2.ShardStatus] | None:
        """shard -> what the node at ``address`` reports (roles and disk-only copies)."""
        with grpc.insecure_channel(address) as channel:
            try:
                r = shardnode_pb2_grpc.ShardNodeStub(channel).GetShardStatus(
                    shardnode_pb2.GetShardStatusRequest(), timeout=2
                )
            except grpc.RpcError:
                return None
        return {s.shard_id: s for s in r.shards}

    def process(self, name: str) -> ManagedProcess:
        """The newest process named ``name`` (a restarted node: its latest run)."""
        return next(p for p in reversed(self.processes) if p.name.split("#")[0] == name)

    def log_text(self, name: str) -> str:
        """Everything process ``name`` has logged so far (one event per line)."""
        try:
            return self.process(name).log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            proc.kill()

    def report(self, lines: int = LOG_TAIL_LINES) -> str:
        """Each process's exit status and the last ``lines`` lines of its log: what a
        failed test shows, so that a failure seen once (in CI) can be read afterwards."""
        parts = []
        for proc in self.processes:
            code = proc.exit_code()
            state = "running" if proc.alive() else f"exited {code}"
            try:
                tail = proc.log_path.read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                tail = ["(no log)"]
            parts.append(f"==== {proc.name} ({state}), last {len(tail)} lines of {proc.log_path.name}")
            parts.extend(line[:LOG_LINE_CHARS] for line in tail)
        return "\n".join(parts)


@pytest.fixture
def process_cluster(
    etcd: LocalEtcd, cluster_name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[ProcessCluster]:
    cluster = ProcessCluster(etcd, cluster_name, tmp_path)
    try:
        yield cluster
    finally:
        if request.node.stash.get(CALL_FAILED, False):
            print(cluster.report())
        cluster.stop_all()


WaitFor = Callable[[Callable[[], bool], float, str], None]
