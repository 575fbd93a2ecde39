"""The control plane with etcd gone: clear UNAVAILABLE, keeps running, recovers alone;
and it refuses to start when etcd never answers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import grpc.aio
import pytest

from bluemarble.core.errors import Unavailable
from bluemarble.v1 import controlplane_pb2 as pb
from bluemarble.v1 import controlplane_pb2_grpc
from controlplane.server.app import ControlPlaneApp, ControlPlaneSettings
from scripts.localcluster import LocalEtcd, free_port

pytestmark = pytest.mark.integration
T = TypeVar("T")


async def until_available(call: Callable[[], Awaitable[T]], timeout_s: float = 15.0) -> T:
    """Retries ``call`` while it answers UNAVAILABLE, up to ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            assert loop.time() < deadline, f"still UNAVAILABLE after {timeout_s} s: {e.details()}"
            await asyncio.sleep(0.1)


async def test_unavailable_while_etcd_is_down_then_recovers(tmp_path: Path) -> None:
    etcd = LocalEtcd(tmp_path).start()
    app = ControlPlaneApp(
        ControlPlaneSettings(
            listen="127.0.0.1:0", etcd_endpoints=(etcd.endpoint,), cluster="outage",
            lease_ttl_s=5, etcd_rpc_timeout_s=1.0, shutdown_grace_s=0.5,
        )
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
            r = await stub.RegisterNode(pb.RegisterNodeRequest(node_id="n1", address="127.0.0.1:7101"))

            etcd.kill()
            for call in (
                stub.ListNodes(pb.ListNodesRequest(), timeout=10),
                stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id), timeout=10),
                stub.RegisterNode(pb.RegisterNodeRequest(node_id="n2", address="127.0.0.1:7102"), timeout=10),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "etcd" in (info.value.details() or "")
            # Still serving: the status answers from the replica's mirrors, saying so.
            status = await stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
            assert (status.etcd_healthy, status.node_count, status.leader) == (False, 1, "")

            etcd.start()  # same data dir and ports
            # Each call recovers by itself within a deadline (callers retry UNAVAILABLE).
            nodes = (await until_available(lambda: stub.ListNodes(pb.ListNodesRequest(), timeout=2))).nodes
            # Data survived the restart; the lease is still refreshable.
            assert [n.node_id for n in nodes] == ["n1"]
            await until_available(
                lambda: stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id), timeout=2)
            )
            await stub.RegisterNode(pb.RegisterNodeRequest(node_id="n2", address="127.0.0.1:7102"), timeout=5)
            status = await until_available(lambda: stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=5))
            assert status.etcd_healthy and status.node_count == 2
    finally:
        await app.stop()
        etcd.kill()


async def test_refuses_to_start_when_etcd_never_answers() -> None:
    dead = f"127.0.0.1:{free_port()}"
    app = ControlPlaneApp(
        ControlPlaneSettings(listen="127.0.0.1:0", etcd_endpoints=(dead,), etcd_startup_timeout_s=1.0)
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Unavailable) as info:
        await app.start()
    assert "did not answer within 1 s" in str(info.value)
    assert dead in str(info.value)
    assert loop.time() - started < 5
    assert app.server is None
