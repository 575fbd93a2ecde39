"""A new primary behind one of its replicas copies only the entries it lacks (GetEntries,
over real gRPC between two data planes on real storage), and a snapshot only when the
replica's log does not continue its own. The control plane and the agent are stand-ins
(our own boundary): the assignments are set by hand."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import grpc.aio
import pytest

from bluemarble.client.ring_router import RingRouter
from bluemarble.core import limits
from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.replication import LogPosition
from bluemarble.core.ring import initial_ring
from bluemarble.runtime.grpc_server import ServiceBinding, build_server
from bluemarble.v1 import common_pb2, shardnode_pb2, shardnode_pb2_grpc
from shardnode import dataplane as dataplane_module
from shardnode.agent import SessionState
from shardnode.dataplane import DataPlane
from shardnode.service import ShardNodeService
from shardnode.storage import NodeStorage
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

SHARD = ShardId("shard-0")


def entry(epoch: int, lsn: int, op: shardnode_pb2.WriteOp) -> shardnode_pb2.LogEntry:
    return shardnode_pb2.LogEntry(epoch=epoch, lsn=lsn, payload=op.SerializeToString(), written_at_ms=1_700_000_000_000)


def start_op(epoch: int, lsn: int) -> shardnode_pb2.LogEntry:
    return entry(epoch, lsn, shardnode_pb2.WriteOp(epoch_start=shardnode_pb2.EpochStartOp()))


def grant_op(epoch: int, lsn: int, player: str) -> shardnode_pb2.LogEntry:
    return entry(epoch, lsn, shardnode_pb2.WriteOp(
        request_id=f"g-{player}", player_id=player, grant=shardnode_pb2.GrantOp(item_ids=[f"sword-{player}"], gold=7)))


def log_of(epoch: int, players: list[str], first_lsn: int = 1) -> list[shardnode_pb2.LogEntry]:
    """An epoch's entries: its start, then one grant per player."""
    return [start_op(epoch, first_lsn)] + [grant_op(epoch, first_lsn + 1 + i, p) for i, p in enumerate(players)]


def agent() -> SimpleNamespace:
    return SimpleNamespace(on_assignments=None, status_provider=None, assignments={}, addresses={},
                           session_state=SessionState.CONNECTED, registration=None, config=None)


@contextlib.asynccontextmanager
async def source_node(tmp_path: Path, entries: list[shardnode_pb2.LogEntry], fenced_at: int
                      ) -> AsyncIterator[tuple[str, shardnode_pb2_grpc.ShardNodeStub, NodeStorage]]:
    """n2: a replica of SHARD holding ``entries``, fenced at ``fenced_at`` (it answered the
    new primary's probe), serving ShardNode on loopback."""
    storage = NodeStorage.open(tmp_path / "n2")
    storage.append([(SHARD, entries)], {SHARD: fenced_at})
    dp = DataPlane("n2", storage, agent(), RingRouter.from_ring(initial_ring(1, vnodes=4)))  # type: ignore[arg-type]
    dp._agent.assignments = {SHARD: common_pb2.Assignment(shard_id=SHARD, epoch=fenced_at, primary="n1",
                                                          replicas=["n2"])}
    dp._reconcile_shippers = lambda: None  # type: ignore[method-assign]
    dp.on_assignments()
    server = await build_server(
        "127.0.0.1:0",
        [ServiceBinding(shardnode_pb2.DESCRIPTOR.services_by_name["ShardNode"].full_name,
                        ShardNodeService("n2", lambda: [], lambda: dp),
                        shardnode_pb2_grpc.add_ShardNodeServicer_to_server)],
        max_request_bytes=limits.SHARD_NODE_MAX_REQUEST_BYTES,
    )
    address = f"127.0.0.1:{server.port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield address, shardnode_pb2_grpc.ShardNodeStub(channel), storage  # type: ignore[no-untyped-call]
    finally:
        await channel.close(None)
        await server.stop_gracefully(0.2)
        await dp.stop()
        storage.close()


@contextlib.asynccontextmanager
async def new_primary(tmp_path: Path, entries: list[shardnode_pb2.LogEntry], epoch: int, source: str,
                      source_last: LogPosition) -> AsyncIterator[tuple[DataPlane, NodeStorage, list[str]]]:
    """n1 holding ``entries``, made primary of SHARD at ``epoch`` with n2 (at ``source``,
    whose log ends at ``source_last``) as its replica. Yields the snapshots it copied."""
    storage = NodeStorage.open(tmp_path / "n1")
    if entries:
        storage.append([(SHARD, entries)], {})
    stand_in = agent()
    stand_in.addresses = {"n2": source}
    dp = DataPlane("n1", storage, stand_in, RingRouter.from_ring(initial_ring(1, vnodes=4)))  # type: ignore[arg-type]
    dp._reported_positions = lambda shard: {NodeId("n2"): source_last}  # type: ignore[method-assign]
    dp._reconcile_shippers = lambda: None  # type: ignore[method-assign]
    snapshots: list[str] = []
    install = dp._install_snapshot

    async def counted(state: object, node: NodeId, at: int) -> None:
        snapshots.append(node)
        await install(state, node, at)  # type: ignore[arg-type]

    dp._install_snapshot = counted  # type: ignore[method-assign]
    stand_in.assignments = {SHARD: common_pb2.Assignment(shard_id=SHARD, epoch=epoch, primary="n1", replicas=["n2"])}
    dp.on_assignments()
    try:
        yield dp, storage, snapshots
    finally:
        await dp.stop()
        storage.close()


