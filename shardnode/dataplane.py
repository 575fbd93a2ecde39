"""The data plane of a shard node: roles, writes, reads, fencing, snapshots.

The :class:`DataPlane` joins three sources of truth:

* the node's **storage** (:mod:`shardnode.storage`): every shard's data, its log of
  ``(epoch, lsn)`` entries, and its *fenced epoch* (the newest epoch seen), all durable;
* the **assignments** of this incarnation (:class:`shardnode.agent.NodeAgent`): which
  shards this node leads or follows, at which epoch;
* the **session** (the agent's :class:`~shardnode.agent.SessionState` and lease deadline):
  whether the roles can still be trusted.

Rules it enforces (DESIGN.md flows 2, 4, 5; invariants I1, I4):

* A write names the epoch it expects (0: the current one). It is accepted only by the
  primary of the shard at that epoch, only while the shard's fenced epoch is not newer
  (``ShardNode.Fence`` from the control-plane leader, or a replica's STALE_EPOCH answer,
  raise it), and, for STRONG systems, only while the lease cannot have expired
  (self-fencing: from ``lease_valid_until - margin`` without an answered heartbeat the
  node serves no STRONG operation as primary). Refusals say who the primary is when the
  node knows.
* A STRONG write is acknowledged once at least one replica has it durably (when the
  shard has replicas); an EVENTUAL one after the local commit.
* A STRONG read on the primary answers what it read only once everything it read is
  replicated (so it never shows a write a failover could lose). A replica answers only
  reads that allow staleness, and says how far behind it is.
* A node that becomes primary (promotion at a new epoch) fences its storage at the new
  epoch, learns where each of its replicas stands, catches up from one that is ahead of
  it (a snapshot from that replica), and only then accepts writes.
* Entries of an epoch older than the fenced one are refused by replicas
  (:func:`bluemarble.core.replication.replica.check_entries`), so a deposed primary can
  never have a write acknowledged again.

Static stability: with the whole control plane down, the node keeps its roles. Reads
that allow staleness and EVENTUAL writes go on for as long as it runs; STRONG writes and
reads go on while the lease may still be valid (until ``lease_valid_until - margin``),
and stop after that: by then the control plane may have promoted someone else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import heapq
import itertools
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import grpc.aio
import structlog

from bluemarble.api.conversions import log_position_from_proto, log_position_to_proto
from bluemarble.client.ring_router import RingRouter
from bluemarble.core import limits, validation
from bluemarble.core.errors import (
    BlueMarbleError,
    CorruptRecord,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from bluemarble.core.ids import NodeId, PlayerId, ShardId, shard_index
from bluemarble.core.replication import ZERO, LogPosition
from bluemarble.core.replication.primary import commit_lsn, required_acks_for
from bluemarble.core.replication.promotion import catch_up_source
from bluemarble.core.replication.replica import Verdict, check_entries
from bluemarble.runtime import background, channels, retry
from bluemarble.runtime.channels import channel as open_channel
from bluemarble.runtime.clock import Clock, SystemClock, run_with_timeout
from bluemarble.v1 import common_pb2, shardnode_pb2, shardnode_pb2_grpc
from shardnode.agent import NodeAgent, SessionState
from shardnode.replication import ShardView, Shipper, close_channels, must_send_now
from shardnode.storage import NodeStorage, WriteResult, snapshots

log = structlog.get_logger(__name__)

ItemsAnswer = TypeVar("ItemsAnswer", shardnode_pb2.GrantItemsResponse, shardnode_pb2.TakeItemsResponse)

STRONG = common_pb2.CONSISTENCY_MODEL_STRONG
MAX_REQUESTED_BY_CHARS = 128
"""A Fence names the control-plane replica asking (for the logs) in at most this many."""
MAX_FENCE_STEP = 1 << 20
"""How far past the newest epoch a node knows of a shard a Fence may go. A leader fences
one past the shard's epoch (or past an earlier fence it found), so real fences stay
within a handful; a million epochs is years of failovers. A fence beyond it could only be
forged or corrupt, and would leave the shard no epochs to promote at (epochs stop at
2^63-1)."""
PRIMARY = common_pb2.SHARD_ROLE_PRIMARY
REPLICA = common_pb2.SHARD_ROLE_REPLICA

PRUNE_INTERVAL_S = 30
PRUNE_CHUNK_ROWS = 1000
"""Rows one prune transaction removes at most. A round removes what 30 s of writes left
behind, in as many transactions as that takes, with a pause between them: one
transaction of 78,000 rows held the event loop (every write and call of the node) for
240 ms on this kind of machine, one of 1,000 holds it about 3 ms."""
PRUNE_CHUNK_PAUSE_S = 0.005
RECLAIM_AFTER_S = 3600.0
"""How long a copy of a shard stays on a node after its role there ended (and the control
plane stopped counting on it) before the node deletes it. Meanwhile it is a last-resort
copy should every member of the shard be lost, and a rebalance that brings the role back
catches up from it; after that it would only fill the disk: a node that held every shard
once, through rebalances and drains, would keep them all."""
RECLAIM_CHECK_INTERVAL_S = 30.0
RECLAIM_CHUNK_ROWS = 1000
"""Rows one transaction of a reclaim deletes at most (as :data:`PRUNE_CHUNK_ROWS`)."""
FILE_CHECK_INTERVAL_S = 5
"""How often a node checks that its database file is still the one it opened (a file
deleted under it takes every later write with it, silently)."""
DEFAULT_COMMIT_TIMEOUT_S = 5.0
"""How long a STRONG write waits for a replica's ack when the caller set no deadline."""
CATCH_UP_WAIT_S = 1.0
"""After this long without every replica's position, a new primary says so in the log
(then after 4x, 16x ... as long); it does not serve until it has them all."""
SNAPSHOT_CHUNK_BYTES = 1 << 20
MAX_SNAPSHOT_BYTES = 256 << 20
"""Largest snapshot a node sends or installs: the whole of one is held in memory on both
sides. Shards are kept under it by :data:`~bluemarble.core.limits.MAX_SHARD_DATA_BYTES`."""
SNAPSHOT_PARSE_SLICE_BYTES = 1 << 20
"""About how much of a fetched snapshot a replica parses between two turns of its loop."""
SNAPSHOT_PAGED_READS = 3
"""Reads of a snapshot in pages before the request is refused (see ``_read_snapshot``)."""
SNAPSHOT_COPIES_AT_ONCE = 2
"""Snapshots a replica fetches and installs at once; the others wait their turn. A node
that rejoined empty was sent 24 copies of 20-25 MB at once: all of them in memory, and
every turn of its event loop ran a batch of each, so heartbeats' answers waited past
their timeout. A new primary's catch-up does not wait for these."""
SNAPSHOT_TIMEOUT_S = 60.0
EMPTY_READY_SETTLE_S = 3.0
"""A node that holds no shard is ready only this long (at least a heartbeat interval)
after registering: until then the leader may still be placing it."""
SNAPSHOT_QUEUE_WAIT_S = 20.0
"""How long a snapshot request waits for the one being served before it is refused."""
ENTRIES_PER_ANSWER = 512
ENTRIES_BYTES_PER_ANSWER = 4 << 20
"""Bounds of one GetEntries answer (entries, payload bytes); the caller asks again."""
ENTRIES_TIMEOUT_S = 10.0
"""Deadline of one GetEntries call."""
MAX_ENTRIES_PER_SHARD_IN_BATCH = 4096
HOLD_REPLICATION_FAILPOINT = "hold-replication"
TAIL_CACHE_ENTRIES = 4096
TAIL_CACHE_BYTES = 4 << 20
"""Bounds of the in-memory log tail per shard (entries, payload bytes): older entries are
read back from SQLite when a replica needs them."""


_Waiter = tuple[int, int, "asyncio.Future[None]"]
"""A STRONG caller waiting for an lsn to commit: ``(lsn, seq, future)``, in a heap (a
tuple compares in C; ``seq`` keeps futures from ever being compared)."""


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


@dataclass
class ShardState:
    """Everything the data plane tracks about one shard (in memory; storage is the truth
    for ``last`` and ``fenced_epoch``, cached here)."""

    shard_id: ShardId
    last: LogPosition = ZERO
    fenced_epoch: int = 0
    first_retained_lsn: int = 1
    synced: bool = False  # holds a copy of the shard's log (promotable)
    # The role of this incarnation (None: on disk only).
    role: int | None = None
    epoch: int = 0
    primary: str = ""
    replicas: tuple[str, ...] = ()
    # As primary.
    serving: bool = False
    epoch_start_lsn: int = 0  # lsn of this term's epoch-start entry
    commit_lsn: int = 0
    acked: dict[str, int] = field(default_factory=dict)
    waiters: list[_Waiter] = field(default_factory=list)
    activation: asyncio.Task[None] | None = None
    # The newest entries this node wrote as primary, contiguous and ending at ``last``:
    # what the shippers send, without reading them back from SQLite.
    tail: collections.deque[shardnode_pb2.LogEntry] = field(
        default_factory=lambda: collections.deque(maxlen=TAIL_CACHE_ENTRIES)
    )
    tail_bytes: int = 0
    # As replica.
    primary_last_lsn: int = 0
    applied_written_at_ms: int = 0
    snapshotting: bool = False
    snapshot_retry_at_s: float = 0.0  # after a failed snapshot: none before this
    snapshot_failures: int = 0
    last_heard_s: float = 0.0
    # As primary: bytes of player data (None: not counted yet in this term).
    data_bytes: int | None = None


def _position(message: shardnode_pb2.LogPosition, what: str) -> LogPosition:
    position = log_position_from_proto(message)
    if position is None:
        raise InvalidArgument(f"{what} ({message.epoch}, {message.lsn}) is not a log position")
    return position


def _check_counters(group: shardnode_pb2.ShardEntries, where: str) -> None:
    """Refuses (InvalidArgument naming the field) a group whose epochs or lsns exceed what
    storage holds (:func:`bluemarble.core.validation.log_counter`), before any is used."""
    validation.log_counter(group.epoch, f"{where}.epoch")
    validation.log_counter(group.primary_last_lsn, f"{where}.primary_last_lsn")
    validation.log_counter(group.prev.epoch, f"{where}.prev.epoch")
    validation.log_counter(group.prev.lsn, f"{where}.prev.lsn")
    for j, entry in enumerate(group.entries):
        if entry.epoch > limits.MAX_LOG_COUNTER or entry.lsn > limits.MAX_LOG_COUNTER:
            validation.log_counter(entry.epoch, f"{where}.entries[{j}].epoch")
            validation.log_counter(entry.lsn, f"{where}.entries[{j}].lsn")


