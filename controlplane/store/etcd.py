"""The one adapter over the etcd client (etcd3aio); nothing else imports it.

Why an adapter: the client library is a replaceable part (DESIGN.md explains why
etcd3aio), its errors must be wrapped once into BlueMarble's (:mod:`bluemarble.core.errors`),
and two behaviours need fixing on top of it:

* **Lease keepalive** goes over one long-lived bidirectional ``LeaseKeepAlive`` stream
  shared by every lease this process refreshes (:class:`_KeepAliveStream`), instead of a
  new stream per refresh. At thousands of nodes this is the difference between one
  HTTP/2 stream and thousands of stream set-ups per second.
* **Watch compaction**: etcd3aio resumes a compacted watch past the compaction silently.
  :meth:`EtcdStore.watch_prefix` raises :class:`Compacted` instead, so the caller
  re-lists and never skips an event.

Every call has a deadline (``rpc_timeout_s``); an etcd that cannot be reached surfaces
as :class:`bluemarble.core.errors.Unavailable` with a message naming etcd and its endpoints.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import etcd3aio
import grpc
import grpc.aio
import structlog
from etcd3aio import _protobuf as etcdpb  # the request/stub types; no public alias exists

from bluemarble.core.errors import BlueMarbleError, NotFound, Unavailable
from bluemarble.runtime import background

log = structlog.get_logger(__name__)

# etcd's own channel reconnect backoff defaults to growing up to 120 s: after an etcd
# restart the control plane would stay UNAVAILABLE for minutes. Cap it at 2 s.
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    kv: KeyValue


@dataclass(frozen=True)
class WatchBatch:
    """Events of one watch response; ``revision`` is the etcd revision they bring us to."""

    revision: int
    events: tuple[WatchEvent, ...]


class Compacted(BlueMarbleError):
    """A watch's start revision was compacted away: re-list, then watch again."""

    status = "OUT_OF_RANGE"

    def __init__(self, compact_revision: int):
        super().__init__(f"watch start revision was compacted (compact revision {compact_revision})")
        self.compact_revision = compact_revision


# ---- transaction building blocks (typed, so no caller touches etcd's protobufs) ----


class CompareTarget(enum.Enum):
    VERSION = "version"
    CREATE_REVISION = "create_revision"
    MOD_REVISION = "mod_revision"
    VALUE = "value"


@dataclass(frozen=True)
class Compare:
    """``key``'s ``target`` EQUAL to ``expected`` (the only comparison we need)."""

    key: str
    target: CompareTarget
    expected: int | bytes

    @classmethod
    def absent(cls, key: str) -> Compare:
        return cls(key, CompareTarget.CREATE_REVISION, 0)

    @classmethod
    def mod_revision(cls, key: str, revision: int) -> Compare:
        return cls(key, CompareTarget.MOD_REVISION, revision)

    @classmethod
    def create_revision(cls, key: str, revision: int) -> Compare:
        return cls(key, CompareTarget.CREATE_REVISION, revision)


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    key: str
    prefix: bool = False


Op = Put | Delete | Get


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    # For each Get op of the branch that ran, the key-values it read (in op order).
    reads: tuple[tuple[KeyValue, ...], ...] = field(default=())


def _kv(raw: Any) -> KeyValue:
    return KeyValue(
        key=raw.key.decode("utf-8"),
        value=bytes(raw.value),
        create_revision=raw.create_revision,
        mod_revision=raw.mod_revision,
        version=raw.version,
        lease=raw.lease,
    )


