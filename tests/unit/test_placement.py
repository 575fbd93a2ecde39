"""Placement (:mod:`bluemarble.core.placement`): what every plan promises, convergence to a
valid balanced placement, failover, node loss, join, drain, and a differential check
against an exhaustive search on small clusters.

Strategies draw clusters of 1-8 nodes over 1-4 zones with capacities 1-3, 1-24 shards
and a replication factor of 1-4, and a current assignment that is empty, valid (what
placement converges to), random garbage (missing shards, dead and duplicate entries,
records of shards nobody asked about), the valid one of a cluster that just lost a node,
or of one that just gained a node. Example counts are kept small enough for the whole
file to run in seconds; the properties were also run on tens of thousands of cases.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from itertools import combinations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bluemarble.core.ids import NodeId, ShardId, shard_id
from bluemarble.core.placement import (
    FairShare,
    MoveKind,
    PlacementConfig,
    PlacementNode,
    PlacementPlan,
    ShardAssignment,
    fair_shares,
    handoffs_of,
    keep_copies,
    plan_assignments,
    replica_moves_of,
    violations,
    without_shards,
)
from bluemarble.core.placement.budget import Budget
from bluemarble.core.placement.layout import make_layout
from bluemarble.core.placement.repair import unsafe_outside_copies
from bluemarble.core.placement.state import State
from bluemarble.core.replication.position import ZERO, LogPosition

Assignments = Mapping[ShardId, ShardAssignment]

ZONES = ("zone-a", "zone-b", "zone-c", "zone-d")
GHOST = NodeId("ghost")  # a node id that no cluster has: dead or never seen
UNLISTED = shard_id(999)  # a shard that has a record but is not asked about
SETUP_BUDGET = 10_000  # budget used to build the current assignments of scenarios
MAX_ROUNDS = 300  # bound on rounds to converge (largest case: 24 shards x R 4, budget 1)

positions_strategy = st.one_of(
    st.just(ZERO),
    st.builds(LogPosition, st.integers(1, 3), st.integers(1, 60)),
)
"""Log positions (epoch, lsn) of replicas: an empty log, or a last entry of epoch 1..3."""

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers --------------------------------------------------------------------------


def node(name: str, zone: str = "zone-a", capacity: int = 1, draining: bool = False) -> PlacementNode:
    return PlacementNode(NodeId(name), zone, capacity, draining)


def record(shard: int, primary: str | None, *replicas: str, epoch: int = 1) -> ShardAssignment:
    return ShardAssignment(
        shard_id(shard), epoch, None if primary is None else NodeId(primary),
        tuple(NodeId(r) for r in replicas),
    )


def records(*items: ShardAssignment) -> dict[ShardId, ShardAssignment]:
    return {item.shard_id: item for item in items}


def converge(
    nodes: Sequence[PlacementNode],
    shards: Sequence[ShardId],
    current: Assignments,
    config: PlacementConfig,
    positions: Mapping[tuple[ShardId, NodeId], LogPosition] | None = None,
) -> list[PlacementPlan]:
    """Plan, apply, repeat until converged; every plan, in order."""
    plans: list[PlacementPlan] = []
    for _ in range(MAX_ROUNDS):
        plan = plan_assignments(nodes, shards, current, config, positions)
        plans.append(plan)
        if plan.converged:
            return plans
        current, positions = plan.assignments, None
    raise AssertionError(f"no convergence in {MAX_ROUNDS} rounds")


def settle(
    nodes: Sequence[PlacementNode], shards: Sequence[ShardId], r: int
) -> dict[ShardId, ShardAssignment]:
    """What placement converges to from nothing (with a large budget, to build scenarios
    quickly)."""
    return dict(converge(nodes, shards, {}, PlacementConfig(r, SETUP_BUDGET))[-1].assignments)


def roles_of(assignments: Assignments) -> dict[tuple[ShardId, NodeId], str]:
    roles: dict[tuple[ShardId, NodeId], str] = {}
    for shard, item in assignments.items():
        for replica in item.replicas:
            roles[(shard, replica)] = "replica"
        if item.primary is not None:
            roles[(shard, item.primary)] = "primary"
    return roles


def role_changes(before: Assignments, after: Assignments) -> int:
    """(shard, node) pairs whose role (primary, replica or none) differs."""
    old, new = roles_of(before), roles_of(after)
    return sum(1 for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def counts(assignments: Assignments) -> tuple[Counter[NodeId], Counter[NodeId]]:
    primaries: Counter[NodeId] = Counter()
    replicas: Counter[NodeId] = Counter()
    for item in assignments.values():
        if item.primary is not None:
            primaries[item.primary] += 1
        replicas.update(item.replicas)
    return primaries, replicas


def _distance(value: int, allowed: tuple[int, int]) -> int:
    return max(allowed[0] - value, value - allowed[1], 0)


def imbalance(assignments: Assignments, nodes: Sequence[PlacementNode], config: PlacementConfig) -> int:
    """How far the eligible nodes' counts are outside their fair-share ranges, summed."""
    primaries, replicas = counts(assignments)
    return sum(
        _distance(primaries[n], share.primaries_range)
        + _distance(replicas[n], share.replicas_range)
        + _distance(primaries[n] + replicas[n], share.roles_range)
        for n, share in fair_shares(nodes, config, len(assignments)).items()
    )


def assert_valid_and_balanced(
    assignments: Assignments, nodes: Sequence[PlacementNode], config: PlacementConfig
) -> None:
    """The placement rules, checked directly (independently of :func:`violations`)."""
    eligible = [n for n in nodes if not n.draining] or list(nodes)
    zone = {n.node_id: n.zone for n in eligible}
    r = min(config.replication_factor, len(eligible))
    spread = min(r, len(set(zone.values())))
    for shard, item in assignments.items():
        members = item.members
        assert len(members) == len(set(members)) == r, (shard, item)
        assert set(members) <= zone.keys(), (shard, item)  # live, not draining
        assert len({zone[n] for n in members}) == spread, (shard, item)
    primaries, replicas = counts(assignments)
    for n, share in fair_shares(nodes, config, len(assignments)).items():
        for value, fair in (
            (primaries[n], share.primaries),
            (primaries[n] + replicas[n], share.roles),
        ):
            assert math.floor(fair) <= value <= math.ceil(fair), (n, value, fair)
        assert abs(replicas[n] - share.replicas) <= 1, (n, replicas[n], share.replicas)


