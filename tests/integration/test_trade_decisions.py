"""Decision records against a real etcd: create-if-absent when many decisions arrive
together (they share transactions) and when some of them already exist."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bluemarble.core.errors import Unavailable
from bluemarble.core.ids import TradeId
from bluemarble.runtime.clock import SystemClock
from bluemarble.v1 import common_pb2, trade_pb2
from controlplane.store import codec
from controlplane.store.etcd import EtcdStore
from controlplane.store.keys import KeySchema
from controlplane.store.trade_store import DECISION_BATCH, TradeStore
from tests.conftest import LocalEtcd

COMMITTED, ABORTED = common_pb2.TRADE_OUTCOME_COMMITTED, common_pb2.TRADE_OUTCOME_ABORTED


def record(trade_id: str, outcome: int, by: str = "coordinator") -> trade_pb2.TradeRecord:
    return trade_pb2.TradeRecord(
        trade_id=trade_id, outcome=outcome, decided_by=by, decided_at_ms=1, shard_a="shard-0", shard_b="shard-1",
        request=trade_pb2.ExecuteTradeRequest(trade_id=trade_id, player_a="a", player_b="b"),
    )


@pytest.fixture
async def trades(etcd: LocalEtcd, cluster_name: str) -> AsyncIterator[tuple[TradeStore, EtcdStore]]:
    store = EtcdStore([etcd.endpoint])
    await store.connect(10)
    try:
        yield TradeStore(store, KeySchema(cluster_name), SystemClock(), retention_s=3600), store
    finally:
        await store.close()


async def test_decisions_that_arrive_together_share_transactions_and_each_is_created_once(
    trades: tuple[TradeStore, EtcdStore],
) -> None:
    store, _ = trades
    # Some trades already have a record: theirs stands, whatever the new proposal says.
    for i in range(0, 100, 10):
        await store.create_if_absent(record(f"t{i}", ABORTED, by="participant"))
    sent_before = store.decision_txns
    # Every decision at once, plus a second proposal for three of them in the same burst.
    proposals = [record(f"t{i}", COMMITTED) for i in range(100)] + [record(f"t{i}", ABORTED) for i in (1, 2, 3)]
    answers = await asyncio.gather(*(store.create_if_absent(r) for r in proposals))

    sent = store.decision_txns - sent_before
    assert sent < len(proposals) // 2, f"{sent} transactions for {len(proposals)} decisions"
    for proposal, (stored, written) in zip(proposals, answers, strict=True):
        i = int(proposal.trade_id[1:])
        if i % 10 == 0:  # existed before
            assert (stored.record.outcome, stored.record.decided_by, written) == (ABORTED, "participant", False)
        elif proposal.outcome == ABORTED:  # the second proposal of the burst: the first stands
            assert (stored.record.outcome, written) == (COMMITTED, False)
        else:
            assert (stored.record.outcome, written) == (COMMITTED, True)
            assert stored.create_revision > 0
    # What etcd holds agrees with every answer.
    for i in range(100):
        found = await store.get(f"t{i}")
        assert found is not None
        assert found.record.outcome == (ABORTED if i % 10 == 0 else COMMITTED)


async def test_a_lone_decision_goes_at_once_and_a_batch_stays_within_its_bound(
    trades: tuple[TradeStore, EtcdStore],
) -> None:
    store, _ = trades
    _, written = await store.create_if_absent(record("alone", COMMITTED))
    assert written and store.decision_txns == 1
    burst = [record(f"b{i}", COMMITTED) for i in range(3 * DECISION_BATCH)]
    answers = await asyncio.gather(*(store.create_if_absent(r) for r in burst))
    assert all(written for _, written in answers)
    assert store.decision_txns >= 1 + 3  # at most DECISION_BATCH decisions per transaction


async def test_when_etcd_fails_every_waiting_decision_is_told(
    trades: tuple[TradeStore, EtcdStore], monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, etcd_store = trades

    async def unreachable(*_: object, **__: object) -> None:
        await asyncio.sleep(0.05)
        raise Unavailable("etcd is unreachable")

    monkeypatch.setattr(etcd_store, "txn", unreachable)
    outcomes = await asyncio.gather(
        *(store.create_if_absent(record(f"u{i}", COMMITTED)) for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert store.decision_txns == 1  # asked in one loop turn: one transaction
    monkeypatch.undo()
    assert (await store.create_if_absent(record("u0", COMMITTED)))[1], "nothing was written before"


async def test_unretained_records_are_listed_from_their_copies_which_attaching_deletes(
    trades: tuple[TradeStore, EtcdStore], cluster_name: str,
) -> None:
    store, etcd = trades
    keys = KeySchema(cluster_name)
    created = await asyncio.gather(*(store.create_if_absent(record(f"u{i}", COMMITTED)) for i in range(5)))
    for stored, written in created:
        copy = await etcd.get(keys.unretained_trade(TradeId(stored.record.trade_id)))
        assert written and copy is not None and copy.create_revision == stored.create_revision
    # A record with no copy: written before the copies existed.
    legacy = record("legacy", ABORTED)
    await etcd.put(keys.trade(TradeId("legacy")), codec.encode(legacy))
    listed = await store.list_unretained(100)
    assert sorted(s.record.trade_id for s in listed) == [f"u{i}" for i in range(5)]
    assert {s.create_revision for s in listed} == {s.create_revision for s, _ in created}
    full = await store.list_unretained(100, full_scan=True)
    assert sorted(s.record.trade_id for s in full) == ["legacy", *[f"u{i}" for i in range(5)]]
    # Attaching leases the record and deletes its copy in the same transaction.
    attached = await store.attach([(s.record.trade_id, s.create_revision) for s, _ in created[:3]])
    assert attached == 3
    assert sorted(s.record.trade_id for s in await store.list_unretained(100)) == ["u3", "u4"]
    for i in range(3):
        kv = await etcd.get(keys.trade(TradeId(f"u{i}")))
        assert kv is not None and kv.lease and await etcd.get(keys.unretained_trade(TradeId(f"u{i}"))) is None
    # A full scan lists keys only (values empty, leases kept) and reads the unleased ones alone.
    page, _ = await etcd.get_page(keys.trades_prefix(), "", 100, keys_only=True)
    assert {kv.value for kv in page} == {b""}
    assert sorted(kv.key for kv in page if kv.lease) == [keys.trade(TradeId(f"u{i}")) for i in range(3)]
    # The legacy record attaches too (no copy to delete), and the full scan no longer lists it.
    full = await store.list_unretained(100, full_scan=True)
    legacy_stored = next(s for s in full if s.record.trade_id == "legacy")
    assert await store.attach([("legacy", legacy_stored.create_revision)]) == 1
    assert sorted(s.record.trade_id for s in await store.list_unretained(100, full_scan=True)) == ["u3", "u4"]
