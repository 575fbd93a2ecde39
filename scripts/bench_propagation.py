#!/usr/bin/env python3
"""Assignment propagation benchmark: etcd commit -> delivered on 100 WatchAssignments streams.

    .venv/bin/python scripts/bench_propagation.py --streams 100 --changes 50 --interval-ms 100

What runs (all on 127.0.0.1):

* a private single-member etcd (:class:`scripts.localcluster.LocalEtcd`, temp dir) and
  one control plane as a real process (``python -m controlplane.server.main --cluster bench
  --lease-ttl-s 2 --shards 16 --replication-factor 3 ...``). It becomes leader and its
  reconciler writes the 16 initial assignment records (no primary: no node exists);
* ``--workers`` watcher processes (default 2) holding ``--streams`` WatchAssignments
  streams in all (default 100, split evenly), each stream on its own gRPC channel (its
  own TCP connection, like a real node), with ``node_id=""`` so every stream receives
  every change. Each stream timestamps (``time.monotonic()``, which is CLOCK_MONOTONIC:
  one clock for every process of the machine) every message as it arrives and notes each
  (shard, epoch) it carries;
* this process is the writer: once every stream has its snapshot, it makes
  ``--warmup`` + ``--changes`` assignment changes, ``--interval-ms`` apart, by writing
  directly to etcd through the project's adapter (:class:`controlplane.store.etcd.EtcdStore`,
  key from :class:`controlplane.store.keys.KeySchema`, value from
  :func:`controlplane.store.records.assignment_to_proto` + :func:`controlplane.store.codec.encode`):
  one Put of ``/bluemarble/bench/assignments/shard-<i mod 16>`` with the epoch bumped and
  a made-up primary and replicas.

Why the control plane does not fight these writes: no node is registered, and with zero
live nodes ``plan_assignments`` keeps every record unchanged (nothing to improve, and
forgetting who held the data would be data loss), so the reconciler, woken by each
change, plans no write. The benchmark checks it: the etcd revision must advance by
exactly the number of Puts over the run, and every record must end as last written.

Latency of one (change, stream) pair = arrival of the first message on that stream
carrying the change's (shard, epoch) minus the change's commit time. Commit time = the
moment ``EtcdStore.put`` returned (the commit happened at some point before; the
columns "from send" use the moment just before the Put was sent instead, an upper
bound). Warm-up changes are not counted. A pair never delivered is a failure.

Reported: p50, p90, p99 and max over all pairs (changes x streams), plus the Put round
trip and the per-change fan-out spread (last stream - first stream). Target: p99 <=
``--target-ms`` (100 ms). Exit 0 if met and every pair was delivered, 1 otherwise, 130 on
Ctrl-C. Every process started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bluemarble.v1 import controlplane_pb2 as pb
from bluemarble.v1 import controlplane_pb2_grpc
from scripts.localcluster import LocalEtcd, ManagedProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = "bench"


# ---------------------------------------------------------------- watcher processes


def watcher(worker: int, address: str, streams: int, first_stream: int, out: Any, stop: Any) -> None:
    """Holds ``streams`` WatchAssignments streams; sends back every (stream, shard, epoch, t)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        result = asyncio.run(_watch(worker, address, streams, first_stream, out, stop))
        out.put(("done", worker, result))
    except Exception as e:  # reported to the parent
        out.put(("error", worker, f"{type(e).__name__}: {e}"))


