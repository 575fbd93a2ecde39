"""Writes the WAL back to disk ahead of SQLite's checkpoints, off the event loop.

Under ``synchronous=NORMAL`` a commit appends to ``node.db-wal`` without an fsync: the
frames sit in the OS's page cache. The commit that crosses ``wal_autocheckpoint`` then
fsyncs the whole WAL before it copies the frames into ``node.db``, and that commit runs on
the node's event loop: with 4 MiB of WAL to flush it held every write and call of the
node 10-20 ms, a few times a second under load (docs/benchmarks.md, "Checkpoint stalls").

:class:`WalWriteback` is a daemon thread that ``fdatasync``\\ s the WAL every
:data:`INTERVAL_S` when it changed, so that a checkpoint finds little left to flush. The
call releases the GIL and touches no SQLite state (only the file's pages in the kernel),
so it needs no coordination with the connection. Commits stay as durable as before;
frames reach the disk sooner.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_SYNC = getattr(os, "fdatasync", os.fsync)  # fdatasync is Linux's; elsewhere fsync
INTERVAL_S = 0.05
"""How often the WAL is written back when it changed: under load the WAL crosses the
checkpoint threshold (1,000 pages) every 200 ms or so, so a checkpoint finds at most this
much of it unwritten."""


class WalWriteback:
    """Flushes ``wal`` (a path: the file comes and goes with the connection) every
    ``interval_s`` while it changes; :meth:`stop` ends the thread."""

    def __init__(self, wal: Path, interval_s: float = INTERVAL_S):
        self.wal = wal
        self.interval_s = interval_s
        self.flushes = 0  # fdatasync calls made (for tests and curiosity)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"wal-writeback {wal.name}", daemon=True)

    def start(self) -> WalWriteback:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ends the thread (waits for a flush in progress, at most a second)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(1.0)

    def _run(self) -> None:
        fd: int | None = None
        seen: tuple[int, int, int] | None = None  # (inode, size, mtime) at the last flush
        failed = False
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    stat = os.stat(self.wal)
                    if fd is not None and os.fstat(fd).st_ino != stat.st_ino:
                        os.close(fd)  # a new WAL file (the old one was removed)
                        fd = None
                    if fd is None:
                        fd = os.open(self.wal, os.O_RDONLY | os.O_CLOEXEC)
                    now = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
                    if now == seen:
                        continue  # nothing written since the last flush
                    _SYNC(fd)
                    seen = now
                    self.flushes += 1
                    failed = False
                except FileNotFoundError:
                    continue  # no WAL yet (or between a close and the next open)
                except OSError as e:
                    # The checkpoint's own fsync reports a failing disk to the writer (and
                    # the node's storage trouble to the control plane); here, one line.
                    if not failed:
                        log.info("WAL writeback failed; checkpoints flush it themselves", wal=str(self.wal),
                                 error=e.strerror or str(e))
                    failed = True
                    if fd is not None:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                        fd = None
        finally:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
