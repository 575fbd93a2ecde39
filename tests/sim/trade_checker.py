"""The invariants the trade simulation checks, after every step and after healing.

Why this module exists: the simulated actors run the real trade rules, so nothing in them
may also judge the outcome. The actors report every record written, every outcome a
participant applies and every answer a client receives; the checker keeps its own record
of the truth and reads the participants' stores.

Accounting of items and gold while a trade is half applied (I2). A committed cross-shard
trade is applied by its two participants one after the other, in either order. An item
counts as its **giver's until the giver's side applies COMMIT**, and as the receiver's
from then on, whether or not the receiver's side has applied it yet. So for each
committed trade applied by exactly one side, whose leg there is L (player P, counterpart
Q), the checker adds ``L.gives`` to Q (they left P's store and are not in Q's yet) and
removes ``L.receives`` from P (they are in P's store already, but still in Q's: Q has
not given them). Gold the same way. With that correction, after every step:

- every item of the universe is counted exactly once, and no other item exists;
- a shard stores an item id at most once (its items table is keyed by (item_id, shard_id):
  the transient second copy of the accounting above lives on another shard);
- total gold equals the initial total; no player's gold is negative; a player's escrow
  is part of what it holds (escrowed items owned, escrowed gold <= gold).

I3, checked on every event:

- a decision record, once written, never changes (the store reports every write);
- a participant applies (or records) an outcome only if the record exists with that
  outcome, and never applies another outcome for the same trade afterwards;
- a participant never sees a verdict the rules call impossible (CONFLICT,
  MISSING_ESCROW);
- every answer a client receives is the recorded decision (cross-shard) or the shard's
  recorded outcome (same-shard), and all answers for one trade id agree.

After healing (faults over, network reliable): no escrow is held (I5, also checked
during healing: no escrow outlives ``max(deadline, heal) + bound``), every record is
applied by both participants, and conservation holds exactly, without correction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from bluemarble.core.trades import Decision, Leg, Outcome

MAX_VIOLATIONS = 5


class TradeChecker:
    """Collects violations (strings a person can act on, each naming the tick)."""

    def __init__(self, universe: Iterable[str], total_gold: int) -> None:
        self.universe = frozenset(universe)
        self.total_gold = total_gold
        self.violations: list[str] = []
        self.now = 0
        self.records: dict[str, Decision] = {}
        self.applied: dict[tuple[str, str], Outcome] = {}
        """(trade id, player) -> the outcome that player's participant applied."""
        self.half: dict[str, Leg] = {}
        """Committed trades applied by one side only: the leg applied."""
        self.local: dict[str, tuple[Outcome, str]] = {}
        self.answers: dict[str, tuple[Outcome, str]] = {}
        self.lost: set[str] = set()
        """Trades whose record the store lost (restored from a backup)."""
        self.dirty = True

    def fail(self, text: str) -> None:
        if len(self.violations) < MAX_VIOLATIONS:
            self.violations.append(f"tick {self.now}: {text}")

    # -- events -----------------------------------------------------------------------------

    def records_lost(self, trade_ids: Iterable[str]) -> None:
        """The store lost these records (restored from a backup): a record may be written
        again, but it must agree with every outcome a participant already applied."""
        for trade_id in trade_ids:
            self.records.pop(trade_id, None)
            self.lost.add(trade_id)

    def recorded(self, decision: Decision, stored_before: Decision | None) -> None:
        """The store wrote ``decision`` (it held ``stored_before``)."""
        trade_id = decision.trade_id
        if trade_id in self.lost:
            other = [o for (t, _), o in sorted(self.applied.items(), key=lambda kv: kv[0])
                     if t == trade_id and o is not decision.outcome]
            if other:
                self.fail(f"I2: the lost record of {trade_id} was written again {decision.outcome.value} "
                          f"({decision.decided_by}), but a participant had applied {other[0].value}")
        first = self.records.setdefault(decision.trade_id, decision)
        if first != decision or stored_before is not None:
            self.fail(f"I3: the record of {decision.trade_id} changed from {first.outcome.value} "
                      f"({first.decided_by}) to {decision.outcome.value} ({decision.decided_by})")

    def check_record(self, decision: Decision | None, trade_id: str) -> None:
        """A record read from the store is the one first written."""
        first = self.records.get(trade_id)
        if first != decision:
            self.fail(f"I3: the store holds {decision} for {trade_id}, first written as {first}")

    def applying(self, shard: str, player: str, trade_id: str, outcome: Outcome, record: Decision | None,
                 leg: Leg | None) -> None:
        """``shard``'s participant applies (or records) ``outcome`` for ``player``'s leg;
        ``record`` is the decision record at that moment; ``leg`` the escrowed terms
        (None when only an outcome is recorded). Call before the store changes."""
        if record is None:
            self.fail(f"I3: {shard} applies {outcome.value} to {trade_id} for {player}, but no decision is recorded")
        elif record.outcome is not outcome:
            self.fail(f"I3: {shard} applies {outcome.value} to {trade_id} for {player}, "
                      f"but the record says {record.outcome.value}")
        key = (trade_id, player)
        before = self.applied.get(key)
        if before is not None and before is not outcome:
            self.fail(f"I3: {shard} applies {outcome.value} to {trade_id} for {player} after {before.value}")
        self.applied[key] = outcome
        if outcome is Outcome.COMMITTED and leg is not None and before is None:
            if trade_id in self.half:
                del self.half[trade_id]
            else:
                self.half[trade_id] = leg
        self.dirty = True

    def impossible(self, shard: str, player: str, trade_id: str, what: str) -> None:
        self.fail(f"{shard} got an impossible settle for {trade_id} ({player}): {what}")

    def local_decided(self, trade_id: str, outcome: Outcome, reason: str) -> None:
        first = self.local.setdefault(trade_id, (outcome, reason))
        if first != (outcome, reason):
            self.fail(f"same-shard trade {trade_id} decided {outcome.value} after {first[0].value}")
        self.dirty = True

    def answered(self, trade_id: str, outcome: Outcome, reason: str, cross_shard: bool) -> None:
        """A client received this answer for ``trade_id``."""
        truth = self.records.get(trade_id) if cross_shard else None
        expected = (truth.outcome, truth.reason) if truth is not None else self.local.get(trade_id)
        if expected is None:
            self.fail(f"client answered {outcome.value} for {trade_id}, which has no recorded decision")
        elif expected != (outcome, reason):
            self.fail(f"client answered {outcome.value} ({reason!r}) for {trade_id}, "
                      f"the record says {expected[0].value} ({expected[1]!r})")
        first = self.answers.setdefault(trade_id, (outcome, reason))
        if trade_id in self.lost:
            # An answer given before the record was lost may not be the one written again
            # (both sides still held the escrow): the documented cost of a restore.
            self.answers[trade_id] = (outcome, reason)
        elif first != (outcome, reason):
            self.fail(f"client answered {outcome.value} for {trade_id} after {first[0].value}")

    # -- state checks -----------------------------------------------------------------------

    def check_conservation(
        self,
        items: Mapping[str, set[str]],
        gold: Mapping[str, int],
        escrowed_items: Mapping[str, set[str]],
        escrowed_gold: Mapping[str, int],
        shard_of: Mapping[str, int],
        *,
        exact: bool = False,
    ) -> None:
        """I2 over the participants' stores (player -> holdings), with the half-applied
        correction (``exact``: none may remain). Also the stores' own constraint: a shard
        stores an item id at most once (the items table's key is (item_id, shard_id))."""
        self.dirty = False
        count: Counter[str] = Counter()
        stored: set[tuple[int, str]] = set()
        total = 0
        for player, owned in items.items():
            count.update(owned)
            shard = shard_of[player]
            for item in owned:
                if (shard, item) in stored:
                    self.fail(f"shard-{shard} stores item {item} twice (for {player} and another player)")
                stored.add((shard, item))
            held = gold[player]
            total += held
            if held < 0:
                self.fail(f"I2: player {player} holds {held} gold")
            if escrowed_gold[player] > held or escrowed_gold[player] < 0:
                self.fail(f"I2: player {player} has {escrowed_gold[player]} gold escrowed of {held}")
            if not escrowed_items[player] <= owned:
                missing = sorted(escrowed_items[player] - owned)
                self.fail(f"I2: player {player} has escrowed items it does not hold: {missing[:5]}")
        if exact and self.half:
            self.fail(f"committed trades applied on one side only after healing: {sorted(self.half)[:5]}")
        for leg in self.half.values():
            count.update(leg.gives.item_ids)
            count.subtract(leg.receives.item_ids)
            total += leg.gives.gold - leg.receives.gold
        if total != self.total_gold:
            self.fail(f"I2: total gold is {total}, it was {self.total_gold}")
        wrong = sorted(i for i in self.universe if count[i] != 1)
        extra = sorted(i for i, n in count.items() if n and i not in self.universe)
        if wrong or extra:
            shown = ", ".join(f"{i} x{count[i]}" for i in (wrong + extra)[:6])
            self.fail(f"I2: items not in exactly one inventory: {shown}")

    def check_escrow_age(self, shard: str, trade_id: str, deadline: int, heal_at: int, bound: int) -> None:
        """I5 during healing: an escrow is settled within ``bound`` ticks of its deadline
        (or of the heal, if its deadline fell during the faults)."""
        if self.now > max(deadline, heal_at) + bound:
            self.fail(f"I5: {shard} still holds the escrow of {trade_id}, deadline {deadline}, "
                      f"healed at {heal_at}, bound {bound}")

    def check_settled(self, trade_id: str, players: Iterable[str], states: Iterable[Outcome | None]) -> None:
        """After healing: both participants applied the record of ``trade_id``."""
        record = self.records.get(trade_id)
        assert record is not None
        for player, state in zip(players, states, strict=True):
            if state is not record.outcome:
                shown = state.value if state is not None else "nothing"
                self.fail(f"after healing, {trade_id} is {record.outcome.value} but {player}'s participant "
                          f"applied {shown}")
