"""Leader election among control-plane replicas, through etcd.

A replica campaigns by creating the leader key (``KeySchema.leader``) attached to its own
session lease, in a transaction that succeeds only if the key does not exist. The
winner's key ``create_revision`` is its **fencing token**: every write the leader makes
carries ``Compare.create_revision(leader_key, token)`` in the same transaction
(:meth:`Leadership.guard`), so a deposed leader (lease expired while it was paused, or
partitioned) cannot write anything, whatever it still believes.

Losers watch the key and campaign again as soon as it is deleted (leader stopped, or its
lease expired: at most the session TTL after a crash).

A leader key attached to no lease (lease 0: a put by hand, ``etcdctl put .../leader
...``, detaches the key from its lease and keeps its create_revision) belongs to no live
leader and would never expire: a campaigner that finds one deletes it, guarded by its
mod_revision (so a key changed meanwhile is looked at again), logs a warning saying what
it found, and campaigns. A key attached to a lease is never deleted by a campaigner,
whatever its value: a live leader may hold it, and its lease ends it otherwise.

A leader stops acting (``leadership`` turns None) as soon as any of these holds:

* its session lease may have expired: ``leadership`` is only returned while the clock is
  before ``valid_until - safety margin``, where ``valid_until`` is the send time of the
  last acknowledged refresh plus the TTL etcd granted. A refresh that hangs cannot
  stretch this: the check is on the clock, not on the refresh's outcome;
* a refresh answers TTL 0 (the lease is gone), or fails for good;
* its own key is deleted, replaced or rewritten: another create_revision, lease or value
  than it wrote (it watches the key while it leads). Stepping down revokes its lease,
  which deletes a key still attached to it; one detached from it is left to campaigners;
* a guarded write failed and :meth:`Election.verify` found the key is no longer ours.

Then it campaigns again from scratch (a new lease, a new token).

Leader states as seen by :class:`Election` users:

* ``leadership`` is None: not leader. Do not reconcile.
* ``leadership`` set: probably leader. Writes are still guarded, so "probably" is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from bluemarble.core.errors import BlueMarbleError
from bluemarble.core.limits import echo
from bluemarble.runtime import background, metrics, retry
from bluemarble.runtime.clock import Clock, SystemClock, run_with_timeout
from controlplane.store.etcd import Compacted, Compare, Delete, EtcdStore, EventType, KeyValue, Put
from controlplane.store.keys import KeySchema

log = structlog.get_logger(__name__)

SAFETY_MARGIN_FRACTION = 0.2
"""Part of the session TTL, before the lease could expire, from which a leader stops acting:
covers clock rate differences between this process and etcd, and the time a write already
sent may take to be applied."""


@dataclass(frozen=True)
class Leadership:
    """This replica's term as leader."""

    replica_id: str
    lease_id: int
    token: int  # the leader key's create_revision

    def guard(self, keys: KeySchema) -> Compare:
        return Compare.create_revision(keys.leader(), self.token)


@dataclass(frozen=True)
class LeaderInfo:
    replica_id: str
    address: str
    token: int
    lease_id: int = 0  # the leader's session lease (its key goes with it)


def decode_leader(value: bytes, token: int, lease_id: int = 0) -> LeaderInfo:
    try:
        data = json.loads(value)
        return LeaderInfo(str(data["replica_id"]), str(data.get("address", "")), token, lease_id)
    except (ValueError, KeyError, TypeError):
        return LeaderInfo("(unreadable)", "", token, lease_id)


def refresh_interval_s(ttl_s: float) -> float:
    """How often a leader renews its session lease of ``ttl_s``."""
    return max(ttl_s / 3, 0.2)


class _SteppedDown(Exception):
    """Internal: the current term ended (the reason is logged where it is raised)."""


