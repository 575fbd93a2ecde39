"""The trade participant of a shard node (shardnode.participant) over a real data plane and
SQLite, served through the real ShardNode gRPC service, with a stand-in agent (our own
boundary) and a real gRPC TradeCoordinator stand-in for ResolveTrade: idempotent
Prepare/Commit/Abort, refusal reasons, two concurrent prepares of one item under group
commit, termination asking for the decision and aborting, and bad inputs with their
statuses and messages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import grpc.aio
import pytest
import structlog.testing

from bluemarble.client.control_plane import ControlPlaneClient
from bluemarble.client.ring_router import RingRouter
from bluemarble.core import limits
from bluemarble.core.ids import PlayerId, ShardId
from bluemarble.core.ring import initial_ring
from bluemarble.core.trades import TradeState
from bluemarble.runtime.grpc_server import ServiceBinding, build_server
from bluemarble.v1 import common_pb2, shardnode_pb2, shardnode_pb2_grpc, trade_pb2, trade_pb2_grpc
from shardnode import participant as participant_module
from shardnode.agent import SessionState
from shardnode.dataplane import DataPlane
from shardnode.participant import Participant
from shardnode.service import ShardNodeService
from shardnode.storage import NodeStorage
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

SHARD = ShardId("shard-0")
PREPARED, REFUSED, DECIDED = (
    shardnode_pb2.TRADE_VOTE_PREPARED,
    shardnode_pb2.TRADE_VOTE_REFUSED,
    shardnode_pb2.TRADE_VOTE_DECIDED,
)
COMMITTED_STATE, ABORTED_STATE = (
    shardnode_pb2.PARTICIPANT_TRADE_STATE_COMMITTED,
    shardnode_pb2.PARTICIPANT_TRADE_STATE_ABORTED,
)


class Resolver(trade_pb2_grpc.TradeCoordinatorServicer):
    """ResolveTrade as the control plane answers it: the record, or ABORTED created (with
    ``if_decided``, none and nothing created)."""

    def __init__(self) -> None:
        self.records: dict[str, int] = {}
        self.calls: list[trade_pb2.ResolveTradeRequest] = []
        self.unavailable = False  # answer UNAVAILABLE, as a control plane without etcd does
        self.gate: asyncio.Event | None = None  # when set, an answer waits for it

    async def ResolveTrade(
        self, request: trade_pb2.ResolveTradeRequest, context: Any
    ) -> trade_pb2.ResolveTradeResponse:
        self.calls.append(request)
        if self.gate is not None:
            await self.gate.wait()
        if self.unavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "etcd unreachable")
        if request.if_decided and request.trade_id not in self.records:
            return trade_pb2.ResolveTradeResponse(trade_id=request.trade_id)
        created = request.trade_id not in self.records
        outcome = self.records.setdefault(request.trade_id, common_pb2.TRADE_OUTCOME_ABORTED)
        return trade_pb2.ResolveTradeResponse(
            trade_id=request.trade_id, outcome=outcome, reason="aborted by participant", created=created  # type: ignore[arg-type]
        )


@dataclass
class Node:
    stub: shardnode_pb2_grpc.ShardNodeStub
    dp: DataPlane
    participant: Participant
    storage: NodeStorage
    resolver: Resolver


@pytest.fixture(params=["NORMAL", "FULL"])
async def node(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Node]:
    """One node, primary of the single shard without replicas; FULL: group commit."""
    storage = NodeStorage.open(tmp_path, synchronous=request.param)
    resolver = Resolver()
    cp_server = await build_server(
        "127.0.0.1:0",
        [
            ServiceBinding(
                trade_pb2.DESCRIPTOR.services_by_name["TradeCoordinator"].full_name,
                resolver,
                trade_pb2_grpc.add_TradeCoordinatorServicer_to_server,
            )
        ],
    )
    client = ControlPlaneClient([f"127.0.0.1:{cp_server.port}"])
    agent = SimpleNamespace(
        on_assignments=None, status_provider=None, assignments={}, addresses={},
        session_state=SessionState.CONNECTED, registration=None, config=None,
    )
    dp = DataPlane("n1", storage, agent, RingRouter.from_ring(initial_ring(1, vnodes=4)))  # type: ignore[arg-type]
    participant = Participant(dp, client, escrow_timeout_s=0.5, check_interval_s=0.05)
    holder = [participant]
    server = await build_server(
        "127.0.0.1:0",
        [
            ServiceBinding(
                shardnode_pb2.DESCRIPTOR.services_by_name["ShardNode"].full_name,
                ShardNodeService("n1", lambda: [], lambda: dp, lambda: 0, lambda: holder[0]),
                shardnode_pb2_grpc.add_ShardNodeServicer_to_server,
            )
        ],
        max_request_bytes=limits.SHARD_NODE_MAX_REQUEST_BYTES,
    )
    agent.assignments = {SHARD: common_pb2.Assignment(shard_id=SHARD, epoch=3, primary="n1")}
    dp.on_assignments()
    await participant.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")

    async def serving() -> bool:
        return any(s.serving for s in dp.statuses())

    await wait_for(serving, 5.0, "the node to serve")
    try:
        yield Node(shardnode_pb2_grpc.ShardNodeStub(channel), dp, participant, storage, resolver)  # type: ignore[no-untyped-call]
    finally:
        await channel.close(None)
        await participant.stop()
        await server.stop_gracefully(0.2)
        await cp_server.stop_gracefully(0.2)
        await dp.stop()
        await client.close()
        storage.close()


def leg(player: str, gives: list[str], gold: int = 0, receives: list[str] | None = None, rgold: int = 0,
        other: str = "zed") -> shardnode_pb2.TradeLeg:
    return shardnode_pb2.TradeLeg(
        player_id=player,
        gives=common_pb2.Offer(item_ids=gives, gold=gold),
        receives=common_pb2.Offer(item_ids=receives or [], gold=rgold),
        counterpart_player_id=other,
    )


def prepare(trade_id: str, *legs: shardnode_pb2.TradeLeg, **fields: Any) -> shardnode_pb2.PrepareRequest:
    return shardnode_pb2.PrepareRequest(**{"trade_id": trade_id, "shard_id": SHARD, "legs": list(legs), **fields})


async def seed(n: Node, player: str, items: list[str], gold: int) -> None:
    await n.stub.GrantItems(
        shardnode_pb2.GrantItemsRequest(request_id=f"seed-{player}", player_id=player, item_ids=items, gold=gold)
    )


async def test_prepare_commit_abort_are_idempotent_and_refusals_name_the_item_or_amount(node: Node) -> None:
    n = node
    await seed(n, "alice", ["sword", "shield"], 100)
    first = await n.stub.Prepare(prepare("t1", leg("alice", ["sword"], 30, ["gem"], 5)))
    assert first.vote == PREPARED and first.prepared and first.epoch == 3 and first.deadline_ms > 0
    assert not first.escrowed_before
    again = await n.stub.Prepare(prepare("t1", leg("alice", ["sword"], 30, ["gem"], 5)))
    assert again.vote == PREPARED and again.deadline_ms == first.deadline_ms and again.escrowed_before
    inventory = await n.stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id="alice"))
    assert list(inventory.escrowed_item_ids) == ["sword"] and inventory.escrowed_gold == 30
    # Refusals: an item not owned, an item held by another trade, gold beyond what is free.
    for trade_id, the_leg, words in [
        ("t2", leg("alice", ["crown"]), "does not own item crown"),
        ("t2", leg("alice", ["sword"]), "item sword is held by another trade"),
        ("t2", leg("alice", [], 71), "has 70 gold available, the trade needs 71"),
    ]:
        refused = await n.stub.Prepare(prepare(trade_id, the_leg))
        assert (refused.vote, refused.prepared) == (REFUSED, False) and words in refused.reason, refused.reason
    assert n.storage.trade(SHARD, "t2") is None  # refusals are not recorded
    # Same trade id, other terms.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await n.stub.Prepare(prepare("t1", leg("alice", ["shield"])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reused" in (info.value.details() or "")
    # Commit, twice; then a conflicting Abort is refused and changes nothing.
    commit = shardnode_pb2.CommitRequest(trade_id="t1", shard_id=SHARD)
    assert (await n.stub.Commit(commit)).state == COMMITTED_STATE
    assert (await n.stub.Commit(commit)).state == COMMITTED_STATE
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await n.stub.Abort(shardnode_pb2.AbortRequest(trade_id="t1", shard_id=SHARD))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already COMMITTED" in (info.value.details() or "")
    inventory = await n.stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id="alice"))
    assert (sorted(inventory.item_ids), inventory.gold) == (["gem", "shield"], 75)
    assert not inventory.escrowed_item_ids
    # A late Prepare of the committed trade answers the outcome.
    late = await n.stub.Prepare(prepare("t1", leg("alice", ["sword"], 30, ["gem"], 5)))
    assert (late.vote, late.outcome) == (DECIDED, common_pb2.TRADE_OUTCOME_COMMITTED)
    # Abort without an escrow is recorded: a late Prepare answers ABORTED instead of escrowing.
    assert (await n.stub.Abort(shardnode_pb2.AbortRequest(trade_id="t3", shard_id=SHARD))).state == ABORTED_STATE
    late = await n.stub.Prepare(prepare("t3", leg("alice", ["shield"])))
    assert (late.vote, late.outcome) == (DECIDED, common_pb2.TRADE_OUTCOME_ABORTED)
    # Commit of a trade never prepared here: refused, nothing recorded.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await n.stub.Commit(shardnode_pb2.CommitRequest(trade_id="t9", shard_id=SHARD))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no escrow" in (info.value.details() or "")
    assert n.storage.trade(SHARD, "t9") is None
    listed = await n.stub.ListTrades(shardnode_pb2.ListTradesRequest(trade_id="t1"))
    assert [(t.shard_id, t.state, t.node_id) for t in listed.trades] == [(SHARD, COMMITTED_STATE, "n1")]
    # One shard's record (what the control plane asks a trade's other side), only of its primary.
    listed = await n.stub.ListTrades(shardnode_pb2.ListTradesRequest(trade_id="t1", shard_id=SHARD, limit=1))
    assert [(t.shard_id, t.state, t.leg.player_id) for t in listed.trades] == [(SHARD, COMMITTED_STATE, "alice")]
    assert not (await n.stub.ListTrades(shardnode_pb2.ListTradesRequest(trade_id="t9", shard_id=SHARD))).trades
    other = "shard-3" if SHARD != "shard-3" else "shard-2"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await n.stub.ListTrades(shardnode_pb2.ListTradesRequest(trade_id="t1", shard_id=other))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"not the primary of {other}" in (info.value.details() or "")


async def test_repeated_conflicting_settles_log_one_warning_per_interval(node: Node) -> None:
    n = node
    await seed(n, "alice", ["sword"], 10)
    await n.stub.Prepare(prepare("t1", leg("alice", ["sword"])))
    await n.stub.Commit(shardnode_pb2.CommitRequest(trade_id="t1", shard_id=SHARD))
    with structlog.testing.capture_logs() as logs:
        for _ in range(20):  # a caller that is not the coordinator, repeating itself
            with pytest.raises(grpc.aio.AioRpcError):
                await n.stub.Abort(shardnode_pb2.AbortRequest(trade_id="t1", shard_id=SHARD))
            with pytest.raises(grpc.aio.AioRpcError):
                await n.stub.Commit(shardnode_pb2.CommitRequest(trade_id="never-prepared", shard_id=SHARD))
    warnings = [e["event"] for e in logs if e["log_level"] in ("warning", "error")]
    assert sorted(warnings) == [
        "COMMITTED for a trade with no escrow here: refused",
        "conflicting settle refused: the trade already applied the other outcome",
    ], warnings
    assert not any(e["log_level"] == "error" for e in logs)  # any client can send these without mutual TLS


async def test_a_grant_of_an_item_on_its_way_is_refused_and_a_commit_that_cannot_apply_is_an_error(
    node: Node,
) -> None:
    """Alice's escrow receives a gem from another shard: granting that id here is refused
    (the commit could never apply). Were the gem here anyway (minted twice, on a node that
    could not see the escrow), the COMMITTED settle is refused and logged as an error, once
    per interval: the decision stands, and only an operator can resolve it."""
    n = node
    await seed(n, "alice", [], 10)
    await n.stub.Prepare(prepare("t1", leg("alice", [], 3, ["gem"])))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await n.stub.GrantItems(shardnode_pb2.GrantItemsRequest(request_id="g-bob", player_id="bob", item_ids=["gem"]))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "item 'gem' is already owned: trade 't1' brings it" in (info.value.details() or "")
    with n.storage._conn:  # the gem minted twice where this node could not see the escrow
        n.storage._conn.execute("INSERT INTO items (shard_id, item_id, player_id) VALUES (?, 'gem', 'bob')",
                                (SHARD,))
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await n.stub.Commit(shardnode_pb2.CommitRequest(trade_id="t1", shard_id=SHARD))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == [
        "a COMMITTED trade cannot apply on this shard; its escrow stays until an operator resolves the conflict"
    ], logs
    assert "receives is already on" in errors[0]["error"]
    assert n.storage.trade(SHARD, "t1").state is TradeState.PREPARED  # type: ignore[union-attr]


async def test_giving_an_item_still_on_its_way_is_a_pending_refusal(node: Node) -> None:
    """A chain sent at once: t1 brings alice a gem, t2 has her give it on before t1
    settled. t2 is refused as pending (CONTENDED: the same exchange may go through once t1
    settles), not as an item she does not own."""
    n = node
    await seed(n, "alice", [], 10)
    await n.stub.Prepare(prepare("t1", leg("alice", [], 1, ["gem"])))
    refused = await n.stub.Prepare(prepare("t2", leg("alice", ["gem"], 0, [], 2)))
    assert refused.vote == REFUSED and refused.refused_pending, refused
    assert "does not own item gem yet: a trade or grant bringing it has not settled" in refused.reason
    await n.stub.Commit(shardnode_pb2.CommitRequest(trade_id="t1", shard_id=SHARD))
    assert (await n.stub.Prepare(prepare("t3", leg("alice", ["gem"], 0, [], 2)))).vote == PREPARED


async def test_the_in_doubt_gauge_counts_escrows_past_their_deadline_only(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trade in flight holds an escrow within its deadline: not "in doubt" (the alert on
    the gauge would page a healthy cluster under load). Past its deadline it counts."""
    n = node
    await n.participant.stop()  # no termination: the escrow stays whatever the clock says
    await seed(n, "alice", ["sword"], 10)
    await n.stub.Prepare(prepare("t1", leg("alice", ["sword"], 1)))
    record = n.storage.trade(SHARD, "t1")
    assert record is not None
    monkeypatch.setattr(n.participant._clock, "wall_ms", lambda: record.deadline_ms - 1)
    assert n.participant.refresh_in_doubt(force=True) == 0
    monkeypatch.setattr(n.participant._clock, "wall_ms", lambda: record.deadline_ms + 60_000)
    assert n.participant.refresh_in_doubt(force=True) == 1


