"""Asks shard nodes what they hold right now (``ShardNode.GetShardStatus``).

Used by the leader twice:

* before it gives a newly registered node any role (:meth:`NodeProbe.reachable`): a
  registration whose address nobody can reach must not be handed primaries;
* at promotion time (:meth:`NodeProbe.positions`): heartbeat reports may be a TTL old,
  and promoting from a stale report could pick a replica that is behind.

Every call has a short deadline, and a node that does not answer simply reports nothing.
Channels are cached per address, at most ``max_channels`` of them, least recently used
evicted first; every channel dropped from the cache (evicted, or its address no longer
registered: :meth:`NodeProbe.retain`) is closed, never left to the garbage collector.
Probes run at most ``max_in_flight`` at a time.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Collection, Iterable, Mapping

import grpc.aio
import structlog

from bluemarble.core.ids import NodeId, ShardId
from bluemarble.runtime import background
from bluemarble.runtime.channels import insecure_channel
from bluemarble.v1 import shardnode_pb2, shardnode_pb2_grpc

log = structlog.get_logger(__name__)


class NodeProbe:
    def __init__(self, timeout_s: float = 0.5, *, max_channels: int = 1024, max_in_flight: int = 128):
        self._timeout_s = timeout_s
        self._max_channels = max_channels
        self._channels: collections.OrderedDict[str, grpc.aio.Channel] = collections.OrderedDict()
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def open_channels(self) -> int:
        return len(self._channels)

    def _stub(self, address: str) -> shardnode_pb2_grpc.ShardNodeStub:
        channel = self._channels.get(address)
        if channel is None:
            while len(self._channels) >= self._max_channels:
                _, evicted = self._channels.popitem(last=False)
                self._close_later(evicted)
            channel = self._channels[address] = insecure_channel(address)
        else:
            self._channels.move_to_end(address)
        return shardnode_pb2_grpc.ShardNodeStub(channel)  # type: ignore[no-untyped-call]

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = background.start(channel.close(None), "probe-channel-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def retain(self, addresses: Collection[str]) -> None:
        """Closes the channels of every address not in ``addresses`` (nodes that left)."""
        for address in [a for a in self._channels if a not in addresses]:
            self._close_later(self._channels.pop(address))

    async def _status(self, node: NodeId, address: str) -> shardnode_pb2.GetShardStatusResponse | None:
        async with self._in_flight:
            try:
                response: shardnode_pb2.GetShardStatusResponse = await self._stub(address).GetShardStatus(
                    shardnode_pb2.GetShardStatusRequest(), timeout=self._timeout_s
                )
                return response
            except grpc.aio.AioRpcError as e:
                log.info("node did not answer a probe", node_id=node, error=e.code().name)
                self._drop(address)
                return None

    def _drop(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            self._close_later(channel)

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

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), collections.OrderedDict()
        for channel in channels:
            await channel.close(None)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
