"""Shard placement: which live node holds the primary and the replicas of every shard.

Why this module exists: the leader's reconciler must turn "these nodes are alive, these
shards exist, this is what etcd says today" into "this is what etcd should say next",
and that decision is the part of the control plane where a mistake loses data (promoting
a replica that never had the writes), loses availability (a shard left without a primary)
or churns the cluster (moving shards that were fine). So it is one pure function,
:func:`plan_assignments`: values in, a frozen :class:`PlacementPlan` out. It imports no
grpc, no etcd client, no asyncio, no clock and no randomness; the same input always gives
the same plan, and every tie is broken by shard id or node id. The reconciler writes the
plan's assignments in one transaction guarded by its leadership; nothing here does I/O.

What a valid, balanced placement is (DESIGN.md, flows 3 and 4), checked by
:func:`violations` and reached by repeated calls of :func:`plan_assignments`:

* *Eligible* nodes are the live nodes that are not draining. If every live node is
  draining, draining cannot make progress (there is nowhere to go) and the drain flags
  are ignored altogether.
* Effective replication ``R = min(replication_factor, len(eligible))``: every shard has
  one primary and ``R - 1`` replicas on distinct eligible nodes.
* Zone spread comes first: the copies of a shard span ``min(R, zones among eligible
  nodes)`` distinct zones.
* Balance by capacity (:class:`FairShare`, :func:`fair_shares`): every eligible node's
  number of primaries is its fair share ``S * capacity / total capacity`` (S = number of
  shards) rounded down or up, so with equal capacities primary counts differ by at most
  one; its number of roles (primaries + replicas) is its fair share of the ``S * R``
  roles rounded down or up; its number of replicas is within one of its fair share of
  replicas (roles share minus primaries share). Replicas get the looser "within one"
  because they are the difference of the other two counts: asking for the same
  rounding of all three over-constrains placement, often beyond what zone spread
  leaves possible. A node can hold at most one role per shard, and zone spread can force
  a zone to hold more or fewer copies than its capacity's worth; so the fair share of
  roles is the capacity-proportional share *capped* by those limits (water-filling,
  first over zones, then over the nodes of each zone), which is plainly
  ``S * R * capacity / total capacity`` whenever no cap binds.

How a round moves toward it, in this order:

1. *Failover*, never limited by the move budget: a shard whose primary is dead gets the
   live replica with the highest applied log position (``positions``; ties go to the
   smallest node id), a ``PROMOTE``. A node that was not already a replica of the shard
   is never promoted while a live replica exists, since it would not have the writes.
   Only when no live replica exists at all is a fresh node assigned
   (``ASSIGN_PRIMARY``), and the move's reason then says that the shard's data may be
   lost. Dead or unknown nodes and duplicate entries are dropped from replica lists
   (``DROP_REPLICA``: bookkeeping, not budgeted either).
2. Then, with at most ``max_moves_per_round`` moves: restore the replica count (shards
   with the fewest copies first), hand off the primaries of draining nodes, remove
   excess replicas, move replicas off draining nodes, repair zone spread, rebalance.
   Rebalancing applies, while the total imbalance (how far counts are outside their
   ranges) is above zero, the step that removes it at the lowest cost in changed roles:
   the shortest chain of replica moves, or of handoffs, or a primary relocation (the
   target is added as an extra replica; a later round hands the primary to it and drops
   the old primary's copy). A chain is applied whole or not at all, so it is at most
   one round's budget long (so with a budget of one, balance can, rarely, stop one role
   short). Nothing moves when nothing is wrong, so a valid, balanced ``current``
   yields a plan that changes nothing.

Safety rules every plan obeys: a shard with a live primary keeps a primary in every plan
(a handoff sets, in one step, a new primary that already holds the data: a replica
listed in ``current``, never one added by the same plan); a shard promoted in a plan is
not handed off again in the same plan (the promoted replica is the one with the writes);
draining nodes receive no new roles (the old primary of a handoff stays a replica until
its copy is moved); a shard may have one replica more than ``R - 1`` between two rounds,
the one about to take over a primary. The next round treats every listed replica as
holding the data, so the caller applies a plan, and lets new replicas catch up, before
planning again. Repeated rounds converge (``PlacementPlan.converged``), in a number of
rounds that grows with the work to do divided by the budget.

Minimal movement: the planner is greedy, not a global optimizer. When a node is lost,
only that node's roles move, plus what balance then requires: fair shares change with
the set of nodes, and promotions can leave a node above its primary range, which then
costs handoffs, possibly of shards that never involved the lost node. Compared with the
least number of role changes that reaches a valid balanced placement (an exhaustive
search in the tests, on small clusters), the result is equal in about 95% of cases and
was never above twice the least plus one (plus one per primary of a draining node,
which is handed to an existing replica first by design). The difference comes from
rounds (a replica added in one round can only take a primary in the next) and from
repairs that are chosen before balance.

Epochs: a shard's epoch increases by exactly one when its primary changes (promotion,
assignment, handoff) and is unchanged otherwise; a shard absent from ``current`` counts
as epoch 0 with no primary, so a brand-new shard gets epoch 1 with its first primary.

Cost: the planner runs on every join and leave, and clusters have many more nodes than
shards. A round looks only at the nodes that hold a role plus, of the nodes that hold
nothing, one per zone and fair share: such nodes are alike but for their ids, and every
tie goes to the smallest id, so that one stands for all of them (see
``_Round._candidates``; the plans are exactly those of looking at every node). Fair
shares are computed per distinct capacity and compared as integers. So thousands of idle
nodes cost little more than none.

With no live node at all nothing can be improved, and forgetting who held the data would
turn a full-cluster restart into data loss: every shard keeps its record unchanged
(a shard absent from ``current`` is recorded with epoch 0, no primary and no replicas),
the plan has no moves and is converged. (The caller should also not plan while nodes
are still re-registering after such an outage: a shard whose copies are all on nodes
not yet back would get a fresh, empty primary.)
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType

from bluemarble.core.ids import NodeId, ShardId, shard_index

Positions = Mapping[tuple[ShardId, NodeId], int]
"""Applied log position (LSN) per (shard, node), as reported in heartbeats."""

_MAX_PHASE_PASSES = 8
"""Passes over the repair phases in one round; each pass normally finishes the repairs,
the extra ones only pick up what a handoff in the same pass made removable."""

_MAX_LOOKAHEAD = 64
"""Neutral moves tried, per rebalancing step, to find one that unlocks an improvement:
bounds the cost of a round that cannot balance further."""

_UNKNOWN_POSITION = -1
"""Position of a replica missing from ``positions``: below any reported position."""


# -- values ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlacementNode:
    """A live shard node as placement sees it. Nodes absent from the list are dead.

    ``capacity`` is a relative weight (>= 1): a node of capacity 2 should hold twice the
    roles of a node of capacity 1. A ``draining`` node keeps serving what it holds but
    receives no new role; placement moves its roles away.
    """

    node_id: NodeId
    zone: str
    capacity: int
    draining: bool = False


@dataclass(frozen=True, slots=True)
class ShardAssignment:
    """Who holds one shard: its epoch (the fencing token), primary and replicas.

    ``primary`` is None only for a shard that has never had a live node to live on.
    """

    shard_id: ShardId
    epoch: int
    primary: NodeId | None
    replicas: tuple[NodeId, ...]

    @property
    def members(self) -> tuple[NodeId, ...]:
        """The primary (if any) followed by the replicas."""
        head = () if self.primary is None else (self.primary,)
        return head + self.replicas


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    """The cluster settings placement depends on (validated where the config is loaded).

    ``replication_factor`` (>= 1): copies per shard wanted, capped by eligible nodes.
    ``max_moves_per_round`` (>= 0): budgeted moves per plan (see :attr:`MoveKind.budgeted`).
    """

    replication_factor: int
    max_moves_per_round: int


class MoveKind(enum.Enum):
    """What one :class:`Move` does to one shard."""

    PROMOTE = "promote"
    """Failover: the shard's primary is dead; live replica ``target`` becomes primary."""
    ASSIGN_PRIMARY = "assign_primary"
    """The shard has no live copy (new shard, or every copy lost): ``target`` becomes
    primary without any data from before."""
    DROP_REPLICA = "drop_replica"
    """Bookkeeping: ``source`` is dead, unknown, or listed twice; its entry is removed."""
    ADD_REPLICA = "add_replica"
    """``target`` becomes a new replica (it bootstraps from a snapshot plus the log)."""
    REMOVE_REPLICA = "remove_replica"
    """Replica ``source`` is no longer needed and is removed."""
    MOVE_REPLICA = "move_replica"
    """Replica ``source`` is replaced by a new replica on ``target``."""
    HANDOFF_PRIMARY = "handoff_primary"
    """Primary ``source`` hands the shard to its replica ``target`` and stays a replica."""

    @property
    def budgeted(self) -> bool:
        """Whether the move counts against ``max_moves_per_round``.

        Restoring a primary (PROMOTE, ASSIGN_PRIMARY) and dropping entries of nodes that
        are gone (DROP_REPLICA) are never deferred: a shard without a primary is
        unavailable, and a dead entry is only a stale record.
        """
        return self not in _UNBUDGETED


