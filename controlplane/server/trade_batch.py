"""The coordinator's Prepare, Commit and Abort calls to one node, batched when they pile up.

A cross-shard trade costs the coordinator four unary calls, and in grpc.aio a unary call's
set-up, not our Python, is most of a trade's CPU (on both ends). Under load many trades
talk to the same node at once, so :class:`NodeBatcher` sends them together:

- while fewer than ``max_in_flight`` calls to the node are outstanding, a call goes out at
  once, as its own unary RPC when it is alone (no added latency at low load, and the call
  is traced and answered exactly as before);
- otherwise calls queue, and the next free slot sends everything queued (up to
  ``max_items``) as one ``ShardNode.TradeBatch``. The node handles the items as separate
  calls, concurrently, so their writes also share one group commit and one replication
  round there.

Built with ``stream_to`` (the node's address: the coordinator's default unless tracing is
on), calls travel on the node's ``ShardNode.Calls`` stream instead
(:mod:`bluemarble.client.node_calls`): a message on an open stream costs a fraction of a
unary call, calls made together share a message, and the node answers each as its own
call. The queue and TradeBatch path above is then only the fallback for a node that does
not serve Calls.

Each item keeps its own deadline (an item whose time ran out in the queue is not sent) and
its own outcome: an item's error is the status its own call would have ended with.
Nothing here changes what a call means: Prepare, Commit and Abort are idempotent by trade
id, so an item that is sent after its caller gave up (it timed out or was cancelled while
the batch was on its way) is as harmless as a unary call whose answer came too late.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import grpc.aio

from bluemarble.client.node_calls import CallStream, Unsupported
from bluemarble.core import errors
from bluemarble.v1 import shardnode_pb2, shardnode_pb2_grpc

T = TypeVar("T")

DEFAULT_MAX_IN_FLIGHT = 2
"""Calls (unary or batched) outstanding to one node before new ones queue."""
DEFAULT_MAX_ITEMS = 64
"""Items in one TradeBatch (the node accepts up to 256)."""


class ItemFailed(Exception):
    """A call's own failure, as a gRPC status code name and its details."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


@dataclass
class _Item:
    call: shardnode_pb2.TradeBatchItem
    deadline: float  # on the loop's clock
    future: asyncio.Future[shardnode_pb2.TradeBatchResult]


