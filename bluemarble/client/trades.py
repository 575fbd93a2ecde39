"""Trades for game servers and scripts: run a trade to its answer, whatever fails on the way.

Why this module exists: a cross-shard trade crosses a control-plane replica, two shard
primaries and etcd; any of them may crash or pause mid-trade. The protocol makes a trade
id its idempotency key (same trade id, same answer, within the retention window), so the
caller's only job is to keep asking with the *same* id and the *same* terms until it
gets an answer. :class:`TradeClient` does exactly that, and nothing else:

    from bluemarble.client.trades import TradeClient

    async with TradeClient(["127.0.0.1:7000", "127.0.0.1:7001"]) as trades:
        result = await trades.execute_trade(
            "trade-42", "player-a", "player-b", a_items=["sword-1"], b_gold=50, deadline_s=30)
        print(result.outcome, result.reason, result.cross_shard, result.attempts)

Game servers that already route players locally (a
:class:`~bluemarble.client.routing.RoutingClient`) pass it as ``routing``: a trade whose two
players are on one shard in its ring then goes straight to that shard's primary
(``ShardNode.ExecuteLocalTrade``: no control-plane hop), with the routing client's
redirects and failover handling; every other trade (and every trade while the routing
client is not ready yet) goes to the coordinator as below. Both paths
key the trade on its id, so a trade retried through the other path gets the same answer
(docs/decisions.md: "Same-shard trades go from the client straight to the primary").

    async with RoutingClient(addresses) as routing, TradeClient(addresses, routing=routing) as trades:
        result = await trades.execute_trade("trade-43", "player-a", "player-c", a_gold=5, b_items=["gem-3"])

The coordinator's trades travel on one ``TradeCoordinator.ExecuteTrades`` stream per
control-plane replica, each call with its own id and deadline and answered exactly as
``ExecuteTrade`` would answer it: a message on an open stream costs a fraction of a unary
call, and trades made together share one. A replica that does not serve the stream (an
older release), and every replica while tracing is on, gets unary ``ExecuteTrade`` calls.

Retries: UNAVAILABLE, DEADLINE_EXCEEDED (no answer within one attempt's timeout) and
connection failures (they surface as UNAVAILABLE), plus ABORTED *statuses* (a race lost
somewhere; not the ABORTED *outcome*, which is an answer), and FAILED_PRECONDITION that
only says a shard's primary moved (a coordinator that could not follow a failover within
its own bounds; :func:`bluemarble.client.routing.is_redirect`) are retried with the same trade
id under :mod:`bluemarble.runtime.retry`'s jittered exponential backoff, until
``deadline_s``; each failed attempt moves on to the next control-plane address
(:class:`~bluemarble.client.control_plane.ControlPlaneClient`). INVALID_ARGUMENT (bad
terms, or a trade id reused for other terms) and other statuses are final and raised at
once. When the deadline passes the last retryable error is raised: the trade may or may
not have been decided; asking again with the same id and terms tells which
(:meth:`get_trade` shows where it stands). An ExecuteTrade attempt that a replica has not
answered within :data:`HEDGE_AFTER_S` goes to the next replica too (a paused replica
costs seconds, not the attempt's timeout); the first answer wins.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc.aio
import structlog

from bluemarble.api.conversions import cause_from_proto
from bluemarble.client.control_plane import MIN_ATTEMPT_S, ControlPlaneClient, to_error
from bluemarble.client.node_calls import TRADE_CALLS, CallStream, Unsupported
from bluemarble.client.routing import ClientClosed, CrossShardTrade, RoutingClient, check_deadline, is_redirect
from bluemarble.core import errors, limits, validation
from bluemarble.core.limits import echo
from bluemarble.core.trades.model import AbortCause, Offer, Outcome, Trade, validate_trade
from bluemarble.runtime import background, retry, tracing
from bluemarble.runtime.clock import Clock, SystemClock, run_with_timeout
from bluemarble.v1 import common_pb2, shardnode_pb2, trade_pb2, trade_pb2_grpc

log = structlog.get_logger(__name__)

DEFAULT_TRADE_DEADLINE_S = 30.0
MAX_UNANSWERED_KEPT = 10_000
"""Trade ids a client remembers sending without an answer (for get_trade)."""
HEDGE_AFTER_S = 3.0
"""An ExecuteTrade attempt unanswered this long is also sent to the next control-plane
replica (:meth:`TradeClient._hedged`): trades answer in milliseconds to a second or two
(a slow participant's Prepare bound is 2 s), and a replica this silent is likely paused."""
DEFAULT_ATTEMPT_TIMEOUT_S = 10.0
"""One ExecuteTrade attempt: the coordinator's own bounds (prepare 2 s, settle 3 s, the
etcd write) fit well within it; a replica that takes longer is treated as gone."""

_OUTCOMES = {
    common_pb2.TRADE_OUTCOME_COMMITTED: Outcome.COMMITTED,
    common_pb2.TRADE_OUTCOME_ABORTED: Outcome.ABORTED,
}


def _outcome(value: int, where: str) -> Outcome:
    outcome = _OUTCOMES.get(value)  # type: ignore[call-overload]
    if outcome is None:
        raise errors.BlueMarbleError(f"{where} carries no trade outcome ({value})")
    return outcome  # type: ignore[no-any-return]


@dataclass(frozen=True)
class TradeResult:
    """The answer to a trade: ``outcome`` (COMMITTED or ABORTED), the ``reason`` of an
    ABORTED one, whether it crossed shards, how many ExecuteTrade attempts this call made
    (1 when the first answered), and why an ABORTED one was (``abort_cause``: REFUSED,
    the terms; UNAVAILABLE, the cluster; CONTENDED, other trades not settled yet; UNKNOWN
    when not said)."""

    trade_id: str
    outcome: Outcome
    reason: str
    cross_shard: bool
    attempts: int
    abort_cause: AbortCause = AbortCause.UNKNOWN

    @property
    def committed(self) -> bool:
        return self.outcome is Outcome.COMMITTED

    @property
    def worth_retrying(self) -> bool:
        """ABORTED because a side could not take part in time (a failover, etcd slow) or
        because of other trades not settled yet, not because of the terms: the same
        exchange under a *new* trade id may commit. (The same id keeps its answer.)"""
        return self.outcome is Outcome.ABORTED and self.abort_cause in (AbortCause.UNAVAILABLE, AbortCause.CONTENDED)


@dataclass(frozen=True)
class TradeSide:
    """One participant's view of a trade (``state``: NONE, PREPARED, COMMITTED, ABORTED)."""

    trade_id: str
    shard_id: str
    node_id: str
    state: str
    player_id: str
    deadline_ms: int


@dataclass(frozen=True)
class TradeStatus:
    """What the cluster knows of one trade (GetTrade). ``state`` is PREPARING, COMMITTED,
    ABORTED or DONE (the decision reached both sides); ``outcome`` is None while no
    decision is known."""

    trade_id: str
    state: str
    outcome: Outcome | None
    reason: str
    cross_shard: bool
    decided_by: str
    retained: bool
    sides: tuple[TradeSide, ...]
    abort_cause: AbortCause = AbortCause.UNKNOWN


@dataclass(frozen=True)
class InDoubt:
    """Escrows the primaries hold right now (oldest first), the nodes that did not answer
    and the shards with no primary to ask (the escrows of both are missing from
    ``escrows``: :attr:`complete` is False)."""

    escrows: tuple[TradeSide, ...]
    unreachable_nodes: tuple[str, ...]
    unled_shards: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """Every shard's primary was asked and answered."""
        return not self.unreachable_nodes and not self.unled_shards


def _side(t: shardnode_pb2.ParticipantTrade) -> TradeSide:
    state = shardnode_pb2.ParticipantTradeState.Name(t.state).removeprefix("PARTICIPANT_TRADE_STATE_")
    return TradeSide(t.trade_id, t.shard_id, t.node_id, state, t.leg.player_id, t.deadline_ms)


def _echoed(request: object) -> tuple[str, ...]:
    """The ids of a TradeCoordinator request that a message may quote (:func:`is_redirect`)."""
    ids = [getattr(request, name, "") for name in ("trade_id", "player_a", "player_b", "player_id")]
    for offer in ("a_gives", "b_gives"):
        ids += list(getattr(getattr(request, offer, None), "item_ids", ()))
    return tuple(i for i in ids if isinstance(i, str) and i)


def _retried(error: BaseException, echoed: tuple[str, ...] = ()) -> bool:
    """Worth another attempt with the same trade id (the id makes it safe)."""
    if isinstance(error, ClientClosed):
        return False
    if isinstance(error, errors.FailedPrecondition):
        return is_redirect(error, echoed)
    return isinstance(error, errors.Unavailable | errors.DeadlineExceeded | errors.Aborted) or errors.is_overload(error)


class TradeClient:
    """Runs trades through any control-plane replica, retrying one trade id to its answer.

    ``control_plane``: the addresses (a sequence, or one string ``"host:port[,host:port]"``;
    the client builds and closes its own :class:`ControlPlaneClient`) or a
    ControlPlaneClient it does not close.
    ``attempt_timeout_s`` bounds one ExecuteTrade attempt; backoff between attempts is
    jittered, ``retry_initial_s`` .. ``retry_max_backoff_s``. ``routing``: a started
    :class:`RoutingClient` (not closed here) that same-shard trades go through, straight
    to the shard's primary (module docstring); None sends every trade to the coordinator.
    """

    def __init__(
        self,
        control_plane: ControlPlaneClient | Sequence[str] | str,
        *,
        attempt_timeout_s: float = DEFAULT_ATTEMPT_TIMEOUT_S,
        retry_initial_s: float = 0.05,
        retry_max_backoff_s: float = 1.0,
        clock: Clock | None = None,
        routing: RoutingClient | None = None,
    ):
        self._routing = routing
        self._stubs: dict[str, tuple[grpc.aio.Channel, trade_pb2_grpc.TradeCoordinatorStub]] = {}
        # One ExecuteTrades stream per replica address, on the stub's channel.
        self._streams: dict[str, tuple[trade_pb2_grpc.TradeCoordinatorStub, CallStream]] = {}
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the first call: its channels'
        if isinstance(control_plane, ControlPlaneClient):
            self._cp, self._owns = control_plane, False
        else:
            self._cp, self._owns = ControlPlaneClient(control_plane, clock=clock), True
        # Trade ids this client sent without getting their answer (oldest first).
        self._unanswered: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._attempt_timeout_s = attempt_timeout_s
        self._initial_s = retry_initial_s
        self._max_backoff_s = retry_max_backoff_s

    @property
    def control_plane(self) -> ControlPlaneClient:
        return self._cp

    async def close(self) -> None:
        """Closes the control-plane client when this client built it. Calls in flight
        to the coordinator then fail with :class:`ClientClosed` (their outcome unknown:
        ask :meth:`get_trade`, or retry with the same trade id on a new client), as do
        calls made after it. Same-shard trades in flight run on the ``routing`` client,
        which stays open (the caller closes it), and finish there. With a
        ControlPlaneClient given to it, calls in flight finish too (that client stays
        open). Idempotent."""
        self._closed = True
        streams, self._streams = self._streams, {}
        for _, stream in streams.values():
            await stream.close()
        if self._owns:
            await self._cp.close()

    async def __aenter__(self) -> TradeClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _once(self, rpc: str, request: object, timeout_s: float) -> object:
        """One call of ``rpc`` on the current control-plane replica within ``timeout_s``;
        an UNAVAILABLE or DEADLINE_EXCEEDED moves the shared client on to the next replica
        (as :meth:`ControlPlaneClient.call` does). One stub per replica address, kept: a
        ControlPlaneClient call built two stubs and a tenacity loop per attempt, a fifth of
        this client's CPU per trade."""
        if self._closed:
            raise ClientClosed(
                "the trade client was closed; a trade in flight has an unknown outcome: retry it with the same "
                "trade id and terms on a new client" if rpc == "ExecuteTrade" else
                f"the trade client was closed; {rpc} needs a new client"
            )
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:  # its channels and streams would never answer here
            raise errors.FailedPrecondition(
                "the trade client belongs to the event loop it was first used on; make one per event loop "
                "(nothing was sent)"
            )
        address = self._cp.current_address
        channel = self._cp.channel()  # the current replica's, rebuilt after a TLS rotation
        kept = self._stubs.get(address)
        if kept is None or kept[0] is not channel:
            kept = self._stubs[address] = (channel, trade_pb2_grpc.TradeCoordinatorStub(channel))  # type: ignore[no-untyped-call]
        method = getattr(kept[1], rpc)
        try:
            if rpc == "ExecuteTrade" and type(self._cp.clock) is SystemClock and not tracing.enabled():
                # On the replica's ExecuteTrades stream (with tracing on, unary calls: each
                # trade is then its own span from here on).
                try:
                    return await self._stream(address, kept[1]).call("execute_trade", request, timeout_s)
                except Unsupported:
                    pass  # a replica of an older release: unary calls
            if type(self._cp.clock) is SystemClock:  # the call's gRPC deadline bounds it
                response: object = await method(request, timeout=timeout_s)
                return response

            async def call() -> object:
                answer: object = await method(request, timeout=timeout_s)
                return answer

            return await run_with_timeout(self._cp.clock, call(), timeout_s)
        except grpc.aio.AioRpcError as e:
            error = to_error(e, address)
            if isinstance(error, errors.Unavailable | errors.DeadlineExceeded) or errors.is_overload(error):
                self._cp.rotate(away_from=address)
            raise error from e
        except errors.ResourceExhausted as e:  # a busy replica refused the ExecuteTrades stream
            if errors.is_overload(e):
                self._cp.rotate(away_from=address)
            raise
        except (errors.Unavailable, errors.DeadlineExceeded) as e:  # a call on the ExecuteTrades stream
            if self._closed:
                raise ClientClosed(
                    f"the trade client was closed during {rpc}; its outcome is unknown: retry it with the same "
                    "trade id and terms on a new client"
                ) from None
            self._cp.rotate(away_from=address)
            raise e
        except TimeoutError as e:
            self._cp.rotate(away_from=address)
            raise errors.DeadlineExceeded(f"control plane {address} did not answer within {timeout_s:.3g} s") from e
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._closed or (task is not None and task.cancelling()):
                raise  # our caller cancelled us
            # grpc.aio raises CancelledError in a call whose channel close() closed under it.
            raise ClientClosed(
                f"the trade client was closed during {rpc}; its outcome is unknown: retry it with the same "
                "trade id and terms on a new client"
            ) from None

    def _stream(self, address: str, stub: trade_pb2_grpc.TradeCoordinatorStub) -> CallStream:
        """The ExecuteTrades stream to ``address`` on ``stub`` (a new one when the channel,
        and so the stub, was replaced)."""
        kept = self._streams.get(address)
        if kept is None or kept[0] is not stub:
            if kept is not None:  # its channel was replaced: the stream goes with it
                background.start(kept[1].close(), f"close-trade-stream-{address}")
            kept = self._streams[address] = (stub, CallStream(stub, address, TRADE_CALLS))
        return kept[1]

    async def _retrying(self, request: object, rpc: str, what: str, deadline_s: float) -> tuple[object, int]:
        """``rpc`` of the TradeCoordinator with ``request``, retried as the module says;
        returns the response and the number of attempts. InvalidArgument for a
        ``deadline_s`` that is no number of seconds (before anything is sent)."""
        check_deadline(deadline_s)
        clock = self._cp.clock
        end_s = clock.monotonic_s() + deadline_s
        attempts = 0

        async def attempt() -> object:
            nonlocal attempts
            attempts += 1
            remaining_s = end_s - clock.monotonic_s()
            timeout_s = min(self._attempt_timeout_s, remaining_s)
            if attempts > 1:  # a retry at the end of the deadline gets the shortest attempt that can be answered
                timeout_s = max(MIN_ATTEMPT_S, timeout_s)  # (the first keeps a deadline shorter than that)
            if (rpc == "ExecuteTrade" and len(self._cp.addresses) > 1 and timeout_s > HEDGE_AFTER_S
                    and type(clock) is SystemClock):
                return await self._hedged(rpc, request, timeout_s)
            return await self._once(rpc, request, timeout_s)

        policy = retry.RetryPolicy(
            initial_s=self._initial_s, max_backoff_s=max(self._initial_s, self._max_backoff_s), deadline_s=deadline_s
        )
        echoed = _echoed(request)
        response = await retry.call(attempt, what=what, policy=policy, clock=clock,
                                    retry_if=lambda e: _retried(e, echoed), expected=True)
        return response, attempts

    async def _hedged(self, rpc: str, request: object, timeout_s: float) -> object:
        """:meth:`_once`, and if its replica has not answered within :data:`HEDGE_AFTER_S`,
        the same call on the next replica too: the first answer wins. The trade id makes
        the second safe (one decision, items moved at most once); a paused or hung replica
        then costs the caller seconds, not a whole attempt's timeout."""
        first_address = self._cp.current_address
        first = asyncio.ensure_future(self._once(rpc, request, timeout_s))
        try:
            done, _ = await asyncio.wait({first}, timeout=HEDGE_AFTER_S)
            if done:
                return first.result()
            log.info("control-plane replica silent; asking the next one too", rpc=rpc, replica=first_address,
                     after_s=HEDGE_AFTER_S)
            self._cp.rotate(away_from=first_address)
            second = asyncio.ensure_future(self._once(rpc, request, timeout_s - HEDGE_AFTER_S))
            try:
                last: BaseException | None = None
                for next_done in asyncio.as_completed((first, second)):
                    try:
                        return await next_done
                    except errors.BlueMarbleError as e:  # the other may still answer
                        last = e
                assert last is not None
                raise last
            finally:
                second.cancel()
        finally:
            first.cancel()

    async def execute_trade(
        self,
        trade_id: str,
        player_a: str,
        player_b: str,
        a_items: Iterable[str] = (),
        a_gold: int = 0,
        b_items: Iterable[str] = (),
        b_gold: int = 0,
        deadline_s: float = DEFAULT_TRADE_DEADLINE_S,
    ) -> TradeResult:
        """Runs the trade (A gives ``a_items`` and ``a_gold``, B gives ``b_items`` and
        ``b_gold``) to its answer, retrying with the same ``trade_id`` as the module says
        for up to ``deadline_s`` seconds. With ``routing``, a trade whose players share a
        shard goes straight to its primary (``attempts`` then counts ExecuteLocalTrade
        attempts); if that primary's newer ring puts them apart, the coordinator runs it
        within what is left of ``deadline_s``.

        Raises InvalidArgument (bad terms: checked here before anything is sent, and by
        the server, e.g. a trade id already used for other terms); after ``deadline_s``
        the last retryable error (Unavailable, DeadlineExceeded, Aborted): the outcome is
        then unknown to the caller, not undecided.
        """
        trade = Trade(trade_id, player_a, player_b, Offer(tuple(validation.item_ids(a_items, "a_items")), a_gold),
                      Offer(tuple(validation.item_ids(b_items, "b_items")), b_gold))
        validate_trade(trade)
        check_deadline(deadline_s)
        if self._closed:  # nothing sent: no outcome in doubt
            raise ClientClosed("the trade client is closed; make a new one")
        # Until its answer comes, the trade may be on its way even if this call ends
        # (cancelled, out of time): get_trade then says "not known yet", not "not found".
        self._unanswered[trade_id] = None
        self._unanswered.move_to_end(trade_id)
        while len(self._unanswered) > MAX_UNANSWERED_KEPT:
            self._unanswered.popitem(last=False)
        try:
            result = await self._execute(trade, deadline_s)
        except errors.BlueMarbleError as e:
            if not (e.retryable or isinstance(e, ClientClosed)):
                self._unanswered.pop(trade_id, None)  # refused: nothing of it is on its way
            else:  # the outcome is unknown to this caller: the one id a retry may use
                e.request_id = trade_id
            raise
        self._unanswered.pop(trade_id, None)
        return result

    async def _execute(self, trade: Trade, deadline_s: float) -> TradeResult:
        trade_id, player_a, player_b = trade.trade_id, trade.player_a, trade.player_b
        a_gold, b_gold = trade.a_gives.gold, trade.b_gives.gold
        clock = self._cp.clock
        end_s = clock.monotonic_s() + deadline_s
        routing = self._routing
        if routing is not None and routing.ready and routing.same_shard(player_a, player_b):
            try:
                local = await routing.execute_local_trade(
                    trade_id, player_a, player_b, trade.a_gives.item_ids, a_gold, trade.b_gives.item_ids, b_gold,
                    deadline_s=deadline_s,
                )
            except CrossShardTrade:
                deadline_s = end_s - clock.monotonic_s()  # the coordinator runs it, in what is left
                if deadline_s <= 0:
                    raise errors.DeadlineExceeded(
                        f"trade {trade_id}: no answer within the deadline (its players moved apart)") from None
            else:
                return TradeResult(local.trade_id, local.outcome, local.reason, False, local.attempts,
                                   local.abort_cause)
        request = trade_pb2.ExecuteTradeRequest(
            trade_id=trade_id, player_a=player_a, player_b=player_b,
            # From the checked terms, not the arguments: an iterator given as items is used up.
            a_gives=common_pb2.Offer(item_ids=trade.a_gives.item_ids, gold=trade.a_gives.gold),
            b_gives=common_pb2.Offer(item_ids=trade.b_gives.item_ids, gold=trade.b_gives.gold),
        )
        try:
            response, attempts = await self._retrying(request, "ExecuteTrade", f"trade {trade_id}", deadline_s)
        except (errors.Unavailable, errors.DeadlineExceeded, errors.Aborted) as e:
            slow = isinstance(e, errors.DeadlineExceeded)
            raise type(e)(
                f"trade {echo(trade_id)}: no answer within {deadline_s:.3g} s, so its outcome is unknown "
                f"(retry with the same trade id and terms to learn it); last error: {e}"
                + ("; a trade waits for both players' shards and for etcd, so a failover or an etcd outage delays it"
                   if slow else "")
            ) from e
        assert isinstance(response, trade_pb2.ExecuteTradeResponse)
        return TradeResult(
            trade_id=response.trade_id or trade_id,
            outcome=_outcome(response.outcome, f"the answer to trade {trade_id}"),
            reason=response.reason,
            cross_shard=response.cross_shard,
            attempts=attempts,
            abort_cause=cause_from_proto(response.abort_cause),
        )

    async def get_trade(
        self, trade_id: str, player_id: str = "", deadline_s: float = 10.0
    ) -> TradeStatus:
        """The recorded decision of ``trade_id`` and where each side stands. ``player_id``
        (either player) finds a same-shard trade, which leaves no etcd record. Raises
        NotFound when nobody knows the trade, InvalidArgument for a bad id, and the last
        retryable error after ``deadline_s``.

        A trade whose request is still on its way is not known yet: for a trade id this
        client sent without getting its answer (the call cancelled, or out of time), that
        is Unavailable, not NotFound. Only a retry of :meth:`execute_trade` with the same id
        and terms is sure to give the outcome; get_trade is for looking."""
        request = trade_pb2.GetTradeRequest(
            trade_id=validation.trade_id(trade_id),
            player_id=validation.player_id(player_id) if player_id != "" else "",
        )
        try:
            response, _ = await self._retrying(request, "GetTrade", f"GetTrade {trade_id}", deadline_s)
        except errors.NotFound as e:
            if trade_id not in self._unanswered:
                raise
            raise errors.Unavailable(
                f"trade {echo(trade_id)} is not known yet, but this client sent it and got no answer: it may "
                "still be on its way, so this is not final. Retry execute_trade with the same id and terms: that "
                "gives its outcome (and runs it if it never arrived)"
            ) from e
        assert isinstance(response, trade_pb2.GetTradeResponse)
        outcome = _OUTCOMES.get(response.outcome)
        return TradeStatus(
            trade_id=response.trade_id,
            state=trade_pb2.TradeState.Name(response.state).removeprefix("TRADE_STATE_"),
            outcome=outcome,
            reason=response.reason,
            cross_shard=response.cross_shard,
            decided_by=response.decided_by,
            retained=response.retained,
            sides=tuple(_side(s) for s in response.sides),
            abort_cause=cause_from_proto(response.abort_cause),
        )

    async def in_doubt(self, limit: int = 1000, deadline_s: float = 10.0) -> InDoubt:
        """The escrows every primary holds right now (at most ``limit``), oldest first."""
        request = trade_pb2.ListInDoubtTradesRequest(limit=validation.limit(limit, limits.MAX_IN_DOUBT_TRADES))
        response, _ = await self._retrying(request, "ListInDoubtTrades", "ListInDoubtTrades", deadline_s)
        assert isinstance(response, trade_pb2.ListInDoubtTradesResponse)
        return InDoubt(tuple(_side(t) for t in response.trades), tuple(response.unreachable_nodes),
                       tuple(response.unled_shards))
