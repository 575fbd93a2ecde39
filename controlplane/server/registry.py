"""The node registry: node records in etcd, each attached to the node's own lease.

A node's record exists exactly as long as its lease: etcd deletes it when the lease
expires (no heartbeats for the TTL) or is revoked (graceful leave). Any control-plane
replica can serve any call; the only per-replica state is a cache of node id -> lease
id that spares an etcd read on each heartbeat, and it is safe to be stale because a
refresh of a dead lease answers TTL 0.

Two live nodes never share an address: a registration from an address another live
node holds is refused (ALREADY_EXISTS) until that node leaves or its lease expires. The
check reads this replica's node mirror and confirms a hit in etcd, so it costs no etcd
read in the common case. It is not atomic with the write: two registrations from the
same address on two replicas within the mirror's propagation delay can both succeed.
"""

from __future__ import annotations

import functools

import structlog

from bluemarble.core import validation
from bluemarble.core.errors import Aborted, AlreadyExists, InvalidArgument, NotFound
from bluemarble.core.ids import NodeId
from bluemarble.runtime import metrics, retry
from bluemarble.runtime.clock import Clock
from bluemarble.v1 import common_pb2
from controlplane.store import codec
from controlplane.store.etcd import Compare, EtcdStore, KeyValue, Put
from controlplane.store.keys import KeySchema
from controlplane.store.watchcache import PrefixCache

log = structlog.get_logger(__name__)

_CAS_POLICY = retry.RetryPolicy(initial_s=0.01, max_backoff_s=0.1, deadline_s=2.0, max_attempts=3)
"""Compare-and-swap races on one node record (a concurrent registration or drain):
a few quick attempts, then Aborted to the caller, who may retry."""
_LEASE_CACHE_MAX = 200_000
_ADDRESS_INDEX = "address"


