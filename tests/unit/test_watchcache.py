"""The prefix mirror's guarantees, driven through a scripted store at the adapter
boundary: snapshot first, changes in order, a full snapshot after a compaction, and a
full snapshot instead of an unbounded backlog for a slow subscriber."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from controlplane.store.etcd import Compacted, EventType, KeyValue, WatchBatch, WatchEvent
from controlplane.store.watchcache import PrefixCache, Update


def kv(key: str, value: str, rev: int) -> KeyValue:
    return KeyValue(key, value.encode(), rev, rev, 1, 0)


class ScriptedStore:
    """get_prefix returns ``listing``; watch_prefix plays ``script`` (batches or errors)."""

    def __init__(self, listing: list[KeyValue], revision: int):
        self.listing = listing
        self.revision = revision
        self.script: asyncio.Queue[WatchBatch | Exception] = asyncio.Queue()
        self.watch_starts: list[int] = []

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        return list(self.listing), self.revision

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchBatch]:
        self.watch_starts.append(start_revision)
        while True:
            item = await self.script.get()
            if isinstance(item, Exception):
                raise item
            yield item


def decode(k: KeyValue) -> str:
    return k.value.decode()


async def next_update(it: AsyncIterator[Update[str]]) -> Update[str]:
    return await asyncio.wait_for(it.__anext__(), 2)


async def test_snapshot_then_changes_then_a_snapshot_after_compaction() -> None:
    store = ScriptedStore([kv("/p/a", "1", 5)], revision=7)
    cache: PrefixCache[str] = PrefixCache(store, "/p/", decode, name="t")  # type: ignore[arg-type]
    await cache.start()
    updates = cache.subscribe()
    first = await next_update(updates)
    assert (first.snapshot, first.revision, first.changed) == (True, 7, {"/p/a": "1"})
    assert store.watch_starts == [8]  # resumes right after the listing

    store.script.put_nowait(WatchBatch(9, (WatchEvent(EventType.PUT, kv("/p/b", "2", 9)),)))
    change = await next_update(updates)
    assert (change.snapshot, change.revision, change.changed, change.removed) == (False, 9, {"/p/b": "2"}, ())

    store.script.put_nowait(WatchBatch(10, (WatchEvent(EventType.DELETE, kv("/p/a", "", 10)),)))
    change = await next_update(updates)
    assert change.removed == ("/p/a",) and cache.entries == {"/p/b": "2"}

    # A compaction: the cache re-lists and every subscriber gets the full state again.
    store.listing, store.revision = [kv("/p/b", "2", 9), kv("/p/c", "3", 20)], 21
    store.script.put_nowait(Compacted(15))
    again = await next_update(updates)
    assert (again.snapshot, again.revision, again.changed) == (True, 21, {"/p/b": "2", "/p/c": "3"})
    assert store.watch_starts[-1] == 22
    await cache.stop()
    # Stopping ends the subscription instead of leaving it blocked.
    await asyncio.wait_for(_drain(updates), 2)


async def _drain(it: AsyncIterator[Update[str]]) -> None:
    async for _ in it:
        pass


async def test_a_slow_subscriber_gets_a_snapshot_instead_of_an_unbounded_backlog() -> None:
    store = ScriptedStore([], revision=1)
    cache: PrefixCache[str] = PrefixCache(store, "/p/", decode, name="t", max_backlog=3)  # type: ignore[arg-type]
    await cache.start()
    updates = cache.subscribe()
    await next_update(updates)  # initial snapshot
    for rev in range(2, 12):
        store.script.put_nowait(WatchBatch(rev, (WatchEvent(EventType.PUT, kv(f"/p/{rev}", str(rev), rev)),)))
    assert await cache.wait_for_revision(11, 2)
    seen = []
    while True:
        update = await next_update(updates)
        seen.append(update)
        if update.revision == 11:
            break
    assert len(seen) <= 4  # bounded, not ten
    last = seen[-1]
    state = {}
    for update in seen:
        if update.snapshot:
            state = dict(update.changed)
        else:
            state.update(update.changed)
    assert state == {f"/p/{r}": str(r) for r in range(2, 12)} and last.revision == 11
    await cache.stop()
