"""Decoders of the records the control plane mirrors from etcd (nodes, assignments, ring, config,
ForcePromote requests).

Each takes an etcd :class:`~controlplane.store.etcd.KeyValue` and returns the value the
mirror holds, or raises :class:`bluemarble.core.errors.CorruptRecord` naming the key.
"""

from __future__ import annotations

from bluemarble.api import cluster_config
from bluemarble.api.conversions import ring_from_proto
from bluemarble.core.errors import CorruptRecord
from bluemarble.core.ring import Ring
from bluemarble.v1 import common_pb2, controlplane_pb2
from controlplane.store import codec
from controlplane.store.etcd import KeyValue


def decode_ring(kv: KeyValue) -> Ring:
    return ring_from_proto(codec.decode(kv.value, common_pb2.Ring, kv.key), kv.key)


def decode_assignment(kv: KeyValue) -> common_pb2.Assignment:
    return codec.decode(kv.value, common_pb2.Assignment, kv.key)


def decode_config(kv: KeyValue) -> common_pb2.ClusterConfig:
    return parse_config(kv.value, kv.key)


def parse_config(data: bytes, key: str) -> common_pb2.ClusterConfig:
    """The cluster config stored at ``key``. Raises CorruptRecord naming the key when it
    does not parse, or parses into a config :func:`cluster_config.problems` rejects (``{}``
    is valid JSON with replication_factor 0 and no shards): nothing may act on such a
    config, and the error says what is wrong instead of a ValueError deep in placement."""
    config = codec.decode(data, common_pb2.ClusterConfig, key)
    found = cluster_config.problems(config)
    if found:
        shown = found[: cluster_config.MAX_REPORTED_PROBLEMS]
        if len(found) > len(shown):
            shown.append(f"and {len(found) - len(shown)} more")
        raise CorruptRecord(
            f"etcd key {key} holds an invalid ClusterConfig ({'; '.join(shown)}); SetConfig a whole valid one "
            "(expected_revision 0), or put one there with etcdctl (shard_count and vnodes_per_shard as the ring "
            "has them)"
        )
    return config


def decode_node(kv: KeyValue) -> common_pb2.Node:
    return codec.decode(kv.value, common_pb2.Node, kv.key)


def decode_force_promotion(kv: KeyValue) -> controlplane_pb2.ForcePromoteRequest:
    return codec.decode(kv.value, controlplane_pb2.ForcePromoteRequest, kv.key)

