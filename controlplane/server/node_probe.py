"""Asks shard nodes what they hold right now, and fences them before a promotion.

Used by the leader:

* before it gives a newly registered node any role (:meth:`NodeProbe.reachable`): a
  registration whose address nobody can reach must not be handed primaries;
* at promotion time (:meth:`NodeProbe.fence`): every live candidate of a shard whose
  primary is lost is fenced at the new epoch, and answers with the position of its last
  log entry. Heartbeat reports may be a TTL old, and promoting from a stale report could
  pick a replica that is behind;

by every replica's ``ListAssignments(include_status=true)`` for members it has no recent
heartbeat report of (:meth:`NodeProbe.statuses`), and by the crash check of a closed
heartbeat stream (:meth:`NodeProbe.refuses_connections`).

Every call has a short deadline, and a node that does not answer simply reports nothing.
Each probe opens its own channel and closes it when the answer is in: probes are rare (a
registration, a failover), while a cache of open channels would keep a connection and
its keepalive pings per node alive for nothing (measured: about 1.6 ms of CPU per probe,
but a thousand idle cached channels cost more than that every few seconds). A TCP
connection is tried first, so an address where nothing listens is refused without
building a channel at all. At most ``max_in_flight`` probes run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import grpc.aio
import structlog

from bluemarble.api.conversions import log_position
from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.replication.position import ZERO, LogPosition
from bluemarble.runtime.channels import channel as open_channel
from bluemarble.v1 import common_pb2, shardnode_pb2, shardnode_pb2_grpc

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
_Stub = shardnode_pb2_grpc.ShardNodeStub


@dataclass(frozen=True, slots=True)
class FencedCopy:
    """What one candidate answered for one shard it was fenced on.

    ``epoch``: the fenced epoch now in force on the node (>= the one asked for; it
    refuses entries and acks of older epochs). ``last``: ``(epoch, lsn)`` of the last
    entry it holds (:data:`ZERO` for none). ``has_data``: whether it holds the shard's
    data at all (a replica added moments ago may not have bootstrapped yet).
    ``fenced``: False when the node does not implement Fence and ``last`` comes from
    ``GetShardStatus`` (the compatibility path of :meth:`NodeProbe.fence`).
    """

    epoch: int
    last: LogPosition
    has_data: bool
    fenced: bool = True


FenceAnswer = dict[ShardId, FencedCopy]
"""One node's answer to a fence: every shard it was asked about."""


@dataclass(frozen=True, slots=True)
class CopyView:
    """What one node answered GetShardStatus for one shard, in one answer: ``last``, the
    position of its last entry, and, if it is the shard's primary, ``counts``: the
    replicas whose acknowledgements its writes count (None when it is not the primary).
    Read together, they bound what a replica outside ``counts`` can have acknowledged:
    nothing past ``last``."""

    last: LogPosition
    counts: frozenset[NodeId] | None


