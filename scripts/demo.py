"""The run command's demo: seeds players with items and gold through the routing client,
then shows inventories and per-system player data the way a game server would read them.

    python scripts/demo.py --control-plane 127.0.0.1:7000 [--players 300]

Grants are idempotent by request id (``seed-<player>``): running the demo twice against
the same cluster applies nothing twice (the second run reports every grant as replayed).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from collections.abc import Sequence

from bluemarble.client.routing import RoutingClient
from bluemarble.core.errors import BlueMarbleError

CONCURRENCY = 16


async def seed_and_show(control_plane: Sequence[str], players: int, *, out: object = sys.stdout) -> int:
    """Seeds ``players`` players and prints what it saw; returns the number of failures."""

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
        return len(failures)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--control-plane", default="127.0.0.1:7000")
    p.add_argument("--players", type=int, default=300)
    args = p.parse_args(argv)
    failures = asyncio.run(seed_and_show(args.control_plane.split(","), args.players))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
