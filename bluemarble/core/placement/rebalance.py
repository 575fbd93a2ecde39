"""Rebalancing, the last phase of a round: move roles until every eligible node's counts
are within their fair-share ranges, at the lowest cost in changed roles.

While the total imbalance (the sum of :meth:`State.imbalance` over the candidates) is
above zero, the round applies the step that removes it at the lowest cost: the shortest
chain of replica moves, or of handoffs, or a primary relocation (the target is added as
an extra replica; a later round hands the primary to it and drops the old primary's
copy). A chain is applied whole or not at all, so it is at most one round's budget long
(when the only repair is a longer chain, balance stops one role short: seen with budgets
of 1 and 2, where zone spread can make the shortest chain 3 moves long). When no step lowers
the imbalance, one neutral move after which one does is tried (a bounded lookahead).
"""

from __future__ import annotations

import enum
from fractions import Fraction

from bluemarble.core.ids import NodeId
from bluemarble.core.placement.chains import (
    HANDOFF,
    REPLICA_MOVE,
    all_replica_links,
    best_relocation,
    chain_gain,
    handoff_links,
    improving_chain,
    memoized,
    replica_links,
)
from bluemarble.core.placement.moves import Round, Step
from bluemarble.core.placement.state import State

MAX_LOOKAHEAD = 64
"""Neutral moves tried, per rebalancing step, to find one that unlocks an improvement:
bounds the cost of a round that cannot balance further."""


class StepKind(enum.Enum):
    """The kinds of rebalancing step."""

    REPLICAS = "replicas"
    HANDOFFS = "handoffs"
    RELOCATION = "relocation"
    WAIT = "wait"
    """Nothing now: a cheaper chain of handoffs is possible next round."""


Choice = tuple[StepKind, list[Step]]
"""A rebalancing step: its kind and its chain (one link for a relocation)."""


def rebalance(rnd: Round) -> bool:
    """Apply improving steps until the imbalance is 0 or nothing lowers it. Steps, in
    order of preference: chains of replica moves (no epoch change), chains of handoffs,
    a primary relocation; when none lowers the imbalance, one neutral move after which
    one does (see :func:`enabling_step`). Every improving step lowers the imbalance by
    at least one and every neutral one is followed by an improving one, so this ends.
    False when the round is over (see :class:`Round`)."""
    state, max_chain = rnd.state, rnd.budget.full
    while True:
        # With every node balanced no step can lower the imbalance, and no neutral
        # one is tried: the exit both step searches would take, without the search.
        if not any(state.imbalance(n) > 0 for n in state.candidates()):
            return True
        step = improving_step(state, max_chain) or enabling_step(state, max_chain)
        if step is None or step[0] is StepKind.WAIT:
            return True
        if not _take(rnd, step):
            return False


def _take(rnd: Round, step: Choice) -> bool:
    """Apply ``step`` (never a WAIT: :func:`rebalance` stops on those)."""
    kind, chain = step
    if kind is StepKind.REPLICAS:
        return rnd.move_replicas(chain, "rebalance roles")
    if kind is StepKind.HANDOFFS:
        return rnd.handoffs(chain, "rebalance primaries")
    [(shard, source, target)] = chain  # a relocation: one link
    return rnd.start_relocation(shard, source, target)


def improving_step(state: State, max_chain: int) -> Choice | None:
    """The step that lowers the imbalance at the lowest cost in changed roles per unit
    of imbalance removed (a replica move or a handoff changes two roles, a relocation in
    the end changes two: the old primary's and the new one's); ties go to replica moves
    (no epoch change), then handoffs, then relocations."""
    options: list[tuple[Fraction, int, StepKind, list[Step]]] = []

    def offer(rank: int, kind: StepKind, chain: list[Step] | None, gain: int) -> None:
        if chain is not None and gain < 0:
            options.append((Fraction(2 * len(chain), -gain), rank, kind, chain))

    chain = improving_chain(state, *REPLICA_MOVE, memoized(lambda n: replica_links(state, n)), max_chain)
    if chain is not None:
        offer(0, StepKind.REPLICAS, chain, chain_gain(state, chain, *REPLICA_MOVE))
    chain = improving_chain(state, *HANDOFF, memoized(lambda n: handoff_links(state, n)), max_chain)
    if chain is not None:
        offer(1, StepKind.HANDOFFS, chain, chain_gain(state, chain, *HANDOFF))
    if state.new_replicas > 0:
        # A replica added in this round cannot take a primary before the next one;
        # when that will allow a cheaper chain, waiting saves handoffs (each bumps
        # an epoch) and moves.
        soon = improving_chain(
            state, *HANDOFF, memoized(lambda n: handoff_links(state, n, next_round=True)), max_chain
        )
        if soon is not None:
            offer(2, StepKind.WAIT, soon, chain_gain(state, soon, *HANDOFF))
    relocation = best_relocation(state)
    if relocation is not None:
        _, source, target = relocation
        gain = state.delta(source, -1, -1) + state.delta(target, 1, 1)
        offer(3, StepKind.RELOCATION, [relocation], gain)
    if not options:
        return None
    _, _, kind, chain = min(options, key=lambda option: option[:2])
    return kind, chain


def enabling_step(state: State, max_chain: int) -> Choice | None:
    """A single replica move or handoff that leaves the imbalance unchanged but after
    which an improving step exists; e.g. a node one primary and one role over, next to
    one under, whose shards only allow a handoff and a replica move together. Tries at
    most :data:`MAX_LOOKAHEAD` candidates touching an unbalanced node, each on a copy
    of the state.

    Candidates are tried in the order of a scan of every eligible node's links, in node
    id order, as if all empty nodes were candidates: a move to any empty node counts
    against the limit, not only to the one of :meth:`State.candidates` (the lookahead
    is a bounded search, so which moves it counts changes its result)."""
    candidates = state.candidates()
    unbalanced = {n for n in candidates if state.imbalance(n) > 0}
    if not unbalanced:
        return None
    listed = set(candidates)

    def is_unbalanced(node: NodeId) -> bool:
        # An empty node not listed is like its class's representative, which is.
        return node in unbalanced if node in listed else state.imbalance(node) > 0

    # Only nodes that hold a role have links; the others' lists are empty.
    holders = [n for n in candidates if n in state.busy]
    tried = 0
    for kind, (source_change, target_change) in ((StepKind.REPLICAS, REPLICA_MOVE), (StepKind.HANDOFFS, HANDOFF)):

        def neutral(source: NodeId, target: NodeId) -> bool:
            if not is_unbalanced(source) and not is_unbalanced(target):
                return False
            return not (
                state.delta(source, *source_change) + state.delta(target, *target_change)  # noqa: B023
            )

        for node in holders:
            links = (
                all_replica_links(state, node, neutral) if kind is StepKind.REPLICAS
                else iter(handoff_links(state, node))
            )
            for link in links:
                _, source, target = link
                if not neutral(source, target):
                    continue
                if tried >= MAX_LOOKAHEAD:
                    return None
                tried += 1
                if _unlocks(state, kind, link, max_chain):
                    return kind, [link]
    return None


def _unlocks(state: State, kind: StepKind, link: Step, max_chain: int) -> bool:
    """Whether an improving step exists once ``link`` is applied: tried on a copy of
    the state, which is then dropped (the step, if chosen, is taken through the
    :class:`Round`, which budgets and records it)."""
    shard, source, target = link
    trial = state.copy()
    if kind is StepKind.REPLICAS:
        trial.remove(shard, source)
        trial.add(shard, target)
    else:
        trial.set_primary(shard, target)
        trial.add(shard, source)
    return improving_step(trial, max_chain) is not None
