"""The pure trade rules (bluemarble.core.trades), one behaviour at a time: validation and
its messages, create-if-absent, the participant's prepare/settle/termination and
same-shard trades, and the coordinator state machine."""

from __future__ import annotations

import dataclasses

import pytest

from bluemarble.core.errors import InvalidArgument
from bluemarble.core.limits import MAX_GOLD, MAX_ITEMS_PER_PLAYER
from bluemarble.core.trades import (
    MAX_TRADE_ITEMS_PER_SIDE,
    REUSED_TRADE_ID,
    SHARD_UNAVAILABLE,
    Abandon,
    AbortCause,
    Coordinator,
    Decision,
    Holdings,
    Known,
    Leg,
    Offer,
    Outcome,
    Phase,
    PrepareReply,
    PrepareVerdict,
    ProposeDecision,
    Reply,
    Retain,
    SendPrepare,
    SendSettle,
    SettleVerdict,
    Side,
    Trade,
    TradeState,
    create_if_absent,
    decide_local_trade,
    decide_prepare,
    decide_settle,
    outcome_for_leg,
    propose,
    termination_decision,
    termination_due,
    validate_trade,
)

COMMITTED, ABORTED = Outcome.COMMITTED, Outcome.ABORTED
SWORD = Trade("t1", "p1", "p2", Offer(("sword-7",), 0), Offer(("shield-2",), 100))


def holdings(*items: str, gold: int = 0, escrowed: tuple[str, ...] = (), escrowed_gold: int = 0) -> Holdings:
    return Holdings(frozenset(items), gold, frozenset(escrowed), escrowed_gold)


def with_trade(**changes: object) -> Trade:
    return dataclasses.replace(SWORD, **changes)  # type: ignore[arg-type]


# -- model and validation -----------------------------------------------------------------


def test_legs_are_each_players_view() -> None:
    assert SWORD.leg_a() == Leg("t1", "p1", Offer(("sword-7",), 0), Offer(("shield-2",), 100), "p2")
    assert SWORD.leg_b() == Leg("t1", "p2", Offer(("shield-2",), 100), Offer(("sword-7",), 0), "p1")
    assert Offer((), 0).empty and not Offer((), 1).empty and not Offer(("x",), 0).empty


def test_a_valid_trade_passes_including_a_one_sided_gift() -> None:
    validate_trade(SWORD)
    validate_trade(with_trade(b_gives=Offer((), 0)))
    validate_trade(with_trade(a_gives=Offer(tuple(f"i{k}" for k in range(64)), MAX_GOLD)))


