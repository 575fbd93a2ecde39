"""The one place that builds gRPC client channels.

Every channel gets the same options: message size limits, keepalive pings to notice
dead peers, and no transparent retries beyond gRPC's own (retries are explicit, with
tenacity, in the callers that know what is idempotent).

Keepalive is the second line of defence against a hung peer (a process stopped with
SIGSTOP keeps its sockets open, so nothing fails by itself): a ping unanswered for
``KEEPALIVE_TIMEOUT_MS`` after ``KEEPALIVE_TIME_MS`` closes the connection and fails every
call on it with UNAVAILABLE, so a hung peer is noticed within about 9 s even by a call
that has no deadline. The first line is the callers' own, tighter bounds: heartbeat
timeouts and the idle bound on watch streams (see ``shardnode.agent`` and
``bluemarble.client.ring_router``). Servers (``grpc_server.SERVER_OPTIONS``) accept a ping
every 5 s without data; pinging more often would get the connection closed with
ENHANCE_YOUR_CALM, hence 6 s here.

TLS: when the process is configured for it (:mod:`bluemarble.runtime.tls`, from the
``--tls-*`` flags), :func:`channel` opens a TLS channel that verifies the server with the
CA and presents this process's certificate; the files are read as they are when the
channel is built. A channel keeps that certificate for its later reconnects (gRPC Python
cannot swap a channel's credentials), so code that keeps channels asks :func:`outdated`
before reusing one, and swaps one built before a rotation for a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Sequence
from typing import Any

import grpc.aio

from bluemarble.api.messages import SHUTTING_DOWN_KEY
from bluemarble.core import validation
from bluemarble.core.errors import InvalidArgument
from bluemarble.core.limits import MAX_MESSAGE_BYTES
from bluemarble.runtime import tls, tracing

KEEPALIVE_TIME_MS = 6_000
KEEPALIVE_TIMEOUT_MS = 3_000

CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    # Keep pinging a connection whose only stream is quiet (by default the client stops
    # after 2 pings without data, and a hung peer would go unnoticed again).
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly after a peer restarts (defaults back off up to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.min_reconnect_backoff_ms", 200),
)


def channel(address: str) -> grpc.aio.Channel:
    """A channel to one "host:port" address, as this process is configured to reach its
    peers: TLS (and a client certificate) when :func:`bluemarble.runtime.tls.configure` set
    it up, plaintext otherwise; with the tracing interceptors when tracing is on."""
    config = tls.current()
    if config is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=tracing.client_interceptors())
    # The generation first: a reload in between (a server handshake on another thread)
    # then leaves this channel stamped older than its files, and it is rebuilt once more;
    # the other order could stamp it newer than what it presents, and never rebuild it.
    generation = config.generation
    built = grpc.aio.secure_channel(
        address, config.channel_credentials(), options=CHANNEL_OPTIONS, interceptors=tracing.client_interceptors()
    )
    _generation_of[built] = generation
    return built


_generation_of: weakref.WeakKeyDictionary[grpc.aio.Channel, int] = weakref.WeakKeyDictionary()
"""The TLS generation each TLS channel was built in."""


def outdated(built: grpc.aio.Channel) -> bool:
    """Whether the TLS files were reloaded since :func:`channel` built ``built`` (looked
    at every :data:`~bluemarble.runtime.tls.RECHECK_S` at most). Such a channel still
    works, but would present the old certificate on its next reconnect: build a new one
    for new calls and drop this one.

    Dropped, not closed: closing a channel cancels the streams on it, and a task reading
    one then gets CancelledError, as if it were being cancelled itself. Once the last
    reference is dropped, gRPC destroys the channel when the calls on it have ended; a
    stream on it goes on until it breaks, and its owner reopens it on the new channel.
    False for plaintext channels."""
    generation = _generation_of.get(built)
    config = tls.current()
    return generation is not None and config is not None and config.current_generation() != generation


def peer_host(peer: str) -> str:
    """A peer's host without its port: "ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7" (a client's
    port changes with each connection; counts and log throttles go by host)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") > 1 else peer


def plain_details(text: str) -> str:
    """gRPC's details with its core's connection wording made plain: "last error:
    UNKNOWN: ipv4:...: Connection refused" names no status of any call (it is how the core
    prints a socket error), and a scanner of statuses or logs takes it for one."""
    return text.replace("last error: UNKNOWN: ", "last error: ") if "UNKNOWN: " in text else text


CORE_BREAK = "Internal error from Core"
"""The details gRPC gives a call whose connection broke under a write (INTERNAL, though
nothing failed inside either program): grpc/grpc#36066."""


async def ended_status(call: Any, error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status a stream ``call`` ended with, after ``error`` was raised by a read or a
    write on it. The call's own status comes first: a write to a stream the server has
    already ended raises a local error (``asyncio.InvalidStateError``, or INTERNAL "Internal
    error from Core" when the write races that end: grpc/grpc#36066) that says nothing of
    why it ended."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            code = await call.code()
        if code is not None and code != grpc.StatusCode.OK:
            details = await call.details() or code.name
            if code == grpc.StatusCode.INTERNAL and CORE_BREAK in details:
                # gRPC's own word for a connection that broke under the call (the peer
                # stopped or died mid-write), not an error of the server's code.
                return grpc.StatusCode.UNAVAILABLE, f"the connection broke ({details})"
            return code, plain_details(details)
    if isinstance(error, grpc.aio.AioRpcError) and error.code() != grpc.StatusCode.INTERNAL:
        return error.code(), plain_details(error.details() or error.code().name)
    return grpc.StatusCode.UNAVAILABLE, f"the stream failed ({type(error).__name__})"


def said_stopping(metadata: Any) -> bool:
    """Whether a call's trailing metadata says its server ended it to shut down."""
    return any(key == SHUTTING_DOWN_KEY for key, _ in metadata or ())


async def ended_stopping(call: Any) -> bool:
    """Whether a stream ``call``, already ended, was ended by its server shutting down
    (waits at most 1 s for the call's trailers)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            return said_stopping(await call.trailing_metadata())
    return False


def insecure_channel(address: str) -> grpc.aio.Channel:
    """A plaintext channel to one "host:port" address, for tools and benchmarks."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def split_addresses(value: str) -> list[str]:
    """Splits a comma-separated address list ("a:1,b:2"), dropping blanks."""
    return [part.strip() for part in value.split(",") if part.strip()]


def checked_addresses(value: str, flag: str) -> list[str]:
    """:func:`split_addresses` of a flag's value, each a valid host:port; raises
    InvalidArgument naming ``flag`` for none or a malformed one (a port above 65535 would
    otherwise wrap to another port in gRPC, and "no address" retry forever)."""
    addresses = split_addresses(value)
    if not addresses:
        raise InvalidArgument(f"{flag} names no address; give at least one host:port (comma-separated)")
    for address in addresses:
        validation.address(address, flag)
    return addresses
