"""A participant's trade rules: prepare (escrow), settle (commit/abort), termination, and
the same-shard trade (pure functions over values).

Why this module exists: the shard's primary is where items and gold really move, so it
is where I2 is won or lost. The driver loads the player's :class:`Holdings` and the trade
id's durable record (:class:`Known`) from storage, asks one of these functions, and
persists what the answer says, in one replicated STRONG write, *before* it answers the
sender (an answer must never promise state that a crash could lose).

The rule the whole protocol relies on (flow 6): a participant applies COMMITTED or
ABORTED only when the decision record exists with that value. The driver obtains it from
a Commit/Abort sent by whoever read the record (coordinator, leader's sweep), or from
ResolveTrade (record, or ABORTED-if-absent) in termination. It never decides on its own.

Accounting while an escrow is held: escrowed items and gold are still the player's
(:class:`Holdings` counts them), but neither another trade nor a grant may take them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bluemarble.core.limits import MAX_GOLD, MAX_ITEMS_PER_PLAYER
from bluemarble.core.trades.model import AbortCause, Decision, Leg, Outcome, Trade


class TradeState(enum.Enum):
    """A participant's durable record of one trade id."""

    PREPARED = "prepared"
    """Escrow held: the leg's ``gives`` are reserved; the outcome is not known here yet."""
    COMMITTED = "committed"
    """COMMITTED applied (or, without a leg, recorded); never changes."""
    ABORTED = "aborted"
    """ABORTED applied (escrow released) or recorded without an escrow; never changes."""


_STATE_OF = {Outcome.COMMITTED: TradeState.COMMITTED, Outcome.ABORTED: TradeState.ABORTED}
_OUTCOME_OF = {TradeState.COMMITTED: Outcome.COMMITTED, TradeState.ABORTED: Outcome.ABORTED}


def state_for(outcome: Outcome) -> TradeState:
    """The durable state recorded once ``outcome`` is applied."""
    return _STATE_OF[outcome]


def outcome_of(state: TradeState) -> Outcome | None:
    """The outcome a settled state stands for; None for PREPARED."""
    return _OUTCOME_OF.get(state)


@dataclass(frozen=True)
class Holdings:
    """One player's possessions as stored on its shard. ``items`` and ``gold`` are
    everything the player has, escrowed ones included; ``escrowed_items`` (a subset of
    ``items``) and ``escrowed_gold`` (<= ``gold``) are reserved by PREPARED trades."""

    items: frozenset[str]
    gold: int
    escrowed_items: frozenset[str] = frozenset()
    escrowed_gold: int = 0
    held_by_others: frozenset[str] = frozenset()
    """Item ids the shard stores for players other than the trade's two (the driver needs
    to look up only the ids the leg receives). Such an item is on its way out of this
    shard (its giver's side has not applied the commit that moves it away, while the
    receiver's side already has and traded it on): it cannot be stored here twice."""
    incoming_gold: int = 0
    """Gold the player's PREPARED trades (and writes queued before this decision) would
    bring if they commit. It counts against the 2^53 cap now: a commit must never be
    refused, so the headroom it needs is reserved at prepare, like the gold it gives."""
    known: bool = True
    """False for a player the shard has never seen (never granted anything): such a
    player takes part in no trade, so a mistyped player id cannot receive anything."""
    incoming_items: int = 0
    """Items those trades and writes would bring: they count against the cap on items
    per player (``MAX_ITEMS_PER_PLAYER``) the same way."""
    arriving_items: frozenset[str] = frozenset()
    """The ids of those items (as far as the driver knows them): giving one of them before
    it has arrived is refused as pending, not as an item the player does not own."""

    @property
    def available_gold(self) -> int:
        return self.gold - self.escrowed_gold


@dataclass(frozen=True)
class Known:
    """The participant's durable record of a trade id: its state, the leg recorded at
    prepare (None when only an outcome was recorded, without an escrow) and the reason
    of the outcome (empty while PREPARED)."""

    state: TradeState
    leg: Leg | None
    reason: str = ""


