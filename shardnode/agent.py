"""The node agent: registration, heartbeats and a clean leave.

Life of an agent::

    register --(ok)--> heartbeat every interval --(NOT_FOUND)--> register again
        |                   |  (UNAVAILABLE: next address, keep trying;
        |                   |   the lease may expire meanwhile, then NOT_FOUND)
        +---- SIGTERM ------+--> deregister (bounded wait) --> exit

Registration is retried with capped backoff while the control plane is unreachable,
and for a bounded time on ALREADY_EXISTS (a restarted node whose previous lease has not
expired yet, e.g. a pod that came back with a new IP). The time of the last successful
heartbeat is kept for self-fencing (:attr:`NodeAgent.lease_valid_until_s`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc.aio
import structlog

from bluemarble.client.control_plane import ControlPlaneClient, to_error
from bluemarble.core.errors import (
    AlreadyExists,
    BlueMarbleError,
    FatalError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from bluemarble.runtime import background
from bluemarble.runtime.clock import Clock, SystemClock
from bluemarble.v1 import common_pb2, controlplane_pb2

log = structlog.get_logger(__name__)


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


@dataclass
class Registration:
    lease_id: int
    ttl_s: float
    heartbeat_interval_s: float


class RegistrationRefused(FatalError):
    """The control plane refused this node for good (bad identity, duplicate id)."""


class NodeAgent:
    def __init__(
        self,
        identity: NodeIdentity,
        client: ControlPlaneClient,
        *,
        clock: Clock | None = None,
        already_exists_timeout_s: float = 60.0,
        max_backoff_s: float = 2.0,
    ):
        self.identity = identity
        self._client = client
        self._clock = clock or SystemClock()
        self._already_exists_timeout_s = already_exists_timeout_s
        self._max_backoff_s = max_backoff_s
        self.registration: Registration | None = None
        # Monotonic time until which our lease is certainly valid (last ack + TTL).
        self.lease_valid_until_s = 0.0
        self.registered = asyncio.Event()
        self.registrations = 0
        # What this node holds: shard -> (role, epoch), as last told by WatchAssignments.
        # Kept while the control plane is unreachable (static stability).
        self.shards: dict[str, ShardHolding] = {}
        self.assignments_revision = 0
        self.assignments_synced = asyncio.Event()
        self.draining = False
        self._beats: grpc.aio.StreamStreamCall[Any, Any] | None = None
        self._beats_address = ""
        self._watcher: asyncio.Task[None] | None = None

    def shard_statuses(self) -> list[common_pb2.ShardStatus]:
        return [
            common_pb2.ShardStatus(
                shard_id=shard, epoch=h.epoch, role=h.role, applied_lsn=h.applied_lsn  # type: ignore[arg-type]
            )
            for shard, h in sorted(self.shards.items())
        ]

    async def run(self, stop: asyncio.Event) -> None:
        """Registers, follows assignments and heartbeats until ``stop`` is set, or until
        a drain finished (then it deregisters and returns). Raises RegistrationRefused."""
        await self._register(stop)
        self._watcher = background.start(self._follow_assignments(stop), "assignments")
        try:
            await self._heartbeat_loop(stop)
        finally:
            self._close_beats(rotate=False)
            await background.stop(self._watcher)

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            assert self.registration is not None
            if await _wait(stop, self.registration.heartbeat_interval_s):
                return
            try:
                await self._heartbeat()
            except NotFound as e:
                log.warning("lease lost; dropping roles and registering again", reason=str(e))
                self.registration = None
                self.registered.clear()
                self.shards.clear()
                await self._register(stop)
                # Start the assignment stream afresh: its first message is a full
                # snapshot, so roles still recorded for this node come back at once.
                await background.stop(self._watcher)
                self.assignments_synced.clear()
                self._watcher = background.start(self._follow_assignments(stop), "assignments")
                continue
            except BlueMarbleError as e:
                if not e.retryable:
                    raise
                log.warning(
                    "heartbeat failed; will retry",
                    error=str(e),
                    lease_valid_for_s=round(self.lease_valid_until_s - self._clock.monotonic_s(), 2),
                )
                continue
            if self.draining and not self.shards and self.assignments_synced.is_set():
                log.info("drained: holding no shard any more; leaving")
                await self.deregister()
                stop.set()
                return

    async def _follow_assignments(self, stop: asyncio.Event) -> None:
        """Applies WatchAssignments for this node; reconnects (other address) on failure."""
        backoff_s = 0.1
        while not stop.is_set():
            request = controlplane_pb2.WatchAssignmentsRequest(node_id=self.identity.node_id)
            address = self._client.current_address
            try:
                async for update in self._client.control_plane().WatchAssignments(request):
                    self._apply(update)
                    backoff_s = 0.1
            except grpc.aio.AioRpcError as e:
                error = to_error(e, address)
                if not error.retryable:
                    log.error("assignment stream refused", error=str(error))
                else:
                    log.info("assignment stream broke; reconnecting", error=str(error))
                self._client.rotate()
            await _wait(stop, backoff_s)
            backoff_s = min(backoff_s * 2, self._max_backoff_s)

    def _apply(self, update: controlplane_pb2.WatchAssignmentsResponse) -> None:
        me = self.identity.node_id
        if update.snapshot:
            held = {a.shard_id for a in update.assignments}
            for shard in list(self.shards):
                if shard not in held:
                    del self.shards[shard]
        for shard in update.removed_shard_ids:
            self.shards.pop(shard, None)
        for a in update.assignments:
            role = common_pb2.SHARD_ROLE_PRIMARY if a.primary == me else common_pb2.SHARD_ROLE_REPLICA
            previous = self.shards.get(a.shard_id)
            lsn = previous.applied_lsn if previous else 0
            self.shards[a.shard_id] = ShardHolding(role, a.epoch, lsn)
            if previous is None or (previous.role, previous.epoch) != (role, a.epoch):
                log.info(
                    "shard role",
                    shard=a.shard_id,
                    role=common_pb2.ShardRole.Name(role).removeprefix("SHARD_ROLE_").lower(),
                    epoch=a.epoch,
                )
        self.assignments_revision = update.revision
        self.assignments_synced.set()

    async def _heartbeat(self) -> None:
        """One heartbeat over the long-lived HeartbeatStream (opened on first use, and
        again on the next address after it breaks). Raises the mapped BlueMarbleError."""
        assert self.registration is not None
        sent_at = self._clock.monotonic_s()
        request = controlplane_pb2.HeartbeatRequest(
            node_id=self.identity.node_id,
            lease_id=self.registration.lease_id,
            shards=self.shard_statuses(),
        )
        timeout_s = max(self.registration.heartbeat_interval_s, 0.2)
        if self._beats is None:
            self._beats_address = self._client.current_address
            self._beats = self._client.control_plane().HeartbeatStream()
        call = self._beats
        try:
            async with asyncio.timeout(timeout_s):
                await call.write(request)
                response = await call.read()
        except grpc.aio.AioRpcError as e:
            error = to_error(e, self._beats_address)
            if isinstance(error, NotFound | InvalidArgument):
                self._close_beats(rotate=False)
                raise error from e
            # Any other end of the stream (UNAVAILABLE, CANCELLED, INTERNAL from a
            # dying peer...) is a transport problem: reopen it, on the next address.
            self._close_beats(rotate=True)
            raise Unavailable(
                f"heartbeat stream to {self._beats_address} broke: {e.code().name} {e.details()}"
            ) from e
        except (TimeoutError, grpc.aio.UsageError, asyncio.InvalidStateError) as e:
            self._close_beats(rotate=True)
            raise Unavailable(
                f"heartbeat to {self._beats_address} got no answer within {timeout_s:g} s"
            ) from e
        if not isinstance(response, controlplane_pb2.HeartbeatResponse):  # grpc.aio.EOF
            self._close_beats(rotate=True)
            raise Unavailable(f"control plane {self._beats_address} closed the heartbeat stream")
        # The lease was refreshed at some point after sent_at: valid for TTL from then.
        self.lease_valid_until_s = sent_at + response.ttl_ms / 1000
        if response.draining and not self.draining:
            log.info("control plane is draining this node")
        self.draining = response.draining

    def _close_beats(self, rotate: bool) -> None:
        if self._beats is not None:
            self._beats.cancel()
            self._beats = None
            if rotate and self._client.current_address == self._beats_address:
                self._client.rotate()

    async def _register(self, stop: asyncio.Event) -> None:
        ident = self.identity
        request = controlplane_pb2.RegisterNodeRequest(
            node_id=ident.node_id,
            address=ident.address,
            region=ident.region,
            zone=ident.zone,
            capacity=ident.capacity,
        )
        backoff_s = 0.1
        first_refusal: float | None = None
        while not stop.is_set():
            sent_at = self._clock.monotonic_s()
            try:
                response: controlplane_pb2.RegisterNodeResponse = await self._client.call(
                    lambda s: s.RegisterNode, request
                )
            except AlreadyExists as e:
                now = self._clock.monotonic_s()
                first_refusal = first_refusal if first_refusal is not None else now
                if now - first_refusal >= self._already_exists_timeout_s:
                    raise RegistrationRefused(str(e)) from e
                log.warning("node id still held by an earlier registration; waiting", error=str(e))
            except BlueMarbleError as e:
                if not e.retryable:
                    raise RegistrationRefused(f"control plane refused registration: {e}") from e
                log.warning("cannot register yet; retrying", error=str(e), backoff_s=backoff_s)
            else:
                self.registration = Registration(
                    lease_id=response.lease_id,
                    ttl_s=response.ttl_ms / 1000,
                    heartbeat_interval_s=response.heartbeat_interval_ms / 1000,
                )
                self.lease_valid_until_s = sent_at + response.ttl_ms / 1000
                self.registrations += 1
                self.registered.set()
                log.info(
                    "registered",
                    node_id=ident.node_id,
                    lease=f"{response.lease_id:#x}",
                    ttl_ms=response.ttl_ms,
                    control_plane=self._client.current_address,
                )
                return
            await _wait(stop, backoff_s)
            backoff_s = min(backoff_s * 2, self._max_backoff_s)

    async def deregister(self, timeout_s: float = 3.0) -> bool:
        """Graceful leave; True if the control plane confirmed it within ``timeout_s``."""
        if self.registration is None:
            return False
        request = controlplane_pb2.DeregisterNodeRequest(
            node_id=self.identity.node_id, lease_id=self.registration.lease_id
        )
        try:
            await self._client.call(
                lambda s: s.DeregisterNode, request, timeout_s=timeout_s / 2, attempts=2
            )
        except BlueMarbleError as e:
            log.warning("deregistration failed; the lease will expire by itself", error=str(e))
            return False
        self.registration = None
        self.registered.clear()
        log.info("deregistered", node_id=self.identity.node_id)
        return True


async def _wait(stop: asyncio.Event, timeout_s: float) -> bool:
    """Waits up to ``timeout_s``; True if ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout_s)
    except TimeoutError:
        return False
    return True