class NodeProbe:
    def __init__(self, timeout_s: float = 0.5, *, max_in_flight: int = 64, replica_id: str = ""):
        self._timeout_s = timeout_s
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._replica_id = replica_id
        self._unfenced_logged: set[NodeId] = set()
        self.open_channels = 0

    async def _call(self, node: NodeId, address: str, what: str, rpc: Callable[[_Stub], Awaitable[_T]]) -> _T | None:
        """``rpc`` on a fresh channel to ``address``; None if the node does not answer."""
        async with self._in_flight:
            if not await self._accepts_connections(address):
                log.info("node did not answer", call=what, node_id=node, error="connection refused or timed out")
                return None
            channel = open_channel(address)
            self.open_channels += 1
            try:
                return await rpc(shardnode_pb2_grpc.ShardNodeStub(channel))  # type: ignore[no-untyped-call]
            except grpc.aio.AioRpcError as e:
                log.info("node did not answer", call=what, node_id=node, error=e.code().name)
                return None
            finally:
                await channel.close(None)
                self.open_channels -= 1

    async def _status(self, node: NodeId, address: str) -> shardnode_pb2.GetShardStatusResponse | None:
        """GetShardStatus of the node at ``address``, or None if it does not answer."""

        async def call(stub: _Stub) -> shardnode_pb2.GetShardStatusResponse:
            response: shardnode_pb2.GetShardStatusResponse = await stub.GetShardStatus(
                shardnode_pb2.GetShardStatusRequest(), timeout=self._timeout_s
            )
            return response

        return await self._call(node, address, "GetShardStatus", call)

    async def _connect(self, address: str) -> str:
        """Tries one TCP connection: "accepted", "refused" (ECONNREFUSED) or "failed"
        (timed out, unreachable, a bad address)."""
        host, _, port = address.rpartition(":")
        try:
            async with asyncio.timeout(self._timeout_s):
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except ConnectionRefusedError:
            return "refused"
        except (OSError, TimeoutError, ValueError):
            return "failed"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return "accepted"

    async def _accepts_connections(self, address: str) -> bool:
        return await self._connect(address) == "accepted"

    async def refuses_connections(self, address: str) -> bool:
        """True only when a TCP connection to ``address`` is actively refused
        (ECONNREFUSED): nothing listens there, so the process that registered it is gone.

        A process stopped with SIGSTOP still has its connections accepted by the kernel
        (into the listen backlog), and a partitioned one times out: both are False, as is
        any other error. The caller decides what a refusal means; this only observes.
        """
        return await self._connect(address) == "refused"

    async def reachable(self, addresses: Mapping[NodeId, str]) -> set[NodeId]:
        """The nodes among ``addresses`` that answered GetShardStatus in time."""
        results = await asyncio.gather(*(self._status(n, a) for n, a in addresses.items()))
        return {node for node, r in zip(addresses, results, strict=True) if r is not None}

    async def statuses(
        self, addresses: Mapping[NodeId, str]
    ) -> dict[NodeId, shardnode_pb2.GetShardStatusResponse]:
        """GetShardStatus of each node among ``addresses`` that answered in time."""
        results = await asyncio.gather(*(self._status(n, a) for n, a in addresses.items()))
        return {node: r for node, r in zip(addresses, results, strict=True) if r is not None}

    async def fence(
        self, targets: Mapping[NodeId, tuple[str, Mapping[ShardId, int]]]
    ) -> dict[NodeId, FenceAnswer | None]:
        """Fences each node of ``targets`` (node -> (address, shard -> new epoch)) in one
        ``ShardNode.Fence`` call per node, all nodes at once; returns each node's answer
        for every shard asked, or None for a node that did not answer in time.

        Compatibility path: a node answering UNIMPLEMENTED (a shard node from before
        fencing) is asked GetShardStatus instead; its copies then carry ``fenced=False``,
        ``last`` from ``(last_epoch, applied_lsn)``, and ``has_data`` true for every
        shard it reports holding. That keeps failover working with such nodes, without
        the guarantee the fence gives (see :meth:`Reconciler`'s promotion rule).
        """
        nodes = list(targets)
        results = await asyncio.gather(*(self._fence_one(n, *targets[n]) for n in nodes))
        return dict(zip(nodes, results, strict=True))

    async def _fence_one(self, node: NodeId, address: str, epochs: Mapping[ShardId, int]) -> FenceAnswer | None:
        request = shardnode_pb2.FenceRequest(
            requested_by=self._replica_id,
            shards=[shardnode_pb2.ShardFence(shard_id=s, epoch=e) for s, e in sorted(epochs.items())],
        )

        async def call(stub: _Stub) -> FenceAnswer | None:
            try:
                response: shardnode_pb2.FenceResponse = await stub.Fence(request, timeout=self._timeout_s)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                status: shardnode_pb2.GetShardStatusResponse = await stub.GetShardStatus(
                    shardnode_pb2.GetShardStatusRequest(), timeout=self._timeout_s
                )
                if node not in self._unfenced_logged:
                    self._unfenced_logged.add(node)
                    log.warning("node does not implement Fence; promoting from its GetShardStatus positions "
                                "(no fence: an old primary could still get entries acknowledged)", node_id=node)
                return _unfenced_answer(status, epochs)
            answer: FenceAnswer = {}
            for copy in response.shards:
                shard = ShardId(copy.shard_id)
                if shard in epochs:
                    last = log_position(copy.last.epoch, copy.last.lsn)
                    answer[shard] = FencedCopy(copy.epoch, last, copy.has_data)
            for shard in epochs.keys() - answer.keys():
                # Not mentioned: the node holds nothing of the shard. It was not fenced
                # either, which is harmless: with no data it cannot ack anything.
                answer[shard] = FencedCopy(0, ZERO, False)
            return answer

        return await self._call(node, address, "Fence", call)

    async def positions(
        self, addresses: Mapping[NodeId, str], shards: Iterable[ShardId]
    ) -> dict[tuple[ShardId, NodeId], LogPosition]:
        """Log position of each of ``shards`` on each node that answered GetShardStatus
        (unfenced; for operators and tests: promotion uses :meth:`fence`)."""
        return {key: view.last for key, view in (await self.views(addresses, shards)).items()}

    async def views(
        self, addresses: Mapping[NodeId, str], shards: Iterable[ShardId]
    ) -> dict[tuple[ShardId, NodeId], CopyView]:
        """:class:`CopyView` of each of ``shards`` on each node that answered GetShardStatus."""
        wanted = set(shards)
        results = await asyncio.gather(*(self._status(n, a) for n, a in addresses.items()))
        return {
            (ShardId(s.shard_id), node): CopyView(
                log_position(s.last_epoch, s.applied_lsn),
                frozenset(NodeId(r) for r in s.replicas) if s.role == common_pb2.SHARD_ROLE_PRIMARY else None,
            )
            for node, r in zip(addresses, results, strict=True)
            if r is not None
            for s in r.shards
            if s.shard_id in wanted
        }


def _unfenced_answer(status: shardnode_pb2.GetShardStatusResponse, epochs: Mapping[ShardId, int]) -> FenceAnswer:
    held = {ShardId(s.shard_id): s for s in status.shards}
    answer: FenceAnswer = {}
    for shard in epochs:
        s = held.get(shard)
        if s is None:
            answer[shard] = FencedCopy(0, ZERO, False, fenced=False)
        else:
            answer[shard] = FencedCopy(s.epoch, log_position(s.last_epoch, s.applied_lsn), True, fenced=False)
    return answer
