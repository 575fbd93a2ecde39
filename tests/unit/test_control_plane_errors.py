"""How a failed control-plane call reads to its caller (bluemarble.client.control_plane.to_error)."""

from __future__ import annotations

import grpc
import grpc.aio

from bluemarble.client.control_plane import to_error
from bluemarble.core import errors


def failed(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_a_call_the_server_cancelled_is_retried_elsewhere_not_an_error() -> None:
    """A stopping control-plane replica ends its streams; a node's watch that sees
    CANCELLED should retry quietly (it logged an error line at every planned restart)."""
    error = to_error(failed(grpc.StatusCode.CANCELLED, "Cancelled"), "127.0.0.1:7000")
    assert isinstance(error, errors.Unavailable) and error.retryable
    assert "127.0.0.1:7000" in str(error)


def test_other_statuses_keep_their_meaning() -> None:
    assert isinstance(to_error(failed(grpc.StatusCode.UNAVAILABLE, "down"), "a:1"), errors.Unavailable)
    assert isinstance(to_error(failed(grpc.StatusCode.NOT_FOUND, "no lease"), "a:1"), errors.NotFound)
    deadline = to_error(failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), "a:1")
    assert isinstance(deadline, errors.DeadlineExceeded) and "a:1" in str(deadline)


def test_a_grpc_server_without_the_api_is_named_as_such() -> None:
    """A shard node's address given as the control plane's: gRPC's "Method not found!"
    says nothing a person can act on."""
    error = to_error(failed(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"), "127.0.0.1:7101")
    assert isinstance(error, errors.FailedPrecondition)
    assert "127.0.0.1:7101 does not serve the BlueMarble control-plane API" in str(error)
    assert "shard node" in str(error)
