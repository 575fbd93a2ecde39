"""Fair shares: how many roles, primaries and replicas each eligible node should hold.

Balance is by capacity: with ``S`` shards, ``R`` copies each and total capacity ``C``,
a node of capacity ``c`` should hold ``S * c / C`` primaries and ``S * R * c / C`` roles.
Two limits can make the second impossible: a node holds at most one role per shard, and
zone spread forces every zone to hold between ``zone_min`` and ``zone_max`` copies of
each shard, whatever its capacity. So the roles are split by *water-filling*: each part
is ``level * weight`` clamped to its bounds, for the one level at which the parts add
up to the total; first over the zones, then over the nodes of each zone. Whenever no
bound binds, that is exactly the capacity-proportional share.

Everything is an exact :class:`~fractions.Fraction`: shares are compared with counts,
and floats would put a node whose share is exactly 3 at 2.9999999.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from bluemarble.core.ids import NodeId
from bluemarble.core.placement.values import PlacementNode


@dataclass(frozen=True, slots=True)
class FairShare:
    """One eligible node's fair share of the shards' roles, and the counts allowed.

    ``roles``, ``primaries`` and ``replicas`` are exact fractions (see the module doc);
    the ``*_range`` properties are the inclusive integer ranges
    :func:`~bluemarble.core.placement.violations` accepts: primaries and roles rounded
    down or up; replicas within one of their share (a node's replicas are its roles
    minus its primaries, so once both of those are rounded, demanding the same rounding
    of the difference would over-constrain placement, and is often impossible together
    with zone spread).
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


def zone_fair_shares(
    zones: Mapping[str, Sequence[PlacementNode]],
    shard_count: int,
    r: int,
    zone_min: Mapping[str, int],
    zone_max: Mapping[str, int],
) -> dict[NodeId, FairShare]:
    """Each eligible node's fair share of roles, primaries and replicas (exact fractions).

    ``zones``: the eligible nodes by zone, each list sorted by node id. Roles: ``S * R``
    copies are split over zones in proportion to zone capacity, clamped to what zone
    spread allows (between ``S * zone_min`` and ``S * zone_max``), then each zone's total
    over its nodes in proportion to capacity, clamped to ``S`` (one role per shard per
    node). Primaries: ``S * capacity / total capacity``, never clamped (a node never
    needs more than S), and never above the node's share of roles. Replicas: the
    difference, so that the three shares are consistent.

    Nodes of one zone and capacity share one :class:`FairShare` object: the layout
    groups nodes by it (by identity) without hashing fractions.
    """
    shares: dict[NodeId, FairShare] = {}
    if not zones:
        return shares
    zone_names = sorted(zones)
    zone_capacity = [sum(node.capacity for node in zones[zone]) for zone in zone_names]
    total_capacity = sum(zone_capacity)
    zone_roles = water_fill(
        Fraction(shard_count * r),
        zone_capacity,
        [shard_count * zone_min[zone] for zone in zone_names],
        [shard_count * zone_max[zone] for zone in zone_names],
    )
    for zone, roles_in_zone in zip(zone_names, zone_roles, strict=True):
        members = zones[zone]
        # Nodes of equal capacity in a zone get equal parts: split over the distinct
        # capacities, each counted as often as it occurs (the same exact fractions).
        capacities = Counter(node.capacity for node in members)
        weights = list(capacities)
        node_roles = dict(zip(weights, water_fill(
            roles_in_zone,
            weights,
            [0] * len(weights),
            [shard_count] * len(weights),
            [capacities[capacity] for capacity in weights],
        ), strict=True))
        by_capacity: dict[int, FairShare] = {}
        for node in members:
            share = by_capacity.get(node.capacity)
            if share is None:
                roles = node_roles[node.capacity]
                primaries = Fraction(shard_count * node.capacity, total_capacity)
                # An invariant of the shares (not an input check): a node is never meant
                # to hold more primaries than roles.
                assert primaries <= roles, (node, primaries, roles)
                share = by_capacity[node.capacity] = FairShare(roles, primaries, roles - primaries)
            shares[node.node_id] = share
    return shares


def water_fill(
    total: Fraction,
    weights: Sequence[int],
    lows: Sequence[int],
    highs: Sequence[int],
    counts: Sequence[int] | None = None,
) -> list[Fraction]:
    """Split ``total`` as ``clamp(level * weight_i, low_i, high_i)`` for a level that
    makes the parts add up to ``total``, which must lie within the sums of the bounds
    (the caller's invariant: zone bounds are derived so that it does). ``counts[i]``
    (default 1) is how many parts are alike the ``i``-th: the sums count its part that
    many times. Weights and counts are >= 1, ``low_i <= high_i``.

    The parts do not depend on which such level is found: every part is non-decreasing
    in the level, so two levels giving the same sum give the same parts. Hence the fast
    paths below return exactly what the search would. (They are worth it: the planner
    computes shares on every call, and Fraction arithmetic is slow.)
    """
    times = [1] * len(weights) if counts is None else list(counts)
    numerator, denominator = total.numerator, total.denominator
    # No bound binds: the parts are proportional to the weights, total * w / sum(w * k).
    scaled = denominator * sum(w * k for w, k in zip(weights, times, strict=True))
    if all(
        lo * scaled <= numerator * w <= hi * scaled for w, lo, hi in zip(weights, lows, highs, strict=True)
    ):
        return [Fraction(numerator * w, scaled) for w in weights]
    at_lows = sum(lo * k for lo, k in zip(lows, times, strict=True))
    at_highs = sum(hi * k for hi, k in zip(highs, times, strict=True))
    assert at_lows <= total <= at_highs, (total, lows, highs)
    # Every part at a bound (zone spread often fixes every zone's copies).
    if total == at_lows:
        return [Fraction(lo) for lo in lows]
    if total == at_highs:
        return [Fraction(hi) for hi in highs]

    def clamp(value: Fraction, low: int, high: int) -> Fraction:
        return Fraction(low) if value < low else Fraction(high) if value > high else value

    def parts(level: Fraction) -> list[Fraction]:
        return [clamp(level * w, lo, hi) for w, lo, hi in zip(weights, lows, highs, strict=True)]

    def total_of(values: Sequence[Fraction]) -> Fraction:
        return sum((v * k for v, k in zip(values, times, strict=True)), Fraction(0))

    breaks = sorted({Fraction(b, w) for w, lo, hi in zip(weights, lows, highs, strict=True) for b in (lo, hi)})
    # The sum of parts is continuous, non-decreasing and linear between breakpoints.
    level = breaks[0]
    at_lower = total_of(parts(level))
    for lower, upper in itertools.pairwise(breaks):
        at_upper = total_of(parts(upper))
        if at_lower <= total <= at_upper:
            level = lower if at_upper == at_lower else (
                lower + (upper - lower) * (total - at_lower) / (at_upper - at_lower)
            )
            break
        at_lower = at_upper
    else:
        level = breaks[-1] if total >= total_of(parts(breaks[-1])) else breaks[0]
    result = parts(level)
    assert total_of(result) == total, (total, result)
    return result
