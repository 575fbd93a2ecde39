"""How a failed control-plane call reads to its caller (bluemarble.client.control_plane.to_error)."""

from __future__ import annotations

import grpc
import grpc.aio

from bluemarble.client.control_plane import status_to_error, to_error
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
    # The server's own words (a multiplexed call it ran out of time for) name it too.
    served = status_to_error(grpc.StatusCode.DEADLINE_EXCEEDED, "ExecuteTrade did not finish within 180 ms", "a:1")
    assert isinstance(served, errors.DeadlineExceeded) and str(served).endswith("180 ms (at a:1)"), served


def test_a_grpc_server_without_the_api_is_named_as_such() -> None:
    """A shard node's address given as the control plane's: gRPC's "Method not found!"
    says nothing a person can act on."""
    error = to_error(failed(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"), "127.0.0.1:7101")
    assert isinstance(error, errors.FailedPrecondition)
    assert "127.0.0.1:7101 does not serve the BlueMarble control-plane API" in str(error)
    assert "shard node" in str(error)
    # etcd's port (a Go gRPC server) words it its own way.
    etcd = to_error(failed(grpc.StatusCode.UNIMPLEMENTED, "unknown service bluemarble.v1.ControlPlane"), "a:2379")
    assert isinstance(etcd, errors.FailedPrecondition) and "wrong port" in str(etcd)


async def test_a_calls_deadline_bounds_its_last_attempt_too() -> None:
    """Against a replica that takes calls and never answers them: a call with 5 s
    attempts and a 1 s deadline gives up after about 1 s, not after a whole attempt."""
    import asyncio
    import time

    from bluemarble.client.control_plane import ControlPlaneClient
    from bluemarble.v1 import controlplane_pb2

    async def hang(request: bytes, context: object) -> bytes:
        await asyncio.sleep(60)
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bluemarble.v1.ControlPlane", {"ListNodes": grpc.unary_unary_rpc_method_handler(hang)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = ControlPlaneClient([f"127.0.0.1:{port}"], timeout_s=5.0, attempts=3, deadline_s=1.0)
    started = time.monotonic()
    try:
        try:
            await client.call(lambda s: s.ListNodes, controlplane_pb2.ListNodesRequest())
        except (errors.DeadlineExceeded, errors.Unavailable) as e:
            assert e.retryable
        else:
            raise AssertionError("a silent replica answered")
    finally:
        await client.close()
        await server.stop(0)
    assert time.monotonic() - started < 3.0


async def test_a_call_that_runs_out_of_time_keeps_the_reason_an_earlier_answer_gave() -> None:
    """Two replicas: one answers UNAVAILABLE with its reason (its etcd is down), the other
    takes calls and never answers. The call ends on the silent one's timeout, and its
    error still says what the answering one said."""
    import asyncio

    from bluemarble.client.control_plane import ControlPlaneClient
    from bluemarble.v1 import controlplane_pb2

    async def hang(request: bytes, context: object) -> bytes:
        await asyncio.sleep(60)
        return b""

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
        await context.abort(grpc.StatusCode.UNAVAILABLE, "etcd unavailable (127.0.0.1:2379) during list nodes")
        return b""

    servers, addresses = [], []
    for handler in (refuse, hang):
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "bluemarble.v1.ControlPlane", {"ListNodes": grpc.unary_unary_rpc_method_handler(handler)})])
        addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        await server.start()
        servers.append(server)
    client = ControlPlaneClient(addresses, timeout_s=5.0, attempts=10, deadline_s=1.0)
    try:
        try:
            await client.call(lambda s: s.ListNodes, controlplane_pb2.ListNodesRequest())
        except errors.DeadlineExceeded as e:
            assert f"control plane {addresses[1]} did not answer within" in str(e), e
            assert f"before that, control plane {addresses[0]} unavailable: etcd unavailable" in str(e), e
        else:
            raise AssertionError("no replica answered, yet the call succeeded")
    finally:
        await client.close()
        for server in servers:
            await server.stop(0)
