"""The trade coordinator against a real etcd and real gRPC, with small in-process shard
nodes that implement the participant RPCs over one in-memory world (a fake at our own
RPC boundary, built on the core's participant rules): cross-shard commit and abort,
same-shard trades, retries after a coordinator crash at each step, ResolveTrade racing
ExecuteTrade, bad inputs, retention leases and the leader's sweep. One test runs real
processes instead (marked e2e): same-shard trades from the client straight to the shard's
primary, against real shard nodes, through a failover of that primary."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import prometheus_client
import pytest
import structlog.testing

from bluemarble.client.trades import TradeClient
from bluemarble.core import errors
from bluemarble.core.ids import ShardId, TradeId
from bluemarble.core.ring import Ring
from bluemarble.core.trades import participant as p
from bluemarble.core.trades.model import Leg, Offer, Outcome, Trade
from bluemarble.runtime.grpc_server import Server, ServiceBinding, build_server
from bluemarble.v1 import (
    common_pb2,
    controlplane_pb2,
    controlplane_pb2_grpc,
    shardnode_pb2,
    shardnode_pb2_grpc,
    trade_pb2,
    trade_pb2_grpc,
)
from controlplane.server import trades as trades_module
from controlplane.server.app import ControlPlaneApp
from controlplane.server.trades import TradeSettings, leg_to_proto, outcome_to_proto, trade_to_request
from controlplane.store import codec
from controlplane.store.etcd import Put
from tests.conftest import StartControlPlane, StreamNode, wait_for

Ctx = grpc.aio.ServicerContext[Any, Any]

_STATE = {
    p.TradeState.PREPARED: shardnode_pb2.PARTICIPANT_TRADE_STATE_PREPARED,
    p.TradeState.COMMITTED: shardnode_pb2.PARTICIPANT_TRADE_STATE_COMMITTED,
    p.TradeState.ABORTED: shardnode_pb2.PARTICIPANT_TRADE_STATE_ABORTED,
}


def _leg(trade_id: str, m: shardnode_pb2.TradeLeg) -> Leg:
    return Leg(trade_id, m.player_id, Offer(tuple(m.gives.item_ids), m.gives.gold),
               Offer(tuple(m.receives.item_ids), m.receives.gold), m.counterpart_player_id)


@dataclass
class World:
    """Every player's items and gold, and each shard's durable trade records."""

    items: dict[str, set[str]] = field(default_factory=dict)
    gold: dict[str, int] = field(default_factory=dict)
    known: dict[tuple[str, str], p.Known] = field(default_factory=dict)  # (shard, trade id) -> record
    local: dict[str, tuple[Outcome, str]] = field(default_factory=dict)
    local_legs: dict[str, Leg] = field(default_factory=dict)  # trade id -> A's leg, as a node keeps it

    def holdings(self, player: str) -> p.Holdings:
        escrowed = [k.leg for k in self.known.values()
                    if k.state is p.TradeState.PREPARED and k.leg is not None and k.leg.player == player]
        return p.Holdings(
            frozenset(self.items.get(player, set())), self.gold.get(player, 0),
            frozenset(i for leg in escrowed for i in leg.gives.item_ids), sum(leg.gives.gold for leg in escrowed),
        )

    def seed(self, player: str, items: list[str], gold: int) -> None:
        self.items[player], self.gold[player] = set(items), gold

    def apply(self, leg: Leg) -> None:
        mine = self.items.setdefault(leg.player, set())
        mine.difference_update(leg.gives.item_ids)
        mine.update(leg.receives.item_ids)
        self.gold[leg.player] = self.gold.get(leg.player, 0) - leg.gives.gold + leg.receives.gold

    def escrows(self) -> list[tuple[str, str]]:
        return sorted(k for k, v in self.known.items() if v.state is p.TradeState.PREPARED)


class TradeNode(shardnode_pb2_grpc.ShardNodeServicer):
    """A shard node's participant side over :class:`World`; ``down``: every trade RPC
    fails with UNAVAILABLE (as a node that cannot serve)."""

    def __init__(self, node_id: str, world: World) -> None:
        self.node_id, self.world = node_id, world
        self.down = False
        self.calls: list[str] = []
        self.leads: Callable[[str], bool] = lambda shard: True  # ListTrades reports only those shards
        self.gate: asyncio.Event | None = None  # when set, a Prepare waits for it
        self.before_list: Callable[[], Awaitable[None]] | None = None  # runs as a ListTrades begins

    async def _check(self, name: str, context: Ctx) -> None:
        self.calls.append(name)
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"node {self.node_id} is down")

    async def GetShardStatus(self, request: shardnode_pb2.GetShardStatusRequest, context: Ctx
                             ) -> shardnode_pb2.GetShardStatusResponse:
        return shardnode_pb2.GetShardStatusResponse(node_id=self.node_id)

    async def Fence(self, request: shardnode_pb2.FenceRequest, context: Ctx) -> shardnode_pb2.FenceResponse:
        return shardnode_pb2.FenceResponse(node_id=self.node_id)

    def prepare(self, shard: str, leg: Leg) -> shardnode_pb2.PrepareResponse:
        known = self.world.known.get((shard, leg.trade_id))
        d = p.decide_prepare(leg, self.world.holdings(leg.player), known)
        if d.verdict is p.PrepareVerdict.ESCROW:
            self.world.known[(shard, leg.trade_id)] = p.Known(p.TradeState.PREPARED, leg)
        if d.verdict in (p.PrepareVerdict.ESCROW, p.PrepareVerdict.PREPARED):
            return shardnode_pb2.PrepareResponse(prepared=True, vote=shardnode_pb2.TRADE_VOTE_PREPARED,
                                                 escrowed_before=d.verdict is p.PrepareVerdict.PREPARED)
        if d.verdict is p.PrepareVerdict.DECIDED:
            assert d.outcome is not None
            return shardnode_pb2.PrepareResponse(vote=shardnode_pb2.TRADE_VOTE_DECIDED,
                                                 outcome=outcome_to_proto(d.outcome), reason=d.reason)
        return shardnode_pb2.PrepareResponse(vote=shardnode_pb2.TRADE_VOTE_REFUSED, reason=d.reason,
                                             refused_pending=d.pending)

    async def Prepare(self, request: shardnode_pb2.PrepareRequest, context: Ctx) -> shardnode_pb2.PrepareResponse:
        await self._check("Prepare", context)
        if self.gate is not None:
            await self.gate.wait()
        leg = _leg(request.trade_id, request.legs[0])
        known = self.world.known.get((request.shard_id, request.trade_id))
        if known is not None and known.leg is not None and not known.leg.same_terms(leg):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, p.REUSED_TRADE_ID)
        return self.prepare(request.shard_id, leg)

    async def _settle(self, shard: str, trade_id: str, outcome: Outcome, context: Ctx) -> int:
        key = (shard, trade_id)
        known = self.world.known.get(key)
        verdict = p.decide_settle(known, outcome)
        if verdict in (p.SettleVerdict.CONFLICT, p.SettleVerdict.MISSING_ESCROW):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{verdict.value} ({p.SETTLE_CONTRADICTS})"
                                if verdict is p.SettleVerdict.CONFLICT else verdict.value)
        if verdict is p.SettleVerdict.APPLY_COMMIT:
            assert known is not None and known.leg is not None
            self.world.apply(known.leg)
        if verdict is not p.SettleVerdict.NOOP:
            self.world.known[key] = p.Known(p.state_for(outcome), known.leg if known else None)
        return _STATE[self.world.known[key].state]

    async def Commit(self, request: shardnode_pb2.CommitRequest, context: Ctx) -> shardnode_pb2.CommitResponse:
        await self._check("Commit", context)
        state = await self._settle(request.shard_id, request.trade_id, Outcome.COMMITTED, context)
        return shardnode_pb2.CommitResponse(state=state)  # type: ignore[arg-type]

    async def Abort(self, request: shardnode_pb2.AbortRequest, context: Ctx) -> shardnode_pb2.AbortResponse:
        await self._check("Abort", context)
        state = await self._settle(request.shard_id, request.trade_id, Outcome.ABORTED, context)
        return shardnode_pb2.AbortResponse(state=state)  # type: ignore[arg-type]

    async def ExecuteLocalTrade(self, request: shardnode_pb2.ExecuteLocalTradeRequest, context: Ctx
                                ) -> shardnode_pb2.ExecuteLocalTradeResponse:
        await self._check("ExecuteLocalTrade", context)
        trade = Trade(request.trade_id, request.player_a, request.player_b,
                      Offer(tuple(request.a_gives.item_ids), request.a_gives.gold),
                      Offer(tuple(request.b_gives.item_ids), request.b_gives.gold))
        known = self.world.local.get(request.trade_id)
        d = p.decide_local_trade(trade, self.world.holdings(trade.player_a), self.world.holdings(trade.player_b), known)
        if known is None:
            if d.outcome is Outcome.COMMITTED:
                self.world.apply(trade.leg_a())
                self.world.apply(trade.leg_b())
            self.world.local[request.trade_id] = (d.outcome, d.reason)
            self.world.local_legs[request.trade_id] = trade.leg_a()
        return shardnode_pb2.ExecuteLocalTradeResponse(trade_id=request.trade_id, outcome=outcome_to_proto(d.outcome),
                                                       reason=d.reason, replayed=known is not None)

    async def ListTrades(self, request: shardnode_pb2.ListTradesRequest, context: Ctx
                         ) -> shardnode_pb2.ListTradesResponse:
        await self._check("ListTrades", context)
        if self.before_list is not None:
            await self.before_list()
        if request.shard_id and not self.leads(request.shard_id):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.node_id} does not lead {request.shard_id}")
        response = shardnode_pb2.ListTradesResponse()
        for (shard, trade_id), known in sorted(self.world.known.items()):
            wanted = trade_id == request.trade_id if request.trade_id else known.state is p.TradeState.PREPARED
            if self.leads(shard) and wanted and request.shard_id in ("", shard):
                response.trades.add(trade_id=trade_id, shard_id=shard, node_id=self.node_id,
                                    state=_STATE[known.state], cross_shard=True,
                                    leg=leg_to_proto(known.leg) if known.leg is not None else None)
        if request.trade_id in self.world.local:
            outcome, reason = self.world.local[request.trade_id]
            leg = self.world.local_legs.get(request.trade_id)
            response.trades.add(trade_id=request.trade_id, node_id=self.node_id, reason=reason,
                                leg=leg_to_proto(leg) if leg is not None else None,
                                state=shardnode_pb2.PARTICIPANT_TRADE_STATE_COMMITTED
                                if outcome is Outcome.COMMITTED else shardnode_pb2.PARTICIPANT_TRADE_STATE_ABORTED)
        return response


def _leads(app: ControlPlaneApp, node: str, shard: str) -> bool:
    assert app.assignments is not None
    a = app.assignments.entries.get(app.keys.assignment(ShardId(shard)))
    return a is not None and a.primary == node


@dataclass
class Cluster:
    app: ControlPlaneApp
    trades: trade_pb2_grpc.TradeCoordinatorStub
    world: World
    nodes: dict[str, TradeNode]

    @property
    def ring(self) -> Ring:
        assert self.app.ring is not None
        ring = self.app.ring.entries[self.app.keys.ring()]
        return ring

    def shard(self, player: str) -> str:
        return self.ring.shard_for(player)

    def node_of(self, player: str) -> TradeNode:
        assert self.app.assignments is not None
        a = self.app.assignments.entries[self.app.keys.assignment(self.ring.shard_for(player))]
        return self.nodes[a.primary]

    def players(self, same_shard: bool, count: int = 2, prefix: str = "p") -> list[str]:
        """``count`` players, all on one shard, or all on shards led by different nodes."""
        chosen: list[str] = []
        for i in range(10_000):
            name = f"{prefix}{i}"
            shards = {self.shard(c) for c in chosen}
            nodes = {self.node_of(c).node_id for c in chosen}
            if not chosen or (self.shard(name) in shards if same_shard else self.node_of(name).node_id not in nodes):
                chosen.append(name)
            if len(chosen) == count:
                return chosen
        raise AssertionError("no such players")

    async def stored(self, trade_id: str) -> trade_pb2.TradeRecord | None:
        kv = await self.app.store.get(self.app.keys.trade(TradeId(trade_id)))
        return None if kv is None else codec.decode(kv.value, trade_pb2.TradeRecord)


SETTINGS = TradeSettings(prepare_timeout_s=1.0, settle_call_timeout_s=0.3, settle_deadline_s=0.6,
                         local_trade_deadline_s=1.0, read_timeout_s=0.5, sweep_interval_s=3600, sweep_min_age_s=0)


@contextlib.asynccontextmanager
async def cluster(start: StartControlPlane) -> AsyncIterator[Cluster]:
    app = await start(lease_ttl_s=10, shards=4, replication_factor=1, trades=SETTINGS)
    world = World()
    servers: list[Server] = []
    beats: list[StreamNode] = []
    async with grpc.aio.insecure_channel(app.address) as channel:
        cp = controlplane_pb2_grpc.ControlPlaneStub(channel)
        nodes: dict[str, TradeNode] = {}
        try:
            for i in range(2):
                node = TradeNode(f"n{i}", world)
                server = await build_server("127.0.0.1:0", [ServiceBinding(
                    shardnode_pb2.DESCRIPTOR.services_by_name["ShardNode"].full_name, node,
                    shardnode_pb2_grpc.add_ShardNodeServicer_to_server)])
                servers.append(server)
                nodes[node.node_id] = node
                beats.append(StreamNode(cp, node.node_id, f"127.0.0.1:{server.port}", "ab"[i]))
            await asyncio.gather(*(beat.start() for beat in beats))  # both before the first placement, mostly

            async def placed() -> bool:
                listed = (await cp.ListAssignments(controlplane_pb2.ListAssignmentsRequest())).assignments
                assert app.assignments is not None
                return (len(listed) == 4 and all(a.primary for a in listed)
                        and sorted(collections.Counter(a.primary for a in listed).values()) == [2, 2]
                        and all(app.assignments.entries.get(app.keys.assignment(a.shard_id)) == a for a in listed))

            # When one node registers before the other, the first placement gives it every
            # shard and two handoffs follow (about 13 s here): hence the long deadline.
            await wait_for(placed, 60.0, "every shard to have a primary on both nodes")
            for node in nodes.values():
                node.leads = functools.partial(_leads, app, node.node_id)
            yield Cluster(app, trade_pb2_grpc.TradeCoordinatorStub(channel), world, nodes)  # type: ignore[no-untyped-call]
        finally:
            for beat in beats:
                await beat.close_stream()
            for server in servers:
                await server.stop_gracefully(0.1)


def request(trade_id: str, a: str, b: str, a_items: tuple[str, ...] = (), a_gold: int = 0,
            b_items: tuple[str, ...] = (), b_gold: int = 0) -> trade_pb2.ExecuteTradeRequest:
    return trade_to_request(Trade(trade_id, a, b, Offer(a_items, a_gold), Offer(b_items, b_gold)))


COMMITTED, ABORTED = common_pb2.TRADE_OUTCOME_COMMITTED, common_pb2.TRADE_OUTCOME_ABORTED


async def test_cross_shard_commit_moves_items_once_records_the_decision_and_retains_it(
    start_control_plane: StartControlPlane,
) -> None:
    async with cluster(start_control_plane) as c:
        a, b = c.players(same_shard=False)
        c.world.seed(a, ["sword"], 100)
        c.world.seed(b, ["shield"], 5)
        r = request("t1", a, b, ("sword",), 30, ("shield",), 0)
        first = await c.trades.ExecuteTrade(r)
        assert (first.outcome, first.cross_shard) == (COMMITTED, True)
        assert c.world.items == {a: {"shield"}, b: {"sword"}} and c.world.gold == {a: 70, b: 35}
        again = await c.trades.ExecuteTrade(r)  # a retry: same answer, nothing moves twice
        assert again.outcome == COMMITTED and c.world.gold == {a: 70, b: 35} and not c.world.escrows()
        record = await c.stored("t1")
        assert record is not None and record.outcome == COMMITTED and record.decided_by == "coordinator cp-0"
        assert {record.shard_a, record.shard_b} == {c.shard(a), c.shard(b)}
        # Retention: attached off the critical path to a lease of TTL retention + 1 h bucket.
        key = c.app.keys.trade(TradeId("t1"))

        async def retained() -> bool:
            kv = await c.app.store.get(key)
            return kv is not None and kv.lease != 0

        await wait_for(retained, 5.0, "the record to get its retention lease")
        kv = await c.app.store.get(key)
        assert kv is not None and codec.decode(kv.value, trade_pb2.TradeRecord) == record
        ttl_s = await c.app.store.lease_ttl(kv.lease)
        assert 24 * 3600 + 3600 - 30 <= ttl_s <= 24 * 3600 + 3600
        shown = await c.trades.GetTrade(trade_pb2.GetTradeRequest(trade_id="t1"))
        assert shown.state == trade_pb2.TRADE_STATE_DONE and shown.retained and len(shown.sides) == 2
        assert shown.request.player_a == a and shown.outcome == COMMITTED


async def test_a_caller_that_goes_away_does_not_abandon_its_trade(start_control_plane: StartControlPlane) -> None:
    async with cluster(start_control_plane) as c:
        a, b = c.players(same_shard=False)
        c.world.seed(a, ["sword"], 0)
        c.world.seed(b, [], 5)
        gate = c.node_of(a).gate = asyncio.Event()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c.trades.ExecuteTrade(request("t-gone", a, b, ("sword",), 0, (), 5), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.set()  # the prepare answers after the caller left; nobody retries

        async def finished() -> bool:
            record = await c.stored("t-gone")
            return record is not None and not c.world.escrows() and c.world.items.get(b) == {"sword"}

        # The coordinator ran it to its end: decided, both sides settled, no escrow held.
        await wait_for(finished, 5.0, "the trade to finish without its caller")
        record = await c.stored("t-gone")
        assert record is not None and record.outcome == COMMITTED
        assert c.world.gold == {a: 5, b: 0}


async def test_get_trade_never_calls_a_trade_on_its_way_not_found(
    start_control_plane: StartControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A game server that read NotFound as "never happened" and traded again under a new id
    # would move the items twice: the first request was still on its way, and committed.
    async with cluster(start_control_plane) as c, TradeClient([c.app.address]) as client:
        a, b = c.players(same_shard=False)
        c.world.seed(a, ["sword"], 0)
        c.world.seed(b, [], 5)
        coordinator = c.app.trade_coordinator
        assert coordinator is not None
        monkeypatch.setattr(coordinator, "settings", dataclasses.replace(coordinator.settings, prepare_timeout_s=30.0))
        gate = asyncio.Event()
        for node in c.nodes.values():
            node.gate = gate  # neither side has heard of it yet
        with pytest.raises(errors.DeadlineExceeded):
            await client.execute_trade("t-way", a, b, a_items=["sword"], b_gold=5, deadline_s=0.3)
        status = await client.get_trade("t-way")  # the coordinator runs it: being decided, not unknown
        assert status.state == "PREPARING" and status.outcome is None, status
        gate.set()
        retried = await client.execute_trade("t-way", a, b, a_items=["sword"], b_gold=5)
        assert retried.outcome is Outcome.COMMITTED and c.world.items[b] == {"sword"}

        # Sent by this client, answered by nobody, known to nobody: not final either.
        monkeypatch.setattr(trades_module, "MAX_TRADES_RUNNING", 0)
        with pytest.raises((errors.ResourceExhausted, errors.DeadlineExceeded)):  # refused, retried to the end
            await client.execute_trade("t-lost", a, b, b_gold=1, deadline_s=0.3)
        with pytest.raises(errors.Unavailable) as unknown:
            await client.get_trade("t-lost")
        assert "not known yet" in str(unknown.value) and "same id and terms" in str(unknown.value), unknown.value
        with pytest.raises(errors.NotFound):
            await client.get_trade("t-never-sent")
        with pytest.raises(errors.InvalidArgument):  # refused before anything was sent
            await client.execute_trade("t-bad", a, a, b_gold=1)
        with pytest.raises(errors.NotFound):
            await client.get_trade("t-bad")


def _same_shard_counted() -> float:
    labels = {"kind": "same_shard", "outcome": "committed"}
    return prometheus_client.REGISTRY.get_sample_value("bluemarble_trades_total", labels) or 0.0


async def test_same_shard_trade_is_one_local_transaction_without_a_record(
    start_control_plane: StartControlPlane,
) -> None:
    async with cluster(start_control_plane) as c:
        a, b = c.players(same_shard=True)
        c.world.seed(a, ["gem"], 0)
        c.world.seed(b, [], 10)
        counted = _same_shard_counted()
        answer = await c.trades.ExecuteTrade(request("local-1", a, b, ("gem",), 0, (), 10))
        assert (answer.outcome, answer.cross_shard) == (COMMITTED, False)
        # The node that runs it counts it (this fake one does not); the coordinator never
        # does, or a sum over processes would count the trade twice.
        assert _same_shard_counted() == counted
        assert c.world.items[b] == {"gem"} and c.world.gold == {a: 10, b: 0}
        assert await c.stored("local-1") is None
        assert "Prepare" not in c.node_of(a).calls
        shown = await c.trades.GetTrade(trade_pb2.GetTradeRequest(trade_id="local-1", player_id=a))
        assert shown.state == trade_pb2.TRADE_STATE_DONE and shown.outcome == COMMITTED and not shown.cross_shard
        terms = shown.request  # both sides' terms, from the shard's record
        assert (terms.trade_id, terms.player_a, terms.player_b) == ("local-1", a, b)
        assert (list(terms.a_gives.item_ids), terms.a_gives.gold, list(terms.b_gives.item_ids), terms.b_gives.gold) == (
            ["gem"], 0, [], 10)
        assert (answer.abort_cause, shown.abort_cause) == (common_pb2.TRADE_ABORT_CAUSE_UNSPECIFIED,) * 2
        refused = await c.trades.ExecuteTrade(request("local-2", a, b, ("gem",), 0, (), 1))  # a gave the gem
        assert (refused.outcome, refused.abort_cause) == (ABORTED, common_pb2.TRADE_ABORT_CAUSE_REFUSED)
        shown = await c.trades.GetTrade(trade_pb2.GetTradeRequest(trade_id="local-2", player_id=a))
        assert (shown.outcome, shown.reason) == (ABORTED, refused.reason)
        assert shown.abort_cause == common_pb2.TRADE_ABORT_CAUSE_UNSPECIFIED  # the node keeps the reason only


async def test_a_refusal_aborts_with_its_reason_and_releases_the_other_escrow(
    start_control_plane: StartControlPlane,
) -> None:
    async with cluster(start_control_plane) as c:
        a, b = c.players(same_shard=False)
        c.world.seed(a, ["sword"], 0)
        c.world.seed(b, [], 3)
        answer = await c.trades.ExecuteTrade(request("t2", a, b, ("sword",), 0, (), 50))
        assert answer.outcome == ABORTED and f"player {b} has 3 gold available, the trade needs 50" in answer.reason
        assert answer.abort_cause == common_pb2.TRADE_ABORT_CAUSE_REFUSED
        assert c.world.items[a] == {"sword"} and not c.world.escrows()
        record = await c.stored("t2")
        assert record is not None and record.outcome == ABORTED
        assert record.abort_cause == common_pb2.TRADE_ABORT_CAUSE_REFUSED
        again = await c.trades.ExecuteTrade(request("t2", a, b, ("sword",), 0, (), 50))  # from the record
        shown = await c.trades.GetTrade(trade_pb2.GetTradeRequest(trade_id="t2"))
        assert again.abort_cause == shown.abort_cause == common_pb2.TRADE_ABORT_CAUSE_REFUSED
        missing = await c.trades.ExecuteTrade(request("t3", a, b, ("axe",), 0, (), 1))
        assert missing.outcome == ABORTED and "does not own item axe" in missing.reason
        # The sword escrowed by another trade in flight: contended, not refused for its terms.
        c.world.known[(c.shard(a), "other")] = p.Known(p.TradeState.PREPARED, Leg(
            "other", a, Offer(("sword",), 0), Offer((), 0), "someone"))
        held = await c.trades.ExecuteTrade(request("t3b", a, b, ("sword",), 0, (), 1))
        assert (held.outcome, held.abort_cause) == (ABORTED, common_pb2.TRADE_ABORT_CAUSE_CONTENDED)
        assert "held by another trade" in held.reason


async def test_an_unavailable_participant_aborts_naming_its_shard(start_control_plane: StartControlPlane) -> None:
    async with cluster(start_control_plane) as c:
        a, b = c.players(same_shard=False)
        c.world.seed(a, ["sword"], 0)
        c.world.seed(b, ["bow"], 0)
        c.node_of(b).down = True
        answer = await c.trades.ExecuteTrade(request("t4", a, b, ("sword",), 0, ("bow",), 0))
        assert answer.outcome == ABORTED and "shard unavailable" in answer.reason and c.shard(b) in answer.reason
        assert answer.abort_cause == common_pb2.TRADE_ABORT_CAUSE_UNAVAILABLE  # the terms were fine
        # What the node said (a full disk, here "is down"), not only that time ran out.
        assert f"node {c.node_of(b).node_id} is down" in answer.reason, answer.reason
        assert not c.world.escrows()  # A's escrow was released by the Abort
        record = await c.stored("t4")
        assert record is not None and record.outcome == ABORTED
        assert not (await c.app.store.get(c.app.keys.trade(TradeId("t4")))).lease  # type: ignore[union-attr]
        c.node_of(b).down = False
        # The sweep finishes phase 2 at B, then retains the record.
        assert c.app.trade_sweep is not None
        assert await c.app.trade_sweep.sweep_once() == (1, 1)
        assert (await c.app.store.get(c.app.keys.trade(TradeId("t4")))).lease  # type: ignore[union-attr]


async def test_retries_after_a_coordinator_crash_at_each_step_give_one_answer(
    start_control_plane: StartControlPlane,
) -> None:
    async with cluster(start_control_plane) as c:
        a, b = c.players(same_shard=False)
        c.world.seed(a, ["i1", "i2", "i3"], 0)
        c.world.seed(b, [], 300)

        def prepare_both(trade: Trade) -> None:
            c.node_of(a).prepare(c.shard(a), trade.leg_a())
            c.node_of(b).prepare(c.shard(b), trade.leg_b())

        # Crashed before the prepares: the retry simply runs the trade.
        r1 = request("c1", a, b, ("i1",), 0, (), 100)
        assert (await c.trades.ExecuteTrade(r1)).outcome == COMMITTED
        # Crashed between the prepares and the decision: the retry decides.
        t2 = Trade("c2", a, b, Offer(("i2",), 0), Offer((), 100))
        prepare_both(t2)
        assert (await c.trades.ExecuteTrade(trade_to_request(t2))).outcome == COMMITTED
        # Crashed between the decision and the commits: the recorded decision is answered
        # and settled.
        t3 = Trade("c3", a, b, Offer(("i3",), 0), Offer((), 100))
        prepare_both(t3)
        record = trade_pb2.TradeRecord(trade_id="c3", outcome=COMMITTED, decided_by="coordinator gone",
                                       request=trade_to_request(t3), shard_a=c.shard(a), shard_b=c.shard(b))
        await c.app.store.put(c.app.keys.trade(TradeId("c3")), codec.encode(record))
        answer = await c.trades.ExecuteTrade(trade_to_request(t3))
        assert answer.outcome == COMMITTED
        assert c.world.items[b] == {"i1", "i2", "i3"} and c.world.gold == {a: 300, b: 0} and not c.world.escrows()
        # A recorded ABORTED stands even when both participants are prepared.
        c.world.seed(a, ["i4"], 0)
        t4 = Trade("c4", a, b, Offer(("i4",), 0), Offer((), 0))
        prepare_both(t4)
        aborted = trade_pb2.TradeRecord(trade_id="c4", outcome=ABORTED, reason="participant gave up",
                                        decided_by="participant shard-0")
        await c.app.store.put(c.app.keys.trade(TradeId("c4")), codec.encode(aborted))
        answer = await c.trades.ExecuteTrade(trade_to_request(t4))
        assert (answer.outcome, answer.reason) == (ABORTED, "participant gave up")
        assert c.world.items[a] == {"i4"} and not c.world.escrows()


async def test_resolve_trade_racing_execute_trade_first_writer_wins(start_control_plane: StartControlPlane) -> None:
    async with cluster(start_control_plane) as c:
        a, b = c.players(same_shard=False)
        outcomes = set()
        for i in range(6):
            c.world.seed(a, [f"x{i}"], 0)
            c.world.seed(b, [], 1)
            trade_id = f"race-{i}"
            executed, resolved = await asyncio.gather(
                c.trades.ExecuteTrade(request(trade_id, a, b, (f"x{i}",), 0, (), 1)),
                c.trades.ResolveTrade(trade_pb2.ResolveTradeRequest(
                    trade_id=trade_id, shard_id=c.shard(b), node_id=c.node_of(b).node_id,
                    reason="escrow past its deadline")),
            )
            record = await c.stored(trade_id)
            assert record is not None
            assert executed.outcome == resolved.outcome == record.outcome
            assert resolved.created == (record.decided_by == f"participant {c.shard(b)}")
            committed = executed.outcome == COMMITTED
            assert (c.world.items[b] == {f"x{i}"}) is committed and not c.world.escrows()
            outcomes.add(executed.outcome)
        # A ResolveTrade after the fact reads the record, never changes it.
        again = await c.trades.ResolveTrade(trade_pb2.ResolveTradeRequest(
            trade_id="race-0", shard_id=c.shard(a), node_id=c.node_of(a).node_id))
        assert not again.created and again.outcome == (await c.stored("race-0")).outcome  # type: ignore[union-attr]
        # if_decided only reads: the recorded outcome, or none, and nothing is written.
        looked = await c.trades.ResolveTrade(trade_pb2.ResolveTradeRequest(
            trade_id="race-0", shard_id=c.shard(a), node_id=c.node_of(a).node_id, if_decided=True))
        assert not looked.created and looked.outcome == again.outcome
        undecided = await c.trades.ResolveTrade(trade_pb2.ResolveTradeRequest(
            trade_id="never", shard_id=c.shard(a), node_id=c.node_of(a).node_id, if_decided=True))
        assert (undecided.outcome, undecided.created) == (common_pb2.TRADE_OUTCOME_UNSPECIFIED, False)
        assert await c.stored("never") is None
        fresh = await c.trades.ResolveTrade(trade_pb2.ResolveTradeRequest(
            trade_id="never", shard_id=c.shard(a), node_id=c.node_of(a).node_id))
        assert fresh.created and fresh.outcome == ABORTED and c.shard(a) in fresh.reason
        shown = await c.trades.GetTrade(trade_pb2.GetTradeRequest(trade_id="never"))
        assert shown.abort_cause == common_pb2.TRADE_ABORT_CAUSE_UNAVAILABLE  # its coordinator never decided
        # Only a shard's own nodes decide: an outsider cannot abort a trade id in advance.
        # (After a handoff the shard's old primary may still be listed as its replica: a
        # member, so the registered outsider is whichever node the assignment does not name.)
        assert c.app.assignments is not None
        held = c.app.assignments.entries[c.app.keys.assignment(c.shard(a))]
        others = sorted(set(c.nodes) - {held.primary, *held.replicas})
        cases = [
            (trade_pb2.ResolveTradeRequest(trade_id="later", shard_id=c.shard(a)), grpc.StatusCode.INVALID_ARGUMENT),
            (trade_pb2.ResolveTradeRequest(trade_id="later", shard_id=c.shard(a), node_id="nobody"),
             grpc.StatusCode.FAILED_PRECONDITION),
        ]
        cases += [(trade_pb2.ResolveTradeRequest(trade_id="later", shard_id=c.shard(a), node_id=node),
                   grpc.StatusCode.FAILED_PRECONDITION) for node in others]
        for outsider, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await c.trades.ResolveTrade(outsider)
            assert refused.value.code() == code, refused.value.details()
        # The escrowed leg a participant sends is checked as a Prepare's is, and nothing is written.
        member = {"shard_id": c.shard(a), "node_id": c.node_of(a).node_id}
        for leg, message in (
            (shardnode_pb2.TradeLeg(player_id="\u202eevil", counterpart_player_id=b,
                                    gives=common_pb2.Offer(gold=1)), "leg.player_id contains the characters"),
            (shardnode_pb2.TradeLeg(player_id=a, counterpart_player_id=b, gives=common_pb2.Offer(gold=2**64 - 1)),
             "leg.gives.gold"),
            (shardnode_pb2.TradeLeg(player_id=a, counterpart_player_id=b,
                                    receives=common_pb2.Offer(item_ids=[f"i{k}" for k in range(10_000)])),
             "leg.receives.item_ids lists 10000 items; a side may give at most 64"),
            (shardnode_pb2.TradeLeg(player_id=a, counterpart_player_id=b), "the trade is empty"),
        ):
            for if_decided in (False, True):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await c.trades.ResolveTrade(trade_pb2.ResolveTradeRequest(
                        trade_id="later", leg=leg, if_decided=if_decided, **member))
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert message in (refused.value.details() or ""), refused.value.details()
                assert len(refused.value.details() or "") < 400
        assert await c.stored("later") is None


async def test_a_termination_without_a_record_asks_the_other_side_and_recovers_a_lost_commit(
    start_control_plane: StartControlPlane,
) -> None:
    """The record of a trade whose one side committed is lost (etcd restored from a
    backup): the other side's termination gets COMMITTED, not ABORTED, and a retry of
    the trade by its caller gets COMMITTED too."""
    async with cluster(start_control_plane) as c:
        a, b = c.players(same_shard=False)
        shard_a, shard_b = c.shard(a), c.shard(b)
        asker = {"shard_id": shard_a, "node_id": c.node_of(a).node_id, "reason": "escrow past its deadline"}

        def escrow(trade_id: str, b_state: p.TradeState | None, b_leg: Leg | None = None) -> Leg:
            """a holds ``trade_id``'s escrow (a gives x, b gives 5 gold); b's side is in ``b_state``."""
            c.world.seed(a, [f"x-{trade_id}"], 0)
            c.world.seed(b, [], 5)
            trade = Trade(trade_id, a, b, Offer((f"x-{trade_id}",), 0), Offer((), 5))
            c.world.known[(shard_a, trade_id)] = p.Known(p.TradeState.PREPARED, trade.leg_a())
            if b_state is not None:
                c.world.known[(shard_b, trade_id)] = p.Known(b_state, b_leg or trade.leg_b())
            if b_state is p.TradeState.COMMITTED and b_leg is None:
                c.world.apply(trade.leg_b())
            return trade.leg_a()

        async def resolve(leg: Leg, wait: bool = True) -> trade_pb2.ResolveTradeResponse:
            answer: trade_pb2.ResolveTradeResponse = await c.trades.ResolveTrade(trade_pb2.ResolveTradeRequest(
                trade_id=leg.trade_id, leg=leg_to_proto(leg), wait_for_counterpart=wait, **asker))
            return answer

        # b's side committed, the record is gone: COMMITTED again, with the terms.
        leg = escrow("lost", p.TradeState.COMMITTED)
        answer = await resolve(leg)
        assert (answer.outcome, answer.created) == (COMMITTED, True)
        assert "the decision record was missing" in answer.reason
        record = await c.stored("lost")
        assert record is not None and record.outcome == COMMITTED and record.decided_by == f"participant {shard_a}"
        assert (record.shard_a, record.shard_b) == (shard_a, shard_b)
        # The caller's retry names b as A: the same exchange, the recorded answer.
        retried = await c.trades.ExecuteTrade(request("lost", b, a, (), 5, ("x-lost",), 0))
        assert retried.outcome == COMMITTED
        assert c.world.items[b] == {"x-lost"} and c.world.gold[a] == 5 and c.world.gold[b] == 0
        assert not [k for k in c.world.escrows() if k[1] == "lost"]

        # b's side is only prepared, aborted, or knows nothing: ABORTED.
        for trade_id, state in (("both-prepared", p.TradeState.PREPARED), ("b-aborted", p.TradeState.ABORTED),
                                ("b-never-prepared", None)):
            answer = await resolve(escrow(trade_id, state))
            assert (answer.outcome, answer.created) == (ABORTED, True), trade_id
        # b's side committed another trade under the id: this escrow is not part of it.
        other = Leg("reused", b, Offer((), 7), Offer(("y",), 0), a)
        answer = await resolve(escrow("reused", p.TradeState.COMMITTED, other))
        assert answer.outcome == ABORTED

        # b's node down: UNAVAILABLE while the termination waits, nothing written;
        # ABORTED once it no longer waits.
        leg = escrow("b-down", p.TradeState.COMMITTED)
        c.node_of(b).down = True
        try:
            with pytest.raises(grpc.aio.AioRpcError) as waiting:
                await resolve(leg)
            assert waiting.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "cannot be asked what it applied" in (waiting.value.details() or "")
            assert await c.stored("b-down") is None
            answer = await resolve(leg, wait=False)
            assert (answer.outcome, answer.created) == (ABORTED, True)
        finally:
            c.node_of(b).down = False
        # A record that exists is answered as it is: nobody is asked.
        calls = len(c.node_of(b).calls)
        assert (await resolve(leg)).outcome == ABORTED and len(c.node_of(b).calls) == calls


async def test_a_retry_is_not_aborted_while_one_side_is_silent_and_the_other_holds_an_earlier_escrow(
    start_control_plane: StartControlPlane,
) -> None:
    """b's side applied COMMITTED and the record was lost (etcd restored); a's side still
    holds the escrow. A retry while b's node is down must not record ABORTED (a's side
    would then abort): no decision, UNAVAILABLE, and once b answers, COMMITTED."""
    async with cluster(start_control_plane) as c:
        a, b = c.players(same_shard=False)
        c.world.seed(a, ["x"], 0)
        c.world.seed(b, [], 5)
        trade = Trade("silent", a, b, Offer(("x",), 0), Offer((), 5))
        c.world.known[(c.shard(a), "silent")] = p.Known(p.TradeState.PREPARED, trade.leg_a())
        c.world.known[(c.shard(b), "silent")] = p.Known(p.TradeState.COMMITTED, trade.leg_b())
        c.world.apply(trade.leg_b())
        c.node_of(b).down = True
        try:
            with pytest.raises(grpc.aio.AioRpcError) as undecided:
                await c.trades.ExecuteTrade(request("silent", a, b, ("x",), 0, (), 5))
            assert undecided.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "was not decided" in (undecided.value.details() or "")
            assert await c.stored("silent") is None
        finally:
            c.node_of(b).down = False
        answer = await c.trades.ExecuteTrade(request("silent", a, b, ("x",), 0, (), 5))
        assert answer.outcome == COMMITTED
        assert (c.world.items[a], c.world.gold[a], c.world.items[b], c.world.gold[b]) == (set(), 5, {"x"}, 0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"player_b": "A"}, "a player cannot trade with themselves"),
        ({"a_items": ("x", "x")}, "x"),
        ({"b_items": ("s",)}, "item 's' is listed on both sides"),
        ({"a_gold": 2**53 + 1}, "a_gives.gold"),
        ({"a_items": (), "a_gold": 0}, "the trade is empty"),
        ({"a_items": tuple(f"i{n}" for n in range(65))}, "a side may give at most 64"),
        ({"trade_id": ""}, "trade_id"),
        ({"trade_id": "t" * 129}, "trade_id"),
        ({"player_a": "p" * 5000}, "player_a"),
    ],
)
async def test_bad_inputs_are_invalid_argument_naming_the_problem(
    start_control_plane: StartControlPlane, change: dict[str, Any], message: str
) -> None:
    app = await start_control_plane(trades=SETTINGS)
    fields: dict[str, Any] = {"trade_id": "bad", "player_a": "A", "player_b": "B", "a_items": ("s",), "a_gold": 0}
    fields.update(change)
    r = request(fields.pop("trade_id"), fields.pop("player_a"), fields.pop("player_b"), **fields)
    if change == {"a_items": (), "a_gold": 0}:
        r.ClearField("a_gives")
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = trade_pb2_grpc.TradeCoordinatorStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ExecuteTrade(r)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details() or ""
    assert message in details and len(details) < 400


async def test_trades_on_one_execute_trades_stream_are_answered_as_their_unary_calls(
    start_control_plane: StartControlPlane,
) -> None:
    """The TradeClient sends its trades on one ExecuteTrades stream: the answers are the
    unary call's (a retry included, nothing moves twice), and each call's bad input is
    its own result, naming the problem; a malformed message ends the stream."""
    async with cluster(start_control_plane) as c:
        a, b = c.players(same_shard=False)
        c.world.seed(a, ["sword", "axe"], 100)
        c.world.seed(b, [], 50)
        async with TradeClient([c.app.address]) as client:
            results = await asyncio.gather(
                client.execute_trade("s1", a, b, a_items=["sword"], b_gold=10),
                client.execute_trade("s2", a, b, a_items=["axe"], b_gold=10),
                client.execute_trade("s3", a, b, a_items=["crown"], b_gold=10),  # not owned
            )
            again = await client.execute_trade("s1", a, b, a_items=["sword"], b_gold=10)
            [(_, stream)] = client._streams.values()
            assert stream.streams_opened == 1
        assert [r.outcome for r in results] == [Outcome.COMMITTED, Outcome.COMMITTED, Outcome.ABORTED]
        assert "crown" in results[2].reason and again.outcome is Outcome.COMMITTED
        assert c.world.items[b] == {"sword", "axe"} and c.world.gold == {a: 120, b: 30}
        # Raw calls: each call's error is its own result.
        calls = [
            trade_pb2.TradeCall(call_id=1, execute_trade=request("bad", a, a, ("x",))),
            trade_pb2.TradeCall(call_id=2),
            trade_pb2.TradeCall(call_id=3, timeout_ms=600_000, execute_trade=request("slow", a, b, ("x",))),
            trade_pb2.TradeCall(call_id=4, execute_trade=request("s1", a, b, ("sword",), 0, (), 10)),
        ]
        stream_call = c.trades.ExecuteTrades()
        await stream_call.write(trade_pb2.TradeCalls(calls=calls))
        answered: dict[int, trade_pb2.TradeResult] = {}
        while len(answered) < len(calls):
            message = await asyncio.wait_for(stream_call.read(), 10)
            answered.update((r.call_id, r) for r in message.results)
        refusals = {1: "cannot trade with themselves", 2: "carries no request", 3: "timeout_ms 600000"}
        for call_id, phrase in refusals.items():
            error = answered[call_id].error
            assert error.code == "INVALID_ARGUMENT" and phrase in error.message, (call_id, error)
        assert answered[4].execute_trade.outcome == COMMITTED
        # A message that reuses an id in flight ends the stream INVALID_ARGUMENT, once the
        # call taken before it is answered (its Prepare, held here, times out after 1 s).
        c.world.items[a].add("gem")  # B can take it: only A's held Prepare decides the trade
        gate = c.nodes[c.node_of(a).node_id].gate = asyncio.Event()
        try:
            await stream_call.write(trade_pb2.TradeCalls(calls=[
                trade_pb2.TradeCall(call_id=7, execute_trade=request("held", a, b, ("gem",))),
            ]))
            await stream_call.write(trade_pb2.TradeCalls(calls=[
                trade_pb2.TradeCall(call_id=7, execute_trade=request("again", a, b, ("axe",)))]))
            results: list[trade_pb2.TradeResult] = []
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while True:
                    results.extend((await asyncio.wait_for(stream_call.read(), 10)).results)
        finally:
            gate.set()
        assert [(r.call_id, r.execute_trade.outcome) for r in results] == [(7, ABORTED)], results
        assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "call_id 7 is already in flight" in (ended.value.details() or "")


async def test_a_resolve_reason_with_control_characters_is_refused_and_records_nothing(
    start_control_plane: StartControlPlane,
) -> None:
    async with cluster(start_control_plane) as c:
        a, _ = c.players(same_shard=False)
        node = c.node_of(a).node_id
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await c.trades.ResolveTrade(trade_pb2.ResolveTradeRequest(
                trade_id="t-esc", shard_id=c.shard(a), node_id=node, reason="\x01\x1b[31mX\u202e"))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reason" in (raised.value.details() or "")
        assert await c.stored("t-esc") is None


async def test_a_trade_id_reused_for_other_terms_is_invalid_argument_and_unknown_trades_not_found(
    start_control_plane: StartControlPlane,
) -> None:
    async with cluster(start_control_plane) as c:
        a, b = c.players(same_shard=False)
        c.world.seed(a, ["sword", "axe"], 0)
        c.world.seed(b, [], 10)
        assert (await c.trades.ExecuteTrade(request("t9", a, b, ("sword",), 0, (), 1))).outcome == COMMITTED
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await c.trades.ExecuteTrade(request("t9", a, b, ("axe",), 0, (), 1))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The participant knows the id with other terms: refused before any decision.
        assert "trade id 't9' was already used for a different trade on" in (raised.value.details() or "")
        assert c.world.items[a] == {"axe"}
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await c.trades.GetTrade(trade_pb2.GetTradeRequest(trade_id="nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        # Long ids (128 bytes is the limit) are cut in the answer: it stays a short line.
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await c.trades.GetTrade(trade_pb2.GetTradeRequest(trade_id="x" * 128, player_id="p" * 128))
        details = missing.value.details() or ""
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND and len(details) < 300, details
        assert "x" * 50 not in details and "(128 chars)" in details, details
        assert "no decision record, and the shard of player 'ppppp" in details, details


async def test_get_trade_with_a_side_nobody_could_ask_is_unavailable_or_names_the_silent_node(
    start_control_plane: StartControlPlane,
) -> None:
    """A primary that does not answer may hold the only trace of a trade (a same-shard
    trade leaves no record): NOT_FOUND would tell an operator it never happened."""
    async with cluster(start_control_plane) as c:
        a, b = c.players(same_shard=True)
        c.world.seed(a, ["gem"], 0)
        c.world.seed(b, [], 10)
        assert (await c.trades.ExecuteTrade(request("local-2", a, b, ("gem",), 0, (), 10))).outcome == COMMITTED
        x, y = c.players(same_shard=False)
        c.world.seed(x, ["ring"], 0)
        c.world.seed(y, [], 10)
        assert (await c.trades.ExecuteTrade(request("cross-2", x, y, ("ring",), 0, (), 10))).outcome == COMMITTED
        c.node_of(a).down = True
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await c.trades.GetTrade(trade_pb2.GetTradeRequest(trade_id="local-2", player_id=a))
        details = raised.value.details() or ""
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, details
        assert f"({c.node_of(a).node_id} did not answer); ask again" in details, details
        c.node_of(a).down = False
        c.node_of(y).down = True
        shown = await c.trades.GetTrade(trade_pb2.GetTradeRequest(trade_id="cross-2"))  # the record stands
        assert shown.outcome == COMMITTED and list(shown.unreachable_nodes) == [c.node_of(y).node_id]
        assert [s.shard_id for s in shown.sides] == [c.shard(x)]
        c.node_of(y).down = False
        shown = await c.trades.GetTrade(trade_pb2.GetTradeRequest(trade_id="cross-2"))
        assert not shown.unreachable_nodes and len(shown.sides) == 2


async def test_get_trade_reads_a_decision_recorded_while_it_asked_the_participants(
    start_control_plane: StartControlPlane,
) -> None:
    async with cluster(start_control_plane) as c:
        a, b = c.players(same_shard=False)
        c.world.seed(a, ["sword"], 0)
        c.world.seed(b, [], 10)
        assert (await c.trades.ExecuteTrade(request("t-race", a, b, ("sword",), 0, (), 1))).outcome == COMMITTED
        # The moment GetTrade can meet: no record yet when it reads etcd, then A's side
        # committed (after the decision was written) and B's not yet, when it asks them.
        key = c.app.keys.trade(TradeId("t-race"))
        kv = await c.app.store.get(key)
        assert kv is not None and await c.app.store.delete(key)
        b_side = (c.shard(b), "t-race")
        c.world.known[b_side] = p.Known(p.TradeState.PREPARED, c.world.known[b_side].leg)

        async def decision_lands() -> None:
            await c.app.store.put(key, kv.value)

        c.node_of(a).before_list = decision_lands
        shown = await c.trades.GetTrade(trade_pb2.GetTradeRequest(trade_id="t-race"))  # every primary asked
        assert shown.outcome == COMMITTED and shown.cross_shard, shown
        assert shown.state != trade_pb2.TRADE_STATE_PREPARING, shown
        assert sorted(s.state for s in shown.sides) == sorted(
            [shardnode_pb2.PARTICIPANT_TRADE_STATE_COMMITTED, shardnode_pb2.PARTICIPANT_TRADE_STATE_PREPARED])


async def test_get_trade_without_a_record_prefers_the_settled_same_shard_trade_over_leftover_escrows(
    start_control_plane: StartControlPlane,
) -> None:
    async with cluster(start_control_plane) as c:
        a, b = c.players(same_shard=False)
        # A same-shard trade committed under "t-mix"; an attempt that reused the id across
        # shards was refused and left its released escrow (ABORTED) on b's shard.
        c.world.local["t-mix"] = (Outcome.COMMITTED, "")
        leftover = Trade("t-mix", a, b, Offer((), 1), Offer((), 0))
        c.world.known[(c.shard(b), "t-mix")] = p.Known(p.TradeState.ABORTED, leftover.leg_b())
        shown = await c.trades.GetTrade(trade_pb2.GetTradeRequest(trade_id="t-mix"))
        assert (shown.state, shown.outcome, shown.cross_shard) == (trade_pb2.TRADE_STATE_DONE, COMMITTED, False)
        # Only leftovers that all settled alike, no record (expired): that outcome, done.
        del c.world.local["t-mix"]
        shown = await c.trades.GetTrade(trade_pb2.GetTradeRequest(trade_id="t-mix"))
        assert (shown.state, shown.outcome, shown.cross_shard) == (trade_pb2.TRADE_STATE_DONE, ABORTED, True)
        # One side still prepared: being decided.
        c.world.known[(c.shard(a), "t-mix")] = p.Known(p.TradeState.PREPARED, leftover.leg_a())
        shown = await c.trades.GetTrade(trade_pb2.GetTradeRequest(trade_id="t-mix"))
        assert shown.state == trade_pb2.TRADE_STATE_PREPARING and shown.cross_shard


def _prepared_ring_for_gold(c: Any, trade_id: str) -> tuple[str, str, Trade]:
    """Players on two shards, both legs of "a's ring for b's 7 gold" prepared (escrowed)
    and no decision recorded: what a coordinator that died before deciding leaves."""
    a, b = c.players(same_shard=False)
    c.world.seed(a, ["ring"], 0)
    c.world.seed(b, [], 7)
    t = Trade(trade_id, a, b, Offer(("ring",), 0), Offer((), 7))
    c.node_of(a).prepare(c.shard(a), t.leg_a())
    c.node_of(b).prepare(c.shard(b), t.leg_b())
    return a, b, t


async def test_the_sweep_keeps_a_record_whose_participant_is_down_and_lists_in_doubt_trades(
    start_control_plane: StartControlPlane,
) -> None:
    async with cluster(start_control_plane) as c:
        a, b, t = _prepared_ring_for_gold(c, "s1")
        listed = await c.trades.ListInDoubtTrades(trade_pb2.ListInDoubtTradesRequest())
        assert sorted(x.shard_id for x in listed.trades if x.trade_id == "s1") == sorted([c.shard(a), c.shard(b)])
        # Its coordinator died after deciding COMMITTED.
        record = trade_pb2.TradeRecord(trade_id="s1", outcome=COMMITTED, decided_by="coordinator gone",
                                       request=trade_to_request(t), shard_a=c.shard(a), shard_b=c.shard(b))
        # As its create-if-absent transaction wrote it: with its unretained copy, in one transaction.
        await c.app.store.txn([], [Put(c.app.keys.trade(TradeId("s1")), codec.encode(record)),
                                   Put(c.app.keys.unretained_trade(TradeId("s1")), codec.encode(record))])
        c.node_of(b).down = True
        listed = await c.trades.ListInDoubtTrades(trade_pb2.ListInDoubtTradesRequest())
        assert list(listed.unreachable_nodes) == [c.node_of(b).node_id]
        sweep = c.app.trade_sweep
        assert sweep is not None
        assert await sweep.sweep_once() == (1, 0)  # A committed; B down: kept unretained
        assert c.world.escrows() == [(c.shard(b), "s1")] and c.world.items[b] == set()
        assert not (await c.app.store.get(c.app.keys.trade(TradeId("s1")))).lease  # type: ignore[union-attr]
        c.node_of(b).down = False
        assert await sweep.sweep_once() == (1, 1)
        assert not c.world.escrows() and c.world.items[b] == {"ring"} and c.world.gold == {a: 7, b: 0}
        assert (await c.app.store.get(c.app.keys.trade(TradeId("s1")))).lease  # type: ignore[union-attr]
        assert await sweep.sweep_once() == (0, 0)
        # A record contradicting what a side applied (a split trade: never expected) is an
        # error in the control plane's log, naming the trade and the shard.
        c.world.known[(c.shard(a), "split")] = p.Known(p.TradeState.COMMITTED, t.leg_a())
        split = trade_pb2.TradeRecord(trade_id="split", outcome=ABORTED, decided_by="coordinator gone",
                                      shard_a=c.shard(a), shard_b=c.shard(b))
        await c.app.store.txn([], [Put(c.app.keys.trade(TradeId("split")), codec.encode(split)),
                                   Put(c.app.keys.unretained_trade(TradeId("split")), codec.encode(split))])
        with structlog.testing.capture_logs() as logs:
            assert await sweep.sweep_once() == (1, 0)
        [line] = [e for e in logs if e["log_level"] == "error"]
        assert "applied the other outcome" in line["event"] and (line["trade_id"], line["shard"]) == (
            "split", c.shard(a))


async def test_the_sweep_reads_every_record_on_its_first_pass_and_then_now_and_again(
    start_control_plane: StartControlPlane,
) -> None:
    """A record with no unretained copy (decided by a replica of an older release) is
    found by the full passes only: the first, then one in every sweep_full_scan_every."""
    async with cluster(start_control_plane) as c:
        a, b, t = _prepared_ring_for_gold(c, "old1")
        record = trade_pb2.TradeRecord(trade_id="old1", outcome=COMMITTED, decided_by="an older release",
                                       request=trade_to_request(t), shard_a=c.shard(a), shard_b=c.shard(b))
        await c.app.store.put(c.app.keys.trade(TradeId("old1")), codec.encode(record))
        sweep = c.app.trade_sweep
        assert sweep is not None
        sweep._settings = dataclasses.replace(sweep._settings, sweep_full_scan_every=2)
        sweep.passes = 0
        c.node_of(b).down = True
        assert await sweep.sweep_once() == (1, 0)  # pass 1, full: found; B down
        c.node_of(b).down = False
        assert await sweep.sweep_once() == (0, 0)  # pass 2 reads the copies: it has none
        assert await sweep.sweep_once() == (1, 1)  # pass 3, full: settled and retained
        assert not c.world.escrows() and c.world.items[b] == {"ring"}


# ---- same-shard trades straight from the client, against real shard nodes ----


@pytest.mark.e2e
async def test_direct_same_shard_trades_against_real_nodes_agree_with_the_coordinator_and_survive_a_failover(
    etcd: Any, cluster_name: str, tmp_path: Any,
) -> None:
    """A TradeClient with a RoutingClient sends same-shard trades to the primary itself:
    they commit, move items and gold once, answer the same as the coordinator for the
    same trade id (both ways), record refusals, refuse a reused trade id, and follow a
    SIGKILLed primary to its successor; cross-shard trades still go through the
    coordinator."""
    from bluemarble.client.routing import RoutingClient
    from bluemarble.client.trades import TradeClient
    from bluemarble.core import errors
    from tests.e2e.conftest import ProcessCluster
    from tests.e2e.test_data_plane import eventually, failed_over, grant_all, led_by, settled

    cluster = ProcessCluster(etcd, cluster_name, tmp_path)
    try:
        cluster.start_control_plane("--lease-ttl-s", "2", "--replication-factor", "2", "--shards", "4")
        for node, zone in (("n1", "z1"), ("n2", "z2"), ("n3", "z3")):
            cluster.start_node(node, zone)
        await eventually(settled(cluster, 4, 2), 40, "every shard served, placement settled")
        async with RoutingClient(cluster.control_planes, max_attempts=1000) as routing, \
                TradeClient(cluster.control_planes, routing=routing) as direct, \
                TradeClient(cluster.control_planes) as via_coordinator:
            players = [f"direct-{i}" for i in range(24)]
            by_shard: dict[str, list[str]] = collections.defaultdict(list)
            for player in players:
                by_shard[routing.resolve(player).shard_id].append(player)
            a, b = next(ps for ps in by_shard.values() if len(ps) >= 2)[:2]
            far = next(p for p in players if routing.resolve(p).shard_id != routing.resolve(a).shard_id)
            await grant_all(routing, {f"seed-{p}": (p, [f"{p}/gem", f"{p}/orb"], 100) for p in (a, b, far)})

            async def holdings(player: str) -> tuple[set[str], int]:
                inventory = await routing.get_inventory(player)
                return set(inventory.item_ids), inventory.gold

            # Direct, then the same id through the coordinator: one answer, one move.
            first = await direct.execute_trade("d-1", a, b, a_items=[f"{a}/gem"], b_gold=10, deadline_s=20)
            assert (first.outcome.name, first.cross_shard, first.attempts) == ("COMMITTED", False, 1)
            again = await via_coordinator.execute_trade("d-1", a, b, a_items=[f"{a}/gem"], b_gold=10, deadline_s=20)
            assert (again.outcome.name, again.cross_shard) == ("COMMITTED", False)
            assert await holdings(a) == ({f"{a}/orb"}, 110) and await holdings(b) == (
                {f"{b}/gem", f"{b}/orb", f"{a}/gem"}, 90)
            # Through the coordinator first, then directly: the same.
            back = await via_coordinator.execute_trade("d-2", a, b, b_items=[f"{a}/gem"], a_gold=10, deadline_s=20)
            replay = await direct.execute_trade("d-2", a, b, b_items=[f"{a}/gem"], a_gold=10, deadline_s=20)
            assert back.committed and replay.committed and not replay.cross_shard
            assert await holdings(a) == ({f"{a}/gem", f"{a}/orb"}, 100)
            # A refusal is an ABORTED answer naming the item, recorded: the retry says the same.
            refused = await direct.execute_trade("d-3", a, b, a_items=[f"{b}/orb"], deadline_s=20)
            assert refused.outcome.name == "ABORTED" and f"{b}/orb" in refused.reason
            assert (await direct.execute_trade("d-3", a, b, a_items=[f"{b}/orb"], deadline_s=20)).reason == (
                refused.reason)
            with pytest.raises(errors.InvalidArgument, match=r"reused|different"):
                await direct.execute_trade("d-1", a, b, a_gold=1, deadline_s=20)
            # Cross-shard players go through the coordinator.
            cross = await direct.execute_trade("d-4", a, far, a_gold=1, b_gold=2, deadline_s=20)
            assert cross.committed and cross.cross_shard
            # SIGKILL the pair's primary: the next direct trade follows the failover.
            victim = routing.resolve(a).primary
            assert victim is not None
            led = led_by(cluster, victim)
            cluster.process(victim).kill()
            after = await direct.execute_trade("d-5", a, b, a_items=[f"{a}/orb"], b_gold=5, deadline_s=30)
            assert after.committed and not after.cross_shard
            await eventually(lambda: failed_over(cluster, led, victim), 30, "the victim's shards failed over")
            assert routing.resolve(a).primary != victim
            assert await holdings(b) == ({f"{b}/gem", f"{b}/orb", f"{a}/orb"}, 95)
    finally:
        cluster.stop_all()


# ---- the decision record's encoding ----


@pytest.mark.parametrize("record", [
    trade_pb2.TradeRecord(
        trade_id="x-1", outcome=common_pb2.TRADE_OUTCOME_COMMITTED, decided_by="coordinator cp-0",
        decided_at_ms=1_700_000_000_123, shard_a="shard-001", shard_b="shard-002",
        request=trade_to_request(Trade("x-1", "a", "b", Offer(("a/gem", "a/orb"), 0), Offer((), 2**53)))),
    trade_pb2.TradeRecord(
        trade_id="x-2", outcome=common_pb2.TRADE_OUTCOME_ABORTED, reason='b has 3 gold, not 5 "quoted" \\ é ☃',
        decided_by="coordinator cp-1", decided_at_ms=1, request=trade_pb2.ExecuteTradeRequest(
            trade_id="x-2", player_a="é", player_b="b", b_gives=common_pb2.Offer(gold=5))),
    trade_pb2.TradeRecord(trade_id="x-3", outcome=common_pb2.TRADE_OUTCOME_ABORTED, reason="aborted by participant",
                          decided_by="participant shard-003", shard_a="shard-003"),
    trade_pb2.TradeRecord(trade_id="x-4"),
    trade_pb2.TradeRecord(trade_id="x-5", outcome=99),  # type: ignore[arg-type]
    trade_pb2.TradeRecord(trade_id="x-6", outcome=common_pb2.TRADE_OUTCOME_ABORTED,
                          abort_cause=common_pb2.TRADE_ABORT_CAUSE_UNAVAILABLE),
    trade_pb2.TradeRecord(trade_id="x-7", outcome=common_pb2.TRADE_OUTCOME_ABORTED,
                          abort_cause=common_pb2.TRADE_ABORT_CAUSE_REFUSED),
    trade_pb2.TradeRecord(trade_id="x-8", abort_cause=77),  # type: ignore[arg-type]
])
def test_the_decision_record_encoder_writes_what_the_generic_codec_writes(record: trade_pb2.TradeRecord) -> None:
    from controlplane.store.trade_store import encode_record

    assert encode_record(record) == codec.encode(record)
    assert codec.decode(encode_record(record), trade_pb2.TradeRecord) == record