class PrepareVerdict(enum.Enum):
    """What the driver does with a Prepare."""

    ESCROW = "escrow"
    """New escrow: persist PREPARED (the leg, the deadline), then answer PREPARED."""
    PREPARED = "prepared"
    """Already prepared with the same terms: answer PREPARED, change nothing."""
    DECIDED = "decided"
    """An outcome was already applied or recorded: answer it (``outcome``), change nothing."""
    REFUSED = "refused"
    """Cannot escrow (``reason`` names the item or the amount): answer refused, persist
    nothing (no decision exists yet; a later Prepare is judged afresh)."""
    CONFLICT = "conflict"
    """The trade id is known with different terms: answer refused (INVALID_ARGUMENT
    "trade id reused with different terms"), persist nothing."""


@dataclass(frozen=True)
class PrepareDecision:
    verdict: PrepareVerdict
    outcome: Outcome | None = None
    """The applied outcome, for DECIDED only."""
    reason: str = ""
    pending: bool = False
    """REFUSED because of other trades not settled yet (:func:`refusal`)."""


REUSED_TRADE_ID = "trade id reused with different terms"
SETTLE_CONTRADICTS = "a decision never changes"
"""Said by a participant refusing a settle whose outcome contradicts the one it applied
(the drivers' messages carry it: the control plane logs such a refusal as an error)."""


def check_leg(leg: Leg, holdings: Holdings) -> str:
    """Why ``holdings`` cannot escrow ``leg``'s gives ("" when it can): :func:`refusal`'s
    reason."""
    return refusal(leg, holdings)[0]


def refusal(leg: Leg, holdings: Holdings) -> tuple[str, bool]:
    """Why ``holdings`` cannot escrow ``leg``'s gives ("" when it can), and whether the
    refusal comes of other trades not settled yet (*pending*: an item or gold they hold
    in escrow, or what they would bring): the same exchange may go through once they
    settle, unlike a refusal of the terms themselves.

    The player must be known to the shard (``Holdings.known``). Every given item must be
    the player's and not escrowed (by any trade: a trade id that
    already holds an escrow never reaches this check); no received item may be stored on
    this shard already, for the player or another (``held_by_others``); the gold given
    must not exceed the gold not escrowed; and the gold received, with what the player's
    other pending trades would bring (``incoming_gold``), must not take the player above
    2^53, nor the items received above :data:`MAX_ITEMS_PER_PLAYER` (so that no commit can
    be refused later; a leg's own gives leave in the commit that brings its receives).
    Items are checked in the order the leg lists them, so the reason names the first one.

    Why received items are checked: the two sides of a commit apply one after the other.
    Once the receiver's side has applied, the receiver may trade the item on while the
    giver's shard still stores it (escrowed, until its side applies). If the item came
    back to that shard before then, the giver's late commit would remove the only copy
    (the simulation found this, seed 7903 of the first 100,000-seed run).
    """
    if not holdings.known:
        return f"player {leg.player} is unknown on its shard (never granted anything); check the player id", False
    for item in leg.gives.item_ids:
        if item not in holdings.items:
            if item in holdings.arriving_items:
                return (f"player {leg.player} does not own item {item} yet: a trade or grant bringing it has "
                        "not settled"), True
            return f"player {leg.player} does not own item {item}", False
        if item in holdings.escrowed_items:
            return f"item {item} is held by another trade", True
    for item in leg.receives.item_ids:
        if item in holdings.items:
            return (f"player {leg.player} already holds item {item}; an item is held once "
                    "(if a trade is moving it away, retry once that trade settles)"), item in holdings.escrowed_items
        if item in holdings.held_by_others:
            return f"item {item} is still stored for another player; a trade moving it away has not settled yet", True
    available = holdings.available_gold
    if leg.gives.gold > available:
        return (f"player {leg.player} has {available} gold available, the trade needs {leg.gives.gold}",
                leg.gives.gold <= holdings.gold)  # enough, but some of it is escrowed
    # This leg's items leave as its received ones arrive (one commit applies both), so
    # only what it adds on balance counts; other pending trades count what they bring.
    adds = max(0, len(leg.receives.item_ids) - len(leg.gives.item_ids))
    if len(holdings.items) + holdings.incoming_items + adds > MAX_ITEMS_PER_PLAYER:
        return (f"player {leg.player} would hold more than {MAX_ITEMS_PER_PLAYER} items "
                f"(holds {len(holdings.items)}, {holdings.incoming_items} more on their way)",
                len(holdings.items) + adds <= MAX_ITEMS_PER_PLAYER)
    if holdings.gold + holdings.incoming_gold - leg.gives.gold + leg.receives.gold > MAX_GOLD:
        incoming = holdings.incoming_gold
        pending = f" once the {incoming} gold of its pending trades arrives" if incoming else ""
        return (f"player {leg.player} would hold more than {MAX_GOLD} gold{pending}",
                holdings.gold - leg.gives.gold + leg.receives.gold <= MAX_GOLD)
    return "", False


