"""The pure replication and promotion rules, one behaviour at a time, plus properties
against a reference model of logs (bluemarble.core.replication)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bluemarble.core.ids import NodeId
from bluemarble.core.replication import (
    ZERO,
    FenceAnswer,
    LogPosition,
    Resume,
    Verdict,
    catch_up_source,
    check_entries,
    check_snapshot,
    choose_primary,
    commit_lsn,
    promotion_epoch,
    required_acks_for,
    resume_point,
)

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

P = LogPosition


def log_of(*epochs: int) -> list[LogPosition]:
    """A log whose entry at lsn i+1 has epoch ``epochs[i]``."""
    return [P(e, i + 1) for i, e in enumerate(epochs)]


def epoch_at_of(log: list[LogPosition], first_retained: int = 1):  # type: ignore[no-untyped-def]
    def epoch_at(lsn: int) -> int | None:
        return log[lsn - 1].epoch if first_retained <= lsn <= len(log) else None
    return epoch_at


def n(name: str) -> NodeId:
    return NodeId(name)


def answer(name: str, fenced: int, last: LogPosition, has_data: bool | None = None) -> FenceAnswer:
    return FenceAnswer(n(name), fenced, last, last != ZERO if has_data is None else has_data)


# -- replica: check_entries ---------------------------------------------------------------


class TestCheckEntries:
    def test_appends_everything_after_its_last(self) -> None:
        d = check_entries(fenced_epoch=1, last=P(1, 3), sender_epoch=1, prev=P(1, 3), entries=[P(1, 4), P(1, 5)])
        assert (d.verdict, d.append_from, d.fenced_epoch) == (Verdict.OK, 0, 1)

    def test_overlapping_batch_appends_only_what_follows_last(self) -> None:
        d = check_entries(fenced_epoch=1, last=P(1, 4), sender_epoch=1, prev=P(1, 2),
                          entries=[P(1, 3), P(1, 4), P(1, 5)])
        assert (d.verdict, d.append_from) == (Verdict.OK, 2)

    def test_duplicate_batch_appends_nothing(self) -> None:
        entries = [P(1, 3), P(1, 4)]
        d = check_entries(fenced_epoch=1, last=P(1, 4), sender_epoch=1, prev=P(1, 2), entries=entries)
        assert (d.verdict, d.append_from) == (Verdict.OK, len(entries))

    def test_same_lsn_other_epoch_is_a_mismatch_not_a_duplicate(self) -> None:
        # A deposed primary's unacknowledged (1, 4) is not the new primary's (2, 4).
        d = check_entries(fenced_epoch=1, last=P(1, 4), sender_epoch=2, prev=P(1, 3), entries=[P(2, 4), P(2, 5)])
        assert d.verdict is Verdict.MISMATCH
        assert d.fenced_epoch == 2

    def test_replica_ahead_of_the_batch_is_a_mismatch(self) -> None:
        d = check_entries(fenced_epoch=1, last=P(1, 9), sender_epoch=1, prev=P(1, 2), entries=[P(1, 3)])
        assert d.verdict is Verdict.MISMATCH

    def test_gap_is_a_mismatch(self) -> None:
        d = check_entries(fenced_epoch=1, last=P(1, 2), sender_epoch=1, prev=P(1, 5), entries=[P(1, 6)])
        assert d.verdict is Verdict.MISMATCH

    def test_stale_sender_is_refused_and_the_fence_stays(self) -> None:
        d = check_entries(fenced_epoch=3, last=P(2, 7), sender_epoch=2, prev=P(2, 7), entries=[P(2, 8)])
        assert (d.verdict, d.fenced_epoch, d.append_from) == (Verdict.STALE_EPOCH, 3, 0)

    def test_sender_at_the_fenced_epoch_is_accepted(self) -> None:
        d = check_entries(fenced_epoch=3, last=P(2, 7), sender_epoch=3, prev=P(2, 7), entries=[P(3, 8)])
        assert d.verdict is Verdict.OK

    def test_newer_sender_raises_the_fence(self) -> None:
        d = check_entries(fenced_epoch=1, last=P(1, 7), sender_epoch=4, prev=P(1, 7), entries=[])
        assert (d.verdict, d.append_from, d.fenced_epoch) == (Verdict.OK, 0, 4)

    def test_empty_probe_from_elsewhere_is_a_mismatch(self) -> None:
        d = check_entries(fenced_epoch=1, last=P(1, 3), sender_epoch=2, prev=P(2, 9), entries=[])
        assert (d.verdict, d.fenced_epoch) == (Verdict.MISMATCH, 2)

    def test_empty_replica_takes_the_log_from_the_start(self) -> None:
        d = check_entries(fenced_epoch=0, last=ZERO, sender_epoch=1, prev=ZERO, entries=[P(1, 1)])
        assert (d.verdict, d.append_from, d.fenced_epoch) == (Verdict.OK, 0, 1)

    def test_malformed_batches_change_nothing(self) -> None:
        cases = [
            dict(sender_epoch=0, prev=ZERO, entries=[]),                        # no epoch
            dict(sender_epoch=2, prev=P(1, 3), entries=[P(1, 5)]),              # gap inside
            dict(sender_epoch=2, prev=P(1, 3), entries=[P(2, 4), P(1, 5)]),     # epoch goes down
            dict(sender_epoch=2, prev=P(2, 3), entries=[P(1, 4)]),              # older than prev
            dict(sender_epoch=2, prev=P(1, 3), entries=[P(3, 4)]),              # newer than sender
            dict(sender_epoch=2, prev=P(3, 3), entries=[]),                     # prev newer than sender
        ]
        for case in cases:
            d = check_entries(fenced_epoch=5, last=P(1, 3), **case)  # type: ignore[arg-type]
            assert (d.verdict, d.fenced_epoch, d.append_from) == (Verdict.MALFORMED, 5, 0), case
            assert d.reason


# -- replica: check_snapshot --------------------------------------------------------------


class TestCheckSnapshot:
    def test_installs_over_the_log_it_was_planned_for(self) -> None:
        # A deposed primary with unacknowledged (1, 12) is reset to the new primary's state.
        d = check_snapshot(fenced_epoch=2, last=P(1, 12), sender_epoch=2, replaces=P(1, 12), snapshot_last=P(2, 11))
        assert (d.verdict, d.fenced_epoch) == (Verdict.OK, 2)

    def test_empty_replica_installs_any_current_snapshot(self) -> None:
        d = check_snapshot(fenced_epoch=0, last=ZERO, sender_epoch=3, replaces=P(2, 5), snapshot_last=P(3, 9))
        assert (d.verdict, d.fenced_epoch) == (Verdict.OK, 3)

    def test_delayed_snapshot_never_replaces_a_log_that_moved_on(self) -> None:
        d = check_snapshot(fenced_epoch=2, last=P(2, 20), sender_epoch=2, replaces=P(1, 12), snapshot_last=P(2, 15))
        assert d.verdict is Verdict.MISMATCH

    def test_stale_snapshot_is_refused(self) -> None:
        d = check_snapshot(fenced_epoch=3, last=P(1, 12), sender_epoch=2, replaces=P(1, 12), snapshot_last=P(2, 11))
        assert (d.verdict, d.fenced_epoch) == (Verdict.STALE_EPOCH, 3)

    def test_snapshot_newer_than_its_sender_is_malformed(self) -> None:
        d = check_snapshot(fenced_epoch=1, last=ZERO, sender_epoch=2, replaces=ZERO, snapshot_last=P(3, 1))
        assert (d.verdict, d.fenced_epoch) == (Verdict.MALFORMED, 1)


# -- primary: resume_point, commit_lsn ----------------------------------------------------


class TestResumePoint:
    primary = log_of(1, 1, 1, 2, 2, 3)

    def resume(self, replica_last: LogPosition, first_retained: int = 1) -> Resume:
        return resume_point(replica_last=replica_last, primary_last=self.primary[-1],
                            first_retained_lsn=first_retained, epoch_at=epoch_at_of(self.primary, first_retained))

    def test_prefix_resumes_after_it(self) -> None:
        assert self.resume(P(2, 5)) == Resume(6, False)
        assert self.resume(P(1, 2)) == Resume(3, False)

    def test_up_to_date_replica_resumes_after_the_end(self) -> None:
        assert self.resume(P(3, 6)) == Resume(7, False)

    def test_empty_replica_starts_at_one_unless_truncated(self) -> None:
        assert self.resume(ZERO) == Resume(1, False)
        assert self.resume(ZERO, first_retained=3).snapshot_required

    def test_deposed_primary_with_unacknowledged_entries_needs_a_snapshot(self) -> None:
        assert self.resume(P(1, 4)).snapshot_required       # same lsn, other epoch
        assert self.resume(P(2, 9)).snapshot_required       # beyond the primary's last
        assert self.resume(P(1, 7)).snapshot_required

    def test_truncated_position_needs_a_snapshot(self) -> None:
        assert self.resume(P(1, 2), first_retained=4).snapshot_required
        assert self.resume(P(2, 4), first_retained=4) == Resume(5, False)


class TestCommit:
    def test_one_replica_ack_commits(self) -> None:
        assert commit_lsn(own_last_lsn=10, acked_lsns=[0, 7, 3], required_acks=1) == 7

    def test_two_acks_take_the_second_highest(self) -> None:
        assert commit_lsn(own_last_lsn=10, acked_lsns=[9, 7, 3], required_acks=2) == 7

    def test_capped_by_own_log(self) -> None:
        assert commit_lsn(own_last_lsn=5, acked_lsns=[9], required_acks=1) == 5

    def test_not_enough_replicas_commits_nothing(self) -> None:
        assert commit_lsn(own_last_lsn=5, acked_lsns=[4], required_acks=2) == 0
        assert commit_lsn(own_last_lsn=5, acked_lsns=[], required_acks=1) == 0

    def test_no_required_acks_is_the_local_commit(self) -> None:
        assert commit_lsn(own_last_lsn=5, acked_lsns=[], required_acks=0) == 5

    def test_inherited_entries_commit_only_with_one_of_the_primary_own_epoch(self) -> None:
        # Raft's figure 8: a primary at epoch 3 inherited (1, 3); a deposed primary of epoch 2
        # holds (2, 3). Replicas acking (1, 3) alone must not commit it: the epoch-2 node
        # would win the next promotion. Once the epoch-start entry (3, 4) is acked, it does.
        assert commit_lsn(own_last_lsn=4, acked_lsns=[3, 3], required_acks=1, epoch_start_lsn=4) == 0
        assert commit_lsn(own_last_lsn=4, acked_lsns=[4, 3], required_acks=1, epoch_start_lsn=4) == 4
        assert commit_lsn(own_last_lsn=4, acked_lsns=[], required_acks=0, epoch_start_lsn=4) == 4

    def test_strong_needs_one_replica_when_there_is_one(self) -> None:
        assert [required_acks_for(k) for k in (0, 1, 2, 6)] == [0, 1, 1, 1]


# -- promotion ----------------------------------------------------------------------------


class TestChoosePrimary:
    def test_promotion_epoch_is_the_next_one(self) -> None:
        assert promotion_epoch(0) == 1 and promotion_epoch(7) == 8

    def test_waits_for_every_live_candidate_to_be_fenced(self) -> None:
        answers = {n("a"): answer("a", 3, P(2, 9))}
        d = choose_primary(answers, new_epoch=3, must_answer=[n("a"), n("b")])
        assert d.primary is None and "b" in d.reason
        answers[n("b")] = answer("b", 2, P(2, 10))   # answered, but not yet fenced at 3
        d = choose_primary(answers, new_epoch=3, must_answer=[n("a"), n("b")])
        assert d.primary is None and "b" in d.reason
        answers[n("b")] = answer("b", 3, P(2, 10))
        assert choose_primary(answers, new_epoch=3, must_answer=[n("a"), n("b")]).primary == n("b")

    def test_greatest_epoch_then_lsn_not_greatest_lsn(self) -> None:
        # "a" is the deposed primary with more, older entries; "b" has the acknowledged (3, 12).
        answers = {n("a"): answer("a", 4, P(2, 15)), n("b"): answer("b", 4, P(3, 12))}
        assert choose_primary(answers, new_epoch=4, must_answer=[n("a"), n("b")]).primary == n("b")

    def test_ties_go_to_the_smallest_node_id(self) -> None:
        answers = {n(x): answer(x, 2, P(1, 5)) for x in ("c", "b", "d")}
        assert choose_primary(answers, new_epoch=2, must_answer=list(map(n, "bcd"))).primary == n("b")

    def test_unfenced_extra_answer_is_no_candidate(self) -> None:
        answers = {n("a"): answer("a", 3, P(2, 5)), n("z"): answer("z", 2, P(2, 9))}
        assert choose_primary(answers, new_epoch=3, must_answer=[n("a")]).primary == n("a")

    def test_empty_log_never_replaces_lost_data(self) -> None:
        answers = {n("a"): answer("a", 2, ZERO), n("b"): answer("b", 2, ZERO)}
        d = choose_primary(answers, new_epoch=2, must_answer=[n("a"), n("b")])
        assert d.primary is None and "lost data" in d.reason
        fresh = choose_primary(answers, new_epoch=2, must_answer=[n("a"), n("b")], shard_had_data=False)
        assert fresh.primary == n("a")

    def test_candidate_with_data_beats_empty_ones(self) -> None:
        answers = {n("a"): answer("a", 2, ZERO), n("b"): answer("b", 2, P(1, 1))}
        assert choose_primary(answers, new_epoch=2, must_answer=[n("a"), n("b")],
                              shard_had_data=False).primary == n("b")

    def test_nobody_live_promotes_nobody(self) -> None:
        assert choose_primary({}, new_epoch=1, must_answer=[]).primary is None


class TestCatchUpSource:
    def test_greatest_replica_ahead_of_the_primary(self) -> None:
        replicas = {n("b"): P(2, 9), n("c"): P(3, 4), n("d"): P(3, 4)}
        assert catch_up_source(P(2, 12), replicas) == n("c")

    def test_none_when_the_primary_is_ahead_or_level(self) -> None:
        assert catch_up_source(P(3, 4), {n("b"): P(3, 4), n("c"): P(2, 9)}) is None
        assert catch_up_source(P(1, 1), {}) is None


# -- properties against a reference model ---------------------------------------------------


@st.composite
def primary_logs(draw: st.DrawFn, min_size: int = 0) -> list[LogPosition]:
    """A primary's log: non-decreasing epochs >= 1."""
    steps = draw(st.lists(st.integers(0, 2), min_size=min_size, max_size=25))
    epochs, epoch = [], 1
    for s in steps:
        epoch += s
        epochs.append(epoch)
    return log_of(*epochs)


