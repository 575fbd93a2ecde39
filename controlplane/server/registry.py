"""The node registry: node records in etcd, each attached to the node's own lease.

A node's record exists exactly as long as its lease: etcd deletes it when the lease
expires (no heartbeats for the TTL) or is revoked (graceful leave). Any control-plane
replica can serve any call; the only per-replica state is a cache of node id -> (lease
id, the record's mod_revision when this replica last read it from etcd) that spares an
etcd read on each heartbeat. The cache alone is not enough: a record deleted or
rewritten by hand (``etcdctl del``, or a put that detaches it from its lease) leaves the
lease alive, and a heartbeat that only refreshed the lease would keep a node the leader
counts as gone. So a heartbeat is served from the cache only while the node mirror holds
the record at the mod_revision the cache entry was read at; otherwise (the mirror not
caught up with a fresh registration yet, included) the registration is read from etcd
again, and answered NOT_FOUND when the record is gone, detached from the lease, or
unreadable: the node registers again.

Two live nodes never share an address: a registration from an address another live
node holds is refused (ALREADY_EXISTS) until that node leaves or its lease expires. The
check reads this replica's node mirror and confirms a hit in etcd, so it costs no etcd
read in the common case. It is not atomic with the write: two registrations from the
same address on two replicas within the mirror's propagation delay can both succeed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import structlog

from bluemarble.core import validation
from bluemarble.core.errors import Aborted, AlreadyExists, BlueMarbleError, CorruptRecord, InvalidArgument, NotFound
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
_ERROR_CHARS = 160
"""What a warning quotes, at most, of why a record did not decode."""


@dataclass(frozen=True)
class UnreadableNode:
    """A key below the nodes prefix whose value is no Node (written by hand, or damaged).

    ``lease`` is 0 when the key is attached to no lease: then it never expires and only
    a delete (or a registration of that node id, which replaces it) removes it; -1 when
    it is not known (a record seen in a mirror, which keeps no leases)."""

    key: str
    mod_revision: int
    lease: int
    error: str


@dataclass(frozen=True)
class NodeListing:
    """The registered nodes (sorted by id), the etcd revision of the read, and the keys
    that hold no readable Node (left out of ``nodes``)."""

    nodes: list[common_pb2.Node]
    revision: int
    unreadable: tuple[UnreadableNode, ...]


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
        # node -> (lease id, the record's mod_revision when it was last read from etcd).
        self._lease_by_node: dict[NodeId, tuple[int, int]] = {}
        self._logged_unreadable: dict[str, int] = {}  # key -> mod_revision already logged

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
        old = None if existing is None else _readable(existing)
        if existing is not None and (old is None or not existing.lease):
            # Belongs to no live registration: unreadable, or attached to no lease (a
            # put by hand detached it): it would never expire. Replaced, as a restart's is.
            log.warning(
                "replacing a node record that belongs to no live registration",
                key=key,
                lease=f"{existing.lease:#x}",
                why="unreadable" if old is None else "attached to no lease",
            )
        elif existing is not None and old is not None and old.address != node.address:
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
        if existing is not None and old is not None and existing.lease and existing.lease != lease_id:
            # The record now hangs on the new lease; the old one holds nothing.
            await self._store.revoke_lease(existing.lease)
        self._remember(NodeId(node.node_id), lease_id, result.revision)
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
            holder = None if record is None or not record.lease else _readable(record)
            if record is None or holder is None:  # gone, or no live registration (replaceable)
                continue
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
        replaced, or its record deleted, detached from the lease or unreadable): the node
        must drop its roles and register again. A lease this replica knew as the node's
        whose record is gone or detached is revoked: it holds nothing any more.
        """
        node = validation.node_id(node_id)
        _check_lease_id(lease_id)
        cached = self._lease_by_node.get(node)
        if cached is None or cached[0] != lease_id or not self._mirror_agrees(node, cached[1]):
            await self._confirm_registration(node, lease_id, known=cached is not None and cached[0] == lease_id)
        ttl_s = await self._store.keepalive(lease_id)
        if ttl_s <= 0:
            self._lease_by_node.pop(node, None)
            metrics.LEASE_EXPIRATIONS.inc()
            raise NotFound(
                f"lease {lease_id:#x} of node {node} has expired; drop your roles and register again"
            )
        return ttl_s

    def _mirror_agrees(self, node: NodeId, verified_revision: int) -> bool:
        """True when the node mirror holds ``node``'s record at mod_revision
        ``verified_revision``, the one this replica read from etcd (or wrote) last: then
        nothing changed it since, and the heartbeat needs no etcd read.

        False sends the heartbeat to etcd: the record deleted, rewritten (by hand, a drain,
        a trouble report) or unreadable; no healthy mirror; or a mirror that has not
        reached that revision yet (a heartbeat right after the registration, before the
        watch delivered it: the mirror's absence of the record proves nothing then)."""
        mirror = self._nodes
        if mirror is None or not mirror.healthy or mirror.revision < verified_revision:
            return False
        return mirror.mod_revisions.get(self._keys.node(node)) == verified_revision

    async def _confirm_registration(self, node: NodeId, lease_id: int, *, known: bool) -> None:
        """Reads ``node``'s record from etcd: remembers it when it is a readable record
        attached to ``lease_id``, else raises NotFound. ``known``: this replica had seen
        ``lease_id`` as the node's (so revoking it, once its record is gone, is safe)."""
        record = await self._record(node)
        if record is not None and record.lease == lease_id and _readable(record) is not None:
            self._remember(node, lease_id, record.mod_revision)
            return
        self._lease_by_node.pop(node, None)
        if record is None:  # its lease ended (a newer registration is no expiry), or the key was deleted
            metrics.LEASE_EXPIRATIONS.inc()
        if known and (record is None or not record.lease):
            # Deleted or detached by hand: the lease may live on, holding nothing.
            # Revoked so that it does not outlive the node's next registration.
            with_lease = await self._revoke_quietly(lease_id)
            if with_lease:
                log.warning(
                    "node record gone or detached while its lease lived; revoked the lease, "
                    "the node registers again",
                    node_id=node,
                    lease=f"{lease_id:#x}",
                    record="deleted" if record is None else "attached to no lease",
                )
        raise NotFound(_not_registered(node, lease_id, record))

    async def _revoke_quietly(self, lease_id: int) -> bool:
        try:
            return await self._store.revoke_lease(lease_id)
        except BlueMarbleError as e:  # left to expire: the node no longer refreshes it
            log.info("could not revoke an orphaned node lease; it expires", lease=f"{lease_id:#x}", error=str(e))
            return False

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
        cached = self._lease_by_node.get(node)
        if cached is not None and cached[0] == lease_id:
            self._lease_by_node.pop(node, None)
        return revoked

    async def drain(self, node_id: str) -> common_pb2.Node:
        """Marks the node DRAINING (idempotent). Its lease and roles stay until moved.

        The leader then moves its primaries away, then its replicas; the node deregisters
        itself once it holds nothing (it learns it is draining from heartbeats).
        """
        node, _ = await self._set_state(
            node_id, common_pb2.NODE_STATE_DRAINING, "node draining",
            "there is nothing to drain (a drained node leaves once its roles have moved: a drain that finished ends "
            "like this)")
        return node

    async def undrain(self, node_id: str) -> tuple[common_pb2.Node, bool]:
        """Marks a DRAINING node ACTIVE again (idempotent): placement gives it roles back.
        Returns the record and whether it was draining."""
        return await self._set_state(
            node_id, common_pb2.NODE_STATE_ACTIVE, "node undrained: it takes roles again",
            "a drain that finished ends with the node gone: start it again to give it roles")

    async def _set_state(self, node_id: str, state: common_pb2.NodeState, event: str, missing: str
                         ) -> tuple[common_pb2.Node, bool]:
        """Sets the node record's state (idempotent), with its lease, by a guarded write
        retried on a lost race; NotFound saying ``missing`` for a node not registered.
        Returns the record and whether this call changed it."""
        node = validation.node_id(node_id)

        async def once() -> tuple[common_pb2.Node, bool]:
            record = await self._record(node)
            if record is None:
                raise NotFound(f"node {node} is not registered; {missing}")
            message = codec.decode(record.value, common_pb2.Node, record.key)
            if message.state == state:
                return message, False
            message.state = state
            result = await self._store.txn(
                [Compare.mod_revision(record.key, record.mod_revision)],
                [Put(record.key, codec.encode(message), lease=record.lease)],
            )
            if not result.succeeded:
                raise Aborted(f"node {node} changed while marking it {common_pb2.NodeState.Name(state)}; retry")
            self._rewritten(node, record.lease, result.revision)
            log.info(event, node_id=node)
            return message, True

        return await retry.call(once, what=f"{event} ({node})", policy=_CAS_POLICY, clock=self._clock,
                                retry_if=lambda e: isinstance(e, Aborted))

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
            self._rewritten(node, lease_id, result.revision)
            if trouble:
                log.warning("node reports trouble", node_id=node, trouble=trouble)
            else:
                log.info("node trouble cleared", node_id=node)

    async def list_nodes(self) -> tuple[list[common_pb2.Node], int]:
        """Every registered node with a readable record, sorted by id, and the etcd
        revision of the read. Unreadable records are left out (see :meth:`read_nodes`)."""
        listing = await self.read_nodes()
        return listing.nodes, listing.revision

    async def read_nodes(self) -> NodeListing:
        """Every key below the nodes prefix, read from etcd at one revision.

        A key whose value is no Node does not fail the read (one bad record would hide
        every good one): it is listed in ``unreadable`` and logged as a warning once per
        key and mod_revision, not on every call."""
        kvs, revision = await self._store.get_prefix(self._keys.nodes_prefix())
        nodes: list[common_pb2.Node] = []
        unreadable: list[UnreadableNode] = []
        for kv in kvs:
            try:
                nodes.append(codec.decode(kv.value, common_pb2.Node, kv.key))
            except CorruptRecord as e:
                unreadable.append(UnreadableNode(kv.key, kv.mod_revision, kv.lease, str(e)[:_ERROR_CHARS]))
        logged = {u.key: self._logged_unreadable[u.key] for u in unreadable if u.key in self._logged_unreadable}
        for u in unreadable:
            if logged.get(u.key) != u.mod_revision:
                logged[u.key] = u.mod_revision
                log.warning(
                    "unreadable node record left out of the node list; delete it"
                    + ("" if u.lease else " (attached to no lease, it never expires)"),
                    key=u.key,
                    mod_revision=u.mod_revision,
                    lease=f"{u.lease:#x}",
                    error=u.error,
                )
        self._logged_unreadable = logged
        return NodeListing(nodes, revision, tuple(unreadable))

    async def get(self, node_id: NodeId) -> common_pb2.Node | None:
        record = await self._record(node_id)
        if record is None:
            return None
        return codec.decode(record.value, common_pb2.Node, record.key)

    async def _record(self, node: NodeId) -> KeyValue | None:
        return await self._store.get(self._keys.node(node))

    def _remember(self, node: NodeId, lease_id: int, mod_revision: int) -> None:
        """``node``'s record, attached to ``lease_id``, was at ``mod_revision`` in etcd."""
        if len(self._lease_by_node) >= _LEASE_CACHE_MAX:
            self._lease_by_node.clear()
        self._lease_by_node[node] = (lease_id, mod_revision)

    def _rewritten(self, node: NodeId, lease_id: int, mod_revision: int) -> None:
        """This replica rewrote ``node``'s record (still on ``lease_id``) at ``mod_revision``:
        spares the next heartbeat the etcd read the change would otherwise cost."""
        cached = self._lease_by_node.get(node)
        if cached is not None and cached[0] == lease_id:
            self._lease_by_node[node] = (lease_id, mod_revision)