_UNBUDGETED = frozenset({MoveKind.PROMOTE, MoveKind.ASSIGN_PRIMARY, MoveKind.DROP_REPLICA})


@dataclass(frozen=True, slots=True)
class Move:
    """One step of a plan on one shard: ``source`` gives up a role, ``target`` takes one.

    Either node may be None when the kind has no such side (see :class:`MoveKind`).
    ``reason`` is for people: logs, ``bluemarblectl`` and events.
    """

    shard_id: ShardId
    kind: MoveKind
    source: NodeId | None
    target: NodeId | None
    reason: str


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    """The result of one placement round: a decision, not yet applied.

    * ``assignments``: the new record of every shard asked about (read-only mapping).
    * ``moves``: the steps from ``current`` to ``assignments``, in the order they were
      decided (failover first); budgeted ones number at most ``max_moves_per_round``.
    * ``changed``: the shards whose record differs from ``current`` (sorted by shard
      number); exactly these need to be written.
    * ``converged``: planning again from ``assignments`` would change nothing. False
      when the budget, or a safety rule that needs a new round (a new replica must exist
      before it can take a primary), cut the round short.

    The executor writes the changed records in one etcd transaction guarded by the
    leader's key, then nodes learn them through WatchAssignments.
    """

    assignments: Mapping[ShardId, ShardAssignment]
    moves: tuple[Move, ...]
    changed: tuple[ShardId, ...]
    converged: bool


# -- fair shares ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FairShare:
    """One eligible node's fair share of the shards' roles, and the counts allowed.

    ``roles``, ``primaries`` and ``replicas`` are exact fractions (see the module doc);
    the ``*_range`` properties are the inclusive integer ranges :func:`violations`
    accepts: primaries and roles rounded down or up; replicas within one of their
    share (a node's replicas are its roles minus its primaries, so once both of those
    are rounded, demanding the same rounding of the difference would over-constrain
    placement, and is often impossible together with zone spread).
    """

    roles: Fraction
    primaries: Fraction
    replicas: Fraction

    @property
    def roles_range(self) -> tuple[int, int]:
        return math.floor(self.roles), math.ceil(self.roles)

    @property
    def primaries_range(self) -> tuple[int, int]:
        return math.floor(self.primaries), math.ceil(self.primaries)

    @property
    def replicas_range(self) -> tuple[int, int]:
        return math.ceil(self.replicas) - 1, math.floor(self.replicas) + 1


@dataclass(frozen=True, slots=True)
class _Layout:
    """What a valid balanced placement looks like for one set of nodes and shard count."""

    live: Mapping[NodeId, PlacementNode]
    eligible: frozenset[NodeId]
    drain_ignored: bool
    r: int
    spread: int
    zone_min: Mapping[str, int]
    zone_max: Mapping[str, int]
    shares: Mapping[NodeId, FairShare]
    zones: tuple[str, ...]
    """The zones of the eligible nodes, sorted."""
    ranges: Mapping[NodeId, tuple[int, int, int, int, int, int]]
    """Per eligible node, its :class:`FairShare` ranges as plain integers: roles low and
    high, primaries low and high, replicas low and high (computed once, not per use)."""
    scaled: Mapping[NodeId, tuple[int, int, int]]
    """Per eligible node, its shares of roles, primaries and replicas times ``scale``:
    integers that compare exactly as the fractions do (``scale`` is a common
    denominator), so preference keys need no Fraction arithmetic."""
    scale: int
    classes: tuple[tuple[NodeId, ...], ...]
    """The eligible nodes grouped by (zone, fair share), each group sorted by node id.
    Two nodes of a group that hold nothing are interchangeable for every decision of a
    round except the node-id tie-break (see :meth:`_Round._candidates`)."""
    class_of: Mapping[NodeId, int]
    """Per eligible node, the index of its group in ``classes``."""

    def zone(self, node: NodeId) -> str:
        return self.live[node].zone


def _layout(nodes: Sequence[PlacementNode], config: PlacementConfig, shard_count: int) -> _Layout:
    live = {node.node_id: node for node in nodes}
    assert len(live) == len(nodes), "node ids must be unique"
    for node in nodes:
        assert node.capacity >= 1, node
    assert config.replication_factor >= 1, config
    assert config.max_moves_per_round >= 0, config
    eligible_nodes = [node for node in nodes if not node.draining]
    drain_ignored = bool(nodes) and not eligible_nodes
    if drain_ignored:
        eligible_nodes = list(nodes)
    r = min(config.replication_factor, len(eligible_nodes))
    zones: dict[str, list[PlacementNode]] = {}
    for node in sorted(eligible_nodes, key=lambda n: n.node_id):
        zones.setdefault(node.zone, []).append(node)
    spread = min(r, len(zones))
    # Copies of one shard per zone: at most one per zone while there are more zones than
    # copies, else at least one per zone (and what the other zones cannot absorb).
    zone_max = {zone: min(len(members), r - spread + 1) for zone, members in zones.items()}
    total_max = sum(zone_max.values())
    zone_min = {
        zone: max(1 if r >= len(zones) else 0, r - (total_max - zone_max[zone]))
        for zone in zones
    }
    shares = _fair_shares(zones, shard_count, r, zone_min, zone_max)
    # Distinct shares are few (one object per zone and capacity): derive everything per
    # share object (keyed by identity: hashing thousands of fractions is slow).
    distinct = {id(share): share for share in shares.values()}
    scale = math.lcm(
        *(value.denominator for share in distinct.values()
          for value in (share.roles, share.primaries, share.replicas))
    )
    share_ranges = {
        key: (*share.roles_range, *share.primaries_range, *share.replicas_range)
        for key, share in distinct.items()
    }
    share_scaled = {
        key: (
            int(share.roles * scale), int(share.primaries * scale), int(share.replicas * scale)
        )
        for key, share in distinct.items()
    }
    classes: dict[tuple[str, int], list[NodeId]] = {}
    for zone, members in zones.items():  # members are sorted by node id
        for node in members:
            classes.setdefault((zone, id(shares[node.node_id])), []).append(node.node_id)
    return _Layout(
        live=MappingProxyType(live),
        eligible=frozenset(node.node_id for node in eligible_nodes),
        drain_ignored=drain_ignored,
        r=r,
        spread=spread,
        zone_min=MappingProxyType(zone_min),
        zone_max=MappingProxyType(zone_max),
        shares=MappingProxyType(shares),
        zones=tuple(sorted(zones)),
        ranges=MappingProxyType({node: share_ranges[id(share)] for node, share in shares.items()}),
        scaled=MappingProxyType({node: share_scaled[id(share)] for node, share in shares.items()}),
        scale=scale,
        classes=tuple(tuple(members) for members in classes.values()),
        class_of=MappingProxyType(
            {n: i for i, members in enumerate(classes.values()) for n in members}
        ),
    )


