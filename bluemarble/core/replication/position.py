"""A position in a shard's replicated log (pure).

Every log entry carries the epoch of the primary that wrote it and its lsn (log sequence
number, 1, 2, 3, ... per shard). Positions compare as ``(epoch, lsn)``, like Raft's
``(term, index)``: the entry written by a newer primary is ahead of any entry of an older
one, whatever their lsns. That is the order failover promotes by (flow 4): a deposed
primary may hold *more* entries than a replica of its successor, but never newer ones.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class LogPosition:
    """``(epoch, lsn)`` of one log entry; ``ZERO`` stands for an empty log."""

    epoch: int
    lsn: int

    def __post_init__(self) -> None:
        assert self.epoch >= 0 and self.lsn >= 0, self
        assert (self.epoch == 0) == (self.lsn == 0), f"only the empty log sits at epoch 0 or lsn 0: {self}"

    def __str__(self) -> str:
        return f"({self.epoch}, {self.lsn})"


ZERO = LogPosition(0, 0)
"""The position of an empty log."""