async def _watch(
    worker: int, address: str, streams: int, first_stream: int, out: Any, stop: Any
) -> list[tuple[int, str, int, float]]:
    from bluemarble.runtime.channels import insecure_channel

    seen: list[tuple[int, str, int, float]] = []
    snapshots = 0
    all_snapshots = asyncio.Event()
    errors: list[str] = []

    async def follow(index: int) -> None:
        nonlocal snapshots
        channel = insecure_channel(address)
        try:
            stub = controlplane_pb2_grpc.ControlPlaneStub(channel)  # type: ignore[no-untyped-call]
            call = stub.WatchAssignments(pb.WatchAssignmentsRequest(node_id=""))
            async for resp in call:
                t = time.monotonic()
                if resp.snapshot:
                    snapshots += 1
                    if snapshots == streams:
                        all_snapshots.set()
                    continue
                for a in resp.assignments:
                    seen.append((index, a.shard_id, a.epoch, t))
            errors.append(f"stream {index} ended")
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                errors.append(f"stream {index}: {e.code().name} {e.details()}")
        finally:
            await channel.close(None)

    tasks = [asyncio.create_task(follow(first_stream + i)) for i in range(streams)]
    await asyncio.wait_for(all_snapshots.wait(), 60)
    out.put(("ready", worker, streams))
    while not stop.is_set():
        if errors:
            raise RuntimeError("; ".join(errors[:5]))
        await asyncio.sleep(0.05)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return seen


# ---------------------------------------------------------------- writer


async def write_changes(endpoint: str, args: argparse.Namespace) -> dict[str, Any]:
    """The Puts, spaced ``interval_ms`` apart; returns their timings and the checks."""
    from bluemarble.api.conversions import assignment_from_proto, assignment_to_proto
    from bluemarble.core.ids import NodeId, ShardId
    from bluemarble.core.placement import ShardAssignment
    from bluemarble.v1 import common_pb2
    from controlplane.store import codec
    from controlplane.store.etcd import EtcdStore
    from controlplane.store.keys import KeySchema

    keys = KeySchema(CLUSTER)
    store = EtcdStore([endpoint])
    await store.connect(10)
    try:
        kvs, _ = await store.get_prefix(keys.assignments_prefix())
        current = {
            keys.parse_assignment(kv.key): assignment_from_proto(codec.decode(kv.value, common_pb2.Assignment, kv.key))
            for kv in kvs
        }
        shards = sorted(current, key=lambda s: int(s.rsplit("-", 1)[1]))
        start_revision = await store.current_revision()
        changes: list[dict[str, Any]] = []
        period = args.interval_ms / 1000
        next_at = time.monotonic()
        for i in range(args.warmup + args.changes):
            shard = ShardId(shards[i % len(shards)])
            old = current[shard]
            fake = [NodeId(f"bench-fake-{(i + j) % 7}") for j in range(3)]
            new = ShardAssignment(shard, old.epoch + 1, fake[0], (fake[1], fake[2]))
            value = codec.encode(assignment_to_proto(new))
            key = keys.assignment(shard)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            t_send = time.monotonic()
            revision = await store.put(key, value)
            t_commit = time.monotonic()
            current[shard] = new
            changes.append(
                {"i": i, "shard": shard, "epoch": new.epoch, "revision": revision,
                 "t_send": t_send, "t_commit": t_commit, "warmup": i < args.warmup}
            )  # fmt: skip
            next_at += period
        # Give the control plane's reconciler time to (not) react, then check nobody else wrote.
        await asyncio.sleep(args.drain_s)
        end_revision = await store.current_revision()
        kvs, _ = await store.get_prefix(keys.assignments_prefix())
        final = {
            keys.parse_assignment(kv.key): assignment_from_proto(codec.decode(kv.value, common_pb2.Assignment, kv.key))
            for kv in kvs
        }
        return {
            "changes": changes,
            "foreign_writes": end_revision - start_revision - len(changes),
            "overwritten": sorted(s for s in current if final.get(s) != current[s]),
        }
    finally:
        await store.close()


# ---------------------------------------------------------------- analysis


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)]


