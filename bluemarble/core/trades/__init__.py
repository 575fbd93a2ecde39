"""Trade rules (flow 6), as pure functions and state machines: values and messages in,
decisions and actions out; no I/O, no clock, no asyncio.

- :mod:`.model`: the terms (:class:`Trade`, :class:`Offer`, :class:`Leg`), the decision
  record (:class:`Decision`) and :func:`validate_trade`.
- :mod:`.decision`: the record's only write, :func:`create_if_absent`.
- :mod:`.participant`: a shard primary's escrow (:func:`decide_prepare`), commit/abort
  (:func:`decide_settle`), termination (:func:`termination_due`,
  :func:`termination_decision`) and same-shard trades
  (:func:`decide_local_trade`).
- :mod:`.coordinator`: one ExecuteTrade attempt (:class:`Coordinator`, :func:`propose`).

``tests/sim/trade_sim.py`` drives them through seeded schedules of crashes, restarts,
failovers, lost and duplicated messages and retries, and checks I2, I3 and I5
(``scripts/sim_trades.py``).
"""

from bluemarble.core.trades.coordinator import (
    SHARD_UNAVAILABLE,
    Abandon,
    Action,
    Coordinator,
    Phase,
    PrepareReply,
    ProposeDecision,
    Reply,
    ReplyKind,
    Retain,
    SendPrepare,
    SendSettle,
    Side,
    propose,
)
from bluemarble.core.trades.decision import create_if_absent, outcome_for_leg
from bluemarble.core.trades.model import (
    COORDINATOR,
    MAX_TRADE_ITEMS_PER_SIDE,
    NOTHING,
    AbortCause,
    Decision,
    Leg,
    Offer,
    Outcome,
    Trade,
    participant_name,
    validate_leg,
    validate_trade,
)
from bluemarble.core.trades.participant import (
    RECOVERED_COMMIT,
    REUSED_TRADE_ID,
    SETTLE_CONTRADICTS,
    Holdings,
    Known,
    LocalTradeDecision,
    PrepareDecision,
    PrepareVerdict,
    SettleVerdict,
    TradeState,
    check_leg,
    decide_local_trade,
    decide_prepare,
    decide_settle,
    outcome_of,
    refusal,
    state_for,
    termination_decision,
    termination_due,
)

__all__ = [
    "COORDINATOR",
    "MAX_TRADE_ITEMS_PER_SIDE",
    "NOTHING",
    "RECOVERED_COMMIT",
    "REUSED_TRADE_ID",
    "SETTLE_CONTRADICTS",
    "SHARD_UNAVAILABLE",
    "Abandon",
    "AbortCause",
    "Action",
    "Coordinator",
    "Decision",
    "Holdings",
    "Known",
    "Leg",
    "LocalTradeDecision",
    "Offer",
    "Outcome",
    "Phase",
    "PrepareDecision",
    "PrepareReply",
    "PrepareVerdict",
    "ProposeDecision",
    "Reply",
    "ReplyKind",
    "Retain",
    "SendPrepare",
    "SendSettle",
    "SettleVerdict",
    "Side",
    "Trade",
    "TradeState",
    "check_leg",
    "create_if_absent",
    "decide_local_trade",
    "decide_prepare",
    "decide_settle",
    "outcome_for_leg",
    "outcome_of",
    "participant_name",
    "propose",
    "refusal",
    "state_for",
    "termination_decision",
    "termination_due",
    "validate_leg",
    "validate_trade",
]
