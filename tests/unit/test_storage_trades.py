"""Trade records and escrows in node storage (shardnode.storage.trades) against real SQLite:
applying prepare / settle / same-shard trade on a primary and on a replica gives the same
state, holdings count escrows, a snapshot carries the escrows, settled records are pruned
after the retention (PREPARED never), and a version-1 data dir is migrated."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bluemarble.core.errors import CorruptRecord, FailedPrecondition, NotFound
from bluemarble.core.ids import PlayerId, ShardId
from bluemarble.core.trades import Holdings, TradeState
from bluemarble.v1 import common_pb2
from bluemarble.v1 import shardnode_pb2 as pb
from shardnode.storage import NodeStorage, schema, snapshots

S1, S2 = ShardId("shard-1"), ShardId("shard-2")
ALICE, BOB = PlayerId("alice"), PlayerId("bob")
COMMITTED, ABORTED = common_pb2.TRADE_OUTCOME_COMMITTED, common_pb2.TRADE_OUTCOME_ABORTED


def grant(request_id: str, player: str, items: list[str], gold: int = 0) -> pb.WriteOp:
    return pb.WriteOp(request_id=request_id, player_id=player, grant=pb.GrantOp(item_ids=items, gold=gold))


def leg(player: str, gives: list[str], gold: int, receives: list[str], rgold: int, other: str) -> pb.TradeLeg:
    return pb.TradeLeg(
        player_id=player,
        gives=common_pb2.Offer(item_ids=gives, gold=gold),
        receives=common_pb2.Offer(item_ids=receives, gold=rgold),
        counterpart_player_id=other,
    )


def prepare(trade_id: str, the_leg: pb.TradeLeg, deadline_ms: int = 5_000) -> pb.WriteOp:
    return pb.WriteOp(
        player_id=the_leg.player_id,
        trade_prepare=pb.TradePrepareOp(trade_id=trade_id, leg=the_leg, prepared_at_ms=1_000, deadline_ms=deadline_ms),
    )


def settle(trade_id: str, player: str, outcome: int, at_ms: int = 2_000) -> pb.WriteOp:
    return pb.WriteOp(
        player_id=player,
        trade_settle=pb.TradeSettleOp(trade_id=trade_id, outcome=outcome, reason="", settled_at_ms=at_ms),  # type: ignore[arg-type]
    )


def local(trade_id: str, a_gives: list[str], b_gold: int, outcome: int, reason: str = "") -> pb.WriteOp:
    return pb.WriteOp(
        player_id="alice",
        local_trade=pb.LocalTradeOp(
            trade_id=trade_id,
            player_a="alice",
            player_b="bob",
            a_gives=common_pb2.Offer(item_ids=a_gives),
            b_gives=common_pb2.Offer(gold=b_gold),
            outcome=outcome,  # type: ignore[arg-type]
            reason=reason,
            settled_at_ms=3_000,
        ),
    )


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[NodeStorage, NodeStorage]]:
    with NodeStorage.open(tmp_path / "a", request_retention_s=10) as a, NodeStorage.open(tmp_path / "b") as b:
        yield a, b


def ship(primary: NodeStorage, replica: NodeStorage) -> None:
    start = replica.meta(S1).last.lsn + 1
    entries = primary.entries(S1, start, max_entries=10_000)
    replica.append([(S1, entries)], {S1: primary.meta(S1).fenced_epoch})


def state_of(storage: NodeStorage) -> tuple[object, ...]:
    return (
        storage.inventory(S1, ALICE),
        storage.inventory(S1, BOB),
        storage.holdings(S1, ALICE),
        storage.holdings(S1, BOB),
        [(r.trade_id, r.state, r.leg, r.reason, r.settled_at_ms) for r in storage.prepared_trades([S1])],
        [storage.trade(S1, t) for t in ("t1", "t2", "t3", "t4")],
    )


def test_prepare_commit_abort_and_local_trade_apply_alike_on_primary_and_replica(
    pair: tuple[NodeStorage, NodeStorage],
) -> None:
    primary, replica = pair
    primary.write(S1, 1, grant("g1", "alice", ["sword", "shield", "axe"], 100), 1)
    primary.write(S1, 1, grant("g2", "bob", [], 50), 1)
    # t1: alice escrows sword + 30 gold, receives a gem from another shard.
    primary.write(S1, 1, prepare("t1", leg("alice", ["sword"], 30, ["gem"], 5, "carol")), 1)
    assert primary.holdings(S1, ALICE) == Holdings(
        frozenset({"sword", "shield", "axe"}), 100, frozenset({"sword"}), 30, incoming_gold=5, incoming_items=1,
        arriving_items=frozenset({"gem"}))
    # The escrowed item cannot be escrowed again, nor can gold beyond what is free.
    with pytest.raises(FailedPrecondition, match="held by another trade"):
        primary.write(S1, 1, prepare("t2", leg("alice", ["sword"], 0, [], 1, "carol")), 1)
    with pytest.raises(FailedPrecondition, match="70 gold available"):
        primary.write(S1, 1, prepare("t2", leg("alice", [], 71, [], 0, "carol")), 1)
    # ...nor granted again (it still exists on the node).
    with pytest.raises(FailedPrecondition, match="already owned"):
        primary.write(S1, 1, grant("g3", "bob", ["sword"]), 1)
    # t2: shield escrowed, then aborted: released.
    primary.write(S1, 1, prepare("t2", leg("alice", ["shield"], 0, [], 10, "carol")), 1)
    primary.write(S1, 1, settle("t2", "alice", ABORTED), 1)
    # t1 commits: sword and 30 gold leave, gem and 5 gold join.
    primary.write(S1, 1, settle("t1", "alice", COMMITTED), 1)
    assert primary.inventory(S1, ALICE) == (["axe", "gem", "shield"], 75)
    assert primary.holdings(S1, ALICE).escrowed_items == frozenset()
    # A conflicting settle is refused on the primary; the record stays.
    with pytest.raises(FailedPrecondition, match="already COMMITTED"):
        primary.write(S1, 1, settle("t1", "alice", ABORTED), 1)
    # An abort without an escrow is recorded (a late Prepare will answer it).
    primary.write(S1, 1, settle("t3", "", ABORTED), 1)
    record = primary.trade(S1, "t3")
    assert record is not None and record.state is TradeState.ABORTED and record.leg is None
    # A COMMITTED without an escrow is refused (it would create items).
    with pytest.raises(FailedPrecondition, match="holds no escrow"):
        primary.write(S1, 1, settle("t9", "", COMMITTED), 1)
    # Same-shard trade: alice's axe for 20 of bob's gold.
    primary.write(S1, 1, local("t4", ["axe"], 20, COMMITTED), 1)
    assert primary.inventory(S1, ALICE) == (["gem", "shield"], 95)
    assert primary.inventory(S1, BOB) == (["axe"], 30)
    ship(primary, replica)
    assert state_of(replica) == state_of(primary)


def test_an_escrowed_item_cannot_be_traded_locally(pair: tuple[NodeStorage, NodeStorage]) -> None:
    primary, _ = pair
    primary.write(S1, 1, grant("g1", "alice", ["sword"], 0), 1)
    primary.write(S1, 1, grant("g2", "bob", [], 50), 1)
    primary.write(S1, 1, prepare("t1", leg("alice", ["sword"], 0, [], 1, "carol")), 1)
    with pytest.raises(FailedPrecondition, match="held by another trade"):
        primary.write(S1, 1, local("t2", ["sword"], 1, COMMITTED), 1)
    # Recorded ABORTED (decided by the data plane) applies without moving anything.
    primary.write(S1, 1, local("t2", ["sword"], 1, ABORTED, "item sword is held by another trade"), 1)
    assert primary.inventory(S1, ALICE) == (["sword"], 0)
    record = primary.trade(S1, "t2")
    assert record is not None and record.state is TradeState.ABORTED and not record.cross_shard


def test_an_item_a_prepared_trade_brings_here_cannot_be_granted(pair: tuple[NodeStorage, NodeStorage]) -> None:
    """Bob's escrow on shard-1 receives the gem another shard's player gives: a grant of
    that id (to anyone, on any shard of this node) would leave the COMMITTED trade unable
    to apply here, its other side done. Refused until the trade settles."""
    primary, _ = pair
    primary.write(S1, 1, grant("g1", "bob", [], 5), 1)
    primary.write(S1, 1, prepare("t1", leg("bob", [], 3, ["gem"], 0, "carol")), 1)
    for shard, player in ((S1, "dave"), (S2, "erin")):
        with pytest.raises(FailedPrecondition, match=r"item 'gem' is already owned: trade 't1' brings it to shard-1"):
            primary.write(shard, 1, grant(f"g-{player}", player, ["ring", "gem"]), 1)
        assert primary.inventory(shard, PlayerId(player)) is None  # nothing of the grant was written
    primary.write(S1, 1, settle("t1", "bob", COMMITTED), 1)  # the trade applies: the gem is bob's
    assert primary.inventory(S1, BOB) == (["gem"], 2)
    primary.write(S1, 1, prepare("t2", leg("bob", [], 1, ["pearl"], 0, "carol")), 1)
    primary.write(S1, 1, settle("t2", "bob", ABORTED), 1)
    primary.write(S2, 1, grant("g-pearl", "erin", ["pearl"]), 1)  # aborted: nothing is on its way any more
    assert primary.inventory(S2, PlayerId("erin")) == (["pearl"], 0)


def test_a_snapshot_carries_trade_records_and_escrows(pair: tuple[NodeStorage, NodeStorage]) -> None:
    primary, replica = pair
    primary.write(S1, 1, grant("g1", "alice", ["sword", "shield"], 10), 1)
    primary.write(S1, 1, prepare("t1", leg("alice", ["sword"], 4, [], 0, "carol"), deadline_ms=9_000), 1)
    primary.write(S1, 1, prepare("t2", leg("alice", ["shield"], 0, [], 0, "carol")), 1)
    primary.write(S1, 1, settle("t2", "alice", ABORTED), 1)
    snapshot = primary.snapshot(S1, max_tail_entries=1)
    # Through the wire and back, as a replica fetching it would.
    received = pb.ShardSnapshot.FromString(snapshot.SerializeToString())
    replica.install_snapshot(received, 1)
    held = replica.holdings(S1, ALICE)
    assert held.escrowed_items == frozenset({"sword"}) and held.escrowed_gold == 4
    [escrow] = replica.prepared_trades([S1])
    assert (escrow.trade_id, escrow.deadline_ms, escrow.state) == ("t1", 9_000, TradeState.PREPARED)
    t2 = replica.trade(S1, "t2")
    assert t2 is not None and t2.state is TradeState.ABORTED
    # Promoted, it settles the inherited escrow like its primary would have.
    replica.write(S1, 2, settle("t1", "alice", COMMITTED), 1)
    assert replica.inventory(S1, ALICE) == (["shield"], 6)


def read_pages(storage: NodeStorage, shard: ShardId, **sizes: int) -> tuple[bytes, int]:
    """A snapshot read page by page: its pages' encodings joined, and how many pages."""
    reader = storage.snapshot_pages(shard, **sizes)
    pages = []
    while (page := reader.next()) is not None:
        pages.append(page)
    return b"".join(pages), len(pages)


