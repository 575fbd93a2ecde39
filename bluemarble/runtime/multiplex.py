"""The server side of many calls on one bidirectional stream (``ShardNode.Calls``,
``TradeCoordinator.ExecuteTrades``).

A unary gRPC call in Python costs both ends several times what a message on an open
stream does, so clients that make many calls send them on one stream, each with an id
and its own deadline. :func:`serve_calls` reads the stream's messages, runs each call as
its own task (as its unary RPC would run), and sends the results as they finish: results
finished in the same event-loop turn share a message.

The bounds: at most ``limits.MAX_NODE_CALLS_PER_MESSAGE`` calls in a message and one id
in flight once (INVALID_ARGUMENT ends the stream, after the calls taken before are
answered); at most ``limits.MAX_NODE_CALLS_IN_FLIGHT`` calls taken and not answered on the
wire, past which the stream is not read (flow control reaches the caller, and a caller
that stops reading results cannot pile them up here); at most
``limits.MAX_NODE_CALLS_MESSAGE_BYTES`` of results in one message beyond its first.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import structlog

from bluemarble.api.messages import by_size
from bluemarble.core import limits
from bluemarble.core.errors import BlueMarbleError, InvalidArgument
from bluemarble.runtime import metrics
from bluemarble.runtime.grpc_server import short_message

log = structlog.get_logger(__name__)

MAX_CALL_WORK_S = 30.0
"""The longest a call's own work may run, whatever its deadline (the node's unary calls'
bound too)."""


async def serve_calls(
    requests: AsyncIterator[Any],
    *,
    calls_of: Callable[[Any], Sequence[Any]],
    run: Callable[[Any], Awaitable[Any]],
    results: Callable[[list[Any]], Any],
    closing: asyncio.Event | None = None,
    what: str,
) -> AsyncIterator[Any]:
    """The result messages of the call messages ``requests``. ``calls_of(message)``: its
    calls (each with a ``call_id``); ``run(call)``: the call's result (with the same
    ``call_id``; it must not raise: a call's error is its result); ``results(list)``: a
    message of results. Once ``closing`` (if given) is set, calls read from then on are
    not taken; the calls taken are answered, then the iteration ends (the caller ends the
    stream).
    ``what`` names the stream's messages in errors ("a Calls message").

    Raises InvalidArgument, after answering the calls taken before it, for a message
    with too many calls or an id already in flight."""
    loop = asyncio.get_running_loop()
    ready: list[Any] = []
    wake = asyncio.Event()
    slots = asyncio.Semaphore(limits.MAX_NODE_CALLS_IN_FLIGHT)
    tasks: set[asyncio.Task[None]] = set()
    in_flight: set[int] = set()  # call ids taken and not answered yet
    reading = True
    failure: BaseException | None = None

    def finished(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        wake.set()

    async def one(call: Any) -> None:
        result = await run(call)
        in_flight.discard(call.call_id)
        ready.append(result)
        wake.set()

    async def read() -> None:
        nonlocal reading, failure
        try:
            async for message in requests:
                if closing is not None and closing.is_set():
                    break  # calls read from now on are not taken
                calls = calls_of(message)
                if len(calls) > limits.MAX_NODE_CALLS_PER_MESSAGE:
                    raise InvalidArgument(
                        f"{what} carries {len(calls)} calls; send at most {limits.MAX_NODE_CALLS_PER_MESSAGE} per "
                        "message"
                    )
                ids: set[int] = set()
                for call in calls:
                    if call.call_id in in_flight or call.call_id in ids:
                        where = "appears twice in this message" if call.call_id in ids else (
                            "is already in flight on this stream")
                        raise InvalidArgument(
                            f"call_id {call.call_id} {where}; give every call its own id (results are matched "
                            "to calls by it)"
                        )
                    ids.add(call.call_id)
                for call in calls:
                    await slots.acquire()
                    in_flight.add(call.call_id)
                    task = loop.create_task(one(call))
                    tasks.add(task)
                    task.add_done_callback(finished)
        except Exception as e:  # ends the stream with its status, after the answers
            failure = e
        finally:
            reading = False
            wake.set()

    reader = loop.create_task(read())
    closer = loop.create_task(closing.wait()) if closing is not None else None

    def stop_reading(_: asyncio.Task[bool]) -> None:
        reader.cancel()
        wake.set()

    if closer is not None:
        closer.add_done_callback(stop_reading)
    try:
        while reading or tasks or ready:
            await wake.wait()
            wake.clear()
            if ready:
                batch = ready[:]
                ready.clear()
                for part in by_size(batch, len(batch), limits.MAX_NODE_CALLS_MESSAGE_BYTES):
                    yield results(part)
                    for _ in part:
                        slots.release()
        if failure is not None:  # after the answers of the calls taken before it
            raise failure
    finally:
        if closer is not None:
            closer.cancel()
        reader.cancel()
        for task in list(tasks):
            task.cancel()


async def answer_call(
    call: Any,
    result: Any,
    *,
    service: str,
    rpcs: Mapping[str, str],
    handle: Callable[[str, Any, float], Awaitable[Any]],
    guard: Callable[[str, str], None] | None = None,
    server: str = "server",
) -> Any:
    """Fills ``result`` (an empty result message with the call's id) with the answer to
    ``call``, as the call's own unary RPC would answer: the response, or the status that
    RPC would have ended with (``result.error``). ``rpcs`` maps each kind of call (the
    ``call`` oneof field) to its RPC's name in ``service`` (for metrics and messages);
    ``handle(kind, request, timeout_s)`` answers it within ``timeout_s`` (a little under
    the call's deadline); ``guard(kind, method)`` may refuse it by raising. ``server``
    names where an unexpected error's id is logged. Returns ``result``."""
    kind = call.WhichOneof("call")
    method = rpcs.get(kind or "", "a multiplexed call")
    started = time.monotonic()
    deadline_s = (call.timeout_ms or limits.DEFAULT_NODE_CALL_TIMEOUT_MS) / 1000
    timeout_s = max(0.01, min(MAX_CALL_WORK_S, deadline_s - 0.05))
    structlog.contextvars.bind_contextvars(rpc=method)
    code = "OK"
    try:
        async with asyncio.timeout(min(MAX_CALL_WORK_S, deadline_s)):
            if kind is None:
                raise InvalidArgument(f"call {call.call_id} carries no request; set one of {', '.join(sorted(rpcs))}")
            if call.timeout_ms > limits.MAX_NODE_CALL_TIMEOUT_MS:
                raise InvalidArgument(
                    f"call {call.call_id} has timeout_ms {call.timeout_ms}; use 1 to "
                    f"{limits.MAX_NODE_CALL_TIMEOUT_MS} (0: {limits.DEFAULT_NODE_CALL_TIMEOUT_MS})"
                )
            if guard is not None:
                guard(kind, method)
            response = await handle(kind, getattr(call, kind), timeout_s)
        field = getattr(result, kind)
        field.SetInParent()  # present even when the response is all defaults
        field.CopyFrom(response)
    except TimeoutError:
        code = "DEADLINE_EXCEEDED"
        result.error.code = code
        result.error.message = f"{method} did not finish within its deadline of {deadline_s * 1000:.0f} ms"
    except Exception as e:  # the status the call's own RPC would have ended with
        code, message = error_of(e, method, server)
        result.error.code = code
        result.error.message = message
    metrics.observe_rpc(f"/{service}/{method}", code, time.monotonic() - started)
    return result


def error_of(e: Exception, what: str, server: str = "server") -> tuple[str, str]:
    """The status (code name, message) a call that raised ``e`` ends with. Anything but a
    BlueMarbleError is a bug: logged with an id, answered INTERNAL with that id."""
    if isinstance(e, BlueMarbleError):
        return e.status, short_message(str(e))
    error_id = uuid.uuid4().hex[:12]
    log.exception("call crashed", error_id=error_id, call=what)
    return "INTERNAL", f"internal error in {what} (error id {error_id}); see the {server} log"
