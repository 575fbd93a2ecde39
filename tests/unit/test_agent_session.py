"""The node agent's session against a fake control plane on a fake clock: heartbeats
driven by the lease deadline, failover to the next address when a replica hangs, the
CONNECTED / SUSPENDED / LOST states, a new incarnation after NOT_FOUND, and supervised
stream followers (agent and ring router) that notice silence and survive bugs.

Nothing here waits for real time: the fake replicas answer (or hang) on the FakeClock,
and every test advances that clock in 10 ms steps, checking its invariants at each one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
import structlog

from bluemarble.api.conversions import ring_to_proto
from bluemarble.client.control_plane import ControlPlaneClient
from bluemarble.client.ring_router import RingRouter
from bluemarble.core.ids import ShardId
from bluemarble.core.ring import Ring, initial_ring
from bluemarble.runtime import stalls
from bluemarble.runtime.clock import FakeClock
from bluemarble.runtime.grpc_server import STOPPING_TRAILER
from bluemarble.v1 import common_pb2
from bluemarble.v1 import controlplane_pb2 as pb
from shardnode.agent import NodeAgent, NodeIdentity, SessionState

TTL_S = 3.0
STEP_S = 0.01
PROGRESS_INTERVAL_S = 1.0  # as the real replicas send on idle streams


async def forever() -> None:
    """What a replica stopped with SIGSTOP does with a request."""
    await asyncio.Event().wait()


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class FakeControlPlane:
    """Every replica of a fake control plane: leases on the fake clock, assignments per
    node, the ring, and addresses that can hang (answer nothing, fail nothing)."""

    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.leases: dict[int, float] = {}  # lease id -> expiry time
        self.lease_ids = itertools.count(0x100)
        self.hung: set[str] = set()  # addresses that answer nothing at all
        self.silent_streams: set[str] = set()  # addresses whose streams deliver nothing
        self.stopping: set[str] = set()  # addresses ending their heartbeat streams to shut down
        self.racing_stop: set[str] = set()  # ... whose end races the node's write (INTERNAL on the write)
        self.refusing: set[str] = set()  # addresses whose process is gone (connections refused)
        self.reply_delay_s = 0.0
        self.draining = False  # heartbeats answer that the node is draining
        self.refuse_statuses = False  # answer INVALID_ARGUMENT to heartbeats that report shards
        self.sent: list[tuple[float, str]] = []  # heartbeats written: (time, address)
        self.answered: list[tuple[float, str]] = []  # heartbeats answered: (time, address)
        self.events: list[str] = []
        self.assigned: dict[str, list[common_pb2.Assignment]] = {}
        self.revision = 1
        self.watches: list[FakeStream] = []
        self.ring = initial_ring(4, vnodes=4)

    def expires_at(self, lease_id: int) -> float:
        return self.leases.get(lease_id, -math.inf)

    def alive(self, lease_id: int) -> bool:
        return self.expires_at(lease_id) > self.clock.monotonic_s()

    def assign(self, node: str, *assignments: common_pb2.Assignment) -> None:
        """Changes what ``node`` holds and tells its open streams (like the leader)."""
        self.revision += 1
        self.assigned[node] = list(assignments)
        for stream in self.watches:
            if stream.node == node:
                stream.queue.put_nowait(self.snapshot(node, snapshot=False))

    def snapshot(self, node: str, snapshot: bool = True) -> pb.WatchAssignmentsResponse:
        return pb.WatchAssignmentsResponse(
            revision=self.revision, snapshot=snapshot, assignments=self.assigned.get(node, [])
        )

    def set_ring(self, ring: Ring) -> None:
        self.ring = ring
        for stream in self.watches:
            if stream.node == "":
                stream.queue.put_nowait(ring_to_proto(ring))


class FakeStream:
    """A server stream (WatchAssignments or WatchRing) of one fake replica: the first
    message, then queued changes, and a progress message after every idle second."""

    ids = itertools.count(1)

    def __init__(
        self, plane: FakeControlPlane, address: str, node: str, first: Any, progress: Callable[[], Any],
        progress_interval_ms: int,
    ):
        # Like a real replica: progress messages only for a client that asks for them.
        assert progress_interval_ms == 1000, progress_interval_ms
        self.plane = plane
        self.address = address
        self.node = node
        self.id = next(self.ids)
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.queue.put_nowait(first)
        self.progress = progress
        self.cancelled = False
        plane.events.append(f"stream {self.id} opened on {address}")

    async def read(self) -> Any:
        if self.address in self.plane.hung or self.address in self.plane.silent_streams:
            await forever()
        getter = asyncio.ensure_future(self.queue.get())
        timer = asyncio.ensure_future(self.plane.clock.sleep(PROGRESS_INTERVAL_S))
        try:
            await asyncio.wait((getter, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not getter.done():
                getter.cancel()
        if self.address in self.plane.hung or self.address in self.plane.silent_streams:
            await forever()
        return getter.result() if getter.done() and not getter.cancelled() else self.progress()

    def cancel(self) -> bool:
        if not self.cancelled:
            self.cancelled = True
            self.plane.events.append(f"stream {self.id} cancelled")
            self.plane.watches.remove(self)
        return True


class FakeBeats:
    """A HeartbeatStream to one fake replica."""

    def __init__(self, plane: FakeControlPlane, address: str):
        self.plane = plane
        self.address = address
        self.requests: list[pb.HeartbeatRequest] = []

    async def write(self, request: pb.HeartbeatRequest) -> None:
        self.plane.sent.append((self.plane.clock.monotonic_s(), self.address))
        if self.address in self.plane.racing_stop:
            # gRPC's answer to a write racing the server's end of the stream (grpc/grpc#36066).
            raise grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "Internal error from Core")
        self.requests.append(request)

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        """The stream's trailers: the replica's shutdown trailer once it ended it so."""
        stopping = self.address in self.plane.stopping | self.plane.racing_stop
        return grpc.aio.Metadata(*STOPPING_TRAILER) if stopping else grpc.aio.Metadata()

    async def read(self) -> pb.HeartbeatResponse:
        plane = self.plane
        if self.address in plane.hung:
            await forever()
        if self.address in plane.refusing:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: "
                            f"UNKNOWN: ipv4:{self.address}: Failed to connect to remote host: Connection refused")
        if self.address in plane.stopping:
            # As a replica's end_streams does: UNAVAILABLE, its reason, and the trailer.
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(*STOPPING_TRAILER),
                f"control-plane replica {self.address} is shutting down; reconnect to another replica",
            )
        if plane.reply_delay_s:
            await plane.clock.sleep(plane.reply_delay_s)
        request = self.requests.pop(0)
        if plane.refuse_statuses and request.shards:
            raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "shards[0]: shard-1 is not a shard of the ring")
        if not plane.alive(request.lease_id):
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"lease {request.lease_id:#x} not found")
        plane.leases[request.lease_id] = plane.clock.monotonic_s() + TTL_S
        plane.answered.append((plane.clock.monotonic_s(), self.address))
        return pb.HeartbeatResponse(ttl_ms=int(TTL_S * 1000), draining=plane.draining)

    def cancel(self) -> bool:
        return True


class FakeStub:
    """The ControlPlaneStub methods the agent and the router use, on one fake replica."""

    def __init__(self, plane: FakeControlPlane, address: str):
        self.plane = plane
        self.address = address

    async def _answer(self) -> None:
        if self.address in self.plane.hung:
            await forever()

    async def RegisterNode(self, request: pb.RegisterNodeRequest, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        await self._answer()
        lease_id = next(self.plane.lease_ids)
        self.plane.leases[lease_id] = self.plane.clock.monotonic_s() + TTL_S
        self.plane.events.append(f"registered {request.node_id} lease {lease_id:#x} on {self.address}")
        ttl_ms = int(TTL_S * 1000)
        return pb.RegisterNodeResponse(lease_id=lease_id, ttl_ms=ttl_ms, heartbeat_interval_ms=ttl_ms // 3)

    async def DeregisterNode(self, request: pb.DeregisterNodeRequest, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        await self._answer()
        self.plane.leases.pop(request.lease_id, None)
        self.plane.events.append(f"deregistered {request.node_id}")
        return pb.DeregisterNodeResponse()

    async def GetRing(self, request: pb.GetRingRequest, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        await self._answer()
        return ring_to_proto(self.plane.ring)

    def HeartbeatStream(self) -> FakeBeats:
        return FakeBeats(self.plane, self.address)

    def WatchAssignments(self, request: pb.WatchAssignmentsRequest) -> FakeStream:
        plane = self.plane
        stream = FakeStream(
            plane,
            self.address,
            request.node_id,
            plane.snapshot(request.node_id),
            lambda: pb.WatchAssignmentsResponse(revision=plane.revision),
            request.progress_interval_ms,
        )
        plane.watches.append(stream)
        return stream

    def WatchRing(self, request: pb.WatchRingRequest) -> FakeStream:
        plane = self.plane
        stream = FakeStream(
            plane,
            self.address,
            "",
            ring_to_proto(plane.ring),
            lambda: common_pb2.Ring(version=plane.ring.version),
            request.progress_interval_ms,
        )
        plane.watches.append(stream)
        return stream


class FakeClient(ControlPlaneClient):
    """The real client (addresses, rotation, retries, timeouts) over fake replicas."""

    def __init__(self, plane: FakeControlPlane, addresses: list[str]):
        super().__init__(addresses, clock=plane.clock, timeout_s=2.0)
        self.plane = plane

    def control_plane(self) -> Any:
        return FakeStub(self.plane, self.current_address)


def primary(shard: str, node: str, epoch: int) -> common_pb2.Assignment:
    return common_pb2.Assignment(shard_id=shard, epoch=epoch, primary=node)


@contextlib.asynccontextmanager
async def running(agent: NodeAgent, clock: FakeClock) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await run_until(clock, agent.registered.is_set, 5.0, "registration")
        yield stop
    finally:
        stop.set()
        # A heartbeat in flight finishes (or times out) first: at most the attempt timeout.
        await run_until(clock, task.done, agent.heartbeat_timeout_s() + 0.1, "the agent to stop")
        await task


async def run_for(clock: FakeClock, seconds: float, each_step: Callable[[], None] = lambda: None) -> None:
    """Advances the fake clock by ``seconds`` in 10 ms steps, calling ``each_step`` after each."""
    for _ in range(round(seconds / STEP_S)):
        await clock.advance(STEP_S)
        each_step()


async def run_until(clock: FakeClock, condition: Callable[[], bool], limit_s: float, what: str) -> float:
    """Advances the fake clock until ``condition()``; returns the fake time it took."""
    started = clock.monotonic_s()
    while not condition():
        assert clock.monotonic_s() - started < limit_s, f"no {what} within {limit_s} s of fake time"
        await clock.advance(STEP_S)
    return clock.monotonic_s() - started


def make_agent(
    plane: FakeControlPlane, addresses: tuple[str, ...] = ("cp-a:7000", "cp-b:7000")
) -> tuple[NodeAgent, FakeClient]:
    client = FakeClient(plane, list(addresses))
    return NodeAgent(NodeIdentity("n1", "127.0.0.1:7101"), client), client


def transitions(states: list[SessionState]) -> list[SessionState]:
    return [s for i, s in enumerate(states) if i == 0 or states[i - 1] is not s]


class TestHeartbeatSchedule:
    async def test_a_hung_replica_is_left_within_ttl_6_and_the_lease_never_lapses(self) -> None:
        clock = FakeClock()
        plane = FakeControlPlane(clock)
        agent, client = make_agent(plane)
        with structlog.testing.capture_logs() as logs:
            await self._hang_a_and_check(plane, agent, client, clock)
        # Each transition logged once. (SUSPENDED lasts a moment: the retry on b is answered
        # within the same 10 ms step, so the log, not sampling, shows it.)
        logged = [e["state"] for e in logs if e["event"] == "session state"]
        assert logged == ["connected", "suspended", "connected"]
        await client.close()

    async def _hang_a_and_check(
        self, plane: FakeControlPlane, agent: NodeAgent, client: FakeClient, clock: FakeClock
    ) -> None:
        async with running(agent, clock):
            lease = agent.registration.lease_id  # type: ignore[union-attr]

            def check() -> None:
                assert plane.alive(lease), f"lease lapsed at {clock.monotonic_s()}"
                assert agent.session_state is not SessionState.LOST

            await run_for(clock, 3.0, check)
            assert {address for _, address in plane.answered} == {"cp-a:7000"}
            plane.hung.add("cp-a:7000")  # SIGSTOP
            hung_at = clock.monotonic_s()
            await run_for(clock, 3 * TTL_S, check)
            first_unanswered = min(t for t, address in plane.sent if address == "cp-a:7000" and t >= hung_at)
            first_on_b = min(t for t, address in plane.answered if address == "cp-b:7000")
            assert first_on_b - first_unanswered <= TTL_S / 6 + 2 * STEP_S
            assert client.current_address == "cp-b:7000"
            # The lease deadline drives the schedule: on b, a heartbeat every TTL/3.
            beats_on_b = [t for t, address in plane.answered if address == "cp-b:7000"]
            gaps = [b - a for a, b in itertools.pairwise(beats_on_b)]
            assert gaps and all(abs(g - TTL_S / 3) <= 3 * STEP_S for g in gaps), gaps

    async def test_heartbeats_that_time_out_while_this_process_stalls_name_no_other_replica(
        self, monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        clock = FakeClock()
        plane = FakeControlPlane(clock)
        agent, client = make_agent(plane)
        async with running(agent, clock):
            lease = agent.registration.lease_id  # type: ignore[union-attr]
            await run_for(clock, 1.5)
            with structlog.testing.capture_logs() as logs:
                # Every heartbeat timeout overlaps a stall of this process (as after SIGSTOP).
                monkeypatch.setattr(stalls, "stalled_within", lambda _window_s: 3.0)
                plane.hung.add("cp-a:7000")
                await run_for(clock, 3 * agent.heartbeat_timeout_s() + 0.1)
                assert client.current_address == "cp-a:7000"  # the replica was not to blame
            plane.hung.clear()
            monkeypatch.undo()
            await run_for(clock, 1.0)
            assert plane.alive(lease)
        beats = [(e["event"], e["log_level"]) for e in logs if "heartbeat" in e["event"]]
        assert ("heartbeat timed out while this process was stalled; heartbeating again", "info") in beats
        assert ("heartbeat timed out again while this process stalls; heartbeating the same address",
                "warning") in beats
        assert not any("next address" in event for event, _ in beats), beats
        await client.close()

    async def test_a_replica_ending_its_heartbeat_stream_to_shut_down_costs_no_warning(self) -> None:
        clock = FakeClock()
        plane = FakeControlPlane(clock)
        agent, client = make_agent(plane)
        async with running(agent, clock):
            lease = agent.registration.lease_id  # type: ignore[union-attr]
            await run_for(clock, 1.5)
            with structlog.testing.capture_logs() as logs:
                plane.stopping.add("cp-a:7000")  # a rolling restart of the replica in use
                plane.silent_streams.add("cp-a:7000")  # a watch opened just then: silent until it stops
                await run_for(clock, 2 * TTL_S, lambda: None)
            assert plane.alive(lease)
            assert client.current_address == "cp-b:7000"
            assert any(address == "cp-b:7000" for _, address in plane.answered)
            with structlog.testing.capture_logs() as later:
                # It is gone now (restarting), and another loop moved the client back to it
                # just as the heartbeat stream is opened again.
                plane.refusing.add("cp-a:7000")
                client.rotate()
                agent._close_beats(rotate=False)
                await run_for(clock, 2 * TTL_S, lambda: None)
            assert plane.alive(lease) and client.current_address == "cp-b:7000"
            logs += later
        # An expected end, moved past at info: no warning, no SUSPENDED.
        assert [e for e in logs if e["log_level"] in ("warning", "error")] == []
        assert [e for e in logs if e["event"] == "session state"] == []
        assert [e["event"] for e in logs if e["log_level"] == "info"].count(
            "control-plane replica shutting down; heartbeating through the next"
        ) == 2, logs
        await client.close()

    async def test_a_write_racing_a_replica_shutting_down_costs_no_warning(self) -> None:
        """The write gets INTERNAL "Internal error from Core" (the stream ended under it):
        its trailers say the replica shut down, so the node moves on at info, as for the
        stream's own UNAVAILABLE."""
        clock = FakeClock()
        plane = FakeControlPlane(clock)
        agent, client = make_agent(plane)
        async with running(agent, clock):
            lease = agent.registration.lease_id  # type: ignore[union-attr]
            await run_for(clock, 1.5)
            with structlog.testing.capture_logs() as logs:
                plane.racing_stop.add("cp-a:7000")
                await run_for(clock, 2 * TTL_S, lambda: None)
            assert plane.alive(lease)
            assert client.current_address == "cp-b:7000"
        assert [e for e in logs if e["log_level"] in ("warning", "error")] == [], logs
        assert "control-plane replica shutting down; heartbeating through the next" in [e["event"] for e in logs]
        await client.close()

    async def test_a_slow_answer_does_not_delay_the_next_heartbeat(self) -> None:
        clock = FakeClock()
        plane = FakeControlPlane(clock)
        plane.reply_delay_s = 0.4  # slow, but within the attempt timeout (TTL/6 = 0.5 s)
        agent, client = make_agent(plane)
        async with running(agent, clock):
            await run_for(clock, 6.0, lambda: None)
        sends = [t for t, _ in plane.sent]
        gaps = [b - a for a, b in itertools.pairwise(sends)]
        assert len(gaps) >= 4
        assert all(abs(g - TTL_S / 3) <= 3 * STEP_S for g in gaps), gaps  # not TTL/3 + 0.4
        assert agent.session_state is SessionState.CONNECTED
        await client.close()

    async def test_with_no_answer_anywhere_it_is_lost_before_the_lease_could_expire(self) -> None:
        clock = FakeClock()
        plane = FakeControlPlane(clock)
        agent, client = make_agent(plane)
        states: list[tuple[float, SessionState]] = []
        with structlog.testing.capture_logs() as logs:
            async with running(agent, clock):
                lease = agent.registration.lease_id  # type: ignore[union-attr]
                await run_for(clock, 2.0)
                plane.hung.update({"cp-a:7000", "cp-b:7000"})
                await run_for(clock, 2 * TTL_S, lambda: states.append((clock.monotonic_s(), agent.session_state)))
                # Heartbeats went on being tried, on every address in turn.
                assert {address for t, address in plane.sent if t > plane.answered[-1][0]} == {"cp-a:7000", "cp-b:7000"}
        lost_at = min(t for t, s in states if s is SessionState.LOST)
        expired_at = plane.expires_at(lease)
        assert lost_at < expired_at
        assert lost_at <= expired_at - agent.lease_safety_margin_s() + STEP_S
        assert transitions([s for _, s in states]) == [
            SessionState.CONNECTED,
            SessionState.SUSPENDED,
            SessionState.LOST,
        ]
        logged = [e["state"] for e in logs if e["event"] == "session state"]
        assert logged.count("lost") == 1 and logged.count("suspended") == 1
        await client.close()

    async def test_the_same_lease_answering_again_brings_it_back_from_lost(self) -> None:
        clock = FakeClock()
        plane = FakeControlPlane(clock)
        agent, client = make_agent(plane)
        async with running(agent, clock):
            lease = agent.registration.lease_id  # type: ignore[union-attr]
            plane.hung.update({"cp-a:7000", "cp-b:7000"})
            await run_until(clock, lambda: agent.session_state is SessionState.LOST, TTL_S, "LOST")
            plane.leases[lease] = clock.monotonic_s() + TTL_S  # etcd had not expired it yet
            plane.hung.clear()
            await run_until(clock, lambda: agent.session_state is SessionState.CONNECTED, 3.0, "CONNECTED")
            assert agent.registration.lease_id == lease  # type: ignore[union-attr]
            assert agent.lease_valid_until_s > clock.monotonic_s() + TTL_S / 2
        await client.close()