class NodeRegistry:
    def __init__(
        self,
        store: EtcdStore,
        keys: KeySchema,
        clock: Clock,
        nodes: PrefixCache[common_pb2.Node] | None = None,
    ):
        """``nodes``: this replica's node mirror, for the address check; without it (or
        while it is unhealthy) the check reads the node records from etcd."""
        self._store = store
        self._keys = keys
        self._clock = clock
        self._nodes = nodes
        if nodes is not None:
            nodes.add_index(_ADDRESS_INDEX, lambda n: _canonical_address(n.address))
        self._lease_by_node: dict[NodeId, int] = {}

    async def register(
        self,
        node_id: str,
        address: str,
        region: str,
        zone: str,
        capacity: int,
        ttl_s: int,
    ) -> tuple[int, int]:
        """Records the node under a new lease; returns (lease id, TTL in seconds).

        The same node id from the same address replaces its previous registration (a
        restart before the old lease expired); from another address while the old
        record lives, AlreadyExists. AlreadyExists too when another live node holds
        the address. InvalidArgument for bad fields, including an address no other
        process can reach (0.0.0.0, broadcast, multicast).
        """
        node = common_pb2.Node(
            node_id=validation.node_id(node_id),
            address=validation.reachable_address(address),
            region=validation.label(region, "region"),
            zone=validation.label(zone, "zone"),
            capacity=validation.capacity(capacity),
            state=common_pb2.NODE_STATE_ACTIVE,
        )
        key = self._keys.node(NodeId(node.node_id))
        await self._refuse_held_address(node)
        try:  # the common case, without the retry machinery (registrations come in bursts)
            return await self._register_once(key, node, ttl_s)
        except Aborted:
            pass
        return await retry.call(
            lambda: self._register_once(key, node, ttl_s),
            what=f"registration of {node.node_id}",
            policy=_CAS_POLICY,
            clock=self._clock,
            retry_if=lambda e: isinstance(e, Aborted),
        )

    async def _register_once(self, key: str, node: common_pb2.Node, ttl_s: int) -> tuple[int, int]:
        """One compare-and-swap attempt; Aborted when another write to the key won."""
        existing = await self._store.get(key)
        if existing is not None:
            old = codec.decode(existing.value, common_pb2.Node, key)
            if old.address != node.address:
                remaining_s = await self._store.lease_ttl(existing.lease)
                raise AlreadyExists(
                    f"node {node.node_id} is already registered from {old.address} "
                    f"(lease {existing.lease:#x}: its heartbeats renew it, and it expires "
                    f"{max(remaining_s, 0)} s at most after they stop); "
                    "stop that process or give this one another node id"
                )
        lease_id, granted_s = await self._store.grant_lease(ttl_s)
        node.lease_id = lease_id
        node.registered_at_ms = self._clock.wall_ms()
        guard = Compare.absent(key) if existing is None else Compare.mod_revision(key, existing.mod_revision)
        result = await self._store.txn([guard], [Put(key, codec.encode(node), lease=lease_id)])
        if not result.succeeded:
            await self._store.revoke_lease(lease_id)
            raise Aborted(f"node {node.node_id} registration raced with another; retry")
        if existing is not None and existing.lease != lease_id:
            # The record now hangs on the new lease; the old one holds nothing.
            await self._store.revoke_lease(existing.lease)
        self._remember(NodeId(node.node_id), lease_id)
        log.info(
            "node registered",
            node_id=node.node_id,
            address=node.address,
            zone=node.zone,
            lease=f"{lease_id:#x}",
            replaced=existing is not None,
        )
        return lease_id, granted_s

    async def _refuse_held_address(self, node: common_pb2.Node) -> None:
        """AlreadyExists when a live node other than ``node`` is registered at its address
        (compared canonically: host names ignore case, IPv6 hosts are compressed)."""
        wanted = _canonical_address(node.address)
        if self._nodes is not None and self._nodes.healthy:
            # O(1): the mirror keeps an index of node records by canonical address.
            holders = [self._keys.parse_node(key) for key in self._nodes.lookup(_ADDRESS_INDEX, wanted)]
        else:
            holders = [
                NodeId(n.node_id) for n in (await self.list_nodes())[0] if _canonical_address(n.address) == wanted
            ]
        suspects = [holder for holder in holders if holder != node.node_id]
        for other in suspects:  # the mirror may lag: confirm with etcd
            record = await self._record(NodeId(other))
            if record is None:
                continue
            holder = codec.decode(record.value, common_pb2.Node, record.key)
            if _canonical_address(holder.address) != wanted:
                continue
            remaining_s = await self._store.lease_ttl(record.lease)
            raise AlreadyExists(
                f"address {node.address} is held by live node {holder.node_id} "
                f"(lease {record.lease:#x}: its heartbeats renew it, and it expires "
                f"{max(remaining_s, 0)} s at most after they stop); "
                "give this node its own address, or stop that node first"
            )

    async def heartbeat(self, node_id: str, lease_id: int) -> int:
        """Refreshes the node's lease; returns the TTL in seconds.

        NotFound when the node is not registered under this lease (expired, revoked,
        replaced): the node must drop its roles and register again.
        """
        node = validation.node_id(node_id)
        _check_lease_id(lease_id)
        if self._lease_by_node.get(node) != lease_id:
            record = await self._record(node)
            if record is None or record.lease != lease_id:
                self._lease_by_node.pop(node, None)
                if record is None:  # its lease ended (a newer registration is no expiry)
                    metrics.LEASE_EXPIRATIONS.inc()
                raise NotFound(_not_registered(node, lease_id, record))
            self._remember(node, lease_id)
        ttl_s = await self._store.keepalive(lease_id)
        if ttl_s <= 0:
            self._lease_by_node.pop(node, None)
            metrics.LEASE_EXPIRATIONS.inc()
            raise NotFound(
                f"lease {lease_id:#x} of node {node} has expired; drop your roles and register again"
            )
        return ttl_s

    async def deregister(self, node_id: str, lease_id: int) -> None:
        """Graceful leave: revokes the node's lease, which deletes its record at once."""
        node = validation.node_id(node_id)
        _check_lease_id(lease_id)
        record = await self._record(node)
        if record is None or record.lease != lease_id:
            raise NotFound(_not_registered(node, lease_id, record))
        await self._store.revoke_lease(lease_id)
        self._lease_by_node.pop(node, None)
        log.info("node deregistered", node_id=node, lease=f"{lease_id:#x}")

    async def revoke(self, node: NodeId, lease_id: int) -> bool:
        """Ends registration ``lease_id`` of ``node`` at once (its record goes with it);
        False when that lease was gone already. Only that lease: a node that registered
        again holds another one and is untouched. Used on a detected crash
        (:mod:`controlplane.server.crash_watch`)."""
        _check_lease_id(lease_id)
        revoked = await self._store.revoke_lease(lease_id)
        if self._lease_by_node.get(node) == lease_id:
            self._lease_by_node.pop(node, None)
        return revoked

    async def drain(self, node_id: str) -> common_pb2.Node:
        """Marks the node DRAINING (idempotent). Its lease and roles stay until moved.

        The leader then moves its primaries away, then its replicas; the node deregisters
        itself once it holds nothing (it learns it is draining from heartbeats).
        """
        node = validation.node_id(node_id)
        return await retry.call(
            lambda: self._drain_once(node),
            what=f"drain of {node}",
            policy=_CAS_POLICY,
            clock=self._clock,
            retry_if=lambda e: isinstance(e, Aborted),
        )

    async def _drain_once(self, node: NodeId) -> common_pb2.Node:
        record = await self._record(node)
        if record is None:
            raise NotFound(f"node {node} is not registered; there is nothing to drain")
        message = codec.decode(record.value, common_pb2.Node, record.key)
        if message.state == common_pb2.NODE_STATE_DRAINING:
            return message
        message.state = common_pb2.NODE_STATE_DRAINING
        result = await self._store.txn(
            [Compare.mod_revision(record.key, record.mod_revision)],
            [Put(record.key, codec.encode(message), lease=record.lease)],
        )
        if not result.succeeded:
            raise Aborted(f"node {node} changed while marking it draining; retry")
        log.info("node draining", node_id=node)
        return message

    async def set_trouble(self, node: NodeId, lease_id: int, trouble: str, since_ms: int) -> None:
        """Records in ``node``'s registration (under ``lease_id`` only) what its heartbeat
        says keeps it from serving, for ListNodes and the status of every replica. One
        guarded write when it changes; a lost race is left to the next heartbeat."""
        record = await self._record(node)
        if record is None or record.lease != lease_id:
            return
        message = codec.decode(record.value, common_pb2.Node, record.key)
        if (message.trouble, message.trouble_since_ms) == (trouble, since_ms):
            return
        message.trouble, message.trouble_since_ms = trouble, since_ms
        result = await self._store.txn(
            [Compare.mod_revision(record.key, record.mod_revision)],
            [Put(record.key, codec.encode(message), lease=record.lease)],
        )
        if result.succeeded:
            if trouble:
                log.warning("node reports trouble", node_id=node, trouble=trouble)
            else:
                log.info("node trouble cleared", node_id=node)

    async def list_nodes(self) -> tuple[list[common_pb2.Node], int]:
        """Every registered node, sorted by id, and the etcd revision of the read."""
        kvs, revision = await self._store.get_prefix(self._keys.nodes_prefix())
        return [codec.decode(kv.value, common_pb2.Node, kv.key) for kv in kvs], revision

    async def get(self, node_id: NodeId) -> common_pb2.Node | None:
        record = await self._record(node_id)
        if record is None:
            return None
        return codec.decode(record.value, common_pb2.Node, record.key)

    async def _record(self, node: NodeId) -> KeyValue | None:
        return await self._store.get(self._keys.node(node))

    def _remember(self, node: NodeId, lease_id: int) -> None:
        if len(self._lease_by_node) >= _LEASE_CACHE_MAX:
            self._lease_by_node.clear()
        self._lease_by_node[node] = lease_id


@functools.lru_cache(maxsize=65_536)
def _canonical_address(address: str) -> str:
    """Cached: the address check compares against every registered node."""
    try:
        return validation.canonical_address(address)
    except ValueError:  # a record written before addresses were validated as they are now
        return address


def _check_lease_id(lease_id: int) -> None:
    if lease_id <= 0:
        raise InvalidArgument(
            f"lease_id {lease_id} is not a lease id; use the lease_id RegisterNode returned"
        )


def _not_registered(node: NodeId, lease_id: int, record: KeyValue | None) -> str:
    if record is None:
        return (
            f"node {node} is not registered (its lease expired or it left); "
            "drop your roles and register again"
        )
    return (
        f"lease {lease_id:#x} is not node {node}'s current lease ({record.lease:#x}); "
        "this process was replaced or its lease expired: register again"
    )
