"""Fence-then-promote with a real etcd and an in-process control plane; the nodes are
:class:`tests.conftest.FakeShardNode` servers that answer Fence with set positions.

The leader fences every live candidate of a lost primary's shard at the new epoch, reads
positions only from those answers, and promotes the greatest (epoch, lsn); a candidate
that does not answer delays the promotion; candidates without data never take over."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest

from bluemarble.cli import bluemarblectl
from bluemarble.v1 import common_pb2, controlplane_pb2, controlplane_pb2_grpc
from controlplane.server.app import ControlPlaneApp
from tests.conftest import FakeShardNode, ServeFakeNode, StartControlPlane, StreamNode, wait_for

SHARD = "shard-0"


@dataclass
class Cluster:
    stub: controlplane_pb2_grpc.ControlPlaneStub
    fakes: dict[str, FakeShardNode]
    nodes: dict[str, StreamNode]
    app: ControlPlaneApp | None = None

    async def assignment(self, shard: str = SHARD) -> common_pb2.Assignment:
        listed = await self.stub.ListAssignments(controlplane_pb2.ListAssignmentsRequest())
        return next(a for a in listed.assignments if a.shard_id == shard)

    async def all(self) -> list[common_pb2.Assignment]:
        return list((await self.stub.ListAssignments(controlplane_pb2.ListAssignmentsRequest())).assignments)

    async def leave(self, node: str) -> None:
        """The node leaves (its lease is revoked): its primaries are lost."""
        await self.nodes[node].close_stream()
        await self.stub.DeregisterNode(
            controlplane_pb2.DeregisterNodeRequest(node_id=node, lease_id=self.nodes[node].lease_id)
        )

    async def add(self, serve: ServeFakeNode, node: str, zone: str) -> None:
        fake, server = await serve(node)
        fake.follows = self.all  # reports the roles it is given as a healthy node would
        self.fakes[node] = fake
        self.nodes[node] = StreamNode(self.stub, node, f"127.0.0.1:{server.port}", zone)
        await self.nodes[node].start()


@asynccontextmanager
async def cluster(start: StartControlPlane, serve: ServeFakeNode, count: int = 3,
                  replication_factor: int = 3) -> AsyncIterator[Cluster]:
    """``count`` nodes in zones a, b, c..., R = 3 (or ``replication_factor``), 4 shards,
    every shard placed."""
    app = await start(lease_ttl_s=10, shards=4, replication_factor=replication_factor)
    async with grpc.aio.insecure_channel(app.address) as channel:
        c = Cluster(controlplane_pb2_grpc.ControlPlaneStub(channel), {}, {}, app)
        for i in range(count):
            await c.add(serve, f"n{i}", "abcdef"[i])

        async def placed() -> bool:
            listed = await c.all()
            return len(listed) == 4 and all(a.primary and len(a.replicas) == replication_factor - 1 for a in listed)

        await wait_for(placed, 30.0, "every shard to be placed")
        try:
            yield c
        finally:
            for node in c.nodes.values():
                await node.close_stream()


async def _promoted(c: Cluster, epoch: int) -> bool:
    return (await c.assignment()).epoch >= epoch


async def test_the_greatest_epoch_then_lsn_wins_and_positions_come_from_the_fence(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    async with cluster(start_control_plane, serve_fake_node) as c:
        before = await c.assignment()
        x, y = sorted(before.replicas)
        c.fakes[x].positions[SHARD] = (3, 10)
        c.fakes[y].positions[SHARD] = (2, 50)  # more entries, but of an older primary
        # Unfenced reports say the opposite (y further in the epoch the record has):
        # promotion must not read them.
        c.fakes[x].statuses = [common_pb2.ShardStatus(shard_id=SHARD, applied_lsn=5, last_epoch=1)]
        c.fakes[y].statuses = [common_pb2.ShardStatus(shard_id=SHARD, applied_lsn=99, last_epoch=before.epoch)]
        await c.leave(before.primary)
        await wait_for(lambda: _promoted(c, before.epoch + 1), 5.0, "the promotion")
        after = await c.assignment()
        assert after.primary == x and after.epoch == before.epoch + 1
        assert after.incarnations[x] == c.nodes[x].lease_id
        # Both candidates were fenced at the new epoch.
        assert c.fakes[x].fences(SHARD) == [before.epoch + 1]
        assert c.fakes[y].fences(SHARD) == [before.epoch + 1]


async def test_a_candidate_that_does_not_answer_the_fence_delays_the_promotion(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    async with cluster(start_control_plane, serve_fake_node) as c:
        before = await c.assignment()
        y = sorted(before.replicas)[1]
        c.fakes[y].fence_mode = "fail"
        c.fakes[y].positions[SHARD] = (4, 1)  # y would win: promoting without it could lose data
        await c.leave(before.primary)

        async def retried() -> bool:
            return len(c.fakes[y].fences(SHARD)) >= 2

        await wait_for(retried, 5.0, "the leader to retry the fence")
        held = await c.assignment()
        assert (held.primary, held.epoch) == (before.primary, before.epoch)
        c.fakes[y].fence_mode = "answer"
        await wait_for(lambda: _promoted(c, before.epoch + 1), 5.0, "the promotion")
        after = await c.assignment()
        assert after.primary == y and after.epoch == before.epoch + 1


async def _without_data(c: Cluster) -> tuple[common_pb2.Assignment, str, str]:
    """SHARD's assignment and its two replicas, which from now on hold none of its data."""
    before = await c.assignment()
    x, y = sorted(before.replicas)
    c.fakes[x].positions[SHARD] = None
    c.fakes[y].positions[SHARD] = None
    return before, x, y