class NodeBatcher:
    """Prepare/Commit/Abort to one node; see the module docstring. One per node address."""

    def __init__(
        self,
        stub: Callable[[], shardnode_pb2_grpc.ShardNodeStub],
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_items: int = DEFAULT_MAX_ITEMS,
        stream_to: str = "",
    ):
        assert max_in_flight >= 1 and 1 <= max_items <= 256, (max_in_flight, max_items)
        self._stub = stub
        # With an address: calls travel on the node's ShardNode.Calls stream instead.
        self._stream_to = stream_to
        self._stream: CallStream | None = None
        self._stream_stub: shardnode_pb2_grpc.ShardNodeStub | None = None
        self._max_in_flight = max_in_flight
        self._max_items = max_items
        self._queue: collections.deque[_Item] = collections.deque()
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = 0  # RPCs sent (unary and batched), for tests and benchmarks
        self.batched_items = 0  # items that went in a TradeBatch
        self.streamed = 0  # calls answered on the node's Calls stream

    async def prepare(self, request: shardnode_pb2.PrepareRequest, timeout_s: float) -> shardnode_pb2.PrepareResponse:
        """Prepare's answer; raises :class:`ItemFailed` (its status) or TimeoutError."""
        result = await self._submit(shardnode_pb2.TradeBatchItem(prepare=request), timeout_s)
        return result.prepare

    async def commit(self, request: shardnode_pb2.CommitRequest, timeout_s: float) -> shardnode_pb2.CommitResponse:
        """Commit's answer; raises :class:`ItemFailed` (its status) or TimeoutError."""
        result = await self._submit(shardnode_pb2.TradeBatchItem(commit=request), timeout_s)
        return result.commit

    async def abort(self, request: shardnode_pb2.AbortRequest, timeout_s: float) -> shardnode_pb2.AbortResponse:
        """Abort's answer; raises :class:`ItemFailed` (its status) or TimeoutError."""
        result = await self._submit(shardnode_pb2.TradeBatchItem(abort=request), timeout_s)
        return result.abort

    async def close(self) -> None:
        """Waits for the calls on their way (their callers get their answers or errors)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._stream is not None:
            await self._stream.close()

    def _call_stream(self) -> CallStream | None:
        """The node's Calls stream (one on the current stub), or None: no stream wanted,
        or the node does not serve Calls."""
        if not self._stream_to:
            return None
        stub = self._stub()
        if self._stream is None or self._stream_stub is not stub:
            if self._stream is not None:  # the channel was replaced: its stream goes with it
                self._tasks.add(task := asyncio.ensure_future(self._stream.close()))
                task.add_done_callback(self._tasks.discard)
            self._stream, self._stream_stub = CallStream(stub, self._stream_to), stub
        return self._stream if self._stream.supported else None

    async def _submit(self, call: shardnode_pb2.TradeBatchItem, timeout_s: float) -> shardnode_pb2.TradeBatchResult:
        stream = self._call_stream()
        if stream is not None:
            kind = call.WhichOneof("call") or ""
            try:
                response = await stream.call(kind, getattr(call, kind), timeout_s)
            except Unsupported:
                pass  # a node of an older release: the unary and TradeBatch calls below
            except errors.DeadlineExceeded as e:
                raise TimeoutError() from e
            except errors.BlueMarbleError as e:
                raise ItemFailed(e.status, str(e)) from e
            else:
                self.streamed += 1
                result = shardnode_pb2.TradeBatchResult()
                getattr(result, kind).CopyFrom(response)
                return result
        loop = asyncio.get_running_loop()
        future: asyncio.Future[shardnode_pb2.TradeBatchResult] = loop.create_future()
        self._queue.append(_Item(call, loop.time() + timeout_s, future))
        if not self._scheduled:
            # Send at the end of this loop turn: calls made in the same turn travel together.
            self._scheduled = True
            loop.call_soon(self._pump)
        timer = loop.call_later(timeout_s, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _pump(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        while self._queue and self._in_flight < self._max_in_flight:
            now = loop.time()
            items: list[_Item] = []
            while self._queue and len(items) < self._max_items:
                item = self._queue.popleft()
                if item.future.done():  # its caller gave up: nothing to send
                    continue
                if item.deadline <= now:
                    item.future.set_exception(TimeoutError())
                    continue
                items.append(item)
            if not items:
                continue
            self._in_flight += 1
            self.calls += 1
            task = loop.create_task(self._send(items))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, items: list[_Item]) -> None:
        try:
            timeout_s = max(i.deadline for i in items) - asyncio.get_running_loop().time()
            if len(items) == 1:
                await self._send_one(items[0], timeout_s)
            else:
                await self._send_batch(items, timeout_s)
        finally:
            self._in_flight -= 1
            self._pump()

    async def _send_one(self, item: _Item, timeout_s: float) -> None:
        stub = self._stub()
        kind = item.call.WhichOneof("call")
        try:
            call = item.call
            if kind == "prepare":
                result = shardnode_pb2.TradeBatchResult(prepare=await stub.Prepare(call.prepare, timeout=timeout_s))
            elif kind == "commit":
                result = shardnode_pb2.TradeBatchResult(commit=await stub.Commit(call.commit, timeout=timeout_s))
            else:
                result = shardnode_pb2.TradeBatchResult(abort=await stub.Abort(call.abort, timeout=timeout_s))
        except grpc.aio.AioRpcError as e:
            _fail(item, ItemFailed(e.code().name, e.details() or ""))
            return
        except Exception as e:  # the caller gets it: no call is left without an answer
            _fail(item, e)
            return
        if not item.future.done():
            item.future.set_result(result)

    async def _send_batch(self, items: list[_Item], timeout_s: float) -> None:
        self.batched_items += len(items)
        request = shardnode_pb2.TradeBatchRequest(items=[i.call for i in items])
        try:
            response: shardnode_pb2.TradeBatchResponse = await self._stub().TradeBatch(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            code, details = e.code().name, e.details() or ""
            if code == grpc.StatusCode.UNIMPLEMENTED.name:
                # A node of an older release: send the items one by one instead.
                await asyncio.gather(*(self._send_one(i, timeout_s) for i in items))
                return
            for item in items:
                _fail(item, ItemFailed(code, details))
            return
        except Exception as e:  # every caller gets it
            for item in items:
                _fail(item, e)
            return
        if len(response.results) != len(items):
            error = ItemFailed("UNAVAILABLE", f"the node answered {len(response.results)} of {len(items)} batch items")
            for item in items:
                _fail(item, error)
            return
        for item, result in zip(items, response.results, strict=True):
            if result.WhichOneof("result") == "error":
                _fail(item, ItemFailed(result.error.code, result.error.message))
            elif not item.future.done():
                item.future.set_result(result)


def _fail(item: _Item, error: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(error)


def _expire(future: asyncio.Future[T]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
