"""``bluemarble-controlplane --etcd-backup-dir``: a snapshot of the real etcd, checked against
its SHA-256, the newest N kept, nothing partial left behind, and restorable with etcdctl into
an etcd that serves the keys again."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bluemarble.core.errors import CorruptRecord, Unavailable
from controlplane.server import main as cp_main
from controlplane.store.backup import HASH_BYTES, take_backup
from controlplane.store.etcd import EtcdStore
from scripts.localcluster import LocalEtcd, free_port

pytestmark = pytest.mark.integration


async def backup_process(*args: str) -> tuple[int, str]:
    """The command the chart's CronJob runs, as a process of its own (it configures the
    process's logging, which a test must not do to the test runner's)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane.server.main", *args, "--log-format", "console",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def _whole(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > HASH_BYTES and hashlib.sha256(data[:-HASH_BYTES]).digest() == data[-HASH_BYTES:]


async def test_a_backup_is_whole_keeps_the_newest_and_restores(
    etcd: LocalEtcd, cluster_name: str, tmp_path: Path
) -> None:
    store = EtcdStore([etcd.endpoint])
    await store.connect()
    try:
        await store.put(f"/bluemarble/{cluster_name}/config", b'{"shardCount": 8}')
        backups = tmp_path / "backups"
        (backups).mkdir()
        (backups / f"etcd-{cluster_name}-20260101T000000Z-r1.db.partial").write_bytes(b"left by a killed run")
        (backups / "unrelated.txt").write_text("an operator's file")
        other = backups / f"etcd-{cluster_name}-eu-20200101T000000Z-r5.db"  # another cluster's, "<name>-eu"
        other.write_bytes(b"theirs")
        made = [await take_backup(store, backups, cluster_name, keep=2, now_s=1_800_000_000 + i) for i in range(3)]
    finally:
        await store.close()
    names = sorted(p.name for p in backups.iterdir())
    assert names == sorted([made[1].path.name, made[2].path.name, "unrelated.txt", other.name]), names
    assert made[2].removed == (made[0].path,)
    assert re.fullmatch(rf"etcd-{cluster_name}-20270115T\d{{6}}Z-r\d+\.db", made[2].path.name)
    assert all(_whole(b.path) for b in made[1:]) and made[2].size == made[2].path.stat().st_size
    # The command the chart's CronJob runs: one more backup, the newest 2 kept, exit 0.
    code, output = await backup_process(
        "--etcd", etcd.endpoint, "--cluster", cluster_name, "--etcd-backup-dir", str(backups),
        "--etcd-backup-keep", "2")
    assert code == 0 and "etcd backed up" in output, output
    kept = sorted(p for p in backups.glob(f"etcd-{cluster_name}-*.db") if p != other)
    assert len(kept) == 2 and other.read_bytes() == b"theirs" and made[2].path in kept and all(_whole(p) for p in kept)
    # Restored with etcdctl, an etcd on the copy serves the keys.
    etcdctl = shutil.which("etcdctl")
    assert etcdctl is not None, "etcdctl (Debian's etcd-client) is missing: scripts/setup.sh installs it"
    restored = tmp_path / "restored"
    peer = free_port()
    await asyncio.to_thread(
        subprocess.run,
        [etcdctl, "snapshot", "restore", str(made[2].path), "--name", "bluemarble-local",
         "--data-dir", str(restored / "etcd"), "--initial-cluster", f"bluemarble-local=http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}"],
        check=True, capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=60,
    )
    copy = LocalEtcd(restored, peer_port=peer).start()
    try:
        store = EtcdStore([copy.endpoint])
        await store.connect()
        try:
            kv = await store.get(f"/bluemarble/{cluster_name}/config")
            assert kv is not None and kv.value == b'{"shardCount": 8}'
        finally:
            await store.close()
    finally:
        copy.kill()


async def test_a_failed_backup_leaves_nothing_and_says_why(etcd: LocalEtcd, cluster_name: str, tmp_path: Path) -> None:
    # etcd unreachable: the command exits 1 after its start-up timeout, no file made.
    backups = tmp_path / "backups"
    code, output = await backup_process(
        "--etcd", f"127.0.0.1:{free_port()}", "--cluster", cluster_name, "--etcd-backup-dir", str(backups),
        "--etcd-startup-timeout-s", "1")
    assert code == 1 and "etcd backup failed" in output and not backups.exists(), output
    # A directory that cannot be made: Unavailable naming it.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = EtcdStore([etcd.endpoint])
    await store.connect()
    try:
        with pytest.raises(Unavailable, match="cannot use the backup directory"):
            await take_backup(store, blocker / "backups", cluster_name, keep=1)
    finally:
        await store.close()


def test_the_number_kept_is_checked_before_anything_runs(capsys: pytest.CaptureFixture[str]) -> None:
    for keep in ("0", "10001"):
        with pytest.raises(SystemExit) as exit_info:
            cp_main.parse_args(["--etcd-backup-dir", "/tmp/x", "--etcd-backup-keep", keep])
        assert exit_info.value.code == 2 and "--etcd-backup-keep" in capsys.readouterr().err


class FakeSnapshots:
    """The adapter's two calls a backup makes, streaming ``chunks`` (an exception among
    them is raised at its turn)."""

    def __init__(self, chunks: list[bytes | Exception]):
        self.chunks = chunks

    async def current_revision(self) -> int:
        return 7

    async def snapshot(self, timeout_s: float) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            if isinstance(chunk, Exception):
                raise chunk
            yield chunk


async def test_a_snapshot_not_matching_its_hash_or_cut_short_is_not_kept(tmp_path: Path) -> None:
    db = b"x" * 100_000
    good = [db[:40_000], db[40_000:] + hashlib.sha256(db).digest()[:10], hashlib.sha256(db).digest()[10:]]
    made = await take_backup(FakeSnapshots(good), tmp_path, "c", keep=3)  # type: ignore[arg-type]
    assert made.path.read_bytes() == db + hashlib.sha256(db).digest() and made.revision == 7
    bad = [db, hashlib.sha256(b"other").digest()]
    with pytest.raises(CorruptRecord, match="does not match the SHA-256"):
        await take_backup(FakeSnapshots(bad), tmp_path, "c", keep=3, now_s=2_000_000_000)  # type: ignore[arg-type]
    cut = [db[:50_000], Unavailable("etcd unavailable during snapshot")]
    with pytest.raises(Unavailable):
        await take_backup(FakeSnapshots(cut), tmp_path, "c", keep=3, now_s=2_000_000_001)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == [made.path.name]  # nothing partial, nothing unchecked