_PendingWrite = tuple[ShardState, int, shardnode_pb2.WriteOp, "asyncio.Future[WriteResult]"]
"""A write waiting for its commit: the shard's state, the epoch it was made at, the op,
and the caller's future."""


class DataPlane:
    """See the module docstring. Single-threaded: everything runs on the event loop."""

    def __init__(
        self,
        node_id: str,
        storage: NodeStorage,
        agent: NodeAgent,
        ring: RingRouter,
        *,
        clock: Clock | None = None,
        reclaim_after_s: float = RECLAIM_AFTER_S,
    ):
        self.node_id = node_id
        self._storage = storage
        self._reclaim_after_s = reclaim_after_s  # 0: copies without a role are kept
        # Since when (monotonic) each copy without a role has been reclaimable, seen so at
        # every check since; a check that finds it otherwise starts it over.
        self._roleless_since: dict[ShardId, float] = {}
        self._agent = agent
        self._ring = ring
        self._clock: Clock = clock or SystemClock()
        self._shards: dict[ShardId, ShardState] = {}
        self._shippers: dict[NodeId, Shipper] = {}
        self._restarting_until_s: dict[NodeId, float] = {}  # peers that said they restart: until when
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._seq = itertools.count()
        self._pending_writes: list[_PendingWrite] = []
        self._writes_held: set[ShardId] = set()  # shards whose snapshot is being read in pages
        self._held_writes: list[_PendingWrite] = []  # their writes meanwhile, in order
        self._snapshot_slot = asyncio.Semaphore(1)
        self._copy_slots = asyncio.Semaphore(SNAPSHOT_COPIES_AT_ONCE)
        self._snapshot_failures = retry.FailureLog()  # one warning per shard, then summaries
        self._flush_scheduled = False
        # Grouping commits pays when a commit costs an fsync (synchronous=FULL); with
        # NORMAL a commit is a WAL append, and a write commits at once, in its own turn.
        self._group_commit = storage.synchronous == "FULL"
        self._failpoint = str(storage.path.parent / HOLD_REPLICATION_FAILPOINT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._prune_task: asyncio.Task[None] | None = None
        self._reclaim_task: asyncio.Task[None] | None = None
        for shard, meta in storage.shards().items():
            self._shards[shard] = ShardState(
                shard,
                last=meta.last,
                fenced_epoch=meta.fenced_epoch,
                first_retained_lsn=meta.first_retained_lsn,
                synced=meta.synced,
            )
        if self._shards:
            log.info(
                "recovered shards from disk",
                shards=len(self._shards),
                entries=sum(s.last.lsn for s in self._shards.values()),
            )
        agent.on_assignments = self.on_assignments
        agent.status_provider = self.statuses
        agent.trouble_provider = storage.trouble
        # Called when this node starts serving a shard as primary (the participant then
        # settles the escrows it inherited that are past their deadline).
        self.on_serving: Callable[[ShardId], None] | None = None
        # Players of escrows a new primary inherited, while it looks their trades up: a
        # decided trade's outcome is applied before their items are read or traded.
        self._settling: dict[tuple[ShardId, PlayerId], set[str]] = {}

    # ---- lifecycle ----

    async def start(self) -> None:
        self._prune_task = background.start(self._prune_loop(), "storage-prune")
        if self._reclaim_after_s > 0 or self._storage.reclaiming():
            self._reclaim_task = background.start(self._reclaim_loop(), "storage-reclaim")

    async def stop(self) -> None:
        for shipper in list(self._shippers.values()):
            await shipper.stop()
        self._shippers.clear()
        for task in list(self._tasks):
            await background.stop(task)
        await background.stop(self._prune_task)
        await background.stop(self._reclaim_task)
        for state in self._shards.values():
            self._fail_waiters(state, Unavailable("the node is shutting down"))
        held, self._held_writes = self._held_writes, []
        for _state, _epoch, _op, future in held:  # a snapshot read cut short by the stop
            if not future.done():
                future.set_exception(Unavailable("the node is shutting down"))
        await close_channels(self._channels)

    async def _prune_loop(self) -> None:
        """Trims the logs and expired request ids every 30 s. A round that fails (a full
        disk, a busy database) is logged and the next round tries again: one bad round
        must not stop the pruning for the life of the process. Every 5 s between, checks
        that node.db is still the file it opened (NodeStorage.check_files)."""
        failures = retry.FailureLog()
        while True:
            for _ in range(PRUNE_INTERVAL_S // FILE_CHECK_INTERVAL_S):
                await self._clock.sleep(FILE_CHECK_INTERVAL_S)
                self._storage.check_files()
            try:
                await self._prune_once()
            except BlueMarbleError as e:
                failures.failed("prune", self._clock.monotonic_s(), "storage prune failed; trying again in 30 s",
                                error=str(e))
            except sqlite3.Error as e:
                failures.failed("prune", self._clock.monotonic_s(), "storage prune failed; trying again in 30 s",
                                error=f"{type(e).__name__}: {e}")
            else:
                failures.recovered("prune", self._clock.monotonic_s(), "storage prune works again")

    async def _prune_once(self) -> int:
        """One prune round: the logs past their retention, expired request ids, then
        settled trade records past theirs, :data:`PRUNE_CHUNK_ROWS` rows a transaction
        until none is left. Returns the rows removed."""
        removed = 0
        for prune, trims_logs in ((self._storage.prune, True), (self._storage.prune_trades, False)):
            while True:
                chunk = prune(self._clock.wall_ms(), max_rows=PRUNE_CHUNK_ROWS)
                removed += chunk
                if trims_logs and chunk:
                    for shard, meta in self._storage.shards().items():
                        if shard in self._shards:
                            self._shards[shard].first_retained_lsn = meta.first_retained_lsn
                if chunk < PRUNE_CHUNK_ROWS:
                    break
                await self._clock.sleep(PRUNE_CHUNK_PAUSE_S)  # the node's writes and calls go on
        if removed:
            log.debug("pruned storage", rows=removed)
        return removed

    async def _reclaim_loop(self) -> None:
        """Deletes the copies of shards this node holds without a role, once each has
        been so for :data:`RECLAIM_AFTER_S` (checked every 30 s, or a quarter of that
        time when shorter), and finishes a reclaim a restart interrupted. A round that
        fails is logged; the next one tries again."""
        failures = retry.FailureLog()
        interval_s = RECLAIM_CHECK_INTERVAL_S
        if self._reclaim_after_s > 0:
            interval_s = max(0.5, min(interval_s, self._reclaim_after_s / 4))
        while True:
            try:
                await self._reclaim_once()
            except (BlueMarbleError, sqlite3.Error) as e:
                failures.failed("reclaim", self._clock.monotonic_s(), "reclaiming a copy failed; trying again later",
                                error=str(e))
            else:
                failures.recovered("reclaim", self._clock.monotonic_s(), "reclaiming copies works again")
            await self._clock.sleep(interval_s)

    def _reclaimable(self, state: ShardState) -> bool:
        """Whether this node's copy of the shard is one nobody counts on: it holds data, this
        incarnation has its assignments and holds no role in the shard, and the control
        plane does not keep the copy (``retained``: it may hold acknowledged writes the
        members lack). Judged only while the node is in touch with the control plane: with
        the assignments out of date, a role given meanwhile would not show."""
        agent = self._agent
        return (
            state.role is None
            and (state.synced or state.last.lsn > 0)
            and not state.snapshotting
            and state.shard_id not in self._storage.reclaiming()
            and agent.assignments_synced.is_set()
            and agent.session_state is SessionState.CONNECTED
            and state.shard_id not in agent.retained_in
        )

    async def _reclaim_once(self) -> list[ShardId]:
        """One check: notes the copies without a role, reclaims those that have been so for
        the whole :data:`RECLAIM_AFTER_S`, one at a time, and finishes the reclaims a
        restart interrupted. Returns the shards reclaimed."""
        now_s = self._clock.monotonic_s()
        due: list[ShardId] = []
        if self._reclaim_after_s > 0:
            for shard, state in self._shards.items():
                if not self._reclaimable(state):
                    self._roleless_since.pop(shard, None)
                elif now_s - self._roleless_since.setdefault(shard, now_s) >= self._reclaim_after_s:
                    due.append(shard)
            for shard in list(self._roleless_since):
                if shard not in self._shards:
                    del self._roleless_since[shard]
        reclaimed = []
        for shard in sorted(self._storage.reclaiming()) + due:
            if await self._reclaim(shard):
                reclaimed.append(shard)
        return reclaimed

    async def _reclaim(self, shard: ShardId) -> bool:
        """Deletes this node's copy of ``shard`` (NodeStorage.reclaim_step), a transaction at
        a time with the node's work going on between them. Stops, keeping the copy, if the
        shard gets a role (or the control plane keeps it) before its position is gone;
        past that, what is left goes whatever comes (storage deletes it before any write)."""
        state = self._state(shard)
        before = state.last
        transactions = 0
        positionless = False  # past the step that took the copy's position
        started_s = self._clock.monotonic_s()
        while True:
            if shard in self._storage.reclaiming():
                positionless = True
            elif positionless:
                break  # a write, replicated entries or a snapshot deleted the rest first
            elif not self._reclaimable(state):
                self._roleless_since.pop(shard, None)
                log.info("kept the copy of a shard that got a role again while it was being reclaimed", shard=shard)
                return False
            done = self._storage.reclaim_step(shard, RECLAIM_CHUNK_ROWS)
            transactions += 1
            if state.role is None:
                meta = self._storage.meta(shard)
                state.last, state.first_retained_lsn, state.synced = meta.last, meta.first_retained_lsn, meta.synced
            if done:
                break
            await self._clock.sleep(PRUNE_CHUNK_PAUSE_S)  # the node's writes and calls go on
        self._roleless_since.pop(shard, None)
        log.info("reclaimed the copy of a shard this node holds no role in", shard=shard,
                 position=str(before) if before.lsn else None, transactions=transactions,
                 took_s=round(self._clock.monotonic_s() - started_s, 3))
        return True

    def _spawn(self, coro: object, name: str) -> None:
        task = background.start(coro, name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- roles ----

    def _state(self, shard: ShardId) -> ShardState:
        state = self._shards.get(shard)
        if state is None:
            state = self._shards[shard] = ShardState(shard)
        return state

    def on_assignments(self) -> None:
        """Re-reads the agent's assignments (called after every update and after the
        roles of an incarnation were dropped)."""
        assigned = self._agent.assignments
        for shard_id, a in assigned.items():
            shard = ShardId(shard_id)
            state = self._state(shard)
            role = PRIMARY if a.primary == self.node_id else REPLICA
            if (state.role, state.epoch, state.primary, state.replicas) == (
                role,
                a.epoch,
                a.primary,
                tuple(a.replicas),
            ):
                continue
            new_term = state.role != role or state.epoch != a.epoch
            if state.role == PRIMARY and new_term:
                self._step_down(state, f"now {'replica' if role == REPLICA else 'primary'} at epoch {a.epoch}")
            state.role, state.epoch, state.primary, state.replicas = role, a.epoch, a.primary, tuple(a.replicas)
            for gone in set(state.acked) - set(state.replicas):
                del state.acked[gone]
            if a.epoch > state.fenced_epoch:
                # An assignment at epoch e means a primary at e exists: refuse older entries.
                state.fenced_epoch = self._storage.fence(shard, a.epoch).fenced_epoch
            if role == PRIMARY and new_term:
                self._activate(state)
            elif role == PRIMARY:
                self._recompute_commit(state)
        for shard, state in self._shards.items():
            if state.role is not None and shard not in assigned:
                if state.role == PRIMARY:
                    self._step_down(state, "no longer assigned")
                state.role, state.epoch, state.primary, state.replicas = None, 0, "", ()
                state.acked.clear()
        self._reconcile_shippers()

    def _step_down(self, state: ShardState, why: str) -> None:
        if state.serving:
            log.info("stopped serving as primary", shard=state.shard_id, epoch=state.epoch, why=why)
        state.serving = False
        if state.activation is not None:
            state.activation.cancel()
            state.activation = None
        self._fail_waiters(
            state, FailedPrecondition(f"node {self.node_id} stopped being the primary of {state.shard_id} ({why})")
        )

    def _activate(self, state: ShardState) -> None:
        """Starts a new term as primary: catch up, then serve (module docstring)."""
        state.serving = False
        state.data_bytes = None  # counted again from storage at the term's first write
        state.commit_lsn = 0 if state.replicas else state.last.lsn
        state.acked.clear()
        state.tail.clear()
        state.tail_bytes = 0
        if state.activation is not None:
            state.activation.cancel()
        # Positions count only if answered in this term (a probe at this epoch fences).
        for shipper in self._shippers.values():
            shipper.forget([state.shard_id])
        task = background.start(self._catch_up_then_serve(state, state.epoch), f"activate-{state.shard_id}")
        state.activation = task

    async def _catch_up_then_serve(self, state: ShardState, epoch: int) -> None:
        # Serve only once every replica of the assignment has answered a probe of this
        # epoch. Each answer fences that replica at the new epoch (it refuses the old
        # primary's entries from then on), so once all have answered no write of the old
        # epoch can still be acknowledged through them, and their positions are final:
        # whatever was acknowledged is on one of them (or on this node). Serving after a
        # timeout instead lost acknowledged writes: a planned handoff to a replica that
        # was still catching up served from its shorter log and made the others copy it.
        # A replica that never answers holds the shard until the control plane replaces
        # it in the assignment (the same trade as the leader's fence-then-promote).
        waited_s = 0.0
        next_note_s = CATCH_UP_WAIT_S
        while True:
            reported = self._reported_positions(state.shard_id)
            missing = [r for r in state.replicas if r != self.node_id and r not in reported]
            if not missing or state.role != PRIMARY or state.epoch != epoch:
                break
            if waited_s >= next_note_s:
                log.warning("new primary waits for its replicas' positions before serving", shard=state.shard_id,
                            epoch=epoch, missing=sorted(missing), waited_s=round(waited_s, 1))
                next_note_s *= 4
            await self._clock.sleep(0.02)
            waited_s += 0.02
        if state.role != PRIMARY or state.epoch != epoch:
            return
        if not await self._catch_up(state, epoch):
            return
        if state.role != PRIMARY or state.epoch != epoch or state.fenced_epoch > epoch:
            return
        if not state.synced:
            state.synced = True
            self._storage.mark_synced(state.shard_id)
        # The epoch-start entry: what this node inherited from older epochs counts as
        # committed only once an entry of its own epoch is (Raft's rule; without it the
        # simulation finds a history where an inherited entry counted as committed is
        # overwritten by a later promotion).
        try:
            start = await self._write(state, shardnode_pb2.WriteOp(epoch_start=shardnode_pb2.EpochStartOp()))
        except BlueMarbleError as e:
            log.warning("cannot start the epoch; not serving", shard=state.shard_id, epoch=epoch, error=str(e))
            return
        if state.role != PRIMARY or state.epoch != epoch:
            return
        state.epoch_start_lsn = start.lsn
        state.serving = True
        state.activation = None
        for shipper in self._shippers.values():
            shipper.forget([state.shard_id])
        self._recompute_commit(state)
        log.info("serving as primary", shard=state.shard_id, epoch=epoch, last=str(state.last))
        if self.on_serving is not None:
            self.on_serving(state.shard_id)

    async def _catch_up(self, state: ShardState, epoch: int) -> bool:
        """Copies the shard from a replica that is ahead of this new primary, if one is,
        until it succeeds; False when the term ended meanwhile.

        Entries that replica holds past this node's log may have been acknowledged (a
        STRONG write needs one replica), so serving without them could lose them. A failed
        copy (the replica busy, a network error) is tried again, with backoff, for as long
        as that replica is in the assignment; the shard is not served meanwhile. It used
        to serve from its shorter log after one failure, and dropped acknowledged writes.

        The copy is the entries this node lacks when that replica's log continues this
        one (a planned handoff leaves the new primary a few entries short of the old one),
        else a snapshot of the whole shard."""
        delay_s = 0.05
        failures = 0
        while state.role == PRIMARY and state.epoch == epoch and state.fenced_epoch <= epoch:
            members = set(state.replicas)
            reported = {n: p for n, p in self._reported_positions(state.shard_id).items() if n in members}
            source = catch_up_source(state.last, reported)
            if source is None:
                return True
            if failures == 0:
                log.info("a replica is ahead of the new primary; catching up from it first", shard=state.shard_id,
                         source=source, own=str(state.last), theirs=str(reported[source]))
            try:
                if not await self._copy_entries(state, source, epoch):
                    await self._install_snapshot(state, source, epoch)
                return True
            except BlueMarbleError as e:
                failures += 1
                (log.warning if failures in (1, 10) or failures % 100 == 0 else log.debug)(
                    "catching up from a replica failed; trying again before serving", shard=state.shard_id,
                    source=source, error=str(e), failures=failures)
            await self._clock.sleep(delay_s)
            delay_s = min(delay_s * 2, 1.0)
        return False

    async def _copy_entries(self, state: ShardState, source: NodeId, epoch: int) -> bool:
        """Appends the entries ``source`` holds past this node's log (GetEntries) until
        this log ends where the source's does. False when the source cannot continue this
        log (it differs, no longer retains the entries, or the source does not serve
        GetEntries): a snapshot is needed. Raises Unavailable when the source did not
        answer, FailedPrecondition when this term ended meanwhile."""
        stub = self._peer_stub(source)
        started_s = self._clock.monotonic_s()
        copied = 0
        while True:
            request = shardnode_pb2.GetEntriesRequest(
                shard_id=state.shard_id, epoch=epoch, after=log_position_to_proto(state.last), node_id=self.node_id
            )
            try:
                response = await stub.GetEntries(request, timeout=ENTRIES_TIMEOUT_S)
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                    log.info("the replica ahead cannot give the entries this new primary lacks; copying a snapshot",
                             shard=state.shard_id, source=source, reason=limits.echo(e.details() or "", 200))
                    return False
                details = limits.echo(e.details() or "", 200)
                raise Unavailable(f"entries of {state.shard_id} from {source} failed: {e.code().name} {details}") from e
            if state.role != PRIMARY or state.epoch != epoch or state.fenced_epoch > epoch:
                raise FailedPrecondition(f"the term of {state.shard_id} at epoch {epoch} ended during its catch-up")
            entries = list(response.entries)
            if not entries:
                break
            if len(entries) > ENTRIES_PER_ANSWER or any(e.epoch >= epoch for e in entries):
                raise Unavailable(f"{source} answered entries of {state.shard_id} that no replica of epoch {epoch} "
                                  "holds; not applied")
            try:  # storage checks that they continue this log, and decode
                state.last = self._storage.append([(state.shard_id, entries)], {})[state.shard_id]
            except (FailedPrecondition, CorruptRecord) as e:
                log.warning("entries from the replica ahead were refused; copying a snapshot", shard=state.shard_id,
                            source=source, error=str(e))
                return False
            copied += len(entries)
            if state.last >= (log_position_from_proto(response.last) or ZERO):
                break
        log.info("caught up from a replica's log", shard=state.shard_id, source=source, entries=copied,
                 last=str(state.last), took_s=round(self._clock.monotonic_s() - started_s, 3))
        return True

    def _peer_stub(self, node: NodeId) -> shardnode_pb2_grpc.ShardNodeStub:
        """A stub for another node of the cluster; Unavailable when its address is unknown."""
        address = self._agent.addresses.get(node)
        if address is None:
            raise Unavailable(f"no address known for {node}")
        return shardnode_pb2_grpc.ShardNodeStub(self.channel(address))  # type: ignore[no-untyped-call]

    def _reported_positions(self, shard: ShardId) -> dict[NodeId, LogPosition]:
        out: dict[NodeId, LogPosition] = {}
        for node, shipper in self._shippers.items():
            peer = shipper.peers.get(shard)
            if peer is not None and peer.reported is not None:
                out[node] = peer.reported
        return out

    def _reconcile_shippers(self) -> None:
        wanted = {
            NodeId(r) for s in self._shards.values() if s.role == PRIMARY for r in s.replicas if r != self.node_id
        }
        now_s = self._clock.monotonic_s()
        self._restarting_until_s = {n: t for n, t in self._restarting_until_s.items() if t > now_s}
        for node in list(self._shippers):
            if node not in wanted:
                shipper = self._shippers.pop(node)
                if shipper.quiet_until_s > now_s:
                    # It said it is restarting: a stream opened to it again soon (it is
                    # placed back) expects failures until then too.
                    self._restarting_until_s[node] = shipper.quiet_until_s
                self._spawn(shipper.stop(), f"stop-shipper-{node}")
        for node in wanted:
            if node not in self._shippers:
                shipper = Shipper(node, self, self._clock)
                shipper.quiet_until_s = self._restarting_until_s.pop(node, 0.0)
                self._shippers[node] = shipper
                shipper.start()
            self._shippers[node].wake.set()

    # ---- PrimaryLink (for the shippers) ----

    def shipped_shards(self, replica: NodeId) -> list[ShardView]:
        return [
            ShardView(s.shard_id, s.epoch, s.last, s.first_retained_lsn, s.serving)
            for s in self._shards.values()
            if s.role == PRIMARY and replica in s.replicas and s.fenced_epoch <= s.epoch
        ]

    def entries(self, shard: ShardId, from_lsn: int, max_entries: int, max_bytes: int) -> list[shardnode_pb2.LogEntry]:
        state = self._shards.get(shard)
        tail = state.tail if state is not None else None
        if tail and tail[0].lsn <= from_lsn <= tail[-1].lsn and tail[-1].lsn == state.last.lsn:  # type: ignore[union-attr]
            out: list[shardnode_pb2.LogEntry] = []
            size = 0
            # From the right: a replica keeping up asks for the last few of up to
            # TAIL_CACHE_ENTRIES, and a deque walks from an end.
            wanted = list(itertools.islice(reversed(tail), tail[-1].lsn - from_lsn + 1))
            wanted.reverse()
            for entry in wanted:
                if out and (len(out) >= max_entries or size + len(entry.payload) > max_bytes):
                    break
                out.append(entry)
                size += len(entry.payload)
            return out
        return self._storage.entries(shard, from_lsn, max_entries=max_entries, max_bytes=max_bytes)

    def epoch_at(self, shard: ShardId, lsn: int) -> int | None:
        if lsn == 0:
            return 0
        state = self._shards.get(shard)
        if state is not None and lsn == state.last.lsn:
            return state.last.epoch
        tail = state.tail if state is not None else None
        if tail and tail[0].lsn <= lsn <= tail[-1].lsn:
            return tail[lsn - tail[0].lsn].epoch
        return self._storage.epoch_at(shard, lsn)

    def on_ack(self, shard: ShardId, replica: NodeId, epoch: int, ack: shardnode_pb2.ShardAck) -> None:
        state = self._shards.get(shard)
        if state is None or state.role != PRIMARY or state.epoch != epoch or replica not in state.replicas:
            # Not (or no longer) a replica of the shard: an ack in flight when the
            # assignment dropped it must not count again should the node be re-added.
            return
        state.acked[replica] = ack.last.lsn
        self._recompute_commit(state)

    def on_stale(self, shard: ShardId, epoch: int, newer_epoch: int, replica: NodeId) -> None:
        state = self._shards.get(shard)
        if state is None or newer_epoch <= state.fenced_epoch:
            return
        # Draining (DrainNode, or stopping): the control plane is handing this node's
        # primaries over, and a replica often hears of it first. Expected, not a warning.
        (log.info if self._agent.draining else log.warning)(
            "a replica has seen a newer epoch; this node no longer writes for the shard",
            shard=shard,
            epoch=epoch,
            newer_epoch=newer_epoch,
            replica=replica,
        )
        state.fenced_epoch = self._storage.fence(shard, newer_epoch).fenced_epoch
        self._step_down(state, f"replica {replica} has seen epoch {newer_epoch}")

    def address_of(self, node: NodeId) -> str | None:
        return self._agent.addresses.get(node)

    def is_member(self, node: str) -> bool:
        """Whether ``node`` is the primary or a replica of a shard this node serves, as
        its current assignments say (who may replicate with it under mutual TLS)."""
        return any(s.primary == node or node in s.replicas for s in self._shards.values())

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is not None and channels.outdated(channel):
            # Built before the TLS files rotated: it would present the old certificate
            # when it reconnects. Dropped (see channels.outdated): a replication stream
            # on it goes on, and its shipper reopens it here, on a new channel.
            channel = None
        if channel is None:
            channel = self._channels[address] = open_channel(address)
        return channel

    def urgent(self, replica: NodeId) -> bool:
        """Whether ``replica``'s stream must send at once: a STRONG caller waits for an
        entry that too few of the shard's other replicas' streams carry (Shipper.covers).

        A STRONG write needs one replica's ack (``required_acks_for``). With two replicas
        the stream of the first one in the assignment's order carries the callers: an
        entry it sent, or will send as soon as its exchange in progress ends, is covered.
        The other stream lingers and sends larger batches; it takes over for any entry the
        first has not carried within EVENTUAL_LINGER_S, so a slow or lost first replica
        costs the callers that much at worst. Which replica acks first never matters for
        safety: a write is acknowledged only after ``required_acks_for`` replicas hold it."""
        now_s = self._clock.monotonic_s()
        for state in self._shards.values():
            if not state.waiters or replica not in state.replicas:
                continue
            carries = functools.partial(self._carries, state.shard_id, max(w[0] for w in state.waiters), now_s)
            if must_send_now(replica, [NodeId(r) for r in state.replicas if r != self.node_id], carries):
                return True
        return False

    def _carries(self, shard: ShardId, lsn: int, now_s: float, node: NodeId, next_batch: bool) -> bool:
        shipper = self._shippers.get(node)
        return shipper is not None and shipper.covers(shard, lsn, now_s, next_batch=next_batch)

    def incarnation(self) -> int:
        registration = self._agent.registration
        return registration.lease_id if registration is not None else 0

    # ---- commit tracking ----

    def _recompute_commit(self, state: ShardState) -> None:
        if state.role != PRIMARY or not state.serving:
            return
        replicas = [r for r in state.replicas if r != self.node_id]
        committed = commit_lsn(
            own_last_lsn=state.last.lsn,
            acked_lsns=[state.acked.get(r, 0) for r in replicas],
            required_acks=required_acks_for(len(replicas)),
            epoch_start_lsn=state.epoch_start_lsn,
        )
        if committed > state.commit_lsn:
            state.commit_lsn = committed
        waiters = state.waiters
        while waiters and waiters[0][0] <= state.commit_lsn:
            future = heapq.heappop(waiters)[2]
            if not future.done():
                future.set_result(None)

    def _fail_waiters(self, state: ShardState, error: BlueMarbleError) -> None:
        while state.waiters:
            future = heapq.heappop(state.waiters)[2]
            if not future.done():
                future.set_exception(error)

    async def _wait_committed(self, state: ShardState, lsn: int, timeout_s: float, what: str) -> None:
        """Waits until ``lsn`` is replicated as far as the shard's consistency needs.
        Raises Unavailable after ``timeout_s`` (the write stays committed on this node and
        a retry with the same request id waits for the same entry), or FailedPrecondition
        if this node stops being the primary meanwhile."""
        if state.commit_lsn >= lsn:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        heapq.heappush(state.waiters, (lsn, next(self._seq), future))
        for shipper in self._shippers.values():
            shipper.urgent_wake.set()
        try:
            if type(self._clock) is SystemClock:
                # One timer handle on the loop (whose time is the same monotonic clock):
                # no coroutine, shield or asyncio.timeout per STRONG write.
                timer = loop.call_later(timeout_s, _expire, future)
                try:
                    await future
                finally:
                    timer.cancel()
            else:

                async def committed() -> None:
                    await asyncio.shield(future)

                await run_with_timeout(self._clock, committed(), timeout_s)
        except TimeoutError as e:
            future.cancel()
            raise Unavailable(
                f"{what} is committed on {self.node_id} but no replica of {state.shard_id} has acknowledged it "
                f"before the call's deadline ({timeout_s * 1000:.0f} ms after the local write); retry with the "
                "same request id"
            ) from e

    # ---- checks ----

    def shard_for(self, player: PlayerId) -> ShardId:
        try:
            return self._ring.shard_for(player)
        except FailedPrecondition as e:
            raise Unavailable(f"node {self.node_id} has no ring yet; retry shortly") from e

    def _primary_hint(self, state: ShardState | None, shard: ShardId) -> str:
        if state is None or not state.primary or state.primary == self.node_id:
            return "; ask the control plane (ResolvePlayer) where it is"
        address = self._agent.addresses.get(state.primary, "")
        return f"; the primary is {state.primary}{f' ({address})' if address else ''} at epoch {state.epoch}"

    def _lease_check(self, shard: ShardId) -> None:
        if self._agent.session_state is SessionState.LOST:
            raise Unavailable(
                f"node {self.node_id} cannot be sure it still leads {shard}: its lease may have expired "
                "(no heartbeat answered in time), so it serves no STRONG operation as primary; retry shortly"
            )

    def hold_while_settling(self, shard: ShardId, player: PlayerId, trade_id: str) -> None:
        """Refuses ``player``'s reads and writes on ``shard`` (Unavailable, retryable) until
        :meth:`release_settled`: its escrow of ``trade_id``, inherited from the previous
        primary, may belong to a trade already decided. A caller told COMMITTED must not
        then see the items where they were, nor have a trade of them refused for good."""
        self._settling.setdefault((shard, player), set()).add(trade_id)

    def release_settled(self, shard: ShardId, player: PlayerId, trade_id: str) -> None:
        held = self._settling.get((shard, player))
        if held is not None:
            held.discard(trade_id)
            if not held:
                del self._settling[(shard, player)]

    def check_not_settling(self, shard: ShardId, player: str) -> None:
        held = self._settling.get((shard, PlayerId(player))) if self._settling else None
        if held:
            trade = min(held)
            raise Unavailable(
                f"player {limits.echo(player)} is in trade {limits.echo(trade, 40)}, which {shard}'s new primary "
                "inherited and is settling now; retry shortly"
            )

    def _writable(self, shard: ShardId, epoch: int, *, strong: bool) -> ShardState:
        """The shard's state if this node may write to it at ``epoch`` (0: the current one)."""
        validation.log_counter(epoch, "epoch")
        state = self._shards.get(shard)
        if state is None:
            self._check_in_ring(shard)
        if state is None or state.role != PRIMARY:
            raise FailedPrecondition(
                f"node {self.node_id} is not the primary of {shard}{self._primary_hint(state, shard)}"
            )
        if epoch and epoch != state.epoch:
            raise FailedPrecondition(
                f"epoch {epoch} is not the current epoch of {shard} (the primary {self.node_id} is at epoch "
                f"{state.epoch}); re-resolve the player and retry"
            )
        if state.fenced_epoch > state.epoch:
            raise FailedPrecondition(
                f"node {self.node_id} was fenced at epoch {state.fenced_epoch} for {shard}: a new primary is being "
                "promoted; re-resolve the player and retry"
            )
        if not state.serving:
            raise Unavailable(f"node {self.node_id} is becoming the primary of {shard} (catching up); retry shortly")
        if strong:
            self._lease_check(shard)
        return state

    def _consistency(self, system: str) -> int:
        config = self._agent.config
        if config is None:
            raise Unavailable(f"node {self.node_id} has not loaded the cluster config yet; retry shortly")
        validation.game_system(system, config.consistency.keys())
        return config.consistency[system]

    def _staleness(self, state: ShardState, stale: bool) -> shardnode_pb2.Staleness:
        lag_entries, lag_ms = self._lag(state) if stale else (0, 0)
        return shardnode_pb2.Staleness(
            stale=stale, lag_entries=lag_entries, lag_ms=lag_ms, served_by=self.node_id, applied_lsn=state.last.lsn
        )

    def _lag(self, state: ShardState) -> tuple[int, int]:
        """Entries known to be missing, and how old the newest applied entry is (ms) when
        any is missing (0 when caught up). A replica that has not heard from its primary
        for 3 s reports at least that silence as its lag in ms: it cannot know what it lacks."""
        if state.role == PRIMARY:
            behind = [state.last.lsn - state.acked.get(r, 0) for r in state.replicas if r != self.node_id]
            worst = max(behind, default=0)
            if worst <= 0:
                return 0, 0
            oldest_lsn = state.last.lsn - worst + 1
            written = self._storage.written_at_ms(state.shard_id, oldest_lsn)
            return worst, max(0, self._clock.wall_ms() - written) if written else 0
        missing = max(0, state.primary_last_lsn - state.last.lsn)
        age_ms = self._clock.wall_ms() - state.applied_written_at_ms if state.applied_written_at_ms else 0
        if state.role != PRIMARY and not self._following(state):
            # Not hearing from its primary: what it lacks is unknown, but its answer may be
            # as old as the silence (never heard in this term: as old as its newest entry).
            silence_ms = int(1000 * (self._clock.monotonic_s() - state.last_heard_s)) if state.last_heard_s else age_ms
            return missing, max(0, silence_ms, age_ms if missing else 0)
        if missing == 0:
            return 0, 0
        return missing, max(0, age_ms)

    def _readable(self, shard: ShardId, allow_stale: bool) -> tuple[ShardState, bool]:
        """The shard's state and whether the answer is stale; raises when this node may not answer."""
        state = self._shards.get(shard)
        strong_ok = (
            state is not None
            and state.role == PRIMARY
            and state.serving
            and state.fenced_epoch <= state.epoch
            and self._agent.session_state is not SessionState.LOST
        )
        if strong_ok:
            assert state is not None
            return state, False
        if allow_stale and state is not None and state.role is not None and (state.synced or state.last.lsn > 0):
            return state, True
        if state is not None and state.role == PRIMARY:
            if allow_stale:
                raise Unavailable(f"node {self.node_id} holds no data for {shard} yet; retry shortly")
            self._writable(shard, 0, strong=True)  # raises the precise reason
        if state is None:
            self._check_in_ring(shard)
        hint = self._primary_hint(state, shard)
        if state is not None and state.role == REPLICA:
            raise FailedPrecondition(
                f"node {self.node_id} is a replica of {shard}; read from the primary, or allow stale reads{hint}"
            )
        if state is not None and (state.synced or state.last.lsn > 0):
            # A copy kept from an earlier role (a restart, a replica removed): how far behind
            # it is cannot be known, so it answers nothing, stale or not.
            raise FailedPrecondition(
                f"node {self.node_id} holds an old copy of {shard} but no role in it; read from the shard's "
                "primary or replicas: ask the control plane (ResolvePlayer) where they are"
            )
        raise FailedPrecondition(f"node {self.node_id} holds no copy of {shard}{hint}")

    # ---- operations ----

    async def get_inventory(
        self, player: PlayerId, allow_stale: bool, timeout_s: float
    ) -> shardnode_pb2.GetInventoryResponse:
        shard = self.shard_for(player)
        state, stale = self._readable(shard, allow_stale)
        if not stale:
            self.check_not_settling(shard, player)
        read_at_lsn = state.last.lsn
        found = self._storage.inventory(shard, player)
        holdings = self._storage.holdings(shard, player) if found is not None else None
        if not stale:
            await self._wait_committed(state, read_at_lsn, timeout_s, "a write this read would show")
        if found is None or holdings is None:
            raise NotFound(f"player {limits.echo(player)} has no inventory on {shard}")
        items, gold = found
        return shardnode_pb2.GetInventoryResponse(
            player_id=player,
            item_ids=items,
            gold=gold,
            shard_id=shard,
            epoch=state.epoch,
            staleness=self._staleness(state, stale),
            escrowed_item_ids=sorted(holdings.escrowed_items),
            escrowed_gold=holdings.escrowed_gold,
        )

    async def grant(
        self, request: shardnode_pb2.GrantItemsRequest, timeout_s: float
    ) -> shardnode_pb2.GrantItemsResponse:
        """Gives a player new unique items and gold (STRONG, idempotent by request id)."""
        return await self._items_write("grant", request, timeout_s, shardnode_pb2.GrantItemsResponse)

    async def take(
        self, request: shardnode_pb2.TakeItemsRequest, timeout_s: float
    ) -> shardnode_pb2.TakeItemsResponse:
        """Removes items and gold from a player (shardnode.storage.apply refuses what the
        player does not hold, escrows included); STRONG and idempotent as :meth:`grant`."""
        return await self._items_write("take", request, timeout_s, shardnode_pb2.TakeItemsResponse)

    async def _items_write(
        self,
        kind: str,
        request: shardnode_pb2.GrantItemsRequest | shardnode_pb2.TakeItemsRequest,
        timeout_s: float,
        answer: type[ItemsAnswer],
    ) -> ItemsAnswer:
        """A grant or a take (``kind``, the WriteOp field): checked, written on the
        player's primary, answered once replicated with the inventory after it."""
        validation.request_id(request.request_id)
        player = validation.player_id(request.player_id)
        items = validation.item_ids(list(request.item_ids))
        validation.gold(request.gold)
        if not items and request.gold == 0:
            raise InvalidArgument(f"the {kind} is empty; give at least one item id or some gold")
        shard = self.shard_for(player)
        state = self._writable(shard, request.epoch, strong=True)
        self.check_not_settling(shard, player)
        op = shardnode_pb2.WriteOp(request_id=request.request_id, player_id=player)
        getattr(op, kind).CopyFrom(
            (shardnode_pb2.GrantOp if kind == "grant" else shardnode_pb2.TakeOp)(item_ids=items, gold=request.gold))
        result = await self._write(state, op)
        await self._wait_committed(state, result.lsn, timeout_s, f"{kind} {limits.echo(request.request_id, 40)}")
        response = answer.FromString(result.response)
        response.replayed = result.replayed
        response.inventory.staleness.CopyFrom(self._staleness(state, False))
        return response

    async def set_player_data(
        self, request: shardnode_pb2.SetPlayerDataRequest, timeout_s: float
    ) -> shardnode_pb2.SetPlayerDataResponse:
        validation.request_id(request.request_id)
        player = validation.player_id(request.player_id)
        consistency = self._consistency(request.system)
        validation.data_key(request.key)
        validation.data_value(request.value)
        shard = self.shard_for(player)
        strong = consistency == STRONG
        state = self._writable(shard, request.epoch, strong=strong)
        growth = self._check_shard_data(state, player, request)
        op = shardnode_pb2.WriteOp(
            request_id=request.request_id,
            player_id=player,
            set_data=shardnode_pb2.SetDataOp(system=request.system, key=request.key, value=request.value),
        )
        result = await self._write(state, op)
        if state.data_bytes is not None and not result.replayed:
            state.data_bytes += growth
        if strong:
            await self._wait_committed(state, result.lsn, timeout_s, f"write {limits.echo(request.request_id, 40)}")
        response = shardnode_pb2.SetPlayerDataResponse.FromString(result.response)
        response.replayed = result.replayed
        response.consistency = consistency  # type: ignore[assignment]
        return response

    def _check_shard_data(
        self, state: ShardState, player: PlayerId, request: shardnode_pb2.SetPlayerDataRequest
    ) -> int:
        """How many bytes the write adds to the shard's player data; raises
        FailedPrecondition when that would take the shard past
        :data:`~bluemarble.core.limits.MAX_SHARD_DATA_BYTES` (a shard must stay small
        enough to be copied to a new replica). The count is this term's, kept in memory."""
        if state.data_bytes is None:
            state.data_bytes = self._storage.player_data_bytes(state.shard_id)
        old_size = self._storage.player_data_size(state.shard_id, player, request.system, request.key)
        if old_size is None:  # a new key: its system and key count too
            growth = len(request.system) + len(request.key) + len(request.value)
        else:
            growth = len(request.value) - old_size
        if growth > 0 and state.data_bytes + growth > limits.MAX_SHARD_DATA_BYTES:
            raise FailedPrecondition(
                f"{state.shard_id} holds {state.data_bytes} bytes of player data; a shard holds at most "
                f"{limits.MAX_SHARD_DATA_BYTES} so that it can still be copied to a new replica"
            )
        return growth

    async def get_player_data(
        self, request: shardnode_pb2.GetPlayerDataRequest, timeout_s: float
    ) -> shardnode_pb2.GetPlayerDataResponse:
        player = validation.player_id(request.player_id)
        consistency = self._consistency(request.system)
        validation.data_key(request.key)
        shard = self.shard_for(player)
        strong = consistency == STRONG
        state, stale = self._readable(shard, request.allow_stale or not strong)
        read_at_lsn = state.last.lsn
        found = self._storage.player_data(shard, player, request.system, request.key)
        if strong and not stale:
            await self._wait_committed(state, read_at_lsn, timeout_s, "a write this read would show")
        response = shardnode_pb2.GetPlayerDataResponse(
            player_id=player,
            system=request.system,
            key=request.key,
            shard_id=shard,
            epoch=state.epoch,
            staleness=self._staleness(state, stale),
        )
        if found is not None:
            response.value, response.lsn = found
            response.found = True
        return response

    async def _write(self, state: ShardState, op: shardnode_pb2.WriteOp) -> WriteResult:
        """Commits one write as primary. Writes arriving in the same event-loop turn are
        committed together in one transaction (group commit: one WAL append, and one
        fsync with ``--synchronous full``), each isolated from the others' refusals."""
        future: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        self._pending_writes.append((state, state.epoch, op, future))
        if not self._group_commit:
            self._flush_writes()  # a commit costs no fsync: no reason to make the caller wait a turn
            if future.done():
                return future.result()
        else:
            self._schedule_flush()
        return await future

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_writes)

    def _flush_writes(self) -> None:
        self._flush_scheduled = False
        batch, self._pending_writes = self._pending_writes, []
        if self._writes_held:
            # Shards whose snapshot is being read: their writes wait (in order) for the end
            # of the read, the other shards' go on.
            self._held_writes += [w for w in batch if w[0].shard_id in self._writes_held]
            batch = [w for w in batch if w[0].shard_id not in self._writes_held]
        if not batch:
            return
        now_ms = self._clock.wall_ms()
        try:
            results = self._storage.write_many([(state.shard_id, epoch, op) for state, epoch, op, _ in batch], now_ms)
        except BlueMarbleError as e:
            results = [e] * len(batch)
        touched: dict[ShardId, ShardState] = {}
        for (state, epoch, _op, future), result in zip(batch, results, strict=True):
            if isinstance(result, BlueMarbleError):
                if not future.done():
                    future.set_exception(result)
                continue
            if not result.replayed and state.epoch == epoch:
                state.last = max(state.last, LogPosition(epoch, result.lsn))
                touched[state.shard_id] = state
                if state.tail and state.tail[-1].lsn + 1 != result.lsn:
                    state.tail.clear()
                    state.tail_bytes = 0
                # The bytes storage logged, not encoded a second time.
                entry = shardnode_pb2.LogEntry(
                    lsn=result.lsn, epoch=epoch, payload=result.payload, written_at_ms=now_ms
                )
                if len(state.tail) == state.tail.maxlen:
                    state.tail_bytes -= len(state.tail[0].payload)
                state.tail.append(entry)
                state.tail_bytes += len(entry.payload)
                while state.tail_bytes > TAIL_CACHE_BYTES and len(state.tail) > 1:
                    state.tail_bytes -= len(state.tail.popleft().payload)
            if not future.done():
                future.set_result(result)
        for state in touched.values():
            if not any(r != self.node_id for r in state.replicas):
                self._recompute_commit(state)
        if touched:
            for shipper in self._shippers.values():
                shipper.wake.set()

    # ---- for the trade participant (shardnode/participant.py) ----

    @property
    def storage(self) -> NodeStorage:
        return self._storage

    @property
    def clock(self) -> Clock:
        return self._clock

    def writable(self, shard: ShardId, epoch: int) -> ShardState:
        """The shard's state if this node may make a STRONG write to it at ``epoch`` (0: the
        current one); FailedPrecondition (not the primary, stale epoch, fenced, naming the
        primary when known) or Unavailable (catching up, lease in doubt) otherwise."""
        return self._writable(shard, epoch, strong=True)

    async def write(self, state: ShardState, op: shardnode_pb2.WriteOp) -> WriteResult:
        """Queues ``op`` as the next entry of ``state``'s shard, exactly as a grant is
        (group commit; the op is in :meth:`pending_ops` from the call until its flush)."""
        return await self._write(state, op)

    async def wait_committed(self, state: ShardState, lsn: int, timeout_s: float, what: str) -> None:
        """Waits until ``lsn`` is replicated as a STRONG write needs (see ``_wait_committed``)."""
        await self._wait_committed(state, lsn, timeout_s, what)

    def pending_ops(self, shard: ShardId) -> list[shardnode_pb2.WriteOp]:
        """Writes of ``shard`` queued for the next group commit (or held while its snapshot
        is read), not yet in storage, in order."""
        return [op for state, _, op, _ in self._held_writes + self._pending_writes if state.shard_id == shard]

    def led_shards(self, *, serving: bool = False) -> list[ShardId]:
        """Shards this node is assigned to lead (and serves, with ``serving``), not fenced
        by a newer epoch."""
        return sorted(
            s.shard_id
            for s in self._shards.values()
            if s.role == PRIMARY and s.fenced_epoch <= s.epoch and (s.serving or not serving)
        )

    # ---- fencing (the control-plane leader's failover, flow 4) ----

    def _ring_shards(self) -> frozenset[ShardId] | None:
        """The ring's shards, or None before the node has fetched the ring (a fence then
        goes through: refusing it could hold up a failover)."""
        try:
            return frozenset(self._ring.ring.shard_ids)
        except FailedPrecondition:
            return None

    def _check_in_ring(self, shard: ShardId) -> None:
        """NotFound for a shard the ring does not have and this node holds nothing of: no
        node will ever serve it, so "ask the control plane where it is" would send the
        caller round in circles."""
        known = self._ring_shards()
        if known is not None and shard not in known and shard not in self._shards:
            raise NotFound(_not_in_ring(shard, known))

    def fence(self, request: shardnode_pb2.FenceRequest) -> shardnode_pb2.FenceResponse:
        if len(request.shards) > limits.MAX_SHARD_STATUSES:
            raise InvalidArgument(f"fence lists {len(request.shards)} shards; at most {limits.MAX_SHARD_STATUSES}")
        if len(request.requested_by) > MAX_REQUESTED_BY_CHARS:
            raise InvalidArgument(f"requested_by is {len(request.requested_by)} characters; name the replica "
                                  f"in at most {MAX_REQUESTED_BY_CHARS}")
        validation.printable_text(request.requested_by, "requested_by")
        response = shardnode_pb2.FenceResponse(node_id=self.node_id)
        # Checked before any shard is fenced: a refused request changes nothing.
        known = self._ring_shards()
        for i, item in enumerate(request.shards):
            shard = _shard_id(item.shard_id)
            validation.log_counter(item.epoch, f"shards[{i}].epoch")
            if item.epoch == 0:
                raise InvalidArgument(f"fence of {shard} names epoch 0; epochs start at 1")
            if known is not None and shard not in known and shard not in self._shards:
                raise NotFound(_not_in_ring(shard, known))
            held = self._shards.get(shard)
            newest = max(held.epoch, held.fenced_epoch, held.last.epoch) if held is not None else 0
            if item.epoch > newest + MAX_FENCE_STEP:
                raise InvalidArgument(
                    f"fence of {shard} at epoch {item.epoch} is far past the newest epoch this node knows of it "
                    f"({newest}); a leader fences one past the shard's epoch"
                )
        for item in request.shards:
            shard = ShardId(item.shard_id)
            state = self._state(shard)
            had_data = state.synced or state.last.lsn > 0
            if item.epoch > state.fenced_epoch:
                state.fenced_epoch = self._storage.fence(shard, item.epoch).fenced_epoch
                log.info("fenced", shard=shard, epoch=state.fenced_epoch, by=request.requested_by, last=str(state.last))
            if state.role == PRIMARY and state.epoch < state.fenced_epoch:
                self._step_down(state, f"fenced at epoch {state.fenced_epoch}")
            response.shards.append(
                shardnode_pb2.FencedShard(
                    shard_id=shard, epoch=state.fenced_epoch, last=log_position_to_proto(state.last), has_data=had_data
                )
            )
        return response

    # ---- replica side ----

    async def hold_if_failpoint(self) -> None:
        """Test hook (a failpoint, as etcd's gofail): while the file ``hold-replication``
        exists in the data dir, this node takes replication batches off the wire but
        neither applies nor acknowledges them, like a replica whose disk hung. The e2e
        tests use it to leave a primary with entries no replica has; nothing else creates
        that file."""
        failpoint = self._failpoint
        if os.path.exists(failpoint):  # noqa: ASYNC240 - one local stat, about a microsecond
            log.warning("failpoint: holding replication", file=failpoint)
            while os.path.exists(failpoint):  # noqa: ASYNC240
                await self._clock.sleep(0.05)

    def replicate(self, batch: shardnode_pb2.ReplicateBatch) -> shardnode_pb2.ReplicateAck:
        """Applies one batch from a primary (all accepted shards in one transaction) and
        answers one ack per shard, after the commit."""
        if len(batch.shards) > limits.MAX_SHARD_STATUSES:
            raise InvalidArgument(
                f"a replication batch carries {len(batch.shards)} shards; at most {limits.MAX_SHARD_STATUSES}"
            )
        validation.node_id(batch.primary, "primary")  # the sender: compared and logged below
        now_s = self._clock.monotonic_s()
        acks: list[shardnode_pb2.ShardAck] = []
        to_append: list[tuple[ShardId, list[shardnode_pb2.LogEntry]]] = []
        accepted: list[tuple[ShardState, shardnode_pb2.ShardEntries, shardnode_pb2.ShardAck]] = []
        fenced: dict[ShardId, int] = {}
        for i, group in enumerate(batch.shards):
            shard = _shard_id(group.shard_id)
            if len(group.entries) > MAX_ENTRIES_PER_SHARD_IN_BATCH:
                raise InvalidArgument(
                    f"{len(group.entries)} entries for {shard}; at most {MAX_ENTRIES_PER_SHARD_IN_BATCH}"
                )
            _check_counters(group, f"shards[{i}]")
            state = self._shards.get(shard)
            ack = shardnode_pb2.ShardAck(shard_id=shard)
            acks.append(ack)
            if state is None or state.role is None:
                ack.result, ack.reason = shardnode_pb2.ACK_RESULT_NOT_REPLICA, "not assigned here"
                continue
            ack.last.CopyFrom(log_position_to_proto(state.last))
            known = max(state.epoch, state.fenced_epoch)
            if group.epoch > known:
                # A newer epoch is taken from the control plane only (this node's assignment,
                # or the leader's Fence before a promotion), never on a sender's word: a
                # made-up epoch would otherwise depose the real primary and let the sender's
                # entries win the next promotion. A successor's batches that arrive before
                # this node's assignment are asked again shortly (NOT_REPLICA).
                ack.result, ack.reason = (
                    shardnode_pb2.ACK_RESULT_NOT_REPLICA,
                    f"epoch {group.epoch} is not known here yet (newest {known}); it comes from an assignment",
                )
                continue
            if state.role == PRIMARY and group.epoch <= state.epoch:
                ack.result, ack.reason = (
                    shardnode_pb2.ACK_RESULT_STALE_EPOCH,
                    "this node leads the shard at that epoch or later",
                )
                ack.epoch = max(state.fenced_epoch, state.epoch)
                continue
            if state.role == REPLICA and state.primary != batch.primary and group.epoch <= state.epoch:
                ack.result, ack.reason = shardnode_pb2.ACK_RESULT_NOT_REPLICA, f"follows {state.primary}"
                continue
            if group.epoch < state.fenced_epoch:
                ack.result, ack.epoch = shardnode_pb2.ACK_RESULT_STALE_EPOCH, state.fenced_epoch
                continue
            if state.snapshotting:
                ack.result = shardnode_pb2.ACK_RESULT_SNAPSHOTTING
                continue
            if group.snapshot_required:
                if now_s >= state.snapshot_retry_at_s:  # else still backing off a failed one
                    self._start_snapshot(state, NodeId(batch.primary), group.epoch)
                ack.result = shardnode_pb2.ACK_RESULT_SNAPSHOTTING
                continue
            prev = _position(group.prev, "prev")
            positions = []
            for entry in group.entries:
                if (entry.epoch == 0) != (entry.lsn == 0) or entry.lsn == 0:
                    raise InvalidArgument(f"entry ({entry.epoch}, {entry.lsn}) of {shard} is not a log position")
                positions.append(LogPosition(entry.epoch, entry.lsn))
            decision = check_entries(
                fenced_epoch=state.fenced_epoch, last=state.last, sender_epoch=group.epoch, prev=prev, entries=positions
            )
            if decision.fenced_epoch > state.fenced_epoch:
                fenced[shard] = decision.fenced_epoch
            state.last_heard_s = now_s
            state.primary_last_lsn = (
                max(group.primary_last_lsn, state.last.lsn)
                if decision.verdict is Verdict.OK
                else group.primary_last_lsn
            )
            if decision.verdict is Verdict.OK:
                if decision.append_from < len(group.entries):  # a probe or a duplicate costs no transaction
                    to_append.append((shard, list(group.entries[decision.append_from :])))
                accepted.append((state, group, ack))
                ack.result = shardnode_pb2.ACK_RESULT_OK
            elif decision.verdict is Verdict.STALE_EPOCH:
                ack.result, ack.epoch, ack.reason = (
                    shardnode_pb2.ACK_RESULT_STALE_EPOCH,
                    state.fenced_epoch,
                    decision.reason,
                )
            elif decision.verdict is Verdict.MISMATCH:
                ack.result, ack.reason = shardnode_pb2.ACK_RESULT_MISMATCH, decision.reason
            else:
                raise InvalidArgument(f"malformed entries for {shard}: {decision.reason}")
        if accepted or fenced:
            try:
                lasts = self._storage.append(to_append, fenced) if to_append or fenced else {}
            except CorruptRecord as e:  # a payload no primary writes: the sender's fault, nothing applied
                raise InvalidArgument(f"{e}; nothing of this batch was applied") from e
            for shard, epoch in fenced.items():
                self._shards[shard].fenced_epoch = max(self._shards[shard].fenced_epoch, epoch)
            for state, group, ack in accepted:
                new_last = lasts.get(state.shard_id, state.last)
                appended = new_last != state.last
                state.last = new_last
                if group.entries and appended:
                    state.applied_written_at_ms = group.entries[-1].written_at_ms
                if not state.synced:
                    state.synced = True
                    self._storage.mark_synced(state.shard_id)
                ack.last.CopyFrom(log_position_to_proto(state.last))
        for ack in acks:
            state = self._shards.get(ShardId(ack.shard_id))
            if state is not None and ack.result != shardnode_pb2.ACK_RESULT_STALE_EPOCH:
                ack.epoch = state.fenced_epoch
        return shardnode_pb2.ReplicateAck(replica=self.node_id, shards=acks)

    # ---- snapshots ----

    def _start_snapshot(self, state: ShardState, source: NodeId, epoch: int) -> None:
        state.snapshotting = True

        async def run() -> None:
            key = f"snapshot {state.shard_id}"
            try:
                async with self._copy_slots:
                    await self._install_snapshot(state, source, epoch)
                state.snapshot_failures = 0
                self._snapshot_failures.recovered(key, self._clock.monotonic_s(), "snapshot installed")
            except BlueMarbleError as e:
                # Backs off (1 s, doubling, at most a minute) so that a snapshot that
                # cannot succeed (a shard too large to send) is not asked for again at once.
                state.snapshot_failures += 1
                now_s = self._clock.monotonic_s()
                state.snapshot_retry_at_s = now_s + min(60.0, 2.0 ** (state.snapshot_failures - 1))
                self._snapshot_failures.failed(
                    key, now_s, "snapshot failed; the primary will ask again", shard=state.shard_id, source=source,
                    error=str(e),
                )
            finally:
                state.snapshotting = False

        self._spawn(run(), f"snapshot-{state.shard_id}")

    async def _install_snapshot(self, state: ShardState, source: NodeId, epoch: int) -> None:
        stub = self._peer_stub(source)
        started_s = self._clock.monotonic_s()
        call = stub.GetSnapshot(
            shardnode_pb2.GetSnapshotRequest(shard_id=state.shard_id, epoch=epoch, replica=self.node_id),
            timeout=SNAPSHOT_TIMEOUT_S,
        )
        data = bytearray()
        try:
            async for chunk in call:
                data += chunk.data
                if len(data) > MAX_SNAPSHOT_BYTES:
                    raise Unavailable(f"snapshot of {state.shard_id} exceeds {MAX_SNAPSHOT_BYTES} bytes")
                if chunk.done:
                    break
        except grpc.aio.AioRpcError as e:
            raise Unavailable(
                f"snapshot of {state.shard_id} from {source} failed: {e.code().name} {e.details()}"
            ) from e
        # Parsed a piece of whole fields at a time (about a page), the loop running between
        # pieces: a 200 MB snapshot parsed at once held a busy node 1.5 s.
        snapshot = shardnode_pb2.ShardSnapshot()
        try:
            for piece in snapshots.field_slices(data, SNAPSHOT_PARSE_SLICE_BYTES):
                snapshot.MergeFromString(piece)  # type: ignore[arg-type]  # bytes-like: no copy first
                await asyncio.sleep(0)
        except Exception as e:  # CorruptRecord, protobuf's DecodeError
            raise CorruptRecord(f"snapshot of {state.shard_id} from {source} does not decode") from e
        size = len(data)
        del data
        fetched_s = self._clock.monotonic_s()
        self._check_install(state, epoch)
        # In batches, one transaction each, yielding the loop between them: heartbeats and
        # the other shards go on. From the first, this node holds no copy of the shard
        # (position ZERO, not synced) until the last; a fence meanwhile (answered with
        # ZERO), or a failure, leaves it empty for the primary to copy again.
        install = self._storage.begin_install(snapshot, max(state.fenced_epoch, epoch))
        state.tail.clear()
        state.tail_bytes = 0
        state.last, state.synced = ZERO, False
        state.first_retained_lsn = 1
        try:
            while not install.done:
                await asyncio.sleep(0)
                self._check_install(state, epoch)
                install.step()
            await asyncio.sleep(0)
            self._check_install(state, epoch)
            meta = install.finish()
        except BaseException:
            with contextlib.suppress(BlueMarbleError):
                install.abandon()  # else the next install, or a restart, empties the shard
            raise
        state.last, state.fenced_epoch = meta.last, meta.fenced_epoch
        state.first_retained_lsn = meta.first_retained_lsn
        state.synced = True
        self._storage.mark_synced(state.shard_id)
        log.info(
            "installed a snapshot",
            shard=state.shard_id,
            source=source,
            last=str(meta.last),
            bytes=size,
            took_s=round(self._clock.monotonic_s() - started_s, 3),
            fetch_s=round(fetched_s - started_s, 3),  # the source's queue, its build, the transfer, the decode
            install_s=round(self._clock.monotonic_s() - fetched_s, 3),
        )

    def _check_install(self, state: ShardState, epoch: int) -> None:
        if state.fenced_epoch > epoch:
            # Fenced at a newer epoch while fetching or installing (a failover began): the
            # position this node answered the fence with must stay its position (ZERO once
            # the install began); the new primary will bring it up to date.
            raise FailedPrecondition(
                f"{state.shard_id} was fenced at epoch {state.fenced_epoch} during the snapshot of epoch {epoch}; "
                "not installed"
            )

    @contextlib.asynccontextmanager
    async def serving_snapshot(self) -> AsyncIterator[None]:
        """One snapshot served at a time (built, then streamed): each holds a whole shard
        in memory. Another request waits its turn, up to :data:`SNAPSHOT_QUEUE_WAIT_S`,
        then is refused UNAVAILABLE (its replica asks again later)."""
        try:
            async with asyncio.timeout(SNAPSHOT_QUEUE_WAIT_S):
                await self._snapshot_slot.acquire()
        except TimeoutError:
            raise Unavailable(
                f"node {self.node_id} is busy serving other snapshots; retry shortly"
            ) from None
        try:
            yield
        finally:
            self._snapshot_slot.release()

    async def snapshot_chunks(
        self, request: shardnode_pb2.GetSnapshotRequest
    ) -> AsyncIterator[shardnode_pb2.SnapshotChunk]:
        """The shard's snapshot in chunks (call within :meth:`serving_snapshot`). Raises
        FailedPrecondition when this node holds no copy, or when the shard is too large to
        send (:data:`MAX_SNAPSHOT_BYTES`), before anything is sent; Unavailable when the
        shard kept changing while it was read.

        The snapshot is read page by page, the loop running between pages (heartbeats,
        the other shards' writes): a 200 MB shard read in one go held a node 3-6 s and cost
        it its lease. A primary holds the shard's own writes meanwhile, so that the pages
        make one snapshot (:meth:`_read_snapshot`)."""
        replica = validation.node_id(request.replica, "replica") if request.replica else "?"
        shard = self._snapshot_source(request)
        started_s = self._clock.monotonic_s()
        last, pages, reads = await self._read_snapshot(request)
        total = sum(len(page) for page in pages)
        log.info("serving a snapshot", shard=shard, to=replica, bytes=total, last=f"({last.epoch}, {last.lsn})",
                 pages=len(pages), reads=reads, read_s=round(self._clock.monotonic_s() - started_s, 3))
        position = log_position_to_proto(last)
        pieces = _chunks(pages, SNAPSHOT_CHUNK_BYTES)
        data = next(pieces, b"")
        while True:
            following = next(pieces, None)
            yield shardnode_pb2.SnapshotChunk(
                shard_id=shard, last=position, data=data, total_bytes=total, done=following is None
            )
            if following is None:
                return
            data = following

    def _snapshot_source(self, request: shardnode_pb2.GetSnapshotRequest) -> ShardId:
        """The asked shard, once this node is found able to serve its snapshot."""
        shard = _shard_id(request.shard_id)
        validation.log_counter(request.epoch, "epoch")  # as GetEntries: a counter, 0 for any
        state = self._shards.get(shard)
        if state is None:
            self._check_in_ring(shard)
        if state is None or not (state.synced or state.last.lsn > 0):
            raise FailedPrecondition(f"node {self.node_id} holds no copy of {shard} to snapshot")
        served_epoch = max(state.epoch, state.fenced_epoch)  # a replica was fenced by the asking primary
        if request.epoch > served_epoch:
            raise FailedPrecondition(
                f"node {self.node_id} holds {shard} at epoch {served_epoch}, older than the asked {request.epoch}; "
                "ask the shard's current primary"
            )
        return shard

    async def _read_snapshot(self, request: shardnode_pb2.GetSnapshotRequest) -> tuple[LogPosition, list[bytes], int]:
        """The snapshot's position and encoded pages, and how many reads it took. Pages
        read while something changed the shard are read again (a replica applying its
        primary's entries, a fence, a prune); after :data:`SNAPSHOT_PAGED_READS` such
        reads the request is refused UNAVAILABLE (the replica asks again, backing off): read
        in one go instead, a 200 MB shard held a node past its lease. The size is counted as
        the pages come: past :data:`MAX_SNAPSHOT_BYTES` the read stops, refused."""
        for read in range(1, SNAPSHOT_PAGED_READS + 1):
            shard = self._snapshot_source(request)  # again: a fence or a drop may have come meanwhile
            pages = self._storage.snapshot_pages(shard)
            held = self._shards[shard].role == PRIMARY
            if held:
                self._writes_held.add(shard)
            try:
                encoded = []
                size = 0
                while (page := pages.next()) is not None:
                    encoded.append(page)
                    size += len(page)
                    if size > MAX_SNAPSHOT_BYTES:
                        raise FailedPrecondition(
                            f"{shard} holds more than a snapshot carries ({MAX_SNAPSHOT_BYTES}): it cannot be copied "
                            "to a new replica; free player data on it"
                        )
                    await asyncio.sleep(0)
            finally:
                if held:
                    self._release_writes(shard)
            if pages.unchanged():
                return pages.last, encoded, read
            log.info("snapshot pages changed while read; reading again", shard=shard, read=read)
        raise Unavailable(
            f"{shard} changed while node {self.node_id} read its snapshot, {SNAPSHOT_PAGED_READS} times (this node "
            "applies its primary's writes): ask again shortly, or ask the shard's primary"
        )

    def _release_writes(self, shard: ShardId) -> None:
        """Ends the hold on ``shard``'s writes; those held go first at the next flush."""
        self._writes_held.discard(shard)
        held = [w for w in self._held_writes if w[0].shard_id == shard]
        if not held:
            return
        self._held_writes = [w for w in self._held_writes if w[0].shard_id != shard]
        self._pending_writes[:0] = held
        self._schedule_flush()

    def entries_after(self, request: shardnode_pb2.GetEntriesRequest) -> shardnode_pb2.GetEntriesResponse:
        """The entries of this node's log right after ``request.after``, for a new primary
        catching up (GetEntries). Raises FailedPrecondition when this log cannot continue
        the caller's: no copy here, not fenced at the caller's epoch yet (it could still
        grow), the log differs at ``after``, or what follows is no longer retained."""
        shard = _shard_id(request.shard_id)
        if request.epoch == 0:
            raise InvalidArgument("epoch is 0; give the caller's epoch as the shard's new primary")
        validation.log_counter(request.epoch, "epoch")
        validation.log_counter(request.after.epoch, "after.epoch")
        validation.log_counter(request.after.lsn, "after.lsn")
        asker = validation.node_id(request.node_id, "node_id") if request.node_id else "?"
        after = _position(request.after, "after")
        state = self._shards.get(shard)
        if state is None:
            self._check_in_ring(shard)
        if state is None or not (state.synced or state.last.lsn > 0):
            raise FailedPrecondition(f"node {self.node_id} holds no copy of {shard}")
        if state.snapshotting:
            raise FailedPrecondition(f"node {self.node_id} is installing a snapshot of {shard}")
        held_epoch = max(state.epoch, state.fenced_epoch)
        if request.epoch > held_epoch:
            raise FailedPrecondition(
                f"node {self.node_id} holds {shard} at epoch {held_epoch}, older than the asked {request.epoch}: "
                "its log may still grow; probe it at that epoch first"
            )
        if after.lsn > state.last.lsn:
            raise FailedPrecondition(
                f"the log of {shard} here ends at ({state.last.epoch}, {state.last.lsn}), before "
                f"({after.epoch}, {after.lsn})"
            )
        here = self.epoch_at(shard, after.lsn)
        if here is None:
            raise FailedPrecondition(f"entries of {shard} after lsn {after.lsn} are no longer kept here")
        if here != after.epoch:
            raise FailedPrecondition(
                f"the log of {shard} here differs at lsn {after.lsn} (epoch {here}, not {after.epoch})"
            )
        entries = self.entries(shard, after.lsn + 1, ENTRIES_PER_ANSWER, ENTRIES_BYTES_PER_ANSWER)
        if entries:
            log.info("serving log entries to a new primary", shard=shard, to=asker, entries=len(entries),
                     first=entries[0].lsn, last=entries[-1].lsn)
        return shardnode_pb2.GetEntriesResponse(shard_id=shard, entries=entries, last=log_position_to_proto(state.last))

    # ---- status ----

    def statuses(self, include_disk_only: bool = False) -> list[common_pb2.ShardStatus]:
        out = []
        for shard in sorted(self._shards):
            state = self._shards[shard]
            if state.role is None and not (include_disk_only and (state.synced or state.last.lsn)):
                continue
            lag_entries, lag_ms = self._lag(state) if state.role is not None else (0, 0)
            out.append(
                common_pb2.ShardStatus(
                    shard_id=shard,
                    epoch=state.epoch if state.role is not None else state.fenced_epoch,
                    role=state.role or common_pb2.SHARD_ROLE_UNSPECIFIED,  # type: ignore[arg-type]
                    applied_lsn=state.last.lsn,
                    last_epoch=state.last.epoch,
                    lag_entries=lag_entries,
                    lag_ms=lag_ms,
                    on_disk_only=state.role is None,
                    serving=state.serving if state.role == PRIMARY else self._following(state),
                    fenced_epoch=state.fenced_epoch,
                    copying=state.role == REPLICA and (not state.synced or state.snapshotting),
                    replicas=[r for r in state.replicas if r != self.node_id] if state.role == PRIMARY else [],
                )
            )
        return out

    def _following(self, state: ShardState) -> bool:
        return state.role == REPLICA and self._clock.monotonic_s() - state.last_heard_s < 3.0

    def not_ready_reason(self) -> str:
        """Why this node is not ready, or "" when it is.

        Ready: registered (the lease cannot have expired), holding this incarnation's
        assignments, serving as the primary of each shard it leads, and caught up with the
        primary of each shard it follows. A node that was just restarted is therefore not
        ready until its copies are whole again, so a rolling restart that waits for
        readiness never stops the next node while the last one's shards still depend on
        it (the chart's readiness probe and disruption budget rely on this)."""
        if self._agent.registration is None:
            return "not registered with the control plane"
        if self._agent.session_state is SessionState.LOST:
            return "the lease may have expired (no heartbeat answered in time)"
        if not self._agent.assignments_synced.is_set():
            return "waiting for its assignments"
        if not any(s.role is not None for s in self._shards.values()):
            # A new incarnation's first assignments are empty until the leader places it
            # (after probing it): holding nothing is "ready" only once it had time to.
            settle_s = max(EMPTY_READY_SETTLE_S, self._agent.registration.heartbeat_interval_s)
            if self._clock.monotonic_s() - self._agent.registered_at_s < settle_s:
                return "waiting for its first shards"
        for shard in sorted(self._shards):
            state = self._shards[shard]
            if state.role == PRIMARY and not state.serving:
                return f"catching up as the new primary of {shard}"
            if state.role == REPLICA:
                if not state.synced or state.snapshotting:
                    return f"copying {shard} from its primary"
                if not self._following(state):
                    return f"not hearing from the primary of {shard}"
                if state.primary_last_lsn > state.last.lsn:
                    return f"{state.primary_last_lsn - state.last.lsn} entries behind on {shard}"
        return ""


def _not_in_ring(shard: ShardId, known: frozenset[ShardId]) -> str:
    return f"{shard} is not a shard of this cluster (its ring has {len(known)} shards)"


def _chunks(pages: list[bytes], size: int) -> Iterator[bytes]:
    """The pages' bytes, joined, in pieces of ``size`` (the last may be shorter; none
    when the pages are empty). Each page is released once cut, as the chunks go out."""
    buffer = bytearray()
    while pages:
        view = memoryview(pages.pop(0))
        while len(buffer) + len(view) >= size:
            take = size - len(buffer)
            buffer += view[:take]
            view = view[take:]
            yield bytes(buffer)
            buffer.clear()
        buffer += view
    if buffer:
        yield bytes(buffer)


def _shard_id(value: str) -> ShardId:
    try:
        shard_index(ShardId(value))
    except ValueError as e:
        raise InvalidArgument(str(e)) from e
    return ShardId(value)
