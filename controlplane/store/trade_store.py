"""Decision records of cross-shard trades in etcd: create-if-absent, reads, retention.

Why this module exists: the decision record (``/bluemarble/<cluster>/trades/<trade_id>``,
a :class:`~bluemarble.v1.trade_pb2.TradeRecord`) is the commit point of a cross-shard
trade (DESIGN.md flow 6). It is written exactly once, by the one etcd transaction of
:meth:`TradeStore.create_if_absent` (the rule of
:func:`bluemarble.core.trades.decision.create_if_absent`), and afterwards only its lease
changes: records are created without a lease, and once both participants applied the
decision they are attached, in batches and off the critical path, to the retention lease
of the current time bucket (:class:`RetentionLeases`), so expiry collects them in bulk.
A record without a lease is one whose phase 2 may not be finished: the leader's sweep
lists them (:meth:`TradeStore.list_unretained`). So that the sweep need not read every
record retained in the last day to find them, the transaction that creates a record also
writes a copy under ``trades-unretained/<trade_id>``, and the transaction that attaches the
record to its lease deletes the copy: that prefix holds exactly the unretained records.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from bluemarble.core.errors import BlueMarbleError, NotFound, Unavailable
from bluemarble.core.ids import TradeId
from bluemarble.runtime import background, retry
from bluemarble.runtime.clock import Clock, wait_event
from bluemarble.v1 import common_pb2, trade_pb2
from controlplane.store import codec
from controlplane.store.etcd import Compare, Delete, EtcdStore, Get, KeyValue, Put
from controlplane.store.keys import KeySchema

log = structlog.get_logger(__name__)

BUCKET_S = 3600
"""Width of a retention bucket: every record attached within one hour shares one lease."""
ATTACH_BATCH = 64
"""Records attached per etcd transaction (etcd's default limit is 128 operations: a record
is one put and the delete of its unretained copy)."""
ATTACH_FLUSH_S = 0.2
"""How long a record waits for others to share its attach transaction."""
MAX_PENDING_ATTACH = 100_000
"""Records waiting to be attached at most; past it they are left to the leader's sweep."""
LIST_PAGE = 500
DECISION_BATCH = 32
"""Decisions created in one etcd transaction at most (etcd's default limit is 128
operations per branch: a decision is one compare, two puts and one read)."""
DECISION_BATCH_BYTES = 384 << 10
"""Record bytes in one decision transaction at most, each written twice (the record and its
unretained copy): etcd refuses requests over 1.5 MiB."""


def _field_names(descriptor: object) -> frozenset[str]:
    return frozenset(f.name for f in descriptor.fields)  # type: ignore[attr-defined]


_SCHEMA_KNOWN = (
    _field_names(trade_pb2.TradeRecord.DESCRIPTOR) == {
        "trade_id", "outcome", "reason", "decided_by", "decided_at_ms", "request", "shard_a", "shard_b",
        "abort_cause"}
    and _field_names(trade_pb2.ExecuteTradeRequest.DESCRIPTOR) == {
        "trade_id", "player_a", "player_b", "a_gives", "b_gives"}
    and _field_names(common_pb2.Offer.DESCRIPTOR) == {"item_ids", "gold"}
)
"""Whether :func:`encode_record` knows every field of the messages it writes (else it
leaves the record to the generic encoder)."""


def _offer_json(offer: common_pb2.Offer) -> dict[str, object]:
    return {"gold": str(offer.gold), "item_ids": list(offer.item_ids)}


def encode_record(record: trade_pb2.TradeRecord) -> bytes:
    """``codec.encode(record)``, byte for byte, built without the generic protobuf JSON
    printer, which walks descriptors field by field: it was the largest piece of Python
    work of a cross-shard trade in the control plane, on the critical path (purely
    computational). Falls back to ``codec.encode`` for a schema or an enum value it does
    not know, so a field added to the messages is never dropped."""
    if not _SCHEMA_KNOWN:
        return codec.encode(record)
    try:
        outcome = common_pb2.TradeOutcome.Name(record.outcome)
        cause = common_pb2.TradeAbortCause.Name(record.abort_cause)
    except ValueError:
        return codec.encode(record)
    value: dict[str, object] = {
        "abort_cause": cause, "decided_at_ms": str(record.decided_at_ms), "decided_by": record.decided_by,
        "outcome": outcome,
        "reason": record.reason, "shard_a": record.shard_a, "shard_b": record.shard_b, "trade_id": record.trade_id,
    }
    if record.HasField("request"):
        r = record.request
        request: dict[str, object] = {"player_a": r.player_a, "player_b": r.player_b, "trade_id": r.trade_id}
        if r.HasField("a_gives"):
            request["a_gives"] = _offer_json(r.a_gives)
        if r.HasField("b_gives"):
            request["b_gives"] = _offer_json(r.b_gives)
        value["request"] = request
    return json.dumps(value, sort_keys=True).encode("utf-8")