def fair_shares(
    nodes: Sequence[PlacementNode], config: PlacementConfig, shard_count: int
) -> dict[NodeId, FairShare]:
    """The fair share of every eligible node for ``shard_count`` shards (pure).

    Draining nodes have none (they should hold nothing), unless every live node is
    draining, in which case draining is ignored (see the module doc). For status
    displays and tests; :func:`violations` applies exactly these ranges.
    """
    return dict(_layout(nodes, config, shard_count).shares)


def _fair_shares(
    zones: Mapping[str, Sequence[PlacementNode]],
    shard_count: int,
    r: int,
    zone_min: Mapping[str, int],
    zone_max: Mapping[str, int],
) -> dict[NodeId, FairShare]:
    """Each eligible node's fair share of roles, primaries and replicas (exact fractions).

    Roles: ``S * R`` copies are split over zones in proportion to zone capacity, clamped
    to what zone spread allows (between ``S * zone_min`` and ``S * zone_max``), then each
    zone's total over its nodes in proportion to capacity, clamped to ``S`` (one role per
    shard per node). Primaries: ``S * capacity / total capacity``, never clamped (a node
    never needs more than S), and never above the node's share of roles. Replicas: the
    difference, so that the three shares are consistent.
    """
    shares: dict[NodeId, FairShare] = {}
    if not zones:
        return shares
    zone_names = sorted(zones)
    zone_capacity = [sum(node.capacity for node in zones[zone]) for zone in zone_names]
    total_capacity = sum(zone_capacity)
    zone_roles = _water_fill(
        Fraction(shard_count * r),
        zone_capacity,
        [Fraction(shard_count * zone_min[zone]) for zone in zone_names],
        [Fraction(shard_count * zone_max[zone]) for zone in zone_names],
    )
    for zone, roles_in_zone in zip(zone_names, zone_roles, strict=True):
        members = zones[zone]
        # Nodes of equal capacity in a zone get equal parts: split over the distinct
        # capacities, each counted as often as it occurs (the same exact fractions).
        capacities = Counter(node.capacity for node in members)
        weights = list(capacities)
        node_roles = dict(zip(weights, _water_fill(
            roles_in_zone,
            weights,
            [Fraction(0)] * len(weights),
            [Fraction(shard_count)] * len(weights),
            [capacities[capacity] for capacity in weights],
        ), strict=True))
        by_capacity: dict[int, FairShare] = {}
        for node in members:
            share = by_capacity.get(node.capacity)
            if share is None:
                roles = node_roles[node.capacity]
                primaries = Fraction(shard_count * node.capacity, total_capacity)
                assert primaries <= roles, (node, primaries, roles)
                share = by_capacity[node.capacity] = FairShare(roles, primaries, roles - primaries)
            shares[node.node_id] = share
    return shares


def _water_fill(
    total: Fraction,
    weights: Sequence[int],
    lows: Sequence[Fraction],
    highs: Sequence[Fraction],
    counts: Sequence[int] | None = None,
) -> list[Fraction]:
    """Split ``total`` as ``clamp(level * weight_i, low_i, high_i)`` for the one level
    that makes the parts add up to ``total`` (which must lie within the sums of bounds).
    ``counts[i]`` (default 1) is how many parts are alike the ``i``-th: the sums count
    its part that many times."""
    times = [1] * len(weights) if counts is None else list(counts)

    def total_of(values: Sequence[Fraction]) -> Fraction:
        return sum((v * k for v, k in zip(values, times, strict=True)), Fraction(0))

    assert total_of(lows) <= total <= total_of(highs), (total, lows, highs)

    def parts(level: Fraction) -> list[Fraction]:
        return [min(max(level * w, lo), hi) for w, lo, hi in zip(weights, lows, highs, strict=True)]

    breaks = sorted({b / w for w, lo, hi in zip(weights, lows, highs, strict=True) for b in (lo, hi)})
    # The sum of parts is continuous, non-decreasing and linear between breakpoints.
    level = breaks[0]
    for lower, upper in itertools.pairwise(breaks):
        at_lower, at_upper = total_of(parts(lower)), total_of(parts(upper))
        if at_lower <= total <= at_upper:
            level = lower if at_upper == at_lower else (
                lower + (upper - lower) * (total - at_lower) / (at_upper - at_lower)
            )
            break
    else:
        level = breaks[-1] if total >= total_of(parts(breaks[-1])) else breaks[0]
    result = parts(level)
    assert total_of(result) == total, (total, result)
    return result


# -- the checker ------------------------------------------------------------------------


def violations(
    plan_or_assignments: PlacementPlan | Mapping[ShardId, ShardAssignment],
    nodes: Sequence[PlacementNode],
    config: PlacementConfig,
) -> list[str]:
    """Every way the assignments differ from a valid, balanced placement; [] if none.

    The shards are the keys of the mapping (those of ``plan.assignments`` for a plan);
    ``nodes`` are the live nodes. One message per problem, naming the shard or node, in a
    deterministic order: records (primary missing, dead or draining; replicas dead,
    draining, duplicated or too few/many; zone spread), then balance per eligible node
    (roles, primaries, replicas outside their fair-share range, see the module doc).
    Pure; raises AssertionError only for malformed arguments (duplicate node ids, ...).
    """
    assignments = (
        plan_or_assignments.assignments
        if isinstance(plan_or_assignments, PlacementPlan)
        else plan_or_assignments
    )
    layout = _layout(nodes, config, len(assignments))
    problems: list[str] = []
    primaries: Counter[NodeId] = Counter()
    replicas: Counter[NodeId] = Counter()
    for shard in sorted(assignments, key=_shard_order):
        record = assignments[shard]
        if record.shard_id != shard:
            problems.append(f"{shard}: record is for {record.shard_id}")
        problems.extend(_record_problems(record, layout))
        if record.primary is not None:
            primaries[record.primary] += 1
        for replica in set(record.replicas) - {record.primary}:
            replicas[replica] += 1
    for node in sorted(layout.eligible):
        share = layout.shares[node]
        for what, count, fair, (low, high) in (
            ("roles", primaries[node] + replicas[node], share.roles, share.roles_range),
            ("primaries", primaries[node], share.primaries, share.primaries_range),
            ("replicas", replicas[node], share.replicas, share.replicas_range),
        ):
            if not low <= count <= high:
                problems.append(
                    f"node {node}: {count} {what}, fair share {float(fair):.2f} "
                    f"(allowed {low}..{high})"
                )
    return problems


def _record_problems(record: ShardAssignment, layout: _Layout) -> list[str]:
    shard = record.shard_id
    problems: list[str] = []

    def where(node: NodeId) -> str | None:
        if node not in layout.live:
            return "a dead or unknown node"
        if node not in layout.eligible:
            return "a draining node"
        return None

    if record.primary is None:
        problems.append(f"{shard}: no primary")
    elif (problem := where(record.primary)) is not None:
        problems.append(f"{shard}: primary {record.primary} is {problem}")
    seen: set[NodeId] = set()
    for replica in record.replicas:
        if replica == record.primary or replica in seen:
            problems.append(f"{shard}: {replica} is listed twice")
        elif (problem := where(replica)) is not None:
            problems.append(f"{shard}: replica {replica} is {problem}")
        seen.add(replica)
    copies = len(set(record.members))
    if copies != layout.r:
        problems.append(f"{shard}: {copies} copies, want {layout.r}")
    zones = {layout.live[n].zone for n in record.members if n in layout.live}
    if len(zones) < layout.spread:
        problems.append(f"{shard}: copies span {len(zones)} zones, want {layout.spread}")
    return problems


# -- planning ---------------------------------------------------------------------------


