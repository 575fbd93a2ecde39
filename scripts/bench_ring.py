#!/usr/bin/env python3
"""Benchmarks bluemarble.core.ring side by side with uhashring, and checks the ring's targets.

    .venv/bin/python scripts/bench_ring.py [--keys 1000000] [--seed 1] [--repeat 3]

Over N seeded random player ids ("player-<16 hex digits>"), 16 shards shard-0..shard-15
(150 tokens each for ours; uhashring.HashRing(nodes=[same names]) with its defaults):

a. lookups per second of the client router (``RingRouter.shard_for``, which is what
   game servers call) vs uhashring's ``get_node``, and their ratio
   (best of --repeat timed passes over all keys, alternating the two libraries);
b. max/mean keys per shard for both;
c. the fraction of keys that move when a 17th shard (shard-16) is added, for both, and
   whether every moved key went to the new shard.

Exits 1 if one of our targets is missed: ratio >= 4, max/mean <= 1.02, moved <= 1.02/17
with every moved key on the new shard. Figures are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from importlib import metadata

from uhashring import HashRing

from bluemarble.client.ring_router import RingRouter
from bluemarble.core.ids import shard_id
from bluemarble.core.ring import DEFAULT_VNODES, initial_ring

SHARD_COUNT = 16
TARGET_SPEED_RATIO = 4.0
TARGET_MAX_OVER_MEAN = 1.02
TARGET_MOVED_FACTOR = 1.02  # x 1/(N+1)


def make_player_ids(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"player-{rng.getrandbits(64):016x}" for _ in range(count)]


def lookups_per_s(lookup: Callable[[str], object], keys: Sequence[str]) -> float:
    started = time.perf_counter()
    for key in keys:
        lookup(key)
    return len(keys) / (time.perf_counter() - started)


def max_over_mean(owners: Sequence[str], shard_count: int) -> float:
    counts = Counter(owners)
    return max(counts.values()) / (len(owners) / shard_count)


def moved(before: Sequence[str], after: Sequence[str], new: str) -> tuple[float, bool]:
    """Fraction of keys whose shard changed, and whether all of them went to ``new``."""
    changed = [(old, now) for old, now in zip(before, after, strict=True) if old != now]
    return len(changed) / len(before), all(now == new for _, now in changed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--keys", type=int, default=1_000_000, help="player ids (1000000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the player ids (1)")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per library (3)")
    args = parser.parse_args(argv)
    if args.keys < 1 or args.repeat < 1:
        parser.error("--keys and --repeat must be >= 1")

    names = [shard_id(i) for i in range(SHARD_COUNT)]
    new_shard = shard_id(SHARD_COUNT)
    keys = make_player_ids(args.keys, args.seed)
    ours = initial_ring(SHARD_COUNT, DEFAULT_VNODES)
    router = RingRouter.from_ring(ours)
    theirs = HashRing(nodes=list(names))

    # (a) single-key lookups, alternating libraries so both see the same machine noise.
    ours_speed = theirs_speed = 0.0
    for _ in range(args.repeat):
        ours_speed = max(ours_speed, lookups_per_s(router.shard_for, keys))
        theirs_speed = max(theirs_speed, lookups_per_s(theirs.get_node, keys))
    batch_speed = 0.0
    for _ in range(args.repeat):
        started = time.perf_counter()
        ours_before = ours.shards_for(keys)
        batch_speed = max(batch_speed, len(keys) / (time.perf_counter() - started))
    ratio = ours_speed / theirs_speed

    # (b) balance of the keys.
    theirs_before = [theirs.get_node(key) for key in keys]
    ours_balance = max_over_mean(ours_before, SHARD_COUNT)
    theirs_balance = max_over_mean(theirs_before, SHARD_COUNT)
    ours_exact = max(ours.ownership().values()) * SHARD_COUNT

    # (c) movement when shard-16 joins.
    ours_after = ours.with_added_shard(new_shard, DEFAULT_VNODES).shards_for(keys)
    theirs.add_node(new_shard)
    theirs_after = [theirs.get_node(key) for key in keys]
    ours_moved, ours_only_new = moved(ours_before, ours_after, new_shard)
    theirs_moved, theirs_only_new = moved(theirs_before, theirs_after, new_shard)
    ideal_moved = 1 / (SHARD_COUNT + 1)
    target_moved = TARGET_MOVED_FACTOR * ideal_moved

    rows = [
        ("lookups/s, single key", f"{ours_speed:,.0f}", f"{theirs_speed:,.0f}", ""),
        ("  speed ratio ours/uhashring", f"{ratio:.2f}x", "1.00x", f">= {TARGET_SPEED_RATIO:g}x"),
        ("lookups/s, batch shards_for", f"{batch_speed:,.0f}", "-", ""),
        ("max/mean keys per shard", f"{ours_balance:.4f}", f"{theirs_balance:.4f}",
         f"<= {TARGET_MAX_OVER_MEAN}"),
        ("max/mean ownership (exact)", f"{ours_exact:.6f}", "-", ""),
        ("keys moved adding shard-16", f"{ours_moved:.4%}", f"{theirs_moved:.4%}",
         f"<= {target_moved:.4%}"),
        ("  moved / (1/17)", f"{ours_moved / ideal_moved:.4f}",
         f"{theirs_moved / ideal_moved:.4f}", f"<= {TARGET_MOVED_FACTOR}"),
        ("  all moved keys to shard-16", "yes" if ours_only_new else "NO",
         "yes" if theirs_only_new else "NO", "yes"),
    ]  # fmt: skip
    header = ("", "bluemarble.core.ring", f"uhashring {metadata.version('uhashring')}", "target")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    print(
        f"ring benchmark: {args.keys:,} player ids (seed {args.seed}), {SHARD_COUNT} shards, "
        f"ours {DEFAULT_VNODES} tokens/shard, uhashring defaults; best of {args.repeat}; "
        f"Python {platform.python_version()}"
    )
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())

    missed = []
    if ratio < TARGET_SPEED_RATIO:
        missed.append(f"speed ratio {ratio:.2f} < {TARGET_SPEED_RATIO}")
    if ours_balance > TARGET_MAX_OVER_MEAN:
        missed.append(f"max/mean {ours_balance:.4f} > {TARGET_MAX_OVER_MEAN}")
    if ours_moved > target_moved:
        missed.append(f"moved {ours_moved:.4%} > {target_moved:.4%}")
    if not ours_only_new:
        missed.append("some moved keys did not go to the new shard")
    for miss in missed:
        print(f"TARGET MISSED: {miss}", file=sys.stderr)
    if not missed:
        print("all targets met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