def decide_prepare(leg: Leg, holdings: Holdings, known: Known | None) -> PrepareDecision:
    """What a participant does with a Prepare for ``leg``, given the player's holdings and
    its durable record of the trade id (None if it has none).

    - record with a leg whose terms differ: CONFLICT (``REUSED_TRADE_ID``);
    - COMMITTED/ABORTED: DECIDED with that outcome (its reason);
    - PREPARED (same terms): PREPARED;
    - no record: REFUSED with :func:`refusal`'s reason (and whether it is pending), else
      ESCROW.

    Raises nothing. The driver persists only on ESCROW.
    """
    if known is not None:
        if known.leg is not None and not known.leg.same_terms(leg):
            return PrepareDecision(PrepareVerdict.CONFLICT, None, REUSED_TRADE_ID)
        outcome = outcome_of(known.state)
        if outcome is not None:
            return PrepareDecision(PrepareVerdict.DECIDED, outcome, known.reason)
        return PrepareDecision(PrepareVerdict.PREPARED)
    reason, pending = refusal(leg, holdings)
    if reason:
        return PrepareDecision(PrepareVerdict.REFUSED, None, reason, pending)
    return PrepareDecision(PrepareVerdict.ESCROW)


class SettleVerdict(enum.Enum):
    """What the driver does with a Commit/Abort (or a ResolveTrade answer)."""

    APPLY_COMMIT = "apply_commit"
    """Escrowed ``gives`` leave the player, ``receives`` join; record COMMITTED. One write."""
    APPLY_ABORT = "apply_abort"
    """Release the escrow; record ABORTED. One write."""
    RECORD_ONLY = "record_only"
    """ABORTED with no escrow here: record ABORTED (no leg) so a late Prepare answers it
    instead of escrowing."""
    NOOP = "noop"
    """Already applied, same outcome: acknowledge, change nothing."""
    CONFLICT = "conflict"
    """Already applied the other outcome: a bug elsewhere (the record never changes).
    Change nothing, do not acknowledge, log loudly."""
    MISSING_ESCROW = "missing_escrow"
    """COMMITTED, but this participant holds no record of the trade. A COMMITTED record
    exists only once both participants prepared, so this escrow was lost: committing now
    would create items (receive without giving). Change nothing, do not acknowledge,
    log loudly."""


