"""The leader's reconcile loop: observe, plan (pure), write the plan in a guarded txn.

One round:

1. Observe: live nodes, current assignments and the ring from the replica's mirrors
   (:mod:`controlplane.store.watchcache`), the config from etcd.
2. Hold (see below), or go on.
3. Probe new nodes: a node is given a role only once it has answered
   ``ShardNode.GetShardStatus`` under its current registration (a registration with an
   unreachable address would otherwise be handed primaries that nobody can reach).
   Nodes that already hold roles stay in the plan whatever the probe says: whether
   they are alive is the lease's business.
4. Fence, then choose (DESIGN.md flow 4), for every shard whose primary is lost: its
   lease ended, or it registered again (a new *incarnation*: the lease id recorded for
   it in the assignment's ``incarnations`` is no longer its node record's). See
   "Promotion" below.
5. Plan with :func:`bluemarble.core.placement.plan_assignments` (pure; decisions are data).
6. Write the changed records in etcd transactions guarded by the leader key's
   create_revision (the fencing token) and by each record's mod_revision, so a deposed
   leader or a concurrent writer changes nothing. Every record written carries each
   member's current registration (lease id) in ``incarnations``; a record whose replica
   registered again is rewritten with its new lease id (the replica keeps its role: its
   disk log is still a valid prefix). Records written before incarnations existed count
   as current and are stamped on their next write. A failed write makes the election
   re-check the leader key (:meth:`Election.verify`): a deposed leader steps down instead
   of replanning forever. Then wait until the mirror shows the write, so the next round
   plans from it.

Rounds run when a mirror changes (node joined, died, drained; assignment written) and at
least every ``tick_s``, with changes coalesced for ``debounce_s``; a round whose inputs
(mirror revisions, config revision, leadership, probed nodes) are those of the last
converged round is skipped, since planning is a pure function of them.

**Holds.** Moves are held (nothing is planned) while the world is known to be coming
back rather than changing:

* after an etcd outage (a mirror was unhealthy, or etcd could not be read), and after a
  mass expiry (at least ``mass_expiry_fraction`` of the nodes, and at least 2, gone
  within one lease TTL): every lease may have expired with no node actually dead, and the
  nodes re-register within about a heartbeat interval. Moving shards to the first nodes
  back would cost epoch bumps and copies for nothing (Helix's delayed rebalancer and
  maintenance mode make the same trade);
* at the start of a leader term while fewer than R nodes are live, for 3 s (a forming,
  or wholly restarted, cluster gets one placement, not a cascade of moves);
* at the start of a leader term while a node the assignments name is not registered: no
  control plane may have answered heartbeats for a while (the only replica restarting),
  so more leases may be about to run out, one after another, as the nodes' retries come
  too late. Such a hold waits for the named nodes to register again for one lease TTL
  (a lease alive at the term's start ends within it), then ends as soon as every named
  node is live; it lasts at most 1.5 TTL. With two control-plane replicas a leader's
  crash leaves every lease refreshed by the other one, and failover is not delayed.

A hold lasts ``hold_s`` (default: twice the lease TTL, at least 5 s) and ends early as
soon as every node named in the current assignments is live again (and R nodes are). A
node whose lease expired learns it on its next heartbeat (TTL/3 later) and registers at
once, but etcd's lessor, the node's backoff and a busy machine add up: one TTL proved too
tight in tests. The cost: a node that really died in the same window is failed over up
to ``hold_s`` later.

**Promotion.** For each shard whose primary is lost, at ``new_epoch = epoch + 1``: every
live *candidate* (its live replicas, and the old primary itself when it is live under a
new registration: its disk may hold the newest entries) gets ``ShardNode.Fence`` with
the new epoch, all lost shards of a node in one call with a short deadline. Only then
are positions read, from the fence answers. Then:

* a candidate that does not answer delays that shard's promotion to a later round (until
  it answers, or its lease ends and it stops being a candidate);
* the greatest ``(epoch, lsn)`` of the last entry wins among the candidates that hold
  data (ties: smallest node id), not the greatest lsn: a deposed primary's longer log
  holds entries nobody acknowledged;
* when the candidates answered and none holds data, the shard stays without a primary
  (logged) rather than promote an empty copy over data that may come back with a node;
* a shard with no live candidate at all falls to placement's rule: a fresh primary, and
  the move says the data may be lost.

The new assignment, with the bumped epoch, is written in the guarded transaction above.

**Unreadable assignment records** (a value that does not decode) are replaced, not
skipped: the shard is treated as having lost its primary, and its new record gets an
epoch above the key's etcd ``version``. Every write of an assignment raises its epoch by
at most one, and assignment records are never deleted (etcd restarts ``version`` at 1 for
a re-created key), so ``version`` bounds every epoch the key ever held and the new epoch
still fences every earlier primary. Logged once per record version.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import structlog

from bluemarble.api.conversions import (
    assignment_from_proto,
    assignment_incarnations,
    assignment_to_proto,
    holds_role,
    placement_node_from_proto,
)
from bluemarble.core.errors import BlueMarbleError
from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.limits import MAX_LOG_COUNTER
from bluemarble.core.placement import (
    Move,
    MoveKind,
    PlacementConfig,
    PlacementNode,
    PlacementPlan,
    Positions,
    ShardAssignment,
    handoffs_of,
    keep_copies,
    plan_assignments,
    replica_moves_of,
    without_shards,
)
from bluemarble.core.placement.repair import down_replicas_that_may_hold_more, unsafe_outside_copies
from bluemarble.core.replication.position import LogPosition
from bluemarble.core.replication.primary import required_acks_for
from bluemarble.core.ring import Ring
from bluemarble.runtime import background, metrics, retry
from bluemarble.runtime.clock import Clock, SystemClock, wait_event
from bluemarble.v1 import common_pb2, controlplane_pb2, shardnode_pb2
from controlplane.server.election import Election, Leadership
from controlplane.server.node_probe import CopyView, NodeProbe
from controlplane.store import codec
from controlplane.store.config_store import ConfigStore
from controlplane.store.etcd import Compare, EtcdStore, Put
from controlplane.store.keys import KeySchema
from controlplane.store.records import decode_assignment
from controlplane.store.ring_store import ensure_ring
from controlplane.store.watchcache import PrefixCache

log = structlog.get_logger(__name__)

# etcd refuses transactions with more than 128 operations by default (--max-txn-ops).
_MAX_WRITES_PER_TXN = 100
_MIN_HOLD_S = 5.0
CATCH_UP_GRACE_S = 10.0
"""A replica role younger than this takes no primary by a rebalancing handoff: it may
still be copying the shard. Rounds that must repair (failover, drain, a lost replica) are
not held by it."""
_OUTAGE_SETTLE_S = 3.0
"""After an etcd outage, how long the leases it made expire take to be seen gone (etcd
revokes expired leases within about a second of resuming, and the watch tells us): from
then on the outage's hold waits only for the nodes that are not live."""
_FORMING_HOLD_S = 3.0
"""Hold at the start of a leader term while fewer than R nodes are live: a forming (or
wholly restarted) cluster gets one placement, not a cascade of moves; nodes of a forming
cluster are registering already, not waiting for leases to expire."""
STALL_CHECK_INTERVAL_S = 5.0
"""How often the leader asks the nodes that lead shards how their primaries stand."""
STALL_CONFIRM_S = 5.0
"""A primary fenced above its assignment's epoch, not serving, for this long is replaced
through promotion (it waits for an assignment past that epoch, which only a promotion
writes)."""
MAX_STALL_CHECK_NODES = 256
"""Nodes asked per check at most (the rest at the next checks, round robin)."""
SUCCESSOR_WAIT_WARNING_S = 30.0
"""A new primary (or replica) that cannot take over after this long is logged (once): the
copy it replaces stays meanwhile (bluemarble.core.placement.handoff)."""
CAUGHT_UP_ENTRIES = 64
"""A new replica this close to its primary (in entries) can stand in for the copy kept for
it: it acknowledges writes as fast as they come."""
UNWRITTEN_PIN_S = 10.0
"""A kept copy whose plan the mirror never showed (its write failed), or whose successor a
later round moved away, is forgotten after this long."""

_MAX_PROBES_PER_S = 32
"""New registrations probed per second at most (a token bucket of that size): a mass join
of thousands of nodes is verified over some seconds instead of in bursts, since rounds run
every 50 ms while shards wait for a primary."""
_PROBE_RETRY_FIRST_S = 1.0
_PROBE_RETRY_MAX_S = 60.0
_UNANSWERED_WARNING_EVERY_S = 60.0
_MAX_UNREADABLE_LOGGED = 4096
_MAX_PROMOTION_NOTES = 4096