class Election:
    def __init__(
        self,
        store: EtcdStore,
        keys: KeySchema,
        replica_id: str,
        address: str,
        ttl_s: int,
        *,
        clock: Clock | None = None,
    ):
        self._store = store
        self._keys = keys
        self.replica_id = replica_id
        self._address = address
        self.ttl_s = ttl_s
        self._clock = clock or SystemClock()
        self._refresh_failures = retry.FailureLog()  # one warning per outage, then summaries
        self._leadership: Leadership | None = None
        self._valid_until_s = 0.0
        self._margin_s = max(ttl_s * SAFETY_MARGIN_FRACTION, 0.2)
        self._deposed = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self.terms = 0

    @property
    def leadership(self) -> Leadership | None:
        """The current term, or None when this replica is not (or may no longer be) leader."""
        if self._leadership is None:
            return None
        if self._clock.monotonic_s() >= self._valid_until_s - self._margin_s:
            return None
        return self._leadership

    @property
    def held_lease_id(self) -> int:
        """The session lease of the term this replica holds, valid or not any more (0 when
        it holds none): tells this run's leader key from an earlier run's."""
        return self._leadership.lease_id if self._leadership is not None else 0

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Calls ``callback()`` on every gain or loss of leadership."""
        self._listeners.append(callback)

    async def start(self) -> None:
        self._task = background.start(
            retry.supervise(self._campaign_once, name="election", clock=self._clock, healthy_after_s=self.ttl_s),
            "election",
        )

    async def stop(self) -> None:
        """Stops campaigning and resigns (deletes the key by revoking the session lease)."""
        held = self._leadership
        await background.stop(self._task)
        self._task = None
        if held is not None:
            try:
                await self._store.revoke_lease(held.lease_id)
                log.info("resigned leadership", replica=self.replica_id)
            except BlueMarbleError as e:
                # Nothing acts as leader from here on; the key stays until its lease runs out.
                log.warning("stopped leading, but could not revoke the leader lease: another replica takes "
                            "over once it runs out", replica=self.replica_id, ttl_s=self.ttl_s, error=str(e))
            self._set(None)

    async def current_leader(self) -> LeaderInfo | None:
        kv = await self._store.get(self._keys.leader())
        return None if kv is None else decode_leader(kv.value, kv.create_revision, kv.lease)

    async def verify(self) -> bool:
        """Re-reads the leader key after a guarded write failed: True if this term still
        holds it. If not, the term ends at once (and a new campaign starts)."""
        term = self._leadership
        if term is None:
            return False
        kv = await self._store.get(self._keys.leader())
        if kv is not None and kv.create_revision == term.token and kv.lease == term.lease_id:
            return True
        log.warning(
            "deposed: the leader key is no longer ours; stepping down",
            replica=self.replica_id,
            token=term.token,
            key_token=None if kv is None else kv.create_revision,
            key_lease=None if kv is None else f"{kv.lease:#x}",
        )
        self._deposed.set()
        self._set(None)
        return False

    def _set(self, leadership: Leadership | None) -> None:
        if leadership is None and self._leadership is None:
            return
        self._leadership = leadership
        metrics.IS_LEADER.set(0 if leadership is None else 1)
        if leadership is not None:
            metrics.LEADER_CHANGES.inc()
        for callback in self._listeners:
            callback()

    async def _campaign_once(self) -> None:
        """One campaign: win and hold a term until it ends, or wait for a vacancy."""
        key = self._keys.leader()
        sent_at = self._clock.monotonic_s()
        lease_id, ttl_s = await self._store.grant_lease(self.ttl_s)
        try:
            value = json.dumps({"replica_id": self.replica_id, "address": self._address}).encode()
            result = await self._store.txn([Compare.absent(key)], [Put(key, value, lease=lease_id)])
            if not result.succeeded:
                await self._store.revoke_lease(lease_id)
                await self._wait_for_vacancy()
                return
            created = await self._store.get(key)
            if created is None or created.lease != lease_id:
                return  # lost it already (expired in between); campaign again
            self._deposed.clear()
            self._valid_until_s = sent_at + ttl_s
            self.terms += 1
            self._set(Leadership(self.replica_id, lease_id, created.create_revision))
            log.info("elected leader", replica=self.replica_id, token=created.create_revision)
            await self._hold(lease_id, ttl_s, created)
        finally:
            if self._leadership is not None and self._leadership.lease_id == lease_id:
                self._set(None)
                # Give the key up at once (best effort) so the next term, ours or
                # another replica's, need not wait for the lease to run out.
                with contextlib.suppress(BlueMarbleError, TimeoutError):
                    await run_with_timeout(self._clock, self._store.revoke_lease(lease_id), 1.0)

    async def _hold(self, lease_id: int, ttl_s: int, created: KeyValue) -> None:
        """Keeps the term until the lease may expire, the key goes, or we are deposed."""
        watcher = asyncio.ensure_future(self._watch_own_key(created))
        deposed = asyncio.ensure_future(self._deposed.wait())
        refresher = asyncio.ensure_future(self._refresh(lease_id, ttl_s))
        try:
            done, _ = await asyncio.wait((watcher, deposed, refresher), return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not deposed and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in (watcher, deposed, refresher):
                task.cancel()
            await asyncio.gather(watcher, deposed, refresher, return_exceptions=True)

    async def _refresh(self, lease_id: int, ttl_s: int) -> None:
        """Refreshes the session lease every TTL/3; returns when it cannot be kept."""
        interval_s = refresh_interval_s(ttl_s)
        while True:
            await self._clock.sleep(interval_s)
            sent_at = self._clock.monotonic_s()
            budget_s = self._valid_until_s - self._margin_s - sent_at
            if budget_s <= 0:
                log.warning("leader lease may expire; stepping down", replica=self.replica_id)
                return
            try:
                remaining = await run_with_timeout(self._clock, self._store.keepalive(lease_id), budget_s)
            except TimeoutError:
                log.warning("leader lease refresh got no answer in time; stepping down", replica=self.replica_id)
                return
            except BlueMarbleError as e:
                if not e.retryable:
                    raise
                self._refresh_failures.failed("refresh", self._clock.monotonic_s(),
                                              "leader lease refresh failed; retrying", error=str(e))
                interval_s = min(0.2, ttl_s / 10)
                continue
            self._refresh_failures.recovered("refresh", self._clock.monotonic_s(), "leader lease refresh answered")
            if remaining <= 0:
                log.warning("leader lease expired; stepping down", replica=self.replica_id)
                return
            self._valid_until_s = sent_at + remaining
            interval_s = refresh_interval_s(ttl_s)

    async def _watch_own_key(self, created: KeyValue) -> None:
        """Returns as soon as the leader key ``created`` (this term's, as written) is
        deleted, belongs to another term, or was rewritten: another value, or detached
        from this term's lease (a put by hand). A rewritten key keeps its create_revision,
        so this term's guard would still pass, but it is no longer this term's key: it
        would no longer go with the lease, and status could no longer name the leader."""
        key = self._keys.leader()
        async for batch in self._store.watch_prefix(key, created.mod_revision + 1):
            for ev in batch.events:
                if ev.kv.key != key:
                    continue
                if ev.type is EventType.DELETE or ev.kv.create_revision != created.create_revision:
                    log.warning("leader key deleted or replaced; stepping down", replica=self.replica_id)
                    return
                if ev.kv.lease != created.lease or ev.kv.value != created.value:
                    log.warning(
                        "leader key rewritten behind this leader's back; stepping down",
                        replica=self.replica_id,
                        key=key,
                        lease=f"{ev.kv.lease:#x}",
                        own_lease=f"{created.lease:#x}",
                        value=echo(ev.kv.value, 80),
                        found="attached to no lease" if not ev.kv.lease
                        else "another lease" if ev.kv.lease != created.lease else "another value",
                    )
                    return

    async def _wait_for_vacancy(self) -> None:
        """Returns once the leader key is gone (or was at the time we looked), or once it
        is attached to no lease (then removed here, or looked at again by the caller)."""
        key = self._keys.leader()
        kv = await self._store.get(key)
        if kv is None:
            return
        if not kv.lease:
            await self._remove_leaseless(kv)
            return
        # From the key's last change on: a delete after our read cannot be missed.
        start = kv.mod_revision + 1
        while True:
            try:
                async for batch in self._store.watch_prefix(key, start):
                    for ev in batch.events:
                        if ev.kv.key == key and (ev.type is EventType.DELETE or not ev.kv.lease):
                            return  # vacant, or detached from its lease (the next campaign removes it)
                return  # the watch ended: the caller looks again
            except Compacted as e:
                # A leader key older than etcd's compaction (a long, quiet leadership):
                # look again; a delete after this read is at or past the compaction.
                kv = await self._store.get(key)
                if kv is None or not kv.lease:
                    return
                start = max(kv.mod_revision + 1, e.compact_revision)

    async def _remove_leaseless(self, kv: KeyValue) -> None:
        """Deletes leader key ``kv``, attached to no lease, unless it changed since it was
        read (guarded by its mod_revision). Such a key belongs to no live leader: a leader's
        key is created attached to its session lease, and etcd deletes it with the lease;
        only a put without a lease (by hand) leaves one, and nothing would ever remove it."""
        result = await self._store.txn([Compare.mod_revision(kv.key, kv.mod_revision)], [Delete(kv.key)])
        log.warning(
            "the leader key is attached to no lease, so it belongs to no live leader and would never expire; "
            + ("deleted it to campaign" if result.succeeded else "it changed meanwhile; looking again"),
            replica=self.replica_id,
            key=kv.key,
            value=echo(kv.value, 80),
            create_revision=kv.create_revision,
            mod_revision=kv.mod_revision,
        )