def decide_settle(known: Known | None, outcome: Outcome) -> SettleVerdict:
    """What a participant whose durable record of the trade is ``known`` does with the
    recorded ``outcome`` (see :class:`SettleVerdict`). Raises nothing.

    The caller must only pass an outcome read from the decision record.
    """
    if known is None:
        return SettleVerdict.RECORD_ONLY if outcome is Outcome.ABORTED else SettleVerdict.MISSING_ESCROW
    applied = outcome_of(known.state)
    if applied is None:
        return SettleVerdict.APPLY_COMMIT if outcome is Outcome.COMMITTED else SettleVerdict.APPLY_ABORT
    return SettleVerdict.NOOP if applied is outcome else SettleVerdict.CONFLICT


def termination_due(known: Known, deadline_ms: int, now_ms: int) -> bool:
    """True when ``known`` is a PREPARED escrow whose deadline (wall-clock ms, stored with
    the escrow) has passed: the participant must ask for the decision (ResolveTrade:
    the record, or ABORTED-if-absent) and apply it with :func:`decide_settle`. A newly
    promoted primary may call it with ``now_ms = deadline_ms`` to settle at once."""
    return known.state is TradeState.PREPARED and now_ms >= deadline_ms


RECOVERED_COMMIT = "the decision record was missing and the counterpart's shard had applied COMMITTED"


def termination_decision(leg: Leg, counterpart: Known | None, *, decided_by: str, why: str) -> Decision:
    """What a participant's termination proposes (create-if-absent) for its escrow of
    ``leg`` when no decision record exists, given the counterpart shard's durable record
    of the trade id (``counterpart``; None when that shard holds none).

    COMMITTED only when the counterpart applied COMMITTED to this leg's counterpart leg:
    a participant applies COMMITTED only from a COMMITTED record, so one existed and was
    lost since (etcd restored from a backup, or the record's retention ran out while this
    escrow waited). Writing ABORTED then would leave the trade applied on one side only,
    items and gold created or destroyed (I2). Anything else (the counterpart PREPARED,
    ABORTED, holding no record, or a record of other terms under the id): ABORTED with
    ``why``. Both players are named in the decision either way.

    The driver asks the counterpart's primary only after it found no record, and proposes
    with create-if-absent, so a record written meanwhile still stands. While the
    counterpart's shard cannot be asked, the driver waits (a bounded time) rather than
    decide without it.
    """
    players = (leg.player, leg.counterpart)
    if (counterpart is not None and counterpart.state is TradeState.COMMITTED and counterpart.leg is not None
            and counterpart.leg.same_terms(leg.counterpart_leg())):
        return Decision(leg.trade_id, Outcome.COMMITTED, f"recovered by {decided_by}: {RECOVERED_COMMIT}",
                        decided_by, players)
    return Decision(leg.trade_id, Outcome.ABORTED, why, decided_by, players, AbortCause.UNAVAILABLE)


@dataclass(frozen=True)
class LocalTradeDecision:
    """A same-shard trade's outcome. COMMITTED: swap both legs and record it; ABORTED:
    record it (a refusal is recorded too, so a retry gets the same answer)."""

    outcome: Outcome
    reason: str
    pending: bool = False
    """ABORTED because of other trades not settled yet (:func:`refusal`)."""


def decide_local_trade(
    trade: Trade, a: Holdings, b: Holdings, known_outcome: tuple[Outcome, str] | None,
) -> LocalTradeDecision:
    """The outcome of a trade whose players live on the same shard, decided in one local
    transaction: the recorded ``(outcome, reason)`` for a retried trade id; else ABORTED
    with the first refusal (A's leg checked first) of :func:`refusal`, else COMMITTED.

    ``trade`` must have passed :func:`~bluemarble.core.trades.model.validate_trade`;
    escrowed items and gold (of cross-shard trades in progress) are not available.
    """
    if known_outcome is not None:
        return LocalTradeDecision(*known_outcome)
    reason, pending = refusal(trade.leg_a(), a)
    if not reason:
        reason, pending = refusal(trade.leg_b(), b)
    if reason:
        return LocalTradeDecision(Outcome.ABORTED, reason, pending)
    return LocalTradeDecision(Outcome.COMMITTED, "")
