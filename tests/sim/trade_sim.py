"""Deterministic simulation of cross-shard and same-shard trades (issue 8, item 4).

Why this module exists: the trade rules in :mod:`bluemarble.core.trades` are only as good
as the schedules they survive. This drives them (through
:class:`~tests.sim.trade_rules.TradeRules`, so a bug can be planted) with a seeded
``random.Random`` and an integer clock, in the way of TigerBeetle's VOPR and
``tests/sim/replication_sim.py``:

- **participants** (2..4 shards), each one durable store (players' items and gold, the
  trade records: PREPARED with the leg and its deadline, COMMITTED, ABORTED, and the
  same-shard outcomes) and volatile state (ResolveTrade calls in flight). Replication is
  abstracted away (``tests/sim/replication_sim.py`` checks that acknowledged writes
  survive): a participant crash keeps the durable store and loses the volatile state. A
  restart is either a plain restart (termination at each escrow's deadline) or a
  **failover** (a promoted primary: termination for every escrow at once);
- the **decision store** (etcd): linearizable create-if-absent and get, applied when a
  request arrives; it restarts (requests lost) now and then. In a quarter of the seeds it
  is also **restored from a backup** now and then: the records written in the last
  1..60 ticks are lost. As the restore procedure does (helm/bluemarble/README.md), every
  control-plane replica is down meanwhile and every message in flight is lost; callers
  go on retrying their trade ids;
- **termination** without a record asks the other side's shard what it applied
  (:func:`~bluemarble.core.trades.termination_decision`: COMMITTED if it committed, the
  lost record's outcome), and waits while that shard is down;
- **coordinators** (1..3 control-plane replicas) running one
  :class:`~bluemarble.core.trades.Coordinator` per ExecuteTrade attempt. A crash loses
  every attempt, at any phase (before the prepares, between prepares and decision,
  between decision and commits); the counters say how many of each;
- the **leader's sweep**: finishes phase 2 for records that never got their retention
  (their coordinator died, or a settle failed), and retains them once both sides applied;
- **clients** that execute random trades (cross-shard and same-shard; items not owned,
  items escrowed by other trades, gold beyond the balance) and retry the same trade id
  with the same terms on a timeout, at any coordinator, sometimes at two at once, and
  sometimes give up;
- a **network** that drops, delays, reorders and duplicates (:mod:`tests.sim.network`).

After the faulty phase the run heals (faults end, everything restarts, the network stops
losing messages, clients finish what they started) and must converge: no escrow, every
record applied by both participants and retained, every client answered. The checker
(:mod:`tests.sim.trade_checker`) runs after every step.

``run_seed(seed)`` is a pure function of the seed (and the options): the same seed gives
the same trace, summarised by ``SimResult.digest`` (only ints are hashed, so the digest
is the same under any ``PYTHONHASHSEED``).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Any

from bluemarble.core.trades import (
    Abandon,
    Action,
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
    participant_name,
    validate_trade,
)
from tests.sim.network import Network, NetworkConfig
from tests.sim.trade_checker import TradeChecker
from tests.sim.trade_rules import TradeRules, rules_for

# -- time, in ticks -----------------------------------------------------------------------

PREPARE_TIMEOUT = 12
"""A coordinator waits this long for both prepare answers, then proposes ABORTED."""
STORE_RETRY = 8
STORE_TRIES = 3
"""A coordinator re-sends its create-if-absent this often, this many times, then gives up
the attempt (no answer; the client retries)."""
SETTLE_RETRY = 8
SETTLE_TRIES = 3
"""Commit/Abort re-sent this often, this many times, then ``on_settle_failed``."""
LOCAL_TIMEOUT = 14
CLIENT_TIMEOUT = 45
RESOLVE_RETRY = 10
"""A participant re-asks the store for a decision this often."""
SWEEP_EVERY = 10
SWEEP_AGE = 30
"""The leader sweeps records without retention older than this."""
RESTORE_SEEDS = 0.25
RESTORE_P = 0.01
"""Seeds in which the store is restored from a backup, and the chance per faulty tick."""
I5_BOUND = 45
"""After healing, an escrow is settled within this many ticks of max(deadline, heal)."""
HEAL_MAX_TICKS = 600
DEFAULT_STEPS = 150
ESCROW_REASON = "escrow deadline passed without a decision"


class Kind(enum.IntEnum):
    EXECUTE = 1
    ANSWER = 2
    PREPARE = 3
    PREPARE_REPLY = 4
    CREATE = 5
    RECORD = 6
    SETTLE = 7
    SETTLE_ACK = 8
    RESOLVE = 9
    RETAIN = 10
    LOCAL = 11
    LOCAL_REPLY = 12
    QUERY = 13
    STATE = 14


@dataclass
class SimResult:
    """The outcome of one seed: violations (empty when every invariant held), counters
    of what happened, and a digest of the event trace (same seed => same digest)."""

    seed: int
    violations: list[str]
    counters: dict[str, int]
    digest: int
    ticks: int
    trace: list[str] = field(default_factory=list)


@dataclass
class Attempt:
    """One ExecuteTrade attempt at a coordinator process (volatile)."""

    no: int
    coordinator: Coordinator | None
    """None for a same-shard trade (relayed to the shard)."""
    begin_at: int
    prepare_deadline: int = 0
    propose_next: int = 0
    propose_tries: int = 0
    settle_next: dict[Side, int] = field(default_factory=dict)
    settle_tries: dict[Side, int] = field(default_factory=dict)
    local_tries: int = 0


@dataclass
class Escrow:
    """A participant's durable record of one trade id (the ``Known`` and the deadline)."""

    known: Known
    deadline: int


