"""Runs a process's main coroutine on the fastest event loop available.

uvloop (libuv) cuts the event loop's own share of the control plane's CPU; it is used
when installed, unless ``BLUEMARBLE_EVENT_LOOP=asyncio`` asks for the standard loop.

A server process (``server=True``) also freezes its start-up heap (:func:`freeze_heap`),
times its garbage collections (``bluemarble_gc_pause_seconds``), and watches its loop
for stalls (:mod:`bluemarble.runtime.stalls`).
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def freeze_heap() -> None:
    """Moves every object alive now out of the cyclic garbage collector's sight
    (``gc.freeze``), after collecting what is already garbage.

    Why: a full collection traverses every tracked object, and in a server most of them
    are start-up objects that live as long as the process (modules, protobuf descriptors,
    gRPC's and the app's tables). Traversing them stalled a node or the control plane for
    20-50 ms at each full collection (scripts/bench_trades.py, every process); frozen, a
    full collection takes 1-3 ms. Frozen objects are still freed by reference counting;
    only cycles among them would stay, and start-up makes none that matter."""
    gc.collect()
    gc.freeze()


LOW_OPEN_FILES = 4096
"""Below this many open files a server warns at start: each client connection, peer
channel and etcd stream is one, and at the limit gRPC stops accepting connections
(existing ones keep working, new clients hang)."""


def raise_open_files_limit() -> int:
    """Raises the soft limit on open files to the hard one (as Go's runtime does: the
    soft default, often 1,024, is a relic of select()), and warns when it stays below
    :data:`LOW_OPEN_FILES`. Returns the soft limit now in force."""
    import resource

    import structlog

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the soft limit (a container may refuse)
    if soft != resource.RLIM_INFINITY and soft < LOW_OPEN_FILES:
        structlog.get_logger(__name__).warning(
            "few open files allowed; past them new connections hang (raise the process's nofile limit)",
            open_files_limit=soft, recommended=LOW_OPEN_FILES,
        )
    return soft


async def _watching(main: Coroutine[Any, Any, T]) -> T:
    from bluemarble.runtime import stalls

    watch = stalls.start()
    try:
        return await main
    finally:
        watch.cancel()


def run(main: Coroutine[Any, Any, T], *, server: bool = False) -> T:
    """Runs ``main`` to completion on uvloop (or asyncio). ``server``: a long-running
    server process: the open-files limit raised (:func:`raise_open_files_limit`),
    :func:`freeze_heap` first, and every collection's pause is observed in
    ``bluemarble_gc_pause_seconds``, and a :mod:`~bluemarble.runtime.stalls` watch runs
    beside ``main``."""
    if server:
        raise_open_files_limit()
        # Here, not at the top: other users of this module (benchmarks, tools) need not
        # import prometheus-client (about 45 ms) to run a coroutine.
        from bluemarble.runtime import metrics

        freeze_heap()
        metrics.observe_gc_pauses()
        main = _watching(main)
    choice = os.environ.get("BLUEMARBLE_EVENT_LOOP", "auto")
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.run(main)
    return asyncio.run(main)