async def test_two_concurrent_prepares_of_one_item_escrow_it_once(node: Node) -> None:
    n = node
    await seed(n, "alice", ["sword"], 10)
    answers = await asyncio.gather(
        *(n.stub.Prepare(prepare(f"c{i}", leg("alice", ["sword"], 1))) for i in range(8))
    )
    assert sorted(a.vote for a in answers) == [PREPARED] + [REFUSED] * 7
    # Refused because another trade holds the sword (pending), not because of the terms.
    assert all(a.refused_pending for a in answers if a.vote == REFUSED)
    assert n.storage.holdings(SHARD, PlayerId("alice")).escrowed_items == frozenset({"sword"})
    await seed(n, "carol", ["ring"], 0)
    local = [shardnode_pb2.ExecuteLocalTradeRequest(
        trade_id=f"lc-{item}", shard_id=SHARD, player_a="alice", player_b="carol",
        a_gives=common_pb2.Offer(item_ids=[item]), b_gives=common_pb2.Offer(item_ids=["ring"])) for item in
        ("sword", "axe")]
    contended, refused = [await n.stub.ExecuteLocalTrade(r) for r in local]
    assert (contended.outcome, contended.abort_cause) == (
        common_pb2.TRADE_OUTCOME_ABORTED, common_pb2.TRADE_ABORT_CAUSE_CONTENDED)
    assert (refused.outcome, refused.abort_cause) == (
        common_pb2.TRADE_OUTCOME_ABORTED, common_pb2.TRADE_ABORT_CAUSE_REFUSED)  # alice has no axe
    replayed = await n.stub.ExecuteLocalTrade(local[0])
    assert replayed.replayed and replayed.reason == contended.reason  # the node keeps the reason, not the cause
    assert len(n.storage.prepared_trades([SHARD])) == 1
    # Started in one event-loop turn: under group commit the second decides while the
    # first's escrow is queued, not yet in storage.
    await seed(n, "bob", ["axe"], 0)
    direct = await asyncio.gather(
        *(n.participant.prepare(prepare(f"d{i}", leg("bob", ["axe"])), 2.0) for i in range(2))
    )
    assert sorted(a.vote for a in direct) == [PREPARED, REFUSED]
    assert "held by another trade" in next(a.reason for a in direct if a.vote == REFUSED)


