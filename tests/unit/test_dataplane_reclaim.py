"""The data plane's reclaim of copies without a role, over real storage (SQLite in a temp
dir), a fake clock, and a stand-in for the agent (our own boundary): a copy goes only
once it has been without a role, unretained, with the node in touch and its assignments
current, at every check for the whole delay; a role that comes back first keeps it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from bluemarble.client.ring_router import RingRouter
from bluemarble.core.ids import PlayerId, ShardId
from bluemarble.core.ring import initial_ring
from bluemarble.runtime.clock import FakeClock
from bluemarble.v1 import common_pb2, shardnode_pb2
from shardnode import dataplane as dataplane_module
from shardnode.agent import SessionState
from shardnode.dataplane import DataPlane
from shardnode.storage import NodeStorage

S1, S2 = ShardId("shard-1"), ShardId("shard-2")
AFTER_S = 60.0


def fill(storage: NodeStorage, shard: ShardId, players: int) -> None:
    for i in range(players):
        storage.write(shard, 2, shardnode_pb2.WriteOp(
            request_id=f"{shard}-{i}", player_id=f"p{i}", grant=shardnode_pb2.GrantOp(item_ids=[f"{shard}-{i}"])),
            now_ms=1_000 + i)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[DataPlane, SimpleNamespace, NodeStorage, FakeClock]]:
    storage = NodeStorage.open(tmp_path)
    fill(storage, S1, 30)
    fill(storage, S2, 5)
    synced = asyncio.Event()
    synced.set()
    agent = SimpleNamespace(
        on_assignments=None, status_provider=None, assignments={}, addresses={}, retained_in=set(),
        assignments_synced=synced, session_state=SessionState.CONNECTED, registration=None, config=None,
    )
    clock = FakeClock()
    dp = DataPlane("n1", storage, agent, RingRouter.from_ring(initial_ring(4, vnodes=4)),  # type: ignore[arg-type]
                   clock=clock, reclaim_after_s=AFTER_S)
    yield dp, agent, storage, clock
    await dp.stop()
    storage.close()


async def check(dp: DataPlane, clock: FakeClock) -> list[ShardId]:
    """One reclaim check, the fake clock moving through the pauses between its transactions."""
    task = asyncio.ensure_future(dp._reclaim_once())
    await clock.settle()
    while not task.done():
        await clock.advance(0.01)
    return task.result()


def on_disk(dp: DataPlane) -> set[str]:
    return {s.shard_id for s in dp.statuses(include_disk_only=True) if s.on_disk_only}


async def test_a_copy_without_a_role_goes_after_the_delay_and_not_before(node) -> None:  # type: ignore[no-untyped-def]
    dp, agent, storage, clock = node
    agent.assignments = {S2: common_pb2.Assignment(shard_id=S2, epoch=3, primary="n9", replicas=["n1"])}
    dp.on_assignments()  # S2: a replica role; S1: no role
    assert await check(dp, clock) == []
    clock._now_s += AFTER_S - 1
    assert await check(dp, clock) == [] and on_disk(dp) == {S1}
    clock._now_s += 1
    assert await check(dp, clock) == [S1]
    assert on_disk(dp) == set() and storage.inventory(S1, PlayerId("p3")) is None
    assert storage.inventory(S2, PlayerId("p3")) == ([f"{S2}-3"], 0)  # the shard with a role is untouched
    assert dp._shards[S1].last.lsn == 0 and not dp._shards[S1].synced


@pytest.mark.parametrize("interruption", ["retained", "lost", "not synced", "role"])
async def test_a_check_that_finds_the_copy_counted_on_starts_the_delay_over(  # type: ignore[no-untyped-def]
    node, interruption: str
) -> None:
    dp, agent, storage, clock = node
    assert await check(dp, clock) == []  # S1 and S2 noted at t0
    clock._now_s += AFTER_S / 2
    if interruption == "retained":
        agent.retained_in = {S1, S2}
    elif interruption == "lost":
        agent.session_state = SessionState.LOST
    elif interruption == "not synced":
        agent.assignments_synced.clear()
    else:
        agent.assignments = {s: common_pb2.Assignment(shard_id=s, epoch=3, primary="n9", replicas=["n1"])
                             for s in (S1, S2)}
        dp.on_assignments()
    assert await check(dp, clock) == []
    agent.retained_in, agent.session_state, agent.assignments = set(), SessionState.CONNECTED, {}
    agent.assignments_synced.set()
    dp.on_assignments()
    clock._now_s += AFTER_S / 2
    assert await check(dp, clock) == []  # the delay starts again here
    clock._now_s += AFTER_S / 2
    assert await check(dp, clock) == []
    clock._now_s += AFTER_S / 2
    assert sorted(await check(dp, clock)) == [S1, S2]
    assert storage.inventory(S1, PlayerId("p0")) is None


async def test_a_role_that_comes_back_before_the_position_goes_keeps_the_copy(  # type: ignore[no-untyped-def]
    node, monkeypatch
) -> None:
    dp, agent, storage, clock = node
    monkeypatch.setattr(dataplane_module, "RECLAIM_CHUNK_ROWS", 4)
    assert await check(dp, clock) == []
    clock._now_s += AFTER_S
    agent.assignments = {S2: common_pb2.Assignment(shard_id=S2, epoch=3, primary="n9", replicas=["n1"])}
    dp.on_assignments()
    task = asyncio.ensure_future(dp._reclaim_once())
    await clock.settle()
    assert not task.done() and storage.meta(S1).first_retained_lsn > 1  # the log goes first, in steps
    agent.assignments[S1] = common_pb2.Assignment(shard_id=S1, epoch=3, primary="n9", replicas=["n1"])
    dp.on_assignments()
    await clock.advance(1.0)
    assert await task == []
    assert storage.meta(S1).last.lsn == 30 and storage.inventory(S1, PlayerId("p29")) == ([f"{S1}-29"], 0)


async def test_a_reclaim_a_restart_interrupted_is_finished(tmp_path: Path) -> None:
    storage = NodeStorage.open(tmp_path)
    fill(storage, S1, 30)
    while S1 not in storage.reclaiming():
        storage.reclaim_step(S1, 5)
    storage.close()
    storage = NodeStorage.open(tmp_path)
    agent = SimpleNamespace(
        on_assignments=None, status_provider=None, assignments={}, addresses={}, retained_in=set(),
        assignments_synced=asyncio.Event(), session_state=SessionState.LOST, registration=None, config=None,
    )
    clock = FakeClock()
    dp = DataPlane("n1", storage, agent, RingRouter.from_ring(initial_ring(4, vnodes=4)),  # type: ignore[arg-type]
                   clock=clock, reclaim_after_s=0)  # reclaims off: an interrupted one still finishes
    try:
        assert await check(dp, clock) == [S1]
        assert storage.reclaiming() == frozenset() and storage.inventory(S1, PlayerId("p1")) is None
    finally:
        await dp.stop()
        storage.close()