@pytest.mark.parametrize(("changes", "message"), [
    ({"player_b": "p1"}, "player_a and player_b are both 'p1'"),
    ({"a_gives": Offer(("x", "x"), 0)}, "a_gives.item_ids lists item 'x' twice"),
    ({"b_gives": Offer(("sword-7",), 0)}, "item 'sword-7' is listed on both sides"),
    ({"a_gives": Offer((), -1)}, "a_gives.gold is -1"),
    ({"b_gives": Offer((), MAX_GOLD + 1)}, f"b_gives.gold is {MAX_GOLD + 1}"),
    ({"a_gives": Offer((), 0), "b_gives": Offer((), 0)}, "the trade is empty"),
    ({"a_gives": Offer(tuple(f"i{k}" for k in range(65)), 0)},
     "a_gives.item_ids lists 65 items; a side may give at most 64"),
    ({"trade_id": ""}, "trade_id is empty"),
    ({"trade_id": "t" * 129}, "trade_id is 129 bytes long"),
    ({"player_a": ""}, "player_a is empty"),
    ({"player_b": "p" * 200}, "player_b is 200 bytes long"),
    ({"a_gives": Offer(("",), 0)}, "a_gives.item_ids[0] is empty"),
    ({"b_gives": Offer(("i" * 129,), 0)}, "b_gives.item_ids[0] is 129 bytes long"),
])
def test_invalid_trades_name_the_problem(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_trade(with_trade(**changes))
    assert message in str(caught.value)
    assert len(str(caught.value)) < 200
    assert MAX_TRADE_ITEMS_PER_SIDE == 64


def test_huge_input_is_not_echoed() -> None:
    huge = "x" * 1_000_000
    with pytest.raises(InvalidArgument) as caught:
        validate_trade(with_trade(a_gives=Offer((huge, huge), 0)))
    assert len(str(caught.value)) < 300


# -- the decision record ------------------------------------------------------------------


def test_create_if_absent_writes_once_and_the_first_writer_stands() -> None:
    mine = Decision("t1", COMMITTED, "", "coordinator", ("p1", "p2"))
    theirs = Decision("t1", ABORTED, "escrow deadline passed", "participant shard-1", ("p2", "p1"))
    assert create_if_absent(None, mine) == (mine, True)
    assert create_if_absent(theirs, mine) == (theirs, False)
    assert create_if_absent(mine, dataclasses.replace(mine, reason="again")) == (mine, False)


# -- participant: prepare -----------------------------------------------------------------


def test_prepare_escrows_what_is_owned_and_available() -> None:
    leg = SWORD.leg_b()
    assert decide_prepare(leg, holdings("shield-2", gold=100), None).verdict is PrepareVerdict.ESCROW
    assert decide_prepare(leg, holdings("shield-2", "axe", gold=150, escrowed=("axe",), escrowed_gold=50),
                          None).verdict is PrepareVerdict.ESCROW


@pytest.mark.parametrize(("state", "reason", "pending"), [
    (holdings(gold=100), "player p2 does not own item shield-2", False),
    # Not yet: another trade brings it, not settled (a chain A->B->C sent at once): pending.
    (dataclasses.replace(holdings(gold=100), arriving_items=frozenset({"shield-2"})),
     "player p2 does not own item shield-2 yet: a trade or grant bringing it has not settled", True),
    (holdings("shield-2", gold=100, escrowed=("shield-2",)), "item shield-2 is held by another trade", True),
    (holdings("shield-2", gold=40), "player p2 has 40 gold available, the trade needs 100", False),
    # Enough gold, but another trade holds some of it: pending (it may go once that one settles).
    (holdings("shield-2", gold=130, escrowed_gold=60), "player p2 has 70 gold available, the trade needs 100", True),
    (holdings("shield-2", gold=90, escrowed_gold=60), "player p2 has 30 gold available, the trade needs 100", False),
    (Holdings(frozenset(), 100, known=False), "player p2 is unknown on its shard", False),
])
def test_prepare_refuses_naming_the_item_or_the_amount(state: Holdings, reason: str, pending: bool) -> None:
    """A refusal says whether other trades not settled yet are its cause (pending) or the
    terms themselves are."""
    decision = decide_prepare(SWORD.leg_b(), state, None)
    assert (decision.verdict, decision.pending) == (PrepareVerdict.REFUSED, pending)
    assert decision.reason.startswith(reason)


def test_prepare_refuses_to_receive_an_item_the_shard_still_stores() -> None:
    # p2's shard applied the commit of an earlier trade that gave p2 "sword-7"... but p1's
    # shard still stores it (escrowed) until its side applies: it cannot come back yet.
    leg = SWORD.leg_b()  # p2 receives sword-7
    own = decide_prepare(leg, holdings("shield-2", "sword-7", gold=100, escrowed=("sword-7",)), None)
    assert (own.verdict, own.reason, own.pending) == (
        PrepareVerdict.REFUSED, "player p2 already holds item sword-7; an item is held once "
        "(if a trade is moving it away, retry once that trade settles)", True)
    kept = decide_prepare(leg, holdings("shield-2", "sword-7", gold=100), None)  # not on its way out
    assert (kept.verdict, kept.pending) == (PrepareVerdict.REFUSED, False)
    other = Holdings(frozenset({"shield-2"}), 100, held_by_others=frozenset({"sword-7"}))
    refused = decide_prepare(leg, other, None)
    assert (refused.verdict, refused.reason, refused.pending) == (
        PrepareVerdict.REFUSED, "item sword-7 is still stored for another player; a trade moving it away has not "
        "settled yet", True)
    local = decide_local_trade(SWORD, holdings("sword-7"), holdings("shield-2", "sword-7", gold=100), None)
    assert local.outcome is ABORTED and "already holds item sword-7" in local.reason


def test_prepare_refuses_gold_beyond_the_maximum_a_player_may_hold() -> None:
    leg = SWORD.leg_a()  # p1 receives 100 gold
    decision = decide_prepare(leg, holdings("sword-7", gold=MAX_GOLD - 50), None)
    assert decision.verdict is PrepareVerdict.REFUSED and "more than" in decision.reason and not decision.pending
    incoming = Holdings(frozenset({"sword-7"}), MAX_GOLD - 150, incoming_gold=100)  # fits without the other trade
    decision = decide_prepare(leg, incoming, None)
    assert decision.verdict is PrepareVerdict.REFUSED and "pending trades arrives" in decision.reason
    assert decision.pending


def test_prepare_is_idempotent_and_answers_applied_outcomes() -> None:
    leg = SWORD.leg_a()
    nothing = holdings()  # holdings no longer matter once the trade id is known
    reordered = dataclasses.replace(leg, gives=Offer(("sword-7",), 0))
    assert decide_prepare(reordered, nothing, Known(TradeState.PREPARED, leg)).verdict is PrepareVerdict.PREPARED
    for state, outcome in ((TradeState.COMMITTED, COMMITTED), (TradeState.ABORTED, ABORTED)):
        decision = decide_prepare(leg, nothing, Known(state, leg, "why"))
        assert (decision.verdict, decision.outcome, decision.reason) == (PrepareVerdict.DECIDED, outcome, "why")
    recorded_only = decide_prepare(leg, nothing, Known(TradeState.ABORTED, None, "late"))
    assert (recorded_only.verdict, recorded_only.outcome) == (PrepareVerdict.DECIDED, ABORTED)


def test_prepare_with_other_terms_under_a_known_trade_id_is_a_conflict() -> None:
    leg = SWORD.leg_a()
    other = dataclasses.replace(leg, gives=Offer(("sword-7",), 5))
    for state in TradeState:
        decision = decide_prepare(other, holdings("sword-7", gold=5), Known(state, leg))
        assert (decision.verdict, decision.reason) == (PrepareVerdict.CONFLICT, REUSED_TRADE_ID)


def test_multiset_order_of_items_does_not_change_terms() -> None:
    leg = Leg("t", "p", Offer(("a", "b"), 1), Offer((), 0), "q")
    assert leg.same_terms(dataclasses.replace(leg, gives=Offer(("b", "a"), 1)))
    assert not leg.same_terms(dataclasses.replace(leg, counterpart="r"))


# -- participant: settle and termination --------------------------------------------------


@pytest.mark.parametrize(("state", "outcome", "verdict"), [
    (None, ABORTED, SettleVerdict.RECORD_ONLY),
    (None, COMMITTED, SettleVerdict.MISSING_ESCROW),
    (TradeState.PREPARED, COMMITTED, SettleVerdict.APPLY_COMMIT),
    (TradeState.PREPARED, ABORTED, SettleVerdict.APPLY_ABORT),
    (TradeState.COMMITTED, COMMITTED, SettleVerdict.NOOP),
    (TradeState.ABORTED, ABORTED, SettleVerdict.NOOP),
    (TradeState.COMMITTED, ABORTED, SettleVerdict.CONFLICT),
    (TradeState.ABORTED, COMMITTED, SettleVerdict.CONFLICT),
])
def test_settle_table(state: TradeState | None, outcome: Outcome, verdict: SettleVerdict) -> None:
    known = None if state is None else Known(state, SWORD.leg_a())
    assert decide_settle(known, outcome) is verdict


def test_settle_over_a_recorded_abort_without_escrow() -> None:
    assert decide_settle(Known(TradeState.ABORTED, None), ABORTED) is SettleVerdict.NOOP
    assert decide_settle(Known(TradeState.ABORTED, None), COMMITTED) is SettleVerdict.CONFLICT


def test_termination_is_due_for_a_prepared_escrow_at_its_deadline() -> None:
    prepared = Known(TradeState.PREPARED, SWORD.leg_a())
    assert not termination_due(prepared, 5000, 4999)
    assert termination_due(prepared, 5000, 5000)
    assert termination_due(prepared, 5000, 9000)
    assert not termination_due(Known(TradeState.COMMITTED, SWORD.leg_a()), 5000, 9000)
    assert not termination_due(Known(TradeState.ABORTED, None), 0, 9000)


def test_termination_recovers_a_commit_the_other_side_applied_and_aborts_otherwise() -> None:
    mine = SWORD.leg_a()
    who = "participant shard-1"

    def decide(counterpart: Known | None) -> Decision:
        return termination_decision(mine, counterpart, decided_by=who, why="aborted: no decision")

    recovered = decide(Known(TradeState.COMMITTED, SWORD.leg_b()))
    assert (recovered.outcome, recovered.decided_by, recovered.players) == (COMMITTED, who, ("p1", "p2"))
    assert "the decision record was missing" in recovered.reason
    reordered = dataclasses.replace(SWORD.leg_b(), gives=Offer(("shield-2",), 100))
    assert decide(Known(TradeState.COMMITTED, reordered)).outcome is COMMITTED
    for counterpart in (
        None,
        Known(TradeState.PREPARED, SWORD.leg_b()),
        Known(TradeState.ABORTED, SWORD.leg_b()),
        Known(TradeState.ABORTED, None),
        Known(TradeState.COMMITTED, None),  # an outcome recorded without terms
        Known(TradeState.COMMITTED, dataclasses.replace(SWORD.leg_b(), gives=Offer(("shield-2",), 99))),
        Known(TradeState.COMMITTED, SWORD.leg_a()),  # the asker's own leg, not the other side's
    ):
        aborted = decide(counterpart)
        assert (aborted.outcome, aborted.reason, aborted.players) == (ABORTED, "aborted: no decision", ("p1", "p2"))
        assert aborted.cause is AbortCause.UNAVAILABLE  # the coordinator did not decide in time
    assert recovered.cause is AbortCause.UNKNOWN


def test_a_leg_knows_the_whole_trade_and_either_order_is_the_same_exchange() -> None:
    assert SWORD.leg_a().counterpart_leg() == SWORD.leg_b()
    assert SWORD.leg_b().trade().same_exchange(SWORD) and SWORD.same_exchange(SWORD.leg_b().trade())
    assert SWORD.leg_a().trade() == SWORD
    assert not SWORD.same_exchange(with_trade(b_gives=Offer(("shield-2",), 101)))
    assert not SWORD.same_exchange(with_trade(trade_id="t2"))


# -- participant: same-shard trades -------------------------------------------------------


def test_local_trade_commits_when_both_legs_can_be_given() -> None:
    decision = decide_local_trade(SWORD, holdings("sword-7"), holdings("shield-2", gold=100), None)
    assert (decision.outcome, decision.reason) == (COMMITTED, "")


def test_local_trade_refusals_name_the_first_problem() -> None:
    a_missing = decide_local_trade(SWORD, holdings(), holdings(gold=0), None)
    assert (a_missing.outcome, a_missing.reason) == (ABORTED, "player p1 does not own item sword-7")
    b_poor = decide_local_trade(SWORD, holdings("sword-7"), holdings("shield-2", gold=99), None)
    assert b_poor.reason == "player p2 has 99 gold available, the trade needs 100"
    escrowed = decide_local_trade(SWORD, holdings("sword-7", escrowed=("sword-7",)), holdings("shield-2", gold=100),
                                  None)
    assert (escrowed.reason, escrowed.pending) == ("item sword-7 is held by another trade", True)
    assert not a_missing.pending and not b_poor.pending


def test_local_trade_retry_returns_the_recorded_answer() -> None:
    decision = decide_local_trade(SWORD, holdings(), holdings(), (COMMITTED, ""))
    assert (decision.outcome, decision.reason) == (COMMITTED, "")


# -- coordinator --------------------------------------------------------------------------

P, R = PrepareReply.prepared(), PrepareReply.refused("player p2 does not own item shield-2")


@pytest.mark.parametrize(("a", "b", "outcome", "reason", "cause"), [
    (P, P, COMMITTED, "", AbortCause.UNKNOWN),
    (PrepareReply.decided(COMMITTED), P, COMMITTED, "", AbortCause.UNKNOWN),
    (PrepareReply.decided(COMMITTED), PrepareReply.decided(COMMITTED), COMMITTED, "", AbortCause.UNKNOWN),
    (P, R, ABORTED, "player p2 does not own item shield-2", AbortCause.REFUSED),
    (PrepareReply.refused("first"), PrepareReply.refused("second"), ABORTED, "first", AbortCause.REFUSED),
    (P, None, ABORTED, f"{SHARD_UNAVAILABLE} (side B: no answer to prepare)", AbortCause.UNAVAILABLE),
    (PrepareReply.unavailable("connection refused"), P, ABORTED, f"{SHARD_UNAVAILABLE} (side A: connection refused)",
     AbortCause.UNAVAILABLE),
    # A refusal says more than an unavailable side (the same terms would fail again).
    (PrepareReply.unavailable("connection refused"), R, ABORTED, "player p2 does not own item shield-2",
     AbortCause.REFUSED),
    # Held by another trade not settled yet: contended; a refusal of the terms says more.
    (PrepareReply.refused("item sword-7 is held by another trade", pending=True), P, ABORTED,
     "item sword-7 is held by another trade", AbortCause.CONTENDED),
    (PrepareReply.refused("item sword-7 is held by another trade", pending=True), R, ABORTED,
     "player p2 does not own item shield-2", AbortCause.REFUSED),
    (PrepareReply.decided(ABORTED, "earlier"), P, ABORTED, "earlier", AbortCause.UNKNOWN),
    # A side that applied COMMITTED proves the decision, whatever the other answers.
    (None, PrepareReply.decided(COMMITTED), COMMITTED, "", AbortCause.UNKNOWN),
    (PrepareReply.decided(COMMITTED), PrepareReply.unavailable("connection refused"), COMMITTED, "",
     AbortCause.UNKNOWN),
    # An escrow from an earlier attempt beside a refusal: the refusing side never prepared.
    (PrepareReply.prepared(earlier=True), R, ABORTED, "player p2 does not own item shield-2", AbortCause.REFUSED),
])
def test_propose(
    a: PrepareReply | None, b: PrepareReply | None, outcome: Outcome, reason: str, cause: AbortCause
) -> None:
    decision = propose(a, b, trade_id="t1", decided_by="coordinator c1")
    assert decision is not None
    assert (decision.trade_id, decision.outcome, decision.reason, decision.decided_by, decision.cause) == (
        "t1", outcome, reason, "coordinator c1", cause)


@pytest.mark.parametrize(("a", "b"), [
    (None, None),
    (PrepareReply.unavailable("connection refused"), None),
    (PrepareReply.prepared(earlier=True), None),
    (PrepareReply.unavailable("not the primary"), PrepareReply.prepared(earlier=True)),
])
def test_no_proposal_without_evidence_that_the_trade_was_never_committed(
    a: PrepareReply | None, b: PrepareReply | None
) -> None:
    """A silent side beside another silent one, or beside an escrow of an earlier attempt,
    may have applied a COMMITTED whose record was lost: ABORTED could split the trade."""
    assert propose(a, b, trade_id="t1") is None


def test_an_abandoned_attempt_ends_without_a_proposal_and_names_the_silent_sides() -> None:
    c = Coordinator(SWORD)
    c.start()
    assert c.on_prepare_reply(Side.A, PrepareReply.unavailable("no primary")) == []  # B may still prove it
    [abandon] = c.on_prepare_reply(Side.B, PrepareReply.prepared(earlier=True))
    assert isinstance(abandon, Abandon) and "side A: no primary" in abandon.reason
    assert c.phase is Phase.DONE and c.proposal is None and c.on_prepare_timeout() == []
    # The same silence beside an escrow made just now: ABORTED at once.
    c = Coordinator(SWORD)
    c.start()
    c.on_prepare_reply(Side.A, PrepareReply.unavailable("no primary"))
    [proposal] = c.on_prepare_reply(Side.B, P)
    assert isinstance(proposal, ProposeDecision) and proposal.decision.outcome is ABORTED


def test_coordinator_happy_path() -> None:
    c = Coordinator(SWORD, "coordinator c1")
    assert c.start() == [SendPrepare(Side.A, SWORD.leg_a()), SendPrepare(Side.B, SWORD.leg_b())]
    assert c.start() == []
    assert c.on_prepare_reply(Side.B, P) == []
    [proposal] = c.on_prepare_reply(Side.A, P)
    assert isinstance(proposal, ProposeDecision)
    assert proposal.decision == Decision("t1", COMMITTED, "", "coordinator c1", ("p1", "p2"))
    assert c.answer is None
    assert c.on_decision(proposal.decision) == [SendSettle(Side.A, COMMITTED), SendSettle(Side.B, COMMITTED)]
    assert c.answer == proposal.decision
    assert c.on_settle_ack(Side.A) == []
    assert c.on_settle_ack(Side.A) == []
    assert c.on_settle_ack(Side.B) == [Reply(proposal.decision), Retain("t1")]
    assert c.phase is Phase.DONE


def test_coordinator_proposes_at_once_when_a_side_already_committed() -> None:
    c = Coordinator(SWORD)
    c.start()
    [proposal] = c.on_prepare_reply(Side.B, PrepareReply.decided(COMMITTED))
    assert isinstance(proposal, ProposeDecision) and proposal.decision.outcome is COMMITTED
    assert c.on_prepare_reply(Side.A, R) == [] and c.on_prepare_timeout() == []


def test_coordinator_adopts_the_recorded_decision_not_its_proposal() -> None:
    c = Coordinator(SWORD)
    c.start()
    c.on_prepare_reply(Side.A, P)
    c.on_prepare_reply(Side.B, P)
    recorded = Decision("t1", ABORTED, "escrow deadline passed", "participant shard-3", ("p2", "p1"))
    assert c.on_decision(recorded) == [SendSettle(Side.A, ABORTED), SendSettle(Side.B, ABORTED)]
    assert c.on_decision(recorded) == []
    assert c.on_settle_failed(Side.A) == []
    assert c.on_settle_ack(Side.B) == [Reply(recorded)]  # a failed side: no retention yet
    assert c.answer == recorded


def test_coordinator_aborts_on_the_first_refusal_and_ignores_late_answers() -> None:
    c = Coordinator(SWORD)
    c.start()
    [proposal] = c.on_prepare_reply(Side.B, R)
    assert isinstance(proposal, ProposeDecision) and proposal.decision.outcome is ABORTED
    assert proposal.decision.reason == R.reason
    assert c.on_prepare_reply(Side.A, P) == []
    assert c.on_prepare_timeout() == []


def test_coordinator_timeout_counts_silence_as_unavailable() -> None:
    c = Coordinator(SWORD)
    assert c.on_prepare_timeout() == []  # not started
    c.start()
    c.on_prepare_reply(Side.A, P)
    [proposal] = c.on_prepare_timeout()
    assert isinstance(proposal, ProposeDecision)
    assert (proposal.decision.outcome, proposal.decision.reason) == (
        ABORTED, f"{SHARD_UNAVAILABLE} (side B: no answer to prepare)")


def test_coordinator_ignores_settles_before_the_decision() -> None:
    c = Coordinator(SWORD)
    c.start()
    assert c.on_settle_ack(Side.A) == [] and c.on_settle_failed(Side.B) == []
    assert c.side_of("p2") is Side.B and c.leg(Side.B) == SWORD.leg_b()


# -- a trade id reused for other terms, and gold on its way in ----------------------------


def test_a_leg_outside_the_recorded_terms_is_aborted_whatever_the_record_says() -> None:
    other = Leg("t1", "p3", Offer(("bow-1",), 50), Offer((), 10), "p1")
    assert outcome_for_leg(COMMITTED, SWORD, SWORD.leg_a()) is COMMITTED
    assert outcome_for_leg(COMMITTED, SWORD, SWORD.leg_b()) is COMMITTED
    assert outcome_for_leg(COMMITTED, SWORD, other) is ABORTED
    reordered = dataclasses.replace(SWORD.leg_b(), gives=Offer(("shield-2",), 100))
    assert outcome_for_leg(COMMITTED, SWORD, reordered) is COMMITTED
    assert outcome_for_leg(ABORTED, SWORD, SWORD.leg_a()) is ABORTED
    assert outcome_for_leg(COMMITTED, None, other) is COMMITTED  # no terms to compare with
    assert outcome_for_leg(COMMITTED, SWORD, None) is COMMITTED  # the caller did not say


def test_gold_pending_trades_would_bring_counts_against_the_cap() -> None:
    leg = Leg("t9", "p1", Offer((), 0), Offer((), 6), "p2")
    near = Holdings(frozenset(), MAX_GOLD - 10)
    assert decide_prepare(leg, near, None).verdict is PrepareVerdict.ESCROW
    pending = dataclasses.replace(near, incoming_gold=6)
    refused = decide_prepare(leg, pending, None)
    assert refused.verdict is PrepareVerdict.REFUSED
    assert "would hold more than" in refused.reason and "6 gold of its pending trades" in refused.reason


def test_a_player_the_shard_never_saw_takes_part_in_no_trade() -> None:
    stranger = Holdings(frozenset(), 0, known=False)
    refused = decide_prepare(Leg("t9", "nobody", Offer((), 0), Offer((), 1), "p1"), stranger, None)
    assert refused.verdict is PrepareVerdict.REFUSED and "player nobody is unknown" in refused.reason


def test_items_on_their_way_in_count_against_the_cap_on_items() -> None:
    leg = Leg("t9", "p1", Offer((), 1), Offer(("gem",), 0), "p2")
    almost = Holdings(frozenset(f"i{n}" for n in range(MAX_ITEMS_PER_PLAYER - 1)), 10)
    assert decide_prepare(leg, almost, None).verdict is PrepareVerdict.ESCROW
    refused = decide_prepare(leg, dataclasses.replace(almost, incoming_items=1), None)
    assert refused.verdict is PrepareVerdict.REFUSED and f"more than {MAX_ITEMS_PER_PLAYER} items" in refused.reason


def test_a_player_at_the_cap_on_items_may_swap_one_item_for_one() -> None:
    full = Holdings(frozenset(f"i{n}" for n in range(MAX_ITEMS_PER_PLAYER)), 10)
    swap = Leg("t9", "p1", Offer(("i0",), 0), Offer(("gem",), 0), "p2")
    assert decide_prepare(swap, full, None).verdict is PrepareVerdict.ESCROW
    one_for_two = Leg("t9", "p1", Offer(("i0",), 0), Offer(("gem", "ring"), 0), "p2")
    refused = decide_prepare(one_for_two, full, None)
    assert refused.verdict is PrepareVerdict.REFUSED and f"more than {MAX_ITEMS_PER_PLAYER} items" in refused.reason
    # Another pending trade's items count whole: it may commit while this one aborts.
    assert decide_prepare(swap, dataclasses.replace(full, incoming_items=1), None).verdict is PrepareVerdict.REFUSED