async def test_same_shard_trades_are_recorded_and_replayed(node: Node) -> None:
    n = node
    await seed(n, "alice", ["sword"], 0)
    await seed(n, "bob", [], 50)
    request = shardnode_pb2.ExecuteLocalTradeRequest(
        trade_id="l1", shard_id=SHARD, player_a="alice", player_b="bob",
        a_gives=common_pb2.Offer(item_ids=["sword"]), b_gives=common_pb2.Offer(gold=20),
    )
    first = await n.stub.ExecuteLocalTrade(request)
    assert (first.outcome, first.replayed) == (common_pb2.TRADE_OUTCOME_COMMITTED, False)
    again = await n.stub.ExecuteLocalTrade(request)
    assert (again.outcome, again.replayed) == (common_pb2.TRADE_OUTCOME_COMMITTED, True)
    # The same exchange with the players named the other way round is the same trade, as
    # across shards (Trade.same_exchange): the recorded answer, not "a different trade".
    swapped = shardnode_pb2.ExecuteLocalTradeRequest(
        trade_id="l1", shard_id=SHARD, player_a="bob", player_b="alice",
        a_gives=common_pb2.Offer(gold=20), b_gives=common_pb2.Offer(item_ids=["sword"]),
    )
    again = await n.stub.ExecuteLocalTrade(swapped)
    assert (again.outcome, again.replayed) == (common_pb2.TRADE_OUTCOME_COMMITTED, True)
    other = shardnode_pb2.ExecuteLocalTradeRequest()
    other.CopyFrom(swapped)
    other.a_gives.gold = 21
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await n.stub.ExecuteLocalTrade(other)
    assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reused with different terms" in (reused.value.details() or "")
    bob = await n.stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id="bob"))
    assert (list(bob.item_ids), bob.gold) == (["sword"], 30)
    refused = shardnode_pb2.ExecuteLocalTradeRequest()
    refused.CopyFrom(request)
    refused.trade_id = "l2"  # alice no longer has the sword: ABORTED, recorded, same answer again
    for replayed in (False, True):
        answer = await n.stub.ExecuteLocalTrade(refused)
        assert (answer.outcome, answer.replayed) == (common_pb2.TRADE_OUTCOME_ABORTED, replayed)
        assert "does not own item sword" in answer.reason