def record_problems(plan: PlacementPlan, nodes: Sequence[PlacementNode], config: PlacementConfig) -> list[str]:
    """The problems :func:`violations` reports about records (not about balance)."""
    return [p for p in violations(plan, nodes, config) if not p.startswith("node ")]


def budgeted(plan: PlacementPlan) -> int:
    return sum(1 for move in plan.moves if move.kind.budgeted)


# -- strategies -----------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """Live nodes, shards and config, and a current assignment made in some way."""

    nodes: tuple[PlacementNode, ...]
    shards: tuple[ShardId, ...]
    config: PlacementConfig
    current: dict[ShardId, ShardAssignment]
    kind: str
    changed_node: NodeId | None = None  # the node lost, joined or draining


KINDS = ("empty", "valid", "garbage", "lost", "joined")


@st.composite
def clusters(
    draw: st.DrawFn,
    min_nodes: int = 1,
    max_nodes: int = 8,
    min_shards: int = 1,
    max_shards: int = 24,
    max_r: int = 4,
    min_r: int = 1,
    min_budget: int = 1,
    max_budget: int = 10,
) -> tuple[tuple[PlacementNode, ...], tuple[ShardId, ...], PlacementConfig]:
    zone_count = draw(st.integers(1, 4))
    nodes = tuple(
        node(f"n{i}", ZONES[draw(st.integers(0, zone_count - 1))], draw(st.integers(1, 3)))
        for i in range(draw(st.integers(min_nodes, max_nodes)))
    )
    shards = tuple(shard_id(i) for i in range(draw(st.integers(min_shards, max_shards))))
    config = PlacementConfig(draw(st.integers(min_r, max_r)), draw(st.integers(min_budget, max_budget)))
    return nodes, shards, config


@st.composite
def garbage(
    draw: st.DrawFn, nodes: Sequence[PlacementNode], shards: Sequence[ShardId]
) -> dict[ShardId, ShardAssignment]:
    ids = [n.node_id for n in nodes] + [GHOST]
    current: dict[ShardId, ShardAssignment] = {}
    for shard in shards:
        if draw(st.integers(0, 3)) == 0:
            continue  # no record yet
        current[shard] = ShardAssignment(
            shard,
            draw(st.integers(0, 5)),
            draw(st.sampled_from([*ids, None])),
            tuple(draw(st.lists(st.sampled_from(ids), max_size=5))),
        )
    current[UNLISTED] = ShardAssignment(UNLISTED, 2, ids[0], (GHOST,))
    return current


@st.composite
def scenarios(draw: st.DrawFn, /, kinds: Sequence[str] = KINDS, **cluster_args: int) -> Scenario:
    nodes, shards, config = draw(clusters(**cluster_args))
    kind = draw(st.sampled_from(kinds))
    r = config.replication_factor
    if kind == "empty":
        return Scenario(nodes, shards, config, {}, kind)
    if kind == "valid":
        return Scenario(nodes, shards, config, settle(nodes, shards, r), kind)
    if kind == "garbage":
        return Scenario(nodes, shards, config, draw(garbage(nodes, shards)), kind)
    if kind == "lost":
        extra = node(f"n{len(nodes)}", draw(st.sampled_from(ZONES)), draw(st.integers(1, 3)))
        current = settle((*nodes, extra), shards, r)
        return Scenario(nodes, shards, config, current, kind, extra.node_id)
    if kind == "joined":
        if len(nodes) == 1:  # nothing to join: the cluster as it is
            return Scenario(nodes, shards, config, settle(nodes, shards, r), "valid")
        return Scenario(nodes, shards, config, settle(nodes[:-1], shards, r), kind, nodes[-1].node_id)
    if kind == "draining":
        current = settle(nodes, shards, r)
        victim = draw(st.sampled_from(nodes))
        drained = tuple(replace(n, draining=n == victim) for n in nodes)
        return Scenario(drained, shards, config, current, kind, victim.node_id)
    raise AssertionError(kind)


# -- what every single plan promises -------------------------------------------------


class TestEveryPlan:
    @given(scenarios(kinds=(*KINDS, "draining")))
    @THOROUGH
    def test_records_are_complete_and_well_formed(self, sc: Scenario) -> None:
        plan = plan_assignments(sc.nodes, sc.shards, sc.current, sc.config)
        live = {n.node_id for n in sc.nodes}
        assert list(plan.assignments) == list(sc.shards)  # every shard, nothing else
        for shard, item in plan.assignments.items():
            assert item.shard_id == shard
            assert item.primary in live, "a shard never lacks a primary while nodes live"
            assert item.primary not in item.replicas
            assert len(set(item.replicas)) == len(item.replicas)
            assert set(item.replicas) <= live

    @given(scenarios(kinds=(*KINDS, "draining")))
    @THOROUGH
    def test_budget_epochs_and_changed(self, sc: Scenario) -> None:
        plan = plan_assignments(sc.nodes, sc.shards, sc.current, sc.config)
        assert budgeted(plan) <= sc.config.max_moves_per_round
        for shard, item in plan.assignments.items():
            before = sc.current.get(shard)
            if before is None:
                assert item.epoch == 1, "a brand-new shard starts at epoch 1"
            elif item.primary != before.primary:
                assert item.epoch == before.epoch + 1
            else:
                assert item.epoch == before.epoch
        expected = [s for s in sc.shards if sc.current.get(s) != plan.assignments[s]]
        assert list(plan.changed) == expected
        assert {move.shard_id for move in plan.moves} >= set(plan.changed)

    @given(scenarios(kinds=(*KINDS, "draining")))
    @THOROUGH
    def test_safety_of_primaries_and_drain(self, sc: Scenario) -> None:
        plan = plan_assignments(sc.nodes, sc.shards, sc.current, sc.config)
        live = {n.node_id for n in sc.nodes}
        draining = {n.node_id for n in sc.nodes if n.draining}
        for shard, item in plan.assignments.items():
            before = sc.current.get(shard)
            old_members = set(before.members) if before is not None else set()
            live_replicas = {r for r in (before.replicas if before else ()) if r in live}
            if before is not None and before.primary in live:
                # A live primary is only ever replaced by a replica that has the data.
                assert item.primary in {before.primary} | live_replicas
            elif live_replicas:
                assert item.primary in live_replicas, "never promote a node without the data"
            if draining != live:
                assert (set(item.members) & draining) <= old_members, "no new role on drain"
        for move in plan.moves:
            if move.kind is MoveKind.HANDOFF_PRIMARY:
                before = sc.current[move.shard_id]
                assert move.target in before.members, "handoff only to a replica with the data"

    @given(scenarios(kinds=(*KINDS, "draining")), st.randoms(use_true_random=False))
    @FAST
    def test_deterministic_whatever_the_input_order(self, sc: Scenario, rnd: random.Random) -> None:
        plan = plan_assignments(sc.nodes, sc.shards, sc.current, sc.config)
        assert plan == plan_assignments(sc.nodes, sc.shards, sc.current, sc.config)
        nodes, shards, items = list(sc.nodes), list(sc.shards), list(sc.current.items())
        rnd.shuffle(nodes)
        rnd.shuffle(shards)
        rnd.shuffle(items)
        shuffled = plan_assignments(nodes, shards, dict(items), sc.config)
        assert shuffled.assignments == plan.assignments
        assert shuffled.moves == plan.moves


    def test_same_plan_in_every_process(self) -> None:
        # String hashing is randomized per process; no set or dict order may leak into
        # a plan, or two control-plane replicas would disagree.
        script = (
            "from bluemarble.core.placement import *\n"
            "from bluemarble.core.ids import NodeId, shard_id\n"
            "nodes = [PlacementNode(NodeId(f'n{i}'), f'z{i % 3}', 1 + i % 3, i == 4)"
            " for i in range(7)]\n"
            "shards = [shard_id(i) for i in range(20)]\n"
            "current = {}\n"
            "for _ in range(3):\n"
            "    plan = plan_assignments(nodes[1:], shards, current, PlacementConfig(3, 7))\n"
            "    print(plan)\n"
            "    current = dict(plan_assignments(nodes, shards, {}, PlacementConfig(3, 99))"
            ".assignments)\n"
        )
        outputs = {
            subprocess.run(
                [sys.executable, "-c", script], check=True, capture_output=True, text=True,
                env={**os.environ, "PYTHONHASHSEED": seed}, timeout=60,
            ).stdout
            for seed in ("1", "2", "3")
        }
        assert len(outputs) == 1


