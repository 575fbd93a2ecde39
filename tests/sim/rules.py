"""The rules the simulation drives, as one swappable bundle, and the planted bugs.

Why this module exists: the simulation must run the real rules of
:mod:`bluemarble.core.replication` (that is what it tests), and ``--break`` must show that
the checker catches a wrong rule, without editing the rules on disk. So the simulation
calls every rule through a :class:`SimRules` value; :data:`REAL_RULES` holds the real
functions and :func:`rules_for` returns a copy with one rule replaced by a deliberately
wrong variant. The wrong variants wrap the real functions where they can, so a break is
exactly the one mistake its name says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from bluemarble.core.ids import NodeId
from bluemarble.core.replication import (
    ZERO,
    FenceAnswer,
    LogPosition,
    PromotionDecision,
    ReplicaDecision,
    Resume,
    catch_up_source,
    check_entries,
    check_snapshot,
    choose_primary,
    commit_lsn,
    required_acks_for,
    resume_point,
)

CheckEntries = Callable[..., ReplicaDecision]
CheckSnapshot = Callable[..., ReplicaDecision]
ResumePoint = Callable[..., Resume]
CommitLsn = Callable[..., int]
ChoosePrimary = Callable[..., PromotionDecision]
CatchUpSource = Callable[[LogPosition, Mapping[NodeId, LogPosition]], NodeId | None]


@dataclass(frozen=True)
class SimRules:
    """Every decision the simulated actors delegate to the core, plus the two protocol
    steps that live in drivers (the leader's fence, the primary's lease self-fence)."""

    check_entries: CheckEntries
    check_snapshot: CheckSnapshot
    resume_point: ResumePoint
    commit_lsn: CommitLsn
    required_acks_for: Callable[[int], int]
    choose_primary: ChoosePrimary
    catch_up_source: CatchUpSource
    fence_before_read: bool = True
    """The leader fences replicas before reading their positions (flow 4)."""
    self_fence: bool = True
    """A primary stops acknowledging writes once its lease may have expired (flow 2)."""
    epoch_start_entry: bool = True
    """A new primary appends an entry of its own epoch before it serves, and commits
    inherited entries only with it (``commit_lsn(epoch_start_lsn=...)``)."""


REAL_RULES = SimRules(
    check_entries=check_entries,
    check_snapshot=check_snapshot,
    resume_point=resume_point,
    commit_lsn=commit_lsn,
    required_acks_for=required_acks_for,
    choose_primary=choose_primary,
    catch_up_source=catch_up_source,
)


# -- planted bugs -------------------------------------------------------------------------


def _by_lsn_only(position: LogPosition) -> LogPosition:
    """A position whose (epoch, lsn) order is the lsn order: the classic mistake."""
    return position if position == ZERO else LogPosition(1, position.lsn)


def _choose_greatest_lsn(
    answers: Mapping[NodeId, FenceAnswer], *, new_epoch: int, must_answer: Collection[NodeId],
    shard_had_data: bool = True,
) -> PromotionDecision:
    relabelled = {n: dataclasses.replace(a, last=_by_lsn_only(a.last)) for n, a in answers.items()}
    return choose_primary(relabelled, new_epoch=new_epoch, must_answer=must_answer, shard_had_data=shard_had_data)


def _catch_up_greatest_lsn(own_last: LogPosition, replicas: Mapping[NodeId, LogPosition]) -> NodeId | None:
    return catch_up_source(_by_lsn_only(own_last), {n: _by_lsn_only(p) for n, p in replicas.items()})


def _entries_ignoring_fence(*, fenced_epoch: int, **kwargs: object) -> ReplicaDecision:
    return check_entries(fenced_epoch=0, **kwargs)  # type: ignore[arg-type]


def _snapshot_ignoring_fence(*, fenced_epoch: int, **kwargs: object) -> ReplicaDecision:
    return check_snapshot(fenced_epoch=0, **kwargs)  # type: ignore[arg-type]


def _snapshot_always(
    *, fenced_epoch: int, last: LogPosition, sender_epoch: int, replaces: LogPosition, snapshot_last: LogPosition,
) -> ReplicaDecision:
    return check_snapshot(
        fenced_epoch=fenced_epoch, last=last, sender_epoch=sender_epoch, replaces=last, snapshot_last=snapshot_last,
    )


def _resume_by_lsn(
    *, replica_last: LogPosition, primary_last: LogPosition, first_retained_lsn: int,
    epoch_at: Callable[[int], int | None],
) -> Resume:
    if ZERO < replica_last and replica_last.lsn <= primary_last.lsn and epoch_at(replica_last.lsn) is not None:
        return Resume(replica_last.lsn + 1, False)
    return resume_point(
        replica_last=replica_last, primary_last=primary_last, first_retained_lsn=first_retained_lsn,
        epoch_at=epoch_at,
    )


def _commit_inherited(*, own_last_lsn: int, acked_lsns: Iterable[int], required_acks: int,
                      epoch_start_lsn: int = 0) -> int:
    return commit_lsn(own_last_lsn=own_last_lsn, acked_lsns=acked_lsns, required_acks=required_acks)


BREAKS: dict[str, tuple[str, SimRules]] = {
    "promote-greatest-lsn": (
        "the leader promotes (and the new primary catches up from) the greatest lsn, not the greatest (epoch, lsn)",
        dataclasses.replace(REAL_RULES, choose_primary=_choose_greatest_lsn, catch_up_source=_catch_up_greatest_lsn),
    ),
    "choose-greatest-lsn": (
        "the leader promotes the greatest lsn, but the new primary catches up by (epoch, lsn) "
        "before it serves (the catch-up repairs the choice: expected to pass)",
        dataclasses.replace(REAL_RULES, choose_primary=_choose_greatest_lsn),
    ),
    "no-fence": (
        "the leader reads replicas' positions without fencing them first",
        dataclasses.replace(REAL_RULES, fence_before_read=False),
    ),
    "accept-stale-epoch": (
        "replicas accept entries and snapshots from any epoch",
        dataclasses.replace(REAL_RULES, check_entries=_entries_ignoring_fence, check_snapshot=_snapshot_ignoring_fence),
    ),
    "ack-without-replica": (
        "a STRONG write is acknowledged after the primary's local commit only",
        dataclasses.replace(REAL_RULES, required_acks_for=lambda replica_count: 0),
    ),
    "commit-inherited": (
        "a new primary writes no epoch-start entry and commits entries it inherited from older epochs "
        "by counting replica acks alone (Raft's figure 8)",
        dataclasses.replace(REAL_RULES, commit_lsn=_commit_inherited, epoch_start_entry=False),
    ),
    "resume-by-lsn": (
        "the primary resumes shipping after the replica's last lsn without comparing epochs",
        dataclasses.replace(REAL_RULES, resume_point=_resume_by_lsn),
    ),
    "install-any-snapshot": (
        "a replica installs any snapshot, even a delayed one older than its log",
        dataclasses.replace(REAL_RULES, check_snapshot=_snapshot_always),
    ),
    "no-self-fence": (
        "a primary keeps acknowledging writes after its lease may have expired "
        "(the fence alone still protects: expected to pass)",
        dataclasses.replace(REAL_RULES, self_fence=False),
    ),
}
"""Planted bugs for ``scripts/sim_replication.py --break NAME``: description and rules."""


def rules_for(break_name: str | None) -> SimRules:
    """The real rules, or the rules with the named bug planted; KeyError for an unknown name."""
    return REAL_RULES if break_name is None else BREAKS[break_name][1]