@dataclass(frozen=True)
class Promotions:
    """What fencing decided for the shards whose primary is lost, in one round.

    ``positions``: ``(epoch, lsn)`` of each fenced candidate holding data, for the planner.
    ``ready``: lost shards that may be promoted now (their candidates, old primary included,
    as the planner's replicas, at ``new_epoch - 1`` so promotion writes ``new_epoch``).
    ``waiting``: shards whose promotion waits for a later round (a candidate did not
    answer, or answered a higher fenced epoch). ``stuck``: shards whose live candidates
    hold no data; they stay without a primary until that changes.
    """

    positions: Positions
    ready: dict[ShardId, ShardAssignment]
    waiting: frozenset[ShardId]
    stuck: frozenset[ShardId]


@dataclass
class _Pin:
    """A copy a plan gave up, kept until what replaces it can take over
    (bluemarble.core.placement.handoff): the old primary of a handoff until ``successor``
    serves as the primary at ``epoch``, or the source of a replica move until
    ``successor``, the new replica, has copied the shard."""

    former: NodeId
    successor: NodeId
    handoff: bool  # True: a handoff to the primary ``successor``; False: a replica move
    epoch: int  # the assignment's epoch in the plan
    since_s: float
    warned: bool = False


def _takes_over(status: common_pb2.ShardStatus, shard: ShardId, pin: _Pin) -> bool:
    """Whether ``status`` (the successor's, of some shard) shows it can take over from
    the copy kept for it: a new primary serving at its epoch; a new replica done copying
    and following its primary closely (or the shard's serving primary by now)."""
    if status.shard_id != shard or not status.serving:
        return False
    if status.role == common_pb2.SHARD_ROLE_PRIMARY:
        return status.epoch >= pin.epoch
    return (not pin.handoff and status.role == common_pb2.SHARD_ROLE_REPLICA and not status.copying
            and status.lag_entries <= CAUGHT_UP_ENTRIES)


def _counts_no_more(
    head: CopyView | None, node: NodeId, holder: NodeId, before: ShardAssignment, live: Collection[NodeId]
) -> bool:
    """Whether nothing ``node`` acknowledges from now on can count for a write of the
    shard: it is the holder of every acknowledged write itself, or was the primary (a
    primary acknowledges nothing), or is gone (its lease ended: it crashed or left, and
    acknowledged nothing after the holder's position was read), or the holder answered,
    as the primary, without it among the replicas whose acknowledgements it counts. A live
    replica the primary still counts could acknowledge a write past the position the
    staying replicas were checked against, and its copy must stay where a promotion looks
    (docs/decisions.md)."""
    if node in (holder, before.primary) or node not in live:
        return True
    return head is not None and head.counts is not None and node not in head.counts


@dataclass
class _ProbeState:
    """Probe bookkeeping for one registration (node id + lease id) that has not answered."""

    failures: int = 0
    next_probe_s: float = 0.0


