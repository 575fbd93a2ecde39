"""The trade coordinator (flow 6): the TradeCoordinator servicer, the asyncio driver of
the pure coordinator state machine, and the leader's sweep of unfinished phase 2.

Why this module exists: every control-plane replica coordinates trades, statelessly. The
rules of one attempt (prepare both legs, propose, adopt the *recorded* decision, settle,
answer) are :class:`bluemarble.core.trades.coordinator.Coordinator`'s; this module only
executes its actions: RPCs to the shard primaries (found through this replica's ring and
assignment mirrors, like ResolvePlayer), the one etcd transaction of the decision
(:class:`controlplane.store.trade_store.TradeStore`), and the retention of the record.

Same-shard trades are one ``ShardNode.ExecuteLocalTrade`` on the shard's primary: no
etcd write. Cross-shard ones write one etcd record on the critical path (the decision);
attaching it to its retention lease is batched, afterwards.

Where a shard has no primary when a trade starts, the trade is refused with UNAVAILABLE
before anything is sent or written (retryable: the same trade id may commit once the
failover is done); a participant that fails or times out in prepare makes the decision
ABORTED (docs/decisions.md: "Trades: no primary is UNAVAILABLE, a failed prepare is
ABORTED").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
import structlog

from bluemarble.api.conversions import (
    cause_from_proto,
    cause_to_proto,
    leg_from_proto,
    leg_to_proto,
    offer_from_proto,
    offer_to_proto,
    participant_state_from_proto,
)
from bluemarble.core import limits, validation
from bluemarble.core.errors import (
    BlueMarbleError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    from_status_name,
)
from bluemarble.core.ids import NodeId, ShardId, shard_index
from bluemarble.core.limits import echo
from bluemarble.core.ring import Ring
from bluemarble.core.trades import coordinator as rules
from bluemarble.core.trades.decision import outcome_for_leg
from bluemarble.core.trades.model import (
    AbortCause,
    Decision,
    Leg,
    Outcome,
    Trade,
    participant_name,
    validate_leg,
    validate_trade,
)
from bluemarble.core.trades.participant import (
    REUSED_TRADE_ID,
    SETTLE_CONTRADICTS,
    Known,
    termination_decision,
)
from bluemarble.runtime import background, channels, frames, metrics, multiplex, retry, tracing
from bluemarble.runtime.auth import ServerAuth
from bluemarble.runtime.channels import channel as open_channel
from bluemarble.runtime.clock import Clock, SystemClock, run_with_timeout, wait_event
from bluemarble.v1 import common_pb2, shardnode_pb2, shardnode_pb2_grpc, trade_pb2, trade_pb2_grpc
from controlplane.server.election import Election
from controlplane.server.trade_batch import ItemFailed, NodeBatcher
from controlplane.store.keys import KeySchema
from controlplane.store.trade_store import StoredTrade, TradeStore
from controlplane.store.watchcache import PrefixCache

log = structlog.get_logger(__name__)

T = TypeVar("T")
Ctx = grpc.aio.ServicerContext[Any, Any]

MAX_LIST = limits.MAX_IN_DOUBT_TRADES
"""ListInDoubtTrades' default and cap."""
_SETTLED = frozenset({shardnode_pb2.PARTICIPANT_TRADE_STATE_COMMITTED, shardnode_pb2.PARTICIPANT_TRADE_STATE_ABORTED})
"""A participant's states once its side of a trade is applied."""
MAX_REASON_CHARS = 200
"""A ResolveTrade reason is kept to this many characters in the record."""
MIN_ATTEMPT_S = 0.01
"""A prepare retry with less time than this left is not sent: the prepare has timed out."""


CRASH_AT_ENV = "BLUEMARBLE_TRADE_CRASH_AT"
"""A failpoint for end-to-end tests, off unless set: ``before-prepare``, ``after-prepare``
(the prepares answered, no decision written) or ``after-decision`` (recorded, no commit
sent). A coordinator reaching that step of a cross-shard trade exits at once with status
137, as a SIGKILL would leave it: the only way to crash a real process between two
awaits. Read at every step, so a test can arm it in the environment of one replica."""


def crash_point(step: str) -> None:
    """Exits the process at ``step`` when :data:`CRASH_AT_ENV` names it (see there)."""
    if os.environ.get(CRASH_AT_ENV) == step:
        log.warning("trade failpoint: exiting", step=step)
        os._exit(137)


MAX_TRADES_RUNNING = 256
"""Trades one control-plane replica runs at once (ExecuteTrade calls, including those
whose callers went away); past it, RESOURCE_EXHAUSTED (the client retries with backoff,
on another replica). It bounds the replica's work in hand, not its memory: callers that
gave up after 20 ms left their trades running, and 4,096 of them held the event loop so
long that heartbeats went unanswered, nodes stopped taking writes and shards failed over.
256 trades are under a second of a replica's CPU on a small machine; at 2,000 trades a
second of 20 ms each, 40 run at once."""


class IdInUse(InvalidArgument):
    """A participant already knows the trade id with other terms: the attempt ends
    INVALID_ARGUMENT without a decision. ``prepared``: the sides that escrowed for it."""

    def __init__(self, message: str, prepared: Sequence[rules.Side] = ()):
        super().__init__(message)
        self.prepared = tuple(prepared)


@dataclass(frozen=True)
class TradeSettings:
    """Bounds of the coordinator's calls, in seconds, and the sweep's schedule."""

    prepare_timeout_s: float = 2.0
    """Both prepares must answer within this; a side that has not is unavailable (ABORTED)."""
    settle_call_timeout_s: float = 1.0
    """One Commit/Abort call."""
    settle_deadline_s: float = 3.0
    """All attempts of one side's Commit/Abort (retries with jitter, following redirects)."""
    local_trade_deadline_s: float = 3.0
    """All attempts of a same-shard trade's ExecuteLocalTrade."""
    read_timeout_s: float = 1.0
    """One ListTrades call of GetTrade / ListInDoubtTrades / the sweep."""
    retention_s: int = 24 * 3600
    sweep_interval_s: float = 15.0
    sweep_min_age_s: float = 60.0
    """The sweep leaves records younger than this to their coordinator."""
    sweep_batch: int = 500
    """Records one sweep pass handles at most."""
    sweep_full_scan_every: int = 240
    """One sweep pass in this many (and the first) reads every record instead of the
    unretained copies: about an hour at the default interval."""
    sweep_concurrency: int = 16


# ---- conversions between messages and the core's values ----

_OUTCOME_TO_PROTO = {
    Outcome.COMMITTED: common_pb2.TRADE_OUTCOME_COMMITTED,
    Outcome.ABORTED: common_pb2.TRADE_OUTCOME_ABORTED,
}
_OUTCOME_FROM_PROTO = {v: k for k, v in _OUTCOME_TO_PROTO.items()}


def outcome_to_proto(outcome: Outcome) -> common_pb2.TradeOutcome:
    return _OUTCOME_TO_PROTO[outcome]


def outcome_from_proto(value: int, where: str) -> Outcome:
    """The outcome of a message field; BlueMarbleError naming ``where`` when unset/unknown."""
    outcome: Outcome | None = _OUTCOME_FROM_PROTO.get(value)  # type: ignore[call-overload]
    if outcome is None:
        raise BlueMarbleError(f"{where} holds no trade outcome ({value})")
    return outcome


def trade_from_request(r: trade_pb2.ExecuteTradeRequest) -> Trade:
    return Trade(r.trade_id, r.player_a, r.player_b, offer_from_proto(r.a_gives), offer_from_proto(r.b_gives))


