"""What a replica does with what a primary sends it, for one shard (pure).

Why this module exists: a replica is the last line of defence of invariant I1. Whatever a
deposed primary, a delayed message or a duplicated batch brings, the replica alone decides
whether it may touch its log, and that decision must not depend on timing. So it is a
function of values (the replica's durable fenced epoch and last position, what arrived)
that returns a decision; the shard-node driver persists and answers, in this order:

1. persist ``fenced_epoch`` if it grew, and append ``entries[append_from:]`` (OK only),
   in one durable transaction;
2. then answer the sender with the verdict and the replica's (new) last position.

Log matching: two logs holding an entry at the same ``(epoch, lsn)`` hold the same history
up to it, because one primary writes per epoch and it never writes an lsn twice. That is
what lets a replica accept a batch from only its own last position, without comparing
histories.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from bluemarble.core.replication.position import ZERO, LogPosition


class Verdict(enum.Enum):
    """The replica's answer to a batch (or a snapshot)."""

    OK = "ok"
    """Accepted: append ``entries[append_from:]`` (install, for a snapshot)."""
    STALE_EPOCH = "stale_epoch"
    """The sender's epoch is older than one the replica has seen: the sender is deposed
    and must stop acting as primary (I1). Nothing is appended."""
    MISMATCH = "mismatch"
    """The batch does not continue the replica's log. The replica answers its last
    position; the primary computes where to resume (:func:`~bluemarble.core.replication.primary.resume_point`)."""
    MALFORMED = "malformed"
    """The batch breaks the protocol (gaps, epochs out of order or newer than the sender):
    a programming error on the sender's side. Nothing changes, the fence included."""


@dataclass(frozen=True)
class ReplicaDecision:
    """What to do with one batch; see the module docstring for the order of effects."""

    verdict: Verdict
    append_from: int
    """Index into the batch's entries of the first one to append (OK only);
    ``len(entries)`` means nothing new. Always 0 for snapshots and refusals."""
    fenced_epoch: int
    """The replica's newest seen epoch after this batch: persist it if it grew."""
    reason: str = ""


def _malformed(fenced_epoch: int, reason: str) -> ReplicaDecision:
    return ReplicaDecision(Verdict.MALFORMED, 0, fenced_epoch, reason)


def check_entries(
    *,
    fenced_epoch: int,
    last: LogPosition,
    sender_epoch: int,
    prev: LogPosition,
    entries: Sequence[LogPosition],
) -> ReplicaDecision:
    """Decide what a replica whose durable state is ``(fenced_epoch, last)`` does with a
    batch ``entries`` sent by a primary at ``sender_epoch``, continuing after ``prev``.

    - MALFORMED unless ``sender_epoch >= 1``, ``prev.epoch <= sender_epoch``, the entries'
      lsns run ``prev.lsn + 1, prev.lsn + 2, ...`` and their epochs never decrease, stay
      ``>= prev.epoch`` and ``<= sender_epoch``. Checked first: garbage moves no fence.
    - STALE_EPOCH if ``sender_epoch < fenced_epoch`` (I1: a replica that has seen epoch
      e+1 refuses entries of epoch <= e). The fence is unchanged.
    - OK, appending everything, if ``last == prev``; OK, appending what follows it, if
      ``last`` is one of the entries (a duplicated or overlapping delivery).
    - MISMATCH otherwise (a gap, or a log that is not a prefix of the sender's).

    On OK and MISMATCH ``fenced_epoch`` becomes ``max(fenced_epoch, sender_epoch)``: a
    primary at that epoch exists, so nothing older may be accepted any more. An empty
    batch is a probe: OK (nothing new) when ``last == prev``, else MISMATCH. Raises
    nothing; ``fenced_epoch < 0`` is a programming error (assertion).
    """
    assert fenced_epoch >= 0, fenced_epoch
    if sender_epoch < 1:
        return _malformed(fenced_epoch, f"sender epoch {sender_epoch} < 1")
    if prev.epoch > sender_epoch:
        return _malformed(fenced_epoch, f"prev {prev} is newer than the sender's epoch {sender_epoch}")
    previous = prev
    for i, entry in enumerate(entries):
        if entry.lsn != previous.lsn + 1:
            return _malformed(fenced_epoch, f"entry {i} at {entry} does not follow {previous}")
        if entry.epoch < previous.epoch:
            return _malformed(fenced_epoch, f"entry {i} at {entry} has an older epoch than {previous}")
        if entry.epoch > sender_epoch:
            return _malformed(fenced_epoch, f"entry {i} at {entry} is newer than the sender's epoch {sender_epoch}")
        previous = entry
    if sender_epoch < fenced_epoch:
        return ReplicaDecision(
            Verdict.STALE_EPOCH, 0, fenced_epoch,
            f"sender epoch {sender_epoch} is older than the fenced epoch {fenced_epoch}",
        )
    new_fence = max(fenced_epoch, sender_epoch)
    if last == prev:
        return ReplicaDecision(Verdict.OK, 0, new_fence)
    # Entries are contiguous from prev.lsn + 1, so `last` can only be at one index.
    index = last.lsn - prev.lsn - 1
    if 0 <= index < len(entries) and entries[index] == last:
        return ReplicaDecision(Verdict.OK, index + 1, new_fence, f"already holds up to {last}")
    return ReplicaDecision(
        Verdict.MISMATCH, 0, new_fence, f"last entry {last} is neither {prev} nor in the batch",
    )