async def test_termination_asks_for_the_decision_and_aborts_when_none_exists(node: Node) -> None:
    n = node
    await seed(n, "alice", ["sword"], 10)
    await n.stub.Prepare(prepare("t1", leg("alice", ["sword"], 4)))

    async def settled() -> bool:
        return not n.storage.prepared_trades([SHARD])

    await wait_for(settled, 5.0, "the escrow past its deadline to be settled")
    assert [c.trade_id for c in n.resolver.calls] == ["t1"] and n.resolver.calls[0].shard_id == SHARD
    # The escrow waits for the other side to be asked rather than abort without it (a lost record).
    assert n.resolver.calls[0].wait_for_counterpart and n.resolver.calls[0].leg.player_id == "alice"
    record = n.storage.trade(SHARD, "t1")
    assert record is not None and record.state.name == "ABORTED"
    assert n.storage.holdings(SHARD, PlayerId("alice")).escrowed_items == frozenset()
    # A recorded COMMITTED is applied the same way.
    n.resolver.records["t2"] = common_pb2.TRADE_OUTCOME_COMMITTED
    await n.stub.Prepare(prepare("t2", leg("alice", ["sword"], 0, ["gem"], 0)))
    await wait_for(settled, 5.0, "the committed escrow to be settled")
    inventory = await n.stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id="alice"))
    assert list(inventory.item_ids) == ["gem"]


