"""The one adapter over the etcd client (etcd3aio); nothing else imports it.

Why an adapter: the client library is a replaceable part (DESIGN.md explains why
etcd3aio), its errors must be wrapped once into BlueMarble's (:mod:`bluemarble.core.errors`),
and some of its behaviours need replacing:

* **Lease keepalive** goes over one long-lived bidirectional ``LeaseKeepAlive`` stream
  shared by every lease this process refreshes (:class:`_KeepAliveStream`), instead of a
  new stream per refresh. At thousands of nodes this is the difference between one
  HTTP/2 stream and thousands of stream set-ups per second.
* **Watches** (:meth:`EtcdStore.watch_prefix`) speak etcd's Watch RPC directly, on the
  client's channel, because etcd3aio 0.3.0's ``WatchService.watch`` cannot be trusted
  across a reconnect: it sets its resume point from every response's *header* revision
  (and from ``compact_revision + 1`` after a compaction, silently skipping the compacted
  events). During a catch-up etcd (mvcc ``syncWatchers``) sends batches of up to 1,000
  revisions whose header is the store's current revision, far ahead of their events, so a
  stream cut after the first batch resumes past everything not yet delivered. Here the
  adapter owns the resume point, like etcd's Go client (``clientv3/watch.go``): the last
  delivered event's mod_revision + 1. See :class:`_WatchStream` and ``watch_prefix``.
* **Streams are ours to end.** grpc.aio consumes a request *iterator* in a task of its
  own and only cancels that task if the call is still running when it is cancelled; a call
  that etcd ended (an outage) leaves the task waiting on the iterator forever, and it is
  later reported as ``Task was destroyed but it is pending!`` with its generator failing
  ``aclose(): asynchronous generator is already running`` (both etcd3aio's watch and the
  former keepalive did this). Every stream here is written with ``call.write()`` from a
  task this module starts, stops and awaits.

Security (:class:`EtcdSecurity`): TLS to etcd (CA, and a client certificate for etcd's
``--client-cert-auth``) through etcd3aio's channel credentials, and user/password
authentication: the adapter authenticates before its first read, sends the token on
every call and on its own watch and keepalive streams, and re-authenticates every
``TOKEN_REFRESH_S`` (etcd's simple tokens expire after 5 minutes by default).

Every call has a deadline (``rpc_timeout_s``); an etcd that cannot be reached surfaces
as :class:`bluemarble.core.errors.Unavailable` with a message naming etcd and its endpoints.
Retries and reconnects use the one policy (:mod:`bluemarble.runtime.retry`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import ipaddress
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import etcd3aio
import grpc
import grpc.aio
import structlog
from etcd3aio import _protobuf as etcdpb  # the request/stub types; no public alias exists

from bluemarble.core.errors import BlueMarbleError, InvalidArgument, NotFound, Unavailable
from bluemarble.runtime import background, retry, tls
from bluemarble.runtime.channels import plain_details
from bluemarble.runtime.clock import Clock, SystemClock, run_with_timeout

log = structlog.get_logger(__name__)

# etcd's own channel reconnect backoff defaults to growing up to 120 s: after an etcd
# restart the control plane would stay UNAVAILABLE for minutes. Cap it at 2 s.
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


TOKEN_REFRESH_S = 60.0
"""How often the adapter re-authenticates to etcd (simple tokens live 300 s by default)."""


@dataclass(frozen=True)
class EtcdSecurity:
    """How to reach a secured etcd: TLS material (PEM bytes) and user/password.

    ``ca`` turns TLS on (etcd3aio needs the CA for TLS); ``cert``/``key`` are the client
    certificate. ``server_name`` is the name the etcd certificate must carry (default:
    the host of the first endpoint; needed because the client dials every endpoint
    through one ``ipv4:`` target). ``user`` empty: no authentication.
    """

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None
    user: str = ""
    password: str = field(default="", repr=False)
    files: tls.TlsFiles | None = None
    """Where ``ca``, ``cert`` and ``key`` were read from. Given, the adapter follows the
    files: once they change (a renewed certificate), it connects anew with them, and new
    calls and streams go on the new connection (see :meth:`EtcdStore.connect`)."""

    def __post_init__(self) -> None:
        assert (self.cert is None) == (self.key is None), "a client certificate needs its key"
        assert self.ca is not None or self.cert is None, "a client certificate needs the CA (TLS)"


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
    """What one watch response brings its consumer.

    ``revision`` is the revision the consumer is consistent at once it has applied
    ``events`` (and every earlier batch): the last event's mod_revision, or, for a batch
    without events (etcd's own progress notification), the revision etcd vouches the
    watch has delivered everything up to. Events of one revision are never split across
    batches; a batch may hold many revisions (a catch-up sends up to 1,000 at once).
    """

    revision: int
    events: tuple[WatchEvent, ...]


class WatchState(enum.Enum):
    """A watch's connection state, reported through ``watch_prefix(on_state=...)``.

    CONNECTED: a stream is open and etcd answered on it within the stall bound; events
    arrive as etcd commits them. SUSPENDED: the stream broke, or etcd went silent for
    longer than the stall bound (a stopped or overloaded member); the adapter is
    reconnecting from its resume point. Nothing is lost while SUSPENDED, but events are
    late, so whatever the consumer built from them may be stale. (The third state, "lost",
    is not a state but an exception: :class:`Compacted`.)
    """

    CONNECTED = "connected"
    SUSPENDED = "suspended"


WatchStateCallback = Callable[[WatchState, str], None]
"""``on_state(state, reason)``: called synchronously; must not block."""


class Compacted(BlueMarbleError):
    """A watch's start revision was compacted away: re-list, then watch again."""

    status = "OUT_OF_RANGE"

    def __init__(self, compact_revision: int):
        super().__init__(f"watch start revision was compacted (compact revision {compact_revision})")
        self.compact_revision = compact_revision


class Rewound(Compacted):
    """etcd's history ends before revisions already seen from it: it was restored from a
    snapshot (or replaced by another cluster at the same address). What was seen past its
    end is gone: re-list, then watch again, as after a compaction."""

    def __init__(self, seen_revision: int, current_revision: int):
        BlueMarbleError.__init__(
            self,
            f"etcd's revision is {current_revision}, behind revision {seen_revision} seen before: its data was "
            "restored from a snapshot or replaced, and what came after is gone",
        )
        self.compact_revision = 0
        self.seen_revision, self.current_revision = seen_revision, current_revision


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
    """Writes ``value`` to ``key`` with ``lease`` (0: none). ``keep_value``: attach the key
    to ``lease`` and leave its value as it is (etcd's ``ignore_value``; ``value`` unused),
    so re-leasing a record does not carry it over the wire again."""

    key: str
    value: bytes
    lease: int = 0
    keep_value: bool = False


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
    """Async access to etcd for one process. Create, :meth:`connect`, use, :meth:`close`.

    ``watch_progress_interval_s``: how often an idle watch asks etcd for a progress
    answer; a watch that gets no answer at all for three intervals is declared stalled
    and reconnected (see :meth:`watch_prefix`). ``clock`` times backoffs and watch bounds.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        rpc_timeout_s: float = 3.0,
        clock: Clock | None = None,
        watch_progress_interval_s: float = 2.0,
        security: EtcdSecurity | None = None,
    ):
        if not endpoints:
            # An operator's input (--etcd ""), not a programmer error: one line, not a traceback.
            raise InvalidArgument("no etcd endpoint given; give at least one host:port (--etcd)")
        if watch_progress_interval_s <= 0:
            raise ValueError(f"watch_progress_interval_s must be > 0, got {watch_progress_interval_s}")
        self.endpoints = tuple(endpoints)
        self.rpc_timeout_s = rpc_timeout_s
        self.watch_progress_interval_s = watch_progress_interval_s
        self.watch_stall_timeout_s = 3 * watch_progress_interval_s
        self._clock: Clock = clock or SystemClock()
        self._security = security or EtcdSecurity()
        self._tls = tls.TlsConfig(self._security.files, "--etcd") if self._security.files is not None else None
        self._tls_generation = 0
        self._tls_follower: asyncio.Task[None] | None = None
        self._client = self._new_client(self._security.ca, self._security.cert, self._security.key)
        target = grpc_target(self.endpoints)
        if target is not None:
            self._client._manager.target = target
        self._token_metadata: tuple[tuple[str, str], ...] = ()
        self._token_refresh: asyncio.Task[None] | None = None
        self._keepalive: _KeepAliveStream | None = None
        self._watch_stub: etcdpb.WatchStub | None = None
        self._watch_streams: set[_WatchStream] = set()
        self._closed = False

    @property
    def tls_generation(self) -> int:
        """How many times the adapter connected anew with changed TLS files."""
        return self._tls_generation

    def _new_client(self, ca: bytes | None, cert: bytes | None, key: bytes | None) -> etcd3aio.Etcd3Client:
        tls_args: dict[str, Any] = {}
        if ca is not None:
            host = self.endpoints[0].rsplit(":", 1)[0].strip("[]")
            tls_args = {
                "ca_cert": ca,
                "cert_key": key,
                "cert_chain": cert,
                "tls_server_name": self._security.server_name or host,
            }
        client = etcd3aio.Etcd3Client(list(self.endpoints), rpc_max_attempts=2, **tls_args)
        client._manager.grpc_options.extend(_RECONNECT_OPTIONS)
        return client

    # ---- lifecycle ----

    async def connect(self, startup_timeout_s: float = 30.0) -> None:
        """Opens the channel and waits until etcd answers a read.

        Raises Unavailable if etcd did not answer within ``startup_timeout_s``.
        """
        if _needs_resolution(self.endpoints):
            self._client._manager.target = await _resolved_target(self.endpoints)
            log.warning(
                "several etcd endpoints given by name: resolved once at start-up, so a member whose address "
                "changes is not followed; give one DNS name that resolves to every member instead "
                "(e.g. etcd's headless Service)", endpoints=",".join(self.endpoints),
                target=self._client._manager.target)
        await self._client.connect()
        channel = self._client._channel  # the keepalive and watch streams share the client's channel
        assert channel is not None
        self._keepalive = _KeepAliveStream(channel, self.endpoints, self._clock, lambda: self._token_metadata)
        self._watch_stub = etcdpb.WatchStub(channel)
        policy = retry.RetryPolicy(deadline_s=startup_timeout_s)

        async def first_contact() -> int:
            if self._security.user:
                await self._authenticate()
            return await self.current_revision()

        try:
            await retry.call(first_contact, what="waiting for etcd", policy=policy, clock=self._clock)
        except Unavailable as e:
            await self.close()
            raise Unavailable(
                f"etcd at {','.join(self.endpoints)} did not answer within "
                f"{startup_timeout_s:g} s ({e}); is etcd running and reachable?"
            ) from e
        except BlueMarbleError:
            await self.close()
            raise
        if self._security.user:
            self._token_refresh = background.start(self._refresh_token(), "etcd-token-refresh")
        if self._tls is not None:
            self._tls_follower = background.start(self._follow_tls(), "etcd-tls-files")

    async def _follow_tls(self) -> None:
        """Connects anew once the TLS files changed (looked at every
        :data:`bluemarble.runtime.tls.RECHECK_S`). Why: gRPC keeps a channel's client
        certificate for every reconnect, so after a renewal the old channel would present
        the old certificate, and fail once it expired. The new client takes every new
        call, watch and keepalive stream; the old one is dropped, not closed (closing
        would cancel the streams on it, see :func:`bluemarble.runtime.channels.outdated`),
        and its streams run until they break, then reopen on the new one. A new client
        that cannot reach etcd is logged and tried again at the next look."""
        assert self._tls is not None
        while not self._closed:
            await self._clock.sleep(tls.RECHECK_S)
            generation = self._tls.current_generation()
            if generation == self._tls_generation:
                continue
            material = self._tls.material()
            fresh = self._new_client(material.ca, material.cert, material.key)
            fresh._manager.target = self._client._manager.target
            try:
                async with self._wrapped("connecting with the new TLS files"):
                    await fresh.connect()
                if self._security.user:
                    await self._authenticate(fresh)
                async with self._wrapped("status read (new TLS files)"):
                    await fresh.kv.get("/", count_only=True, timeout=self.rpc_timeout_s)  # type: ignore[union-attr]
            except BlueMarbleError as e:
                log.warning("etcd TLS files changed, but a connection with them failed; keeping the current one",
                            error=str(e))
                with contextlib.suppress(Exception):
                    await fresh.close()
                continue
            self._client, self._tls_generation = fresh, generation
            channel = fresh._channel
            assert channel is not None
            self._watch_stub = etcdpb.WatchStub(channel)
            if self._keepalive is not None:
                self._keepalive.rebind(channel)
            log.info("etcd TLS files reloaded; new calls and streams use a new connection", generation=generation)

    async def _authenticate(self, client: etcd3aio.Etcd3Client | None = None) -> None:
        """Gets a token for the configured user and sends it from now on (on ``client``,
        the current one by default). Unavailable when etcd does not answer;
        BlueMarbleError naming the user when etcd refuses."""
        client = client or self._client
        auth = client.auth
        assert auth is not None, "EtcdStore.connect() was not called"
        user = self._security.user
        try:
            async with self._wrapped("authenticate"):
                response = await auth.authenticate(user, self._security.password, timeout=self.rpc_timeout_s)
        except Unavailable:
            raise
        except BlueMarbleError as e:
            raise BlueMarbleError(
                f"etcd at {','.join(self.endpoints)} refused user {user!r} ({e}); "
                "check --etcd-user and --etcd-password (BLUEMARBLE_ETCD_PASSWORD)"
            ) from e
        client.set_token(response.token)
        self._token_metadata = (("token", response.token),)

    async def _refresh_token(self) -> None:
        """Re-authenticates every :data:`TOKEN_REFRESH_S`; a failure is logged and retried
        at the next round (the current token usually still has minutes to live)."""
        while not self._closed:
            await self._clock.sleep(TOKEN_REFRESH_S)
            try:
                await self._authenticate()
            except BlueMarbleError as e:
                log.warning("etcd re-authentication failed; retrying later", error=str(e))

    async def close(self) -> None:
        """Ends the keepalive stream and every watch stream, then closes the channel.

        A watch still being iterated raises Unavailable (the client is closed).
        """
        self._closed = True
        if self._tls_follower is not None:
            await background.stop(self._tls_follower)
            self._tls_follower = None
        if self._token_refresh is not None:
            await background.stop(self._token_refresh)
            self._token_refresh = None
        if self._keepalive is not None:
            await self._keepalive.close()
            self._keepalive = None
        for stream in list(self._watch_streams):
            stream.cut("the etcd client is closing")
        await self._client.close()

    # ---- error wrapping ----

    def _unavailable(self, operation: str, e: BaseException) -> Unavailable:
        return Unavailable(
            f"etcd unavailable ({','.join(self.endpoints)}) during {operation}: "
            f"{plain_details(str(e)) or ('no answer in time' if isinstance(e, TimeoutError) else type(e).__name__)}; "
            "retry shortly"
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
                raise NotFound(f"etcd: {plain_details(e.details() or '')}") from e
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise _exhausted(operation, e.details() or "") from e
            details = plain_details(e.details() or "")
            raise BlueMarbleError(f"etcd refused {operation}: {e.code().name} {details}") from e

    @property
    def _kvs(self) -> etcd3aio.kv.KVService:
        if self._closed:
            raise Unavailable(f"the etcd client ({','.join(self.endpoints)}) is closed")
        assert self._client.kv is not None, "EtcdStore.connect() was not called"
        return self._client.kv

    # ---- KV ----

    async def current_revision(self) -> int:
        async with self._wrapped("status read"):
            resp = await self._kvs.get("/", count_only=True, timeout=self.rpc_timeout_s)
        return int(resp.header.revision)

    async def alarms(self) -> list[str]:
        """The alarms etcd has raised ("NOSPACE": out of space, every write refused;
        "CORRUPT"), one name per member and kind, sorted; [] when none."""
        if self._closed or self._client.maintenance is None:
            raise Unavailable(f"the etcd client ({','.join(self.endpoints)}) is closed")
        async with self._wrapped("alarm list"):
            resp = await self._client.maintenance.alarms(timeout=self.rpc_timeout_s)
        names = {0: "NONE", 1: "NOSPACE", 2: "CORRUPT"}
        return sorted({names.get(int(a.alarm), f"alarm {int(a.alarm)}") for a in resp.alarms if int(a.alarm)})

    async def snapshot(self, timeout_s: float) -> AsyncIterator[bytes]:
        """etcd's whole backend database, as the member answering streams it (what
        ``etcdctl snapshot save`` writes: the database, then its SHA-256). Not retried once
        bytes flowed: a caller that gets an error starts again from nothing."""
        if self._closed or self._client.maintenance is None:
            raise Unavailable(f"the etcd client ({','.join(self.endpoints)}) is closed")
        async with self._wrapped("snapshot"):
            async for chunk in self._client.maintenance.snapshot(timeout=timeout_s, max_attempts=1):
                yield chunk

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

    async def get_page(self, prefix: str, start_key: str, limit: int,
                       *, keys_only: bool = False) -> tuple[list[KeyValue], bool]:
        """Up to ``limit`` keys below ``prefix``, from ``start_key`` (inclusive; "" for the
        first) in key order, and whether more follow. For scans too large for one answer
        (a caller resumes from the last key + "\\0"). ``keys_only``: every value is empty
        (revisions and leases still come)."""
        start = start_key or prefix
        async with self._wrapped(f"list {prefix} from {start}"):
            resp = await self._kvs.get(
                start,
                range_end=etcd3aio.prefix_range_end(prefix),
                limit=limit,
                keys_only=keys_only,
                timeout=self.rpc_timeout_s,
            )
        return [_kv(raw) for raw in resp.kvs], bool(resp.more)

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
            if op.keep_value:
                return etcdpb.RequestOp(
                    request_put=etcdpb.PutRequest(key=op.key.encode("utf-8"), lease=op.lease, ignore_value=True)
                )
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

    async def watch_prefix(
        self,
        prefix: str,
        start_revision: int,
        *,
        on_state: WatchStateCallback | None = None,
    ) -> AsyncIterator[WatchBatch]:
        """Every change below ``prefix`` from ``start_revision`` on (inclusive), in
        revision order, each exactly once, forever.

        The adapter owns the resume point: the last delivered event's mod_revision + 1,
        or etcd's own progress notification's revision + 1 (see :class:`_WatchStream` for
        why only those). A stream that breaks (etcd restarted, connection lost, a member
        without a leader) or stalls (no answer, not even to a progress request, for
        ``watch_stall_timeout_s``) is reopened from there after a jittered backoff
        (:data:`bluemarble.runtime.retry.FOREVER`); ``on_state`` hears SUSPENDED (with the
        reason) and CONNECTED again. Those are not errors for the caller: it gets every
        event, late.

        Raises :class:`Compacted` when the resume point was compacted away (re-list, then
        watch again: nothing is ever skipped silently), :class:`Rewound` (a Compacted)
        when etcd's history now ends before it (etcd restored from a snapshot);
        Unavailable only once this store is closed (a watch can never resume then); a fatal BlueMarbleError when etcd
        refuses the watch itself (permissions, a bad range): retrying would not help.
        """
        if start_revision < 1:
            raise ValueError(f"start_revision must be >= 1, got {start_revision}")
        assert self._watch_stub is not None, "EtcdStore.connect() was not called"
        create = etcdpb.WatchCreateRequest(
            key=prefix.encode("utf-8"),
            range_end=etcd3aio.prefix_range_end(prefix),
            progress_notify=True,  # etcd's periodic notification advances an idle resume point
            fragment=True,  # a catch-up larger than gRPC's 4 MiB message limit arrives in parts
        )
        next_revision = start_revision
        backoff = retry.Backoff(retry.FOREVER, self._clock)
        suspended_at_s: float | None = None
        while True:
            if self._closed:
                raise Unavailable(f"the etcd client is closed; the watch on {prefix} ended")
            create.start_revision = next_revision
            stream = _WatchStream(self, prefix)
            opened_at_s: float | None = None
            delivered = False
            try:
                try:
                    await stream.open(create)
                    if stream.created_revision < next_revision - 1:
                        # This member's store ends before what was seen: a member still
                        # catching up, or etcd's history went back. A linearizable read
                        # (through etcd's leader) tells them apart.
                        try:
                            current = await self.current_revision()
                        except BlueMarbleError as e:  # not answered: reconnect, as for a broken stream
                            raise _StreamBroken(f"etcd's revision could not be read: {e}") from e
                        if current < next_revision - 1:
                            raise Rewound(next_revision - 1, current)
                    opened_at_s = self._clock.monotonic_s()
                    answered = False
                    while True:
                        batch = stream.to_batch(await stream.next_response(), next_revision)
                        if not answered:
                            # Connected: etcd answered past the creation (events, or the
                            # progress request open() sent).
                            answered = True
                            if suspended_at_s is not None:
                                log.info(
                                    "etcd watch resumed",
                                    prefix=prefix,
                                    from_revision=next_revision,
                                    suspended_s=round(self._clock.monotonic_s() - suspended_at_s, 3),
                                )
                            suspended_at_s = None
                            if on_state is not None:
                                on_state(WatchState.CONNECTED, "")
                        if batch is not None:
                            next_revision = batch.revision + 1
                            delivered = True
                            yield batch
                except _StreamBroken as e:
                    reason = plain_details(str(e))
                except grpc.aio.AioRpcError as e:
                    if e.code() in _WATCH_FATAL_CODES:
                        raise BlueMarbleError(
                            f"etcd refused the watch on {prefix}: {e.code().name} {plain_details(e.details() or '')}"
                        ) from e
                    reason = f"{e.code().name} {plain_details(e.details() or '')}"
            finally:
                await stream.close()
            if self._closed:
                raise Unavailable(f"the etcd client is closed; the watch on {prefix} ended")
            if delivered or (
                opened_at_s is not None and self._clock.monotonic_s() - opened_at_s >= self.watch_stall_timeout_s
            ):
                backoff.reset()  # that stream worked; one that fails right after creation backs off further
            if suspended_at_s is None:
                suspended_at_s = self._clock.monotonic_s()
                log.warning(
                    "etcd watch suspended; reconnecting", prefix=prefix, resume_from=next_revision, reason=reason
                )
            else:
                log.debug("etcd watch still reconnecting", prefix=prefix, resume_from=next_revision, reason=reason)
            if on_state is not None:
                on_state(WatchState.SUSPENDED, f"{reason} (resuming from revision {next_revision})")
            await backoff.sleep()

    def _cut_watch_streams(self, reason: str = "cut by a test") -> int:
        """Test hook: breaks every open watch stream as a lost connection would (the call
        is cancelled; buffered responses are dropped). Returns how many were cut."""
        streams = list(self._watch_streams)
        for stream in streams:
            stream.cut(reason)
        return len(streams)


# A watch refused for these reasons would be refused again: the caller must hear of it.
_WATCH_FATAL_CODES = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

# etcd's rpctypes.MetadataRequireLeaderKey: a member that loses its leader ends the stream
# (UNAVAILABLE "no leader") instead of serving a watch that can never see a new write.
# Progress answers cannot tell us that: an isolated member answers them from its own,
# stale revision.
_REQUIRE_LEADER = (("hasleader", "true"),)

_PROGRESS_REQUEST = etcdpb.WatchRequest(progress_request={})  # an empty WatchProgressRequest

_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # (missing from grpc-stubs)


class _StreamBroken(Exception):
    """A watch stream ended or stalled; reconnecting from the resume point is the cure."""


def _being_cancelled() -> bool:
    """True when the current task itself is being cancelled (not just a call it used)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _exhausted(operation: str, details: str) -> Unavailable:
    """etcd's RESOURCE_EXHAUSTED: out of space (its NOSPACE alarm: every write refused
    until an operator frees space and disarms it) or too many requests. Either passes,
    so callers may retry; the message says what an operator has to do for the first."""
    if "space exceeded" in details:
        return Unavailable(
            f"etcd is out of space and refuses writes ({operation}: {details}): an operator must raise its "
            "--quota-backend-bytes, or compact and defragment it, then disarm the NOSPACE alarm; retry after that"
        )
    return Unavailable(f"etcd is overloaded ({operation}: {details}); retry shortly")


