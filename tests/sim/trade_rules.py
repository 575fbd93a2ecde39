"""The trade rules the simulation drives, as one swappable bundle, and the planted bugs.

Why this module exists: the trade simulation must run the real rules of
:mod:`bluemarble.core.trades` (that is what it tests), and ``--break`` must show that the
checker catches a wrong rule without editing the rules on disk. The simulation calls every
rule through a :class:`TradeRules` value; :data:`REAL_RULES` holds the real ones and
:func:`rules_for` returns a copy with one rule replaced by a deliberately wrong variant,
wrapping the real function where it can, so a break is exactly the mistake its name says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from bluemarble.core.trades import (
    Coordinator,
    Decision,
    Holdings,
    Known,
    Leg,
    LocalTradeDecision,
    Offer,
    Outcome,
    PrepareDecision,
    PrepareReply,
    SettleVerdict,
    Trade,
    create_if_absent,
    decide_local_trade,
    decide_prepare,
    decide_settle,
    propose,
    termination_decision,
    termination_due,
)


@dataclass(frozen=True)
class TradeRules:
    """Every decision the simulated actors delegate to the core, plus the protocol steps
    that live in drivers (termination reads the record; the coordinator adopts the
    recorded decision)."""

    decide_prepare: Callable[[Leg, Holdings, Known | None], PrepareDecision]
    decide_settle: Callable[[Known | None, Outcome], SettleVerdict]
    termination_due: Callable[[Known, int, int], bool]
    decide_local_trade: Callable[[Trade, Holdings, Holdings, tuple[Outcome, str] | None], LocalTradeDecision]
    create_if_absent: Callable[[Decision | None, Decision], tuple[Decision, bool]]
    termination_decision: Callable[..., Decision]
    coordinator: type[Coordinator] = Coordinator
    resolve_through_record: bool = True
    """A participant past its escrow deadline asks the store (ABORTED-if-absent) and
    applies the record, rather than aborting on its own."""
    ask_counterpart: bool = True
    """Without a record, the termination's proposal depends on what the other side's shard
    applied (:func:`termination_decision`), not ABORTED regardless."""
    adopt_recorded: bool = True
    """The coordinator settles and answers with the record as stored, not its proposal."""


REAL_RULES = TradeRules(
    decide_prepare=decide_prepare,
    decide_settle=decide_settle,
    termination_due=termination_due,
    decide_local_trade=decide_local_trade,
    create_if_absent=create_if_absent,
    termination_decision=termination_decision,
)


# -- planted bugs -------------------------------------------------------------------------


class _OptimisticCoordinator(Coordinator):
    """Proposes COMMITTED when either side voted commit."""

    def _propose(self, a: PrepareReply | None, b: PrepareReply | None) -> Decision | None:
        if (a is not None and a.votes_commit) or (b is not None and b.votes_commit):
            return Decision(self.trade.trade_id, Outcome.COMMITTED, "", self.name, self.trade.players)
        return propose(a, b, trade_id=self.trade.trade_id, decided_by=self.name, players=self.trade.players)


class _AbortingOnSilenceCoordinator(Coordinator):
    """Proposes ABORTED when a side did not answer, whatever the other answered (the rule
    before the simulation restored its store)."""

    def _propose(self, a: PrepareReply | None, b: PrepareReply | None) -> Decision | None:
        decision = propose(a, b, trade_id=self.trade.trade_id, decided_by=self.name, players=self.trade.players)
        if decision is None:
            return Decision(self.trade.trade_id, Outcome.ABORTED, "shard unavailable", self.name, self.trade.players)
        return decision


def _prepare_ignoring_escrow(leg: Leg, holdings: Holdings, known: Known | None) -> PrepareDecision:
    return decide_prepare(leg, Holdings(holdings.items, holdings.gold), known)


def _prepare_ignoring_receipts(leg: Leg, holdings: Holdings, known: Known | None) -> PrepareDecision:
    if known is not None:
        return decide_prepare(leg, holdings, known)
    blind = dataclasses.replace(leg, receives=Offer((), leg.receives.gold))
    return decide_prepare(blind, holdings, None)


def _never_due(known: Known, deadline_ms: int, now_ms: int) -> bool:
    return False


def _create_overwriting(existing: Decision | None, proposed: Decision) -> tuple[Decision, bool]:
    return proposed, True


BREAKS: dict[str, tuple[str, TradeRules]] = {
    "abort-without-record": (
        "a participant past its escrow deadline aborts on its own, without writing ABORTED-if-absent",
        dataclasses.replace(REAL_RULES, resolve_through_record=False),
    ),
    "abort-on-silence": (
        "the coordinator proposes ABORTED when a side did not answer, though no answer shows the trade was never "
        "committed: a retry after the store lost a COMMITTED record one side applied splits the trade",
        dataclasses.replace(REAL_RULES, coordinator=_AbortingOnSilenceCoordinator),
    ),
    "commit-on-one-prepare": (
        "the coordinator proposes COMMITTED when either side prepared",
        dataclasses.replace(REAL_RULES, coordinator=_OptimisticCoordinator),
    ),
    "prepare-ignores-escrow": (
        "a participant checks ownership and balance without subtracting what other trades escrowed",
        dataclasses.replace(REAL_RULES, decide_prepare=_prepare_ignoring_escrow),
    ),
    "accept-held-receipts": (
        "a participant escrows a leg that receives an item its shard still stores (its giver's commit is "
        "not applied yet): the item comes back before it left (found by the simulation, seed 7903)",
        dataclasses.replace(REAL_RULES, decide_prepare=_prepare_ignoring_receipts),
    ),
    "trust-own-proposal": (
        "the coordinator settles and answers with its own proposal, not the record as stored",
        dataclasses.replace(REAL_RULES, adopt_recorded=False),
    ),
    "record-overwrites": (
        "the decision store's create-if-absent overwrites an existing record",
        dataclasses.replace(REAL_RULES, create_if_absent=_create_overwriting),
    ),
    "abort-without-asking": (
        "without a record, a termination writes ABORTED without asking what the other side applied: after the "
        "store lost a COMMITTED record (etcd restored from a backup), the trade ends applied on one side only",
        dataclasses.replace(REAL_RULES, ask_counterpart=False),
    ),
    "no-termination": (
        "a participant never settles an escrow on its own (only a coordinator or the sweep does)",
        dataclasses.replace(REAL_RULES, termination_due=_never_due),
    ),
}
"""Planted bugs for ``scripts/sim_trades.py --break NAME``: description and rules."""


def rules_for(break_name: str | None) -> TradeRules:
    """The real rules, or the rules with the named bug planted; KeyError for an unknown name."""
    return REAL_RULES if break_name is None else BREAKS[break_name][1]
