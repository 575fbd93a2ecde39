"""The WAL writeback thread: flushes node.db-wal while it changes, stays quiet while it
does not, survives a WAL that is not there, and ends with the storage."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from bluemarble.v1 import shardnode_pb2 as pb
from shardnode.storage import NodeStorage
from shardnode.storage.writeback import WalWriteback


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def grant(i: int) -> pb.WriteOp:
    return pb.WriteOp(request_id=f"g{i}", player_id="p1", grant=pb.GrantOp(item_ids=[f"item-{i}"]))


def test_the_wal_is_flushed_after_writes_and_not_while_idle(tmp_path: Path) -> None:
    with NodeStorage.open(tmp_path) as storage:
        writeback = storage._writeback
        assert writeback is not None and writeback.wal == tmp_path / "node.db-wal"
        storage.fence("shard-0", 1)  # type: ignore[arg-type]
        storage.write("shard-0", 1, grant(1), now_ms=1)  # type: ignore[arg-type]
        wait_until(lambda: writeback.flushes >= 1)
        # Idle: several intervals pass and nothing is flushed (the WAL did not change).
        settled = writeback.flushes
        time.sleep(6 * writeback.interval_s)
        idle = writeback.flushes
        assert idle - settled <= 1  # at most the flush of a change seen just before
        storage.write("shard-0", 1, grant(2), now_ms=2)  # type: ignore[arg-type]
        wait_until(lambda: writeback.flushes > idle)
    assert not writeback._thread.is_alive()  # closing the storage ended it


def test_full_durability_needs_no_writeback(tmp_path: Path) -> None:
    with NodeStorage.open(tmp_path, synchronous="FULL") as storage:
        assert storage._writeback is None  # every commit fsyncs the WAL itself


def test_a_missing_wal_is_waited_for_quietly(tmp_path: Path) -> None:
    writeback = WalWriteback(tmp_path / "absent-wal", interval_s=0.01).start()
    time.sleep(0.05)
    assert writeback._thread.is_alive() and writeback.flushes == 0
    (tmp_path / "absent-wal").write_bytes(b"frames")
    wait_until(lambda: writeback.flushes == 1)
    writeback.stop()
    assert not writeback._thread.is_alive()
