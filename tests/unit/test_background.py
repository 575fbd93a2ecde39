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
