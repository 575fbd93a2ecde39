"""The invariants the replication simulation checks after every step.

Why this module exists: the simulated actors run the real rules, so nothing in them may
also judge the outcome. The checker sees every append, log replacement and
acknowledgement (the actors report them) and holds its own record of the truth:

- I1: at most one node appends as primary, and at most one acknowledges writes, at any
  one epoch; no replica appends entries sent at an epoch older than its fenced epoch.
- Log matching: an entry at a given (epoch, lsn) is the same write, after the same
  previous position, in every log that ever holds it (so same position => same history).
- No log holds a write twice.
- I4: every write acknowledged to a client is in the log of the current primary once it
  serves, and (after healing) in every node's log, exactly once.

The work per step is incremental (only what changed is checked), so thousands of seeds
stay cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bluemarble.core.replication import ZERO, LogPosition

MAX_VIOLATIONS = 5
"""A run stops after its first violation; more than one can be found in the same step."""


@dataclass(frozen=True)
class Acked:
    """A write acknowledged to its client: by whom, at which epoch, where in the log."""

    write_id: int
    node: int
    epoch: int
    position: LogPosition
    tick: int


class Checker:
    """Collects violations (strings a person can act on, each naming the tick)."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.now = 0
        self._canon: dict[LogPosition, tuple[int, LogPosition]] = {}
        self._epoch_writer: dict[int, int] = {}
        self._epoch_acker: dict[int, int] = {}
        self.acked: list[Acked] = []
        self._acked_ids: dict[int, Acked] = {}
        self._i4_key: tuple[int, int, int] | None = None
        self._i4_checked = 0

    def fail(self, text: str) -> None:
        if len(self.violations) < MAX_VIOLATIONS:
            self.violations.append(f"tick {self.now}: {text}")

    # -- events reported by the actors ------------------------------------------------------

    def entries_added(self, node: int, positions: Sequence[LogPosition], write_ids: Sequence[int], start: int) -> None:
        """``positions[start:]`` were just appended to ``node``'s log (or the whole log
        replaced, with ``start`` 0): log matching for each of them."""
        canon = self._canon
        for k in range(start, len(positions)):
            position = positions[k]
            fact = (write_ids[k], positions[k - 1] if k else ZERO)
            known = canon.setdefault(position, fact)
            if known != fact:
                self.fail(
                    f"log matching: n{node + 1} holds write {fact[0]} at {position} after {fact[1]}, "
                    f"but {position} is write {known[0]} after {known[1]} elsewhere"
                )
                return

    def duplicate_write(self, node: int, write_id: int, position: LogPosition) -> None:
        self.fail(f"write {write_id} would be in the log of n{node + 1} twice (again at {position})")

    def primary_append(self, node: int, epoch: int) -> None:
        """I1: ``node`` appends a new write as primary at ``epoch``."""
        writer = self._epoch_writer.setdefault(epoch, node)
        if writer != node:
            self.fail(f"I1: n{node + 1} and n{writer + 1} both appended writes as primary at epoch {epoch}")

    def replica_append(self, node: int, sender_epoch: int, fenced_before: int) -> None:
        """I1: a replica appends (or installs) what a primary at ``sender_epoch`` sent."""
        if sender_epoch < fenced_before:
            self.fail(
                f"I1: replica n{node + 1} fenced at epoch {fenced_before} took entries from a primary "
                f"at epoch {sender_epoch}"
            )

    def acknowledged(self, node: int, epoch: int, write_id: int, position: LogPosition) -> None:
        """I1 for acks, and the record I4 checks against."""
        acker = self._epoch_acker.setdefault(epoch, node)
        if acker != node:
            self.fail(f"I1: n{node + 1} and n{acker + 1} both acknowledged writes at epoch {epoch}")
        earlier = self._acked_ids.get(write_id)
        if earlier is not None:
            if earlier.position != position:
                self.fail(
                    f"write {write_id} acknowledged at {earlier.position} by n{earlier.node + 1}, "
                    f"then at {position} by n{node + 1}: it exists twice"
                )
            return
        record = Acked(write_id, node, epoch, position, self.now)
        self._acked_ids[write_id] = record
        self.acked.append(record)

    # -- checks -----------------------------------------------------------------------------

    def check_serving_primary(self, node: int, epoch: int, generation: int, index: dict[int, int]) -> None:
        """I4: every acknowledged write is in the serving primary's log (``index``: write id
        -> lsn; a log never holds a write twice, so presence is "exactly once")."""
        key = (node, epoch, generation)
        start = self._i4_checked if key == self._i4_key else 0
        for record in self.acked[start:]:
            if record.write_id not in index:
                self.fail(
                    f"I4: write {record.write_id}, acknowledged by n{record.node + 1} at {record.position} "
                    f"(epoch {record.epoch}, tick {record.tick}), is missing from the log of n{node + 1}, "
                    f"primary serving at epoch {epoch}"
                )
                return
        self._i4_key = key
        self._i4_checked = len(self.acked)

    def check_healed(self, logs: Sequence[tuple[list[LogPosition], list[int]]]) -> None:
        """After healing: every node holds the same log, which holds every acknowledged
        write exactly once."""
        first_positions, first_ids = logs[0]
        for node, (positions, write_ids) in enumerate(logs):
            if positions != first_positions or write_ids != first_ids:
                last = positions[-1] if positions else ZERO
                first_last = first_positions[-1] if first_positions else ZERO
                self.fail(f"after healing n{node + 1}'s log (last {last}) differs from n1's (last {first_last})")
                return
        counts: dict[int, int] = {}
        for write_id in first_ids:
            counts[write_id] = counts.get(write_id, 0) + 1
        for record in self.acked:
            count = counts.get(record.write_id, 0)
            if count != 1:
                self.fail(
                    f"I4 after healing: write {record.write_id}, acknowledged by n{record.node + 1} at "
                    f"{record.position}, is in the logs {count} times"
                )
                return
