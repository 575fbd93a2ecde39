"""Primary -> replica log shipping: one stream per primary -> replica pair (flow 5).

A :class:`Shipper` owns the ``ShardNode.Replicate`` stream from this node to one replica
node and carries every shard this node leads that the replica follows, many shards per
message. One batch is in flight at a time: while the replica commits it, new writes pile
up and go out together in the next one (group commit across the pair, for free).

Per shard and replica the shipper knows where to go on (:class:`Peer`):

* unknown (a new stream, a new term, a refusal): send a *probe* (no entries, ``prev`` =
  the primary's last position); the replica answers OK (its log ends there) or MISMATCH
  with where its log ends, and :func:`bluemarble.core.replication.primary.resume_point`
  says whether to continue from there or to have it fetch a snapshot;
* known: send the entries after what it acknowledged, up to a bound per message.

The ack of each shard decides (the order of effects matters): OK records the replica's
durable position, which may commit writes waiting for it (:meth:`PrimaryLink.on_ack`);
STALE_EPOCH means a newer primary exists: this node stops writing for the shard at once.

Everything the shipper reads and decides about shards goes through :class:`PrimaryLink`
(implemented by the data plane), so this module only does the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import grpc.aio
import structlog

from bluemarble.api.conversions import log_position_from_proto, log_position_to_proto
from bluemarble.api.messages import SHUTTING_DOWN_KEY
from bluemarble.core.errors import Unavailable
from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.replication import ZERO, LogPosition
from bluemarble.core.replication.primary import required_acks_for, resume_point
from bluemarble.runtime import background, channels, frames, retry
from bluemarble.runtime.clock import Clock, run_with_timeout, wait_event
from bluemarble.v1 import shardnode_pb2, shardnode_pb2_grpc

log = structlog.get_logger(__name__)

ACK_TIMEOUT_S = 3.0
"""A replica that does not answer a batch within this is treated as gone: the stream is
reopened (a SIGSTOPped replica keeps its sockets open and would otherwise hold the pair
forever). STRONG writes meanwhile commit through the other replicas."""
PROGRESS_INTERVAL_S = 0.5
"""An idle pair exchanges a probe this often: the replica learns the primary's last lsn
(its lag) and the primary learns the replica is alive."""
RETRY_DELAY_S = 0.2
SNAPSHOT_NOTE_INTERVAL_S = 30.0
"""Delay before a shard refused as NOT_REPLICA / SNAPSHOTTING is tried again."""
MAX_BATCH_ENTRIES = 512
"""Entries one batch carries at most, over all its shards. A replica applies a batch in
one transaction on its event loop, at about 0.1 ms an entry on a 2-core machine (small
entries: a byte budget alone let a catch-up of many shards carry 8,000 of them, a
second's stall in which the replica's own heartbeats waited, and on a busy machine its
lease lapsed)."""
EVENTUAL_LINGER_S = 0.02
"""How long a batch of only EVENTUAL entries waits for more (it adds this much to their
replication lag, nothing to their callers' latency). STRONG writes are never held."""
MAX_BATCH_BYTES = 1 << 20
COVER_WINDOW_S = EVENTUAL_LINGER_S
"""A stream in the middle of an exchange that began less than this long ago counts as
carrying any new entry (it sends it as soon as its replica answers): another replica's
stream need not hurry for the entries of STRONG writes that need only one ack."""
PEER_RESTART_GRACE_S = 30.0
"""How long after a replica said it is shutting down its stream's failures are expected."""

STRONG_COALESCE_S = 0.002
"""When STRONG writes arrive while their stream is busy (its last batch carried several
entries), the first one waits this long for the others the same burst brings: one
message for many writes. A lone STRONG writer (batches of one) never waits."""
COALESCE_MIN_ENTRIES = 4


_POSITION_ANSWERS = frozenset(
    {shardnode_pb2.ACK_RESULT_OK, shardnode_pb2.ACK_RESULT_MISMATCH, shardnode_pb2.ACK_RESULT_STALE_EPOCH}
)


@dataclass
class Peer:
    """What the primary knows about one replica of one shard."""

    next_lsn: int | None = None  # None: unknown, probe first
    acked: LogPosition = ZERO  # last position the replica acknowledged as durable (this term)
    sent_lsn: int = 0  # last lsn sent on this stream (in flight or acknowledged)
    reported: LogPosition | None = None  # where the replica said its log ends (an answer past its checks)
    snapshot_required: bool = False
    retry_at_s: float = 0.0
    last_probe_s: float = -1e18
    snapshot_noted_s: float = -1e18  # when "needs a snapshot" was last logged (not at every retry)


@dataclass(frozen=True)
class ShardView:
    """What the shipper needs of one shard this node leads."""

    shard_id: ShardId
    epoch: int
    last: LogPosition
    first_retained_lsn: int
    active: bool  # serving writes (False while the new primary catches up: probe only)


class PrimaryLink(Protocol):
    """The data plane's side of a shipper."""

    node_id: str

    def shipped_shards(self, replica: NodeId) -> list[ShardView]: ...

    def entries(
        self, shard: ShardId, from_lsn: int, max_entries: int, max_bytes: int
    ) -> list[shardnode_pb2.LogEntry]: ...

    def epoch_at(self, shard: ShardId, lsn: int) -> int | None: ...

    def on_ack(self, shard: ShardId, replica: NodeId, epoch: int, ack: shardnode_pb2.ShardAck) -> None: ...

    def on_stale(self, shard: ShardId, epoch: int, newer_epoch: int, replica: NodeId) -> None: ...

    def address_of(self, node: NodeId) -> str | None: ...

    def channel(self, address: str) -> grpc.aio.Channel: ...

    def incarnation(self) -> int: ...

    def urgent(self, replica: NodeId) -> bool: ...


@dataclass
class Shipper:
    """The replication stream from this node to ``replica``; see the module docstring."""

    replica: NodeId
    link: PrimaryLink
    clock: Clock
    peers: dict[ShardId, Peer] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when a STRONG caller starts waiting for an ack: ends an EVENTUAL linger at once.
    # (The caller registers after the flush that woke this stream, so ``urgent()`` alone,
    # read when the linger starts, misses it and would hold the STRONG write for a linger.)
    urgent_wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    batches: int = 0
    last_batch_entries: int = 0
    exchange_started_s: float | None = None  # when the batch in flight was sent (None: idle)
    quiet_until_s: float = 0.0  # the replica said it is shutting down: failures until then are expected

    def start(self) -> None:
        policy = retry.RetryPolicy(initial_s=0.05, max_backoff_s=1.0, deadline_s=None)
        self.task = background.start(
            retry.supervise(self._stream_once, name=f"replicate-to-{self.replica}", policy=policy, clock=self.clock,
                            quiet=lambda: self.clock.monotonic_s() < self.quiet_until_s),
            f"replicate-to-{self.replica}",
        )

    async def stop(self) -> None:
        await background.stop(self.task)
        self.task = None

    def forget(self, shards: Iterable[ShardId]) -> None:
        """Starts over (a probe) for ``shards``: a new term, or a snapshot installed."""
        for shard in shards:
            self.peers.pop(shard, None)
        self.wake.set()

    def idle_wait_s(self, now_s: float) -> float:
        """How long an idle stream sleeps unless woken: until the next refused shard may be
        tried again, at most half the progress interval. Only retries still ahead count
        (a past one would make the stream spin)."""
        due = min((p.retry_at_s for p in self.peers.values() if p.retry_at_s > now_s), default=0.0)
        wait_s = PROGRESS_INTERVAL_S / 2
        return min(wait_s, due - now_s) if due else wait_s

    async def _stream_once(self) -> None:
        """One stream, until it breaks (raises, so the supervisor backs off and reopens)."""
        address = self.link.address_of(self.replica)
        if address is None:
            await wait_event(self.clock, self.wake, 1.0)
            self.wake.clear()
            raise Unavailable(f"no address known for replica {self.replica}")
        stub = shardnode_pb2_grpc.ShardNodeStub(self.link.channel(address))  # type: ignore[no-untyped-call]
        call = await frames.open_stream(address, "/bluemarble.v1.ShardNode/Replicate",
                                        shardnode_pb2.ReplicateAck.FromString, stub.Replicate)
        # A new stream knows nothing about where the replica stands.
        for peer in self.peers.values():
            peer.next_lsn = None
            peer.sent_lsn = 0
        try:
            linger = False
            while True:
                if linger and await self._linger():
                    await self.clock.sleep(STRONG_COALESCE_S)
                self.urgent_wake.clear()
                batch, sent = self._build()
                if batch is None:
                    await wait_event(self.clock, self.wake, self.idle_wait_s(self.clock.monotonic_s()))
                    linger = self.wake.is_set()
                    self.wake.clear()
                    continue
                linger = True
                self.exchange_started_s = self.clock.monotonic_s()
                try:
                    ack = await run_with_timeout(self.clock, self._exchange(call, batch), ACK_TIMEOUT_S)
                except TimeoutError as e:
                    raise Unavailable(f"replica {self.replica} did not acknowledge within {ACK_TIMEOUT_S:g} s") from e
                finally:
                    self.exchange_started_s = None
                self.batches += 1
                self.last_batch_entries = sum(len(g.entries) for g in batch.shards)
                self._on_ack(ack, sent)
                self.quiet_until_s = 0.0  # it is back
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:  # a write after the replica ended it
            code, details = await channels.ended_status(call, e)
            with contextlib.suppress(Exception):
                if any(key == SHUTTING_DOWN_KEY for key, _ in await call.trailing_metadata() or ()):
                    # A graceful stop (a rolling restart): it is expected back. Until then
                    # (or its leave reaches the assignments) retries are logged at info.
                    self.quiet_until_s = self.clock.monotonic_s() + PEER_RESTART_GRACE_S
            raise Unavailable(f"replication stream to {self.replica} broke: {code.name} {details}") from e
        finally:
            call.cancel()

    async def _linger(self) -> bool:
        """Before the next batch, while no STRONG caller needs this stream: lets more
        entries join it, for at most :data:`EVENTUAL_LINGER_S` (fewer, larger messages cost
        less CPU). Returns True when a STRONG caller ended the wait while the stream was
        busy (its last batch carried several entries): the caller then coalesces.

        Not needed means: only EVENTUAL entries wait (their callers have their answers),
        or every waiting STRONG write needs one ack and another replica's stream carries
        it (DataPlane.urgent). With R = 3 the second replica's stream then sends fewer,
        larger batches, off the STRONG callers' path; it lingers at most the bound, so a
        stalled first replica delays them by no more than that."""
        until_s = self.clock.monotonic_s() + EVENTUAL_LINGER_S
        waited = False
        while not self.link.urgent(self.replica):
            remaining_s = until_s - self.clock.monotonic_s()
            if remaining_s <= 0:
                return False
            self.urgent_wake.clear()
            if not await wait_event(self.clock, self.urgent_wake, remaining_s):
                return False
            waited = True
        return waited and self.last_batch_entries >= COALESCE_MIN_ENTRIES

    def covers(self, shard: ShardId, lsn: int, now_s: float, *, next_batch: bool) -> bool:
        """Whether this stream carries ``lsn`` of ``shard`` to its replica without delay:
        it sent it already (in flight or acknowledged), or, with ``next_batch``, it is in an
        exchange that began within :data:`COVER_WINDOW_S` and will send it next."""
        peer = self.peers.get(shard)
        if peer is None or peer.next_lsn is None or peer.snapshot_required:
            return False
        if peer.sent_lsn >= lsn:
            return True
        started_s = self.exchange_started_s
        return next_batch and started_s is not None and now_s - started_s < COVER_WINDOW_S

    @staticmethod
    async def _exchange(
        call: Any,  # grpc.aio's stream, or a framed one (bluemarble.runtime.frames)
        batch: shardnode_pb2.ReplicateBatch,
    ) -> shardnode_pb2.ReplicateAck:
        await call.write(batch)
        ack = await call.read()
        if not isinstance(ack, shardnode_pb2.ReplicateAck):
            raise Unavailable("the replica closed the replication stream")
        return ack

    def _build(self) -> tuple[shardnode_pb2.ReplicateBatch | None, dict[ShardId, int]]:
        """The next batch (None when there is nothing to send), and each shard's epoch in it."""
        now = self.clock.monotonic_s()
        views = self.link.shipped_shards(self.replica)
        wanted = {v.shard_id for v in views}
        for shard in list(self.peers):
            if shard not in wanted:
                del self.peers[shard]
        groups: list[shardnode_pb2.ShardEntries] = []
        sent: dict[ShardId, int] = {}
        budget = MAX_BATCH_BYTES
        entries_left = MAX_BATCH_ENTRIES

        def behind(view: ShardView) -> int:
            peer = self.peers.get(view.shard_id)
            return 0 if peer is None or peer.next_lsn is None else max(0, view.last.lsn - peer.next_lsn + 1)

        # Shards with little to send first: a live write never waits behind a catch-up.
        for view in sorted(views, key=behind):
            peer = self.peers.setdefault(view.shard_id, Peer())
            if peer.retry_at_s > now:
                continue
            group = shardnode_pb2.ShardEntries(shard_id=view.shard_id, epoch=view.epoch, primary_last_lsn=view.last.lsn)
            if peer.snapshot_required and view.active:
                group.snapshot_required = True
                group.prev.CopyFrom(log_position_to_proto(view.last))
                peer.snapshot_required = False
                peer.next_lsn = None
            elif peer.next_lsn is None or not view.active:
                # A new primary catching up only learns where its replicas stand (it
                # must not have them truncated or re-imaged before it serves).
                throttle_s = RETRY_DELAY_S / 2 if view.active or peer.reported is None else PROGRESS_INTERVAL_S
                if now - peer.last_probe_s < throttle_s:
                    continue  # a probe just went out for it
                group.prev.CopyFrom(log_position_to_proto(view.last))
                peer.last_probe_s = now
            elif peer.next_lsn <= view.last.lsn and budget > 0 and entries_left > 0:
                prev_lsn = peer.next_lsn - 1
                prev_epoch = self.link.epoch_at(view.shard_id, prev_lsn) if prev_lsn else 0
                if prev_epoch is None:  # no longer retained: the replica needs a snapshot
                    peer.snapshot_required, peer.next_lsn = True, None
                    self.wake.set()
                    continue
                entries = self.link.entries(view.shard_id, peer.next_lsn, entries_left, budget)
                if not entries:
                    peer.snapshot_required, peer.next_lsn = True, None
                    self.wake.set()
                    continue
                group.prev.CopyFrom(shardnode_pb2.LogPosition(epoch=prev_epoch, lsn=prev_lsn))
                group.entries.extend(entries)
                peer.sent_lsn = entries[-1].lsn
                budget -= sum(len(e.payload) + 32 for e in entries)
                entries_left -= len(entries)
            elif now - peer.last_probe_s >= PROGRESS_INTERVAL_S:
                # Idle: a probe from where the replica stands carries our last lsn (its lag).
                group.prev.CopyFrom(log_position_to_proto(peer.acked))
                peer.last_probe_s = now
            else:
                continue
            groups.append(group)
            sent[view.shard_id] = view.epoch
        if not groups:
            return None, sent
        batch = shardnode_pb2.ReplicateBatch(primary=self.link.node_id, incarnation=self.link.incarnation())
        batch.shards.extend(groups)
        return batch, sent

    def _on_ack(self, ack: shardnode_pb2.ReplicateAck, sent: dict[ShardId, int]) -> None:
        now = self.clock.monotonic_s()
        views = {v.shard_id: v for v in self.link.shipped_shards(self.replica)}
        for shard_ack in ack.shards:
            shard = ShardId(shard_ack.shard_id)
            epoch = sent.get(shard)
            peer = self.peers.get(shard)
            view = views.get(shard)
            if epoch is None or peer is None or view is None or view.epoch != epoch:
                continue  # not ours any more, or a new term began meanwhile
            last = log_position_from_proto(shard_ack.last) or ZERO  # malformed: probe again
            result = shard_ack.result
            if result in _POSITION_ANSWERS:
                # Only answers that went through the replica's checks: those fenced it at
                # this epoch, so the position is final for the old primary's writes (a
                # new primary serves once every replica gave one; DataPlane).
                peer.reported = last
            if result == shardnode_pb2.ACK_RESULT_OK:
                peer.acked, peer.next_lsn = last, last.lsn + 1
                self.link.on_ack(shard, self.replica, epoch, shard_ack)
            elif result == shardnode_pb2.ACK_RESULT_STALE_EPOCH:
                peer.next_lsn = None
                self.link.on_stale(shard, epoch, shard_ack.epoch, self.replica)
            elif result == shardnode_pb2.ACK_RESULT_MISMATCH:
                peer.next_lsn = None
                if view.active:
                    resume = resume_point(
                        replica_last=last,
                        primary_last=view.last,
                        first_retained_lsn=view.first_retained_lsn,
                        epoch_at=functools.partial(self.link.epoch_at, shard),
                    )
                    # A replica with nothing starts from the state, not the whole history.
                    if resume.snapshot_required or (last == ZERO and view.last != ZERO):
                        at = self.link.epoch_at(shard, last.lsn) if last.lsn <= view.last.lsn else None
                        diverged = last.lsn > view.last.lsn or (at is not None and at != last.epoch)
                        # Entries this primary never had: a deposed primary's writes that no
                        # replica acknowledged (EVENTUAL ones it accepted while cut off from
                        # the control plane). The snapshot replaces them: say so, loudly.
                        # Once per half minute per replica and shard: while the replica's
                        # copy keeps failing, this comes back every retry.
                        noted = now - peer.snapshot_noted_s >= SNAPSHOT_NOTE_INTERVAL_S
                        if noted:
                            peer.snapshot_noted_s = now
                        (log.debug if not noted else log.warning if diverged else log.info)(
                            "replica's own entries past this primary's log are dropped; it gets a snapshot"
                            if diverged else "replica needs a snapshot",
                            shard=shard,
                            replica=self.replica,
                            replica_last=str(last),
                            primary_last=str(view.last),
                        )
                        peer.snapshot_required = True
                    else:
                        peer.next_lsn = resume.send_from_lsn
                        peer.acked = last
                        self.link.on_ack(shard, self.replica, epoch, shard_ack)
            else:  # NOT_REPLICA (it has not seen its assignment yet), SNAPSHOTTING
                peer.next_lsn = None
                peer.retry_at_s = now + RETRY_DELAY_S
            # Nothing is in flight any more: what the stream carries is what goes next.
            peer.sent_lsn = peer.next_lsn - 1 if peer.next_lsn is not None else 0


def must_send_now(replica: NodeId, others: Sequence[NodeId], carries: Callable[[NodeId, bool], bool]) -> bool:
    """Whether ``replica``'s stream must send a waiting STRONG entry at once.

    ``others``: the shard's replicas other than its primary, in the assignment's order.
    ``carries(node, next_batch)``: whether ``node``'s stream carries the entry (see
    :meth:`Shipper.covers`); ``next_batch`` is True for the replicas listed before
    ``replica``, whose streams lead it. The entry needs ``required_acks_for`` acks: the
    stream must send unless that many other streams carry it already.
    """
    carried = 0
    ahead = True
    for other in others:
        if other == replica:
            ahead = False
            continue
        if carries(other, ahead):
            carried += 1
    return carried < required_acks_for(len(others))


async def close_channels(channels: dict[str, grpc.aio.Channel]) -> None:
    for channel in channels.values():
        with contextlib.suppress(Exception):
            await channel.close(None)
    channels.clear()
