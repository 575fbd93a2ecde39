"""The move budget of one round: how many budgeted moves (:attr:`MoveKind.budgeted`) it
may still make. Asking is an answer, not an exception: a phase that is refused returns,
and the round ends there (see :class:`bluemarble.core.placement.moves.Round`)."""

from __future__ import annotations


class Budget:
    """``max_moves_per_round`` being spent. ``exhausted`` records that a move or a chain
    was refused: the round stopped short, so its plan is not converged."""

    __slots__ = ("exhausted", "full", "left")

    def __init__(self, moves: int) -> None:
        self.full = moves
        """The whole budget: also the longest rebalancing chain worth searching for,
        since a chain is applied whole or not at all."""
        self.left = moves
        self.exhausted = False

    def covers(self, count: int) -> bool:
        """Whether ``count`` more moves fit (nothing is spent). A refusal exhausts the
        budget: the caller was about to start something it cannot finish."""
        if count > self.left:
            self.exhausted = True
            return False
        return True

    def spend(self) -> bool:
        """Spend one move if it fits; False (and exhausted) if none is left."""
        if not self.covers(1):
            return False
        self.left -= 1
        return True