def analyse(changes: list[dict[str, Any]], seen: list[tuple[int, str, int, float]], streams: int) -> dict[str, Any]:
    first: dict[tuple[int, str, int], float] = {}
    for index, shard, epoch, t in seen:
        k = (index, shard, epoch)
        if k not in first or t < first[k]:
            first[k] = t
    from_commit: list[float] = []
    from_send: list[float] = []
    spreads: list[float] = []
    last_stream: list[float] = []
    missing = 0
    measured = [c for c in changes if not c["warmup"]]
    for c in measured:
        arrivals = []
        for index in range(streams):
            arrived = first.get((index, c["shard"], c["epoch"]))
            if arrived is None:
                missing += 1
                continue
            arrivals.append(arrived)
            from_commit.append((arrived - c["t_commit"]) * 1000)
            from_send.append((arrived - c["t_send"]) * 1000)
        if arrivals:
            spreads.append((max(arrivals) - min(arrivals)) * 1000)
            last_stream.append((max(arrivals) - c["t_commit"]) * 1000)
    from_commit.sort()
    from_send.sort()
    return {
        "pairs": len(from_commit),
        "expected": len(measured) * streams,
        "missing": missing,
        "from_commit": from_commit,
        "from_send": from_send,
        "spreads": sorted(spreads),
        "last_stream": sorted(last_stream),
        "put_rtt": sorted((c["t_commit"] - c["t_send"]) * 1000 for c in measured),
    }


