#!/usr/bin/env python3
"""Failover benchmark: SIGKILL (or SIGSTOP) a primary, time until ListAssignments shows
new primaries and until the new primary acknowledges a STRONG write.

    .venv/bin/python scripts/bench_failover.py --nodes 5 --kills 10              # SIGKILL, TTL 10 s
    .venv/bin/python scripts/bench_failover.py --nodes 5 --kills 5 --mode stop   # SIGSTOP, then SIGCONT

What runs (every one a real process, as an operator would start it, all on 127.0.0.1):

* a private single-member etcd (:class:`scripts.localcluster.LocalEtcd`, temp dir);
* one control plane: ``python -m controlplane.server.main --lease-ttl-s 10 --shards 16
  --replication-factor 3 --cluster bench ...`` (``--lease-ttl-s`` sets the TTL);
* ``--nodes`` shard nodes (default 5) over 3 zones (n1 z1, n2 z2, n3 z3, n4 z1, ...):
  ``python -m shardnode.main --node-id nK --listen 127.0.0.1:PORT ...``.

What is measured, ``--kills`` times (default 10):

1. Wait until placement is settled: every node listed by ListNodes, every shard has a
   live primary and R-1 = 2 live replicas on distinct nodes, primaries balanced (counts
   per node differ by at most one), and the assignments unchanged for ``--settle-s``.
2. Pick the victim: the next node in round-robin order that is primary of at least one
   shard; note the epoch of every shard it leads.
   For each shard it leads, pick a player the routing client's ring puts on it.
3. ``t_kill = time.monotonic()``; ``--mode kill``: SIGKILL the victim (no deregistration:
   the control plane must notice the crash, from the closed heartbeat stream and the
   refused address, or from the lease running out); ``--mode stop``: SIGSTOP it (a pause:
   its sockets stay open, so only the lease TTL can tell).
4. Right after the signal, one grant per shard the victim led is sent through a
   :class:`~bluemarble.client.routing.RoutingClient` (what game servers use), each retried
   by the client until it is acknowledged: "kill -> write acked" is when the last of them
   was, the time until every failed-over shard takes STRONG writes again.
   A kill comes at least ``--min-gap-s`` after the previous failover was visible
   (default 2 x TTL + 1 s): the control-plane leader reads two nodes leaving within
   2 x TTL as a possible mass expiry (an etcd or network hiccup, not deaths) and holds
   every placement move, promotions included, until they come back or 2 x TTL has
   passed; this benchmark measures one failure at a time. And a victim has been up for
   at least TTL/3 + 0.5 s: a node opens its heartbeat stream with its first heartbeat,
   TTL/3 after registering, and one killed before that has no stream whose end the
   control plane could see (it then waits for the TTL).
5. Meanwhile, poll ListAssignments on the control plane every ``--poll-ms`` (10 ms) until
   every shard the victim led has a primary other than the victim with a higher epoch than
   at the kill. ``t_visible`` is when that ListAssignments answer arrived. The figure is
   ``t_visible - t_kill``. (The new primaries are then checked against ListNodes.)
6. Restore, and go back to 1: ``--mode kill`` restarts a node with the same id, zone,
   data dir and ``--listen`` address (a new process); ``--mode stop`` sends SIGCONT once
   the writes were acknowledged (the resumed node finds its lease gone and registers
   again as a new incarnation). The "restore" column is restart/SIGCONT -> settled again.

For the breakdown, the benchmark also watches the cluster's etcd prefix itself and
timestamps (monotonic clock, on arrival in this process) the DELETE of the victim's node
record (= its lease expired: etcd deleted the record) and the PUT of the new assignments:

    kill -> record deleted     lease TTL minus the time since the victim's last heartbeat
                               (heartbeats every TTL/3), plus etcd's expiry-check period
    deleted -> written         the leader's reconcile round: mirror update, probe of the
                               surviving replicas, plan, guarded txn
    written -> visible         the control plane's mirror update + the 10 ms poll

Reported: each sample, median and max of kill -> new primary visible and of kill ->
write acknowledged. Target for the median of the first (``--target-s``): 1.0 s on SIGKILL
(the crash is detected, whatever the TTL), TTL + 1 s on SIGSTOP. Exit status 0 if met, 1
if not (or if the cluster could not be set up or a failover did not happen within
``--timeout-s``), 130 on Ctrl-C.
Every process started here is stopped on exit (errors, Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import grpc.aio

from bluemarble.api.conversions import assignment_from_proto, placement_node_from_proto
from bluemarble.client.routing import RoutingClient
from bluemarble.core.errors import BlueMarbleError
from bluemarble.core.ids import ShardId, shard_id
from bluemarble.core.placement import PlacementConfig, PlacementNode, violations
from bluemarble.runtime import logs
from bluemarble.runtime.channels import insecure_channel
from bluemarble.v1 import controlplane_pb2 as pb
from bluemarble.v1 import controlplane_pb2_grpc, shardnode_pb2, shardnode_pb2_grpc
from controlplane.store.etcd import EtcdStore, EventType
from controlplane.store.keys import KeySchema
from scripts.localcluster import LocalEtcd, ManagedProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
ZONES = ("z1", "z2", "z3")
CLUSTER = "bench"


@dataclass
class Sample:
    kill: int
    victim: str
    shards_led: int
    failover_s: float  # kill -> new primaries visible in ListAssignments
    write_s: float | None  # kill -> a STRONG grant acknowledged on every shard the victim led
    expiry_s: float | None  # kill -> victim's node record deleted (seen on an etcd watch)
    reconcile_s: float | None  # record deleted -> new assignments written (etcd watch)
    visible_s: float | None  # written -> visible in ListAssignments
    polls: int
    restore_s: float  # restart -> placement settled again
    serving_s: float | None = None  # visible -> every new primary reports serving (GetShardStatus)


class Cluster:
    """etcd, one control plane and the nodes, all real processes; ``stop_all`` ends them."""

    def __init__(self, workdir: Path, args: argparse.Namespace, node_args: tuple[str, ...] = ()):
        self.workdir = workdir
        self.args = args
        self.node_args = node_args  # extra flags for every node, e.g. ("--synchronous", "full")
        self.etcd: LocalEtcd | None = None
        self.control_plane: ManagedProcess | None = None
        self.cp_address = ""
        self.nodes: dict[str, ManagedProcess] = {}
        self.addresses: dict[str, str] = {}
        self.zones: dict[str, str] = {}
        self.dead: list[ManagedProcess] = []
        self.started_at: dict[str, float] = {}  # node id -> monotonic time of its last start

    def start_etcd_and_control_plane(self) -> None:
        self.etcd = LocalEtcd(self.workdir).start()
        self.cp_address = f"127.0.0.1:{free_port()}"
        self.control_plane = ManagedProcess(
            "cp",
            [sys.executable, "-m", "controlplane.server.main", "--listen", self.cp_address,
             "--etcd", self.etcd.endpoint, "--cluster", CLUSTER, "--replica-id", "cp-0",
             "--lease-ttl-s", str(self.args.lease_ttl_s), "--shards", str(self.args.shards),
             "--replication-factor", str(self.args.replication_factor)],
            self.workdir / "cp.log",
        ).start()  # fmt: skip

    def start_node(self, node_id: str) -> ManagedProcess:
        if node_id not in self.addresses:
            self.addresses[node_id] = f"127.0.0.1:{free_port()}"
            self.zones[node_id] = ZONES[(int(node_id[1:]) - 1) % len(ZONES)]
        proc = ManagedProcess(
            node_id,
            [sys.executable, "-m", "shardnode.main", "--node-id", node_id,
             "--listen", self.addresses[node_id], "--control-plane", self.cp_address,
             "--data-dir", str(self.workdir / node_id), "--zone", self.zones[node_id], *self.node_args],
            self.workdir / f"{node_id}.log",
        ).start()  # fmt: skip
        self.nodes[node_id] = proc
        self.started_at[node_id] = time.monotonic()
        return proc

    def sigkill(self, node_id: str) -> float:
        """SIGKILLs the node's process; returns the monotonic time just before the signal."""
        proc = self.nodes.pop(node_id)
        self.dead.append(proc)
        t = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        return t

    def sigstop(self, node_id: str) -> float:
        """SIGSTOPs the node's process (it stays in ``nodes``); returns the monotonic time
        just before the signal."""
        t = time.monotonic()
        os.kill(self.nodes[node_id].pid, signal.SIGSTOP)
        return t

    def sigcont(self, node_id: str) -> None:
        os.kill(self.nodes[node_id].pid, signal.SIGCONT)

    def all_processes(self) -> list[ManagedProcess]:
        procs = [*self.nodes.values(), *self.dead]
        if self.control_plane is not None:
            procs.append(self.control_plane)
        if self.etcd is not None and self.etcd.process is not None:
            procs.append(self.etcd.process)
        return procs

    def stop_all(self) -> None:
        for proc in [*self.nodes.values(), *self.dead]:
            with contextlib.suppress(Exception):
                proc.kill()
        if self.control_plane is not None:
            with contextlib.suppress(Exception):
                self.control_plane.stop(5)
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.stop()