def trade_to_request(t: Trade) -> trade_pb2.ExecuteTradeRequest:
    return trade_pb2.ExecuteTradeRequest(
        trade_id=t.trade_id, player_a=t.player_a, player_b=t.player_b,
        a_gives=offer_to_proto(t.a_gives), b_gives=offer_to_proto(t.b_gives),
    )


def decision_of(record: trade_pb2.TradeRecord) -> Decision:
    players = (record.request.player_a, record.request.player_b) if record.request.player_a else ()
    return Decision(
        record.trade_id, outcome_from_proto(record.outcome, f"trade record {record.trade_id}"),
        record.reason, record.decided_by, players, cause_from_proto(record.abort_cause),
    )


def same_terms(record: trade_pb2.TradeRecord, trade: Trade) -> bool:
    """The record was written for ``trade``, whichever player it names A (a record without
    terms, written by a participant's termination, matches any trade of its id)."""
    if not record.request.trade_id:
        return True
    return trade_from_request(record.request).same_exchange(trade)


# ---- where the participants are ----


@dataclass(frozen=True)
class Primary:
    """The primary of a shard, as this replica's mirrors know it now."""

    shard: ShardId
    epoch: int
    node: NodeId
    address: str


class Locator:
    """Player -> shard -> primary through this replica's mirrors (no etcd read)."""

    def __init__(self, keys: KeySchema, ring: PrefixCache[Ring], assignments: PrefixCache[common_pb2.Assignment],
                 nodes: PrefixCache[common_pb2.Node]):
        self._keys, self._ring, self._assignments, self._nodes = keys, ring, assignments, nodes

    def shard_of(self, player: str) -> ShardId:
        ring = self._ring.entries.get(self._keys.ring())
        if ring is None:
            raise Unavailable("the ring is not loaded yet; retry shortly")
        return ring.shard_for(player)

    def is_member(self, shard: ShardId, node: str) -> bool:
        """Whether ``node`` is the primary or a replica of ``shard`` in this replica's mirror."""
        a = self._assignments.entries.get(self._keys.assignment(shard))
        return a is not None and (a.primary == node or node in a.replicas)

    def primary(self, shard: ShardId) -> Primary:
        """Unavailable naming the shard when it has no primary with a known address."""
        a = self._assignments.entries.get(self._keys.assignment(shard))
        if a is None or not a.primary:
            raise Unavailable(f"shard {shard} has no primary right now (failover in progress?); retry shortly")
        record = self._nodes.entries.get(self._keys.node(NodeId(a.primary)))
        if record is None or not record.address:
            raise Unavailable(f"shard {shard}'s primary {a.primary} is not registered; retry shortly")
        return Primary(shard, a.epoch, NodeId(a.primary), record.address)

    def of_player(self, player: str) -> Primary:
        return self.primary(self.shard_of(player))

    def nodes(self) -> dict[NodeId, str]:
        """Every registered node and its address."""
        return {NodeId(n.node_id): n.address for n in self._nodes.entries.values() if n.address}

    def primaries(self) -> dict[NodeId, str]:
        """Every node that is the primary of some shard, and its address."""
        registered = self.nodes()
        named = {NodeId(a.primary) for a in self._assignments.entries.values() if a.primary}
        return {n: registered[n] for n in sorted(named) if n in registered}

    def unled(self) -> list[ShardId]:
        """The shards with no registered primary in this replica's mirrors."""
        registered = self.nodes()
        return sorted(
            (ShardId(a.shard_id) for a in self._assignments.entries.values()
             if not a.primary or NodeId(a.primary) not in registered),
            key=shard_index,
        )


class NodeChannels:
    """One cached channel and stub per node address (trades are frequent: a channel per
    call would cost a connection set-up each, and a stub per call builds a callable for
    every method of the service: about 5 % of the coordinator's CPU per trade), at most
    ``max_channels``; the least recently used is closed past that. Built by
    :func:`bluemarble.runtime.channels.channel`."""

    def __init__(self, max_channels: int = 1024):
        self._max = max_channels
        self._channels: collections.OrderedDict[
            str, tuple[grpc.aio.Channel, shardnode_pb2_grpc.ShardNodeStub]] = collections.OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        self._batchers: dict[tuple[str, bool], NodeBatcher] = {}

    def batcher(self, address: str, *, settle: bool) -> NodeBatcher:
        """The node's Prepare calls (``settle=False``) or its Commit/Abort calls, batched
        when they pile up (:mod:`controlplane.server.trade_batch`). Two batchers per node:
        a Commit, which waits only for the node's local commit, must not queue behind
        Prepares waiting for their replication. Its stub follows this cache."""
        key = (address, settle)
        batcher = self._batchers.get(key)
        if batcher is None:
            if len(self._batchers) >= 2 * self._max:
                self._batchers.pop(next(iter(self._batchers)))
            batcher = self._batchers[key] = NodeBatcher(
                lambda: self.stub(address), stream_to="" if tracing.enabled() else address
            )
        return batcher

    def stub(self, address: str) -> shardnode_pb2_grpc.ShardNodeStub:
        entry = self._channels.get(address)
        if entry is not None and channels.outdated(entry[0]):
            # Built before the TLS files rotated: it would present the old certificate
            # when it reconnects. New calls go on a new channel (the batchers follow the
            # stub); the old one is dropped (see channels.outdated).
            del self._channels[address]
            entry = None
        if entry is None:
            channel = open_channel(address)
            entry = channel, shardnode_pb2_grpc.ShardNodeStub(channel)  # type: ignore[no-untyped-call]
            self._channels[address] = entry
            if len(self._channels) > self._max:
                _, (old, _) = self._channels.popitem(last=False)
                task = background.start(old.close(1.0), "close-node-channel")
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        else:
            self._channels.move_to_end(address)
        return entry[1]

    async def close(self) -> None:
        for batcher in list(self._batchers.values()):
            await batcher.close()
        self._batchers.clear()
        channels = [channel for channel, _ in self._channels.values()]
        self._channels = collections.OrderedDict()
        for channel in channels:
            await channel.close(None)
        for task in list(self._closing):
            await background.stop(task)


def _rpc_error(e: grpc.aio.AioRpcError, where: str) -> BlueMarbleError:
    return from_status_name(e.code().name, f"{where}: {e.code().name} {echo(e.details() or '', 200)}")


def _settle_retryable(error: BaseException) -> bool:
    """Commit/Abort errors worth another attempt: the node unreachable or slow, or not the
    primary (any more): the next attempt goes to the primary the mirror knows then."""
    return isinstance(error, Unavailable | DeadlineExceeded | FailedPrecondition) or retry.is_retryable(error)


# ---- the driver of one trade ----


@dataclass(frozen=True)
class TradeAnswer:
    decision: Decision
    cross_shard: bool