class Reconciler:
    def __init__(
        self,
        *,
        store: EtcdStore,
        keys: KeySchema,
        election: Election,
        nodes: PrefixCache[common_pb2.Node],
        assignments: PrefixCache[common_pb2.Assignment],
        ring: PrefixCache[Ring],
        configs: ConfigStore,
        probe: NodeProbe,
        clock: Clock | None = None,
        tick_s: float = 1.0,
        debounce_s: float = 0.05,
        min_round_interval_s: float = 1.0,
        hold_s: float | None = None,
        mass_expiry_fraction: float = 1 / 3,
        probe_new_nodes: bool = True,
        forced: PrefixCache[controlplane_pb2.ForcePromoteRequest] | None = None,
        plan_off_loop: bool = True,
    ):
        self._store = store
        self._plan_off_loop = plan_off_loop
        self._forced = forced  # ForcePromote requests (service.py), by shard
        self._keys = keys
        self._election = election
        self._nodes = nodes
        self._assignments = assignments
        self._ring = ring
        self._configs = configs
        self._probe = probe
        self._clock = clock or SystemClock()
        self._round_failures = retry.FailureLog()  # one warning per outage, then summaries
        self._tick_s = tick_s
        self._hold_s_override = hold_s
        self._mass_expiry_fraction = mass_expiry_fraction
        self._probe_new_nodes = probe_new_nodes
        self._debounce_s = debounce_s
        self._min_round_interval_s = min_round_interval_s
        self._last_round = -math.inf
        # Inputs of the last round that found nothing to change.
        self._settled: tuple[object, ...] | None = None
        self._term: Leadership | None = None
        self._hold_until_s = -math.inf
        self._hold_reason = ""
        self._hold_from_revision = 0  # node records written after this count as back
        self._hold_must_return: set[NodeId] | None = set()
        self._outage_settled_s = -math.inf  # an outage's hold waits for re-registrations until then
        self._replica_since: dict[tuple[ShardId, NodeId], float] | None = None  # see _catching_up
        self._waiting_logged_s = -math.inf
        # When this replica last saw etcd unhealthy (None: not since the last hold began).
        self._outage_seen_s: float | None = None
        self._live: set[NodeId] = set()
        self._live_revision = -1  # nodes mirror revision _live was computed at
        self._departures: collections.deque[tuple[float, NodeId]] = collections.deque()
        self._live_addresses: dict[NodeId, str] = {}
        self._departed_addresses: dict[NodeId, str] = {}  # of departures not yet checked
        # Departed nodes found refusing connections (their process is gone), until they are
        # live again: a hold does not wait for them (they do not come back on their own).
        self._crashed: set[NodeId] = set()
        self._verified: set[tuple[NodeId, int]] = set()
        self._verified_changes = 0  # bumped whenever _verified changes (an input of a round)
        self._probe_tokens = float(_MAX_PROBES_PER_S)
        self._probe_tokens_at = -math.inf
        self._unverified: dict[tuple[NodeId, int], _ProbeState] = {}
        self._unanswered_log = retry.LogThrottle(interval_s=_UNANSWERED_WARNING_EVERY_S)
        self._unreadable_logged: set[tuple[str, int]] = set()
        self._promotion_notes: set[tuple[ShardId, int, str]] = set()  # logged once each
        self._fence_floor: dict[ShardId, int] = {}  # higher fenced epochs nodes reported
        # Epochs nodes reported holding (assigned, or of their last entry), by shard: a
        # record below one is older than what the nodes saw (etcd restored from a
        # snapshot, a record deleted by hand), and its next epoch must be above it.
        self._held_epochs: dict[ShardId, int] = {}
        self._held_epochs_asked: tuple[tuple[object, ...], frozenset[ShardId]] | None = None
        self._behind_logged: set[tuple[ShardId, int]] = set()
        self._stall_checked_s = -math.inf
        self._stall_cursor = 0  # round robin over the nodes that lead shards
        self._stall_seen: dict[tuple[ShardId, int], float] = {}  # (shard, epoch) -> first seen stalled
        self._stalled: set[tuple[ShardId, int]] = set()  # confirmed: promote past them
        # Copies kept until what replaces them can take over, by (shard, kept node, successor).
        self._pins: dict[tuple[ShardId, NodeId, NodeId], _Pin] = {}
        self._kept_unmatched: set[tuple[ShardId, NodeId]] = set()  # logged once while kept
        self._observed: dict[ShardId, ShardAssignment] = {}
        self._retained_now: dict[ShardId, tuple[NodeId, ...]] = {}  # this round's, by shard
        # Lost shards whose members hold no copy: their next fence asks every live node.
        self._widened: set[ShardId] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0
        self.writes = 0
        for cache in (nodes, assignments, ring):
            cache.add_listener(self._on_change)
        election.add_listener(self._wake.set)

    async def start(self) -> None:
        self._task = background.start(self._run(), "reconciler")

    async def stop(self) -> None:
        await background.stop(self._task)
        self._task = None

    @property
    def holding(self) -> str:
        """Why moves are held right now ("" when they are not)."""
        return self._hold_reason if self._clock.monotonic_s() < self._hold_until_s else ""

    def _on_change(self) -> None:
        # Cheap on purpose: this runs on every node record change (thousands in a
        # registration burst). Departures are counted when the loop wakes, once a burst.
        if not all(c.healthy for c in (self._nodes, self._assignments, self._ring)):
            self._outage_seen_s = self._clock.monotonic_s()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            self._track_health_and_departures()
            leadership = self._election.leadership
            if leadership is not None:
                await self._clock.sleep(self._debounce_s)  # let a burst of changes land
                self._wake.clear()
                self._track_health_and_departures()
                gap_s = self._min_round_interval_s - (self._clock.monotonic_s() - self._last_round)
                if gap_s > 0 and not self.needs_repair():
                    # Only balance is at stake (e.g. nodes joining): pace the rounds, but
                    # wake at once if a repair becomes necessary.
                    await wait_event(self._clock, self._wake, gap_s)
                    continue
                rounds = self.rounds
                try:
                    await self.reconcile_once(leadership)
                except asyncio.CancelledError:
                    raise
                except BlueMarbleError as e:
                    if e.retryable:
                        self._outage_seen_s = self._clock.monotonic_s()
                    self._round_failures.failed("round", self._clock.monotonic_s(), "reconcile round failed",
                                                error=str(e))
                except Exception:
                    log.exception("reconcile round crashed (this is a bug); retrying next tick")
                if self.rounds != rounds:
                    self._last_round = self._clock.monotonic_s()
                    self._round_failures.recovered("round", self._last_round, "reconcile rounds run again")
            await wait_event(self._clock, self._wake, self._tick_s)

    def needs_repair(self) -> bool:
        """Whether some shard is missing, or names a node that is gone or draining: a
        round must run now (failover, replacement, drain), not only rebalance."""
        live = {n.node_id for n in self._nodes.entries.values() if n.state != common_pb2.NODE_STATE_DRAINING}
        ring = self._ring.entries.get(self._keys.ring())
        placeable_exists = bool(self._verified) or not self._probe_new_nodes
        if placeable_exists and ring is not None and len(self._assignments.entries) < len(ring.shard_ids):
            # Shards without a record can only be placed once a node has answered a probe:
            # registrations that never answer must not make every round urgent.
            return True
        return any(
            a.primary not in live
            or any(r not in live for r in a.replicas)
            or self._stale_incarnation(a) is not None
            for a in self._assignments.entries.values()
        )

    def _lease_of(self, node: str) -> int | None:
        record = self._nodes.entries.get(self._keys.node(NodeId(node)))
        return None if record is None else record.lease_id

    def _stale_incarnation(self, a: common_pb2.Assignment) -> NodeId | None:
        """A live member of ``a`` registered again since it was given its role (the
        primary first), or None. Records without incarnations count as current."""
        if not a.incarnations:
            return None
        for member in (a.primary, *a.replicas) if a.primary else a.replicas:
            recorded = a.incarnations.get(member)
            lease = self._lease_of(member)
            if recorded is not None and lease is not None and recorded != lease:
                return NodeId(member)
        return None

    # ---- holds ----

    def _track_health_and_departures(self) -> None:
        """Notes etcd outages (a mirror unhealthy) and node departures as they happen."""
        now = self._clock.monotonic_s()
        if not all(c.healthy for c in (self._nodes, self._assignments, self._ring)):
            self._outage_seen_s = now
            return
        if self._nodes.revision == self._live_revision:
            gone: set[NodeId] = set()
        else:
            addresses = {NodeId(n.node_id): n.address for n in self._nodes.entries.values()}
            live = set(addresses)
            gone, self._live, self._live_revision = self._live - live, live, self._nodes.revision
            self._crashed -= live
            for node in gone:
                self._departed_addresses[node] = self._live_addresses.get(node, "")
            self._live_addresses = addresses
        for node in sorted(gone):
            self._departures.append((now, node))
        while self._departures and self._departures[0][0] < now - self._hold_s():
            self._departures.popleft()

    async def _discount_crashes(self) -> None:
        """Drops from the departures (what a mass-expiry hold counts) the nodes whose
        address now refuses connections: their process is gone, they are not coming back
        on their own, and holding their failover would only prolong the outage. An etcd
        hiccup leaves live processes behind, which still accept connections (and nodes
        behind a partition time out): those still count."""
        pending = {node: address for node, address in self._departed_addresses.items() if address}
        self._departed_addresses.clear()
        if not pending:
            return
        refused = await asyncio.gather(*(self._probe.refuses_connections(a) for a in pending.values()))
        crashed = {node for node, dead in zip(pending, refused, strict=True) if dead}
        if crashed:
            log.info("departed nodes refuse connections (their processes are gone): not a mass expiry, "
                     "and no hold waits for them", nodes=sorted(crashed))
            self._departures = collections.deque((t, n) for t, n in self._departures if n not in crashed)
            self._crashed |= crashed

    def _hold_s(self) -> float:
        if self._hold_s_override is not None:
            return self._hold_s_override
        return max(_MIN_HOLD_S, 2.0 * self._election.ttl_s)

    def _start_hold(
        self, reason: str, hold_s: float | None = None, *, must_return: set[NodeId] | None = None,
        settle_s: float = _OUTAGE_SETTLE_S,
    ) -> None:
        """Holds moves for ``hold_s`` (default :meth:`_hold_s`); it ends early once every
        node named in the assignments is live and R are, and every node of
        ``must_return`` has *registered again* since now. ``must_return`` None (an etcd
        outage) means every named node for ``settle_s``: right after etcd
        resumes, the records of leases about to expire are still listed, and "every node is
        live" would end the hold a moment before they vanish. After that, the records left
        are of leases that survived (a node whose lease survived never registers again, and
        the hold used to run its full length, keeping the shards of the nodes that did
        register again without a primary for it)."""
        hold_s = self._hold_s() if hold_s is None else hold_s
        until = self._clock.monotonic_s() + hold_s
        if until > self._hold_until_s:
            if self.holding:  # extend the hold in force: whoever it waits for still counts
                previous = self._hold_must_return
                must_return = None if previous is None or must_return is None else previous | must_return
            else:
                self._hold_from_revision = self._nodes.revision
            self._hold_until_s, self._hold_reason = until, reason
            self._hold_must_return = must_return
            if must_return is None:
                self._outage_settled_s = self._clock.monotonic_s() + settle_s
            log.info("holding placement moves while nodes come back", reason=reason, hold_s=hold_s)

    def _held(self, nodes: Sequence[PlacementNode], current: dict[ShardId, ShardAssignment],
              replication_factor: int, new_term: bool) -> bool:
        """Whether this round must place nothing (see the module docstring)."""
        if self._outage_seen_s is not None:
            # Only an outage recent enough for leases to be expiring because of it: a
            # follower that saw one long ago and is elected now has nothing to wait for.
            remaining_s = self._hold_s() - (self._clock.monotonic_s() - self._outage_seen_s)
            self._outage_seen_s = None
            if remaining_s > 0:
                self._start_hold("this replica lost touch with etcd (etcd down or slow, or this process paused)",
                                 remaining_s)
        peak = max(len(self._live) + len(self._departures), 1)
        if len(self._departures) >= max(2, math.ceil(peak * self._mass_expiry_fraction)):
            self._start_hold(
                f"{len(self._departures)} nodes left within {self._hold_s():g} s",
                must_return={node for _, node in self._departures},
            )
            self._departures.clear()
        eligible = sum(1 for n in nodes if not n.draining)
        # Nodes whose process is gone are not waited for: they fail over as a crash does.
        named = {m for a in current.values() for m in a.members} - self._crashed
        named_missing = named - {n.node_id for n in nodes}
        if new_term and named_missing:
            ttl_s = self._election.ttl_s
            self._start_hold(
                f"new leader term while {len(named_missing)} node(s) the assignments name are not registered "
                "(leases may have run out while no control plane answered heartbeats)",
                1.5 * ttl_s,
                must_return=None,
                settle_s=ttl_s,
            )
        if new_term and eligible < replication_factor:
            self._start_hold(
                f"new leader term with {eligible} of {replication_factor} nodes live",
                _FORMING_HOLD_S,
                must_return=set(),
            )
        if not self.holding:
            return False
        live = {n.node_id for n in nodes}
        fresh = {
            n.node_id
            for n in nodes
            if self._nodes.mod_revisions.get(self._keys.node(n.node_id), 0) > self._hold_from_revision
        }
        if self._hold_must_return is not None:
            must_return = self._hold_must_return - self._crashed
        else:  # an outage's hold (see _start_hold)
            must_return = named if self._clock.monotonic_s() < self._outage_settled_s else set()
        if named <= live and must_return <= fresh and eligible >= replication_factor:
            log.info("every node is back; ending the hold", reason=self._hold_reason)
            self._hold_until_s = -math.inf
            return False
        return True

    # ---- new nodes ----

    def _take_probe_tokens(self, now: float) -> int:
        """Refills the probe bucket for the time passed; returns the probes allowed now."""
        elapsed_s = max(0.0, now - self._probe_tokens_at)
        self._probe_tokens = min(_MAX_PROBES_PER_S, self._probe_tokens + elapsed_s * _MAX_PROBES_PER_S)
        self._probe_tokens_at = now
        return int(self._probe_tokens)

    async def _check_stalled_primaries(self) -> None:
        """Every :data:`STALL_CHECK_INTERVAL_S`, asks the nodes that lead shards for their
        status. A primary fenced above its assignment's epoch has stopped writing for good
        (a replica or a Fence showed it a newer epoch) and waits for an assignment past
        that epoch, which only a promotion writes; a leader sees a live node and does
        nothing. Seen so for :data:`STALL_CONFIRM_S`, the shard goes through promotion,
        the primary among its candidates (as a primary that registered again)."""
        now = self._clock.monotonic_s()
        if now - self._stall_checked_s < STALL_CHECK_INTERVAL_S:
            return
        self._stall_checked_s = now
        epochs: dict[ShardId, tuple[NodeId, int]] = {}
        for a in self._assignments.entries.values():
            if a.primary:
                epochs[ShardId(a.shard_id)] = (NodeId(a.primary), a.epoch)
        leaders = sorted({node for node, _ in epochs.values()})
        addresses: dict[NodeId, str] = {}
        for i in range(min(len(leaders), MAX_STALL_CHECK_NODES)):
            node = leaders[(self._stall_cursor + i) % len(leaders)]
            record = self._nodes.entries.get(self._keys.node(node))
            if record is not None:
                addresses[node] = record.address
        self._stall_cursor += len(addresses)
        answers = await self._probe.statuses(addresses) if addresses else {}
        stalled_now: set[tuple[ShardId, int]] = set()
        for node, answer in answers.items():
            for status in answer.shards:
                shard = ShardId(status.shard_id)
                if epochs.get(shard) != (node, status.epoch) or status.role != common_pb2.SHARD_ROLE_PRIMARY:
                    continue
                if status.fenced_epoch > status.epoch and not status.serving:
                    stalled_now.add((shard, status.epoch))
        asked = set(addresses)
        for key in list(self._stall_seen):
            if key not in stalled_now and epochs.get(key[0], (None, 0))[0] in asked:
                del self._stall_seen[key]  # answered, and no longer stalled
        for key in stalled_now:
            first = self._stall_seen.setdefault(key, now)
            if now - first >= STALL_CONFIRM_S and key not in self._stalled:
                self._stalled.add(key)
                self._verified_changes += 1  # an input of the rounds: plan again
                log.warning("a primary is fenced above its epoch and writes nothing; promoting past it",
                            shard=key[0], epoch=key[1], node_id=epochs[key[0]][0])
        self._stalled = {key for key in self._stalled if epochs.get(key[0], (None, 0))[1] == key[1]}

    def _probe_due(self) -> bool:
        """Whether a registration that did not answer yet is due for another probe."""
        now = self._clock.monotonic_s()
        return any(state.next_probe_s <= now for state in self._unverified.values())

    async def _verify_new_nodes(self, records: Sequence[common_pb2.Node], holders: set[NodeId]) -> set[NodeId]:
        """Probes registrations not seen answering yet; returns the node ids that may get
        new roles (answered, or already holding roles)."""
        if not self._probe_new_nodes:
            return {NodeId(n.node_id) for n in records}
        now = self._clock.monotonic_s()
        current = {(NodeId(n.node_id), n.lease_id): n.address for n in records}
        if not self._verified <= current.keys():
            self._verified &= current.keys()
            self._verified_changes += 1
        for key in list(self._unverified):
            if key not in current:
                del self._unverified[key]
        due = dict(
            itertools.islice(
                (
                    (key, address)
                    for key, address in current.items()
                    if key not in self._verified
                    and key[0] not in holders
                    and self._unverified.setdefault(key, _ProbeState()).next_probe_s <= now
                ),
                self._take_probe_tokens(now),
            )
        )
        self._probe_tokens -= len(due)
        if due:
            answered = await self._probe.reachable({key[0]: address for key, address in due.items()})
            for key in due:
                if key[0] in answered:
                    self._verified.add(key)
                    self._verified_changes += 1
                    self._unverified.pop(key, None)
                    continue
                state = self._unverified[key]
                state.failures += 1
                state.next_probe_s = now + min(_PROBE_RETRY_MAX_S, _PROBE_RETRY_FIRST_S * 2 ** (state.failures - 1))
                if state.failures == 1:
                    self._log_unanswered(now, key[0], due[key])
        return {key[0] for key in current if key in self._verified or key[0] in holders}

    def _log_unanswered(self, now: float, node: NodeId, address: str) -> None:
        """A warning for a registration that does not answer (a wrong advertised address,
        a firewall), at most one a minute: others in between are logged at info and
        counted in the next warning, so registrations at made-up addresses cannot flood
        the warnings."""
        held_back = self._unanswered_log.allow("unanswered", now)
        if held_back is not None:
            log.warning("new node does not answer; it gets no role until it does", node_id=node, address=address,
                        others_since_last_warning=held_back or None)
        else:
            log.info("new node does not answer; it gets no role until it does", node_id=node, address=address)

    # ---- one round ----

    def observe(self) -> tuple[list[PlacementNode], dict[NodeId, str], dict[ShardId, ShardAssignment], list[ShardId]]:
        """Live nodes, their addresses, current assignments and ring shards, from the mirrors."""
        nodes = [placement_node_from_proto(n) for n in self._nodes.entries.values()]
        addresses = {NodeId(n.node_id): n.address for n in self._nodes.entries.values()}
        current = {
            ShardId(a.shard_id): assignment_from_proto(a) for a in self._assignments.entries.values()
        }
        ring = self._ring.entries.get(self._keys.ring())
        shards = list(ring.shard_ids) if ring is not None else []
        for key, record in self._assignments.unreadable.items():
            shard = self._keys.parse_assignment(key)
            # Epoch floor: every write raised the epoch by at most one (module docstring).
            current[shard] = ShardAssignment(shard, record.version, None, ())
            if (key, record.mod_revision) not in self._unreadable_logged:
                if len(self._unreadable_logged) >= _MAX_UNREADABLE_LOGGED:
                    self._unreadable_logged.clear()
                self._unreadable_logged.add((key, record.mod_revision))
                log.error("unreadable assignment record; it will be replaced as a lost primary",
                          key=key, epoch_floor=record.version, error=str(record.error))
        for shard in shards:
            held = self._held_epochs.get(shard, 0)
            a = current.get(shard)
            if a is not None and a.epoch >= held:
                self._held_epochs.pop(shard, None)  # the record caught up (a promotion above it)
                continue
            if held == 0:
                continue
            # The record is behind what the nodes hold (or gone): its members may not be
            # the shard's latest copies. Replaced as a lost primary, above that epoch,
            # and every live node is asked for its copy (the greatest position wins).
            current[shard] = ShardAssignment(shard, held, None, ())
            self._widened.add(shard)
            if (shard, held) not in self._behind_logged:
                if len(self._behind_logged) >= _MAX_UNREADABLE_LOGGED:
                    self._behind_logged.clear()
                self._behind_logged.add((shard, held))
                log.error("assignment record behind the nodes (etcd restored from a snapshot, or the record "
                          "deleted?); the shard gets a new primary above the epoch they hold", shard=shard,
                          record_epoch=a.epoch if a is not None else None, nodes_epoch=held)
        return nodes, addresses, current, shards

    async def _learn_held_epochs(self, shards: Sequence[ShardId], token: object) -> None:
        """Asks every live node which epoch it holds for each shard, when what etcd says
        may be behind the nodes: at the start of a term, after a mirror re-listed (a
        compaction, etcd going back), and while a ring shard has no record (a first
        placement goes on, or a record was deleted). Once for each such situation."""
        missing = frozenset(s for s in shards if self._keys.assignment(s) not in self._assignments.entries)
        last = self._held_epochs_asked
        situation = (token, self._assignments.relists, self._nodes.relists)
        self._held_epochs_asked = (situation, missing)
        if self._probe is None or (last is not None and situation == last[0] and (not missing or missing == last[1])):
            return  # nothing new: the same term and lists, and no other record missing
        if not self._assignments.entries:
            return  # a new cluster (no record yet): its nodes hold nothing to be behind
        addresses = {NodeId(n.node_id): n.address for n in self._nodes.entries.values() if n.address}
        answers = await self._probe.statuses(addresses)
        known = set(shards)
        for answer in answers.values():
            for status in answer.shards:
                # The epoch of its role, and of its last entry: both come from records
                # (a copy on disk only reports its fenced epoch, which a fence raises
                # before the record it prepares is written).
                held = status.last_epoch if status.on_disk_only else max(status.epoch, status.last_epoch)
                shard = ShardId(status.shard_id)
                if shard in known and held > self._held_epochs.get(shard, 0):
                    self._held_epochs[shard] = held
        for shard, held in list(self._held_epochs.items()):
            mirrored = self._assignments.entries.get(self._keys.assignment(shard))
            if mirrored is not None and mirrored.epoch >= held:
                del self._held_epochs[shard]
                continue
            # Behind in this replica's mirror: etcd itself says whether it is behind
            # (its record may just not have reached the mirror yet).
            kv = await self._store.get(self._keys.assignment(shard))
            if kv is None:
                continue
            try:
                stored = decode_assignment(kv)
            except BlueMarbleError:
                continue  # unreadable: replaced as a lost primary above its version anyway
            if stored.epoch >= held:
                del self._held_epochs[shard]

    async def reconcile_once(self, leadership: Leadership) -> PlacementPlan | None:
        """One round; returns the plan it applied (None when there was nothing to plan)."""
        config, config_revision = await self._configs.get()
        if self._ring.healthy and self._keys.ring() not in self._ring.entries:
            # Deleted (by hand, or a restore from a snapshot that predates it): every trade
            # and routing answer waits on it. It follows from the fields fixed at creation.
            log.error("the ring key is missing; making it again from the cluster config", key=self._keys.ring(),
                      shards=config.shard_count, vnodes=config.vnodes_per_shard)
            await ensure_ring(self._store, self._keys, config)
        self._track_health_and_departures()
        new_term = self._term is not leadership
        self._term = leadership

        def inputs() -> tuple[object, ...]:
            return (
                self._nodes.revision,
                self._assignments.revision,
                self._ring.revision,
                config_revision,
                leadership.token,
                self._verified_changes,
                self._forced.revision if self._forced is not None else 0,
            )

        await self._check_stalled_primaries()
        # Skipped before any O(nodes) work: with thousands of nodes this runs every tick.
        if inputs() == self._settled and self._outage_seen_s is None:
            if not self._probe_due():
                return None
            # Only probes are due: plan again only if a new node answered.
            verified_changes = self._verified_changes
            holders = {NodeId(m) for a in self._assignments.entries.values() for m in (a.primary, *a.replicas)}
            await self._verify_new_nodes(list(self._nodes.entries.values()), holders)
            if self._verified_changes == verified_changes:
                return None
        records = list(self._nodes.entries.values())
        ring = self._ring.entries.get(self._keys.ring())
        await self._learn_held_epochs(list(ring.shard_ids) if ring is not None else [], leadership.token)
        nodes, addresses, current, shards = self.observe()
        self._observed = dict(current)  # the records as stored, before this round's promotions
        if not shards:
            return None
        await self._clear_forced(current, addresses.keys())
        await self._discount_crashes()
        if self._held(nodes, current, config.replication_factor, new_term):
            return None
        holders = {m for a in current.values() for m in a.members}
        placeable = await self._verify_new_nodes(records, holders)
        nodes = [n for n in nodes if n.node_id in placeable]
        settled_inputs = inputs()
        if settled_inputs == self._settled:
            return None
        self.rounds += 1
        metrics.RECONCILE_ROUNDS.inc()
        leases = {NodeId(n.node_id): n.lease_id for n in records}
        troubled = {NodeId(n.node_id) for n in records if n.trouble}  # its storage refuses writes
        stamps = {
            ShardId(a.shard_id): assignment_incarnations(a) for a in self._assignments.entries.values()
        }
        promotions = await self._fence_lost_primaries(shards, current, addresses, leases, stamps,
                                                      config.replication_factor)
        current.update(promotions.ready)
        # Shards waiting for a fence answer, or stuck without data, are left out of this
        # round: placement would otherwise promote (or freshly assign) them at once.
        deferred = promotions.waiting | promotions.stuck
        planned = [shard for shard in shards if shard not in deferred]
        placement = PlacementConfig(config.replication_factor, config.max_moves_per_round)
        plan = await self._plan(nodes, planned, current, placement, promotions.positions or None)
        # The targets' answers, once a round (None: the target did not answer).
        answers: dict[NodeId, shardnode_pb2.GetShardStatusResponse | None] = {}
        early = await self._early_handoffs(plan, current, addresses, answers, troubled)
        if early and not self.needs_repair() and not promotions.ready:
            # Only balance is at stake, and it would hand a primary to a replica still
            # copying the shard: wait for it (the round is planned again each tick).
            # Copies kept through earlier handoffs whose new primaries serve go meanwhile:
            # removing them does not depend on the handoffs held.
            await self._drop_kept_copies(leadership, plan, current, addresses, leases)
            self._log_waiting_for_copies(early)
            return plan
        copying: set[tuple[ShardId, NodeId]] = set()
        if early:
            early = await self._early_handoffs(plan, current, addresses, answers, troubled, reported_only=True)
        for _ in range(3):
            if not early:
                break
            # A repair must be written now, but handing a primary to a replica still
            # copying is no part of it (the new primary would refuse writes until its copy
            # is done): plan again with those replicas counted as not holding the data.
            self._log_waiting_for_copies(early)
            copying |= {(m.shard_id, m.target) for m in early if m.target is not None}
            plan = await self._plan(nodes, planned, current, placement, promotions.positions or None, copying)
            early = await self._early_handoffs(plan, current, addresses, answers, troubled, reported_only=True)
        if early:  # still (a bound on the replanning): those shards wait for a later round
            plan = without_shards(plan, current, {m.shard_id for m in early})
        plan = await self._keep_copies(plan, current, addresses)
        # Records whose live members registered again keep their roles (replicas; a
        # lost primary was promoted or deferred above) under the new lease id.
        restamp = [
            shard
            for shard in planned
            if shard not in plan.changed
            and any(
                stamps.get(shard, {}).get(m, leases.get(m)) != leases.get(m)
                for m in plan.assignments[shard].members
                if m in leases
            )
        ]
        reregistered = len(restamp)
        restamp += [shard for shard in self._retained_changes(plan) if shard not in restamp]
        if plan.changed or restamp:
            await self._write(leadership, plan, restamp, leases, reregistered)
        elif plan.converged and not copying and not promotions.waiting and not any(self._retained_now.values()):
            # A round planned around replicas still copying is not settled: their copies
            # finishing changes nothing in etcd, and the moves held for them (a drain's
            # handoffs) must be planned again each tick until then.
            self._settled = settled_inputs
        return plan

    async def _plan(
        self, nodes: Sequence[PlacementNode], shards: Sequence[ShardId], current: Mapping[ShardId, ShardAssignment],
        config: PlacementConfig, positions: Positions | None, copying: Collection[tuple[ShardId, NodeId]] = (),
    ) -> PlacementPlan:
        """:func:`plan_assignments`. Pure, and a few hundred ms with thousands of nodes:
        run off the event loop so heartbeats keep being answered meanwhile (inline with
        ``plan_off_loop=False``: tests on a fake clock, where a thread's real time would
        let the fake one run ahead)."""
        if not self._plan_off_loop:
            return plan_assignments(nodes, shards, current, config, positions, copying)
        return await asyncio.to_thread(plan_assignments, nodes, shards, current, config, positions, copying)

    async def _keep_copies(
        self, plan: PlacementPlan, current: Mapping[ShardId, ShardAssignment], addresses: Mapping[NodeId, str],
        *, written: bool = True,
    ) -> PlacementPlan:
        """``plan`` with the copies it gives up kept until what replaces them can take
        over: the old primary of each handoff until the new one serves, the source of each
        replica move until the new replica has copied the shard; this plan's and the
        earlier ones not confirmed yet (bluemarble.core.placement.handoff). ``written``:
        the plan will be written (its changes are remembered until confirmed). A leader
        that starts knows of none: at worst a copy goes one round early, as it always did."""
        await self._confirm_pins(current, addresses)
        handed = handoffs_of(plan)
        moved = replica_moves_of(plan, current)
        keep = {(shard, former) for shard, former, _ in self._pins}
        keep |= {(shard, former) for shard, (former, _) in handed.items()}
        keep |= {(shard, source) for shard, source, _ in moved}
        plan = keep_copies(plan, current, keep, addresses.keys())
        plan = await self._keep_unmatched_copies(plan, current, addresses)
        if written:
            now = self._clock.monotonic_s()
            changes = [(shard, former, new, True) for shard, (former, new) in handed.items()]
            changes += [(shard, source, target, False) for shard, source, target in moved]
            for shard, former, successor, handoff in changes:
                epoch = plan.assignments[shard].epoch
                self._pins[(shard, former, successor)] = _Pin(former, successor, handoff, epoch, now)
        return plan

    def _stored_retained(self, shard: ShardId) -> tuple[NodeId, ...]:
        """The ``retained`` members of ``shard``'s stored record (see
        :meth:`_keep_unmatched_copies`)."""
        message = self._assignments.entries.get(self._keys.assignment(shard))
        return tuple(NodeId(n) for n in message.retained) if message is not None else ()

    async def _keep_unmatched_copies(
        self, plan: PlacementPlan, current: Mapping[ShardId, ShardAssignment], addresses: Mapping[NodeId, str],
    ) -> PlacementPlan:
        """``plan`` with each member it drops from a shard kept, until the replicas of
        the new record hold the log of the copy that holds every acknowledged write: the
        stored record's primary while it lives (a handoff's old primary is kept as a
        replica, and holds it), else the new primary a failover promoted (the greatest
        position among the live copies). At least as many replicas as a STRONG write
        needs acks from must report a position at or past that copy's, asked that copy
        first, then them. Until then a live member is kept as a replica; a dead one goes to
        the record's ``retained`` (sets :attr:`_retained_now`, which :meth:`_write`
        writes), where a promotion waits for it like for a down replica, or takes it as a
        candidate while it lives, but no node waits for its answer. Once they do, a live former
        replica still goes to ``retained`` first, and leaves the shard only when the holder
        answers, as the primary, without it among the replicas whose acknowledgements it
        counts (:func:`_counts_no_more`), with the staying replicas at that answer's
        position: before the primary learns the new record, the copy may acknowledge a
        write the staying replicas lack.

        Why. A write is acknowledged once the primary and any one replica hold it
        (:func:`~bluemarble.core.replication.primary.required_acks_for`); a failover waits
        for the shard's down replicas when they may hold such a write
        (:func:`~bluemarble.core.placement.repair.down_replicas_that_may_hold_more`), and
        that rule knows only the members the record names. R = 3, the primary and the
        replica that acknowledged a write die while the third copy lags: if the replica
        is dropped first (its lease ended first), or the primary is (a failover promoted
        the replica, which then dies too), the record names only the lagging copy, and it
        would be promoted over the write. A dead node acknowledges nothing new, so once a
        staying replica holds what the holding copy held after the death, it holds
        everything the dead one did, and the same holds for a live one once the primary
        no longer counts it (docs/decisions.md)."""
        looked = [s for s in plan.assignments if s in plan.changed or self._stored_retained(s)]
        self._retained_now = {}
        dropping: dict[ShardId, tuple[NodeId, list[NodeId]]] = {}
        for shard in looked:
            before, after = self._observed.get(shard), plan.assignments[shard]
            if before is None or after.primary is None or after.primary not in addresses:
                continue  # no live primary: the stored retained members stay
            self._retained_now[shard] = ()
            holder = before.primary if before.primary in addresses else after.primary
            former = dict.fromkeys((*before.members, *self._stored_retained(shard)))
            gone = [n for n in former if n not in after.members]
            if gone and holder is not None:
                dropping[shard] = (holder, gone)
        if not dropping:
            return plan
        holders = {holder for holder, _ in dropping.values()}
        heads = await self._probe.views({h: addresses[h] for h in holders}, dropping)
        staying = {r for s in dropping for r in plan.assignments[s].replicas if r in addresses}
        tails = await self._probe.positions({r: addresses[r] for r in staying}, dropping) if heads else {}
        keep: set[tuple[ShardId, NodeId]] = set()  # live members that stay replicas
        noted: set[tuple[ShardId, NodeId]] = set()
        for shard, (holder, gone) in dropping.items():
            before, replicas = self._observed[shard], plan.assignments[shard].replicas
            head = heads.get((shard, holder))
            caught = head is not None and required_acks_for(len(replicas)) <= sum(
                1 for r in replicas if (t := tails.get((shard, r))) is not None and t >= head.last
            )
            retained: list[NodeId] = []
            for node in gone:
                if caught and _counts_no_more(head, node, holder, before, addresses.keys()):
                    continue  # dropped
                if caught or node not in addresses or node not in before.members:
                    retained.append(node)
                else:
                    keep.add((shard, node))
                noted.add((shard, node))
                if (shard, node) in self._kept_unmatched:
                    continue
                if caught:  # the usual step of every replica move: a round or so
                    event = f"keeping a copy retained until {holder} (the primary) stops counting its acknowledgements"
                else:
                    why = ("it may hold acknowledged writes they lack" if head is not None
                           else f"{holder} did not tell its position")
                    event = f"keeping a copy in the shard until a staying replica holds {holder}'s log: {why}"
                (log.debug if caught else log.info)(
                    event, shard=shard, node_id=node, alive=node in addresses, holder=holder,
                    retained=node in retained, holder_last=str(head.last) if head else None,
                    staying={r: str(tails[(shard, r)]) for r in replicas if (shard, r) in tails} or None)
            self._retained_now[shard] = tuple(retained)
        self._kept_unmatched = noted
        return keep_copies(plan, current, keep, addresses.keys()) if keep else plan

    def _retained_changes(self, plan: PlacementPlan) -> list[ShardId]:
        """The shards of ``plan`` whose ``retained`` members change while their record
        does not: they are written too."""
        return [
            shard for shard, retained in self._retained_now.items()
            if shard not in plan.changed and set(retained) != set(self._stored_retained(shard))
        ]

    async def _drop_kept_copies(
        self, leadership: Leadership, plan: PlacementPlan, current: Mapping[ShardId, ShardAssignment],
        addresses: Mapping[NodeId, str], leases: dict[NodeId, int],
    ) -> None:
        """Writes, from a plan that is held, only the shards whose every move removes a
        replica (a copy an old primary kept until its successor served, or another
        excess copy): such a removal changes no primary and depends on no handoff."""
        kept = await self._keep_copies(plan, current, addresses, written=False)
        moves: dict[ShardId, list[Move]] = collections.defaultdict(list)
        for move in kept.moves:
            moves[move.shard_id].append(move)
        trims = [
            shard for shard in kept.changed
            if moves[shard] and all(m.kind is MoveKind.REMOVE_REPLICA for m in moves[shard])
        ]
        if trims:
            only = PlacementPlan(
                assignments=kept.assignments,  # only the records of ``changed`` are written
                moves=tuple(m for m in kept.moves if m.shard_id in trims),
                changed=tuple(trims),
                converged=False,
            )
            await self._write(leadership, only, (), leases)

    async def _confirm_pins(
        self, current: Mapping[ShardId, ShardAssignment], addresses: Mapping[NodeId, str]
    ) -> None:
        """Forgets the kept copies whose successor can take over now (asked with
        GetShardStatus: a new primary serving at its epoch, a new replica done copying),
        and those whose assignment changed since or whose node left."""
        if not self._pins:
            return
        now = self._clock.monotonic_s()
        asking: dict[NodeId, str] = {}
        for key, pin in list(self._pins.items()):
            shard = key[0]
            record = current.get(shard)
            if pin.former not in addresses or pin.successor not in addresses:
                del self._pins[key]  # a side left
            elif record is None or record.epoch < pin.epoch or pin.successor not in record.members:
                # Its write is not in the mirror (yet), failed, or a later round moved the
                # successor away: wait a little, then forget it.
                if now - pin.since_s >= UNWRITTEN_PIN_S:
                    del self._pins[key]
            elif pin.handoff and (record.epoch > pin.epoch or record.primary != pin.successor):
                del self._pins[key]  # a later change of primary
            else:
                asking[pin.successor] = addresses[pin.successor]
        if not asking:
            return
        answers = await self._probe.statuses(asking)
        for key, pin in list(self._pins.items()):
            answer = answers.get(pin.successor)
            if answer is None or pin.successor not in asking:
                continue
            if any(_takes_over(st, key[0], pin) for st in answer.shards):
                del self._pins[key]
            elif not pin.warned and now - pin.since_s >= SUCCESSOR_WAIT_WARNING_S:
                pin.warned = True
                log.warning("a new copy cannot take over yet; the copy it replaces stays meanwhile",
                            shard=key[0], kept=pin.former, waiting_for=pin.successor,
                            role="primary" if pin.handoff else "replica", waited_s=round(now - pin.since_s, 1))

    def _log_waiting_for_copies(self, early: Sequence[Move]) -> None:
        now = self._clock.monotonic_s()
        if now - self._waiting_logged_s >= CATCH_UP_GRACE_S:
            self._waiting_logged_s = now
            log.info("holding primary handoffs until their targets report their copies ready",
                     handoffs=[f"{m.shard_id}->{m.target}" for m in early[:8]], grace_s=CATCH_UP_GRACE_S,
                     ready_means="answering GetShardStatus, done copying, within 64 entries, storage writable")

    async def _early_handoffs(
        self, plan: PlacementPlan, current: Mapping[ShardId, ShardAssignment], addresses: Mapping[NodeId, str],
        answers: dict[NodeId, shardnode_pb2.GetShardStatusResponse | None], troubled: Collection[NodeId] = (),
        *, reported_only: bool = False,
    ) -> list[Move]:
        """The handoffs of ``plan`` whose targets cannot take the primary yet, from what
        they say (GetShardStatus; ``answers``: this round's answers so far, completed
        here, each node asked once, None for one that did not answer):

        - a replica done copying, following its primary and within 64 entries is ready;
          one still copying waits, however long its copy takes;
        - a target that does not answer waits: how far behind it is cannot be told (a node
          restarted with old data under load answered nothing for 12 s, and took
          primaries thousands of entries behind once its role passed the grace);
        - a target in ``troubled`` (its heartbeats say its storage refuses writes) waits,
          whatever it answers: as the primary it could write nothing;
        - a target that answers without a replica's status of the shard is judged by the
          age of its role (:data:`CATCH_UP_GRACE_S`); with ``reported_only`` (a round
          that must repair, which the age rule does not hold) it waits: it has not taken
          its role yet (it registered again moments ago)."""
        catching_up = self._catching_up(current)  # every round: it tracks when each replica role began
        handoffs = [(m, m.target) for m in plan.moves if m.kind is MoveKind.HANDOFF_PRIMARY and m.target is not None]
        if not handoffs:
            return []
        targets = {target: addresses[target] for _, target in handoffs if target in addresses}
        unasked = {node: address for node, address in targets.items() if node not in answers}
        if unasked:
            got = await self._probe.statuses(unasked)
            for node in unasked:  # None: it did not answer in time
                answers[node] = got.get(node)
        early = []
        for move, target in handoffs:
            answer = answers.get(target)
            status = next((st for st in answer.shards if st.shard_id == move.shard_id), None) if answer else None
            if answer is None or target in troubled:
                ready = False  # unreachable, too busy to answer, or unable to write: not a primary now
            elif status is not None and status.role == common_pb2.SHARD_ROLE_REPLICA:
                ready = not status.copying and status.serving and status.lag_entries <= CAUGHT_UP_ENTRIES
            elif reported_only:
                # A repair is not held by the age rule, but a target that answers without
                # a replica's status of the shard has not taken its role yet (it registered
                # again moments ago, or its assignment is on its way): another replica takes
                # the primary, or the handoff waits a round.
                ready = False
            else:
                ready = (move.shard_id, target) not in catching_up
            if not ready:
                early.append(move)
        return early

    def _catching_up(self, current: Mapping[ShardId, ShardAssignment]) -> set[tuple[ShardId, NodeId]]:
        """Replica roles younger than :data:`CATCH_UP_GRACE_S`: a replica added moments
        ago is still copying the shard, and a primary handed to it would not serve until
        it has (a 200 MB shard: 5-7 s of refused writes). The first look of this process
        counts every replica as caught up."""
        now = self._clock.monotonic_s()
        pairs = {(shard, replica) for shard, a in current.items() for replica in a.replicas}
        if self._replica_since is None:
            self._replica_since = dict.fromkeys(pairs, -math.inf)
        else:
            self._replica_since = {p: self._replica_since.get(p, now) for p in pairs}
        return {p for p, since in self._replica_since.items() if now - since < CATCH_UP_GRACE_S}

    async def _fence_lost_primaries(
        self,
        shards: Sequence[ShardId],
        current: dict[ShardId, ShardAssignment],
        addresses: dict[NodeId, str],
        leases: dict[NodeId, int],
        stamps: dict[ShardId, dict[NodeId, int]],
        replication_factor: int,
    ) -> Promotions:
        """Fence-then-choose for every shard whose primary is lost (module docstring).

        Why the fence comes first: positions read without it are not final. An old
        primary that is only paused (SIGSTOP, a long GC, a partition) still believes it
        leads at the old epoch; when it resumes it can send entries that replicas append
        and acknowledge *after* their positions were read, so the replica promoted on
        those positions would lack acknowledged writes (I4). A fenced replica refuses
        entries and acks of every epoch below the new one, so the position it answers
        with the fence can no longer grow under the old primary.
        """
        lost: dict[ShardId, list[NodeId]] = {}
        members: dict[ShardId, list[NodeId]] = {}
        olds: dict[ShardId, NodeId | None] = {}
        for shard in shards:
            a = current.get(shard)
            if a is None or (a.primary is None and a.epoch == 0):
                continue  # never had a primary: nothing to fence, nothing to lose
            old = a.primary
            reborn = (
                old is not None and old in leases and stamps.get(shard, {}).get(old, leases[old]) != leases[old]
            )
            stalled = old is not None and old in addresses and (shard, a.epoch) in self._stalled
            if old is not None and old in addresses and not reborn and not stalled:
                continue  # the primary is live under the registration it was given the role with
            # Retained copies (down when they were kept) are candidates once back: they
            # may hold acknowledged writes the replicas lack.
            candidates = [r for r in dict.fromkeys((*a.replicas, *self._stored_retained(shard)))
                          if r in addresses and r != old]
            if reborn and old is not None:
                candidates.append(old)  # an ex-primary back under a new registration
                self._note(shard, a.epoch, "reborn", "primary registered again (a new incarnation); "
                           "it lost its role and may only win it back through promotion", node_id=old)
            elif stalled and old is not None:
                candidates.append(old)  # it holds the data; it may win the role back at a new epoch
            members[shard] = list(candidates)
            olds[shard] = old
            if shard in self._widened:
                # No member holds the data: ask every live node. A replica moved away a
                # moment ago keeps its copy on disk, and a write acknowledged before the
                # move may exist nowhere else but on the lost primary.
                candidates += [n for n in sorted(addresses) if n not in candidates and (n != old or reborn)]
            lost[shard] = candidates
        new_epoch = {shard: max(current[shard].epoch + 1, self._fence_floor.get(shard, 0)) for shard in lost}
        targets: dict[NodeId, tuple[str, dict[ShardId, int]]] = {}
        for shard, candidates in lost.items():
            for node in candidates:
                targets.setdefault(node, (addresses[node], {}))[1][shard] = new_epoch[shard]
        answers = await self._probe.fence(targets) if targets else {}
        positions: dict[tuple[ShardId, NodeId], LogPosition] = {}
        ready: dict[ShardId, ShardAssignment] = {}
        waiting: set[ShardId] = set()
        stuck: set[ShardId] = set()
        for shard, candidates in lost.items():
            epoch = new_epoch[shard]
            if not candidates:
                if shard not in self._widened and addresses:
                    self._widened.add(shard)  # next round: look for a copy on every live node
                    waiting.add(shard)
                continue  # no live copy: placement assigns a fresh primary and says so
            silent = sorted(n for n in candidates if answers.get(n) is None)
            if silent:
                waiting.add(shard)
                self._note(shard, epoch, "silent", "promotion waits: a candidate did not answer the fence",
                           silent=silent)
                continue
            copies = {n: answers[n][shard] for n in candidates}  # type: ignore[index]
            higher = max((c.epoch for c in copies.values() if c.fenced), default=0)
            if higher >= MAX_LOG_COUNTER:
                # No leader fences there (nodes refuse fences far past what they know):
                # a forged or corrupt record. Promoting past it would overflow the epoch.
                waiting.add(shard)
                self._note(shard, epoch, "exhausted", "promotion impossible: a copy is fenced at the last epoch; "
                           "move that node's data away (or ForcePromote another node)",
                           nodes=sorted(n for n, c in copies.items() if c.fenced and c.epoch == higher))
                continue
            if higher > epoch:
                # Some earlier fence went further (a leader that fenced, then lost its
                # term before writing): fence everyone at that epoch next round.
                self._fence_floor[shard] = higher
                waiting.add(shard)
                self._note(shard, epoch, "floor", "promotion waits: a candidate is fenced at a higher epoch",
                           fenced_epoch=higher)
                continue
            with_data = {n: c.last for n, c in copies.items() if c.has_data}
            record = current[shard]
            forced = self._forced_node(shard)
            # The old primary holds every write it acknowledged: with its data, nothing to wait
            # for. Without a live copy that holds data, the shard is stuck below anyway. A
            # member back under a new registration with no data lost its disk: it holds
            # nothing of what it acknowledged, and counts as down.
            kept = {
                n for n in addresses
                if n not in copies or copies[n].has_data
                or stamps.get(shard, {}).get(n, leases.get(n)) == leases.get(n)
            }
            absent = [] if olds[shard] in with_data or not with_data else down_replicas_that_may_hold_more(
                (*record.replicas, *self._stored_retained(shard)), kept, olds[shard])
            if absent and forced is not None and not (forced in with_data and copies[forced].fenced):
                # The operator named a node that holds no copy (an empty disk, not a
                # member): lifting the wait would promote another copy than the one named.
                stuck.add(shard)
                self._note(shard, epoch, "forced-empty", "ForcePromote names a node that holds no copy of the "
                           "shard; the promotion keeps waiting (name a node that holds one: bluemarblectl shards)",
                           node_id=forced, down=absent,
                           live_copies={n: str(last) for n, last in sorted(with_data.items())})
                continue
            if absent and forced is None:
                stuck.add(shard)
                # A member back without its data (an empty data dir) still counts as down: say so.
                empty = sorted(n for n in absent if n in addresses)
                self._note(shard, epoch, "absent-empty" if empty else "absent",
                           "promotion waits: the replicas that may hold the shard's latest "
                           "acknowledged writes are down with its primary; promoting a live copy could lose them "
                           "(bring one back with its data dir, or bluemarblectl promote SHARD NODE "
                           "--accept-data-loss)", down=absent, back_without_data=empty or None,
                           live_copies={n: str(last) for n, last in sorted(with_data.items())})
                continue
            if absent and forced is not None and forced in with_data and copies[forced].fenced:
                # An operator accepted the loss: the named node takes over with what it holds.
                with_data = {forced: with_data[forced]}
                log.warning("promoting a node while replicas that may hold acknowledged writes are down, as an "
                            "operator asked (ForcePromote); what only they held is gone",
                            shard=shard, epoch=epoch, node_id=forced, down=absent)
            term = record.epoch
            # An unreadable record (replaced with no members above) says nothing of who held
            # the shard: every copy found is judged on its position alone, as before.
            known = record.primary is not None or bool(record.replicas)
            older = unsafe_outside_copies(with_data, members[shard], term, replication_factor) if known else frozenset()
            if older:
                # Not candidates (an operator may still accept the loss: ForcePromote).
                self._note(shard, epoch, "older", "copies kept by nodes that left the shard are not promoted: "
                           "they may lack writes acknowledged after they left",
                           copies={n: str(with_data[n]) for n in sorted(older)}, term=term)
                with_data = {n: last for n, last in with_data.items() if n not in older}
            if not with_data and shard not in self._widened:
                self._widened.add(shard)
                waiting.add(shard)
                self._note(shard, epoch, "widen", "no member of the shard holds its data; "
                           "asking every live node for a copy", candidates=sorted(candidates))
                continue
            if not with_data and forced is not None and forced in copies and copies[forced].fenced:
                # An operator accepted the loss (ForcePromote): the named node takes over
                # with whatever it holds, fenced at the new epoch like any candidate.
                with_data = {forced: copies[forced].last}
                log.warning("promoting a node without the shard's data, as an operator asked (ForcePromote); "
                            "what only the lost nodes held is gone", shard=shard, epoch=epoch, node_id=forced)
            if not with_data:
                stuck.add(shard)
                self._note(shard, epoch, "no-data", "shard stays PRIMARY_LOST: no live candidate holds its data; "
                           "promoting one would lose what the lost members had (bring one back with its data "
                           "dir, or bluemarblectl promote SHARD NODE --accept-data-loss)",
                           candidates=sorted(candidates),
                           older_copies={n: str(copies[n].last) for n in sorted(older)} or None)
                continue
            # Ties (the usual case: every copy caught up) go first to nodes that kept
            # their registration (they were up all along: a restarted ex-primary rejoins
            # as a replica), then to the old primary (after a mass lease expiry nobody
            # died: leadership stays where it was, at the new epoch), then by node id.
            # Placement promotes the one copy given a position.
            top = max(with_data.values())
            stamped = stamps.get(shard, {})
            best = min(
                (n for n, last in with_data.items() if last == top),
                key=lambda n: (stamped.get(n) != leases.get(n) or n not in stamped, n != olds[shard], n),
            )
            positions[(shard, best)] = top
            ready[shard] = ShardAssignment(
                shard, epoch - 1, None, tuple(dict.fromkeys([*members[shard], *sorted(with_data)]))
            )
            self._widened.discard(shard)
            log.info("fenced the candidates of a lost primary", shard=shard, epoch=epoch,
                     positions={n: str(p) for n, p in sorted(with_data.items())}, chosen=best,
                     unfenced=sorted(n for n, c in copies.items() if not c.fenced) or None)
            self._fence_floor.pop(shard, None)
        return Promotions(positions, ready, frozenset(waiting), frozenset(stuck))

    def _forced_node(self, shard: ShardId) -> NodeId | None:
        """The node a ForcePromote request names for ``shard``, if there is one."""
        if self._forced is None:
            return None
        request = self._forced.entries.get(self._keys.force_promotion(shard))
        return NodeId(request.node_id) if request is not None and request.accept_data_loss else None

    async def _clear_forced(self, current: dict[ShardId, ShardAssignment], live: Collection[NodeId]) -> None:
        """Deletes the ForcePromote requests of shards that have a live primary now (the
        forced one, or another that showed up with the data): they are done. A primary
        registered again since its role was given (a restart) lost it: its shard's request
        stays for the promotion it asks for."""
        if self._forced is None:
            return
        leases = {n.node_id: n.lease_id for n in self._nodes.entries.values()}
        for key in list(self._forced.entries):
            try:
                shard = self._keys.parse_force_promotion(key)
            except ValueError:
                continue
            a = current.get(shard)
            record = self._assignments.entries.get(self._keys.assignment(shard))
            if (a is not None and a.primary is not None and a.primary in live
                    and (record is None or holds_role(record, a.primary, leases))):
                await self._store.delete(key)
                log.info("ForcePromote request done", shard=shard, primary=a.primary, epoch=a.epoch)

    def _note(self, shard: ShardId, epoch: int, kind: str, message: str, **fields: object) -> None:
        """Logs ``message`` once per (shard, epoch, kind): rounds retry every tick."""
        key = (shard, epoch, kind)
        if key in self._promotion_notes:
            return
        if len(self._promotion_notes) >= _MAX_PROMOTION_NOTES:
            self._promotion_notes.clear()
        self._promotion_notes.add(key)
        log.warning(message, shard=shard, epoch=epoch, **fields)

    def _expected_revision(self, key: str) -> int | None:
        mod = self._assignments.mod_revisions.get(key)
        if mod is None:
            unreadable = self._assignments.unreadable.get(key)
            mod = None if unreadable is None else unreadable.mod_revision
        return mod

    async def _write(
        self,
        leadership: Leadership,
        plan: PlacementPlan,
        restamp: Sequence[ShardId] = (),
        leases: dict[NodeId, int] | None = None,
        reregistered: int = 0,
    ) -> None:
        """Writes the records of ``plan.changed`` and ``restamp``, each member stamped
        with its registration in ``leases`` (as observed when the round was planned: a
        node that registers again meanwhile is seen as a new incarnation next round). The
        first ``reregistered`` of ``restamp`` are written for members that registered
        again, the others for the copies they keep (``retained``)."""
        order = {shard: i for i, shard in enumerate(plan.assignments)}
        changed: Sequence[ShardId] = sorted({*plan.changed, *restamp}, key=order.__getitem__)
        leases = leases or {}
        last_revision = 0
        sent_s = self._clock.monotonic_s()
        for start in range(0, len(changed), _MAX_WRITES_PER_TXN):
            if self._election.leadership is not leadership:
                log.info("leadership ended before the write; dropping the plan")
                return
            chunk = changed[start : start + _MAX_WRITES_PER_TXN]
            compares = [leadership.guard(self._keys)]
            puts = []
            for shard in chunk:
                key = self._keys.assignment(shard)
                mod = self._expected_revision(key)
                compares.append(Compare.absent(key) if mod is None else Compare.mod_revision(key, mod))
                # A member with no live registration (a retained one) keeps the one it was
                # given its role under: back with an empty disk, it is a new incarnation.
                recorded = self._assignments.entries.get(key)
                stamps = {**assignment_incarnations(recorded), **leases} if recorded is not None else leases
                message = assignment_to_proto(plan.assignments[shard], stamps)
                retained = self._retained_now.get(shard, self._stored_retained(shard))
                retained = tuple(n for n in retained if n not in plan.assignments[shard].members)
                message.retained.extend(retained)
                for node in retained:
                    if node in stamps:
                        message.incarnations[node] = stamps[node]
                puts.append(Put(key, codec.encode(message)))
            result = await self._store.txn(compares, puts)
            if not result.succeeded:
                if not await self._election.verify():
                    return  # deposed: the election stepped down; nothing more to write
                log.info("assignment write lost a race; replanning from the mirror", shards=len(chunk))
                await self._assignments.wait_for_revision(result.revision, 2.0)
                return
            self.writes += 1
            last_revision = result.revision
        if reregistered:
            log.info("recorded the new registrations of members that registered again", shards=reregistered)
        if len(restamp) > reregistered:
            log.info("recorded the copies kept through handoffs, or released", shards=len(restamp) - reregistered)
        for move in plan.moves:
            log.info(
                "placement move",
                shard=move.shard_id,
                kind=move.kind.value,
                source=move.source,
                target=move.target,
                epoch=plan.assignments[move.shard_id].epoch,
                reason=move.reason,
            )
        metrics.RECONCILE_MOVES.inc(len(plan.moves))
        # Plan the next round from what was written, not from a mirror that lags it.
        if await self._assignments.wait_for_revision(last_revision, 2.0) and last_revision:
            metrics.ASSIGNMENT_PROPAGATION.observe(self._clock.monotonic_s() - sent_s)
