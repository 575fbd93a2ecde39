#!/usr/bin/env python3
"""Data-plane write benchmark: STRONG grants/s and EVENTUAL player-data writes/s, each
as a ratio to the raw gRPC unary echo rate measured side by side in the same run.

    .venv/bin/python scripts/bench_writes.py                 # R=2, R=3, R=2 synchronous=FULL
    .venv/bin/python scripts/bench_writes.py --configs r2 --duration-s 5 --report-only

Absolute rates on a shared 2-core machine move with whatever else runs; the ratio to an
echo server measured by the same client, at the same concurrency, minutes apart, is what
says how much of the machine's gRPC budget the data plane spends per write.

What runs (every one a real process on 127.0.0.1, stopped on exit, errors, Ctrl-C and
SIGTERM included):

* an echo server: this script as its own process (``--echo-server PORT``), a grpc.aio
  server on the nodes' event loop (uvloop) with one generic unary handler that returns
  the request bytes;
* per configuration, one after the other: a private etcd (temp dir), one control plane
  (``python -m controlplane.server.main --replication-factor R --shards 8 --lease-ttl-s 10``)
  and 3 shard nodes in zones z1, z2, z3 (``python -m shardnode.main ...``, plus
  ``--synchronous full`` for the FULL configuration).

What is measured, per configuration, at ``--concurrency`` calls in flight (closed loop:
each of the workers sends its next call when the last one answered), in ``--rounds``
rounds of 1, 2, 3 back to back (so that load from other jobs weighs on all three alike),
each a ``--warmup-s`` warm-up then a window of ``--duration-s`` / ``--rounds``:

1. echo: unary calls over one grpc.aio channel built like the client's node channels
   (:func:`bluemarble.runtime.channels.insecure_channel`), the request a serialized
   ``GrantItemsRequest`` of a benchmark grant (same size), the answer parsed as one;
   the cluster is up and idle meanwhile;
2. STRONG: :meth:`RoutingClient.grant_items` (what game servers call), one item to a
   distinct new player per call, so every answer is a one-item inventory;
3. EVENTUAL: :meth:`RoutingClient.set_player_data` on system ``guild`` (EVENTUAL in the
   default cluster config), cycling over the players granted in 2.

Rate = calls answered OK in the measured windows / their total length; p50/p99 =
latency of the calls that started and ended in one (client side). During 2 and 3, every
node's ``GetShardStatus`` is sampled every ``--lag-sample-ms`` (100 ms): replica lag
p99/max are over the replicas' (node, shard) statuses, primary-side lag over the
primaries' (entries their slowest replica has not acked, and the oldest one's age). CPU
per process over the windows comes from /proc/<pid>/stat (% of one core).

Targets (this 2-core machine): STRONG >= 25 % and EVENTUAL >= 40 % of the echo rate, for
the R=2 and R=3 configurations (FULL reports its cost next to R=2). Exit status 1 if one
is missed (``--report-only``: 0) or the run failed, 130 on Ctrl-C.

``--profile-dir DIR`` samples the busiest primary node and this client with py-spy
(``--nonblocking``, raw collapsed stacks in DIR) during the STRONG and EVENTUAL windows
and prints where their CPU went (figures measured while profiling are marked).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bluemarble.client.routing import GrpcNodeTransport, RoutingClient
from bluemarble.core.errors import BlueMarbleError
from bluemarble.runtime import event_loop, logs
from bluemarble.runtime.channels import insecure_channel
from bluemarble.runtime.grpc_server import SERVER_OPTIONS
from bluemarble.v1 import common_pb2, controlplane_pb2_grpc, shardnode_pb2, shardnode_pb2_grpc
from scripts.bench_failover import Bench, Cluster
from scripts.localcluster import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(__file__).resolve())
ECHO_METHOD = "/bench.Echo/Echo"
NODES = 3
SHARDS = 8
STRONG_TARGET = 0.25
EVENTUAL_TARGET = 0.40


@dataclass(frozen=True)
class Config:
    """One cluster to measure: replication factor and the nodes' SQLite durability."""

    name: str
    replication_factor: int
    synchronous: str  # "normal" or "full"


