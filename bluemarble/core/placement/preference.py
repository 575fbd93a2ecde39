"""Which node is best for a role: the preference keys every choice among nodes uses.

Each key starts with the change of imbalance the choice causes
(:meth:`~bluemarble.core.placement.state.State.delta`), then how far the node is from
its fair share, and ends with the node id, so every tie goes to the smallest id: this is
what makes plans independent of input order, and what lets one empty node stand for all
empty nodes of its class (see :meth:`~bluemarble.core.placement.state.State.candidates`).

The keys compare shares scaled to integers (see :attr:`Layout.scaled`):
``count * scale - share * scale`` orders exactly as ``count - share`` does.
"""

from __future__ import annotations

from collections.abc import Callable

from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.placement.state import State

Key = tuple[int, int, int, NodeId]


def fill_key(state: State, node: NodeId) -> Key:
    """Preference for a node taking a new replica: the imbalance it adds, then how far
    below its fair share of roles (and of replicas) it is."""
    roles, _, replicas = state.layout.scaled[node]
    scale = state.layout.scale
    return (
        state.delta(node, 1, 0),
        state.roles(node) * scale - roles,
        state.replica_count(node) * scale - replicas,
        node,
    )


def primary_key(state: State, node: NodeId) -> Key:
    """Preference for a node taking a primary it already holds a copy of."""
    roles, primaries, _ = state.layout.scaled[node]
    scale = state.layout.scale
    return (
        state.delta(node, 0, 1),
        state.primaries(node) * scale - primaries,
        state.roles(node) * scale - roles,
        node,
    )


def fresh_primary_key(state: State, node: NodeId) -> Key:
    """Preference for a node taking a primary it holds no copy of."""
    roles, primaries, _ = state.layout.scaled[node]
    scale = state.layout.scale
    return (
        state.delta(node, 1, 1),
        state.primaries(node) * scale - primaries,
        state.roles(node) * scale - roles,
        node,
    )


def share_gap(state: State, node: NodeId) -> int:
    """Minus how far ``node`` is above its fair share of roles (draining: any role),
    times :attr:`Layout.scale`: the smaller, the better a node is to give a role up."""
    scale = state.layout.scale
    if node not in state.layout.eligible:
        return -state.roles(node) * scale
    return state.layout.scaled[node][0] - state.roles(node) * scale


def destination(state: State, shard: ShardId, leaving: NodeId | None = None) -> NodeId | None:
    """The best eligible non-member to take a copy of ``shard`` (``leaving`` gives one up
    at the same time): a zone the shard must still reach, else a zone with room, then
    by :func:`fill_key`. None when every candidate already holds a copy."""
    layout = state.layout
    counts = state.zone_counts(shard, without=leaving)
    members = set(state.members(shard))
    candidates = [n for n in state.candidates() if n not in members]
    tiers: tuple[Callable[[str], bool], ...] = (
        lambda z: counts[z] < layout.zone_min[z],
        lambda z: counts[z] < layout.zone_max[z],
        lambda z: True,
    )
    for allowed in tiers:
        fitting = [n for n in candidates if allowed(layout.zone(n))]
        if fitting:
            return min(fitting, key=lambda n: fill_key(state, n))
    return None