async def test_a_shard_whose_live_candidates_hold_no_data_stays_without_a_primary(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    async with cluster(start_control_plane, serve_fake_node) as c:
        before, x, y = await _without_data(c)
        lost = before.primary
        others = [a.shard_id for a in await c.all() if a.primary == lost and a.shard_id != SHARD]
        await c.leave(lost)

        async def rest_promoted() -> bool:
            listed = {a.shard_id: a for a in await c.all()}
            fenced = c.fakes[x].fences(SHARD) and c.fakes[y].fences(SHARD)
            return bool(fenced) and all(listed[s].primary not in ("", lost) for s in others)

        await wait_for(rest_promoted, 5.0, "the fence, and the other shards' promotions")
        held = await c.assignment()
        assert (held.primary, held.epoch) == (lost, before.epoch), "an empty copy took over"
        status = await c.stub.GetClusterStatus(controlplane_pb2.GetClusterStatusRequest())
        assert status.shards_without_primary == 1
        assert any(f"no live primary; lost members they name: {lost} (1 shard)" in w
                   for w in status.warnings), status.warnings
        # Data shows up on a candidate (e.g. it bootstrapped); the next round promotes it.
        c.fakes[x].positions[SHARD] = (1, 3)
        await c.add(serve_fake_node, "n9", "d")  # any change makes the leader plan again
        await wait_for(lambda: _promoted(c, before.epoch + 1), 5.0, "the promotion")
        assert (await c.assignment()).primary == x


async def _refused(c: Cluster, shard: str, node: str, accept: bool = True) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.stub.ForcePromote(
            controlplane_pb2.ForcePromoteRequest(shard_id=shard, node_id=node, accept_data_loss=accept), timeout=5
        )
    return e.value.code(), e.value.details() or ""


async def test_an_operator_gives_a_stuck_shard_a_primary_without_its_data(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode, capsys: pytest.CaptureFixture[str]
) -> None:
    async with cluster(start_control_plane, serve_fake_node) as c:
        before, x, y = await _without_data(c)
        code, details = await _refused(c, SHARD, x)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "has a primary" in details
        await c.leave(before.primary)

        async def fenced() -> bool:
            return bool(c.fakes[x].fences(SHARD) and c.fakes[y].fences(SHARD))

        await wait_for(fenced, 5.0, "the fence of the lost primary's candidates")
        assert (await c.assignment()).epoch == before.epoch, "stuck: nobody holds the data"
        # Bad requests change nothing.
        code, details = await _refused(c, SHARD, x, accept=False)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "accept_data_loss" in details
        assert (await _refused(c, SHARD, "n404"))[0] == grpc.StatusCode.NOT_FOUND
        assert (await _refused(c, "shard-99", x))[0] == grpc.StatusCode.NOT_FOUND
        assert (await _refused(c, "shard-x", x))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert (await _refused(c, SHARD, "bad id"))[0] == grpc.StatusCode.INVALID_ARGUMENT
        # A node that answers it holds no copy, while another live member holds one: refused
        # (promoting it would lose that copy too), naming the one to ask for instead.
        c.fakes[x].statuses = [common_pb2.ShardStatus(shard_id="shard-1", epoch=1)]  # other shards only
        c.fakes[y].statuses = [common_pb2.ShardStatus(shard_id=SHARD, epoch=1, last_epoch=1, applied_lsn=3)]
        code, details = await _refused(c, SHARD, x)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert f"{x} holds no copy of {SHARD}" in details and f"lose what {y} hold" in details
        c.fakes[x].statuses = c.fakes[y].statuses = []  # back to reporting their roles
        assert c.app is not None and c.app.forced is not None and not c.app.forced.entries

        # As an operator does it: bluemarblectl, which waits for the answer.
        argv = ["--control-plane", c.app.address, "promote", SHARD, y, "--accept-data-loss"]
        assert await asyncio.to_thread(bluemarblectl.main, argv) == 0
        out = capsys.readouterr().out
        assert f"{SHARD}: primary {y} at epoch {before.epoch + 1}" in out
        assert f"writes only {before.primary} held are lost" in out  # what the promotion gave up
        assert "an item in two inventories, or in none" in out and "already its primary" not in out
        assert (await c.assignment()).primary == y
        # A retry of a request that worked answers the same.
        answer = await c.stub.ForcePromote(
            controlplane_pb2.ForcePromoteRequest(shard_id=SHARD, node_id=y, accept_data_loss=True), timeout=5
        )
        assert (answer.assignment.primary, answer.assignment.epoch) == (y, before.epoch + 1)
        assert not answer.lost_members  # done already: nothing is known of what it lost
        assert answer.already_primary  # and the answer says nothing was forced
        assert await asyncio.to_thread(bluemarblectl.main, argv) == 0
        assert "(already its primary: nothing was forced)" in capsys.readouterr().out
        assert c.fakes[y].fences(SHARD)[-1] == before.epoch + 1  # fenced at the new epoch first
        forced = c.app.forced

        async def cleared() -> bool:
            return not forced.entries

        await wait_for(cleared, 5.0, "the leader to delete the done request")


async def test_an_operator_can_force_a_shard_whose_primary_came_back_without_its_data(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    """The primary restarts (a new registration) with an empty disk while no replica holds
    the data: the leader waits and tells the operator to promote with accept-data-loss,
    which must not be refused as "has a primary" (the restarted node lost the role)."""
    async with cluster(start_control_plane, serve_fake_node) as c:
        before, x, _ = await _without_data(c)
        primary = before.primary
        c.fakes[primary].positions[SHARD] = None  # its disk is gone too
        await c.nodes[primary].close_stream()
        c.nodes[primary].lease_id = 0
        await c.nodes[primary].start()  # registered again: a new incarnation

        async def fenced() -> bool:
            return bool(c.fakes[x].fences(SHARD))

        await wait_for(fenced, 10.0, "the fence of the restarted primary's candidates")
        assert (await c.assignment()).epoch == before.epoch, "stuck: nobody holds the data"
        status = await c.stub.GetClusterStatus(controlplane_pb2.GetClusterStatusRequest())
        assert status.shards_without_primary >= 1, status
        answer = await c.stub.ForcePromote(
            controlplane_pb2.ForcePromoteRequest(shard_id=SHARD, node_id=x, accept_data_loss=True), timeout=10
        )
        assert (answer.assignment.primary, answer.assignment.epoch) == (x, before.epoch + 1)


async def _lose_the_members_leaving_a_copy_outside(c: Cluster) -> tuple[common_pb2.Assignment, str]:
    """The replicas hold nothing, a node outside the shard holds a copy, and the primary
    leaves. Returns the assignment before and that node."""
    before = await c.assignment()
    outsider = next(n for n in sorted(c.fakes) if n != before.primary and n not in before.replicas)
    for member in before.replicas:
        c.fakes[member].positions[SHARD] = None
    c.fakes[outsider].positions[SHARD] = (1, 7)
    await c.leave(before.primary)
    return before, outsider


async def test_a_copy_left_on_a_node_that_is_no_longer_a_member_is_found(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    """A replica moved away keeps its copy on disk; when no member has one (the new
    replica had not caught up yet), the leader fences every live node and, with R = 2,
    promotes the copy it finds: nothing can have been acknowledged since it left."""
    async with cluster(start_control_plane, serve_fake_node, count=3, replication_factor=2) as c:
        before, outsider = await _lose_the_members_leaving_a_copy_outside(c)
        await wait_for(lambda: _promoted(c, before.epoch + 1), 10.0, "the promotion")
        after = await c.assignment()
        assert after.primary == outsider
        assert c.fakes[outsider].fences(SHARD) == [before.epoch + 1]


async def test_with_three_copies_a_copy_left_on_a_former_member_is_not_promoted(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    """With R = 3 the other replica, lost too, may have acknowledged writes after the
    former member left: the shard stays without a primary (an operator may accept the
    loss with ForcePromote) rather than fall back to that copy."""
    async with cluster(start_control_plane, serve_fake_node, count=4) as c:
        before, outsider = await _lose_the_members_leaving_a_copy_outside(c)

        async def fenced(node: str) -> bool:
            return bool(c.fakes[node].fences(SHARD))

        await wait_for(lambda: fenced(outsider), 10.0, "the leader to fence every live node for the shard")
        await c.add(serve_fake_node, "n9", "d")  # any change makes the leader plan again: a whole round
        await wait_for(lambda: fenced("n9"), 10.0, "a later round, fencing the new node too")
        held = await c.assignment()
        assert (held.primary, held.epoch) == (before.primary, before.epoch), "a former member's copy took over"
        status = await c.stub.GetClusterStatus(controlplane_pb2.GetClusterStatusRequest())
        assert status.shards_without_primary == 1
        assert any(f"lost members they name: {before.primary} (1 shard)" in w for w in status.warnings), status.warnings


async def test_nodes_without_fence_fail_over_on_their_reported_positions(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    async with cluster(start_control_plane, serve_fake_node) as c:
        before = await c.assignment()
        x, y = sorted(before.replicas)
        for fake in c.fakes.values():
            fake.fence_mode = "unimplemented"
        c.fakes[x].statuses = [common_pb2.ShardStatus(shard_id=SHARD, applied_lsn=5, last_epoch=1)]
        c.fakes[y].statuses = [common_pb2.ShardStatus(shard_id=SHARD, applied_lsn=7, last_epoch=1)]
        await c.leave(before.primary)
        await wait_for(lambda: _promoted(c, before.epoch + 1), 5.0, "the promotion")
        assert (await c.assignment()).primary == y


async def test_a_record_behind_the_epoch_nodes_hold_is_replaced_above_it(
    start_control_plane: StartControlPlane, serve_fake_node: ServeFakeNode
) -> None:
    """etcd restored from an older snapshot, or a record deleted by hand: placing the shard
    afresh at epoch 1 (or at its old record's next epoch) would hand out an epoch nodes
    already hold, with another primary. The leader asks the nodes, and promotes the
    greatest copy above the epoch they report."""
    from bluemarble.core.ids import ShardId

    async with cluster(start_control_plane, serve_fake_node) as c:
        assert c.app is not None
        before = await c.assignment()
        ahead = before.epoch + 5
        x = next(n for n in sorted(c.fakes) if n != before.primary)
        statuses = []
        for a in await c.all():
            if x == a.primary or x in a.replicas:
                epoch = ahead if a.shard_id == SHARD else a.epoch
                statuses.append(common_pb2.ShardStatus(shard_id=a.shard_id, epoch=epoch, last_epoch=epoch,
                                                       applied_lsn=10, serving=True))
        c.fakes[x].statuses = statuses
        c.fakes[x].positions[SHARD] = (ahead, 10)  # the latest copy
        for other in c.fakes:
            if other != x:
                c.fakes[other].positions[SHARD] = (before.epoch, 3)
        await c.app.store.delete(c.app.keys.assignment(ShardId(SHARD)))

        async def replaced_above() -> bool:
            listed = {a.shard_id: a for a in await c.all()}
            a = listed.get(SHARD)
            return a is not None and a.epoch > ahead

        await wait_for(replaced_above, 15.0, "the shard to be promoted above the epoch the nodes hold")
        after = await c.assignment()
        assert after.primary == x, after  # the greatest copy won, on every live node's answer
        assert all(e > ahead for e in c.fakes[x].fences(SHARD)), c.fakes[x].fences(SHARD)
