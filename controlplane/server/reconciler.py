"""The leader's reconcile loop: observe, plan (pure), write the plan in a guarded txn.

One round:

1. Observe: live nodes, current assignments and the ring from the replica's mirrors
   (:mod:`controlplane.store.watchcache`), the config from etcd.
2. For every shard whose primary is gone, ask its live replicas for their applied log
   position *now* (:class:`controlplane.server.node_probe.NodeProbe`), never a heartbeat report
   that may be a TTL old.
3. Plan with :func:`bluemarble.core.placement.plan_assignments` (pure; decisions are data).
4. Write the changed records in etcd transactions guarded by the leader key's
   create_revision (the fencing token) and by each record's mod_revision, so a deposed
   leader or a concurrent writer changes nothing. Then wait until the mirror shows the
   write, so the next round plans from it.

Rounds run when a mirror changes (node joined, died, drained; assignment written) and at
least every ``tick_s``, with changes coalesced for ``debounce_s``; a round whose inputs
(mirror revisions, config revision, leadership) are those of the last converged round is
skipped, since planning is a pure function of them (planning 2,000 nodes takes ~0.2 s,
too much to repeat every second for nothing). Only the elected leader runs rounds.

While fewer than R nodes are live, the first ``initial_placement_grace_s`` of a leader's
term place nothing: a forming (or wholly restarted) cluster gets one placement, not a
cascade of moves. The cost: a leader elected at the moment a node dies, in a cluster of
at most R nodes, fails over up to that grace later.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Sequence

import structlog

from bluemarble.api.conversions import assignment_from_proto, assignment_to_proto
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
        tick_s: float = 1.0,
        debounce_s: float = 0.05,
        min_round_interval_s: float = 1.0,
        initial_placement_grace_s: float = 3.0,
    ):
        self._store = store
        self._keys = keys
        self._election = election
        self._nodes = nodes
        self._assignments = assignments
        self._ring = ring
        self._configs = configs
        self._probe = probe
        self._tick_s = tick_s
        self._grace_s = initial_placement_grace_s
        self._debounce_s = debounce_s
        self._min_round_interval_s = min_round_interval_s
        self._last_round = -math.inf
        # Inputs of the last round that found nothing to change.
        self._settled: tuple[int, ...] | None = None
        self._term: Leadership | None = None
        self._term_started = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0
        for cache in (nodes, assignments, ring):
            cache.add_listener(self._wake.set)
        election.add_listener(self._wake.set)

    async def start(self) -> None:
        self._task = background.start(self._run(), "reconciler")

    async def stop(self) -> None:
        await background.stop(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            leadership = self._election.leadership
            if leadership is not None:
                await asyncio.sleep(self._debounce_s)  # let a burst of changes land
                self._wake.clear()
                loop = asyncio.get_running_loop()
                gap_s = self._min_round_interval_s - (loop.time() - self._last_round)
                if gap_s > 0 and not self.needs_repair():
                    # Only balance is at stake (e.g. nodes joining): pace the rounds, but
                    # wake at once if a repair becomes necessary.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), gap_s)
                    continue
                rounds = self.rounds
                try:
                    await self.reconcile_once(leadership)
                except asyncio.CancelledError:
                    raise
                except BlueMarbleError as e:
                    log.warning("reconcile round failed", error=str(e))
                except Exception:
                    log.exception("reconcile round crashed")
                if self.rounds != rounds:
                    self._last_round = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._tick_s)

    def needs_repair(self) -> bool:
        """Whether some shard is missing, or names a node that is gone or draining: a
        round must run now (failover, replacement, drain), not only rebalance."""
        live = {n.node_id for n in self._nodes.entries.values() if n.state != common_pb2.NODE_STATE_DRAINING}
        ring = self._ring.entries.get(self._keys.ring())
        if ring is not None and len(self._assignments.entries) < len(ring.shard_ids):
            return True
        return any(
            a.primary not in live or any(r not in live for r in a.replicas)
            for a in self._assignments.entries.values()
        )

    def observe(self) -> tuple[list[PlacementNode], dict[NodeId, str], dict[ShardId, ShardAssignment], list[ShardId]]:
        """Live nodes, their addresses, current assignments and ring shards, from the mirrors."""
        nodes = [
            PlacementNode(
                node_id=NodeId(n.node_id),
                zone=n.zone,
                capacity=max(n.capacity, 1),
                draining=n.state == common_pb2.NODE_STATE_DRAINING,
            )
            for n in self._nodes.entries.values()
        ]
        addresses = {NodeId(n.node_id): n.address for n in self._nodes.entries.values()}
        current = {
            ShardId(a.shard_id): assignment_from_proto(a) for a in self._assignments.entries.values()
        }
        ring = self._ring.entries.get(self._keys.ring())
        shards = list(ring.shard_ids) if ring is not None else []
        return nodes, addresses, current, shards

    async def reconcile_once(self, leadership: Leadership) -> PlacementPlan | None:
        """One round; returns the plan it applied (None when there was nothing to plan)."""
        config, config_revision = await self._configs.get()
        inputs = (
            self._nodes.revision,
            self._assignments.revision,
            self._ring.revision,
            config_revision,
            leadership.token,
        )
        if inputs == self._settled:
            return None
        self.rounds += 1
        nodes, addresses, current, shards = self.observe()
        if not shards:
            return None
        if self._term is not leadership:
            self._term, self._term_started = leadership, asyncio.get_running_loop().time()
        eligible = sum(1 for n in nodes if not n.draining)
        if (
            eligible < config.replication_factor
            and asyncio.get_running_loop().time() - self._term_started < self._grace_s
        ):
            # A cluster being formed (or restarted whole) right as this leader took over:
            # nodes are still registering. Placing every shard on the first node now would
            # mean moving most of them again a second later, each move an epoch bump.
            return None
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
            self._settled = inputs
        return plan

    async def _write(self, leadership: Leadership, plan: PlacementPlan) -> None:
        changed: Sequence[ShardId] = plan.changed
        last_revision = 0
        for start in range(0, len(changed), _MAX_WRITES_PER_TXN):
            chunk = changed[start : start + _MAX_WRITES_PER_TXN]
            compares = [leadership.guard(self._keys)]
            puts = []
            for shard in chunk:
                key = self._keys.assignment(shard)
                mod = self._assignments.mod_revisions.get(key)
                compares.append(Compare.absent(key) if mod is None else Compare.mod_revision(key, mod))
                puts.append(Put(key, codec.encode(assignment_to_proto(plan.assignments[shard]))))
            result = await self._store.txn(compares, puts)
            if not result.succeeded:
                log.info("assignment write lost a race or leadership; replanning", shards=len(chunk))
                return
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
