"""CallStream.close returns, and fails the calls in flight, even when the stream's task
loses a cancellation: Python 3.11's ``asyncio.wait_for`` returns the awaited result
instead of raising when the call completes as the cancel lands, and a routing client
closed while its calls opened their node streams hung for good on that."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bluemarble.client.node_calls import CallStream
from bluemarble.core import errors
from bluemarble.v1 import shardnode_pb2


class _SilentStream:
    """A stream that opened and never answers: the node is slow, or the close came first."""

    def __init__(self, swallow_first_write_cancel: bool = False):
        self.writes = 0
        self.cancelled = False
        self._swallow = swallow_first_write_cancel

    async def initial_metadata(self) -> tuple[()]:
        return ()

    def done(self) -> bool:
        return self.cancelled

    async def write(self, message: Any) -> None:
        self.writes += 1
        if self._swallow:
            self._swallow = False
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                pass  # lost, as a library's wait may lose it

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield None  # never reached


class _OpenLosesCancel(CallStream):
    def __init__(self) -> None:
        super().__init__(stub=None, address="127.0.0.1:1")
        self.opening = asyncio.Event()
        self.stream = _SilentStream()

    async def _open(self) -> Any:
        self.opening.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # the cancellation lost while the stream opened
        return self.stream


class _WriteLosesCancel(CallStream):
    def __init__(self) -> None:
        super().__init__(stub=None, address="127.0.0.1:1")
        self.stream = _SilentStream(swallow_first_write_cancel=True)

    async def _open(self) -> Any:
        return self.stream


async def _closes_within_5_s(stream: CallStream) -> None:
    closing = asyncio.ensure_future(stream.close())
    done, _ = await asyncio.wait((closing,), timeout=5)
    assert done, "close() did not return within 5 s"
    await closing


def _inventory() -> shardnode_pb2.GetInventoryRequest:
    return shardnode_pb2.GetInventoryRequest(player_id="p1")


async def test_a_stream_closed_while_it_opens_ends_even_if_the_open_loses_the_cancellation() -> None:
    stream = _OpenLosesCancel()
    call = asyncio.ensure_future(stream.call("get_inventory", _inventory(), 30.0))
    await asyncio.wait_for(stream.opening.wait(), 5)
    await _closes_within_5_s(stream)
    with pytest.raises(errors.Unavailable, match="cancelled"):
        await asyncio.wait_for(call, 5)
    assert stream.stream.cancelled and stream.stream.writes == 0


async def test_close_cancels_again_a_stream_task_that_lost_its_cancellation() -> None:
    stream = _WriteLosesCancel()
    call = asyncio.ensure_future(stream.call("get_inventory", _inventory(), 30.0))
    for _ in range(100):
        if stream.stream.writes:
            break
        await asyncio.sleep(0.01)
    assert stream.stream.writes == 1
    await _closes_within_5_s(stream)
    with pytest.raises(errors.Unavailable, match="cancelled"):
        await asyncio.wait_for(call, 5)
    assert stream.stream.cancelled