@functools.lru_cache(maxsize=65_536)
def _canonical_address(address: str) -> str:
    """Cached: the address check compares against every registered node."""
    try:
        return validation.canonical_address(address)
    except ValueError:  # a record written before addresses were validated as they are now
        return address


def _readable(record: KeyValue) -> common_pb2.Node | None:
    """The record's Node, or None when its value does not decode."""
    try:
        return codec.decode(record.value, common_pb2.Node, record.key)
    except CorruptRecord:
        return None


def _check_lease_id(lease_id: int) -> None:
    if lease_id <= 0:
        raise InvalidArgument(
            f"lease_id {lease_id} is not a lease id; use the lease_id RegisterNode returned"
        )


def _not_registered(node: NodeId, lease_id: int, record: KeyValue | None) -> str:
    if record is None:
        return (
            f"node {node} is not registered (its lease expired, it left, or its record was deleted); "
            "drop your roles and register again"
        )
    if not record.lease:
        return (
            f"node {node}'s record is attached to no lease (it was rewritten by hand), not to lease "
            f"{lease_id:#x}; drop your roles and register again"
        )
    if record.lease == lease_id:
        return (
            f"node {node}'s record under lease {lease_id:#x} is unreadable; "
            "drop your roles and register again (the registration replaces it)"
        )
    return (
        f"lease {lease_id:#x} is not node {node}'s current lease ({record.lease:#x}); "
        "this process was replaced or its lease expired: register again"
    )