@dataclass(frozen=True)
class StoredTrade:
    """A decision record as stored: the record, its key's create revision (identifies
    this record: a record collected and written again has another) and its lease (0:
    not retained yet)."""

    record: trade_pb2.TradeRecord
    create_revision: int
    lease: int

    @property
    def retained(self) -> bool:
        return self.lease != 0


class RetentionLeases:
    """One etcd lease per time bucket of ``bucket_s``, granted on first use with
    TTL = ``retention_s`` + ``bucket_s``: a record attached at any time within its bucket
    lives at least ``retention_s`` after it was attached. Each control-plane replica
    grants its own (a handful of leases per hour for the whole cluster)."""

    def __init__(self, store: EtcdStore, clock: Clock, *, retention_s: int, bucket_s: int = BUCKET_S):
        if retention_s <= 0 or bucket_s <= 0:
            raise ValueError(f"retention_s and bucket_s must be > 0, got {retention_s}, {bucket_s}")
        self._store = store
        self._clock = clock
        self.retention_s = retention_s
        self.bucket_s = bucket_s
        self._leases: dict[int, int] = {}  # bucket -> lease id (the current bucket only)

    @property
    def ttl_s(self) -> int:
        return self.retention_s + self.bucket_s

    async def current(self) -> int:
        """The lease of the current bucket (granted now if this replica has none)."""
        bucket = self._clock.wall_ms() // (self.bucket_s * 1000)
        lease = self._leases.get(bucket)
        if lease is None:
            lease, _ = await self._store.grant_lease(self.ttl_s)
            self._leases = {bucket: lease}  # older buckets' leases expire by themselves
            log.info("trade retention lease granted", lease_id=f"{lease:#x}", ttl_s=self.ttl_s, bucket=bucket)
        return lease

    def forget(self, lease: int) -> None:
        """``lease`` is gone (etcd said so): the next :meth:`current` grants another."""
        self._leases = {b: lease_id for b, lease_id in self._leases.items() if lease_id != lease}