def check_snapshot(
    *,
    fenced_epoch: int,
    last: LogPosition,
    sender_epoch: int,
    replaces: LogPosition,
    snapshot_last: LogPosition,
) -> ReplicaDecision:
    """Decide whether a replica at ``(fenced_epoch, last)`` installs a snapshot (the
    sender's whole state up to ``snapshot_last``) in place of its log.

    The primary sends a snapshot when :func:`~bluemarble.core.replication.primary.resume_point`
    says so for the replica's reported last position ``replaces``. The replica installs it
    only while it is still in that state (``last == replaces``), or when it holds nothing
    (``last == ZERO``): a delayed or duplicated snapshot must never replace a log that has
    since grown, because the replica may have acknowledged what it would drop (I4).
    Same (epoch, lsn) means same history, so ``last == replaces`` means "the log the
    primary judged".

    - MALFORMED if ``sender_epoch < 1`` or ``snapshot_last.epoch > sender_epoch``.
    - STALE_EPOCH if ``sender_epoch < fenced_epoch`` (I1); the fence is unchanged.
    - OK (install) if ``last == replaces`` or ``last == ZERO``.
    - MISMATCH otherwise: the replica answers its last position and the primary decides
      again.

    ``append_from`` is always 0. On OK and MISMATCH the fence becomes
    ``max(fenced_epoch, sender_epoch)``.
    """
    assert fenced_epoch >= 0, fenced_epoch
    if sender_epoch < 1:
        return _malformed(fenced_epoch, f"sender epoch {sender_epoch} < 1")
    if snapshot_last.epoch > sender_epoch:
        return _malformed(fenced_epoch, f"snapshot at {snapshot_last} is newer than the sender's epoch {sender_epoch}")
    if sender_epoch < fenced_epoch:
        return ReplicaDecision(
            Verdict.STALE_EPOCH, 0, fenced_epoch,
            f"sender epoch {sender_epoch} is older than the fenced epoch {fenced_epoch}",
        )
    new_fence = max(fenced_epoch, sender_epoch)
    if last == replaces or last == ZERO:
        return ReplicaDecision(Verdict.OK, 0, new_fence)
    return ReplicaDecision(
        Verdict.MISMATCH, 0, new_fence, f"snapshot planned for {replaces}, but the log is now at {last}",
    )
