"""The cluster config record in etcd: created once with defaults, validated on change."""

from __future__ import annotations

import uuid

import structlog

from bluemarble.api import cluster_config
from bluemarble.core import validation
from bluemarble.core.errors import FailedPrecondition, Unavailable
from bluemarble.core.limits import echo
from bluemarble.v1 import common_pb2
from controlplane.store import codec
from controlplane.store.etcd import Compare, EtcdStore, Get, Put
from controlplane.store.keys import KeySchema

log = structlog.get_logger(__name__)

# Changing these re-shapes the ring; that is resharding, not a config edit.
FIXED_AFTER_CREATION = ("shard_count", "vnodes_per_shard")


class ConfigStore:
    def __init__(self, store: EtcdStore, keys: KeySchema):
        self._store = store
        self._key = keys.config()
        self._uid_key = keys.cluster_uid()

    async def ensure(self, defaults: common_pb2.ClusterConfig) -> tuple[common_pb2.ClusterConfig, int]:
        """Creates the config with ``defaults`` if the cluster has none; returns the stored one."""
        cluster_config.validate(defaults)
        result = await self._store.txn(
            [Compare.absent(self._key)],
            [Put(self._key, codec.encode(defaults))],
            [Get(self._key)],
        )
        if result.succeeded:
            log.info("cluster config created", key=self._key)
            return defaults, result.revision
        stored = result.reads[0][0]
        config = codec.decode(stored.value, common_pb2.ClusterConfig, self._key)
        return config, stored.mod_revision

    async def ensure_cluster_uid(self) -> str:
        """This cluster's identity: a random id the first control plane to start on the
        prefix creates, and every later one reads. Nodes record it in their data dir, so
        that a data dir of another cluster (same names, another etcd or prefix) is refused
        rather than read as this cluster's copies."""
        fresh = uuid.uuid4().hex
        result = await self._store.txn(
            [Compare.absent(self._uid_key)],
            [Put(self._uid_key, fresh.encode())],
            [Get(self._uid_key)],
        )
        if result.succeeded:
            log.info("cluster identity created", key=self._uid_key, cluster_uid=fresh)
            return fresh
        stored = result.reads[0][0].value.decode("ascii", "replace")
        if not validation.is_cluster_uid(stored):
            raise FailedPrecondition(f"{self._uid_key} holds no cluster identity ({echo(stored)}); "
                                     "delete the key to have a new one made")
        return stored

    async def get(self) -> tuple[common_pb2.ClusterConfig, int]:
        """The stored config and its etcd mod revision."""
        kv = await self._store.get(self._key)
        if kv is None:
            raise Unavailable(f"cluster config {self._key} is missing; a control plane creates it at start")
        return codec.decode(kv.value, common_pb2.ClusterConfig, self._key), kv.mod_revision

    async def set(
        self, config: common_pb2.ClusterConfig, expected_revision: int = 0
    ) -> tuple[common_pb2.ClusterConfig, int]:
        """Validates and stores ``config``; nothing is written when it is invalid.

        Raises InvalidArgument (bad values), FailedPrecondition (``expected_revision``
        is stale, or a field fixed at creation would change). A stale
        ``expected_revision`` is no error when the stored config is already ``config``
        (a retry of a write that landed): the answer is then the stored one.
        """
        cluster_config.validate(config)
        current, revision = await self.get()
        for name in FIXED_AFTER_CREATION:
            if getattr(config, name) != getattr(current, name):
                raise FailedPrecondition(
                    f"{name} cannot change after the cluster is created "
                    f"(stored {getattr(current, name)}, asked {getattr(config, name)}); "
                    "changing the shard layout is resharding"
                )
        if expected_revision > revision:
            raise FailedPrecondition(
                f"expected_revision {expected_revision} is ahead of the config's revision {revision}; "
                "give the revision GetConfig returned"
            )
        if expected_revision and expected_revision != revision and current == config:
            # A repeat of a write that landed (its answer was lost): the config is already
            # what was asked. Nothing is written; the caller gets what the first one would.
            return current, revision
        if expected_revision and expected_revision != revision:
            raise FailedPrecondition(
                f"config changed since revision {expected_revision} (now {revision}); "
                "read it again with GetConfig and reapply your change"
            )
        result = await self._store.txn(
            [Compare.mod_revision(self._key, revision)], [Put(self._key, codec.encode(config))]
        )
        if not result.succeeded:
            raise FailedPrecondition("config changed concurrently; read it again and reapply")
        log.info("cluster config updated", revision=result.revision)
        return config, result.revision
