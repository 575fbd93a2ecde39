"""The ring and assignments as clients see them: GetRing/WatchRing and the client-side
router, ResolvePlayer, WatchAssignments snapshots and changes, and compaction."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from bluemarble.api.conversions import ring_from_proto, ring_to_proto
from bluemarble.client.control_plane import ControlPlaneClient
from bluemarble.client.ring_router import RingRouter
from bluemarble.v1 import controlplane_pb2 as pb
from bluemarble.v1 import controlplane_pb2_grpc
from controlplane.server.app import ControlPlaneApp
from controlplane.store import codec
from controlplane.store.etcd import Compacted, EtcdStore
from tests.conftest import ServeNode

pytestmark = pytest.mark.integration
Stub = controlplane_pb2_grpc.ControlPlaneStub


async def test_router_resolves_like_the_control_plane_and_follows_ring_changes(
    control_plane: ControlPlaneApp, stub: Stub
) -> None:
    client = ControlPlaneClient([control_plane.address])
    router = RingRouter(client)
    await router.start()
    try:
        ring = ring_from_proto(await stub.GetRing(pb.GetRingRequest()))
        assert ring.version == 1 and len(ring.shard_ids) == 16
        assert sum(len(t) for _, t in ring.shards) == 16 * 150
        players = [f"player-{i}" for i in range(200)]
        assert [router.shard_for(p) for p in players] == [ring.shard_for(p) for p in players]
        # A new ring version reaches the router through WatchRing.
        grown = ring.with_added_shard(ring.shard_ids[-1].replace("15", "16"))  # type: ignore[arg-type]
        await control_plane.store.put(control_plane.keys.ring(), codec.encode(ring_to_proto(grown)))
        deadline = asyncio.get_running_loop().time() + 5
        while router.ring.version != 2:  # the stream's first message is the current ring
            assert asyncio.get_running_loop().time() < deadline, "the router did not get ring v2"
            router.updated.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(router.updated.wait(), 0.5)
        assert [router.shard_for(p) for p in players] == [grown.shard_for(p) for p in players]
    finally:
        await router.stop()
        await client.close()


async def test_resolve_player_names_the_shard_its_primary_and_replicas(
    control_plane: ControlPlaneApp, stub: Stub, serve_node: ServeNode
) -> None:
    addresses = {}
    for i, zone in enumerate(("z1", "z2", "z3")):
        addresses[f"n{i}"] = await serve_node(f"n{i}")
        await stub.RegisterNode(pb.RegisterNodeRequest(node_id=f"n{i}", address=addresses[f"n{i}"], zone=zone))

    async def placed() -> bool:
        r = await stub.ListAssignments(pb.ListAssignmentsRequest())
        return len(r.assignments) == 16 and all(a.primary and len(a.replicas) == 2 for a in r.assignments)

    deadline = asyncio.get_running_loop().time() + 10
    while not await placed():
        assert asyncio.get_running_loop().time() < deadline, "placement did not happen"
        await asyncio.sleep(0.05)
    ring = ring_from_proto(await stub.GetRing(pb.GetRingRequest()))
    r = await stub.ResolvePlayer(pb.ResolvePlayerRequest(player_id="player-42"))
    assert r.shard_id == ring.shard_for("player-42")
    assignments = {a.shard_id: a for a in (await stub.ListAssignments(pb.ListAssignmentsRequest())).assignments}
    a = assignments[r.shard_id]
    assert (r.epoch, r.primary.node_id, [x.node_id for x in r.replicas]) == (a.epoch, a.primary, list(a.replicas))
    assert r.primary.address == addresses[a.primary]
    assert r.ring_version == 1


async def test_watch_assignments_sends_a_snapshot_then_changes_with_revisions(
    control_plane: ControlPlaneApp, stub: Stub, serve_node: ServeNode
) -> None:
    call = stub.WatchAssignments(pb.WatchAssignmentsRequest(node_id="n0"))
    stream = call.__aiter__()
    first = await asyncio.wait_for(stream.__anext__(), 5)
    assert first.snapshot and list(first.assignments) == []
    address = await serve_node("n0")
    reg = await stub.RegisterNode(pb.RegisterNodeRequest(node_id="n0", address=address, zone="z1"))

    async def heartbeats() -> None:
        while True:
            await stub.Heartbeat(pb.HeartbeatRequest(node_id="n0", lease_id=reg.lease_id))
            await asyncio.sleep(0.5)

    beating = asyncio.create_task(heartbeats())
    held: dict[str, int] = {}
    revision = first.revision
    while len(held) < 16:
        # A lone node waits out the 3 s hold of a forming cluster first.
        update = await asyncio.wait_for(stream.__anext__(), 15)
        assert not update.snapshot
        assert update.revision > revision  # every message names a newer etcd revision
        revision = update.revision
        for a in update.assignments:
            assert a.primary == "n0"
            held[a.shard_id] = a.epoch
    assert all(epoch >= 1 for epoch in held.values())
    call.cancel()
    beating.cancel()


async def test_a_compacted_watch_raises_so_the_caller_relists(control_plane: ControlPlaneApp) -> None:
    store: EtcdStore = control_plane.store
    key = control_plane.keys.prefix + "scratch/k"
    first = await store.put(key, b"1")
    await store.put(key, b"2")
    latest = await store.put(key, b"3")
    await store._client.kv.compact(latest, physical=True)  # type: ignore[union-attr]
    with pytest.raises(Compacted) as info:
        async for _ in store.watch_prefix(key, first):
            pass
    assert info.value.compact_revision >= latest


async def test_status_names_the_leader(control_plane: ControlPlaneApp, stub: Stub) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
        if status.leader:
            break
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    assert status.leader == "cp-0" and status.ring_version == 1 and status.shard_count == 16
    assert status.config.replication_factor == 3
