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
4. For every shard whose primary is gone, ask its live replicas for their applied log
   position *now* (:class:`controlplane.server.node_probe.NodeProbe`), never a heartbeat
   report that may be a TTL old.
5. Plan with :func:`bluemarble.core.placement.plan_assignments` (pure; decisions are data).
6. Write the changed records in etcd transactions guarded by the leader key's
   create_revision (the fencing token) and by each record's mod_revision, so a deposed
   leader or a concurrent writer changes nothing. A failed write makes the election
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
  or wholly restarted, cluster gets one placement, not a cascade of moves).

A hold lasts ``hold_s`` (default: twice the lease TTL, at least 5 s) and ends early as
soon as every node named in the current assignments is live again (and R nodes are). A
node whose lease expired learns it on its next heartbeat (TTL/3 later) and registers at
once, but etcd's lessor, the node's backoff and a busy machine add up: one TTL proved too
tight in tests. The cost: a node that really died in the same window is failed over up
to ``hold_s`` later.

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
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from bluemarble.api.conversions import assignment_from_proto, assignment_to_proto, placement_node_from_proto
from bluemarble.core.errors import BlueMarbleError
from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.placement import (
    PlacementConfig,
    PlacementNode,
    PlacementPlan,
    ShardAssignment,
    plan_assignments,
)
from bluemarble.core.ring import Ring
from bluemarble.runtime import background
from bluemarble.runtime.clock import Clock, SystemClock, wait_event
from bluemarble.v1 import common_pb2
from controlplane.server.election import Election, Leadership
from controlplane.server.node_probe import NodeProbe
from controlplane.store import codec
from controlplane.store.config_store import ConfigStore
from controlplane.store.etcd import Compare, EtcdStore, Put
from controlplane.store.keys import KeySchema
from controlplane.store.watchcache import PrefixCache

log = structlog.get_logger(__name__)

