#!/usr/bin/env python3
"""Runs the deterministic trade simulation over many seeds (issue 8, item 4).

    .venv/bin/python scripts/sim_trades.py --seeds 100000 [--start 0] [--steps 150]
        [--break RULE] [--workers 2] [--trace]
    .venv/bin/python scripts/sim_trades.py --list-breaks

Each seed is one schedule of concurrent cross-shard and same-shard trades through drops,
delays, reorders, duplicates, participant crashes and failovers, coordinator crashes at
every phase, decision-store restarts and restores from a backup (records lost), leader
crashes, client retries and give-ups, driven through the real rules of
bluemarble.core.trades (tests/sim/trade_sim.py) with I2 and I3
checked after every step and I5 after healing. Prints a summary (seeds, ticks, trades,
faults, violations, time) and exits 1 on any violation, naming the first failing seed and
the command that re-runs it alone (the run is a pure function of the seed: it reproduces
exactly, digest included).

``--break RULE`` plants one deliberate bug (tests/sim/trade_rules.py, BREAKS) in the
simulated actors without touching the rules on disk, to show the checker catching it.
``--trace`` prints the notable events of every seed run (use it with --seeds 1).
"""

from __future__ import annotations

import sys

from tests.sim.seed_runner import Simulation
from tests.sim.seed_runner import main as run_main
from tests.sim.trade_rules import BREAKS
from tests.sim.trade_sim import DEFAULT_STEPS, run_range, run_seed

FAULT_COUNTERS = (
    "trades_started", "cross_shard", "same_shard", "answered_committed", "answered_aborted", "retries",
    "double_sends", "gave_up", "refusals", "escrows", "commits_applied", "aborts_applied", "records_only",
    "prepares_decided", "resolves", "records_by_participant", "records_by_coordinator", "proposals_lost",
    "settles_failed", "swept", "retained", "participant_crashes", "failovers", "coordinator_crashes",
    "crash_before_prepare", "crash_between_prepare_and_decision", "crash_between_decision_and_commit",
    "store_restarts", "leader_crashes", "messages_sent", "messages_dropped", "messages_duplicated", "restores",
    "records_lost", "counterparts_asked", "recovered_commits", "resolves_waiting", "abandoned",
)

SIMULATION = Simulation(
    "trade simulation", "scripts/sim_trades.py", run_range, run_seed, BREAKS, DEFAULT_STEPS, FAULT_COUNTERS
)


def main(argv: list[str] | None = None) -> int:
    return run_main(SIMULATION, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
