"""Shared fixtures: a real etcd per test session (free loopback ports, temp dir, always
stopped), unique cluster names per test, and in-process control-plane replicas."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import grpc.aio
import pytest
import structlog
from hypothesis import settings as hypothesis_settings

from bluemarble.runtime.grpc_server import Server, ServiceBinding, build_server
from bluemarble.v1 import common_pb2, controlplane_pb2, controlplane_pb2_grpc, shardnode_pb2, shardnode_pb2_grpc
from controlplane.server.app import ControlPlaneApp, ControlPlaneSettings
from scripts.localcluster import LocalEtcd
from shardnode.service import ShardNodeService

_counter = itertools.count()

# Set on a test whose call phase failed, for fixtures that report more on failure.
CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.when == "call" and report.failed:
        item.stash[CALL_FAILED] = True
    return report

# Nodes the tests start stop at once on SIGTERM, as before graceful leaves: a teardown
# stopping a cluster would otherwise wait for drains. The tests of the leave pass
# --leave-timeout-s themselves (a flag beats the environment).
os.environ.setdefault("BLUEMARBLE_LEAVE_TIMEOUT_S", "0")

# CI replays the same property-test examples on every run (a failure there reproduces
# exactly); a developer's run explores new ones and keeps failures in .hypothesis/.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Puts back the root logger's handlers and level and structlog's defaults that a
    test's ``logs.configure`` replaced."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        structlog.reset_defaults()


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


class FakeShardNode(shardnode_pb2_grpc.ShardNodeServicer):
    """A ShardNode for control-plane tests: answers GetShardStatus with ``statuses`` and
    Fence with ``positions`` (shard -> (epoch, lsn) of its last entry, None: no data;
    unlisted shards: ``default_position``), recording every call in ``calls`` in order.
    ``fence_mode``: "answer", "unimplemented" (a node from before fencing) or "fail".
    With ``follows`` (the cluster's assignments) and no ``statuses`` set, it reports every
    role the assignments give it as a healthy node would: copied, serving, not behind (the
    leader keeps a copy a plan gives up until its replacement says so)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.statuses: list[common_pb2.ShardStatus] = []
        self.follows: Callable[[], Awaitable[Sequence[common_pb2.Assignment]]] | None = None
        self.positions: dict[str, tuple[int, int] | None] = {}
        self.default_position: tuple[int, int] | None = (1, 1)
        self.fence_mode = "answer"
        self.calls: list[tuple[str, dict[str, int]]] = []  # ("Fence", shard -> epoch) or ("GetShardStatus", {})
        self.fenced: dict[str, int] = {}

    async def GetShardStatus(
        self, request: shardnode_pb2.GetShardStatusRequest, context: grpc.aio.ServicerContext  # type: ignore[type-arg]
    ) -> shardnode_pb2.GetShardStatusResponse:
        self.calls.append(("GetShardStatus", {}))
        if self.statuses or self.follows is None:
            return shardnode_pb2.GetShardStatusResponse(node_id=self.node_id, shards=self.statuses)
        healthy = [
            common_pb2.ShardStatus(
                shard_id=a.shard_id, epoch=a.epoch, serving=True,
                role=common_pb2.SHARD_ROLE_PRIMARY if a.primary == self.node_id else common_pb2.SHARD_ROLE_REPLICA,
            )
            for a in await self.follows()
            if self.node_id == a.primary or self.node_id in a.replicas
        ]
        return shardnode_pb2.GetShardStatusResponse(node_id=self.node_id, shards=healthy)

    async def Fence(
        self, request: shardnode_pb2.FenceRequest, context: grpc.aio.ServicerContext  # type: ignore[type-arg]
    ) -> shardnode_pb2.FenceResponse:
        if self.fence_mode == "unimplemented":
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Fence is not implemented")
        self.calls.append(("Fence", {s.shard_id: s.epoch for s in request.shards}))
        if self.fence_mode == "fail":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
        response = shardnode_pb2.FenceResponse(node_id=self.node_id)
        for s in request.shards:
            self.fenced[s.shard_id] = max(self.fenced.get(s.shard_id, 0), s.epoch)
            last = self.positions.get(s.shard_id, self.default_position)
            copy = response.shards.add(shard_id=s.shard_id, epoch=self.fenced[s.shard_id], has_data=last is not None)
            if last is not None:
                copy.last.epoch, copy.last.lsn = last
        return response

    def fences(self, shard: str) -> list[int]:
        """The epochs this node was fenced at for ``shard``, in order."""
        return [epochs[shard] for name, epochs in self.calls if name == "Fence" and shard in epochs]


ServeFakeNode = Callable[[str], Awaitable[tuple[FakeShardNode, Server]]]


@pytest.fixture
async def serve_fake_node() -> AsyncIterator[ServeFakeNode]:
    """Starts in-process :class:`FakeShardNode` servers (port 0); returns the servicer and
    its server (``server.port``; stop it to make the address refuse connections)."""
    servers: list[Server] = []

    async def serve(node_id: str) -> tuple[FakeShardNode, Server]:
        node = FakeShardNode(node_id)
        server = await build_server(
            "127.0.0.1:0",
            [
                ServiceBinding(
                    shardnode_pb2.DESCRIPTOR.services_by_name["ShardNode"].full_name,
                    node,
                    shardnode_pb2_grpc.add_ShardNodeServicer_to_server,
                )
            ],
        )
        servers.append(server)
        return node, server

    yield serve
    for server in servers:
        await server.stop_gracefully(0.1)


class StreamNode:
    """A node as the control plane sees it, without a node process: registers, then
    heartbeats every ``interval_s`` over one HeartbeatStream (as bluemarble-node does),
    reporting ``statuses``. ``close_stream()`` ends the stream from the node's side."""

    def __init__(
        self, stub: controlplane_pb2_grpc.ControlPlaneStub, node_id: str, address: str, zone: str = "z"
    ) -> None:
        self.stub, self.node_id, self.address, self.zone = stub, node_id, address, zone
        self.lease_id = 0
        self.statuses: list[common_pb2.ShardStatus] = []
        self.responses: list[controlplane_pb2.HeartbeatResponse] = []
        self._call: grpc.aio.StreamStreamCall | None = None  # type: ignore[type-arg]
        self._task: asyncio.Task[None] | None = None

    async def register(self) -> int:
        response = await self.stub.RegisterNode(
            controlplane_pb2.RegisterNodeRequest(node_id=self.node_id, address=self.address, zone=self.zone)
        )
        self.lease_id = response.lease_id
        return self.lease_id

    async def start(self, interval_s: float = 0.3) -> None:
        """Registers (if not yet) and starts heartbeating; returns after the first answer."""
        if not self.lease_id:
            await self.register()
        call = self.stub.HeartbeatStream()
        self._call = call
        first = asyncio.Event()

        async def beat() -> None:
            while True:
                await call.write(controlplane_pb2.HeartbeatRequest(
                    node_id=self.node_id, lease_id=self.lease_id, shards=self.statuses))
                self.responses.append(await call.read())
                first.set()
                await asyncio.sleep(interval_s)

        self._task = asyncio.create_task(beat())
        await asyncio.wait_for(first.wait(), 5.0)

    async def close_stream(self) -> None:
        """Ends the stream from the node's side (cancelled: as when its process dies)."""
        if self._call is not None:
            self._call.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._task
        self._call = self._task = None


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Polls ``condition`` every 20 ms until true; returns the seconds it took.
    AssertionError naming ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await condition():
        if loop.time() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)
    return loop.time() - start
