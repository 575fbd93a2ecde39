"""The cluster config record in etcd: created once with defaults (with the cluster's
identity), validated on change and on every read."""

from __future__ import annotations

import uuid

import structlog

from bluemarble.api import cluster_config
from bluemarble.core import validation
from bluemarble.core.errors import CorruptRecord, FailedPrecondition, Unavailable
from bluemarble.core.limits import echo
from bluemarble.v1 import common_pb2
from controlplane.store import codec
from controlplane.store.etcd import Compare, EtcdStore, Get, Put
from controlplane.store.keys import KeySchema
from controlplane.store.records import decode_ring, parse_config

log = structlog.get_logger(__name__)

# Changing these re-shapes the ring; that is resharding, not a config edit.
FIXED_AFTER_CREATION = ("shard_count", "vnodes_per_shard")


class ConfigStore:
    def __init__(self, store: EtcdStore, keys: KeySchema):
        self._store = store
        self._key = keys.config()
        self._uid_key = keys.cluster_uid()
        self._ring_key = keys.ring()

    async def ensure(self, defaults: common_pb2.ClusterConfig) -> tuple[common_pb2.ClusterConfig, int]:
        """The stored config and its mod revision; a cluster that has none is created with
        ``defaults`` and a new identity (the cluster-uid key) in one transaction, so a
        config without an identity only comes from an older release or a deleted key
        (:meth:`ensure_cluster_uid`), never from replicas starting together.

        Reads first and writes only when the config is absent: etcd refuses every
        transaction holding a Put while its NOSPACE alarm is raised (even one whose compare
        fails), and a restart must not need a write to serve. Raises CorruptRecord when the
        stored config does not parse or is invalid, Unavailable when etcd does not answer
        or refuses the write (out of space)."""
        cluster_config.validate(defaults)
        kv = await self._store.get(self._key)
        if kv is not None:
            return parse_config(kv.value, self._key), kv.mod_revision
        fresh = uuid.uuid4().hex
        result = await self._store.txn(
            [Compare.absent(self._key), Compare.absent(self._uid_key)],
            [Put(self._key, codec.encode(defaults)), Put(self._uid_key, fresh.encode())],
            [Get(self._key)],
        )
        if result.succeeded:
            log.info("cluster config created", key=self._key)
            log.info("cluster identity created", key=self._uid_key, cluster_uid=fresh)
            return defaults, result.revision
        if result.reads[0]:  # another replica made it meanwhile
            stored = result.reads[0][0]
            return parse_config(stored.value, self._key), stored.mod_revision
        # The identity exists but the config does not (its key was deleted): the config
        # alone is made again, and the identity stays what the nodes recorded.
        result = await self._store.txn(
            [Compare.absent(self._key)], [Put(self._key, codec.encode(defaults))], [Get(self._key)]
        )
        if result.succeeded:
            log.warning("cluster config created again with the defaults (its key was missing, the cluster "
                        "identity was not)", key=self._key)
            return defaults, result.revision
        stored = result.reads[0][0]
        return parse_config(stored.value, self._key), stored.mod_revision

    async def ensure_cluster_uid(self) -> str:
        """This cluster's identity: a random id made with the cluster's config
        (:meth:`ensure`), read by every later control plane. Nodes record it in their data
        dir, so that a data dir of another cluster (same names, another etcd or prefix) is
        refused rather than read as this cluster's copies.

        Call after :meth:`ensure`. An identity missing then, beside an existing config, is
        made anew, loudly (an error line saying how to put the old one back): a cluster
        upgraded from a release without identities looks the same as one whose key was
        deleted, and the upgrade must go on (docs/decisions.md, "Start-up reads before it
        writes"). Reads first, writes only when absent (see :meth:`ensure`). Raises
        FailedPrecondition when the key holds no identity, Unavailable as :meth:`ensure`."""
        kv = await self._store.get(self._uid_key)
        if kv is None:
            fresh = uuid.uuid4().hex
            result = await self._store.txn(
                [Compare.absent(self._uid_key)],
                [Put(self._uid_key, fresh.encode())],
                [Get(self._uid_key)],
            )
            if result.succeeded:
                log.error(
                    "cluster identity was missing although the cluster's config exists: a new one was made. After "
                    "an upgrade from a release without cluster identities this is expected (nodes adopt it). "
                    "Otherwise the key was deleted, and nodes whose data dirs carry the old identity are refused "
                    "('belongs to another cluster (uid OLD; ...)'): put it back at once with "
                    f"`etcdctl put {self._uid_key} OLD`, then restart every control-plane replica",
                    key=self._uid_key,
                    cluster_uid=fresh,
                )
                return fresh
            kv = result.reads[0][0]  # another replica made it meanwhile
        stored = kv.value.decode("ascii", "replace")
        if not validation.is_cluster_uid(stored):
            raise FailedPrecondition(f"{self._uid_key} holds no cluster identity ({echo(stored)}); "
                                     "delete the key to have a new one made")
        return stored

    async def get(self) -> tuple[common_pb2.ClusterConfig, int]:
        """The stored config and its etcd mod revision. Raises CorruptRecord (DATA_LOSS)
        naming the key and what is wrong when the stored value does not parse or is not a
        valid config, Unavailable when the config is missing or etcd does not answer."""
        kv = await self._store.get(self._key)
        if kv is None:
            raise Unavailable(f"cluster config {self._key} is missing; a control plane creates it at start")
        return parse_config(kv.value, self._key), kv.mod_revision

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
        try:
            current, revision = await self.get()
        except CorruptRecord as unreadable:
            return await self._replace_unreadable(config, expected_revision, unreadable)
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

    async def _replace_unreadable(
        self, config: common_pb2.ClusterConfig, expected_revision: int, unreadable: CorruptRecord
    ) -> tuple[common_pb2.ClusterConfig, int]:
        """Replaces a stored config that does not parse or is invalid (edited by hand) with
        ``config``, valid already. The fields fixed at creation are checked against the
        ring, which was made from them and holds them (shards, tokens per shard), since the
        stored config cannot say; ``expected_revision`` is 0 or the unreadable value's mod
        revision (GetConfig cannot give it; etcdctl can). Raises FailedPrecondition
        otherwise, and CorruptRecord when the ring is unreadable too (nothing to check
        against)."""
        kv = await self._store.get(self._key)
        if kv is None:
            raise Unavailable(f"cluster config {self._key} is missing; a control plane creates it at start")
        ring_kv = await self._store.get(self._ring_key)
        if ring_kv is None:
            raise FailedPrecondition(
                f"the stored config is unreadable ({unreadable}) and the ring is missing, so the fields fixed at "
                "creation cannot be checked; put a valid config with etcdctl"
            )
        ring = decode_ring(ring_kv)
        fixed = {"shard_count": len(ring.shards), "vnodes_per_shard": len(ring.shards[0][1])}
        for name in FIXED_AFTER_CREATION:
            if getattr(config, name) != fixed[name]:
                raise FailedPrecondition(
                    f"the stored config is unreadable, and {name} {getattr(config, name)} is not the ring's "
                    f"({fixed[name]}): {name} cannot change after the cluster is created"
                )
        if expected_revision and expected_revision != kv.mod_revision:
            raise FailedPrecondition(
                f"expected_revision {expected_revision} is not the unreadable config's revision {kv.mod_revision}; "
                "give that revision, or 0"
            )
        result = await self._store.txn(
            [Compare.mod_revision(self._key, kv.mod_revision)], [Put(self._key, codec.encode(config))]
        )
        if not result.succeeded:
            raise FailedPrecondition("config changed concurrently; read it again and reapply")
        log.warning("an unreadable cluster config was replaced", revision=result.revision, was=str(unreadable))
        return config, result.revision
