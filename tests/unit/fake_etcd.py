"""An in-memory stand-in for :class:`controlplane.store.etcd.EtcdStore`, on a fake clock.

For pure-logic unit tests of the election and the reconciler only (integration tests run
against a real etcd). It keeps etcd's rules that those tests rely on: one revision per
write or transaction, create/mod revisions and versions, leases that expire on the
clock and take their keys with them, compare-and-swap transactions, and watches that
deliver every event from a start revision in order.

Faults a test can switch on: ``hang_keepalive`` (refreshes never answer, as with a
partitioned etcd), ``hold_watches`` (watch streams deliver nothing, as with a stalled
watch), ``down`` (every call raises Unavailable).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from bluemarble.core.errors import NotFound, Unavailable
from bluemarble.runtime.clock import FakeClock
from controlplane.store.etcd import (
    Compare,
    CompareTarget,
    Delete,
    EventType,
    Get,
    KeyValue,
    Op,
    Put,
    TxnResult,
    WatchBatch,
    WatchEvent,
)


@dataclass(frozen=True)
class TxnRecord:
    at_s: float
    compares: tuple[Compare, ...]
    success: tuple[Op, ...]
    succeeded: bool


@dataclass
class _Lease:
    ttl_s: int
    expires_at_s: float
    keys: set[str] = field(default_factory=set)


class FakeEtcd:
    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.revision = 1
        self.kvs: dict[str, KeyValue] = {}
        self.history: list[WatchEvent] = []
        self.leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(0x1000)
        self._changed = asyncio.Condition()
        self.listeners: list[Callable[[WatchEvent], None]] = []
        self.txns: list[tuple[str, bool]] = []  # (who, succeeded) for every transaction
        self.txn_log: list[TxnRecord] = []
        self.who = "?"
        self.hang_keepalive = False
        self.hold_watches = False
        self.down = False

    # ---- helpers for tests ----

    def _check(self) -> None:
        if self.down:
            raise Unavailable("fake etcd is down")
        self.expire()

    def expire(self) -> None:
        """Revokes every lease whose TTL ran out on the clock (etcd's lessor)."""
        now = self.clock.monotonic_s()
        for lease_id in [i for i, lease in self.leases.items() if lease.expires_at_s <= now]:
            self._revoke(lease_id)

    def _apply(self, events: list[WatchEvent]) -> None:
        for ev in events:
            self.history.append(ev)
            for listener in self.listeners:
                listener(ev)
        if events:
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _put(self, key: str, value: bytes, lease: int, revision: int) -> WatchEvent:
        old = self.kvs.get(key)
        if old is not None and old.lease and old.lease in self.leases:
            self.leases[old.lease].keys.discard(key)
        kv = KeyValue(
            key=key,
            value=value,
            create_revision=old.create_revision if old else revision,
            mod_revision=revision,
            version=(old.version + 1) if old else 1,
            lease=lease,
        )
        self.kvs[key] = kv
        if lease:
            self.leases[lease].keys.add(key)
        return WatchEvent(EventType.PUT, kv)

    def _delete(self, key: str, revision: int) -> WatchEvent | None:
        old = self.kvs.pop(key, None)
        if old is None:
            return None
        if old.lease in self.leases:
            self.leases[old.lease].keys.discard(key)
        return WatchEvent(EventType.DELETE, KeyValue(key, b"", 0, revision, 0, 0))

    def _revoke(self, lease_id: int) -> bool:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return False
        if lease.keys:
            self.revision += 1
            events = [e for k in sorted(lease.keys) if (e := self._delete(k, self.revision)) is not None]
            self._apply(events)
        return True

    # ---- the EtcdStore interface ----

    async def current_revision(self) -> int:
        self._check()
        return self.revision

    async def get(self, key: str) -> KeyValue | None:
        self._check()
        return self.kvs.get(key)

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        self._check()
        return [kv for k, kv in sorted(self.kvs.items()) if k.startswith(prefix)], self.revision

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        self._check()
        self.revision += 1
        self._apply([self._put(key, value, lease, self.revision)])
        return self.revision

    async def delete(self, key: str) -> bool:
        self._check()
        if key not in self.kvs:
            return False
        self.revision += 1
        event = self._delete(key, self.revision)
        self._apply([event] if event else [])
        return True

    def _holds(self, c: Compare) -> bool:
        kv = self.kvs.get(c.key)
        actual: int | bytes
        if c.target is CompareTarget.VALUE:
            actual = kv.value if kv else b""
        elif c.target is CompareTarget.VERSION:
            actual = kv.version if kv else 0
        elif c.target is CompareTarget.CREATE_REVISION:
            actual = kv.create_revision if kv else 0
        else:
            actual = kv.mod_revision if kv else 0
        return actual == c.expected

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        self._check()
        ok = all(self._holds(c) for c in compares)
        self.txns.append((self.who, ok))
        self.txn_log.append(TxnRecord(self.clock.monotonic_s(), tuple(compares), tuple(success), ok))
        ops = success if ok else failure
        writes = [op for op in ops if not isinstance(op, Get)]
        if writes:
            self.revision += 1
        events: list[WatchEvent] = []
        reads = []
        for op in ops:
            if isinstance(op, Put):
                if op.lease and op.lease not in self.leases:
                    raise NotFound(f"lease {op.lease:#x} not found")
                events.append(self._put(op.key, op.value, op.lease, self.revision))
            elif isinstance(op, Delete):
                event = self._delete(op.key, self.revision)
                if event:
                    events.append(event)
            else:
                found = (
                    kv for k, kv in sorted(self.kvs.items()) if k == op.key or (op.prefix and k.startswith(op.key))
                )
                reads.append(tuple(found))
        self._apply(events)
        return TxnResult(ok, self.revision, tuple(reads))

    async def grant_lease(self, ttl_s: int) -> tuple[int, int]:
        self._check()
        lease_id = next(self._lease_ids)
        self.leases[lease_id] = _Lease(ttl_s, self.clock.monotonic_s() + ttl_s)
        return lease_id, ttl_s

    async def revoke_lease(self, lease_id: int) -> bool:
        self._check()
        return self._revoke(lease_id)

    async def lease_ttl(self, lease_id: int) -> int:
        self._check()
        lease = self.leases.get(lease_id)
        return -1 if lease is None else int(lease.expires_at_s - self.clock.monotonic_s())

    async def keepalive(self, lease_id: int) -> int:
        self._check()
        if self.hang_keepalive:
            await asyncio.Event().wait()  # never answers; the caller's timeout must act
        lease = self.leases.get(lease_id)
        if lease is None:
            return 0
        lease.expires_at_s = self.clock.monotonic_s() + lease.ttl_s
        return lease.ttl_s

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchBatch]:
        self._check()
        delivered = 0

        def ready() -> bool:
            return (not self.hold_watches and len(self.history) > delivered) or self.down

        while True:
            async with self._changed:
                await self._changed.wait_for(ready)
            if self.down:
                raise Unavailable("fake etcd is down")
            pending, delivered = self.history[delivered:], len(self.history)
            events = tuple(
                ev for ev in pending if ev.kv.key.startswith(prefix) and ev.kv.mod_revision >= start_revision
            )
            if events:
                yield WatchBatch(events[-1].kv.mod_revision, events)

    async def release_watches(self) -> None:
        """Ends ``hold_watches``: held events are delivered."""
        self.hold_watches = False
        await self._notify()

    async def close(self) -> None:
        self.down = True
        await self._notify()

    async def run_lessor(self) -> None:
        """Expires leases as the fake clock passes their deadline (run as a task)."""
        while True:
            await self.clock.sleep(0.05)
            self.expire()


