#!/usr/bin/env python3
"""Runs the deterministic trade simulation over many seeds (issue 8, item 4).

    .venv/bin/python scripts/sim_trades.py --seeds 100000 [--start 0] [--steps 150]
        [--break RULE] [--workers 2] [--trace]
    .venv/bin/python scripts/sim_trades.py --list-breaks

Each seed is one schedule of concurrent cross-shard and same-shard trades through drops,
delays, reorders, duplicates, participant crashes and failovers, coordinator crashes at
every phase, decision-store restarts, leader crashes, client retries and give-ups, driven
through the real rules of bluemarble.core.trades (tests/sim/trade_sim.py) with I2 and I3
checked after every step and I5 after healing. Prints a summary (seeds, ticks, trades,
faults, violations, time) and exits 1 on any violation, naming the first failing seed and
the command that re-runs it alone (the run is a pure function of the seed: it reproduces
exactly, digest included).

``--break RULE`` plants one deliberate bug (tests/sim/trade_rules.py, BREAKS) in the
simulated actors without touching the rules on disk, to show the checker catching it.
``--trace`` prints the notable events of every seed run (use it with --seeds 1).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections import Counter

from tests.sim.trade_rules import BREAKS
from tests.sim.trade_sim import DEFAULT_STEPS, run_range, run_seed

CHUNK_SEEDS = 250
"""Seeds per task handed to a worker: big enough to amortise the round trip."""

FAULT_COUNTERS = (
    "trades_started", "cross_shard", "same_shard", "answered_committed", "answered_aborted", "retries",
    "double_sends", "gave_up", "refusals", "escrows", "commits_applied", "aborts_applied", "records_only",
    "prepares_decided", "resolves", "records_by_participant", "records_by_coordinator", "proposals_lost",
    "settles_failed", "swept", "retained", "participant_crashes", "failovers", "coordinator_crashes",
    "crash_before_prepare", "crash_between_prepare_and_decision", "crash_between_decision_and_commit",
    "store_restarts", "leader_crashes", "messages_sent", "messages_dropped", "messages_duplicated",
)


def run_chunk(task: tuple[int, int, int, str | None]) -> tuple[Counter[str], list[tuple[int, list[str]]]]:
    """Run seeds ``start .. start+count-1`` in a worker; their summed counters and failures."""
    start, count, steps, break_name = task
    result = run_range(start, count, steps=steps, breaks=break_name)
    return Counter(result.counters), result.failures


def rerun_command(seed: int, steps: int, break_name: str | None) -> str:
    parts = [".venv/bin/python scripts/sim_trades.py", f"--start {seed}", "--seeds 1"]
    if steps != DEFAULT_STEPS:
        parts.append(f"--steps {steps}")
    if break_name:
        parts.append(f"--break {break_name}")
    return " ".join([*parts, "--trace"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1000, help="how many seeds to run (default 1000)")
    parser.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"faulty ticks per seed before healing (default {DEFAULT_STEPS})")
    parser.add_argument("--break", dest="break_name", choices=sorted(BREAKS), help="plant a deliberate bug")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--trace", action="store_true", help="print each seed's event trace (with --seeds 1)")
    parser.add_argument("--list-breaks", action="store_true", help="list the bugs --break can plant")
    args = parser.parse_args(argv)
    if args.list_breaks:
        for name, (description, _) in BREAKS.items():
            print(f"{name:24s} {description}")
        return 0
    if args.seeds < 1 or args.steps < 1 or args.workers < 1:
        parser.error("--seeds, --steps and --workers must be >= 1")

    began = time.perf_counter()
    if args.trace or args.seeds == 1:
        totals: Counter[str] = Counter()
        failures: list[tuple[int, list[str]]] = []
        for seed in range(args.start, args.start + args.seeds):
            result = run_seed(seed, steps=args.steps, breaks=args.break_name, trace=args.trace)
            if args.trace:
                print(f"-- seed {seed}")
                print("\n".join(result.trace))
            print(f"seed {seed}: digest {result.digest:#018x}, {result.ticks} ticks, "
                  f"{len(result.violations)} violation(s)")
            totals.update(result.counters)
            if result.violations:
                failures.append((seed, result.violations))
    else:
        tasks = [(s, min(CHUNK_SEEDS, args.start + args.seeds - s), args.steps, args.break_name)
                 for s in range(args.start, args.start + args.seeds, CHUNK_SEEDS)]
        totals = Counter()
        failures = []
        with multiprocessing.Pool(args.workers) as pool:
            for chunk_totals, chunk_failures in pool.imap_unordered(run_chunk, tasks):
                totals.update(chunk_totals)
                failures.extend(chunk_failures)
    elapsed_s = time.perf_counter() - began
    failures.sort()

    label = f"break {args.break_name!r}" if args.break_name else "real rules"
    print(f"trade simulation ({label}): seeds {args.start}..{args.start + args.seeds - 1} "
          f"({args.seeds}), {totals['ticks']} ticks, {elapsed_s:.1f} s with {args.workers} worker(s)")
    print("  " + ", ".join(f"{name} {totals[name]}" for name in FAULT_COUNTERS))
    print(f"  failing seeds: {len(failures)}" + (f" ({', '.join(str(f[0]) for f in failures[:20])}"
                                                   f"{', ...' if len(failures) > 20 else ''})" if failures else ""))
    if not failures:
        return 0
    seed, violations = failures[0]
    print(f"first failing seed: {seed}")
    for violation in violations:
        print(f"  {violation}")
    print(f"re-run it alone: {rerun_command(seed, args.steps, args.break_name)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