async def test_escrows_settled_by_their_coordinator_while_termination_failed_leave_no_back_off(node: Node) -> None:
    n = node
    n.resolver.unavailable = True
    count = 20
    await seed(n, "alice", [f"item-{i}" for i in range(count)], 0)
    for i in range(count):
        await n.stub.Prepare(prepare(f"t{i}", leg("alice", [f"item-{i}"])))

    failed: set[str] = set()

    async def backing_off() -> bool:  # each escrow's termination failed at least once
        failed.update(trade for _shard, trade in n.participant._next_try_s)
        return len(failed) == count

    with structlog.testing.capture_logs() as logged:
        await wait_for(backing_off, 30.0, "every termination to fail and back off")
    # They fail together (the decisions' store is out of reach): one warning, not one each.
    warned = [e for e in logged if e["log_level"] == "warning"]
    assert len(warned) == 1 and warned[0]["event"] == "escrow not settled yet; will retry", warned
    for i in range(count):  # the coordinator comes back first and aborts them itself
        await n.stub.Abort(shardnode_pb2.AbortRequest(trade_id=f"t{i}", shard_id=SHARD))
    assert not n.storage.prepared_trades([SHARD])

    async def none_backing_off() -> bool:
        return n.participant.backing_off == 0

    # Terminations under way when the escrows settled fail too (within their 8 s budget)
    # and back off; once those back-offs run out nothing is left.
    await wait_for(none_backing_off, 20.0, "the back-offs of settled escrows to be dropped")


