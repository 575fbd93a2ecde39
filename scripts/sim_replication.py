#!/usr/bin/env python3
"""Runs the deterministic replication simulation over many seeds (issue 7, item 5).

    .venv/bin/python scripts/sim_replication.py --seeds 100000 [--start 0] [--steps 300]
        [--break RULE] [--workers 2] [--trace]
    .venv/bin/python scripts/sim_replication.py --list-breaks

Each seed is one schedule of drops, delays, reorders, duplicates, crashes, restarts,
pauses, partitions from the leader and a lost disk, driven through the real rules of
bluemarble.core.replication (tests/sim/replication_sim.py) with I1, I4 and log matching
checked after every tick. Prints a summary (seeds, ticks, faults, violations, time) and
exits 1 on any violation, naming the first failing seed and the command that re-runs it
alone (the run is a pure function of the seed: it reproduces exactly, digest included).

``--break RULE`` plants one deliberate bug (tests/sim/rules.py, BREAKS) in the simulated
actors without touching the rules on disk, to show the checker catching it. ``--trace``
prints the notable events of every seed run (use it with --seeds 1).
"""

from __future__ import annotations

import sys

from tests.sim.replication_sim import DEFAULT_STEPS, run_range, run_seed
from tests.sim.rules import BREAKS
from tests.sim.seed_runner import Simulation
from tests.sim.seed_runner import main as run_main

FAULT_COUNTERS = (
    "crashes", "restarts", "pauses", "partitions", "disks_lost", "promotions", "fence_rounds", "catch_ups",
    "snapshots_sent", "snapshots_installed", "stale_refused", "mismatches", "step_downs", "not_found",
    "self_fenced", "writes_started", "writes_acked", "writes_refused", "messages_sent", "messages_dropped",
    "messages_duplicated", "messages_held",
)

SIMULATION = Simulation(
    "replication simulation", "scripts/sim_replication.py", run_range, run_seed, BREAKS, DEFAULT_STEPS, FAULT_COUNTERS
)


def main(argv: list[str] | None = None) -> int:
    return run_main(SIMULATION, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
