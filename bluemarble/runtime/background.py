"""Guarded background tasks: started with a name, logged if they die, stopped cleanly.

Every long-running loop of a BlueMarble process (watches, election, reconciler, lease
keepalive, routers) handles the errors it expects and goes on. One that dies of an
exception anyway is a bug, and must say so in the log rather than vanish silently
(asyncio would only mention it when the task object is garbage-collected, if ever).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)


def start(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Runs ``coro`` as a task named ``name`` that logs if it ends unexpectedly."""
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(_report)
    return task


def _report(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error("background task died", task=task.get_name(), error=repr(error), exc_info=error)
    else:
        log.debug("background task finished", task=task.get_name())


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancels ``task`` (if any) and waits for it to finish; raises the error it ends with,
    if any. A cancellation of the caller itself goes on up (``await task`` under
    ``suppress(CancelledError)`` would swallow it, and with it the caller's timeout)."""
    if task is None or task.done():
        return
    task.remove_done_callback(_report)
    task.cancel()
    try:
        await asyncio.wait((task,))
    except asyncio.CancelledError:
        task.add_done_callback(_report)  # it still says so if it dies of an error
        raise
    if not task.cancelled():
        task.result()
