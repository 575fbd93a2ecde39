"""Shared fixtures: a real etcd per test session (free loopback ports, temp dir, always
stopped), unique cluster names per test, and in-process control-plane replicas."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc.aio
import pytest
from hypothesis import settings as hypothesis_settings

from bluemarble.runtime.grpc_server import Server, ServiceBinding, build_server
from bluemarble.v1 import common_pb2, controlplane_pb2_grpc, shardnode_pb2, shardnode_pb2_grpc
from controlplane.server.app import ControlPlaneApp, ControlPlaneSettings
from scripts.localcluster import LocalEtcd
from shardnode.service import ShardNodeService

_counter = itertools.count()

# CI replays the same property-test examples on every run (a failure there reproduces
# exactly); a developer's run explores new ones and keeps failures in .hypothesis/.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    server = LocalEtcd(tmp_path_factory.mktemp("etcd")).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def cluster_name(request: pytest.FixtureRequest) -> str:
    """A cluster name no other test uses: tests share one etcd but never each other's keys."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    return f"t{next(_counter)}-{base}"


StartControlPlane = Callable[..., Awaitable[ControlPlaneApp]]


@pytest.fixture
async def start_control_plane(
    etcd: LocalEtcd, cluster_name: str
) -> AsyncIterator[StartControlPlane]:
    """Starts in-process control-plane replicas (port 0) and stops them after the test."""
    apps: list[ControlPlaneApp] = []

    async def start(**overrides: object) -> ControlPlaneApp:
        settings = {
            "listen": "127.0.0.1:0",
            "etcd_endpoints": (etcd.endpoint,),
            "cluster": cluster_name,
            "lease_ttl_s": 2,
            "etcd_startup_timeout_s": 5.0,
            "shutdown_grace_s": 0.5,
            "replica_id": f"cp-{len(apps)}",
            **overrides,
        }
        app = ControlPlaneApp(ControlPlaneSettings(**settings))  # type: ignore[arg-type]
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop()


@pytest.fixture
async def control_plane(start_control_plane: StartControlPlane) -> ControlPlaneApp:
    return await start_control_plane()


@pytest.fixture
async def stub(control_plane: ControlPlaneApp) -> AsyncIterator[controlplane_pb2_grpc.ControlPlaneStub]:
    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        yield controlplane_pb2_grpc.ControlPlaneStub(channel)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path


ServeNode = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve_node() -> AsyncIterator[ServeNode]:
    """Starts in-process ShardNode servers (port 0) for agents that are not full node
    processes, so the leader's probe of a new node is answered; returns the address."""
    servers: list[Server] = []

    async def serve(node_id: str, statuses: Callable[[], list[common_pb2.ShardStatus]] = list) -> str:
        server = await build_server(
            "127.0.0.1:0",
            [
                ServiceBinding(
                    shardnode_pb2.DESCRIPTOR.services_by_name["ShardNode"].full_name,
                    ShardNodeService(node_id, statuses),
                    shardnode_pb2_grpc.add_ShardNodeServicer_to_server,
                )
            ],
        )
        servers.append(server)
        return f"127.0.0.1:{server.port}"

    yield serve
    for server in servers:
        await server.stop_gracefully(0.1)
