"""The node agent: registration, heartbeats driven by the lease deadline, the assignment
stream, and a clean leave.

Life of an agent::

    register ----> CONNECTED: heartbeat once the lease has <= 2/3 TTL left (every TTL/3)
       ^              |  no answer within the attempt timeout (TTL/6, >= 0.3 s), or an error
       |              v
       |           SUSPENDED: the next address at once, and the heartbeat again there at
       |              |  once; after a whole round of addresses, a short jittered backoff
       |              |  (an answer: CONNECTED again)
       |              v  lease_valid_until_s - safety margin reached
       |           LOST: the lease may have expired (an answer on the same lease after
       |              all: CONNECTED again)
       |              |  NOT_FOUND: the lease is gone
       +--------------+  stop the assignment watcher, drop every role, register (a new
                         incarnation), then start a fresh watcher (its snapshot)
    SIGTERM, or drained and holding nothing --> deregister (bounded wait) --> exit

Why the heartbeat is driven by the lease deadline: a replica stopped with SIGSTOP keeps
its sockets open and answers nothing. With "wait an interval, send, wait for a timeout,
wait an interval again", one hung replica could cost the node its lease. Here a
heartbeat is sent when the lease (as of the send time of the last answered one) has 2/3
of the TTL left, a late answer moves to the next address at once, and the next heartbeat
is scheduled from the lease deadline, not from when the last answer came. With TTL 3 s:
a heartbeat every 1 s; a hung replica costs 0.5 s, after which the other replica renews
the lease with 1.5 s to spare.

The assignment stream (WatchAssignments) is supervised (logged, backed off with jitter,
restarted; :func:`bluemarble.runtime.retry.supervise`), tagged with the lease id of the
registration it belongs to, and watched for silence. **Detection bound**: the agent asks
the replica (``progress_interval_ms``) for a progress message on an idle stream every
second, and a stream that delivers nothing for
``stream_idle_timeout_s`` (default 3 s) is cancelled and reopened on the next address,
normally within 0.1 s (up to ``max_backoff_s`` when streams keep failing). So a node
whose stream was on a hung replica learns assignment changes through another replica
within about 3.1 s of the hang, or of the change if that came later. gRPC keepalive
(``bluemarble.runtime.channels``, ~9 s) is the second line of defence.

The node keeps what it holds while the control plane is unreachable (static stability);
:attr:`NodeAgent.session_state` and :attr:`NodeAgent.lease_valid_until_s` say how far its
roles can be trusted (self-fencing: no STRONG operation as primary once LOST).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc.aio
import structlog

from bluemarble.client.control_plane import (
    STREAM_PROGRESS_INTERVAL_MS,
    ControlPlaneClient,
    follow_stream,
    to_error,
)
from bluemarble.core import validation
from bluemarble.core.errors import (
    AlreadyExists,
    BlueMarbleError,
    FatalError,
    InvalidArgument,
    NotFound,
    PeerStopping,
    SelfStalled,
    Unavailable,
)
from bluemarble.core.limits import echo
from bluemarble.runtime import background, channels, metrics, retry, stalls
from bluemarble.runtime.clock import Clock, run_with_timeout
from bluemarble.v1 import common_pb2, controlplane_pb2

log = structlog.get_logger(__name__)

REGISTER_GRACE_S = 1.0
"""How long a stopping node still waits for a registration answer already on its way."""

T = TypeVar("T")

DEFAULT_STREAM_IDLE_TIMEOUT_S = 3.0
MIN_HEARTBEAT_TIMEOUT_S = 0.3
PEER_RESTART_GRACE_S = 30.0
"""How long after a control-plane replica said it is shutting down a failed heartbeat to
it (connection refused while it restarts) is expected: logged at info, not a warning."""
MIN_LEASE_SAFETY_MARGIN_S = 0.2
REGISTER_ROUND_S = 30.0


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    address: str
    region: str = ""
    zone: str = ""
    capacity: int = 1


@dataclass(frozen=True)
class ShardHolding:
    role: int  # common_pb2.ShardRole
    epoch: int
    applied_lsn: int = 0


@dataclass(frozen=True)
class Registration:
    """One incarnation of this node: the lease it holds and the control plane's timing."""

    lease_id: int
    ttl_s: float
    heartbeat_interval_s: float


