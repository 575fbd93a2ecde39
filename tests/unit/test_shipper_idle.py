"""An idle replication stream sleeps between checks: a refused shard's retry time, once
past, must not turn the stream's idle wait into a busy loop (it did: every node burnt
30-50 % of a core with no writes at all after a replica had once answered SNAPSHOTTING)."""

from __future__ import annotations

from types import SimpleNamespace

from bluemarble.core.ids import NodeId, ShardId
from bluemarble.runtime.clock import FakeClock
from shardnode.replication import PROGRESS_INTERVAL_S, Peer, Shipper


def _shipper(*retry_at_s: float) -> Shipper:
    shipper = Shipper(NodeId("n2"), SimpleNamespace(), FakeClock())  # type: ignore[arg-type]
    for i, at in enumerate(retry_at_s):
        shipper.peers[ShardId(f"shard-{i}")] = Peer(retry_at_s=at)
    return shipper


def test_idle_wait_is_the_progress_half_interval_without_retries() -> None:
    assert _shipper().idle_wait_s(100.0) == PROGRESS_INTERVAL_S / 2


def test_idle_wait_ends_at_the_next_retry_ahead() -> None:
    wait = _shipper(100.05, 100.1).idle_wait_s(100.0)
    assert abs(wait - 0.05) < 1e-9


def test_a_past_retry_time_does_not_make_the_stream_spin() -> None:
    assert _shipper(99.0).idle_wait_s(100.0) == PROGRESS_INTERVAL_S / 2
    wait = _shipper(99.0, 100.1).idle_wait_s(100.0)
    assert abs(wait - 0.1) < 1e-9
