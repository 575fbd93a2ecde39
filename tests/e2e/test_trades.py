"""End to end: trades through a real cluster (etcd, a control plane, three shard nodes,
R = 2), driven through TradeCoordinator.ExecuteTrade. Cross-shard and same-shard trades
conserve items and gold; a participant primary SIGKILLed while trades run leaves no escrow
behind (its promoted replica holds the escrows and settles them), within a deadline."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import grpc
import grpc.aio
import pytest

from bluemarble.client.routing import RoutingClient
from bluemarble.v1 import common_pb2, shardnode_pb2, shardnode_pb2_grpc, trade_pb2, trade_pb2_grpc
from tests.e2e.conftest import ProcessCluster
from tests.e2e.test_data_plane import eventually, failed_over, grant_all, led_by, settled

pytestmark = pytest.mark.e2e

SHARDS = 4
ESCROW_TIMEOUT_S = 1.0


async def execute(stub: trade_pb2_grpc.TradeCoordinatorStub, request: trade_pb2.ExecuteTradeRequest,
                  deadline_s: float = 30.0) -> trade_pb2.ExecuteTradeResponse:
    """ExecuteTrade, retried with the same trade id until it answers (same id, same answer)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            response: trade_pb2.ExecuteTradeResponse = await stub.ExecuteTrade(request, timeout=10)
            return response
        except grpc.aio.AioRpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.FAILED_PRECONDITION) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def in_doubt(cluster: ProcessCluster) -> list[shardnode_pb2.ParticipantTrade] | None:
    """Every escrow any node holds (as primary or not: ListTrades answers for led shards,
    so ask each node); None when a node does not answer."""
    held: list[shardnode_pb2.ParticipantTrade] = []
    for node, address in cluster.node_addresses.items():
        if not cluster.process(node).alive():
            continue
        with grpc.insecure_channel(address) as channel:
            try:
                r = shardnode_pb2_grpc.ShardNodeStub(channel).ListTrades(  # type: ignore[no-untyped-call]
                    shardnode_pb2.ListTradesRequest(), timeout=2
                )
            except grpc.RpcError:
                return None
        held.extend(r.trades)
    return held


async def test_trades_conserve_items_and_gold_and_a_killed_primary_leaves_no_escrow(
    process_cluster: ProcessCluster,
) -> None:
    cluster = process_cluster
    cluster.start_control_plane("--lease-ttl-s", "2", "--replication-factor", "2", "--shards", str(SHARDS))
    for node, zone in (("n1", "z1"), ("n2", "z2"), ("n3", "z3")):
        cluster.start_node(node, zone, "--trade-escrow-timeout-s", str(ESCROW_TIMEOUT_S))
    await eventually(settled(cluster, SHARDS, 2), 40, "every shard served, placement settled")
    players = [f"trader-{i}" for i in range(12)]
    grants = {f"seed-{p}": (p, [f"{p}-item-{k}" for k in range(4)], 1000) for p in players}
    async with RoutingClient(cluster.control_planes) as client:
        await client.wait_ready(20)
        await grant_all(client, grants)
        shard_of = {p: client.resolve(p).shard_id for p in players}
        total_gold = 1000 * len(players)
        all_items = sorted(i for _, items, _ in grants.values() for i in items)
        owner = {i: p for _, (p, items, _) in grants.items() for i in items}
        channel = grpc.aio.insecure_channel(cluster.control_planes[0])
        stub = trade_pb2_grpc.TradeCoordinatorStub(channel)  # type: ignore[no-untyped-call]
        rng = random.Random(8)
        sent: dict[str, trade_pb2.ExecuteTradeRequest] = {}
        try:
            # A stream of trades, some same-shard, most cross-shard.
            async def one(n: int) -> trade_pb2.ExecuteTradeResponse:
                a, b = rng.sample(players, 2)
                a_items = [i for i in all_items if owner[i] == a][:1]
                request = trade_pb2.ExecuteTradeRequest(
                    trade_id=f"trade-{n}", player_a=a, player_b=b,
                    a_gives=common_pb2.Offer(item_ids=a_items, gold=rng.randint(0, 5)),
                    b_gives=common_pb2.Offer(gold=rng.randint(1, 5)),
                )
                sent[request.trade_id] = request
                answer = await execute(stub, request)
                if answer.outcome == common_pb2.TRADE_OUTCOME_COMMITTED:
                    for item in a_items:
                        owner[item] = b
                return answer

            first = [await one(n) for n in range(12)]
            assert all(a.outcome == common_pb2.TRADE_OUTCOME_COMMITTED for a in first), [a.reason for a in first]
            assert any(a.cross_shard for a in first)
            # Same trade id, same answer; nothing moves twice.
            for n, answer in enumerate(first):
                again = await execute(stub, sent[f"trade-{n}"])
                assert (again.outcome, again.cross_shard) == (answer.outcome, answer.cross_shard)
            # A same-shard trade too (players chosen on one shard).
            by_shard: dict[str, list[str]] = {}
            for p in players:
                by_shard.setdefault(shard_of[p], []).append(p)
            pair = next(ps for ps in by_shard.values() if len(ps) >= 2)
            local = await execute(stub, trade_pb2.ExecuteTradeRequest(
                trade_id="local-1", player_a=pair[0], player_b=pair[1],
                a_gives=common_pb2.Offer(gold=7), b_gives=common_pb2.Offer(gold=3)))
            assert (local.outcome, local.cross_shard) == (common_pb2.TRADE_OUTCOME_COMMITTED, False)
            # SIGKILL the primary of a trading player's shard while trades run concurrently.
            victim_player = players[0]
            victim = client.resolve(victim_player).primary
            led = led_by(cluster, victim)
            batch = [asyncio.create_task(one(n)) for n in range(100, 124)]
            await asyncio.sleep(0.05)
            cluster.process(victim).signal(signal.SIGKILL)
            answers = await asyncio.gather(*batch, return_exceptions=True)
            assert all(not isinstance(a, BaseException) for a in answers), answers
            await eventually(lambda: failed_over(cluster, led, victim), 20, f"{victim}'s shards to fail over")
            started = time.monotonic()

            def no_escrow() -> bool:
                held = in_doubt(cluster)
                return held is not None and not held

            await eventually(no_escrow, 10 + ESCROW_TIMEOUT_S * 2, "no escrow left on any node")
            settle_s = time.monotonic() - started
            # Conservation: every item in exactly one inventory, gold unchanged.
            seen: list[str] = []
            gold = 0
            for p in players:
                inventory = await client.get_inventory(p, deadline_s=20)
                seen.extend(inventory.item_ids)
                gold += inventory.gold
            assert sorted(seen) == all_items
            assert gold == total_gold
            assert settle_s < 12
        finally:
            await channel.close(None)


