"""Conversions between the pure values (ring, placement) and their protobuf records.

The pure modules know nothing of protobuf; the stores and servicers know nothing of
their internals. Decoding validates: a record that does not describe a valid value
raises :class:`controlplane.codec.CorruptRecord` naming the key.
"""

from __future__ import annotations

from bluemarble.ids import NodeId, ShardId
from bluemarble.v1 import common_pb2
from controlplane import codec
from controlplane.etcd import KeyValue
from controlplane.placement import ShardAssignment
from controlplane.ring import Ring


def ring_to_proto(ring: Ring) -> common_pb2.Ring:
    return common_pb2.Ring(
        version=ring.version,
        hash=ring.hash_name,
        shards=[common_pb2.RingShard(shard_id=s, tokens=list(t)) for s, t in ring.shards],
    )


def ring_from_proto(message: common_pb2.Ring, key: str = "ring") -> Ring:
    try:
        return Ring.from_tokens(
            message.version,
            {ShardId(s.shard_id): list(s.tokens) for s in message.shards},
            hash_name=message.hash,
        )
    except (ValueError, TypeError) as e:
        raise codec.CorruptRecord(f"{key} does not hold a valid ring: {e}") from e


def decode_ring(kv: KeyValue) -> Ring:
    return ring_from_proto(codec.decode(kv.value, common_pb2.Ring, kv.key), kv.key)


def assignment_to_proto(a: ShardAssignment) -> common_pb2.Assignment:
    return common_pb2.Assignment(
        shard_id=a.shard_id,
        epoch=a.epoch,
        primary=a.primary or "",
        replicas=list(a.replicas),
        state=common_pb2.ASSIGNMENT_STATE_ACTIVE
        if a.primary
        else common_pb2.ASSIGNMENT_STATE_PRIMARY_LOST,
    )


def assignment_from_proto(message: common_pb2.Assignment) -> ShardAssignment:
    return ShardAssignment(
        shard_id=ShardId(message.shard_id),
        epoch=message.epoch,
        primary=NodeId(message.primary) if message.primary else None,
        replicas=tuple(NodeId(r) for r in message.replicas),
    )


def decode_assignment(kv: KeyValue) -> common_pb2.Assignment:
    return codec.decode(kv.value, common_pb2.Assignment, kv.key)


def decode_node(kv: KeyValue) -> common_pb2.Node:
    return codec.decode(kv.value, common_pb2.Node, kv.key)