class TradeCoordinator:
    """Runs trades: :meth:`execute`, :meth:`settle` (also for the sweep), :meth:`resolve`."""

    def __init__(self, replica_id: str, locator: Locator, store: TradeStore, clock: Clock,
                 settings: TradeSettings, channels: NodeChannels | None = None):
        self.replica_id = replica_id
        self.name = f"coordinator {replica_id}"
        self._locate = locator
        self._store = store
        self._clock = clock
        # etcd down fails every trade's decision alike: one warning, then summaries.
        self._record_failures = retry.FailureLog()
        self.settings = settings
        self.channels = channels or NodeChannels()
        self._running: set[asyncio.Task[TradeAnswer]] = set()
        self._running_ids: collections.Counter[str] = collections.Counter()

    @property
    def locator(self) -> Locator:
        return self._locate

    async def _call(self, primary: Primary, what: str,
                    rpc: Callable[[shardnode_pb2_grpc.ShardNodeStub, float], Awaitable[T]], timeout_s: float) -> T:
        """``rpc`` on ``primary``'s channel within ``timeout_s``; errors as BlueMarbleError
        naming the shard and the node."""
        stub = self.channels.stub(primary.address)
        try:
            if type(self._clock) is SystemClock:
                # The call's own gRPC deadline bounds it on the real clock: no second timer.
                return await rpc(stub, timeout_s)

            async def call() -> T:
                return await rpc(stub, timeout_s)

            return await run_with_timeout(self._clock, call(), timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _rpc_error(e, f"{what} on {primary.shard} (node {primary.node})") from e
        except ItemFailed as e:
            raise from_status_name(
                e.code, f"{what} on {primary.shard} (node {primary.node}): {e.code} {echo(e.details, 200)}"
            ) from e
        except TimeoutError as e:
            within = f"{timeout_s:.1f} s" if timeout_s >= 1 else f"{timeout_s * 1000:.0f} ms"
            raise DeadlineExceeded(
                f"{what} on {primary.shard} (node {primary.node}): no answer within {within}") from e

    # ---- ExecuteTrade ----

    async def execute_for_caller(self, trade: Trade) -> TradeAnswer:
        """:meth:`execute` for a caller that may go away: the trade runs on to its answer
        even if the caller cancels (its deadline passed, it disconnected), so an escrow it
        made is settled now, not held until its participant's termination (seconds, the
        items and gold unusable meanwhile). The caller's retry with the same trade id gets
        the same answer. At most :data:`MAX_TRADES_RUNNING` run at once on a replica;
        past that, ResourceExhausted."""
        if len(self._running) >= MAX_TRADES_RUNNING:
            raise ResourceExhausted(
                f"this control-plane replica already runs {MAX_TRADES_RUNNING} trades; "
                "retry shortly (with the same trade id) or on another replica"
            )
        task = asyncio.ensure_future(self.execute(trade))
        self._running.add(task)
        self._running_ids[trade.trade_id] += 1
        task.add_done_callback(functools.partial(self._finished, trade.trade_id))
        return await asyncio.shield(task)

    def running(self, trade_id: str) -> bool:
        """Whether this replica is running ``trade_id`` now (it may have sent nothing yet)."""
        return trade_id in self._running_ids

    def _finished(self, trade_id: str, task: asyncio.Task[TradeAnswer]) -> None:
        self._running.discard(task)
        self._running_ids[trade_id] -= 1
        if self._running_ids[trade_id] <= 0:
            del self._running_ids[trade_id]
        if not task.cancelled():
            task.exception()  # its caller may be gone: the error was logged or answered already

    async def execute(self, trade: Trade) -> TradeAnswer:
        """Runs ``trade`` (validated here: InvalidArgument) to its answer. Same shard: one
        ExecuteLocalTrade. Cross-shard: 2PC with the decision recorded in etcd.

        Raises Unavailable when a player's shard has no primary (nothing was sent or
        written) or when etcd cannot record the decision (the caller retries the same
        trade id; the participants' termination releases the escrows meanwhile);
        InvalidArgument when the trade id's record holds another trade's terms.
        """
        validate_trade(trade)
        shard_a, shard_b = self._locate.shard_of(trade.player_a), self._locate.shard_of(trade.player_b)
        try:
            primary_a, primary_b = self._locate.primary(shard_a), self._locate.primary(shard_b)
        except Unavailable:
            # Nothing sent: a recorded decision (an earlier attempt's) still answers.
            stored = await self._store.get(trade.trade_id) if shard_a != shard_b else None
            if stored is None:
                raise
            self._check_terms(stored.record, trade)
            return TradeAnswer(decision_of(stored.record), True)
        if shard_a == shard_b:
            return TradeAnswer(await self._local(trade, shard_a), False)
        return TradeAnswer(await self._cross(trade, primary_a, primary_b), True)

    def _check_terms(self, record: trade_pb2.TradeRecord, trade: Trade) -> None:
        if not same_terms(record, trade):
            raise InvalidArgument(
                f"trade id {echo(trade.trade_id)} was already used for a different trade "
                f"(between {echo(record.request.player_a)} and {echo(record.request.player_b)}); "
                "choose a new trade id"
            )

    async def _local(self, trade: Trade, shard: ShardId) -> Decision:
        request = shardnode_pb2.ExecuteLocalTradeRequest(
            trade_id=trade.trade_id, shard_id=shard, player_a=trade.player_a, player_b=trade.player_b,
            a_gives=offer_to_proto(trade.a_gives), b_gives=offer_to_proto(trade.b_gives),
        )

        async def attempt() -> shardnode_pb2.ExecuteLocalTradeResponse:
            primary = self._locate.primary(shard)
            request.epoch = primary.epoch
            response: shardnode_pb2.ExecuteLocalTradeResponse = await self._call(
                primary, "ExecuteLocalTrade", lambda s, t: s.ExecuteLocalTrade(request, timeout=t),
                self.settings.settle_call_timeout_s * 2,
            )
            return response

        policy = retry.RetryPolicy(initial_s=0.05, max_backoff_s=0.5, deadline_s=self.settings.local_trade_deadline_s)
        try:
            response = await retry.call(attempt, what=f"local trade {trade.trade_id}", policy=policy,
                                            clock=self._clock, retry_if=_settle_retryable, expected=True)
        except InvalidArgument as e:
            if REUSED_TRADE_ID not in str(e):
                raise
            # Worded as on the cross-shard path: one answer for one mistake.
            raise InvalidArgument(
                f"trade id {echo(trade.trade_id)} was already used for a different trade on {shard}; "
                "choose a new trade id"
            ) from e
        except FailedPrecondition as e:
            # The shard's primary kept moving under us (a failover or handoff outlasting
            # our retries): nothing was decided, the caller should simply retry.
            raise Unavailable(
                f"{shard}'s primary moved during trade {echo(trade.trade_id)} ({e}); retry with the same trade id"
            ) from e
        outcome = outcome_from_proto(response.outcome, f"{shard}'s ExecuteLocalTrade answer")
        # Not counted here: the primary that executed it counts it, once, whoever asked
        # (bluemarble_trades_total sums to the cluster's trades over every process).
        # One line per trade at 500 trades/s is a log-volume problem: successes at debug,
        # refusals (and replays: a caller retried) at info.
        (log.debug if outcome is Outcome.COMMITTED and not response.replayed else log.info)(
            "local trade", trade_id=trade.trade_id, shard=shard, outcome=outcome.name, reason=response.reason,
            replayed=response.replayed)
        # A same-shard trade is ABORTED only when its shard refuses it (the node says why;
        # not in a replayed answer).
        cause = cause_from_proto(response.abort_cause)
        if outcome is Outcome.ABORTED and cause is AbortCause.UNKNOWN and not response.replayed:
            cause = AbortCause.REFUSED  # a node of an earlier release
        return Decision(trade.trade_id, outcome, response.reason, f"participant {shard}", trade.players, cause)

    async def _cross(self, trade: Trade, primary_a: Primary, primary_b: Primary) -> Decision:
        """Drives :class:`~bluemarble.core.trades.coordinator.Coordinator` for ``trade``."""
        coordinator = rules.Coordinator(trade, self.name)
        shards = {rules.Side.A: primary_a.shard, rules.Side.B: primary_b.shard}
        primaries = {rules.Side.A: primary_a, rules.Side.B: primary_b}
        actions: collections.deque[rules.Action] = collections.deque(coordinator.start())
        answer: Decision | None = None
        stored: StoredTrade | None = None
        started_s = self._clock.monotonic_s()
        while actions:
            prepares = [a for a in actions if isinstance(a, rules.SendPrepare)]
            if prepares:
                crash_point("before-prepare")
                actions = collections.deque(a for a in actions if not isinstance(a, rules.SendPrepare))
                phase_s = self._clock.monotonic_s()
                try:
                    actions.extend(await self._prepare_all(coordinator, prepares, primaries))
                except IdInUse as e:
                    self._release(trade.trade_id, e.prepared, shards)
                    raise
                metrics.PHASE_PREPARE.observe(self._clock.monotonic_s() - phase_s)
                continue
            settles = [a for a in actions if isinstance(a, rules.SendSettle)]
            if settles:
                crash_point("after-decision")
                actions = collections.deque(a for a in actions if not isinstance(a, rules.SendSettle))
                phase_s = self._clock.monotonic_s()
                results = await asyncio.gather(
                    *(self.settle(shards[s.side], trade.trade_id, s.outcome) for s in settles)
                )
                metrics.PHASE_COMMIT.observe(self._clock.monotonic_s() - phase_s)
                for s, acked in zip(settles, results, strict=True):
                    actions.extend(coordinator.on_settle_ack(s.side) if acked else coordinator.on_settle_failed(s.side))
                continue
            action = actions.popleft()
            if isinstance(action, rules.ProposeDecision):
                crash_point("after-prepare")
                phase_s = self._clock.monotonic_s()
                try:
                    stored = await self._record(trade, action.decision, shards)
                except InvalidArgument:
                    self._release(trade.trade_id, [side for side, reply in coordinator.replies.items()
                                                   if reply.kind is rules.ReplyKind.PREPARED], shards)
                    raise
                metrics.PHASE_DECIDE.observe(self._clock.monotonic_s() - phase_s)
                actions.extend(coordinator.on_decision(decision_of(stored.record)))
            elif isinstance(action, rules.Reply):
                answer = action.decision
            elif isinstance(action, rules.Retain) and stored is not None:
                self._store.retain(trade.trade_id, stored.create_revision)
            elif isinstance(action, rules.Abandon):
                answer = await self._abandon(trade, action.reason)
        assert answer is not None, "the coordinator ended without an answer"
        metrics.PHASE_TOTAL.observe(self._clock.monotonic_s() - started_s)
        metrics.count_trade(True, answer.outcome is Outcome.COMMITTED)
        (log.debug if answer.outcome is Outcome.COMMITTED else log.info)(
            "trade", trade_id=trade.trade_id, outcome=answer.outcome.name, reason=answer.reason,
                 shard_a=primary_a.shard, shard_b=primary_b.shard, decided_by=answer.decided_by)
        return answer

    async def _abandon(self, trade: Trade, reason: str) -> Decision:
        """The attempt ends without a proposal (:class:`~bluemarble.core.trades.coordinator.Abandon`):
        the recorded decision if there is one (an earlier attempt's; its phase 2 is the
        sweep's and the participants' termination's, as the sides did not answer), else
        Unavailable: the caller retries the trade id."""
        stored = await self._store.get(trade.trade_id)
        if stored is not None:
            self._check_terms(stored.record, trade)
            return decision_of(stored.record)
        # At info: the caller is told to retry, and after an outage every retry meeting a
        # side without a primary yet ends here (an outside drill counted hundreds).
        log.info("trade not decided: a side did not answer and the other holds an escrow from an earlier "
                 "attempt (or did not answer either)", trade_id=trade.trade_id, reason=reason)
        raise Unavailable(f"trade {echo(trade.trade_id)} was not decided: {reason}; retry with the same trade id")

    def _release(self, trade_id: str, prepared: Iterable[rules.Side], shards: dict[rules.Side, ShardId]) -> None:
        """Aborts, in the background, the escrows this attempt made (``prepared``: the
        sides that answered PREPARED to it), once its trade id turned out to name another
        trade. Safe: such a participant holds an escrow of *these* terms, which no record
        covers, so no record can commit it (the termination rule would release it too,
        once past its deadline: ``outcome_for_leg``); this frees the items and gold
        sooner, and without a record in etcd."""
        for side in prepared:
            shard = shards[side]

            async def release(shard: ShardId = shard) -> None:
                if not await self.settle(shard, trade_id, Outcome.ABORTED):
                    log.info("escrow of a reused trade id left to its participant's termination",
                             trade_id=trade_id, shard=shard)

            background.start(release(), f"release-{trade_id[:40]}-{shard}")

    async def _prepare_all(self, coordinator: rules.Coordinator, prepares: Sequence[rules.SendPrepare],
                           primaries: dict[rules.Side, Primary]) -> list[rules.Action]:
        """Sends every prepare at once and feeds the answers as they come; stops waiting
        as soon as the coordinator has moved on (one refusal decides). Each prepare ends
        within the prepare timeout (a late one answers UNAVAILABLE)."""
        tasks = {
            asyncio.ensure_future(self._prepare(primaries[p.side], p.leg, self.settings.prepare_timeout_s)): p.side
            for p in prepares
        }
        out: list[rules.Action] = []
        try:
            pending = set(tasks)
            while pending and coordinator.phase is rules.Phase.PREPARING:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    try:
                        reply = task.result()
                    except IdInUse as e:
                        # Every prepare must answer first: an escrow this attempt made is
                        # aborted here, not left to a termination that would write a record.
                        if pending:
                            await asyncio.wait(pending)
                        prepared = [tasks[t] for t in tasks if t is not task and not t.cancelled()
                                    and t.exception() is None and t.result().kind is rules.ReplyKind.PREPARED]
                        raise IdInUse(str(e), prepared) from e
                    out.extend(coordinator.on_prepare_reply(tasks[task], reply))
            if coordinator.phase is rules.Phase.PREPARING:  # not reached: every prepare answers
                out.extend(coordinator.on_prepare_timeout())
        finally:
            for task in tasks:
                task.cancel()
        return out

    async def _prepare(self, primary: Primary, leg: Leg, timeout_s: float) -> rules.PrepareReply:
        """One Prepare, as the coordinator's :class:`PrepareReply` (never raises: any
        failure is UNAVAILABLE naming the shard; a participant refusing the terms
        (INVALID_ARGUMENT, e.g. a trade id reused with other terms) is REFUSED)."""
        # A primary that moved (not the primary any more, a stale epoch, becoming the
        # primary) is followed within the prepare timeout, as settles are: a failover or
        # a planned handoff during the trade should not abort it. A Prepare is idempotent
        # by trade id and terms, so a second one to a node that got the first is harmless.
        deadline_s = self._clock.monotonic_s() + timeout_s
        leg_proto = leg_to_proto(leg)
        target = primary
        refusal: BlueMarbleError | None = None  # the last answer that was a refusal, not silence

        async def attempt() -> shardnode_pb2.PrepareResponse:
            nonlocal target, refusal
            left_s = deadline_s - self._clock.monotonic_s()
            if left_s <= MIN_ATTEMPT_S:  # an attempt this short could only time out
                raise DeadlineExceeded(
                    f"Prepare on {primary.shard} (node {target.node}): no answer within {timeout_s:.1f} s")
            request = shardnode_pb2.PrepareRequest(
                trade_id=leg.trade_id, shard_id=target.shard, epoch=target.epoch, legs=[leg_proto]
            )
            try:
                answer: shardnode_pb2.PrepareResponse = await self._call(
                    target, "Prepare",
                    lambda s, t: self.channels.batcher(target.address, settle=False).prepare(request, t), left_s,
                )
                return answer
            except (FailedPrecondition, Unavailable, DeadlineExceeded) as e:
                if not isinstance(e, DeadlineExceeded):
                    refusal = e
                with contextlib.suppress(BlueMarbleError):
                    target = self._locate.primary(primary.shard)  # the next attempt goes where the mirror says
                raise

        policy = retry.RetryPolicy(initial_s=0.05, max_backoff_s=0.3, deadline_s=timeout_s)
        try:
            response = await retry.call(attempt, what=f"prepare {leg.trade_id} on {primary.shard}",
                                            policy=policy, clock=self._clock, retry_if=_settle_retryable,
                                            expected=True)
        except InvalidArgument as e:
            if REUSED_TRADE_ID in str(e):
                # The id already names another trade on that shard: this attempt must not
                # write a decision for it (an ABORTED record would contradict what the
                # shard applied, and stand for the id's retention).
                raise IdInUse(
                    f"trade id {echo(leg.trade_id)} was already used for a different trade on {primary.shard}; "
                    "choose a new trade id"
                ) from e
            return rules.PrepareReply.refused(f"{primary.shard} refused the leg of {leg.player}: {e}")
        except BlueMarbleError as e:
            reason = str(e)
            if isinstance(e, DeadlineExceeded) and refusal is not None:
                # The time ran out on a late attempt; the shard's own answer (a full disk,
                # a primary that moved) says more than "no answer".
                reason = f"{refusal} (still so after {timeout_s:.1f} s)"
            log.info("prepare failed", trade_id=leg.trade_id, shard=primary.shard, node_id=primary.node, error=reason)
            return rules.PrepareReply.unavailable(reason)
        if response.vote == shardnode_pb2.TRADE_VOTE_PREPARED:
            return rules.PrepareReply.prepared(earlier=response.escrowed_before)
        if response.vote == shardnode_pb2.TRADE_VOTE_DECIDED:
            try:
                outcome = outcome_from_proto(response.outcome, f"{primary.shard}'s Prepare answer")
            except BlueMarbleError as e:
                return rules.PrepareReply.unavailable(str(e))
            return rules.PrepareReply.decided(outcome, response.reason)
        if response.vote == shardnode_pb2.TRADE_VOTE_REFUSED:
            return rules.PrepareReply.refused(response.reason or f"{primary.shard} refused the leg of {leg.player}",
                                              pending=response.refused_pending)
        return rules.PrepareReply.unavailable(f"{primary.shard} answered Prepare without a vote ({response.vote})")

    async def _record(self, trade: Trade, proposal: Decision, shards: dict[rules.Side, ShardId]) -> StoredTrade:
        """The create-if-absent of ``proposal``; the record as stored. InvalidArgument if
        it holds another trade's terms; Unavailable if etcd does not answer."""
        record = trade_pb2.TradeRecord(
            trade_id=trade.trade_id, outcome=outcome_to_proto(proposal.outcome), reason=proposal.reason,
            decided_by=proposal.decided_by, decided_at_ms=self._clock.wall_ms(), request=trade_to_request(trade),
            shard_a=shards[rules.Side.A], shard_b=shards[rules.Side.B], abort_cause=cause_to_proto(proposal.cause),
        )
        try:
            stored, written = await self._store.create_if_absent(record)
        except Unavailable as e:
            self._record_failures.failed("record", self._clock.monotonic_s(),
                                         "trade decision not recorded; the attempt ends without an answer",
                                         trade_id=trade.trade_id, error=str(e))
            cause = ("etcd is out of space: an operator must free it, see bluemarblectl status"
                     if "out of space" in str(e) else "etcd unreachable")
            raise Unavailable(
                f"the decision of trade {echo(trade.trade_id)} could not be recorded ({cause}); "
                "retry with the same trade id"
            ) from e
        self._record_failures.recovered("record", self._clock.monotonic_s(), "trade decisions recorded again")
        if not written:
            self._check_terms(stored.record, trade)
            log.info("trade decision already recorded", trade_id=trade.trade_id,
                     outcome=stored.record.outcome, decided_by=stored.record.decided_by)
        return stored

    async def settle(self, shard: ShardId, trade_id: str, outcome: Outcome) -> bool:
        """Commit/Abort of ``trade_id`` on ``shard``'s current primary (idempotent), with
        bounded retries and jitter; a FAILED_PRECONDITION (not the primary, stale epoch)
        is retried on the primary the mirror knows by then. True once the participant
        acknowledged; False when it could not be reached in time or refused (a
        conflicting settle: logged)."""

        async def attempt() -> int:
            primary = self._locate.primary(shard)
            if outcome is Outcome.COMMITTED:
                commit = shardnode_pb2.CommitRequest(trade_id=trade_id, shard_id=shard, epoch=primary.epoch)
                c: shardnode_pb2.CommitResponse = await self._call(
                    primary, "Commit",
                    lambda s, t: self.channels.batcher(primary.address, settle=True).commit(commit, t),
                    self.settings.settle_call_timeout_s)
                return c.state
            abort = shardnode_pb2.AbortRequest(trade_id=trade_id, shard_id=shard, epoch=primary.epoch)
            a: shardnode_pb2.AbortResponse = await self._call(
                primary, "Abort", lambda s, t: self.channels.batcher(primary.address, settle=True).abort(abort, t),
                self.settings.settle_call_timeout_s)
            return a.state

        policy = retry.RetryPolicy(initial_s=0.05, max_backoff_s=0.5, deadline_s=self.settings.settle_deadline_s)
        try:
            state = await retry.call(attempt, what=f"settle {trade_id} on {shard}", policy=policy,
                                         clock=self._clock, retry_if=_settle_retryable, expected=True)
        except BlueMarbleError as e:
            if isinstance(e, FailedPrecondition) and SETTLE_CONTRADICTS in str(e):
                # The shard applied the other outcome: the trade is split (items in two
                # inventories or none). Never expected; an operator must look.
                log.error("settle refused: the participant applied the other outcome; the trade is applied on one "
                          "side only (bluemarblectl trade show)", trade_id=trade_id, shard=shard,
                          outcome=outcome.name, error=str(e))
                return False
            (log.error if not e.retryable and not isinstance(e, FailedPrecondition) else log.info)(
                "settle not acknowledged", trade_id=trade_id, shard=shard, outcome=outcome.name, error=str(e))
            return False
        expected = (shardnode_pb2.PARTICIPANT_TRADE_STATE_COMMITTED if outcome is Outcome.COMMITTED
                    else shardnode_pb2.PARTICIPANT_TRADE_STATE_ABORTED)
        if state != expected:
            log.error("participant answered a settle with another state", trade_id=trade_id, shard=shard,
                      outcome=outcome.name, state=shardnode_pb2.ParticipantTradeState.Name(state))
            return False
        return True

    # ---- ResolveTrade ----

    async def resolve(self, trade_id: str, shard: str, node: str, reason: str, leg: Leg | None = None, *,
                      if_decided: bool = False, wait_for_counterpart: bool = False
                      ) -> tuple[trade_pb2.TradeRecord, bool]:
        """The record of ``trade_id``, created (decided by "participant <shard>") when
        there is none. Returns it and whether this call created it. With ``if_decided``
        nothing is written: without a record the answer is an empty record of the trade id
        (outcome UNSPECIFIED).

        The record created is ABORTED, unless the other side of ``leg`` applied COMMITTED
        (:func:`termination_decision`; its shard's primary is asked with ListTrades only
        when no record exists): the record was lost, and COMMITTED is written again. An
        other side that cannot be asked is Unavailable with ``wait_for_counterpart``, else
        ABORTED is written without it (logged).

        With ``leg`` (the escrow the participant holds), the returned copy's outcome is
        the one that participant must apply (:func:`outcome_for_leg`): ABORTED for a leg
        that is not part of the recorded terms, whatever the record says. The record in
        etcd is never changed."""
        who = participant_name(shard) if shard else f"participant node {node}" if node else "participant"
        if if_decided:
            found = await self._store.get(trade_id)
            if found is None:
                log.debug("trade not decided yet", trade_id=trade_id, asked_by=who, node_id=node)
                return trade_pb2.TradeRecord(trade_id=trade_id), False
            return self._answer_for_leg(found.record, leg, who, node), False
        why = reason[:MAX_REASON_CHARS] if reason else "no decision was recorded"
        record = trade_pb2.TradeRecord(
            trade_id=trade_id, outcome=common_pb2.TRADE_OUTCOME_ABORTED,
            reason=f"aborted by {who}: {why}", decided_by=who, decided_at_ms=self._clock.wall_ms(), shard_a=shard,
            abort_cause=common_pb2.TRADE_ABORT_CAUSE_UNAVAILABLE,  # its coordinator did not decide in time
        )
        if leg is not None:
            found = await self._store.get(trade_id)
            if found is not None:
                return self._answer_for_leg(found.record, leg, who, node), False
            other_shard, counterpart = await self._counterpart(leg, ShardId(shard), wait_for_counterpart)
            decision = termination_decision(leg, counterpart, decided_by=who, why=record.reason)
            if decision.outcome is Outcome.COMMITTED:
                record.outcome, record.reason = common_pb2.TRADE_OUTCOME_COMMITTED, decision.reason
                record.abort_cause = common_pb2.TRADE_ABORT_CAUSE_UNSPECIFIED
                record.request.CopyFrom(trade_to_request(leg.trade()))
                record.shard_b = other_shard
        stored, created = await self._store.create_if_absent(record)
        if created and record.outcome == common_pb2.TRADE_OUTCOME_COMMITTED:
            log.warning("trade decision missing, its other side had committed: recorded COMMITTED again",
                        trade_id=trade_id, asked_by=who, node_id=node, other_shard=record.shard_b)
        answer = self._answer_for_leg(stored.record, leg, who, node)
        log.info("trade resolved", trade_id=trade_id, asked_by=who, node_id=node, created=created,
                 outcome=common_pb2.TradeOutcome.Name(answer.outcome))
        return answer, created

    async def _counterpart(self, leg: Leg, shard: ShardId, wait: bool) -> tuple[str, Known | None]:
        """The shard of ``leg``'s counterpart and what its primary holds for the trade id
        (None: no record). ("", None) when the counterpart's shard is ``shard`` itself
        (no cross-shard escrow has its two sides on one shard). When the primary cannot
        be asked: Unavailable with ``wait``, else (its shard, None), logged."""
        other = ""
        try:
            other = self._locate.shard_of(leg.counterpart)
            if other == shard:
                return "", None
            primary = self._locate.primary(other)
            request = shardnode_pb2.ListTradesRequest(trade_id=leg.trade_id, shard_id=other, limit=1)
            response: shardnode_pb2.ListTradesResponse = await self._call(
                primary, "ListTrades", lambda s, t: s.ListTrades(request, timeout=t), self.settings.read_timeout_s)
        except BlueMarbleError as e:
            if wait:
                raise Unavailable(
                    f"trade {echo(leg.trade_id)} has no decision record and its other side "
                    f"({other or 'player ' + echo(leg.counterpart)}) cannot be asked what it applied: {e}; "
                    "ask again shortly") from e
            log.warning("deciding a trade without asking its other side", trade_id=leg.trade_id, asked_for=shard,
                        other_shard=other, error=str(e))
            return other, None
        for t in response.trades:
            state = participant_state_from_proto(t.state)
            if t.shard_id == other and t.leg.player_id == leg.counterpart and state is not None:
                return other, Known(state, leg_from_proto(t.trade_id, t.leg), t.reason)
        return other, None

    @staticmethod
    def _answer_for_leg(record: trade_pb2.TradeRecord, leg: Leg | None, who: str, node: str) -> trade_pb2.TradeRecord:
        """``record``, or with ``leg`` a copy whose outcome is the one that leg's holder
        must apply (:func:`outcome_for_leg`)."""
        trade_id = record.trade_id
        answer = record
        recorded = outcome_from_proto(answer.outcome, f"trade record {echo(trade_id)}")
        terms = trade_from_request(answer.request) if answer.request.trade_id else None
        if outcome_for_leg(recorded, terms, leg) is not recorded:
            answer = trade_pb2.TradeRecord()
            answer.CopyFrom(record)
            answer.outcome = common_pb2.TRADE_OUTCOME_ABORTED
            answer.reason = (
                f"trade id {echo(trade_id)} was decided for another trade (between {echo(answer.request.player_a)} "
                f"and {echo(answer.request.player_b)}); this escrow was left by an attempt that reused the id"
            )
            log.warning("escrow of a reused trade id released", trade_id=trade_id, asked_by=who, node_id=node,
                        player=leg.player if leg else "", recorded=recorded.name)
        return answer

    # ---- participants' views ----

    async def list_trades(self, nodes: dict[NodeId, str], trade_id: str, limit: int
                          ) -> tuple[list[shardnode_pb2.ParticipantTrade], list[str]]:
        """ListTrades(trade_id, limit) on every node of ``nodes`` at once, each bounded by
        the read timeout; the trades they answered and the nodes that did not answer."""
        request = shardnode_pb2.ListTradesRequest(trade_id=trade_id, limit=limit)

        async def one(node: NodeId, address: str) -> list[shardnode_pb2.ParticipantTrade] | None:
            primary = Primary(ShardId("its shards"), 0, node, address)  # "ListTrades on its shards (node n1)"
            try:
                response: shardnode_pb2.ListTradesResponse = await self._call(
                    primary, "ListTrades", lambda s, t: s.ListTrades(request, timeout=t), self.settings.read_timeout_s)
            except BlueMarbleError as e:
                log.info("ListTrades not answered", node_id=node, trade_id=trade_id, error=str(e))
                return None
            for t in response.trades:
                if not t.node_id:
                    t.node_id = node
            return list(response.trades)

        order = sorted(nodes)
        answers = await asyncio.gather(*(one(n, nodes[n]) for n in order))
        trades = [t for answer in answers if answer for t in answer]
        unreachable: list[str] = [n for n, answer in zip(order, answers, strict=True) if answer is None]
        return trades, unreachable

    async def close(self) -> None:
        """Stops the trades still running (after the server's grace period: their
        participants' termination settles what they leave), then closes the channels."""
        running = list(self._running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        await self.channels.close()


# ---- the leader's sweep ----


class TradeSweep:
    """Leader only: finishes phase 2 of decision records that never got their retention
    lease (their coordinator died after deciding, or a participant was down), and
    attaches them once every participant applied the decision. A participant still
    down keeps its record unretained (deleting it early would let that participant's
    termination abort a committed trade)."""

    def __init__(self, coordinator: TradeCoordinator, store: TradeStore, election: Election | None, clock: Clock,
                 settings: TradeSettings):
        self._coordinator = coordinator
        self._store = store
        self._election = election
        self._clock = clock
        self._settings = settings
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.passes = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = background.start(self._run(), "trade-sweep")

    async def stop(self) -> None:
        self._stop.set()
        await background.stop(self._task)
        self._task = None

    async def _run(self) -> None:
        while not await wait_event(self._clock, self._stop, self._settings.sweep_interval_s):
            if self._election is None or self._election.leadership is None:
                metrics.TRADES_IN_DOUBT.set(0)  # the leader's gauge; a stale one would page twice
                continue
            try:
                await self.sweep_once()
            except BlueMarbleError as e:
                log.warning("trade sweep failed; next pass later", error=str(e))

    def _shards(self, record: trade_pb2.TradeRecord) -> list[ShardId]:
        """The shards whose participants must apply ``record``: the players' shards now
        (the ring may have changed since), else the shards the record names."""
        shards: list[ShardId] = []
        for player, recorded in ((record.request.player_a, record.shard_a), (record.request.player_b, record.shard_b)):
            shard = recorded
            if player:
                try:
                    shard = self._coordinator.locator.shard_of(player)
                except Unavailable:
                    pass
            if shard and shard not in shards:
                shards.append(ShardId(shard))
        return shards

    async def sweep_once(self) -> tuple[int, int]:
        """One pass over the unretained records older than ``sweep_min_age_s``: settles
        each on its participants' current primaries and attaches those every participant
        acknowledged. Returns (records looked at, records attached). Unavailable (etcd)."""
        self.passes += 1
        # Most passes read the unretained copies only. The first pass of a process, and one
        # in every sweep_full_scan_every after it, reads every record: a record decided
        # before the copies existed (or by a replica of an older release) has none.
        full_scan = self.passes % self._settings.sweep_full_scan_every == 1
        records = await self._store.list_unretained(self._settings.sweep_batch, full_scan=full_scan)
        oldest_ms = self._clock.wall_ms() - int(self._settings.sweep_min_age_s * 1000)
        due = [r for r in records if r.record.decided_at_ms <= oldest_ms]
        limit = asyncio.Semaphore(self._settings.sweep_concurrency)

        async def finish(stored: StoredTrade) -> tuple[str, int] | None:
            async with limit:
                record = stored.record
                outcome = outcome_from_proto(record.outcome, f"trade record {record.trade_id}")
                shards = self._shards(record)
                acks = await asyncio.gather(
                    *(self._coordinator.settle(s, record.trade_id, outcome) for s in shards))
                if shards and all(acks):
                    return record.trade_id, stored.create_revision
                log.info("swept trade still unsettled somewhere; kept unretained", trade_id=record.trade_id,
                         shards=shards, acknowledged=[s for s, ok in zip(shards, acks, strict=True) if ok])
                return None

        finished = [f for f in await asyncio.gather(*(finish(s) for s in due)) if f is not None]
        attached = await self._store.attach(finished) if finished else 0
        metrics.TRADES_IN_DOUBT.set(len(due) - attached)
        if due:
            log.info("trade sweep", unretained=len(records), due=len(due), attached=attached)
        return len(due), attached


# ---- the servicer ----


def _state_of(outcome: Outcome) -> trade_pb2.TradeState:
    return trade_pb2.TRADE_STATE_COMMITTED if outcome is Outcome.COMMITTED else trade_pb2.TRADE_STATE_ABORTED


_APPLIED = {
    common_pb2.TRADE_OUTCOME_COMMITTED: shardnode_pb2.PARTICIPANT_TRADE_STATE_COMMITTED,
    common_pb2.TRADE_OUTCOME_ABORTED: shardnode_pb2.PARTICIPANT_TRADE_STATE_ABORTED,
}


TRADE_CALL_RPCS = {"execute_trade": "ExecuteTrade"}
"""The TradeCall field of each call an ExecuteTrades stream carries, and its unary RPC."""


class TradeCoordinatorService(trade_pb2_grpc.TradeCoordinatorServicer):
    """``bluemarble.v1.TradeCoordinator`` on every control-plane replica."""

    def __init__(self, coordinator: TradeCoordinator, store: TradeStore, locator: Locator,
                 auth: ServerAuth | None = None):
        self._c = coordinator
        self._store = store
        self._locate = locator
        self._auth = auth or ServerAuth()
        self.frames_port: Callable[[], int] = lambda: 0
        """This replica's framed port (0: none), offered on ExecuteTrades streams."""

    async def ExecuteTrade(
        self, request: trade_pb2.ExecuteTradeRequest, context: Ctx
    ) -> trade_pb2.ExecuteTradeResponse:
        return await self._execute(request)

    async def _execute(self, request: trade_pb2.ExecuteTradeRequest) -> trade_pb2.ExecuteTradeResponse:
        answer = await self._c.execute_for_caller(trade_from_request(request))
        d = answer.decision
        return trade_pb2.ExecuteTradeResponse(
            trade_id=d.trade_id, outcome=outcome_to_proto(d.outcome), reason=d.reason, cross_shard=answer.cross_shard,
            abort_cause=cause_to_proto(d.cause),
        )

    async def ExecuteTrades(
        self, request_iterator: AsyncIterator[trade_pb2.TradeCalls], context: Ctx
    ) -> AsyncIterator[trade_pb2.TradeResults]:
        """ExecuteTrade calls multiplexed on one stream (see the proto), each answered as
        its unary call would be. A trade whose call's deadline passes runs on to its end,
        as a unary caller's does; a stopping replica ends the stream (UNAVAILABLE)."""
        # At once, so the caller knows the stream is served before it sends a call (and
        # whether it may carry the calls on this replica's framed port instead).
        port = self.frames_port()
        await context.send_initial_metadata(((frames.PORT_KEY, str(port)),) if port else ())

        async def handle(kind: str, request: trade_pb2.ExecuteTradeRequest, timeout_s: float) -> Any:
            return await self._execute(request)

        async def run(call: trade_pb2.TradeCall) -> trade_pb2.TradeResult:
            result: trade_pb2.TradeResult = await multiplex.answer_call(
                call, trade_pb2.TradeResult(call_id=call.call_id), service="bluemarble.v1.TradeCoordinator",
                rpcs=TRADE_CALL_RPCS, handle=handle, server="control-plane")
            return result

        async for message in multiplex.serve_calls(
            request_iterator, calls_of=lambda m: m.calls, run=run,
            # No closing event: a stopping replica ends its streams itself (grpc_server's
            # OpenStreams); the trades of the calls in flight run on, and their retries
            # get their answers.
            results=lambda part: trade_pb2.TradeResults(results=part), what="an ExecuteTrades message",
        ):
            yield message

    async def ResolveTrade(
        self, request: trade_pb2.ResolveTradeRequest, context: Ctx
    ) -> trade_pb2.ResolveTradeResponse:
        validation.request_id(request.trade_id, "trade_id")
        if not request.shard_id or not request.node_id:
            raise InvalidArgument(
                "ResolveTrade is the call of a trade's participants: give the asking shard_id and node_id "
                "(GetTrade reads a trade without deciding it)"
            )
        try:
            shard_index(ShardId(request.shard_id))
        except ValueError as e:
            raise InvalidArgument(f"shard_id: {e}") from e
        validation.node_id(request.node_id)
        # Stored in the record, shown by GetTrade and bluemarblectl: printable text only.
        validation.printable_text(request.reason, "reason")
        await self._auth.node(context, "ResolveTrade", request.node_id)
        if not self._locate.is_member(ShardId(request.shard_id), request.node_id):
            raise FailedPrecondition(
                f"node {echo(request.node_id)} is not a member of {request.shard_id} in this control plane's "
                "assignments; only a shard's own nodes resolve its trades (retry once the assignment is known)"
            )
        leg = validate_leg(leg_from_proto(request.trade_id, request.leg), "leg") if request.HasField("leg") else None
        record, created = await self._c.resolve(request.trade_id, request.shard_id, request.node_id, request.reason,
                                                leg, if_decided=request.if_decided,
                                                wait_for_counterpart=request.wait_for_counterpart)
        return trade_pb2.ResolveTradeResponse(
            trade_id=record.trade_id, outcome=record.outcome, reason=record.reason, created=created
        )

    async def GetTrade(self, request: trade_pb2.GetTradeRequest, context: Ctx) -> trade_pb2.GetTradeResponse:
        """The record (if any) and each participant's view of the trade. Without a record
        (a same-shard trade, or one not decided yet) the participants are found through
        ``player_id``, else by asking every primary. NotFound when nobody knows it."""
        trade_id = validation.request_id(request.trade_id, "trade_id")
        hint = validation.player_id(request.player_id) if request.player_id else None
        stored = await self._store.get(trade_id)
        players: list[str] = []
        if stored is not None and stored.record.request.player_a:
            players = [stored.record.request.player_a, stored.record.request.player_b]
        elif hint is not None:
            players = [hint]
        unlocated: list[str] = []  # why a player's side could not be asked
        unled: list[ShardId] = []  # the shards of those sides, when known
        if players:
            nodes: dict[NodeId, str] = {}
            for player in players:
                try:
                    primary = self._locate.of_player(player)
                except Unavailable as e:
                    unlocated.append(str(e).removesuffix("; retry shortly"))
                    with contextlib.suppress(Unavailable):
                        unled.append(self._locate.shard_of(player))
                    continue
                nodes[primary.node] = primary.address
        else:
            nodes = self._locate.primaries()
            unled = self._locate.unled()
            if stored is not None and (named := {stored.record.shard_a, stored.record.shard_b} - {""}):
                unled = [shard for shard in unled if shard in named]  # the record says where its sides are
            if unled:
                unlocated.append(f"{len(unled)} shard(s) have no primary right now ({', '.join(unled[:4])}"
                                 + (", ...)" if len(unled) > 4 else ")"))
        sides, unreachable = await self._c.list_trades(nodes, trade_id, 2)
        # One view per shard (a node that led a shard a moment ago may still report it).
        sides = list({s.shard_id: s for s in sides if s.trade_id == trade_id}.values())
        if stored is None and any(s.cross_shard and s.state in _SETTLED for s in sides):
            # A cross-shard side settles only once the decision is recorded: the record
            # was written after the read above. Read it again, so that the answer does not
            # show a trade still being decided beside a side that applied its outcome.
            stored = await self._store.get(trade_id)
        if stored is None and hint is not None:
            # Without a record, the trade asked about is the one on the named player's
            # shard: a node answers for every shard it leads, and another of them may
            # know the same id from another trade (an id reused elsewhere).
            with contextlib.suppress(Unavailable):
                home = self._locate.shard_of(hint)
                sides = [s for s in sides if s.shard_id == home] or sides
        response = trade_pb2.GetTradeResponse(trade_id=trade_id, sides=sides, unreachable_nodes=unreachable,
                                              unled_shards=unled)
        if stored is not None:
            r = stored.record
            response.outcome = r.outcome
            response.reason = r.reason
            response.abort_cause = r.abort_cause
            response.request.CopyFrom(r.request)
            response.decided_by = r.decided_by
            response.decided_at_ms = r.decided_at_ms
            response.cross_shard = True
            response.retained = stored.retained
            applied = _APPLIED.get(r.outcome)
            both_applied = len(sides) >= 2 and all(s.state == applied for s in sides)
            decided = outcome_from_proto(r.outcome, f"trade record {trade_id}")
            response.state = trade_pb2.TRADE_STATE_DONE if stored.retained or both_applied else _state_of(decided)
            return response
        if not sides and self._c.running(trade_id):
            # This replica runs it and has not prepared either side yet.
            response.state = trade_pb2.TRADE_STATE_PREPARING
            return response
        if not sides and (unreachable or unlocated):
            # Nobody who answered knows it, but a side may be where nobody answered: a
            # NOT_FOUND would tell an operator that a trade which happened never did.
            missing = [f"{', '.join(unreachable)} did not answer"] if unreachable else []
            raise Unavailable(
                f"trade {echo(trade_id, 40)} has no decision record, and not every side could be asked ("
                + "; ".join(missing + unlocated) + "); ask again"
            )
        if not sides:
            raise NotFound(
                f"trade {echo(trade_id, 40)} is not known: no decision record, and "
                + (f"the shard of player {echo(hint, 40)} has none" if hint
                   else "no participant has one (give player_id for a same-shard trade)")
                + "; ExecuteTrade with the same id and terms answers a call still on its way"
            )
        settled = [s for s in sides if s.state in _SETTLED]
        # Without a record: a settled same-shard trade is the answer (escrows other shards
        # hold under the same id belong to attempts that reused it, refused or aborted);
        # else sides that all settled the same way, none still prepared (the record has
        # expired), are; anything else is still being decided.
        local = [s for s in settled if not s.cross_shard]
        agreed = len(settled) == len(sides) and len({s.state for s in settled}) == 1
        answer = local or (settled if agreed else [])
        response.cross_shard = answer[0].cross_shard if answer else any(s.cross_shard for s in sides)
        if answer:
            s = answer[0]
            response.outcome = (common_pb2.TRADE_OUTCOME_COMMITTED
                                if s.state == shardnode_pb2.PARTICIPANT_TRADE_STATE_COMMITTED
                                else common_pb2.TRADE_OUTCOME_ABORTED)
            response.reason = s.reason
            # (No abort_cause: a node keeps a same-shard trade's reason, not its cause.)
            if not s.cross_shard and s.HasField("leg") and s.leg.player_id:
                # The terms, from the shard's record of both sides (player_a: the player
                # it keeps the leg of, the first named when the trade was made).
                leg = s.leg
                response.request.CopyFrom(trade_pb2.ExecuteTradeRequest(
                    trade_id=trade_id, player_a=leg.player_id, player_b=leg.counterpart_player_id,
                    a_gives=leg.gives, b_gives=leg.receives))
            response.decided_by = participant_name(s.shard_id)
            response.state = trade_pb2.TRADE_STATE_DONE
        else:
            response.state = trade_pb2.TRADE_STATE_PREPARING
        return response

    async def ListInDoubtTrades(
        self, request: trade_pb2.ListInDoubtTradesRequest, context: Ctx
    ) -> trade_pb2.ListInDoubtTradesResponse:
        limit = min(request.limit or MAX_LIST, MAX_LIST)
        trades, unreachable = await self._c.list_trades(self._locate.nodes(), "", limit)
        in_doubt = sorted(
            (t for t in trades if t.state == shardnode_pb2.PARTICIPANT_TRADE_STATE_PREPARED),
            key=lambda t: (t.prepared_at_ms, t.trade_id),
        )[:limit]
        return trade_pb2.ListInDoubtTradesResponse(trades=in_doubt, unreachable_nodes=unreachable,
                                                   unled_shards=self._locate.unled())

