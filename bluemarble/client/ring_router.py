"""Client-side routing: resolve player id -> shard locally, from a cached ring.

A game server or gateway that routes thousands of requests a second should not ask
the control plane for each one. :class:`RingRouter` fetches the ring once
(``GetRing``), then follows ``WatchRing`` in the background; lookups are local and
lock-free (the ring is an immutable value swapped atomically). Every process that holds
the same ring version maps a key to the same shard (invariant I6).

    router = RingRouter(ControlPlaneClient(["127.0.0.1:7000"]))
    await router.start()
    shard = router.shard_for("player-42")
    ...
    await router.stop()

Following the ring is supervised (:func:`bluemarble.runtime.retry.supervise`): a stream
that breaks, goes silent, or whose handling raises (a bug) is logged and reopened after
a jittered backoff, on the next control-plane address when the replica was at fault;
the router keeps routing with the ring it has meanwhile.

Detection bound: the router asks (``progress_interval_ms``) for a progress message (a
``Ring`` with no shards) on an idle WatchRing stream every second; a stream that
delivers nothing for ``stream_idle_timeout_s`` (default 3 s) is taken as dead (a hung or
partitioned replica keeps its socket open and raises no error by itself). So a hung
replica is noticed within 3 s, and the stream is open again on the next address within
about 3.1 s (plus the backoff, at most ``max_backoff_s``, when streams keep failing).
gRPC keepalive (``bluemarble.runtime.channels``) is the second line, at ~9 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from bluemarble.api.conversions import ring_from_proto
from bluemarble.client.control_plane import STREAM_PROGRESS_INTERVAL_MS, ControlPlaneClient, follow_stream
from bluemarble.core.errors import FailedPrecondition
from bluemarble.core.ids import ShardId
from bluemarble.core.ring import Ring
from bluemarble.runtime import background, retry
from bluemarble.runtime.clock import Clock, SystemClock
from bluemarble.v1 import common_pb2, controlplane_pb2

log = structlog.get_logger(__name__)

DEFAULT_STREAM_IDLE_TIMEOUT_S = 3.0


class RingRouter:
    def __init__(
        self,
        client: ControlPlaneClient | None,
        *,
        clock: Clock | None = None,
        stream_idle_timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S,
        max_backoff_s: float = 2.0,
    ):
        self._client = client
        self._clock: Clock = clock or (client.clock if client is not None else SystemClock())
        self._stream_idle_timeout_s = stream_idle_timeout_s
        self._policy = retry.RetryPolicy(
            initial_s=min(0.1, max_backoff_s), max_backoff_s=max_backoff_s, deadline_s=None
        )
        self._ring: Ring | None = None
        self._task: asyncio.Task[None] | None = None
        self.updated = asyncio.Event()  # set whenever a new ring version is installed
        # shard_for(player_id) -> ShardId: the current ring's bound lookup, swapped in
        # one assignment on every new version (no lock, no extra call per lookup).
        self.shard_for: Callable[[str], ShardId] = self._no_ring

    @classmethod
    def from_ring(cls, ring: Ring) -> RingRouter:
        """A router over a fixed ring (tests, benchmarks, offline tools)."""
        router = cls(None)
        router._install(ring)
        return router

    @property
    def ring(self) -> Ring:
        if self._ring is None:
            raise FailedPrecondition("the router has no ring yet; await start() first")
        return self._ring

    def _no_ring(self, player_id: str) -> ShardId:
        raise FailedPrecondition("the router has no ring yet; await start() first")

    async def start(self) -> None:
        """Fetches the ring (retrying per the client's policy), then follows changes."""
        if self._client is None:
            raise FailedPrecondition("this router has a fixed ring and no control plane")
        message = await self._client.call(lambda s: s.GetRing, controlplane_pb2.GetRingRequest())
        self._install(ring_from_proto(message))
        self._task = background.start(
            retry.supervise(self._follow_once, name="ring-router", policy=self._policy, clock=self._clock),
            "ring-router",
        )

    async def stop(self) -> None:
        await background.stop(self._task)
        self._task = None

    def _install(self, ring: Ring) -> None:
        current = self._ring
        if current is not None and ring.version < current.version:
            return  # an older ring from a lagging replica: keep ours
        self._ring = ring
        self.shard_for = ring.shard_for
        if current is None or ring.version != current.version:
            log.info("ring installed", version=ring.version, shards=len(ring.shard_ids))
        self.updated.set()

    def _on_message(self, message: common_pb2.Ring) -> None:
        if not message.shards:
            return  # a progress message: the stream is alive, the ring unchanged
        self._install(ring_from_proto(message))

    async def _follow_once(self) -> None:
        """One WatchRing stream, until it breaks. Raises Unavailable when it ends, breaks
        or stays silent for ``stream_idle_timeout_s`` (having moved the client on to the
        next address), or whatever handling a message raised."""
        assert self._client is not None
        request = controlplane_pb2.WatchRingRequest(progress_interval_ms=STREAM_PROGRESS_INTERVAL_MS)
        await follow_stream(
            self._client,
            lambda stub: stub.WatchRing(request),
            common_pb2.Ring,
            lambda message: self._on_message(message),
            clock=self._clock,
            idle_timeout_s=self._stream_idle_timeout_s,
            what="ring",
        )

