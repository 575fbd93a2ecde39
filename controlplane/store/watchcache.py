"""A replica-local mirror of one etcd prefix, kept current by one watch, with fan-out.

Every control-plane replica mirrors the node records, the assignments and the ring.
Reads (ResolvePlayer, ListAssignments) are served from the mirror, and every
WatchAssignments stream is a subscriber of it: one etcd watch per prefix per replica,
however many nodes are watching.

Guarantees:

* The mirror is a consistent etcd snapshot at :attr:`PrefixCache.revision` (events of one
  etcd revision are applied together).
* A subscriber first gets a full snapshot, then every change in revision order. A
  subscriber that falls ``max_backlog`` updates behind is not dropped: its backlog is
  replaced by a fresh full snapshot (state, not events, is what matters here).
* A compacted watch re-lists and sends every subscriber a full snapshot: nothing is
  silently skipped. A broken watch is retried with capped backoff; meanwhile the mirror
  keeps serving its last state (``healthy`` turns False).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

from bluemarble.core.errors import BlueMarbleError, Unavailable
from bluemarble.runtime import background
from controlplane.store.etcd import Compacted, EtcdStore, EventType, KeyValue

log = structlog.get_logger(__name__)

V = TypeVar("V")


@dataclass(frozen=True)
class Update(Generic[V]):
    """What a subscriber receives. ``snapshot`` updates carry every entry in ``changed``."""

    revision: int
    snapshot: bool
    changed: dict[str, V]
    removed: tuple[str, ...]


class _Subscriber(Generic[V]):
    def __init__(self, max_backlog: int):
        # None is the end-of-stream marker (the cache is stopping).
        self.queue: asyncio.Queue[Update[V] | None] = asyncio.Queue()
        self.max_backlog = max_backlog


class PrefixCache(Generic[V]):
    def __init__(
        self,
        store: EtcdStore,
        prefix: str,
        decode: Callable[[KeyValue], V],
        *,
        name: str,
        max_backlog: int = 256,
    ):
        self._store = store
        self._prefix = prefix
        self._decode = decode
        self.name = name
        self._max_backlog = max_backlog
        self.entries: dict[str, V] = {}
        self.mod_revisions: dict[str, int] = {}
        self.revision = 0
        self.healthy = False
        self._subscribers: set[_Subscriber[V]] = set()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Calls ``callback()`` (synchronously, it must not block) after every change."""
        self._listeners.append(callback)

    async def start(self) -> None:
        """Loads the prefix and starts following it. Raises Unavailable if etcd is down."""
        await self._relist()
        self._task = background.start(self._follow(), f"watch-{self.name}")

    async def stop(self) -> None:
        """Stops following etcd and ends every subscription."""
        for sub in self._subscribers:
            sub.queue.put_nowait(None)
        await background.stop(self._task)
        self._task = None

    async def wait_for_revision(self, revision: int, timeout_s: float) -> bool:
        """Waits until the mirror reflects ``revision``; False on timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.revision >= revision), timeout_s
                )
            except TimeoutError:
                return False
        return True

    async def subscribe(self) -> AsyncIterator[Update[V]]:
        """A full snapshot, then every change, until the caller stops iterating."""
        sub: _Subscriber[V] = _Subscriber(self._max_backlog)
        sub.queue.put_nowait(self._snapshot())
        self._subscribers.add(sub)
        try:
            while True:
                update = await sub.queue.get()
                if update is None:
                    return
                yield update
        finally:
            self._subscribers.discard(sub)

    def _snapshot(self) -> Update[V]:
        return Update(self.revision, True, dict(self.entries), ())

    def _publish(self, update: Update[V]) -> None:
        for sub in self._subscribers:
            if sub.queue.qsize() >= sub.max_backlog:
                # Too far behind: replace its backlog with the current state.
                while not sub.queue.empty():
                    sub.queue.get_nowait()
                sub.queue.put_nowait(self._snapshot())
            else:
                sub.queue.put_nowait(update)

    async def _notify(self) -> None:
        for callback in self._listeners:
            callback()
        async with self._changed:
            self._changed.notify_all()

    async def _relist(self) -> None:
        kvs, revision = await self._store.get_prefix(self._prefix)
        entries: dict[str, V] = {}
        mods: dict[str, int] = {}
        for kv in kvs:
            try:
                entries[kv.key] = self._decode(kv)
                mods[kv.key] = kv.mod_revision
            except BlueMarbleError as e:
                log.error("skipping unreadable record", cache=self.name, key=kv.key, error=str(e))
        self.entries, self.mod_revisions, self.revision = entries, mods, revision
        self.healthy = True
        self._publish(self._snapshot())
        await self._notify()

    async def _follow(self) -> None:
        backoff_s = 0.1
        while True:
            try:
                async for batch in self._store.watch_prefix(self._prefix, self.revision + 1):
                    changed: dict[str, V] = {}
                    removed: list[str] = []
                    for ev in batch.events:
                        key = ev.kv.key
                        if ev.type is EventType.DELETE:
                            self.entries.pop(key, None)
                            self.mod_revisions.pop(key, None)
                            changed.pop(key, None)
                            removed.append(key)
                            continue
                        try:
                            value = self._decode(ev.kv)
                        except BlueMarbleError as e:
                            log.error("skipping unreadable record", cache=self.name, key=key, error=str(e))
                            continue
                        self.entries[key] = value
                        self.mod_revisions[key] = ev.kv.mod_revision
                        changed[key] = value
                        if key in removed:
                            removed.remove(key)
                    self.revision = batch.revision
                    self.healthy = True
                    backoff_s = 0.1
                    self._publish(Update(batch.revision, False, changed, tuple(removed)))
                    await self._notify()
            except Compacted as e:
                log.warning("watch compacted; re-listing", cache=self.name, compact_revision=e.compact_revision)
                with contextlib.suppress(Unavailable):
                    await self._relist()
                continue
            except BlueMarbleError as e:
                self.healthy = False
                log.warning("watch broke; retrying", cache=self.name, error=str(e), backoff_s=backoff_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.healthy = False
                log.exception("watch crashed; retrying", cache=self.name)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 2.0)
            with contextlib.suppress(BlueMarbleError):
                await self._relist()
