"""The command line shared by the seeded simulations' scripts (scripts/sim_replication.py,
scripts/sim_trades.py): run many seeds over worker processes, sum their counters, name
the first failing seed and the command that re-runs it alone; ``--break`` plants one of
the simulation's deliberate bugs, ``--trace`` prints a seed's events."""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CHUNK_SEEDS = 250
"""Seeds per task handed to a worker: big enough to amortise the round trip."""


@dataclass(frozen=True)
class Simulation:
    """What a script runs: ``run_range(start, count, steps=, breaks=)`` and
    ``run_seed(seed, steps=, breaks=, trace=)`` of one simulation module (module-level
    functions, so workers can be handed them), its planted bugs and the counters its
    summary prints."""

    name: str
    script: str
    run_range: Callable[..., Any]
    run_seed: Callable[..., Any]
    breaks: Mapping[str, tuple[str, Any]]
    default_steps: int
    counters: Sequence[str]


def run_chunk(
    task: tuple[Callable[..., Any], int, int, int, str | None],
) -> tuple[Counter[str], list[tuple[int, list[str]]]]:
    """Run seeds ``start .. start+count-1`` in a worker; their summed counters and failures."""
    run_range, start, count, steps, break_name = task
    result = run_range(start, count, steps=steps, breaks=break_name)
    return Counter(result.counters), result.failures


def rerun_command(sim: Simulation, seed: int, steps: int, break_name: str | None) -> str:
    parts = [f".venv/bin/python {sim.script}", f"--start {seed}", "--seeds 1"]
    if steps != sim.default_steps:
        parts.append(f"--steps {steps}")
    if break_name:
        parts.append(f"--break {break_name}")
    return " ".join([*parts, "--trace"])


def main(sim: Simulation, doc: str | None, argv: list[str] | None = None) -> int:
    """The command line of a simulation script (its module docstring is ``doc``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1000, help="how many seeds to run (default 1000)")
    parser.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--steps", type=int, default=sim.default_steps,
                        help=f"faulty ticks per seed before healing (default {sim.default_steps})")
    parser.add_argument("--break", dest="break_name", choices=sorted(sim.breaks), help="plant a deliberate bug")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--trace", action="store_true", help="print each seed's event trace (with --seeds 1)")
    parser.add_argument("--list-breaks", action="store_true", help="list the bugs --break can plant")
    args = parser.parse_args(argv)
    if args.list_breaks:
        for name, (description, _) in sim.breaks.items():
            print(f"{name:24s} {description}")
        return 0
    if args.seeds < 1 or args.steps < 1 or args.workers < 1:
        parser.error("--seeds, --steps and --workers must be >= 1")

    began = time.perf_counter()
    if args.trace or args.seeds == 1:
        totals: Counter[str] = Counter()
        failures: list[tuple[int, list[str]]] = []
        for seed in range(args.start, args.start + args.seeds):
            result = sim.run_seed(seed, steps=args.steps, breaks=args.break_name, trace=args.trace)
            if args.trace:
                print(f"-- seed {seed}")
                print("\n".join(result.trace))
            print(f"seed {seed}: digest {result.digest:#018x}, {result.ticks} ticks, "
                  f"{len(result.violations)} violation(s)")
            totals.update(result.counters)
            if result.violations:
                failures.append((seed, result.violations))
    else:
        tasks = [(sim.run_range, s, min(CHUNK_SEEDS, args.start + args.seeds - s), args.steps, args.break_name)
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
    print(f"{sim.name} ({label}): seeds {args.start}..{args.start + args.seeds - 1} "
          f"({args.seeds}), {totals['ticks']} ticks, {elapsed_s:.1f} s with {args.workers} worker(s)")
    print("  " + ", ".join(f"{name} {totals[name]}" for name in sim.counters))
    print(f"  failing seeds: {len(failures)}" + (f" ({', '.join(str(f[0]) for f in failures[:20])}"
                                                   f"{', ...' if len(failures) > 20 else ''})" if failures else ""))
    if not failures:
        return 0
    seed, violations = failures[0]
    print(f"first failing seed: {seed}")
    for violation in violations:
        print(f"  {violation}")
    print(f"re-run it alone: {rerun_command(sim, seed, args.steps, args.break_name)}")
    return 1
