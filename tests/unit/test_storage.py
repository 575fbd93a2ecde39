"""Node storage (shardnode.storage) against real SQLite files in a temp dir: grants and
reads, item uniqueness, idempotency, the gold cap, fences, replicas reproducing the
primary, snapshots, the log's retention, and recovery after a crash."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bluemarble.core import limits
from bluemarble.core.errors import BlueMarbleError, CorruptRecord, FailedPrecondition, InvalidArgument
from bluemarble.core.ids import PlayerId, ShardId
from bluemarble.core.replication.position import ZERO, LogPosition
from bluemarble.v1 import shardnode_pb2 as pb
from shardnode.storage import NodeStorage, ShardMeta, WriteResult, schema

S1, S2, S3 = ShardId("shard-1"), ShardId("shard-2"), ShardId("shard-3")
ALICE, BOB = PlayerId("alice"), PlayerId("bob")


def grant(request_id: str, player: str, items: list[str], gold: int = 0) -> pb.WriteOp:
    return pb.WriteOp(request_id=request_id, player_id=player, grant=pb.GrantOp(item_ids=items, gold=gold))


def set_data(request_id: str, player: str, system: str, key: str, value: bytes) -> pb.WriteOp:
    return pb.WriteOp(
        request_id=request_id, player_id=player, set_data=pb.SetDataOp(system=system, key=key, value=value)
    )


def tamper(data_dir: Path, sql: str) -> None:
    """Runs ``sql`` on the node's database from a connection of its own, closed after
    (the node holds its database exclusively while it has it open)."""
    conn = sqlite3.connect(data_dir / "node.db")
    try:
        with conn:
            conn.execute(sql)
    finally:
        conn.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NodeStorage]:
    with NodeStorage.open(tmp_path / "a") as storage:
        yield storage


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[NodeStorage]:
    with NodeStorage.open(tmp_path / "b") as storage:
        yield storage


def ship(primary: NodeStorage, replica: NodeStorage, shard: ShardId) -> LogPosition:
    """Copies every entry the replica lacks, as replication would."""
    start = replica.meta(shard).last.lsn + 1
    entries = primary.entries(shard, start, max_entries=10_000)
    return replica.append([(shard, entries)], {shard: primary.meta(shard).fenced_epoch})[shard]


class TestGrantsAndReads:
    def test_a_grant_creates_the_player_and_answers_the_inventory_after_it(self, store: NodeStorage) -> None:
        first = store.write(S1, 1, grant("r1", ALICE, ["sword", "axe"], gold=10), now_ms=1_000)
        second = store.write(S1, 1, grant("r2", ALICE, ["bow"], gold=5), now_ms=2_000)
        assert (first.lsn, second.lsn, first.replayed) == (1, 2, False)
        answer = pb.GrantItemsResponse.FromString(second.response)
        assert list(answer.inventory.item_ids) == ["axe", "bow", "sword"]
        assert (answer.inventory.gold, answer.inventory.shard_id, answer.inventory.epoch, answer.lsn) == (15, S1, 1, 2)
        assert answer.inventory.player_id == ALICE and not answer.replayed
        assert store.inventory(S1, ALICE) == (["axe", "bow", "sword"], 15)
        assert store.inventory(S1, BOB) is None
        assert store.inventory(S2, ALICE) is None
        assert store.item_owner("bow") == (S1, ALICE)
        assert store.item_owner("shield") is None
        assert store.meta(S1) == ShardMeta(S1, fenced_epoch=1, last=LogPosition(1, 2), first_retained_lsn=1)

    def test_player_data_is_set_with_its_lsn_and_makes_the_player_exist(self, store: NodeStorage) -> None:
        result = store.write(S1, 2, set_data("r1", BOB, "guild", "name", b"knights"), now_ms=5)
        assert pb.SetPlayerDataResponse.FromString(result.response) == pb.SetPlayerDataResponse(
            shard_id=S1, epoch=2, lsn=1
        )
        store.write(S1, 2, set_data("r2", BOB, "guild", "name", b"rogues"), now_ms=6)
        assert store.player_data(S1, BOB, "guild", "name") == (b"rogues", 2)
        assert store.player_data(S1, BOB, "guild", "rank") is None
        assert store.inventory(S1, BOB) == ([], 0)

    def test_an_unknown_shard_has_an_empty_meta(self, store: NodeStorage) -> None:
        assert store.meta(S3) == ShardMeta(S3, 0, ZERO, 1)
        assert not store.meta(S3).has_data
        assert store.shards() == {}
        assert store.entries(S3, 1) == []
        assert store.epoch_at(S3, 0) == 0 and store.epoch_at(S3, 1) is None

    @pytest.mark.parametrize(
        "op",
        [
            grant("r", "", ["x"]),
            grant("r", ALICE, ["x", "x"]),
            grant("r", ALICE, ["x" * 129]),
            grant("r", ALICE, [], gold=limits.MAX_GOLD + 1),
            set_data("r", ALICE, "", "k", b""),
            set_data("r", ALICE, "guild", "k", b"v" * (limits.MAX_VALUE_BYTES + 1)),
            pb.WriteOp(request_id="r", player_id=ALICE),
        ],
    )
    def test_malformed_ops_are_invalid_arguments_and_change_nothing(self, store: NodeStorage, op: pb.WriteOp) -> None:
        with pytest.raises(InvalidArgument):
            store.write(S1, 1, op, now_ms=1)
        assert store.shards() == {} and store.recorded(S1, "r") is None


class TestItemUniqueness:
    def test_an_item_owned_on_another_shard_is_refused_naming_that_shard(self, store: NodeStorage) -> None:
        store.write(S3, 1, grant("r1", BOB, ["crown"]), now_ms=1)
        with pytest.raises(FailedPrecondition, match=r"item 'crown' is already owned by a player of shard-3"):
            store.write(S1, 1, grant("r2", ALICE, ["gem", "crown"], gold=7), now_ms=2)
        assert store.inventory(S1, ALICE) is None
        assert store.meta(S1).last == ZERO
        assert store.recorded(S1, "r2") is None

    def test_an_item_owned_on_the_same_shard_is_refused(self, store: NodeStorage) -> None:
        store.write(S1, 1, grant("r1", BOB, ["crown"]), now_ms=1)
        with pytest.raises(FailedPrecondition, match="shard-1"):
            store.write(S1, 1, grant("r2", ALICE, ["crown"]), now_ms=2)

    def test_an_item_the_player_already_owns_is_refused_saying_so(self, store: NodeStorage) -> None:
        """A grant sent again under a new request id: the item is the player's own, and
        the refusal says so (not "a player of shard-1", which reads as someone else)."""
        store.write(S1, 1, grant("r1", ALICE, ["crown"]), now_ms=1)
        with pytest.raises(FailedPrecondition, match="already owned by this player: a grant makes new items"):
            store.write(S1, 1, grant("r2", ALICE, ["crown"]), now_ms=2)
        assert store.recorded(S1, "r2") is None

    def test_a_refused_write_in_a_batch_undoes_nothing_else(self, store: NodeStorage) -> None:
        results = store.write_many(
            [
                (S1, 1, grant("a", ALICE, ["one"], gold=1)),
                (S2, 1, grant("b", BOB, ["two", "one"], gold=2)),  # "one" was granted just before
                (S2, 1, grant("c", BOB, ["three"], gold=3)),
                (S1, 0, grant("d", BOB, ["four"])),
            ],
            now_ms=9,
        )
        assert isinstance(results[0], WriteResult) and results[0].lsn == 1
        assert isinstance(results[1], FailedPrecondition) and "shard-1" in str(results[1])
        assert isinstance(results[2], WriteResult) and results[2].lsn == 1
        assert isinstance(results[3], InvalidArgument)
        assert store.inventory(S1, ALICE) == (["one"], 1)
        assert store.inventory(S2, BOB) == (["three"], 3)
        assert store.meta(S2).last == LogPosition(1, 1)
        assert [e.lsn for e in store.entries(S2, 1)] == [1]


class TestIdempotency:
    def test_a_retry_returns_the_first_answer_and_applies_nothing(self, store: NodeStorage) -> None:
        first = store.write(S1, 1, grant("r1", ALICE, ["sword"], gold=10), now_ms=1)
        store.write(S1, 1, grant("r2", ALICE, ["bow"], gold=1), now_ms=2)
        again = store.write(S1, 1, grant("r1", ALICE, ["sword"], gold=10), now_ms=3)
        assert again == WriteResult(first.lsn, first.response, replayed=True)
        assert store.inventory(S1, ALICE) == (["bow", "sword"], 11)
        assert store.meta(S1).last.lsn == 2
        assert store.recorded(S1, "r1") == again

    def test_a_retry_in_the_same_batch_is_replayed(self, store: NodeStorage) -> None:
        op = set_data("r1", ALICE, "guild", "name", b"x")
        first, second = store.write_many([(S1, 1, op), (S1, 1, op)], now_ms=1)
        assert isinstance(first, WriteResult) and isinstance(second, WriteResult)
        assert second == WriteResult(first.lsn, first.response, replayed=True)

    def test_a_request_id_reused_for_another_op_is_refused(self, store: NodeStorage) -> None:
        store.write(S1, 1, grant("r1", ALICE, ["sword"], gold=10), now_ms=1)
        with pytest.raises(FailedPrecondition, match="already used for a different request"):
            store.write(S1, 1, grant("r1", ALICE, ["sword"], gold=11), now_ms=2)
        assert store.inventory(S1, ALICE) == (["sword"], 10)

    def test_request_ids_are_per_shard(self, store: NodeStorage) -> None:
        store.write(S1, 1, grant("r1", ALICE, ["a"]), now_ms=1)
        assert not store.write(S2, 1, grant("r1", BOB, ["b"]), now_ms=1).replayed

    def test_a_replica_answers_retries_like_the_old_primary(self, store: NodeStorage, replica: NodeStorage) -> None:
        op = grant("r1", ALICE, ["sword"], gold=10)
        first = store.write(S1, 1, op, now_ms=1)
        ship(store, replica, S1)
        replica.fence(S1, 2)
        assert replica.write(S1, 2, op, now_ms=50) == WriteResult(first.lsn, first.response, replayed=True)
        with pytest.raises(FailedPrecondition, match="different request"):
            replica.write(S1, 2, grant("r1", ALICE, ["axe"]), now_ms=51)


class TestGoldCap:
    def test_gold_up_to_the_cap_is_granted_and_beyond_it_refused(self, store: NodeStorage) -> None:
        store.write(S1, 1, grant("r1", ALICE, [], gold=limits.MAX_GOLD - 1), now_ms=1)
        store.write(S1, 1, grant("r2", ALICE, [], gold=1), now_ms=2)
        with pytest.raises(FailedPrecondition, match=r"at most 2\^53"):
            store.write(S1, 1, grant("r3", ALICE, ["gem"], gold=1), now_ms=3)
        assert store.inventory(S1, ALICE) == ([], limits.MAX_GOLD)
        assert store.item_owner("gem") is None


class TestFences:
    def test_the_fence_only_grows_and_survives_a_reopen(self, tmp_path: Path) -> None:
        with NodeStorage.open(tmp_path) as storage:
            assert storage.fence(S1, 5).fenced_epoch == 5
            assert storage.fence(S1, 3).fenced_epoch == 5
            assert storage.fence(S2, 0) == ShardMeta(S2, 0, ZERO, 1)
            with pytest.raises(FailedPrecondition, match="fenced at epoch 5"):
                storage.write(S1, 4, grant("r1", ALICE, ["a"]), now_ms=1)
            storage.write(S1, 6, grant("r2", ALICE, ["a"]), now_ms=1)
        with NodeStorage.open(tmp_path) as storage:
            assert storage.meta(S1) == ShardMeta(S1, 6, LogPosition(6, 1), 1)
            assert set(storage.shards()) == {S1}
            assert storage.fence(S1, 7).fenced_epoch == 7
        with NodeStorage.open(tmp_path) as storage:
            assert storage.meta(S1).fenced_epoch == 7

    def test_synced_is_durable_and_dropped_with_the_data(self, tmp_path: Path) -> None:
        with NodeStorage.open(tmp_path) as storage:
            assert not storage.meta(S1).synced
            assert storage.mark_synced(S1) == ShardMeta(S1, 0, ZERO, 1, synced=True)
            storage.mark_synced(S2)
            storage.write(S2, 2, grant("r", ALICE, ["a"]), now_ms=1)
        with NodeStorage.open(tmp_path) as storage:
            assert storage.meta(S1).synced and storage.meta(S2).synced
            storage.drop_shard(S1)
            storage.drop_shard(S2)
            assert S1 not in storage.shards()
            assert storage.meta(S2) == ShardMeta(S2, 2, ZERO, 1, synced=False)

    def test_append_raises_fences_and_drop_keeps_them(self, replica: NodeStorage) -> None:
        assert replica.append([], {S1: 4, S2: 0}) == {S1: ZERO, S2: ZERO}
        assert replica.meta(S1).fenced_epoch == 4 and S2 not in replica.shards()
        entry = pb.LogEntry(lsn=1, epoch=3, payload=grant("r", ALICE, ["a"]).SerializeToString(), written_at_ms=7)
        assert replica.append([(S1, [entry])], {}) == {S1: LogPosition(3, 1)}
        replica.drop_shard(S1)
        assert replica.meta(S1) == ShardMeta(S1, 4, ZERO, 1)
        assert replica.inventory(S1, ALICE) is None and replica.item_owner("a") is None


    def test_epochs_and_lsns_past_int63_are_refused_and_change_nothing(self, replica: NodeStorage) -> None:
        # SQLite's INTEGER is signed 64-bit; the wire's uint64 may carry more.
        payload = grant("r", ALICE, ["a"]).SerializeToString()
        for epoch in (2**63, 2**64 - 1):
            with pytest.raises(InvalidArgument, match="2\\^63-1"):
                replica.fence(S1, epoch)
            with pytest.raises(InvalidArgument, match="2\\^63-1"):
                replica.append([], {S1: epoch})
            with pytest.raises(InvalidArgument, match="2\\^63-1"):
                replica.append([(S1, [pb.LogEntry(lsn=1, epoch=epoch, payload=payload)])], {})
        assert replica.fence(S1, 2**63 - 1).fenced_epoch == 2**63 - 1
        assert replica.meta(S1).last == ZERO
        snap = pb.ShardSnapshot(shard_id=S2, last=pb.LogPosition(epoch=2**63, lsn=1))
        with pytest.raises(CorruptRecord, match="no log position"):
            replica.install_snapshot(snap, fenced_epoch=1)


class TestReplicas:
    def test_append_reproduces_the_primary(self, store: NodeStorage, replica: NodeStorage) -> None:
        store.write(S1, 1, grant("r1", ALICE, ["a", "b"], gold=3), now_ms=10)
        store.write(S1, 2, set_data("r2", ALICE, "guild", "name", b"x"), now_ms=20)
        store.write(S1, 2, grant("r3", BOB, ["c"]), now_ms=30)
        store.write(S1, 2, grant("", BOB, ["d"], gold=1), now_ms=40)
        assert ship(store, replica, S1) == LogPosition(2, 4)
        assert replica.snapshot(S1) == store.snapshot(S1)
        assert replica.meta(S1) == store.meta(S1)
        for request_id in ("r1", "r2", "r3"):
            assert replica.recorded(S1, request_id) == store.recorded(S1, request_id)
        assert replica.written_at_ms(S1, 3) == 30

    def test_a_replica_accepts_an_item_another_of_its_shards_holds(self, replica: NodeStorage) -> None:
        payload = grant("r", ALICE, ["crown"]).SerializeToString()
        entry = pb.LogEntry(lsn=1, epoch=1, payload=payload, written_at_ms=1)
        replica.append([(S1, [entry]), (S2, [entry])], {})
        assert replica.inventory(S2, ALICE) == (["crown"], 0)
        assert replica.item_owner("crown") == (S1, ALICE)

    def test_a_gap_or_a_bad_payload_applies_nothing_of_the_batch(self, replica: NodeStorage) -> None:
        good = pb.LogEntry(lsn=1, epoch=1, payload=grant("r", ALICE, ["a"]).SerializeToString(), written_at_ms=1)
        gap = pb.LogEntry(lsn=3, epoch=1, payload=good.payload, written_at_ms=1)
        with pytest.raises(FailedPrecondition, match="does not continue"):
            replica.append([(S1, [good]), (S2, [gap])], {S1: 9})
        undecodable = pb.LogEntry(lsn=1, epoch=1, payload=b"\xff\xff", written_at_ms=1)
        no_op = pb.LogEntry(lsn=1, epoch=1, payload=pb.WriteOp(player_id="x").SerializeToString())
        twice = pb.LogEntry(lsn=2, epoch=1, payload=good.payload)  # item "a" twice on one shard
        for bad in ([(S2, [undecodable])], [(S2, [no_op])], [(S2, [good, twice])]):
            with pytest.raises(CorruptRecord):
                replica.append([(S1, [good]), *bad], {})
        assert replica.shards() == {}
        assert replica.inventory(S1, ALICE) is None


class TestSnapshots:
    def fill(self, store: NodeStorage) -> None:
        for i in range(30):
            store.write(S1, 1 + i // 10, grant(f"g{i}", f"p{i % 4}", [f"item-{i}"], gold=i), now_ms=100 + i)
            store.write(S1, 1 + i // 10, set_data(f"d{i}", f"p{i % 5}", "guild", f"k{i % 3}", bytes([i])), now_ms=200)
        store.write(S2, 1, grant("other", ALICE, ["elsewhere"]), now_ms=1)

    def test_install_reproduces_the_shard_in_a_second_database(self, store: NodeStorage, replica: NodeStorage) -> None:
        self.fill(store)
        snap = store.snapshot(S1, max_tail_entries=8)
        assert snap.last == pb.LogPosition(epoch=3, lsn=60) and [e.lsn for e in snap.tail] == list(range(53, 61))
        replica.write(S1, 1, grant("stale", BOB, ["old-item"]), now_ms=1)  # replaced by the install
        meta = replica.install_snapshot(snap, fenced_epoch=2)
        assert meta == ShardMeta(S1, fenced_epoch=3, last=LogPosition(3, 60), first_retained_lsn=53)
        assert replica.snapshot(S1, max_tail_entries=8) == snap
        assert replica.item_owner("old-item") is None and replica.recorded(S1, "stale") is None
        assert replica.inventory(S1, PlayerId("p1")) == store.inventory(S1, PlayerId("p1"))
        assert [e.lsn for e in replica.entries(S1, 53)] == list(range(53, 61))
        with pytest.raises(FailedPrecondition, match="pruned"):
            replica.entries(S1, 52)
        # The installed copy continues like the primary.
        store.write(S1, 3, grant("next", ALICE, ["new"]), now_ms=300)
        assert ship(store, replica, S1) == LogPosition(3, 61)
        assert replica.snapshot(S1) == store.snapshot(S1, max_tail_entries=9)

    def test_installed_request_records_still_tell_retries_apart(self, store: NodeStorage, replica: NodeStorage) -> None:
        self.fill(store)
        replica.install_snapshot(store.snapshot(S1, max_tail_entries=2), fenced_epoch=4)
        # d29 is lsn 60, in the tail: its op is known, so another op under its id is refused.
        with pytest.raises(FailedPrecondition, match="different request"):
            replica.write(S1, 4, set_data("d29", "p4", "guild", "k2", b"other"), now_ms=1)
        # g0's entry is not in the tail: any retry of its id replays the recorded answer.
        assert replica.write(S1, 4, grant("g0", "p0", ["item-0"]), now_ms=1) == store.recorded(S1, "g0")
        # Records of unknown age start their retention at the first prune after the install.
        assert replica.prune(now_ms=300) == 0
        assert replica.recorded(S1, "g0") is not None
        assert replica.prune(now_ms=301 + 86_400_000) == 60
        assert replica.recorded(S1, "g0") is None

    def test_install_keeps_the_larger_fence_and_refuses_a_broken_snapshot(self, store: NodeStorage,
                                                                          replica: NodeStorage) -> None:
        self.fill(store)
        replica.fence(S1, 9)
        snap = store.snapshot(S1)
        assert replica.install_snapshot(snap, fenced_epoch=1).fenced_epoch == 9
        broken = pb.ShardSnapshot()
        broken.CopyFrom(snap)
        del broken.tail[5]
        with pytest.raises(CorruptRecord, match="not contiguous"):
            replica.install_snapshot(broken, fenced_epoch=1)
        broken.CopyFrom(snap)
        broken.players[0].item_ids.append(broken.players[1].item_ids[0])
        with pytest.raises(CorruptRecord, match="twice"):
            replica.install_snapshot(broken, fenced_epoch=1)
        assert replica.snapshot(S1) == snap

    def test_an_install_in_batches_leaves_the_shard_empty_until_its_last_transaction(
        self, store: NodeStorage, replica: NodeStorage
    ) -> None:
        self.fill(store)
        snap = store.snapshot(S1, max_tail_entries=8)
        replica.write(S1, 1, grant("stale", BOB, ["old-item"]), now_ms=1)
        install = replica.begin_install(snap, fenced_epoch=2, max_rows=3)
        assert replica.meta(S1) == ShardMeta(S1, 1, ZERO, 1, synced=False)
        assert replica.inventory(S1, BOB) is None  # the old copy is gone from the first transaction
        steps = 0
        while not install.done:
            changes = replica._conn.total_changes
            install.step()
            assert replica._conn.total_changes - changes <= 3 + 1  # a batch, and the shards row
            assert replica.meta(S1).last == ZERO
            steps += 1
        assert steps >= 30 // 3  # at least the 30 items' batches
        assert install.finish() == ShardMeta(S1, fenced_epoch=3, last=LogPosition(3, 60), first_retained_lsn=53)
        assert replica.snapshot(S1, max_tail_entries=8) == snap
        assert not install.current and schema.meta_keys(replica._conn, "installing ") == []

    def test_a_newer_install_or_a_drop_replaces_one_under_way(self, store: NodeStorage, replica: NodeStorage) -> None:
        self.fill(store)
        snap = store.snapshot(S1)
        first = replica.begin_install(snap, fenced_epoch=1, max_rows=4)
        first.step()
        second = replica.begin_install(snap, fenced_epoch=1, max_rows=4)
        second.step()
        with pytest.raises(FailedPrecondition, match="replaced or abandoned"):
            first.step()
        first.abandon()  # no-op: the newer install owns the shard's rows
        while not second.done:
            second.step()
        second.finish()
        assert replica.snapshot(S1) == snap
        third = replica.begin_install(snap, fenced_epoch=1, max_rows=4)
        third.step()
        replica.drop_shard(S1)
        with pytest.raises(FailedPrecondition, match="replaced or abandoned"):
            third.finish()
        assert replica.inventory(S1, PlayerId("p1")) is None and replica.meta(S1).last == ZERO
        assert schema.meta_keys(replica._conn, "installing ") == []

    def test_an_abandoned_install_leaves_the_shard_empty(self, store: NodeStorage, replica: NodeStorage) -> None:
        self.fill(store)
        install = replica.begin_install(store.snapshot(S1), fenced_epoch=1, max_rows=5)
        install.step()
        install.step()
        install.abandon()
        assert replica.inventory(S1, PlayerId("p1")) is None and replica.item_owner("item-1") is None
        assert replica.meta(S1) == ShardMeta(S1, 0, ZERO, 1, synced=False)
        with pytest.raises(FailedPrecondition):
            install.step()

    def test_a_restart_mid_install_drops_the_partial_copy(self, store: NodeStorage, tmp_path: Path) -> None:
        self.fill(store)
        snap = store.snapshot(S1)
        with NodeStorage.open(tmp_path / "r") as replica:
            replica.write(S2, 1, grant("kept", BOB, ["other-shard"]), now_ms=1)
            replica.fence(S1, 5)
            install = replica.begin_install(snap, fenced_epoch=1, max_rows=5)
            for _ in range(4):
                install.step()
            assert replica.item_owner("item-1") is not None
        with NodeStorage.open(tmp_path / "r") as replica:  # as a crash leaves it: no finish, no abandon
            assert replica.meta(S1) == ShardMeta(S1, 5, ZERO, 1, synced=False)
            assert replica.item_owner("item-1") is None and replica.inventory(S1, PlayerId("p1")) is None
            assert replica.inventory(S2, BOB) == (["other-shard"], 0)
            assert schema.meta_keys(replica._conn, "installing ") == []
            replica.install_snapshot(snap, fenced_epoch=1)
            assert replica.snapshot(S1) == snap

    def test_an_empty_snapshot_installs_an_empty_shard(self, store: NodeStorage, replica: NodeStorage) -> None:
        meta = replica.install_snapshot(store.snapshot(S3), fenced_epoch=2)
        assert meta == ShardMeta(S3, 2, ZERO, 1)


class TestLogAndRetention:
    def test_entries_epoch_at_and_prune(self, tmp_path: Path) -> None:
        with NodeStorage.open(tmp_path, log_retention_entries=5, request_retention_s=10) as storage:
            for i in range(12):
                storage.write(S1, 1 if i < 6 else 2, grant(f"r{i}", ALICE, [f"i{i}"]), now_ms=1_000 * i)
            entries = storage.entries(S1, 3, max_entries=4)
            assert [(e.epoch, e.lsn, e.written_at_ms) for e in entries] == [(1, 3, 2000), (1, 4, 3000),
                                                                           (1, 5, 4000), (1, 6, 5000)]
            assert pb.WriteOp.FromString(entries[0].payload) == grant("r2", ALICE, ["i2"])
            assert len(storage.entries(S1, 1, max_bytes=1)) == 1
            assert storage.entries(S1, 13) == []
            assert [storage.epoch_at(S1, lsn) for lsn in (0, 6, 7, 12, 13)] == [0, 1, 2, 2, None]

            # Log: 12 entries, keep 5. Requests recorded at 0..11 s; at 15 s those recorded
            # before 5 s are older than the 10 s retention.
            assert storage.prune(now_ms=15_000) == 7 + 5
            assert storage.meta(S1).first_retained_lsn == 8
            assert storage.entries(S1, 8)[0].lsn == 8
            with pytest.raises(FailedPrecondition, match="snapshot"):
                storage.entries(S1, 7)
            assert storage.epoch_at(S1, 7) is None and storage.written_at_ms(S1, 7) is None
            assert storage.recorded(S1, "r4") is None and storage.recorded(S1, "r5") is not None
            assert storage.prune(now_ms=15_000) == 0
        with NodeStorage.open(tmp_path, log_retention_entries=1) as storage:
            assert storage.prune(now_ms=15_000, max_rows=3) == 3
            assert storage.meta(S1).first_retained_lsn == 11
            assert storage.prune(now_ms=15_000) == 1
            assert storage.meta(S1) == ShardMeta(S1, 2, LogPosition(2, 12), 12)
            assert storage.epoch_at(S1, 12) == 2

    def test_a_fully_pruned_log_still_knows_its_last_epoch(self, tmp_path: Path) -> None:
        with NodeStorage.open(tmp_path / "a") as primary, NodeStorage.open(tmp_path / "b") as other:
            primary.write(S1, 3, grant("r", ALICE, ["a"]), now_ms=1)
            other.install_snapshot(primary.snapshot(S1, max_tail_entries=0), fenced_epoch=3)
            assert other.meta(S1) == ShardMeta(S1, 3, LogPosition(3, 1), 2)
            assert other.epoch_at(S1, 1) == 3 and other.entries(S1, 2) == []


class TestOpenAndRecovery:
    def test_everything_is_found_again_from_the_files_a_crash_leaves(self, tmp_path: Path) -> None:
        first = NodeStorage.open(tmp_path / "live")
        first.write(S1, 1, grant("r1", ALICE, ["a"], gold=1), now_ms=1)
        first.write_many([(S2, 2, grant("r2", BOB, ["b"])), (S2, 2, set_data("r3", BOB, "g", "k", b"v"))], now_ms=2)
        snaps = {s: first.snapshot(s) for s in (S1, S2)}
        # No close: what a killed process leaves on disk is node.db and its WAL, as they
        # are now (the committed writes are in the WAL, not yet in node.db).
        crashed = tmp_path / "crashed"
        crashed.mkdir()
        for name in ("node.db", "node.db-wal"):
            (crashed / name).write_bytes((tmp_path / "live" / name).read_bytes())
        assert not (tmp_path / "live" / "node.db-shm").exists(), "the WAL index lives in memory"
        second = NodeStorage.open(crashed)
        try:
            assert second.shards() == first.shards()
            assert {s: second.snapshot(s) for s in (S1, S2)} == snaps
        finally:
            second.close()
            first.close()

    def test_the_wal_is_checkpointed_by_the_commits_and_stays_bounded(self, tmp_path: Path) -> None:
        """Past WAL_AUTOCHECKPOINT_PAGES of WAL the committing writer copies it into
        node.db, and later commits reuse the WAL file from its start: it does not grow."""
        with NodeStorage.open(tmp_path) as storage:
            db, wal = tmp_path / "node.db", tmp_path / "node.db-wal"
            before = db.stat().st_size
            blob = b"x" * 3000  # about a page per write
            writes = 3 * schema.WAL_AUTOCHECKPOINT_PAGES
            for i in range(writes):
                storage.write(S1, 1, set_data(f"r{i}", f"p{i}", "g", "k", blob), now_ms=i)
            assert db.stat().st_size > before + schema.WAL_AUTOCHECKPOINT_PAGES * 4096
            assert wal.stat().st_size < 2 * schema.WAL_AUTOCHECKPOINT_PAGES * 4096 + (1 << 20)
            assert storage.player_data(S1, PlayerId(f"p{writes - 1}"), "g", "k") == (blob, writes)

    def test_a_newer_schema_is_refused(self, tmp_path: Path) -> None:
        NodeStorage.open(tmp_path).close()
        tamper(tmp_path, f"PRAGMA user_version={schema.SCHEMA_VERSION + 1}")
        with pytest.raises(FailedPrecondition, match="newer than this build"):
            NodeStorage.open(tmp_path)

    def test_a_shard_whose_bounds_disagree_with_its_log_is_refused(self, tmp_path: Path) -> None:
        with NodeStorage.open(tmp_path) as storage:
            storage.write(S1, 1, grant("r", ALICE, ["a"]), now_ms=1)
        tamper(tmp_path, "UPDATE shards SET last_lsn = 5")
        with pytest.raises(CorruptRecord, match="shard-1 records log bounds"):
            NodeStorage.open(tmp_path)

    def test_a_foreign_database_is_refused(self, tmp_path: Path) -> None:
        tamper(tmp_path, "CREATE TABLE t (x)")
        with pytest.raises(FailedPrecondition, match="not a shard node's database"):
            NodeStorage.open(tmp_path)

    def test_bad_options_are_refused(self, tmp_path: Path) -> None:
        with pytest.raises(InvalidArgument):
            NodeStorage.open(tmp_path, synchronous="OFF")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            NodeStorage.open(tmp_path, log_retention_entries=0)

    def test_sigkill_mid_writes_loses_no_committed_write(self, tmp_path: Path) -> None:
        """A child writes grants and prints each lsn after write() returns; it is killed
        with SIGKILL mid-stream. Every printed (committed) grant must be on disk, and the
        data dir must be refused to a second process while the child lives."""
        child_code = textwrap.dedent(
            f"""
            import sys
            from pathlib import Path
            from shardnode.storage import NodeStorage
            from bluemarble.v1 import shardnode_pb2 as pb
            storage = NodeStorage.open(Path({str(tmp_path)!r}))
            i = 0
            while True:
                shard = "shard-%d" % (i % 3)
                op = pb.WriteOp(request_id="r%d" % i, player_id="p%d" % (i % 7),
                                grant=pb.GrantOp(item_ids=["item-%d" % i], gold=1))
                result = storage.write(shard, 1, op, now_ms=i)
                sys.stdout.write("%d %s %d\\n" % (i, shard, result.lsn))
                sys.stdout.flush()
                i += 1
            """
        )
        repo = Path(__file__).resolve().parents[2]
        child = subprocess.Popen(
            [sys.executable, "-c", child_code],
            stdout=subprocess.PIPE,
            cwd=repo,
            text=True,
        )
        acked: list[tuple[int, str, int]] = []
        try:
            assert child.stdout is not None
            deadline = time.monotonic() + 30
            while len(acked) < 300:
                assert time.monotonic() < deadline, "the child wrote too slowly"
                line = child.stdout.readline()
                assert line, "the child died before writing"
                index, shard, lsn = line.split()
                acked.append((int(index), shard, int(lsn)))
            open_it = f"from shardnode.storage import NodeStorage; NodeStorage.open({str(tmp_path)!r})"
            probe = subprocess.run(
                [sys.executable, "-c", open_it], cwd=repo, capture_output=True, text=True, timeout=60
            )
            assert "in use by another process" in probe.stderr, probe.stderr[-2000:]
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
            # Lines the child wrote after the ones read are acknowledged too.
            for line in child.stdout:
                index, shard, lsn = line.split()
                acked.append((int(index), shard, int(lsn)))
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL
        with NodeStorage.open(tmp_path) as storage:
            for index, shard, lsn in acked:
                recorded = storage.recorded(ShardId(shard), f"r{index}")
                assert recorded is not None and recorded.lsn == lsn, (index, shard)
                assert storage.item_owner(f"item-{index}") == (shard, f"p{index % 7}")
            total = sum(len(storage.entries(ShardId(f"shard-{s}"), 1, max_entries=100_000)) for s in range(3))
            assert total >= len(acked)


# --- property: a replica fed the primary's log ends in the primary's state -------------------

_players = st.sampled_from(["p0", "p1", "p2"])
_items = st.lists(st.sampled_from([f"i{n}" for n in range(12)]), max_size=3, unique=True)
_ops = st.one_of(
    st.builds(
        lambda rid, player, items, gold: grant(rid, player, items, gold),
        st.sampled_from(["", "a", "b", "c", "d"]),
        _players,
        _items,
        st.sampled_from([0, 1, 5, limits.MAX_GOLD // 2, limits.MAX_GOLD]),
    ),
    st.builds(
        lambda rid, player, key, value: set_data(rid, player, "guild", key, value),
        st.sampled_from(["", "a", "e", "f"]),
        _players,
        st.sampled_from(["name", "rank"]),
        st.binary(max_size=4),
    ),
)
_writes = st.lists(
    st.tuples(st.sampled_from([S1, S2]), st.integers(min_value=1, max_value=3), _ops, st.booleans()),
    max_size=30,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes=_writes, chunk=st.integers(min_value=1, max_value=7))
def test_random_writes_on_a_primary_and_appends_on_a_replica_give_identical_snapshots(
    writes: list[tuple[ShardId, int, pb.WriteOp, bool]], chunk: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with NodeStorage.open(Path(tmp) / "a") as primary, NodeStorage.open(Path(tmp) / "b") as replica:
            epochs = {S1: 1, S2: 1}
            batch: list[tuple[ShardId, int, pb.WriteOp]] = []
            for now_ms, (shard, bump, op, flush) in enumerate(writes):
                epochs[shard] = max(epochs[shard], bump)  # a new primary now and then
                batch.append((shard, epochs[shard], op))
                if flush:
                    outcomes = primary.write_many(batch, now_ms)
                    assert all(isinstance(o, WriteResult | BlueMarbleError) for o in outcomes)
                    batch = []
            primary.write_many(batch, len(writes))
            # Ship in chunks of `chunk` entries per shard, many shards per append.
            while any(replica.meta(s).last != primary.meta(s).last for s in (S1, S2)):
                replica.append(
                    [(s, primary.entries(s, replica.meta(s).last.lsn + 1, max_entries=chunk)) for s in (S1, S2)],
                    {s: primary.meta(s).fenced_epoch for s in (S1, S2)},
                )
            for shard in (S1, S2):
                assert replica.snapshot(shard) == primary.snapshot(shard)
                assert replica.meta(shard) == primary.meta(shard)
            # Items are never duplicated across the primary's shards.
            owners = [i for s in (S1, S2) for p in primary.snapshot(s).players for i in p.item_ids]
            assert len(owners) == len(set(owners))


def test_the_cluster_identity_is_kept_with_the_data(tmp_path: Path) -> None:
    with NodeStorage.open(tmp_path, node_id="n1") as storage:
        assert storage.cluster_uid == ""  # a new data dir: no cluster yet
        storage.record_cluster_uid("ab" * 16)
    with NodeStorage.open(tmp_path, node_id="n1") as storage:
        assert storage.cluster_uid == "ab" * 16
    with NodeStorage.open(tmp_path / "no-node-id") as storage:  # node_meta not made yet
        assert storage.cluster_uid == ""