# -- repeated rounds -----------------------------------------------------------------


class TestConvergence:
    @given(scenarios(kinds=(*KINDS, "draining"), min_budget=3))
    @THOROUGH
    def test_converges_to_a_valid_balanced_placement(self, sc: Scenario) -> None:
        plans = converge(sc.nodes, sc.shards, sc.current, sc.config)
        for plan in plans:
            assert budgeted(plan) <= sc.config.max_moves_per_round
            assert all(item.primary is not None for item in plan.assignments.values())
        final = plans[-1]
        assert violations(final, sc.nodes, sc.config) == []
        assert_valid_and_balanced(final.assignments, sc.nodes, sc.config)
        # Idempotence: a converged placement is left alone.
        again = plan_assignments(sc.nodes, sc.shards, final.assignments, sc.config)
        assert again.moves == () and again.changed == () and again.converged
        assert again.assignments == final.assignments

    @given(scenarios(kinds=(*KINDS, "draining"), min_nodes=5, min_shards=16, min_budget=3))
    @FAST
    def test_converges_on_larger_clusters(self, sc: Scenario) -> None:
        # Hypothesis favours small examples; this one insists on sizeable clusters.
        final = converge(sc.nodes, sc.shards, sc.current, sc.config)[-1]
        assert violations(final, sc.nodes, sc.config) == []
        assert_valid_and_balanced(final.assignments, sc.nodes, sc.config)

    @given(scenarios(max_r=3, min_budget=2))
    @FAST
    def test_equal_capacities_give_primary_counts_within_one(self, sc: Scenario) -> None:
        nodes = tuple(replace(n, capacity=2) for n in sc.nodes)
        final = converge(nodes, sc.shards, sc.current, sc.config)[-1]
        primaries, _ = counts(final.assignments)
        spread = [primaries[n.node_id] for n in nodes]
        assert max(spread) - min(spread) <= 1

    @given(scenarios(min_budget=1, max_budget=2))
    @FAST
    def test_a_budget_of_one_or_two_still_converges_to_valid_records(self, sc: Scenario) -> None:
        # A chain longer than the budget cannot happen, so balance can (rarely) stop one
        # role short; records are always repaired.
        final = converge(sc.nodes, sc.shards, sc.current, sc.config)[-1]
        assert record_problems(final, sc.nodes, sc.config) == []

    def test_balance_stops_one_role_short_only_when_the_repair_is_longer_than_the_budget(self) -> None:
        # Found by hypothesis: with zones a, c, d and R = 4, moving one role from n4 to
        # the new n5 takes a chain of 3 moves.
        zones = {"n0": ("zone-d", 1), "n1": ("zone-a", 1), "n2": ("zone-a", 3), "n3": ("zone-c", 2),
                 "n4": ("zone-d", 2), "n5": ("zone-c", 3)}
        nodes = [node(n, zone=z, capacity=c) for n, (z, c) in zones.items()]
        shards = [shard_id(i) for i in range(9)]
        before = settle(nodes[:5], shards, 4)
        results = {}
        for budget in (2, 3):
            config = PlacementConfig(4, budget)
            final = converge(nodes, shards, before, config)[-1]
            results[budget] = violations(final, nodes, config)
            assert record_problems(final, nodes, config) == []
        assert results[3] == []
        assert results[2] and all("roles" in problem for problem in results[2]), results[2]

    @given(scenarios(kinds=("valid",)))
    @FAST
    def test_a_valid_balanced_placement_changes_nothing(self, sc: Scenario) -> None:
        plan = plan_assignments(sc.nodes, sc.shards, sc.current, sc.config)
        assert plan.moves == () and plan.changed == () and plan.converged
        assert dict(plan.assignments) == sc.current


# -- failover and node loss ----------------------------------------------------------


