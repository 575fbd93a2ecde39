"""Node registry against a real etcd: register, heartbeat, expiry, re-registration,
duplicates, several replicas, and every kind of bad input."""

from __future__ import annotations

import asyncio
import re
import time

import grpc
import grpc.aio
import pytest
import structlog

from bluemarble.v1 import common_pb2, controlplane_pb2_grpc, trade_pb2, trade_pb2_grpc
from bluemarble.v1 import controlplane_pb2 as pb
from controlplane.server.app import ControlPlaneApp
from scripts.localcluster import free_port
from tests.conftest import ServeFakeNode, StartControlPlane

pytestmark = pytest.mark.integration
Stub = controlplane_pb2_grpc.ControlPlaneStub


def register_request(node_id: str = "n1", port: int = 7101, **kw: object) -> pb.RegisterNodeRequest:
    return pb.RegisterNodeRequest(node_id=node_id, address=f"127.0.0.1:{port}", zone="z1", **kw)  # type: ignore[arg-type]


async def register_answering_nodes(stub: Stub, serve_fake_node: ServeFakeNode, count: int) -> None:
    """Registers n1..n``count``, each at a fake node that answers the control plane's probe."""
    for i in range(1, count + 1):
        _, server = await serve_fake_node(f"n{i}")
        await stub.RegisterNode(register_request(f"n{i}", server.port))


async def node_ids(stub: Stub) -> list[str]:
    return [n.node_id for n in (await stub.ListNodes(pb.ListNodesRequest())).nodes]