CONFIGS = {
    "r2": Config("R=2", 2, "normal"),
    "r3": Config("R=3", 3, "normal"),
    "r2full": Config("R=2 FULL", 2, "full"),
    "r1": Config("R=1", 1, "normal"),  # no replica: the cost of the write path alone
}


@dataclass
class Load:
    """One measured window of one kind of call."""

    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    window_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.ok / self.window_s if self.window_s else 0.0

    def pct_ms(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


@dataclass
class Phase:
    """A load plus what was sampled around it."""

    load: Load
    lag_entries: list[int] = field(default_factory=list)  # replicas' GetShardStatus
    lag_ms: list[int] = field(default_factory=list)
    acked_entries: list[int] = field(default_factory=list)  # primaries' GetShardStatus (from acks)
    acked_ms: list[int] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> % of one core
    profiled: bool = False


@dataclass
class Result:
    config: Config
    echo: Phase
    strong: Phase
    eventual: Phase
    primaries: dict[str, int]

    def ratio(self, phase: Phase) -> float:
        return phase.load.rate / self.echo.load.rate if self.echo.load.rate else 0.0


def percentile(values: list[float] | list[int], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))])


# ---- the echo server (its own process) ----------------------------------------------


async def _serve_echo(port: int) -> None:
    async def echo(request: bytes, context: Any) -> bytes:
        return request

    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