class TestFailover:
    @given(clusters(min_r=2), st.data())
    @FAST
    def test_promotes_the_live_replica_with_the_highest_position(
        self, cluster: tuple[tuple[PlacementNode, ...], tuple[ShardId, ...], PlacementConfig],
        data: st.DataObject,
    ) -> None:
        nodes, shards, config = cluster
        current = settle(nodes, shards, config.replication_factor)
        dead = data.draw(st.sampled_from(nodes)).node_id
        live = [n for n in nodes if n.node_id != dead]
        led = [s for s in shards if current[s].primary == dead]
        positions = {
            (s, r): data.draw(positions_strategy) for s in led for r in current[s].replicas
        }
        plan = plan_assignments(live, shards, current, config, positions)
        for shard in led:
            candidates = [r for r in current[shard].replicas if r != dead]
            if not candidates:
                continue
            # The greatest (epoch, lsn), not the greatest lsn; ties: the smallest node id.
            top = max(positions[(shard, r)] for r in candidates)
            best = min(r for r in candidates if positions[(shard, r)] == top)
            assert plan.assignments[shard].primary == best
            assert plan.assignments[shard].epoch == current[shard].epoch + 1
            promotions = [m for m in plan.moves if m.shard_id == shard and m.kind is MoveKind.PROMOTE]
            assert [(m.source, m.target) for m in promotions] == [(dead, best)]

    def test_replicas_without_a_reported_position_rank_last(self) -> None:
        nodes = [node("n1"), node("n2"), node("n3")]
        current = records(record(0, "n0", "n1", "n2", "n3"))
        plan = plan_assignments(
            nodes, [shard_id(0)], current, PlacementConfig(3, 5), {(shard_id(0), NodeId("n3")): ZERO}
        )
        assert plan.assignments[shard_id(0)].primary == "n3"
        tie = plan_assignments(nodes, [shard_id(0)], current, PlacementConfig(3, 5))
        assert tie.assignments[shard_id(0)].primary == "n1", "ties go to the smallest node id"

    def test_the_greatest_epoch_wins_over_the_greatest_lsn(self) -> None:
        nodes = [node("n1"), node("n2"), node("n3")]
        current = records(record(0, "n0", "n1", "n2", "n3", epoch=3))
        positions = {
            (shard_id(0), NodeId("n1")): LogPosition(2, 50),  # a deposed primary's longer log
            (shard_id(0), NodeId("n2")): LogPosition(3, 10),
            (shard_id(0), NodeId("n3")): LogPosition(3, 9),
        }
        plan = plan_assignments(nodes, [shard_id(0)], current, PlacementConfig(3, 5), positions)
        assert plan.assignments[shard_id(0)].primary == "n2"
        assert plan.assignments[shard_id(0)].epoch == 4

    def test_no_live_copy_left_assigns_a_primary_and_says_data_may_be_lost(self) -> None:
        current = records(record(0, "gone-1", "gone-2", epoch=7))
        plan = plan_assignments([node("n1")], [shard_id(0)], current, PlacementConfig(2, 3))
        item = plan.assignments[shard_id(0)]
        assert item.primary == "n1" and item.epoch == 8
        [assign] = [m for m in plan.moves if m.kind is MoveKind.ASSIGN_PRIMARY]
        assert "data may be lost" in assign.reason
        assert {m.source for m in plan.moves if m.kind is MoveKind.DROP_REPLICA} == {"gone-2"}

    @given(clusters(min_r=2, min_budget=0, max_budget=0), st.data())
    @FAST
    def test_failover_is_never_limited_by_the_budget(
        self, cluster: tuple[tuple[PlacementNode, ...], tuple[ShardId, ...], PlacementConfig],
        data: st.DataObject,
    ) -> None:
        nodes, shards, config = cluster
        current = settle(nodes, shards, config.replication_factor)
        dead = data.draw(st.sampled_from(nodes)).node_id
        live = [n for n in nodes if n.node_id != dead]
        plan = plan_assignments(live, shards, current, config)
        assert budgeted(plan) == 0
        if live:
            assert all(item.primary != dead for item in plan.assignments.values())
            assert all(dead not in item.replicas for item in plan.assignments.values())

    @given(scenarios(kinds=("lost",), min_budget=2))
    @FAST
    def test_node_loss_moves_only_what_it_must(self, sc: Scenario) -> None:
        lost = sc.changed_node
        plans = converge(sc.nodes, sc.shards, sc.current, sc.config)
        untouched = {s for s in sc.shards if lost not in sc.current[s].members}
        # Failover and the repair of replication touch only the lost node's shards.
        for move in plans[0].moves:
            if move.shard_id in untouched:
                assert move.kind not in (MoveKind.PROMOTE, MoveKind.ASSIGN_PRIMARY)
                assert move.kind is not MoveKind.DROP_REPLICA
                assert not move.reason.startswith("restore replication")
        # A shard that never involved the lost node changes primary (and epoch) only in
        # a round that starts from an invalid or unbalanced placement: the loss changes
        # everyone's fair share, and promotions or repairs can leave a node outside its
        # ranges, so this does happen, but never without a reason.
        before: Assignments = sc.current
        for plan in plans:
            for shard in untouched:
                if plan.assignments[shard].primary != before[shard].primary:
                    assert violations(before, sc.nodes, sc.config) != []
            before = plan.assignments
        assert violations(plans[-1], sc.nodes, sc.config) == []

    def test_node_loss_leaves_other_shards_alone(self) -> None:
        nodes = [node(f"n{i}", ZONES[i % 2]) for i in range(4)]
        shards = [shard_id(i) for i in range(8)]
        current = settle(nodes, shards, 2)
        live = nodes[:3]
        final = converge(live, shards, current, PlacementConfig(2, 4))[-1].assignments
        for shard in shards:
            if "n3" not in current[shard].members:
                assert final[shard] == current[shard]
        assert violations(final, live, PlacementConfig(2, 4)) == []


# -- join and drain ------------------------------------------------------------------


class TestJoin:
    # Budget 3 or more: with 1 or 2, balance can stop one role short when zone spread makes
    # the only repair a 3-move chain (documented in bluemarble.core.placement; the test
    # below pins one such case).
    @given(scenarios(kinds=("joined",), min_nodes=2, min_budget=3))
    @FAST
    def test_join_moves_only_what_balance_requires(self, sc: Scenario) -> None:
        plans = converge(sc.nodes, sc.shards, sc.current, sc.config)
        final = plans[-1]
        assert violations(final, sc.nodes, sc.config) == []
        if imbalance(sc.current, sc.nodes, sc.config) == 0:
            assert final.assignments == sc.current
        joined = sc.changed_node
        assert joined is not None
        share = fair_shares(sc.nodes, sc.config, len(sc.shards))[joined]
        primaries, replicas = counts(final.assignments)
        assert share.roles_range[0] <= primaries[joined] + replicas[joined] <= share.roles_range[1]

    def test_a_node_whose_fair_share_is_nothing_gets_nothing(self) -> None:
        nodes = [node("n1", capacity=3), node("n2", capacity=3)]
        current = settle(nodes, [shard_id(0)], 1)
        plan = plan_assignments([*nodes, node("n3")], [shard_id(0)], current, PlacementConfig(1, 5))
        assert plan.moves == () and plan.converged


