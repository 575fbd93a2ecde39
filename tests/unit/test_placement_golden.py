"""Golden plans: :mod:`bluemarble.core.placement` must keep planning exactly as it did.

A seeded generator makes 20,000 small placement scenarios, each a sequence of rounds:
a cluster (zones, capacities, draining nodes, replication factor, budget, shards) and a
current assignment (none; garbage with dead, unknown and duplicate entries, records of
shards nobody asked about and random epochs; or what an earlier phase converged to),
planned round after round with each plan applied, then a change (nodes lost with
reported positions, nodes joined, a node draining, another replication factor or
budget, shards added) and more rounds. A few scenarios have malformed arguments.

Everything goes into one SHA-256 digest: the ``repr`` of every plan (assignments,
moves with their reasons, changed, converged), :func:`fair_shares` of each scenario's
first cluster and :func:`violations` of its final assignments (or, for malformed
arguments, that the call was refused). :data:`GOLDEN_DIGEST` was recorded from the
single-module planner of before the split into a package (commit 51b6090), which was
also compared with the package plan by plan on these and other scenarios. A change of
the digest means plans changed: if that is intended, say why in the commit and record
the new digest (``python -m tests.unit.test_placement_golden`` prints it).

The scenarios are small (at most 6 nodes and 8 shards to start with, 3 rounds per
phase): most of the cost of a plan does not depend on the cluster's size, and these
sizes already reach every phase and search of the planner; the run takes about 15 s.
"""

from __future__ import annotations

import hashlib
import random
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from bluemarble.core import placement
from bluemarble.core.ids import NodeId, ShardId, shard_id
from bluemarble.core.replication.position import ZERO, LogPosition

CASES = 20_000
SEED = 20_240_611
GOLDEN_DIGEST = "5548539e9bcabec5ac8cf6617d883b5cdc75fd7e5068f6ec816fbe8a689dfd9f"

NodeSpec = tuple[str, str, int, bool]
"""(node id, zone, capacity, draining)."""
RecordSpec = tuple[str, int, str | None, tuple[str, ...]]
"""(shard id, epoch, primary, replicas)."""
GHOSTS = ("ghost", "n99")  # node ids no cluster has: dead or never seen


@dataclass
class Phase:
    """One cluster configuration, planned for up to ``rounds`` rounds (fewer if a plan
    converges), each plan applied to the next round's current."""

    nodes: list[NodeSpec]
    shards: list[str]
    replication_factor: int
    budget: int
    rounds: int
    current: list[RecordSpec] | None = None
    """Replaces the current assignment at the start of the phase (None: keep it)."""
    positions: dict[tuple[str, str], int] = field(default_factory=dict)
    """Given to the first round of the phase only."""


@dataclass
class Case:
    phases: list[Phase]
    bad: str | None = None
    """A malformed argument to inject into the first round (the call must be refused)."""


# -- the generator (plain data: the same cases whatever implementation plans them) --


def _nodes(rnd: random.Random, count: int, zones: int, ids: Sequence[str]) -> list[NodeSpec]:
    capacities = rnd.choice(((1,), (1,), (1, 2), (1, 2, 3), (1, 5)))
    draining = rnd.choice((0.0, 0.0, 0.0, 0.15, 0.4, 1.0))
    return [
        (name, f"z{rnd.randrange(zones)}", rnd.choice(capacities), rnd.random() < draining)
        for name in rnd.sample(list(ids), count)
    ]


def _garbage(rnd: random.Random, nodes: Sequence[NodeSpec], shards: Sequence[str]) -> list[RecordSpec]:
    ids = [n[0] for n in nodes] + list(GHOSTS)
    records: list[RecordSpec] = []
    for shard in shards:
        if rnd.random() < 0.25:
            continue  # no record yet
        primary = rnd.choice([*ids, None])
        replicas = tuple(rnd.choice(ids) for _ in range(rnd.randrange(5)))
        records.append((shard, rnd.randrange(6), primary, replicas))
    if rnd.random() < 0.5:  # a record of a shard nobody asks about
        records.append(("shard-999", 2, ids[0], (GHOSTS[0],)))
    return records


def make_case(index: int, seed: int = SEED, max_nodes: int = 6, max_shards: int = 8, rounds: int = 3) -> Case:
    """Scenario ``index`` of the generator seeded ``seed`` (sizes are upper bounds)."""
    rnd = random.Random(seed * 1_000_003 + index)
    zones = rnd.randint(1, 4)
    pool = [f"n{i}" for i in range(max_nodes + 3)]
    count = rnd.randint(1, max_nodes)
    nodes = _nodes(rnd, count, zones, pool)
    shard_count = rnd.randint(1, max_shards)
    shards = [shard_id(i) for i in sorted(rnd.sample(range(shard_count + 4), shard_count))]
    if rnd.random() < 0.05:
        shards.append("legacy")  # a name that is not shard-<n>: sorts after the others
    rnd.shuffle(shards)
    rf = rnd.randint(1, 4)
    budget = rnd.choice((0, 1, 1, 2, 3, 5, 8, 10_000))
    kind = rnd.choice(("empty", "garbage", "garbage", "settled"))
    current: list[RecordSpec] = [] if kind != "garbage" else _garbage(rnd, nodes, shards)
    first = Phase(nodes, shards, rf, budget, rnd.randint(1, rounds), current)
    if kind == "garbage" and rnd.random() < 0.5:  # positions reported for some replicas
        first.positions = {
            (shard, name): rnd.randrange(4) for shard, _, _, replicas in current for name in replicas
            if rnd.random() < 0.7
        }
    if kind == "settled":
        first.budget, first.rounds = 10_000, rounds
    phases = [first]
    for _ in range(rnd.choice((0, 1, 1))):
        phases.append(_change(rnd, phases[-1], zones, pool, rounds))
    bad = None
    if rnd.random() < 0.01:
        bad = rnd.choice(("duplicate node", "duplicate shard", "misfiled record", "capacity", "rf", "budget", "epoch"))
    return Case(phases, bad)