class EtcdStore:
    """Async access to etcd for one process. Create, :meth:`connect`, use, :meth:`close`."""

    def __init__(self, endpoints: Sequence[str], *, rpc_timeout_s: float = 3.0):
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints = tuple(endpoints)
        self.rpc_timeout_s = rpc_timeout_s
        self._client = etcd3aio.Etcd3Client(list(endpoints), rpc_max_attempts=2)
        self._client._manager.grpc_options.extend(_RECONNECT_OPTIONS)
        self._keepalive: _KeepAliveStream | None = None

    # ---- lifecycle ----

    async def connect(self, startup_timeout_s: float = 30.0) -> None:
        """Opens the channel and waits until etcd answers a read.

        Raises Unavailable if etcd did not answer within ``startup_timeout_s``.
        """
        await self._client.connect()
        channel = self._client._channel  # the keepalive stream shares the client's channel
        assert channel is not None
        self._keepalive = _KeepAliveStream(channel, self.endpoints)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + startup_timeout_s
        delay_s = 0.1
        while True:
            try:
                await self.current_revision()
                return
            except Unavailable as e:
                if loop.time() + delay_s >= deadline:
                    await self.close()
                    raise Unavailable(
                        f"etcd at {','.join(self.endpoints)} did not answer within "
                        f"{startup_timeout_s:g} s ({e}); is etcd running and reachable?"
                    ) from e
                log.warning("waiting for etcd", endpoints=self.endpoints, error=str(e))
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)

    async def close(self) -> None:
        if self._keepalive is not None:
            await self._keepalive.close()
            self._keepalive = None
        await self._client.close()

    # ---- error wrapping ----

    def _unavailable(self, operation: str, e: BaseException) -> Unavailable:
        return Unavailable(
            f"etcd unavailable ({','.join(self.endpoints)}) during {operation}: "
            f"{e or type(e).__name__}; retry shortly"
        )

    @contextlib.asynccontextmanager
    async def _wrapped(self, operation: str) -> AsyncIterator[None]:
        try:
            yield
        except (etcd3aio.EtcdConnectionError, etcd3aio.EtcdTransientError, TimeoutError) as e:
            raise self._unavailable(operation, e) from e
        except etcd3aio.EtcdError as e:
            raise BlueMarbleError(f"etcd refused {operation}: {e}") from e
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise self._unavailable(operation, e) from e
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"etcd: {e.details()}") from e
            raise BlueMarbleError(f"etcd refused {operation}: {e.code().name} {e.details()}") from e

    @property
    def _kvs(self) -> etcd3aio.kv.KVService:
        assert self._client.kv is not None, "EtcdStore.connect() was not called"
        return self._client.kv

    # ---- KV ----

    async def current_revision(self) -> int:
        async with self._wrapped("status read"):
            resp = await self._kvs.get("/", count_only=True, timeout=self.rpc_timeout_s)
        return int(resp.header.revision)

    async def get(self, key: str) -> KeyValue | None:
        async with self._wrapped(f"get {key}"):
            resp = await self._kvs.get(key, timeout=self.rpc_timeout_s)
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys below ``prefix`` (sorted by key) and the revision of the read."""
        async with self._wrapped(f"list {prefix}"):
            resp = await self._kvs.get(
                prefix,
                range_end=etcd3aio.prefix_range_end(prefix),
                timeout=self.rpc_timeout_s,
            )
        return [_kv(raw) for raw in resp.kvs], int(resp.header.revision)

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        async with self._wrapped(f"put {key}"):
            resp = await self._kvs.put(key, value, lease=lease, timeout=self.rpc_timeout_s)
        return int(resp.header.revision)

    async def delete(self, key: str) -> bool:
        async with self._wrapped(f"delete {key}"):
            resp = await self._kvs.delete(key, timeout=self.rpc_timeout_s)
        return bool(resp.deleted)

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        """One atomic etcd transaction. Not retried here: the caller knows if it is idempotent."""
        async with self._wrapped("transaction"):
            resp = await self._kvs.txn(
                [self._compare(c) for c in compares],
                [self._op(op) for op in success],
                [self._op(op) for op in failure],
                timeout=self.rpc_timeout_s,
                max_attempts=1,
            )
        reads = tuple(
            tuple(_kv(raw) for raw in r.response_range.kvs)
            for r in resp.responses
            if r.WhichOneof("response") == "response_range"
        )
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), reads)

    def _compare(self, c: Compare) -> etcdpb.Compare:
        kv = etcd3aio.kv.KVService
        if c.target is CompareTarget.VALUE:
            assert isinstance(c.expected, bytes)
            return kv.txn_compare_value(c.key, c.expected)
        assert isinstance(c.expected, int)
        if c.target is CompareTarget.VERSION:
            return kv.txn_compare_version(c.key, c.expected)
        if c.target is CompareTarget.CREATE_REVISION:
            return kv.txn_compare_create_revision(c.key, c.expected)
        compare = etcdpb.Compare(
            result=etcdpb.Compare.EQUAL,
            target=etcdpb.Compare.MOD,
            key=c.key.encode("utf-8"),
            mod_revision=c.expected,
        )
        return compare

    @staticmethod
    def _op(op: Op) -> etcdpb.RequestOp:
        kv = etcd3aio.kv.KVService
        if isinstance(op, Put):
            return kv.txn_op_put(op.key, op.value, lease=op.lease)
        end = etcd3aio.prefix_range_end(op.key) if op.prefix else None
        if isinstance(op, Delete):
            return kv.txn_op_delete(op.key, range_end=end)
        return kv.txn_op_get(op.key, range_end=end)

    # ---- leases ----

    async def grant_lease(self, ttl_s: int) -> tuple[int, int]:
        """A new lease; returns (lease id, granted TTL in seconds)."""
        assert self._client.lease is not None
        async with self._wrapped("lease grant"):
            resp = await self._client.lease.grant(ttl_s, timeout=self.rpc_timeout_s)
        return int(resp.ID), int(resp.TTL)

    async def revoke_lease(self, lease_id: int) -> bool:
        """Revokes the lease and deletes its keys. False if the lease was already gone."""
        assert self._client.lease is not None
        try:
            async with self._wrapped("lease revoke"):
                await self._client.lease.revoke(lease_id, timeout=self.rpc_timeout_s)
        except NotFound:
            return False
        return True

    async def lease_ttl(self, lease_id: int) -> int:
        """Remaining TTL in seconds; -1 when the lease does not exist (expired or revoked)."""
        assert self._client.lease is not None
        async with self._wrapped("lease time-to-live"):
            resp = await self._client.lease.time_to_live(lease_id, timeout=self.rpc_timeout_s)
        return int(resp.TTL)

    async def keepalive(self, lease_id: int) -> int:
        """Refreshes the lease; returns its TTL in seconds, 0 if it no longer exists."""
        assert self._keepalive is not None, "EtcdStore.connect() was not called"
        return await self._keepalive.refresh(lease_id, self.rpc_timeout_s)

    # ---- watch ----

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchBatch]:
        """Events below ``prefix`` from ``start_revision`` on (inclusive), forever.

        Transient disconnects resume from the last delivered revision. Raises
        :class:`Compacted` when ``start_revision`` (or a resume point) was compacted.
        """
        assert self._client.watch is not None
        stream = self._client.watch.watch(
            prefix, range_end=etcd3aio.prefix_range_end(prefix), start_revision=start_revision
        )
        try:
            async with self._wrapped(f"watch {prefix}"):
                async for resp in stream:
                    if resp.compact_revision > 0:
                        raise Compacted(int(resp.compact_revision))
                    if resp.canceled:
                        raise Unavailable(f"etcd canceled the watch on {prefix}: {resp.cancel_reason}")
                    if not resp.events:
                        continue
                    events = tuple(
                        WatchEvent(
                            EventType.DELETE if ev.type == 1 else EventType.PUT, _kv(ev.kv)
                        )
                        for ev in resp.events
                    )
                    yield WatchBatch(int(resp.header.revision), events)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]


class _KeepAliveStream:
    """One LeaseKeepAlive stream shared by every refresh this process makes.

    Requests are queued; etcd answers a stream's requests in order, so each response
    (lease id, TTL) resolves the *oldest* waiter for that lease: a late answer to an
    earlier request is never taken for the answer to a newer one (which matters right
    after a revoke). When the stream breaks, pending waiters fail with Unavailable and
    the next refresh reopens it (with a short backoff between failures).

    (A version on gRPC's synchronous API in a thread of its own was measured and was
    slower in the server: GIL hand-offs cost more than grpc.aio's per-message overhead.)
    """

    _MAX_PENDING = 100_000

    def __init__(self, channel: grpc.aio.Channel, endpoints: Sequence[str]):
        self._stub = etcdpb.LeaseStub(channel)
        self._endpoints = endpoints
        self._queue: asyncio.Queue[int] = asyncio.Queue(self._MAX_PENDING)
        self._waiters: dict[int, collections.deque[asyncio.Future[int]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def refresh(self, lease_id: int, timeout_s: float) -> int:
        if self._closed:
            raise Unavailable("etcd client is closed")
        if self._task is None or self._task.done():
            self._task = background.start(self._run(), "etcd-lease-keepalive")
        try:
            self._queue.put_nowait(lease_id)
        except asyncio.QueueFull as e:
            raise Unavailable("too many lease refreshes pending; etcd is not keeping up") from e
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(lease_id, collections.deque()).append(future)
        try:
            async with asyncio.timeout(timeout_s):  # no wrapper task per refresh
                return await future
        except TimeoutError as e:
            # The (now cancelled) future stays queued, so its late answer is consumed
            # by it and not by a newer request for the same lease.
            raise Unavailable(
                f"etcd ({','.join(self._endpoints)}) did not answer a lease refresh within "
                f"{timeout_s:g} s; retry shortly"
            ) from e

    async def _requests(self) -> AsyncIterator[etcdpb.LeaseKeepAliveRequest]:
        while True:
            lease_id = await self._queue.get()
            yield etcdpb.LeaseKeepAliveRequest(ID=lease_id)

    async def _run(self) -> None:
        backoff_s = 0.1
        while not self._closed:
            call = self._stub.LeaseKeepAlive(self._requests())
            try:
                async for resp in call:
                    backoff_s = 0.1
                    self._resolve(int(resp.ID), max(0, int(resp.TTL)))
                error: BaseException = Unavailable("etcd closed the lease keepalive stream")
            except grpc.aio.AioRpcError as e:
                error = Unavailable(
                    f"etcd ({','.join(self._endpoints)}) lease keepalive failed: "
                    f"{e.code().name} {e.details()}; retry shortly"
                )
            finally:
                call.cancel()
            self._fail_all(error)
            if not self._closed:
                log.warning("lease keepalive stream broke; reopening", error=str(error))
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
                if not self._waiters:
                    return  # reopened on demand by the next refresh

    def _resolve(self, lease_id: int, ttl_s: int) -> None:
        waiters = self._waiters.get(lease_id)
        if not waiters:
            return  # a request sent before the stream was reopened
        future = waiters.popleft()
        if not waiters:
            del self._waiters[lease_id]
        if not future.done():
            future.set_result(ttl_s)

    def _fail_all(self, error: BaseException) -> None:
        waiters, self._waiters = self._waiters, {}
        while not self._queue.empty():
            self._queue.get_nowait()
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    async def close(self) -> None:
        self._closed = True
        await background.stop(self._task)
        self._task = None
        self._fail_all(Unavailable("etcd client is closed"))
