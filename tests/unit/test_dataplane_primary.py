"""The data plane as a primary without replicas, over real storage (SQLite in a temp dir)
and a stand-in for the agent (our own boundary): the epoch-start entry comes before
serving, the in-memory log tail the shippers read gives exactly what storage holds, and
self-fencing refuses STRONG writes once the lease may have expired."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from bluemarble.client.ring_router import RingRouter
from bluemarble.core.errors import FailedPrecondition, NotFound, Unavailable
from bluemarble.core.ids import NodeId, PlayerId, ShardId
from bluemarble.core.replication import ZERO, LogPosition
from bluemarble.core.ring import initial_ring
from bluemarble.runtime.clock import FakeClock
from bluemarble.v1 import common_pb2, shardnode_pb2
from shardnode import dataplane as dataplane_module
from shardnode.agent import SessionState
from shardnode.dataplane import DataPlane, ShardState
from shardnode.storage import NodeStorage
from shardnode.storage import node_storage as node_storage_module

SHARD = ShardId("shard-0")


@pytest.fixture
async def primary(tmp_path: Path) -> AsyncIterator[tuple[DataPlane, SimpleNamespace, NodeStorage]]:
    storage = NodeStorage.open(tmp_path)
    agent = SimpleNamespace(
        on_assignments=None, status_provider=None, assignments={}, addresses={},
        session_state=SessionState.CONNECTED, registration=None, config=None,
    )
    dp = DataPlane("n1", storage, agent, RingRouter.from_ring(initial_ring(1, vnodes=4)))  # type: ignore[arg-type]
    agent.assignments = {SHARD: common_pb2.Assignment(shard_id=SHARD, epoch=3, primary="n1")}
    dp.on_assignments()
    for _ in range(200):
        if any(s.serving for s in dp.statuses()):
            break
        await asyncio.sleep(0.01)
    yield dp, agent, storage
    await dp.stop()
    storage.close()


def grant(i: int, size: int = 10) -> shardnode_pb2.GrantItemsRequest:
    return shardnode_pb2.GrantItemsRequest(
        request_id=f"g{i}", player_id=f"p{i}", item_ids=[f"item-{i}-" + "x" * size]
    )


async def test_a_new_primary_writes_its_epoch_start_entry_before_it_serves(primary) -> None:  # type: ignore[no-untyped-def]
    dp, _, storage = primary
    [status] = dp.statuses()
    assert status.serving and (status.last_epoch, status.applied_lsn) == (3, 1)
    [entry] = storage.entries(SHARD, 1)
    assert shardnode_pb2.WriteOp.FromString(entry.payload).WhichOneof("op") == "epoch_start"
    response = await dp.grant(grant(1), 1.0)
    assert response.lsn == 2 and list(response.inventory.item_ids) == ["item-1-xxxxxxxxxx"]


async def test_the_log_tail_in_memory_is_what_storage_holds(primary, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    dp, _, storage = primary
    monkeypatch.setattr(dataplane_module, "TAIL_CACHE_BYTES", 3_000)  # a tail shorter than the log
    for i in range(60):
        await dp.grant(grant(i, size=100), 1.0)
    state = dp._shards[SHARD]
    assert 1 < len(state.tail) < 61 and state.tail[-1].lsn == state.last.lsn == 61
    for from_lsn in (1, 2, 30, state.tail[0].lsn, 60, 61, 62):
        for max_entries, max_bytes in ((512, 4 << 20), (3, 4 << 20), (512, 250)):
            assert dp.entries(SHARD, from_lsn, max_entries, max_bytes) == storage.entries(
                SHARD, from_lsn, max_entries=max_entries, max_bytes=max_bytes
            ), (from_lsn, max_entries, max_bytes)
    for lsn in (1, 2, 45, 61):
        assert dp.epoch_at(SHARD, lsn) == storage.epoch_at(SHARD, lsn) == 3


async def test_strong_writes_stop_once_the_lease_may_have_expired(primary) -> None:  # type: ignore[no-untyped-def]
    dp, agent, _ = primary
    await dp.grant(grant(1), 1.0)
    agent.session_state = SessionState.LOST
    with pytest.raises(Unavailable, match="lease may have expired"):
        await dp.grant(grant(2), 1.0)
    with pytest.raises(Unavailable, match="lease may have expired"):
        await dp.get_inventory("p1", False, 1.0)  # type: ignore[arg-type]
    stale = await dp.get_inventory("p1", True, 1.0)  # type: ignore[arg-type]
    assert stale.staleness.stale and list(stale.item_ids) == ["item-1-xxxxxxxxxx"]


async def test_a_fence_at_a_newer_epoch_stops_writes_and_answers_the_position(primary) -> None:  # type: ignore[no-untyped-def]
    dp, _, _ = primary
    await dp.grant(grant(1), 1.0)
    answer = dp.fence(shardnode_pb2.FenceRequest(shards=[shardnode_pb2.ShardFence(shard_id=SHARD, epoch=4)]))
    [fenced] = answer.shards
    assert (fenced.epoch, fenced.last.epoch, fenced.last.lsn, fenced.has_data) == (4, 3, 2, True)
    with pytest.raises(FailedPrecondition, match="fenced at epoch 4"):
        await dp.grant(grant(2), 1.0)


async def test_a_new_primary_serves_only_once_every_replica_reported_its_position(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch
) -> None:
    """A new primary with replicas waits, however long, until each has answered a probe
    of its epoch (answers fence them): serving after a timeout from a shorter log lost
    acknowledged writes in a planned handoff. Then it catches up from one ahead."""
    monkeypatch.setattr(dataplane_module, "CATCH_UP_WAIT_S", 0.05)  # the first log note comes sooner
    storage = NodeStorage.open(tmp_path)
    agent = SimpleNamespace(
        on_assignments=None, status_provider=None, assignments={}, addresses={},
        session_state=SessionState.CONNECTED, registration=None, config=None,
    )
    dp = DataPlane("n1", storage, agent, RingRouter.from_ring(initial_ring(1, vnodes=4)))  # type: ignore[arg-type]
    reported: dict[str, object] = {}
    monkeypatch.setattr(dp, "_reported_positions", lambda shard: dict(reported))
    monkeypatch.setattr(dp, "_reconcile_shippers", lambda: None)  # no streams: positions come from `reported`
    agent.assignments = {SHARD: common_pb2.Assignment(shard_id=SHARD, epoch=4, primary="n1", replicas=["n2", "n3"])}
    dp.on_assignments()
    try:
        await asyncio.sleep(0.3)  # six times the old serve-anyway timeout
        assert not any(s.serving for s in dp.statuses())
        reported["n2"] = ZERO
        await asyncio.sleep(0.1)
        assert not any(s.serving for s in dp.statuses()), "one replica still unheard"
        reported["n3"] = ZERO
        for _ in range(500):  # up to 5 s
            if any(s.serving for s in dp.statuses()):
                break
            await asyncio.sleep(0.01)
        assert any(s.serving for s in dp.statuses()), "every replica reported, yet not serving"
    finally:
        await dp.stop()
        storage.close()


async def test_readiness_follows_registration_assignments_and_each_copy(tmp_path: Path) -> None:
    """Not ready until registered with assignments and every copy it holds is whole: the
    readiness probe that gates a rolling restart (DataPlane.not_ready_reason)."""
    storage = NodeStorage.open(tmp_path)
    synced = asyncio.Event()
    agent = SimpleNamespace(
        on_assignments=None, status_provider=None, assignments={}, addresses={},
        session_state=SessionState.CONNECTED, registration=None, config=None, assignments_synced=synced,
    )
    dp = DataPlane("n1", storage, agent, RingRouter.from_ring(initial_ring(2, vnodes=4)))  # type: ignore[arg-type]
    try:
        assert dp.not_ready_reason() == "not registered with the control plane"
        agent.registration = SimpleNamespace(lease_id=7, heartbeat_interval_s=1.0)
        agent.registered_at_s = dp.clock.monotonic_s()
        assert dp.not_ready_reason() == "waiting for its assignments"
        synced.set()
        # Just registered, holding nothing: the leader may be placing it right now.
        assert dp.not_ready_reason() == "waiting for its first shards"
        agent.registered_at_s -= 3.0
        assert dp.not_ready_reason() == ""  # and after a while, holding nothing: ready
        agent.session_state = SessionState.LOST
        assert "lease may have expired" in dp.not_ready_reason()
        agent.session_state = SessionState.CONNECTED
        # A replica with no copy yet, then one that hears from its primary but is behind.
        other = ShardId("shard-1")
        agent.assignments = {other: common_pb2.Assignment(shard_id=other, epoch=2, primary="n2", replicas=["n1"])}
        dp.on_assignments()
        assert dp.not_ready_reason() == "copying shard-1 from its primary"
        state = dp._shards[other]
        state.synced = True
        assert dp.not_ready_reason() == "not hearing from the primary of shard-1"
        # Silent for 10 s: what it lacks is unknown, so a stale answer says "at least 10 s".
        state.last_heard_s = dp.clock.monotonic_s() - 10
        lag_entries, lag_ms = dp._lag(state)
        assert lag_entries == 0 and 10_000 <= lag_ms < 60_000
        state.last_heard_s = dp.clock.monotonic_s()
        assert dp._lag(state) == (0, 0)  # hearing, and told it is caught up
        state.primary_last_lsn = state.last.lsn + 5
        assert dp._lag(state)[0] == 5
        assert dp.not_ready_reason() == "5 entries behind on shard-1"
        state.primary_last_lsn = state.last.lsn
        assert dp.not_ready_reason() == ""
        # Leading a shard: ready only once it serves (after its epoch-start entry).
        agent.assignments[SHARD] = common_pb2.Assignment(shard_id=SHARD, epoch=3, primary="n1")
        dp.on_assignments()
        assert dp.not_ready_reason() in ("catching up as the new primary of shard-0", "")
        for _ in range(200):
            if not dp.not_ready_reason():
                break
            state.last_heard_s = dp.clock.monotonic_s()
            await asyncio.sleep(0.01)
        assert dp.not_ready_reason() == ""
        assert dp._shards[SHARD].serving
    finally:
        await dp.stop()
        storage.close()


async def test_a_new_primary_behind_a_replica_retries_the_copy_and_never_serves_a_shorter_log(primary) -> None:  # type: ignore[no-untyped-def]
    """The replica ahead may hold acknowledged writes: a failed copy from it (the replica
    busy serving another snapshot) is tried again; the primary used to serve from its own
    shorter log after one failure, dropping them."""
    dp, _, _ = primary
    state = dp._shards[SHARD]
    state.replicas = ("n2",)
    ahead = LogPosition(state.last.epoch, state.last.lsn + 4)
    dp._reported_positions = lambda shard: {NodeId("n2"): ahead, NodeId("gone"): LogPosition(9, 99)}
    tries: list[str] = []

    async def install(state_: object, source: str, epoch: int) -> None:
        tries.append(source)
        if len(tries) < 3:
            raise Unavailable("node n2 is busy serving other snapshots; retry shortly")
        state.last = ahead

    async def no_log_copy(state_: object, source: str, epoch: int) -> bool:
        return False  # the replica's log does not continue this one: a snapshot it is

    dp._copy_entries = no_log_copy
    dp._install_snapshot = install
    assert await dp._catch_up(state, state.epoch)
    assert tries == ["n2", "n2", "n2"]  # never the node outside the assignment
    # A term that ends while the copy keeps failing: no serving, no endless loop.
    state.last = LogPosition(ahead.epoch, ahead.lsn - 1)
    tries.clear()

    async def failing(state_: object, source: str, epoch: int) -> None:
        tries.append(source)
        if len(tries) == 2:
            state.epoch += 1  # a newer assignment arrived
        raise Unavailable("no answer")

    dp._install_snapshot = failing
    assert not await dp._catch_up(state, state.epoch)
    assert len(tries) == 2


async def test_a_failed_prune_round_is_retried_at_the_next_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = NodeStorage.open(tmp_path)
    agent = SimpleNamespace(on_assignments=None, status_provider=None, assignments={}, addresses={},
                            session_state=SessionState.CONNECTED, registration=None, config=None)
    clock = FakeClock()
    dp = DataPlane("n1", storage, agent, RingRouter.from_ring(initial_ring(1, vnodes=4)), clock=clock)  # type: ignore[arg-type]
    rounds: list[str] = []

    def prune(now_ms: int, max_rows: int) -> int:
        rounds.append("prune")
        if len(rounds) == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return 0

    monkeypatch.setattr(storage, "prune", prune)
    await dp.start()
    try:
        await clock.advance(30.5)
        assert rounds == ["prune"] and dp._prune_task is not None and not dp._prune_task.done()
        await clock.advance(30.0)  # the disk has room again: the next round runs
        assert rounds == ["prune", "prune"]
    finally:
        await dp.stop()
        storage.close()


async def test_a_prune_round_removes_a_backlog_in_small_transactions(primary, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    dp, _, storage = primary
    monkeypatch.setattr(dataplane_module, "PRUNE_CHUNK_ROWS", 40)
    storage._log_retention_entries = 10
    storage._request_retention_ms = 1
    for i in range(130):
        await dp.grant(grant(i), 1.0)
    transactions: list[int] = []
    prune = storage.prune

    def counted(now_ms: int, max_rows: int) -> int:
        removed = prune(now_ms, max_rows=max_rows)
        transactions.append(removed)
        return removed

    monkeypatch.setattr(storage, "prune", counted)
    # 121 log entries past the last 10, and 130 request ids: each transaction at most 40 rows.
    assert await dp._prune_once() == 121 + 130
    assert transactions[:-1] == [40] * (len(transactions) - 1) and transactions[-1] < 40
    assert dp._shards[SHARD].first_retained_lsn == 122 == storage.meta(SHARD).first_retained_lsn
    assert [e.lsn for e in storage.entries(SHARD, 122)] == list(range(122, 132))
    assert await dp._prune_once() == 0


async def test_a_replica_that_said_it_restarts_stays_expected_when_it_is_placed_back(primary) -> None:  # type: ignore[no-untyped-def]
    """A replica restarting says so (a trailer), and its stream's failures are logged at
    info until PEER_RESTART_GRACE_S. Dropped from the shard meanwhile and placed back, the
    new stream to it must know that too, not warn about a connection refused."""
    dp, agent, _ = primary

    def replicas(*nodes: str) -> None:
        agent.assignments = {SHARD: common_pb2.Assignment(shard_id=SHARD, epoch=3, primary="n1", replicas=nodes)}
        dp.on_assignments()

    replicas("n2")
    quiet_until_s = dp._clock.monotonic_s() + 30
    dp._shippers[NodeId("n2")].quiet_until_s = quiet_until_s  # as its "shutting down" trailer sets it
    replicas()
    assert NodeId("n2") not in dp._shippers
    replicas("n2")
    assert dp._shippers[NodeId("n2")].quiet_until_s == quiet_until_s


async def test_a_primary_reports_the_replicas_it_counts_and_ignores_acks_of_others(primary) -> None:  # type: ignore[no-untyped-def]
    """GetShardStatus names the replicas whose acknowledgements the primary counts (the
    control plane drops a copy only once its primary no longer lists it), and an ack from
    a node outside them (one in flight when the assignment dropped it) never counts, nor
    counts later should the node be placed back."""
    dp, agent, _ = primary
    ack = shardnode_pb2.ShardAck(shard_id=SHARD, last=shardnode_pb2.LogPosition(epoch=3, lsn=1))
    agent.assignments = {SHARD: common_pb2.Assignment(shard_id=SHARD, epoch=3, primary="n1", replicas=["n2"])}
    dp.on_assignments()
    [status] = dp.statuses()
    assert list(status.replicas) == ["n2"]
    dp.on_ack(SHARD, NodeId("n2"), 3, ack)
    dp.on_ack(SHARD, NodeId("n3"), 3, ack)  # not a replica
    assert dp._shards[SHARD].acked == {"n2": 1}
    agent.assignments = {SHARD: common_pb2.Assignment(shard_id=SHARD, epoch=3, primary="n1", replicas=["n3"])}
    dp.on_assignments()
    dp.on_ack(SHARD, NodeId("n2"), 3, ack)  # in flight when n2 was dropped
    [status] = dp.statuses()
    assert list(status.replicas) == ["n3"] and dp._shards[SHARD].acked == {}
    agent.assignments = {SHARD: common_pb2.Assignment(shard_id=SHARD, epoch=3, primary="n1", replicas=["n3", "n2"])}
    dp.on_assignments()
    assert dp._shards[SHARD].acked == {}  # n2 back: nothing it acknowledged before counts


class _SnapshotStub:
    """A peer's GetSnapshot: the chunks of one snapshot, as a node serves them."""

    def __init__(self, snapshot: shardnode_pb2.ShardSnapshot) -> None:
        self.data = snapshot.SerializeToString()
        self.last = snapshot.last

    def GetSnapshot(self, request: shardnode_pb2.GetSnapshotRequest, timeout: float) -> AsyncIterator[
            shardnode_pb2.SnapshotChunk]:
        async def chunks() -> AsyncIterator[shardnode_pb2.SnapshotChunk]:
            yield shardnode_pb2.SnapshotChunk(shard_id=request.shard_id, last=self.last, data=self.data, done=True)
        return chunks()