class TradeStore:
    """Decision records of one cluster. :meth:`start` the attach batcher, :meth:`stop` it."""

    def __init__(self, store: EtcdStore, keys: KeySchema, clock: Clock, *, retention_s: int,
                 bucket_s: int = BUCKET_S):
        self._store = store
        self._keys = keys
        self._clock = clock
        self.leases = RetentionLeases(store, clock, retention_s=retention_s, bucket_s=bucket_s)
        self._pending: dict[str, int] = {}  # key -> create revision, waiting to be attached
        self._decisions: collections.deque[_Decision] = collections.deque()  # waiting for a transaction
        self._deciding: asyncio.Task[None] | None = None
        self.decision_txns = 0
        """Decision transactions sent so far (for tests and benchmarks)."""
        self._wake = asyncio.Event()
        self._attach_failures = retry.FailureLog()
        self._task: asyncio.Task[None] | None = None
        self.attached = 0
        """Records attached by this store so far (for tests and logs)."""

    def _stored(self, kv: KeyValue) -> StoredTrade:
        return StoredTrade(codec.decode(kv.value, trade_pb2.TradeRecord, kv.key), kv.create_revision, kv.lease)

    async def create_if_absent(self, record: trade_pb2.TradeRecord) -> tuple[StoredTrade, bool]:
        """Writes ``record`` (without a lease) unless its trade already has one, in one
        etcd transaction that reads the existing record when there is one. Returns the
        record as stored and whether ``record`` was written. The existing record stands
        whatever ``record`` says (I3).

        Decisions that arrive while a decision transaction is on its way wait for it and
        then go together, in one transaction that creates all of them if every one is
        absent; when some exist, those are answered from the same transaction's reads and
        the others go again in the next (:meth:`_decide`). Each record is still created by
        exactly one transaction that found it absent; a lone decision is sent at once.

        Raises Unavailable when etcd cannot be reached (then nothing is known: the record
        may or may not have been written; a retry of this call answers which),
        CorruptRecord when the stored value does not parse.
        """
        trade_id = TradeId(record.trade_id)
        decision = _Decision(
            self._keys.trade(trade_id), self._keys.unretained_trade(trade_id), encode_record(record), record,
            asyncio.get_running_loop().create_future(),
        )
        self._decisions.append(decision)
        if self._deciding is None or self._deciding.done():
            self._deciding = asyncio.ensure_future(self._decide_pending())
        return await decision.future

    async def _decide_pending(self) -> None:
        """Sends the waiting decisions, one transaction at a time, until none is left."""
        while self._decisions:
            batch: list[_Decision] = []
            later: list[_Decision] = []  # a second decision of one trade: the next transaction
            keys: set[str] = set()
            size = 0
            while self._decisions and len(batch) < DECISION_BATCH:
                if batch and size + len(self._decisions[0].value) > DECISION_BATCH_BYTES:
                    break
                decision = self._decisions.popleft()
                if decision.future.done():  # its caller gave up before it was sent
                    continue
                if decision.key in keys:  # etcd refuses a transaction that puts one key twice
                    later.append(decision)
                    continue
                keys.add(decision.key)
                batch.append(decision)
                size += len(decision.value)
            self._decisions.extendleft(reversed(later))
            if batch:
                await self._decide(batch)

    async def _decide(self, batch: list[_Decision]) -> None:
        """One create-if-absent transaction for ``batch``; answers every decision of it,
        or puts back first in line those that must go again."""
        self.decision_txns += 1
        compares = [Compare.absent(d.key) for d in batch]
        try:
            puts = [p for d in batch for p in (Put(d.key, d.value), Put(d.unretained_key, d.value))]
            result = await self._store.txn(compares, puts, [Get(d.key) for d in batch])
        except BaseException as e:  # Unavailable, mostly: every caller learns that nothing is known
            stopped = Unavailable("the control plane is stopping; the trade's decision may or may not be recorded")
            for d in batch:
                _settle(d.future, error=e if isinstance(e, Exception) else stopped)
            if not isinstance(e, Exception):
                raise
            return
        if result.succeeded:
            for d in batch:
                _settle(d.future, (StoredTrade(d.record, result.revision, 0), True))
            return
        again: list[_Decision] = []
        for d, found in zip(batch, result.reads, strict=False):
            if not found:
                again.append(d)  # absent: another decision of the batch failed the compare
                continue
            try:
                _settle(d.future, (self._stored(found[0]), False))
            except BlueMarbleError as e:
                _settle(d.future, error=e)
        if len(result.reads) != len(batch) or len(again) == len(batch):
            # A failed compare reads its record in the same transaction: this cannot be.
            error = BlueMarbleError(f"etcd transaction on {batch[0].key} failed its compare but read nothing")
            for d in batch:
                _settle(d.future, error=error)
            return
        self._decisions.extendleft(reversed(again))

    async def get(self, trade_id: str) -> StoredTrade | None:
        """The record of ``trade_id``, None if there is none. Unavailable, CorruptRecord."""
        kv = await self._store.get(self._keys.trade(TradeId(trade_id)))
        return None if kv is None else self._stored(kv)

    async def list_unretained(self, limit: int, *, full_scan: bool = False) -> list[StoredTrade]:
        """Up to ``limit`` records that have no retention lease, in key order: their copies
        under ``trades-unretained/`` (a copy has its record's value and create revision:
        one transaction wrote both). With ``full_scan``, the records themselves instead,
        every one of them a page at a time (records written before the copies existed):
        keys only, and the value of each record without a lease read on its own (nearly
        every record has its lease, so a pass reads a tenth of the bytes).
        Unavailable; records that do not parse are logged and skipped."""
        prefix = self._keys.trades_prefix() if full_scan else self._keys.unretained_trades_prefix()
        found: list[StoredTrade] = []
        start = ""
        while len(found) < limit:
            page, more = await self._store.get_page(prefix, start, LIST_PAGE, keys_only=full_scan)
            for listed in page:
                kv: KeyValue | None = listed
                if full_scan and not listed.lease:
                    kv = await self._store.get(listed.key)  # None: collected or deleted meanwhile
                if kv is None or kv.lease:
                    continue
                try:
                    found.append(self._stored(kv))
                except BlueMarbleError as e:
                    log.error("unreadable trade record skipped", key=kv.key, error=str(e))
            if not more or not page:
                break
            start = page[-1].key + "\0"
        return found[:limit]

    # ---- retention ----

    def retain(self, trade_id: str, create_revision: int) -> None:
        """Queues the record of ``trade_id`` (the one created at ``create_revision``) for
        attachment to the current retention lease; returns at once. A record that cannot
        be queued or attached stays without a lease, for the leader's sweep."""
        if len(self._pending) >= MAX_PENDING_ATTACH:
            log.warning("trade retention queue full; left to the sweep", trade_id=trade_id)
            return
        self._pending[self._keys.trade(TradeId(trade_id))] = create_revision
        if len(self._pending) >= ATTACH_BATCH:
            self._wake.set()

    async def attach(self, records: Sequence[tuple[str, int]]) -> int:
        """Attaches each record (trade id, create revision) to the current retention lease
        now, in transactions of up to :data:`ATTACH_BATCH`; returns how many were
        attached (a record collected or re-created meanwhile is skipped). Unavailable."""
        items = [(self._keys.trade(TradeId(t)), rev) for t, rev in records]
        done = 0
        for i in range(0, len(items), ATTACH_BATCH):
            done += await self._attach_keys(items[i:i + ATTACH_BATCH])
        return done

    async def _attach_keys(self, items: Sequence[tuple[str, int]]) -> int:
        for attempt in range(2):
            lease = await self.leases.current()
            try:
                ops: list[Put | Delete] = []
                for key, _ in items:
                    ops += [Put(key, b"", lease, keep_value=True),
                            Delete(self._keys.unretained_trade(self._keys.parse_trade(key)))]
                result = await self._store.txn([Compare.create_revision(k, rev) for k, rev in items], ops)
            except NotFound:  # the lease expired or was revoked under us
                self.leases.forget(lease)
                if attempt:
                    raise
                continue
            if result.succeeded:
                self.attached += len(items)
                return len(items)
            if len(items) == 1:
                return 0  # that record is gone (or another one took its key)
            # One record of the batch no longer matches: attach them one by one.
            return sum([await self._attach_keys([item]) for item in items])
        return 0

    async def start(self) -> None:
        if self._task is None:
            self._task = background.start(self._run(), "trade-retention")

    async def stop(self, flush_timeout_s: float = 2.0) -> None:
        """Stops the batcher after one last bounded flush of what is pending."""
        await background.stop(self._task)
        self._task = None
        if self._pending:
            try:
                async with asyncio.timeout(flush_timeout_s):
                    await self._flush()
            except (TimeoutError, BlueMarbleError) as e:
                log.warning("trade records left unretained at shutdown (the sweep attaches them)",
                            count=len(self._pending), error=str(e))

    async def _run(self) -> None:
        while True:
            await wait_event(self._clock, self._wake, ATTACH_FLUSH_S)
            self._wake.clear()
            if self._pending:
                try:
                    await self._flush()
                except BlueMarbleError as e:
                    # One warning, then a summary every few seconds (etcd out of space or
                    # unreachable fails every flush until it is back).
                    self._attach_failures.failed(
                        "attach", self._clock.monotonic_s(),
                        "attaching trade records to their retention lease failed; retrying",
                        error=str(e), pending=len(self._pending),
                    )
                    await self._clock.sleep(1.0)
                else:
                    self._attach_failures.recovered("attach", self._clock.monotonic_s(),
                                                    "trade records attached to their retention lease again")

    async def _flush(self) -> None:
        while self._pending:
            batch = list(self._pending.items())[:ATTACH_BATCH]
            await self._attach_keys(batch)
            for key, _ in batch:
                self._pending.pop(key, None)


@dataclass
class _Decision:
    """A decision waiting for its create-if-absent transaction."""

    key: str
    unretained_key: str
    value: bytes
    record: trade_pb2.TradeRecord
    future: asyncio.Future[tuple[StoredTrade, bool]]


def _settle(
    future: asyncio.Future[tuple[StoredTrade, bool]],
    result: tuple[StoredTrade, bool] | None = None,
    *,
    error: BaseException | None = None,
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert result is not None
        future.set_result(result)

