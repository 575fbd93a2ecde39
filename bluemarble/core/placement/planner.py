"""Planning: :func:`plan_assignments` ties the layout, the state, the repairs and the
rebalancing together into one round, and tells whether the round converged."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from types import MappingProxyType

from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.placement.budget import Budget
from bluemarble.core.placement.layout import Layout, make_layout, shard_order
from bluemarble.core.placement.moves import Round
from bluemarble.core.placement.rebalance import rebalance
from bluemarble.core.placement.repair import REPAIRS, failover
from bluemarble.core.placement.state import State
from bluemarble.core.placement.values import (
    Move,
    PlacementConfig,
    PlacementNode,
    PlacementPlan,
    Positions,
    ShardAssignment,
)

MAX_PHASE_PASSES = 8
"""Passes over the budgeted phases in one round; each pass normally finishes the
repairs, the extra ones only pick up what a handoff in the same pass made removable."""

PHASES = (*REPAIRS, rebalance)


def plan_assignments(
    nodes: Sequence[PlacementNode],
    shards: Iterable[ShardId],
    current: Mapping[ShardId, ShardAssignment],
    config: PlacementConfig,
    positions: Positions | None = None,
    copying: Collection[tuple[ShardId, NodeId]] = (),
) -> PlacementPlan:
    """Plan one placement round: failover, then at most ``max_moves_per_round`` moves.

    ``nodes``: the live nodes (anything else is dead). ``shards``: every shard that must
    exist; the plan has a record for each and for nothing else (entries of ``current``
    for other shards are ignored). ``current``: today's records; shards may be missing
    (new) and records may name dead or unknown nodes or list a node twice. ``positions``:
    log position ``(epoch, lsn)`` of the last entry per (shard, replica), gathered by the
    caller (after fencing the candidates) when a primary has died; only used to choose
    which replica to promote, the greatest ``(epoch, lsn)`` first (missing entries rank
    below every reported position; None means no information, so ties go by node id).
    ``copying``: (shard, replica) pairs the caller knows are still copying the shard: no
    primary is handed to them in this plan (they do not hold the data yet).

    Promises (see the package doc for the rules): failover is complete in every plan and
    never promotes a node that was not a live replica while one exists; a shard without
    any live copy gets a fresh primary (its data may be lost, the move says so); budgeted
    moves are at most ``max_moves_per_round``; epochs increase by one exactly where the
    primary changes; a valid balanced ``current`` gives a plan with no moves; the result
    is a function of the arguments only. Raises ValueError for programmer errors
    (duplicate node or shard ids, a record filed under another shard's id, capacity < 1,
    replication factor < 1, negative budget or epoch).
    """
    shard_list = list(shards)
    ordered = sorted(set(shard_list), key=shard_order)
    if len(ordered) != len(shard_list):
        twice = sorted((s for s, k in Counter(shard_list).items() if k > 1), key=shard_order)
        raise ValueError(f"shard ids must be unique; listed more than once: {', '.join(twice)}")
    for shard, record in current.items():
        if record.shard_id != shard:
            raise ValueError(f"the record of {shard} is for {record.shard_id}")
        if record.epoch < 0:
            raise ValueError(f"{shard}: epoch must be >= 0, got {record.epoch}")
    layout = make_layout(nodes, config, len(ordered))
    if not layout.live:
        # Nothing can be improved, and forgetting who held the data would turn a
        # full-cluster restart into data loss: every record is kept as it is.
        unchanged = {
            shard: current.get(shard) or ShardAssignment(shard, 0, None, ()) for shard in ordered
        }
        return _make_plan(ordered, current, unchanged, (), converged=True)
    first = _run_round(layout, ordered, current, config.max_moves_per_round, positions or {}, copying=copying)
    result = first.state.records(current)
    # Converged means a round planned from the result would do nothing; the probe ends
    # at its first move.
    again = _run_round(layout, ordered, result, config.max_moves_per_round, {}, probe=True, copying=copying)
    converged = not again.moves and not again.budget.exhausted
    return _make_plan(ordered, current, result, tuple(first.moves), converged=converged)


def _run_round(
    layout: Layout,
    shards: Sequence[ShardId],
    current: Mapping[ShardId, ShardAssignment],
    budget: int,
    positions: Positions,
    probe: bool = False,
    copying: Collection[tuple[ShardId, NodeId]] = (),
) -> Round:
    """One round from ``current``: failover, then the budgeted phases until a pass
    changes nothing or the round is over."""
    state, dropped = State.load(layout, shards, current, copying)
    rnd = Round(state, Budget(budget), dropped, probe=probe)
    if not failover(rnd, current, positions):
        return rnd
    for _ in range(MAX_PHASE_PASSES):
        before = len(rnd.moves)
        for phase in PHASES:
            if not phase(rnd):
                return rnd
        if len(rnd.moves) == before:
            break
    return rnd


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
