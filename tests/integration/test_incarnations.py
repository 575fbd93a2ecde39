"""Incarnations: a node that registers again, even from the same address, is a new
incarnation. A primary loses its role (its shards are promoted at a higher epoch, and it
wins one back only when its fenced position is the greatest); a replica keeps its role
under its new lease id."""

from __future__ import annotations

from tests.conftest import ServeFakeNode, StartControlPlane, wait_for
from tests.integration.test_fence_promote import SHARD, Cluster, cluster


async def _restart(c: Cluster, node: str) -> int:
    """The node's process restarts at once with the same id and address."""
    await c.nodes[node].close_stream()
    c.nodes[node].lease_id = 0
    await c.nodes[node].start()
    return c.nodes[node].lease_id


async def test_a_primary_that_registers_again_wins_its_shard_back_only_through_promotion(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    async with cluster(start_control_plane, serve_fake_node) as c:
        before = await c.assignment()
        primary = before.primary
        assert before.incarnations[primary] == c.nodes[primary].lease_id
        c.fakes[primary].positions[SHARD] = (before.epoch, 9)  # its disk holds the newest entries
        lease = await _restart(c, primary)

        async def promoted() -> bool:
            return (await c.assignment()).epoch == before.epoch + 1

        await wait_for(promoted, 5.0, "the shard to go through promotion")
        after = await c.assignment()
        assert after.primary == primary and after.incarnations[primary] == lease
        assert sorted(after.replicas) == sorted(before.replicas)
        for replica in after.replicas:
            assert c.fakes[replica].fences(SHARD) == [before.epoch + 1]
        assert c.fakes[primary].fences(SHARD) == [before.epoch + 1]


async def test_a_primary_that_registers_again_behind_a_replica_becomes_a_replica(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    async with cluster(start_control_plane, serve_fake_node) as c:
        before = await c.assignment()
        primary = before.primary
        winner = sorted(before.replicas)[1]
        c.fakes[primary].positions[SHARD] = (1, 40)  # entries of an old epoch nobody acked
        c.fakes[winner].positions[SHARD] = (2, 3)
        lease = await _restart(c, primary)

        async def promoted() -> bool:
            return (await c.assignment()).epoch == before.epoch + 1

        await wait_for(promoted, 5.0, "the shard to go through promotion")
        after = await c.assignment()
        assert after.primary == winner
        assert primary in after.replicas and after.incarnations[primary] == lease


async def test_a_replica_that_registers_again_keeps_its_role_under_its_new_lease(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    async with cluster(start_control_plane, serve_fake_node) as c:
        before = await c.assignment()
        replica = before.replicas[0]
        # It leads other shards too (3 nodes, 4 shards): its disk wins those back, so
        # balance moves nothing and this shard changes only by the new lease id.
        c.fakes[replica].default_position = (before.epoch, 9)
        lease = await _restart(c, replica)

        async def restamped() -> bool:
            return (await c.assignment()).incarnations[replica] == lease

        await wait_for(restamped, 5.0, "the replica's new lease id in its assignment")
        after = await c.assignment()
        assert (after.epoch, after.primary, list(after.replicas)) == (
            before.epoch, before.primary, list(before.replicas)
        )
        assert c.fakes[replica].fences(SHARD) == []
