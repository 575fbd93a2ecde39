"""The ring record in etcd: created once, from the cluster config, by any replica."""

from __future__ import annotations

import structlog

from bluemarble.api.conversions import ring_to_proto
from bluemarble.core.ring import Ring, initial_ring
from bluemarble.v1 import common_pb2
from controlplane.store import codec
from controlplane.store.etcd import Compare, EtcdStore, Get, Put
from controlplane.store.keys import KeySchema
from controlplane.store.records import decode_ring

log = structlog.get_logger(__name__)


async def ensure_ring(store: EtcdStore, keys: KeySchema, config: common_pb2.ClusterConfig) -> Ring:
    """The stored ring; creates the initial one (version 1) if the cluster has none.

    Reads first and writes only when the ring is absent (etcd under its NOSPACE alarm
    refuses any transaction holding a Put, so a restart then must not need one); the write
    is create-if-absent in one transaction, so replicas starting together agree on one
    ring. Raises CorruptRecord when the stored ring does not decode, Unavailable when etcd
    does not answer or refuses the write.
    """
    key = keys.ring()
    stored = await store.get(key)
    if stored is not None:
        return decode_ring(stored)
    ring = initial_ring(config.shard_count, config.vnodes_per_shard)
    result = await store.txn(
        [Compare.absent(key)], [Put(key, codec.encode(ring_to_proto(ring)))], [Get(key)]
    )
    if result.succeeded:
        log.info("ring created", shards=config.shard_count, vnodes=config.vnodes_per_shard)
        return ring
    return decode_ring(result.reads[0][0])