async def test_a_new_term_settles_at_once_the_inherited_escrows_already_decided(node: Node) -> None:
    """When a shard starts serving (a promotion), its escrows whose trade is decided are
    settled at once; an undecided one is only looked up (nothing written: its coordinator
    may be deciding it) and waits for its deadline."""
    n = node
    n.participant.escrow_timeout_ms = 60_000  # deadlines far away: only the new term settles
    await seed(n, "alice", ["sword", "shield"], 10)
    await n.stub.Prepare(prepare("decided", leg("alice", ["sword"], 0, ["gem"], 0)))
    await n.stub.Prepare(prepare("open", leg("alice", ["shield"], 0)))
    n.resolver.records["decided"] = common_pb2.TRADE_OUTCOME_COMMITTED
    n.participant._on_serving(SHARD)

    async def looked_up() -> bool:
        return {c.trade_id for c in n.resolver.calls} == {"decided", "open"} and not n.participant._resolving

    await wait_for(looked_up, 5.0, "both inherited escrows looked up")
    assert all(c.if_decided for c in n.resolver.calls)
    assert "open" not in n.resolver.records  # nothing decided for it
    assert [r.trade_id for r in n.storage.prepared_trades([SHARD])] == ["open"]
    inventory = await n.stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id="alice"))
    assert sorted(inventory.item_ids) == ["gem", "shield"] and list(inventory.escrowed_item_ids) == ["shield"]


