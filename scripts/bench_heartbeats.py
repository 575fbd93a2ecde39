#!/usr/bin/env python3
"""Heartbeat load benchmark: how many nodes can ONE control-plane replica keep alive?

    python scripts/bench_heartbeats.py --nodes 500,1000,2000,3000 --duration-s 60

For each node count N (a fresh cluster per level, so levels do not disturb each other):

1. start a private single-member etcd (in a temporary directory) and one control plane
   as a real process (``python -m controlplane.server.main ... --lease-ttl-s 3``);
2. start K load-generator processes (``--workers``, default 2), each simulating N/K
   nodes over a few grpc.aio channels with the raw generated ControlPlaneStub: every
   node registers (unique node id, address 127.0.0.1:<10000+i>, zone a/b/c; each
   generator runs one ShardNode server on all its nodes' ports, so the leader's probe of a
   new registration is answered as a real node would answer it), then
   heartbeats every ``--interval-s`` (1.0 s), the N nodes' phases spread evenly over
   the second (not bursty). A node waits for its previous heartbeat's answer before it
   sends the next (like the real agent), so a slow server shows up as a larger gap;
3. after every node has registered, a warm-up (``--warmup-s``), then the steady phase
   (``--duration-s``), over which the control plane's, etcd's and the generators' CPU
   is measured from /proc/<pid>/stat (utime+stime, in % of one core);
4. at the end of the steady phase, ListNodes must still return all N nodes.

A heartbeat answered NOT_FOUND is a false expiration (the node was heartbeating, yet
its lease was gone); so is a node missing from ListNodes at the end. A node answered
NOT_FOUND registers again (as the agent would) so the run goes on. "Sustained" means:
zero false expirations at any point of the run (ramp-up, steady, tail), zero failed
heartbeats (any status) in the steady phase, and every node listed at the end. Failed
heartbeats while the N registrations are being processed (ramp-up) or during the final
ListNodes (tail) are reported by phase but do not fail the level. CANCELLED counts as a
failure like DEADLINE_EXCEEDED (under overload the client sees both for calls that ran
out of time).

The generators share the machine with the control plane and etcd (on a 2-core box they
compete for the same cores), so a level that is not sustained may be limited by the
generators themselves: the generators' CPU is reported, and a generator that falls
behind shows up as late heartbeats and a max gap well above the interval, never hidden.

Every process (etcd, control plane, generators) is stopped on exit, including Ctrl-C,
SIGTERM and errors. Exit status: 0 if the largest requested level was sustained, 1 if
not (a set-up failure fails its level), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bluemarble.v1 import controlplane_pb2, controlplane_pb2_grpc, shardnode_pb2, shardnode_pb2_grpc
from scripts.localcluster import LocalEtcd, ManagedProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
ZONES = ("zone-a", "zone-b", "zone-c")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PHASES = ("ramp", "steady", "tail")
# Shared timing slots (monotonic seconds; CLOCK_MONOTONIC is system-wide on Linux).
T_START, T_END, T_STOP = 0, 1, 2
LATE_S = 0.1  # a heartbeat sent more than this after its due time counts as late


def node_id(i: int) -> str:
    return f"bench-node-{i:06d}"


# ---------------------------------------------------------------- load generator


@dataclass
class PhaseStats:
    sent: int = 0
    ok: int = 0
    # Failed heartbeats by status (a plain dict: dataclasses.asdict mangles a Counter).
    codes: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    max_gap_s: float = 0.0  # longest time between two successful heartbeats of a node
    late: int = 0  # sent more than LATE_S after due: the generator fell behind
    max_late_s: float = 0.0


@dataclass
class WorkerResult:
    worker: int
    nodes: int
    registered: int
    register_s: float
    register_errors: dict[str, int]
    re_registrations: int
    phases: dict[str, PhaseStats]
    not_heartbeating_at_stop: int  # nodes whose last success is older than the TTL at stop
    error_samples: dict[str, str]  # status -> details of its first occurrence


class _Deadline(Exception):
    """A streamed heartbeat got no answer within the deadline (like DEADLINE_EXCEEDED)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "no answer on the heartbeat stream within the deadline"