class TestDrain:
    # Budget 3 or more, as for joins: with 2, balance can stop one role short (hypothesis
    # found a drain of 7 nodes of capacities 1-3 in two zones ending so).
    @given(scenarios(kinds=("draining",), min_budget=3))
    @FAST
    def test_drain_empties_the_node_without_a_shard_ever_losing_its_primary(self, sc: Scenario) -> None:
        drained = sc.changed_node
        plans = converge(sc.nodes, sc.shards, sc.current, sc.config)
        before: Assignments = sc.current
        for plan in plans:
            for shard, item in plan.assignments.items():
                assert item.primary is not None and item.primary in {n.node_id for n in sc.nodes}
                if len(sc.nodes) > 1:
                    assert drained not in item.members or drained in before[shard].members
            for move in plan.moves:
                if move.kind is MoveKind.HANDOFF_PRIMARY:
                    assert move.target in before[move.shard_id].replicas
            before = plan.assignments
        if len(sc.nodes) > 1:
            assert all(drained not in item.members for item in before.values())
        assert violations(plans[-1], sc.nodes, sc.config) == []

    def test_a_draining_primary_hands_off_first_and_keeps_a_replica_meanwhile(self) -> None:
        nodes = [node("n1", draining=True), node("n2"), node("n3")]
        current = records(record(0, "n1", "n2"))
        config = PlacementConfig(2, 1)
        first = plan_assignments(nodes, [shard_id(0)], current, config)
        assert [m.kind for m in first.moves] == [MoveKind.HANDOFF_PRIMARY]
        assert first.assignments[shard_id(0)] == record(0, "n2", "n1", epoch=2)
        second = plan_assignments(nodes, [shard_id(0)], first.assignments, config)
        assert second.assignments[shard_id(0)] == record(0, "n2", "n3", epoch=2)

    def test_a_draining_primary_without_replica_gets_one_before_handing_off(self) -> None:
        nodes = [node("n1", draining=True), node("n2")]
        current = records(record(0, "n1"))
        plans = converge(nodes, [shard_id(0)], current, PlacementConfig(1, 5))
        assert [m.kind for m in plans[0].moves] == [MoveKind.ADD_REPLICA]
        assert plans[0].assignments[shard_id(0)] == record(0, "n1", "n2")
        assert plans[-1].assignments[shard_id(0)] == record(0, "n2", epoch=2)

    def test_when_every_node_drains_draining_is_ignored(self) -> None:
        nodes = [node("n1", draining=True), node("n2", draining=True)]
        current = settle(nodes, [shard_id(0), shard_id(1)], 2)
        assert violations(current, nodes, PlacementConfig(2, 5)) == []
        plan = plan_assignments(nodes, list(current), current, PlacementConfig(2, 5))
        assert plan.moves == () and plan.converged