def _change(rnd: random.Random, last: Phase, zones: int, pool: Sequence[str], rounds: int) -> Phase:
    nodes = [(name, zone, capacity, False) for name, zone, capacity, _ in last.nodes]
    shards = list(last.shards)
    rf, budget = last.replication_factor, rnd.choice((0, 1, 2, 3, 5, 10_000))
    what = rnd.choice(("lose", "lose", "join", "drain", "rf", "shards", "lose and join"))
    positions: dict[tuple[str, str], int] = {}
    if "lose" in what and nodes:
        for lost in rnd.sample(nodes, rnd.randint(1, min(2, len(nodes)))):
            nodes.remove(lost)
        for shard in shards:  # positions of whoever may be promoted (the caller's probe)
            for name, *_ in nodes:
                if rnd.random() < 0.5:
                    positions[(shard, name)] = rnd.randrange(4)
    if "join" in what:
        free = [name for name in pool if name not in {n[0] for n in nodes}]
        for name in rnd.sample(free, min(len(free), rnd.randint(1, 3))):
            nodes.append((name, f"z{rnd.randrange(zones)}", rnd.choice((1, 1, 2)), False))
    if what == "drain" and nodes:
        drained = set(rnd.sample([n[0] for n in nodes], rnd.randint(1, len(nodes))))
        nodes = [(name, zone, capacity, name in drained) for name, zone, capacity, _ in nodes]
    if what == "rf":
        rf = rnd.randint(1, 4)
    if what == "shards":
        taken = set(shards)
        shards += [shard_id(i) for i in range(40, 40 + rnd.randint(1, 4)) if shard_id(i) not in taken]
    return Phase(nodes, shards, rf, budget, rnd.randint(1, rounds), None, positions)


def cases(count: int = CASES, seed: int = SEED, **sizes: int) -> Iterator[Case]:
    for index in range(count):
        yield make_case(index, seed, **sizes)


# -- running a case with one implementation -------------------------------------------


def run_case(pl: ModuleType, case: Case) -> list[str]:
    """What ``pl`` (a placement implementation: the package, or a module with the same
    public names) answers for ``case``: one line per phase and round."""
    out: list[str] = []
    current: Mapping[ShardId, Any] = {}
    for number, phase in enumerate(case.phases):
        nodes = [pl.PlacementNode(NodeId(name), zone, capacity, drain) for name, zone, capacity, drain in phase.nodes]
        config = pl.PlacementConfig(phase.replication_factor, phase.budget)
        shards = [ShardId(s) for s in phase.shards]
        if phase.current is not None:
            current = {
                ShardId(s): pl.ShardAssignment(
                    ShardId(s), epoch, None if primary is None else NodeId(primary), tuple(NodeId(r) for r in replicas)
                )
                for s, epoch, primary, replicas in phase.current
            }
        # The generator's plain integer positions as log positions of one epoch (0 is
        # an empty log): the same order, so the same plans as when positions were lsns.
        positions: Mapping[tuple[ShardId, NodeId], LogPosition] | None = {
            (ShardId(s), NodeId(n)): LogPosition(1, p) if p else ZERO for (s, n), p in phase.positions.items()
        } or None
        if number == 0 and case.bad is not None:
            return [_refused(pl, case.bad, nodes, shards, current, config)]
        if number == 0:
            out.append(f"shares {pl.fair_shares(nodes, config, len(shards))!r}")
        for _ in range(phase.rounds):
            plan = pl.plan_assignments(nodes, shards, current, config, positions)
            out.append(repr(plan))
            current, positions = plan.assignments, None
            if plan.converged:
                break
    out.append(f"violations {pl.violations(current, nodes, config)!r}")
    return out


def _refused(
    pl: ModuleType, bad: str, nodes: list[Any], shards: list[ShardId], current: Mapping[ShardId, Any], config: Any
) -> str:
    """Plan with one malformed argument; the old module asserted, the package raises
    ValueError: either way the call must be refused."""
    if bad == "duplicate node":
        nodes = [*nodes, nodes[0]]
    elif bad == "duplicate shard":
        shards = [*shards, shards[0]]
    elif bad == "misfiled record":
        current = {**current, shards[0]: pl.ShardAssignment(ShardId("shard-777"), 1, None, ())}
    elif bad == "capacity":
        nodes = [pl.PlacementNode(nodes[0].node_id, nodes[0].zone, 0, False), *nodes[1:]]
    elif bad == "rf":
        config = pl.PlacementConfig(0, 1)
    elif bad == "budget":
        config = pl.PlacementConfig(1, -1)
    else:
        current = {**current, shards[0]: pl.ShardAssignment(shards[0], -1, None, ())}
    try:
        pl.plan_assignments(nodes, shards, current, config)
    except (AssertionError, ValueError):
        return f"refused {bad}"
    return f"accepted {bad}"


def digest(pl: ModuleType, all_cases: Iterator[Case], progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    for i, case in enumerate(all_cases):
        for line in run_case(pl, case):
            h.update(line.encode())
            h.update(b"\n")
        if progress is not None:
            progress(i)
    return h.hexdigest()


def test_plans_are_those_of_the_recorded_implementation() -> None:
    assert digest(placement, cases()) == GOLDEN_DIGEST


if __name__ == "__main__":
    print(digest(placement, cases(int(sys.argv[1]) if len(sys.argv) > 1 else CASES)))