class SessionState(enum.Enum):
    """What this node may assume about its lease (kazoo's KazooState, for an etcd lease).

    ``CONNECTED``: the last heartbeat was answered in time. The lease is valid until at
    least :attr:`NodeAgent.lease_valid_until_s` (the send time of the last answered
    heartbeat plus the TTL, on this node's monotonic clock), so the control plane has
    given none of this node's roles away for lack of heartbeats: act on every role held.

    ``SUSPENDED``: a heartbeat is late (no answer within the attempt timeout) or failed,
    but the lease cannot have expired yet (now < lease_valid_until_s - safety margin).
    The roles are still this node's; keep serving them, STRONG operations included. The
    agent is trying the other control-plane addresses. Start nothing as primary that
    would have to finish after the lease deadline to be correct.

    ``LOST``: the lease may have expired (now >= lease_valid_until_s - safety margin), or
    certainly has (NOT_FOUND, left, or not registered yet). The control plane may have
    promoted another node, at a higher epoch, for any shard this node leads: serve no
    STRONG operation as primary (self-fencing); EVENTUAL reads and writes may go on.
    Left only when a heartbeat on the same lease is answered (the lease had not expired
    after all: CONNECTED) or by registering again (a new incarnation: roles dropped).
    """

    CONNECTED = "connected"
    SUSPENDED = "suspended"
    LOST = "lost"


class RegistrationRefused(FatalError):
    """The control plane refused this node for good (bad identity, duplicate id)."""


