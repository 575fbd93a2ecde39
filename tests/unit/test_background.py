"""Background tasks log when they die and stop cleanly."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from bluemarble.runtime import background


async def test_a_task_that_dies_is_logged() -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    with structlog.testing.capture_logs() as logs:
        task = background.start(broken(), "broken-loop")
        with pytest.raises(RuntimeError):
            await task
    assert [(e["event"], e["task"]) for e in logs] == [("background task died", "broken-loop")]


async def test_stop_cancels_and_waits_without_logging() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    with structlog.testing.capture_logs() as logs:
        task = background.start(forever(), "forever")
        await started.wait()
        await background.stop(task)
        await background.stop(None)
    assert task.cancelled()
    assert logs == []


async def test_stop_lets_the_callers_own_cancellation_through() -> None:
    """A shutdown step bounded by a timeout must end at its bound, even when the task it
    stops takes longer to finish than that."""
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_to_stop() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()  # its clean-up takes a while

    task = background.start(slow_to_stop(), "slow-to-stop")
    await started.wait()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await background.stop(task)
    release.set()
    await asyncio.wait((task,), timeout=5)
    assert task.cancelled()


async def test_stop_raises_the_error_a_task_ends_with() -> None:
    started = asyncio.Event()

    async def fails_on_cancel() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("clean-up failed") from None

    task = background.start(fails_on_cancel(), "fails-on-cancel")
    await started.wait()
    with pytest.raises(RuntimeError, match="clean-up failed"):
        await background.stop(task)
