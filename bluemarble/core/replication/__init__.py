"""Replication and promotion rules of the data plane, as pure functions and state
machines (messages and ticks in, decisions out; no I/O, no clock, no asyncio).

- :mod:`.position`: ``LogPosition`` (epoch, lsn), compared like Raft's (term, index).
- :mod:`.replica`: what a replica does with a batch or a snapshot (fencing, log matching).
- :mod:`.primary`: where a primary resumes shipping, and what is committed.
- :mod:`.promotion`: the leader's fence-then-promote choice and the new primary's catch-up.

``tests/sim`` drives these rules through seeded schedules of drops, reorders, crashes and
pauses and checks I1 and I4 after every step (``scripts/sim_replication.py``).
"""

from bluemarble.core.replication.position import ZERO, LogPosition
from bluemarble.core.replication.primary import Resume, commit_lsn, required_acks_for, resume_point
from bluemarble.core.replication.promotion import (
    FenceAnswer,
    PromotionDecision,
    catch_up_source,
    choose_primary,
    promotion_epoch,
)
from bluemarble.core.replication.replica import ReplicaDecision, Verdict, check_entries, check_snapshot

__all__ = [
    "ZERO",
    "FenceAnswer",
    "LogPosition",
    "PromotionDecision",
    "ReplicaDecision",
    "Resume",
    "Verdict",
    "catch_up_source",
    "check_entries",
    "check_snapshot",
    "choose_primary",
    "commit_lsn",
    "promotion_epoch",
    "required_acks_for",
    "resume_point",
]
