"""A replica-local mirror of one etcd prefix, kept current by one watch, with fan-out.

Every control-plane replica mirrors the node records, the assignments and the ring.
Reads (ResolvePlayer, ListAssignments) are served from the mirror, and every
WatchAssignments stream is a subscriber of it: one etcd watch per prefix per replica,
however many nodes are watching.

Guarantees:

* The mirror is a consistent etcd snapshot at :attr:`PrefixCache.revision` (a watch batch,
  which never splits a revision, is applied at once, between two awaits).
* A subscriber first gets a full snapshot, then every change in revision order. A
  subscriber that falls ``max_backlog`` updates behind is not dropped: its backlog is
  replaced by a fresh full snapshot (state, not events, is what matters here).
* The watch resumes where the mirror is (the adapter owns the resume point, see
  :meth:`EtcdStore.watch_prefix`); a compacted watch re-lists and sends every subscriber a
  full snapshot: nothing is silently skipped. While the watch is suspended (etcd down,
  stalled, or a member without a leader) the mirror keeps serving its last state and says
  so: ``healthy`` is False and ``unhealthy_reason`` tells why.
* A record whose value does not decode is not dropped from view: it moves to
  :attr:`PrefixCache.unreadable` with its mod_revision and version, so a writer can still
  replace it with a compare-and-swap (and number the replacement above it), and it is
  logged once per mod_revision, not on every read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

from bluemarble.core.errors import BlueMarbleError
from bluemarble.runtime import background, retry
from bluemarble.runtime.clock import Clock, SystemClock, wait_event
from controlplane.store.etcd import Compacted, EtcdStore, EventType, KeyValue, Rewound, WatchBatch, WatchState

log = structlog.get_logger(__name__)

V = TypeVar("V")


@dataclass(frozen=True)
class Update(Generic[V]):
    """What a subscriber receives. ``snapshot`` updates carry every entry in ``changed``.

    ``removed`` lists keys that were deleted or whose new value is unreadable."""

    revision: int
    snapshot: bool
    changed: dict[str, V]
    removed: tuple[str, ...]


@dataclass(frozen=True)
class UnreadableRecord:
    """A key whose current value failed to decode.

    ``mod_revision`` lets a writer compare-and-swap the key (``Compare.mod_revision``);
    ``version`` (etcd's per-key write count) lets it number a replacement above whatever
    was there, e.g. an assignment epoch greater than any the key can have held.
    """

    mod_revision: int
    version: int
    error: str


class _Subscriber(Generic[V]):
    def __init__(self, max_backlog: int):
        # None is the end-of-stream marker (the cache is stopping).
        self.queue: asyncio.Queue[Update[V] | None] = asyncio.Queue()
        self.max_backlog = max_backlog


class PrefixCache(Generic[V]):
    """Mirror of the keys below ``prefix``, decoded by ``decode``.

    ``decode`` raises a BlueMarbleError (e.g. CorruptRecord) for a value it cannot read;
    any other exception is a bug. ``clock`` times the mirror's waits and backoffs.

    Readable keys are in ``entries`` with their ``mod_revisions``; unreadable ones are only
    in ``unreadable``. All three are consistent at ``revision``.
    """

    def __init__(
        self,
        store: EtcdStore,
        prefix: str,
        decode: Callable[[KeyValue], V],
        *,
        name: str,
        max_backlog: int = 256,
        clock: Clock | None = None,
    ):
        self._store = store
        self._prefix = prefix
        self._decode = decode
        self.name = name
        self._max_backlog = max_backlog
        self._clock: Clock = clock or SystemClock()
        self.entries: dict[str, V] = {}
        self.mod_revisions: dict[str, int] = {}
        self.unreadable: dict[str, UnreadableRecord] = {}
        self.revision = 0
        self.relists = 0
        """Times the mirror was listed afresh (the first list, compactions, etcd going back)."""
        self.healthy = False
        self.unhealthy_reason = "not started"
        self._stale = True  # the entries must be re-listed before the watch can resume
        self._logged_unreadable: dict[str, int] = {}  # key -> mod_revision already logged
        self._subscribers: set[_Subscriber[V]] = set()
        self._task: asyncio.Task[None] | None = None
        self._advanced = asyncio.Event()  # set (and replaced) whenever revision moves
        self._listeners: list[Callable[[], None]] = []
        # Secondary indexes: name -> (term of a value, term -> keys holding it).
        self._indexes: dict[str, tuple[Callable[[V], str], dict[str, set[str]]]] = {}

    def add_index(self, name: str, term: Callable[[V], str]) -> None:
        """Keeps, from now on, which keys hold a value with each ``term(value)`` (e.g. the
        node records by address), updated with every change: :meth:`lookup` then costs
        O(1) instead of a scan of every entry. ``term`` must be pure and cheap."""
        index: dict[str, set[str]] = {}
        for key, value in self.entries.items():
            index.setdefault(term(value), set()).add(key)
        self._indexes[name] = (term, index)

    def lookup(self, name: str, value_term: str) -> set[str]:
        """The keys whose value has ``value_term`` in index ``name`` (see add_index)."""
        return set(self._indexes[name][1].get(value_term, ()))

    def _unindex(self, key: str, value: V) -> None:
        for term, index in self._indexes.values():
            keys = index.get(term(value))
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index[term(value)]

    def _index(self, key: str, value: V) -> None:
        for term, index in self._indexes.values():
            index.setdefault(term(value), set()).add(key)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Calls ``callback()`` (synchronously, it must not block) after every change."""
        self._listeners.append(callback)

    async def start(self) -> None:
        """Loads the prefix and starts following it. Raises Unavailable if etcd is down."""
        await self._relist()
        self._task = background.start(
            retry.supervise(self._follow, name=f"watch-{self.name}", clock=self._clock), f"watch-{self.name}"
        )

    async def stop(self) -> None:
        """Stops following etcd and ends every subscription."""
        for sub in self._subscribers:
            sub.queue.put_nowait(None)
        await background.stop(self._task)
        self._task = None
        self.healthy, self.unhealthy_reason = False, "stopped"

    async def wait_for_revision(self, revision: int, timeout_s: float) -> bool:
        """Waits until the mirror reflects ``revision``; False after ``timeout_s`` (on the clock)."""
        deadline_s = self._clock.monotonic_s() + timeout_s
        while self.revision < revision:
            remaining_s = deadline_s - self._clock.monotonic_s()
            if remaining_s <= 0:
                return False
            await wait_event(self._clock, self._advanced, remaining_s)
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

    # ---- state ----

    def _set_health(self, healthy: bool, reason: str = "") -> None:
        if healthy != self.healthy and self.unhealthy_reason != "not started":
            if healthy:
                log.info("mirror healthy again", cache=self.name)
            else:
                log.warning("mirror unhealthy", cache=self.name, reason=reason)
        self.healthy = healthy
        self.unhealthy_reason = "" if healthy else reason

    def _on_watch_state(self, state: WatchState, reason: str) -> None:
        if state is WatchState.CONNECTED:
            if not self._stale:
                self._set_health(True)
        else:
            self._set_health(False, f"etcd watch suspended: {reason}")

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

    def _notify(self, changed: bool) -> None:
        if changed:
            for callback in self._listeners:
                callback()
        advanced, self._advanced = self._advanced, asyncio.Event()
        advanced.set()

    def _note_unreadable(self, kv: KeyValue, error: BlueMarbleError) -> UnreadableRecord:
        record = UnreadableRecord(kv.mod_revision, kv.version, str(error))
        if self._logged_unreadable.get(kv.key) != kv.mod_revision:
            self._logged_unreadable[kv.key] = kv.mod_revision
            log.error(
                "unreadable record kept aside (a writer may replace it)",
                cache=self.name,
                key=kv.key,
                mod_revision=kv.mod_revision,
                version=kv.version,
                error=str(error),
            )
        return record

    # ---- following etcd ----

    async def _relist(self) -> None:
        kvs, revision = await self._store.get_prefix(self._prefix)
        entries: dict[str, V] = {}
        mods: dict[str, int] = {}
        unreadable: dict[str, UnreadableRecord] = {}
        for kv in kvs:
            try:
                entries[kv.key] = self._decode(kv)
                mods[kv.key] = kv.mod_revision
            except BlueMarbleError as e:
                unreadable[kv.key] = self._note_unreadable(kv, e)
        self._logged_unreadable = {k: r for k, r in self._logged_unreadable.items() if k in unreadable}
        self.entries, self.mod_revisions, self.unreadable, self.revision = entries, mods, unreadable, revision
        self.relists += 1
        for name, (term, _) in list(self._indexes.items()):
            self.add_index(name, term)
        self._stale = False
        self._set_health(True)
        self._publish(self._snapshot())
        self._notify(changed=True)

    async def _follow(self) -> None:
        """One supervised step: re-list if needed, then apply the watch until it fails.

        A compaction re-lists here and goes on; any other failure leaves the step (the
        supervisor logs it and restarts it after a jittered backoff). Only an unexpected
        exception (a bug) forces a re-list, since the mirror may be half-updated.
        """
        while True:
            if self._stale:
                await self._relist()
            try:
                async for batch in self._store.watch_prefix(
                    self._prefix, self.revision + 1, on_state=self._on_watch_state
                ):
                    self._apply(batch)
            except Rewound as e:
                log.error("etcd's history went back (restored from a snapshot?); re-listing: what this mirror "
                          "held past etcd's revision is gone", cache=self.name, seen_revision=e.seen_revision,
                          etcd_revision=e.current_revision)
                self._stale = True
                self._set_health(False, f"etcd's revision went back to {e.current_revision}; re-listing")
            except Compacted as e:
                log.warning("watch compacted; re-listing", cache=self.name, compact_revision=e.compact_revision)
                self._stale = True
                self._set_health(False, f"watch resume point compacted (at {e.compact_revision}); re-listing")
            except BlueMarbleError as e:
                self._set_health(False, f"watch failed: {e}")
                raise
            except Exception as e:
                self._stale = True
                self._set_health(False, f"watch crashed ({e!r}); re-listing")
                raise

    def _apply(self, batch: WatchBatch) -> None:
        changed: dict[str, V] = {}
        removed: list[str] = []
        for ev in batch.events:
            key = ev.kv.key
            old = self.entries.get(key)
            if old is not None and self._indexes:
                self._unindex(key, old)
            if ev.type is EventType.PUT:
                try:
                    value = self._decode(ev.kv)
                except BlueMarbleError as e:
                    self.unreadable[key] = self._note_unreadable(ev.kv, e)
                else:
                    self.entries[key] = value
                    if self._indexes:
                        self._index(key, value)
                    self.mod_revisions[key] = ev.kv.mod_revision
                    self.unreadable.pop(key, None)
                    self._logged_unreadable.pop(key, None)
                    changed[key] = value
                    if key in removed:
                        removed.remove(key)
                    continue
            else:
                self.unreadable.pop(key, None)
                self._logged_unreadable.pop(key, None)
            # Deleted, or its new value is unreadable: gone from what subscribers see.
            self.entries.pop(key, None)
            self.mod_revisions.pop(key, None)
            changed.pop(key, None)
            if key not in removed:
                removed.append(key)
        self.revision = batch.revision
        if changed or removed:
            self._publish(Update(batch.revision, False, changed, tuple(removed)))
        self._notify(changed=bool(changed or removed))