class TestManyNodes:
    def test_idle_nodes_add_no_work(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Game servers are many, shards few: the planner runs on every join and leave,
        # so its work must not grow with nodes that hold nothing. Two clusters that
        # differ only by 2,700 idle nodes whose ids sort after the others get the same
        # plans, and the planner evaluates nodes (imbalance changes) exactly as often
        # for both: empty nodes of one zone and fair share are alike, and only the one
        # with the smallest id is considered. (A count, not a timing: the same on every
        # machine. Before this was so, the 3,000-node join took seconds.)
        evaluations = Counter[int]()
        original = State.delta

        def counted(self: State, node: NodeId, d_roles: int, d_primaries: int) -> int:
            evaluations[len(self.layout.live)] += 1
            return original(self, node, d_roles, d_primaries)

        monkeypatch.setattr(State, "delta", counted)
        shards = [shard_id(i) for i in range(16)]
        config = PlacementConfig(3, 32)
        rounds: dict[int, list[PlacementPlan]] = {}
        for size in (300, 3000):
            nodes = [node(f"n{i:04d}", ZONES[i % 3]) for i in range(size)]
            current: Assignments = plan_assignments(nodes[:3], shards, {}, config).assignments
            rounds[size] = converge(nodes, shards, current, config)
            assert violations(rounds[size][-1], nodes, config) == []
        small, large = rounds[300], rounds[3000]
        assert [(p.assignments, p.moves) for p in small] == [(p.assignments, p.moves) for p in large]
        assert len(large) == 3  # the join round, the next one, then done
        assert evaluations[3000] == evaluations[300] > 0


# -- fair shares and the checker -------------------------------------------------------


class TestFairShares:
    def test_shares_follow_capacity(self) -> None:
        shares = fair_shares([node("n1", capacity=1), node("n2", capacity=3)], PlacementConfig(1, 1), 8)
        assert shares[NodeId("n1")] == FairShare(Fraction(2), Fraction(2), Fraction(0))
        assert shares[NodeId("n2")].primaries_range == (6, 6)

    def test_one_role_per_shard_caps_a_big_node(self) -> None:
        nodes = [node("n1", capacity=3), node("n2"), node("n3")]
        shares = fair_shares(nodes, PlacementConfig(3, 1), 10)
        assert {n: s.roles for n, s in shares.items()} == {"n1": 10, "n2": 10, "n3": 10}
        assert shares[NodeId("n1")].primaries == 6

    def test_zone_spread_comes_before_capacity(self) -> None:
        # Every shard needs a copy in zone-b, whose only node therefore holds them all.
        nodes = [node("a1", "zone-a", 3), node("a2", "zone-a", 3), node("b1", "zone-b", 1)]
        shares = fair_shares(nodes, PlacementConfig(2, 1), 7)
        assert shares[NodeId("b1")].roles == 7
        assert shares[NodeId("a1")].roles == shares[NodeId("a2")].roles == Fraction(7, 2)
        final = converge(nodes, [shard_id(i) for i in range(7)], {}, PlacementConfig(2, 5))[-1]
        assert violations(final, nodes, PlacementConfig(2, 5)) == []

    def test_draining_nodes_have_no_share(self) -> None:
        shares = fair_shares([node("n1"), node("n2", draining=True)], PlacementConfig(2, 1), 4)
        assert set(shares) == {"n1"}


class TestViolations:
    def test_a_good_placement_has_none(self) -> None:
        nodes = [node("n1", "zone-a"), node("n2", "zone-b")]
        good = records(record(0, "n1", "n2"), record(1, "n2", "n1"))
        assert violations(good, nodes, PlacementConfig(2, 1)) == []
        plan = plan_assignments(nodes, list(good), good, PlacementConfig(2, 1))
        assert violations(plan, nodes, PlacementConfig(2, 1)) == []

    def test_reports_each_problem(self) -> None:
        nodes = [node("n1", "zone-a"), node("n2", "zone-a"), node("n3", "zone-b", draining=True)]
        bad = records(
            record(0, None),
            record(1, "gone", "n1", "n1"),
            record(2, "n3", "n1"),
            record(3, "n1", "n2"),
        )
        problems = violations(bad, nodes, PlacementConfig(2, 1))
        for expected in (
            "shard-0: no primary",
            "shard-1: primary gone is a dead or unknown node",
            "shard-1: n1 is listed twice",
            "shard-2: primary n3 is a draining node",
            "shard-0: 0 copies, want 2",
        ):
            assert expected in problems
        assert any(p.startswith("node n2:") for p in problems)  # n2 holds too little

    def test_zone_spread(self) -> None:
        nodes = [node("n1", "zone-a"), node("n2", "zone-a"), node("n3", "zone-b")]
        problems = violations(records(record(0, "n1", "n2")), nodes, PlacementConfig(2, 1))
        assert "shard-0: copies span 1 zones, want 2" in problems

    def test_expected_shards(self) -> None:
        # The end-to-end tests and the benchmark name the shards that must exist: a
        # missing record and a record too many are problems, and fair shares are those
        # of the expected shards.
        nodes = [node("n1"), node("n2")]
        good = records(record(0, "n1"), record(1, "n2"))
        config = PlacementConfig(1, 0)
        assert violations(good, nodes, config, shards=[shard_id(0), shard_id(1)]) == []
        problems = violations(good, nodes, config, shards=[shard_id(0), shard_id(2)])
        assert problems[:2] == ["shard-1: record of a shard that should not exist", "shard-2: no record"]
        problems = violations(records(record(0, "n1")), nodes, config, shards=[shard_id(0), shard_id(1)])
        assert "shard-1: no record" in problems
        assert any(p.startswith("node n2: 0 primaries") for p in problems)

    def test_unequal_primaries_with_equal_capacities(self) -> None:
        # What the end-to-end test and the failover benchmark demand: primary counts
        # within one of each other when capacities are equal.
        nodes = [node("n1", "zone-a"), node("n2", "zone-b"), node("n3", "zone-c")]
        lopsided = records(*(record(i, "n1", "n2", "n3") for i in range(3)))
        problems = violations(lopsided, nodes, PlacementConfig(3, 1))
        assert "node n2: 0 primaries, fair share 1.00 (allowed 1..1)" in problems


class TestWorkingState:
    """The planner's working state and budget (private modules, tested directly where
    the public API cannot tell)."""

    def test_a_copy_and_its_original_change_independently(self) -> None:
        nodes = [node(f"n{i}", ZONES[i % 2]) for i in range(4)]
        shards = [shard_id(i) for i in range(4)]
        current = settle(nodes, shards, 2)
        state, dropped = State.load(make_layout(nodes, PlacementConfig(2, 1), 4), shards, current)
        assert dropped == []
        before = state.records(current)
        trial = state.copy()
        shard = shards[0]
        [replica] = trial.replicas[shard]
        spare = next(n for n in trial.candidates() if n not in trial.members(shard))
        trial.remove(shard, replica)
        trial.add(shard, spare)
        trial.set_primary(shards[1], trial.replicas[shards[1]][0])
        assert state.records(current) == before == current
        assert trial.records(current) != before
        assert state.busy == {n for item in current.values() for n in item.members}
        # And the other way round: the original changing leaves the copy alone.
        again = trial.records(current)
        state.remove(shards[2], state.replicas[shards[2]][0])
        assert trial.records(current) == again

    def test_budget(self) -> None:
        budget = Budget(2)
        assert budget.covers(2) and not budget.exhausted
        assert budget.spend() and budget.spend()
        assert not budget.spend() and budget.exhausted
        assert (budget.full, budget.left) == (2, 0)


# -- inputs at the edges -------------------------------------------------------------


class TestEdges:
    def test_no_live_node_keeps_every_record(self) -> None:
        current = records(record(0, "n1", "n2", epoch=4))
        plan = plan_assignments([], [shard_id(0), shard_id(1)], current, PlacementConfig(3, 5))
        assert plan.assignments[shard_id(0)] == current[shard_id(0)]
        assert plan.assignments[shard_id(1)] == ShardAssignment(shard_id(1), 0, None, ())
        assert plan.moves == () and plan.converged and plan.changed == (shard_id(1),)

    def test_new_shards_start_at_epoch_one(self) -> None:
        plan = plan_assignments([node("n1")], [shard_id(0)], {}, PlacementConfig(1, 1))
        assert plan.assignments[shard_id(0)] == record(0, "n1", epoch=1)
        assert [(m.kind, m.reason) for m in plan.moves] == [(MoveKind.ASSIGN_PRIMARY, "new shard")]

    def test_records_of_other_shards_are_ignored(self) -> None:
        current = records(record(0, "n1"), record(5, "n1"))
        plan = plan_assignments([node("n1")], [shard_id(0)], current, PlacementConfig(1, 1))
        assert list(plan.assignments) == [shard_id(0)] and plan.moves == ()

    def test_duplicates_and_unknown_nodes_are_dropped(self) -> None:
        current = records(record(0, "n1", "n1", "ghost", "n2", "n2"))
        plan = plan_assignments([node("n1"), node("n2")], [shard_id(0)], current, PlacementConfig(2, 1))
        assert plan.assignments[shard_id(0)] == record(0, "n1", "n2")
        assert [m.kind for m in plan.moves] == [MoveKind.DROP_REPLICA] * 3

    @pytest.mark.parametrize(
        "nodes, shards, current, config",
        [
            ([node("n1"), node("n1")], [shard_id(0)], {}, PlacementConfig(1, 1)),
            ([node("n1")], [shard_id(0), shard_id(0)], {}, PlacementConfig(1, 1)),
            ([node("n1")], [shard_id(0)], {shard_id(0): record(1, "n1")}, PlacementConfig(1, 1)),
            ([node("n1", capacity=0)], [shard_id(0)], {}, PlacementConfig(1, 1)),
            ([node("n1")], [shard_id(0)], {}, PlacementConfig(0, 1)),
            ([node("n1")], [shard_id(0)], {}, PlacementConfig(1, -1)),
        ],
    )
    def test_programmer_errors_raise_value_error(
        self,
        nodes: list[PlacementNode],
        shards: list[ShardId],
        current: dict[ShardId, ShardAssignment],
        config: PlacementConfig,
    ) -> None:
        # Real errors, not assertions: they must not vanish under `python -O`.
        with pytest.raises(ValueError):
            plan_assignments(nodes, shards, current, config)
        if len(shards) == 1 and not current:  # the checker checks its arguments alike
            with pytest.raises(ValueError):
                violations({}, nodes, config)


# -- differential check against an exhaustive search ----------------------------------


def minimum_role_changes(
    nodes: Sequence[PlacementNode], shards: Sequence[ShardId], start: Assignments,
    config: PlacementConfig,
) -> int:
    """The fewest role changes from ``start`` to any valid, balanced placement, found by
    trying them all (depth-first, pruned by counts and by cost). Validity and balance
    are re-implemented here from their definitions; only the fair shares come from the
    module (they have their own tests above)."""
    shares = fair_shares(nodes, config, len(shards))
    eligible = sorted(shares)
    zone = {n.node_id: n.zone for n in nodes}
    r = min(config.replication_factor, len(eligible))
    spread = min(r, len({zone[n] for n in eligible}))
    options: list[tuple[NodeId, tuple[NodeId, ...]]] = []
    for primary in eligible:
        for replicas in combinations([n for n in eligible if n != primary], r - 1):
            if len({zone[n] for n in (primary, *replicas)}) == spread:
                options.append((primary, replicas))
    start_roles = roles_of(start)
    costs = []
    for shard in shards:
        row = []
        for primary, replicas in options:
            mine = {(shard, primary): "primary", **{(shard, n): "replica" for n in replicas}}
            keys = {key for key in start_roles if key[0] == shard} | mine.keys()
            row.append(sum(1 for key in keys if start_roles.get(key) != mine.get(key)))
        costs.append(row)
    primaries = dict.fromkeys(eligible, 0)
    replica_count = dict.fromkeys(eligible, 0)
    best = [10**9]

    def fits(final: bool) -> bool:
        for n in eligible:
            share = shares[n]
            checks = (
                (primaries[n], share.primaries_range),
                (replica_count[n], share.replicas_range),
                (primaries[n] + replica_count[n], share.roles_range),
            )
            for value, (low, high) in checks:
                if value > high or (final and value < low):
                    return False
        return True

    def search(index: int, cost: int) -> None:
        if cost >= best[0] or not fits(final=False):
            return
        if index == len(shards):
            if fits(final=True):
                best[0] = cost
            return
        for choice in sorted(range(len(options)), key=lambda c: costs[index][c]):
            primary, replicas = options[choice]
            primaries[primary] += 1
            for n in replicas:
                replica_count[n] += 1
            search(index + 1, cost + costs[index][choice])
            primaries[primary] -= 1
            for n in replicas:
                replica_count[n] -= 1

    search(0, 0)
    assert best[0] < 10**9, "a valid balanced placement always exists"
    return best[0]


class TestAgainstExhaustiveSearch:
    @given(scenarios(kinds=(*KINDS, "draining"), max_nodes=4, max_shards=4, max_r=3))
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_converged_result_is_valid_balanced_and_nearly_minimal(self, sc: Scenario) -> None:
        # Failover is forced (the replica with the writes must be promoted), so both
        # sides start from the state right after it.
        start = plan_assignments(
            sc.nodes, sc.shards, sc.current, replace(sc.config, max_moves_per_round=0)
        ).assignments
        final = converge(sc.nodes, sc.shards, start, sc.config)[-1]
        assert violations(final, sc.nodes, sc.config) == []
        ours = role_changes(start, final.assignments)
        least = minimum_role_changes(sc.nodes, sc.shards, start, sc.config)
        # Equal in about 95% of cases. The greedy plans in rounds (a replica added in one
        # round takes a primary only in the next, and repairs come before balance), and
        # a draining primary is handed to an existing replica first, as specified,
        # which costs one more role change than placing the primary elsewhere directly.
        # Observed over ~25,000 random cases: never above 2 * least + 1 (plus the
        # drained primaries); a case above it is a regression or a new corner.
        draining = {n.node_id for n in sc.nodes if n.draining}
        drained_primaries = sum(1 for item in start.values() if item.primary in draining)
        assert ours <= 2 * least + 1 + drained_primaries
        if least == 0:
            assert ours == 0


def test_a_copy_kept_by_a_node_that_left_is_promoted_only_when_it_must_be_complete() -> None:
    copies = {
        NodeId("member"): LogPosition(1, 9),  # a member: failover compares its position
        NodeId("left-before"): LogPosition(1, 41),  # left the shard before term 2 began
        NodeId("left-during"): LogPosition(2, 50),  # left during term 2
    }
    members = [NodeId("member")]
    assert unsafe_outside_copies(copies, members, 2, replication_factor=2) == {"left-before"}
    assert unsafe_outside_copies(copies, members, 1, replication_factor=2) == frozenset()
    # With R = 3 the other replica may have acknowledged writes after the node left.
    assert unsafe_outside_copies(copies, members, 2, replication_factor=3) == {"left-before", "left-during"}


# -- a handed-off primary keeps its copy (bluemarble.core.placement.handoff) ---------------


def test_a_drained_primary_keeps_its_copy_in_the_plan_that_hands_it_off() -> None:
    """Draining ``a`` hands its primary to a replica and moves its copy in one plan;
    kept, ``a`` stays a replica (the MOVE becomes an ADD) until the caller lets go."""
    nodes = [node("a", "z1", draining=True), node("b", "z2"), node("c", "z3"), node("d", "z1")]
    current = records(record(0, "a", "b", "c"))
    plan = plan_assignments(nodes, [shard_id(0)], current, PlacementConfig(3, 8))
    handed = handoffs_of(plan)
    assert handed == {shard_id(0): (NodeId("a"), plan.assignments[shard_id(0)].primary)}
    assert "a" not in plan.assignments[shard_id(0)].members  # what the planner alone does
    assert replica_moves_of(plan) == [(shard_id(0), NodeId("a"), NodeId("d"))]
    kept = keep_copies(plan, current, {(shard_id(0), NodeId("a"))}, {n.node_id for n in nodes})
    after = kept.assignments[shard_id(0)]
    assert after.primary == plan.assignments[shard_id(0)].primary and after.epoch == 2
    assert set(after.replicas) == {*plan.assignments[shard_id(0)].replicas, "a"}
    assert [m.kind for m in kept.moves if m.source == "a"] == [MoveKind.HANDOFF_PRIMARY]
    assert any(m.kind is MoveKind.ADD_REPLICA and m.target == "d" for m in kept.moves)
    assert kept.changed == (shard_id(0),) and not kept.converged
    # Let go (the new primary serves): the next plan drops the extra copy.
    again = plan_assignments(nodes, [shard_id(0)], kept.assignments, PlacementConfig(3, 8))
    assert "a" not in again.assignments[shard_id(0)].members
    assert len(again.assignments[shard_id(0)].members) == 3


def test_keeping_a_former_primary_changes_nothing_else() -> None:
    current = records(record(0, "b", "a", "c"), record(1, "c", "b", "d"))
    plan = plan_assignments([node("b"), node("c"), node("d")], [shard_id(0), shard_id(1)], current,
                            PlacementConfig(3, 8))
    live = {NodeId(n) for n in "bcd"}
    # A former primary that is gone is not kept; one still a member needs nothing.
    assert keep_copies(plan, current, {(shard_id(0), NodeId("a"))}, live) is plan
    assert keep_copies(plan, current, {(shard_id(1), NodeId("c"))}, live) is plan
    assert handoffs_of(plan) == {}  # a promotion or a dropped replica is no handoff
    assert replica_moves_of(plan) == []


def test_a_moved_replica_stays_until_its_replacement_has_copied_the_shard() -> None:
    """A rebalance moves b's copy of shard 0 to the new node c. Kept, b stays a replica
    (with R = 2 the shard's only one able to acknowledge writes while c copies)."""
    nodes = [node("a"), node("b"), node("c")]
    current = records(record(0, "a", "b"), record(1, "a", "b"), record(2, "b", "a"))
    shards = [shard_id(i) for i in range(3)]
    plan = plan_assignments(nodes, shards, current, PlacementConfig(2, 8))
    moved = replica_moves_of(plan)
    assert moved, plan.moves
    keep = {(shard, source) for shard, source, _ in moved}
    kept = keep_copies(plan, current, keep, {n.node_id for n in nodes})
    for shard, source, target in moved:
        record_ = kept.assignments[shard]
        assert source in record_.replicas and target in record_.replicas, record_
        assert record_.epoch == current[shard].epoch  # no primary changed
    assert not any(m.kind is MoveKind.MOVE_REPLICA for m in kept.moves)
    assert {(m.shard_id, m.target) for m in kept.moves if m.kind is MoveKind.ADD_REPLICA} >= {
        (shard, target) for shard, _, target in moved
    }


def test_an_excess_copy_is_trimmed_even_when_the_plan_reads_it_as_a_move_to_a_member() -> None:
    """A state left by a rolling restart: shards 1 and 14 hold three copies at R = 2.
    The planner trims each as "remove one replica, move another onto it", whose target
    already holds a copy. Kept as a replica move, its source stayed, the plan equalled
    the state and nothing was ever written; left out, the trim goes through in one round
    (every earlier move confirmed, as the reconciler's pins are once copies caught up)."""
    nodes = [node("n1", "z1"), node("n2", "z2"), node("n3", "z3"), node("n4", "z1")]
    layout = [("n2", "n1"), ("n1", "n2", "n3"), ("n2", "n1"), ("n2", "n4"), ("n2", "n4"), ("n4", "n3"),
              ("n4", "n2"), ("n1", "n2"), ("n1", "n2"), ("n1", "n3"), ("n4", "n3"), ("n3", "n1"),
              ("n3", "n4"), ("n4", "n3"), ("n3", "n1", "n2"), ("n3", "n4")]
    current: dict[ShardId, ShardAssignment] = records(
        *(record(i, *members, epoch=5) for i, members in enumerate(layout))
    )
    live = {n.node_id for n in nodes}
    for _ in range(3):
        plan = plan_assignments(nodes, list(current), current, PlacementConfig(2, 32))
        keep = {(shard, source) for shard, source, _ in replica_moves_of(plan, current)}
        plan = keep_copies(plan, current, keep, live)
        current.update({shard: plan.assignments[shard] for shard in plan.changed})
        if plan.converged:
            break
    assert plan.converged
    assert all(len(a.members) == 2 for a in current.values()), {s: a.members for s, a in current.items()}


def test_a_plan_without_some_shards_leaves_them_as_they_are_and_the_rest_stands() -> None:
    nodes = [node("a"), node("b"), node("c")]
    current = records(record(0, "a", "b"), record(1, "a", "b"), record(2, "b", "a"))
    shards = [shard_id(i) for i in range(3)]
    plan = plan_assignments(nodes, shards, current, PlacementConfig(2, 8))
    assert plan.changed
    first = plan.changed[0]
    rest = without_shards(plan, current, {first})
    assert rest.assignments[first] == current[first] and first not in rest.changed
    assert not any(m.shard_id == first for m in rest.moves) and not rest.converged
    for shard in plan.changed[1:]:
        assert rest.assignments[shard] == plan.assignments[shard] and shard in rest.changed
    assert without_shards(plan, current, set()) is plan


def test_a_replica_said_to_be_copying_gets_no_primary() -> None:
    """The reconciler passes the replicas still copying (they say so) to the planner: no
    handoff goes to them, here where the draining primary's only other replica is one."""
    nodes = [node("a", draining=True), node("b"), node("c")]
    current = records(record(0, "a", "b", "c"))
    config = PlacementConfig(3, 8)
    assert handoffs_of(plan_assignments(nodes, [shard_id(0)], current, config))
    plan = plan_assignments(nodes, [shard_id(0)], current, config,
                            copying={(shard_id(0), NodeId("b")), (shard_id(0), NodeId("c"))})
    assert not handoffs_of(plan)
    assert plan.assignments[shard_id(0)].primary == "a"


def test_a_promotion_waits_for_down_replicas_that_may_hold_acknowledged_writes() -> None:
    from bluemarble.core.placement.repair import down_replicas_that_may_hold_more

    n = [NodeId(f"n{i}") for i in range(5)]
    # R = 3: a write is on the primary and one replica, either one.
    assert down_replicas_that_may_hold_more([n[1], n[2]], live={n[2]}, old=n[0]) == [n[1]]
    assert down_replicas_that_may_hold_more([n[1], n[2]], live={n[1], n[2]}, old=n[0]) == []
    # R = 2: the one replica acknowledged every write; if it lives, nothing to wait for.
    assert down_replicas_that_may_hold_more([n[1]], live={n[1]}, old=n[0]) == []
    assert down_replicas_that_may_hold_more([n[1]], live=set(), old=n[0]) == [n[1]]
    # R = 1: no replica, nothing to wait for (the primary alone held the writes).
    assert down_replicas_that_may_hold_more([], live=set(), old=n[0]) == []
    # The old primary listed among the replicas (a record mid-handoff) is not waited for here.
    assert down_replicas_that_may_hold_more([n[0], n[1]], live={n[1]}, old=n[0]) == []
