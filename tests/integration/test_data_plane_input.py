"""A real shard node (agent, storage, data plane, ShardNode server in this process)
against a real control plane and etcd: every bad input of the data-plane RPCs gets its
status and a short message naming the problem, and changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from bluemarble.client.control_plane import ControlPlaneClient
from bluemarble.client.ring_router import RingRouter
from bluemarble.client.routing import RoutingClient
from bluemarble.core import limits
from bluemarble.core.errors import FailedPrecondition, InvalidArgument
from bluemarble.core.ids import PlayerId
from bluemarble.runtime.grpc_server import ServiceBinding, build_server
from bluemarble.v1 import shardnode_pb2, shardnode_pb2_grpc
from shardnode import dataplane as dataplane_module
from shardnode.agent import NodeAgent, NodeIdentity
from shardnode.dataplane import DataPlane
from shardnode.service import ShardNodeService
from shardnode.storage import NodeStorage
from tests.conftest import StartControlPlane, wait_for

pytestmark = pytest.mark.integration

Stub = shardnode_pb2_grpc.ShardNodeStub


@contextlib.asynccontextmanager
async def data_node(start: StartControlPlane, data_dir: Path) -> AsyncIterator[tuple[Stub, DataPlane]]:
    """One node holding every shard as primary (R = 1, 2 shards), serving writes."""
    async with data_node_and_control_plane(start, data_dir) as (stub, dp, _):
        yield stub, dp


@contextlib.asynccontextmanager
async def data_node_and_control_plane(
    start: StartControlPlane, data_dir: Path
) -> AsyncIterator[tuple[Stub, DataPlane, str]]:
    """:func:`data_node`, and the control plane's address (for a routing client)."""
    app = await start(replication_factor=1, shards=2)
    storage = NodeStorage.open(data_dir)
    client = ControlPlaneClient([app.address])
    holder: list[DataPlane] = []
    server = await build_server(
        "127.0.0.1:0",
        [
            ServiceBinding(
                shardnode_pb2.DESCRIPTOR.services_by_name["ShardNode"].full_name,
                ShardNodeService("n1", lambda: [], lambda: holder[0] if holder else None),
                shardnode_pb2_grpc.add_ShardNodeServicer_to_server,
            )
        ],
        max_request_bytes=limits.SHARD_NODE_MAX_REQUEST_BYTES,
    )
    agent = NodeAgent(NodeIdentity("n1", f"127.0.0.1:{server.port}", zone="z1"), client)
    ring = RingRouter(client)
    dp = DataPlane("n1", storage, agent, ring)
    holder.append(dp)
    await dp.start()
    await ring.start()
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        await wait_for(lambda: _serving(dp), 15.0, "the node to serve both shards")
        await agent.config_loaded.wait()
        yield Stub(channel), dp, app.address  # type: ignore[no-untyped-call]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await ring.stop()
        await channel.close(None)
        await server.stop_gracefully(0.2)
        await dp.stop()
        storage.close()
        await client.close()


async def _serving(dp: DataPlane) -> bool:
    return sum(1 for s in dp.statuses() if s.serving) == 2


