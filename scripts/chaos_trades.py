#!/usr/bin/env python3
"""Chaos run of trades: conservation of items and gold through crashes, pauses and retries.

    .venv/bin/python scripts/chaos_trades.py --seed 1                       # 2,000 trades, every fault kind
    .venv/bin/python scripts/chaos_trades.py --seed 7 --trades 300 --faults node-kill,etcd-restart --json

What runs (real processes, all on 127.0.0.1, under a private temp dir):

* a single-member etcd (:class:`scripts.localcluster.LocalEtcd`, fixed ports so a restart
  reuses them and its data dir);
* 2 control-plane replicas (cp-0, cp-1), ``--lease-ttl-s 2 --replication-factor 3``;
* 4 shard nodes n1..n4 over zones z1 z2 z3 z1.

Then:

1. Seeds ``--players`` players, each with ``--items`` unique items and ``--gold`` gold,
   through the routing client (grants idempotent by request id ``seed-<player>``).
2. Runs ``--trades`` trades from ``--concurrency`` workers through
   :class:`bluemarble.client.trades.TradeClient` (two of them, one preferring each
   replica). A trade's terms are drawn from the seeded RNG and what the answers so far
   say each player holds: mostly cross-shard, some same-shard, some deliberately invalid
   by balance (a side gives more gold than it has: must be ABORTED). A player is in one
   trade at a time, so every answer can be applied to the expected inventories in order.
   Each trade id is retried by the client with the same terms until it gets an answer
   (``--trade-deadline-s``); a small share is sent twice at once, through both replicas.
   A trade that got no answer keeps its players out of later trades and is settled at the
   end (asked again with the same id and terms, after healing).
3. Meanwhile a schedule drawn from ``--seed`` injects, one at a time, at fixed fractions
   of the run (``--fault-rounds`` rounds of every kind in ``--faults``, shuffled):

   * ``node-kill``: SIGKILL a node, restart it (same id, address, data dir);
   * ``leader-kill``: SIGKILL the control-plane leader (GetClusterStatus.leader), restart it;
   * ``primary-pause``: SIGSTOP a node that leads shards for TTL + 1..2 s, then SIGCONT;
   * ``etcd-restart``: stop etcd, start it again on the same data dir and ports;
   * ``coordinator-kill``: a coordinator killed between the prepares and the decision:
     every node's ``hold-replication`` failpoint is set (a STRONG write, so a Prepare,
     is then escrowed on the primary but not acknowledged), trades in flight through one
     replica are given a moment to send their prepares, that replica is SIGKILLed, the
     failpoint is lifted, and the replica restarted. Its trades' escrows are settled by the
     participants' termination (ResolveTrade) or by the client's retry on the other replica.
     ``--hold-s`` (default 0.3 s) is how long replication is held before the kill; a
     longer hold right after a ``node-kill`` also leaves the restarted node a replica that
     cannot catch up meanwhile (as a hung disk would).

   After each fault the injector waits for the cluster to heal (every node registered, a
   leader, every shard with a primary and its replicas) before the next one.
4. Heals, then checks:

   * no escrow is left 10 s after healing (ListInDoubtTrades with every node answering and every shard led,
     and the escrowed fields of every inventory);
   * trades that never got an answer are asked again (same id, same terms) and applied;
   * every seeded item is in exactly one inventory (read from the primaries), no other
     item exists, and total gold is unchanged;
   * every inventory equals the seed plus every COMMITTED answer (so a COMMITTED trade was
     applied on both sides, an ABORTED one on neither) and no invalid trade committed;
   * every trade answered twice got the same answer: the duplicates above, and every
     answered trade asked again at the end (``--recheck``); inventories unchanged after.

Prints a summary (text, or one JSON object with ``--json``) and exits 1 on any violation,
2 when the cluster could not be set up. ``--keep-dir`` keeps the temp dir (logs, data).
Every process started here is stopped on exit (errors, Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bluemarble.client.routing import RoutingClient
from bluemarble.client.trades import TradeClient, TradeResult
from bluemarble.core.errors import BlueMarbleError, InvalidArgument
from bluemarble.core.trades.model import Outcome
from bluemarble.runtime import logs
from bluemarble.runtime.channels import insecure_channel
from bluemarble.v1 import controlplane_pb2 as pb
from bluemarble.v1 import controlplane_pb2_grpc, shardnode_pb2, shardnode_pb2_grpc
from scripts.localcluster import LocalEtcd, ManagedProcess, free_port
from shardnode.dataplane import HOLD_REPLICATION_FAILPOINT

CLUSTER = "chaos"
ZONES = ("z1", "z2", "z3", "z1")
FAULT_KINDS = ("node-kill", "leader-kill", "primary-pause", "etcd-restart", "coordinator-kill")
ESCROW_CLEAR_S = 10.0
"""No escrow may be left this long after healing."""


# ---- the cluster ----------------------------------------------------------------------


class Cluster:
    """etcd, the control-plane replicas and the nodes; every process is stopped by ``stop_all``."""

    def __init__(self, workdir: Path, args: argparse.Namespace):
        self.workdir = workdir
        self.args = args
        self.etcd = LocalEtcd(workdir, client_port=free_port(), peer_port=free_port())
        self.cp_addresses = {f"cp-{i}": f"127.0.0.1:{free_port()}" for i in range(args.control_planes)}
        self.cps: dict[str, ManagedProcess] = {}
        self.node_ids = [f"n{i}" for i in range(1, args.nodes + 1)]
        self.node_addresses = {n: f"127.0.0.1:{free_port()}" for n in self.node_ids}
        self.nodes: dict[str, ManagedProcess] = {}
        self.retired: list[ManagedProcess] = []
        self.starts: collections.Counter[str] = collections.Counter()
        self.stopped: set[str] = set()  # SIGSTOPped right now

    def _run(self, name: str, argv: list[str]) -> ManagedProcess:
        self.starts[name] += 1
        n = self.starts[name]
        return ManagedProcess(name, argv, self.workdir / "logs" / f"{name}{'' if n == 1 else f'.{n}'}.log").start()

    def start_cp(self, name: str) -> None:
        self.cps[name] = self._run(name, [
            sys.executable, "-m", "controlplane.server.main", "--listen", self.cp_addresses[name],
            "--etcd", self.etcd.endpoint, "--cluster", CLUSTER, "--replica-id", name,
            "--lease-ttl-s", str(self.args.lease_ttl_s), "--replication-factor", str(self.args.replication_factor),
            "--shards", str(self.args.shards), "--log-level", self.args.server_log_level,
        ])  # fmt: skip

    def start_node(self, node_id: str) -> None:
        extra = ["--trade-escrow-timeout-s", str(self.args.escrow_timeout_s)] if self.args.escrow_timeout_s else []
        self.nodes[node_id] = self._run(node_id, [
            sys.executable, "-m", "shardnode.main", "--node-id", node_id, "--listen", self.node_addresses[node_id],
            "--control-plane", ",".join(self.cp_addresses.values()), "--data-dir", str(self.workdir / node_id),
            "--zone", ZONES[(int(node_id[1:]) - 1) % len(ZONES)], "--log-level", self.args.server_log_level, *extra,
        ])  # fmt: skip

    def kill(self, proc: ManagedProcess) -> None:
        proc.kill()
        self.retired.append(proc)

    def signal(self, proc: ManagedProcess, sig: int) -> None:
        os.kill(proc.pid, sig)

    def dead_unexpectedly(self) -> list[str]:
        return [
            f"{p.name} exited with {p.proc.returncode if p.proc else '?'}:\n{p.log_tail(15)}"
            for p in [*self.cps.values(), *self.nodes.values()]
            if not p.alive()
        ]

    def set_hold(self, on: bool) -> None:
        for node_id in self.node_ids:
            path = self.workdir / node_id / HOLD_REPLICATION_FAILPOINT
            if on:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def stop_all(self) -> None:
        self.set_hold(False)
        for proc in [*self.nodes.values(), *self.cps.values(), *self.retired]:
            with contextlib.suppress(Exception):
                proc.kill()
        with contextlib.suppress(Exception):
            self.etcd.kill()


class Observer:
    """Asks the control plane how the cluster is (any replica that answers)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.channels = {name: insecure_channel(a) for name, a in cluster.cp_addresses.items()}

    def stub(self, name: str) -> controlplane_pb2_grpc.ControlPlaneStub:
        return controlplane_pb2_grpc.ControlPlaneStub(self.channels[name])  # type: ignore[no-untyped-call]

    async def status(self, name: str) -> pb.GetClusterStatusResponse | None:
        try:
            r: pb.GetClusterStatusResponse = await self.stub(name).GetClusterStatus(
                pb.GetClusterStatusRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            return None
        return r

    async def assignments(self) -> pb.ListAssignmentsResponse | None:
        for name in self.channels:
            try:
                r: pb.ListAssignmentsResponse = await self.stub(name).ListAssignments(
                    pb.ListAssignmentsRequest(), timeout=1.0)
            except grpc.aio.AioRpcError:
                continue
            return r
        return None

    async def health_problems(self) -> list[str]:
        """Why the cluster is not healed, [] when it is: every replica serves and agrees
        on a leader, every node is registered, every shard has a primary and R-1 replicas."""
        problems = []
        leaders = set()
        for name in self.channels:
            s = await self.status(name)
            if s is None:
                problems.append(f"{name} does not answer")
                continue
            leaders.add(s.leader)
            if not s.etcd_healthy:
                problems.append(f"{name}: etcd unhealthy")
            if s.node_count != len(self.cluster.node_ids):
                problems.append(f"{name}: {s.node_count} nodes registered")
            if s.shards_without_primary or s.shards_under_replicated:
                problems.append(f"{name}: {s.shards_without_primary} shards without primary, "
                                f"{s.shards_under_replicated} under-replicated")
        if len(leaders) != 1 or "" in leaders:
            problems.append(f"leaders seen: {sorted(leaders)}")
        r = await self.assignments()
        if r is None:
            problems.append("no assignments")
        else:
            rf = self.cluster.args.replication_factor
            bad = [a.shard_id for a in r.assignments if not a.primary or len(a.replicas) != rf - 1]
            if len(r.assignments) != self.cluster.args.shards or bad:
                problems.append(f"{len(r.assignments)} assignments, incomplete: {bad[:4]}")
        return problems

    async def wait_healed(self, timeout_s: float) -> list[str]:
        """Waits until :meth:`health_problems` is empty; returns the last problems on timeout."""
        deadline = time.monotonic() + timeout_s
        problems = ["not asked yet"]
        while time.monotonic() < deadline:
            problems = await self.health_problems()
            if not problems:
                return []
            await asyncio.sleep(0.1)
        return problems

    async def leader(self) -> str:
        for name in self.channels:
            s = await self.status(name)
            if s is not None and s.leader:
                return s.leader
        return ""

    async def primaries(self) -> list[str]:
        r = await self.assignments()
        return sorted({a.primary for a in r.assignments if a.primary}) if r else []

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close(None)


# ---- trades and the expected state --------------------------------------------------------


@dataclass
class TradeRecord:
    """One trade of the run: its terms and every answer it got."""

    trade_id: str
    kind: str  # cross, same, invalid
    a: str
    b: str
    a_items: tuple[str, ...]
    a_gold: int
    b_items: tuple[str, ...]
    b_gold: int
    answers: list[tuple[str, str]] = field(default_factory=list)  # (outcome, where) per answer
    outcome: Outcome | None = None
    reason: str = ""
    latency_s: float = 0.0
    attempts: int = 0
    cross_shard: bool | None = None
    error: str = ""


@dataclass
class Model:
    """What the answers say every player holds."""

    items: dict[str, set[str]]
    gold: dict[str, int]
    violations: list[str]

    def apply(self, t: TradeRecord) -> None:
        """Applies a COMMITTED trade (its terms were drawn from this model, so they hold)."""
        for giver, taker, items, gold in ((t.a, t.b, t.a_items, t.a_gold), (t.b, t.a, t.b_items, t.b_gold)):
            missing = [i for i in items if i not in self.items[giver]]
            if missing:
                self.violations.append(f"trade {t.trade_id} COMMITTED but {giver} did not hold {missing}")
            self.items[giver] -= set(items)
            self.items[taker] |= set(items)
            self.gold[giver] -= gold
            self.gold[taker] += gold
            if self.gold[giver] < 0:
                self.violations.append(f"trade {t.trade_id} COMMITTED and left {giver} with {self.gold[giver]} gold")


@dataclass
class Fault:
    kind: str
    at_fraction: float
    target: int
    downtime_s: float


def fault_schedule(seed: int, kinds: list[str], rounds: int) -> list[Fault]:
    """Deterministic from ``seed``: every kind ``rounds`` times, shuffled, at evenly spread
    fractions of the run (with jitter) between 5 % and 85 %."""
    rng = random.Random(f"faults-{seed}")
    order = [k for _ in range(rounds) for k in kinds]
    rng.shuffle(order)
    n = len(order)
    faults = []
    for i, kind in enumerate(order):
        base = 0.05 + 0.80 * i / max(1, n)
        faults.append(Fault(kind, base + rng.uniform(0, 0.4 / max(1, n)), rng.randrange(1 << 16),
                            rng.uniform(0.5, 2.0)))
    return faults


# ---- the run ---------------------------------------------------------------------------


class Chaos:
    def __init__(self, args: argparse.Namespace, cluster: Cluster):
        self.args = args
        self.cluster = cluster
        self.observer = Observer(cluster)
        self.rng = random.Random(f"trades-{args.seed}")
        self.players = [f"p{i:04d}" for i in range(args.players)]
        self.seed_items = {p: {f"{p}/item-{k}" for k in range(args.items)} for p in self.players}
        self.model = Model({p: set(v) for p, v in self.seed_items.items()}, dict.fromkeys(self.players, args.gold), [])
        self.violations = self.model.violations
        self.trades: list[TradeRecord] = []
        self.started = 0
        self.free = set(self.players)
        self.quarantined: set[str] = set()
        self.shard_of: dict[str, str] = {}
        self.faults = fault_schedule(args.seed, args.faults, args.fault_rounds)
        self.faults_done: collections.Counter[str] = collections.Counter()
        self.fault_log: list[dict[str, Any]] = []
        self.injected = 0
        self.injected_event = asyncio.Event()
        self.progress = asyncio.Event()
        """Set whenever a trade starts (the injector waits for its turn on it)."""
        self.inflight: collections.Counter[int] = collections.Counter()
        self.clients: list[TradeClient] = []
        self.duplicates = 0
        self.heal_timeouts = 0
        self.t0 = time.monotonic()

    # ---- setup ----

    async def setup(self, routing: RoutingClient) -> None:
        gate = asyncio.Semaphore(16)

        async def seed(p: str) -> None:
            async with gate:
                await routing.grant_items(p, sorted(self.seed_items[p]), gold=self.args.gold,
                                          request_id=f"seed-{p}", deadline_s=60)

        await asyncio.gather(*(seed(p) for p in self.players))
        for p in self.players:
            self.shard_of[p] = routing.router.shard_for(p)

    # ---- trade terms ----

    def _pick(self, kind: str) -> tuple[str, str] | None:
        free = sorted(self.free)
        if len(free) < 2:
            return None
        a = self.rng.choice(free)
        others = [p for p in free if p != a]
        if kind == "same":
            pool = [p for p in others if self.shard_of[p] == self.shard_of[a]]
        else:
            pool = [p for p in others if self.shard_of[p] != self.shard_of[a]]
        if not pool:
            pool = others
        return a, self.rng.choice(pool)

    def _terms(self, i: int) -> TradeRecord | None:
        r = self.rng.random()
        if r < self.args.invalid_share:
            kind = "invalid"
        elif r < self.args.invalid_share + self.args.same_share:
            kind = "same"
        else:
            kind = "cross"
        pair = self._pick("same" if kind == "same" else "cross")
        if pair is None:
            return None
        a, b = pair

        def offer(p: str) -> tuple[tuple[str, ...], int]:
            held = sorted(self.model.items[p])
            items = tuple(self.rng.sample(held, self.rng.randint(0, min(2, len(held)))))
            # max(0, ..): after a violation the expected balance may be negative; go on drawing.
            gold = self.rng.randint(0, max(0, self.model.gold[p]) // 4) if self.rng.random() < 0.6 else 0
            return items, gold

        a_items, a_gold = offer(a)
        b_items, b_gold = offer(b)
        if kind == "invalid":
            a_gold = max(0, self.model.gold[a]) + 1 + self.rng.randint(0, 100)
        if not (a_items or a_gold or b_items or b_gold):
            a_gold = 1 if self.model.gold[a] else 0
            if not a_gold:
                b_gold = 1 if self.model.gold[b] else 0
            if not (a_gold or b_gold):
                kind = "invalid"
                a_gold = 1  # a has no gold at all: refused by balance
        self.free -= {a, b}
        return TradeRecord(f"chaos-{self.args.seed}-{i:06d}", kind, a, b, a_items, a_gold, b_items, b_gold)

    # ---- workers ----

    def _gate_open(self, i: int) -> bool:
        """Trade ``i`` may start once every fault due well before it has been injected."""
        n = self.args.trades
        slack = max(2, n // 50)
        return all(k < self.injected for k, f in enumerate(self.faults) if f.at_fraction * n + slack < i)

    async def _execute(self, t: TradeRecord, client_index: int) -> TradeResult:
        self.inflight[client_index] += 1
        self.progress.set()
        try:
            return await self.clients[client_index].execute_trade(
                t.trade_id, t.a, t.b, t.a_items, t.a_gold, t.b_items, t.b_gold, deadline_s=self.args.trade_deadline_s)
        finally:
            self.inflight[client_index] -= 1

    def _record_answer(self, t: TradeRecord, result: TradeResult, where: str) -> None:
        t.answers.append((result.outcome.name, f"{where} at {time.monotonic() - self.t0:.2f} s"))
        if t.outcome is None:
            t.outcome, t.reason, t.cross_shard = result.outcome, result.reason, result.cross_shard
            if result.committed:
                if t.kind == "invalid":
                    self.violations.append(f"invalid trade {t.trade_id} ({t.a} gives {t.a_gold} gold) COMMITTED")
                self.model.apply(t)
        elif t.outcome is not result.outcome:
            self.violations.append(f"trade {t.trade_id} answered {t.outcome.name} and then {result.outcome.name} "
                                   f"({where})")
        if t.cross_shard is not None and result.cross_shard != t.cross_shard:
            self.violations.append(f"trade {t.trade_id} answered cross_shard {t.cross_shard} and {result.cross_shard}")

    async def worker(self, w: int) -> None:
        while self.started < self.args.trades:
            i = self.started
            if not self._gate_open(i):
                self.injected_event.clear()
                await self.injected_event.wait()
                continue
            t = self._terms(i)
            if t is None:
                await asyncio.sleep(0.01)
                continue
            self.started += 1
            self.trades.append(t)
            client_index = i % len(self.clients)
            duplicate = self.rng.random() < self.args.duplicate_share
            started = time.monotonic()
            calls: list[Awaitable[TradeResult]] = [self._execute(t, client_index)]
            if duplicate:
                self.duplicates += 1
                calls.append(self._execute(t, (client_index + 1) % len(self.clients)))
            results = await asyncio.gather(*calls, return_exceptions=True)
            t.latency_s = time.monotonic() - started
            for k, result in enumerate(results):
                where = "first" if k == 0 else "duplicate"
                if isinstance(result, TradeResult):
                    t.attempts = max(t.attempts, result.attempts)
                    self._record_answer(t, result, where)
                elif isinstance(result, InvalidArgument):
                    self.violations.append(f"trade {t.trade_id} refused as invalid ({where}): {result}")
                elif isinstance(result, BaseException):
                    t.error = f"{type(result).__name__}: {result}"
            if t.outcome is not None:
                self.free |= {t.a, t.b}
            else:
                self.quarantined |= {t.a, t.b}  # no answer: settled at the end

    # ---- faults ----

    async def _heal_after(self, fault: Fault) -> None:
        problems = await self.observer.wait_healed(self.args.heal_timeout_s)
        if problems:
            self.heal_timeouts += 1
            self.violations.append(f"the cluster did not heal within {self.args.heal_timeout_s:g} s after "
                                   f"{fault.kind}: {problems[:4]}")

    async def inject(self, fault: Fault) -> dict[str, Any]:
        c = self.cluster
        info: dict[str, Any] = {"kind": fault.kind, "at_trade": self.started,
                                "at_s": round(time.monotonic() - self.t0, 2)}
        started = time.monotonic()
        # Trades go on while the fault lasts (the gate holds them only at the next fault's turn).
        self.injected += 1
        self.injected_event.set()
        if fault.kind == "node-kill":
            victim = c.node_ids[fault.target % len(c.node_ids)]
            c.kill(c.nodes[victim])
            info["victim"] = victim
            await asyncio.sleep(fault.downtime_s)
            c.start_node(victim)
        elif fault.kind == "leader-kill":
            leader = await self.observer.leader()
            victim = leader if leader in c.cps else sorted(c.cps)[fault.target % len(c.cps)]
            info["victim"], info["was_leader"] = victim, leader == victim
            c.kill(c.cps[victim])
            await asyncio.sleep(fault.downtime_s)
            c.start_cp(victim)
        elif fault.kind == "primary-pause":
            primaries = await self.observer.primaries() or c.node_ids
            victim = primaries[fault.target % len(primaries)]
            pause_s = self.args.lease_ttl_s + 1.0 + fault.downtime_s / 2
            info["victim"], info["paused_s"] = victim, round(pause_s, 2)
            proc = c.nodes[victim]
            c.signal(proc, signal.SIGSTOP)
            c.stopped.add(victim)
            try:
                await asyncio.sleep(pause_s)
            finally:
                c.signal(proc, signal.SIGCONT)
                c.stopped.discard(victim)
        elif fault.kind == "etcd-restart":
            await asyncio.to_thread(c.etcd.stop)
            await asyncio.sleep(fault.downtime_s)
            await asyncio.to_thread(c.etcd.start)
        elif fault.kind == "coordinator-kill":
            names = sorted(c.cps)
            victim = names[fault.target % len(names)]
            index = names.index(victim)  # client ``index`` prefers replica ``index``
            c.set_hold(True)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(3.0):
                        while self.inflight[index] < 1:
                            self.progress.clear()
                            await self.progress.wait()
                # Their prepares reach the primaries and are escrowed, unacknowledged.
                await asyncio.sleep(self.args.hold_s)
                info["victim"], info["in_flight"] = victim, self.inflight[index]
                c.kill(c.cps[victim])
            finally:
                c.set_hold(False)
            await asyncio.sleep(fault.downtime_s)
            c.start_cp(victim)
        info["fault_s"] = round(time.monotonic() - started, 2)
        self.faults_done[fault.kind] += 1
        await self._heal_after(fault)
        info["healed_s"] = round(time.monotonic() - started, 2)
        return info

    async def injector(self) -> None:
        for fault in self.faults:
            while self.started < fault.at_fraction * self.args.trades and self.started < self.args.trades:
                self.progress.clear()
                await self.progress.wait()
            self.fault_log.append(await self.inject(fault))
        self.injected_event.set()

    # ---- checks ----

    async def read_inventory(self, routing: RoutingClient, player: str, deadline_s: float = 30.0
                             ) -> shardnode_pb2.GetInventoryResponse:
        """The player's inventory from the shard's primary (with its escrowed fields)."""
        deadline = time.monotonic() + deadline_s
        last = "no attempt"
        while time.monotonic() < deadline:
            try:
                route = routing.resolve(player)
                address = route.addresses.get(route.primary) if route.primary else None
                if address:
                    async with insecure_channel(address) as channel:
                        stub = shardnode_pb2_grpc.ShardNodeStub(channel)  # type: ignore[no-untyped-call]
                        r: shardnode_pb2.GetInventoryResponse = await stub.GetInventory(
                            shardnode_pb2.GetInventoryRequest(player_id=player), timeout=2.0)
                        return r
                last = f"no primary address for {player}"
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:  # the shard lost the player: a violation, reported
                    self.violations.append(f"{player} has no inventory: {e.details()}")
                    return shardnode_pb2.GetInventoryResponse(player_id=player)
                last = str(e)[:200]
            except BlueMarbleError as e:
                last = str(e)[:200]
            await asyncio.sleep(0.1)
        raise TimeoutError(f"inventory of {player} not readable within {deadline_s:g} s: {last}")

    async def inventories(self, routing: RoutingClient) -> dict[str, shardnode_pb2.GetInventoryResponse]:
        gate = asyncio.Semaphore(16)

        async def one(p: str) -> tuple[str, shardnode_pb2.GetInventoryResponse]:
            async with gate:
                try:
                    return p, await self.read_inventory(routing, p)
                except TimeoutError as e:
                    self.violations.append(str(e))
                    return p, shardnode_pb2.GetInventoryResponse(player_id=p)

        return dict(await asyncio.gather(*(one(p) for p in self.players)))

    def check_inventories(self, invs: dict[str, shardnode_pb2.GetInventoryResponse], when: str) -> None:
        owners: dict[str, list[str]] = collections.defaultdict(list)
        for p, inv in invs.items():
            for item in set(inv.item_ids) | set(inv.escrowed_item_ids):
                owners[item].append(p)
            if inv.escrowed_item_ids or inv.escrowed_gold:
                self.violations.append(f"{when}: {p} still has escrowed {list(inv.escrowed_item_ids)[:3]} "
                                       f"/ {inv.escrowed_gold} gold")
        seeded = set().union(*self.seed_items.values())
        for item in sorted(seeded):
            if len(owners.get(item, [])) != 1:
                self.violations.append(f"{when}: item {item} is in {len(owners.get(item, []))} inventories "
                                       f"{owners.get(item, [])}")
        unknown = sorted(set(owners) - seeded)
        if unknown:
            self.violations.append(f"{when}: items nobody seeded: {unknown[:5]}")
        total = sum(inv.gold for inv in invs.values())
        expected_total = self.args.gold * len(self.players)
        if total != expected_total:
            self.violations.append(f"{when}: total gold {total}, expected {expected_total}")
        mismatched = 0
        for p, inv in invs.items():
            if set(inv.item_ids) != self.model.items[p] or inv.gold != self.model.gold[p]:
                mismatched += 1
                if mismatched <= 10:
                    involved = [t.trade_id for t in self.trades if p in (t.a, t.b)][-3:]
                    self.violations.append(
                        f"{when}: {p} holds {sorted(inv.item_ids)[:4]}.. ({len(inv.item_ids)}) and {inv.gold} gold; "
                        f"the answers say {sorted(self.model.items[p])[:4]}.. ({len(self.model.items[p])}) and "
                        f"{self.model.gold[p]} gold (last trades {involved})")
        if mismatched > 10:
            self.violations.append(f"{when}: {mismatched} players differ from the answers in all")

    async def wait_no_escrow(self, client: TradeClient, healed_at: float) -> float | None:
        """Seconds after healing until no escrow is held anywhere (None: not within ESCROW_CLEAR_S)."""
        while True:
            try:
                doubt = await client.in_doubt(deadline_s=2.0)
                if not doubt.escrows and doubt.complete:
                    return time.monotonic() - healed_at
                last = f"{len(doubt.escrows)} escrows ({[e.trade_id for e in doubt.escrows[:3]]}), " \
                       f"unreachable {list(doubt.unreachable_nodes)}, no primary {list(doubt.unled_shards)}"
            except BlueMarbleError as e:
                last = str(e)
            if time.monotonic() - healed_at > ESCROW_CLEAR_S:
                self.violations.append(f"escrows left {ESCROW_CLEAR_S:g} s after healing: {last}")
                return None
            await asyncio.sleep(0.1)

    async def settle_unanswered(self, client: TradeClient) -> int:
        pending = [t for t in self.trades if t.outcome is None]
        for t in pending:
            try:
                result = await client.execute_trade(t.trade_id, t.a, t.b, t.a_items, t.a_gold, t.b_items, t.b_gold,
                                                    deadline_s=60)
            except BlueMarbleError as e:
                self.violations.append(f"trade {t.trade_id} still unanswered after healing: {e}")
                continue
            self._record_answer(t, result, "after healing")
        return len(pending)

    async def recheck(self, client: TradeClient) -> int:
        answered = [t for t in self.trades if t.outcome is not None]
        sample = answered if self.args.recheck >= 1 else [
            t for t in answered if random.Random(t.trade_id).random() < self.args.recheck]
        gate = asyncio.Semaphore(self.args.concurrency)

        async def again(t: TradeRecord) -> None:
            async with gate:
                try:
                    result = await client.execute_trade(t.trade_id, t.a, t.b, t.a_items, t.a_gold, t.b_items,
                                                        t.b_gold, deadline_s=60)
                except BlueMarbleError as e:
                    self.violations.append(f"trade {t.trade_id} asked again: {e}")
                    return
                self._record_answer(t, result, "recheck")

        await asyncio.gather(*(again(t) for t in sample))
        return len(sample)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    cluster = Cluster(workdir, args)
    chaos = Chaos(args, cluster)
    summary: dict[str, Any] = {"seed": args.seed, "workdir": str(workdir)}
    try:
        await asyncio.to_thread(cluster.etcd.start)
        for name in sorted(cluster.cp_addresses):
            cluster.start_cp(name)
        for node_id in cluster.node_ids:
            cluster.start_node(node_id)
        problems = await chaos.observer.wait_healed(90)
        if problems:
            raise RuntimeError(f"the cluster did not come up: {problems}")
        addresses = [cluster.cp_addresses[n] for n in sorted(cluster.cp_addresses)]
        async with RoutingClient(addresses, max_attempts=100_000) as routing:
            await chaos.setup(routing)
            summary["setup_s"] = round(time.monotonic() - t0, 1)
            chaos.clients = [TradeClient(addresses[i:] + addresses[:i]) for i in range(len(addresses))]
            try:
                t_run = time.monotonic()
                injector = asyncio.create_task(chaos.injector())
                await asyncio.gather(*(chaos.worker(w) for w in range(args.concurrency)))
                await injector
                summary["run_s"] = round(time.monotonic() - t_run, 1)
                # Heal: everything running (the injector restarted what it stopped) and settled.
                dead = cluster.dead_unexpectedly()
                if dead:
                    chaos.violations.extend(f"process died: {d}" for d in dead)
                problems = await chaos.observer.wait_healed(args.heal_timeout_s)
                if problems:
                    chaos.violations.append(f"the cluster did not heal at the end: {problems[:4]}")
                healed_at = time.monotonic()
                checker = chaos.clients[0]
                clear_s = await chaos.wait_no_escrow(checker, healed_at)
                summary["escrows_clear_after_heal_s"] = None if clear_s is None else round(clear_s, 2)
                summary["unanswered_settled_after_heal"] = await chaos.settle_unanswered(checker)
                first = await chaos.inventories(routing)
                chaos.check_inventories(first, "after healing")
                t_re = time.monotonic()
                summary["rechecked"] = await chaos.recheck(checker)
                summary["recheck_s"] = round(time.monotonic() - t_re, 1)
                await chaos.wait_no_escrow(checker, time.monotonic())
                second = await chaos.inventories(routing)
                chaos.check_inventories(second, "after asking every trade again")
                if {p: (sorted(i.item_ids), i.gold) for p, i in first.items()} != {
                        p: (sorted(i.item_ids), i.gold) for p, i in second.items()}:
                    chaos.violations.append("inventories changed when answered trades were asked again")
            finally:
                for c in chaos.clients:
                    await c.close()
    finally:
        await chaos.observer.close()
        cluster.stop_all()
        dump = "".join(json.dumps(dataclasses.asdict(t), default=_json_default) + "\n" for t in chaos.trades)
        await asyncio.to_thread((workdir / "trades.jsonl").write_text, dump)  # for post-mortems
    trades = chaos.trades
    committed = [t for t in trades if t.outcome is Outcome.COMMITTED]
    aborted = [t for t in trades if t.outcome is Outcome.ABORTED]
    latencies = [t.latency_s * 1000 for t in trades if t.outcome is not None and not t.error]
    by_kind = collections.Counter(t.kind for t in trades)
    summary.update({
        "trades": len(trades),
        "committed": len(committed),
        "aborted": len(aborted),
        "kinds": dict(by_kind),
        "cross_shard_committed": sum(1 for t in committed if t.cross_shard),
        "same_shard_committed": sum(1 for t in committed if t.cross_shard is False),
        "invalid_aborted": sum(1 for t in aborted if t.kind == "invalid"),
        "valid_aborted": sum(1 for t in aborted if t.kind != "invalid"),
        "retried": sum(1 for t in trades if t.attempts > 1),
        "duplicated": chaos.duplicates,
        "answered_twice_or_more": sum(1 for t in trades if len(t.answers) >= 2),
        "unanswered_during_run": sum(1 for t in trades if any(w.startswith("after healing") for _, w in t.answers)),
        "faults": dict(chaos.faults_done),
        "fault_log": chaos.fault_log,
        "latency_ms_p50": round(percentile(latencies, 0.5), 1),
        "latency_ms_p99": round(percentile(latencies, 0.99), 1),
        "latency_ms_max": round(max(latencies, default=0.0), 1),
        "abort_reasons": collections.Counter(
            _reason_class(t.reason) for t in aborted).most_common(6),
        "violations": chaos.violations,
        "total_s": round(time.monotonic() - t0, 1),
    })
    summary["trades_per_s"] = round(len(trades) / summary["run_s"], 1) if summary.get("run_s") else 0.0
    summary["mean_ms"] = round(statistics.fmean(latencies), 1) if latencies else 0.0
    return summary


def _reason_class(reason: str) -> str:
    """A short class of an abort reason for the summary (ids and numbers dropped)."""
    words = [w for w in reason.replace(":", " ").split() if not any(ch.isdigit() for ch in w)]
    return " ".join(words[:6])


def render(s: dict[str, Any]) -> str:
    lines = [
        f"chaos_trades seed {s['seed']}: {s.get('trades', 0)} trades in {s.get('run_s', '?')} s "
        f"({s.get('trades_per_s', 0)}/s), total {s.get('total_s', '?')} s",
        f"  committed {s.get('committed')} (cross-shard {s.get('cross_shard_committed')}, same-shard "
        f"{s.get('same_shard_committed')}), aborted {s.get('aborted')} (invalid by balance {s.get('invalid_aborted')}, "
        f"others {s.get('valid_aborted')})",
        f"  kinds {s.get('kinds')}; retried {s.get('retried')}, sent twice at once {s.get('duplicated')}, "
        f"answered twice or more {s.get('answered_twice_or_more')} (rechecked {s.get('rechecked')} in "
        f"{s.get('recheck_s')} s), unanswered until healed {s.get('unanswered_during_run')}",
        f"  latency p50 {s.get('latency_ms_p50')} ms, p99 {s.get('latency_ms_p99')} ms, "
        f"max {s.get('latency_ms_max')} ms",
        f"  faults {s.get('faults')}",
    ]
    for f in s.get("fault_log", []):
        lines.append("    " + ", ".join(f"{k}={v}" for k, v in f.items()))
    lines.append(f"  escrows clear {s.get('escrows_clear_after_heal_s')} s after healing; abort reasons "
                 f"{s.get('abort_reasons')}")
    violations = s.get("violations", [])
    lines.append(f"  violations: {len(violations)}")
    lines += [f"    - {v}" for v in violations[:40]]
    lines.append("PASS" if not violations else "FAIL")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--trades", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--faults", default=",".join(FAULT_KINDS), help="comma list of " + ", ".join(FAULT_KINDS))
    p.add_argument("--fault-rounds", type=int, default=2, help="each fault kind this many times")
    p.add_argument("--players", type=int, default=100)
    p.add_argument("--items", type=int, default=4, help="unique items per player")
    p.add_argument("--gold", type=int, default=1000, help="gold per player")
    p.add_argument("--same-share", type=float, default=0.15)
    p.add_argument("--invalid-share", type=float, default=0.10)
    p.add_argument("--duplicate-share", type=float, default=0.05, help="trades sent twice at once (both replicas)")
    p.add_argument("--recheck", type=float, default=1.0, help="share of answered trades asked again at the end")
    p.add_argument("--trade-deadline-s", type=float, default=60.0)
    p.add_argument("--heal-timeout-s", type=float, default=60.0)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--control-planes", type=int, default=2)
    p.add_argument("--replication-factor", type=int, default=3)
    p.add_argument("--lease-ttl-s", type=int, default=2)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--hold-s", type=float, default=0.3,
                   help="coordinator-kill: how long replication is held before the kill (all nodes)")
    p.add_argument("--escrow-timeout-s", type=float, default=0.0, help="nodes' --trade-escrow-timeout-s (0: default)")
    p.add_argument("--server-log-level", default="info")
    p.add_argument("--keep-dir", action="store_true", help="keep the temp dir (logs, data) and print it")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = p.parse_args(argv)
    args.faults = [f for f in args.faults.split(",") if f]
    unknown = [f for f in args.faults if f not in FAULT_KINDS]
    if unknown:
        p.error(f"unknown fault kinds {unknown}; choose from {', '.join(FAULT_KINDS)}")
    if args.players < 4 or args.trades < 1 or args.concurrency < 1:
        p.error("need --players >= 4, --trades >= 1, --concurrency >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.configure("error", "console")  # the clients' retries are expected here
    workdir = Path(tempfile.mkdtemp(prefix="bluemarble-chaos-"))

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    code = 0
    try:
        summary = asyncio.run(run(args, workdir))
        code = 1 if summary["violations"] else 0
    except KeyboardInterrupt:
        summary, code = {"seed": args.seed, "error": "interrupted", "violations": ["interrupted"]}, 130
    except (RuntimeError, TimeoutError, FileNotFoundError, BlueMarbleError) as e:
        summary, code = {"seed": args.seed, "error": str(e), "violations": [f"setup: {e}"]}, 2
    summary["exit"] = code
    if args.json:
        print(json.dumps(summary, default=_json_default), flush=True)
    else:
        print(render(summary) if "error" not in summary else f"chaos_trades failed: {summary['error']}", flush=True)
    if args.keep_dir or code not in (0, 130):
        print(f"logs and data kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return code


def _json_default(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