def test_a_snapshot_read_in_pages_is_the_snapshot_read_at_once(pair: tuple[NodeStorage, NodeStorage]) -> None:
    """Pages of every field (trade records, escrows and values included), joined, are the
    encoding of the snapshot read in one transaction, byte for byte: the receiver cannot
    tell them apart, whatever the page sizes."""
    primary, replica = pair
    for i in range(9):
        primary.write(S1, 1, grant(f"g{i}", f"p{i}", [f"item-{i}-a", f"item-{i}-b"], 10 + i), 1)
        value = bytes([i]) * (i * 50)
        primary.write(S1, 1, pb.WriteOp(request_id=f"d{i}", player_id=f"p{i}",
                                        set_data=pb.SetDataOp(system="guild", key=f"k{i}", value=value)), 1)
    for i in range(5):
        primary.write(S1, 2, prepare(f"t{i}", leg(f"p{i}", [f"item-{i}-a"], i, [], 0, "carol")), 1)
    primary.write(S1, 2, settle("t1", "p1", ABORTED), 1)
    primary.write(S1, 2, settle("t2", "p2", COMMITTED), 1)
    primary.write(S2, 1, grant("elsewhere", "zed", ["other-shard"]), 1)
    whole = primary.snapshot(S1).SerializeToString()
    counts = []
    for rows, size in ((2_000, 1 << 20), (4, 200), (1, 1)):
        joined, pages = read_pages(primary, S1, page_rows=rows, page_bytes=size)
        assert joined == whole, (rows, size)
        counts.append(pages)
    assert counts[0] < counts[1] < counts[2]
    assert counts[2] >= 1 + 9 + 9 + 1 + 5  # one row a page: the header, players, values, the tail, trade records
    replica.install_snapshot(pb.ShardSnapshot.FromString(joined), 1)
    assert replica.snapshot(S1).SerializeToString() == whole
    assert replica.holdings(S1, PlayerId("p3")).escrowed_items == frozenset({"item-3-a"})