async def test_a_player_of_an_inherited_escrow_waits_for_its_lookup(node: Node) -> None:
    """A new primary serves a player with an inherited escrow only once it has looked the
    trade up: the trade may be decided (its caller told COMMITTED), and the player's items
    must not show, or be traded, as they were before it. An outside check saw the next
    trade of an item just received refused for good ("does not own") in that window."""
    n = node
    n.participant.escrow_timeout_ms = 60_000
    await seed(n, "alice", ["sword"], 10)
    await seed(n, "bob", ["axe"], 10)
    await n.stub.Prepare(prepare("decided", leg("alice", ["sword"], 0, ["gem"], 0)))
    n.resolver.records["decided"] = common_pb2.TRADE_OUTCOME_COMMITTED
    gate = n.resolver.gate = asyncio.Event()
    n.participant._on_serving(SHARD)
    await wait_for(lambda: _asked(n, "decided"), 5.0, "the inherited escrow to be looked up")
    calls = [
        n.stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id="alice")),
        n.stub.Prepare(prepare("next", leg("alice", ["gem"], 0))),
        n.stub.GrantItems(shardnode_pb2.GrantItemsRequest(request_id="g-a", player_id="alice", gold=1)),
        n.stub.ExecuteLocalTrade(shardnode_pb2.ExecuteLocalTradeRequest(
            trade_id="local", shard_id=SHARD, player_a="bob", player_b="alice", a_gives=common_pb2.Offer(gold=1))),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        assert "inherited and is settling now; retry shortly" in (info.value.details() or ""), info.value
    assert list((await n.stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id="bob"))).item_ids) == ["axe"]
    gate.set()
    await wait_for(lambda: _settled(n), 5.0, "the inherited escrow to be settled")
    inventory = await n.stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id="alice"))
    assert list(inventory.item_ids) == ["gem"] and not inventory.escrowed_item_ids
    answer = await n.stub.Prepare(prepare("next", leg("alice", ["gem"], 0)))
    assert answer.vote == shardnode_pb2.TRADE_VOTE_PREPARED


async def test_a_player_stays_held_while_its_inherited_escrow_cannot_be_looked_up(node: Node) -> None:
    """A lookup that fails (no control plane answers) is tried again, the player held
    meanwhile: released, it would show (and trade) its items as before a trade whose
    caller may have been told COMMITTED."""
    n = node
    n.participant.escrow_timeout_ms = 60_000
    await seed(n, "alice", ["sword"], 10)
    await n.stub.Prepare(prepare("decided", leg("alice", ["sword"], 0, ["gem"], 0)))
    n.resolver.records["decided"] = common_pb2.TRADE_OUTCOME_COMMITTED
    n.resolver.unavailable = True
    with structlog.testing.capture_logs() as logged:
        n.participant._on_serving(SHARD)
        # One try is a few calls (RESOLVE_POLICY); the second try shows the first failed.
        tries = participant_module.RESOLVE_POLICY.max_attempts or 1

        async def tried_again() -> bool:
            return sum(c.trade_id == "decided" for c in n.resolver.calls) > tries

        await wait_for(tried_again, 30.0, "the lookup to fail and be tried again")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await n.stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id="alice"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "settling now" in (info.value.details() or "")
        n.resolver.unavailable = False
        await wait_for(lambda: _settled(n), 10.0, "the inherited escrow to be settled once the lookup answers")
    inventory = await n.stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id="alice"))
    assert list(inventory.item_ids) == ["gem"] and not inventory.escrowed_item_ids
    events = [e["event"] for e in logged if e["log_level"] in ("warning", "info")]
    assert "inherited escrow's trade not looked up yet; its player waits" in events, events
    assert "inherited escrows looked up again" in events, events


