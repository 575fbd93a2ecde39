"""The one adapter over the etcd client (etcd3aio); nothing else imports it.

Why an adapter: the client library is a replaceable part (DESIGN.md explains why
etcd3aio), its errors must be wrapped once into BlueMarble's (:mod:`bluemarble.errors`),
and two behaviours need fixing on top of it:

* **Lease keepalive** goes over one long-lived bidirectional ``LeaseKeepAlive`` stream
  shared by every lease this process refreshes (:class:`_KeepAliveStream`), instead of a
  new stream per refresh. At thousands of nodes this is the difference between one
  HTTP/2 stream and thousands of stream set-ups per second.
* **Watch compaction**: etcd3aio resumes a compacted watch past the compaction silently.
  :meth:`EtcdStore.watch_prefix` raises :class:`Compacted` instead, so the caller
  re-lists and never skips an event.

Every call has a deadline (``rpc_timeout_s``); an etcd that cannot be reached surfaces
as :class:`bluemarble.errors.Unavailable` with a message naming etcd and its endpoints.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import etcd3aio
import grpc
import grpc.aio
import structlog
from etcd3aio import _protobuf as etcdpb  # the request/stub types; no public alias exists

from bluemarble.errors import BlueMarbleError, NotFound, Unavailable

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
        manager = self._client._manager  # same target and channel options as the client
        self._keepalive = _KeepAliveStream(manager.target, manager.grpc_options, self.endpoints)
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

    The stream runs on gRPC's synchronous API in two threads of its own (requests are
    consumed by gRPC's sender thread, responses read by ours): a grpc.aio stream costs
    about twice the CPU per message, which at thousands of heartbeats a second is the
    largest single cost of the control plane. The event loop only enqueues lease ids and
    resolves futures, in batches.

    Each response (lease id, TTL) resolves every waiter for that lease. When the stream
    breaks, pending waiters fail with Unavailable and the reader reopens it with capped
    backoff.
    """

    _MAX_PENDING = 100_000

    def __init__(self, target: str, options: Sequence[tuple[str, Any]], endpoints: Sequence[str]):
        self._target = target
        self._options = list(options)
        self._endpoints = endpoints
        self._loop = asyncio.get_running_loop()
        self._requests: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._pending = 0
        self._waiters: dict[int, collections.deque[asyncio.Future[int]]] = {}
        self._responses: collections.deque[tuple[int, int] | BaseException] = collections.deque()
        self._drain_scheduled = False
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._wake = threading.Event()  # cuts a reconnect backoff short
        self._stream_up = False
        self._channel: grpc.Channel | None = None
        self._call: Any = None
        self._thread: threading.Thread | None = None

    async def refresh(self, lease_id: int, timeout_s: float) -> int:
        if self._closed.is_set():
            raise Unavailable("etcd client is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._read_loop, name="etcd-keepalive", daemon=True)
            self._thread.start()
        if self._pending >= self._MAX_PENDING:
            raise Unavailable("too many lease refreshes pending; etcd is not keeping up")
        future: asyncio.Future[int] = self._loop.create_future()
        # Responses for one lease come in request order: each resolves the oldest waiter.
        self._waiters.setdefault(lease_id, collections.deque()).append(future)
        self._pending += 1
        self._requests.put(lease_id)
        if not self._stream_up:
            self._wake.set()
        try:
            async with asyncio.timeout(timeout_s):  # no wrapper task per refresh
                return await future
        except TimeoutError as e:
            # The future stays queued (cancelled) so its late response is not taken
            # for the answer to a newer request.
            raise Unavailable(
                f"etcd ({','.join(self._endpoints)}) did not answer a lease refresh within "
                f"{timeout_s:g} s; retry shortly"
            ) from e

    # ---- reader thread ----

    def _request_iterator(self) -> Iterator[etcdpb.LeaseKeepAliveRequest]:
        while True:
            lease_id = self._requests.get()
            if lease_id is None:
                return
            yield etcdpb.LeaseKeepAliveRequest(ID=lease_id)

    def _read_loop(self) -> None:
        backoff_s = 0.1
        while not self._closed.is_set():
            # Plain-text like the client channel; TLS arrives with the operations step.
            self._channel = grpc.insecure_channel(self._target, options=self._options)
            stub = etcdpb.LeaseStub(self._channel)
            error: BaseException
            try:
                # Only a connected channel makes a usable stream: a call on a channel still
                # connecting would hold queued refreshes until the connect attempt fails.
                grpc.channel_ready_future(self._channel).result(timeout=1.0)
                self._call = stub.LeaseKeepAlive(self._request_iterator())
                self._stream_up = True
                for resp in self._call:
                    backoff_s = 0.1
                    self._post((int(resp.ID), max(0, int(resp.TTL))))
                error = Unavailable("etcd closed the lease keepalive stream")
            except grpc.RpcError as e:
                error = Unavailable(
                    f"etcd ({','.join(self._endpoints)}) lease keepalive failed: "
                    f"{e.code().name} {e.details()}; retry shortly"
                )
            except grpc.FutureTimeoutError:
                error = Unavailable(f"etcd ({','.join(self._endpoints)}) is not reachable; retry shortly")
            finally:
                self._channel.close()
            # Requests queued for the dead stream are answered by the failure below.
            while True:
                try:
                    if self._requests.get_nowait() is None:
                        return
                except queue.Empty:
                    break
            if self._closed.is_set():
                return
            self._post(error)
            # Back off, but reconnect at once (after 100 ms) when a refresh is waiting:
            # an etcd that came back should be used as soon as someone needs it.
            self._stream_up = False
            if not self._closed.wait(0.1):
                self._wake.wait(backoff_s - 0.1)
                self._wake.clear()
            backoff_s = min(backoff_s * 2, 2.0)

    def _post(self, item: tuple[int, int] | BaseException) -> None:
        """Hands a response (or a stream failure) to the event loop, batching wake-ups."""
        with self._lock:
            self._responses.append(item)
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    # ---- event loop side ----

    def _drain(self) -> None:
        with self._lock:
            items, self._responses = self._responses, collections.deque()
            self._drain_scheduled = False
        for item in items:
            if isinstance(item, BaseException):
                log.warning("lease keepalive stream broke; reopening", error=str(item))
                self._fail_all(item)
                continue
            lease_id, ttl_s = item
            waiters = self._waiters.get(lease_id)
            if not waiters:
                continue  # a request sent before the stream was reopened
            future = waiters.popleft()
            self._pending -= 1
            if not waiters:
                del self._waiters[lease_id]
            if not future.done():
                future.set_result(ttl_s)

    def _fail_all(self, error: BaseException) -> None:
        waiters, self._waiters = self._waiters, {}
        self._pending = 0
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    async def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._requests.put(None)
        if self._call is not None:
            self._call.cancel()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        self._fail_all(Unavailable("etcd client is closed"))
