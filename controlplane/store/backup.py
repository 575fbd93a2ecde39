"""A backup of the cluster's etcd: one snapshot file in a directory, the newest N kept.

etcd holds everything the control plane knows (the config, the ring, who holds which shard
at which epoch, trade decisions); the nodes hold the players' data. Losing every etcd
member's disk loses the first, and the chart runs etcd on volumes of its own. So
``bluemarble-controlplane --etcd-backup-dir DIR`` (the chart's backup CronJob) takes one
snapshot and exits; ``etcdctl snapshot restore`` (or ``etcdutl``) makes a data dir of it.

A snapshot is what etcd's Maintenance.Snapshot streams: the backend database followed by
its SHA-256. The file is written as ``<name>.partial``, checked against that hash, synced,
then renamed, so a file without the suffix is always whole; a failed run leaves nothing
behind (its partial file is removed, and any other run's left over is removed by the next).
Names sort by time: ``etcd-<cluster>-<UTC yyyymmddThhmmssZ>-r<revision>.db``.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from bluemarble.core.errors import CorruptRecord, Unavailable
from controlplane.store.etcd import EtcdStore

log = structlog.get_logger(__name__)

SNAPSHOT_TIMEOUT_S = 900.0
"""The longest one snapshot may stream (etcd's database is at most its quota, 8 GiB)."""

HASH_BYTES = 32
"""The SHA-256 etcd appends to the database it streams."""

PARTIAL = ".partial"


@dataclass(frozen=True)
class Backup:
    path: Path
    size: int
    """Bytes of the file (the database and its hash)."""
    revision: int
    """etcd's revision just before the snapshot began (the snapshot holds at least it)."""
    removed: tuple[Path, ...]
    """Older backups removed to keep the newest ``keep``."""


def _prefix(cluster: str) -> str:
    return f"etcd-{cluster}-"


def _ours(cluster: str, suffix: str = "") -> re.Pattern[str]:
    """Names of ``cluster``'s backups (not those of a cluster whose name merely begins
    with it: "default-eu" beside "default")."""
    return re.compile(rf"{re.escape(_prefix(cluster))}\d{{8}}T\d{{6}}Z-r\d+\.db{re.escape(suffix)}")


async def take_backup(store: EtcdStore, directory: Path, cluster: str, keep: int, now_s: float | None = None) -> Backup:
    """Streams one snapshot of ``store``'s etcd into ``directory`` and removes all but the
    newest ``keep`` backups of ``cluster`` there. Raises Unavailable (etcd did not answer
    or stopped mid-stream; disk trouble: the OSError's words), CorruptRecord (the
    snapshot does not match its hash). Nothing partial is left either way."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    _prepare(directory, cluster)
    revision = await store.current_revision()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now_s is None else now_s))
    final = directory / f"{_prefix(cluster)}{stamp}-r{revision}.db"
    partial = final.with_name(final.name + PARTIAL)
    digest = hashlib.sha256()
    tail = b""  # the last HASH_BYTES bytes seen: the hash, once the stream ends
    size = 0
    try:
        with partial.open("wb") as f:
            async for chunk in store.snapshot(SNAPSHOT_TIMEOUT_S):
                f.write(chunk)
                size += len(chunk)
                data = tail + chunk
                digest.update(data[:-HASH_BYTES])
                tail = data[-HASH_BYTES:]
            f.flush()
            os.fsync(f.fileno())
        if size <= HASH_BYTES or digest.digest() != tail:
            raise CorruptRecord(
                f"etcd's snapshot ({size} bytes) does not match the SHA-256 it ends with; nothing was kept, "
                "take the backup again"
            )
        os.replace(partial, final)
        _sync_directory(directory)
    except OSError as e:
        raise Unavailable(f"cannot write the backup {final}: {e.strerror or e}") from e
    finally:
        partial.unlink(missing_ok=True)
    removed = _keep_newest(directory, cluster, keep)
    log.info("etcd backed up", path=str(final), bytes=size, revision=revision, removed=len(removed), kept=keep)
    return Backup(final, size, revision, removed)


def _prepare(directory: Path, cluster: str) -> None:
    """Makes ``directory`` if needed and removes what a run that died mid-stream left."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        stale = _ours(cluster, PARTIAL)
        for path in directory.iterdir():
            if stale.fullmatch(path.name):
                path.unlink(missing_ok=True)
    except OSError as e:
        raise Unavailable(f"cannot use the backup directory {directory}: {e.strerror or e}") from e


def _keep_newest(directory: Path, cluster: str, keep: int) -> tuple[Path, ...]:
    """Removes all but the newest ``keep`` backups of ``cluster``; returns the removed."""
    ours = _ours(cluster)
    backups = sorted(p for p in directory.iterdir() if ours.fullmatch(p.name) and p.is_file())
    removed = tuple(backups[: max(0, len(backups) - keep)])
    for old in removed:
        old.unlink(missing_ok=True)
    return removed


def _sync_directory(directory: Path) -> None:
    """Makes the rename durable (the directory's entry), where the platform allows."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