async def refused(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


def grant(**fields: object) -> shardnode_pb2.GrantItemsRequest:
    request = {"request_id": "g1", "player_id": "alice", "item_ids": ["sword"], "gold": 5, **fields}
    return shardnode_pb2.GrantItemsRequest(**request)  # type: ignore[arg-type]


BAD_GRANTS = [
    (grant(item_ids=["a", ""]), "item_ids[1] is empty"),
    (grant(item_ids=["a", "b", "a"]), "lists item 'a' twice"),
    (grant(item_ids=["x" * 129]), "129 bytes long"),
    (grant(item_ids=[f"i{n}" for n in range(257)]), "257 items"),
    (grant(gold=2**53 + 1), "2^53"),
    (grant(item_ids=[], gold=0), "empty"),
    (grant(request_id=""), "request_id is empty"),
    (grant(player_id=""), "player_id is empty"),
    (grant(player_id="p" * 129), "player_id is 129 bytes"),
    (grant(player_id="\x1b[31malice"), "player_id contains the characters '\\x1b'"),
    (grant(player_id=" "), "player_id is only whitespace"),
    (grant(player_id="alice "), "player_id 'alice ' begins or ends with whitespace"),
    (grant(request_id="g\x00"), "request_id contains the characters '\\x00'"),
    (grant(item_ids=["a", "b\u202e"]), "item_ids[1] contains the characters '\\u202e'"),
]


async def test_bad_input_is_refused_with_a_message_naming_the_problem_and_changes_nothing(
    start_control_plane: StartControlPlane, tmp_path: Path
) -> None:
    async with data_node(start_control_plane, tmp_path) as (stub, dp):
        # Each shard's log holds its primary's epoch-start entry, and nothing else.
        baseline = {s.shard_id: s.applied_lsn for s in dp.statuses()}
        assert set(baseline.values()) == {1}
        for request, words in BAD_GRANTS:
            code, details = await refused(stub.GrantItems(request))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (words, details)
            assert words in details, details
            assert len(details) < 300
        # Nothing was written: the player is unknown.
        code, details = await refused(stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id="alice")))
        assert code == grpc.StatusCode.NOT_FOUND and "alice" in details
        assert {s.shard_id: s.applied_lsn for s in dp.statuses()} == baseline
        # Player data: a system not in the config, a value over 64 KiB, an empty key.
        data = shardnode_pb2.SetPlayerDataRequest(request_id="d1", player_id="alice", system="guild", key="name")
        for change, words in [
            ({"system": "pets"}, "not a game system of the cluster config"),
            ({"value": b"v" * (64 * 1024 + 1)}, "64 KiB"),
            ({"key": ""}, "key is 0 bytes"),
            ({"key": "k\x85"}, "key contains the characters '\\x85'"),
        ]:
            request = shardnode_pb2.SetPlayerDataRequest()
            request.CopyFrom(data)
            for field, value in change.items():
                setattr(request, field, value)
            code, details = await refused(stub.SetPlayerData(request))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (words, details)
            assert words in details, details
            assert len(details) < 300
        code, details = await refused(
            stub.GetPlayerData(shardnode_pb2.GetPlayerDataRequest(player_id="alice", system="x" * 10_000, key="k"))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 300
        assert {s.shard_id: s.applied_lsn for s in dp.statuses()} == baseline


async def test_grants_are_idempotent_and_items_unique(start_control_plane: StartControlPlane, tmp_path: Path) -> None:
    async with data_node(start_control_plane, tmp_path) as (stub, _):
        first = await stub.GrantItems(grant())
        assert (list(first.inventory.item_ids), first.inventory.gold, first.replayed) == (["sword"], 5, False)
        again = await stub.GrantItems(grant())
        assert again.replayed and again.lsn == first.lsn and again.inventory.gold == 5
        # The same request id for another request is refused, and applies nothing.
        code, details = await refused(stub.GrantItems(grant(gold=6)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "already used" in details
        # An item someone owns: FAILED_PRECONDITION naming the owner's shard.
        code, details = await refused(stub.GrantItems(grant(request_id="g2", player_id="bob")))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert first.inventory.shard_id in details and "sword" in details
        inventory = await stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id="alice"))
        assert (list(inventory.item_ids), inventory.gold) == (["sword"], 5)
        assert not inventory.staleness.stale and inventory.staleness.served_by == "n1"
        # A stale epoch is refused, naming the current one.
        code, details = await refused(stub.GrantItems(grant(request_id="g3", item_ids=["axe"], epoch=99)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "epoch 99" in details
        # EVENTUAL player data round trip.
        await stub.SetPlayerData(
            shardnode_pb2.SetPlayerDataRequest(
                request_id="d1", player_id="alice", system="guild", key="name", value=b"owls"
            )
        )
        got = await stub.GetPlayerData(
            shardnode_pb2.GetPlayerDataRequest(player_id="alice", system="guild", key="name")
        )
        assert got.found and got.value == b"owls"
        missing = await stub.GetPlayerData(
            shardnode_pb2.GetPlayerDataRequest(player_id="alice", system="chat", key="x")
        )
        assert not missing.found


def take(**fields: object) -> shardnode_pb2.TakeItemsRequest:
    request = {"request_id": "t1", "player_id": "alice", "item_ids": ["sword"], "gold": 5, **fields}
    return shardnode_pb2.TakeItemsRequest(**request)  # type: ignore[arg-type]


async def test_takes_remove_what_the_player_holds_once_and_refuse_the_rest(
    start_control_plane: StartControlPlane, tmp_path: Path
) -> None:
    async with data_node_and_control_plane(start_control_plane, tmp_path) as (stub, dp, address):
        await stub.GrantItems(grant(item_ids=["sword", "shield", "gem"], gold=100))
        before = {s.shard_id: s.applied_lsn for s in dp.statuses()}
        # Every bad input a grant refuses, a take refuses the same way; nothing is written.
        for bad, words in BAD_GRANTS:
            request = shardnode_pb2.TakeItemsRequest()
            request.ParseFromString(bad.SerializeToString())  # the same fields, the same numbers
            code, details = await refused(stub.TakeItems(request))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details.replace("take", "grant"), details
            assert len(details) < 300
        for request, code_wanted, words in [
            (take(item_ids=["sword", "bow"]), grpc.StatusCode.FAILED_PRECONDITION, "does not own item 'bow'"),
            (take(gold=101), grpc.StatusCode.FAILED_PRECONDITION, "has 100 gold to spend; 101 were asked"),
            (take(player_id="carol"), grpc.StatusCode.NOT_FOUND, "player 'carol' is unknown on"),
            (take(epoch=99), grpc.StatusCode.FAILED_PRECONDITION, "epoch 99"),
        ]:
            code, details = await refused(stub.TakeItems(request))
            assert (code, words in details) == (code_wanted, True), details
            assert len(details) < 300
        assert {s.shard_id: s.applied_lsn for s in dp.statuses()} == before
        first = await stub.TakeItems(take(item_ids=["sword"], gold=30))
        assert (list(first.inventory.item_ids), first.inventory.gold, first.replayed) == (["gem", "shield"], 70, False)
        again = await stub.TakeItems(take(item_ids=["sword"], gold=30))
        assert again.replayed and again.lsn == first.lsn
        code, details = await refused(stub.TakeItems(take(item_ids=["gem"])))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "already used" in details
        # The routing client and bluemarblectl, over the node's Calls stream.
        async with RoutingClient([address]) as client:
            taken = await client.take_items("alice", ["gem"], gold=20, request_id="t2", deadline_s=20)
            assert (taken.inventory.item_ids, taken.inventory.gold, taken.replayed) == (("shield",), 50, False)
            assert (await client.take_items("alice", ["gem"], gold=20, request_id="t2", deadline_s=20)).replayed
            with pytest.raises(FailedPrecondition, match="does not own item 'gem'"):
                await client.take_items("alice", ["gem"], deadline_s=20)
            with pytest.raises(InvalidArgument, match="the take is empty"):
                await client.take_items("alice", [], deadline_s=20)
        from bluemarble.cli import bluemarblectl as ctl

        code = await asyncio.to_thread(ctl.main, ["--control-plane", address, "--timeout-s", "10", "--json", "take",
                                                  "alice", "shield", "--gold", "50", "--request-id", "t3"])
        assert code == 0
        inventory = await stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id="alice"))
        assert (list(inventory.item_ids), inventory.gold) == ([], 0)


async def test_a_node_restarted_with_its_data_dir_recovers_its_shards(
    start_control_plane: StartControlPlane, tmp_path: Path
) -> None:
    async with data_node(start_control_plane, tmp_path) as (stub, _):
        for i in range(20):
            await stub.GrantItems(grant(request_id=f"g{i}", player_id=f"p{i}", item_ids=[f"item-{i}"]))
    storage = NodeStorage.open(tmp_path)
    try:
        held = storage.shards()
        assert sum(meta.last.lsn for meta in held.values()) == 20 + len(held)  # and an epoch-start entry each
        found = [storage.inventory(shard, f"p{i}") for i in range(20) for shard in held]  # type: ignore[arg-type]
        assert sorted(inv[0][0] for inv in found if inv is not None) == sorted(f"item-{i}" for i in range(20))
    finally:
        storage.close()


async def test_epochs_past_int63_are_refused_naming_the_field(
    start_control_plane: StartControlPlane, tmp_path: Path
) -> None:
    # The proto's epochs and lsns are uint64, but SQLite stores at most 2^63-1: a larger
    # value must be refused as the caller's mistake, not fail as INTERNAL in storage.
    async with data_node(start_control_plane, tmp_path) as (stub, dp):
        shard = dp.statuses()[0].shard_id
        fenced_before = storage_fences(dp)
        for epoch in (2**63, 2**64 - 1):
            request = shardnode_pb2.FenceRequest(
                requested_by="probe", shards=[shardnode_pb2.ShardFence(shard_id=shard, epoch=epoch)]
            )
            code, details = await refused(stub.Fence(request))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert "shards[0].epoch" in details and "2^63-1" in details, details
        code, details = await refused(stub.GrantItems(grant(epoch=2**64 - 1)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "epoch" in details, details
        for requested_by in ("x" * 100_000, "cp\x1b[2J"):  # would be logged as it is
            code, details = await refused(stub.Fence(shardnode_pb2.FenceRequest(
                requested_by=requested_by, shards=[shardnode_pb2.ShardFence(shard_id=shard, epoch=5)])))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "requested_by" in details and len(details) < 300
        batch = shardnode_pb2.ReplicateBatch(
            primary="n9", shards=[shardnode_pb2.ShardEntries(shard_id=shard, epoch=2**64 - 1)]
        )
        call = stub.Replicate()
        await call.write(batch)
        code, details = await refused(call.read())
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "shards[0].epoch" in details, details
        entry = shardnode_pb2.LogEntry(epoch=2**63, lsn=2)
        batch = shardnode_pb2.ReplicateBatch(
            primary="n9",
            shards=[shardnode_pb2.ShardEntries(shard_id=shard, epoch=1, prev=shardnode_pb2.LogPosition(epoch=1, lsn=1),
                                               entries=[entry])],
        )
        call = stub.Replicate()
        await call.write(batch)
        code, details = await refused(call.read())
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "shards[0].entries[0].epoch" in details, details
        for primary in ("p" * 1_000_000, "a\x00b", "", "two words"):  # the sender's name is compared and logged
            call = stub.Replicate()
            await call.write(shardnode_pb2.ReplicateBatch(primary=primary))
            code, details = await refused(call.read())
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "primary" in details and len(details) < 300, details
        assert storage_fences(dp) == fenced_before


async def test_a_player_holds_player_data_up_to_its_caps(
    start_control_plane: StartControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "MAX_DATA_KEYS_PER_PLAYER", 4)
    monkeypatch.setattr(limits, "MAX_DATA_BYTES_PER_PLAYER", 1000)
    async with data_node(start_control_plane, tmp_path) as (stub, _):
        def put(i: int, key: str, size: int, system: str = "guild") -> shardnode_pb2.SetPlayerDataRequest:
            return shardnode_pb2.SetPlayerDataRequest(
                request_id=f"d{i}", player_id="hoarder", system=system, key=key, value=b"v" * size)

        for i in range(4):
            await stub.SetPlayerData(put(i, f"k{i}", 100, system="guild" if i % 2 else "chat"))
        code, details = await refused(stub.SetPlayerData(put(10, "k4", 1)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "would hold 5 player-data keys" in details and "at most 4" in details, details
        # Replacing a value is no new key; growing past the bytes is refused.
        await stub.SetPlayerData(put(11, "k0", 200, system="chat"))
        code, details = await refused(stub.SetPlayerData(put(12, "k1", 700)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "bytes of player data" in details, details
        # Refused writes changed nothing; a smaller value always goes through.
        def get(key: str) -> shardnode_pb2.GetPlayerDataRequest:
            return shardnode_pb2.GetPlayerDataRequest(player_id="hoarder", system="guild", key=key)

        got = await stub.GetPlayerData(get("k1"))
        assert got.found and got.value == b"v" * 100
        assert not (await stub.GetPlayerData(get("k4"))).found
        monkeypatch.setattr(limits, "MAX_DATA_BYTES_PER_PLAYER", 100)  # a cap lowered below what is held
        await stub.SetPlayerData(put(13, "k1", 50))
        # Other players have caps of their own.
        other = put(14, "k9", 10)
        other.player_id = "someone-else"
        await stub.SetPlayerData(other)


async def test_a_shard_stays_small_enough_to_copy(
    start_control_plane: StartControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard's player data is capped so that a snapshot can carry it; a shard too large
    anyway (a cap lowered later) is refused before any snapshot is built; one snapshot is
    served at a time."""
    monkeypatch.setattr(limits, "MAX_SHARD_DATA_BYTES", 3000)
    async with data_node(start_control_plane, tmp_path) as (stub, dp):
        shard = dp.shard_for(PlayerId("p0"))
        players = [p for p in (f"p{i}" for i in range(200)) if dp.shard_for(PlayerId(p)) == shard][:4]

        def put(i: int, player: str, size: int) -> shardnode_pb2.SetPlayerDataRequest:
            return shardnode_pb2.SetPlayerDataRequest(
                request_id=f"s{i}", player_id=player, system="guild", key="bio", value=b"x" * size)

        for i, player in enumerate(players[:2]):
            await stub.SetPlayerData(put(i, player, 1000))
        code, details = await refused(stub.SetPlayerData(put(9, players[2], 1000)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert f"{shard} holds 2016 bytes of player data" in details and "at most 3000" in details, details
        await stub.SetPlayerData(put(10, players[0], 10))  # shrinking is always allowed
        await stub.SetPlayerData(put(11, players[2], 1000))  # now it fits

        monkeypatch.setattr(dataplane_module, "MAX_SNAPSHOT_BYTES", 1000)
        request = shardnode_pb2.GetSnapshotRequest(shard_id=shard, epoch=1, replica="n2")
        code, details = await refused(stub.GetSnapshot(request).read())
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "more than a snapshot carries (1000)" in details, details
        monkeypatch.setattr(dataplane_module, "MAX_SNAPSHOT_BYTES", 1 << 20)
        monkeypatch.setattr(dataplane_module, "SNAPSHOT_QUEUE_WAIT_S", 0.2)
        async with dp.serving_snapshot():  # another snapshot is being served, past the wait
            code, details = await refused(stub.GetSnapshot(request).read())
            assert code == grpc.StatusCode.UNAVAILABLE and "busy serving other snapshots" in details, details
        monkeypatch.setattr(dataplane_module, "SNAPSHOT_QUEUE_WAIT_S", 10.0)
        async with dp.serving_snapshot():  # a request arriving meanwhile waits its turn
            waiting = asyncio.ensure_future(stub.GetSnapshot(request).read())
            done, _ = await asyncio.wait([waiting], timeout=0.3)
            assert not done
        assert (await asyncio.wait_for(waiting, 10)).done
        chunk = await stub.GetSnapshot(request).read()
        assert chunk.done and chunk.total_bytes > 2000
        # The asker's epoch and name are checked: a newer epoch, a name to be logged.
        for bad, phrase in ((shardnode_pb2.GetSnapshotRequest(shard_id=shard, epoch=99, replica="n2"), "the asked 99"),
                            (shardnode_pb2.GetSnapshotRequest(shard_id=shard, epoch=1, replica="R" * 300), "replica")):
            code, details = await refused(stub.GetSnapshot(bad).read())
            assert code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT), details
            assert phrase in details and len(details) < 400, details
        # An epoch past a log counter's range is bad input, as GetEntries answers it.
        huge = shardnode_pb2.GetSnapshotRequest(shard_id=shard, epoch=2**64 - 1, replica="n2")
        code, details = await refused(stub.GetSnapshot(huge).read())
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "epoch" in details, details


async def test_a_fence_of_a_shard_outside_the_ring_is_refused_and_changes_nothing(
    start_control_plane: StartControlPlane, tmp_path: Path
) -> None:
    async with data_node(start_control_plane, tmp_path) as (stub, dp):
        shard = dp.statuses()[0].shard_id
        fenced_before = storage_fences(dp)
        request = shardnode_pb2.FenceRequest(requested_by="probe", shards=[
            shardnode_pb2.ShardFence(shard_id=shard, epoch=50),  # valid, but in a refused request
            shardnode_pb2.ShardFence(shard_id="shard-77", epoch=5),
        ])
        code, details = await refused(stub.Fence(request))
        assert code == grpc.StatusCode.NOT_FOUND, details
        assert "shard-77" in details and "2 shards" in details, details
        assert storage_fences(dp) == fenced_before and "shard-77" not in dp._shards
        answer = await stub.Fence(shardnode_pb2.FenceRequest(
            requested_by="probe", shards=[shardnode_pb2.ShardFence(shard_id=shard, epoch=50)]))
        assert [(f.shard_id, f.epoch) for f in answer.shards] == [(shard, 50)]


async def test_a_fence_far_past_any_epoch_of_the_shard_is_refused(
    start_control_plane: StartControlPlane, tmp_path: Path
) -> None:
    # One such fence (a forged call, a corrupt record) would leave the shard no epoch to
    # promote at: the leader adopts the highest fence it finds and promotes one past it.
    async with data_node(start_control_plane, tmp_path) as (stub, dp):
        shard = dp.statuses()[0].shard_id
        fenced_before = storage_fences(dp)
        for epoch in (2**63 - 1, 2**40):
            code, details = await refused(stub.Fence(shardnode_pb2.FenceRequest(
                requested_by="probe", shards=[shardnode_pb2.ShardFence(shard_id=shard, epoch=epoch)])))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "far past the newest epoch" in details, details
        assert storage_fences(dp) == fenced_before
        assert all(s.serving for s in dp.statuses())  # the primary did not step down


async def test_a_replicated_epoch_the_node_was_never_given_deposes_nobody_and_garbage_is_refused(
    start_control_plane: StartControlPlane, tmp_path: Path
) -> None:
    # A newer epoch comes from the control plane (an assignment, a Fence), never on a
    # sender's word: a made-up one used to depose the real primary, and at 2^63-1 left the
    # shard no epoch to promote at.
    async with data_node(start_control_plane, tmp_path) as (stub, dp):
        shard = dp.statuses()[0].shard_id
        state = dp._shards[shard]
        fenced_before, last_before = storage_fences(dp), state.last

        async def replicate(epoch: int, payload: bytes = b"") -> shardnode_pb2.ReplicateAck:
            entry = shardnode_pb2.LogEntry(epoch=epoch, lsn=last_before.lsn + 1, payload=payload)
            prev = shardnode_pb2.LogPosition(epoch=last_before.epoch, lsn=last_before.lsn)
            call = stub.Replicate()
            await call.write(shardnode_pb2.ReplicateBatch(primary="n9", shards=[
                shardnode_pb2.ShardEntries(shard_id=shard, epoch=epoch, prev=prev, entries=[entry])]))
            try:
                ack: shardnode_pb2.ReplicateAck = await call.read()
                return ack
            finally:
                call.cancel()

        for epoch in (state.epoch + 1, 99, 2**63 - 1):
            ack = await replicate(epoch)
            assert ack.shards[0].result == shardnode_pb2.ACK_RESULT_NOT_REPLICA, ack
            assert f"epoch {epoch} is not known here yet" in ack.shards[0].reason, ack
        assert storage_fences(dp) == fenced_before and state.last == last_before
        assert all(s.serving for s in dp.statuses())  # the primary did not step down

        # Fenced by the control plane's way, the epoch is known: an undecodable entry at it
        # is the sender's mistake (INVALID_ARGUMENT, not DATA_LOSS) and applies nothing.
        epoch = state.epoch + 1
        await stub.Fence(shardnode_pb2.FenceRequest(
            requested_by="probe", shards=[shardnode_pb2.ShardFence(shard_id=shard, epoch=epoch)]))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await replicate(epoch, b"\xff\xfe\xfd")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert "is not an encoded WriteOp" in (info.value.details() or ""), info.value.details()
        assert state.last == last_before and dp._storage.meta(shard).last == last_before


def storage_fences(dp: DataPlane) -> dict[str, int]:
    return {shard: meta.fenced_epoch for shard, meta in dp._storage.shards().items()}


async def test_a_player_holds_at_most_the_item_cap_and_an_inventory_answer_stays_readable(
    start_control_plane: StartControlPlane, tmp_path: Path
) -> None:
    async with data_node(start_control_plane, tmp_path) as (stub, _):
        per = limits.MAX_ITEMS_PER_REQUEST
        full, rest = divmod(limits.MAX_ITEMS_PER_PLAYER, per)
        for n in range(full):
            await stub.GrantItems(grant(request_id=f"fill-{n}", item_ids=[f"i{n}-{k}" for k in range(per)], gold=0))
        await stub.GrantItems(grant(request_id="fill-last", item_ids=[f"last-{k}" for k in range(rest)], gold=0))
        code, details = await refused(stub.GrantItems(grant(request_id="one-more", item_ids=["extra"], gold=0)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert f"would hold {limits.MAX_ITEMS_PER_PLAYER + 1} items" in details
        inventory = await stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id="alice"))
        assert len(inventory.item_ids) == limits.MAX_ITEMS_PER_PLAYER and "extra" not in inventory.item_ids
        assert inventory.ByteSize() < 4 * 1024 * 1024  # a default gRPC client reads it
