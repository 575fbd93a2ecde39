"""Early failover on a crash: a node whose heartbeat stream closed and whose address
refuses connections loses its lease well under the TTL; a node whose address still
accepts connections (alive, or paused) keeps it; a control-plane replica shutting down
is not a node crash."""

from __future__ import annotations

import grpc.aio

from bluemarble.v1 import controlplane_pb2, controlplane_pb2_grpc
from tests.conftest import ServeFakeNode, StartControlPlane, StreamNode, wait_for

TTL_S = 10


async def _registered(stub: controlplane_pb2_grpc.ControlPlaneStub, node_id: str) -> bool:
    nodes = (await stub.ListNodes(controlplane_pb2.ListNodesRequest())).nodes
    return any(n.node_id == node_id for n in nodes)


async def test_a_crashed_node_loses_its_lease_well_under_the_ttl(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    app = await start_control_plane(lease_ttl_s=TTL_S)
    _, server = await serve_fake_node("n1")
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        node = StreamNode(stub, "n1", f"127.0.0.1:{server.port}")
        await node.start()
        # The process dies: its listener goes, and its sockets are closed.
        await server.stop_gracefully(0)
        await node.close_stream()
        took_s = await wait_for(lambda: _gone(stub, "n1"), 2.0, "the crashed node's record to go")
        assert took_s < 2.0
        watch = app.crash_watch
        assert watch is not None
        await wait_for(lambda: _true(watch.checked >= 1), 2.0, "the crash check to finish")
        assert watch.revoked == 1


async def _gone(stub: controlplane_pb2_grpc.ControlPlaneStub, node_id: str) -> bool:
    return not await _registered(stub, node_id)


async def test_a_node_whose_address_still_accepts_connections_keeps_its_lease(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    app = await start_control_plane(lease_ttl_s=TTL_S)
    _, server = await serve_fake_node("n1")  # keeps listening (as a paused process's kernel does)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        node = StreamNode(stub, "n1", f"127.0.0.1:{server.port}")
        await node.start()
        await node.close_stream()
        watch = app.crash_watch
        assert watch is not None
        await wait_for(lambda: _true(watch.checked >= 1), 3.0, "the crash check to run")
        assert watch.revoked == 0
        assert await _registered(stub, "n1")


async def _true(value: bool) -> bool:
    return value


async def test_a_node_that_registered_again_keeps_its_new_lease(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    app = await start_control_plane(lease_ttl_s=TTL_S, crash_grace_ms=300)
    _, server = await serve_fake_node("n1")
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        node = StreamNode(stub, "n1", f"127.0.0.1:{server.port}")
        await node.start()
        old_lease = node.lease_id
        await server.stop_gracefully(0)
        await node.close_stream()
        new_lease = await node.register()  # restarted at once, before the grace ran out
        assert new_lease != old_lease
        watch = app.crash_watch
        assert watch is not None
        await wait_for(lambda: _true(watch.checked >= 1), 3.0, "the crash check to run")
        assert watch.revoked == 0
        nodes = (await stub.ListNodes(controlplane_pb2.ListNodesRequest())).nodes
        assert [(n.node_id, n.lease_id) for n in nodes] == [("n1", new_lease)]


async def test_stopping_a_control_plane_replica_revokes_no_lease(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    survivor = await start_control_plane(lease_ttl_s=TTL_S)
    leaving = await start_control_plane(lease_ttl_s=TTL_S)
    _, server = await serve_fake_node("n1")
    address = f"127.0.0.1:{server.port}"
    await server.stop_gracefully(0)  # the address refuses: only the cause of the stream's end differs
    async with grpc.aio.insecure_channel(leaving.address) as channel:
        node = StreamNode(controlplane_pb2_grpc.ControlPlaneStub(channel), "n1", address)
        await node.start()
        watch = leaving.crash_watch
        assert watch is not None
        await leaving.stop()  # ends the node's heartbeat stream from this side
        assert watch.suspected == 0 and watch.revoked == 0
        await node.close_stream()
    async with grpc.aio.insecure_channel(survivor.address) as channel:
        assert await _registered(controlplane_pb2_grpc.ControlPlaneStub(channel), "n1")
