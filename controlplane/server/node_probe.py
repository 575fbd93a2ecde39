"""Asks shard nodes what they hold right now (``ShardNode.GetShardStatus``).

Used by the leader at promotion time: heartbeat reports may be a TTL old, and promoting
from a stale report could pick a replica that is behind. Channels are cached per
address; every call has a short deadline, and a node that does not answer simply
reports nothing (it ranks below every node that did).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

import grpc.aio
import structlog

from bluemarble.core.ids import NodeId, ShardId
from bluemarble.runtime.channels import insecure_channel
from bluemarble.v1 import shardnode_pb2, shardnode_pb2_grpc

log = structlog.get_logger(__name__)

_MAX_CHANNELS = 4096


class NodeProbe:
    def __init__(self, timeout_s: float = 0.5):
        self._timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> shardnode_pb2_grpc.ShardNodeStub:
        channel = self._channels.get(address)
        if channel is None:
            if len(self._channels) >= _MAX_CHANNELS:
                self._channels.clear()  # old channels are closed by garbage collection
            channel = self._channels[address] = insecure_channel(address)
        return shardnode_pb2_grpc.ShardNodeStub(channel)  # type: ignore[no-untyped-call]

    async def positions(
        self, addresses: Mapping[NodeId, str], shards: Iterable[ShardId]
    ) -> dict[tuple[ShardId, NodeId], int]:
        """Applied log position of each of ``shards`` on each node that answered."""
        wanted = set(shards)

        async def ask(node: NodeId, address: str) -> list[tuple[tuple[ShardId, NodeId], int]]:
            try:
                r = await self._stub(address).GetShardStatus(
                    shardnode_pb2.GetShardStatusRequest(), timeout=self._timeout_s
                )
            except grpc.aio.AioRpcError as e:
                log.info("node did not report its position", node_id=node, error=e.code().name)
                return []
            return [((ShardId(s.shard_id), node), s.applied_lsn) for s in r.shards if s.shard_id in wanted]

        results = await asyncio.gather(*(ask(n, a) for n, a in addresses.items()))
        return {key: lsn for pairs in results for key, lsn in pairs}

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()
