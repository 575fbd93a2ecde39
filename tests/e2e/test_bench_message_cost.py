"""scripts/bench_message_cost.py runs end to end (its figures live in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_message_cost.py"


def test_it_measures_each_transport_idle_and_back_to_back() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--rate", "500", "--count", "100", "--json"],
                          capture_output=True, text=True, timeout=120, check=True)
    results = json.loads(done.stdout)
    assert set(results) == {"grpc.aio stream, back to back", "grpc.aio stream, at 500/s",
                            "grpc.aio unary, back to back", "grpc.aio unary, at 500/s",
                            "asyncio TCP, back to back", "asyncio TCP, at 500/s",
                            "framed (frames.py), back to back", "framed (frames.py), at 500/s"}
    for name, figures in results.items():
        assert figures["client_us"] > 0 and figures["server_us"] > 0, (name, figures)
        assert figures["total_us"] == figures["client_us"] + figures["server_us"], (name, figures)


def test_it_refuses_a_rate_out_of_bounds() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--rate", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--rate must be within 1-5000" in done.stderr