async def _replica_to_install(dp: DataPlane, tmp_path: Path) -> tuple[ShardState, shardnode_pb2.ShardSnapshot]:
    shard = ShardId("shard-9")
    with NodeStorage.open(tmp_path / "source") as source:
        for i in range(40):
            give = shardnode_pb2.GrantOp(item_ids=[f"i{i}-a", f"i{i}-b"], gold=i)
            source.write(shard, 2, shardnode_pb2.WriteOp(request_id=f"r{i}", player_id=f"p{i}", grant=give), now_ms=1)
        snapshot = source.snapshot(shard)
    state = dp._state(shard)
    state.role, state.epoch, state.primary = dataplane_module.REPLICA, 2, "n2"
    dp._peer_stub = lambda node: _SnapshotStub(snapshot)  # type: ignore[method-assign, assignment, return-value]
    return state, snapshot


async def test_a_snapshot_is_installed_in_batches_with_the_loop_running_between_them(
    primary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    """Installed in one transaction, a 20 MB snapshot held a node's event loop for half a
    second, and eight at once cost it its lease: between batches the loop runs."""
    dp, _, storage = primary
    monkeypatch.setattr(node_storage_module, "INSTALL_BATCH_ROWS", 4)
    state, snapshot = await _replica_to_install(dp, tmp_path)
    ticks: list[tuple[LogPosition, bool]] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            ticks.append((state.last, state.synced))
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    await dp._install_snapshot(state, NodeId("n2"), 2)
    done.set()
    await task
    assert len(ticks) >= 80 // 4  # one turn of the loop at least per batch of the 80 items
    assert all(seen == (ZERO, False) for seen in ticks[2:-1])  # no copy to serve or promote until the end
    assert state.synced and state.last == LogPosition(2, 40) == storage.meta(state.shard_id).last
    assert storage.snapshot(state.shard_id) == snapshot


async def test_a_fence_during_an_install_leaves_the_shard_empty(
    primary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    """A failover begins mid-install: the node answered the fence with position ZERO, so
    it must not then hold the snapshot's copy; the new primary copies it again."""
    dp, _, storage = primary
    monkeypatch.setattr(node_storage_module, "INSTALL_BATCH_ROWS", 4)
    state, _ = await _replica_to_install(dp, tmp_path)
    turns = 0

    async def fencer() -> None:
        nonlocal turns
        while turns < 5:
            turns += 1
            await asyncio.sleep(0)
        state.fenced_epoch = storage.fence(state.shard_id, 3).fenced_epoch

    task = asyncio.create_task(fencer())
    with pytest.raises(FailedPrecondition, match="fenced at epoch 3"):
        await dp._install_snapshot(state, NodeId("n2"), 2)
    await task
    meta = storage.meta(state.shard_id)
    assert (meta.last, meta.synced, meta.fenced_epoch) == (ZERO, False, 3)
    assert storage.inventory(state.shard_id, PlayerId("p1")) is None and storage.item_owner("i1-a") is None
    assert (state.last, state.synced) == (ZERO, False)


async def test_a_replica_copies_two_snapshots_at_a_time(primary, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A node that rejoined empty was sent 24 snapshots at once: all in memory together,
    and every turn of its loop ran a batch of each. Two at a time; the others wait."""
    dp, _, storage = primary
    _, snapshot = await _replica_to_install(dp, tmp_path)
    gate = asyncio.Event()
    asked: list[str] = []

    class GatedStub(_SnapshotStub):
        def GetSnapshot(self, request: shardnode_pb2.GetSnapshotRequest, timeout: float) -> AsyncIterator[
                shardnode_pb2.SnapshotChunk]:
            asked.append(request.shard_id)

            async def chunks() -> AsyncIterator[shardnode_pb2.SnapshotChunk]:
                await gate.wait()
                yield shardnode_pb2.SnapshotChunk(shard_id=request.shard_id, last=self.last, data=self.data, done=True)
            return chunks()

    stubs: dict[str, _SnapshotStub] = {}
    states = []
    for i in range(5):
        copy = shardnode_pb2.ShardSnapshot()
        copy.CopyFrom(snapshot)
        copy.shard_id = f"shard-{20 + i}"
        stubs[copy.shard_id] = GatedStub(copy)
        state = dp._state(ShardId(copy.shard_id))
        state.role, state.epoch, state.primary = dataplane_module.REPLICA, 2, "n2"
        states.append(state)
    dp._peer_stub = lambda node: _Router(stubs)  # type: ignore[method-assign, assignment, return-value]
    for state in states:
        dp._start_snapshot(state, NodeId("n2"), 2)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(asked) == dataplane_module.SNAPSHOT_COPIES_AT_ONCE == 2
    assert all(state.snapshotting for state in states)  # the waiting ones refuse entries meanwhile
    gate.set()
    for _ in range(500):
        if all(state.synced for state in states):
            break
        await asyncio.sleep(0.01)
    assert len(asked) == 5 and all(state.synced and state.last == LogPosition(2, 40) for state in states)
    assert not any(state.snapshotting for state in states)
    assert storage.inventory(ShardId("shard-24"), PlayerId("p3")) == (["i3-a", "i3-b"], 3)


class _Router:
    """Routes GetSnapshot by shard to the stub holding that shard's snapshot."""

    def __init__(self, stubs: dict[str, _SnapshotStub]) -> None:
        self.stubs = stubs

    def GetSnapshot(self, request: shardnode_pb2.GetSnapshotRequest, timeout: float) -> AsyncIterator[
            shardnode_pb2.SnapshotChunk]:
        return self.stubs[request.shard_id].GetSnapshot(request, timeout)


async def test_a_shard_the_ring_does_not_have_is_not_found_not_elsewhere(primary) -> None:  # type: ignore[no-untyped-def]
    """No node will ever serve it: "not the primary; ask the control plane" would send a
    caller (who retries FAILED_PRECONDITION after resolving again) round in circles."""
    dp, _, _ = primary
    unknown = ShardId("shard-99")  # the ring has one shard, shard-0
    for attempt in (
        lambda: dp.writable(unknown, 0),
        lambda: dp.entries_after(shardnode_pb2.GetEntriesRequest(shard_id=unknown, epoch=2)),
        lambda: dp.fence(shardnode_pb2.FenceRequest(shards=[shardnode_pb2.ShardFence(shard_id=unknown, epoch=1)])),
    ):
        with pytest.raises(NotFound, match="shard-99 is not a shard of this cluster"):
            attempt()
    with pytest.raises(NotFound, match="shard-99 is not a shard of this cluster"):
        await anext(dp.snapshot_chunks(shardnode_pb2.GetSnapshotRequest(shard_id=unknown)))
    with pytest.raises(FailedPrecondition, match="not the primary of shard-0"):  # a shard of the ring: elsewhere
        dp._shards.pop(SHARD)
        dp.writable(SHARD, 0)


async def test_a_snapshot_is_read_in_pages_and_holds_only_its_shards_writes_meanwhile(  # type: ignore[no-untyped-def]
    primary, monkeypatch
) -> None:
    """The loop runs between pages (a large shard read in one go held a node past its
    lease); the shard's own writes wait for the end of the read, so the pages make one
    snapshot, and land right after it."""
    dp, _, storage = primary
    for i in range(20):
        await dp.grant(grant(i), 1.0)
    before = storage.meta(SHARD).last
    expected = storage.snapshot(SHARD).SerializeToString()
    paged = storage.snapshot_pages
    monkeypatch.setattr(storage, "snapshot_pages", lambda shard: paged(shard, page_rows=1, page_bytes=1))

    async def served() -> list[shardnode_pb2.SnapshotChunk]:
        return [c async for c in dp.snapshot_chunks(shardnode_pb2.GetSnapshotRequest(shard_id=SHARD, replica="n2"))]

    reading = asyncio.ensure_future(served())
    await asyncio.sleep(0)  # the read has begun: its first page is read
    assert SHARD in dp._writes_held
    late = asyncio.ensure_future(dp.grant(grant(100), 1.0))
    turns = 0
    while not reading.done():
        assert not late.done()  # held until the read ends
        turns += 1
        await asyncio.sleep(0)
    assert turns > 20  # a page per player at least, the loop running between them
    chunks = reading.result()
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    assert b"".join(c.data for c in chunks) == expected
    assert chunks[0].last == shardnode_pb2.LogPosition(epoch=before.epoch, lsn=before.lsn)
    assert chunks[0].total_bytes == len(expected)
    response = await asyncio.wait_for(late, 5)
    assert storage.meta(SHARD).last.lsn == before.lsn + 1 and not response.replayed
    assert not dp._writes_held and not dp._held_writes


async def test_a_snapshot_whose_shard_keeps_changing_is_refused_not_read_in_one_go(  # type: ignore[no-untyped-def]
    primary, monkeypatch
) -> None:
    """Changes that bypass the hold (a replica applying its primary's entries, a fence)
    make the pages read again; after a few tries the request is refused UNAVAILABLE (the
    replica asks again): read in one go, a 200 MB shard held a node past its lease."""
    dp, _, storage = primary
    await dp.grant(grant(1), 1.0)
    paged = storage.snapshot_pages
    reads = []

    def pages_then_change(shard: ShardId) -> object:
        reads.append(shard)
        reader = paged(shard, page_rows=1, page_bytes=1)
        storage.fence(shard, 3 + len(reads))  # changes the shard (its fence row) behind the read's back
        return reader

    monkeypatch.setattr(storage, "snapshot_pages", pages_then_change)
    monkeypatch.setattr(storage, "snapshot", None)  # never read in one go
    with pytest.raises(Unavailable, match="changed while node n1 read its snapshot, 3 times"):
        await anext(dp.snapshot_chunks(shardnode_pb2.GetSnapshotRequest(shard_id=SHARD)))
    assert len(reads) == dataplane_module.SNAPSHOT_PAGED_READS
    assert not dp._writes_held


async def test_a_copy_kept_without_a_role_answers_no_read(primary) -> None:  # type: ignore[no-untyped-def]
    """A copy left from an earlier role (a restart, a replica removed) cannot say how far
    behind it is: it answers no read, stale or not, and names where to ask instead."""
    dp, agent, _ = primary
    await dp.grant(grant(1), 1.0)
    player = PlayerId("p1")
    assert (await dp.get_inventory(player, True, 1.0)).item_ids
    agent.assignments = {}
    dp.on_assignments()
    [status] = dp.statuses(include_disk_only=True)
    assert status.on_disk_only
    for allow_stale in (True, False):
        with pytest.raises(FailedPrecondition, match="holds an old copy of shard-0 but no role in it; read from"):
            await dp.get_inventory(player, allow_stale, 1.0)


async def test_writes_held_by_a_snapshot_read_fail_cleanly_when_the_node_stops(  # type: ignore[no-untyped-def]
    primary, monkeypatch
) -> None:
    dp, _, storage = primary
    for i in range(5):
        await dp.grant(grant(i), 1.0)
    paged = storage.snapshot_pages
    monkeypatch.setattr(storage, "snapshot_pages", lambda shard: paged(shard, page_rows=1, page_bytes=1))
    reading = asyncio.ensure_future(anext(dp.snapshot_chunks(shardnode_pb2.GetSnapshotRequest(shard_id=SHARD))))
    await asyncio.sleep(0)
    late = asyncio.ensure_future(dp.grant(grant(100), 1.0))
    await asyncio.sleep(0)
    assert dp._held_writes and not late.done()
    await dp.stop()
    with pytest.raises(Unavailable, match="shutting down"):
        await late
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert not dp._writes_held