class EventLog:
    """Arrival times (monotonic) of every etcd event below the cluster prefix."""

    def __init__(self, store: EtcdStore, prefix: str):
        self.store = store
        self.prefix = prefix
        self.events: list[tuple[float, EventType, str, bytes]] = []
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        start = await self.store.current_revision() + 1
        self.task = asyncio.create_task(self._run(start))

    async def _run(self, start: int) -> None:
        async for batch in self.store.watch_prefix(self.prefix, start):
            now = time.monotonic()
            for ev in batch.events:
                self.events.append((now, ev.type, ev.kv.key, ev.kv.value))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


def fingerprint(r: pb.ListAssignmentsResponse) -> tuple[tuple[str, int, str, tuple[str, ...]], ...]:
    return tuple((a.shard_id, a.epoch, a.primary, tuple(a.replicas)) for a in r.assignments)


def placement_problems(
    r: pb.ListAssignmentsResponse, nodes: dict[str, PlacementNode], shards: int, rf: int
) -> list[str]:
    """Why ``r`` is not a settled placement over ``nodes`` (ListNodes), [] if it is: the
    core's one checker, :func:`bluemarble.core.placement.violations`. Every shard has a
    live primary and R - 1 replicas on distinct live nodes, spread over the zones, and
    every node holds its fair share: with equal capacities primary counts differ by at
    most one, so a node that came back holds its share again before the next kill."""
    assignments = {ShardId(a.shard_id): assignment_from_proto(a) for a in r.assignments}
    found = []
    if len(assignments) != len(r.assignments):
        found.append(f"{len(r.assignments)} records for {len(assignments)} shards")
    config = PlacementConfig(rf, max_moves_per_round=0)  # the checker reads only the replication factor
    return found + violations(assignments, list(nodes.values()), config, shards=[shard_id(i) for i in range(shards)])