class TestIncarnations:
    async def test_after_not_found_the_old_roles_never_come_back(self) -> None:
        clock = FakeClock()
        plane = FakeControlPlane(clock)
        plane.assigned["n1"] = [primary("shard-1", "n1", 1)]
        agent, client = make_agent(plane, ("cp-a:7000",))
        async with running(agent, clock):
            await run_until(clock, lambda: "shard-1" in agent.shards, 1.0, "the first snapshot")
            old_lease = agent.registration.lease_id  # type: ignore[union-attr]
            old_stream = plane.watches[0]
            # The lease expires; the leader moves the shard away (a new incarnation holds nothing).
            del plane.leases[old_lease]
            plane.assigned["n1"] = []
            await run_until(clock, lambda: agent.registrations == 2, 2 * TTL_S, "a new registration")
            new_lease = agent.registration.lease_id  # type: ignore[union-attr]
            # The old stream was cancelled before the node registered again.
            cancelled = plane.events.index(f"stream {old_stream.id} cancelled")
            registered = plane.events.index(f"registered n1 lease {new_lease:#x} on cp-a:7000")
            assert cancelled < registered, plane.events
            # A late update for the old incarnation, on its (cancelled) stream, changes nothing.
            old_stream.queue.put_nowait(
                pb.WatchAssignmentsResponse(revision=99, assignments=[primary("shard-1", "n1", 1)])
            )
            await run_until(clock, agent.assignments_synced.is_set, 1.0, "the new snapshot")
            await run_for(clock, 1.0)
            assert agent.shards == {}
            # The incarnation tag: an update delivered to the old incarnation is ignored.
            stale = pb.WatchAssignmentsResponse(revision=100, assignments=[primary("shard-1", "n1", 1)])
            agent._apply(stale, old_lease)
            assert agent.shards == {}
            # The new incarnation does get what is assigned to it now.
            plane.assign("n1", primary("shard-2", "n1", 3))
            await run_until(clock, lambda: "shard-2" in agent.shards, 1.0, "the new role")
            assert set(agent.shards) == {"shard-2"} and agent.registration.lease_id == new_lease  # type: ignore[union-attr]
            assert agent.session_state is SessionState.CONNECTED
        await client.close()

    async def test_refused_shard_statuses_cost_no_lease(self) -> None:
        # E.g. a shard of an older ring version: the control plane refuses the report; the
        # node keeps its lease by heartbeating without statuses, and says so once.
        clock = FakeClock()
        plane = FakeControlPlane(clock)
        plane.assigned["n1"] = [primary("shard-1", "n1", 1)]
        plane.refuse_statuses = True
        agent, client = make_agent(plane, ("cp-a:7000",))
        with structlog.testing.capture_logs() as logs:
            async with running(agent, clock) as stop:
                await run_until(clock, lambda: "shard-1" in agent.shards, 1.0, "the first snapshot")
                lease = agent.registration.lease_id  # type: ignore[union-attr]
                await run_for(clock, 3 * TTL_S, lambda: None)
                assert plane.alive(lease) and agent.registrations == 1 and not stop.is_set()
                assert agent.session_state is SessionState.CONNECTED
        refused = [e for e in logs if e["event"] == "heartbeat shard statuses refused; heartbeating without them"]
        assert len(refused) == 1
        await client.close()


