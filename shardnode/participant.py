"""The shard node's side of trades (flow 6): Prepare, Commit, Abort, same-shard trades,
ListTrades, and the termination rule that settles escrows nobody came back for.

Why this module exists: the rules are pure (:mod:`bluemarble.core.trades.participant`);
this is their driver on the primary. Every change is one write through the data plane's
STRONG write path (epoch check, self-fencing, group commit, replicated as a log entry),
so a trade's state is exactly as durable as the inventories it changes.

Deciding without races: a decision reads the player's holdings and the trade id's record
from storage *plus the writes of the shard queued for the next group commit and not yet
flushed* (:meth:`DataPlane.pending_ops`), and queues its own write in the same event-loop
turn (no ``await`` between the read and the queueing). So two Prepares of one item can
never both escrow it, with or without group commit. Storage checks the op again inside
the transaction (:mod:`shardnode.storage.trades`): should the two ever disagree, the write
is refused (FailedPrecondition) rather than applied.

Acknowledging a settle: Prepare and same-shard trades answer once a replica holds their
entry (STRONG); Commit and Abort answer after the primary's local commit, without waiting
for a replica. What makes that safe is the decision record, not the settle's entry: the
escrow it settles is already replicated (Prepare was STRONG), so a primary that dies
before its settle reaches a replica leaves a promoted replica holding the escrow PREPARED,
and the termination rule below applies the recorded outcome there (docs/decisions.md,
"Commit and Abort answer after the local commit").

Termination: on every shard this node serves as primary, a PREPARED escrow past its
deadline (:func:`~bluemarble.core.trades.participant.termination_due`) makes the node ask
the control plane for the decision (``TradeCoordinator.ResolveTrade``: the record, or
ABORTED written if absent) and apply it as a settle write. The shard node never decides
an outcome itself. A newly promoted primary runs the rule as soon as it serves, and
settles at once the escrows it inherited whose trade is decided already (ResolveTrade
``if_decided``, which writes nothing); the others wait for their deadline. Until that
lookup is done, the players of those escrows get UNAVAILABLE (retry): their trade may
have been answered COMMITTED, and what they hold must not show, or be traded, as before.
A lookup that fails (no control plane answers) is tried again, the players still held.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass

import grpc.aio
import structlog

from bluemarble.api.conversions import (
    leg_from_proto,
    leg_to_proto,
    offer_from_proto,
    offer_to_proto,
    participant_state_to_proto,
)
from bluemarble.client.control_plane import ControlPlaneClient, to_error
from bluemarble.core import limits, validation
from bluemarble.core.errors import (
    BlueMarbleError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from bluemarble.core.ids import PlayerId, ShardId, shard_index
from bluemarble.core.limits import echo
from bluemarble.core.trades import (
    REUSED_TRADE_ID,
    SETTLE_CONTRADICTS,
    Holdings,
    Known,
    Leg,
    Outcome,
    PrepareVerdict,
    SettleVerdict,
    Trade,
    TradeState,
    decide_local_trade,
    decide_prepare,
    decide_settle,
    state_for,
    termination_due,
    validate_leg,
    validate_trade,
)
from bluemarble.runtime import background, metrics, retry
from bluemarble.runtime.clock import run_with_timeout
from bluemarble.v1 import common_pb2, shardnode_pb2, trade_pb2
from shardnode.dataplane import DataPlane, ShardState
from shardnode.storage import trades as stored
from shardnode.storage.records import GRANT, TAKE

log = structlog.get_logger(__name__)

DEFAULT_ESCROW_TIMEOUT_S = 5.0
MAX_LIST_TRADES = 1000
RESOLVE_CALL_TIMEOUT_S = 3.0
"""One ResolveTrade call: an etcd read, the other side's ListTrades (up to 1 s) and the
create-if-absent."""
RESOLVE_POLICY = retry.RetryPolicy(initial_s=0.1, max_backoff_s=1.0, deadline_s=8.0, max_attempts=6)
"""One termination attempt: a few ResolveTrade calls, each on the next control-plane
address after a failure, with jittered backoff. A trade whose attempt fails is tried again
by the loop (after its own jittered delay), so an escrow is settled once the control plane
is back (I5)."""
MAX_INHERITED_LOOKUPS = 4096
"""Inherited escrows a new term looks up at once (and holds the players of); more wait
for their deadline's termination, as every escrow beyond it did before."""
MAX_CONCURRENT_RESOLVES = 64
INHERITED_LOOKUP_POLICY = retry.RetryPolicy(initial_s=0.2, max_backoff_s=2.0, deadline_s=None)
"""Between the tries of an inherited escrow's lookup that failed (each try is a few
ResolveTrade calls: :data:`RESOLVE_POLICY`)."""
REFUSED_SETTLE_LOG_INTERVAL_S = 10.0
"""At most one error line per kind of refused settle in this many seconds."""
IN_DOUBT_REFRESH_S = 5.0
"""How often the termination loop recounts the escrows for the in-doubt gauge."""


