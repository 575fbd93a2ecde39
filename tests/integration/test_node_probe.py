"""The leader asks shard nodes for their current positions over gRPC at promotion time."""

from __future__ import annotations

import socket

import pytest

from bluemarble.core.errors import Unavailable
from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.replication.position import LogPosition
from bluemarble.runtime.grpc_server import ServiceBinding, build_server
from bluemarble.v1 import common_pb2, shardnode_pb2, shardnode_pb2_grpc
from controlplane.server.node_probe import CopyView, NodeProbe
from scripts.localcluster import free_port
from shardnode.service import ShardNodeService


async def test_positions_come_from_the_nodes_that_answer() -> None:
    statuses = [
        common_pb2.ShardStatus(shard_id="shard-1", epoch=4, role=common_pb2.SHARD_ROLE_REPLICA, applied_lsn=17),
        common_pb2.ShardStatus(shard_id="shard-2", epoch=4, role=common_pb2.SHARD_ROLE_REPLICA, applied_lsn=99),
    ]
    server = await build_server(
        "127.0.0.1:0",
        [
            ServiceBinding(
                shardnode_pb2.DESCRIPTOR.services_by_name["ShardNode"].full_name,
                ShardNodeService("n1", lambda: statuses),
                shardnode_pb2_grpc.add_ShardNodeServicer_to_server,
            )
        ],
    )
    probe = NodeProbe(timeout_s=0.5)
    try:
        dead = f"127.0.0.1:{free_port()}"
        positions = await probe.positions(
            {NodeId("n1"): f"127.0.0.1:{server.port}", NodeId("n2"): dead}, [ShardId("shard-1")]
        )
        # Only the asked-for shard, only from the node that answered.
        assert positions == {(ShardId("shard-1"), NodeId("n1")): LogPosition(1, 17)}
        statuses[0] = common_pb2.ShardStatus(shard_id="shard-1", epoch=5, applied_lsn=18, last_epoch=5)
        again = await probe.positions({NodeId("n1"): f"127.0.0.1:{server.port}"}, [ShardId("shard-1")])
        assert again == {(ShardId("shard-1"), NodeId("n1")): LogPosition(5, 18)}  # asked anew, never cached
        # A primary's view names the replicas whose acknowledgements it counts; a replica's none.
        statuses[1] = common_pb2.ShardStatus(shard_id="shard-2", epoch=5, role=common_pb2.SHARD_ROLE_PRIMARY,
                                             applied_lsn=99, last_epoch=5, replicas=["n3", "n4"])
        views = await probe.views({NodeId("n1"): f"127.0.0.1:{server.port}"}, [ShardId("shard-1"), ShardId("shard-2")])
        assert views == {
            (ShardId("shard-1"), NodeId("n1")): CopyView(LogPosition(5, 18), None),
            (ShardId("shard-2"), NodeId("n1")): CopyView(LogPosition(5, 99), frozenset({NodeId("n3"), NodeId("n4")})),
        }
        # A new registration gets roles only if it answers: the live server does, an
        # address where nothing listens does not (refused before any channel is built).
        alive = await probe.reachable({NodeId("n1"): f"127.0.0.1:{server.port}", NodeId("n2"): dead})
        assert alive == {NodeId("n1")}
        assert probe.open_channels == 0  # every probe closed its channel
    finally:
        await server.stop_gracefully(0.1)


async def test_a_server_on_a_port_in_use_is_refused_in_the_systems_words() -> None:
    """build_server binds the address first itself: "Address already in use", not gRPC's
    "Failed to bind" after a line of its C core on stderr."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        with pytest.raises(Unavailable, match=rf"cannot listen on '{taken}': .*Address already in use"):
            await build_server(taken, [])