@dataclass(frozen=True)
class Unreadable:
    mod_revision: int
    version: int
    error: str


class FakeMirror:
    """The part of :class:`controlplane.store.watchcache.PrefixCache` the reconciler reads,
    kept current synchronously from a :class:`FakeEtcd`'s writes (a mirror with no lag)."""

    def __init__(self, etcd: FakeEtcd, prefix: str, decode: Callable[[KeyValue], object], name: str):
        self.name = name
        self._prefix = prefix
        self._decode = decode
        self.entries: dict[str, object] = {}
        self.mod_revisions: dict[str, int] = {}
        self.unreadable: dict[str, Unreadable] = {}
        self.revision = etcd.revision
        self.relists = 1  # listed once, then never again: a fake etcd never compacts nor goes back
        self.healthy = True
        self._listeners: list[Callable[[], None]] = []
        for kv in etcd.kvs.values():
            self._on_event(WatchEvent(EventType.PUT, kv))
        etcd.listeners.append(self._on_event)

    def add_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def _on_event(self, ev: WatchEvent) -> None:
        key = ev.kv.key
        if not key.startswith(self._prefix):
            return
        self.entries.pop(key, None)
        self.mod_revisions.pop(key, None)
        self.unreadable.pop(key, None)
        if ev.type is EventType.PUT:
            try:
                self.entries[key] = self._decode(ev.kv)
                self.mod_revisions[key] = ev.kv.mod_revision
            except Exception as e:
                self.unreadable[key] = Unreadable(ev.kv.mod_revision, ev.kv.version, str(e))
        self.revision = ev.kv.mod_revision
        for callback in self._listeners:
            callback()

    async def wait_for_revision(self, revision: int, timeout_s: float) -> bool:
        return self.revision >= revision