async def wait_for(condition, timeout_s: float, what: str) -> float:  # type: ignore[no-untyped-def]
    """Awaits ``condition()`` until true; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await condition():
        if loop.time() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)
    return loop.time() - start


async def status_of(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


class TestRegisterAndHeartbeat:
    async def test_register_returns_lease_and_intervals(self, stub: Stub) -> None:
        r = await stub.RegisterNode(register_request(capacity=3, region="eu"))
        assert r.lease_id > 0
        assert r.ttl_ms == 2000
        assert r.heartbeat_interval_ms == 666
        nodes = (await stub.ListNodes(pb.ListNodesRequest())).nodes
        assert [(n.node_id, n.address, n.zone, n.region, n.capacity, n.lease_id) for n in nodes] == [
            ("n1", "127.0.0.1:7101", "z1", "eu", 3, r.lease_id)
        ]

    async def test_capacity_zero_means_one(self, stub: Stub) -> None:
        await stub.RegisterNode(register_request(capacity=0))
        nodes = (await stub.ListNodes(pb.ListNodesRequest())).nodes
        assert nodes[0].capacity == 1

    async def test_heartbeats_keep_the_node_past_its_ttl(self, stub: Stub) -> None:
        r = await stub.RegisterNode(register_request())
        loop = asyncio.get_running_loop()
        until = loop.time() + 3.5  # well past the 2 s TTL
        while loop.time() < until:
            hb = await stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id))
            assert hb.ttl_ms == 2000
            await asyncio.sleep(0.5)
        assert await node_ids(stub) == ["n1"]

    async def test_node_expires_without_heartbeats_then_heartbeat_is_not_found(self, stub: Stub) -> None:
        r = await stub.RegisterNode(register_request())
        took = await wait_for(lambda: _empty(stub), 4.0, "the node to expire")
        assert took >= 1.0  # not removed before its lease could expire
        code, details = await status_of(stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id)))
        assert code == grpc.StatusCode.NOT_FOUND
        assert "register again" in details

    async def test_reregistration_after_expiry_gets_a_new_lease(self, stub: Stub) -> None:
        first = await stub.RegisterNode(register_request())
        await wait_for(lambda: _empty(stub), 4.0, "the node to expire")
        second = await stub.RegisterNode(register_request())
        assert second.lease_id != first.lease_id
        await stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=second.lease_id))
        assert await node_ids(stub) == ["n1"]

    async def test_same_address_replaces_the_previous_registration(self, stub: Stub) -> None:
        first = await stub.RegisterNode(register_request())
        second = await stub.RegisterNode(register_request())
        assert second.lease_id != first.lease_id
        code, _ = await status_of(stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=first.lease_id)))
        assert code == grpc.StatusCode.NOT_FOUND
        await stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=second.lease_id))
        nodes = (await stub.ListNodes(pb.ListNodesRequest())).nodes
        assert [(n.node_id, n.lease_id) for n in nodes] == [("n1", second.lease_id)]

    async def test_same_id_from_another_address_is_already_exists(self, stub: Stub) -> None:
        first = await stub.RegisterNode(register_request(port=7101))
        code, details = await status_of(stub.RegisterNode(register_request(port=7102)))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        assert "127.0.0.1:7101" in details
        nodes = (await stub.ListNodes(pb.ListNodesRequest())).nodes
        assert [(n.address, n.lease_id) for n in nodes] == [("127.0.0.1:7101", first.lease_id)]

    async def test_same_id_from_another_address_is_accepted_once_the_first_expired(self, stub: Stub) -> None:
        await stub.RegisterNode(register_request(port=7101))
        await wait_for(lambda: _empty(stub), 4.0, "the node to expire")
        await stub.RegisterNode(register_request(port=7102))
        nodes = (await stub.ListNodes(pb.ListNodesRequest())).nodes
        assert [n.address for n in nodes] == ["127.0.0.1:7102"]

    async def test_deregister_removes_the_node_at_once(self, stub: Stub) -> None:
        r = await stub.RegisterNode(register_request())
        await stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="n1", lease_id=r.lease_id))
        assert await node_ids(stub) == []
        code, _ = await status_of(stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id)))
        assert code == grpc.StatusCode.NOT_FOUND


async def _empty(stub: Stub) -> bool:
    return await node_ids(stub) == []


class TestSeveralReplicas:
    async def test_replicas_serve_the_same_registry(self, start_control_plane: StartControlPlane) -> None:
        a, b = await start_control_plane(), await start_control_plane()
        async with grpc.aio.insecure_channel(a.address) as ca, grpc.aio.insecure_channel(b.address) as cb:
            sa, sb = Stub(ca), Stub(cb)
            r1 = await sa.RegisterNode(register_request("n1", 7101))
            r2 = await sb.RegisterNode(register_request("n2", 7102))
            # A node may heartbeat to any replica.
            loop = asyncio.get_running_loop()
            until = loop.time() + 3.0
            turn = 0
            while loop.time() < until:
                for node, lease in (("n1", r1.lease_id), ("n2", r2.lease_id)):
                    target = (sa, sb)[turn % 2]
                    await target.Heartbeat(pb.HeartbeatRequest(node_id=node, lease_id=lease))
                    turn += 1
                await asyncio.sleep(0.4)
            assert await node_ids(sa) == await node_ids(sb) == ["n1", "n2"]
            # ALREADY_EXISTS holds across replicas too.
            code, _ = await status_of(sb.RegisterNode(register_request("n1", 7199)))
            assert code == grpc.StatusCode.ALREADY_EXISTS
            await sb.DeregisterNode(pb.DeregisterNodeRequest(node_id="n1", lease_id=r1.lease_id))
            assert await node_ids(sa) == ["n2"]
            sa_status = await sa.GetClusterStatus(pb.GetClusterStatusRequest())
            sb_status = await sb.GetClusterStatus(pb.GetClusterStatusRequest())
            assert (sa_status.served_by, sb_status.served_by) == ("cp-0", "cp-1")
            assert sa_status.node_count == sb_status.node_count == 1


BAD_REGISTRATIONS = [
    (dict(node_id="", address="127.0.0.1:1"), grpc.StatusCode.INVALID_ARGUMENT, "node_id is empty"),
    (dict(node_id="x" * 129, address="127.0.0.1:1"), grpc.StatusCode.INVALID_ARGUMENT, "129 bytes"),
    (dict(node_id="é" * 65, address="127.0.0.1:1"), grpc.StatusCode.INVALID_ARGUMENT, "130 bytes"),
    (dict(node_id="a/b", address="127.0.0.1:1"), grpc.StatusCode.INVALID_ARGUMENT, "contains '/'"),
    (dict(node_id="a b", address="127.0.0.1:1"), grpc.StatusCode.INVALID_ARGUMENT, "contains"),
    (dict(node_id="n", address=""), grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    (dict(node_id="n", address="localhost"), grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    (dict(node_id="n", address="127.0.0.1:0"), grpc.StatusCode.INVALID_ARGUMENT, "outside 1..65535"),
    (dict(node_id="n", address="127.0.0.1:70000"), grpc.StatusCode.INVALID_ARGUMENT, "outside 1..65535"),
    (dict(node_id="n", address="300.1.1.1:80"), grpc.StatusCode.INVALID_ARGUMENT, "invalid IPv4"),
    (dict(node_id="n", address="[::1:80"), grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    (dict(node_id="n", address="bad_host!:80"), grpc.StatusCode.INVALID_ARGUMENT, "invalid host name"),
    (dict(node_id="n", address="127.0.0.1:1", capacity=-1), grpc.StatusCode.INVALID_ARGUMENT, "capacity is -1"),
    (dict(node_id="n", address="127.0.0.1:1", zone="a b"), grpc.StatusCode.INVALID_ARGUMENT, "zone"),
    (dict(node_id="n", address="127.0.0.1:1", region="r" * 65), grpc.StatusCode.INVALID_ARGUMENT, "region"),
]


class TestBadInput:
    @pytest.mark.parametrize(("fields", "code", "text"), BAD_REGISTRATIONS)
    async def test_bad_registration_is_refused_and_writes_nothing(
        self, stub: Stub, fields: dict[str, object], code: grpc.StatusCode, text: str
    ) -> None:
        got, details = await status_of(stub.RegisterNode(pb.RegisterNodeRequest(**fields)))  # type: ignore[arg-type]
        assert got == code
        assert text in details
        assert await node_ids(stub) == []

    async def test_ipv6_and_dns_addresses_are_accepted(self, stub: Stub) -> None:
        await stub.RegisterNode(pb.RegisterNodeRequest(node_id="v6", address="[::1]:7101"))
        await stub.RegisterNode(pb.RegisterNodeRequest(node_id="dns", address="node-1.game.svc:7101"))
        assert await node_ids(stub) == ["dns", "v6"]

    @pytest.mark.parametrize(
        ("node_id", "lease_id", "code"),
        [
            ("n1", 0, grpc.StatusCode.INVALID_ARGUMENT),
            ("n1", -5, grpc.StatusCode.INVALID_ARGUMENT),
            ("", 1, grpc.StatusCode.INVALID_ARGUMENT),
            ("n1", 123456, grpc.StatusCode.NOT_FOUND),  # registered, but not this lease
            ("ghost", 123456, grpc.StatusCode.NOT_FOUND),  # never registered
        ],
    )
    async def test_bad_heartbeats(self, stub: Stub, node_id: str, lease_id: int, code: grpc.StatusCode) -> None:
        await stub.RegisterNode(register_request())
        got, details = await status_of(stub.Heartbeat(pb.HeartbeatRequest(node_id=node_id, lease_id=lease_id)))
        assert got == code, details
        assert details

    async def test_deregister_with_a_foreign_lease_is_not_found_and_keeps_the_node(self, stub: Stub) -> None:
        r = await stub.RegisterNode(register_request())
        got, _ = await status_of(stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="n1", lease_id=r.lease_id + 1)))
        assert got == grpc.StatusCode.NOT_FOUND
        assert await node_ids(stub) == ["n1"]

    @pytest.mark.parametrize(
        ("rpc", "code", "phrase"),
        [
            ("ExecuteTrade", grpc.StatusCode.INVALID_ARGUMENT, "player"),
            ("GetTrade", grpc.StatusCode.NOT_FOUND, "t"),
        ],
    )
    async def test_trade_rpcs_answer_bad_or_unknown_trades_clearly(
        self, control_plane: ControlPlaneApp, rpc: str, code: grpc.StatusCode, phrase: str
    ) -> None:
        async with grpc.aio.insecure_channel(control_plane.address) as channel:
            stub = trade_pb2_grpc.TradeCoordinatorStub(channel)
            if rpc == "ExecuteTrade":  # no players at all
                got, details = await status_of(stub.ExecuteTrade(trade_pb2.ExecuteTradeRequest(trade_id="t")))
            else:  # nothing anywhere knows trade "t"
                got, details = await status_of(stub.GetTrade(trade_pb2.GetTradeRequest(trade_id="t")))
        assert got == code
        assert phrase in details

    @pytest.mark.parametrize(
        ("call", "code"),
        [
            (lambda s: s.ResolvePlayer(pb.ResolvePlayerRequest(player_id="")), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda s: s.ResolvePlayer(pb.ResolvePlayerRequest(player_id="p" * 129)), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda s: s.DrainNode(pb.DrainNodeRequest(node_id="ghost")), grpc.StatusCode.NOT_FOUND),
            (lambda s: s.DrainNode(pb.DrainNodeRequest(node_id="")), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda s: s.UndrainNode(pb.UndrainNodeRequest(node_id="ghost")), grpc.StatusCode.NOT_FOUND),
            (lambda s: s.UndrainNode(pb.UndrainNodeRequest(node_id="a/b")), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda s: s.UndrainNode(pb.UndrainNodeRequest(node_id="..")), grpc.StatusCode.INVALID_ARGUMENT),
        ],
    )
    async def test_bad_placement_requests(self, stub: Stub, call, code: grpc.StatusCode) -> None:  # type: ignore[no-untyped-def]
        got, details = await status_of(call(stub))
        assert got == code
        assert details

    async def test_a_drain_that_would_cost_shards_copies_needs_force(
        self, stub: Stub, serve_fake_node: ServeFakeNode
    ) -> None:
        """Replication factor 3 (the fixture's): with 4 nodes one may drain; the next would
        leave 2 nodes for 3 copies and is refused, unless forced."""
        await register_answering_nodes(stub, serve_fake_node, 4)
        await stub.DrainNode(pb.DrainNodeRequest(node_id="n4"))
        await stub.DrainNode(pb.DrainNodeRequest(node_id="n4"))  # already draining: idempotent
        got, details = await status_of(stub.DrainNode(pb.DrainNodeRequest(node_id="n3")))
        assert got == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "would leave 2 node(s) for a replication factor of 3" in details and "force" in details, details
        states = {n.node_id: n.state for n in (await stub.ListNodes(pb.ListNodesRequest())).nodes}
        assert states["n3"] == common_pb2.NODE_STATE_ACTIVE  # refused: nothing changed
        drained = await stub.DrainNode(pb.DrainNodeRequest(node_id="n3", force=True))
        assert drained.node.state == common_pb2.NODE_STATE_DRAINING

    async def test_an_undrained_node_is_active_again_and_counts_for_the_next_drain(
        self, stub: Stub, serve_fake_node: ServeFakeNode
    ) -> None:
        await register_answering_nodes(stub, serve_fake_node, 4)
        await stub.DrainNode(pb.DrainNodeRequest(node_id="n4"))
        got, _ = await status_of(stub.DrainNode(pb.DrainNodeRequest(node_id="n3")))
        assert got == grpc.StatusCode.FAILED_PRECONDITION  # n4 draining: 2 left for 3 copies
        for was_draining in (True, False):  # idempotent; the second says nothing changed
            undrained = await stub.UndrainNode(pb.UndrainNodeRequest(node_id="n4"))
            assert undrained.node.state == common_pb2.NODE_STATE_ACTIVE and undrained.node.node_id == "n4"
            assert undrained.was_draining is was_draining
        states = {n.node_id: n.state for n in (await stub.ListNodes(pb.ListNodesRequest())).nodes}
        assert states == dict.fromkeys(("n1", "n2", "n3", "n4"), common_pb2.NODE_STATE_ACTIVE)
        drained = await stub.DrainNode(pb.DrainNodeRequest(node_id="n3"))  # n4 counts again
        assert drained.node.state == common_pb2.NODE_STATE_DRAINING
        got, details = await status_of(stub.UndrainNode(pb.UndrainNodeRequest(node_id="n9")))
        assert got == grpc.StatusCode.NOT_FOUND and "start it again" in details

    async def test_a_registered_node_that_does_not_answer_cannot_take_a_drains_copies(
        self, stub: Stub, serve_fake_node: ServeFakeNode
    ) -> None:
        """Placement gives no role to a registration nobody reaches, so the drain check does
        not count it either: 3 answering nodes and a silent one, replication factor 3, is
        no room for a drain. Once the silent one answers, the drain goes through."""
        await register_answering_nodes(stub, serve_fake_node, 3)
        port = free_port()
        ghost = await stub.RegisterNode(register_request("ghost", port))
        got, details = await status_of(stub.DrainNode(pb.DrainNodeRequest(node_id="n3")))
        assert got == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "would leave 2 node(s) for a replication factor of 3" in details, details
        assert "ghost registered but not answering" in details, details
        states = {n.node_id: n.state for n in (await stub.ListNodes(pb.ListNodesRequest())).nodes}
        assert states["n3"] == common_pb2.NODE_STATE_ACTIVE  # refused: nothing changed
        _, server = await serve_fake_node("ghost")  # it comes back at an address that answers
        await stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="ghost", lease_id=ghost.lease_id))
        await stub.RegisterNode(register_request("ghost", server.port))
        drained = await stub.DrainNode(pb.DrainNodeRequest(node_id="n3"))
        assert drained.node.state == common_pb2.NODE_STATE_DRAINING

    async def test_bad_watch_request_is_invalid_argument(self, stub: Stub) -> None:
        call = stub.WatchAssignments(pb.WatchAssignmentsRequest(node_id="a/b"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    async def test_a_nodes_reported_trouble_shows_in_its_record_and_the_status_until_cleared(
        self, stub: Stub
    ) -> None:
        """A node whose storage refuses writes says so in its heartbeats: ListNodes and
        the status show it (every replica: it is in the registration), until a heartbeat
        without it clears it. A malformed report is refused and changes nothing."""
        r = await stub.RegisterNode(register_request())
        since_ms = int(time.time() * 1000) - 5_000
        beat = pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id, trouble_since_ms=since_ms,
                                   trouble="storage refuses writes: database or disk is full")
        clean = pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id)
        beating = [beat]  # what the node says in its heartbeats now (each poll beats, as a node keeps doing)

        async def troubled() -> bool:
            await stub.Heartbeat(beating[0])  # keeps the lease (TTL 2 s) and repeats the report
            [node] = (await stub.ListNodes(pb.ListNodesRequest())).nodes
            return bool(node.trouble)

        await wait_for(troubled, 5.0, "the trouble in the node's record")
        [node] = (await stub.ListNodes(pb.ListNodesRequest())).nodes
        assert (node.trouble, node.trouble_since_ms) == (beat.trouble, since_ms)

        async def warned() -> bool:
            await stub.Heartbeat(beat)
            status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
            return any("node n1 reports: storage refuses writes: database or disk is full (for " in w
                       for w in status.warnings)

        await wait_for(warned, 5.0, "the status warning")
        for bad, words in ((pb.HeartbeatRequest(trouble="x" * 600), "at most 512"),
                           (pb.HeartbeatRequest(trouble="disk\x1b[31m"), "printable text"),
                           (pb.HeartbeatRequest(trouble="disk", trouble_since_ms=-1), "Unix milliseconds")):
            bad.node_id, bad.lease_id = "n1", r.lease_id
            got, details = await status_of(stub.Heartbeat(bad))
            assert got == grpc.StatusCode.INVALID_ARGUMENT and words in details and len(details) < 200, details
        beating[0] = clean  # writes work again: heartbeats without the report

        async def cleared() -> bool:
            return not await troubled()

        await wait_for(cleared, 5.0, "the trouble to clear")

    async def test_heartbeat_with_a_malformed_shard_status_is_invalid_argument(self, stub: Stub) -> None:
        r = await stub.RegisterNode(register_request())
        request = pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id)
        request.shards.add(shard_id="not-a-shard")
        got, details = await status_of(stub.Heartbeat(request))
        assert got == grpc.StatusCode.INVALID_ARGUMENT
        assert "not-a-shard" in details


class TestConfig:
    async def test_defaults_are_created_from_the_flags(self, start_control_plane: StartControlPlane) -> None:
        app: ControlPlaneApp = await start_control_plane(lease_ttl_s=4, replication_factor=2, shards=8)
        async with grpc.aio.insecure_channel(app.address) as channel:
            config = (await Stub(channel).GetConfig(pb.GetConfigRequest())).config
        assert (config.lease_ttl_s, config.replication_factor, config.shard_count) == (4, 2, 8)
        assert config.vnodes_per_shard == 150

    async def test_valid_change_is_stored_and_applies_to_new_leases(self, stub: Stub) -> None:
        current = await stub.GetConfig(pb.GetConfigRequest())
        config = current.config
        config.lease_ttl_s = 5
        r = await stub.SetConfig(pb.SetConfigRequest(config=config, expected_revision=current.revision))
        assert r.revision > current.revision
        assert any("applies to leases granted from now on" in w for w in r.warnings), r.warnings
        assert (await stub.GetConfig(pb.GetConfigRequest())).config.lease_ttl_s == 5
        assert (await stub.RegisterNode(register_request())).ttl_ms == 5000

    async def test_removing_a_game_system_warns_that_its_data_becomes_unreachable(self, stub: Stub) -> None:
        current = await stub.GetConfig(pb.GetConfigRequest())
        config = current.config
        assert "guild" in config.consistency
        del config.consistency["guild"]
        r = await stub.SetConfig(pb.SetConfigRequest(config=config, expected_revision=current.revision))
        assert any("game systems removed: guild" in w for w in r.warnings), r.warnings

    async def test_an_expected_revision_ahead_of_the_config_says_so(self, stub: Stub) -> None:
        current = await stub.GetConfig(pb.GetConfigRequest())
        code, details = await status_of(stub.SetConfig(pb.SetConfigRequest(
            config=current.config, expected_revision=2**53)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "ahead of the config's revision" in details, details

    @pytest.mark.parametrize(
        ("field", "value", "text"),
        [
            ("replication_factor", 0, "replication_factor is 0"),
            ("lease_ttl_s", 1, "lease_ttl_s is 1"),
            ("max_moves_per_round", 0, "max_moves_per_round"),
        ],
    )
    async def test_invalid_value_is_refused_and_changes_nothing(
        self, stub: Stub, field: str, value: int, text: str
    ) -> None:
        before = await stub.GetConfig(pb.GetConfigRequest())
        config = pb.GetConfigResponse().config
        config.CopyFrom(before.config)
        setattr(config, field, value)
        got, details = await status_of(stub.SetConfig(pb.SetConfigRequest(config=config)))
        assert got == grpc.StatusCode.INVALID_ARGUMENT
        assert text in details
        after = await stub.GetConfig(pb.GetConfigRequest())
        assert (after.config, after.revision) == (before.config, before.revision)

    async def test_inventory_must_stay_strong(self, stub: Stub) -> None:
        config = (await stub.GetConfig(pb.GetConfigRequest())).config
        config.consistency["inventory"] = 2  # EVENTUAL
        got, details = await status_of(stub.SetConfig(pb.SetConfigRequest(config=config)))
        assert got == grpc.StatusCode.INVALID_ARGUMENT
        assert "inventory" in details

    async def test_stale_revision_and_shard_layout_are_failed_precondition(self, stub: Stub) -> None:
        current = await stub.GetConfig(pb.GetConfigRequest())
        config = current.config
        config.lease_ttl_s = 6
        got, _ = await status_of(stub.SetConfig(pb.SetConfigRequest(config=config, expected_revision=1)))
        assert got == grpc.StatusCode.FAILED_PRECONDITION
        config.shard_count = 32
        got, details = await status_of(stub.SetConfig(pb.SetConfigRequest(config=config)))
        assert got == grpc.StatusCode.FAILED_PRECONDITION
        assert "resharding" in details

    async def test_a_repeat_of_a_set_that_landed_answers_as_the_first(self, stub: Stub) -> None:
        """A retry after a lost answer carries the revision read before the first write:
        the config is already what it asks, so it answers with the stored config and
        revision and writes nothing. A different config at that revision is refused."""
        current = await stub.GetConfig(pb.GetConfigRequest())
        config = current.config
        config.lease_ttl_s = 7
        first = await stub.SetConfig(pb.SetConfigRequest(config=config, expected_revision=current.revision))
        again = await stub.SetConfig(pb.SetConfigRequest(config=config, expected_revision=current.revision))
        assert (again.config, again.revision) == (first.config, first.revision)
        config.lease_ttl_s = 8
        got, details = await status_of(stub.SetConfig(pb.SetConfigRequest(config=config,
                                                                         expected_revision=current.revision)))
        assert got == grpc.StatusCode.FAILED_PRECONDITION and "changed since revision" in details


async def test_only_ids_matching_the_node_id_pattern_register(start_control_plane: StartControlPlane) -> None:
    app = await start_control_plane(node_id_pattern=re.compile(r"bm-node-[0-9]+"))
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)  # type: ignore[no-untyped-call]
        await stub.RegisterNode(register_request("bm-node-0"))
        for outsider in ("gs-1", "bm-node-0x", "xbm-node-1"):
            code, details = await status_of(stub.RegisterNode(register_request(outsider, port=7102)))
            assert code == grpc.StatusCode.PERMISSION_DENIED, details
            assert "is not a node id of this cluster" in details and "--node-id-pattern" in details
        assert await node_ids(stub) == ["bm-node-0"]


async def test_the_status_lists_force_promotions_waiting_for_the_leader(start_control_plane: StartControlPlane) -> None:
    """A promote that timed out leaves its request for the leader: the status says it
    stands and how it ends. A key the control plane did not write is passed over."""
    from bluemarble.core.ids import ShardId
    from controlplane.store import codec

    app = await start_control_plane()
    request = pb.ForcePromoteRequest(shard_id="shard-3", node_id="n7", accept_data_loss=True)
    await app.store.put(app.keys.force_promotion(ShardId("shard-3")), codec.encode(request))
    await app.store.put(app.keys.force_promotions_prefix() + "junk", codec.encode(request))
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = Stub(channel)

        async def listed() -> bool:
            status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
            return any(w.startswith("a ForcePromote of shard-3 to 'n7' waits for the leader") for w in status.warnings)

        await wait_for(listed, 5.0, "the waiting request in the status")
        status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
        assert sum("ForcePromote" in w for w in status.warnings) == 1, status.warnings


class TestRecordsEditedByHand:
    """Node records changed in etcd behind the control plane's back (etcdctl del, a put
    that detaches the key from its lease, a value that is no Node)."""

    async def test_a_deleted_record_answers_not_found_and_the_node_registers_again(
        self, control_plane: ControlPlaneApp, stub: Stub
    ) -> None:
        """`etcdctl del .../nodes/n1` left the lease alive and the heartbeats answered OK
        from the replica's cache, so the node never registered again while the leader
        counted it gone. Now its next heartbeat is NOT_FOUND and its orphaned lease is
        revoked; a heartbeat right after the registration (before the mirror has it) is
        served."""
        from bluemarble.core.ids import NodeId

        r = await stub.RegisterNode(register_request())
        await stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id))
        await control_plane.store.delete(control_plane.keys.node(NodeId("n1")))

        async def refused() -> bool:
            try:
                await stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id))
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e.details()
                assert "register again" in (e.details() or "")
                return True
            return False

        await wait_for(refused, 3.0, "the heartbeat of the deleted node to be NOT_FOUND")
        assert await control_plane.store.lease_ttl(r.lease_id) == -1  # revoked, not kept alive
        again = await stub.RegisterNode(register_request())
        await stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=again.lease_id))
        assert await node_ids(stub) == ["n1"]

    async def test_a_record_detached_from_its_lease_answers_not_found_and_is_replaced(
        self, control_plane: ControlPlaneApp, stub: Stub
    ) -> None:
        """A put without a lease keeps the record but detaches it: it would never expire.
        The heartbeat under the old lease is NOT_FOUND (that lease is revoked) and the
        registration replaces the record, attached to the new lease; a detached record
        from another address does not hold the node id either."""
        from bluemarble.core.ids import NodeId

        key = control_plane.keys.node(NodeId("n1"))
        r = await stub.RegisterNode(register_request())
        await stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id))
        kv = await control_plane.store.get(key)
        assert kv is not None and kv.lease == r.lease_id
        await control_plane.store.put(key, kv.value)  # the same value, no lease

        async def refused() -> bool:
            try:
                await stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id))
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e.details()
                assert "attached to no lease" in (e.details() or ""), e.details()
                return True
            return False

        await wait_for(refused, 3.0, "the heartbeat of the detached node to be NOT_FOUND")
        assert await control_plane.store.lease_ttl(r.lease_id) == -1
        again = await stub.RegisterNode(register_request())
        kv = await control_plane.store.get(key)
        assert kv is not None and kv.lease == again.lease_id
        # Detached again, then registered from another address: the record is nobody's.
        await control_plane.store.put(key, kv.value)
        moved = await stub.RegisterNode(register_request(port=7109))
        nodes = (await stub.ListNodes(pb.ListNodesRequest())).nodes
        assert [(n.address, n.lease_id) for n in nodes] == [("127.0.0.1:7109", moved.lease_id)]

    async def test_an_unreadable_record_leaves_the_others_listed_and_is_reported_once(
        self, control_plane: ControlPlaneApp, stub: Stub
    ) -> None:
        """`etcdctl put .../nodes/n2 'garbage{'` made ListNodes and GetClusterStatus fail
        with DATA_LOSS. Now the other nodes are listed, the status names the key and says
        to delete it, and the log says so once, not on every call. A live n2 gets NOT_FOUND
        and its registration replaces the garbage."""
        from bluemarble.core.ids import NodeId

        r1 = await stub.RegisterNode(register_request("n1", 7101))
        r2 = await stub.RegisterNode(register_request("n2", 7102))
        await stub.RegisterNode(register_request("n3", 7103))
        key = control_plane.keys.node(NodeId("n2"))
        with structlog.testing.capture_logs() as logged:
            await control_plane.store.put(key, b"garbage{")
            for _ in range(3):
                assert await node_ids(stub) == ["n1", "n3"]
                status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
                assert status.node_count == 2
                [warning] = [w for w in status.warnings if key in w]
                assert "unreadable node record" in warning and "never expires: delete it" in warning, warning
                assert f"etcdctl del '{key}'" in warning, warning
        told = [e for e in logged if e["event"].startswith("unreadable node record left out")]
        assert len(told) == 1 and told[0]["key"] == key and told[0]["log_level"] == "warning", told
        await stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=r1.lease_id))  # others unaffected
        code, details = await status_of(stub.Heartbeat(pb.HeartbeatRequest(node_id="n2", lease_id=r2.lease_id)))
        assert code == grpc.StatusCode.NOT_FOUND, details
        await stub.RegisterNode(register_request("n2", 7102))
        assert await node_ids(stub) == ["n1", "n2", "n3"]
        status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
        assert not [w for w in status.warnings if "unreadable" in w], status.warnings


async def test_a_garbage_leader_key_is_replaced_by_a_new_term(start_control_plane: StartControlPlane) -> None:
    """`etcdctl put .../leader 'garbage{'` (no lease: it never expires) left status at
    "leader (unreadable)" and, once the leader restarted, nobody was ever elected. Now the
    leader steps down, a campaign deletes the leaseless key and a leader is elected again
    with a key on its session lease."""
    app = await start_control_plane()
    assert app.election is not None
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = Stub(channel)

        async def led_by_cp0() -> bool:
            kv = await app.store.get(app.keys.leader())
            status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
            return status.leader == "cp-0" and kv is not None and kv.lease != 0

        await wait_for(led_by_cp0, 10.0, "a leader")
        first = app.election.terms
        await app.store.put(app.keys.leader(), b"garbage{")
        await wait_for(led_by_cp0, 10.0, "a new term on a leased key")
        assert app.election.terms == first + 1
