"""Micro-benchmark of node storage commits: grants/s through single ``write`` calls
(one transaction each) and through ``write_many`` batches (group commit), and replica
``append`` batches, under ``synchronous=NORMAL`` and ``FULL``.

It measures the storage alone (no gRPC, no replication), on the disk holding
``--dir`` (default: a temp dir). Rates are wall-clock; "CPU us/write" is the process's
CPU time per single write, which other load on the machine does not inflate (under FULL
the rest of a write's time is the fsync). Each grant gives one new item and some gold to one of
``--players`` players across ``--shards`` shards, with a request id: the shape of the
seeding grants the data plane serves.

    .venv/bin/python -m scripts.bench_storage [--writes 5000] [--batch 64] [--dir DIR]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bluemarble.core.ids import ShardId
from bluemarble.v1 import shardnode_pb2
from shardnode.storage import NodeStorage
from shardnode.storage.schema import Synchronous

_ids = itertools.count()


def _ops(count: int, shards: int, players: int) -> Iterator[tuple[ShardId, int, shardnode_pb2.WriteOp]]:
    for _ in range(count):
        n = next(_ids)
        op = shardnode_pb2.WriteOp(
            request_id=f"req-{n}",
            player_id=f"player-{n % players}",
            grant=shardnode_pb2.GrantOp(item_ids=[f"item-{n}"], gold=10),
        )
        yield ShardId(f"shard-{n % shards}"), 1, op


def _run(root: Path, synchronous: Synchronous, writes: int, batch: int, shards: int, players: int) -> dict[str, float]:
    primary_dir, replica_dir = root / f"{synchronous}-primary", root / f"{synchronous}-replica"
    figures: dict[str, float] = {}
    with NodeStorage.open(primary_dir, synchronous=synchronous) as storage:
        ops = list(_ops(writes, shards, players))
        started, cpu_started = time.perf_counter(), time.process_time()
        for shard, epoch, op in ops:
            storage.write(shard, epoch, op, now_ms=1)
        figures["single"] = writes / (time.perf_counter() - started)
        figures["single_cpu_us"] = (time.process_time() - cpu_started) / writes * 1e6

        ops = list(_ops(writes, shards, players))
        started = time.perf_counter()
        for i in range(0, len(ops), batch):
            storage.write_many(ops[i : i + batch], now_ms=2)
        figures["batched"] = writes / (time.perf_counter() - started)
        names = [ShardId(f"shard-{s}") for s in range(shards)]
        logs = {shard: storage.entries(shard, 1, max_entries=10**9, max_bytes=1 << 40) for shard in names}

    with NodeStorage.open(replica_dir, synchronous=synchronous) as replica:
        per_shard = max(batch // shards, 1)
        total = sum(len(entries) for entries in logs.values())
        started = time.perf_counter()
        offset = 0
        while any(offset < len(entries) for entries in logs.values()):
            replica.append([(s, e[offset : offset + per_shard]) for s, e in logs.items()], {})
            offset += per_shard
        figures["append"] = total / (time.perf_counter() - started)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=5000, help="grants per measurement")
    parser.add_argument("--batch", type=int, default=64, help="writes per write_many / entries per append")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--players", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=None, help="where to put the databases (default: a temp dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-storage-", dir=args.dir))
    try:
        print(f"{args.writes} grants per row, batches of {args.batch}, {args.shards} shards, in {root}")
        print(f"{'synchronous':<12} {'write/s':>10} {'CPU us/write':>13} {'write_many/s':>13} {'append/s':>10}")
        for synchronous in ("NORMAL", "FULL"):
            f = _run(root, synchronous, args.writes, args.batch, args.shards, args.players)
            print(
                f"{synchronous:<12} {f['single']:>10,.0f} {f['single_cpu_us']:>13,.0f} "
                f"{f['batched']:>13,.0f} {f['append']:>10,.0f}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
