"""What a primary decides about its replicas, for one shard (pure).

Why this module exists: the two decisions that make a STRONG acknowledgement honest live
here: where to continue shipping to a replica whose log may have diverged (a deposed
primary coming back with unacknowledged entries must be reset by a snapshot, never
extended), and which lsn is committed (acknowledged by enough replicas at the primary's
own epoch). The shard-node driver feeds in what it knows and applies the answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bluemarble.core.replication.position import ZERO, LogPosition


@dataclass(frozen=True)
class Resume:
    """Where to continue shipping to a replica."""

    send_from_lsn: int
    """Next lsn to send (meaningful when not ``snapshot_required``); the batch's ``prev``
    is the primary's entry at ``send_from_lsn - 1``."""
    snapshot_required: bool
    """The replica's log is not a prefix of the retained log: send a snapshot (the
    primary's state) that replaces it, then the tail."""


_SNAPSHOT = Resume(send_from_lsn=0, snapshot_required=True)


def resume_point(
    *,
    replica_last: LogPosition,
    primary_last: LogPosition,
    first_retained_lsn: int,
    epoch_at: Callable[[int], int | None],
) -> Resume:
    """Where to resume shipping to a replica whose last entry is ``replica_last``.

    ``epoch_at(lsn)`` is the epoch of the primary's retained entry at ``lsn`` (None if not
    retained); ``first_retained_lsn`` (>= 1) is the oldest lsn the primary still has as a
    log entry (older ones live only in snapshots).

    - replica beyond the primary's last lsn: snapshot (it holds entries the primary never
      had, e.g. a deposed primary's unacknowledged writes);
    - empty replica: from lsn 1 if nothing was truncated, else snapshot;
    - the primary holds ``replica_last`` itself (same epoch at that lsn): from the next lsn
      (log matching: the replica's log is a prefix of the primary's);
    - otherwise (a different epoch at that lsn, or truncated): snapshot.
    """
    assert first_retained_lsn >= 1, first_retained_lsn
    if replica_last.lsn > primary_last.lsn:
        return _SNAPSHOT
    if replica_last == ZERO:
        return Resume(1, False) if first_retained_lsn <= 1 else _SNAPSHOT
    if epoch_at(replica_last.lsn) == replica_last.epoch:
        return Resume(replica_last.lsn + 1, False)
    return _SNAPSHOT


def commit_lsn(
    *, own_last_lsn: int, acked_lsns: Iterable[int], required_acks: int, epoch_start_lsn: int = 0,
) -> int:
    """The highest lsn that at least ``required_acks`` replicas have acknowledged, capped
    at ``own_last_lsn``; ``own_last_lsn`` itself when ``required_acks`` is 0; 0 when fewer
    replicas than required have acknowledged anything, or when that lsn is below
    ``epoch_start_lsn``.

    ``epoch_start_lsn`` is the lsn of the first entry this primary wrote at its own epoch
    (its epoch-start entry, appended before it serves). Pass it: entries of older epochs
    that a new primary inherited are committed only together with an entry of its own
    epoch (Raft's "commit only current-term entries"). Counting replicas for an inherited
    entry alone is unsafe: a deposed primary of a newer epoch than that entry may hold a
    different entry at the same lsn, and win the next promotion with it (found by the
    simulation, seed 94164 before this rule; the "commit-inherited" break).
    0 (the default) disables the check, for callers that have no epoch-start entry.

    Count only acks that prove the replica's log matches the primary's up to that lsn: an
    OK from a replica at the primary's epoch on the current stream. The caller keeps the
    maximum over time (this value may go down when a replica is replaced).
    """
    assert required_acks >= 0 and own_last_lsn >= 0 and epoch_start_lsn >= 0, (
        required_acks, own_last_lsn, epoch_start_lsn)
    if required_acks == 0:
        committed = own_last_lsn
    else:
        acked = sorted(acked_lsns, reverse=True)
        if len(acked) < required_acks:
            return 0
        committed = min(own_last_lsn, acked[required_acks - 1])
    return committed if committed >= epoch_start_lsn else 0


def required_acks_for(replica_count: int) -> int:
    """Replica acks a STRONG write needs before it is acknowledged (flow 5): one as soon
    as the shard has a replica (the write then survives the loss of any single node, I4),
    none without replicas."""
    assert replica_count >= 0, replica_count
    return 1 if replica_count >= 1 else 0
