"""The layout: what a valid, balanced placement looks like for one set of live nodes,
one replication factor and one number of shards. Computed once per call and shared by
the planner and the checker, so the two can never disagree about the rules.

This is also where the arguments are checked: duplicate node ids, a capacity below 1, a
replication factor below 1 or a negative budget raise :class:`ValueError` (programmer
errors: configs and node records are validated where they are loaded).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType

from bluemarble.core.ids import NodeId, ShardId, shard_index
from bluemarble.core.placement.fair_share import FairShare, zone_fair_shares
from bluemarble.core.placement.values import PlacementConfig, PlacementNode

Ranges = tuple[int, int, int, int, int, int]
"""A node's :class:`FairShare` ranges as plain integers: roles low and high, primaries
low and high, replicas low and high."""


@dataclass(frozen=True, slots=True)
class Layout:
    """What a valid balanced placement looks like for one set of nodes and shard count."""

    live: Mapping[NodeId, PlacementNode]
    eligible: frozenset[NodeId]
    """The live nodes that may take roles: not draining (all of them when all drain)."""
    drain_ignored: bool
    """Every live node is draining, so draining is ignored (there is nowhere to go)."""
    r: int
    """Effective replication: copies per shard, ``min(replication_factor, eligible)``."""
    spread: int
    """Distinct zones every shard's copies must span."""
    zone_min: Mapping[str, int]
    zone_max: Mapping[str, int]
    """Per zone of eligible nodes, the fewest and most copies of one shard it may hold."""
    shares: Mapping[NodeId, FairShare]
    zones: tuple[str, ...]
    """The zones of the eligible nodes, sorted."""
    ranges: Mapping[NodeId, Ranges]
    """Per eligible node, its :class:`FairShare` ranges (computed once, not per use)."""
    scaled: Mapping[NodeId, tuple[int, int, int]]
    """Per eligible node, its shares of roles, primaries and replicas times ``scale``:
    integers that compare exactly as the fractions do (``scale`` is a common
    denominator), so preference keys need no Fraction arithmetic."""
    scale: int
    classes: tuple[tuple[NodeId, ...], ...]
    """The eligible nodes grouped by (zone, fair share), each group sorted by node id.
    Two nodes of a group that hold nothing are interchangeable for every decision of a
    round except the node-id tie-break (see
    :meth:`bluemarble.core.placement.state.State.candidates`)."""
    class_of: Mapping[NodeId, int]
    """Per eligible node, the index of its group in ``classes``."""

    def zone(self, node: NodeId) -> str:
        return self.live[node].zone


def make_layout(nodes: Sequence[PlacementNode], config: PlacementConfig, shard_count: int) -> Layout:
    """The layout for ``nodes`` (the live ones) and ``shard_count`` shards; raises
    ValueError for malformed arguments (see the module doc)."""
    live = {node.node_id: node for node in nodes}
    if len(live) != len(nodes):
        twice = sorted(n for n, k in Counter(node.node_id for node in nodes).items() if k > 1)
        raise ValueError(f"node ids must be unique; listed more than once: {', '.join(twice)}")
    for node in nodes:
        if node.capacity < 1:
            raise ValueError(f"node {node.node_id}: capacity must be >= 1, got {node.capacity}")
    if config.replication_factor < 1:
        raise ValueError(f"replication factor must be >= 1, got {config.replication_factor}")
    if config.max_moves_per_round < 0:
        raise ValueError(f"max moves per round must be >= 0, got {config.max_moves_per_round}")
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
    shares = zone_fair_shares(zones, shard_count, r, zone_min, zone_max)
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

    def times_scale(value: Fraction) -> int:
        return value.numerator * (scale // value.denominator)  # exact: no Fraction arithmetic

    share_scaled = {
        key: (times_scale(share.roles), times_scale(share.primaries), times_scale(share.replicas))
        for key, share in distinct.items()
    }
    classes: dict[tuple[str, int], list[NodeId]] = {}
    for zone, members in zones.items():  # members are sorted by node id
        for node in members:
            classes.setdefault((zone, id(shares[node.node_id])), []).append(node.node_id)
    return Layout(
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
    draining, in which case draining is ignored (see the package doc). For status
    displays and tests; :func:`~bluemarble.core.placement.violations` applies exactly
    these ranges. Raises ValueError for malformed arguments, as :func:`make_layout`.
    """
    return dict(make_layout(nodes, config, shard_count).shares)


def outside(roles: int, primaries: int, ranges: Ranges) -> int:
    """The imbalance of counts ``roles`` and ``primaries`` against ``ranges``: how far
    roles, primaries and replicas (roles minus primaries) are outside their ranges,
    summed; 0 when all three are within. Written out, not as a loop: it is the planner's
    innermost function."""
    roles_low, roles_high, primaries_low, primaries_high, replicas_low, replicas_high = ranges
    replicas = roles - primaries
    return (
        (roles_low - roles if roles < roles_low else max(0, roles - roles_high))
        + (primaries_low - primaries if primaries < primaries_low
           else max(0, primaries - primaries_high))
        + (replicas_low - replicas if replicas < replicas_low
           else max(0, replicas - replicas_high))
    )


def shard_order(shard: ShardId) -> tuple[int, int, str]:
    """Sort key of shards: by number (shard-2 before shard-10); other names after, by name."""
    try:
        return (0, shard_index(shard), shard)
    except ValueError:
        return (1, 0, shard)
