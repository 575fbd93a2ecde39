"""The run command's demo: seeds players with items and gold through the routing client,
then shows inventories and per-system player data the way a game server would read them,
then runs a stream of trades among the seeded players and shows that nothing was lost.

    python scripts/demo.py --control-plane 127.0.0.1:7000 [--players 300] [--trades 200]

Grants are idempotent by request id (``seed-<player>``): running the demo twice against
the same cluster applies nothing twice (the second run reports every grant as replayed).
One player then buys bread for 5 gold (``TakeItems``, idempotent by its request id too).
Trades: mostly cross-shard (two-phase commit with the decision in etcd), a few
same-shard (one local transaction) and a few refused on purpose (more gold than the
player has: ABORTED with the reason). Terms are drawn from the inventories read just
before, a player is in one trade at a time, and every trade id is new (so a second run
trades again); the items and gold of all seeded players are summed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import time
import uuid
from collections.abc import Sequence

from bluemarble.client.routing import RoutingClient
from bluemarble.client.trades import TradeClient, TradeResult
from bluemarble.core.errors import BlueMarbleError, FailedPrecondition

CONCURRENCY = 16


async def seed_and_show(
    control_plane: Sequence[str], players: int, *, trades: int = 200, out: object = sys.stdout
) -> int:
    """Seeds ``players`` players, prints what it saw, then runs ``trades`` trades among
    them (:func:`trade_and_show`); returns the number of failures."""
    failures = await _seed_and_show(control_plane, players, out=out)
    if trades and players >= 4:
        failures += await trade_and_show(control_plane, players, trades, out=out)
    return failures


async def _seed_and_show(control_plane: Sequence[str], players: int, *, out: object = sys.stdout) -> int:

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)  # type: ignore[call-overload]

    async with RoutingClient(list(control_plane)) as client:
        await client.wait_ready(30)
        gate = asyncio.Semaphore(CONCURRENCY)
        replayed = 0
        failures: list[str] = []
        per_shard: collections.Counter[str] = collections.Counter()

        async def seed(i: int) -> None:
            nonlocal replayed
            player = f"player-{i:04d}"
            items = [f"{player}/sword", f"{player}/potion-{i % 7}"]
            async with gate:
                try:
                    result = await client.grant_items(
                        player, items, gold=100 + i, request_id=f"seed-{player}", deadline_s=20
                    )
                except BlueMarbleError as e:
                    failures.append(f"{player}: {e}")
                    return
            replayed += result.replayed
            per_shard[result.inventory.shard_id] += 1

        started = time.monotonic()
        await asyncio.gather(*(seed(i) for i in range(players)))
        took_s = time.monotonic() - started
        say(f"seeded {players - len(failures)} players in {took_s:.2f} s "
            f"({(players - len(failures)) / max(took_s, 1e-9):.0f} STRONG grants/s, {replayed} replayed)")
        say("players per shard: " + ", ".join(f"{s}={n}" for s, n in sorted(per_shard.items())))
        for failure in failures[:5]:
            say(f"  failed: {failure}")
        say()
        say(f"{'player':<12} {'shard':<9} {'epoch':>5} {'served by':<10} {'gold':>6}  items")
        for i in range(0, players, max(1, players // 5)):
            player = f"player-{i:04d}"
            try:
                inv = await client.get_inventory(player, deadline_s=10)
            except BlueMarbleError as e:
                failures.append(f"{player}: {e}")
                continue
            say(f"{player:<12} {inv.shard_id:<9} {inv.epoch:>5} {inv.served_by:<10} {inv.gold:>6}  "
                + ", ".join(inv.item_ids))
        player = "player-0000"
        try:
            await client.set_player_data(player, "guild", "name", b"Night Owls", deadline_s=10)
            guild = await client.get_player_data(player, "guild", "name", allow_stale=True, deadline_s=10)
            where = "a replica" if guild.stale else "the primary"
            say(f"\n{player} guild (EVENTUAL, read from {where}): {(guild.value or b'').decode()}")
        except BlueMarbleError as e:
            failures.append(f"guild of {player}: {e}")
        # A shop purchase (TakeItems, STRONG): 5 gold, under a request id of the
        # purchase, so a retry (or the next run, while the node remembers the id) pays once.
        shopper = f"player-{max(0, players - 1):04d}"
        try:
            paid = await client.take_items(shopper, gold=5, request_id=f"shop-{shopper}-bread", deadline_s=10)
            how = "already paid (replayed)" if paid.replayed else "paid"
            say(f"{shopper} buys bread for 5 gold (TakeItems): {how}; {paid.inventory.gold} gold left")
        except FailedPrecondition as e:  # spent in trades of earlier runs: a refusal, shown as the game would
            say(f"{shopper} cannot buy bread for 5 gold (TakeItems): {e}")
        except BlueMarbleError as e:
            failures.append(f"purchase of {shopper}: {e}")
        return len(failures)


async def trade_and_show(control_plane: Sequence[str], players: int, trades: int, *, out: object = sys.stdout) -> int:
    """Runs ``trades`` trades among the seeded players (about 80 % cross-shard, 12 %
    same-shard, 8 % refused on purpose), prints outcomes, counts, latency and the
    conservation check; returns the number of failures (errors, a refused trade that
    committed, items or gold not conserved)."""

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)  # type: ignore[call-overload]

    names = [f"player-{i:04d}" for i in range(players)]
    rng = random.Random(players * 1_000_003 + trades)
    run_id = uuid.uuid4().hex[:6]
    failures: list[str] = []
    async with RoutingClient(list(control_plane)) as routing, TradeClient(list(control_plane)) as client:
        await routing.wait_ready(30)

        async def holdings() -> dict[str, tuple[set[str], int]]:
            gate = asyncio.Semaphore(CONCURRENCY)

            async def one(player: str) -> tuple[str, tuple[set[str], int]]:
                async with gate:
                    inv = await routing.get_inventory(player, deadline_s=20)
                return player, (set(inv.item_ids), inv.gold)

            return dict(await asyncio.gather(*(one(p) for p in names)))

        before = await holdings()
        held = {p: (set(items), gold) for p, (items, gold) in before.items()}
        shard = {p: routing.router.shard_for(p) for p in names}
        free = set(names)
        wake = asyncio.Event()
        results: list[tuple[str, str, TradeResult, float, str]] = []
        kinds: collections.Counter[tuple[str, str]] = collections.Counter()
        say(f"\ndemo: {trades} trades among the {players} seeded players ({CONCURRENCY} at a time) ...")

        async def one_trade(k: int) -> None:
            r = rng.random()
            kind = "refused" if r < 0.08 else "same-shard" if r < 0.20 else "cross-shard"
            while len(free) < 2:  # every player is in a trade: wait for one to end
                wake.clear()
                await wake.wait()
            pool = sorted(free)
            a = rng.choice(pool)
            partners = [p for p in pool if p != a and (shard[p] == shard[a]) == (kind == "same-shard")]
            if not partners:  # nobody free on a's shard (or only a's shard is free)
                kind = "cross-shard" if kind == "same-shard" else kind
                partners = [p for p in pool if p != a]
            b = rng.choice(partners)
            free.difference_update({a, b})
            a_items = rng.sample(sorted(held[a][0]), min(len(held[a][0]), rng.randint(0, 1)))
            b_items = rng.sample(sorted(held[b][0]), min(len(held[b][0]), rng.randint(0, 1)))
            a_gold = held[a][1] + 1 + rng.randint(0, 50) if kind == "refused" else rng.randint(0, held[a][1] // 5)
            b_gold = rng.randint(0, held[b][1] // 5)
            if not (a_items or b_items or a_gold or b_gold):
                a_gold = 1 if held[a][1] else 0
                b_gold = 0 if a_gold else 1
            trade_id = f"demo-{run_id}-{k:05d}"
            started = time.monotonic()
            try:
                result = await client.execute_trade(trade_id, a, b, a_items, a_gold, b_items, b_gold, deadline_s=30)
            except BlueMarbleError as e:
                failures.append(f"{trade_id}: {e}")
            else:
                took_ms = (time.monotonic() - started) * 1000
                terms = (f"{a} gives {_offer(a_items, a_gold)}, {b} gives {_offer(b_items, b_gold)}")
                results.append((trade_id, kind, result, took_ms, terms))
                kinds[(kind, result.outcome.name)] += 1
                if result.committed:
                    if kind == "refused":
                        failures.append(f"{trade_id} gave more gold than {a} has and COMMITTED")
                    held[a] = ((held[a][0] - set(a_items)) | set(b_items), held[a][1] - a_gold + b_gold)
                    held[b] = ((held[b][0] - set(b_items)) | set(a_items), held[b][1] - b_gold + a_gold)
            free.update({a, b})
            wake.set()

        gate = asyncio.Semaphore(CONCURRENCY)

        async def gated(k: int) -> None:
            async with gate:
                await one_trade(k)

        started = time.monotonic()
        await asyncio.gather(*(gated(k) for k in range(trades)))
        took_s = time.monotonic() - started
        shown = [r for r in results if r[1] != "refused"][:6] + [r for r in results if r[1] == "refused"][:2]
        for trade_id, _, result, took_ms, terms in shown:
            where = "cross-shard" if result.cross_shard else "same-shard"
            cause = f"{result.abort_cause.value}: " if not result.committed else ""
            reason = f" ({cause}{result.reason})" if result.reason else ""
            say(f"  {trade_id} {where:<11} {result.outcome.name:<9} {took_ms:6.1f} ms  {terms}{reason}")
        latencies = sorted(r[3] for r in results)
        say(f"{len(results)} trades in {took_s:.2f} s ({len(results) / max(took_s, 1e-9):.0f} trades/s), "
            f"p50 {_pct(latencies, 0.5):.1f} ms, p99 {_pct(latencies, 0.99):.1f} ms")
        say("outcomes: " + ", ".join(f"{kind} {outcome}={n}" for (kind, outcome), n in sorted(kinds.items())))
        after = await holdings()
        items_before = collections.Counter(i for items, _ in before.values() for i in items)
        items_after = collections.Counter(i for items, _ in after.values() for i in items)
        gold_before, gold_after = sum(g for _, g in before.values()), sum(g for _, g in after.values())
        moved = sum(1 for i, owner in _owners(after).items() if _owners(before).get(i) != owner)
        conserved = items_before == items_after and gold_before == gold_after and max(items_after.values()) == 1
        matches = all(after[p][0] == held[p][0] and after[p][1] == held[p][1] for p in names)
        say(f"conservation: {len(items_before)} items and {gold_before} gold before, {len(items_after)} items "
            f"({'each in exactly one inventory' if max(items_after.values()) == 1 else 'DUPLICATES'}) and "
            f"{gold_after} gold after; {moved} items changed hands: {'OK' if conserved else 'VIOLATED'}; "
            f"inventories {'match' if matches else 'DO NOT match'} the answers")
        if not conserved:
            failures.append("items or gold not conserved")
        if not matches:
            failures.append("inventories differ from the trades' answers")
        for failure in failures[:5]:
            say(f"  failed: {failure}")
    return len(failures)


def _offer(items: Sequence[str], gold: int) -> str:
    parts = list(items) + ([f"{gold} gold"] if gold else [])
    return " + ".join(parts) if parts else "nothing"


def _pct(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _owners(holdings: dict[str, tuple[set[str], int]]) -> dict[str, str]:
    return {item: player for player, (items, _) in holdings.items() for item in items}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--control-plane", default="127.0.0.1:7000")
    p.add_argument("--players", type=int, default=300)
    p.add_argument("--trades", type=int, default=200, help="trades after the seeding (0: none)")
    args = p.parse_args(argv)
    failures = asyncio.run(seed_and_show(args.control_plane.split(","), args.players, trades=args.trades))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