_SIDE_CODE = {Side.A: 0, Side.B: 1}


class Sim:
    """One run. Actors are plain methods on this object (one address space, one clock);
    each actor only reads its own state and the messages it receives (the clients peek at
    holdings to draft plausible trades: a client's knowledge may be stale anyway)."""

    def __init__(self, seed: int, steps: int, rules: TradeRules, trace: bool) -> None:
        self.seed = seed
        self.steps = steps
        self.rules = rules
        self.rng = rng = random.Random(seed)
        self.shards = rng.choice((2, 2, 3, 4))
        self.coordinators = rng.choice((1, 2, 2, 3))
        self.clients = rng.choice((2, 4, 6))
        players = rng.choice((3, 4, 6, 8))
        self.trade_p = rng.choice((0.1, 0.3, 0.6))
        self.give_up_p = rng.choice((0.0, 0.1, 0.3))
        self.fault_p = rng.choice((0.0, 0.02, 0.05, 0.1))
        self.escrow_timeout = rng.choice((6, 15, 40))
        self.bad_item_p = rng.choice((0.0, 0.1, 0.3))
        self.net = Network(rng, NetworkConfig(
            drop_p=rng.choice((0.0, 0.05, 0.15, 0.3)), dup_p=rng.choice((0.0, 0.05, 0.2)),
            max_delay=rng.choice((1, 3, 6)),
        ))
        self.now = 0
        self.healing = False
        self.heal_at = 0
        self.digest = seed
        self.trace: list[str] | None = [] if trace else None
        self.counters: dict[str, int] = dict.fromkeys((
            "ticks", "trades_started", "cross_shard", "same_shard", "retries", "double_sends", "gave_up",
            "answered", "answered_committed", "answered_aborted", "refusals", "escrows", "commits_applied",
            "aborts_applied", "records_only", "prepares_decided", "resolves", "records_by_participant",
            "records_by_coordinator", "proposals_lost", "settles_failed", "swept", "retained",
            "participant_crashes", "failovers", "coordinator_crashes", "crash_before_prepare",
            "crash_between_prepare_and_decision", "crash_between_decision_and_commit", "store_restarts",
            "leader_crashes", "messages_sent", "messages_dropped", "messages_duplicated", "restores",
            "records_lost", "counterparts_asked", "recovered_commits", "resolves_waiting", "abandoned",
        ), 0)
        # Addresses: shards 0..S-1, coordinators S..S+C-1, the store, the leader; clients < 0.
        self.first_coordinator = self.shards
        self.store_address = self.shards + self.coordinators
        self.leader_address = self.store_address + 1
        # Players, their shards and initial holdings (one durable store per shard).
        self.players = [f"p{i}" for i in range(players)]
        self.player_shard = {p: rng.randrange(self.shards) for p in self.players}
        self.shard_players = [[p for p in self.players if self.player_shard[p] == s] for s in range(self.shards)]
        self.items: dict[str, set[str]] = {}
        self.gold: dict[str, int] = {}
        self.escrowed_items: dict[str, set[str]] = {}
        self.escrowed_gold: dict[str, int] = {}
        next_item = 0
        for p in self.players:
            count = rng.randrange(1, 6)
            self.items[p] = {f"i{next_item + k}" for k in range(count)}
            next_item += count
            self.gold[p] = rng.choice((0, 10, 50, 200))
            self.escrowed_items[p] = set()
            self.escrowed_gold[p] = 0
        self.universe = sorted(i for p in self.players for i in self.items[p])
        self.checker = TradeChecker(self.universe, sum(self.gold.values()))
        # Participants: durable records, volatile termination state.
        self.shard_up = [True] * self.shards
        self.restart_at = [0] * self.shards
        self.records: list[dict[int, Escrow]] = [{} for _ in range(self.shards)]
        self.prepared: list[dict[int, int]] = [{} for _ in range(self.shards)]
        """Trade no -> deadline of each PREPARED record (an index of ``records``)."""
        self.local: list[dict[int, tuple[Outcome, str]]] = [{} for _ in range(self.shards)]
        self.resolving: list[dict[int, int]] = [{} for _ in range(self.shards)]
        """Volatile: trade no -> when to re-ask the store."""
        self.settle_now: list[set[int]] = [set() for _ in range(self.shards)]
        """Volatile: escrows a failover settles at once, whatever their deadline."""
        # Coordinators (volatile only).
        self.coordinator_up = [True] * self.coordinators
        self.coordinator_restart_at = [0] * self.coordinators
        self.attempts: list[dict[int, Attempt]] = [{} for _ in range(self.coordinators)]
        # The decision store (etcd) and the leader's sweep.
        self.store: dict[int, Decision] = {}
        self.written_at: dict[int, int] = {}
        self.lost_records: set[int] = set()
        # Restores draw from a stream of their own: the seeds without any keep the rest of
        # their schedule.
        self.restore_rng = random.Random(seed * 1_000_003 + 17)
        self.restores = self.restore_rng.random() < RESTORE_SEEDS
        self.unretained: dict[int, int] = {}
        """Trade no -> tick its record was written, until it is retained."""
        self.store_down_until = -1
        self.leader_down_until = -1
        self.sweep_acks: dict[int, set[int]] = {}
        # Trades and clients.
        self.trades: list[Trade] = []
        self.cross: list[bool] = []
        self.trade_client: list[int] = []
        self.client_trade: list[int | None] = [None] * self.clients
        self.client_retry_at = [0] * self.clients

    # -- bookkeeping ------------------------------------------------------------------------

    def event(self, *values: int) -> None:
        """Fold an event (ints only: hashing them is the same in every process) into the digest."""
        self.digest = hash((self.digest, self.now, values))

    def note(self, text: str) -> None:
        if self.trace is not None:
            self.trace.append(f"{self.now:5d} {text}")

    def shard_of(self, player: str) -> int:
        return self.player_shard[player]

    def shard_name(self, shard: int) -> str:
        return f"shard-{shard}"

    def holdings(self, player: str, receives: Offer, counterpart: str) -> Holdings:
        """What the driver loads for a prepare: the player's holdings, and which of the
        items it would receive the shard stores for other players."""
        others: set[str] = set()
        if receives.item_ids:
            shard = self.player_shard[player]
            for other in self.shard_players[shard]:
                if other != player and other != counterpart:
                    others.update(self.items[other].intersection(receives.item_ids))
        return Holdings(frozenset(self.items[player]), self.gold[player],
                        frozenset(self.escrowed_items[player]), self.escrowed_gold[player], frozenset(others))

    def send(self, src: int, dst: int, kind: Kind, body: tuple[Any, ...]) -> None:
        self.net.send(self.now, src, dst, kind, body)

    # -- clients ----------------------------------------------------------------------------

    def draft_offer(self, player: str, exclude: set[str]) -> Offer:
        rng = self.rng
        owned = sorted(self.items[player] - exclude)
        chosen = rng.sample(owned, min(rng.choice((0, 1, 1, 2, 3)), len(owned)))
        if rng.random() < self.bad_item_p:
            item = rng.choice(self.universe)
            if item not in chosen and item not in exclude:
                chosen.append(item)
        held = self.gold[player]
        gold = rng.choice((0, 0, 0, 5, held // 2, held, held + 10))
        return Offer(tuple(chosen), gold)

    def new_trade(self, client: int) -> int:
        a, b = self.rng.sample(self.players, 2)
        a_gives = self.draft_offer(a, set())
        b_gives = self.draft_offer(b, set(a_gives.item_ids))
        if a_gives.empty and b_gives.empty:
            a_gives = Offer((), 1)
        no = len(self.trades)
        trade = Trade(f"t{no}", a, b, a_gives, b_gives)
        validate_trade(trade)
        self.trades.append(trade)
        cross = self.shard_of(a) != self.shard_of(b)
        self.cross.append(cross)
        self.trade_client.append(client)
        self.counters["trades_started"] += 1
        self.counters["cross_shard" if cross else "same_shard"] += 1
        self.note(f"c{client} starts {trade.trade_id} {a}->{b} {a_gives} / {b_gives}"
                  f"{' cross-shard' if cross else ' same-shard'}")
        self.event(50, client, no)
        return no

    def execute(self, client: int, no: int) -> None:
        target = self.first_coordinator + self.rng.randrange(self.coordinators)
        self.send(-2 - client, target, Kind.EXECUTE, (no, client))

    def tick_client(self, client: int) -> None:
        no = self.client_trade[client]
        if no is None:
            if not self.healing and self.rng.random() < self.trade_p:
                no = self.new_trade(client)
                self.client_trade[client] = no
                self.client_retry_at[client] = self.now + CLIENT_TIMEOUT
                self.execute(client, no)
                if self.rng.random() < 0.1:
                    self.counters["double_sends"] += 1
                    self.execute(client, no)
            return
        if self.now < self.client_retry_at[client]:
            return
        if not self.healing and self.rng.random() < self.give_up_p:
            self.counters["gave_up"] += 1
            self.note(f"c{client} gives up on t{no}")
            self.client_trade[client] = None
            return
        self.counters["retries"] += 1
        self.client_retry_at[client] = self.now + CLIENT_TIMEOUT
        self.execute(client, no)

    def on_answer(self, client: int, no: int, outcome: Outcome, reason: str) -> None:
        self.checker.answered(self.trades[no].trade_id, outcome, reason, self.cross[no])
        if self.client_trade[client] == no:
            self.client_trade[client] = None
            self.counters["answered"] += 1
            self.counters["answered_committed" if outcome is Outcome.COMMITTED else "answered_aborted"] += 1
            self.note(f"c{client} gets {outcome.value} for t{no} {reason}")

    # -- coordinators -----------------------------------------------------------------------

    def on_coordinator_message(self, c: int, kind: int, body: tuple[Any, ...]) -> None:
        attempts = self.attempts[c]
        if kind == Kind.EXECUTE:
            no = body[0]
            if no in attempts:
                return  # this replica is already executing it; its answer will come
            trade = self.trades[no]
            validate_trade(trade)
            if not self.cross[no]:
                attempts[no] = Attempt(no, None, self.now)
                self.send_local(c, attempts[no])
                return
            # A random delay before the prepares: a crash in it is a crash "before the prepares".
            attempts[no] = Attempt(no, self.rules.coordinator(trade, f"coordinator c{c}"),
                                   self.now + self.rng.choice((0, 0, 1, 3)))
            return
        no = body[0]
        attempt = attempts.get(no)
        if attempt is None:
            return
        coordinator = attempt.coordinator
        if kind == Kind.LOCAL_REPLY:
            if coordinator is None:
                self.reply(no, body[1], body[2])
                del attempts[no]
            return
        if coordinator is None:
            return
        if kind == Kind.PREPARE_REPLY:
            self.execute_actions(c, attempt, coordinator.on_prepare_reply(body[1], body[2]))
        elif kind == Kind.RECORD:
            if coordinator.phase is Phase.DECIDING:
                recorded: Decision = body[1]
                if not self.rules.adopt_recorded:
                    assert coordinator.proposal is not None
                    recorded = coordinator.proposal
                self.execute_actions(c, attempt, coordinator.on_decision(recorded))
        elif kind == Kind.SETTLE_ACK:
            side = body[1]
            if attempt.settle_next.pop(side, None) is not None:
                self.execute_actions(c, attempt, coordinator.on_settle_ack(side))

    def send_local(self, c: int, attempt: Attempt) -> None:
        trade = self.trades[attempt.no]
        attempt.local_tries += 1
        attempt.prepare_deadline = self.now + LOCAL_TIMEOUT
        self.send(self.first_coordinator + c, self.shard_of(trade.player_a), Kind.LOCAL, (attempt.no,))

    def reply(self, no: int, outcome: Outcome, reason: str) -> None:
        self.send(self.first_coordinator, -2 - self.trade_client[no], Kind.ANSWER, (no, outcome, reason))

    def execute_actions(self, c: int, attempt: Attempt, actions: list[Action]) -> None:
        """Execute a coordinator's actions, in order (the driver's job)."""
        src = self.first_coordinator + c
        no = attempt.no
        for action in actions:
            if isinstance(action, SendPrepare):
                self.send(src, self.shard_of(action.leg.player), Kind.PREPARE, (no, action.side, action.leg))
                attempt.prepare_deadline = self.now + PREPARE_TIMEOUT
            elif isinstance(action, ProposeDecision):
                self.send(src, self.store_address, Kind.CREATE, (no, action.decision))
                attempt.propose_next = self.now + STORE_RETRY
                attempt.propose_tries = 1
            elif isinstance(action, SendSettle):
                self.send_settle(src, attempt, action.side, action.outcome)
                attempt.settle_tries[action.side] = 1
            elif isinstance(action, Reply):
                self.reply(no, action.decision.outcome, action.decision.reason)
            elif isinstance(action, Retain):
                self.send(src, self.store_address, Kind.RETAIN, (no,))
            elif isinstance(action, Abandon):
                self.counters["abandoned"] += 1  # no answer: the client retries
        coordinator = attempt.coordinator
        if coordinator is not None and coordinator.phase is Phase.DONE:
            del self.attempts[c][no]

    def send_settle(self, src: int, attempt: Attempt, side: Side, outcome: Outcome) -> None:
        coordinator = attempt.coordinator
        assert coordinator is not None and coordinator.answer is not None
        leg = coordinator.leg(side)
        self.send(src, self.shard_of(leg.player), Kind.SETTLE,
                  (attempt.no, side, outcome, coordinator.answer.reason, leg.player))
        attempt.settle_next[side] = self.now + SETTLE_RETRY

    def tick_coordinator(self, c: int) -> None:
        now = self.now
        attempts = self.attempts[c]
        for attempt in list(attempts.values()):
            coordinator = attempt.coordinator
            if coordinator is None:
                if now >= attempt.prepare_deadline:
                    if attempt.local_tries < 2:
                        self.send_local(c, attempt)
                    else:
                        del attempts[attempt.no]
                continue
            phase = coordinator.phase
            if phase is Phase.NEW:
                if now >= attempt.begin_at:
                    self.execute_actions(c, attempt, coordinator.start())
            elif phase is Phase.PREPARING:
                if now >= attempt.prepare_deadline:
                    self.execute_actions(c, attempt, coordinator.on_prepare_timeout())
            elif phase is Phase.DECIDING:
                if now >= attempt.propose_next:
                    if attempt.propose_tries >= STORE_TRIES:
                        self.counters["proposals_lost"] += 1
                        del attempts[attempt.no]
                        continue
                    assert coordinator.proposal is not None
                    attempt.propose_tries += 1
                    attempt.propose_next = now + STORE_RETRY
                    self.send(self.first_coordinator + c, self.store_address, Kind.CREATE,
                              (attempt.no, coordinator.proposal))
            elif phase is Phase.SETTLING:
                for side, due in list(attempt.settle_next.items()):
                    if now < due:
                        continue
                    assert coordinator.answer is not None
                    if attempt.settle_tries[side] >= SETTLE_TRIES:
                        del attempt.settle_next[side]
                        self.counters["settles_failed"] += 1
                        self.execute_actions(c, attempt, coordinator.on_settle_failed(side))
                        if coordinator.phase is Phase.DONE:
                            break
                    else:
                        attempt.settle_tries[side] += 1
                        self.send_settle(self.first_coordinator + c, attempt, side, coordinator.answer.outcome)

    def crash_coordinator(self, c: int) -> None:
        for attempt in self.attempts[c].values():
            coordinator = attempt.coordinator
            if coordinator is None:
                continue
            phase = coordinator.phase
            if phase is Phase.NEW:
                self.counters["crash_before_prepare"] += 1
            elif phase in (Phase.PREPARING, Phase.DECIDING):
                self.counters["crash_between_prepare_and_decision"] += 1
            else:
                self.counters["crash_between_decision_and_commit"] += 1
        self.attempts[c] = {}
        self.coordinator_up[c] = False
        self.coordinator_restart_at[c] = self.now + self.rng.randrange(1, 25)
        self.counters["coordinator_crashes"] += 1
        self.note(f"coordinator c{c} crashes")
        self.event(60, c)

    # -- participants -----------------------------------------------------------------------

    def on_shard_message(self, s: int, src: int, kind: int, body: tuple[Any, ...]) -> None:
        if kind == Kind.PREPARE:
            self.on_prepare(s, src, body[0], body[1], body[2])
        elif kind == Kind.SETTLE:
            no, tag, outcome, reason, player = body
            if self.apply(s, no, player, outcome, reason):
                self.send(s, src, Kind.SETTLE_ACK, (no, tag))
        elif kind == Kind.RECORD:
            no, recorded = body
            if no in self.resolving[s]:
                del self.resolving[s][no]
                escrow = self.records[s].get(no)
                if escrow is not None and escrow.known.leg is not None:
                    self.apply(s, no, escrow.known.leg.player, recorded.outcome, recorded.reason)
        elif kind == Kind.LOCAL:
            self.on_local(s, src, body[0])
        elif kind == Kind.QUERY:
            no, leg, asker = body
            escrow = self.records[s].get(no)
            self.send(s, src, Kind.STATE, (no, leg, asker, escrow.known if escrow else None))

    def on_prepare(self, s: int, src: int, no: int, side: Side, leg: Leg) -> None:
        escrow = self.records[s].get(no)
        player = leg.player
        decision = self.rules.decide_prepare(leg, self.holdings(player, leg.receives, leg.counterpart),
                                             escrow.known if escrow else None)
        verdict = decision.verdict
        if verdict is PrepareVerdict.ESCROW:
            deadline = self.now + self.escrow_timeout
            self.records[s][no] = Escrow(Known(TradeState.PREPARED, leg), deadline)
            self.prepared[s][no] = deadline
            self.escrowed_items[player].update(leg.gives.item_ids)
            self.escrowed_gold[player] += leg.gives.gold
            self.checker.dirty = True
            self.counters["escrows"] += 1
            self.note(f"{self.shard_name(s)} escrows t{no} for {player} until {deadline}")
            reply = PrepareReply.prepared()
        elif verdict is PrepareVerdict.PREPARED:
            reply = PrepareReply.prepared(earlier=True)
        elif verdict is PrepareVerdict.DECIDED:
            assert decision.outcome is not None
            self.counters["prepares_decided"] += 1
            reply = PrepareReply.decided(decision.outcome, decision.reason)
        else:
            self.counters["refusals"] += 1
            reply = PrepareReply.refused(decision.reason)
        self.event(70, s, no, _SIDE_CODE[side], list(PrepareVerdict).index(verdict))
        self.send(s, src, Kind.PREPARE_REPLY, (no, side, reply))

    def apply(self, s: int, no: int, player: str, outcome: Outcome, reason: str) -> bool:
        """Apply the recorded ``outcome`` of trade ``no`` to ``player``'s leg here; True
        when the sender may count it as applied (acknowledge)."""
        escrow = self.records[s].get(no)
        known = escrow.known if escrow else None
        verdict = self.rules.decide_settle(known, outcome)
        trade_id = self.trades[no].trade_id
        shard = self.shard_name(s)
        self.event(71, s, no, list(SettleVerdict).index(verdict))
        if verdict is SettleVerdict.NOOP:
            return True
        if verdict in (SettleVerdict.CONFLICT, SettleVerdict.MISSING_ESCROW):
            self.checker.impossible(shard, player, trade_id, f"{verdict.name} for {outcome.value} over {known}")
            return False
        leg = known.leg if known is not None else None
        self.checker.applying(shard, player, trade_id, outcome, self.store.get(no), leg)
        if verdict is SettleVerdict.RECORD_ONLY:
            self.records[s][no] = Escrow(Known(TradeState.ABORTED, None, reason), 0)
            self.counters["records_only"] += 1
            self.note(f"{shard} records {outcome.value} for t{no} ({player}, no escrow)")
            return True
        assert leg is not None
        p = leg.player
        self.escrowed_items[p].difference_update(leg.gives.item_ids)
        self.escrowed_gold[p] -= leg.gives.gold
        if verdict is SettleVerdict.APPLY_COMMIT:
            self.items[p].difference_update(leg.gives.item_ids)
            self.items[p].update(leg.receives.item_ids)
            self.gold[p] += leg.receives.gold - leg.gives.gold
            state = TradeState.COMMITTED
            self.counters["commits_applied"] += 1
        else:
            state = TradeState.ABORTED
            self.counters["aborts_applied"] += 1
        self.records[s][no] = Escrow(Known(state, leg, reason), 0)
        self.prepared[s].pop(no, None)
        self.resolving[s].pop(no, None)
        self.note(f"{shard} applies {outcome.value} to t{no} for {p}")
        return True

    def on_local(self, s: int, src: int, no: int) -> None:
        trade = self.trades[no]
        a, b = trade.player_a, trade.player_b
        known = self.local[s].get(no)
        decision = self.rules.decide_local_trade(trade, self.holdings(a, trade.b_gives, b),
                                                 self.holdings(b, trade.a_gives, a), known)
        if known is None:
            self.local[s][no] = (decision.outcome, decision.reason)
            self.checker.local_decided(trade.trade_id, decision.outcome, decision.reason)
            if decision.outcome is Outcome.COMMITTED:
                for leg in (trade.leg_a(), trade.leg_b()):
                    self.items[leg.player].difference_update(leg.gives.item_ids)
                    self.items[leg.player].update(leg.receives.item_ids)
                    self.gold[leg.player] += leg.receives.gold - leg.gives.gold
            self.note(f"{self.shard_name(s)} decides same-shard t{no}: {decision.outcome.value} {decision.reason}")
        self.event(72, s, no, int(decision.outcome is Outcome.COMMITTED))
        self.send(s, src, Kind.LOCAL_REPLY, (no, decision.outcome, decision.reason))

    def tick_shard(self, s: int) -> None:
        """Termination: escrows past their deadline (or all, after a failover) ask the
        store for the decision, ABORTED-if-absent."""
        if not self.prepared[s]:
            return
        now = self.now
        settle_now = self.settle_now[s]
        records = self.records[s]
        for no, deadline in list(self.prepared[s].items()):
            escrow = records[no]
            if not self.rules.termination_due(escrow.known, min(deadline, now) if no in settle_now else deadline,
                                              now):
                continue
            if not self.rules.resolve_through_record:
                leg = escrow.known.leg
                assert leg is not None
                self.apply(s, no, leg.player, Outcome.ABORTED, ESCROW_REASON)
                continue
            if now < self.resolving[s].get(no, now):
                continue
            leg = escrow.known.leg
            assert leg is not None
            self.resolving[s][no] = now + RESOLVE_RETRY
            self.counters["resolves"] += 1
            self.send(s, self.store_address, Kind.RESOLVE, (no, leg, s))

    def crash_shard(self, s: int) -> None:
        self.shard_up[s] = False
        self.restart_at[s] = self.now + self.rng.randrange(3, 40)
        self.resolving[s] = {}
        self.settle_now[s] = set()
        self.counters["participant_crashes"] += 1
        self.note(f"{self.shard_name(s)} crashes holding {len(self.prepared[s])} escrow(s)")
        self.event(61, s)

    def restart_shard(self, s: int) -> None:
        self.shard_up[s] = True
        if self.rng.random() < 0.5:
            # A failover: the promoted primary settles every escrow it inherited at once.
            self.settle_now[s] = set(self.prepared[s])
            self.counters["failovers"] += 1
        self.note(f"{self.shard_name(s)} restarts ({'failover' if self.settle_now[s] else 'plain'})")
        self.event(62, s, len(self.settle_now[s]))

    # -- the decision store and the leader --------------------------------------------------

    def store_write(self, no: int, proposed: Decision) -> Decision:
        existing = self.store.get(no)
        recorded, written = self.rules.create_if_absent(existing, proposed)
        if written:
            self.store[no] = recorded
            self.written_at[no] = self.now
            self.unretained.setdefault(no, self.now)
            self.checker.recorded(recorded, existing)
            by_participant = recorded.decided_by.startswith("participant")
            self.counters["records_by_participant" if by_participant else "records_by_coordinator"] += 1
            self.note(f"store records t{no} {recorded.outcome.value} by {recorded.decided_by}: {recorded.reason}")
            self.event(73, no, int(recorded.outcome is Outcome.COMMITTED), int(by_participant))
        else:
            self.checker.check_record(recorded, self.trades[no].trade_id)
        return recorded

    def on_store_message(self, src: int, kind: int, body: tuple[Any, ...]) -> None:
        no = body[0]
        if kind == Kind.CREATE:
            self.send(self.store_address, src, Kind.RECORD, (no, self.store_write(no, body[1])))
        elif kind == Kind.RESOLVE:
            # The control plane's ResolveTrade: the record; else, asking the other side first
            # (while its shard has no primary, no answer: the participant asks again), the
            # termination's proposal.
            leg, shard = body[1], body[2]
            other = self.shard_of(leg.counterpart)
            if no in self.store or not self.rules.ask_counterpart:
                self.propose_termination(no, leg, shard, None)
            elif self.shard_up[other]:
                self.counters["counterparts_asked"] += 1
                self.send(self.store_address, other, Kind.QUERY, (no, leg, shard))
            else:
                self.counters["resolves_waiting"] += 1
        elif kind == Kind.STATE:
            self.propose_termination(no, body[1], body[2], body[3])
        elif kind == Kind.RETAIN:
            if self.unretained.pop(no, None) is not None:
                self.counters["retained"] += 1

    def propose_termination(self, no: int, leg: Leg, shard: int, counterpart: Known | None) -> None:
        """Create-if-absent of the termination's proposal for ``shard``'s escrow of ``leg``
        (``counterpart``: what the other side's shard holds); the record goes back."""
        who = participant_name(self.shard_name(shard))
        proposed = self.rules.termination_decision(leg, counterpart, decided_by=who, why=ESCROW_REASON)
        if proposed.outcome is Outcome.COMMITTED and no not in self.store:
            self.counters["recovered_commits"] += 1
        self.send(self.store_address, shard, Kind.RECORD, (no, self.store_write(no, proposed)))

    def restore_store(self) -> None:
        """etcd restored from a backup ``age`` ticks old: the records written since are
        lost. Every control-plane replica is down meanwhile (coordinators, the leader), and
        every message in flight was delivered or lost before it ends; callers retry."""
        age = self.restore_rng.randrange(1, 60)
        lost = sorted(no for no, at in self.written_at.items() if at > self.now - age)
        for no in lost:
            del self.store[no], self.written_at[no]
            self.unretained.pop(no, None)
        self.lost_records.update(lost)
        self.checker.records_lost([self.trades[no].trade_id for no in lost])
        for c in range(self.coordinators):
            if self.coordinator_up[c]:
                self.crash_coordinator(c)
        self.sweep_acks = {}
        self.leader_down_until = max(self.leader_down_until, self.now + self.restore_rng.randrange(5, 30))
        self.store_down_until = max(self.store_down_until, self.now + self.restore_rng.randrange(2, 20))
        self.net.drop_all()
        self.counters["restores"] += 1
        self.counters["records_lost"] += len(lost)
        self.note(f"the store is restored from a backup {age} ticks old: lost the records of {lost}")
        self.event(65, len(lost))

    def tick_leader(self) -> None:
        """The sweep: records without retention older than SWEEP_AGE get phase 2 again
        (idempotent settles); retained once both participants acknowledged."""
        if self.now % SWEEP_EVERY or self.now < self.leader_down_until or self.now < self.store_down_until:
            return
        for no, written_at in list(self.unretained.items()):
            if self.now - written_at < SWEEP_AGE:
                continue
            acks = self.sweep_acks.get(no, set())
            record = self.store[no]
            players = record.players or self.trades[no].players
            if len(acks) == len(players):
                del self.unretained[no]
                self.sweep_acks.pop(no, None)
                self.counters["retained"] += 1
                continue
            self.counters["swept"] += 1
            for index, player in enumerate(players):
                if index not in acks:
                    self.send(self.leader_address, self.shard_of(player), Kind.SETTLE,
                              (no, index, record.outcome, record.reason, player))

    def on_leader_message(self, kind: int, body: tuple[Any, ...]) -> None:
        if kind == Kind.SETTLE_ACK and body[0] in self.unretained:
            self.sweep_acks.setdefault(body[0], set()).add(body[1])

    # -- faults and the loop ----------------------------------------------------------------

    def update_faults(self) -> None:
        now = self.now
        for s in range(self.shards):
            if not self.shard_up[s] and (self.healing or now >= self.restart_at[s]):
                self.restart_shard(s)
        for c in range(self.coordinators):
            if not self.coordinator_up[c] and (self.healing or now >= self.coordinator_restart_at[c]):
                self.coordinator_up[c] = True
        if self.healing:
            self.store_down_until = min(self.store_down_until, now)
            self.leader_down_until = min(self.leader_down_until, now)
            return
        if self.restores and self.restore_rng.random() < RESTORE_P:
            self.restore_store()
            return
        if self.rng.random() >= self.fault_p:
            return
        kind = self.rng.random()
        if kind < 0.35:
            s = self.rng.randrange(self.shards)
            if self.shard_up[s]:
                self.crash_shard(s)
        elif kind < 0.75:
            busy = [c for c in range(self.coordinators) if self.coordinator_up[c] and self.attempts[c]]
            up = busy or [c for c in range(self.coordinators) if self.coordinator_up[c]]
            if up:
                self.crash_coordinator(self.rng.choice(up))
        elif kind < 0.9:
            self.store_down_until = now + self.rng.randrange(2, 20)
            self.counters["store_restarts"] += 1
            self.note(f"the store restarts, back at {self.store_down_until}")
            self.event(63)
        else:
            self.leader_down_until = now + self.rng.randrange(5, 50)
            self.sweep_acks = {}
            self.counters["leader_crashes"] += 1
            self.event(64)

    def deliver(self) -> None:
        store, leader, first_c = self.store_address, self.leader_address, self.first_coordinator
        for _, _, src, dst, kind, body in self.net.due(self.now):
            self.event(kind, src, dst)
            if dst < 0:
                self.on_answer(-2 - dst, body[0], body[1], body[2])
            elif dst < first_c:
                if self.shard_up[dst]:
                    self.on_shard_message(dst, src, kind, body)
            elif dst < store:
                if self.coordinator_up[dst - first_c]:
                    self.on_coordinator_message(dst - first_c, kind, body)
            elif dst == store:
                if self.now >= self.store_down_until:
                    self.on_store_message(src, kind, body)
            elif dst == leader and self.now >= self.leader_down_until:
                self.on_leader_message(kind, body)

    def step(self) -> None:
        self.checker.now = self.now
        self.update_faults()
        self.deliver()
        for c in range(self.coordinators):
            if self.coordinator_up[c] and self.attempts[c]:
                self.tick_coordinator(c)
        for s in range(self.shards):
            if self.shard_up[s]:
                self.tick_shard(s)
        self.tick_leader()
        for client in range(self.clients):
            self.tick_client(client)
        self.check()
        self.now += 1

    def check(self) -> None:
        checker = self.checker
        if checker.dirty:
            checker.check_conservation(self.items, self.gold, self.escrowed_items, self.escrowed_gold,
                                       self.player_shard)
        if self.healing:
            for s in range(self.shards):
                for no, deadline in self.prepared[s].items():
                    checker.check_escrow_age(self.shard_name(s), self.trades[no].trade_id, deadline,
                                             self.heal_at, I5_BOUND)

    def converged(self) -> bool:
        return (
            not any(self.prepared)
            and not self.unretained
            and all(no is None for no in self.client_trade)
            and self.net.in_flight() == 0
        )

    def check_healed(self) -> None:
        checker = self.checker
        checker.check_conservation(self.items, self.gold, self.escrowed_items, self.escrowed_gold,
                                   self.player_shard, exact=True)
        for no, record in self.store.items():
            checker.check_record(record, record.trade_id)
            trade = self.trades[no]
            states = []
            for player in trade.players:
                escrow = self.records[self.shard_of(player)].get(no)
                states.append(None if escrow is None else
                              Outcome.COMMITTED if escrow.known.state is TradeState.COMMITTED else
                              Outcome.ABORTED if escrow.known.state is TradeState.ABORTED else None)
            checker.check_settled(trade.trade_id, trade.players, states)
        for s in range(self.shards):
            for no, escrow in self.records[s].items():
                # A trade settled on both sides before its record was lost keeps no record
                # (nobody asks for it again); one-sided commits are caught above.
                if no not in self.store and not (no in self.lost_records
                                                 and escrow.known.state is not TradeState.PREPARED):
                    checker.fail(f"after healing {self.shard_name(s)} holds {escrow.known.state.value} for "
                                 f"t{no}, which has no decision record")

    def run(self) -> SimResult:
        checker = self.checker
        while self.now < self.steps and not checker.violations:
            self.step()
        if not checker.violations:
            self.healing = True
            self.heal_at = self.now
            self.net.config.drop_p = 0.0
            self.net.config.dup_p = 0.0
            self.note("HEAL: faults end, the network stops losing messages, clients finish")
            heal_until = self.now + HEAL_MAX_TICKS
            while not checker.violations and not self.converged():
                if self.now >= heal_until:
                    checker.fail(f"no convergence within {HEAL_MAX_TICKS} ticks of healing: {self.describe()}")
                    break
                self.step()
        if not checker.violations:
            self.check_healed()
        counters = self.counters
        counters["ticks"] = self.now
        counters["messages_sent"] = self.net.sent
        counters["messages_dropped"] = self.net.dropped
        counters["messages_duplicated"] = self.net.duplicated
        return SimResult(self.seed, list(checker.violations), counters, self.digest, self.now, self.trace or [])

    def describe(self) -> str:
        escrows = {self.shard_name(s): sorted(self.prepared[s]) for s in range(self.shards) if self.prepared[s]}
        waiting = [no for no in self.client_trade if no is not None]
        return (f"escrows {escrows}, unretained records {sorted(self.unretained)[:10]}, "
                f"clients waiting for {waiting}, {self.net.in_flight()} message(s) in flight")


def run_seed(seed: int, *, steps: int = DEFAULT_STEPS, breaks: str | None = None, trace: bool = False) -> SimResult:
    """Simulate one schedule: ``steps`` faulty ticks, then healing until convergence.

    Deterministic: the same (seed, steps, breaks) gives the same result and digest, in any
    process. ``breaks`` names a planted bug from :data:`tests.sim.trade_rules.BREAKS`;
    ``trace`` keeps a readable log of the notable events in ``SimResult.trace``.
    """
    return Sim(seed, steps, rules_for(breaks), trace).run()


@dataclass
class RangeResult:
    """Seeds ``start .. start+count-1`` run one after the other: summed counters, and the
    violations of each failing seed (ascending)."""

    counters: dict[str, int]
    failures: list[tuple[int, list[str]]]


def run_range(start: int, count: int, *, steps: int = DEFAULT_STEPS, breaks: str | None = None) -> RangeResult:
    """Run a range of seeds in this process (the unit of work of a multiprocessing pool)."""
    counters: dict[str, int] = {}
    failures: list[tuple[int, list[str]]] = []
    for seed in range(start, start + count):
        result = run_seed(seed, steps=steps, breaks=breaks)
        for name, value in result.counters.items():
            counters[name] = counters.get(name, 0) + value
        if result.violations:
            failures.append((seed, result.violations))
    return RangeResult(counters, failures)
