"""The prefix mirror's guarantees, driven through a scripted store at the adapter
boundary: snapshot first, changes in order, a full snapshot after a compaction, a full
snapshot instead of an unbounded backlog for a slow subscriber, health that follows the
watch's state, and unreadable records kept aside (logged once) instead of dropped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog

from bluemarble.core.errors import CorruptRecord
from bluemarble.runtime.clock import FakeClock
from controlplane.store.etcd import (
    Compacted,
    EventType,
    KeyValue,
    WatchBatch,
    WatchEvent,
    WatchState,
    WatchStateCallback,
)
from controlplane.store.watchcache import PrefixCache, UnreadableRecord, Update


def kv(key: str, value: str, rev: int, version: int = 1) -> KeyValue:
    return KeyValue(key, value.encode(), rev, rev, version, 0)


def put(key: str, value: str, rev: int, version: int = 1) -> WatchEvent:
    return WatchEvent(EventType.PUT, kv(key, value, rev, version))


def delete(key: str, rev: int) -> WatchEvent:
    return WatchEvent(EventType.DELETE, KeyValue(key, b"", 0, rev, 0, 0))


Script = WatchBatch | Exception | tuple[WatchState, str]


class ScriptedStore:
    """get_prefix returns ``listing``; watch_prefix plays ``script``: batches, errors to
    raise, or (state, reason) pairs to report through ``on_state``."""

    def __init__(self, listing: list[KeyValue], revision: int):
        self.listing = listing
        self.revision = revision
        self.script: asyncio.Queue[Script] = asyncio.Queue()
        self.watch_starts: list[int] = []
        self.lists = 0

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        self.lists += 1
        return list(self.listing), self.revision

    async def watch_prefix(
        self, prefix: str, start_revision: int, *, on_state: WatchStateCallback | None = None
    ) -> AsyncIterator[WatchBatch]:
        self.watch_starts.append(start_revision)
        if on_state is not None:
            on_state(WatchState.CONNECTED, "")
        while True:
            item = await self.script.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item, tuple):
                assert on_state is not None
                on_state(*item)
                continue
            yield item


def decode(k: KeyValue) -> str:
    text = k.value.decode()
    if text.startswith("!"):
        raise CorruptRecord(f"{k.key} is unreadable")
    if text == "bug":
        raise ValueError("a decoder bug")
    return text


async def next_update(it: AsyncIterator[Update[str]]) -> Update[str]:
    return await asyncio.wait_for(it.__anext__(), 2)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_snapshot_then_changes_then_a_snapshot_after_compaction() -> None:
    store = ScriptedStore([kv("/p/a", "1", 5)], revision=7)
    cache: PrefixCache[str] = PrefixCache(store, "/p/", decode, name="t")  # type: ignore[arg-type]
    await cache.start()
    updates = cache.subscribe()
    first = await next_update(updates)
    assert (first.snapshot, first.revision, first.changed) == (True, 7, {"/p/a": "1"})
    await settle()
    assert store.watch_starts == [8]  # resumes right after the listing

    store.script.put_nowait(WatchBatch(9, (put("/p/b", "2", 9),)))
    change = await next_update(updates)
    assert (change.snapshot, change.revision, change.changed, change.removed) == (False, 9, {"/p/b": "2"}, ())

    store.script.put_nowait(WatchBatch(10, (delete("/p/a", 10),)))
    change = await next_update(updates)
    assert change.removed == ("/p/a",) and cache.entries == {"/p/b": "2"}

    # A compaction: the cache re-lists and every subscriber gets the full state again.
    store.listing, store.revision = [kv("/p/b", "2", 9), kv("/p/c", "3", 20)], 21
    store.script.put_nowait(Compacted(15))
    again = await next_update(updates)
    assert (again.snapshot, again.revision, again.changed) == (True, 21, {"/p/b": "2", "/p/c": "3"})
    await settle()
    assert store.watch_starts[-1] == 22 and cache.healthy
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
        store.script.put_nowait(WatchBatch(rev, (put(f"/p/{rev}", str(rev), rev),)))
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


async def test_health_follows_the_watch_state_with_a_reason() -> None:
    store = ScriptedStore([], revision=1)
    cache: PrefixCache[str] = PrefixCache(store, "/p/", decode, name="t")  # type: ignore[arg-type]
    await cache.start()
    await settle()
    assert cache.healthy and cache.unhealthy_reason == ""
    store.script.put_nowait((WatchState.SUSPENDED, "etcd sent nothing for 6.0 s"))
    await settle()
    assert not cache.healthy and "etcd sent nothing for 6.0 s" in cache.unhealthy_reason
    store.script.put_nowait((WatchState.CONNECTED, ""))
    await settle()
    assert cache.healthy and cache.unhealthy_reason == ""
    assert store.lists == 1  # a suspended watch resumes; nothing to re-list
    await cache.stop()


async def test_a_progress_batch_moves_the_revision_without_an_update() -> None:
    clock = FakeClock()
    store = ScriptedStore([kv("/p/a", "1", 3)], revision=4)
    cache: PrefixCache[str] = PrefixCache(store, "/p/", decode, name="t", clock=clock)  # type: ignore[arg-type]
    await cache.start()
    updates = cache.subscribe()
    await next_update(updates)
    waiter = asyncio.create_task(cache.wait_for_revision(50, 10))
    await clock.advance(1)
    assert not waiter.done()
    store.script.put_nowait(WatchBatch(50, ()))  # etcd's progress notification
    await clock.settle()
    assert waiter.done() and waiter.result() is True and cache.revision == 50
    # wait_for_revision times out on the injected clock, not the loop's.
    late = asyncio.create_task(cache.wait_for_revision(51, 10))
    await clock.advance(9.9)
    assert not late.done()
    await clock.advance(0.2)
    assert late.done() and late.result() is False
    store.script.put_nowait(WatchBatch(51, (put("/p/b", "2", 51),)))
    change = await next_update(updates)  # the progress batch published nothing
    assert (change.revision, change.changed) == (51, {"/p/b": "2"})
    await cache.stop()


async def test_unreadable_records_keep_their_revision_and_version_and_are_logged_once() -> None:
    store = ScriptedStore([kv("/p/a", "1", 5), kv("/p/bad", "!x", 6, version=4)], revision=6)
    cache: PrefixCache[str] = PrefixCache(store, "/p/", decode, name="t")  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        await cache.start()
        updates = cache.subscribe()
        assert (await next_update(updates)).changed == {"/p/a": "1"}
        assert cache.entries == {"/p/a": "1"} and cache.mod_revisions == {"/p/a": 5}
        assert cache.unreadable == {"/p/bad": UnreadableRecord(6, 4, "/p/bad is unreadable")}

        # A readable key turning unreadable: gone for subscribers, kept aside for writers.
        store.script.put_nowait(WatchBatch(7, (put("/p/a", "!y", 7, version=2),)))
        change = await next_update(updates)
        assert (change.changed, change.removed) == ({}, ("/p/a",))
        assert "/p/a" not in cache.entries and "/p/a" not in cache.mod_revisions
        assert cache.unreadable["/p/a"].mod_revision == 7 and cache.unreadable["/p/a"].version == 2

        # A compaction re-lists the same unreadable records: not logged again.
        store.listing, store.revision = [kv("/p/a", "!y", 7, 2), kv("/p/bad", "!x", 6, 4)], 8
        store.script.put_nowait(Compacted(8))
        assert (await next_update(updates)).snapshot
        assert set(cache.unreadable) == {"/p/a", "/p/bad"}

        # Rewritten unreadable at a new revision: logged again (once). Then repaired, deleted.
        store.script.put_nowait(WatchBatch(9, (put("/p/bad", "!z", 9, version=5),)))
        await next_update(updates)
        assert cache.unreadable["/p/bad"] == UnreadableRecord(9, 5, "/p/bad is unreadable")
        store.script.put_nowait(WatchBatch(10, (put("/p/bad", "fixed", 10, version=6), delete("/p/a", 10))))
        change = await next_update(updates)
        assert (change.changed, change.removed) == ({"/p/bad": "fixed"}, ("/p/a",))
        assert cache.unreadable == {} and cache.mod_revisions == {"/p/bad": 10}
    logged = [(e["key"], e["mod_revision"]) for e in logs if e["event"].startswith("unreadable record")]
    assert logged == [("/p/bad", 6), ("/p/a", 7), ("/p/bad", 9)]
    await cache.stop()


async def test_a_decoder_bug_marks_the_mirror_unhealthy_and_it_relists_after_a_backoff() -> None:
    clock = FakeClock()
    store = ScriptedStore([], revision=1)
    cache: PrefixCache[str] = PrefixCache(store, "/p/", decode, name="t", clock=clock)  # type: ignore[arg-type]
    await cache.start()
    await clock.settle()
    store.script.put_nowait(WatchBatch(2, (put("/p/x", "bug", 2),)))
    await clock.settle()
    assert not cache.healthy and "a decoder bug" in cache.unhealthy_reason
    store.listing, store.revision = [kv("/p/x", "ok", 3)], 3
    await clock.advance(2.5)  # the supervisor's backoff is on the injected clock
    assert cache.healthy and cache.entries == {"/p/x": "ok"} and store.lists == 2
    assert store.watch_starts[-1] == 4
    await cache.stop()


async def test_an_index_follows_puts_deletes_unreadable_values_and_relists() -> None:
    store = ScriptedStore([kv("/p/a", "x", 5), kv("/p/b", "y", 6)], revision=7)
    cache: PrefixCache[str] = PrefixCache(store, "/p/", decode, name="t")  # type: ignore[arg-type]
    cache.add_index("value", lambda v: v)
    await cache.start()
    assert cache.lookup("value", "x") == {"/p/a"} and cache.lookup("value", "y") == {"/p/b"}
    updates = cache.subscribe()
    await next_update(updates)
    store.script.put_nowait(WatchBatch(8, (put("/p/c", "x", 8), put("/p/a", "z", 8, version=2))))
    await next_update(updates)
    assert cache.lookup("value", "x") == {"/p/c"} and cache.lookup("value", "z") == {"/p/a"}
    store.script.put_nowait(WatchBatch(9, (delete("/p/c", 9), put("/p/b", "!broken", 9, version=2))))
    await next_update(updates)
    assert cache.lookup("value", "x") == set() and cache.lookup("value", "y") == set()
    store.listing, store.revision = [kv("/p/d", "x", 12)], 13
    store.script.put_nowait(Compacted(10))
    await next_update(updates)
    assert cache.lookup("value", "x") == {"/p/d"} and cache.lookup("value", "z") == set()
    await cache.stop()
