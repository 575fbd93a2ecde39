"""A client built before the event loop that uses it runs (in a game server's
``__init__``, or in another thread than its loop's) works in that loop: its gRPC
channels open on first use, in the loop that uses them. Built at once, they belonged to
another loop, and every call failed "attached to a different loop" (an outside probe saw
the routing client log "this is a bug" two dozen times, then time out)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from bluemarble.client.control_plane import ControlPlaneClient
from bluemarble.client.trades import TradeClient
from bluemarble.runtime.grpc_server import ServiceBinding, build_server
from bluemarble.v1 import controlplane_pb2, controlplane_pb2_grpc
from scripts.localcluster import free_port

pytestmark = pytest.mark.integration


class _Status(controlplane_pb2_grpc.ControlPlaneServicer):
    async def GetClusterStatus(self, request: Any, context: Any) -> controlplane_pb2.GetClusterStatusResponse:
        return controlplane_pb2.GetClusterStatusResponse(cluster="before-loop")


async def _status_from(address: str, client: ControlPlaneClient) -> str:
    server = await build_server(address, [ServiceBinding(
        "bluemarble.v1.ControlPlane", _Status(), controlplane_pb2_grpc.add_ControlPlaneServicer_to_server)])
    try:
        response = await client.call(lambda s: s.GetClusterStatus, controlplane_pb2.GetClusterStatusRequest())
        return response.cluster
    finally:
        await client.close()
        await server.grpc.stop(None)


def test_a_control_plane_client_built_before_its_loop_runs_works_in_it() -> None:
    address = f"127.0.0.1:{free_port()}"
    client = ControlPlaneClient([address], attempts=2, deadline_s=10)
    assert asyncio.run(_status_from(address, client)) == "before-loop"


def test_a_client_built_in_one_thread_works_in_another_threads_loop() -> None:
    address = f"127.0.0.1:{free_port()}"
    trades = TradeClient([address])  # its control-plane client, built here
    got: list[str] = []
    worker = threading.Thread(target=lambda: got.append(asyncio.run(_status_from(address, trades.control_plane))))
    worker.start()
    worker.join(30)
    assert got == ["before-loop"]
