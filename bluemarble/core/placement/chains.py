"""The searches rebalancing is built on: which role can go from which node to which,
the shortest chain of such moves that lowers the imbalance, and the best primary
relocation. All read a :class:`~bluemarble.core.placement.state.State` and change
nothing.

A chain passes a role along: its first node gives one up, every node in between gives
one and takes one (counts unchanged), its last node takes one; so only the ends change
the imbalance. Links go among :meth:`State.candidates` only: an empty node is a chain's
end, never a step in between, and the best end of a class is its representative.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence

from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.placement.moves import Step
from bluemarble.core.placement.preference import Key, fill_key, fresh_primary_key
from bluemarble.core.placement.state import State

Links = Callable[[NodeId], list[Step]]
"""The links from one node: the steps by which it can give a role to another."""

REPLICA_MOVE = ((-1, 0), (1, 0))
"""(roles, primaries) change of the giving and of the taking end of a replica move."""
HANDOFF = ((0, -1), (0, 1))
"""(roles, primaries) change of the giving and of the taking end of a handoff."""


def replica_links(state: State, node: NodeId) -> list[Step]:
    """One replica move from ``node`` to each candidate it can give a replica to: the
    first shard (by number) that allows it. One link per pair of nodes is all a
    breadth-first search needs, and it keeps a search at O(nodes^2) links instead of
    O(shards * nodes)."""
    return [(shard, node, other) for shard, linked in replica_link_groups(state, node) for other in linked]


def replica_link_groups(state: State, node: NodeId) -> list[tuple[ShardId, list[NodeId]]]:
    """The candidates ``node`` can give a replica to, grouped by the first shard (by
    number) that allows it, each group sorted by node id. A replica can go to a node
    without a copy in the same zone, or in another zone if both zones stay within
    their per-shard bounds; replicas of shards whose primary is relocating stay."""
    shards = state.replica_of[node] - state.relocating
    if not shards:
        return []
    layout = state.layout
    pending = set(state.candidates()) - {node}
    groups: list[tuple[ShardId, list[NodeId]]] = []
    zone = layout.zone(node)
    for shard in sorted(shards, key=state.rank.__getitem__):
        if not pending:
            break
        members = set(state.members(shard))
        counts = state.zone_counts(shard)
        leaving_ok = counts[zone] - 1 >= layout.zone_min[zone]
        linked = []
        for other in sorted(pending - members):
            other_zone = layout.zone(other)
            if other_zone == zone or (leaving_ok and counts[other_zone] + 1 <= layout.zone_max[other_zone]):
                linked.append(other)
        if linked:
            pending.difference_update(linked)
            groups.append((shard, linked))
    return groups


def all_replica_links(state: State, node: NodeId, wanted: Callable[[NodeId, NodeId], bool]) -> Iterator[Step]:
    """:func:`replica_links` of ``node`` as if every eligible node were a candidate, in
    the same order, except links to empty nodes ``wanted`` rejects (it must judge every
    empty node of a class alike). An empty node can take a replica of the first shard
    (by number) that allows one to its zone, as its class's representative can; the
    empty nodes are listed lazily, only as far as they are read."""
    busy, layout = state.busy, state.layout
    for shard, linked in replica_link_groups(state, node):
        streams: list[Iterable[NodeId]] = [[n for n in linked if n in busy]]
        for n in linked:
            if n not in busy and wanted(node, n):
                members = layout.classes[layout.class_of[n]]
                streams.append(m for m in members if m not in busy)
        for other in heapq.merge(*streams):
            yield shard, node, other


def handoff_links(state: State, node: NodeId, next_round: bool = False) -> list[Step]:
    """The handoffs ``node`` can make as primary: to each eligible replica that has
    the data (``next_round``: to every eligible replica, as the next round will be able
    to once new replicas have caught up). Not for shards promoted or relocating in
    this round."""
    links: list[Step] = []
    for shard in sorted(state.primary_of[node], key=state.rank.__getitem__):
        if shard in state.fresh_primary or shard in state.relocating:
            continue
        for other in sorted(state.replicas[shard]):
            if other in state.layout.eligible and (next_round or other in state.has_data[shard]):
                links.append((shard, node, other))
    return links


def memoized(links: Links) -> Links:
    """``links`` computed once per node: one step search asks for the same node's links
    at several levels while the state does not change."""
    cache: dict[NodeId, list[Step]] = {}

    def cached(node: NodeId) -> list[Step]:
        found = cache.get(node)
        if found is None:
            found = cache[node] = links(node)
        return found

    return cached


def chain_gain(
    state: State, chain: Sequence[Step], source_change: tuple[int, int], target_change: tuple[int, int]
) -> int:
    """Change of the imbalance if ``chain`` is applied (only its ends change)."""
    return state.delta(chain[0][1], *source_change) + state.delta(chain[-1][2], *target_change)


def improving_chain(
    state: State,
    source_change: tuple[int, int],
    target_change: tuple[int, int],
    links: Links,
    max_length: int,
) -> list[Step] | None:
    """The shortest chain of ``links`` (at most ``max_length``) whose first node loses
    and last node gains (roles, primaries) as given, with a total imbalance change
    below zero; sources that gain most are tried first."""
    eligible = state.candidates()
    gain_source = {n: state.delta(n, *source_change) for n in eligible}
    gain_target = {n: state.delta(n, *target_change) for n in eligible}
    for level in sorted(set(gain_source.values())):
        targets = {n for n in eligible if gain_target[n] < -level}
        if not targets:
            continue
        sources = [n for n in eligible if gain_source[n] == level]
        chain = shortest_chain(
            sources, targets, links, lambda n: (gain_target[n], fill_key(state, n)), max_length
        )
        if chain is not None:
            return chain
    return None


def shortest_chain(
    sources: Sequence[NodeId],
    targets: set[NodeId],
    links: Links,
    preference: Callable[[NodeId], tuple[int, Key]],
    max_length: int,
) -> list[Step] | None:
    """Breadth-first search from ``sources`` to any of ``targets`` other than the
    chain's own source; among the shortest chains, the one ending at the best target by
    ``preference``. Chains use each shard at most once, so their steps do not interfere
    with each other, and are at most ``max_length`` (one round's budget) long, since a
    chain is only ever applied whole (half a chain unbalances its middle node, and the
    next round could well undo it instead of finishing it)."""
    parent: dict[NodeId, Step | None] = {n: None for n in sources}
    root = {n: n for n in sources}

    def path_to(node: NodeId) -> list[Step]:
        steps: list[Step] = []
        while (link := parent[node]) is not None:
            steps.append(link)
            node = link[1]
        steps.reverse()
        return steps

    frontier = list(sources)
    for _ in range(max_length):
        found: dict[NodeId, list[Step]] = {}
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
        if not following:
            return None  # nothing left to reach (the budget may be far larger than needed)
        frontier = following
    return None


def best_relocation(state: State) -> Step | None:
    """The primary move to a node without a copy (source loses a role and a primary,
    target gains both) that lowers the imbalance most, keeping zone spread. Among
    candidates only: the empty nodes of a class fit the same shards, and the
    representative comes first in the order targets are tried."""
    eligible = state.candidates()
    gain_source = {n: state.delta(n, -1, -1) for n in eligible}
    targets = sorted((fresh_primary_key(state, n), n) for n in eligible)
    best: tuple[tuple[int, Key], Step] | None = None
    for source in sorted(eligible, key=lambda n: (gain_source[n], n)):
        fitting = [(key, n) for key, n in targets if gain_source[source] + key[0] < 0]
        for shard in sorted(state.primary_of[source], key=state.rank.__getitem__):
            if not fitting:
                break
            if shard in state.fresh_primary or shard in state.relocating:
                continue
            members = state.members(shard)
            for key, target in fitting:  # best first
                if target not in members and zone_swap_ok(state, shard, source, target):
                    rank = (gain_source[source] + key[0], key)
                    if best is None or rank < best[0]:
                        best = (rank, (shard, source, target))
                    # No other shard of this source can reach a better target.
                    fitting = [t for t in fitting if t < (key, target)]
                    break
    return None if best is None else best[1]


def zone_swap_ok(state: State, shard: ShardId, leaving: NodeId, joining: NodeId) -> bool:
    """Whether replacing ``leaving``'s copy of ``shard`` by one on ``joining`` keeps
    every zone within its per-shard bounds."""
    layout = state.layout
    old, new = layout.zone(leaving), layout.zone(joining)
    if old == new:
        return True
    counts = state.zone_counts(shard)
    joined = 0 if joining in state.members(shard) else 1  # finishing a relocation
    return counts[old] - 1 >= layout.zone_min[old] and counts[new] + joined <= layout.zone_max[new]
