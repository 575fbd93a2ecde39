"""Leader election among control-plane replicas, through etcd.

A replica campaigns by creating the leader key (``KeySchema.leader``) attached to its own
session lease, in a transaction that succeeds only if the key does not exist. The
winner's key ``create_revision`` is its **fencing token**: every write the leader makes
carries ``Compare.create_revision(leader_key, token)`` in the same transaction
(:meth:`Leadership.guard`), so a deposed leader (lease expired while it was paused, or
partitioned) cannot write anything, whatever it still believes.

Losers watch the key and campaign again as soon as it is deleted (leader stopped, or its
lease expired: at most the session TTL after a crash). A leader whose lease refresh
fails, or answers TTL 0, steps down at once.

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
from bluemarble.runtime import background
from controlplane.store.etcd import Compare, EtcdStore, EventType, Put
from controlplane.store.keys import KeySchema

log = structlog.get_logger(__name__)


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


def decode_leader(value: bytes, token: int) -> LeaderInfo:
    try:
        data = json.loads(value)
        return LeaderInfo(str(data["replica_id"]), str(data.get("address", "")), token)
    except (ValueError, KeyError, TypeError):
        return LeaderInfo("(unreadable)", "", token)


class Election:
    def __init__(
        self,
        store: EtcdStore,
        keys: KeySchema,
        replica_id: str,
        address: str,
        ttl_s: int,
    ):
        self._store = store
        self._keys = keys
        self.replica_id = replica_id
        self._address = address
        self._ttl_s = ttl_s
        self.leadership: Leadership | None = None
        self._listeners: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Calls ``callback()`` on every gain or loss of leadership."""
        self._listeners.append(callback)

    async def start(self) -> None:
        self._task = background.start(self._run(), "election")

    async def stop(self) -> None:
        """Stops campaigning and resigns (deletes the key by revoking the session lease)."""
        held = self.leadership
        await background.stop(self._task)
        self._task = None
        if held is not None:
            with contextlib.suppress(BlueMarbleError):
                await self._store.revoke_lease(held.lease_id)
            log.info("resigned leadership", replica=self.replica_id)
            self._set(None)

    async def current_leader(self) -> LeaderInfo | None:
        kv = await self._store.get(self._keys.leader())
        return None if kv is None else decode_leader(kv.value, kv.create_revision)

    def _set(self, leadership: Leadership | None) -> None:
        self.leadership = leadership
        for callback in self._listeners:
            callback()

    async def _run(self) -> None:
        backoff_s = 0.1
        while True:
            try:
                await self._campaign_once()
                backoff_s = 0.1
            except asyncio.CancelledError:
                raise
            except BlueMarbleError as e:
                if self.leadership is not None:
                    log.warning("lost leadership", replica=self.replica_id, error=str(e))
                    self._set(None)
                log.warning("election: etcd trouble; retrying", error=str(e), backoff_s=backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
            except Exception:
                self._set(None)
                log.exception("election crashed; retrying")
                await asyncio.sleep(1.0)

    async def _campaign_once(self) -> None:
        key = self._keys.leader()
        lease_id, ttl_s = await self._store.grant_lease(self._ttl_s)
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
            self._set(Leadership(self.replica_id, lease_id, created.create_revision))
            log.info("elected leader", replica=self.replica_id, token=created.create_revision)
            await self._hold(lease_id, ttl_s)
        finally:
            if self.leadership is not None and self.leadership.lease_id == lease_id:
                self._set(None)

    async def _hold(self, lease_id: int, ttl_s: int) -> None:
        """Refreshes the session lease every TTL/3 until it fails."""
        loop = asyncio.get_running_loop()
        interval_s = max(ttl_s / 3, 0.2)
        valid_until = loop.time() + ttl_s
        while True:
            await asyncio.sleep(interval_s)
            sent_at = loop.time()
            try:
                remaining = await self._store.keepalive(lease_id)
            except BlueMarbleError as e:
                if not e.retryable or loop.time() + 0.2 >= valid_until:
                    raise
                log.warning("leader lease refresh failed; retrying", error=str(e))
                interval_s = 0.2
                continue
            if remaining <= 0:
                log.warning("leader lease expired; stepping down", replica=self.replica_id)
                return
            valid_until = sent_at + remaining
            interval_s = max(ttl_s / 3, 0.2)

    async def _wait_for_vacancy(self) -> None:
        """Returns once the leader key is gone (or was at the time we looked)."""
        key = self._keys.leader()
        kv = await self._store.get(key)
        if kv is None:
            return
        # From the key's last change on: a delete after our read cannot be missed.
        async for batch in self._store.watch_prefix(key, kv.mod_revision + 1):
            if any(ev.type is EventType.DELETE and ev.kv.key == key for ev in batch.events):
                return