async def test_a_reused_trade_id_and_gold_near_the_cap_move_nothing_nobody_agreed_to(
    process_cluster: ProcessCluster,
) -> None:
    """A trade id reused for other terms, with a counterpart on a shard the recorded trade
    never touched, leaves that counterpart's items and gold where they were: the escrow
    the reuse made is released at once, and one left by a coordinator that never came
    back (a Prepare sent by hand) is released by the participant's termination, since
    ResolveTrade answers ABORTED for a leg that is not part of the recorded terms. Gold a
    player's pending trades would bring counts against the 2^53 cap at prepare: of
    concurrent trades that together would take a player over it, only those that fit
    commit, and none is left in escrow. A player id no shard has seen takes part in no
    trade."""
    cluster = process_cluster
    cluster.start_control_plane("--lease-ttl-s", "2", "--replication-factor", "2", "--shards", str(SHARDS))
    for node, zone in (("n1", "z1"), ("n2", "z2"), ("n3", "z3")):
        cluster.start_node(node, zone, "--trade-escrow-timeout-s", str(ESCROW_TIMEOUT_S))
    await eventually(settled(cluster, SHARDS, 2), 40, "every shard served, placement settled")
    near_cap = 2**53 - 10
    async with RoutingClient(cluster.control_planes) as client:
        await client.wait_ready(20)
        players: list[str] = []
        for i in range(200):  # four players on four different shards
            p = f"reuse-{i}"
            if client.resolve(p).shard_id not in {client.resolve(q).shard_id for q in players}:
                players.append(p)
            if len(players) == 4:
                break
        a, b, c, rich = players
        neighbour = next(p for p in (f"reuse-n{i}" for i in range(500))
                         if client.resolve(p).shard_id == client.resolve(a).shard_id)
        await grant_all(client, {f"seed-{p}": (p, [f"{p}/gem"], 100) for p in (a, b, c, neighbour)}
                        | {"seed-rich": (rich, [], near_cap)})

        async def holdings(player: str) -> tuple[list[str], int]:
            inventory = await client.get_inventory(player, deadline_s=20)
            return sorted(inventory.item_ids), inventory.gold

        channel = grpc.aio.insecure_channel(cluster.control_planes[0])
        stub = trade_pb2_grpc.TradeCoordinatorStub(channel)  # type: ignore[no-untyped-call]

        def trade(trade_id: str, x: str, y: str, x_items: tuple[str, ...] = (), x_gold: int = 0,
                  y_items: tuple[str, ...] = (), y_gold: int = 0) -> trade_pb2.ExecuteTradeRequest:
            return trade_pb2.ExecuteTradeRequest(
                trade_id=trade_id, player_a=x, player_b=y,
                a_gives=common_pb2.Offer(item_ids=list(x_items), gold=x_gold),
                b_gives=common_pb2.Offer(item_ids=list(y_items), gold=y_gold))

        def no_escrow() -> bool:
            held = in_doubt(cluster)
            return held is not None and not held

        try:
            first = await execute(stub, trade("r-1", a, b, x_gold=10, y_items=(f"{b}/gem",)))
            assert first.outcome == common_pb2.TRADE_OUTCOME_COMMITTED, first.reason
            # The same id, other terms, a counterpart on a third shard: refused, nothing moves.
            with pytest.raises(grpc.aio.AioRpcError) as reused:
                await stub.ExecuteTrade(trade("r-1", a, c, x_gold=10, y_items=(f"{c}/gem",), y_gold=50), timeout=10)
            assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "was already used for a different trade" in (reused.value.details() or "")
            await eventually(no_escrow, 10, "the reused id's escrow released")
            assert await holdings(c) == ([f"{c}/gem"], 100)

            # An escrow under a decided id with other terms whose coordinator never came back.
            second = await execute(stub, trade("r-2", a, b, x_gold=1, y_gold=1))
            assert second.outcome == common_pb2.TRADE_OUTCOME_COMMITTED, second.reason
            route = client.resolve(c)
            assert route.primary is not None
            node = shardnode_pb2_grpc.ShardNodeStub(channel_to := grpc.aio.insecure_channel(  # type: ignore[no-untyped-call]
                route.addresses[route.primary]))
            try:
                vote = await node.Prepare(shardnode_pb2.PrepareRequest(
                    trade_id="r-2", shard_id=route.shard_id, epoch=route.epoch, legs=[shardnode_pb2.TradeLeg(
                        player_id=c, gives=common_pb2.Offer(item_ids=[f"{c}/gem"], gold=50),
                        receives=common_pb2.Offer(gold=1), counterpart_player_id=a)]), timeout=10)
            finally:
                await channel_to.close(None)
            assert vote.vote == shardnode_pb2.TRADE_VOTE_PREPARED
            await eventually(no_escrow, 10 + ESCROW_TIMEOUT_S * 2, "the orphaned escrow settled by termination")
            assert await holdings(c) == ([f"{c}/gem"], 100)

            # An id a same-shard trade used (no record in etcd) reused for a cross-shard trade:
            # refused, no decision written, the counterpart's escrow released at once.
            local = await execute(stub, trade("lt-1", a, neighbour, x_gold=1))
            assert (local.outcome, local.cross_shard) == (common_pb2.TRADE_OUTCOME_COMMITTED, False)
            with pytest.raises(grpc.aio.AioRpcError) as in_use:
                await stub.ExecuteTrade(trade("lt-1", a, c, x_gold=1, y_items=(f"{c}/gem",)), timeout=10)
            assert in_use.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "was already used for a different trade on" in (in_use.value.details() or ""), in_use.value.details()
            await eventually(no_escrow, 10, "the escrow of the refused attempt released")
            assert await holdings(c) == ([f"{c}/gem"], 100)
            shown = await stub.GetTrade(trade_pb2.GetTradeRequest(trade_id="lt-1", player_id=a), timeout=10)
            assert (shown.outcome, shown.cross_shard) == (common_pb2.TRADE_OUTCOME_COMMITTED, False)
            # Reused for another same-shard trade: the same answer as across shards.
            with pytest.raises(grpc.aio.AioRpcError) as in_use:
                await stub.ExecuteTrade(trade("lt-1", a, neighbour, x_gold=2), timeout=10)
            assert in_use.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "trade id 'lt-1' was already used for a different trade on shard-" in (
                in_use.value.details() or ""), in_use.value.details()

            # A mistyped player id receives nothing: the trade is refused, naming it.
            typo = await execute(stub, trade("typo-1", a, "nobody-xyz", x_gold=1))
            assert typo.outcome == common_pb2.TRADE_OUTCOME_ABORTED and "nobody-xyz is unknown" in typo.reason

            # Four trades at once, each bringing 6 gold to a player 10 below the cap: one fits.
            answers = await asyncio.gather(*(execute(stub, trade(f"cap-{k}", a, rich, x_gold=6)) for k in range(4)))
            committed = [x for x in answers if x.outcome == common_pb2.TRADE_OUTCOME_COMMITTED]
            assert len(committed) == 1, [x.reason for x in answers]
            assert all("would hold more than" in x.reason for x in answers if x not in committed)
            await eventually(no_escrow, 10 + ESCROW_TIMEOUT_S * 2, "no escrow left after the cap race")
            assert await holdings(rich) == ([], near_cap + 6)
            assert await holdings(a) == ([f"{a}/gem", f"{b}/gem"], 100 - 10 - 1 + 1 - 1 - 6)
            assert await holdings(b) == ([], 100 + 10 + 1 - 1)
        finally:
            await channel.close(None)
