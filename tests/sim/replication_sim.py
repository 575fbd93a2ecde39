"""Deterministic simulation of one shard's replication and failover (issue 7, item 5).

Why this module exists: the replication and promotion rules in
:mod:`bluemarble.core.replication` are only as good as the schedules they survive. This
drives them (through :class:`~tests.sim.rules.SimRules`, so a bug can be planted) with a
seeded ``random.Random`` and an integer clock, in the way of TigerBeetle's VOPR:

- **nodes** (3..5), each with a durable log of ``(LogPosition, write id)`` and a durable
  fenced epoch, and volatile role state (lost on a crash);
- the **leader** (control plane): leases from heartbeats, incarnations, early failover on
  a closed stream, fence-then-promote with :func:`choose_primary`, the assignment;
- **clients** that send writes to whoever they believe is primary and retry (same write
  id) on a timeout or a refusal;
- a **network** that drops, delays, reorders and duplicates (:mod:`tests.sim.network`);
- **faults**, at most one node impaired at a time (I4 promises survival of any single
  node's loss; a node stays impaired until the leader counts it live again, and a wiped
  one until it holds every acknowledged write again): crash + restart (durable state
  kept), pause + resume (the node wakes up believing it is still primary), a partition
  from the leader that the leader reads as a crash (early failover while the old primary
  is alive), and at most one lost disk.

A promoted primary appends an epoch-start entry (Raft's no-op, write id ``-epoch``)
before it serves, and passes its lsn to ``commit_lsn``.

After the faulty phase the run heals (faults end, the network stops losing messages,
clients stop starting writes) and must converge: one serving primary, identical logs.
The checker (:mod:`tests.sim.checker`) runs after every tick.

``run_seed(seed)`` is a pure function of the seed (and the options): the same seed gives
the same trace, summarised by ``SimResult.digest``.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from bluemarble.core.ids import NodeId
from bluemarble.core.replication import ZERO, FenceAnswer, LogPosition, Verdict
from tests.sim.checker import Checker
from tests.sim.network import LEADER, Network, NetworkConfig, client_address
from tests.sim.rules import SimRules, rules_for

# -- time, in ticks -----------------------------------------------------------------------

TTL = 20
"""Lease TTL. Heartbeats every TTL/3; the leader expires a lease TTL after the last heartbeat it received."""
HEARTBEAT_EVERY = 6
LEASE_MARGIN = 4
"""A primary stops acknowledging writes at (send time of its last answered heartbeat) + TTL - margin."""
CRASH_GRACE = 3
"""Early failover: a closed stream without a heartbeat for this long revokes the lease."""
REGISTER_RETRY = 4
FENCE_RETRY = 3
CATCH_UP_RETRY = 5
RESEND_EVERY = 2
"""A primary re-sends unacknowledged entries this often (go-back-N from the acked position)."""
PROBE_EVERY = 5
"""An idle primary sends an empty batch this often (it discovers replicas that diverged)."""
SNAPSHOT_RETRY = 12
MAX_BATCH = 8
CLIENT_TIMEOUT = 15
HEAL_MAX_TICKS = 600
DEFAULT_STEPS = 300


class Kind(enum.IntEnum):
    ENTRIES = 1
    SNAPSHOT = 2
    ACK = 3
    FENCE = 4
    FENCE_ANSWER = 5
    HEARTBEAT = 6
    HEARTBEAT_REPLY = 7
    REGISTER = 8
    STREAM_CLOSED = 9
    ASSIGNMENT = 10
    CATCH_UP_REQUEST = 11
    CATCH_UP_REPLY = 12
    WRITE = 13
    WRITE_ACK = 14
    WRITE_REFUSED = 15


class Status(enum.IntEnum):
    UP = 0
    CRASHED = 1
    PAUSED = 2


class Role(enum.IntEnum):
    REPLICA = 0
    CATCHING_UP = 1
    """Promoted, copying from a replica that is ahead before it accepts writes."""
    PRIMARY = 2


@dataclass(frozen=True)
class Assignment:
    """What the leader publishes (etcd's assignment record): the primary's incarnation
    says which registration the promotion was decided for."""

    epoch: int
    primary: int | None
    primary_inc: int
    catch_up_from: tuple[tuple[NodeId, LogPosition], ...] = ()


NO_ASSIGNMENT = Assignment(0, None, 0)


@dataclass
class SimResult:
    """The outcome of one seed: violations (empty when every invariant held), counters
    of what happened, and a digest of the event trace (same seed => same digest)."""

    seed: int
    violations: list[str]
    counters: dict[str, int]
    digest: int
    ticks: int
    trace: list[str] = field(default_factory=list)


def _node_id(index: int) -> NodeId:
    return NodeId(f"n{index + 1}")


class Sim:
    """One run. Actors are plain methods on this object (one address space, one clock);
    each actor only reads its own state and the messages it receives."""

    def __init__(self, seed: int, steps: int, rules: SimRules, trace: bool) -> None:
        self.seed = seed
        self.steps = steps
        self.rules = rules
        self.rng = rng = random.Random(seed)
        self.n = rng.choice((3, 3, 4, 5))
        self.clients = rng.choice((1, 2, 3))
        self.client_window = rng.choice((1, 4, 8))
        """Writes a client keeps in flight."""
        self.write_p = rng.choice((0.05, 0.2, 0.4, 0.7))
        self.fault_p = rng.choice((0.01, 0.03, 0.06, 0.15, 0.3))
        self.primary_bias = rng.choice((0.3, 0.6, 0.9))
        """How often a fault hits the primary rather than any node."""
        self.retain = rng.choice((6, 24, 10**9))
        """Entries a primary keeps before its last one; older ones only exist in snapshots."""
        self.net = Network(rng, NetworkConfig(
            drop_p=rng.choice((0.0, 0.05, 0.15, 0.3)), dup_p=rng.choice((0.0, 0.05, 0.2)),
            max_delay=rng.choice((1, 3, 6)),
        ))
        self.checker = Checker()
        self.now = 0
        self.healing = False
        self.digest = seed
        self.trace: list[str] | None = [] if trace else None
        self.counters: dict[str, int] = dict.fromkeys((
            "ticks", "writes_started", "writes_acked", "writes_refused", "crashes", "restarts", "pauses",
            "partitions", "disks_lost", "promotions", "fence_rounds", "catch_ups", "snapshots_sent",
            "snapshots_installed", "stale_refused", "mismatches", "step_downs", "not_found", "self_fenced",
            "messages_sent", "messages_dropped", "messages_duplicated", "messages_held",
        ), 0)
        n = self.n
        # Node state: durable (log, fenced epoch) ...
        self.status = [Status.UP] * n
        self.positions: list[list[LogPosition]] = [[] for _ in range(n)]
        self.write_ids: list[list[int]] = [[] for _ in range(n)]
        self.fenced = [0] * n
        # ... derived from the durable log (rebuilt on restart) ...
        self.index: list[dict[int, int]] = [{} for _ in range(n)]
        self.generation = [0] * n
        """+1 each time a node's log is replaced (not appended to)."""
        # ... and volatile.
        self.inc = [1] * n
        self.registered = [False] * n
        self.last_register = [-(10**9)] * n
        self.last_heartbeat = [-(10**9)] * n
        self.lease_until = [-1] * n
        self.role = [Role.REPLICA] * n
        self.epoch = [0] * n
        self.view = [NO_ASSIGNMENT] * n
        self.next_lsn: list[dict[int, int]] = [{} for _ in range(n)]
        self.match: list[dict[int, int]] = [{} for _ in range(n)]
        self.snapshot_for: list[dict[int, LogPosition | None]] = [{} for _ in range(n)]
        self.snapshot_sent_at: list[dict[int, int]] = [{} for _ in range(n)]
        self.shipped_at: list[dict[int, int]] = [{} for _ in range(n)]
        self.commit = [0] * n
        self.epoch_start = [0] * n
        """lsn of the epoch-start entry of each serving primary (write id -epoch)."""
        self.pending: list[dict[int, int]] = [{} for _ in range(n)]
        self.catch_up_source: list[int | None] = [None] * n
        self.catch_up_sent_at = [0] * n
        self.held: list[list[tuple[int, int, int, tuple[object, ...]]]] = [[] for _ in range(n)]
        self.resume_at = [0] * n
        self.restart_at = [0] * n
        # Faults.
        self.impaired: dict[int, str] = {}
        self.fault_over_at = [0] * n
        """When each node's last fault physically ended (restart, resume, partition healed)."""
        self.disk_lost = False
        # Leader (control plane).
        self.assignment = NO_ASSIGNMENT
        self.leader_registered: list[int | None] = [None] * n
        self.leader_seen_inc = [0] * n
        self.leader_heard_at = [0] * n
        """When the leader last accepted a heartbeat or registration from each node (fault budget only)."""
        self.lease_expiry = [0] * n
        self.stream_closed: dict[int, tuple[int, int]] = {}
        self.round_epoch = 0
        self.round_answers: dict[NodeId, FenceAnswer] = {}
        self.round_sent_at: dict[int, int] = {}
        self.shard_had_data = False
        # Clients.
        self.next_write_id = 1
        self.client_writes: list[dict[int, int]] = [{} for _ in range(self.clients)]
        """Per client: write id in flight -> tick at which to re-send it."""
        self.client_view: list[int | None] = [None] * self.clients
        """Per client: the primary of its cached assignment (stale until it refreshes)."""
        for node in range(n):
            self.net.send_reliable(0, node, LEADER, Kind.REGISTER, (node, 1))
            self.last_register[node] = 0

    # -- bookkeeping ------------------------------------------------------------------------

    def event(self, *values: int) -> None:
        """Fold an event (ints only: hashing them is the same in every process) into the digest."""
        self.digest = hash((self.digest, self.now, values))

    def note(self, text: str) -> None:
        if self.trace is not None:
            self.trace.append(f"{self.now:5d} {text}")

    def last(self, node: int) -> LogPosition:
        positions = self.positions[node]
        return positions[-1] if positions else ZERO

    def live_at_leader(self, node: int) -> bool:
        return self.leader_registered[node] is not None

    # -- the durable log --------------------------------------------------------------------

    def append(self, node: int, entries: list[tuple[LogPosition, int]]) -> None:
        positions, write_ids, index = self.positions[node], self.write_ids[node], self.index[node]
        start = len(positions)
        for position, write_id in entries:
            if write_id in index:
                self.checker.duplicate_write(node, write_id, position)
            index[write_id] = position.lsn
            positions.append(position)
            write_ids.append(write_id)
        self.checker.entries_added(node, positions, write_ids, start)

    def replace_log(self, node: int, positions: tuple[LogPosition, ...], write_ids: tuple[int, ...]) -> None:
        self.positions[node] = list(positions)
        self.write_ids[node] = list(write_ids)
        self.index[node] = index = {}
        for k, write_id in enumerate(write_ids):
            if write_id in index:
                self.checker.duplicate_write(node, write_id, positions[k])
            index[write_id] = k + 1
        self.generation[node] += 1
        self.checker.entries_added(node, positions, write_ids, 0)

    def persist_fence(self, node: int, epoch: int) -> None:
        if epoch > self.fenced[node]:
            self.fenced[node] = epoch

    # -- roles ------------------------------------------------------------------------------

    def step_down(self, node: int, why: str) -> None:
        if self.role[node] != Role.REPLICA:
            self.counters["step_downs"] += 1
            self.note(f"n{node + 1} steps down from epoch {self.epoch[node]}: {why}")
            self.event(20, node, self.epoch[node])
        self.role[node] = Role.REPLICA
        self.pending[node] = {}
        self.catch_up_source[node] = None

    def forget_volatile(self, node: int) -> None:
        self.role[node] = Role.REPLICA
        self.epoch[node] = 0
        self.pending[node] = {}
        self.catch_up_source[node] = None
        self.registered[node] = False
        self.lease_until[node] = -1
        self.view[node] = NO_ASSIGNMENT
        self.held[node] = []

    def start_serving(self, node: int) -> None:
        self.role[node] = Role.PRIMARY
        self.catch_up_source[node] = None
        if self.rules.epoch_start_entry:
            # The epoch-start entry (Raft's no-op): inherited entries commit only with it.
            epoch = self.epoch[node]
            self.checker.primary_append(node, epoch)
            start = LogPosition(epoch, self.last(node).lsn + 1)
            self.append(node, [(start, -epoch)])
            self.epoch_start[node] = start.lsn
        next_lsn = self.last(node).lsn + 1
        others = [r for r in range(self.n) if r != node]
        self.next_lsn[node] = dict.fromkeys(others, next_lsn)
        self.match[node] = dict.fromkeys(others, 0)
        self.snapshot_for[node] = dict.fromkeys(others, None)
        self.snapshot_sent_at[node] = dict.fromkeys(others, -(10**9))
        self.shipped_at[node] = dict.fromkeys(others, -(10**9))
        self.commit[node] = 0
        self.note(f"n{node + 1} serves as primary at epoch {self.epoch[node]} from {self.last(node)}")
        self.event(21, node, self.epoch[node])

    def apply_assignment(self, node: int, assignment: Assignment) -> None:
        if assignment.epoch < self.view[node].epoch:
            return
        self.view[node] = assignment
        if assignment.primary == node:
            if assignment.primary_inc != self.inc[node] or self.role[node] != Role.REPLICA:
                return  # decided for an earlier registration of this node, or already applied
            if assignment.epoch < self.fenced[node] or assignment.epoch <= self.epoch[node]:
                return
            self.persist_fence(node, assignment.epoch)
            self.epoch[node] = assignment.epoch
            me = _node_id(node)
            others = {n: p for n, p in assignment.catch_up_from if n != me}
            source = self.rules.catch_up_source(self.last(node), others)
            if source is None:
                self.start_serving(node)
            else:
                self.role[node] = Role.CATCHING_UP
                self.catch_up_source[node] = int(source[1:]) - 1
                self.catch_up_sent_at[node] = -(10**9)
                self.note(f"n{node + 1} promoted at epoch {assignment.epoch}, catches up from {source}")
        elif self.role[node] != Role.REPLICA and assignment.epoch > self.epoch[node]:
            self.step_down(node, f"assignment names n{(assignment.primary or 0) + 1} at epoch {assignment.epoch}")

    # -- node: message handlers -------------------------------------------------------------

    def on_node_message(self, node: int, src: int, kind: int, body: tuple[object, ...]) -> None:
        if kind == Kind.ENTRIES:
            self.on_entries(node, src, *body)  # type: ignore[arg-type]
        elif kind == Kind.ACK:
            self.on_ack(node, src, *body)  # type: ignore[arg-type]
        elif kind == Kind.SNAPSHOT:
            self.on_snapshot(node, src, *body)  # type: ignore[arg-type]
        elif kind == Kind.HEARTBEAT_REPLY:
            self.on_heartbeat_reply(node, *body)  # type: ignore[arg-type]
        elif kind == Kind.ASSIGNMENT:
            (assignment,) = body
            self.apply_assignment(node, assignment)  # type: ignore[arg-type]
        elif kind == Kind.FENCE:
            self.on_fence(node, *body)  # type: ignore[arg-type]
        elif kind == Kind.WRITE:
            self.on_write(node, *body)  # type: ignore[arg-type]
        elif kind == Kind.CATCH_UP_REQUEST:
            (epoch, inc) = body
            self.net.send(self.now, node, src, Kind.CATCH_UP_REPLY,
                          (epoch, inc, tuple(self.positions[node]), tuple(self.write_ids[node])))
        elif kind == Kind.CATCH_UP_REPLY:
            self.on_catch_up_reply(node, src, *body)  # type: ignore[arg-type]
        else:
            raise AssertionError(f"node got message kind {kind}")

    def on_entries(
        self, node: int, src: int, sender_epoch: int, sender_inc: int, prev: LogPosition,
        positions: tuple[LogPosition, ...], write_ids: tuple[int, ...],
    ) -> None:
        if self.role[node] != Role.REPLICA and sender_epoch > self.epoch[node]:
            self.step_down(node, f"entries from n{src + 1} at epoch {sender_epoch}")
        fenced_before = self.fenced[node]
        last = self.last(node)
        decision = self.rules.check_entries(
            fenced_epoch=fenced_before, last=last, sender_epoch=sender_epoch, prev=prev, entries=positions,
        )
        verdict = decision.verdict
        if verdict is Verdict.MALFORMED:
            self.checker.fail(f"n{node + 1} got a malformed batch from n{src + 1}: {decision.reason}")
        elif verdict is Verdict.STALE_EPOCH:
            self.counters["stale_refused"] += 1
        elif verdict is Verdict.MISMATCH:
            self.counters["mismatches"] += 1
        self.persist_fence(node, decision.fenced_epoch)
        if verdict is Verdict.OK and decision.append_from < len(positions):
            self.checker.replica_append(node, sender_epoch, fenced_before)
            self.append(node, list(zip(positions[decision.append_from:], write_ids[decision.append_from:],
                                       strict=True)))
            self.event(22, node, sender_epoch, positions[-1].lsn)
        self.net.send(self.now, node, src, Kind.ACK,
                      (verdict, self.fenced[node], self.last(node), sender_epoch, sender_inc))

    def on_snapshot(
        self, node: int, src: int, sender_epoch: int, sender_inc: int, replaces: LogPosition,
        positions: tuple[LogPosition, ...], write_ids: tuple[int, ...],
    ) -> None:
        if self.role[node] != Role.REPLICA and sender_epoch > self.epoch[node]:
            self.step_down(node, f"snapshot from n{src + 1} at epoch {sender_epoch}")
        fenced_before = self.fenced[node]
        snapshot_last = positions[-1] if positions else ZERO
        decision = self.rules.check_snapshot(
            fenced_epoch=fenced_before, last=self.last(node), sender_epoch=sender_epoch, replaces=replaces,
            snapshot_last=snapshot_last,
        )
        verdict = decision.verdict
        if verdict is Verdict.MALFORMED:
            self.checker.fail(f"n{node + 1} got a malformed snapshot from n{src + 1}: {decision.reason}")
        elif verdict is Verdict.STALE_EPOCH:
            self.counters["stale_refused"] += 1
        self.persist_fence(node, decision.fenced_epoch)
        if verdict is Verdict.OK and self.role[node] == Role.REPLICA:
            self.checker.replica_append(node, sender_epoch, fenced_before)
            self.replace_log(node, positions, write_ids)
            self.counters["snapshots_installed"] += 1
            self.note(f"n{node + 1} installs a snapshot from n{src + 1} (epoch {sender_epoch}) up to {snapshot_last}")
            self.event(23, node, sender_epoch, snapshot_last.lsn)
        # A refused snapshot answers MISMATCH with the current position: the primary decides again.
        answer = Verdict.MISMATCH if verdict is Verdict.OK and self.role[node] != Role.REPLICA else verdict
        self.net.send(self.now, node, src, Kind.ACK,
                      (answer, self.fenced[node], self.last(node), sender_epoch, sender_inc))

    def on_ack(
        self, node: int, src: int, verdict: Verdict, fenced_epoch: int, replica_last: LogPosition,
        tag_epoch: int, tag_inc: int,
    ) -> None:
        # Only acks on the current stream (this incarnation, this epoch) count.
        if self.role[node] != Role.PRIMARY or tag_epoch != self.epoch[node] or tag_inc != self.inc[node]:
            return
        if verdict is Verdict.STALE_EPOCH or fenced_epoch > self.epoch[node]:
            self.persist_fence(node, fenced_epoch)
            self.step_down(node, f"n{src + 1} is fenced at epoch {fenced_epoch}")
            return
        if verdict is Verdict.OK:
            if replica_last.lsn > self.match[node][src]:
                self.match[node][src] = replica_last.lsn
            if replica_last.lsn + 1 > self.next_lsn[node][src]:
                self.next_lsn[node][src] = replica_last.lsn + 1
            self.snapshot_for[node][src] = None
        elif verdict is Verdict.MISMATCH:
            positions = self.positions[node]
            own_last = self.last(node)
            first_retained = max(1, own_last.lsn - self.retain)

            def epoch_at(lsn: int) -> int | None:
                return positions[lsn - 1].epoch if first_retained <= lsn <= len(positions) else None

            resume = self.rules.resume_point(
                replica_last=replica_last, primary_last=own_last, first_retained_lsn=first_retained,
                epoch_at=epoch_at,
            )
            if resume.snapshot_required:
                self.snapshot_for[node][src] = replica_last
            else:
                self.snapshot_for[node][src] = None
                self.next_lsn[node][src] = resume.send_from_lsn
                self.shipped_at[node][src] = -(10**9)

    def on_heartbeat_reply(self, node: int, ok: bool, inc: int, sent_at: int, assignment: Assignment) -> None:
        if inc != self.inc[node]:
            return
        if ok:
            self.registered[node] = True
            self.lease_until[node] = max(self.lease_until[node], sent_at + TTL - LEASE_MARGIN)
            self.apply_assignment(node, assignment)
        else:
            # NOT_FOUND: the lease is gone. Drop every role, register as a new incarnation.
            self.counters["not_found"] += 1
            self.step_down(node, "heartbeat answered NOT_FOUND")
            self.forget_volatile(node)
            self.inc[node] += 1
            self.send_register(node)

    def on_fence(self, node: int, new_epoch: int, fence: bool) -> None:
        if fence:
            self.persist_fence(node, new_epoch)
            if self.role[node] != Role.REPLICA and self.epoch[node] < new_epoch:
                self.step_down(node, f"fenced at epoch {new_epoch}")
        answer = FenceAnswer(_node_id(node), self.fenced[node], self.last(node), bool(self.positions[node]))
        self.net.send(self.now, node, LEADER, Kind.FENCE_ANSWER, (node, self.inc[node], new_epoch, answer))

    def on_write(self, node: int, client: int, write_id: int) -> None:
        reply_to = client_address(client)
        if self.role[node] != Role.PRIMARY:
            self.net.send(self.now, node, reply_to, Kind.WRITE_REFUSED, (write_id,))
            return
        if self.rules.self_fence and self.now > self.lease_until[node]:
            self.counters["self_fenced"] += 1
            self.net.send(self.now, node, reply_to, Kind.WRITE_REFUSED, (write_id,))
            return
        if write_id not in self.index[node]:
            epoch = self.epoch[node]
            self.checker.primary_append(node, epoch)
            position = LogPosition(epoch, self.last(node).lsn + 1)
            self.append(node, [(position, write_id)])
            self.event(24, node, epoch, position.lsn, write_id)
        self.pending[node][write_id] = client

    def on_catch_up_reply(
        self, node: int, src: int, epoch: int, inc: int, positions: tuple[LogPosition, ...],
        write_ids: tuple[int, ...],
    ) -> None:
        if self.role[node] != Role.CATCHING_UP or epoch != self.epoch[node] or inc != self.inc[node]:
            return
        source_last = positions[-1] if positions else ZERO
        if source_last > self.last(node):
            self.replace_log(node, positions, write_ids)
            self.counters["catch_ups"] += 1
            self.note(f"n{node + 1} caught up from n{src + 1} to {source_last}")
            self.event(25, node, src, source_last.lsn)
        self.start_serving(node)

    # -- node: timers -----------------------------------------------------------------------

    def send_register(self, node: int) -> None:
        self.last_register[node] = self.now
        self.net.send_reliable(self.now, node, LEADER, Kind.REGISTER, (node, self.inc[node]))

    def tick_node(self, node: int) -> None:
        now = self.now
        if not self.registered[node]:
            if now - self.last_register[node] >= REGISTER_RETRY:
                self.send_register(node)
        elif now - self.last_heartbeat[node] >= HEARTBEAT_EVERY:
            self.last_heartbeat[node] = now
            self.net.send_reliable(now, node, LEADER, Kind.HEARTBEAT,
                                   (node, self.inc[node], now, self.commit[node] if self.role[node] == Role.PRIMARY
                                    else 0))
        role = self.role[node]
        if role == Role.CATCHING_UP:
            source = self.catch_up_source[node]
            assert source is not None
            if now - self.catch_up_sent_at[node] >= CATCH_UP_RETRY:
                self.catch_up_sent_at[node] = now
                self.net.send(now, node, source, Kind.CATCH_UP_REQUEST, (self.epoch[node], self.inc[node]))
        elif role == Role.PRIMARY:
            self.tick_primary(node)

    def tick_primary(self, node: int) -> None:
        now, net = self.now, self.net
        positions, write_ids = self.positions[node], self.write_ids[node]
        own_last = self.last(node)
        epoch, inc = self.epoch[node], self.inc[node]
        first_retained = max(1, own_last.lsn - self.retain)
        for replica, next_lsn in self.next_lsn[node].items():
            replaces = self.snapshot_for[node][replica]
            if replaces is not None:
                if now - self.snapshot_sent_at[node][replica] >= SNAPSHOT_RETRY:
                    self.snapshot_sent_at[node][replica] = now
                    self.counters["snapshots_sent"] += 1
                    # A snapshot is big: it takes longer than a batch.
                    net.send(now, node, replica, Kind.SNAPSHOT,
                             (epoch, inc, replaces, tuple(positions), tuple(write_ids)),
                             extra_delay=self.rng.randint(0, 8))
                continue
            behind = next_lsn <= own_last.lsn
            since = now - self.shipped_at[node][replica]
            if not ((behind and since >= RESEND_EVERY) or since >= PROBE_EVERY):
                continue
            self.shipped_at[node][replica] = now
            if next_lsn < first_retained or not behind:
                # Nothing to send (or no longer retained): a probe from our last position;
                # a replica elsewhere answers MISMATCH with its last, and resume_point decides.
                body: tuple[object, ...] = (epoch, inc, own_last, (), ())
            else:
                start = next_lsn - 1
                prev = positions[start - 1] if start else ZERO
                body = (epoch, inc, prev, tuple(positions[start:start + MAX_BATCH]),
                        tuple(write_ids[start:start + MAX_BATCH]))
            net.send(now, node, replica, Kind.ENTRIES, body)
        replicas = self.match[node]
        committed = self.rules.commit_lsn(
            own_last_lsn=own_last.lsn, acked_lsns=replicas.values(),
            required_acks=self.rules.required_acks_for(len(replicas)), epoch_start_lsn=self.epoch_start[node],
        )
        if committed > self.commit[node]:
            self.commit[node] = committed
        pending = self.pending[node]
        if not pending:
            return
        if self.rules.self_fence and now > self.lease_until[node]:
            return  # the lease may have expired: acknowledge nothing (flow 2)
        commit, index = self.commit[node], self.index[node]
        done = [w for w in pending if index[w] <= commit]
        for write_id in done:
            client = pending.pop(write_id)
            lsn = index[write_id]
            self.checker.acknowledged(node, epoch, write_id, positions[lsn - 1])
            self.counters["writes_acked"] += 1
            self.event(26, node, epoch, write_id)
            net.send(now, node, client_address(client), Kind.WRITE_ACK, (write_id,))

    # -- leader -----------------------------------------------------------------------------

    def on_leader_message(self, src: int, kind: int, body: tuple[object, ...]) -> None:
        now = self.now
        if kind == Kind.HEARTBEAT:
            node, inc, sent_at, commit = body
            assert isinstance(node, int) and isinstance(commit, int) and isinstance(inc, int)
            ok = self.leader_registered[node] == inc
            if ok:
                self.lease_expiry[node] = now + TTL
                self.leader_heard_at[node] = now
                self.stream_closed.pop(node, None)
                if commit > 0:
                    self.shard_had_data = True
            self.net.send_reliable(now, LEADER, node, Kind.HEARTBEAT_REPLY, (ok, inc, sent_at, self.assignment))
        elif kind == Kind.REGISTER:
            node, inc = body
            assert isinstance(node, int) and isinstance(inc, int)
            if inc <= self.leader_seen_inc[node]:
                # A retry: granted again if still valid, else NOT_FOUND (register anew).
                ok = self.leader_registered[node] == inc
                if ok:
                    self.lease_expiry[node] = now + TTL
                self.net.send_reliable(now, LEADER, node, Kind.HEARTBEAT_REPLY, (ok, inc, now, self.assignment))
                return
            self.leader_seen_inc[node] = inc
            # A new incarnation: whatever the node held under the old one is gone.
            self.leader_registered[node] = inc
            self.lease_expiry[node] = now + TTL
            self.leader_heard_at[node] = now
            self.stream_closed.pop(node, None)
            self.round_answers.pop(_node_id(node), None)
            self.round_sent_at.pop(node, None)
            self.net.send_reliable(now, LEADER, node, Kind.HEARTBEAT_REPLY, (True, inc, now, self.assignment))
        elif kind == Kind.STREAM_CLOSED:
            node, inc = body
            assert isinstance(node, int) and isinstance(inc, int)
            if self.leader_registered[node] == inc:
                self.stream_closed[node] = (inc, now)
        elif kind == Kind.FENCE_ANSWER:
            node, inc, new_epoch, answer = body
            assert isinstance(node, int) and isinstance(answer, FenceAnswer)
            if new_epoch == self.round_epoch and self.leader_registered[node] == inc:
                if not self.rules.fence_before_read:
                    # The planted bug: positions read without a fence, taken as if fenced.
                    answer = FenceAnswer(answer.node_id, self.round_epoch, answer.last, answer.has_data)
                self.round_answers[answer.node_id] = answer
        else:
            raise AssertionError(f"leader got message kind {kind}")

    def tick_leader(self) -> None:
        now = self.now
        for node in range(self.n):
            inc = self.leader_registered[node]
            if inc is None:
                continue
            closed = self.stream_closed.get(node)
            if now > self.lease_expiry[node] or (closed is not None and now >= closed[1] + CRASH_GRACE):
                # Lease expired, or the stream closed from the node's side and no heartbeat
                # came within the grace: revoke at once. Safe because promotion fences first.
                self.leader_registered[node] = None
                self.stream_closed.pop(node, None)
                self.note(f"leader revokes n{node + 1}'s lease (incarnation {inc})"
                          + (" early: stream closed" if closed is not None else ""))
                self.event(30, node, inc)
        assignment = self.assignment
        primary_ok = (assignment.primary is not None
                      and self.leader_registered[assignment.primary] == assignment.primary_inc)
        if primary_ok:
            return
        new_epoch = assignment.epoch + 1
        if self.round_epoch != new_epoch:
            self.round_epoch = new_epoch
            self.round_answers = {}
            self.round_sent_at = {}
            self.counters["fence_rounds"] += 1
            self.note(f"leader starts fence round for epoch {new_epoch}")
        live = [node for node in range(self.n) if self.leader_registered[node] is not None]
        for node in live:
            if _node_id(node) not in self.round_answers and now - self.round_sent_at.get(node, -(10**9)) >= FENCE_RETRY:
                self.round_sent_at[node] = now
                self.net.send(now, LEADER, node, Kind.FENCE, (new_epoch, self.rules.fence_before_read))
        live_ids = [_node_id(node) for node in live]
        answers = {n: self.round_answers[n] for n in live_ids if n in self.round_answers}
        decision = self.rules.choose_primary(
            answers, new_epoch=new_epoch, must_answer=live_ids, shard_had_data=self.shard_had_data,
        )
        if decision.primary is None:
            return
        chosen = int(decision.primary[1:]) - 1
        chosen_inc = self.leader_registered[chosen]
        assert chosen_inc is not None
        self.assignment = Assignment(
            new_epoch, chosen, chosen_inc, tuple((n, a.last) for n, a in answers.items()),
        )
        self.round_epoch = 0
        self.counters["promotions"] += 1
        self.note(f"leader promotes n{chosen + 1} at epoch {new_epoch}: {decision.reason}; "
                  + ", ".join(f"{n} {a.last}" for n, a in answers.items()))
        self.event(31, chosen, new_epoch)
        for node in live:
            self.net.send_reliable(now, LEADER, node, Kind.ASSIGNMENT, (self.assignment,))

    # -- clients ----------------------------------------------------------------------------

    def on_client_message(self, client: int, kind: int, body: tuple[object, ...]) -> None:
        (write_id,) = body
        assert isinstance(write_id, int)
        outstanding = self.client_writes[client]
        if write_id not in outstanding:
            return
        if kind == Kind.WRITE_ACK:
            del outstanding[write_id]
        else:
            assert kind == Kind.WRITE_REFUSED, kind
            self.counters["writes_refused"] += 1
            outstanding[write_id] = min(outstanding[write_id], self.now + 2)

    def tick_client(self, client: int) -> None:
        now = self.now
        outstanding = self.client_writes[client]
        for write_id, resend_at in outstanding.items():
            if now >= resend_at:
                # A timeout or a refusal: refresh the cached assignment (WatchAssignments),
                # then retry the same write id.
                self.client_view[client] = self.assignment.primary
                self.send_write(client, write_id)
        if not self.healing and len(outstanding) < self.client_window and self.rng.random() < self.write_p:
            write_id = self.next_write_id
            self.next_write_id += 1
            self.counters["writes_started"] += 1
            self.send_write(client, write_id)

    def send_write(self, client: int, write_id: int) -> None:
        self.client_writes[client][write_id] = self.now + CLIENT_TIMEOUT
        primary = self.client_view[client]
        if primary is not None:
            self.net.send(self.now, client_address(client), primary, Kind.WRITE, (client, write_id))

    # -- faults -----------------------------------------------------------------------------

    def inject_fault(self) -> None:
        rng = self.rng
        kinds = ["crash", "crash", "pause", "pause", "partition"]
        if not self.disk_lost:
            kinds.append("lose")
        kind = rng.choice(kinds)
        primary = self.assignment.primary
        node = primary if primary is not None and rng.random() < self.primary_bias else rng.randrange(self.n)
        if self.status[node] != Status.UP:
            return
        self.impaired[node] = kind
        self.fault_over_at[node] = 10**9
        self.event(40, node, len(kind))
        if kind in ("crash", "lose"):
            self.status[node] = Status.CRASHED
            self.forget_volatile(node)
            self.restart_at[node] = self.now + rng.randint(2, 2 * TTL)
            if kind == "lose":
                self.disk_lost = True
                self.counters["disks_lost"] += 1
                self.positions[node], self.write_ids[node], self.fenced[node] = [], [], 0
                self.index[node] = {}
                self.generation[node] += 1
            else:
                self.counters["crashes"] += 1
            # The kernel resets the dead process's sockets: the leader sees its stream close.
            self.net.send_reliable(self.now, node, LEADER, Kind.STREAM_CLOSED, (node, self.inc[node]))
            self.note(f"FAULT n{node + 1} {'loses its disk and ' if kind == 'lose' else ''}crashes "
                      f"(restart at {self.restart_at[node]})")
        elif kind == "pause":
            self.status[node] = Status.PAUSED
            self.resume_at[node] = self.now + rng.randint(3, 3 * TTL)
            self.counters["pauses"] += 1
            self.note(f"FAULT n{node + 1} pauses (resume at {self.resume_at[node]})")
        else:
            until = self.now + rng.randint(CRASH_GRACE + 2, 2 * TTL)
            self.net.cut_from_leader[node] = until
            self.fault_over_at[node] = until
            # A stream reset without a crash (e.g. a middlebox): the leader takes it for one.
            self.stream_closed_notice(node)
            self.counters["partitions"] += 1
            self.note(f"FAULT n{node + 1} is cut off from the leader until {until}")

    def stream_closed_notice(self, node: int) -> None:
        inc = self.leader_registered[node]
        if inc is not None:
            self.stream_closed[node] = (inc, self.now)

    def restart(self, node: int) -> None:
        self.status[node] = Status.UP
        self.fault_over_at[node] = self.now
        self.forget_volatile(node)
        self.inc[node] += 1
        self.index[node] = {w: k + 1 for k, w in enumerate(self.write_ids[node])}
        self.counters["restarts"] += 1
        self.note(f"n{node + 1} restarts with {self.last(node)} fenced at {self.fenced[node]}")
        self.event(41, node, self.inc[node])
        self.send_register(node)

    def resume(self, node: int) -> None:
        self.status[node] = Status.UP
        self.fault_over_at[node] = self.now
        self.note(f"n{node + 1} resumes (role {self.role[node].name} at epoch {self.epoch[node]})")
        self.event(42, node)
        for src, dst, kind, body in self.held[node]:
            self.net.requeue(self.now, src, dst, kind, body)
        self.held[node] = []

    def update_faults(self) -> None:
        now = self.now
        for node in range(self.n):
            status = self.status[node]
            if status == Status.CRASHED and (self.healing or now >= self.restart_at[node]):
                self.restart(node)
            elif status == Status.PAUSED and (self.healing or now >= self.resume_at[node]):
                self.resume(node)
        if self.healing:
            for node in self.net.cut_from_leader:
                self.fault_over_at[node] = min(self.fault_over_at[node], now)
            self.net.cut_from_leader.clear()
        for node, kind in list(self.impaired.items()):
            if self.status[node] != Status.UP:
                continue
            if kind == "partition" and self.net.cut_from_leader.get(node, -1) > now:
                continue
            if self.leader_registered[node] != self.inc[node] or self.leader_heard_at[node] <= self.fault_over_at[node]:
                # Until the leader has heard from it since the fault ended, the node may still
                # be out of the shard as far as promotion goes (its lease may yet expire: not
                # fenced, not waited for); a second node out would be two faults, beyond what
                # I4 promises.
                continue
            if kind == "lose" and any(r.write_id not in self.index[node] for r in self.checker.acked):
                continue
            del self.impaired[node]
        if not self.healing and not self.impaired and self.rng.random() < self.fault_p:
            self.inject_fault()

    # -- the loop ---------------------------------------------------------------------------

    def deliver(self) -> None:
        for _, _, src, dst, kind, body in self.net.due(self.now):
            self.event(kind, src, dst)
            if dst == LEADER:
                self.on_leader_message(src, kind, body)
            elif dst >= 0:
                status = self.status[dst]
                if status == Status.PAUSED:
                    self.held[dst].append((src, dst, kind, body))
                    self.counters["messages_held"] += 1
                elif status == Status.UP:
                    self.on_node_message(dst, src, kind, body)
            else:
                self.on_client_message(-2 - dst, kind, body)

    def step(self) -> None:
        self.checker.now = self.now
        self.update_faults()
        self.deliver()
        self.tick_leader()
        for node in range(self.n):
            if self.status[node] == Status.UP:
                self.tick_node(node)
        for client in range(self.clients):
            self.tick_client(client)
        self.check()
        self.now += 1

    def check(self) -> None:
        primary = self.assignment.primary
        if (primary is not None and self.role[primary] == Role.PRIMARY and self.status[primary] == Status.UP
                and self.epoch[primary] == self.assignment.epoch and self.inc[primary] == self.assignment.primary_inc):
            self.checker.check_serving_primary(primary, self.assignment.epoch, self.generation[primary],
                                               self.index[primary])

    def converged(self) -> bool:
        primary = self.assignment.primary
        if primary is None or self.role[primary] != Role.PRIMARY or self.epoch[primary] != self.assignment.epoch:
            return False
        if any(self.client_writes):
            return False
        target = self.last(primary)
        return all(self.status[n] == Status.UP and self.registered[n] and self.last(n) == target
                   for n in range(self.n))

    def run(self) -> SimResult:
        checker = self.checker
        while self.now < self.steps and not checker.violations:
            self.step()
        if not checker.violations:
            self.healing = True
            self.net.config.drop_p = 0.0
            self.net.config.dup_p = 0.0
            self.note("HEAL: faults end, the network stops losing messages, clients finish")
            heal_until = self.now + HEAL_MAX_TICKS
            while not checker.violations and not self.converged():
                if self.now >= heal_until:
                    checker.fail(f"no convergence within {HEAL_MAX_TICKS} ticks of healing: "
                                 + self.describe())
                    break
                self.step()
        if not checker.violations:
            checker.check_healed(list(zip(self.positions, self.write_ids, strict=True)))
        counters = self.counters
        counters["ticks"] = self.now
        counters["messages_sent"] = self.net.sent
        counters["messages_dropped"] = self.net.dropped
        counters["messages_duplicated"] = self.net.duplicated
        return SimResult(self.seed, list(checker.violations), counters, self.digest, self.now, self.trace or [])

    def describe(self) -> str:
        a = self.assignment
        nodes = "; ".join(
            f"n{n + 1} {self.status[n].name} {self.role[n].name} e{self.epoch[n]} fenced {self.fenced[n]} "
            f"last {self.last(n)} inc {self.inc[n]}/{self.leader_registered[n]}"
            for n in range(self.n)
        )
        return f"assignment epoch {a.epoch} primary n{(a.primary or 0) + 1}; {nodes}"


def run_seed(seed: int, *, steps: int = DEFAULT_STEPS, breaks: str | None = None, trace: bool = False) -> SimResult:
    """Simulate one schedule: ``steps`` faulty ticks, then healing until convergence.

    Deterministic: the same (seed, steps, breaks) gives the same result and digest, in any
    process. ``breaks`` names a planted bug from :data:`tests.sim.rules.BREAKS`;
    ``trace`` keeps a readable log of the notable events in ``SimResult.trace``.
    """
    return Sim(seed, steps, rules_for(breaks), trace).run()


@dataclass
class RangeResult:
    """Seeds ``start .. start+count-1`` run one after the other: summed counters, and the
    violations of each failing seed (ascending)."""

    counters: dict[str, int]
    failures: list[tuple[int, list[str]]]


def run_range(start: int, count: int, *, steps: int = DEFAULT_STEPS, breaks: str | None = None) -> RangeResult:
    """Run a range of seeds in this process (the unit of work of a multiprocessing pool)."""
    counters: dict[str, int] = {}
    failures: list[tuple[int, list[str]]] = []
    for seed in range(start, start + count):
        result = run_seed(seed, steps=steps, breaks=breaks)
        for name, value in result.counters.items():
            counters[name] = counters.get(name, 0) + value
        if result.violations:
            failures.append((seed, result.violations))
    return RangeResult(counters, failures)
