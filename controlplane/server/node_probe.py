"""Asks shard nodes what they hold right now (``ShardNode.GetShardStatus``).

Used by the leader twice:

* before it gives a newly registered node any role (:meth:`NodeProbe.reachable`): a
  registration whose address nobody can reach must not be handed primaries;
* at promotion time (:meth:`NodeProbe.positions`): heartbeat reports may be a TTL old,
  and promoting from a stale report could pick a replica that is behind.

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
from collections.abc import Iterable, Mapping

import grpc.aio
import structlog

from bluemarble.core.ids import NodeId, ShardId
from bluemarble.runtime.channels import insecure_channel
from bluemarble.v1 import shardnode_pb2, shardnode_pb2_grpc

log = structlog.get_logger(__name__)


class NodeProbe:
    def __init__(self, timeout_s: float = 0.5, *, max_in_flight: int = 64):
        self._timeout_s = timeout_s
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self.open_channels = 0

    async def _status(self, node: NodeId, address: str) -> shardnode_pb2.GetShardStatusResponse | None:
        """GetShardStatus of the node at ``address``, or None if it does not answer."""
        async with self._in_flight:
            if not await self._accepts_connections(address):
                log.info("node did not answer a probe", node_id=node, error="connection refused or timed out")
                return None
            channel = insecure_channel(address)
            self.open_channels += 1
            try:
                stub = shardnode_pb2_grpc.ShardNodeStub(channel)  # type: ignore[no-untyped-call]
                response: shardnode_pb2.GetShardStatusResponse = await stub.GetShardStatus(
                    shardnode_pb2.GetShardStatusRequest(), timeout=self._timeout_s
                )
                return response
            except grpc.aio.AioRpcError as e:
                log.info("node did not answer a probe", node_id=node, error=e.code().name)
                return None
            finally:
                await channel.close(None)
                self.open_channels -= 1

    async def _accepts_connections(self, address: str) -> bool:
        host, _, port = address.rpartition(":")
        try:
            async with asyncio.timeout(self._timeout_s):
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except (OSError, TimeoutError, ValueError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def reachable(self, addresses: Mapping[NodeId, str]) -> set[NodeId]:
        """The nodes among ``addresses`` that answered GetShardStatus in time."""
        results = await asyncio.gather(*(self._status(n, a) for n, a in addresses.items()))
        return {node for node, r in zip(addresses, results, strict=True) if r is not None}

    async def positions(
        self, addresses: Mapping[NodeId, str], shards: Iterable[ShardId]
    ) -> dict[tuple[ShardId, NodeId], int]:
        """Applied log position of each of ``shards`` on each node that answered."""
        wanted = set(shards)
        results = await asyncio.gather(*(self._status(n, a) for n, a in addresses.items()))
        return {
            (ShardId(s.shard_id), node): s.applied_lsn
            for node, r in zip(addresses, results, strict=True)
            if r is not None
            for s in r.shards
            if s.shard_id in wanted
        }
