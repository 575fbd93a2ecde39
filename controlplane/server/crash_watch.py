"""Early failover on a crash: a node whose heartbeat stream closed and whose address
refuses connections loses its lease at once, instead of a TTL later (DESIGN.md flow 4).

When a node process dies, the kernel closes its sockets: the control-plane replica its
heartbeat stream was on sees the stream end from the node's side within milliseconds.
That alone proves nothing (the node may have moved its stream to another replica, or
reconnected), so after a short grace in which the node did not heartbeat through this
replica again, :class:`CrashWatch` tries a TCP connection to the node's registered
address. Only an active refusal (ECONNREFUSED: nothing listens there any more) counts:

* a process stopped with SIGSTOP keeps its listening socket, and the kernel still
  accepts connections into its backlog: not refused, the node keeps its lease;
* a partitioned node times out: not refused either. Pauses and partitions wait for the
  TTL, as they must, since such a node may come back believing it leads.

Then the lease of *that registration* is revoked (a node that registered again meanwhile
has a new lease and is untouched), and etcd deletes the node record at once.

Why any replica may do this on its own: revoking a lease only makes it expire early; it
grants nobody anything. What makes an early promotion safe is the leader's
fence-then-promote (:mod:`controlplane.server.reconciler`): the candidates are fenced at
the new epoch before their positions are read, so even if the revoked node were somehow
alive, nothing it writes at the old epoch can be acknowledged any more.

Streams ended by this replica's own shutdown never count: :meth:`CrashWatch.close` is
called before the server stops, and ends every pending check.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Awaitable, Callable

import structlog

from bluemarble.core.errors import BlueMarbleError
from bluemarble.core.ids import NodeId
from bluemarble.runtime import metrics
from bluemarble.runtime.clock import Clock

log = structlog.get_logger(__name__)

DEFAULT_CRASH_GRACE_S = 0.3
_MAX_TRACKED_NODES = 200_000
_MAX_PENDING_CHECKS = 10_000


class CrashWatch:
    def __init__(
        self,
        *,
        clock: Clock,
        grace_s: float,
        registration: Callable[[NodeId], tuple[int, str] | None],
        refuses_connections: Callable[[str], Awaitable[bool]],
        revoke: Callable[[NodeId, int], Awaitable[bool]],
    ):
        """``grace_s``: how long a node has to heartbeat again before its address is
        checked (0 disables the watch). ``registration``: the node's current (lease id,
        address), from the node mirror, or None. ``revoke``: revokes that lease of that
        node; False when it was gone already."""
        self._clock = clock
        self.grace_s = grace_s
        self._registration = registration
        self._refuses_connections = refuses_connections
        self._revoke = revoke
        self._last_beat_s: collections.OrderedDict[tuple[NodeId, int], float] = collections.OrderedDict()
        self._checks: set[asyncio.Task[None]] = set()
        self.closing = False
        self.suspected = 0  # streams that ended from a node's side (checks started)
        self.checked = 0  # checks that ran to a decision
        self.revoked = 0  # leases revoked

    def heartbeat(self, node: NodeId, lease_id: int) -> None:
        """Notes a heartbeat of ``node`` under ``lease_id`` through this replica."""
        key = (node, lease_id)
        self._last_beat_s[key] = self._clock.monotonic_s()
        self._last_beat_s.move_to_end(key)
        while len(self._last_beat_s) > _MAX_TRACKED_NODES:
            self._last_beat_s.popitem(last=False)

    def stream_ended(self, node: NodeId, lease_id: int) -> None:
        """The heartbeat stream of ``node`` (last heartbeat under ``lease_id``) ended from
        the node's side: check, after the grace, whether the process is gone."""
        if self.closing or self.grace_s <= 0 or len(self._checks) >= _MAX_PENDING_CHECKS:
            return
        self.suspected += 1
        task = asyncio.get_running_loop().create_task(self._check(node, lease_id, self._clock.monotonic_s()))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check(self, node: NodeId, lease_id: int, ended_at_s: float) -> None:
        try:
            await self._clock.sleep(self.grace_s)
            if self.closing or self._last_beat_s.get((node, lease_id), -math.inf) > ended_at_s:
                self.checked += 1
                return  # it heartbeats again through this replica
            registration = self._registration(node)
            if registration is None or registration[0] != lease_id:
                self.checked += 1
                return  # gone already, or registered again (a new lease: not ours to end)
            address = registration[1]
            refused = await self._refuses_connections(address)
            if not refused or self.closing:
                self.checked += 1
                return  # alive, paused or partitioned: the TTL decides
            log.warning(
                "node's heartbeat stream closed and its address refuses connections; revoking its lease",
                node_id=node, lease=f"{lease_id:#x}", address=address, grace_s=self.grace_s,
            )
            if await self._revoke(node, lease_id):
                self.revoked += 1
                metrics.LEASE_EXPIRATIONS.inc()  # ended early: the process is gone
            self.checked += 1
        except asyncio.CancelledError:
            raise
        except BlueMarbleError as e:
            log.warning("could not revoke the lease of a crashed node; its TTL will end it",
                        node_id=node, error=str(e))
        except Exception:
            log.exception("crash check failed (this is a bug); the node's TTL will end its lease", node_id=node)

    async def close(self) -> None:
        """Stops counting streams that end from now on (this replica's own shutdown ends
        them) and cancels the pending checks."""
        self.closing = True
        checks = list(self._checks)
        for task in checks:
            task.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