# etcd refuses transactions with more than 128 operations by default (--max-txn-ops).
_MAX_WRITES_PER_TXN = 100
_MIN_HOLD_S = 5.0
_FORMING_HOLD_S = 3.0
"""Hold at the start of a leader term while fewer than R nodes are live: a forming (or
wholly restarted) cluster gets one placement, not a cascade of moves; nodes of a forming
cluster are registering already, not waiting for leases to expire."""
_MAX_PROBES_PER_S = 32
"""New registrations probed per second at most (a token bucket of that size): a mass join
of thousands of nodes is verified over some seconds instead of in bursts, since rounds run
every 50 ms while shards wait for a primary."""
_PROBE_RETRY_FIRST_S = 1.0
_PROBE_RETRY_MAX_S = 60.0
_MAX_UNREADABLE_LOGGED = 4096


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
    ):
        self._store = store
        self._keys = keys
        self._election = election
        self._nodes = nodes
        self._assignments = assignments
        self._ring = ring
        self._configs = configs
        self._probe = probe
        self._clock = clock or SystemClock()
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
        self._outage = False
        self._live: set[NodeId] = set()
        self._live_revision = -1  # nodes mirror revision _live was computed at
        self._departures: collections.deque[tuple[float, NodeId]] = collections.deque()
        self._verified: set[tuple[NodeId, int]] = set()
        self._verified_changes = 0  # bumped whenever _verified changes (an input of a round)
        self._probe_tokens = float(_MAX_PROBES_PER_S)
        self._probe_tokens_at = -math.inf
        self._unverified: dict[tuple[NodeId, int], _ProbeState] = {}
        self._unreadable_logged: set[tuple[str, int]] = set()
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
            self._outage = True
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
                        self._outage = True
                    log.warning("reconcile round failed", error=str(e))
                except Exception:
                    log.exception("reconcile round crashed (this is a bug); retrying next tick")
                if self.rounds != rounds:
                    self._last_round = self._clock.monotonic_s()
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
            a.primary not in live or any(r not in live for r in a.replicas)
            for a in self._assignments.entries.values()
        )

    # ---- holds ----

    def _track_health_and_departures(self) -> None:
        """Notes etcd outages (a mirror unhealthy) and node departures as they happen."""
        now = self._clock.monotonic_s()
        if not all(c.healthy for c in (self._nodes, self._assignments, self._ring)):
            self._outage = True
            return
        if self._nodes.revision == self._live_revision:
            gone: set[NodeId] = set()
        else:
            live = {NodeId(n.node_id) for n in self._nodes.entries.values()}
            gone, self._live, self._live_revision = self._live - live, live, self._nodes.revision
        for node in sorted(gone):
            self._departures.append((now, node))
        while self._departures and self._departures[0][0] < now - self._hold_s():
            self._departures.popleft()

    def _hold_s(self) -> float:
        if self._hold_s_override is not None:
            return self._hold_s_override
        return max(_MIN_HOLD_S, 2.0 * self._election.ttl_s)

    def _start_hold(
        self, reason: str, hold_s: float | None = None, *, must_return: set[NodeId] | None = None
    ) -> None:
        """Holds moves for ``hold_s`` (default :meth:`_hold_s`); it ends early once every
        node named in the assignments is live and R are, and every node of
        ``must_return`` has *registered again* since now. ``must_return`` None (an etcd
        outage) means every named node: right after etcd resumes, the records of leases
        about to expire are still listed, and "every node is live" would end the hold a
        moment before they vanish; a node whose lease survived does not register again, so
        such a hold then runs its full length."""
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
            log.warning("holding placement moves while nodes come back", reason=reason, hold_s=hold_s)

    def _held(self, nodes: Sequence[PlacementNode], current: dict[ShardId, ShardAssignment],
              replication_factor: int, new_term: bool) -> bool:
        """Whether this round must place nothing (see the module docstring)."""
        if self._outage:
            self._outage = False
            self._start_hold("etcd was unreachable")
        peak = max(len(self._live) + len(self._departures), 1)
        if len(self._departures) >= max(2, math.ceil(peak * self._mass_expiry_fraction)):
            self._start_hold(
                f"{len(self._departures)} nodes left within {self._hold_s():g} s",
                must_return={node for _, node in self._departures},
            )
            self._departures.clear()
        eligible = sum(1 for n in nodes if not n.draining)
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
        named = {m for a in current.values() for m in a.members}
        must_return = named if self._hold_must_return is None else self._hold_must_return
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
                    log.warning("new node does not answer; it gets no role until it does",
                                node_id=key[0], address=due[key])
        return {key[0] for key in current if key in self._verified or key[0] in holders}

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
        return nodes, addresses, current, shards

    async def reconcile_once(self, leadership: Leadership) -> PlacementPlan | None:
        """One round; returns the plan it applied (None when there was nothing to plan)."""
        config, config_revision = await self._configs.get()
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
            )

        # Skipped before any O(nodes) work: with thousands of nodes this runs every tick.
        if inputs() == self._settled and not self._outage:
            if not self._probe_due():
                return None
            # Only probes are due: plan again only if a new node answered.
            verified_changes = self._verified_changes
            holders = {NodeId(m) for a in self._assignments.entries.values() for m in (a.primary, *a.replicas)}
            await self._verify_new_nodes(list(self._nodes.entries.values()), holders)
            if self._verified_changes == verified_changes:
                return None
        records = list(self._nodes.entries.values())
        nodes, addresses, current, shards = self.observe()
        if not shards:
            return None
        if self._held(nodes, current, config.replication_factor, new_term):
            return None
        holders = {m for a in current.values() for m in a.members}
        placeable = await self._verify_new_nodes(records, holders)
        nodes = [n for n in nodes if n.node_id in placeable]
        settled_inputs = inputs()
        if settled_inputs == self._settled:
            return None
        self.rounds += 1
        lost = [
            shard
            for shard, a in current.items()
            if shard in shards and (a.primary is None or a.primary not in addresses)
        ]
        positions = None
        if lost:
            candidates = {
                node: addresses[node]
                for shard in lost
                for node in current[shard].replicas
                if node in addresses
            }
            positions = await self._probe.positions(candidates, lost)
        # Planning is pure and can take a few hundred ms with thousands of nodes: run it
        # off the event loop so heartbeats keep being answered meanwhile.
        plan = await asyncio.to_thread(
            plan_assignments,
            nodes,
            shards,
            current,
            PlacementConfig(config.replication_factor, config.max_moves_per_round),
            positions,
        )
        if plan.changed:
            await self._write(leadership, plan)
        elif plan.converged:
            self._settled = settled_inputs
        return plan

    def _expected_revision(self, key: str) -> int | None:
        mod = self._assignments.mod_revisions.get(key)
        if mod is None:
            unreadable = self._assignments.unreadable.get(key)
            mod = None if unreadable is None else unreadable.mod_revision
        return mod

    async def _write(self, leadership: Leadership, plan: PlacementPlan) -> None:
        changed: Sequence[ShardId] = plan.changed
        last_revision = 0
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
                puts.append(Put(key, codec.encode(assignment_to_proto(plan.assignments[shard]))))
            result = await self._store.txn(compares, puts)
            if not result.succeeded:
                if not await self._election.verify():
                    return  # deposed: the election stepped down; nothing more to write
                log.info("assignment write lost a race; replanning from the mirror", shards=len(chunk))
                await self._assignments.wait_for_revision(result.revision, 2.0)
                return
            self.writes += 1
            last_revision = result.revision
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
        # Plan the next round from what was written, not from a mirror that lags it.
        await self._assignments.wait_for_revision(last_revision, 2.0)