class _WatchStream:
    """One Watch RPC carrying one watch, read by whoever iterates ``watch_prefix``.

    Reads happen only when the consumer asks for the next batch, so a slow consumer holds
    etcd back through gRPC flow control instead of buffering without bound, and its
    processing time never counts as etcd's silence. While a read is pending, a progress
    request is written every ``watch_progress_interval_s``; if nothing at all arrives for
    ``watch_stall_timeout_s`` the stream is declared stalled. The pending read runs in a
    task of its own so that it can outlive those timers (cancelling a grpc.aio read
    cancels the whole call) and so that a call cancelled under it (a cut, a closed
    channel) is seen as a broken stream, not as the consumer's own cancellation.

    Which responses move the resume point (checked against etcd 3.4.23 by
    tests/integration/test_watch_resume.py):

    * events: the last event's mod_revision. Never the header: a catch-up batch's header
      is the store's current revision, ahead of its events.
    * etcd's own progress notification (``progress_notify``: no events, our watch id):
      its header revision. etcd sends it only to a synced watcher, through the same
      channel as the watcher's events, so nothing older is still in flight.
    * an answer to our progress *request* (watch id -1): liveness only. Before etcd
      3.4.25 / 3.5.8 (etcd-io/etcd#15220) the server answers it out of band, with the
      current revision, even while the watcher is catching up: etcd 3.4.23 answers it
      before the catch-up events it claims to be past.
    """

    def __init__(self, store: EtcdStore, prefix: str):
        assert store._watch_stub is not None
        self._store = store
        self._prefix = prefix
        self._clock = store._clock
        self._call = store._watch_stub.Watch(metadata=_REQUIRE_LEADER + store._token_metadata)
        self._read: asyncio.Future[Any] | None = None
        self._cut_reason: str | None = None
        self._fragments: list[Any] = []
        self.watch_id = -1
        self.created_revision = 0
        store._watch_streams.add(self)

    async def open(self, create: etcdpb.WatchCreateRequest) -> None:
        """Creates the watch and asks for progress at once (so that even an idle watch
        hears back promptly); returns once etcd confirmed the creation."""
        await self._write(etcdpb.WatchRequest(create_request=create))
        await self._write(_PROGRESS_REQUEST)
        resp = await self.next_response()
        if not resp.created:
            raise _StreamBroken(f"etcd answered a watch creation with {resp}")
        if resp.canceled:  # refused at creation: the reason is in cancel_reason
            self._raise_canceled(resp)
        self.watch_id = int(resp.watch_id)
        self.created_revision = int(resp.header.revision)  # the member's store revision

    async def next_response(self) -> Any:
        """The next response from etcd (fragments reassembled).

        Raises _StreamBroken (stalled, cut, ended) or grpc.aio.AioRpcError (etcd's status).
        """
        while True:
            resp = await self._next_message()
            if resp.fragment:  # one part of a response too large for a single message
                self._fragments.extend(resp.events)
                continue
            if self._fragments:
                events = [*self._fragments, *resp.events]
                self._fragments = []
                del resp.events[:]
                resp.events.extend(events)
            return resp

    def to_batch(self, resp: Any, next_revision: int) -> WatchBatch | None:
        """The batch ``resp`` delivers to a consumer at ``next_revision``, or None (a
        liveness-only answer). Raises Compacted, or BlueMarbleError if etcd canceled."""
        if resp.compact_revision > 0:
            raise Compacted(int(resp.compact_revision))
        if resp.canceled:
            self._raise_canceled(resp)
        if resp.events:
            # Events before the resume point cannot come from etcd (it starts there);
            # dropping them keeps "exactly once" even if a server re-sent some.
            events = tuple(_event(ev) for ev in resp.events if ev.kv.mod_revision >= next_revision)
            if not events:
                return None
            return WatchBatch(events[-1].kv.mod_revision, events)
        if resp.watch_id == self.watch_id and not resp.created and resp.header.revision >= next_revision:
            return WatchBatch(int(resp.header.revision), ())  # etcd's own progress notification
        return None

    def _raise_canceled(self, resp: Any) -> None:
        raise BlueMarbleError(f"etcd canceled the watch on {self._prefix}: {resp.cancel_reason or 'no reason given'}")

    async def _next_message(self) -> Any:
        if self._read is None:
            self._read = asyncio.ensure_future(self._call.read())
        waiting_since_s = self._clock.monotonic_s()
        interval_s = self._store.watch_progress_interval_s
        while not await self._wait_read(interval_s):
            silent_s = self._clock.monotonic_s() - waiting_since_s
            if silent_s >= self._store.watch_stall_timeout_s:
                self.cut(
                    f"etcd sent nothing on the watch for {silent_s:.1f} s, not even a progress "
                    "answer (stopped, overloaded or unreachable member)"
                )
                break
            await self._write(_PROGRESS_REQUEST)
        read, self._read = self._read, None
        if self._cut_reason is not None or read.cancelled():
            if not read.done():
                read.cancel()
                await asyncio.wait((read,))
            self._retrieve(read)
            raise _StreamBroken(self._cut_reason or "the watch stream was cancelled")
        resp = read.result()  # raises the call's AioRpcError
        if resp is _EOF:
            raise _StreamBroken("etcd ended the watch stream")
        return resp

    async def _wait_read(self, timeout_s: float) -> bool:
        """Waits for the pending read up to ``timeout_s`` on the clock; True once it is done."""
        assert self._read is not None
        if self._read.done():
            return True
        timer = asyncio.ensure_future(self._clock.sleep(timeout_s))
        try:
            await asyncio.wait((self._read, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
        return self._read.done()

    async def _write(self, request: etcdpb.WatchRequest) -> None:
        try:
            await run_with_timeout(self._clock, self._call.write(request), self._store.watch_stall_timeout_s)
        except TimeoutError as e:
            self.cut(f"etcd did not take a watch request within {self._store.watch_stall_timeout_s:g} s")
            raise _StreamBroken(self._cut_reason) from e
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            raise _StreamBroken(self._cut_reason or "the watch stream was cancelled") from None
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
            pass  # the call has ended; the read says why

    def cut(self, reason: str) -> None:
        """Breaks the stream now (the pending read ends); the owner reconnects."""
        if self._cut_reason is None:
            self._cut_reason = reason
        self._call.cancel()

    async def close(self) -> None:
        """Cancels the call and waits for the pending read, so no task outlives the stream."""
        self._store._watch_streams.discard(self)
        self._call.cancel()
        read, self._read = self._read, None
        if read is not None:
            read.cancel()
            await asyncio.wait((read,))
            self._retrieve(read)

    @staticmethod
    def _retrieve(read: asyncio.Future[Any]) -> None:
        if not read.cancelled():
            read.exception()  # retrieved: no "exception was never retrieved" at collection


def _event(raw: Any) -> WatchEvent:
    return WatchEvent(EventType.DELETE if raw.type == 1 else EventType.PUT, _kv(raw.kv))


class _KeepAliveStream:
    """One LeaseKeepAlive stream shared by every refresh this process makes.

    Requests are queued; etcd answers a stream's requests in order, so each response
    (lease id, TTL) resolves the *oldest* waiter for that lease: a late answer to an
    earlier request is never taken for the answer to a newer one (which matters right
    after a revoke). When the stream breaks, pending waiters fail with Unavailable and
    the next refresh reopens it (after a jittered backoff between failures,
    :class:`bluemarble.runtime.retry.Backoff`). A writer task of our own feeds the stream
    with ``call.write()`` and is stopped and awaited with it (see the module docstring).

    (A version on gRPC's synchronous API in a thread of its own was measured and was
    slower in the server: GIL hand-offs cost more than grpc.aio's per-message overhead.)
    """

    _MAX_PENDING = 100_000

    def __init__(
        self,
        channel: grpc.aio.Channel,
        endpoints: Sequence[str],
        clock: Clock,
        metadata: Callable[[], tuple[tuple[str, str], ...]] = tuple,
    ):
        self._stub = etcdpb.LeaseStub(channel)
        self._metadata = metadata
        self._endpoints = endpoints
        self._clock = clock
        self._failures = retry.FailureLog()  # one warning per outage, then summaries
        self._queue: asyncio.Queue[int] = asyncio.Queue(self._MAX_PENDING)
        self._waiters: dict[int, collections.deque[asyncio.Future[int]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def rebind(self, channel: grpc.aio.Channel) -> None:
        """The next stream opens on ``channel``; the current one runs until it breaks."""
        self._stub = etcdpb.LeaseStub(channel)

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

    async def _run(self) -> None:
        backoff = retry.Backoff(retry.FOREVER, self._clock)
        while not self._closed:
            error = await self._stream_once(backoff)
            self._fail_all(error)
            if self._closed:
                return
            self._failures.failed("stream", self._clock.monotonic_s(), "lease keepalive stream broke; reopening",
                                  error=str(error))
            await backoff.sleep()
            if not self._waiters:
                return  # reopened on demand by the next refresh

    async def _stream_once(self, backoff: retry.Backoff) -> BaseException:
        """Runs one stream until it breaks; returns the error its waiters fail with."""
        call = self._stub.LeaseKeepAlive(metadata=self._metadata() or None)
        writer = background.start(self._send(call), "etcd-lease-keepalive-send")
        try:
            while True:
                resp = await call.read()
                if resp is _EOF:
                    return Unavailable("etcd closed the lease keepalive stream")
                backoff.reset()
                self._failures.recovered("stream", self._clock.monotonic_s(), "lease keepalive stream answers again")
                self._resolve(int(resp.ID), max(0, int(resp.TTL)))
        except grpc.aio.AioRpcError as e:
            return Unavailable(
                f"etcd ({','.join(self._endpoints)}) lease keepalive failed: "
                f"{e.code().name} {plain_details(e.details() or '')}; retry shortly"
            )
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            return Unavailable("the lease keepalive stream was cancelled (etcd client closing)")
        finally:
            call.cancel()
            await background.stop(writer)

    async def _send(self, call: Any) -> None:
        while True:
            lease_id = await self._queue.get()
            try:
                await call.write(etcdpb.LeaseKeepAliveRequest(ID=lease_id))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the stream ended; the reader reports why and fails the waiters

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


# ---- the channel's target ----
#
# etcd3aio dials ``ipv4:a:p,b:p`` (round robin over the members), and gRPC's ipv4 scheme
# takes address literals only: a DNS name, what Kubernetes gives, would never connect.


def _host(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[0].strip("[]")


def _is_ipv4(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
    except ValueError:
        return host == "localhost"  # etcd3aio rewrites it to 127.0.0.1


def grpc_target(endpoints: Sequence[str]) -> str | None:
    """The gRPC target for ``endpoints`` ("host:port"), or None where etcd3aio's own
    ``ipv4:`` list fits (every host an IPv4 literal). One DNS name becomes ``dns:///``:
    gRPC resolves it again whenever connections fail, and a name that resolves to every
    member (a headless Service) is balanced over all of them. Several names are resolved
    at :meth:`EtcdStore.connect` (see :func:`_resolved_target`)."""
    hosts = [_host(e) for e in endpoints]
    if all(_is_ipv4(h) for h in hosts):
        return None
    if len(endpoints) == 1:
        return f"dns:///{endpoints[0]}"
    return None


def _needs_resolution(endpoints: Sequence[str]) -> bool:
    return len(endpoints) > 1 and not all(_is_ipv4(_host(e)) for e in endpoints)


async def _resolved_target(endpoints: Sequence[str]) -> str:
    """An ``ipv4:`` (or, with no IPv4 address at all, ``ipv6:``) target over every address
    the endpoints' names resolve to now. Raises Unavailable when none resolves."""
    loop = asyncio.get_running_loop()
    v4: list[str] = []
    v6: list[str] = []
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        host = host.strip("[]")
        try:
            infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as e:
            log.warning("etcd endpoint does not resolve", endpoint=endpoint, error=str(e))
            continue
        for family, _type, _proto, _name, address in infos:
            if family == socket.AF_INET and f"{address[0]}:{port}" not in v4:
                v4.append(f"{address[0]}:{port}")
            elif family == socket.AF_INET6 and f"[{address[0]}]:{port}" not in v6:
                v6.append(f"[{address[0]}]:{port}")
    if v4:
        return "ipv4:" + ",".join(v4)
    if v6:
        return "ipv6:" + ",".join(v6)
    raise Unavailable(f"no etcd endpoint resolves ({', '.join(endpoints)}); check --etcd")