# ---- process CPU ---------------------------------------------------------------------


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` in clock ticks, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


class CpuMeter:
    """CPU used by named processes between :meth:`start` and :meth:`stop` (% of one core)."""

    def __init__(self, pids: dict[str, list[int]]):
        self.pids = pids
        self._start: dict[int, int] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._start = {pid: t for pids in self.pids.values() for pid in pids if (t := cpu_ticks(pid)) is not None}

    def stop(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._t0
        hz = os.sysconf("SC_CLK_TCK")
        found: dict[str, float] = {}
        for name, pids in self.pids.items():
            used = 0
            for pid in pids:
                now = cpu_ticks(pid)
                if now is not None and pid in self._start:
                    used += now - self._start[pid]
            found[name] = 100.0 * used / hz / elapsed if elapsed > 0 else 0.0
        return found


# ---- load ----------------------------------------------------------------------------


async def run_load(
    op: Callable[[int], Awaitable[object]],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    on_window: Callable[[bool], None] | None = None,
) -> Load:
    """``concurrency`` workers call ``op(i)`` (i = 0, 1, ...) back to back for
    ``warmup_s`` + ``duration_s``; counts what answered inside the measured window.
    ``on_window(True)`` is called when the window opens, ``on_window(False)`` when it
    closes."""
    load = Load(window_s=duration_s)
    counter = itertools.count()
    errors: collections.Counter[str] = collections.Counter()
    t_open = time.monotonic() + warmup_s
    t_close = t_open + duration_s

    async def worker() -> None:
        while True:
            started = time.monotonic()
            if started >= t_close:
                return
            try:
                await op(next(counter))
            except (BlueMarbleError, grpc.aio.AioRpcError) as e:
                ended = time.monotonic()
                if t_open <= ended <= t_close:
                    load.failed += 1
                    errors[f"{type(e).__name__}: {str(e)[:80]}"] += 1
                continue
            ended = time.monotonic()
            if t_open <= ended <= t_close:
                load.ok += 1
                if started >= t_open:
                    load.latencies_ms.append((ended - started) * 1000)

    async def window() -> None:
        await asyncio.sleep(max(0.0, t_open - time.monotonic()))
        if on_window:
            on_window(True)
        await asyncio.sleep(max(0.0, t_close - time.monotonic()))
        if on_window:
            on_window(False)

    await asyncio.gather(window(), *(worker() for _ in range(concurrency)))
    load.errors = dict(errors.most_common(5))
    return load


class LagSampler:
    """Every ``period_s``, every node's GetShardStatus; keeps the replicas' lag while on."""

    def __init__(self, addresses: list[str], period_s: float):
        self.channels = [insecure_channel(a) for a in addresses]
        self.stubs = [shardnode_pb2_grpc.ShardNodeStub(c) for c in self.channels]  # type: ignore[no-untyped-call]
        self.period_s = period_s
        self.on = False
        self.entries: list[int] = []  # replicas' own lag_entries
        self.ms: list[int] = []  # replicas' own lag_ms
        self.acked_entries: list[int] = []  # primaries' view: the worst replica's unacked entries
        self.acked_ms: list[int] = []
        self.failed = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _one(self, stub: shardnode_pb2_grpc.ShardNodeStub) -> None:
        try:
            r = await stub.GetShardStatus(shardnode_pb2.GetShardStatusRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            self.failed += self.on
            return
        if self.on:
            for s in r.shards:
                if s.on_disk_only:
                    continue
                if s.role == common_pb2.SHARD_ROLE_REPLICA:
                    self.entries.append(s.lag_entries)
                    self.ms.append(s.lag_ms)
                elif s.role == common_pb2.SHARD_ROLE_PRIMARY:
                    self.acked_entries.append(s.lag_entries)
                    self.acked_ms.append(s.lag_ms)

    async def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            await asyncio.gather(*(self._one(s) for s in self.stubs))
            next_at += self.period_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def take(self, phase: Phase) -> None:
        """Moves what was sampled into ``phase``."""
        phase.lag_entries, phase.lag_ms, phase.acked_entries, phase.acked_ms = (
            self.entries,
            self.ms,
            self.acked_entries,
            self.acked_ms,
        )
        self.entries, self.ms, self.acked_entries, self.acked_ms = [], [], [], []

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for c in self.channels:
            await c.close(None)


class Profiler:
    """py-spy on some processes for one window (raw collapsed stacks)."""

    def __init__(self, directory: Path | None, native: bool = False):
        self.directory = directory
        self.native = native  # also sample C frames (grpc core, sqlite, uvloop)
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.running: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def start(self, label: str, pids: dict[str, int], duration_s: float) -> None:
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            out = self.directory / f"{label}-{name}.txt"
            proc = subprocess.Popen(
                [self.exe, "record", "--pid", str(pid), "--duration", str(max(1, int(duration_s))),
                 "--rate", "200", "--format", "raw", "--output", str(out),
                 *(["--native"] if self.native else ["--nonblocking"])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            self.running.append((f"{label} {name}", proc, out))

    def finish(self) -> list[tuple[str, Path]]:
        done = []
        for what, proc, out in self.running:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            done.append((what, out))
        self.running = []
        return done

    def kill_all(self) -> None:
        for _, proc, _ in self.running:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(5)
        self.running = []


def summarize_profile(path: Path, top: int = 14) -> str:
    """Where a process's sampled CPU went: the heaviest functions by self samples and by
    inclusive samples (a raw py-spy file: one ``frame;frame;... count`` per line)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return f"  (no profile at {path})"
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short_frame(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if frames:
            own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        return "  (empty profile)"
    out = [f"  {total} samples; self:"]
    out += [f"    {100 * n / total:5.1f} %  {f}" for f, n in own.most_common(top)]
    out.append("  inclusive (project code and grpc/sqlite entry points):")
    keep = [
        (f, n)
        for f, n in incl.most_common()
        if any(k in f for k in ("shardnode/", "bluemarble/", "scripts/", "grpc/", "sqlite3", "protobuf"))
    ]
    out += [f"    {100 * n / total:5.1f} %  {f}" for f, n in keep[:top]]
    return "\n".join(out)


def _short_frame(frame: str) -> str:
    """``fn (path/to/file.py:123)`` -> ``fn (file-ish tail:123)``; drops the thread frame."""
    if frame.startswith("process ") or frame.startswith("thread "):
        return ""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


# ---- one configuration --------------------------------------------------------------


def grant_request_bytes() -> bytes:
    """A serialized GrantItemsRequest the size of the benchmark's grants."""
    return shardnode_pb2.GrantItemsRequest(
        request_id="0f3a5e7c-1b2d-4c6e-8f90-a1b2c3d4e5f6",
        player_id="bench-1-0000123",
        item_ids=["item-bench-1-0000123"],
        gold=0,
        epoch=0,
    ).SerializeToString()


async def echo_load(address: str, args: argparse.Namespace, window_s: float) -> Load:
    channel = insecure_channel(address)
    try:
        call = channel.unary_unary(
            ECHO_METHOD,
            request_serializer=shardnode_pb2.GrantItemsRequest.SerializeToString,
            response_deserializer=shardnode_pb2.GrantItemsRequest.FromString,
        )
        template = shardnode_pb2.GrantItemsRequest.FromString(grant_request_bytes())

        async def op(i: int) -> object:
            return await call(template, timeout=5.0)

        return await run_load(op, args.concurrency, args.warmup_s, window_s)
    finally:
        await channel.close(None)


async def wait_serving(bench: Bench, addresses: dict[str, str], timeout_s: float) -> None:
    """Until every shard's primary and replicas, as ListAssignments names them, report
    ``serving`` in their own GetShardStatus."""
    channels = {n: insecure_channel(a) for n, a in addresses.items()}
    stubs = {n: shardnode_pb2_grpc.ShardNodeStub(c) for n, c in channels.items()}  # type: ignore[no-untyped-call]
    deadline = time.monotonic() + timeout_s
    why = "no answer yet"
    try:
        while time.monotonic() < deadline:
            r = await bench.list_assignments()
            statuses: dict[tuple[str, str], Any] = {}
            for node, stub in stubs.items():
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await stub.GetShardStatus(shardnode_pb2.GetShardStatusRequest(), timeout=1.0)
                    statuses.update({(node, s.shard_id): s for s in answer.shards})
            if r is not None:
                missing = [
                    f"{a.shard_id}@{n}"
                    for a in r.assignments
                    for n in [a.primary, *a.replicas]
                    if not ((s := statuses.get((n, a.shard_id))) is not None and s.serving)
                ]
                if not missing:
                    return
                why = f"not serving yet: {missing[:6]}"
            await asyncio.sleep(0.1)
        raise TimeoutError(f"shards not serving within {timeout_s:g} s: {why}")
    finally:
        for c in channels.values():
            await c.close(None)


async def measure_config(
    config: Config,
    index: int,
    echo_address: str,
    echo_pid: int,
    workdir: Path,
    args: argparse.Namespace,
    profiler: Profiler,
    started: list[Cluster],
) -> Result:
    cargs = argparse.Namespace(
        lease_ttl_s=args.lease_ttl_s,
        shards=SHARDS,
        replication_factor=config.replication_factor,
        settle_s=1.0,
    )
    node_args = ("--synchronous", "full") if config.synchronous == "full" else ()
    cluster = Cluster(workdir, cargs, node_args=node_args)
    started.append(cluster)
    cluster.start_etcd_and_control_plane()
    bench = Bench(cluster, cargs)
    bench.channel = insecure_channel(cluster.cp_address)
    bench.stub = controlplane_pb2_grpc.ControlPlaneStub(bench.channel)  # type: ignore[no-untyped-call]
    node_ids = [f"n{i}" for i in range(1, NODES + 1)]
    try:
        deadline = time.monotonic() + 30
        while await bench.list_nodes() is None:
            bench.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("the control plane did not serve within 30 s")
            await asyncio.sleep(0.1)
        for node_id in node_ids:
            cluster.start_node(node_id)
        await bench.wait_settled(set(node_ids), 90)
        await wait_serving(bench, cluster.addresses, 60)
        r = await bench.list_assignments()
        assert r is not None
        primaries = dict(collections.Counter(a.primary for a in r.assignments))
        say(
            f"\n[{config.name}] cluster up: {NODES} nodes (z1..z3), {SHARDS} shards, R={config.replication_factor}, "
            f"synchronous={config.synchronous.upper()}, primaries per node {dict(sorted(primaries.items()))}"
        )
        pids = {
            "client": [os.getpid()],
            "echo server": [echo_pid],
            "nodes": [p.pid for p in cluster.nodes.values()],
            "control plane": [cluster.control_plane.pid] if cluster.control_plane else [],
            "etcd": [cluster.etcd.process.pid] if cluster.etcd and cluster.etcd.process else [],
        }
        busiest = max(primaries, key=lambda n: primaries[n])
        transport = GrpcNodeTransport(streams=False if args.unary else None)
        async with RoutingClient(cluster.cp_address, transport=transport) as client:
            await client.wait_ready(30)
            # Every primary has taken a write before anything is timed.
            for i in range(64):
                await client.grant_items(f"warm-{index}-{i:04d}", [f"warm-item-{index}-{i:04d}"], deadline_s=20)

            sampler = LagSampler(list(cluster.addresses.values()), args.lag_sample_ms / 1000)
            sampler.start()
            players: list[str] = []
            value = b"x" * 16
            window_s = args.duration_s / args.rounds
            label = config.name.replace(" ", "_").replace("=", "")
            prof_targets = {"client": os.getpid(), f"node-{busiest}": cluster.nodes[busiest].pid}
            echoes: list[Phase] = []
            strongs: list[Phase] = []
            eventuals: list[Phase] = []
            try:
                # Rounds of echo, STRONG, EVENTUAL back to back: whatever else loads the
                # machine weighs on the three alike.
                for rnd in range(1, args.rounds + 1):

                    async def grant(i: int, rnd: int = rnd) -> object:
                        player = f"bench-{index}-{rnd}-{i:07d}"
                        result = await client.grant_items(
                            player, [f"item-{index}-{rnd}-{i:07d}"], deadline_s=args.call_deadline_s
                        )
                        if len(players) < args.players:
                            players.append(player)
                        return result

                    async def set_data(i: int) -> object:
                        return await client.set_player_data(
                            players[i % len(players)], "guild", "name", value, deadline_s=args.call_deadline_s
                        )

                    prof = rnd == 1
                    echo = await phase(
                        lambda: echo_load(echo_address, args, window_s), pids, args, window_s, profiler, {}, None
                    )
                    strong = await phase(
                        lambda: run_load(
                            grant, args.concurrency, args.warmup_s, window_s, on_window=sampler_switch(sampler)
                        ),
                        pids, args, window_s, profiler, prof_targets, f"{label}-strong" if prof else None,
                    )  # fmt: skip
                    sampler.take(strong)
                    if not players:
                        raise RuntimeError("no grant succeeded; nothing to write player data for")
                    eventual = await phase(
                        lambda: run_load(
                            set_data, args.concurrency, args.warmup_s, window_s, on_window=sampler_switch(sampler)
                        ),
                        pids, args, window_s, profiler, prof_targets, f"{label}-eventual" if prof else None,
                    )  # fmt: skip
                    sampler.take(eventual)
                    say(
                        f"  round {rnd}: echo {echo.load.rate:,.0f}/s, STRONG {strong.load.rate:,.0f}/s "
                        f"({strong.load.rate / max(echo.load.rate, 1e-9):.2f}), EVENTUAL {eventual.load.rate:,.0f}/s "
                        f"({eventual.load.rate / max(echo.load.rate, 1e-9):.2f}); failed "
                        f"{echo.load.failed}/{strong.load.failed}/{eventual.load.failed} "
                        f"{strong.load.errors or ''}{eventual.load.errors or ''}"
                    )
                    echoes.append(echo)
                    strongs.append(strong)
                    eventuals.append(eventual)
            finally:
                await sampler.close()
        return Result(config, merge(echoes), merge(strongs), merge(eventuals), primaries)
    finally:
        await bench.channel.close(None)
        cluster.stop_all()


def sampler_switch(sampler: LagSampler) -> Callable[[bool], None]:
    def switch(on: bool) -> None:
        sampler.on = on

    return switch


def merge(phases: list[Phase]) -> Phase:
    """One phase from several rounds of it: counts and samples added up, CPU weighted by
    window length."""
    load = Load()
    merged = Phase(load)
    errors: collections.Counter[str] = collections.Counter()
    for ph in phases:
        load.ok += ph.load.ok
        load.failed += ph.load.failed
        load.window_s += ph.load.window_s
        load.latencies_ms += ph.load.latencies_ms
        errors.update(ph.load.errors)
        merged.lag_entries += ph.lag_entries
        merged.lag_ms += ph.lag_ms
        merged.acked_entries += ph.acked_entries
        merged.acked_ms += ph.acked_ms
        merged.profiled |= ph.profiled
        for name, pct in ph.cpu.items():
            merged.cpu[name] = merged.cpu.get(name, 0.0) + pct * ph.load.window_s
    load.errors = dict(errors.most_common(5))
    merged.cpu = {k: v / load.window_s for k, v in merged.cpu.items()} if load.window_s else {}
    return merged


async def phase(
    work: Callable[[], Awaitable[Load]],
    pids: dict[str, list[int]],
    args: argparse.Namespace,
    window_s: float,
    profiler: Profiler,
    prof_targets: dict[str, int],
    prof_label: str | None,
) -> Phase:
    """Runs one load with CPU metering (and py-spy, when asked) over its measured window
    (approximately: metering starts after the warm-up on a timer)."""
    meter = CpuMeter(pids)
    profiled = profiler.enabled and prof_label is not None and bool(prof_targets)

    async def open_window() -> None:
        await asyncio.sleep(args.warmup_s)
        meter.start()
        if profiled:
            assert prof_label is not None
            profiler.start(prof_label, prof_targets, window_s)

    opener = asyncio.create_task(open_window())
    load = await work()
    await opener
    cpu = meter.stop()
    if profiled:
        for what, out in await asyncio.to_thread(profiler.finish):
            say(f"  profile {what} ({out}):\n{summarize_profile(out)}")
    return Phase(load, cpu=cpu, profiled=profiled)


# ---- report -------------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def report(results: list[Result], args: argparse.Namespace) -> bool:
    """Prints the tables; True when every target is met."""
    ok = True
    say(
        "\n| config | calls | rate (/s) | ratio to echo | target | p50 ms | p99 ms | failed "
        "| replica lag p99 (entries / ms) | replica lag max | primary-side lag p99 (unacked entries / ms) "
        "| primary-side max | lag samples |"
    )
    say("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        say(
            f"| {r.config.name} | echo (raw gRPC unary) | {r.echo.load.rate:,.0f} | 1.00 | | "
            f"{r.echo.load.pct_ms(0.5):.2f} | {r.echo.load.pct_ms(0.99):.2f} | {r.echo.load.failed} | | | | | |"
        )
        for label, ph, target in (("STRONG GrantItems", r.strong, STRONG_TARGET),
                                  ("EVENTUAL SetPlayerData guild", r.eventual, EVENTUAL_TARGET)):  # fmt: skip
            ratio = r.ratio(ph)
            applies = r.config.synchronous == "normal"
            met = ratio >= target
            if applies and not met:
                ok = False
            mark = ("met" if met else "**MISSED**") if applies else "(cost)"
            say(
                f"| {r.config.name} | {label} | {ph.load.rate:,.0f} | **{ratio:.2f}** | >= {target:.2f} {mark} | "
                f"{ph.load.pct_ms(0.5):.2f} | {ph.load.pct_ms(0.99):.2f} | {ph.load.failed} "
                f"| {lag_text(ph.lag_entries, ph.lag_ms)} | {lag_text(ph.lag_entries, ph.lag_ms, 1.0)} "
                f"| {lag_text(ph.acked_entries, ph.acked_ms)} | {lag_text(ph.acked_entries, ph.acked_ms, 1.0)} "
                f"| {len(ph.lag_entries)} / {len(ph.acked_entries)} |" + (" (profiled)" if ph.profiled else "")
            )
    say(f"\nCPU over each measured window (% of one core; the machine has {os.cpu_count()} cores):\n")
    names = ["client", "echo server", "nodes", "control plane", "etcd"]
    say("| config | calls | " + " | ".join(names) + " | CPU ms per call: client | servers | total |")
    say("|---|---|" + "---|" * (len(names) + 3))
    for r in results:
        for label, ph in (("echo", r.echo), ("STRONG", r.strong), ("EVENTUAL", r.eventual)):
            client_ms, server_ms = cpu_ms_per_call(ph)
            say(
                f"| {r.config.name} | {label} | "
                + " | ".join(f"{ph.cpu.get(n, 0):.0f}" for n in names)
                + f" | {client_ms:.2f} | {server_ms:.2f} | {client_ms + server_ms:.2f} |"
            )
    base = next((r for r in results if r.config.replication_factor == 2 and r.config.synchronous == "normal"), None)
    full = next((r for r in results if r.config.synchronous == "full"), None)
    if base and full:
        say(
            "\nCost of synchronous=FULL (R=2), ratio to echo FULL / NORMAL: "
            f"STRONG {full.ratio(full.strong):.2f} / {base.ratio(base.strong):.2f} "
            f"(x{full.ratio(full.strong) / max(base.ratio(base.strong), 1e-9):.2f}), "
            f"EVENTUAL {full.ratio(full.eventual):.2f} / {base.ratio(base.eventual):.2f} "
            f"(x{full.ratio(full.eventual) / max(base.ratio(base.eventual), 1e-9):.2f}); p50 STRONG "
            f"{full.strong.load.pct_ms(0.5):.2f} vs {base.strong.load.pct_ms(0.5):.2f} ms, EVENTUAL "
            f"{full.eventual.load.pct_ms(0.5):.2f} vs {base.eventual.load.pct_ms(0.5):.2f} ms"
        )
    return ok


def cpu_ms_per_call(ph: Phase) -> tuple[float, float]:
    """CPU milliseconds per answered call: the client's, and the servers' (echo server,
    or nodes + control plane + etcd)."""
    if not ph.load.rate:
        return 0.0, 0.0
    servers = sum(v for k, v in ph.cpu.items() if k != "client")
    return 10 * ph.cpu.get("client", 0.0) / ph.load.rate, 10 * servers / ph.load.rate


def lag_text(entries: list[int], ms: list[int], q: float = 0.99) -> str:
    return f"{percentile(entries, q):.0f} / {percentile(ms, q):.0f}" if entries else "-"


def to_json(results: list[Result]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        entry: dict[str, Any] = {"config": asdict(r.config), "primaries": r.primaries}
        for name, ph in (("echo", r.echo), ("strong", r.strong), ("eventual", r.eventual)):
            entry[name] = {
                "rate_per_s": ph.load.rate, "ratio_to_echo": r.ratio(ph), "ok": ph.load.ok,
                "failed": ph.load.failed, "errors": ph.load.errors, "p50_ms": ph.load.pct_ms(0.5),
                "p99_ms": ph.load.pct_ms(0.99), "lag_entries_p99": percentile(ph.lag_entries, 0.99),
                "lag_ms_p99": percentile(ph.lag_ms, 0.99), "lag_samples": len(ph.lag_entries),
                "primary_lag_entries_p99": percentile(ph.acked_entries, 0.99),
                "primary_lag_ms_p99": percentile(ph.acked_ms, 0.99),
                "cpu_pct": ph.cpu, "cpu_ms_per_call": cpu_ms_per_call(ph), "profiled": ph.profiled,
            }  # fmt: skip
        out.append(entry)
    return out


# ---- main ---------------------------------------------------------------------------


async def run(
    args: argparse.Namespace,
    workdir: Path,
    processes: list[ManagedProcess],
    clusters: list[Cluster],
    profiler: Profiler,
) -> list[Result]:
    port = free_port()
    echo_proc = ManagedProcess(
        "echo", [sys.executable, SCRIPT, "--echo-server", str(port)], workdir / "echo.log"
    ).start()
    processes.append(echo_proc)
    echo_address = f"127.0.0.1:{port}"
    channel = insecure_channel(echo_address)
    try:
        await asyncio.wait_for(channel.channel_ready(), 20)
    except TimeoutError as e:
        raise RuntimeError(f"the echo server did not start:\n{echo_proc.log_tail()}") from e
    finally:
        await channel.close(None)
    results = []
    for i, key in enumerate(args.configs, 1):
        results.append(
            await measure_config(CONFIGS[key], i, echo_address, echo_proc.pid, workdir / key, args, profiler, clusters)
        )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--echo-server", type=int, metavar="PORT", help="run only the echo server on PORT (internal)")
    p.add_argument("--configs", default="r2,r3,r2full", help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--duration-s", type=float, default=12.0, help="measured time per kind of call, over all rounds")
    p.add_argument("--rounds", type=int, default=3, help="rounds of echo, STRONG, EVENTUAL per configuration")
    p.add_argument("--players", type=int, default=2000, help="players the EVENTUAL writes cycle over")
    p.add_argument("--lease-ttl-s", type=int, default=10)
    p.add_argument("--lag-sample-ms", type=float, default=100.0)
    p.add_argument("--call-deadline-s", type=float, default=10.0, help="routing client deadline per call")
    p.add_argument("--report-only", action="store_true", help="exit 0 even when a target is missed")
    p.add_argument("--profile-dir", type=Path, help="py-spy the busiest primary and the client into DIR")
    p.add_argument("--profile-native", action="store_true", help="with --profile-dir: C frames too (pauses)")
    p.add_argument("--keep-dir", action="store_true", help="keep etcd data, node data and logs")
    p.add_argument("--unary", action="store_true",
                   help="the routing client makes a unary RPC per call instead of using each node's Calls stream")
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if args.echo_server is not None:
        event_loop.run(_serve_echo(args.echo_server))
        return 0
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not args.configs or any(c not in CONFIGS for c in args.configs):
        p.error(f"--configs takes names from {', '.join(CONFIGS)}")

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    logs.configure("warning")  # the routing client's info lines would bury the figures
    os.chdir(ROOT)  # `python -m shardnode.main` etc. resolve from the project root
    workdir = Path(tempfile.mkdtemp(prefix="bench-writes-"))
    say(
        f"write benchmark: configs {', '.join(CONFIGS[c].name for c in args.configs)}; concurrency "
        f"{args.concurrency}, warm-up {args.warmup_s:g} s, window {args.duration_s:g} s; {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, grpcio {grpc.__version__}; logs in {workdir}"
    )
    processes: list[ManagedProcess] = []
    clusters: list[Cluster] = []
    profiler = Profiler(args.profile_dir, args.profile_native)
    results: list[Result] = []
    failed = False
    try:
        results = event_loop.run(run(args, workdir, processes, clusters, profiler))
    except KeyboardInterrupt:
        print("interrupted; stopping every process", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError, BlueMarbleError) as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        for cluster in clusters[-1:]:
            for proc in cluster.all_processes():
                print(f"--- {proc.name} ({proc.log_path}) ---\n{proc.log_tail(15)}", file=sys.stderr)
        failed = True
        args.keep_dir = True
    finally:
        profiler.kill_all()
        for cluster in clusters:
            cluster.stop_all()
        for proc in processes:
            with contextlib.suppress(Exception):
                proc.stop(5)
        if args.keep_dir:
            say(f"logs and data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if failed or not results:
        return 1
    ok = report(results, args)
    if args.json:
        args.json.write_text(json.dumps(to_json(results), indent=2))
    say(
        f"\n{'PASS' if ok else 'FAIL'}: targets STRONG >= {STRONG_TARGET:.0%} and EVENTUAL >= "
        f"{EVENTUAL_TARGET:.0%} of the echo rate (R=2 and R=3)"
    )
    return 0 if ok or args.report_only else 1


if __name__ == "__main__":
    sys.exit(main())
