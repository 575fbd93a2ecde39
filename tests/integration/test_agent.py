"""The node agent against real control-plane replicas: registration, re-registration
after its lease is lost, failover between addresses, graceful leave."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc.aio
import pytest
import structlog.testing

from bluemarble.client.control_plane import ControlPlaneClient
from bluemarble.core import limits
from bluemarble.v1 import controlplane_pb2 as pb
from bluemarble.v1 import controlplane_pb2_grpc
from controlplane.server.app import ControlPlaneApp
from scripts.localcluster import free_port
from shardnode.agent import NodeAgent, NodeIdentity, RegistrationRefused
from tests.conftest import ServeNode, StartControlPlane

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def running(agent: NodeAgent) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def nodes(app: ControlPlaneApp) -> list[pb.Node]:
    async with grpc.aio.insecure_channel(app.address) as channel:
        return list((await controlplane_pb2_grpc.ControlPlaneStub(channel).ListNodes(pb.ListNodesRequest())).nodes)


async def eventually(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_agent_registers_heartbeats_and_leaves(control_plane: ControlPlaneApp) -> None:
    client = ControlPlaneClient([control_plane.address])
    agent = NodeAgent(NodeIdentity("n1", "127.0.0.1:7101", zone="z1"), client)
    async with running(agent):
        await asyncio.wait_for(agent.registered.wait(), 5)
        lease = agent.registration.lease_id  # type: ignore[union-attr]
        # Two TTLs later the node is still there, on the same lease.
        deadline = asyncio.get_running_loop().time() + 4.0
        while asyncio.get_running_loop().time() < deadline:
            assert [n.lease_id for n in await nodes(control_plane)] == [lease]
            await asyncio.sleep(0.5)
        assert agent.registrations == 1
    assert await agent.deregister() is True
    assert await nodes(control_plane) == []
    await client.close()


async def _holds_what_is_assigned(control_plane: ControlPlaneApp, agent: NodeAgent) -> bool:
    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        r = await controlplane_pb2_grpc.ControlPlaneStub(channel).ListAssignments(pb.ListAssignmentsRequest())
    assigned = {a.shard_id: a.epoch for a in r.assignments if "n1" in (a.primary, *a.replicas)}
    return bool(assigned) and {s: h.epoch for s, h in agent.shards.items()} == assigned


@pytest.mark.parametrize("edit", ["revoked", "deleted", "detached"])
async def test_agent_registers_again_after_its_lease_is_revoked_or_its_record_deleted_or_detached_by_hand(
    control_plane: ControlPlaneApp, serve_node: ServeNode, edit: str
) -> None:
    """A revoked lease is an expired one. `etcdctl del .../nodes/n1` (or a put that
    detaches the record from its lease) left the lease alive and the heartbeats answered:
    the node never registered again and the leader, which counted it gone, left its shards
    without it. Now its heartbeat is NOT_FOUND. Either way it registers again, and once it
    has dropped its roles it gets back what it is assigned."""
    from bluemarble.core.ids import NodeId

    client = ControlPlaneClient([control_plane.address])
    holder: list[NodeAgent] = []
    address = await serve_node("n1", lambda: holder[0].shard_statuses())
    agent = NodeAgent(NodeIdentity("n1", address), client)
    holder.append(agent)
    async with running(agent):
        await asyncio.wait_for(agent.registered.wait(), 5)
        first = agent.registration.lease_id  # type: ignore[union-attr]
        key = control_plane.keys.node(NodeId("n1"))
        if edit == "revoked":
            await control_plane.store.revoke_lease(first)  # as if the lease had expired
        elif edit == "deleted":
            await control_plane.store.delete(key)
        else:
            kv = await control_plane.store.get(key)
            assert kv is not None
            await control_plane.store.put(key, kv.value)

        async def new_lease() -> bool:
            kv = await control_plane.store.get(key)
            return agent.registrations == 2 and kv is not None and kv.lease == agent.registration.lease_id  # type: ignore[union-attr]

        await eventually(new_lease, 5, "re-registration with a new lease")
        assert agent.registration.lease_id != first  # type: ignore[union-attr]

        await eventually(lambda: _holds_what_is_assigned(control_plane, agent), 10,
                         "the agent to hold its assignments again")
    await agent.deregister()
    await client.close()


async def test_agent_fails_over_between_control_plane_addresses(start_control_plane: StartControlPlane) -> None:
    a = await start_control_plane()
    b = await start_control_plane()
    dead = f"127.0.0.1:{free_port()}"
    client = ControlPlaneClient([dead, a.address, b.address])
    agent = NodeAgent(NodeIdentity("n1", "127.0.0.1:7101"), client)
    async with running(agent):
        await asyncio.wait_for(agent.registered.wait(), 10)
        assert client.current_address == a.address
        await a.stop()  # the replica the agent uses goes away
        lease = agent.registration.lease_id  # type: ignore[union-attr]

        async def moved_to_b() -> bool:
            return client.current_address == b.address

        await eventually(moved_to_b, 5, "the agent to move to the other replica")
        # It kept its lease through the move: heartbeats reached b in time.
        deadline = asyncio.get_running_loop().time() + 3
        while asyncio.get_running_loop().time() < deadline:
            assert [n.lease_id for n in await nodes(b)] == [lease]
            await asyncio.sleep(0.5)
    await agent.deregister()
    await client.close()


async def test_duplicate_node_id_is_refused_after_a_bounded_wait(control_plane: ControlPlaneApp) -> None:
    client = ControlPlaneClient([control_plane.address])
    holder = NodeAgent(NodeIdentity("n1", "127.0.0.1:7101"), client)
    intruder = NodeAgent(NodeIdentity("n1", "127.0.0.1:7102"), client, already_exists_timeout_s=1.0)
    async with running(holder):
        await asyncio.wait_for(holder.registered.wait(), 5)
        with pytest.raises(RegistrationRefused) as info:
            await asyncio.wait_for(intruder.run(asyncio.Event()), 10)
        assert "already registered from 127.0.0.1:7101" in str(info.value)
        assert "its heartbeats renew it" in str(info.value)  # not a lease about to end by itself
        # The operator sees it too, not only the refused process's own log.
        async with grpc.aio.insecure_channel(control_plane.address) as channel:
            status = await controlplane_pb2_grpc.ControlPlaneStub(channel).GetClusterStatus(
                pb.GetClusterStatusRequest())
        [warning] = [w for w in status.warnings if "refused" in w]
        assert f"replica {control_plane.replica_id} refused" in warning
        assert "of node n1 from 127.0.0.1:7102" in warning and "already registered from 127.0.0.1:7101" in warning
    await holder.deregister()
    await client.close()


async def test_idle_watch_streams_carry_progress_messages_only_for_callers_that_ask(
    control_plane: ControlPlaneApp,
) -> None:
    """What lets the agent and the router tell a quiet stream from a hung replica: with
    ``progress_interval_ms``, an idle WatchAssignments / WatchRing stream gets an empty
    message every interval; without it, only changes (as existing clients expect)."""
    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        asked = stub.WatchAssignments(pb.WatchAssignmentsRequest(node_id="n9", progress_interval_ms=200))
        plain = stub.WatchAssignments(pb.WatchAssignmentsRequest(node_id="n9"))
        ring = stub.WatchRing(pb.WatchRingRequest(progress_interval_ms=200))
        first = await asyncio.wait_for(asked.read(), 5)
        assert first.snapshot
        assert (await asyncio.wait_for(plain.read(), 5)).snapshot
        assert len((await asyncio.wait_for(ring.read(), 5)).shards) == 16
        for _ in range(3):
            progress = await asyncio.wait_for(asked.read(), 2)
            assert not progress.snapshot and not progress.assignments and not progress.removed_shard_ids
            assert progress.revision >= first.revision  # nothing for n9 up to that revision
            tick = await asyncio.wait_for(ring.read(), 2)
            assert not tick.shards and tick.version == 1
        with pytest.raises(TimeoutError):  # nothing changed: nothing for a plain watcher
            await asyncio.wait_for(plain.read(), 1.0)
        for call in (asked, plain, ring):
            call.cancel()


async def test_a_replica_serves_a_bounded_number_of_watch_streams(
    control_plane: ControlPlaneApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the limit a new watch is refused RESOURCE_EXHAUSTED (clients go elsewhere); a
    stream that ends frees its slot."""
    monkeypatch.setattr(limits, "MAX_WATCH_STREAMS", 3)
    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        held = [stub.WatchRing(pb.WatchRingRequest()), stub.WatchAssignments(pb.WatchAssignmentsRequest()),
                stub.WatchRing(pb.WatchRingRequest())]
        for call in held:
            await asyncio.wait_for(call.read(), 5)  # the first message: the stream is served
        for refused in (stub.WatchAssignments(pb.WatchAssignmentsRequest()), stub.WatchRing(pb.WatchRingRequest())):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(refused.read(), 5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "already serves 3 watch streams" in (info.value.details() or "")
        held.pop().cancel()

        async def served() -> bool:
            call = stub.WatchRing(pb.WatchRingRequest())
            try:
                await asyncio.wait_for(call.read(), 5)
                return True
            except grpc.aio.AioRpcError:
                return False
            finally:
                call.cancel()

        deadline = asyncio.get_running_loop().time() + 10
        while not await served():
            assert asyncio.get_running_loop().time() < deadline, "the cancelled stream's slot was not freed"
            await asyncio.sleep(0.05)
        for call in held:
            call.cancel()


async def test_failing_heartbeats_log_one_warning_not_one_per_attempt(start_control_plane: StartControlPlane) -> None:
    a = await start_control_plane()
    b = await start_control_plane()
    client = ControlPlaneClient([a.address, b.address])
    agent = NodeAgent(NodeIdentity("n1", "127.0.0.1:7101"), client)
    async with running(agent):
        await asyncio.wait_for(agent.registered.wait(), 10)
        with structlog.testing.capture_logs() as logs:
            await a.stop()
            await b.stop()  # both replicas gone: heartbeats fail several times a second

            def failures() -> list[dict[str, object]]:
                return [e for e in logs if e["event"] == "heartbeat failed; trying the next address"]

            async def failed_often() -> bool:
                return len(failures()) >= 6

            await eventually(failed_often, 10, "heartbeats to fail six times")
        failed = failures()
        moves = [e for e in logs if e["event"] == "moving to another control-plane replica"]
        assert len(failed) >= 4, "the heartbeats did fail repeatedly"
        assert [e["log_level"] for e in failed].count("warning") == 1, failed
        # Each of the two moves (a to b, b to a) at info at most once in the interval.
        assert len([e for e in moves if e["log_level"] == "info"]) <= 2, moves
    await client.close()
