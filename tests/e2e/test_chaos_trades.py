"""End to end: the short run of scripts/chaos_trades.py (acceptance item 1's check, in the
suite). Its own cluster of real processes (etcd, 2 control-plane replicas, 4 nodes, R = 3,
TTL 2 s, a temp dir), every fault kind once, a few hundred trades; the script's checks
(conservation, answers applied, no escrow after healing, same answer twice) must all pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.chaos_trades import FAULT_KINDS

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(150)
def test_short_chaos_run_of_every_fault_kind_conserves_items_and_gold() -> None:
    trades = 240
    command = [
        sys.executable, "scripts/chaos_trades.py", "--seed", "5", "--trades", str(trades), "--players", "48",
        "--concurrency", "12", "--fault-rounds", "1", "--json", "--server-log-level", "warning",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=140, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no summary; exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    summary = json.loads(lines[-1])
    assert summary["violations"] == [], summary["violations"][:10]
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary["trades"] == trades
    assert summary["committed"] + summary["aborted"] == trades, "every trade got an answer"
    assert summary["faults"] == dict.fromkeys(FAULT_KINDS, 1), summary["fault_log"]
    assert summary["cross_shard_committed"] > 0 and summary["same_shard_committed"] > 0
    assert summary["invalid_aborted"] > 0, "trades giving more gold than owned are ABORTED"
    assert summary["answered_twice_or_more"] == trades, "every trade was asked again and answered the same"
    assert summary["escrows_clear_after_heal_s"] is not None
    coordinator_kill = next(f for f in summary["fault_log"] if f["kind"] == "coordinator-kill")
    assert coordinator_kill["in_flight"] > 0, "the killed coordinator had trades in flight"