async def test_every_inherited_escrow_holds_its_player_beyond_the_concurrent_lookups(node: Node) -> None:
    # Only as many as could be looked up at once (64) were held: the players of the others
    # were served before their trades were, as before the hold.
    n = node
    n.participant.escrow_timeout_ms = 60_000
    count = participant_module.MAX_CONCURRENT_RESOLVES + 6
    for i in range(count):
        await seed(n, f"p{i}", [f"item{i}"], 0)
        await n.stub.Prepare(prepare(f"t{i}", leg(f"p{i}", [f"item{i}"])))
        n.resolver.records[f"t{i}"] = common_pb2.TRADE_OUTCOME_ABORTED
    gate = n.resolver.gate = asyncio.Event()
    n.participant._on_serving(SHARD)
    last = f"p{count - 1}"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await n.stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id=last))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "settling now" in (info.value.details() or "")
    gate.set()
    await wait_for(lambda: _settled(n), 10.0, "every inherited escrow to be settled")
    inventory = await n.stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id=last))
    assert list(inventory.item_ids) == [f"item{count - 1}"] and not inventory.escrowed_item_ids


async def _asked(n: Node, trade_id: str) -> bool:
    return any(c.trade_id == trade_id for c in n.resolver.calls)


async def _settled(n: Node) -> bool:
    return not n.participant._resolving and not n.storage.prepared_trades([SHARD])


BAD_PREPARES = [
    (prepare("", leg("alice", ["a"])), "trade_id is empty"),
    (prepare("t" * 129, leg("alice", ["a"])), "trade_id is 129 bytes"),
    (prepare("t1"), "exactly one"),
    (prepare("t1", leg("alice", ["a"]), leg("alice", ["b"])), "exactly one"),
    (prepare("t1", leg("", ["a"])), "player_id is empty"),
    (prepare("t1", leg("p" * 129, ["a"])), "129 bytes"),
    (prepare("t1", leg("alice", ["a"], other="alice")), "cannot trade with themselves"),
    (prepare("t1", leg("alice", [f"i{k}" for k in range(65)])), "at most 64"),
    (prepare("t1", leg("alice", ["a", "a"])), "twice"),
    (prepare("t1", leg("alice", ["a"], receives=["a"])), "both sides"),
    (prepare("t1", leg("alice", [], 2**53 + 1)), "2^53"),
    (prepare("t1", leg("alice", [])), "empty"),
    (prepare("t1", leg("alice", ["a"]), shard_id="nope"), "shard_id"),
]


async def test_bad_inputs_get_their_status_and_a_message_naming_the_problem(node: Node) -> None:
    n = node
    baseline = n.storage.meta(SHARD).last
    for request, words in BAD_PREPARES:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await n.stub.Prepare(request)
        details = info.value.details() or ""
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (words, details)
        assert words in details and len(details) < 300, (words, details)
    for call in (
        n.stub.Commit(shardnode_pb2.CommitRequest(trade_id="", shard_id=SHARD)),
        n.stub.Abort(shardnode_pb2.AbortRequest(trade_id="t1", shard_id="x")),
        n.stub.ListTrades(shardnode_pb2.ListTradesRequest(trade_id="t" * 200)),
        n.stub.ListTrades(shardnode_pb2.ListTradesRequest(trade_id="t1", shard_id="shard-x" * 100)),
        n.stub.ExecuteLocalTrade(
            shardnode_pb2.ExecuteLocalTradeRequest(trade_id="l", player_a="a", player_b="a",
                                                   a_gives=common_pb2.Offer(gold=1))
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(info.value.details() or "") < 300
    # Stale epoch: FAILED_PRECONDITION naming the current one.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await n.stub.Prepare(prepare("t1", leg("alice", ["a"]), epoch=2))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "epoch 3" in (info.value.details() or "")
    assert n.storage.meta(SHARD).last == baseline  # nothing was written
