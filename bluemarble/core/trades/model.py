"""The values of a trade (terms, legs, decisions) and the validation of its terms (pure).

Why this module exists: the coordinator, both participants, the decision record and the
simulation must agree on what a trade *is* before they can agree on its outcome. A trade's
terms are fixed by the caller under a trade id; each participant sees only its own
:class:`Leg` (what its player gives, receives, and to whom). :func:`validate_trade`
refuses malformed terms once, at the coordinator, with INVALID_ARGUMENT, so that nothing
downstream has to handle them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bluemarble.core import validation
from bluemarble.core.errors import InvalidArgument
from bluemarble.core.limits import echo

MAX_TRADE_ITEMS_PER_SIDE = 64
"""Items one side of a trade may give: a leg travels in one Prepare and is escrowed in one
replicated log entry, and a player trades a handful of items, not a warehouse."""

COORDINATOR = "coordinator"
"""``Decision.decided_by`` of a decision the coordinator proposed."""


def participant_name(shard: str) -> str:
    """``Decision.decided_by`` of an ABORTED-if-absent written by a participant's termination."""
    return f"participant {shard}"


class Outcome(enum.Enum):
    """The decision of a trade; once recorded it never changes (I3)."""

    COMMITTED = "committed"
    ABORTED = "aborted"


class AbortCause(enum.Enum):
    """Why a trade was ABORTED, for a caller deciding what to do next."""

    UNKNOWN = "unknown"
    """Not ABORTED, or not known (a side that applied ABORTED does not keep why)."""
    REFUSED = "refused"
    """A side refused the terms (an item not owned, gold lacking, an unknown player, the
    gold cap): the same terms are refused again until the inventories change."""
    UNAVAILABLE = "unavailable"
    """A side could not take part in time (a shard failing over or unreachable, etcd slow,
    an escrow past its deadline): the same exchange under a new trade id may commit."""
    CONTENDED = "contended"
    """A side refused because of other trades not settled yet (an item or gold they hold
    in escrow, or would bring): the same exchange under a new trade id may commit once
    they settle (or may then be refused, if they moved the item away)."""


@dataclass(frozen=True)
class Offer:
    """What one side gives: distinct item ids and an amount of gold (0..2^53)."""

    item_ids: tuple[str, ...]
    gold: int

    @property
    def empty(self) -> bool:
        """Gives nothing at all (no item, no gold)."""
        return not self.item_ids and self.gold == 0

    def same_as(self, other: Offer) -> bool:
        """The same offer, whatever the order its items were listed in."""
        return self.gold == other.gold and sorted(self.item_ids) == sorted(other.item_ids)


NOTHING = Offer((), 0)


@dataclass(frozen=True)
class Leg:
    """One participant's part of a trade: ``player`` gives ``gives`` and receives
    ``receives`` from ``counterpart``."""

    trade_id: str
    player: str
    gives: Offer
    receives: Offer
    counterpart: str

    def same_terms(self, other: Leg) -> bool:
        """Same trade id, players and offers (item order aside): a retried Prepare, not a
        trade id reused for another trade."""
        return (
            self.trade_id == other.trade_id
            and self.player == other.player
            and self.counterpart == other.counterpart
            and self.gives.same_as(other.gives)
            and self.receives.same_as(other.receives)
        )

    def counterpart_leg(self) -> Leg:
        """The other participant's leg of the same trade: the counterpart gives what this
        leg receives and receives what it gives."""
        return Leg(self.trade_id, self.counterpart, self.receives, self.gives, self.player)

    def trade(self) -> Trade:
        """The trade this leg is part of, with this leg's player as A (a trade's two
        orders are the same exchange: :meth:`Trade.same_exchange`)."""
        return Trade(self.trade_id, self.player, self.counterpart, self.gives, self.receives)


