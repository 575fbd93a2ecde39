"""Calls to one server multiplexed on one stream: player calls to a shard node
(``ShardNode.Calls``) and trades to a control-plane replica
(``TradeCoordinator.ExecuteTrades``, with :data:`TRADE_CALLS`).

A unary gRPC call in Python costs the caller and the server several times what one message
on an open stream does (a new HTTP/2 stream, headers and trailers both ways, a call object
on each side). A game server sends a node thousands of grants, reads and same-shard trades
a second, so :class:`CallStream` keeps one stream per node open and sends each call as a
:class:`~bluemarble.v1.shardnode_pb2.NodeCall` with an id and its own deadline. Calls made
in the same event-loop turn share a message; so do the results the server finishes together.

Each call behaves as its unary RPC would: the same answer, the same status (as the mapped
:class:`~bluemarble.core.errors.BlueMarbleError`), its own deadline. When the stream
breaks (the node died, restarted or was partitioned away), every call on it fails
UNAVAILABLE, as a unary call in flight would, and the next call opens a new stream. A
server that does not serve the stream (UNIMPLEMENTED: an older release) gets unary calls
from then on.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import structlog

from bluemarble.api.messages import by_size
from bluemarble.client.control_plane import status_to_error
from bluemarble.core import errors, limits
from bluemarble.core.limits import echo
from bluemarble.runtime import channels, frames
from bluemarble.v1 import shardnode_pb2, shardnode_pb2_grpc, trade_pb2

log = structlog.get_logger(__name__)

MAX_CALLS_PER_MESSAGE = 64
"""Calls the client puts in one message (the node takes up to 256)."""


def status_error(code: str, details: str, address: str) -> errors.BlueMarbleError:
    """The BlueMarble error for a call to the node at ``address`` that ended with the
    status ``code`` (a grpc.StatusCode name)."""
    details = channels.plain_details(details)
    if code == "UNAVAILABLE":
        return errors.Unavailable(f"node {address} unavailable: {details}")
    if code == "DEADLINE_EXCEEDED":
        return errors.DeadlineExceeded(f"node {address} did not answer in time")
    if code == "CANCELLED":
        # Our side cancelled it: the channel closed because no assignment names the
        # node any more. Another node serves the shard now.
        return errors.Unavailable(f"call to node {address} cancelled (the node left the assignments)")
    return errors.from_status_name(code, details)


class Unsupported(Exception):
    """The server does not serve the stream (an older release): use unary calls."""


@dataclass(frozen=True)
class StreamSpec:
    """What differs between the multiplexed streams: how to open one on a stub, its
    messages, and how its errors read."""

    name: str  # "ShardNode.Calls"
    server: str  # "node", in messages: "node 127.0.0.1:7001 unavailable ..."
    open: Callable[[Any], Any]  # stub -> the bidi call
    call_type: Any  # NodeCall
    message_type: Any  # NodeCalls
    error_of: Callable[[str, str, str], errors.BlueMarbleError]  # (code name, details, address)
    closed: str  # why a call on a closed stream fails
    framed: str = ""  # the method's path when a framed port may carry it (bluemarble.runtime.frames)
    result_type: Any = None  # NodeResults: what a framed stream's messages parse as


def control_plane_error(code: str, details: str, address: str) -> errors.BlueMarbleError:
    """The BlueMarble error for a multiplexed call to the control plane at ``address``
    that ended with the status ``code`` (a grpc.StatusCode name), as a unary call's."""
    return status_to_error(grpc.StatusCode.__members__.get(code, grpc.StatusCode.UNKNOWN), details, address)


NODE_CALLS = StreamSpec(
    name="ShardNode.Calls", server="node", open=lambda stub: stub.Calls(), call_type=shardnode_pb2.NodeCall,
    message_type=shardnode_pb2.NodeCalls, error_of=status_error, closed="cancelled (the node left the assignments)",
    framed="/bluemarble.v1.ShardNode/Calls", result_type=shardnode_pb2.NodeResults,
)
TRADE_CALLS = StreamSpec(
    name="TradeCoordinator.ExecuteTrades", server="control plane", open=lambda stub: stub.ExecuteTrades(),
    call_type=trade_pb2.TradeCall, message_type=trade_pb2.TradeCalls, error_of=control_plane_error,
    closed="cancelled (the client was closed)", framed="/bluemarble.v1.TradeCoordinator/ExecuteTrades",
    result_type=trade_pb2.TradeResults,
)


CLOSE_RECANCEL_S = 0.1
"""How often :meth:`CallStream.close` cancels a stream's task that has not ended."""