def test_a_snapshot_parsed_a_piece_at_a_time_is_the_snapshot(pair: tuple[NodeStorage, NodeStorage]) -> None:
    primary, _ = pair
    for i in range(40):
        primary.write(S1, 1, grant(f"g{i}", f"p{i}", [f"item-{i}"], i), 1)
        primary.write(S1, 1, pb.WriteOp(request_id=f"d{i}", player_id=f"p{i}",
                                        set_data=pb.SetDataOp(system="guild", key="k", value=bytes(300 * i))), 1)
    primary.write(S1, 1, prepare("t1", leg("p1", ["item-1"], 1, [], 0, "carol")), 1)
    whole = primary.snapshot(S1)
    data = bytearray(whole.SerializeToString())
    for size in (1, 100, 5_000, 1 << 20):
        pieces = list(snapshots.field_slices(data, size))
        assert b"".join(pieces) == data
        assert size > 1 or len(pieces) > 120  # one field a piece: each row, the header's two fields
        parsed = pb.ShardSnapshot()
        for piece in pieces:
            parsed.MergeFromString(piece)  # type: ignore[arg-type]
        assert parsed == whole
    for broken in (data[:-1], data + b"\x07", data + b"\x80"):  # truncated; a wire type none encodes; cut varint
        with pytest.raises(CorruptRecord):
            list(snapshots.field_slices(broken, 1 << 20))