@st.composite
def diverged(draw: st.DrawFn, primary: list[LogPosition]) -> list[LogPosition]:
    """A replica log: a prefix of ``primary``, then perhaps entries of an epoch the
    primary's log does not hold at those lsns (a deposed primary's unacknowledged tail)."""
    k = draw(st.integers(0, len(primary)))
    log = list(primary[:k])
    extra = draw(st.integers(0, 5))
    if extra:
        base = log[-1].epoch if log else 1
        # Log matching holds in any real cluster: one primary writes per epoch, so the
        # tail's epoch is one the primary's log does not carry after the shared prefix.
        taken = {p.epoch for p in primary[k:]}
        candidates = [e for e in range(base, base + 4) if e not in taken]
        if candidates:
            epoch = draw(st.sampled_from(candidates))
            log += [P(epoch, k + i + 1) for i in range(extra)]
    return log


def is_prefix(a: list[LogPosition], b: list[LogPosition]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


@PROPERTY_SETTINGS
@given(data=st.data())
def test_accepted_batches_only_ever_extend_a_prefix_of_the_primary(data: st.DataObject) -> None:
    """Whatever batch of the primary's log arrives (dupes, overlaps, gaps, late), an OK
    leaves the replica's log a prefix of the primary's and never drops an entry; a replica
    whose log is a prefix gets OK exactly when the batch starts at or before its end."""
    primary = data.draw(primary_logs(min_size=1))
    replica = data.draw(diverged(primary))
    a = data.draw(st.integers(0, len(primary)))
    b = data.draw(st.integers(a, len(primary)))
    prev = primary[a - 1] if a else ZERO
    sender_epoch = primary[-1].epoch
    d = check_entries(fenced_epoch=data.draw(st.integers(0, sender_epoch)), last=replica[-1] if replica else ZERO,
                      sender_epoch=sender_epoch, prev=prev, entries=primary[a:b])
    assert d.verdict in (Verdict.OK, Verdict.MISMATCH)
    assert d.fenced_epoch >= sender_epoch
    if d.verdict is Verdict.OK:
        after = replica + primary[a:b][d.append_from:]
        assert is_prefix(replica, after)
        assert is_prefix(after, primary)
    if is_prefix(replica, primary):
        assert (d.verdict is Verdict.OK) == (a <= len(replica) <= b)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_stale_senders_never_touch_a_fenced_replica(data: st.DataObject) -> None:
    primary = data.draw(primary_logs(min_size=1))
    sender_epoch = primary[-1].epoch
    fenced = data.draw(st.integers(sender_epoch + 1, sender_epoch + 5))
    d = check_entries(fenced_epoch=fenced, last=primary[0], sender_epoch=sender_epoch, prev=primary[0],
                      entries=primary[1:])
    assert (d.verdict, d.fenced_epoch, d.append_from) == (Verdict.STALE_EPOCH, fenced, 0)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_resume_point_resumes_only_from_a_shared_entry(data: st.DataObject) -> None:
    """Shipping resumes at lsn L+1 only if the replica's log is exactly the primary's up to
    L (then the next batch is accepted); otherwise a snapshot."""
    primary = data.draw(primary_logs())
    replica = data.draw(diverged(primary))
    first_retained = data.draw(st.integers(1, max(1, len(primary))))
    replica_last = replica[-1] if replica else ZERO
    r = resume_point(replica_last=replica_last, primary_last=primary[-1] if primary else ZERO,
                     first_retained_lsn=first_retained, epoch_at=epoch_at_of(primary, first_retained))
    if r.snapshot_required:
        return
    assert r.send_from_lsn == replica_last.lsn + 1
    assert is_prefix(replica, primary)
    start = r.send_from_lsn - 1
    d = check_entries(fenced_epoch=0, last=replica_last, sender_epoch=max(1, primary[-1].epoch if primary else 1),
                      prev=primary[start - 1] if start else ZERO, entries=primary[start:])
    assert (d.verdict, d.append_from) == (Verdict.OK, 0)


@PROPERTY_SETTINGS
@given(own=st.integers(0, 50), acked=st.lists(st.integers(0, 60), max_size=6), required=st.integers(0, 4),
       start=st.integers(0, 50))
def test_commit_lsn_is_the_greatest_lsn_enough_replicas_hold(own: int, acked: list[int], required: int,
                                                             start: int) -> None:
    gated = commit_lsn(own_last_lsn=own, acked_lsns=acked, required_acks=required, epoch_start_lsn=start)
    c = commit_lsn(own_last_lsn=own, acked_lsns=acked, required_acks=required)
    assert gated == (c if c >= start else 0)
    assert 0 <= c <= own
    if required == 0:
        assert c == own
        return
    if c > 0:
        assert sum(1 for x in acked if x >= c) >= required
    # Maximal: one more is not held by enough replicas (or is beyond our own log).
    assert c == own or sum(1 for x in acked if x >= c + 1) < required


@PROPERTY_SETTINGS
@given(
    lasts=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 20)), min_size=1, max_size=5),
    order=st.randoms(use_true_random=False),
)
def test_choose_primary_takes_the_greatest_position_whatever_the_order(lasts: list[tuple[int, int]],
                                                                       order: object) -> None:
    answers = [answer(f"n{i}", 5, P(e, lsn)) for i, (e, lsn) in enumerate(lasts)]
    shuffled = list(answers)
    order.shuffle(shuffled)  # type: ignore[attr-defined]
    first = choose_primary({a.node_id: a for a in answers}, new_epoch=5, must_answer=[a.node_id for a in answers])
    second = choose_primary({a.node_id: a for a in shuffled}, new_epoch=5, must_answer=[a.node_id for a in shuffled])
    assert first.primary == second.primary
    chosen = next(a for a in answers if a.node_id == first.primary)
    assert all(chosen.last >= a.last for a in answers)