class TestSupervisedFollowers:
    async def test_a_bug_in_the_assignment_handler_restarts_the_stream_and_the_state_is_current(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        clock = FakeClock()
        plane = FakeControlPlane(clock)
        agent, client = make_agent(plane)
        apply = agent._apply
        failures = 0

        def apply_once_broken(update: pb.WatchAssignmentsResponse, lease_id: int) -> None:
            nonlocal failures
            if update.assignments and not update.snapshot and failures == 0:
                failures += 1
                raise RuntimeError("injected bug")
            apply(update, lease_id)

        monkeypatch.setattr(agent, "_apply", apply_once_broken)
        with structlog.testing.capture_logs() as logs:
            async with running(agent, clock):
                await run_until(clock, agent.assignments_synced.is_set, 1.0, "the first snapshot")
                plane.assign("n1", primary("shard-3", "n1", 2))
                took_s = await run_until(clock, lambda: "shard-3" in agent.shards, 3.0, "the role after the crash")
                assert failures == 1 and took_s <= 0.3
                assert client.current_address == "cp-a:7000"  # a bug is not the replica's fault
        assert any(e["event"] == "loop step crashed; restarting (this is a bug)" for e in logs)
        await client.close()

    async def test_a_silent_assignment_stream_is_reopened_on_the_next_address_within_the_bound(self) -> None:
        clock = FakeClock()
        plane = FakeControlPlane(clock)
        agent, client = make_agent(plane)
        async with running(agent, clock):
            await run_until(clock, agent.assignments_synced.is_set, 1.0, "the first snapshot")
            await run_for(clock, 5.0)  # progress messages keep a healthy stream open
            assert len(plane.watches) == 1 and plane.watches[0].address == "cp-a:7000"
            plane.silent_streams.add("cp-a:7000")  # the stream hangs; heartbeats still answered
            plane.assign("n1", primary("shard-5", "n1", 7))
            took_s = await run_until(clock, lambda: "shard-5" in agent.shards, 5.0, "the change via b")
            assert took_s <= agent._stream_idle_timeout_s + 0.2
            assert plane.watches[-1].address == "cp-b:7000"
        await client.close()

    async def test_the_router_survives_a_bug_and_a_silent_stream(self, monkeypatch: pytest.MonkeyPatch) -> None:
        clock = FakeClock()
        plane = FakeControlPlane(clock)
        client = FakeClient(plane, ["cp-a:7000", "cp-b:7000"])
        router = RingRouter(client)
        start = asyncio.create_task(router.start())
        await run_until(clock, start.done, 1.0, "the router to start")
        await start
        on_message = router._on_message
        failures = 0

        def on_message_once_broken(message: common_pb2.Ring) -> None:
            nonlocal failures
            if message.version == 2 and failures == 0:
                failures += 1
                raise RuntimeError("injected bug")
            on_message(message)

        monkeypatch.setattr(router, "_on_message", on_message_once_broken)
        try:
            with structlog.testing.capture_logs() as logs:
                await run_for(clock, 5.0)  # idle but alive: progress messages, no reconnect
                assert len(plane.watches) == 1
                plane.set_ring(plane.ring.with_added_shard(ShardId("shard-4"), vnodes=4))
                took_s = await run_until(clock, lambda: router.ring.version == 2, 3.0, "ring v2 after the crash")
                assert failures == 1 and took_s <= 0.3
                assert any(e["event"] == "loop step crashed; restarting (this is a bug)" for e in logs)
                # A replica that hangs: the router notices within the idle bound and
                # follows the ring through the other one.
                plane.silent_streams.add("cp-a:7000")
                plane.set_ring(plane.ring.with_added_shard(ShardId("shard-5"), vnodes=4))
                took_s = await run_until(clock, lambda: router.ring.version == 3, 5.0, "ring v3 via b")
                assert took_s <= 3.0 + 0.2
                assert client.current_address == "cp-b:7000"
        finally:
            await router.stop()
            await client.close()


async def test_a_drained_node_leaves_only_once_no_shard_retains_its_copy() -> None:
    """No role left is not enough: while an assignment keeps the node in ``retained`` the
    control plane counts on its copy (a primary failing next would wait for it), so the
    node stays until that ends, then deregisters at its next heartbeat."""
    clock = FakeClock()
    plane = FakeControlPlane(clock)
    agent, client = make_agent(plane)
    async with running(agent, clock) as stop:
        lease = agent.registration.lease_id  # type: ignore[union-attr]
        plane.assign("n1", common_pb2.Assignment(shard_id="shard-1", epoch=2, primary="n2", replicas=["n3"],
                                                 retained=["n1"], incarnations={"n1": lease}))
        plane.draining = True
        with structlog.testing.capture_logs() as logs:
            await run_for(clock, 3 * TTL_S)
            assert not stop.is_set() and "deregistered n1" not in plane.events
            assert agent.retained_in == {"shard-1"} and not agent.shards
            waits = [e for e in logs if e["event"].startswith("drained of roles; leaving once")]
            assert len(waits) == 1 and waits[0]["retained_in"] == ["shard-1"]
            plane.assign("n1", common_pb2.Assignment(shard_id="shard-1", epoch=2, primary="n2", replicas=["n3"]))
            await run_until(clock, stop.is_set, TTL_S, "the drained node to leave")
        assert "deregistered n1" in plane.events
    await client.close()


async def test_a_retained_mark_of_an_earlier_incarnation_does_not_hold_a_drained_node() -> None:
    clock = FakeClock()
    plane = FakeControlPlane(clock)
    agent, client = make_agent(plane)
    async with running(agent, clock) as stop:
        plane.assign("n1", common_pb2.Assignment(shard_id="shard-1", epoch=2, primary="n2", replicas=["n3"],
                                                 retained=["n1"], incarnations={"n1": 1}))
        plane.draining = True
        await run_until(clock, stop.is_set, TTL_S, "the drained node to leave")
    assert "deregistered n1" in plane.events
    await client.close()