async def serving(dp: DataPlane) -> bool:
    return any(s.serving for s in dp.statuses())


def holdings(storage: NodeStorage) -> dict[str, tuple[list[str], int]]:
    """Each player's items and gold on SHARD (no replica acknowledges here, so the reads
    of the data plane, which wait for one, are not used)."""
    return {p.player_id: (list(p.item_ids), p.gold) for p in storage.snapshot(SHARD).players}


def positions(storage: NodeStorage) -> list[tuple[int, int]]:
    return [(e.epoch, e.lsn) for e in storage.entries(SHARD, 1, max_entries=10_000)]


async def test_a_new_primary_a_few_entries_short_copies_only_those(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A planned handoff: the old primary (now a replica) holds entries the new one lacks.
    The new primary appends exactly those, in several answers when they are many, keeps
    what it had, and serves with every player the entries granted."""
    monkeypatch.setattr(dataplane_module, "ENTRIES_PER_ANSWER", 4)  # three answers for 10 entries
    players = [f"p{i}" for i in range(14)]
    old_log = log_of(3, players)
    async with source_node(tmp_path, old_log, fenced_at=4) as (address, _, _), \
            new_primary(tmp_path, old_log[:5], 4, address, LogPosition(3, 15)) as (dp, storage, snapshots):
        await wait_for(lambda: serving(dp), 15.0, "the new primary to serve")
        assert snapshots == []
        assert positions(storage) == [(3, lsn) for lsn in range(1, 16)] + [(4, 16)]  # then its own epoch start
        assert holdings(storage) == {p: ([f"sword-{p}"], 7) for p in players}


async def test_a_replica_whose_log_differs_is_copied_as_a_snapshot(tmp_path: Path) -> None:
    """The new primary holds an entry of epoch 3 that never reached the replica ahead (it
    holds epoch 4's entries there): appending would fork the log, so the shard is copied
    whole, and the new primary's log is the replica's."""
    common = log_of(3, ["a", "b"])  # lsn 1-3
    theirs = common + log_of(4, ["c", "d"], first_lsn=4)  # (4, 4) .. (4, 6)
    ours = [*common, grant_op(3, 4, "lost")]
    async with source_node(tmp_path, theirs, fenced_at=5) as (address, stub, _), \
            new_primary(tmp_path, ours, 5, address, LogPosition(4, 6)) as (dp, storage, snapshots):
        await wait_for(lambda: serving(dp), 15.0, "the new primary to serve")
        assert snapshots == ["n2"]
        assert holdings(storage) == {p: ([f"sword-{p}"], 7) for p in ("a", "b", "c", "d")}  # not "lost"
        # What the refusal said, asked directly.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetEntries(shardnode_pb2.GetEntriesRequest(
                shard_id=SHARD, epoch=5, after=shardnode_pb2.LogPosition(epoch=3, lsn=4), node_id="n1"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "differs at lsn 4 (epoch 4, not 3)" in (refused.value.details() or "")


async def test_get_entries_refuses_what_it_cannot_answer_safely(tmp_path: Path) -> None:
    """A replica not yet fenced at the asker's epoch could still take entries of the old
    primary: it refuses, as it does a position past its log and malformed input."""
    async with source_node(tmp_path, log_of(3, ["a", "b", "c"]), fenced_at=4) as (_, stub, _):
        def ask(**fields: object) -> object:
            request = {"shard_id": SHARD, "epoch": 4, "after": shardnode_pb2.LogPosition(epoch=3, lsn=2),
                       "node_id": "n1", **fields}
            return stub.GetEntries(shardnode_pb2.GetEntriesRequest(**request))  # type: ignore[arg-type]

        answer = await ask()
        assert [(e.epoch, e.lsn) for e in answer.entries] == [(3, 3), (3, 4)]  # type: ignore[attr-defined]
        assert (answer.last.epoch, answer.last.lsn) == (3, 4)  # type: ignore[attr-defined]
        assert not (await ask(after=shardnode_pb2.LogPosition(epoch=3, lsn=4))).entries  # type: ignore[attr-defined]
        for fields, code, phrase in (
            ({"epoch": 9}, grpc.StatusCode.FAILED_PRECONDITION, "older than the asked 9"),
            ({"after": shardnode_pb2.LogPosition(epoch=3, lsn=9)}, grpc.StatusCode.FAILED_PRECONDITION,
             "ends at (3, 4), before (3, 9)"),
            ({"shard_id": "shard-99999"}, grpc.StatusCode.NOT_FOUND, "shard-99999 is not a shard of this cluster"),
            ({"shard_id": "guild-7"}, grpc.StatusCode.INVALID_ARGUMENT, "guild-7"),
            ({"after": shardnode_pb2.LogPosition(epoch=0, lsn=3)}, grpc.StatusCode.INVALID_ARGUMENT,
             "is not a log position"),
            ({"epoch": 2**63}, grpc.StatusCode.INVALID_ARGUMENT, "epoch"),
            ({"epoch": 0}, grpc.StatusCode.INVALID_ARGUMENT, "epoch is 0"),
            ({"node_id": "n" * 300}, grpc.StatusCode.INVALID_ARGUMENT, "node_id"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ask(**fields)
            details = refused.value.details() or ""
            assert refused.value.code() == code and phrase in details and len(details) < 300, (fields, details)
        await asyncio.sleep(0)
