"""Decoders of the records the control plane mirrors from etcd (nodes, assignments, ring, config,
ForcePromote requests).

Each takes an etcd :class:`~controlplane.store.etcd.KeyValue` and returns the value the
mirror holds, or raises :class:`bluemarble.core.errors.CorruptRecord` naming the key.
"""

from __future__ import annotations

from bluemarble.api.conversions import ring_from_proto
from bluemarble.core.ring import Ring
from bluemarble.v1 import common_pb2, controlplane_pb2
from controlplane.store import codec
from controlplane.store.etcd import KeyValue


def decode_ring(kv: KeyValue) -> Ring:
    return ring_from_proto(codec.decode(kv.value, common_pb2.Ring, kv.key), kv.key)


def decode_assignment(kv: KeyValue) -> common_pb2.Assignment:
    return codec.decode(kv.value, common_pb2.Assignment, kv.key)


def decode_config(kv: KeyValue) -> common_pb2.ClusterConfig:
    return codec.decode(kv.value, common_pb2.ClusterConfig, kv.key)


def decode_node(kv: KeyValue) -> common_pb2.Node:
    return codec.decode(kv.value, common_pb2.Node, kv.key)


def decode_force_promotion(kv: KeyValue) -> controlplane_pb2.ForcePromoteRequest:
    return codec.decode(kv.value, controlplane_pb2.ForcePromoteRequest, kv.key)

