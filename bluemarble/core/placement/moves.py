"""One planning round's moves: every change of the state that is a :class:`Move` goes
through :class:`Round`, which checks it against the budget, records it, then applies it.

A move that does not fit ends the round: the operation returns False and changes
nothing, every phase returns as soon as one of its operations does (the round ends),
and :class:`~bluemarble.core.placement.budget.Budget` remembers it was exhausted. A
*probe* round (``probe=True``) ends the same way right after recording its first move:
the planner uses one to tell whether its result is converged, and one move is all it
needs to know.
"""

from __future__ import annotations

from collections.abc import Sequence

from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.placement.budget import Budget
from bluemarble.core.placement.state import Dropped, State
from bluemarble.core.placement.values import Move, MoveKind

Step = tuple[ShardId, NodeId, NodeId]
"""One link of a rebalancing chain: (shard, node giving a role, node taking it)."""


class Round:
    """The state of one round, its budget and the moves recorded so far (in order).

    Every operation returns whether it was applied; False means the round is over
    (budget spent or probe answered) and the caller must return at once.
    """

    __slots__ = ("budget", "moves", "probe", "state")

    def __init__(self, state: State, budget: Budget, dropped: Sequence[Dropped], probe: bool = False) -> None:
        self.state = state
        self.budget = budget
        self.probe = probe
        # Entries dropped while loading are bookkeeping, recorded first, never stopped.
        self.moves: list[Move] = [
            Move(shard, MoveKind.DROP_REPLICA, node, None, why) for shard, node, why in dropped
        ]

    def _record(
        self, shard: ShardId, kind: MoveKind, source: NodeId | None, target: NodeId | None, reason: str
    ) -> bool:
        if kind.budgeted and not self.budget.spend():
            return False
        self.moves.append(Move(shard, kind, source, target, reason))
        return not self.probe  # a probe has its answer: recorded, not applied, round over

    def promote(self, shard: ShardId, old: NodeId | None, target: NodeId, reason: str) -> bool:
        """Failover: ``target`` (a live replica) becomes primary; never budgeted."""
        return self._new_primary(shard, MoveKind.PROMOTE, old, target, reason)

    def assign_primary(self, shard: ShardId, old: NodeId | None, target: NodeId, reason: str) -> bool:
        """``target`` becomes primary of a shard without any live copy; never budgeted."""
        return self._new_primary(shard, MoveKind.ASSIGN_PRIMARY, old, target, reason)

    def _new_primary(
        self, shard: ShardId, kind: MoveKind, old: NodeId | None, target: NodeId, reason: str
    ) -> bool:
        if not self._record(shard, kind, old, target, reason):
            return False
        self.state.fail_over_to(shard, target)
        return True

    def add_replica(self, shard: ShardId, node: NodeId, reason: str) -> bool:
        if not self._record(shard, MoveKind.ADD_REPLICA, None, node, reason):
            return False
        self.state.add(shard, node)
        return True

    def remove_replica(self, shard: ShardId, node: NodeId, reason: str) -> bool:
        if not self._record(shard, MoveKind.REMOVE_REPLICA, node, None, reason):
            return False
        self.state.remove(shard, node)
        return True

    def move_replica(self, shard: ShardId, source: NodeId, target: NodeId, reason: str) -> bool:
        if not self._record(shard, MoveKind.MOVE_REPLICA, source, target, reason):
            return False
        self.state.remove(shard, source)
        self.state.add(shard, target)
        return True

    def handoff(self, shard: ShardId, target: NodeId, reason: str) -> bool:
        """The primary hands ``shard`` to replica ``target``, which must have held the
        data since the round started, and stays a replica."""
        state = self.state
        source = state.primary[shard]
        # The planner's invariants (safety rules of the package doc), not input checks.
        assert source is not None and target in state.replicas[shard], (shard, target)
        assert target in state.has_data[shard] and shard not in state.fresh_primary, shard
        if not self._record(shard, MoveKind.HANDOFF_PRIMARY, source, target, reason):
            return False
        state.set_primary(shard, target)
        state.add(shard, source)
        return True

    def start_relocation(self, shard: ShardId, source: NodeId, target: NodeId) -> bool:
        """Begin moving ``shard``'s primary from ``source`` to ``target``, a node without
        a copy. The target needs the data before it can take over: it is added as an
        extra replica now, and a later round hands off and drops the old primary's copy
        (see :func:`bluemarble.core.placement.repair.trim_excess`). Until then the counts
        assume it is done."""
        if not self.add_replica(shard, target, f"relocating the primary from {source}"):
            return False
        self.state.start_relocation(shard, source, target)
        return True

    def move_replicas(self, chain: Sequence[Step], reason: str) -> bool:
        """Apply a chain of replica moves whole, or (budget too small) not at all."""
        if not self.budget.covers(len(chain)):
            return False
        return all(self.move_replica(shard, source, target, reason) for shard, source, target in chain)

    def handoffs(self, chain: Sequence[Step], reason: str) -> bool:
        """Apply a chain of handoffs whole, or (budget too small) not at all."""
        if not self.budget.covers(len(chain)):
            return False
        return all(self.handoff(shard, target, reason) for shard, _source, target in chain)