@dataclass(frozen=True)
class Trade:
    """A swap between ``player_a`` and ``player_b`` under a caller-chosen ``trade_id``."""

    trade_id: str
    player_a: str
    player_b: str
    a_gives: Offer
    b_gives: Offer

    def leg_a(self) -> Leg:
        """A's leg: A gives ``a_gives`` and receives ``b_gives``."""
        return Leg(self.trade_id, self.player_a, self.a_gives, self.b_gives, self.player_b)

    def leg_b(self) -> Leg:
        """B's leg: B gives ``b_gives`` and receives ``a_gives``."""
        return Leg(self.trade_id, self.player_b, self.b_gives, self.a_gives, self.player_a)

    @property
    def players(self) -> tuple[str, str]:
        return (self.player_a, self.player_b)

    def same_exchange(self, other: Trade) -> bool:
        """The same trade id and terms, whichever player is named A (item order aside).
        One leg says everything (both players and both offers), so comparing A's is enough."""
        mine = self.leg_a()
        return mine.same_terms(other.leg_a()) or mine.same_terms(other.leg_b())


@dataclass(frozen=True)
class Decision:
    """The decision record of a cross-shard trade (etcd ``/trades/<trade_id>``), written
    only by create-if-absent (:func:`~bluemarble.core.trades.decision.create_if_absent`).

    ``decided_by`` says who wrote it: :data:`COORDINATOR`, or
    :func:`participant_name` for a termination's ABORTED-if-absent. ``players`` names
    both players (A first when the coordinator wrote it) so that the leader's sweep can
    find the participants of a record whose coordinator died; empty only for records
    written by code that does not know them. ``cause``: why an ABORTED one was
    (:class:`AbortCause`; UNKNOWN for COMMITTED).
    """

    trade_id: str
    outcome: Outcome
    reason: str
    decided_by: str
    players: tuple[str, ...] = ()
    cause: AbortCause = AbortCause.UNKNOWN


def _check_side(side: str, offer: Offer) -> None:
    count = len(offer.item_ids)
    if count > MAX_TRADE_ITEMS_PER_SIDE:
        raise InvalidArgument(
            f"{side}.item_ids lists {count} items; a side may give at most {MAX_TRADE_ITEMS_PER_SIDE}"
        )
    validation.item_ids(list(offer.item_ids), f"{side}.item_ids")
    validation.gold(offer.gold, f"{side}.gold")


def _check_exchange(one_field: str, one: Offer, other_field: str, other: Offer) -> None:
    """Both offers of a trade (or of a leg): each well formed, no item in both, not both empty."""
    _check_side(one_field, one)
    _check_side(other_field, other)
    both = set(one.item_ids).intersection(other.item_ids)
    if both:
        raise InvalidArgument(f"item {echo(min(both))} is listed on both sides; an item can move only one way")
    if one.empty and other.empty:
        raise InvalidArgument("the trade is empty: neither side gives an item or gold")


def validate_leg(leg: Leg, field: str) -> Leg:
    """``leg`` if its ids, items and gold are what :func:`validate_trade` accepts for one
    side's view of a trade; else InvalidArgument naming ``field`` ("legs[0]": a Prepare's
    leg) and the problem."""
    validation.player_id(leg.player, f"{field}.player_id")
    validation.player_id(leg.counterpart, f"{field}.counterpart_player_id")
    if leg.player == leg.counterpart:
        raise InvalidArgument(f"player {echo(leg.player)} is on both sides; a player cannot trade with themselves")
    _check_exchange(f"{field}.gives", leg.gives, f"{field}.receives", leg.receives)
    return leg


def validate_trade(trade: Trade) -> None:
    """Raise :class:`~bluemarble.core.errors.InvalidArgument` unless ``trade``'s terms are
    well formed; the message names the field and the problem, and quotes input only
    through :func:`~bluemarble.core.limits.echo`.

    Refused: a trade id or a player id empty or over 128 bytes; the same player on both
    sides; a side listing more than :data:`MAX_TRADE_ITEMS_PER_SIDE` items, an empty or
    over-long item id, or an item twice; an item on both sides; gold below 0 or above
    2^53; a trade in which neither side gives anything. Ownership and balances are not
    checked here (they are the participants', and their refusals are ABORTED outcomes).
    """
    validation.trade_id(trade.trade_id, "trade_id")
    validation.player_id(trade.player_a, "player_a")
    validation.player_id(trade.player_b, "player_b")
    if trade.player_a == trade.player_b:
        raise InvalidArgument(
            f"player_a and player_b are both {echo(trade.player_a)}; a player cannot trade with themselves"
        )
    _check_exchange("a_gives", trade.a_gives, "b_gives", trade.b_gives)