class Bench:
    def __init__(self, cluster: Cluster, args: argparse.Namespace):
        self.cluster = cluster
        self.args = args
        self.keys = KeySchema(CLUSTER)
        self.channel: grpc.aio.Channel | None = None
        self.stub: controlplane_pb2_grpc.ControlPlaneStub | None = None

    async def list_assignments(self) -> pb.ListAssignmentsResponse | None:
        assert self.stub is not None
        try:
            r: pb.ListAssignmentsResponse = await self.stub.ListAssignments(pb.ListAssignmentsRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            return None
        return r

    async def list_nodes(self) -> dict[str, PlacementNode] | None:
        """The live nodes by id, as placement values."""
        assert self.stub is not None
        try:
            r = await self.stub.ListNodes(pb.ListNodesRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            return None
        return {n.node_id: placement_node_from_proto(n) for n in r.nodes}

    def check_alive(self) -> None:
        for proc in [self.cluster.control_plane, *self.cluster.nodes.values()]:
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{proc.name} exited unexpectedly:\n{proc.log_tail()}")

    async def wait_settled(self, want: set[str], timeout_s: float) -> None:
        """Every node of ``want`` live, placement complete, unchanged for settle_s."""
        deadline = time.monotonic() + timeout_s
        stable_since: float | None = None
        last = None
        why: list[str] = ["no answer yet"]
        while True:
            self.check_alive()
            live = await self.list_nodes()
            r = await self.list_assignments()
            now = time.monotonic()
            if live is None or r is None:
                why, stable_since = ["control plane not answering"], None
            elif set(live) != want:
                why, stable_since = [f"live nodes {sorted(live)}, want {sorted(want)}"], None
            else:
                why = placement_problems(r, live, self.args.shards, self.args.replication_factor)
                fp = fingerprint(r)
                if why or fp != last:
                    stable_since = None if why else now
                    last = fp
                elif stable_since is not None and now - stable_since >= self.args.settle_s:
                    return
            if now >= deadline:
                raise TimeoutError(f"placement did not settle within {timeout_s:g} s: {why[:5]}")
            await asyncio.sleep(0.05)

    async def run(self) -> list[Sample]:
        args = self.args
        cluster = self.cluster
        cluster.start_etcd_and_control_plane()
        assert cluster.etcd is not None
        self.channel = grpc.aio.insecure_channel(cluster.cp_address)
        self.stub = controlplane_pb2_grpc.ControlPlaneStub(self.channel)  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + 30
        while await self.list_nodes() is None:
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("the control plane did not serve within 30 s")
            await asyncio.sleep(0.1)
        node_ids = [f"n{i}" for i in range(1, args.nodes + 1)]
        for node_id in node_ids:
            cluster.start_node(node_id)
        store = EtcdStore([cluster.etcd.endpoint])
        await store.connect(10)
        events = EventLog(store, self.keys.prefix)
        await events.start()
        samples: list[Sample] = []
        # The writer: a game server's client. Many attempts: it retries until the deadline.
        client = RoutingClient(cluster.cp_address, max_attempts=100_000, retry_max_backoff_s=args.client_max_backoff_s)
        try:
            await client.start()
            await self.wait_settled(set(node_ids), 60)
            await client.wait_ready(30)
            print(
                f"cluster up: {args.nodes} nodes in zones "
                f"{dict(sorted(cluster.zones.items(), key=lambda kv: int(kv[0][1:])))}, "
                f"{args.shards} shards, R={args.replication_factor}, lease TTL {args.lease_ttl_s} s",
                flush=True,
            )
            header = HEADER.replace("kill ->", f"{args.mode} ->")
            print(header)
            print("|" + "---|" * (header.count("|") - 1), flush=True)
            next_index = 0
            t_last_failover = -float("inf")
            for k in range(1, args.kills + 1):
                r = await self.list_assignments()
                assert r is not None
                leaders = collections.Counter(a.primary for a in r.assignments)
                for step in range(len(node_ids)):
                    victim = node_ids[(next_index + step) % len(node_ids)]
                    if leaders.get(victim, 0) > 0:
                        next_index = (next_index + step + 1) % len(node_ids)
                        break
                else:
                    raise RuntimeError("no node leads a shard")
                led = {a.shard_id: a.epoch for a in r.assignments if a.primary == victim}
                players = {shard: player_on(client, shard, f"fo{k}") for shard in led}
                # One failure at a time: a departure within the leader's hold window of
                # the previous one reads as a mass expiry and holds every move (module doc).
                await asyncio.sleep(max(0.0, t_last_failover + args.min_gap_s - time.monotonic()))
                # A node opens its heartbeat stream with its first heartbeat, TTL/3 after it
                # registered; the crash watch needs that stream to see the node die.
                first_beat = cluster.started_at[victim] + args.lease_ttl_s / 3 + 0.5
                await asyncio.sleep(max(0.0, first_beat - time.monotonic()))
                mark = len(events.events)
                t_kill = cluster.sigstop(victim) if args.mode == "stop" else cluster.sigkill(victim)
                writes = asyncio.ensure_future(self.write_after(client, players, t_kill, victim))
                try:
                    t_visible, polls = await self.wait_failover(victim, led, t_kill)
                    t_serving = await self.wait_new_primaries_serving(led, t_kill)
                    write_s = await writes
                finally:
                    writes.cancel()
                failover_s = t_visible - t_kill
                t_last_failover = t_visible  # the departure was seen before this
                live = await self.list_nodes()
                r2 = await self.list_assignments()
                if live is not None and r2 is not None:
                    bad = [a.shard_id for a in r2.assignments if a.shard_id in led and a.primary not in live]
                    if bad:
                        print(f"  warning: new primaries of {bad} are not in ListNodes", flush=True)
                expiry_s, reconcile_s, visible_s = self.breakdown(events, mark, victim, led, t_kill, t_visible)
                t_restart = time.monotonic()
                if args.mode == "stop":
                    cluster.sigcont(victim)
                else:
                    cluster.dead[-1].proc.wait(10)  # type: ignore[union-attr]
                    t_restart = time.monotonic()
                    cluster.start_node(victim)
                await self.wait_settled(set(node_ids), args.timeout_s)
                restore_s = time.monotonic() - t_restart
                sample = Sample(
                    k, victim, len(led), failover_s, write_s, expiry_s, reconcile_s, visible_s, polls, restore_s,
                    None if t_serving is None else max(0.0, t_serving - t_visible),
                )  # fmt: skip
                samples.append(sample)
                print(row(sample), flush=True)
        finally:
            await client.close()
            await events.stop()
            await store.close()
            await self.channel.close(None)
        return samples

    async def wait_new_primaries_serving(self, led: dict[str, int], t_kill: float) -> float | None:
        """When every shard of ``led`` reports ``serving`` on the primary ListAssignments
        names for it (polled every ``--poll-ms``); None if not within ``--timeout-s``.
        A new primary serves once it heard where its replicas stand and caught up."""
        period = self.args.poll_ms / 1000
        deadline = t_kill + self.args.timeout_s
        channels: dict[str, grpc.aio.Channel] = {}
        try:
            while time.monotonic() < deadline:
                r = await self.list_assignments()
                if r is not None:
                    primaries = {a.shard_id: a.primary for a in r.assignments if a.shard_id in led}
                    serving: set[str] = set()
                    for node in set(primaries.values()):
                        address = self.cluster.addresses.get(node)
                        if address is None:
                            continue
                        if address not in channels:
                            channels[address] = insecure_channel(address)
                        stub = shardnode_pb2_grpc.ShardNodeStub(channels[address])  # type: ignore[no-untyped-call]
                        with contextlib.suppress(grpc.aio.AioRpcError):
                            status = await stub.GetShardStatus(shardnode_pb2.GetShardStatusRequest(), timeout=1.0)
                            serving |= {
                                s.shard_id for s in status.shards if s.serving and primaries.get(s.shard_id) == node
                            }
                    if serving >= set(led):
                        return time.monotonic()
                await asyncio.sleep(period)
            return None
        finally:
            for channel in channels.values():
                await channel.close(None)

    async def write_after(self, client: RoutingClient, players: dict[str, str], t_kill: float, victim: str) -> float:
        """Seconds from ``t_kill`` until a grant to each of ``players`` (one per shard the
        victim led) was acknowledged by a node other than the victim; each is sent at
        once and retried by the routing client within ``--timeout-s``."""

        async def one(shard: str, player: str) -> float:
            result = await client.grant_items(player, [f"{player}-item"], gold=1, deadline_s=self.args.timeout_s)
            t = time.monotonic()
            if result.inventory.served_by == victim or result.inventory.shard_id != shard:
                raise RuntimeError(
                    f"grant to {player} answered by {result.inventory.served_by} for "
                    f"{result.inventory.shard_id}, not by a new primary of {shard}"
                )
            return t - t_kill

        try:
            return max(await asyncio.gather(*(one(s, p) for s, p in players.items())))
        except BlueMarbleError as e:
            raise RuntimeError(f"no STRONG write acknowledged within {self.args.timeout_s:g} s: {e}") from e

    async def wait_failover(self, victim: str, led: dict[str, int], t_kill: float) -> tuple[float, int]:
        period = self.args.poll_ms / 1000
        deadline = t_kill + self.args.timeout_s
        polls = 0
        next_at = time.monotonic()
        while True:
            r = await self.list_assignments()
            now = time.monotonic()
            polls += 1
            if r is not None:
                by_shard = {a.shard_id: a for a in r.assignments}
                if all(
                    (a := by_shard.get(s)) is not None and a.primary not in ("", victim) and a.epoch > epoch
                    for s, epoch in led.items()
                ):
                    return now, polls
            if now >= deadline:
                raise TimeoutError(f"no failover of {sorted(led)} within {self.args.timeout_s:g} s of killing {victim}")
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def breakdown(
        self, events: EventLog, mark: int, victim: str, led: dict[str, int], t_kill: float, t_visible: float
    ) -> tuple[float | None, float | None, float | None]:
        from bluemarble.v1 import common_pb2
        from controlplane.store import codec

        node_key = self.keys.node(victim)  # type: ignore[arg-type]
        t_deleted = next(
            (t for t, typ, key, _ in events.events[mark:] if key == node_key and typ is EventType.DELETE), None
        )
        written: dict[str, float] = {}
        for t, typ, key, value in events.events[mark:]:
            if typ is not EventType.PUT or not key.startswith(self.keys.assignments_prefix()):
                continue
            shard = self.keys.parse_assignment(key)
            if shard in led and shard not in written:
                a = codec.decode(value, common_pb2.Assignment, key)
                if a.primary not in ("", victim) and a.epoch > led[shard]:
                    written[shard] = t
        t_written = max(written.values()) if len(written) == len(led) else None
        expiry = t_deleted - t_kill if t_deleted is not None else None
        reconcile = t_written - t_deleted if t_written is not None and t_deleted is not None else None
        visible = t_visible - t_written if t_written is not None else None
        return expiry, reconcile, visible


HEADER = (
    "| kill | victim | shards led | kill -> record deleted (s) | deleted -> written (s) "
    "| written -> visible (ms) | **kill -> new primary visible (s)** | visible -> serving (ms) "
    "| **kill -> write acked (s)** | polls | restore (s) |"
)


def player_on(client: RoutingClient, shard: str, prefix: str) -> str:
    """A player id the client's ring puts on ``shard`` (the first ``prefix-N`` that is)."""
    for n in range(1_000_000):
        player = f"{prefix}-{n}"
        if client.router.shard_for(player) == shard:
            return player
    raise RuntimeError(f"no player id of the form {prefix}-N lands on {shard}")


def _f(x: float | None, scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x * scale)


def row(s: Sample) -> str:
    return (
        f"| {s.kill} | {s.victim} | {s.shards_led} | {_f(s.expiry_s)} | {_f(s.reconcile_s)} "
        f"| {_f(s.visible_s, 1000, '{:.1f}')} | **{s.failover_s:.3f}** | {_f(s.serving_s, 1000, '{:.0f}')} "
        f"| **{_f(s.write_s)}** | {s.polls} "
        f"| {s.restore_s:.1f} |"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=5, help="shard nodes (zones z1..z3 round-robin)")
    p.add_argument("--kills", type=int, default=10, help="failovers to measure")
    p.add_argument(
        "--mode",
        choices=("kill", "stop"),
        default="kill",
        help="kill: SIGKILL, then restart; stop: SIGSTOP, then SIGCONT after the failover",
    )
    p.add_argument("--lease-ttl-s", type=int, default=10)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--replication-factor", type=int, default=3)
    p.add_argument(
        "--min-gap-s",
        type=float,
        help="from a failover to the next kill (default 2 x TTL + 1 s: the leader's mass-departure window)",
    )
    p.add_argument(
        "--client-max-backoff-s", type=float, default=0.5, help="the writer's RoutingClient retry_max_backoff_s"
    )
    p.add_argument("--poll-ms", type=float, default=10.0, help="ListAssignments polling period")
    p.add_argument("--settle-s", type=float, default=1.5, help="assignments unchanged this long = settled")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per failover and per restore")
    p.add_argument(
        "--target-s", type=float, help="target for the median of kill -> visible (default 1.0 s; stop: TTL + 1 s)"
    )
    p.add_argument("--keep-dir", action="store_true", help="keep etcd data and process logs")
    p.add_argument("--json", type=Path, help="also write the samples as JSON here")
    args = p.parse_args()
    if args.nodes < args.replication_factor or args.kills < 1:
        p.error("need --nodes >= --replication-factor and --kills >= 1")
    if args.min_gap_s is None:
        args.min_gap_s = 2.0 * args.lease_ttl_s + 1.0
    if args.target_s is None:
        args.target_s = 1.0 if args.mode == "kill" else args.lease_ttl_s + 1.0

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    logs.configure("warning")  # the routing client's info lines would bury the table
    os.chdir(ROOT)  # `python -m controlplane.server.main` etc. resolve from the project root
    workdir = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    cluster = Cluster(workdir, args)
    print(
        f"failover benchmark: {args.kills} SIG{args.mode.upper()}s, {args.nodes} nodes, {args.shards} shards, "
        f"R={args.replication_factor}, lease TTL {args.lease_ttl_s} s, poll {args.poll_ms:g} ms, "
        f"{os.cpu_count()} CPUs; logs in {workdir}",
        flush=True,
    )
    failed = False
    samples: list[Sample] = []
    try:
        samples = asyncio.run(Bench(cluster, args).run())
    except KeyboardInterrupt:
        print("interrupted; stopping every process", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        for proc in cluster.all_processes():
            print(f"--- {proc.name} ({proc.log_path}) ---\n{proc.log_tail(15)}", file=sys.stderr)
        failed = True
        args.keep_dir = True
    finally:
        cluster.stop_all()
        if args.keep_dir:
            print(f"logs and data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if failed or not samples:
        return 1
    figures = [s.failover_s for s in samples]
    median = statistics.median(figures)
    print()
    print("| figure | value |")
    print("| --- | --- |")
    print(f"| samples ({args.mode} -> new primary visible, s) | {', '.join(f'{x:.3f}' for x in figures)} |")
    print(f"| min | {min(figures):.3f} s |")
    print(f"| **median** | **{median:.3f} s** (target <= {args.target_s:g} s) |")
    print(f"| mean | {statistics.fmean(figures):.3f} s |")
    print(f"| max | {max(figures):.3f} s |")
    for name, attr in ((f"**{args.mode} -> write acked**", "write_s"),
                       (f"{args.mode} -> record deleted", "expiry_s"), ("deleted -> written", "reconcile_s"),
                       ("written -> visible", "visible_s"),
                       ("visible -> new primaries serving", "serving_s")):  # fmt: skip
        xs = [getattr(s, attr) for s in samples if getattr(s, attr) is not None]
        if xs:
            print(f"| {name}: median / max | {statistics.median(xs):.3f} / {max(xs):.3f} s |")
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in samples], indent=2))
    ok = median <= args.target_s
    print(f"\n{'PASS' if ok else 'FAIL'}: median {median:.3f} s {'<=' if ok else '>'} {args.target_s:g} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