class _Closed(Exception):
    """The server ended the heartbeat stream with a status."""

    def __init__(self, status: grpc.StatusCode):
        super().__init__(status.name)
        self.status = status

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return f"heartbeat stream closed with {self.status.name}"


def _phase(t: float, timing: Any) -> str:
    start = timing[T_START]
    if start <= 0 or t < start:
        return "ramp"
    if t < timing[T_END]:
        return "steady"
    return "tail"


def node_port(i: int) -> int:
    """The port simulated node ``i`` registers (and answers probes on)."""
    return 10000 + i


class _ProbeResponder(shardnode_pb2_grpc.ShardNodeServicer):
    """What a simulated node answers when the leader probes it: holding nothing yet."""

    async def GetShardStatus(self, request: Any, context: Any) -> shardnode_pb2.GetShardStatusResponse:
        return shardnode_pb2.GetShardStatusResponse()


async def _generate(
    wid: int,
    address: str,
    indexes: list[int],
    total: int,
    args: dict[str, Any],
    timing: Any,
    events: Any,
) -> WorkerResult:
    loop = asyncio.get_running_loop()
    parent = os.getppid()
    interval = float(args["interval_s"])
    ttl_s = float(args["lease_ttl_s"])
    hb_timeout = float(args["hb_timeout_s"])
    stream_mode = args["mode"] == "stream"
    # A local subchannel pool per channel, or all channels to one target share one TCP
    # connection and the "few channels" would be one.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(args["channels"])]
    stubs = [controlplane_pb2_grpc.ControlPlaneStub(c) for c in channels]
    # The simulated nodes answer the leader's probe of a new registration, as real nodes
    # do: one ShardNode server per generator, listening on every one of its nodes' ports.
    responder = grpc.aio.server()
    shardnode_pb2_grpc.add_ShardNodeServicer_to_server(_ProbeResponder(), responder)
    for i in indexes:
        responder.add_insecure_port(f"127.0.0.1:{node_port(i)}")
    await responder.start()
    stop = asyncio.Event()
    reg_sem = asyncio.Semaphore(int(args["register_concurrency"]))
    phases = {p: PhaseStats() for p in PHASES}
    register_errors: dict[str, int] = {}
    error_samples: dict[str, str] = {}
    counters = {"registered": 0, "re_registrations": 0}
    last_ok: dict[int, float] = {}
    all_registered = asyncio.Event()
    reg_started = loop.time()

    async def watchdog() -> None:
        while not stop.is_set():
            if timing[T_STOP] > 0 or os.getppid() != parent:
                stop.set()
                return
            await asyncio.sleep(0.05)

    async def register(i: int, stub: controlplane_pb2_grpc.ControlPlaneStub) -> int:
        request = controlplane_pb2.RegisterNodeRequest(
            node_id=node_id(i),
            address=f"127.0.0.1:{node_port(i)}",
            region="bench",
            zone=ZONES[i % len(ZONES)],
            capacity=1,
        )
        backoff = 0.05
        while not stop.is_set():
            async with reg_sem:
                try:
                    response = await stub.RegisterNode(request, timeout=10.0)
                    return int(response.lease_id)
                except grpc.aio.AioRpcError as e:
                    name = e.code().name
                    register_errors[name] = register_errors.get(name, 0) + 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
        return 0

    async def node(i: int) -> None:
        stub = stubs[i % len(stubs)]
        lease_id = await register(i, stub)
        if not lease_id:
            return
        now = loop.time()
        last_ok[i] = now
        counters["registered"] += 1
        if counters["registered"] == len(indexes):
            all_registered.set()
        request = controlplane_pb2.HeartbeatRequest(node_id=node_id(i), lease_id=lease_id)
        call = None  # this node's HeartbeatStream, in stream mode
        # Node i's phase within the interval: spread all N nodes evenly.
        offset = interval * i / total
        due = reg_started + offset
        while due <= now:
            due += interval
        while not stop.is_set():
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                if stop.is_set():
                    return
            sent = loop.time()
            ph = phases[_phase(sent, timing)]
            ph.sent += 1
            late = sent - due
            if late > LATE_S:
                ph.late += 1
            ph.max_late_s = max(ph.max_late_s, late)
            try:
                if stream_mode:
                    if call is None:
                        call = stub.HeartbeatStream()
                    try:
                        async with asyncio.timeout(hb_timeout):
                            await call.write(request)
                            response = await call.read()
                    except TimeoutError:
                        call.cancel()
                        call = None
                        raise _Deadline() from None
                    if not isinstance(response, controlplane_pb2.HeartbeatResponse):
                        code = await call.code()
                        call = None
                        raise _Closed(code)
                else:
                    await stub.Heartbeat(request, timeout=hb_timeout)
            except (grpc.aio.AioRpcError, _Deadline, _Closed) as e:
                if stream_mode and isinstance(e, grpc.aio.AioRpcError):
                    call = None
                code = e.code()
                ph.codes[code.name] = ph.codes.get(code.name, 0) + 1
                error_samples.setdefault(code.name, str(e.details()))
                if code == grpc.StatusCode.NOT_FOUND and not stop.is_set():
                    # False expiration: register again (the agent would) and go on.
                    lease_id = await register(i, stub)
                    if not lease_id:
                        return
                    counters["re_registrations"] += 1
                    request = controlplane_pb2.HeartbeatRequest(node_id=node_id(i), lease_id=lease_id)
            else:
                done = loop.time()
                ph.ok += 1
                if ph is phases["steady"]:
                    ph.latencies_ms.append((done - sent) * 1000)
                gap = done - last_ok[i]
                last_ok[i] = done
                dph = phases[_phase(done, timing)]
                dph.max_gap_s = max(dph.max_gap_s, gap)
            due += interval
            due = max(due, loop.time())  # a whole period behind: do not burst to catch up

    watch = asyncio.create_task(watchdog())
    tasks = [asyncio.create_task(node(i)) for i in indexes]
    try:
        done_wait = asyncio.create_task(all_registered.wait())
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait([done_wait, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        done_wait.cancel()
        stop_wait.cancel()
        register_s = loop.time() - reg_started
        events.put(("registered", wid, counters["registered"], register_s, dict(register_errors)))
        await stop.wait()
        stopped_at = loop.time()
        ph = phases[_phase(stopped_at, timing)]
        for t in last_ok.values():  # gaps still open at the stop
            ph.max_gap_s = max(ph.max_gap_s, stopped_at - t)
        stale = sum(1 for t in last_ok.values() if stopped_at - t > ttl_s)
        await asyncio.wait(tasks, timeout=hb_timeout + 1.0)
    finally:
        for task in [*tasks, watch]:
            task.cancel()
        await asyncio.gather(*tasks, watch, return_exceptions=True)
        for c in channels:
            await c.close(grace=None)
        await responder.stop(None)
    return WorkerResult(
        worker=wid,
        nodes=len(indexes),
        registered=counters["registered"],
        register_s=register_s,
        register_errors=register_errors,
        re_registrations=counters["re_registrations"],
        phases=phases,
        not_heartbeating_at_stop=stale,
        error_samples=error_samples,
    )


def worker_main(
    wid: int,
    address: str,
    indexes: list[int],
    total: int,
    args: dict[str, Any],
    timing: Any,
    events: Any,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        result = asyncio.run(_generate(wid, address, indexes, total, args, timing, events))
        events.put(("result", wid, asdict(result)))  # plain data: no class lookup in the parent
    except BaseException as e:  # reported to the parent, which fails the level
        events.put(("error", wid, f"{type(e).__name__}: {e}"))
        raise


# ---------------------------------------------------------------- measurement


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    return sum(user_sys_ticks(pid))


def user_sys_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


@dataclass
class LevelResult:
    nodes: int
    duration_s: float
    registered: int = 0
    register_s: float = 0.0
    register_errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    ok: int = 0
    not_found: int = 0  # steady phase
    other_errors: dict[str, int] = field(default_factory=dict)  # steady phase
    not_found_any: int = 0  # whole run
    errors_any: dict[str, int] = field(default_factory=dict)  # whole run, not NOT_FOUND
    errors_by_phase: dict[str, dict[str, int]] = field(default_factory=dict)
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    max_gap_s: float = float("nan")
    late: int = 0
    max_late_s: float = 0.0
    listed: int = -1
    missing: int = -1
    cp_cpu_pct: float = float("nan")
    etcd_cpu_pct: float = float("nan")
    gen_cpu_pct: float = float("nan")
    machine_busy_pct: float = float("nan")  # % of all CPUs
    others_cpu_pct: float = float("nan")  # % of one core used by anything else
    cp_rss_mib: float = float("nan")
    cp_sys_pct: float = float("nan")  # the kernel part of cp_cpu_pct
    stale_at_stop: int = 0
    re_registrations: int = 0
    error_samples: dict[str, str] = field(default_factory=dict)
    failure: str = ""

    @property
    def false_expirations(self) -> int:
        return self.not_found_any + max(self.missing, 0)

    @property
    def sustained(self) -> bool:
        """No false expiration at any time, no failed heartbeat in the steady phase."""
        return (
            not self.failure
            and self.registered == self.nodes
            and self.false_expirations == 0
            and not self.other_errors
            and self.missing == 0
        )


def list_node_ids(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        response = stub.ListNodes(controlplane_pb2.ListNodesRequest(), timeout=15)
    return {n.node_id for n in response.nodes}


def serving(address: str, proc: ManagedProcess) -> bool:
    if not proc.alive():
        raise RuntimeError(f"control plane exited:\n{proc.log_tail()}")
    with grpc.insecure_channel(address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        try:
            stub.GetConfig(controlplane_pb2.GetConfigRequest(), timeout=1)
            return True
        except grpc.RpcError:
            return False


def sleep_until(t: float) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))


def run_level(n: int, args: argparse.Namespace, workdir: Path) -> LevelResult:
    result = LevelResult(nodes=n, duration_s=args.duration_s)
    level_dir = workdir / f"level-{n}"
    level_dir.mkdir(parents=True)
    ctx = mp.get_context("spawn")  # never fork a process that holds gRPC state
    etcd = LocalEtcd(level_dir)
    cp: ManagedProcess | None = None
    workers: list[Any] = []
    events = ctx.Queue()
    timing = ctx.RawArray("d", 3)
    try:
        etcd.start()
        address = f"127.0.0.1:{free_port()}"
        cp = ManagedProcess(
            "controlplane",
            [
                sys.executable, "-m", "controlplane.server.main",
                "--listen", address,
                "--etcd", etcd.endpoint,
                "--lease-ttl-s", str(args.lease_ttl_s),
                "--cluster", "bench",
                "--log-level", "warning",
            ],
            level_dir / "controlplane.log",
        ).start()  # fmt: skip
        wait_until(lambda: serving(address, cp), 30, f"the control plane on {address}", 0.2)

        k = max(1, min(args.workers, n))
        wargs = {
            "interval_s": args.interval_s,
            "lease_ttl_s": args.lease_ttl_s,
            "hb_timeout_s": args.hb_timeout_s,
            "channels": args.channels,
            "register_concurrency": args.register_concurrency,
            "mode": args.mode,
        }
        for w in range(k):
            indexes = list(range(w, n, k))  # interleaved: each worker's phases cover the second
            p = ctx.Process(
                target=worker_main,
                args=(w, address, indexes, n, wargs, timing, events),
                name=f"bench-gen-{w}",
                daemon=True,
            )
            p.start()
            workers.append(p)

        # Ramp-up: every worker reports once all its nodes are registered.
        registered = 0
        reg_deadline = time.monotonic() + args.register_timeout_s
        pending = set(range(k))
        while pending:
            try:
                msg = events.get(timeout=max(0.1, reg_deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    f"registration of {n} nodes did not finish within {args.register_timeout_s:g} s"
                ) from None
            if msg[0] == "error":
                raise RuntimeError(f"generator {msg[1]} failed: {msg[2]}")
            _, wid, count, reg_s, reg_errors = msg
            pending.discard(wid)
            registered += count
            result.register_s = max(result.register_s, reg_s)
            for code, c in reg_errors.items():
                result.register_errors[code] = result.register_errors.get(code, 0) + c
        result.registered = registered
        if not cp.alive():
            raise RuntimeError(f"control plane exited:\n{cp.log_tail()}")

        start = time.monotonic() + args.warmup_s
        end = start + args.duration_s
        timing[T_END] = end
        timing[T_START] = start
        print(
            f"  {n} nodes registered in {result.register_s:.1f} s; warm-up {args.warmup_s:g} s, "
            f"steady {args.duration_s:g} s ...",
            flush=True,
        )
        pids = {"cp": cp.pid, "etcd": etcd.process.pid if etcd.process else 0}
        gen_pids = [p.pid for p in workers]
        sleep_until(start)
        profiler = None
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            profiler = ManagedProcess(
                "py-spy",
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record", "--pid", str(cp.pid), "--duration", str(int(args.duration_s)),
                    "--rate", "50", "--nonblocking", "--format", "raw",
                    "-o", str(args.profile / f"controlplane-{n}.txt"),
                ],
                level_dir / "py-spy.log",
            ).start()  # fmt: skip
        c0 = {name: cpu_ticks(pid) for name, pid in pids.items()}
        cp_us0 = user_sys_ticks(cp.pid)
        g0 = sum(cpu_ticks(pid) for pid in gen_pids)
        m0 = machine_ticks()
        t0 = time.monotonic()
        sleep_until(end)
        c1 = {name: cpu_ticks(pid) for name, pid in pids.items()}
        cp_us1 = user_sys_ticks(cp.pid)
        g1 = sum(cpu_ticks(pid) for pid in gen_pids)
        m1 = machine_ticks()
        elapsed = time.monotonic() - t0
        result.cp_cpu_pct = 100 * (c1["cp"] - c0["cp"]) / CLK_TCK / elapsed
        result.cp_sys_pct = 100 * (cp_us1[1] - cp_us0[1]) / CLK_TCK / elapsed
        result.etcd_cpu_pct = 100 * (c1["etcd"] - c0["etcd"]) / CLK_TCK / elapsed
        result.gen_cpu_pct = 100 * (g1 - g0) / CLK_TCK / elapsed
        result.machine_busy_pct = 100 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1])
        # Everything else on the machine (other users' processes, the kernel), in % of one core.
        result.others_cpu_pct = max(
            0.0,
            result.machine_busy_pct * (os.cpu_count() or 1)
            - result.cp_cpu_pct
            - result.etcd_cpu_pct
            - result.gen_cpu_pct,
        )
        result.cp_rss_mib = rss_mib(cp.pid)
        if profiler is not None:
            with contextlib.suppress(Exception):
                profiler.proc.wait(15)  # type: ignore[union-attr]
            profiler.stop(timeout_s=5)

        # End of the steady phase: every node must still be registered.
        try:
            listed = list_node_ids(address)
            expected = {node_id(i) for i in range(n)}
            result.listed = len(listed & expected)
            result.missing = len(expected - listed)
        except grpc.RpcError as e:
            result.failure = f"ListNodes failed: {e.code().name} {e.details()}"

        timing[T_STOP] = time.monotonic()
        results: list[dict[str, Any]] = []
        deadline = time.monotonic() + args.hb_timeout_s + 30
        while len(results) < k:
            try:
                msg = events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError("generators did not report their results") from None
            if msg[0] == "error":
                raise RuntimeError(f"generator {msg[1]} failed: {msg[2]}")
            if msg[0] == "result":
                results.append(msg[2])
        _merge(result, results)
        if not cp.alive():
            result.failure = result.failure or "control plane exited during the run"
    except Exception as e:
        result.failure = f"{type(e).__name__}: {e}"
    finally:
        timing[T_STOP] = time.monotonic()
        for p in workers:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        if cp is not None:
            if result.failure:
                print(f"  control plane log tail:\n{cp.log_tail(20)}", file=sys.stderr)
            cp.stop(timeout_s=10)
        etcd.stop()
        events.close()
    return result


def _merge(result: LevelResult, results: list[dict[str, Any]]) -> None:
    """Sums the generators' WorkerResult dicts into ``result``."""
    steady = [r["phases"]["steady"] for r in results]
    result.sent = sum(p["sent"] for p in steady)
    result.ok = sum(p["ok"] for p in steady)
    codes: Counter[str] = Counter()
    for p in steady:
        codes.update(p["codes"])
    result.not_found = codes.pop("NOT_FOUND", 0)
    result.other_errors = dict(codes)
    every: Counter[str] = Counter()
    for r in results:
        for name, p in r["phases"].items():
            every.update(p["codes"])
            if p["codes"]:
                phase = result.errors_by_phase.setdefault(name, {})
                for code, c in p["codes"].items():
                    phase[code] = phase.get(code, 0) + c
    result.not_found_any = every.pop("NOT_FOUND", 0)
    result.errors_any = dict(every)
    lat = sorted(x for p in steady for x in p["latencies_ms"])
    result.p50_ms = percentile(lat, 50)
    result.p99_ms = percentile(lat, 99)
    result.max_ms = lat[-1] if lat else float("nan")
    # Gaps that ended in the steady phase or later (or were still open at the stop).
    result.max_gap_s = max(
        [p["max_gap_s"] for r in results for name, p in r["phases"].items() if name != "ramp"],
        default=float("nan"),
    )
    result.late = sum(p["late"] for p in steady)
    result.max_late_s = max((p["max_late_s"] for p in steady), default=0.0)
    result.stale_at_stop = sum(r["not_heartbeating_at_stop"] for r in results)
    for r in results:
        for code, text in r["error_samples"].items():
            result.error_samples.setdefault(code, text)
    result.re_registrations = sum(r["re_registrations"] for r in results)


# ---------------------------------------------------------------- report

HEADER = (
    "| nodes | duration s | heartbeats sent | ok | NOT_FOUND (false exp.) | other errors "
    "| p50 ms | p99 ms | max gap s | control-plane CPU % | etcd CPU % | generators CPU % "
    "| machine busy % | other load % | sustained |"
)


def row(r: LevelResult) -> str:
    other = ", ".join(f"{k} {v}" for k, v in sorted(r.other_errors.items())) or "0"
    fe = f"{r.not_found}"
    if r.not_found_any != r.not_found or r.missing > 0:
        fe += f" (run: {r.not_found_any}, unlisted: {max(r.missing, 0)})"
    sustained = "yes" if r.sustained else "NO"
    if r.failure:
        sustained += f" ({r.failure.splitlines()[0][:80]})"
    return (
        f"| {r.nodes} | {r.duration_s:g} | {r.sent} | {r.ok} | {fe} | {other} "
        f"| {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.max_gap_s:.2f} | {r.cp_cpu_pct:.0f} "
        f"| {r.etcd_cpu_pct:.0f} | {r.gen_cpu_pct:.0f} | {r.machine_busy_pct:.0f} "
        f"| {r.others_cpu_pct:.0f} | {sustained} |"
    )


def details(r: LevelResult) -> str:
    parts = [
        f"registered {r.registered}/{r.nodes} in {r.register_s:.1f} s",
        f"register retries {r.register_errors or 0}",
        f"listed at end {r.listed}",
        f"late heartbeats (> {LATE_S * 1000:.0f} ms after due) {r.late}, max {r.max_late_s * 1000:.0f} ms",
        f"latency max {r.max_ms:.1f} ms",
        f"control-plane CPU {r.cp_cpu_pct:.0f}% of which kernel {r.cp_sys_pct:.0f}%",
        f"control-plane RSS {r.cp_rss_mib:.0f} MiB",
        f"re-registrations {r.re_registrations}",
        f"nodes without a success for > TTL at stop {r.stale_at_stop}",
    ]
    if r.errors_by_phase:
        parts.append(f"failed heartbeats by phase {r.errors_by_phase}")
    for code, text in sorted(r.error_samples.items()):
        parts.append(f"e.g. {code}: {text[:160]}")
    return f"  {r.nodes}: " + "; ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", default="2000", help="comma-separated node counts, run in order")
    p.add_argument("--duration-s", type=float, default=60.0, help="steady phase per level")
    p.add_argument("--warmup-s", type=float, default=5.0, help="after registration, before measuring")
    p.add_argument("--interval-s", type=float, default=1.0, help="heartbeat interval per node")
    p.add_argument("--lease-ttl-s", type=int, default=3)
    p.add_argument(
        "--hb-timeout-s",
        type=float,
        default=1.0,
        help="heartbeat deadline (the agent uses the interval)",
    )
    p.add_argument("--workers", type=int, default=2, help="load-generator processes")
    p.add_argument(
        "--mode",
        choices=("stream", "unary"),
        default="stream",
        help="HeartbeatStream, one stream per node as bluemarble-node does (default), or unary Heartbeat calls",
    )
    p.add_argument("--channels", type=int, default=4, help="gRPC channels (connections) per generator")
    p.add_argument("--register-concurrency", type=int, default=32, help="registrations in flight per generator")
    p.add_argument("--register-timeout-s", type=float, default=180.0)
    p.add_argument("--keep-going", action="store_true", help="run the next levels after a failed one")
    p.add_argument("--keep-dir", action="store_true", help="keep etcd data and logs")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument(
        "--profile",
        type=Path,
        help="profile the control plane over each steady phase with py-spy (pip install py-spy) "
        "into this directory (collapsed stacks, controlplane-<nodes>.txt); adds a little load",
    )
    args = p.parse_args()
    levels = [int(x) for x in args.nodes.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        p.error("--nodes needs positive node counts")

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Also when started in the background by a shell, which would leave SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="bench-heartbeats-"))
    print(
        f"heartbeat benchmark: levels {levels}, steady {args.duration_s:g} s, interval {args.interval_s:g} s, "
        f"lease TTL {args.lease_ttl_s} s, {args.workers} generator processes x {args.channels} channels, "
        f"{os.cpu_count()} CPUs (generators, control plane and etcd share them); fresh etcd + control "
        f"plane per level; logs in {workdir}",
        flush=True,
    )
    results: list[LevelResult] = []
    try:
        for n in levels:
            print(f"level {n} nodes ...", flush=True)
            r = run_level(n, args, workdir)
            results.append(r)
            print(
                f"  -> {'sustained' if r.sustained else 'NOT sustained'}{': ' + r.failure if r.failure else ''}",
                flush=True,
            )
            if not r.sustained and not args.keep_going and n != levels[-1]:
                print("  stopping here (--keep-going runs the remaining levels)", flush=True)
                break
    except KeyboardInterrupt:
        print("interrupted; everything was stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep_dir:
            print(f"logs and data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for r in results:
        print(row(r))
    print()
    for r in results:
        print(details(r))
    sustained = [r.nodes for r in results if r.sustained]
    if sustained:
        best = max((r for r in results if r.sustained), key=lambda r: r.nodes)
        print(
            f"\nlargest sustained: {best.nodes} nodes (control plane {best.cp_cpu_pct:.0f}% of one core, "
            f"etcd {best.etcd_cpu_pct:.0f}%, generators {best.gen_cpu_pct:.0f}%)"
        )
    else:
        print("\nno level was sustained")
    if args.json:
        args.json.write_text(
            json.dumps([{**asdict(r), "sustained": r.sustained} for r in results], indent=2, default=str)
        )
    largest = max(levels)
    ok = any(r.nodes == largest and r.sustained for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