def plan_assignments(
    nodes: Sequence[PlacementNode],
    shards: Iterable[ShardId],
    current: Mapping[ShardId, ShardAssignment],
    config: PlacementConfig,
    positions: Positions | None = None,
) -> PlacementPlan:
    """Plan one placement round: failover, then at most ``max_moves_per_round`` moves.

    ``nodes``: the live nodes (anything else is dead). ``shards``: every shard that must
    exist; the plan has a record for each and for nothing else (entries of ``current``
    for other shards are ignored). ``current``: today's records; shards may be missing
    (new) and records may name dead or unknown nodes or list a node twice. ``positions``:
    applied log position per (shard, replica), gathered by the caller when a primary has
    died; only used to choose which replica to promote (missing entries rank below every
    reported position; None means no information, so ties go by node id).

    Promises (see the module doc for the rules): failover is complete in every plan and
    never promotes a node that was not a live replica while one exists; a shard without
    any live copy gets a fresh primary (its data may be lost, the move says so); budgeted
    moves are at most ``max_moves_per_round``; epochs increase by one exactly where the
    primary changes; a valid balanced ``current`` gives a plan with no moves; the result
    is a function of the arguments only. Raises AssertionError for programmer errors
    (duplicate node or shard ids, a record filed under another shard's id, capacity < 1,
    replication factor < 1, negative budget or epoch).
    """
    shard_list = list(shards)
    ordered = sorted(set(shard_list), key=_shard_order)
    assert len(ordered) == len(shard_list), "shard ids must be unique"
    for shard, record in current.items():
        assert record.shard_id == shard, (shard, record)
        assert record.epoch >= 0, record
    layout = _layout(nodes, config, len(ordered))
    if not layout.live:
        unchanged = {
            shard: current.get(shard) or ShardAssignment(shard, 0, None, ()) for shard in ordered
        }
        return _make_plan(ordered, current, unchanged, (), converged=True)
    first = _Round(layout, ordered, current, config.max_moves_per_round, positions or {})
    first.run()
    result = first.assignments()
    # Converged means a round planned from the result would do nothing; the probe stops
    # at its first move.
    again = _Round(layout, ordered, result, config.max_moves_per_round, {}, probe=True)
    again.run()
    converged = not again.moves and not again.out_of_budget
    return _make_plan(ordered, current, result, tuple(first.moves), converged=converged)


def _make_plan(
    ordered: Sequence[ShardId],
    current: Mapping[ShardId, ShardAssignment],
    assignments: Mapping[ShardId, ShardAssignment],
    moves: tuple[Move, ...],
    converged: bool,
) -> PlacementPlan:
    changed = tuple(shard for shard in ordered if current.get(shard) != assignments[shard])
    return PlacementPlan(
        assignments=MappingProxyType(dict(assignments)),
        moves=moves,
        changed=changed,
        converged=converged,
    )


def _shard_order(shard: ShardId) -> tuple[int, int, str]:
    """Shards sort by number (shard-2 before shard-10); other names after, by name."""
    try:
        return (0, shard_index(shard), shard)
    except ValueError:
        return (1, 0, shard)


class _StepKind(enum.Enum):
    """Internal: the kinds of rebalancing step."""

    REPLICAS = "replicas"
    HANDOFFS = "handoffs"
    RELOCATION = "relocation"
    WAIT = "wait"


class _OutOfBudget(Exception):
    """Internal: the round stops here (its budget is spent, or a probe saw a move)."""


_Step = tuple[ShardId, NodeId, NodeId]
"""One link of a rebalancing chain: (shard, node giving a role, node taking it)."""


