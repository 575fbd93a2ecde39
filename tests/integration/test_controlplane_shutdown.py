"""A stopping control-plane replica ends its watches and heartbeat streams at once, with
UNAVAILABLE and a reason, so their clients move to another replica instead of waiting
out the shutdown grace period (which only calls with work in flight need)."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio

from bluemarble.client.control_plane import to_error
from bluemarble.core.errors import PeerStopping
from bluemarble.runtime import channels
from bluemarble.v1 import controlplane_pb2 as pb
from bluemarble.v1 import controlplane_pb2_grpc, trade_pb2, trade_pb2_grpc
from tests.conftest import StartControlPlane

GRACE_S = 20.0


async def test_stopping_ends_open_streams_without_waiting_out_the_grace(
    start_control_plane: StartControlPlane,
) -> None:
    app = await start_control_plane(shutdown_grace_s=GRACE_S)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        registered = await stub.RegisterNode(pb.RegisterNodeRequest(node_id="n1", address="127.0.0.1:7101", zone="z1"))
        assignments = stub.WatchAssignments(pb.WatchAssignmentsRequest(node_id="n1", progress_interval_ms=500))
        ring = stub.WatchRing(pb.WatchRingRequest(progress_interval_ms=500))
        beats = stub.HeartbeatStream()
        await beats.write(pb.HeartbeatRequest(node_id="n1", lease_id=registered.lease_id))
        trades = trade_pb2_grpc.TradeCoordinatorStub(channel).ExecuteTrades()  # type: ignore[no-untyped-call]
        await trades.write(trade_pb2.TradeCalls(calls=[trade_pb2.TradeCall(call_id=1)]))  # answered: no request
        for call in (assignments, ring, beats, trades):
            await asyncio.wait_for(call.read(), 10)  # each stream is open and answering

        started = time.monotonic()
        await app.stop()
        took_s = time.monotonic() - started

        for name, call in (("WatchAssignments", assignments), ("WatchRing", ring), ("HeartbeatStream", beats),
                           ("ExecuteTrades", trades)):
            code = await asyncio.wait_for(call.code(), 5)
            details = await call.details()
            assert code == grpc.StatusCode.UNAVAILABLE, (name, code, details)
            assert "shutting down" in details and app.replica_id in details, (name, details)
            # The trailer tells clients the end is expected: they log it at info, not warn.
            assert channels.said_stopping(await call.trailing_metadata()), name
        # The open streams held the stop for the whole grace period before.
        assert took_s < GRACE_S / 2, took_s



async def test_once_streams_are_ended_new_ones_are_refused_and_calls_still_served(
    start_control_plane: StartControlPlane,
) -> None:
    app = await start_control_plane()
    assert app.server is not None
    await app.server.end_streams("replica going away; reconnect to another replica")
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        late = stub.WatchRing(pb.WatchRingRequest())
        try:
            await asyncio.wait_for(late.read(), 5)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            assert e.details() == "replica going away; reconnect to another replica"
            assert isinstance(to_error(e, app.address), PeerStopping)
        else:
            raise AssertionError("a stream opened after the streams were ended was served")
        # Unary calls are what the grace period drains: still answered.
        await stub.ListNodes(pb.ListNodesRequest())
