"""Client library for the control plane, used by shard nodes, bluemarblectl and tests.

:class:`ControlPlaneClient` talks to any of several control-plane addresses (every
replica serves every RPC). A call that fails with UNAVAILABLE or DEADLINE_EXCEEDED moves
on to the next address and is retried under the one retry policy
(:func:`bluemarble.runtime.retry.call`: jittered backoff, bounded by the client's
``attempts`` and ``deadline_s``). Other statuses are raised at once as the matching
:class:`bluemarble.core.errors.BlueMarbleError`, so callers handle NotFound,
AlreadyExists, ... by type.

Every wait is on the injected :class:`~bluemarble.runtime.clock.Clock`: each attempt is
bounded by ``timeout_s`` on that clock as well as by the gRPC deadline sent to the
server, so a test with a fake clock and a fake stub sees the same timeouts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
import structlog

from bluemarble.core import errors, validation
from bluemarble.runtime import channels, retry, stalls
from bluemarble.runtime.channels import channel as open_channel
from bluemarble.runtime.channels import split_addresses
from bluemarble.runtime.clock import Clock, SystemClock, run_with_timeout
from bluemarble.v1 import controlplane_pb2_grpc, trade_pb2_grpc

log = structlog.get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_DEADLINE_S = 30.0
MIN_ATTEMPT_S = 0.05
"""The shortest attempt a call makes at the end of its deadline (shorter ones cannot be answered)."""

STREAM_PROGRESS_INTERVAL_MS = 1000
"""The ``progress_interval_ms`` the node agent and the ring router put in their
WatchAssignments / WatchRing requests: "send me a progress message whenever the stream
has been idle this long". Without it a stream carries changes only; with it, a client
can tell a quiet stream from a hung replica (see :func:`next_message`). They give up on a
stream after 3 s of silence."""


def to_error(e: grpc.aio.AioRpcError, address: str) -> errors.BlueMarbleError:
    """The BlueMarble error for a failed call (UNAVAILABLE names the address; a call the
    server ended to shut down is PeerStopping)."""
    error = status_to_error(e.code(), e.details() or "", address)
    if isinstance(error, errors.Unavailable) and channels.said_stopping(e.trailing_metadata()):
        return errors.PeerStopping(str(error))
    return error


def status_to_error(code: grpc.StatusCode, details: str, address: str) -> errors.BlueMarbleError:
    """The BlueMarble error for a call to the control plane at ``address`` that ended
    with ``code`` and ``details`` (a unary call's status, or a multiplexed call's result)."""
    details = channels.plain_details(details) or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"control plane {address} unavailable: {details}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and details in ("Deadline Exceeded", code.name):  # gRPC's words
        details = f"control plane {address} did not answer within the call's deadline"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        # The server's own words (a multiplexed call it ran out of time for): which server,
        # whichever side's deadline came first.
        details = f"{details} (at {address})"
    elif code == grpc.StatusCode.CANCELLED:
        # Not ours (our own cancellation raises CancelledError): the server ended the call,
        # as a stopping replica does with its streams. Another replica, or this one
        # restarted, answers the retry.
        return errors.Unavailable(f"control plane {address} ended the call (CANCELLED: {details}); retrying")
    elif code == grpc.StatusCode.UNIMPLEMENTED and "http2 header with status" in details:
        # An HTTP server that is not a gRPC one (a proxy or ingress without the route): to
        # the client this address is down, and the next one may answer.
        return errors.Unavailable(f"control plane {address} is not a gRPC server there: {details}")
    elif code == grpc.StatusCode.UNIMPLEMENTED and (
        details == "Method not found!" or details.startswith("unknown service ")  # gRPC's, and Go gRPC's, words
    ):
        # A gRPC server without this API: most often a shard node's address given as the
        # control plane's, or the wrong port (etcd's, say).
        return errors.FailedPrecondition(
            f"{address} does not serve the BlueMarble control-plane API (is it a shard node's address, or "
            "the wrong port?)"
        )
    return errors.from_status_name(code.name, details)


class StreamCall(Protocol):
    """What :func:`next_message` needs of a server-streaming call (grpc.aio's
    UnaryStreamCall, or a fake in tests)."""

    def read(self) -> Coroutine[Any, Any, object]: ...

    def cancel(self) -> bool: ...


async def next_message(
    call: StreamCall,
    message_type: type[R],
    *,
    address: str,
    clock: Clock,
    idle_timeout_s: float,
    what: str,
) -> R:
    """The next message (a ``message_type``) of a server stream from ``address``.

    Raises Unavailable when the stream ends, breaks with a status that says so, or
    delivers nothing for ``idle_timeout_s`` on ``clock`` (a hung or partitioned replica
    keeps its socket open and raises nothing by itself; a replica asked for progress
    messages (``progress_interval_ms``) sends one on an idle stream every interval, so
    silence for a few intervals means the replica is gone), and the mapped
    BlueMarbleError for any other status. The caller cancels the call after an error.
    """
    try:
        message = await run_with_timeout(clock, call.read(), idle_timeout_s)
    except TimeoutError as e:
        stalled_s = stalls.stalled_within(idle_timeout_s)
        if stalled_s:
            raise errors.SelfStalled(
                f"{what} stream from {address} delivered nothing for {idle_timeout_s:g} s, while this process itself "
                f"did not run for {stalled_s:.1f} s"
            ) from e
        raise errors.Unavailable(
            f"{what} stream from {address} delivered nothing for {idle_timeout_s:g} s "
            "(the replica may be hung)"
        ) from e
    except grpc.aio.AioRpcError as e:
        raise to_error(e, address) from e
    if not isinstance(message, message_type):  # grpc.aio.EOF: the server ended the stream
        raise errors.Unavailable(f"control plane {address} ended the {what} stream")
    return message


async def follow_stream(
    client: ControlPlaneClient,
    open_stream: Callable[[controlplane_pb2_grpc.ControlPlaneStub], StreamCall],
    message_type: type[R],
    on_message: Callable[[R], None],
    *,
    clock: Clock,
    idle_timeout_s: float,
    what: str,
) -> None:
    """Reads one server stream, opened on the client's current address, handing every
    message to ``on_message``, until it breaks. Raises what :func:`next_message` raises;
    after a retryable error the client has moved on to the next address (once, even when
    the heartbeat noticed the same replica first). The call is cancelled on the way out."""
    address = client.current_address
    call = open_stream(client.control_plane())
    try:
        while True:
            on_message(
                await next_message(
                    call, message_type, address=address, clock=clock, idle_timeout_s=idle_timeout_s, what=what
                )
            )
    except errors.BlueMarbleError as e:
        if e.retryable and not isinstance(e, errors.SelfStalled):  # not the replica's fault: reopen on it
            client.rotate(away_from=address)
        raise
    finally:
        call.cancel()


def _moves_on(error: BaseException) -> bool:
    """Errors after which another replica may answer: retried on the next address (a busy
    replica's too: :func:`~bluemarble.core.errors.is_overload`)."""
    return isinstance(error, errors.Unavailable | errors.DeadlineExceeded) or errors.is_overload(error)


ROTATION_LOG_INTERVAL_S = 10.0
"""At most one info line per this many seconds says the client moved from one replica to
another (the same two)."""


def _checked(addresses: Sequence[str] | str) -> list[str]:
    """The control-plane addresses, each a valid "host:port" (one string is split at its
    commas). InvalidArgument otherwise: gRPC would take "127.0.0.1" for port 443 of that
    host, and a list of none would wait forever for an answer."""
    if isinstance(addresses, str):  # "host:port[,host:port...]", not a sequence of characters
        addresses = split_addresses(addresses)
    if isinstance(addresses, bytes | bytearray) or not isinstance(addresses, Iterable):
        raise errors.InvalidArgument(f"the control-plane addresses are a {type(addresses).__name__}; give a str "
                                     "such as 127.0.0.1:7000, or a list of them")
    addresses = list(addresses)
    if not addresses:
        raise errors.InvalidArgument("no control-plane address given; give at least one host:port")
    for address in addresses:
        if not isinstance(address, str):
            raise errors.InvalidArgument(
                f"a control-plane address is a {type(address).__name__}; give a str such as 127.0.0.1:7000")
        validation.address(address, "control-plane address")
    return addresses


class ControlPlaneClient:
    """Calls to the control plane, failing over between its replicas.

    ``timeout_s`` bounds one attempt, ``attempts`` and ``deadline_s`` bound a whole
    :meth:`call` (whichever comes first). ``current_address`` is shared by every user of
    the client (calls, heartbeats, streams): whoever notices that a replica is down or
    hung moves everyone on with :meth:`rotate`. ``metadata`` goes with every
    :meth:`call` (e.g. ``bluemarble.runtime.auth.bearer_metadata(token)`` for admin RPCs).
    """

    def __init__(
        self,
        addresses: Sequence[str] | str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        attempts: int = 6,
        deadline_s: float | None = DEFAULT_DEADLINE_S,
        max_backoff_s: float = 2.0,
        clock: Clock | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ):
        self.addresses = _checked(addresses)
        self.timeout_s = timeout_s
        self.clock: Clock = clock or SystemClock()
        self._attempts = attempts
        self._deadline_s = deadline_s
        self._max_backoff_s = max_backoff_s
        self._metadata = tuple(metadata)
        # Opened on first use: a gRPC channel belongs to the event loop it was made in, and
        # a client may be built before the loop that uses it runs (a game server's __init__).
        self._channels: list[grpc.aio.Channel | None] = [None] * len(self.addresses)
        self._closed = False
        self._current = 0
        self._moves_logged = retry.LogThrottle(ROTATION_LOG_INTERVAL_S)  # by (from, to)

    @property
    def current_address(self) -> str:
        return self.addresses[self._current]

    def rotate(self, away_from: str | None = None) -> None:
        """Moves to the next address.

        With ``away_from``, only if the current address still is that one: two loops
        that notice the same hung replica move on once, not twice (which, with two
        replicas, would bring them back to the hung one).
        """
        if away_from is not None and self.current_address != away_from:
            return
        failed = self.current_address
        self._current = (self._current + 1) % len(self.addresses)
        if len(self.addresses) > 1:
            # Each move at most once per interval at info, debug in between: with every
            # replica down the client moves several times a second.
            quiet = self._moves_logged.allow((failed, self.current_address), self.clock.monotonic_s()) is None
            (log.debug if quiet else log.info)("moving to another control-plane replica", failed=failed,
                                                next=self.current_address)

    def control_plane(self) -> controlplane_pb2_grpc.ControlPlaneStub:
        return controlplane_pb2_grpc.ControlPlaneStub(self.channel())  # type: ignore[no-untyped-call]

    def trades(self) -> trade_pb2_grpc.TradeCoordinatorStub:
        return trade_pb2_grpc.TradeCoordinatorStub(self.channel())  # type: ignore[no-untyped-call]

    def channel(self) -> grpc.aio.Channel:
        """The current replica's channel: a new one when the one it had was built before
        the TLS files rotated (it would present the old certificate when it reconnects).
        The old one is dropped, not closed (see :func:`channels.outdated`): streams on it
        (heartbeats, watches) go on until they break and are reopened on the new one. A
        caller that keeps a stub keeps it with the channel it was built on, and builds a
        new one when this returns another channel."""
        if self._closed:
            raise errors.FailedPrecondition("the control-plane client is closed; make a new one")
        channel = self._channels[self._current]
        if channel is None or channels.outdated(channel):
            channel = self._channels[self._current] = open_channel(self.addresses[self._current])
        return channel

    async def call(
        self,
        rpc: Callable[[Any], Callable[..., Awaitable[T]]],
        request: Any,
        *,
        timeout_s: float | None = None,
        attempts: int | None = None,
        deadline_s: float | None = None,
    ) -> T:
        """Calls ``rpc(stub)(request)``, failing over between addresses on UNAVAILABLE
        and DEADLINE_EXCEEDED.

        ``rpc`` picks the method from a ControlPlaneStub, e.g. ``lambda s: s.ListNodes``.
        ``timeout_s`` bounds each attempt; ``attempts`` and ``deadline_s`` the whole call
        (defaults: the client's). Raises the mapped BlueMarbleError of the last attempt.
        """
        per_attempt_s = timeout_s or self.timeout_s
        whole_s = deadline_s if deadline_s is not None else self._deadline_s
        policy = retry.RetryPolicy(
            initial_s=min(0.1, self._max_backoff_s),
            max_backoff_s=self._max_backoff_s,
            deadline_s=whole_s,
            max_attempts=attempts or self._attempts,
        )
        end_s = None if whole_s is None else self.clock.monotonic_s() + whole_s
        answered: list[errors.BlueMarbleError] = []  # the last error a server's answer gave

        # An ``async def``, not a lambda returning a coroutine: tenacity awaits only what
        # it recognises as a coroutine function, and would hand the coroutine back.
        async def attempt() -> T:
            # The last attempt gets what is left of the deadline, not a whole attempt's time.
            left_s = per_attempt_s if end_s is None else end_s - self.clock.monotonic_s()
            try:
                return await self._once(rpc, request, max(MIN_ATTEMPT_S, min(per_attempt_s, left_s)))
            except errors.BlueMarbleError as e:
                if not isinstance(e.__cause__, TimeoutError):
                    answered[:] = [e]
                raise

        try:
            return await retry.call(
                attempt,
                what="control-plane call",
                policy=policy,
                clock=self.clock,
                retry_if=_moves_on,
            )
        except errors.DeadlineExceeded as e:
            # The last attempt ran out of time, but an earlier one was answered: its error
            # says why (e.g. "etcd unavailable"), which "did not answer" alone would hide.
            if isinstance(e.__cause__, TimeoutError) and answered:
                raise errors.DeadlineExceeded(f"{e}; before that, {answered[0]}") from e
            raise

    async def _once(
        self, rpc: Callable[[Any], Callable[..., Awaitable[T]]], request: Any, timeout_s: float
    ) -> T:
        address = self.current_address
        method = rpc(self.control_plane())

        async def attempt() -> T:
            if self._metadata:
                return await method(request, timeout=timeout_s, metadata=self._metadata)
            return await method(request, timeout=timeout_s)

        try:
            return await run_with_timeout(self.clock, attempt(), timeout_s)
        except grpc.aio.AioRpcError as e:
            error = to_error(e, address)
            if _moves_on(error):
                self.rotate(away_from=address)
            raise error from e
        except TimeoutError as e:
            self.rotate(away_from=address)
            raise errors.DeadlineExceeded(
                f"control plane {address} did not answer within {timeout_s:.3g} s"
            ) from e

    async def close(self) -> None:
        """Closes every channel; calls made after it raise FailedPrecondition. Idempotent."""
        self._closed = True
        for channel in self._channels:
            if channel is not None:
                await channel.close(None)