class _Round:
    """The mutable working state of one planning round (private to this module).

    Keeps, per shard, the primary and replicas being planned, plus what the round must
    not violate: which nodes held the data when the round started (``has_data``: the
    only legal handoff targets) and which shards got a new primary in this round
    (``fresh_primary``: not handed off again before the next round). Primary
    relocations started in the round (``relocating``, ``moving_out``, ``moving_in``) are
    counted as done, so the round does not start more than balance needs. Per node it
    keeps indexes so each decision is cheap. A probe (``probe=True``) stops at its first
    move: :func:`plan_assignments` uses one to tell whether its result is converged.
    """

    def __init__(
        self,
        layout: _Layout,
        shards: Sequence[ShardId],
        current: Mapping[ShardId, ShardAssignment],
        budget: int,
        positions: Positions,
        probe: bool = False,
    ) -> None:
        self.layout = layout
        self.shards = shards
        self.rank = {shard: i for i, shard in enumerate(shards)}
        self.probe = False
        self.current = current
        self.budget = budget
        self.full_budget = budget
        self.out_of_budget = False
        self.positions = positions
        self.moves: list[Move] = []
        self.primary: dict[ShardId, NodeId | None] = {}
        self.replicas: dict[ShardId, list[NodeId]] = {}
        self.has_data: dict[ShardId, frozenset[NodeId]] = {}
        self.fresh_primary: set[ShardId] = set()
        self.relocating: set[ShardId] = set()
        self.moving_out: Counter[NodeId] = Counter()
        self.moving_in: Counter[NodeId] = Counter()
        self.primary_of: dict[NodeId, set[ShardId]] = {n: set() for n in layout.live}
        self.replica_of: dict[NodeId, set[ShardId]] = {n: set() for n in layout.live}
        for shard in shards:
            self._load(shard, current.get(shard))
        self.probe = probe
        # Bookkeeping kept up to date by every change, so no decision rescans everything:
        # the nodes holding a role or counted in a relocation (``busy``), the candidate
        # list derived from it (rebuilt when ``busy`` changes) and the number of replicas
        # that did not hold the data when the round started.
        self.busy: set[NodeId] = {
            n for n in layout.live if self.primary_of[n] or self.replica_of[n]
        }
        self.busy_version = 0
        self.candidates_cache: tuple[int, list[NodeId]] = (-1, [])
        self.new_replicas = 0

    # -- state and bookkeeping ------------------------------------------------------

    def _load(self, shard: ShardId, record: ShardAssignment | None) -> None:
        live = self.layout.live
        primary = record.primary if record is not None else None
        if primary is not None and primary in live:
            self.primary[shard] = primary
            self.primary_of[primary].add(shard)
        else:
            self.primary[shard] = None
        self.replicas[shard] = []
        for replica in record.replicas if record is not None else ():
            if replica not in live:
                self._record(shard, MoveKind.DROP_REPLICA, replica, None, "node is gone")
            elif replica == self.primary[shard] or replica in self.replicas[shard]:
                self._record(shard, MoveKind.DROP_REPLICA, replica, None, "listed twice")
            else:
                self.replicas[shard].append(replica)
                self.replica_of[replica].add(shard)
        self.has_data[shard] = frozenset(self._members(shard))

    def _members(self, shard: ShardId) -> list[NodeId]:
        primary = self.primary[shard]
        return ([] if primary is None else [primary]) + self.replicas[shard]

    def _record(
        self, shard: ShardId, kind: MoveKind, source: NodeId | None, target: NodeId | None,
        reason: str,
    ) -> None:
        if kind.budgeted:
            if self.budget <= 0:
                self.out_of_budget = True
                raise _OutOfBudget
            self.budget -= 1
        self.moves.append(Move(shard, kind, source, target, reason))
        if self.probe:
            raise _OutOfBudget  # one move is all a probe needs to know

    # Counts as they will be once the primary relocations started in this round finish
    # (the target's extra replica becomes the primary, the source's copy goes).

    def _roles(self, node: NodeId) -> int:
        return len(self.primary_of[node]) + len(self.replica_of[node]) - self.moving_out.get(node, 0)

    def _primaries(self, node: NodeId) -> int:
        return len(self.primary_of[node]) - self.moving_out.get(node, 0) + self.moving_in.get(node, 0)

    def _replica_count(self, node: NodeId) -> int:
        return len(self.replica_of[node]) - self.moving_in.get(node, 0)

    def _set_primary(self, shard: ShardId, node: NodeId) -> None:
        old = self.primary[shard]
        if old is not None:
            self.primary_of[old].discard(shard)
            self._touch(old)
        if node in self.replicas[shard]:
            self.replicas[shard].remove(node)
            self.replica_of[node].discard(shard)
            if node not in self.has_data[shard]:
                self.new_replicas -= 1
        self.primary[shard] = node
        self.primary_of[node].add(shard)
        self._touch(node)

    def _add(self, shard: ShardId, node: NodeId) -> None:
        assert node not in self._members(shard), (shard, node)
        self.replicas[shard].append(node)
        self.replica_of[node].add(shard)
        if node not in self.has_data[shard]:
            self.new_replicas += 1
        self._touch(node)

    def _remove(self, shard: ShardId, node: NodeId) -> None:
        self.replicas[shard].remove(node)
        self.replica_of[node].discard(shard)
        if node not in self.has_data[shard]:
            self.new_replicas -= 1
        self._touch(node)

    def _touch(self, node: NodeId) -> None:
        """Update ``busy`` after ``node``'s roles or relocation counts changed."""
        busy = bool(
            self.primary_of[node] or self.replica_of[node]
            or self.moving_in.get(node) or self.moving_out.get(node)
        )
        if busy != (node in self.busy):
            if busy:
                self.busy.add(node)
            else:
                self.busy.discard(node)
            self.busy_version += 1

    def _candidates(self) -> list[NodeId]:
        """The eligible nodes every decision of the round chooses among, sorted: those
        that hold a role (or take part in a relocation), and of each class of
        :attr:`_Layout.classes` the empty node with the smallest id.

        Why this loses nothing: an eligible node that holds nothing is a member of no
        shard, and every rule reads only its zone, its fair share and its (zero) counts,
        so the empty nodes of one class are alike but for their ids. Every choice among
        nodes is a minimum over keys that end with the node id, or a first match in
        node-id order, so where any empty node of a class would be chosen, the one with
        the smallest id is; and an empty node has no role to give, so in a chain search
        it can only be an end. With thousands of empty nodes this is a handful of
        candidates instead of thousands."""
        version, cached = self.candidates_cache
        if version == self.busy_version:
            return cached
        busy, eligible = self.busy, self.layout.eligible
        candidates = [n for n in busy if n in eligible]
        for members in self.layout.classes:
            for n in members:
                if n not in busy:
                    candidates.append(n)
                    break
        candidates.sort()
        self.candidates_cache = (self.busy_version, candidates)
        return candidates

    def add_replica(self, shard: ShardId, node: NodeId, reason: str) -> None:
        self._record(shard, MoveKind.ADD_REPLICA, None, node, reason)
        self._add(shard, node)

    def remove_replica(self, shard: ShardId, node: NodeId, reason: str) -> None:
        self._record(shard, MoveKind.REMOVE_REPLICA, node, None, reason)
        self._remove(shard, node)

    def move_replica(self, shard: ShardId, source: NodeId, target: NodeId, reason: str) -> None:
        self._record(shard, MoveKind.MOVE_REPLICA, source, target, reason)
        self._remove(shard, source)
        self._add(shard, target)

    def handoff(self, shard: ShardId, target: NodeId, reason: str) -> None:
        source = self.primary[shard]
        assert source is not None and target in self.replicas[shard], (shard, target)
        assert target in self.has_data[shard] and shard not in self.fresh_primary, shard
        self._record(shard, MoveKind.HANDOFF_PRIMARY, source, target, reason)
        self._set_primary(shard, target)
        self._add(shard, source)

    def assignments(self) -> dict[ShardId, ShardAssignment]:
        """The planned record of every shard, epochs bumped where the primary changed."""
        result: dict[ShardId, ShardAssignment] = {}
        for shard in self.shards:
            before = self.current.get(shard)
            epoch = before.epoch if before is not None else 0
            primary = before.primary if before is not None else None
            if self.primary[shard] != primary:
                epoch += 1
            result[shard] = ShardAssignment(
                shard, epoch, self.primary[shard], tuple(self.replicas[shard])
            )
        return result

    # -- imbalance and preferences -------------------------------------------------

    def _imbalance(self, node: NodeId, d_roles: int = 0, d_primaries: int = 0) -> int:
        """How far ``node`` would be outside its fair-share ranges after gaining
        ``d_roles`` roles of which ``d_primaries`` primaries: the distances of its roles,
        primaries and replicas from their ranges, summed. 0 means balanced; a node that
        takes no roles (draining) counts every role it holds."""
        roles = self._roles(node) + d_roles
        if node not in self.layout.eligible:
            return roles
        primaries = self._primaries(node) + d_primaries
        return _outside(roles, primaries, self.layout.ranges[node])

    def _delta(self, node: NodeId, d_roles: int, d_primaries: int) -> int:
        """Change of ``node``'s imbalance if it gains ``d_roles`` / ``d_primaries``."""
        held, replicas = len(self.primary_of[node]), len(self.replica_of[node])
        out, into = self.moving_out.get(node, 0), self.moving_in.get(node, 0)
        roles = held + replicas - out
        if node not in self.layout.eligible:
            return d_roles
        primaries = held - out + into
        ranges = self.layout.ranges[node]
        return (
            _outside(roles + d_roles, primaries + d_primaries, ranges)
            - _outside(roles, primaries, ranges)
        )

    # The keys below compare shares scaled to integers (see :attr:`_Layout.scaled`):
    # ``count * scale - share * scale`` orders exactly as ``count - share`` does.

    def _fill_key(self, node: NodeId) -> tuple[int, int, int, NodeId]:
        """Preference for a node taking a new replica: the imbalance it adds, then how
        far below its fair share of roles (and of replicas) it is."""
        roles, _, replicas = self.layout.scaled[node]
        scale = self.layout.scale
        return (
            self._delta(node, 1, 0),
            self._roles(node) * scale - roles,
            self._replica_count(node) * scale - replicas,
            node,
        )

    def _primary_key(self, node: NodeId) -> tuple[int, int, int, NodeId]:
        """Preference for a node taking a primary it already holds a copy of."""
        roles, primaries, _ = self.layout.scaled[node]
        scale = self.layout.scale
        return (
            self._delta(node, 0, 1),
            self._primaries(node) * scale - primaries,
            self._roles(node) * scale - roles,
            node,
        )

    def _fresh_primary_key(self, node: NodeId) -> tuple[int, int, int, NodeId]:
        """Preference for a node taking a primary it holds no copy of."""
        roles, primaries, _ = self.layout.scaled[node]
        scale = self.layout.scale
        return (
            self._delta(node, 1, 1),
            self._primaries(node) * scale - primaries,
            self._roles(node) * scale - roles,
            node,
        )

    def _zone_counts(self, shard: ShardId, without: NodeId | None = None) -> Counter[str]:
        counts: Counter[str] = Counter()
        eligible, live = self.layout.eligible, self.layout.live
        for node in self._members(shard):
            if node in eligible and node != without:
                counts[live[node].zone] += 1
        return counts

    def _destination(self, shard: ShardId, leaving: NodeId | None = None) -> NodeId | None:
        """The best eligible non-member to take a copy of ``shard`` (``leaving`` gives one
        up at the same time): a zone the shard must still reach, else a zone with room,
        then by :meth:`_fill_key`."""
        layout = self.layout
        counts = self._zone_counts(shard, without=leaving)
        members = set(self._members(shard))
        candidates = [n for n in self._candidates() if n not in members]
        tiers: tuple[Callable[[str], bool], ...] = (
            lambda z: counts[z] < layout.zone_min[z],
            lambda z: counts[z] < layout.zone_max[z],
            lambda z: True,
        )
        for allowed in tiers:
            fitting = [n for n in candidates if allowed(layout.zone(n))]
            if fitting:
                return min(fitting, key=self._fill_key)
        return None

    def _share_gap(self, node: NodeId) -> int:
        """Minus how far ``node`` is above its fair share of roles (draining: any role),
        times :attr:`_Layout.scale`."""
        scale = self.layout.scale
        if node not in self.layout.eligible:
            return -self._roles(node) * scale
        return self.layout.scaled[node][0] - self._roles(node) * scale

    def _draining(self, node: NodeId | None) -> bool:
        return node is not None and node not in self.layout.eligible

    # -- the round --------------------------------------------------------------------

    def run(self) -> None:
        """Failover, then the budgeted phases until nothing changes or the budget is spent."""
        self._failover()
        phases: tuple[Callable[[], None], ...] = (
            self._restore_replication,
            self._drain_primaries,
            self._trim_excess,
            self._drain_replicas,
            self._repair_spread,
            self._rebalance,
        )
        try:
            for _ in range(_MAX_PHASE_PASSES):
                before = len(self.moves)
                for phase in phases:
                    phase()
                if len(self.moves) == before:
                    break
        except _OutOfBudget:
            pass

    def _failover(self) -> None:
        for shard in self.shards:
            if self.primary[shard] is not None:
                continue
            record = self.current.get(shard)
            old = record.primary if record is not None else None
            if self.replicas[shard]:
                best = min(
                    self.replicas[shard],
                    key=lambda n: (-self.positions.get((shard, n), _UNKNOWN_POSITION), n),
                )
                gone = "the shard has no primary" if old is None else f"primary {old} is gone"
                self._record(
                    shard, MoveKind.PROMOTE, old, best,
                    f"{gone}; {best} has the highest applied position",
                )
            else:
                best = min(self._candidates(), key=self._fresh_primary_key)
                never_placed = record is None or (record.primary is None and record.epoch == 0)
                reason = (
                    "new shard" if never_placed
                    else f"no live copy of the shard is left (primary was {old}): "
                    "data may be lost"
                )
                self._record(shard, MoveKind.ASSIGN_PRIMARY, old, best, reason)
            self._set_primary(shard, best)
            self.fresh_primary.add(shard)

    def _restore_replication(self) -> None:
        want = self.layout.r - 1
        # The shards with the fewest copies are the most at risk: they go first.
        for shard in sorted(self.shards, key=lambda s: (len(self.replicas[s]), self.rank[s])):
            while len(self.replicas[shard]) < want:
                target = self._destination(shard)
                if target is None:
                    break
                self.add_replica(
                    shard, target, f"restore replication ({len(self.replicas[shard])}"
                    f" of {want} replicas)"
                )

    def _drain_primaries(self) -> None:
        if self.layout.drain_ignored:
            return
        for shard in self.shards:
            primary = self.primary[shard]
            if not self._draining(primary) or shard in self.fresh_primary:
                continue
            eligible = [n for n in self.replicas[shard] if n in self.layout.eligible]
            ready = [n for n in eligible if n in self.has_data[shard]]
            if ready:
                target = min(ready, key=self._primary_key)
                self.handoff(shard, target, f"primary {primary} is draining")
            elif not eligible:
                # Nobody can take over yet: first a replica, then (next round) the handoff.
                spare = self._destination(shard)
                if spare is not None:
                    self.add_replica(shard, spare, f"handoff target for draining {primary}")

    def _trim_excess(self) -> None:
        for shard in self.shards:
            allowed = self.layout.r - 1
            if self._draining(self.primary[shard]) and not self.layout.drain_ignored:
                allowed += 1  # the replica that will take over the primary
            if shard in self.relocating:
                continue
            while len(self.replicas[shard]) > allowed:
                self._drop_one(shard, f"more than {allowed} replicas")

    def _drop_one(self, shard: ShardId, reason: str) -> None:
        """Remove one replica of ``shard``: the option whose result has the fewest
        draining copies, then the fewest zone-spread problems, then the lowest imbalance,
        then the fewest moves. Besides removing a replica, an option is to hand the
        primary to a replica and remove the old primary's copy: this is how a primary
        relocation (see :meth:`_best_relocation`) finishes, one round after its target
        was added. Choosing by the resulting state keeps successive rounds from undoing
        each other when the budget splits a handoff from its removal."""
        primary = self.primary[shard]
        options: list[tuple[tuple[int, int, int, int, NodeId, NodeId], NodeId | None, NodeId]] = []
        for victim in self.replicas[shard]:
            score = (
                self._draining_after(shard, victim),
                self._spread_problems_after(shard, victim),
                self._delta(victim, -1, 0),
                1,
                victim,
                victim,
            )
            options.append((score, None, victim))
        if primary is not None and not self._draining(primary) and shard not in self.fresh_primary:
            for target in self.replicas[shard]:
                if target in self.layout.eligible and target in self.has_data[shard]:
                    score = (
                        self._draining_after(shard, primary),
                        self._spread_problems_after(shard, primary),
                        self._delta(primary, -1, -1) + self._delta(target, 0, 1),
                        2,
                        primary,
                        target,
                    )
                    options.append((score, target, primary))
        _, new_primary, victim = min(options)
        if new_primary is not None:
            self.handoff(shard, new_primary, f"relocating the primary from {victim}")
            reason = f"primary relocated to {new_primary}"
        self.remove_replica(shard, victim, reason)

    def _draining_after(self, shard: ShardId, removed: NodeId) -> int:
        return sum(1 for n in self._members(shard) if n != removed and self._draining(n))

    def _spread_problems_after(self, shard: ShardId, removed: NodeId) -> int:
        """Zones outside their per-shard bounds once ``removed``'s copy is gone."""
        layout = self.layout
        counts = self._zone_counts(shard, without=removed)
        return sum(
            1 for zone in layout.zone_min
            if not layout.zone_min[zone] <= counts[zone] <= layout.zone_max[zone]
        )

    def _drain_replicas(self) -> None:
        if self.layout.drain_ignored:
            return
        for shard in self.shards:
            for replica in [n for n in self.replicas[shard] if self._draining(n)]:
                target = self._destination(shard, leaving=replica)
                if target is None:
                    self.remove_replica(shard, replica, f"{replica} is draining")
                else:
                    self.move_replica(shard, replica, target, f"{replica} is draining")

    def _repair_spread(self) -> None:
        layout = self.layout
        zones = layout.zones
        for shard in self.shards:
            for _ in range(layout.r):
                counts = self._zone_counts(shard)
                if sum(counts.values()) != layout.r:
                    break  # still draining or short of copies: the other phases go first
                short = [z for z in zones if counts[z] < layout.zone_min[z]]
                crowded = [z for z in zones if counts[z] > layout.zone_max[z]]
                if not short and not crowded:
                    break
                # A zone below its minimum takes from one above its maximum, else from any
                # zone above its minimum; a zone above its maximum gives to any with room.
                sources = crowded or [z for z in zones if counts[z] > layout.zone_min[z]]
                sinks = short or [z for z in zones if counts[z] < layout.zone_max[z]]
                movable = [
                    n for n in self.replicas[shard]
                    if n in layout.eligible and layout.zone(n) in sources
                ]
                members = set(self._members(shard))
                targets = [
                    n for n in self._candidates() if n not in members and layout.zone(n) in sinks
                ]
                if not movable or not targets:
                    break
                source = min(movable, key=lambda n: (self._delta(n, -1, 0), self._share_gap(n), n))
                target = min(targets, key=self._fill_key)
                self.move_replica(shard, source, target, "spread copies over zones")

    # -- rebalancing: shortest improving chains ---------------------------------------

    def _rebalance(self) -> None:
        """Apply improving steps until the imbalance (sum of :meth:`_imbalance` over the
        eligible nodes) is 0 or nothing lowers it. Steps, in order of preference: chains
        of replica moves (no epoch change), chains of handoffs, a primary relocation;
        when none lowers the imbalance, one neutral move after which one does (see
        :meth:`_enabling_step`). Every improving step lowers the imbalance by at least
        one and every neutral one is followed by an improving one, so this ends."""
        while True:
            # With every node balanced no step can lower the imbalance, and no neutral
            # one is tried: the exit both step searches would take, without the search.
            if not any(self._imbalance(n) > 0 for n in self._candidates()):
                return
            step = self._improving_step() or self._enabling_step()
            if step is None or step[0] is _StepKind.WAIT:
                return
            self._take(step)

    def _improving_step(self) -> tuple[_StepKind, list[_Step]] | None:
        """The step that lowers the imbalance at the lowest cost in changed roles per
        unit of imbalance removed (a replica move or a handoff changes two roles, a
        relocation in the end changes two: the old primary's and the new one's); ties
        go to replica moves (no epoch change), then handoffs, then relocations."""
        replica_move, handoff = ((-1, 0), (1, 0)), ((0, -1), (0, 1))
        options: list[tuple[Fraction, int, _StepKind, list[_Step]]] = []

        def offer(rank: int, kind: _StepKind, chain: list[_Step] | None, gain: int) -> None:
            if chain is not None and gain < 0:
                options.append((Fraction(2 * len(chain), -gain), rank, kind, chain))

        chain = self._improving_chain(*replica_move, _memoized(self._replica_links))
        if chain is not None:
            offer(0, _StepKind.REPLICAS, chain, self._chain_gain(chain, *replica_move))
        chain = self._improving_chain(*handoff, _memoized(self._handoff_links))
        if chain is not None:
            offer(1, _StepKind.HANDOFFS, chain, self._chain_gain(chain, *handoff))
        if self._any_new_replica():
            # A replica added in this round cannot take a primary before the next one;
            # when that will allow a cheaper chain, waiting saves handoffs (each bumps
            # an epoch) and moves.
            soon = self._improving_chain(*handoff, _memoized(self._next_round_handoff_links))
            if soon is not None:
                offer(2, _StepKind.WAIT, soon, self._chain_gain(soon, *handoff))
        relocation = self._best_relocation()
        if relocation is not None:
            _, source, target = relocation
            gain = self._delta(source, -1, -1) + self._delta(target, 1, 1)
            offer(3, _StepKind.RELOCATION, [relocation], gain)
        if not options:
            return None
        _, _, kind, chain = min(options, key=lambda option: option[:2])
        return kind, chain

    def _enabling_step(self) -> tuple[_StepKind, list[_Step]] | None:
        """A single replica move or handoff that leaves the imbalance unchanged but after
        which an improving step exists; e.g. a node one primary and one role over, next
        to one under, whose shards only allow a handoff and a replica move together.
        Tries at most :data:`_MAX_LOOKAHEAD` candidates touching an unbalanced node.

        Candidates are tried in the order of a scan of every eligible node's links, in
        node-id order, as if all empty nodes were candidates: a move to any empty node
        counts against the limit, not only to the one of :meth:`_candidates` (the
        lookahead is a bounded search, so which moves it counts changes its result)."""
        candidates = self._candidates()
        unbalanced = {n for n in candidates if self._imbalance(n) > 0}
        if not unbalanced:
            return None
        listed = set(candidates)

        def is_unbalanced(node: NodeId) -> bool:
            # An empty node not listed is like its class's representative, which is.
            return node in unbalanced if node in listed else self._imbalance(node) > 0

        # Only nodes that hold a role have links; the others' lists are empty.
        holders = [n for n in candidates if n in self.busy]
        tried = 0
        for kind, source_change, target_change in (
            (_StepKind.REPLICAS, (-1, 0), (1, 0)),
            (_StepKind.HANDOFFS, (0, -1), (0, 1)),
        ):

            def neutral(source: NodeId, target: NodeId) -> bool:
                if not is_unbalanced(source) and not is_unbalanced(target):
                    return False
                return not (
                    self._delta(source, *source_change) + self._delta(target, *target_change)  # noqa: B023
                )

            for node in holders:
                links = (
                    self._all_replica_links(node, neutral) if kind is _StepKind.REPLICAS
                    else iter(self._handoff_links(node))
                )
                for link in links:
                    _, source, target = link
                    if not neutral(source, target):
                        continue
                    if tried >= _MAX_LOOKAHEAD:
                        return None
                    tried += 1
                    if self._enables(kind, link):
                        return kind, [link]
        return None

    def _all_replica_links(
        self, node: NodeId, wanted: Callable[[NodeId, NodeId], bool]
    ) -> Iterator[_Step]:
        """:meth:`_replica_links` of ``node`` as if every eligible node were a candidate,
        in the same order, except links to empty nodes ``wanted`` rejects (it must judge
        every empty node of a class alike). An empty node can take a replica of the
        first shard (by number) that allows one to its zone, as its class's
        representative can; the empty nodes are listed lazily, only as far as they are
        read."""
        busy, layout = self.busy, self.layout
        for shard, linked in self._replica_link_groups(node):
            streams: list[Iterable[NodeId]] = [[n for n in linked if n in busy]]
            for n in linked:
                if n not in busy and wanted(node, n):
                    members = layout.classes[layout.class_of[n]]
                    streams.append(m for m in members if m not in busy)
            for other in heapq.merge(*streams):
                yield shard, node, other

    def _enables(self, kind: _StepKind, link: _Step) -> bool:
        """Whether an improving step exists once ``link`` is applied (tried, then undone)."""
        shard, source, target = link
        saved = (self.primary[shard], list(self.replicas[shard]))
        if kind is _StepKind.REPLICAS:
            self._remove(shard, source)
            self._add(shard, target)
        else:
            self._set_primary(shard, target)
            self._add(shard, source)
        try:
            return self._improving_step() is not None
        finally:
            self._restore(shard, *saved)

    def _restore(self, shard: ShardId, primary: NodeId | None, replicas: list[NodeId]) -> None:
        has_data = self.has_data[shard]
        touched = self._members(shard)
        for node in touched:
            self.primary_of[node].discard(shard)
            self.replica_of[node].discard(shard)
        self.new_replicas -= sum(1 for n in self.replicas[shard] if n not in has_data)
        self.primary[shard] = primary
        self.replicas[shard] = replicas
        if primary is not None:
            self.primary_of[primary].add(shard)
        for node in replicas:
            self.replica_of[node].add(shard)
        self.new_replicas += sum(1 for n in replicas if n not in has_data)
        for node in (*touched, *self._members(shard)):
            self._touch(node)

    def _take(self, step: tuple[_StepKind, list[_Step]]) -> None:
        kind, chain = step
        if kind is _StepKind.WAIT:
            return
        if kind is _StepKind.REPLICAS:
            self._spend_on(chain)
            for shard, source, target in chain:
                self.move_replica(shard, source, target, "rebalance roles")
        elif kind is _StepKind.HANDOFFS:
            self._spend_on(chain)
            for shard, _source, target in chain:
                self.handoff(shard, target, "rebalance primaries")
        else:
            # The target needs the data before it can take over: it is added as an extra
            # replica now, and the next round hands off and drops the old primary's copy
            # (see _relocate_instead). Until then the counts assume it is done.
            [(shard, source, target)] = chain
            self.add_replica(shard, target, f"relocating the primary from {source}")
            self.relocating.add(shard)
            self.moving_out[source] += 1
            self.moving_in[target] += 1
            self._touch(source)
            self._touch(target)

    def _spend_on(self, chain: list[_Step]) -> None:
        """End the round unless the budget left covers the whole chain."""
        if len(chain) > self.budget:
            self.out_of_budget = True
            raise _OutOfBudget

    def _improving_chain(
        self,
        source_change: tuple[int, int],
        target_change: tuple[int, int],
        links: Callable[[NodeId], list[_Step]],
    ) -> list[_Step] | None:
        """The shortest chain of ``links`` whose first node loses and last node gains
        (roles, primaries) as given, with a total imbalance change below zero; sources
        that gain most are tried first. Among :meth:`_candidates` only: an empty node
        is a chain's end, never a step in between, and the best end of a class is its
        representative."""
        eligible = self._candidates()
        gain_source = {n: self._delta(n, *source_change) for n in eligible}
        gain_target = {n: self._delta(n, *target_change) for n in eligible}
        for level in sorted(set(gain_source.values())):
            targets = {n for n in eligible if gain_target[n] < -level}
            if not targets:
                continue
            sources = [n for n in eligible if gain_source[n] == level]
            chain = self._shortest_chain(
                sources, targets, links, lambda n: (gain_target[n], self._fill_key(n))
            )
            if chain is not None:
                return chain
        return None

    def _replica_links(self, node: NodeId) -> list[_Step]:
        """One replica move from ``node`` to each node it can give a replica to: the
        first shard (by number) that allows it. One link per pair of nodes is all a
        breadth-first search needs, and it keeps a search at O(nodes^2) links instead
        of O(shards * nodes). Links go to :meth:`_candidates` only."""
        return [
            (shard, node, other)
            for shard, linked in self._replica_link_groups(node)
            for other in linked
        ]

    def _replica_link_groups(self, node: NodeId) -> list[tuple[ShardId, list[NodeId]]]:
        """The candidates ``node`` can give a replica to, grouped by the first shard (by
        number) that allows it, each group sorted by node id."""
        shards = self.replica_of[node] - self.relocating
        if not shards:
            return []
        layout = self.layout
        pending = set(self._candidates()) - {node}
        groups: list[tuple[ShardId, list[NodeId]]] = []
        zone = layout.zone(node)
        for shard in sorted(shards, key=self.rank.__getitem__):
            if not pending:
                break
            members = set(self._members(shard))
            counts = self._zone_counts(shard)
            leaving_ok = counts[zone] - 1 >= layout.zone_min[zone]
            linked = []
            for other in sorted(pending - members):
                other_zone = layout.zone(other)
                if other_zone == zone or (
                    leaving_ok and counts[other_zone] + 1 <= layout.zone_max[other_zone]
                ):
                    linked.append(other)
            if linked:
                pending.difference_update(linked)
                groups.append((shard, linked))
        return groups

    def _handoff_links(self, node: NodeId, next_round: bool = False) -> list[_Step]:
        links: list[_Step] = []
        for shard in sorted(self.primary_of[node], key=self.rank.__getitem__):
            if shard in self.fresh_primary or shard in self.relocating:
                continue
            for other in sorted(self.replicas[shard]):
                if other in self.layout.eligible and (next_round or other in self.has_data[shard]):
                    links.append((shard, node, other))
        return links

    def _chain_gain(
        self, chain: Sequence[_Step], source_change: tuple[int, int],
        target_change: tuple[int, int],
    ) -> int:
        """Change of the imbalance if ``chain`` is applied (only its ends change)."""
        return self._delta(chain[0][1], *source_change) + self._delta(chain[-1][2], *target_change)

    def _next_round_handoff_links(self, node: NodeId) -> list[_Step]:
        """Handoffs that will be possible next round, once new replicas have the data."""
        return self._handoff_links(node, next_round=True)

    def _any_new_replica(self) -> bool:
        """Whether a replica that did not have the data at the start of the round exists
        (counted as replicas change, see :meth:`_add`)."""
        return self.new_replicas > 0

    def _best_relocation(self) -> _Step | None:
        """The primary move to a node without a copy (source loses a role and a primary,
        target gains both) that lowers the imbalance most, keeping zone spread. Among
        :meth:`_candidates` only: the empty nodes of a class fit the same shards, and
        the representative comes first in the order targets are tried."""
        eligible = self._candidates()
        gain_source = {n: self._delta(n, -1, -1) for n in eligible}
        targets = sorted((self._fresh_primary_key(n), n) for n in eligible)
        best: tuple[tuple[int, tuple[int, int, int, NodeId]], _Step] | None = None
        for source in sorted(eligible, key=lambda n: (gain_source[n], n)):
            fitting = [(key, n) for key, n in targets if gain_source[source] + key[0] < 0]
            for shard in sorted(self.primary_of[source], key=self.rank.__getitem__):
                if not fitting:
                    break
                if shard in self.fresh_primary or shard in self.relocating:
                    continue
                members = self._members(shard)
                for key, target in fitting:  # best first
                    if target not in members and self._zone_swap_ok(shard, source, target):
                        rank = (gain_source[source] + key[0], key)
                        if best is None or rank < best[0]:
                            best = (rank, (shard, source, target))
                        # No other shard of this source can reach a better target.
                        fitting = [t for t in fitting if t < (key, target)]
                        break
        return None if best is None else best[1]

    def _zone_swap_ok(self, shard: ShardId, leaving: NodeId, joining: NodeId) -> bool:
        """Whether replacing ``leaving``'s copy of ``shard`` by one on ``joining`` keeps
        every zone within its per-shard bounds."""
        layout = self.layout
        old, new = layout.zone(leaving), layout.zone(joining)
        if old == new:
            return True
        counts = self._zone_counts(shard)
        joined = 0 if joining in self._members(shard) else 1  # finishing a relocation
        return (
            counts[old] - 1 >= layout.zone_min[old]
            and counts[new] + joined <= layout.zone_max[new]
        )

    def _shortest_chain(
        self,
        sources: Sequence[NodeId],
        targets: set[NodeId],
        links: Callable[[NodeId], list[_Step]],
        preference: Callable[[NodeId], tuple[int, tuple[int, int, int, NodeId]]],
    ) -> list[_Step] | None:
        """Breadth-first search from ``sources`` to any of ``targets`` other than the
        chain's own source; among the shortest chains, the one ending at the best target
        by ``preference``. Chains use each shard at most once, so their steps do not
        interfere with each other, and are at most one round's budget long, since a
        chain is only ever applied whole (half a chain unbalances its middle node, and
        the next round could well undo it instead of finishing it)."""
        parent: dict[NodeId, _Step | None] = {n: None for n in sources}
        root = {n: n for n in sources}

        def path_to(node: NodeId) -> list[_Step]:
            steps: list[_Step] = []
            while (link := parent[node]) is not None:
                steps.append(link)
                node = link[1]
            steps.reverse()
            return steps

        frontier = list(sources)
        for _ in range(self.full_budget):
            found: dict[NodeId, list[_Step]] = {}
            following: list[NodeId] = []
            for node in frontier:
                for step in links(node):
                    nxt = step[2]
                    if nxt in targets and nxt != root[node] and nxt not in found:
                        chain = [*path_to(node), step]
                        if len({link[0] for link in chain}) == len(chain):
                            found[nxt] = chain
                    if nxt not in parent:
                        parent[nxt] = step
                        root[nxt] = root[node]
                        following.append(nxt)
            if found:
                return found[min(found, key=preference)]
            frontier = following
        return None


def _distance(value: int, allowed: tuple[int, int]) -> int:
    low, high = allowed
    return low - value if value < low else max(0, value - high)


def _outside(roles: int, primaries: int, ranges: tuple[int, int, int, int, int, int]) -> int:
    """The imbalance of counts ``roles`` and ``primaries`` against the integer ranges of
    :attr:`_Layout.ranges`: :func:`_distance` of roles, primaries and replicas, summed."""
    roles_low, roles_high, primaries_low, primaries_high, replicas_low, replicas_high = ranges
    replicas = roles - primaries
    return (
        (roles_low - roles if roles < roles_low else max(0, roles - roles_high))
        + (primaries_low - primaries if primaries < primaries_low
           else max(0, primaries - primaries_high))
        + (replicas_low - replicas if replicas < replicas_low
           else max(0, replicas - replicas_high))
    )


def _memoized(links: Callable[[NodeId], list[_Step]]) -> Callable[[NodeId], list[_Step]]:
    """``links`` computed once per node: one step search asks for the same node's links
    at several levels while the state does not change."""
    cache: dict[NodeId, list[_Step]] = {}

    def cached(node: NodeId) -> list[_Step]:
        found = cache.get(node)
        if found is None:
            found = cache[node] = links(node)
        return found

    return cached