class CallStream:
    """One server's multiplexed stream (a node's ``ShardNode.Calls`` unless ``spec`` says
    otherwise), opened on the first call and again after it breaks. :meth:`call` is safe
    to use from many tasks at once."""

    def __init__(self, stub: shardnode_pb2_grpc.ShardNodeStub | Any, address: str, spec: StreamSpec = NODE_CALLS):
        self._stub = stub
        self._address = address
        self._spec = spec
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[shardnode_pb2.NodeResult]] = {}
        self._outbox: list[shardnode_pb2.NodeCall] = []
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self.supported = True
        self.streams_opened = 0

    async def call(self, kind: str, request: Any, timeout_s: float) -> Any:
        """``request`` sent as the call field ``kind`` ("grant_items", ...); returns that
        field of the result, or raises the call's mapped error. Raises
        :class:`Unsupported` when the server does not serve the stream."""
        if self._closed:
            raise errors.Unavailable(f"call to {self._spec.server} {self._address} {self._spec.closed}")
        if not self.supported:
            raise Unsupported()
        loop = asyncio.get_running_loop()
        call_id = next(self._ids)
        future: asyncio.Future[shardnode_pb2.NodeResult] = loop.create_future()
        self._pending[call_id] = future
        timeout_ms = max(1, min(limits.MAX_NODE_CALL_TIMEOUT_MS, int(timeout_s * 1000)))
        call = self._spec.call_type(call_id=call_id, timeout_ms=timeout_ms)
        getattr(call, kind).CopyFrom(request)
        self._outbox.append(call)
        self._wake.set()
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run())
        timer = loop.call_later(timeout_s, _expire, future)
        try:
            result = await future
        except TimeoutError:
            raise self._spec.error_of("DEADLINE_EXCEEDED", "", self._address) from None
        finally:
            timer.cancel()
            self._pending.pop(call_id, None)
        if result.WhichOneof("result") == "error":
            raise self._spec.error_of(result.error.code, result.error.message, self._address)
        return getattr(result, kind)

    async def _run(self) -> None:
        """Opens the stream, sends the outbox as it fills and hands results to their
        callers, until the stream breaks or nothing is pending."""
        self.streams_opened += 1
        reader: asyncio.Future[None] | None = None
        error: errors.BlueMarbleError | None = None
        stream = await self._open()
        try:
            if self._closed:  # closed while it opened
                raise asyncio.CancelledError
            # The server answers a new stream with its initial metadata at once. Waiting
            # for it tells a server that ends the stream (UNIMPLEMENTED: an older release)
            # from one that serves it, before a write could race with that ending.
            await stream.initial_metadata()
            if stream.done():
                await stream.wait_for_connection()  # raises the status the stream ended with
            reader = asyncio.ensure_future(self._read(stream))
            reader.add_done_callback(_retrieve)  # its error is the stream's status, read below
            while not reader.done():
                if not self._outbox:
                    self._wake.clear()
                    waiter = asyncio.ensure_future(self._wake.wait())
                    try:
                        await asyncio.wait((waiter, reader), return_when=asyncio.FIRST_COMPLETED)
                    finally:  # also when the stream is closed meanwhile: a waiter left pending leaks
                        waiter.cancel()
                    continue
                batch = next(by_size(self._outbox, MAX_CALLS_PER_MESSAGE, limits.MAX_NODE_CALLS_MESSAGE_BYTES))
                del self._outbox[: len(batch)]
                await stream.write(self._spec.message_type(calls=batch))
            await reader
        except asyncio.CancelledError:
            error = errors.Unavailable(f"call to {self._spec.server} {self._address} {self._spec.closed}")
            raise
        except Exception as e:  # the stream's status, or a write to a stream that had ended
            code, details = await channels.ended_status(stream, e)
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self.supported = False
                log.info(f"{self._spec.server} does not serve {self._spec.name}: unary calls from now on",
                         address=self._address)
            if code in _STREAM_STATUSES_KEPT:
                error = self._spec.error_of(code.name, details, self._address)
            else:
                # The stream broke under its calls: what a unary call in flight meets as
                # UNAVAILABLE when its server dies. (grpc.aio reports some of those breaks as
                # INTERNAL "Internal error from Core".) The calls are idempotent: retry them.
                error = self._spec.error_of(
                    "UNAVAILABLE", f"the stream broke ({code.name}: {echo(details, 120)})", self._address)
        finally:
            if reader is not None:
                reader.cancel()
            stream.cancel()
            self._fail_all(error or self._spec.error_of("UNAVAILABLE", "the stream ended", self._address))

    async def _open(self) -> Any:
        """A new stream: on the node's framed port when it offers one, else gRPC."""
        spec = self._spec
        if not spec.framed:
            return spec.open(self._stub)
        try:
            return await frames.open_stream(self._address, spec.framed, spec.result_type.FromString,
                                            lambda: spec.open(self._stub))
        except asyncio.CancelledError:
            self._fail_all(errors.Unavailable(f"call to {spec.server} {self._address} {spec.closed}"))
            raise

    async def _read(self, stream: Any) -> None:
        """Hands each result to its caller; ends with the stream (raising its status)."""
        async for message in stream:
            for result in message.results:
                future = self._pending.get(result.call_id)
                if future is not None and not future.done():
                    future.set_result(result)

    def _fail_all(self, error: errors.BlueMarbleError | Unsupported) -> None:
        """Fails every call sent or waiting: the stream they were on is gone."""
        self._outbox.clear()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(Unsupported() if not self.supported else error)

    async def close(self) -> None:
        """Ends the stream; calls waiting on it fail with Unavailable. Returns once the
        stream's task has ended: it is cancelled again should a cancellation be lost (one
        that lands as an awaited call completes, in libraries that swallow it)."""
        self._closed = True
        runner, self._runner = self._runner, None
        while runner is not None and not runner.done():
            runner.cancel()
            await asyncio.wait((runner,), timeout=CLOSE_RECANCEL_S)
        if runner is not None and not runner.cancelled():
            runner.exception()  # retrieved: its error went to the calls


_STREAM_STATUSES_KEPT = frozenset({
    grpc.StatusCode.UNIMPLEMENTED,  # a node of an older release: the calls go unary
    grpc.StatusCode.INVALID_ARGUMENT,  # a message the node refused (a bug on this side)
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
})
"""Stream statuses its calls fail with as they are; any other means the stream broke."""


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
