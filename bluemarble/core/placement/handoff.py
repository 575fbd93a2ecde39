"""Make before break: a copy a plan gives up stays until what replaces it can take over.

Why this exists. A plan changes roles in one step, and two of its steps drop a copy at
the moment another one is only starting:

* **A handoff**: a primary acknowledges some writes before any replica holds them
  (Commit and Abort of trades, EVENTUAL writes: docs/decisions.md, "Commit and Abort
  answer after the local commit"). A new primary copies what it lacks from the replicas
  of its assignment before it serves (``DataPlane._catch_up``), so a handoff that keeps
  the old primary as a replica loses nothing. Some rounds, though, also drop the old
  primary's copy in the same plan: the end of a primary relocation
  (``repair._drop_one``), a draining primary whose copy ``drain_replicas`` moves at
  once, a rebalance that moves the demoted copy. The new primary then served without the
  writes its predecessor had not shipped yet: a trade's settle, for one, whose escrow
  then held its items until the termination rule settled it again (seconds).
* **A replica move**: the new replica holds nothing until it has copied the shard (a
  snapshot: seconds for a large shard). With R = 2 it is the shard's only replica
  meanwhile, and every STRONG write (a grant, a trade's prepare) waits for it: trades
  aborted for want of an answer while a node joined or drained.

So the reconciler passes every plan through :func:`keep_copies`: the old primary of a
handoff, and the source of a replica move, stay replicas, in that plan and in later ones,
until the new primary serves at its epoch, or the new replica has copied the shard (the
reconciler asks the nodes). A later round then drops the extra copy as the planner
decides. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from types import MappingProxyType

from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.placement.values import Move, MoveKind, PlacementPlan, ShardAssignment

_DROPS_A_COPY = frozenset({MoveKind.REMOVE_REPLICA, MoveKind.MOVE_REPLICA})


def handoffs_of(plan: PlacementPlan) -> dict[ShardId, tuple[NodeId, NodeId]]:
    """The shards ``plan`` hands to another primary by a planned handoff: (old primary,
    new primary) of each (failover promotions are not handoffs: their old primary is
    gone)."""
    return {
        move.shard_id: (move.source, move.target)
        for move in plan.moves
        if move.kind is MoveKind.HANDOFF_PRIMARY and move.source is not None and move.target is not None
    }


def replica_moves_of(
    plan: PlacementPlan, current: Mapping[ShardId, ShardAssignment] | None = None,
) -> list[tuple[ShardId, NodeId, NodeId]]:
    """(shard, source, target) of every replica move of ``plan`` that makes a new copy.
    With ``current``, a move whose target already is a member there is left out: its
    target holds a copy already (trimming an excess copy can read as such a move), and
    keeping its source would keep the plan equal to ``current`` round after round."""
    return [
        (move.shard_id, move.source, move.target)
        for move in plan.moves
        if move.kind is MoveKind.MOVE_REPLICA and move.source is not None and move.target is not None
        and (current is None or move.shard_id not in current or move.target not in current[move.shard_id].members)
    ]


def keep_copies(
    plan: PlacementPlan,
    current: Mapping[ShardId, ShardAssignment],
    keep: Collection[tuple[ShardId, NodeId]],
    live: Collection[NodeId],
) -> PlacementPlan:
    """``plan`` with the copy of each (shard, node) of ``keep`` left where the plan would
    drop it: the node stays a replica, its REMOVE_REPLICA move is gone and its
    MOVE_REPLICA becomes an ADD_REPLICA of the target. A node that is not ``live`` is not
    kept (its copy is gone with it). The result is not ``converged`` when a copy was kept:
    a later round drops it once the caller stops asking to keep it."""
    assignments = dict(plan.assignments)
    kept: set[tuple[ShardId, NodeId]] = set()
    for shard, node in sorted(keep):
        record = assignments.get(shard)
        if record is None or node not in live or node in record.members:
            continue
        assignments[shard] = dataclasses.replace(record, replicas=(*record.replicas, node))
        kept.add((shard, node))
    if not kept:
        return plan
    moves: list[Move] = []
    for move in plan.moves:
        if (move.shard_id, move.source) not in kept or move.kind not in _DROPS_A_COPY:
            moves.append(move)
        elif move.kind is MoveKind.MOVE_REPLICA:
            reason = f"{move.reason} ({move.source} kept until the new copy can take over)"
            moves.append(Move(move.shard_id, MoveKind.ADD_REPLICA, None, move.target, reason))
        # else the REMOVE_REPLICA of the kept copy: gone
    return PlacementPlan(
        assignments=MappingProxyType(assignments),
        moves=tuple(moves),
        # In the plan's order (shard order): the assignments keep it.
        changed=tuple(shard for shard in assignments if current.get(shard) != assignments[shard]),
        converged=False,
    )


def without_shards(
    plan: PlacementPlan, current: Mapping[ShardId, ShardAssignment], shards: Collection[ShardId]
) -> PlacementPlan:
    """``plan`` with ``shards`` (which have a record in ``current``) left as they are now:
    their records and moves dropped from it. Each record is safe on its own, so the rest
    of the plan stands; a later round plans those shards again. Not ``converged``."""
    dropped = {shard for shard in shards if shard in current}
    if not dropped:
        return plan
    assignments = {s: (current[s] if s in dropped else record) for s, record in plan.assignments.items()}
    return PlacementPlan(
        assignments=MappingProxyType(assignments),
        moves=tuple(m for m in plan.moves if m.shard_id not in dropped),
        changed=tuple(shard for shard in assignments if current.get(shard) != assignments[shard]),
        converged=False,
    )