class NodeAgent:
    """Registers this node, keeps its lease, and follows its assignments.

    Timing (all on the injected clock; TTL from the registration):

    * heartbeat when the lease has ``<= TTL - heartbeat interval`` left (2/3 TTL);
    * a heartbeat attempt times out after ``heartbeat_timeout_s`` (default TTL/6, at
      least 0.3 s); then the next address, at once;
    * LOST from ``lease_valid_until_s - lease_safety_margin_s`` (default TTL/10, at least
      0.2 s) without an answered heartbeat;
    * an assignment stream silent for ``stream_idle_timeout_s`` (default 3 s) is dead.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        client: ControlPlaneClient,
        *,
        clock: Clock | None = None,
        already_exists_timeout_s: float = 60.0,
        max_backoff_s: float = 2.0,
        heartbeat_timeout_s: float | None = None,
        lease_safety_margin_s: float | None = None,
        stream_idle_timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S,
        cluster_uid: str = "",
    ):
        self.identity = identity
        # The cluster this node's data belongs to ("": a new data dir); sent with every
        # registration. Learned from the first one, and handed to on_cluster_uid to be
        # recorded with the data.
        self.cluster_uid = cluster_uid
        self.on_cluster_uid: Callable[[str], None] | None = None
        self._client = client
        self._clock: Clock = clock or client.clock
        self._already_exists_timeout_s = already_exists_timeout_s
        self._max_backoff_s = max_backoff_s
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._lease_safety_margin_s = lease_safety_margin_s
        self._stream_idle_timeout_s = stream_idle_timeout_s
        self._stream_policy = retry.RetryPolicy(
            initial_s=min(0.1, max_backoff_s), max_backoff_s=max_backoff_s, deadline_s=None
        )
        self.registration: Registration | None = None
        # Monotonic time until which our lease is certainly valid: the send time of the
        # last answered heartbeat (or of the registration) + TTL.
        self.lease_valid_until_s = 0.0
        self._state = SessionState.LOST
        self.registered = asyncio.Event()
        self.registered_at_s = 0.0  # monotonic time of this incarnation's registration
        self.registrations = 0
        # What this node holds: shard -> (role, epoch), as last told by WatchAssignments.
        # Kept while the control plane is unreachable (static stability).
        self.shards: dict[str, ShardHolding] = {}
        # Shards whose assignment keeps this incarnation in `retained`: no role, but the
        # control plane may still count on its copy (it may hold acknowledged writes the
        # other copies lack) until a staying copy is known to hold them. A drained node
        # leaves only once none does: gone earlier, a primary failing next would wait for it.
        self.retained_in: set[str] = set()
        self.assignments_revision = 0
        self.assignments_synced = asyncio.Event()
        self.draining = False
        # Stopping: heartbeats ask the control plane to drain this node first (leave()).
        self.leaving = False
        self.leave_declined = asyncio.Event()
        """Set when a heartbeat sent while leaving was answered without a drain."""
        # Whether heartbeats carry shard statuses (turned off, for this registration, if the
        # control plane refuses them: the lease must not be lost over a report).
        self._report_statuses = True
        self._beat_failures = retry.FailureLog()
        self._retained_logged: list[str] = []
        self._beats: grpc.aio.StreamStreamCall[Any, Any] | None = None
        self._beats_address = ""
        self._stopping_since: dict[str, float] = {}  # address -> when it said it is shutting down
        self._watcher: asyncio.Task[None] | None = None
        # The assignments of this incarnation's shards, and the addresses of the nodes
        # they name (from the stream's ``nodes``), for the data plane.
        self.assignments: dict[str, common_pb2.Assignment] = {}
        self.addresses: dict[str, str] = {}
        # Called (synchronously) after every applied assignment update and after roles
        # were dropped: the data plane re-reads ``assignments``.
        self.on_assignments: Callable[[], None] | None = None
        # What heartbeats report about the shards (the data plane's view: positions and
        # lag); None: roles and epochs only.
        self.status_provider: Callable[[], list[common_pb2.ShardStatus]] | None = None
        # What keeps the node from serving (text, since Unix ms), reported in heartbeats.
        self.trouble_provider: Callable[[], tuple[str, int]] | None = None
        # The cluster config (consistency per game system...), refetched whenever a
        # heartbeat answer carries a new config revision.
        self.config: common_pb2.ClusterConfig | None = None
        self.config_revision = 0
        self.config_loaded = asyncio.Event()
        self._config_task: asyncio.Task[None] | None = None
        self._beat_now = False
        self._beat_soon = asyncio.Event()  # wakes a heartbeat loop waiting for its next beat
        self._lag = metrics.ReplicationLag()

    # ---- session state ----

    def heartbeat_timeout_s(self) -> float:
        """How long one heartbeat attempt may take before the next address is tried."""
        if self._heartbeat_timeout_s is not None:
            return self._heartbeat_timeout_s
        ttl_s = self.registration.ttl_s if self.registration else 0.0
        return max(ttl_s / 6, MIN_HEARTBEAT_TIMEOUT_S)

    def lease_safety_margin_s(self) -> float:
        """How long before ``lease_valid_until_s`` the lease counts as possibly lost."""
        if self._lease_safety_margin_s is not None:
            return self._lease_safety_margin_s
        ttl_s = self.registration.ttl_s if self.registration else 0.0
        return max(ttl_s / 10, MIN_LEASE_SAFETY_MARGIN_S)

    @property
    def session_state(self) -> SessionState:
        """The session state right now (see :class:`SessionState`). Exact at every call:
        LOST from the moment the lease may have expired, whether or not the agent's loop
        has run since. (The loop logs the transition at most one heartbeat attempt
        timeout later: it does not interrupt an attempt in flight to do so.)"""
        if self._state is not SessionState.LOST and self._clock.monotonic_s() >= self._lost_at_s():
            return SessionState.LOST
        return self._state

    def _lost_at_s(self) -> float:
        return self.lease_valid_until_s - self.lease_safety_margin_s()

    def _set_state(self, state: SessionState, **why: Any) -> None:
        """Records ``state``, logging the transition once."""
        if state is self._state:
            return
        previous, self._state = self._state, state
        # A session this node ended itself (a graceful leave) is news, not a warning.
        level = log.info if state is SessionState.CONNECTED or why.get("reason") == "deregistered" else log.warning
        level(
            "session state",
            state=state.value,
            previous=previous.value,
            lease_valid_for_s=round(self.lease_valid_until_s - self._clock.monotonic_s(), 2),
            **why,
        )

    def _observe_state(self) -> None:
        """Catches the log up with time (LOST once the lease may have expired)."""
        self._set_state(self.session_state)

    def shard_statuses(self) -> list[common_pb2.ShardStatus]:
        if self.status_provider is not None:
            statuses = self.status_provider()
            # The replication lag gauges follow what heartbeats report (every TTL/3).
            self._lag.update({
                s.shard_id: (s.lag_entries, s.lag_ms / 1000)
                for s in statuses
                if s.role == common_pb2.SHARD_ROLE_PRIMARY and not s.on_disk_only
            })
            return statuses
        return [
            common_pb2.ShardStatus(
                shard_id=shard, epoch=h.epoch, role=h.role, applied_lsn=h.applied_lsn  # type: ignore[arg-type]
            )
            for shard, h in sorted(self.shards.items())
        ]

    # ---- main loop ----

    async def run(self, stop: asyncio.Event) -> None:
        """Registers, follows assignments and heartbeats until ``stop`` is set, or until
        a drain finished (then it deregisters and returns). Raises RegistrationRefused."""
        try:
            await self._register(stop)
            if self.registration is None:
                return  # stopped before registering
            self._start_watcher(stop)
            await self._heartbeat_loop(stop)
        finally:
            self._close_beats(rotate=False)
            await background.stop(self._watcher)
            self._watcher = None
            await background.stop(self._config_task)
            self._config_task = None

    def _beat_backoff(self) -> retry.Backoff:
        """Delays between rounds of failed heartbeats (every address tried): jittered,
        and never longer than one attempt timeout, so that a control plane coming back
        is found again well before the lease runs out."""
        cap_s = max(0.05, min(self._max_backoff_s, self.heartbeat_timeout_s()))
        return retry.Backoff(retry.RetryPolicy(initial_s=0.05, max_backoff_s=cap_s, deadline_s=None), self._clock)

    def leave(self) -> None:
        """From the next heartbeat on, asks the control plane to drain this node (it is
        stopping): its primaries are handed over and its copies made elsewhere, then
        :meth:`run` deregisters and returns as after any drain. :attr:`leave_declined` is
        set if the control plane answers without draining it."""
        self.leaving = True
        self._beat_now = True
        self._beat_soon.set()  # ask now, not at the next beat (up to a third of the TTL away)

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        backoff = self._beat_backoff()
        failures = 0  # heartbeats failed in a row
        while not stop.is_set():
            registration = self.registration
            if registration is None:
                return  # stopped while registering again
            self._observe_state()
            if failures == 0 and not self._beat_now:
                interval_s = min(registration.heartbeat_interval_s, registration.ttl_s / 3)
                due_s = self.lease_valid_until_s - (registration.ttl_s - interval_s)
                if self._clock.monotonic_s() < due_s:
                    if await self._sleep_until(stop, due_s):
                        return
                    continue
            try:
                await self._heartbeat(registration)
            except NotFound as e:
                await self._register_again(stop, str(e))
                # A new lease: the failures before it are over (a later one starts afresh,
                # not "still failing" since before the registration).
                self._beat_failures.recovered("heartbeat", self._clock.monotonic_s(), "registered again")
                failures = 0
                backoff = self._beat_backoff()
                continue
            except InvalidArgument as e:
                if not self._report_statuses:
                    raise  # refused even without statuses: this node's identity is wrong
                # The control plane refused what this node reports about its shards (e.g.
                # a shard of an older ring). The lease matters more than the report: go
                # on without statuses, and say so loudly.
                log.error("heartbeat shard statuses refused; heartbeating without them", error=str(e))
                self._report_statuses = False
                continue
            except BlueMarbleError as e:
                if not e.retryable:
                    raise
                failures += 1
                if isinstance(e, SelfStalled) and failures == 1:
                    # This process did not run (the stall watch warned): the replica is not
                    # to blame, and the same one is asked again at once.
                    log.info("heartbeat timed out while this process was stalled; heartbeating again", error=str(e))
                    continue
                if isinstance(e, PeerStopping) and failures == 1:
                    # A replica restarting (a rolling upgrade): expected, and the next
                    # address answers at once; nothing to warn about unless it does not.
                    log.info("control-plane replica shutting down; heartbeating through the next",
                             error=str(e), next=self._client.current_address)
                    continue
                if self.session_state is SessionState.CONNECTED:
                    self._set_state(SessionState.SUSPENDED, error=str(e))
                # One warning, then a summary every few seconds: while the control plane
                # or etcd is down this fails every fraction of a second.
                # A stall again: the same replica is asked again (the client did not move), but
                # the lease is at risk now, so it is a warning.
                self._beat_failures.failed(
                    "heartbeat", self._clock.monotonic_s(),
                    "heartbeat timed out again while this process stalls; heartbeating the same address"
                    if isinstance(e, SelfStalled) else "heartbeat failed; trying the next address",
                    error=str(e),
                    next=self._client.current_address,
                    lease_valid_for_s=round(self.lease_valid_until_s - self._clock.monotonic_s(), 2),
                )
                if failures % len(self._client.addresses) == 0:
                    # Every address failed once: back off a little before the next round
                    # (connections refused at once would otherwise spin).
                    if await self._sleep_until(stop, self._clock.monotonic_s() + backoff.next_delay_s()):
                        return
                continue
            if failures:
                self._beat_failures.recovered("heartbeat", self._clock.monotonic_s(), "heartbeats go through again")
            failures = 0
            self._beat_now = False
            backoff.reset()
            self._set_state(SessionState.CONNECTED)
            if self.draining and not self.shards and self.assignments_synced.is_set():
                if self.retained_in:
                    self._log_retained_wait()
                    continue
                log.info("drained: holding no shard any more; leaving")
                await self.deregister()
                stop.set()
                return

    def _log_retained_wait(self) -> None:
        """Once per set of shards: the drained node waits for the control plane to stop
        counting on its copies (about a placement round)."""
        shards = sorted(self.retained_in)
        if shards != self._retained_logged:
            self._retained_logged = shards
            log.info("drained of roles; leaving once no shard still counts on this node's copy",
                     retained_in=shards[:8], count=len(shards))

    async def _sleep_until(self, stop: asyncio.Event, due_s: float) -> bool:
        """Waits until ``due_s`` (waking at the LOST deadline on the way, to log it on
        time, and early when :meth:`leave` asks for a beat now); True if ``stop`` was set
        meanwhile."""
        wake_s = due_s
        if self._state is not SessionState.LOST:
            wake_s = min(wake_s, max(self._lost_at_s(), self._clock.monotonic_s()))
        timeout_s = max(wake_s - self._clock.monotonic_s(), 0.0)
        if stop.is_set() or self._beat_soon.is_set() or timeout_s == 0.0:
            self._beat_soon.clear()  # one early wake per leave(): backoffs stay backoffs
            return stop.is_set()
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._beat_soon.wait())]
        try:
            with contextlib.suppress(TimeoutError):
                first = asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                await run_with_timeout(self._clock, first, timeout_s)
        finally:
            for waiter in waiters:
                waiter.cancel()
        self._beat_soon.clear()
        return stop.is_set()

    async def _heartbeat(self, registration: Registration) -> None:
        """One heartbeat over the long-lived HeartbeatStream (opened on first use, and
        again on the next address after it broke or went silent). Raises the mapped
        BlueMarbleError: Unavailable when no answer came within the attempt timeout."""
        sent_at = self._clock.monotonic_s()
        trouble, trouble_since_ms = self.trouble_provider() if self.trouble_provider is not None else ("", 0)
        request = controlplane_pb2.HeartbeatRequest(
            node_id=self.identity.node_id,
            lease_id=registration.lease_id,
            shards=self.shard_statuses() if self._report_statuses else [],
            leaving=self.leaving,
            trouble=trouble,
            trouble_since_ms=trouble_since_ms,
        )
        timeout_s = self.heartbeat_timeout_s()
        if self._beats is None:
            self._beats_address = self._client.current_address
            self._beats = self._client.control_plane().HeartbeatStream()
        call, address = self._beats, self._beats_address

        async def exchange() -> object:
            await call.write(request)
            return await call.read()

        try:
            response = await run_with_timeout(self._clock, exchange(), timeout_s)
        except grpc.aio.AioRpcError as e:
            error = to_error(e, address)
            if isinstance(error, NotFound | InvalidArgument):
                self._close_beats(rotate=False)
                raise error from e
            if e.code() == grpc.StatusCode.INTERNAL and channels.CORE_BREAK in (e.details() or ""):
                # A write that raced the replica ending the stream gets gRPC's INTERNAL
                # (grpc/grpc#36066); the stream's own trailers say whether it was a shutdown.
                if await channels.ended_stopping(call):
                    error = PeerStopping(f"control plane {address} is shutting down")
            self._close_beats(rotate=True)
            if isinstance(error, PeerStopping):  # the replica ended its streams to shut down
                raise self._peer_stopping(address) from e
            if self._restarting(address):
                # Refused while it restarts, after it said it was shutting down (another
                # loop may have moved the client back to it meanwhile): expected too.
                raise PeerStopping(f"control plane {address} is restarting: {e.code().name}") from e
            # Any other end of the stream (UNAVAILABLE, CANCELLED, INTERNAL from a
            # dying peer...) is a transport problem: reopen it, on the next address.
            raise Unavailable(f"heartbeat stream to {address} broke: {e.code().name} {e.details()}") from e
        except TimeoutError as e:
            stalled_s = stalls.stalled_within(timeout_s)
            self._close_beats(rotate=not stalled_s)
            if stalled_s:
                raise SelfStalled(
                    f"heartbeat to {address} got no answer within {timeout_s:g} s, while this process itself did not "
                    f"run for {stalled_s:.1f} s"
                ) from e
            raise Unavailable(f"heartbeat to {address} got no answer within {timeout_s:g} s") from e
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as e:
            stopping = await channels.ended_stopping(call)
            self._close_beats(rotate=True)
            if stopping:
                raise self._peer_stopping(address) from e
            raise Unavailable(f"heartbeat stream to {address} is unusable: {e}") from e
        if not isinstance(response, controlplane_pb2.HeartbeatResponse):  # grpc.aio.EOF
            self._close_beats(rotate=True)
            raise Unavailable(f"control plane {address} closed the heartbeat stream")
        # The lease was refreshed at some point after sent_at: valid for TTL from then.
        self.lease_valid_until_s = max(self.lease_valid_until_s, sent_at + response.ttl_ms / 1000)
        if response.draining and not self.draining:
            log.info("control plane is draining this node")
        self.draining = response.draining
        if request.leaving and not response.draining:
            self.leave_declined.set()
        if response.config_revision and response.config_revision != self.config_revision:
            self._refresh_config()

    def _peer_stopping(self, address: str) -> PeerStopping:
        self._stopping_since[address] = self._clock.monotonic_s()
        return PeerStopping(f"control plane {address} is shutting down")

    def _restarting(self, address: str) -> bool:
        """Whether ``address`` said it was shutting down within :data:`PEER_RESTART_GRACE_S`."""
        since = self._stopping_since.get(address)
        return since is not None and self._clock.monotonic_s() - since < PEER_RESTART_GRACE_S

    def _peer_restarting(self) -> bool:
        """Whether some control-plane replica said it was shutting down lately."""
        return any(self._restarting(address) for address in list(self._stopping_since))

    def _refresh_config(self) -> None:
        """Fetches the cluster config in the background (once at a time)."""
        if self._config_task is not None and not self._config_task.done():
            return
        self._config_task = background.start(self._fetch_config(), "cluster-config")

    async def _fetch_config(self) -> None:
        try:
            response: controlplane_pb2.GetConfigResponse = await self._client.call(
                lambda s: s.GetConfig, controlplane_pb2.GetConfigRequest(), attempts=3, deadline_s=5.0
            )
        except BlueMarbleError as e:
            log.warning("cannot read the cluster config; keeping the last one", error=str(e))
            return
        if response.revision >= self.config_revision:
            first = self.config is None
            self.config, self.config_revision = response.config, response.revision
            self.config_loaded.set()
            if first:
                log.info("cluster config loaded", revision=response.revision)

    def _close_beats(self, rotate: bool) -> None:
        if self._beats is not None:
            self._beats.cancel()
            self._beats = None
            if rotate:
                self._client.rotate(away_from=self._beats_address)

    # ---- incarnations ----

    async def _register_again(self, stop: asyncio.Event, reason: str) -> None:
        """After NOT_FOUND: the old incarnation's roles are gone for good. The watcher
        stops first, so no update of the old incarnation lands after the roles are
        dropped; the new incarnation starts with a fresh stream (its snapshot)."""
        log.warning("lease lost; dropping roles and registering again", reason=reason)
        await background.stop(self._watcher)
        self._watcher = None
        self._close_beats(rotate=False)
        self.registration = None
        self.registered.clear()
        self._set_state(SessionState.LOST, reason="lease not found")
        self.shards.clear()
        self.retained_in.clear()
        self.assignments.clear()
        self.assignments_synced.clear()
        self.assignments_revision = 0
        self._notify_assignments()
        self._report_statuses = True
        self.draining = False
        await self._register(stop)
        if self.registration is not None:
            self._start_watcher(stop)

    async def _register(self, stop: asyncio.Event) -> None:
        """Registers a new incarnation; returns once registered or once ``stop`` is set.

        Retried (the one retry policy, in rounds of :data:`REGISTER_ROUND_S`, forever:
        a node is of no use unregistered) while the control plane is unreachable, and for
        ``already_exists_timeout_s`` on ALREADY_EXISTS (a restarted node whose previous
        lease has not expired yet). Raises RegistrationRefused for any other refusal.
        """
        ident = self.identity
        request = controlplane_pb2.RegisterNodeRequest(
            node_id=ident.node_id,
            address=ident.address,
            region=ident.region,
            zone=ident.zone,
            capacity=ident.capacity,
            cluster_uid=self.cluster_uid,
        )
        policy = retry.RetryPolicy(
            initial_s=min(0.1, self._max_backoff_s), max_backoff_s=self._max_backoff_s, deadline_s=REGISTER_ROUND_S
        )
        first_refusal_s: float | None = None

        def worth_retrying(error: BaseException) -> bool:
            nonlocal first_refusal_s
            if isinstance(error, AlreadyExists):
                now = self._clock.monotonic_s()
                first_refusal_s = now if first_refusal_s is None else first_refusal_s
                if now - first_refusal_s >= self._already_exists_timeout_s:
                    return False
                # Debug: retry.call's own "retrying" line says it (the first a warning,
                # then a summary every few seconds); this ran on every attempt.
                log.debug("node id still held by an earlier registration; waiting", error=str(error))
                return True
            return retry.is_retryable(error)

        async def attempt() -> tuple[float, controlplane_pb2.RegisterNodeResponse]:
            sent_at = self._clock.monotonic_s()
            response: controlplane_pb2.RegisterNodeResponse = await self._client.call(
                lambda s: s.RegisterNode, request, attempts=1
            )
            return sent_at, response

        while not stop.is_set():
            try:
                # A registration in flight when the node is told to stop is let finish
                # (briefly): the control plane may already hold it, and only its lease id
                # lets the node deregister at once instead of lingering for a TTL.
                outcome = await _unless_stopped(
                    stop,
                    retry.call(attempt, what="register", policy=policy, clock=self._clock, retry_if=worth_retrying),
                    grace_s=REGISTER_GRACE_S,
                )
            except AlreadyExists as e:
                raise RegistrationRefused(str(e)) from e
            except BlueMarbleError as e:
                if not e.retryable:
                    raise RegistrationRefused(f"control plane refused registration: {e}") from e
                log.warning("cannot register yet; still trying", error=str(e))
                continue
            if outcome is None:
                return  # stopped
            sent_at, response = outcome
            self._adopt_cluster_uid(response.cluster_uid)
            self.registration = Registration(
                lease_id=response.lease_id,
                ttl_s=response.ttl_ms / 1000,
                heartbeat_interval_s=response.heartbeat_interval_ms / 1000,
            )
            self.lease_valid_until_s = sent_at + response.ttl_ms / 1000
            self.registered_at_s = sent_at
            self.registrations += 1
            # Heartbeat at once: the open heartbeat stream is how the control plane
            # tells a crash from a pause (its reset), from the first second on.
            self._beat_now = True
            self.registered.set()
            self._set_state(SessionState.CONNECTED, lease=f"{response.lease_id:#x}")
            self._refresh_config()
            log.info(
                "registered",
                node_id=ident.node_id,
                lease=f"{response.lease_id:#x}",
                ttl_ms=response.ttl_ms,
                control_plane=self._client.current_address,
            )
            return

    def _adopt_cluster_uid(self, uid: str) -> None:
        """Records the cluster a registration was accepted by, the first time. Raises
        RegistrationRefused when the data belongs to another (a control plane that does
        not check it accepted the node)."""
        if not uid or uid == self.cluster_uid:
            return  # "": a control plane that has no identity to give
        if not validation.is_cluster_uid(uid):
            log.warning("the control plane's cluster identity is malformed; not recorded", cluster_uid=echo(uid))
            return
        if self.cluster_uid:
            raise RegistrationRefused(
                f"this node's data dir belongs to cluster {self.cluster_uid}, and the control plane's cluster is "
                f"{uid}: start it with its own cluster's control plane, or with an empty data dir"
            )
        if self.on_cluster_uid is not None:
            self.on_cluster_uid(uid)
        self.cluster_uid = uid
        log.info("data dir recorded as this cluster's", cluster_uid=uid)

    async def deregister(self, timeout_s: float = 3.0) -> bool:
        """Graceful leave; True if the control plane confirmed it within ``timeout_s``."""
        if self.registration is None:
            return False
        request = controlplane_pb2.DeregisterNodeRequest(
            node_id=self.identity.node_id, lease_id=self.registration.lease_id
        )
        try:
            await self._client.call(
                lambda s: s.DeregisterNode, request, timeout_s=timeout_s / 2, attempts=2, deadline_s=timeout_s
            )
        except BlueMarbleError as e:
            log.warning("deregistration failed; the lease will expire by itself", error=str(e))
            return False
        self.registration = None
        self.registered.clear()
        self._set_state(SessionState.LOST, reason="deregistered")
        log.info("deregistered", node_id=self.identity.node_id)
        return True

    # ---- assignments ----

    def _start_watcher(self, stop: asyncio.Event) -> None:
        assert self.registration is not None
        lease_id = self.registration.lease_id
        self._watcher = background.start(
            retry.supervise(
                lambda: self._follow_assignments(lease_id),
                name="assignments",
                policy=self._stream_policy,
                clock=self._clock,
                stop=stop,
                # A replica that said it is shutting down may leave a stream opened just
                # then silent until it stops: expected, like the end of its streams.
                quiet=self._peer_restarting,
            ),
            f"assignments-{lease_id:x}",
        )

    async def _follow_assignments(self, lease_id: int) -> None:
        """One WatchAssignments stream for the incarnation holding ``lease_id``, until it
        breaks. Raises Unavailable when it ends, breaks or delivers nothing (not even a
        progress message) for ``stream_idle_timeout_s``, having moved the client on to
        the next address; raises whatever applying an update raised (a bug: the
        supervisor logs it and starts a fresh stream, whose snapshot repairs the state)."""
        request = controlplane_pb2.WatchAssignmentsRequest(
            node_id=self.identity.node_id, progress_interval_ms=STREAM_PROGRESS_INTERVAL_MS
        )
        await follow_stream(
            self._client,
            lambda stub: stub.WatchAssignments(request),
            controlplane_pb2.WatchAssignmentsResponse,
            lambda update: self._apply(update, lease_id),
            clock=self._clock,
            idle_timeout_s=self._stream_idle_timeout_s,
            what="assignment",
        )

    def _apply(self, update: controlplane_pb2.WatchAssignmentsResponse, lease_id: int) -> None:
        """Applies one WatchAssignments message received by the incarnation ``lease_id``.

        An assignment that names this node under another incarnation (``incarnations``
        holds a different lease id: the roles of a registration this node no longer
        holds, e.g. before a crash) gives it no role: the control plane takes those roles
        back through promotion at a higher epoch (flow 1)."""
        if self.registration is None or self.registration.lease_id != lease_id:
            log.info("ignoring an assignment update of an earlier incarnation", lease=f"{lease_id:#x}")
            return
        if not update.snapshot and not update.assignments and not update.removed_shard_ids:
            return  # a progress message: the stream is alive, nothing changed
        me = self.identity.node_id
        for ref in update.nodes:
            self.addresses[ref.node_id] = ref.address
        if update.snapshot:
            held = {a.shard_id for a in update.assignments}
            for shard in list(self.shards):
                if shard not in held:
                    del self.shards[shard]
                    self.assignments.pop(shard, None)
            self.retained_in &= held
        for shard in update.removed_shard_ids:
            self.shards.pop(shard, None)
            self.assignments.pop(shard, None)
            self.retained_in.discard(shard)
        for a in update.assignments:
            member = a.primary == me or me in a.replicas
            incarnation = a.incarnations.get(me)
            if me in a.retained and incarnation in (None, lease_id):
                self.retained_in.add(a.shard_id)
            else:
                self.retained_in.discard(a.shard_id)
            if not member or (incarnation is not None and incarnation != lease_id):
                if self.shards.pop(a.shard_id, None) is not None:
                    log.info("shard role dropped", shard=a.shard_id, epoch=a.epoch,
                             why="not a member" if not member else "assigned to an earlier incarnation")
                self.assignments.pop(a.shard_id, None)
                continue
            role = common_pb2.SHARD_ROLE_PRIMARY if a.primary == me else common_pb2.SHARD_ROLE_REPLICA
            previous = self.shards.get(a.shard_id)
            lsn = previous.applied_lsn if previous else 0
            self.shards[a.shard_id] = ShardHolding(role, a.epoch, lsn)
            self.assignments[a.shard_id] = a
            if previous is None or (previous.role, previous.epoch) != (role, a.epoch):
                log.info(
                    "shard role",
                    shard=a.shard_id,
                    role=common_pb2.ShardRole.Name(role).removeprefix("SHARD_ROLE_").lower(),
                    epoch=a.epoch,
                )
        self.assignments_revision = update.revision
        self.assignments_synced.set()
        self._notify_assignments()

    def _notify_assignments(self) -> None:
        if self.on_assignments is not None:
            self.on_assignments()


async def _unless_stopped(stop: asyncio.Event, work: Coroutine[Any, Any, T], grace_s: float = 0.0) -> T | None:
    """Runs ``work`` until it finishes (its result, or its exception) or ``stop`` is set
    (then, after up to ``grace_s`` more for it to finish, cancels it and returns None)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and grace_s > 0:
            await asyncio.wait((task,), timeout=grace_s)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
    if task.cancelled():
        return None
    return task.result()