def test_pages_read_while_the_shard_changed_are_not_a_snapshot(pair: tuple[NodeStorage, NodeStorage]) -> None:
    """Any committed change of the shard between the first page and the last makes the
    read inconsistent (the caller reads again); other shards' writes do not, and a
    retention round that removed rows of shards it does not name does."""
    primary, replica = pair
    primary.write(S1, 1, grant("g1", "alice", ["sword"], 5), 1)
    primary.write(S2, 1, grant("g2", "zed", ["axe"], 5), 1)

    def read_with(change: Callable[[], object]) -> bool:
        reader = primary.snapshot_pages(S1, page_rows=1, page_bytes=1)
        assert reader.next() is not None
        change()
        while reader.next() is not None:
            pass
        return reader.unchanged()

    assert read_with(lambda: None)
    assert read_with(lambda: primary.write(S2, 1, grant("g3", "zed", ["bow"]), 1))
    assert read_with(lambda: primary.prune_trades(10**12))  # removed nothing
    assert read_with(lambda: primary.write(S1, 1, grant("g1", "alice", ["sword"], 5), 1))  # a replayed retry
    assert not read_with(lambda: primary.write(S1, 1, grant("g4", "alice", ["mace"]), 1))
    assert not read_with(lambda: primary.fence(S1, 3))
    primary.write(S2, 3, prepare("t9", leg("zed", ["axe"], 0, [], 0, "carol")), 1)
    primary.write(S2, 3, settle("t9", "zed", ABORTED, at_ms=1), 1)
    assert not read_with(lambda: primary.prune_trades(10**12))  # S2's record: it names no shard
    install = replica.begin_install(primary.snapshot(S1), 3, max_rows=1)
    reader = replica.snapshot_pages(S1)
    install.step()  # the install of the shard's rows goes on meanwhile
    assert reader.next() is not None and not reader.unchanged()


def test_settled_records_are_pruned_after_the_retention_prepared_ones_never(
    pair: tuple[NodeStorage, NodeStorage],
) -> None:
    primary, _ = pair  # request retention 10 s
    primary.write(S1, 1, grant("g1", "alice", ["sword", "shield"], 10), 1)
    primary.write(S1, 1, prepare("t1", leg("alice", ["sword"], 0, [], 0, "carol")), 1)
    primary.write(S1, 1, prepare("t2", leg("alice", ["shield"], 0, [], 0, "carol")), 1)
    primary.write(S1, 1, settle("t2", "alice", ABORTED, at_ms=2_000), 1)
    assert primary.prune_trades(11_000) == 0  # settled 9 s ago: kept
    assert primary.prune_trades(12_001) == 1
    assert primary.trade(S1, "t2") is None
    assert primary.prune_trades(10**12) == 0
    record = primary.trade(S1, "t1")
    assert record is not None and record.state is TradeState.PREPARED


