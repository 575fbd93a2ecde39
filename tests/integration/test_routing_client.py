"""The routing client against a real etcd, a real control plane and small in-process
fake ShardNode servers: it routes from its caches, follows a primary change within the
call's deadline, and reads from a replica when the primary is unreachable.

The control plane's reconciler is stopped and the tests write node records and
assignments to etcd themselves, so each test decides exactly who leads the shard and
when that changes (real shard nodes and real placement come in the e2e tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc.aio
import pytest

from bluemarble.api.conversions import ring_from_proto
from bluemarble.client.control_plane import ControlPlaneClient
from bluemarble.client.routing import ClientClosed, GrpcNodeTransport, RoutingClient
from bluemarble.core import errors
from bluemarble.core.ids import NodeId, ShardId
from bluemarble.runtime.grpc_server import Server, ServiceBinding, build_server
from bluemarble.v1 import common_pb2, controlplane_pb2, shardnode_pb2, shardnode_pb2_grpc
from controlplane.server.app import ControlPlaneApp
from controlplane.store import codec
from scripts.localcluster import free_port
from tests.conftest import StartControlPlane

pytestmark = pytest.mark.integration
Ctx = grpc.aio.ServicerContext[Any, Any]
PLAYER = "player-42"


class FakeNode(shardnode_pb2_grpc.ShardNodeServicer):
    """Answers GetInventory and GrantItems from memory. While ``primary`` is False it
    refuses what only a primary may do, as a real node does ("not the primary"), and
    serves reads marked stale when asked to allow them."""

    def __init__(self, node_id: str, shard: ShardId, *, primary: bool, epoch: int = 1):
        self.node_id = node_id
        self.shard = shard
        self.primary = primary
        self.epoch = epoch
        self.items: dict[str, list[str]] = {}
        self.gold: dict[str, int] = {}
        self.applied: dict[str, shardnode_pb2.GrantItemsResponse] = {}
        self.refused: list[str] = []  # request ids (or "read") refused as not the primary
        self.asked = asyncio.Event()  # set on every call

    def _inventory(self, player: str, *, stale: bool) -> shardnode_pb2.GetInventoryResponse:
        return shardnode_pb2.GetInventoryResponse(
            player_id=player, item_ids=self.items.get(player, []), gold=self.gold.get(player, 0),
            shard_id=self.shard, epoch=self.epoch,
            staleness=shardnode_pb2.Staleness(stale=stale, lag_entries=2 if stale else 0, lag_ms=30 if stale else 0,
                                              served_by=self.node_id),
        )

    def _refuse(self, what: str) -> errors.FailedPrecondition:
        self.refused.append(what)
        return errors.FailedPrecondition(f"node {self.node_id} is not the primary of {self.shard}")

    async def GetShardStatus(self, request: Any, context: Ctx) -> shardnode_pb2.GetShardStatusResponse:
        return shardnode_pb2.GetShardStatusResponse(node_id=self.node_id)

    async def GetInventory(
        self, request: shardnode_pb2.GetInventoryRequest, context: Ctx
    ) -> shardnode_pb2.GetInventoryResponse:
        self.asked.set()
        if not self.primary and not request.allow_stale:
            raise self._refuse("read")
        if request.player_id not in self.gold:
            raise errors.NotFound(f"player {request.player_id!r} is unknown to {self.shard}")
        return self._inventory(request.player_id, stale=not self.primary)

    async def GrantItems(
        self, request: shardnode_pb2.GrantItemsRequest, context: Ctx
    ) -> shardnode_pb2.GrantItemsResponse:
        self.asked.set()
        if not self.primary:
            raise self._refuse(request.request_id)
        if request.request_id in self.applied:
            replay = shardnode_pb2.GrantItemsResponse()
            replay.CopyFrom(self.applied[request.request_id])
            replay.replayed = True
            return replay
        self.items.setdefault(request.player_id, []).extend(request.item_ids)
        self.gold[request.player_id] = self.gold.get(request.player_id, 0) + request.gold
        response = shardnode_pb2.GrantItemsResponse(
            inventory=self._inventory(request.player_id, stale=False), lsn=len(self.applied) + 1
        )
        self.applied[request.request_id] = response
        return response


@dataclass
class Cluster:
    app: ControlPlaneApp
    shard: ShardId  # the shard PLAYER lives on
    serve: Callable[[FakeNode], Awaitable[str]]

    async def put_node(self, node_id: str, address: str) -> None:
        record = common_pb2.Node(node_id=node_id, address=address, state=common_pb2.NODE_STATE_ACTIVE, capacity=1)
        await self.app.store.put(self.app.keys.node(NodeId(node_id)), codec.encode(record))

    async def assign(self, epoch: int, primary: str, replicas: list[str]) -> None:
        a = common_pb2.Assignment(shard_id=self.shard, epoch=epoch, primary=primary, replicas=replicas,
                                  state=common_pb2.ASSIGNMENT_STATE_ACTIVE)
        await self.app.store.put(self.app.keys.assignment(self.shard), codec.encode(a))


@pytest.fixture
async def cluster(start_control_plane: StartControlPlane) -> AsyncIterator[Cluster]:
    app = await start_control_plane()
    assert app.reconciler is not None
    await app.reconciler.stop()  # the tests place the shard themselves
    client = ControlPlaneClient([app.address])
    try:
        ring = ring_from_proto(await client.call(lambda s: s.GetRing, controlplane_pb2.GetRingRequest()))
    finally:
        await client.close()
    servers: list[Server] = []

    async def serve(node: FakeNode) -> str:
        server = await build_server("127.0.0.1:0", [ServiceBinding(
            shardnode_pb2.DESCRIPTOR.services_by_name["ShardNode"].full_name, node,
            shardnode_pb2_grpc.add_ShardNodeServicer_to_server,
        )])
        servers.append(server)
        return f"127.0.0.1:{server.port}"

    yield Cluster(app, ring.shard_for(PLAYER), serve)
    for server in servers:
        await server.stop_gracefully(0.1)


async def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_a_grant_follows_the_new_primary_within_its_deadline(cluster: Cluster) -> None:
    old = FakeNode("n1", cluster.shard, primary=False)  # already deposed: refuses until the move is seen
    new = FakeNode("n2", cluster.shard, primary=True, epoch=2)
    for node in (old, new):
        await cluster.put_node(node.node_id, await cluster.serve(node))
    await cluster.assign(1, "n1", ["n2"])
    transport = GrpcNodeTransport()
    async with RoutingClient([cluster.app.address], transport=transport) as client:
        assert client.resolve(PLAYER).primary == "n1"
        loop = asyncio.get_running_loop()
        started = loop.time()
        grant = asyncio.ensure_future(client.grant_items(PLAYER, ["sword-1"], gold=10, deadline_s=5.0))
        await asyncio.wait_for(old.asked.wait(), 5)
        await wait_until(lambda: len(old.refused) >= 1, 5, "the old primary to refuse")
        assert not grant.done()  # still retrying against the only primary it knows
        await cluster.assign(2, "n2", [])  # the control plane moves the shard; n1 leaves it
        result = await grant
        assert loop.time() - started < 5.0
        assert result.inventory.served_by == "n2" and result.inventory.epoch == 2
        assert (result.inventory.item_ids, result.inventory.gold, result.replayed) == (("sword-1",), 10, False)
        assert set(old.refused) == {result.request_id} and list(new.applied) == [result.request_id]
        # The same request id again is a replay, applied once.
        again = await client.grant_items(PLAYER, ["sword-1"], gold=10, request_id=result.request_id)
        assert again.replayed and new.gold[PLAYER] == 10
        inventory = await client.get_inventory(PLAYER)
        assert (inventory.item_ids, inventory.gold, inventory.stale, inventory.served_by) == (("sword-1",), 10, False,
                                                                                              "n2")
        # n1 is named by no assignment any more: its channel is closed.
        old_address = (await client_addresses(cluster))["n1"]
        await wait_until(lambda: old_address not in transport.addresses, 5, "n1's channel to close")
        # NOT_FOUND is final: one call, at once.
        strangers = (f"stranger-{i}" for i in range(10_000))
        stranger = next(p for p in strangers if client.router.shard_for(p) == cluster.shard)
        with pytest.raises(errors.NotFound):
            await client.get_inventory(stranger, deadline_s=5.0)
        assert loop.time() - started < 5.0


async def client_addresses(cluster: Cluster) -> dict[str, str]:
    nodes, _ = await cluster.app.store.get_prefix(cluster.app.keys.nodes_prefix())
    return {n.node_id: n.address for n in (codec.decode(kv.value, common_pb2.Node, kv.key) for kv in nodes)}


async def test_an_unreachable_primary_leaves_stale_reads_to_a_replica(cluster: Cluster) -> None:
    replica = FakeNode("n2", cluster.shard, primary=False)
    replica.items[PLAYER], replica.gold[PLAYER] = ["shield-7"], 3
    await cluster.put_node("n1", f"127.0.0.1:{free_port()}")  # registered, but nothing listens there
    await cluster.put_node("n2", await cluster.serve(replica))
    await cluster.assign(1, "n1", ["n2"])
    async with RoutingClient([cluster.app.address]) as client:
        inventory = await client.get_inventory(PLAYER, allow_stale=True, deadline_s=3.0)
        assert (inventory.served_by, inventory.stale, inventory.lag_entries, inventory.lag_ms) == ("n2", True, 2, 30)
        assert (inventory.item_ids, inventory.gold) == (("shield-7",), 3)
        # A strong read never goes to the replica: it fails once its deadline has passed.
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(errors.Unavailable, match="unavailable"):
            await client.get_inventory(PLAYER, deadline_s=1.0)
        assert 1.0 <= loop.time() - started < 2.0
        assert replica.refused == []
        # A short deadline still leaves a stale read time for the replica.
        short = await client.get_inventory(PLAYER, allow_stale=True, deadline_s=0.6)
        assert (short.served_by, short.stale) == ("n2", True)
    # A closed client says so instead of opening channels nobody closes.
    with pytest.raises(errors.FailedPrecondition, match="closed"):
        await client.get_inventory(PLAYER, allow_stale=True)


async def test_bluemarblectl_reads_and_grants_through_the_routing_client(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    from bluemarble.cli import bluemarblectl as ctl

    node = FakeNode("n1", cluster.shard, primary=True, epoch=3)
    await cluster.put_node("n1", await cluster.serve(node))
    await cluster.assign(3, "n1", [])
    base = ["--control-plane", cluster.app.address, "--timeout-s", "5"]
    # bluemarblectl runs its own event loop: give it a thread.
    code = await asyncio.to_thread(ctl.main, [*base, "grant", PLAYER, "sword-1", "--gold", "7", "--request-id", "r1"])
    out = capsys.readouterr().out
    assert code == 0 and "items       sword-1" in out and "grant       applied" in out
    code = await asyncio.to_thread(ctl.main, [*base, "grant", PLAYER, "sword-1", "--gold", "7", "--request-id", "r1"])
    assert code == 0 and "replayed" in capsys.readouterr().out and node.gold[PLAYER] == 7
    code = await asyncio.to_thread(ctl.main, [*base, "inventory", PLAYER])
    out = capsys.readouterr().out
    assert code == 0 and f"shard      {cluster.shard} (epoch 3)" in out and "served by  n1" in out
    code = await asyncio.to_thread(ctl.main, [*base, "shards"])
    out = capsys.readouterr().out
    assert code == 0 and f"{cluster.shard}  3" in out and "n1 " in out


async def test_a_primary_still_refusing_at_the_deadline_is_unavailable_not_final(cluster: Cluster) -> None:
    deposed = FakeNode("n1", cluster.shard, primary=False)  # the control plane never says where it went
    await cluster.put_node("n1", await cluster.serve(deposed))
    await cluster.assign(1, "n1", [])
    async with RoutingClient([cluster.app.address]) as client:
        with pytest.raises(errors.Unavailable) as info:
            await client.grant_items(PLAYER, ["sword-1"], deadline_s=1.0)
    # Retryable, unlike a final FAILED_PRECONDITION ("already owned"), and it says why.
    assert info.value.retryable
    assert "primary moved" in str(info.value) and "not the primary" in str(info.value)
    assert len(deposed.refused) >= 2


class HangingNode(FakeNode):
    """Takes a grant and answers only once ``release`` is set."""

    def __init__(self, node_id: str, shard: ShardId):
        super().__init__(node_id, shard, primary=True)
        self.release = asyncio.Event()
        self.started = 0

    async def GrantItems(
        self, request: shardnode_pb2.GrantItemsRequest, context: Ctx
    ) -> shardnode_pb2.GrantItemsResponse:
        self.started += 1
        await self.release.wait()
        return await super().GrantItems(request, context)


async def test_closing_the_client_ends_calls_in_flight_and_leaves_nothing_open(cluster: Cluster) -> None:
    node = HangingNode("n1", cluster.shard)
    await cluster.put_node("n1", await cluster.serve(node))
    await cluster.assign(1, "n1", [])
    transport = GrpcNodeTransport()
    client = RoutingClient([cluster.app.address], transport=transport)
    await client.start()
    await client.wait_ready(10)
    grants = [asyncio.ensure_future(client.grant_items(PLAYER, [f"sword-{i}"], deadline_s=20.0)) for i in range(5)]
    await wait_until(lambda: node.started == 5, 10, "the grants to reach the node")
    await client.close()
    results = await asyncio.wait_for(asyncio.gather(*grants, return_exceptions=True), 5)
    # Each fails as closed (final, not retried on a new channel), none as a bare cancellation.
    assert all(isinstance(r, ClientClosed) for r in results), results
    assert not transport.addresses
    node.release.set()  # the node may still apply them: a retry with the same request id is safe
    assert node.started == 5  # nothing was sent again after the close


async def test_closing_the_client_ends_a_wait_for_the_control_plane() -> None:
    client = RoutingClient([f"127.0.0.1:{free_port()}"])  # nothing answers there
    await client.start()
    loop = asyncio.get_running_loop()
    waiting = asyncio.ensure_future(client.wait_ready(12))
    call = asyncio.ensure_future(client.get_inventory("p1", deadline_s=12))
    for _ in range(10):  # both tasks run up to their wait for the ring
        await asyncio.sleep(0)
    assert not waiting.done() and not call.done()
    started = loop.time()
    await client.close()
    for pending in (waiting, call):
        with pytest.raises(ClientClosed):
            await asyncio.wait_for(pending, 5)
    assert loop.time() - started < 2.0


async def test_waiting_for_an_unreachable_control_plane_says_why() -> None:
    client = RoutingClient([f"127.0.0.1:{free_port()}"])  # nothing listens there
    await client.start()
    try:
        with pytest.raises(errors.Unavailable, match=r"is the control plane reachable\? \(last error: .*unavailable"):
            await client.wait_ready(1.5)
    finally:
        await client.close()
