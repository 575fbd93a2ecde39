"""How a broken stream's status reads (channels.ended_status): the call's own status
first; gRPC's INTERNAL "Internal error from Core" for a connection that broke under a
write reads as UNAVAILABLE (nothing failed inside either program); a server's own
INTERNAL stays INTERNAL."""

from __future__ import annotations

import asyncio

import grpc

from bluemarble.client.control_plane import status_to_error
from bluemarble.client.node_calls import status_error
from bluemarble.runtime import channels


class EndedCall:
    def __init__(self, code: grpc.StatusCode | None, details: str):
        self._code = code
        self._details = details

    async def code(self) -> grpc.StatusCode | None:
        return self._code

    async def details(self) -> str:
        return self._details


def test_a_broken_connection_reads_as_unavailable() -> None:
    code, details = asyncio.run(channels.ended_status(
        EndedCall(grpc.StatusCode.INTERNAL, "Internal error from Core"), asyncio.InvalidStateError()))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == "the connection broke (Internal error from Core)"


def test_a_server_error_keeps_its_status() -> None:
    crash = "internal error in /bluemarble.v1.ShardNode/Replicate (error id 0123abcd4567); see the server log"
    assert asyncio.run(channels.ended_status(EndedCall(grpc.StatusCode.INTERNAL, crash), RuntimeError())) == (
        grpc.StatusCode.INTERNAL, crash)
    assert asyncio.run(channels.ended_status(EndedCall(grpc.StatusCode.UNAVAILABLE, "node stopping"),
                                             RuntimeError())) == (grpc.StatusCode.UNAVAILABLE, "node stopping")


def test_without_a_status_the_local_error_is_named() -> None:
    code, details = asyncio.run(channels.ended_status(EndedCall(None, ""), asyncio.InvalidStateError()))
    assert code == grpc.StatusCode.UNAVAILABLE and details == "the stream failed (InvalidStateError)"


def test_the_cores_socket_wording_names_no_status() -> None:
    """gRPC core prints a refused connection as "last error: UNKNOWN: ...": what the
    clients and servers pass on says it without the status name nobody's call ended with."""
    core = ("connections to all backends failing; last error: UNKNOWN: ipv4:127.0.0.1:2379: Failed to connect to "
            "remote host: Connection refused")
    plain = channels.plain_details(core)
    assert "UNKNOWN" not in plain and plain.endswith("last error: ipv4:127.0.0.1:2379: Failed to connect to remote "
                                                     "host: Connection refused")
    assert channels.plain_details("player UNKNOWN: not here") == "player UNKNOWN: not here"  # only the core's phrase
    for error in (status_to_error(grpc.StatusCode.UNAVAILABLE, core, "cp:1"), status_error("UNAVAILABLE", core, "n:1")):
        assert "UNKNOWN" not in str(error) and "Connection refused" in str(error)


def test_a_stream_that_ended_on_a_refused_connection_names_no_unknown() -> None:
    """What a replication or call stream logs when its peer is gone (the demo's shutdown
    showed "last error: UNKNOWN: ... Connection refused" in the nodes' logs)."""
    core = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:7103: Failed to connect to "
            "remote host: Connection refused")
    code, details = asyncio.run(channels.ended_status(EndedCall(grpc.StatusCode.UNAVAILABLE, core), RuntimeError()))
    assert code == grpc.StatusCode.UNAVAILABLE and "UNKNOWN" not in details and "Connection refused" in details