# ---------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=100, help="WatchAssignments streams (simulated nodes)")
    p.add_argument("--workers", type=int, default=2, help="watcher processes holding the streams")
    p.add_argument("--changes", type=int, default=50, help="measured assignment changes")
    p.add_argument("--warmup", type=int, default=5, help="changes made first and not counted")
    p.add_argument("--interval-ms", type=float, default=100.0, help="time between changes")
    p.add_argument("--drain-s", type=float, default=1.0, help="wait after the last change")
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--target-ms", type=float, default=100.0, help="target for p99")
    p.add_argument("--keep-dir", action="store_true", help="keep etcd data and process logs")
    args = p.parse_args()
    if args.streams < 1 or args.workers < 1 or args.changes < 1:
        p.error("--streams, --workers and --changes must be >= 1")
    args.workers = min(args.workers, args.streams)

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    os.chdir(ROOT)
    workdir = Path(tempfile.mkdtemp(prefix="bench-propagation-"))
    print(
        f"propagation benchmark: {args.streams} WatchAssignments streams in {args.workers} processes, "
        f"{args.changes} changes (+{args.warmup} warm-up) {args.interval_ms:g} ms apart, "
        f"{os.cpu_count()} CPUs; logs in {workdir}",
        flush=True,
    )
    etcd: LocalEtcd | None = None
    cp: ManagedProcess | None = None
    procs: list[mp.process.BaseProcess] = []
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    out = ctx.Queue()
    failed = False
    try:
        etcd = LocalEtcd(workdir).start()
        address = f"127.0.0.1:{free_port()}"
        cp = ManagedProcess(
            "cp",
            [sys.executable, "-m", "controlplane.server.main", "--listen", address, "--etcd", etcd.endpoint,
             "--cluster", CLUSTER, "--replica-id", "cp-0", "--lease-ttl-s", "2",
             "--shards", str(args.shards), "--replication-factor", "3"],
            workdir / "cp.log",
        ).start()  # fmt: skip

        def ready() -> bool:
            if not cp.alive():
                raise RuntimeError(f"control plane exited:\n{cp.log_tail()}")
            with grpc.insecure_channel(address) as channel:
                stub = controlplane_pb2_grpc.ControlPlaneStub(channel)  # type: ignore[no-untyped-call]
                try:
                    nodes = stub.ListNodes(pb.ListNodesRequest(), timeout=1)
                    r = stub.ListAssignments(pb.ListAssignmentsRequest(), timeout=1)
                except grpc.RpcError:
                    return False
            if nodes.nodes:
                raise RuntimeError(f"nodes are registered ({[n.node_id for n in nodes.nodes]}); the bench needs none")
            return bool(len(r.assignments) == args.shards)

        wait_until(ready, 30, f"the control plane to serve {args.shards} initial assignments")
        base, extra = divmod(args.streams, args.workers)
        per = [base + (1 if w < extra else 0) for w in range(args.workers)]
        first = 0
        for w, n in enumerate(per):
            worker = ctx.Process(target=watcher, args=(w, address, n, first, out, stop), daemon=True)
            worker.start()
            procs.append(worker)
            first += n
        readies = 0
        while readies < args.workers:
            try:
                kind, w, detail = out.get(timeout=60)
            except queue.Empty:
                raise RuntimeError("watchers did not open their streams within 60 s") from None
            if kind != "ready":
                raise RuntimeError(f"watcher {w}: {detail}")
            readies += 1
        print(f"{args.streams} streams open, each got its snapshot; writing ...", flush=True)
        written = asyncio.run(write_changes(etcd.endpoint, args))
        stop.set()
        seen: list[tuple[int, str, int, float]] = []
        for _ in procs:
            try:
                kind, w, detail = out.get(timeout=60)
            except queue.Empty:
                raise RuntimeError("watchers did not report within 60 s") from None
            if kind != "done":
                raise RuntimeError(f"watcher {w}: {detail}")
            seen.extend(detail)
    except KeyboardInterrupt:
        print("interrupted; stopping every process", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        failed = True
        args.keep_dir = True
    finally:
        stop.set()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if cp is not None:
            cp.stop(5)
        if etcd is not None:
            etcd.stop()
        if args.keep_dir:
            print(f"logs and data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if failed:
        return 1

    r = analyse(written["changes"], seen, args.streams)
    lat, snd = r["from_commit"], r["from_send"]
    print()
    print(f"delivered {r['pairs']} of {r['expected']} (change, stream) pairs; missing {r['missing']}")
    print(f"writes by anyone else during the run: {written['foreign_writes']}; "
          f"records overwritten by the control plane: {written['overwritten'] or 'none'}")  # fmt: skip
    print()
    print("| latency (ms) | p50 | p90 | p99 | max |")
    print("| --- | --- | --- | --- | --- |")
    if lat:
        print(f"| **commit (Put returned) -> delivered**, all pairs | {pct(lat, 50):.1f} | {pct(lat, 90):.1f} "
              f"| **{pct(lat, 99):.1f}** | {lat[-1]:.1f} |")  # fmt: skip
        print(f"| Put sent -> delivered (upper bound), all pairs | {pct(snd, 50):.1f} | {pct(snd, 90):.1f} "
              f"| {pct(snd, 99):.1f} | {snd[-1]:.1f} |")  # fmt: skip
        ls, sp, rtt = r["last_stream"], r["spreads"], r["put_rtt"]
        print(f"| commit -> last of the {args.streams} streams, per change | {pct(ls, 50):.1f} | {pct(ls, 90):.1f} "
              f"| {pct(ls, 99):.1f} | {ls[-1]:.1f} |")  # fmt: skip
        print(f"| fan-out spread (last - first stream), per change | {pct(sp, 50):.1f} | {pct(sp, 90):.1f} "
              f"| {pct(sp, 99):.1f} | {sp[-1]:.1f} |")  # fmt: skip
        print(f"| etcd Put round trip | {pct(rtt, 50):.2f} | {pct(rtt, 90):.2f} | {pct(rtt, 99):.2f} "
              f"| {rtt[-1]:.2f} |")  # fmt: skip
    p99 = pct(lat, 99) if lat else math.inf
    ok = (
        p99 <= args.target_ms
        and r["missing"] == 0
        and written["foreign_writes"] == 0
        and not written["overwritten"]
    )
    print(
        f"\n{'PASS' if ok else 'FAIL'}: p99 {p99:.1f} ms (target <= {args.target_ms:g} ms), "
        f"{r['missing']} undelivered, {written['foreign_writes']} foreign writes"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
