"""The one exception root of BlueMarble, sorted into retryable and fatal.

Every error that crosses a module boundary is a :class:`BlueMarbleError`. Foreign errors
(etcd client, gRPC, SQLite) are wrapped once, at their adapter, with ``raise ... from``.
Each class carries the gRPC status it maps to, so one server interceptor
(:mod:`bluemarble.runtime.grpc_server`) turns them into statuses, and clients turn statuses back
into the same classes (:func:`from_status_name`). Messages are for people: they say what
was wrong and what to do about it.
"""

from __future__ import annotations

from typing import ClassVar


class BlueMarbleError(Exception):
    """Root of every BlueMarble error. ``status`` is a grpc.StatusCode name."""

    status: ClassVar[str] = "INTERNAL"
    retryable: ClassVar[bool] = False
    request_id: str | None = None
    """On a write whose outcome the caller does not know (the clients set it): the id to
    retry it with, so that it applies at most once."""


class RetryableError(BlueMarbleError):
    """The operation may succeed if tried again later (after a backoff)."""

    retryable = True


class FatalError(BlueMarbleError):
    """Trying again with the same input gives the same answer."""


class InvalidArgument(FatalError):
    status = "INVALID_ARGUMENT"


class NotFound(FatalError):
    status = "NOT_FOUND"


class AlreadyExists(FatalError):
    status = "ALREADY_EXISTS"


class FailedPrecondition(FatalError):
    status = "FAILED_PRECONDITION"


class Unimplemented(FatalError):
    status = "UNIMPLEMENTED"


class OutOfRange(FatalError):
    """A position (e.g. an etcd revision) beyond what exists yet."""

    status = "OUT_OF_RANGE"


class CorruptRecord(FatalError):
    """A stored value (an etcd record, a message) does not describe what its key implies."""

    status = "DATA_LOSS"


class Aborted(RetryableError):
    """A concurrent change won a race (e.g. a compare-and-swap failed); retry."""

    status = "ABORTED"


class Unavailable(RetryableError):
    """A dependency (etcd, a peer) cannot be reached right now."""

    status = "UNAVAILABLE"


class PeerStopping(Unavailable):
    """The server ended the call because it is shutting down (a restart, a rolling
    upgrade): expected, and another replica (or this one, back) answers the retry."""


class SelfStalled(Unavailable):
    """A timeout that overlapped a stall of this process itself (SIGSTOP, a frozen VM or
    container, CPU starvation): no evidence against the peer, which the retry may use
    again (:mod:`bluemarble.runtime.stalls`)."""


class DeadlineExceeded(RetryableError):
    status = "DEADLINE_EXCEEDED"


class ResourceExhausted(RetryableError):
    """A bounded resource of the server (e.g. its watch streams) is used up; retry later
    or on another replica."""

    status = "RESOURCE_EXHAUSTED"


def is_overload(error: BaseException) -> bool:
    """Whether ``error`` says the server was too busy to take the call (RESOURCE_EXHAUSTED
    for its limit of calls or streams at once): worth another attempt after a backoff.
    gRPC's own RESOURCE_EXHAUSTED for a message over the size limit is not: the same
    message would be refused again."""
    return isinstance(error, ResourceExhausted) and "larger than max" not in str(error)


class Unauthenticated(FatalError):
    """No credentials where some are required (an admin RPC without a bearer token)."""

    status = "UNAUTHENTICATED"


class PermissionDenied(FatalError):
    """Credentials that do not allow the call (a wrong token, a node acting for another)."""

    status = "PERMISSION_DENIED"


_BY_STATUS: dict[str, type[BlueMarbleError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unimplemented,
        OutOfRange,
        CorruptRecord,
        Aborted,
        Unavailable,
        DeadlineExceeded,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
    )
}


def from_status_name(status: str, message: str) -> BlueMarbleError:
    """The error class for a gRPC status name, as clients see it."""
    return _BY_STATUS.get(status, BlueMarbleError)(message)