def test_a_version_1_data_dir_is_migrated(tmp_path: Path) -> None:
    with NodeStorage.open(tmp_path) as storage:
        storage.write(S1, 1, grant("g1", "alice", ["sword"], 3), 1)
    # Make the file look like version 1: no trades table, no new indexes.
    conn = sqlite3.connect(tmp_path / "node.db")
    conn.executescript(
        "DROP TABLE trades; DROP INDEX escrows_by_player; DELETE FROM schema_version; "
        "INSERT INTO schema_version VALUES (1, 'v1'); PRAGMA user_version=1;"
    )
    conn.close()
    with NodeStorage.open(tmp_path) as storage:
        assert storage.inventory(S1, ALICE) == (["sword"], 3)
        storage.write(S1, 1, prepare("t1", leg("alice", ["sword"], 0, [], 0, "bob")), 1)
        assert storage.holdings(S1, ALICE).escrowed_items == frozenset({"sword"})
    conn = sqlite3.connect(tmp_path / "node.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION == 2
    conn.close()


def _prepared_index(path: Path) -> str:
    conn = sqlite3.connect(path / "node.db")
    try:
        return str(conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'trades_prepared'").fetchone()[0])
    finally:
        conn.close()


def test_the_prepared_index_covers_held_escrows_only_and_an_old_full_one_is_rebuilt(tmp_path: Path) -> None:
    with NodeStorage.open(tmp_path) as storage:
        storage.write(S1, 1, grant("g1", "alice", ["sword", "shield"], 3), 1)
        storage.write(S1, 1, prepare("t1", leg("alice", ["sword"], 0, [], 0, "bob")), 1)
        storage.write(S1, 1, prepare("t2", leg("alice", ["shield"], 0, [], 0, "bob")), 1)
        storage.write(S1, 1, settle("t2", "alice", ABORTED), 1)
    assert _prepared_index(tmp_path).endswith("WHERE state = 'PREPARED'")
    # A file written before: the index over every row, under the same schema version.
    conn = sqlite3.connect(tmp_path / "node.db")
    conn.executescript(
        "DROP INDEX trades_prepared; CREATE INDEX trades_prepared ON trades (state, shard_id, deadline_ms);"
    )
    conn.close()
    with NodeStorage.open(tmp_path) as storage:
        assert [r.trade_id for r in storage.prepared_trades([S1])] == ["t1"]
        assert [r.trade_id for r in storage.prepared_trades([S1], due_by_ms=10**15)] == ["t1"]
    assert _prepared_index(tmp_path).endswith("WHERE state = 'PREPARED'")
    # The termination loop's query uses it.
    conn = sqlite3.connect(tmp_path / "node.db")
    plan = " ".join(str(row) for row in conn.execute(
        "EXPLAIN QUERY PLAN SELECT trade_id FROM trades WHERE state = 'PREPARED' AND shard_id IN (?) "
        "AND deadline_ms <= ? ORDER BY prepared_at_ms, trade_id LIMIT ?", (S1, 0, 10)))
    conn.close()
    assert "trades_prepared" in plan, plan


def test_holdings_name_received_items_the_shard_still_stores_for_another_player(
    pair: tuple[NodeStorage, NodeStorage],
) -> None:
    """An item on its way out of the shard (its giver's commit not applied yet) cannot be
    received here by someone else: the core refuses such a leg (check_leg)."""
    primary, _ = pair
    primary.write(S1, 1, grant("g1", "alice", ["sword"], 10), 1)
    primary.write(S1, 1, grant("g2", "bob", ["shield"], 10), 1)
    held = primary.holdings(S1, ALICE, ["shield", "gem", "sword"])
    assert held.held_by_others == frozenset({"shield"})  # alice's own sword is in `items`
    assert "sword" in held.items
    assert primary.holdings(S1, PlayerId("carol"), ["shield"]).held_by_others == frozenset({"shield"})
    assert primary.holdings(S1, ALICE).held_by_others == frozenset()


def take(request_id: str, player: str, items: list[str], gold: int = 0) -> pb.WriteOp:
    return pb.WriteOp(request_id=request_id, player_id=player, take=pb.TakeOp(item_ids=items, gold=gold))


class TestTakes:
    """TakeItems removes what the player holds, never what a trade in doubt escrows."""

    def test_a_take_removes_items_and_gold_and_a_replica_reproduces_it(self, tmp_path: Path) -> None:
        with NodeStorage.open(tmp_path / "p") as primary, NodeStorage.open(tmp_path / "r") as replica:
            primary.write(S1, 1, grant("g1", ALICE, ["sword", "shield", "gem"], gold=100), now_ms=1)
            result = primary.write(S1, 1, take("t1", ALICE, ["sword", "gem"], gold=30), now_ms=2)
            answer = pb.TakeItemsResponse.FromString(result.response)
            assert (list(answer.inventory.item_ids), answer.inventory.gold, answer.lsn) == (["shield"], 70, 2)
            assert primary.inventory(S1, ALICE) == (["shield"], 70) and primary.item_owner("sword") is None
            # A retry answers the same and takes nothing more; the id for other terms is refused.
            assert primary.write(S1, 1, take("t1", ALICE, ["sword", "gem"], gold=30), now_ms=3).replayed
            with pytest.raises(FailedPrecondition, match="different request"):
                primary.write(S1, 1, take("t1", ALICE, ["shield"]), now_ms=4)
            assert primary.inventory(S1, ALICE) == (["shield"], 70)
            # A removed item may be granted anew.
            primary.write(S1, 1, grant("g2", BOB, ["sword"]), now_ms=5)
            entries = primary.entries(S1, 1, max_entries=100)
            replica.append([(S1, entries)], {S1: 1})
            assert replica.inventory(S1, ALICE) == (["shield"], 70)
            assert replica.item_owner("sword") == (S1, BOB)
            # A retry on the replica once promoted answers as the primary did.
            replica.fence(S1, 2)
            assert replica.write(S1, 2, take("t1", ALICE, ["sword", "gem"], gold=30), now_ms=6).response == (
                result.response)

    def test_what_the_player_does_not_hold_is_refused_naming_it_and_nothing_changes(self, tmp_path: Path) -> None:
        with NodeStorage.open(tmp_path / "p") as store:
            store.write(S1, 1, grant("g1", ALICE, ["sword"], gold=10), now_ms=1)
            store.write(S1, 1, grant("g2", BOB, ["axe"]), now_ms=1)
            for op, words in [
                (take("t1", ALICE, ["sword", "axe"]), "does not own item 'axe'"),
                (take("t2", ALICE, ["bow"]), "does not own item 'bow'"),
                (take("t3", ALICE, [], gold=11), "has 10 gold to spend; 11 were asked"),
                (take("t4", "carol", [], gold=1), "player 'carol' is unknown on shard-1"),
            ]:
                with pytest.raises(FailedPrecondition if "carol" not in words else NotFound, match=re.escape(words)):
                    store.write(S1, 1, op, now_ms=2)
            assert store.inventory(S1, ALICE) == (["sword"], 10) and store.item_owner("axe") == (S1, BOB)
            assert store.meta(S1).last.lsn == 2

    def test_escrowed_items_and_gold_cannot_be_taken(self, tmp_path: Path) -> None:
        with NodeStorage.open(tmp_path / "p") as store:
            store.write(S1, 1, grant("g1", ALICE, ["sword", "shield"], gold=50), now_ms=1)
            store.write(S1, 1, prepare("x1", leg("alice", ["sword"], 30, ["gem"], 0, "bob")), now_ms=2)
            with pytest.raises(FailedPrecondition, match="escrowed by a trade in doubt"):
                store.write(S1, 1, take("t1", ALICE, ["sword"]), now_ms=3)
            with pytest.raises(FailedPrecondition, match=re.escape("has 20 gold to spend (30 more escrowed")):
                store.write(S1, 1, take("t2", ALICE, [], gold=21), now_ms=3)
            store.write(S1, 1, take("t3", ALICE, ["shield"], gold=20), now_ms=3)
            # The trade's commit still finds everything it escrowed.
            store.write(S1, 1, settle("x1", "alice", COMMITTED), now_ms=4)
            assert store.inventory(S1, ALICE) == (["gem"], 0)

    def test_a_replica_refuses_a_take_no_primary_would_have_written(self, tmp_path: Path) -> None:
        with NodeStorage.open(tmp_path / "p") as primary, NodeStorage.open(tmp_path / "r") as replica:
            primary.write(S1, 1, grant("g1", ALICE, ["sword"], gold=5), now_ms=1)
            replica.append([(S1, primary.entries(S1, 1, max_entries=10))], {S1: 1})
            forged = pb.LogEntry(epoch=1, lsn=2, payload=take("t1", ALICE, ["bow"]).SerializeToString())
            with pytest.raises(CorruptRecord, match="does not own item 'bow'"):
                replica.append([(S1, [forged])], {})
            assert replica.inventory(S1, ALICE) == (["sword"], 5)
