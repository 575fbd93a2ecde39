"""Node storage against damaged files and foreign data dirs: a node.db damaged in the
middle is refused at open with what is wrong and what to do; damage found while serving
answers UNAVAILABLE naming the node, tells the process once, and refuses every later
call; SQLite's other errors keep their statuses; a data dir belongs to one node id."""

from __future__ import annotations

import os
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from bluemarble.core.errors import CorruptRecord, FailedPrecondition, Unavailable
from bluemarble.core.ids import PlayerId, ShardId
from bluemarble.v1 import shardnode_pb2 as pb
from shardnode.storage import NodeStorage
from shardnode.storage.node_storage import StorageDamaged, _sqlite_errors

S1 = ShardId("shard-1")
PAGE = 4096


def grant(n: int) -> pb.WriteOp:
    return pb.WriteOp(
        request_id=f"r{n}", player_id=f"p{n}", grant=pb.GrantOp(item_ids=[f"i{n}-{k}" for k in range(5)], gold=1)
    )


def fill(storage: NodeStorage, players: int = 200) -> None:
    """Enough rows for the tables to span tens of pages."""
    for n in range(players):
        storage.write(S1, 1, grant(n), now_ms=1)


def overwrite(path: Path, offset: int, size: int) -> None:
    """Overwrites ``size`` bytes at ``offset`` with garbage (seeded: the same every run)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(random.Random(7).randbytes(size))


@pytest.fixture
def stopped_node_dir(tmp_path: Path) -> Path:
    """The data dir of a node that held some players and was stopped (WAL checkpointed)."""
    with NodeStorage.open(tmp_path, node_id="node-3") as storage:
        fill(storage)
    return tmp_path


class TestDamageAtOpen:
    def test_a_file_damaged_in_the_middle_is_refused_naming_the_problem_and_what_to_do(
        self, stopped_node_dir: Path
    ) -> None:
        overwrite(stopped_node_dir / "node.db", PAGE * 3, PAGE * 3)  # the outside probe's damage
        with pytest.raises(StorageDamaged) as info:
            NodeStorage.open(stopped_node_dir, node_id="node-3")
        message = str(info.value)
        assert "node node-3" in message and str(stopped_node_dir / "node.db") in message
        assert "quick_check: Page" in message
        assert f"move {stopped_node_dir} away" in message and "empty --data-dir" in message
        assert "\n" not in message and info.value.status == "UNAVAILABLE"

    def test_without_the_check_the_same_file_opens_and_fails_its_reads(self, stopped_node_dir: Path) -> None:
        # What the start-up check is for: the damage is invisible to opening.
        overwrite(stopped_node_dir / "node.db", PAGE * 3, PAGE * 3)
        with NodeStorage.open(stopped_node_dir, check_integrity=False) as storage:
            with pytest.raises(StorageDamaged):
                for n in range(200):
                    storage.inventory(S1, PlayerId(f"p{n}"))

    def test_a_damaged_header_is_refused_as_damage(self, stopped_node_dir: Path) -> None:
        overwrite(stopped_node_dir / "node.db", 0, 100)
        with pytest.raises(StorageDamaged, match="not a database"):
            NodeStorage.open(stopped_node_dir, node_id="node-3")

    def test_a_sound_file_opens_and_keeps_its_data(self, stopped_node_dir: Path) -> None:
        with NodeStorage.open(stopped_node_dir, node_id="node-3") as storage:
            assert storage.inventory(S1, PlayerId("p7")) == ([f"i7-{k}" for k in range(5)], 1)
            assert storage.damage is None


class TestDamageWhileServing:
    @pytest.fixture
    def damaged(self, tmp_path: Path) -> Iterator[tuple[NodeStorage, list[StorageDamaged]]]:
        """A storage whose file is damaged under it: every page but the first overwritten,
        and the page cache dropped so the next read goes to the file."""
        storage = NodeStorage.open(tmp_path, node_id="node-3")
        try:
            fill(storage)
            conn = storage._conn
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            overwrite(storage.path, PAGE, storage.path.stat().st_size - PAGE)
            conn.execute("PRAGMA shrink_memory")
            told: list[StorageDamaged] = []
            storage.on_damaged = told.append
            yield storage, told
        finally:
            storage.close()

    def test_a_read_answers_unavailable_naming_the_node_and_the_way_out(
        self, damaged: tuple[NodeStorage, list[StorageDamaged]]
    ) -> None:
        storage, told = damaged
        with pytest.raises(StorageDamaged) as info:
            storage.inventory(S1, PlayerId("p1"))
        assert isinstance(info.value, Unavailable) and info.value.status == "UNAVAILABLE"
        message = str(info.value)
        assert "node node-3 cannot serve" in message and "malformed" in message
        assert "empty --data-dir" in message
        assert told == [info.value] and storage.damage is info.value

    def test_every_later_call_is_refused_and_the_process_is_told_once(
        self, damaged: tuple[NodeStorage, list[StorageDamaged]]
    ) -> None:
        storage, told = damaged
        with pytest.raises(StorageDamaged):
            storage.inventory(S1, PlayerId("p1"))
        # Calls that might not touch a damaged page are refused too, and so are writes.
        for call in (
            lambda: storage.write(S1, 1, grant(999), now_ms=2),
            lambda: storage.write_many([(S1, 1, grant(998)), (S1, 1, grant(997))], now_ms=2),
            lambda: storage.recorded(S1, "r1"),
            lambda: storage.fence(S1, 9),
            lambda: storage.entries(S1, 1),
            lambda: storage.snapshot(S1),
        ):
            with pytest.raises(StorageDamaged, match="node node-3 cannot serve"):
                call()
        assert len(told) == 1

    def test_a_write_that_meets_the_damage_is_refused_and_tells_the_process(
        self, damaged: tuple[NodeStorage, list[StorageDamaged]]
    ) -> None:
        storage, told = damaged
        with pytest.raises(StorageDamaged):
            storage.write(S1, 1, grant(999), now_ms=2)
        assert len(told) == 1


class TestOtherSqliteErrors:
    @pytest.mark.parametrize(
        ("error", "expected"),
        [
            (sqlite3.OperationalError("database is locked"), Unavailable),
            (sqlite3.OperationalError("disk I/O error"), Unavailable),
            (sqlite3.IntegrityError("UNIQUE constraint failed: items.item_id"), CorruptRecord),
            (sqlite3.DatabaseError("database disk image is malformed"), StorageDamaged),
            (sqlite3.DatabaseError("file is not a database"), StorageDamaged),
        ],
    )
    def test_each_error_gets_its_class(self, error: sqlite3.Error, expected: type[Exception]) -> None:
        with pytest.raises(expected) as info, _sqlite_errors(Path("/x/node.db"), "n1"):
            raise error
        assert (type(info.value) is StorageDamaged) == (expected is StorageDamaged)

    def test_misuse_stays_a_programming_error(self, tmp_path: Path) -> None:
        storage = NodeStorage.open(tmp_path)
        storage.close()
        with pytest.raises(sqlite3.ProgrammingError):
            storage.inventory(S1, PlayerId("p1"))


class TestNodeId:
    def test_a_new_database_records_the_id_and_reopens_under_it(self, tmp_path: Path) -> None:
        NodeStorage.open(tmp_path, node_id="node-3").close()
        NodeStorage.open(tmp_path, node_id="node-3").close()
        conn = sqlite3.connect(tmp_path / "node.db")
        try:
            assert conn.execute("SELECT value FROM node_meta WHERE key = 'node_id'").fetchall() == [("node-3",)]
        finally:
            conn.close()

    def test_another_id_is_refused_naming_both_and_what_to_do(self, tmp_path: Path) -> None:
        with NodeStorage.open(tmp_path, node_id="node-3") as storage:
            fill(storage, players=3)
        with pytest.raises(FailedPrecondition) as info:
            NodeStorage.open(tmp_path, node_id="node-7")
        message = str(info.value)
        assert f"data dir {tmp_path} belongs to node 'node-3', not 'node-7'" in message
        assert "--node-id 'node-3'" in message and "its own data dir" in message
        # Refused before anything was written, and the data dir is free again.
        with NodeStorage.open(tmp_path, node_id="node-3") as storage:
            assert storage.inventory(S1, PlayerId("p2")) is not None

    def test_a_database_without_a_record_adopts_the_first_id_it_is_opened_with(self, tmp_path: Path) -> None:
        with NodeStorage.open(tmp_path) as storage:  # as an older build left it: no node_meta
            fill(storage, players=3)
        conn = sqlite3.connect(tmp_path / "node.db")
        try:
            assert conn.execute("SELECT name FROM sqlite_schema WHERE name = 'node_meta'").fetchone() is None
        finally:
            conn.close()
        NodeStorage.open(tmp_path, node_id="node-3").close()
        with pytest.raises(FailedPrecondition, match="belongs to node 'node-3'"):
            NodeStorage.open(tmp_path, node_id="node-7")

    def test_without_an_id_nothing_is_checked(self, tmp_path: Path) -> None:
        NodeStorage.open(tmp_path, node_id="node-3").close()
        NodeStorage.open(tmp_path).close()


class TestDataDir:
    def test_a_file_as_data_dir_is_refused_as_such(self, tmp_path: Path) -> None:
        path = tmp_path / "file"
        path.write_text("x")
        with pytest.raises(FailedPrecondition, match="is not a directory"):
            NodeStorage.open(path)

    @pytest.mark.parametrize("name", ["node.db", "node.db-wal"])
    def test_a_directory_where_the_database_goes_is_refused_by_name(self, tmp_path: Path, name: str) -> None:
        (tmp_path / name).mkdir()  # was "cannot be used right now: unable to open database file"
        with pytest.raises(FailedPrecondition, match=f"{name} is not a regular file; remove it"):
            NodeStorage.open(tmp_path)

    def test_a_full_disk_is_refused_before_the_node_takes_roles(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Started on a full disk, a node registered, took roles and left again 20 s later.
        real = os.statvfs

        def nearly_full(path: object) -> os.statvfs_result:
            st = real(path)  # type: ignore[arg-type]
            fields = list(st)
            fields[4] = (2 << 20) // st.f_frsize  # f_bavail: 2 MiB free
            return os.statvfs_result(fields)

        monkeypatch.setattr(os, "statvfs", nearly_full)
        with pytest.raises(FailedPrecondition, match=r"has 2\.0 MiB free; a node needs at least 16 MiB"):
            NodeStorage.open(tmp_path)
        monkeypatch.undo()
        NodeStorage.open(tmp_path).close()  # the data dir was released


def test_writes_failing_for_the_limit_tell_the_node_once_and_a_commit_resets_the_clock(tmp_path: Path) -> None:
    storage = NodeStorage.open(tmp_path)
    fill(storage, 20)
    told: list[Unavailable] = []
    storage.on_failing = told.append
    storage.failing_limit_s = 0.0
    pages = storage._conn.execute("PRAGMA page_count").fetchone()[0]
    storage._conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full: no page more
    for attempt in range(3):
        with pytest.raises(Unavailable, match="full"):
            storage.write(S1, 1, pb.WriteOp(request_id=f"big-{attempt}", player_id=f"big-{attempt}", grant=pb.GrantOp(
                item_ids=[f"big-{attempt}-{i}-" + "x" * 100 for i in range(256)])), now_ms=1)
    assert len(told) == 1 and "full" in str(told[0])  # once, from the second failure on
    trouble, since_ms = storage.trouble()  # what heartbeats report meanwhile
    assert trouble.startswith("storage refuses writes: ") and "full" in trouble and since_ms > 0, trouble
    failing_since = storage._failing_since
    assert storage.prune_trades(now_ms=1) == 0  # an empty transaction commits on a full disk too
    assert storage._failing_since == failing_since  # and says nothing of it taking writes
    storage._conn.execute("PRAGMA max_page_count = 1073741823")  # room again
    storage.write(S1, 1, grant(999), now_ms=1)
    assert storage._failing_since is None and storage.trouble() == ("", 0)
    storage.close()


def test_refused_writes_do_not_count_as_a_failing_disk(tmp_path: Path) -> None:
    storage = NodeStorage.open(tmp_path)
    fill(storage, 5)
    storage.on_failing = lambda e: pytest.fail(f"told of a failing disk: {e}")
    storage.failing_limit_s = 0.0
    for _ in range(3):
        with pytest.raises(FailedPrecondition):
            storage.write(S1, 1, pb.WriteOp(request_id="again", player_id="p1", grant=pb.GrantOp(item_ids=["i0-0"])),
                          now_ms=1)  # p0's item to p1: refused, not failing
    assert storage._failing_since is None
    storage.close()


def test_a_database_file_deleted_or_replaced_under_the_node_is_damage(tmp_path: Path) -> None:
    # SQLite writes on to the open file: every commit succeeded while nothing reached the
    # path a restart opens (an outside check acknowledged 1,321 grants that way).
    storage = NodeStorage.open(tmp_path)
    fill(storage, 2)
    told: list[Exception] = []
    storage.on_damaged = told.append
    storage.check_files()
    assert not told  # the files it opened
    (tmp_path / "node.db").unlink()
    storage.check_files()
    storage.check_files()
    assert len(told) == 1 and "node.db was deleted while the node ran" in str(told[0]), told
    with pytest.raises(StorageDamaged):
        storage.write(S1, 1, grant(999), now_ms=1)
    storage.close()

    other = tmp_path / "other"
    storage = NodeStorage.open(other)
    fill(storage, 2)
    storage.on_damaged = told.append
    wal = other / "node.db-wal"
    wal.rename(other / "moved")
    wal.write_bytes(b"")  # a new file where the WAL was
    storage.check_files()
    assert len(told) == 2 and "node.db-wal was replaced" in str(told[1]), told
    storage.close()
