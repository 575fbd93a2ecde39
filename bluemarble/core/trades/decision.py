"""The decision record's one write rule: create if absent (pure).

Why this module exists: the decision record is the commit point of a cross-shard trade.
Whoever writes first decides, whether the coordinator (COMMITTED or ABORTED) or a
participant's termination (ABORTED-if-absent); everyone else reads what was written. The
etcd driver implements this as one transaction (``create_revision == 0`` then put, else
get) and must return what this function returns.
"""

from __future__ import annotations

from bluemarble.core.trades.model import Decision, Leg, Outcome, Trade


def create_if_absent(existing: Decision | None, proposed: Decision) -> tuple[Decision, bool]:
    """The record after a create-if-absent of ``proposed`` over ``existing`` (the record
    as stored, None if absent), and whether ``proposed`` was written.

    An existing record is returned unchanged, even if ``proposed`` has the same outcome:
    the decision of a trade never changes once written (I3), nor does its reason or
    author. Both must be for the same trade id (assertion).
    """
    if existing is not None:
        assert existing.trade_id == proposed.trade_id, (existing.trade_id, proposed.trade_id)
        return existing, False
    return proposed, True


def outcome_for_leg(outcome: Outcome, terms: Trade | None, leg: Leg | None) -> Outcome:
    """The outcome a participant holding ``leg`` in escrow applies, given the recorded
    ``outcome`` of its trade id and the ``terms`` the record was written for (None: a
    record without terms, written by a participant's termination).

    COMMITTED applies only to a leg of the recorded terms. An escrow of any other leg
    under the same trade id was left by an attempt that reused the id for another trade:
    that attempt never decided anything, so its escrow is released (ABORTED), whatever
    the record says. Committing it would move items and gold nobody agreed to move (I2).
    ABORTED applies to any leg. Without ``leg`` (a caller that did not say what it
    holds) or without ``terms``, the recorded outcome is returned as it is.
    """
    if outcome is Outcome.ABORTED or leg is None or terms is None:
        return outcome
    if leg.same_terms(terms.leg_a()) or leg.same_terms(terms.leg_b()):
        return outcome
    return Outcome.ABORTED
