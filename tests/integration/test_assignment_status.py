"""ListAssignments(include_status) reports each member's position and lag (asked of the
node now, else from its heartbeats through this replica); assignment answers and streams
carry the addresses of the nodes they name; heartbeats carry the config revision."""

from __future__ import annotations

from bluemarble.v1 import common_pb2, controlplane_pb2
from tests.conftest import ServeFakeNode, StartControlPlane, wait_for
from tests.integration.test_fence_promote import SHARD, cluster


async def test_member_statuses_come_from_the_node_or_from_its_heartbeats(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    async with cluster(start_control_plane, serve_fake_node) as c:
        a = await c.assignment()
        reporter, silent = a.primary, a.replicas[0]
        c.nodes[reporter].statuses = [common_pb2.ShardStatus(
            shard_id=SHARD, epoch=a.epoch, role=common_pb2.SHARD_ROLE_PRIMARY, applied_lsn=12, last_epoch=a.epoch,
            lag_entries=3, lag_ms=40, serving=True)]
        # The reporter's node answers nothing for the shard when asked: its heartbeat
        # report stands in. The silent member reports nothing in heartbeats: it is asked.
        c.fakes[reporter].follows = None
        c.fakes[silent].statuses = [common_pb2.ShardStatus(
            shard_id=SHARD, epoch=a.epoch, role=common_pb2.SHARD_ROLE_REPLICA, applied_lsn=9, last_epoch=a.epoch,
            lag_entries=3, lag_ms=40)]

        async def reported() -> bool:
            listed = await c.stub.ListAssignments(controlplane_pb2.ListAssignmentsRequest(include_status=True))
            return any(s.node_id == reporter and s.status.applied_lsn == 12 for s in listed.statuses)

        await wait_for(reported, 5.0, "the primary's heartbeat report")
        listed = await c.stub.ListAssignments(controlplane_pb2.ListAssignmentsRequest(include_status=True))
        mine = {s.node_id: s for s in listed.statuses if s.shard_id == SHARD}
        assert mine[reporter].status.lag_entries == 3 and mine[reporter].status.serving
        assert mine[reporter].age_ms < 5000
        assert mine[silent].status.applied_lsn == 9 and mine[silent].age_ms == 0
        assert c.fakes[silent].calls.count(("GetShardStatus", {})) >= 1
        # Without include_status nothing is asked or reported.
        plain = await c.stub.ListAssignments(controlplane_pb2.ListAssignmentsRequest())
        assert not plain.statuses
        # The addresses of every node the assignments name.
        assert {(n.node_id, n.address) for n in plain.nodes} == {
            (name, node.address) for name, node in c.nodes.items()
        }


async def test_watch_messages_carry_the_addresses_of_the_nodes_they_name(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    async with cluster(start_control_plane, serve_fake_node) as c:
        stream = c.stub.WatchAssignments(controlplane_pb2.WatchAssignmentsRequest(node_id="n0"))
        snapshot = await stream.read()
        named = {m for a in snapshot.assignments for m in (a.primary, *a.replicas)}
        assert snapshot.snapshot and named
        assert {n.node_id: n.address for n in snapshot.nodes} == {m: c.nodes[m].address for m in named}
        stream.cancel()


async def test_heartbeats_carry_the_config_revision(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    async with cluster(start_control_plane, serve_fake_node) as c:
        got = await c.stub.GetConfig(controlplane_pb2.GetConfigRequest())
        node = c.nodes["n0"]
        assert node.responses[-1].config_revision == got.revision
        config = got.config
        config.max_moves_per_round = 7
        changed = await c.stub.SetConfig(controlplane_pb2.SetConfigRequest(config=config))

        async def seen() -> bool:
            return node.responses[-1].config_revision == changed.revision

        await wait_for(seen, 5.0, "a heartbeat with the new config revision")
