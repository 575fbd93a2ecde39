"""The one checker of placement: :func:`violations` lists every way assignments differ
from a valid, balanced placement (the rules of the package doc). The planner's tests,
the end-to-end tests and the failover benchmark all judge placements with it, the last
two after converting what ListAssignments and ListNodes return (see
:mod:`bluemarble.api.conversions`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.placement.layout import Layout, make_layout, shard_order
from bluemarble.core.placement.values import PlacementConfig, PlacementNode, PlacementPlan, ShardAssignment


def violations(
    plan_or_assignments: PlacementPlan | Mapping[ShardId, ShardAssignment],
    nodes: Sequence[PlacementNode],
    config: PlacementConfig,
    *,
    shards: Iterable[ShardId] | None = None,
) -> list[str]:
    """Every way the assignments differ from a valid, balanced placement; [] if none.

    The shards are the keys of the mapping (those of ``plan.assignments`` for a plan),
    or, if ``shards`` is given, exactly those: a shard without a record and a record of
    a shard not listed are problems too, and fair shares are those of ``shards``.
    ``nodes`` are the live nodes; of ``config`` only the replication factor matters.
    One message per problem, naming the shard or node, in a deterministic order:
    records (in shard order: missing or unexpected; primary missing, dead or draining;
    replicas dead, draining, duplicated or too few/many; zone spread), then balance per
    eligible node (roles, primaries, replicas outside their fair-share range, see
    :class:`~bluemarble.core.placement.FairShare`). Every shard therefore has a live
    primary on an eligible node, its copies are on distinct nodes and span the zones
    required, and with equal capacities primary counts differ by at most one.
    Pure; raises ValueError only for malformed arguments (duplicate node ids, ...).
    """
    assignments = (
        plan_or_assignments.assignments
        if isinstance(plan_or_assignments, PlacementPlan)
        else plan_or_assignments
    )
    expected = None if shards is None else set(shards)
    layout = make_layout(nodes, config, len(assignments) if expected is None else len(expected))
    problems: list[str] = []
    primaries: Counter[NodeId] = Counter()
    replicas: Counter[NodeId] = Counter()
    for shard in sorted(assignments.keys() | (expected or set()), key=shard_order):
        record = assignments.get(shard)
        if record is None:
            problems.append(f"{shard}: no record")
            continue
        if expected is not None and shard not in expected:
            problems.append(f"{shard}: record of a shard that should not exist")
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


def _record_problems(record: ShardAssignment, layout: Layout) -> list[str]:
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
