"""Reclaiming a copy (NodeStorage.reclaim_step) against real SQLite files: it goes in
small transactions, every state between two of them opens again as a consistent copy,
a restart goes on where it stopped, and a write, replicated entries or a snapshot that
reach the shard meanwhile first delete what is left (no stale row survives into the
new copy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bluemarble.core.errors import FailedPrecondition
from bluemarble.core.ids import PlayerId, ShardId
from bluemarble.core.replication.position import ZERO
from bluemarble.v1 import shardnode_pb2 as pb
from shardnode.storage import NodeStorage, schema
from shardnode.storage.node_storage import RECLAIMING

S1, S2 = ShardId("shard-1"), ShardId("shard-2")


def grant(request_id: str, player: str, items: list[str], gold: int = 0) -> pb.WriteOp:
    return pb.WriteOp(request_id=request_id, player_id=player, grant=pb.GrantOp(item_ids=items, gold=gold))


def fill(store: NodeStorage, shard: ShardId, players: int, epoch: int = 2) -> None:
    for i in range(players):
        store.write(shard, epoch, grant(f"{shard}-g{i}", f"p{i}", [f"{shard}-item-{i}-a", f"{shard}-item-{i}-b"], 5),
                    now_ms=1_000 + i)
        store.write(shard, epoch, pb.WriteOp(request_id=f"{shard}-d{i}", player_id=f"p{i}",
                                             set_data=pb.SetDataOp(system="guild", key="name", value=b"g")),
                    now_ms=2_000 + i)


def rows_of(store: NodeStorage, shard: ShardId) -> dict[str, int]:
    conn = store._conn  # the node holds its database exclusively: count through its connection
    return {t: conn.execute(f"SELECT count(*) FROM {t} WHERE shard_id = ?", (shard,)).fetchone()[0]
            for t in schema.SHARD_TABLES}


def test_a_reclaim_goes_in_small_transactions_and_every_step_reopens_consistent(tmp_path: Path) -> None:
    data_dir = tmp_path / "n"
    store = NodeStorage.open(data_dir)
    fill(store, S1, 20)
    fill(store, S2, 3)
    store.fence(S1, 5)
    s2_before = (rows_of(store, S2), store.meta(S2), store.inventory(S2, PlayerId("p1")))
    assert sum(rows_of(store, S1).values()) > 100
    steps = 0
    while True:
        done = store.reclaim_step(S1, 7)
        steps += 1
        store.close()  # every state between two steps is one a crash could leave
        store = NodeStorage.open(data_dir)
        meta = store.meta(S1)
        if S1 not in store.reclaiming() and not done:  # the log first: the copy is still whole
            assert meta.last.lsn == 40
            assert store.inventory(S1, PlayerId("p19")) == (["shard-1-item-19-a", "shard-1-item-19-b"], 5)
        else:
            assert (meta.last, meta.synced, meta.first_retained_lsn) == (ZERO, False, 1)
        if done:
            break
        assert steps < 200
    assert steps > 10  # 40 log entries and over 100 rows, 7 a transaction
    assert sum(rows_of(store, S1).values()) == 0 and store.reclaiming() == frozenset()
    assert store.meta(S1).fenced_epoch == 5  # the fence outlives the copy
    assert (rows_of(store, S2), store.meta(S2), store.inventory(S2, PlayerId("p1"))) == s2_before
    with store._sqlite():
        assert schema.meta_keys(store._conn, RECLAIMING) == []
    store.close()


def test_replicated_entries_for_a_shard_mid_reclaim_first_delete_what_is_left(tmp_path: Path) -> None:
    with NodeStorage.open(tmp_path / "p") as primary, NodeStorage.open(tmp_path / "r") as replica:
        fill(replica, S1, 10)  # an old copy, with the items the new history grants again
        while S1 not in replica.reclaiming():
            replica.reclaim_step(S1, 5)
        replica.reclaim_step(S1, 5)
        assert 0 < sum(rows_of(replica, S1).values())  # stale rows left, position gone
        fill(primary, S1, 4, epoch=3)
        entries = primary.entries(S1, 1, max_entries=100)
        assert replica.append([(S1, entries)], {S1: 3})[S1] == primary.meta(S1).last
        assert replica.reclaiming() == frozenset()
        assert rows_of(replica, S1) == rows_of(primary, S1)
        assert replica.inventory(S1, PlayerId("p7")) is None  # the old copy's player is gone
        assert replica.inventory(S1, PlayerId("p2")) == primary.inventory(S1, PlayerId("p2"))


def test_a_primary_write_or_a_snapshot_for_a_shard_mid_reclaim_starts_from_nothing(tmp_path: Path) -> None:
    with NodeStorage.open(tmp_path / "a") as store, NodeStorage.open(tmp_path / "b") as source:
        fill(store, S1, 10)
        while S1 not in store.reclaiming():
            store.reclaim_step(S1, 5)
        result = store.write(S1, 9, grant("new", "p3", ["shard-1-item-3-a"]), now_ms=9_000)
        assert result.lsn == 1 and not result.replayed  # not the old copy's request record
        assert store.inventory(S1, PlayerId("p3")) == (["shard-1-item-3-a"], 0)
        assert store.inventory(S1, PlayerId("p4")) is None and store.reclaiming() == frozenset()

        fill(store, S2, 10)
        while S2 not in store.reclaiming():
            store.reclaim_step(S2, 5)
        fill(source, S2, 2, epoch=4)
        snapshot = source.snapshot(S2)
        store.install_snapshot(snapshot, 4)
        assert store.reclaiming() == frozenset()
        assert rows_of(store, S2)["players"] == 2 and store.meta(S2).last == source.meta(S2).last


def test_a_refused_write_keeps_the_reclaim_marker(tmp_path: Path) -> None:
    with NodeStorage.open(tmp_path / "a") as store:
        fill(store, S1, 3)
        store.fence(S1, 7)
        while S1 not in store.reclaiming():
            store.reclaim_step(S1, 5)
        with pytest.raises(FailedPrecondition, match="fenced at epoch 7"):
            store.write(S1, 6, grant("old", "p1", ["x"]), now_ms=1)  # refused: the transaction rolls back
        assert store.reclaiming() == frozenset({S1})
        while not store.reclaim_step(S1, 5):
            pass
        assert sum(rows_of(store, S1).values()) == 0