@dataclass(frozen=True)
class _View:
    """What the participant knows of a trade id on one shard: the durable record plus the
    writes queued for the next group commit."""

    known: Known | None
    cross_shard: bool = True
    deadline_ms: int = 0


class Participant:
    """See the module docstring. Single-threaded: everything runs on the event loop."""

    def __init__(
        self,
        dataplane: DataPlane,
        control_plane: ControlPlaneClient | None,
        *,
        escrow_timeout_s: float = DEFAULT_ESCROW_TIMEOUT_S,
        check_interval_s: float | None = None,
        rng: random.Random | None = None,
    ):
        if escrow_timeout_s <= 0:
            raise InvalidArgument(f"escrow timeout is {escrow_timeout_s} s; it must be positive")
        self._dp = dataplane
        self._client = control_plane
        self._clock = dataplane.clock
        self._refused_settles = retry.LogThrottle(REFUSED_SETTLE_LOG_INTERVAL_S)  # by kind
        self.escrow_timeout_ms = int(escrow_timeout_s * 1000)
        self._interval_s = check_interval_s or min(1.0, max(0.05, escrow_timeout_s / 5))
        self._rng = rng or random.Random()
        self._resolving: dict[tuple[ShardId, str], asyncio.Task[None]] = {}
        self._lookup_slots = asyncio.Semaphore(MAX_CONCURRENT_RESOLVES)  # inherited escrows' lookups
        self._next_try_s: dict[tuple[ShardId, str], float] = {}
        # Terminations go wrong together (etcd out of space or unreachable: every escrow
        # fails each round): one warning, then a summary every few seconds, not one a try.
        self._termination_failures = retry.FailureLog()
        self._lookup_failures = retry.FailureLog()  # inherited escrows' lookups, per shard
        self._asking = retry.LogThrottle(interval_s=5.0)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._in_doubt_at_s = -IN_DOUBT_REFRESH_S
        dataplane.on_serving = self._on_serving

    # ---- lifecycle ----

    async def start(self) -> None:
        self._task = background.start(self._termination_loop(), "trade-termination")

    async def stop(self) -> None:
        await background.stop(self._task)
        for task in list(self._resolving.values()):
            await background.stop(task)
        self._resolving.clear()

    def _on_serving(self, shard: ShardId) -> None:
        """A new term as primary: the escrows it inherited whose trade is decided already
        are settled at once (a primary that died between its Commit's answer and the
        settle's replication leaves one; its items would stay escrowed until the
        deadline). The undecided ones wait for their deadline: their coordinator may be
        deciding them right now."""
        self._wake.set()
        if self._client is None:
            return
        # Every inherited escrow's player waits for its lookup (DataPlane.hold_while_settling),
        # or for the termination already resolving it; at most MAX_CONCURRENT_RESOLVES
        # lookups run at once (the rest queue on the semaphore, their players held).
        for record in self._dp.storage.prepared_trades([shard], limit=MAX_INHERITED_LOOKUPS):
            key = (record.shard_id, record.trade_id)
            running = self._resolving.get(key)
            task = running or background.start(self._settle_if_decided(record), f"inherited-{record.trade_id[:40]}")
            if record.leg is not None:
                player = PlayerId(record.leg.player)
                self._dp.hold_while_settling(record.shard_id, player, record.trade_id)
                task.add_done_callback(
                    lambda _t, r=record, p=player: self._dp.release_settled(r.shard_id, p, r.trade_id)  # type: ignore[misc]
                )
            if running is None:
                self._resolving[key] = task
                task.add_done_callback(lambda _t, key=key: self._resolving.pop(key, None))  # type: ignore[misc]

    async def _settle_if_decided(self, record: stored.TradeRecord) -> None:
        """Looks an inherited escrow's trade up, and settles it if it is decided. The
        player stays held (the caller's done callback releases it) until the lookup has
        an answer: a lookup that fails (no control plane answers) is tried again, with
        jittered backoff, for as long as this node leads the shard and the escrow is
        held. Releasing the player then would show it, and let it trade, as it was before
        a trade its caller may have been told is COMMITTED."""
        backoff = retry.Backoff(INHERITED_LOOKUP_POLICY, self._clock)
        key = f"inherited {record.shard_id}"
        while True:
            try:
                async with self._lookup_slots:
                    await self._look_up_inherited(record)
            except BlueMarbleError as e:
                if not (e.retryable and self._still_inherited(record)):
                    log.info("inherited escrow not settled at once; its deadline settles it",
                             trade_id=record.trade_id, shard=record.shard_id, error=str(e))
                    return
                delay_s = backoff.next_delay_s()
                self._lookup_failures.failed(
                    key, self._clock.monotonic_s(), "inherited escrow's trade not looked up yet; its player waits",
                    trade_id=record.trade_id, shard=record.shard_id, error=str(e), retry_in_s=round(delay_s, 2))
                await self._clock.sleep(delay_s)
                if self._still_inherited(record):
                    continue
                return
            if backoff.failures:
                self._lookup_failures.recovered(key, self._clock.monotonic_s(), "inherited escrows looked up again",
                                                shard=record.shard_id)
            return

    async def _look_up_inherited(self, record: stored.TradeRecord) -> None:
        """One lookup of an inherited escrow's trade; the decision applied if there is one."""
        decision = await self.decided(record.shard_id, record.trade_id, record.leg)
        if decision is None:
            log.debug("inherited escrow not decided yet; its deadline settles it", trade_id=record.trade_id,
                      shard=record.shard_id)
            return
        outcome, reason = decision
        state = await self.settle(record.trade_id, record.shard_id, 0, outcome, reason=reason)
        log.info("inherited escrow settled", trade_id=record.trade_id, shard=record.shard_id, outcome=outcome.name,
                 state=shardnode_pb2.ParticipantTradeState.Name(state))

    def _still_inherited(self, record: stored.TradeRecord) -> bool:
        """Whether this node still leads the escrow's shard and the escrow is still held."""
        if record.shard_id not in self._dp.led_shards():
            return False
        now = self._dp.storage.trade(record.shard_id, record.trade_id)
        return now is not None and now.state is TradeState.PREPARED

    # ---- views (storage + queued writes) ----

    def _view(self, shard: ShardId, trade_id: str) -> _View:
        record = self._dp.storage.trade(shard, trade_id)
        view = (
            _View(None)
            if record is None
            else _View(record.known(), record.cross_shard, record.deadline_ms)
        )
        for op in self._dp.pending_ops(shard):
            kind = op.WhichOneof("op")
            if kind == stored.TRADE_PREPARE and op.trade_prepare.trade_id == trade_id:
                p = op.trade_prepare
                view = _View(Known(TradeState.PREPARED, leg_from_proto(trade_id, p.leg)), True, p.deadline_ms)
            elif kind == stored.TRADE_SETTLE and op.trade_settle.trade_id == trade_id:
                outcome = stored.outcome_from_proto(op.trade_settle.outcome, "a queued settle")
                leg = view.known.leg if view.known is not None else None
                view = _View(Known(state_for(outcome), leg, op.trade_settle.reason), True, view.deadline_ms)
            elif kind == stored.LOCAL_TRADE and op.local_trade.trade_id == trade_id:
                t = op.local_trade
                outcome = stored.outcome_from_proto(t.outcome, "a queued local trade")
                leg = Leg(
                    trade_id,
                    t.player_a,
                    offer_from_proto(t.a_gives),
                    offer_from_proto(t.b_gives),
                    t.player_b,
                )
                view = _View(Known(state_for(outcome), leg, t.reason), False)
        return view

    def _holdings(self, shard: ShardId, player: str, receiving: Sequence[str] = ()) -> Holdings:
        """The player's holdings, with what queued writes take away counted as escrowed
        (queued escrows, items and gold a queued same-shard trade gives). What queued
        writes would add is left out of the items and gold (a decision on it could only
        refuse, never double-spend; the apply's own checks refuse a second copy of an item
        id), but the gold they would add counts as incoming, against the 2^53 cap.
        ``receiving``: the item ids a cross-shard leg receives, checked against the other
        players of the shard (core ``check_leg``)."""
        base = self._dp.storage.holdings(shard, PlayerId(player), receiving)
        escrowed: set[str] = set()
        arriving: set[str] = set()
        escrowed_gold = incoming_gold = incoming_items = 0
        touched = False  # a queued write concerns the player (it also creates the player)
        for op in self._dp.pending_ops(shard):
            kind = op.WhichOneof("op")
            if op.player_id != player and kind != stored.LOCAL_TRADE:
                continue  # a local trade is queued under its player A: B may be the one asked about
            if kind == stored.TRADE_PREPARE and op.trade_prepare.leg.player_id == player:
                escrowed.update(op.trade_prepare.leg.gives.item_ids)
                escrowed_gold += op.trade_prepare.leg.gives.gold
                incoming_gold += op.trade_prepare.leg.receives.gold
                incoming_items += len(op.trade_prepare.leg.receives.item_ids)
                arriving.update(op.trade_prepare.leg.receives.item_ids)
            elif kind == stored.LOCAL_TRADE and op.local_trade.outcome == common_pb2.TRADE_OUTCOME_COMMITTED:
                t = op.local_trade
                for giver, offer, received in ((t.player_a, t.a_gives, t.b_gives), (t.player_b, t.b_gives, t.a_gives)):
                    if giver == player:
                        escrowed.update(offer.item_ids)
                        escrowed_gold += offer.gold
                        incoming_gold += received.gold
                        incoming_items += len(received.item_ids)
                        arriving.update(received.item_ids)
                        touched = True
            elif kind == GRANT:
                incoming_gold += op.grant.gold
                incoming_items += len(op.grant.item_ids)
                arriving.update(op.grant.item_ids)
            elif kind == TAKE:  # what a queued take removes is not there to give
                escrowed.update(op.take.item_ids)
                escrowed_gold += op.take.gold
            touched = touched or op.player_id == player
        if not touched:
            return base  # the common case: nothing queued for this player, nothing to copy
        return Holdings(base.items, base.gold, base.escrowed_items | escrowed, base.escrowed_gold + escrowed_gold,
                        base.held_by_others, base.incoming_gold + incoming_gold, True,
                        base.incoming_items + incoming_items, base.arriving_items | arriving)

    # ---- checks ----

    def _shard_of(self, player: str, named: str) -> ShardId:
        shard = self._dp.shard_for(PlayerId(player))
        if named:
            _check_shard(named)
            if named != shard:
                raise FailedPrecondition(
                    f"player {echo(player)} belongs to {shard} in node {self._dp.node_id}'s ring, not {echo(named)}; "
                    "re-resolve the player and retry"
                )
        return shard

    async def _settled_answer(self, state: ShardState, timeout_s: float, what: str) -> None:
        """Before answering from a record (a retry), wait until everything this node wrote
        so far is replicated: the record may come from a write not acknowledged yet."""
        await self._dp.wait_committed(state, state.last.lsn, timeout_s, what)

    # ---- Prepare ----

    async def prepare(self, request: shardnode_pb2.PrepareRequest, timeout_s: float) -> shardnode_pb2.PrepareResponse:
        """Phase one for one leg (module docstring; notes/trades.md). Raises
        InvalidArgument (malformed; trade id reused with other terms), FailedPrecondition
        (not the primary, stale epoch, the player not of this shard), Unavailable."""
        trade_id = validation.request_id(request.trade_id, "trade_id")
        if len(request.legs) != 1:
            raise InvalidArgument(f"legs lists {len(request.legs)} legs; a Prepare carries exactly one (this shard's)")
        leg = _check_leg(leg_from_proto(trade_id, request.legs[0]))
        shard = self._shard_of(leg.player, request.shard_id)
        state = self._dp.writable(shard, request.epoch)
        self._dp.check_not_settling(shard, leg.player)
        view = self._view(shard, trade_id)
        decision = decide_prepare(leg, self._holdings(shard, leg.player, leg.receives.item_ids), view.known)
        response = shardnode_pb2.PrepareResponse(epoch=state.epoch)
        what = f"prepare of trade {echo(trade_id, 40)}"
        if decision.verdict is PrepareVerdict.ESCROW:
            now_ms = self._clock.wall_ms()
            deadline_ms = now_ms + self.escrow_timeout_ms
            op = shardnode_pb2.WriteOp(
                player_id=leg.player,
                trade_prepare=shardnode_pb2.TradePrepareOp(
                    trade_id=trade_id, leg=leg_to_proto(leg), prepared_at_ms=now_ms, deadline_ms=deadline_ms
                ),
            )
            result = await self._dp.write(state, op)  # queued in this turn: no await before it
            # Success paths log at debug: a line per trade per node at hundreds of trades/s
            # is a log-volume and CPU cost; refusals and anomalies stay at info and above.
            log.debug("trade escrowed", trade_id=trade_id, shard=shard, player=leg.player, lsn=result.lsn)
            await self._dp.wait_committed(state, result.lsn, timeout_s, what)
            response.vote, response.prepared = shardnode_pb2.TRADE_VOTE_PREPARED, True
            response.deadline_ms = deadline_ms
            return response
        if decision.verdict is PrepareVerdict.CONFLICT:
            raise InvalidArgument(f"trade id {echo(trade_id)}: {REUSED_TRADE_ID} on {shard}; choose a new trade id")
        if decision.verdict is PrepareVerdict.REFUSED:
            log.info("trade prepare refused", trade_id=trade_id, shard=shard, reason=decision.reason,
                     pending=decision.pending or None)
            response.vote, response.reason = shardnode_pb2.TRADE_VOTE_REFUSED, decision.reason
            response.refused_pending = decision.pending
            return response
        await self._settled_answer(state, timeout_s, what)
        if decision.verdict is PrepareVerdict.PREPARED:
            response.vote, response.prepared = shardnode_pb2.TRADE_VOTE_PREPARED, True
            response.deadline_ms, response.escrowed_before = view.deadline_ms, True
            return response
        assert decision.outcome is not None
        response.vote, response.reason = shardnode_pb2.TRADE_VOTE_DECIDED, decision.reason
        response.outcome = stored.outcome_to_proto(decision.outcome)
        return response

    # ---- Commit / Abort ----

    async def settle(
        self, trade_id: str, shard_id: str, epoch: int, outcome: Outcome, reason: str = ""
    ) -> shardnode_pb2.ParticipantTradeState:
        """Applies the recorded ``outcome`` of ``trade_id`` on ``shard_id`` (idempotent).
        Returns the state afterwards (COMMITTED/ABORTED) once this primary has committed
        it locally: it does not wait for a replica (module docstring: the decision record,
        with the replicated escrow and the termination rule, makes the outcome final).
        Raises FailedPrecondition for a conflicting settle or a COMMITTED without escrow
        here (nothing changes; logged), and as :meth:`prepare` for the rest."""
        validation.request_id(trade_id, "trade_id")
        shard = _check_shard(shard_id)
        state = self._dp.writable(shard, epoch)
        view = self._view(shard, trade_id)
        verdict = decide_settle(view.known, outcome)
        if verdict is SettleVerdict.NOOP:
            return participant_state_to_proto(state_for(outcome))
        if verdict is SettleVerdict.CONFLICT:
            assert view.known is not None
            self._refused_settle(
                "conflict", "conflicting settle refused: the trade already applied the other outcome",
                trade_id=trade_id, shard=shard, applied=view.known.state.name, asked=outcome.name,
            )
            raise FailedPrecondition(
                f"trade {echo(trade_id)} is already {view.known.state.name} on {shard}; "
                f"{outcome.name} is refused ({SETTLE_CONTRADICTS})"
            )
        if verdict is SettleVerdict.MISSING_ESCROW:
            self._refused_settle("missing-escrow", "COMMITTED for a trade with no escrow here: refused",
                                 trade_id=trade_id, shard=shard)
            raise FailedPrecondition(
                f"trade {echo(trade_id)} holds no escrow on {shard}; COMMITTED is refused "
                "(committing would create items: the escrow was lost)"
            )
        leg = view.known.leg if view.known is not None else None
        op = shardnode_pb2.WriteOp(
            player_id=leg.player if leg is not None else "",
            trade_settle=shardnode_pb2.TradeSettleOp(
                trade_id=trade_id,
                outcome=stored.outcome_to_proto(outcome),
                reason=reason[: limits.MAX_ECHO_CHARS * 4] if reason else "",
                settled_at_ms=self._clock.wall_ms(),
            ),
        )
        try:
            result = await self._dp.write(state, op)
        except stored.EntryRefused as e:
            if outcome is Outcome.COMMITTED:
                # The trade is decided and its other side may have applied it: until this
                # side does, an item is in two inventories or none (an item id minted twice
                # elsewhere, a grant that raced it). Retrying cannot help: an operator must.
                self._refused_settle(
                    "cannot-apply", "a COMMITTED trade cannot apply on this shard; its escrow stays until an "
                    "operator resolves the conflict", trade_id=trade_id, shard=shard, error=str(e), level="error",
                )
            raise
        log.debug("trade settled", trade_id=trade_id, shard=shard, outcome=outcome.name, verdict=verdict.name,
                  lsn=result.lsn)
        return participant_state_to_proto(state_for(outcome))

    # ---- same-shard trades ----

    def _refused_settle(self, kind: str, event: str, *, level: str = "warning", **fields: object) -> None:
        """A warning line for a settle that contradicts what this shard applied: a bug of
        ours, a lost escrow, or a caller that is not the coordinator (any client can send
        one to a node without mutual TLS, so it is no error of the node's). At most one per
        kind every :data:`REFUSED_SETTLE_LOG_INTERVAL_S` (with the number held back since),
        so a caller repeating it cannot flood the log or page an operator a thousand times."""
        held_back = self._refused_settles.allow(kind, self._clock.monotonic_s())
        if held_back is None:
            log.debug(event, **fields)
        else:
            (log.error if level == "error" else log.warning)(event, held_back_since_last=held_back, **fields)

    async def execute_local_trade(
        self, request: shardnode_pb2.ExecuteLocalTradeRequest, timeout_s: float
    ) -> shardnode_pb2.ExecuteLocalTradeResponse:
        """A trade between two players of this shard: one decision, one write (ABORTED ones
        recorded too). Raises InvalidArgument (malformed terms, trade id reused),
        FailedPrecondition (players not both of this shard, not the primary...)."""
        trade = Trade(
            request.trade_id,
            request.player_a,
            request.player_b,
            offer_from_proto(request.a_gives),
            offer_from_proto(request.b_gives),
        )
        validate_trade(trade)
        shard = self._shard_of(trade.player_a, request.shard_id)
        other = self._dp.shard_for(PlayerId(trade.player_b))
        if other != shard:
            raise FailedPrecondition(
                f"players {echo(trade.player_a)} ({shard}) and {echo(trade.player_b)} ({other}) are on different "
                "shards; use TradeCoordinator.ExecuteTrade"
            )
        state = self._dp.writable(shard, request.epoch)
        self._dp.check_not_settling(shard, trade.player_a)
        self._dp.check_not_settling(shard, trade.player_b)
        view = self._view(shard, trade.trade_id)
        response = shardnode_pb2.ExecuteLocalTradeResponse(trade_id=trade.trade_id)
        if view.known is not None:
            # The same exchange with A and B named the other way round is the same trade, as
            # the coordinator judges a cross-shard retry (Trade.same_exchange).
            if view.cross_shard or view.known.leg is None or not view.known.leg.trade().same_exchange(trade):
                raise InvalidArgument(
                    f"trade id {echo(trade.trade_id)}: {REUSED_TRADE_ID} on {shard}; choose a new trade id"
                )
            await self._settled_answer(state, timeout_s, f"trade {echo(trade.trade_id, 40)}")
            outcome = Outcome.COMMITTED if view.known.state is TradeState.COMMITTED else Outcome.ABORTED
            response.outcome, response.reason, response.replayed = (
                stored.outcome_to_proto(outcome),
                view.known.reason,
                True,
            )
            return response
        decision = decide_local_trade(
            trade, self._holdings(shard, trade.player_a), self._holdings(shard, trade.player_b), None
        )
        op = shardnode_pb2.WriteOp(
            player_id=trade.player_a,
            local_trade=shardnode_pb2.LocalTradeOp(
                trade_id=trade.trade_id,
                player_a=trade.player_a,
                player_b=trade.player_b,
                a_gives=offer_to_proto(trade.a_gives),
                b_gives=offer_to_proto(trade.b_gives),
                outcome=stored.outcome_to_proto(decision.outcome),
                reason=decision.reason,
                settled_at_ms=self._clock.wall_ms(),
            ),
        )
        result = await self._dp.write(state, op)
        (log.debug if decision.outcome is Outcome.COMMITTED else log.info)(
            "local trade", trade_id=trade.trade_id, shard=shard, outcome=decision.outcome.name,
            reason=decision.reason, lsn=result.lsn)
        await self._dp.wait_committed(state, result.lsn, timeout_s, f"trade {echo(trade.trade_id, 40)}")
        metrics.count_trade(False, decision.outcome is Outcome.COMMITTED)
        response.outcome, response.reason = stored.outcome_to_proto(decision.outcome), decision.reason
        if decision.outcome is Outcome.ABORTED:
            response.abort_cause = (common_pb2.TRADE_ABORT_CAUSE_CONTENDED if decision.pending
                                    else common_pb2.TRADE_ABORT_CAUSE_REFUSED)
        return response

    # ---- ListTrades ----

    def list_trades(self, request: shardnode_pb2.ListTradesRequest) -> shardnode_pb2.ListTradesResponse:
        """Records of the shards this node leads (or of ``shard_id`` only, which it must
        lead: FailedPrecondition otherwise): one trade id's, or the PREPARED ones (oldest
        first). At most ``limit`` (default and cap 1000)."""
        limit = min(request.limit or MAX_LIST_TRADES, MAX_LIST_TRADES)
        led = self._dp.led_shards()
        if request.shard_id:
            shard = _check_shard(request.shard_id)
            if shard not in led:
                raise FailedPrecondition(
                    f"node {self._dp.node_id} is not the primary of {shard} now; ask the shard's primary "
                    "(its assignment moved, or this node was fenced)")
            led = [shard]
        if request.trade_id:
            trade_id = validation.request_id(request.trade_id, "trade_id")
            records = self._dp.storage.trade_records(trade_id, led)[:limit]
        else:
            records = self._dp.storage.prepared_trades(led, limit=limit)
        return shardnode_pb2.ListTradesResponse(trades=[r.to_proto(self._dp.node_id) for r in records])

    # ---- termination ----

    async def _termination_loop(self) -> None:
        while True:
            try:
                self.check_due()
                self.refresh_in_doubt()
            except BlueMarbleError as e:
                log.warning("termination check failed; retrying", error=str(e))
            self._wake.clear()
            try:
                await run_with_timeout(self._clock, self._wake.wait(), self._interval_s)
            except TimeoutError:
                pass

    def refresh_in_doubt(self, force: bool = False) -> int:
        """Sets ``bluemarble_trades_in_doubt`` to the escrows (PREPARED legs) past their
        deadline on the shards this node leads, at most every :data:`IN_DOUBT_REFRESH_S`
        unless ``force``, and returns it (-1 when not refreshed). Escrows within their
        deadline are trades in flight (hundreds a second under load): counted, the alert
        would page a healthy cluster. Counted up to :data:`MAX_LIST_TRADES`: past that the
        alert fires anyway, and a bounded read keeps the loop cheap."""
        now_s = self._clock.monotonic_s()
        if not force and now_s - self._in_doubt_at_s < IN_DOUBT_REFRESH_S:
            return -1
        self._in_doubt_at_s = now_s
        led = self._dp.led_shards()
        held = len(self._dp.storage.prepared_trades(led, due_by_ms=self._clock.wall_ms(), limit=MAX_LIST_TRADES)
                   ) if led else 0
        metrics.TRADES_IN_DOUBT.set(held)
        return held

    def check_due(self) -> int:
        """Starts a resolution for every escrow past its deadline on the shards this node
        serves as primary (none twice at once). Returns how many it started."""
        now_s = self._clock.monotonic_s()
        # A back-off that has run out means nothing more than no entry: dropping those here
        # bounds the map (an escrow settled meanwhile by its coordinator's Commit or Abort,
        # or a shard that moved away, is never visited again).
        for key in [key for key, at_s in self._next_try_s.items() if at_s <= now_s]:
            del self._next_try_s[key]
        shards = self._dp.led_shards(serving=True)
        if not shards:
            return 0
        now_ms = self._clock.wall_ms()
        started = 0
        room = MAX_CONCURRENT_RESOLVES - len(self._resolving)
        for record in self._dp.storage.prepared_trades(shards, due_by_ms=now_ms, limit=max(room, 0)):
            key = (record.shard_id, record.trade_id)
            if key in self._resolving or self._next_try_s.get(key, 0.0) > now_s:
                continue
            if not termination_due(record.known(), record.deadline_ms, now_ms):
                continue
            task = background.start(self._terminate(record), f"terminate-{record.trade_id[:40]}")
            self._resolving[key] = task
            task.add_done_callback(lambda _t, key=key: self._resolving.pop(key, None))  # type: ignore[misc]
            started += 1
        return started

    @property
    def backing_off(self) -> int:
        """Escrows whose termination failed and waits before it is tried again."""
        return len(self._next_try_s)

    async def _terminate(self, record: stored.TradeRecord) -> None:
        key = (record.shard_id, record.trade_id)
        late_ms = self._clock.wall_ms() - record.deadline_ms
        held_back = self._asking.allow("asking", self._clock.monotonic_s())
        (log.debug if held_back is None else log.info)(
            "escrow past its deadline; asking for the decision", trade_id=record.trade_id, shard=record.shard_id,
            late_ms=late_ms, others_since_last=held_back or None,
        )
        try:
            outcome, reason = await self.resolve(record.shard_id, record.trade_id, "escrow past its deadline",
                                                 record.leg, wait_for_counterpart=True)
            state = await self.settle(record.trade_id, record.shard_id, 0, outcome, reason=reason)
        except BlueMarbleError as e:
            delay_s = self._rng.uniform(0.5, 1.5) * max(self._interval_s, 0.5)
            self._next_try_s[key] = self._clock.monotonic_s() + delay_s
            self._termination_failures.failed(
                "terminate", self._clock.monotonic_s(), "escrow not settled yet; will retry",
                trade_id=record.trade_id, shard=record.shard_id, error=str(e), retry_in_s=round(delay_s, 2),
                escrows_waiting=len(self._next_try_s),
            )
            return
        self._next_try_s.pop(key, None)
        if not self._next_try_s:
            self._termination_failures.recovered("terminate", self._clock.monotonic_s(),
                                                 "escrows settle by termination again")
        log.info("escrow settled by termination", trade_id=record.trade_id, shard=record.shard_id,
                 outcome=outcome.name, state=shardnode_pb2.ParticipantTradeState.Name(state))

    async def resolve(self, shard: ShardId, trade_id: str, why: str, leg: Leg | None = None, *,
                      wait_for_counterpart: bool = False) -> tuple[Outcome, str]:
        """The decision of ``trade_id`` for the escrow of ``leg`` held here (ResolveTrade:
        when no record exists, one is written: COMMITTED if the other side's shard applied
        COMMITTED, else ABORTED; ABORTED for a leg that is not part of the recorded trade,
        which an attempt reusing the trade id for other terms leaves), asked of the
        control-plane replicas in turn with jittered, bounded retries. With
        ``wait_for_counterpart``, an other side that cannot be asked is an error, not an
        ABORTED. Raises Unavailable (or the last error) when none answered."""
        answer = await self._ask(shard, trade_id, why, leg, if_decided=False,
                                 wait_for_counterpart=wait_for_counterpart)
        outcome = stored.outcome_from_proto(answer.outcome, f"ResolveTrade answer for {echo(trade_id)}")
        log.info("trade resolved", trade_id=trade_id, shard=shard, outcome=outcome.name, created=answer.created)
        return outcome, answer.reason

    async def decided(self, shard: ShardId, trade_id: str, leg: Leg | None) -> tuple[Outcome, str] | None:
        """The recorded decision of ``trade_id`` for the escrow of ``leg``, None when
        there is none yet (ResolveTrade with ``if_decided``: nothing is written)."""
        answer = await self._ask(shard, trade_id, "inherited by a new primary", leg, if_decided=True)
        if answer.outcome == common_pb2.TRADE_OUTCOME_UNSPECIFIED:
            return None
        return stored.outcome_from_proto(answer.outcome, f"ResolveTrade answer for {echo(trade_id)}"), answer.reason

    async def _ask(self, shard: ShardId, trade_id: str, why: str, leg: Leg | None, *,
                   if_decided: bool, wait_for_counterpart: bool = False) -> trade_pb2.ResolveTradeResponse:
        """ResolveTrade, asked of the control-plane replicas in turn with jittered,
        bounded retries. Raises Unavailable (or the last error) when none answered."""
        client = self._client
        if client is None:
            raise Unavailable("no control plane to resolve trades with")
        request = trade_pb2.ResolveTradeRequest(trade_id=trade_id, shard_id=shard, node_id=self._dp.node_id, reason=why,
                                                if_decided=if_decided, wait_for_counterpart=wait_for_counterpart)
        if leg is not None:
            request.leg.CopyFrom(leg_to_proto(leg))

        async def attempt() -> trade_pb2.ResolveTradeResponse:
            address = client.current_address
            stub = client.trades()

            async def call() -> trade_pb2.ResolveTradeResponse:
                answer: trade_pb2.ResolveTradeResponse = await stub.ResolveTrade(
                    request, timeout=RESOLVE_CALL_TIMEOUT_S
                )
                return answer

            try:
                return await run_with_timeout(self._clock, call(), RESOLVE_CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as e:
                error = to_error(e, address)
                if error.retryable:
                    client.rotate(away_from=address)
                raise error from e
            except TimeoutError as e:
                client.rotate(away_from=address)
                raise DeadlineExceeded(f"control plane {address} did not answer ResolveTrade in time") from e

        # One key for every trade: when resolving fails, it fails for all of them at once
        # (the control plane or etcd is out of reach), and one episode is logged, not one
        # per escrow (the termination's own log names each trade).
        answer: trade_pb2.ResolveTradeResponse = await retry.call(
            attempt, what="resolve trades", policy=RESOLVE_POLICY, clock=self._clock, expected=True)
        return answer


def _check_shard(value: str) -> ShardId:
    try:
        shard_index(ShardId(value))
    except ValueError as e:
        raise InvalidArgument(f"shard_id: {e}") from e
    return ShardId(value)


def _check_leg(leg: Leg) -> Leg:
    """A leg's ids, items and gold, as the coordinator validated the trade (InvalidArgument)."""
    return validate_leg(leg, "legs[0]")

