"""Every bad input found by probing a running cluster, sent to a real control plane (and
a shard node's server): each gets its own status, a short message a person can act on,
and changes nothing stored.

Raw bytes go through a generic channel call (no serializer), so requests no
well-behaved client could build (invalid UTF-8, truncated messages) are tested too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import prometheus_client
import pytest
import structlog
import structlog.testing
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bluemarble.core import limits
from bluemarble.core.ids import ShardId
from bluemarble.runtime import grpc_server, retry
from bluemarble.runtime.grpc_server import ServiceBinding, build_server
from bluemarble.v1 import (
    common_pb2,
    controlplane_pb2_grpc,
    shardnode_pb2,
    shardnode_pb2_grpc,
    trade_pb2,
    trade_pb2_grpc,
)
from bluemarble.v1 import controlplane_pb2 as pb
from controlplane.server.app import ControlPlaneApp
from controlplane.server.service import SINGLE_COPY_WARNING
from controlplane.store import codec
from shardnode.service import ShardNodeService
from tests.conftest import StartControlPlane, StreamNode, wait_for

pytestmark = pytest.mark.integration
Stub = controlplane_pb2_grpc.ControlPlaneStub

SHORT = 300  # characters a status message may have: enough to act on, never an echo
CP = "/bluemarble.v1.ControlPlane"
NOT_UTF8 = b"\xff\xfe"


def field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2), for hand-made requests."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def register_request(node_id: str = "n1", address: str = "127.0.0.1:7101") -> pb.RegisterNodeRequest:
    return pb.RegisterNodeRequest(node_id=node_id, address=address, zone="z1")


async def refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status a unary call, or a stream read to its end, was refused with."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return info.value.code(), info.value.details() or ""


def assert_short(details: str) -> None:
    assert details, "a refusal must say why"
    assert len(details) < SHORT, f"{len(details)} chars: {details[:200]}..."
    for leak in ("invalid literal", "Traceback", "Exception", "DecodeError"):
        assert leak not in details, details


async def stored(app: ControlPlaneApp) -> dict[str, tuple[bytes, int]]:
    """What bad input could change: node records, the config and the ring, with their
    mod revisions. (Assignments are left out: the leader writes them on its own.)"""
    kvs, _ = await app.store.get_prefix(app.keys.prefix)
    keep = (app.keys.nodes_prefix(), app.keys.config(), app.keys.ring())
    return {kv.key: (kv.value, kv.mod_revision) for kv in kvs if kv.key.startswith(keep)}


async def views(stub: Stub) -> tuple[list[tuple[str, str, int]], pb.GetConfigResponse]:
    nodes = (await stub.ListNodes(pb.ListNodesRequest())).nodes
    return [(n.node_id, n.address, n.lease_id) for n in nodes], await stub.GetConfig(pb.GetConfigRequest())


class Unchanged:
    """``async with Unchanged(app, stub):`` asserts etcd, ListNodes and GetConfig are the
    same after the block as before it."""

    def __init__(self, app: ControlPlaneApp, stub: Stub):
        self.app, self.stub = app, stub

    async def __aenter__(self) -> None:
        self.before = (await stored(self.app), await views(self.stub))

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            assert (await stored(self.app), await views(self.stub)) == self.before


@pytest.fixture
async def channel(control_plane: ControlPlaneApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(control_plane.address) as ch:
        yield ch


def raw_unary(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


async def serving(channel: grpc.aio.Channel) -> bool:
    raw = await raw_unary(channel, "/grpc.health.v1.Health/Check")(b"")
    return health_pb2.HealthCheckResponse.FromString(raw).status == health_pb2.HealthCheckResponse.SERVING


# ---- 1. requests that do not parse --------------------------------------------------

UNDECODABLE = [
    ("RegisterNode", field(1, NOT_UTF8) + field(2, b"127.0.0.1:7101"), "RegisterNodeRequest"),
    ("RegisterNode", field(1, b"n1")[:-1], "RegisterNodeRequest"),  # truncated
    ("RegisterNode", b"\x0a\x7fabc", "RegisterNodeRequest"),  # length runs past the end
    ("Heartbeat", field(1, NOT_UTF8), "HeartbeatRequest"),
    ("Heartbeat", field(3, field(1, NOT_UTF8)), "HeartbeatRequest"),  # inside a ShardStatus
    ("DeregisterNode", field(1, b"\xc3"), "DeregisterNodeRequest"),  # half a character
    ("DrainNode", field(1, NOT_UTF8), "DrainNodeRequest"),
    ("UndrainNode", field(1, NOT_UTF8), "UndrainNodeRequest"),
    ("ResolvePlayer", field(1, NOT_UTF8), "ResolvePlayerRequest"),
    ("SetConfig", field(1, field(5, field(1, NOT_UTF8))), "SetConfigRequest"),  # a map key
    ("GetConfig", b"\x07", "GetConfigRequest"),  # wire type 7 does not exist
]


class TestUndecodableRequests:
    @pytest.mark.parametrize(("rpc", "raw", "message"), UNDECODABLE)
    async def test_unary_is_invalid_argument_and_changes_nothing(
        self,
        control_plane: ControlPlaneApp,
        stub: Stub,
        channel: grpc.aio.Channel,
        caplog: pytest.LogCaptureFixture,
        rpc: str,
        raw: bytes,
        message: str,
    ) -> None:
        await stub.RegisterNode(register_request())
        async with Unchanged(control_plane, stub):
            code, details = await refusal(raw_unary(channel, f"{CP}/{rpc}")(raw))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert f"request is not a valid bluemarble.v1.{message}" in details
        assert_short(details)
        # No traceback from grpc's "Unexpected error raised by servicer method".
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text

    async def test_bad_message_inside_heartbeat_stream_ends_it_with_invalid_argument(
        self, control_plane: ControlPlaneApp, stub: Stub, channel: grpc.aio.Channel
    ) -> None:
        r = await stub.RegisterNode(register_request())
        good = pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id).SerializeToString()
        call = channel.stream_stream(
            f"{CP}/HeartbeatStream", request_serializer=None, response_deserializer=None
        )()
        await call.write(good)
        assert pb.HeartbeatResponse.FromString(await call.read()).ttl_ms == 2000
        async with Unchanged(control_plane, stub):
            await call.write(field(1, NOT_UTF8))
            code, details = await refusal(call.read())
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid bluemarble.v1.HeartbeatRequest" in details
        assert_short(details)
        # The node was not harmed: its lease still refreshes.
        await stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id))

    async def test_server_streaming_call_is_invalid_argument(self, channel: grpc.aio.Channel) -> None:
        call = channel.unary_stream(
            f"{CP}/WatchAssignments", request_serializer=None, response_deserializer=None
        )(field(1, NOT_UTF8))
        code, details = await refusal(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid bluemarble.v1.WatchAssignmentsRequest" in details

    async def test_health_and_trade_services_are_guarded_too(self, channel: grpc.aio.Channel) -> None:
        for method, message in (
            ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest"),
            ("/bluemarble.v1.TradeCoordinator/ExecuteTrade", "bluemarble.v1.ExecuteTradeRequest"),
        ):
            code, details = await refusal(raw_unary(channel, method)(field(1, NOT_UTF8)))
            assert (code, message in details) == (grpc.StatusCode.INVALID_ARGUMENT, True), details
        # Still serving.
        assert await serving(channel)


# ---- 2. huge values are refused with a short message --------------------------------

HUGE = 1024 * 1024 - 1024  # just under the control plane's request cap


class TestHugeValues:
    @pytest.mark.parametrize(
        ("request_", "text"),
        [
            (pb.RegisterNodeRequest(node_id="n9", address="1" * HUGE), "characters long"),
            (pb.RegisterNodeRequest(node_id="n9", address="h" * HUGE + ":1"), "characters long"),
            (pb.RegisterNodeRequest(node_id="a/" * (HUGE // 2), address="127.0.0.1:1"), "bytes long"),
            (pb.RegisterNodeRequest(node_id="n9", address="127.0.0.1:1", zone=" " * HUGE), "zone"),
        ],
    )
    async def test_registration(
        self,
        control_plane: ControlPlaneApp,
        stub: Stub,
        capfd: pytest.CaptureFixture[str],
        request_: pb.RegisterNodeRequest,
        text: str,
    ) -> None:
        capfd.readouterr()
        async with Unchanged(control_plane, stub):
            code, details = await refusal(stub.RegisterNode(request_))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details  # not RESOURCE_EXHAUSTED
        assert text in details
        assert_short(details)
        logged = capfd.readouterr()
        assert len(logged.out) + len(logged.err) < 10_000  # the log does not echo it either

    async def test_heartbeat_shard_id(self, control_plane: ControlPlaneApp, stub: Stub) -> None:
        r = await stub.RegisterNode(register_request())
        request = pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id)
        request.shards.add(shard_id="shard-" + "1" * HUGE)
        async with Unchanged(control_plane, stub):
            code, details = await refusal(stub.Heartbeat(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert_short(details)

    async def test_player_id_and_config(self, control_plane: ControlPlaneApp, stub: Stub) -> None:
        code, details = await refusal(stub.ResolvePlayer(pb.ResolvePlayerRequest(player_id="p" * HUGE)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert_short(details)
        config = (await stub.GetConfig(pb.GetConfigRequest())).config
        config.consistency["é" * (HUGE // 4)] = common_pb2.CONSISTENCY_MODEL_EVENTUAL
        async with Unchanged(control_plane, stub):
            code, details = await refusal(stub.SetConfig(pb.SetConfigRequest(config=config)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "consistency system name" in details
        assert_short(details)

    async def test_many_bad_config_entries_give_one_short_message(
        self, control_plane: ControlPlaneApp, stub: Stub
    ) -> None:
        config = (await stub.GetConfig(pb.GetConfigRequest())).config
        for i in range(5000):
            config.consistency[f"Bad-{i}"] = 99  # type: ignore[assignment]
        async with Unchanged(control_plane, stub):
            code, details = await refusal(stub.SetConfig(pb.SetConfigRequest(config=config)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 64" in details
        assert_short(details)


class TestControlCharacters:
    """Ids reach console logs: control characters (NUL, ESC of ANSI codes, C1, bidi
    overrides) and whitespace-only ids are refused naming the field, never echoed raw."""

    @pytest.mark.parametrize(
        ("node_id", "text"),
        [("\U0001f3ae\U0001f5e1\ufe0f\U0001f47e", "use letters, digits"), ("..", "path step"),
         ("n\x1b[2J", "contains the characters"), ("n\u202e1", "contains the characters")],
    )
    async def test_node_ids_outside_the_stated_rule(
        self, control_plane: ControlPlaneApp, stub: Stub, capfd: pytest.CaptureFixture[str], node_id: str, text: str
    ) -> None:
        capfd.readouterr()
        async with Unchanged(control_plane, stub):
            code, details = await refusal(stub.RegisterNode(register_request(node_id)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "node_id" in details and text in details, details
        assert "\x1b" not in details and "\u202e" not in details
        logged = capfd.readouterr()
        assert "\x1b[2J" not in logged.out + logged.err

    @pytest.mark.parametrize("player", ["\x1b[31mred", "a\x00b", "a\x9bb", "  "])
    async def test_player_ids(self, stub: Stub, player: str) -> None:
        code, details = await refusal(stub.ResolvePlayer(pb.ResolvePlayerRequest(player_id=player)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "player_id" in details, details
        assert player not in details

    @pytest.mark.parametrize(
        ("change", "field_name"),
        [({"trade_id": "t\x00"}, "trade_id"), ({"trade_id": " "}, "trade_id"), ({"player_a": "\u202eA"}, "player_a"),
         ({"a_gives": common_pb2.Offer(item_ids=["sw\x1bord"])}, "a_gives.item_ids[0]")],
    )
    async def test_trade_ids(self, channel: grpc.aio.Channel, change: dict[str, Any], field_name: str) -> None:
        fields: dict[str, Any] = {"trade_id": "t1", "player_a": "A", "player_b": "B",
                                  "a_gives": common_pb2.Offer(item_ids=["sword"]), **change}
        trades = trade_pb2_grpc.TradeCoordinatorStub(channel)  # type: ignore[no-untyped-call]
        code, details = await refusal(trades.ExecuteTrade(trade_pb2.ExecuteTradeRequest(**fields)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and field_name in details, details


# ---- 3. addresses no node can be reached at, or that another node holds --------------


class TestAddresses:
    @pytest.mark.parametrize(
        ("address", "text"),
        [
            ("0.0.0.0:7101", "unspecified"),
            ("[::]:7101", "unspecified"),
            ("[::ffff:0.0.0.0]:7101", "unspecified"),
            ("255.255.255.255:7101", "broadcast"),
            ("224.0.0.1:7101", "multicast"),
            ("[ff02::1]:7101", "multicast"),
            ("nœud.game:7101", "not ASCII"),
            ("127.0.0.1:٧١٠١", "not ASCII"),  # Arabic-Indic digits: int() would read 7101
            ("١٢٧.0.0.1:7101", "not ASCII"),
        ],
    )
    async def test_unreachable_or_non_ascii_host_is_invalid_argument(
        self, control_plane: ControlPlaneApp, stub: Stub, address: str, text: str
    ) -> None:
        async with Unchanged(control_plane, stub):
            code, details = await refusal(stub.RegisterNode(register_request("n1", address)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert text in details
        assert_short(details)

    @pytest.mark.parametrize(
        ("first", "second"),
        [
            ("127.0.0.1:7101", "127.0.0.1:7101"),
            ("node-1.game:7101", "NODE-1.Game:7101"),  # host names ignore case
            ("[::1]:7101", "[0:0::1]:7101"),  # two spellings of one IPv6 address
        ],
    )
    async def test_address_held_by_another_live_node_is_already_exists(
        self, control_plane: ControlPlaneApp, stub: Stub, first: str, second: str
    ) -> None:
        await stub.RegisterNode(register_request("n1", first))
        async with Unchanged(control_plane, stub):
            code, details = await refusal(stub.RegisterNode(register_request("n2", second)))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        assert "held by live node n1" in details
        assert_short(details)

    async def test_address_is_free_again_once_its_node_left(self, stub: Stub) -> None:
        r = await stub.RegisterNode(register_request("n1"))
        await stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="n1", lease_id=r.lease_id))
        await stub.RegisterNode(register_request("n2"))
        nodes = (await stub.ListNodes(pb.ListNodesRequest())).nodes
        assert [(n.node_id, n.address) for n in nodes] == [("n2", "127.0.0.1:7101")]

    async def test_same_node_from_the_same_address_may_register_again(self, stub: Stub) -> None:
        first = await stub.RegisterNode(register_request("n1"))
        second = await stub.RegisterNode(register_request("n1"))
        assert second.lease_id != first.lease_id
        nodes = (await stub.ListNodes(pb.ListNodesRequest())).nodes
        assert [(n.node_id, n.lease_id) for n in nodes] == [("n1", second.lease_id)]

    async def test_held_address_is_refused_by_every_replica(self, start_control_plane: StartControlPlane) -> None:
        a, b = await start_control_plane(), await start_control_plane()
        async with grpc.aio.insecure_channel(a.address) as ca, grpc.aio.insecure_channel(b.address) as cb:
            await Stub(ca).RegisterNode(register_request("n1"))
            assert b.nodes is not None
            key = b.keys.node("n1")  # type: ignore[arg-type]
            await until(lambda: key in b.nodes.entries, "replica b's mirror to see n1")  # type: ignore[union-attr]
            code, details = await refusal(Stub(cb).RegisterNode(register_request("n2")))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        assert "n1" in details


async def until(condition: Any, what: str, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.02)


# ---- 4. heartbeat shard statuses ----------------------------------------------------


class TestHeartbeatStatuses:
    @pytest.mark.parametrize(
        ("status", "text"),
        [
            (common_pb2.ShardStatus(shard_id="shard-99999"), "not a shard of the ring"),
            (common_pb2.ShardStatus(shard_id="shard-16"), "has 16 shards"),
            (common_pb2.ShardStatus(shard_id="shard-١"), "ASCII digits"),
            (common_pb2.ShardStatus(shard_id="shard-01"), "write shard-1"),
            (common_pb2.ShardStatus(shard_id="shard-"), "does not end with a number"),
            (common_pb2.ShardStatus(shard_id="shard-1234567890123"), "more than 9 digits"),
            (common_pb2.ShardStatus(shard_id="not-a-shard"), "does not start with 'shard-'"),
            (common_pb2.ShardStatus(shard_id="shard-1", role=99), "role 99"),  # type: ignore[arg-type]
            (common_pb2.ShardStatus(shard_id="shard-1", role=-1), "role -1"),  # type: ignore[arg-type]
            (common_pb2.ShardStatus(shard_id="shard-1", role=1, epoch=2**64 - 1), "shards[0].epoch is"),
            (common_pb2.ShardStatus(shard_id="shard-1", role=1, applied_lsn=2**63), "2^63-1"),
        ],
    )
    async def test_bad_status_is_invalid_argument(
        self, control_plane: ControlPlaneApp, stub: Stub, status: common_pb2.ShardStatus, text: str
    ) -> None:
        r = await stub.RegisterNode(register_request())
        request = pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id, shards=[status])
        async with Unchanged(control_plane, stub):
            code, details = await refusal(stub.Heartbeat(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert text in details
        assert "shards[0]" in details
        assert_short(details)

    async def test_a_shard_reported_twice_is_invalid_argument(self, stub: Stub) -> None:
        r = await stub.RegisterNode(register_request())
        request = pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id)
        request.shards.add(shard_id="shard-3", role=common_pb2.SHARD_ROLE_PRIMARY)
        request.shards.add(shard_id="shard-3", role=common_pb2.SHARD_ROLE_REPLICA)
        code, details = await refusal(stub.Heartbeat(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "shards[1]: shard-3 is reported twice" in details

    async def test_good_statuses_are_accepted(self, stub: Stub) -> None:
        r = await stub.RegisterNode(register_request())
        request = pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id)
        request.shards.add(shard_id="shard-0", role=common_pb2.SHARD_ROLE_PRIMARY, epoch=3, applied_lsn=2**63 - 1)
        request.shards.add(shard_id="shard-15", role=common_pb2.SHARD_ROLE_REPLICA)
        assert (await stub.Heartbeat(request)).ttl_ms == 2000


# ---- 5. config: system names, and a replication factor above the live nodes ----------


class TestConfigAndReplication:
    @pytest.mark.parametrize("name", ["é", "x²", "", "Chat", "a-b", "a b", "a" * 65, "١"])
    async def test_system_name_outside_the_rule_is_refused(
        self, control_plane: ControlPlaneApp, stub: Stub, name: str
    ) -> None:
        config = (await stub.GetConfig(pb.GetConfigRequest())).config
        config.consistency[name] = common_pb2.CONSISTENCY_MODEL_EVENTUAL
        async with Unchanged(control_plane, stub):
            code, details = await refusal(stub.SetConfig(pb.SetConfigRequest(config=config)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "must be 1..64 of a-z, 0-9 or '_'" in details
        assert_short(details)

    @pytest.mark.parametrize("removed", ["all", "inventory", "trade"])
    async def test_a_config_without_the_strong_systems_is_refused(
        self, control_plane: ControlPlaneApp, stub: Stub, removed: str
    ) -> None:
        # grpcurl users may send only the numeric fields: that must not delete every system.
        config = (await stub.GetConfig(pb.GetConfigRequest())).config
        if removed == "all":
            config.ClearField("consistency")
        else:
            del config.consistency[removed]
        async with Unchanged(control_plane, stub):
            code, details = await refusal(stub.SetConfig(pb.SetConfigRequest(config=config)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert ("consistency is empty" if removed == "all" else f"lacks {removed!r}") in details, details
        assert_short(details)

    async def test_status_reports_under_replication(self, stub: Stub) -> None:
        await stub.RegisterNode(register_request("n1", "127.0.0.1:7101"))
        await stub.RegisterNode(register_request("n2", "127.0.0.1:7102"))
        await stub.DrainNode(pb.DrainNodeRequest(node_id="n2", force=True))  # 1 node left for 3 copies
        status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
        assert status.config.replication_factor == 3
        assert (status.node_count, status.live_nodes_eligible, status.effective_replication_factor) == (2, 1, 1)
        assert status.shards_under_replicated == 16  # no shard can have 3 live copies
        assert any("replication_factor is 3 but only 1 live nodes are eligible" in w for w in status.warnings)
        assert any("16 of 16 shards have fewer than 3 live copies" in w for w in status.warnings)
        await stub.DrainNode(pb.DrainNodeRequest(node_id="n1", force=True))  # every node draining
        status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
        assert (status.live_nodes_eligible, status.effective_replication_factor) == (2, 2)  # drains ignored
        assert any("every live node (2) is draining: no drain can finish" in w for w in status.warnings), (
            status.warnings)

    async def test_status_warns_of_shards_whose_primary_is_their_only_copy(
        self, control_plane: ControlPlaneApp, stub: Stub
    ) -> None:
        assert control_plane.reconciler is not None and control_plane.ring is not None
        await control_plane.reconciler.stop()  # this test places the shards itself
        node = StreamNode(stub, "n1", "127.0.0.1:7101")
        await node.start()
        ring = control_plane.ring.entries[control_plane.keys.ring()]
        for shard in ring.shard_ids:  # every shard on n1, and no replica anywhere
            record = common_pb2.Assignment(shard_id=shard, epoch=1, primary="n1",
                                           state=common_pb2.ASSIGNMENT_STATE_ACTIVE)
            await control_plane.store.put(control_plane.keys.assignment(shard), codec.encode(record))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
        while status.shards_without_primary:  # until this replica's mirror has them all
            assert loop.time() < deadline, status
            await asyncio.sleep(0.05)
            status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
        await node.close_stream()
        assert any("16 of 16 shards have no live replica: their primary alone acknowledges" in w
                   for w in status.warnings), status.warnings

    async def test_a_primary_registered_again_since_its_role_counts_as_no_primary(
        self, control_plane: ControlPlaneApp, stub: Stub
    ) -> None:
        """A node that restarted (a new lease) lost the roles of its old incarnation: its
        shards have no primary until the leader places them again, and status and the
        gauge say so, naming the node as registered again, not as a healthy primary."""
        assert control_plane.reconciler is not None and control_plane.ring is not None
        await control_plane.reconciler.stop()  # this test places the shards itself
        node = StreamNode(stub, "n1", "127.0.0.1:7101")
        await node.start()
        ring = control_plane.ring.entries[control_plane.keys.ring()]
        for i, shard in enumerate(ring.shard_ids):  # every shard on n1; 4 given to an older incarnation
            record = common_pb2.Assignment(shard_id=shard, epoch=1, primary="n1",
                                           state=common_pb2.ASSIGNMENT_STATE_ACTIVE)
            record.incarnations["n1"] = node.lease_id + (1 if i < 4 else 0)
            await control_plane.store.put(control_plane.keys.assignment(shard), codec.encode(record))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
        while status.shards_without_primary != 4:  # until this replica's mirror has them all
            assert loop.time() < deadline, status
            await asyncio.sleep(0.05)
            status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
        control_plane.refresh_gauges()
        await node.close_stream()
        assert any("4 of 16 shards have no live primary; lost members they name: n1 registered again (4 shards)" in w
                   for w in status.warnings), status.warnings
        assert prometheus_client.REGISTRY.get_sample_value("bluemarble_shards_without_primary") == 4

    async def test_status_warns_of_copies_still_copying_and_primaries_not_taking_writes(
        self, control_plane: ControlPlaneApp, stub: Stub
    ) -> None:
        assert control_plane.reconciler is not None
        await control_plane.reconciler.stop()  # this test places the shards itself
        role = common_pb2.SHARD_ROLE_PRIMARY, common_pb2.SHARD_ROLE_REPLICA
        reports = {  # what each node answers GetShardStatus with
            "n1": [common_pb2.ShardStatus(shard_id="shard-0", epoch=1, role=role[0], serving=True),
                   common_pb2.ShardStatus(shard_id="shard-1", epoch=1, role=role[0], serving=False)],
            "n2": [common_pb2.ShardStatus(shard_id="shard-0", epoch=1, role=role[1], serving=False),
                   common_pb2.ShardStatus(shard_id="shard-1", epoch=1, role=role[1], serving=True)],
        }
        servers, beats = [], []
        for node_id, statuses in reports.items():
            server = await build_server("127.0.0.1:0", [ServiceBinding(
                shardnode_pb2.DESCRIPTOR.services_by_name["ShardNode"].full_name,
                ReportingNode(node_id, statuses), shardnode_pb2_grpc.add_ShardNodeServicer_to_server)])
            servers.append(server)
            beat = StreamNode(stub, node_id, f"127.0.0.1:{server.port}")
            await beat.start()
            beats.append(beat)
        for shard in ("shard-0", "shard-1"):
            record = common_pb2.Assignment(shard_id=shard, epoch=1, primary="n1", replicas=["n2"],
                                           state=common_pb2.ASSIGNMENT_STATE_ACTIVE)
            await control_plane.store.put(control_plane.keys.assignment(ShardId(shard)), codec.encode(record))
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:
                status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
                if len(status.warnings) >= 2 and any("still copying" in w for w in status.warnings):
                    break
                assert loop.time() < deadline, status
                await asyncio.sleep(0.05)
            assert any("1 of 16 shards have a replica still copying, or 5 s or more behind: shard-0" in w
                       for w in status.warnings), status.warnings
            assert any("1 of 16 shards have a primary not taking writes (catching up, or fenced): shard-1" in w
                       for w in status.warnings), status.warnings
        finally:
            for beat in beats:
                await beat.close_stream()
            for server in servers:
                await server.stop_gracefully(0.1)

    async def test_set_config_warns_of_a_factor_above_the_live_nodes(self, stub: Stub) -> None:
        await stub.RegisterNode(register_request("n1"))
        current = await stub.GetConfig(pb.GetConfigRequest())
        config = current.config
        config.replication_factor = 5
        r = await stub.SetConfig(pb.SetConfigRequest(config=config, expected_revision=current.revision))
        assert r.config.replication_factor == 5  # stored: nodes may join later
        assert [w for w in r.warnings if "replication_factor is 5 but only 1" in w]
        config.replication_factor = 2
        r = await stub.SetConfig(pb.SetConfigRequest(config=config))
        assert [w for w in r.warnings if "replication_factor is 2 but only 1" in w]
        config.replication_factor = 1  # fits the one node, and says what it costs
        r = await stub.SetConfig(pb.SetConfigRequest(config=config))
        assert list(r.warnings) == [SINGLE_COPY_WARNING]
        r = await stub.SetConfig(pb.SetConfigRequest(config=config))  # unchanged: said once
        assert list(r.warnings) == []
        status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
        assert SINGLE_COPY_WARNING in status.warnings
        code, details = await refusal(stub.SetConfig(pb.SetConfigRequest(config=config, expected_revision=-1)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "expected_revision is -1" in details


# ---- 6. request size caps -----------------------------------------------------------


class TestRequestSize:
    async def test_a_2_mb_request_is_refused_at_once_and_the_server_stays_healthy(
        self, control_plane: ControlPlaneApp, stub: Stub, channel: grpc.aio.Channel
    ) -> None:
        huge = pb.RegisterNodeRequest(node_id="n1", address="127.0.0.1:7101", region="r" * (2 * 1024 * 1024))
        loop = asyncio.get_running_loop()
        async with Unchanged(control_plane, stub):
            started = loop.time()
            code, details = await refusal(stub.RegisterNode(huge, timeout=10))
            took_s = loop.time() - started
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # not DEADLINE_EXCEEDED: refused, not stuck
        # "At once": no timer is involved, only the transfer of 2 MB on loopback; the bound
        # is loose because a busy 2-core machine stretches that (1.004 s was seen in CI).
        assert took_s < 5.0, took_s
        assert_short(details)
        # A 2 MB message inside the heartbeat stream ends that stream the same way. (The
        # node's address accepts connections: a broken stream from a node whose address
        # refuses them counts as a crash, and its lease would be revoked.)
        listener = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        r = await stub.RegisterNode(register_request(address=f"127.0.0.1:{port}"))
        call = stub.HeartbeatStream()
        await call.write(pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id))
        await call.read()
        await call.write(pb.HeartbeatRequest(node_id="n1" * (1024 * 1024), lease_id=r.lease_id))
        code, _ = await refusal(call.read())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await serving(channel)
        try:
            await stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id))
        finally:
            listener.close()

    async def test_the_largest_legal_heartbeat_fits(self, stub: Stub) -> None:
        r = await stub.RegisterNode(register_request())
        request = pb.HeartbeatRequest(node_id="n" * 128, lease_id=r.lease_id)
        for i in range(limits.MAX_SHARD_STATUSES):
            request.shards.add(shard_id=f"shard-{i}", epoch=2**63 - 1, role=2, applied_lsn=2**63 - 1)
        assert request.ByteSize() < limits.CONTROL_PLANE_MAX_REQUEST_BYTES
        code, details = await refusal(stub.Heartbeat(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT  # parsed and judged, not cut off by size
        assert "not a shard of the ring" in details


# ---- 8. WatchAssignments.start_revision ---------------------------------------------


class TestStartRevision:
    async def test_a_revision_etcd_has_not_reached_is_out_of_range(self, stub: Stub) -> None:
        current = (await stub.ListAssignments(pb.ListAssignmentsRequest())).revision
        ahead = current + 1_000_000
        code, details = await refusal(stub.WatchAssignments(pb.WatchAssignmentsRequest(start_revision=ahead)))
        assert code == grpc.StatusCode.OUT_OF_RANGE
        assert f"start_revision {ahead} is ahead of the cluster's revision" in details
        assert_short(details)

    async def test_negative_is_invalid_argument(self, stub: Stub) -> None:
        code, details = await refusal(stub.WatchAssignments(pb.WatchAssignmentsRequest(start_revision=-1)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "start_revision is -1" in details

    @pytest.mark.parametrize("offset", [None, 0, -1])
    async def test_a_seen_revision_starts_with_a_snapshot_that_says_its_revision(
        self, control_plane: ControlPlaneApp, stub: Stub, offset: int | None
    ) -> None:
        listed = (await stub.ListAssignments(pb.ListAssignmentsRequest())).revision
        start = 1 if offset is None else max(listed + offset, 1)
        call = stub.WatchAssignments(pb.WatchAssignmentsRequest(start_revision=start))
        first = await call.read()
        call.cancel()
        assert first.snapshot
        assert first.revision >= start
        assert first.revision >= listed

    async def test_a_revision_the_mirror_has_not_seen_but_etcd_has_is_served(
        self, control_plane: ControlPlaneApp, stub: Stub
    ) -> None:
        # A node registration moves etcd's revision past the assignments mirror's.
        await stub.RegisterNode(register_request())
        etcd_revision = await control_plane.store.current_revision()
        call = stub.WatchAssignments(pb.WatchAssignmentsRequest(start_revision=etcd_revision))
        first = await asyncio.wait_for(call.read(), 5)
        call.cancel()
        assert first.snapshot and first.revision > 0


# ---- the shard node's server has the same protections --------------------------------


@pytest.fixture
async def node_channel() -> AsyncIterator[grpc.aio.Channel]:
    server = await build_server(
        "127.0.0.1:0",
        [
            ServiceBinding(
                shardnode_pb2.DESCRIPTOR.services_by_name["ShardNode"].full_name,
                ShardNodeService("n1", list),
                shardnode_pb2_grpc.add_ShardNodeServicer_to_server,
            )
        ],
        max_request_bytes=limits.SHARD_NODE_MAX_REQUEST_BYTES,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            yield ch
    finally:
        await server.stop_gracefully(0.1)


class ReportingNode(shardnode_pb2_grpc.ShardNodeServicer):
    """Answers GetShardStatus with fixed statuses."""

    def __init__(self, node_id: str, statuses: list[common_pb2.ShardStatus]):
        self.node_id, self.statuses = node_id, statuses

    async def GetShardStatus(self, request: Any, context: Any) -> shardnode_pb2.GetShardStatusResponse:
        return shardnode_pb2.GetShardStatusResponse(node_id=self.node_id, shards=self.statuses)


class TestShardNodeServer:
    @pytest.mark.parametrize(
        ("rpc", "raw", "message"),
        [
            ("GetShardStatus", b"\x0a\x05ab", "GetShardStatusRequest"),  # truncated unknown field
            ("GrantItems", field(1, NOT_UTF8), "GrantItemsRequest"),
            ("Prepare", field(1, NOT_UTF8), "PrepareRequest"),
        ],
    )
    async def test_undecodable_request_is_invalid_argument(
        self, node_channel: grpc.aio.Channel, rpc: str, raw: bytes, message: str
    ) -> None:
        code, details = await refusal(raw_unary(node_channel, f"/bluemarble.v1.ShardNode/{rpc}")(raw))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"not a valid bluemarble.v1.{message}" in details
        assert_short(details)

    async def test_undecodable_stream_request_is_invalid_argument(self, node_channel: grpc.aio.Channel) -> None:
        call = node_channel.unary_stream(
            "/bluemarble.v1.ShardNode/GetSnapshot", request_serializer=None, response_deserializer=None
        )(field(1, NOT_UTF8))
        code, details = await refusal(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "GetSnapshotRequest" in details

    async def test_request_above_its_cap_is_resource_exhausted(self, node_channel: grpc.aio.Channel) -> None:
        too_big = b"\x0a" + b"\x80\x80\x80\x09" + b"x" * (limits.SHARD_NODE_MAX_REQUEST_BYTES + 1024)
        code, _ = await refusal(raw_unary(node_channel, "/bluemarble.v1.ShardNode/GrantItems")(too_big))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        stub = shardnode_pb2_grpc.ShardNodeStub(node_channel)
        assert (await stub.GetShardStatus(shardnode_pb2.GetShardStatusRequest())).node_id == "n1"


async def test_a_client_repeating_a_bad_request_cannot_flood_the_log(
    control_plane: ControlPlaneApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refusal is answered, but logged once per method and status, then summarized
    (an outside check's flood of bad heartbeats wrote 8,200 lines in a minute)."""
    monkeypatch.setattr(grpc_server, "_REFUSALS", retry.FailureLog(warn=False))  # not the other tests' episodes
    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        with structlog.testing.capture_logs() as logged:
            for i in range(50):
                code, _ = await refusal(stub.ResolvePlayer(pb.ResolvePlayerRequest(player_id=f"bad\x00{i}")))
                assert code == grpc.StatusCode.INVALID_ARGUMENT
            # Another kind of mistake still shows while the first is folded.
            code, _ = await refusal(stub.ResolvePlayer(pb.ResolvePlayerRequest(player_id="")))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
    lines = [e for e in logged if e["event"].startswith("rpc failed") and e["log_level"] != "debug"]
    assert 2 <= len(lines) <= 4, lines
    assert lines[0]["status"] == "INVALID_ARGUMENT" and "player_id" in lines[0]["error"]
    assert any("empty" in e["error"] for e in lines), lines


async def test_registrations_at_addresses_nobody_answers_cannot_flood_the_warnings(
    control_plane: ControlPlaneApp, stub: Stub
) -> None:
    """A node that registered but does not answer (a wrong advertised address) is worth a
    warning; made-up registrations in a row give one warning, the rest at info."""
    with structlog.testing.capture_logs() as logged:
        for i in range(1, 6):
            await stub.RegisterNode(register_request(f"ghost-{i}", f"127.0.0.1:{i}"))  # nobody listens there

        def unanswered() -> list[dict[str, Any]]:
            return [e for e in logged if e["event"].startswith("new node does not answer")]

        async def all_probed() -> bool:
            return len(unanswered()) >= 5

        await wait_for(all_probed, 30, "the control plane to probe the five registrations")
    levels = [e["log_level"] for e in unanswered()]
    assert levels.count("warning") == 1 and levels.count("info") == 4, levels
    assert sorted(e["node_id"] for e in unanswered()) == [f"ghost-{i}" for i in range(1, 6)]


async def test_a_connection_stalled_in_its_handshake_is_closed() -> None:
    """A client that sends part of the HTTP/2 preface and stops holds its connection for
    the handshake timeout (20 s), not gRPC's default 120 s; others are served meanwhile."""
    server = await build_server("127.0.0.1:0", [])
    loop = asyncio.get_running_loop()
    stalled = socket.create_connection(("127.0.0.1", server.port))
    try:
        stalled.setblocking(False)
        await loop.sock_sendall(stalled, b"PRI * HTTP/2.0\r\n")
        started = loop.time()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        async with asyncio.timeout(60):
            while await loop.sock_recv(stalled, 4096):  # the server's SETTINGS, then its close
                pass
        assert 15 < loop.time() - started < 40
    finally:
        stalled.close()
        await server.grpc.stop(0)


class TestClusterIdentity:
    async def test_a_registration_carries_the_clusters_identity_and_every_replica_gives_the_same(
        self, start_control_plane: StartControlPlane
    ) -> None:
        a, b = await start_control_plane(), await start_control_plane()
        uids = []
        for app, node in ((a, "n1"), (b, "n2")):
            async with grpc.aio.insecure_channel(app.address) as channel:
                stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
                answer = await stub.RegisterNode(register_request(node, f"127.0.0.1:{7101 + len(uids)}"))
                uids.append(answer.cluster_uid)
        assert len(uids[0]) == 32 and uids[0] == uids[1] == a.cluster_uid

    async def test_a_data_dir_of_another_cluster_is_failed_precondition(
        self, control_plane: ControlPlaneApp, stub: Stub
    ) -> None:
        async with Unchanged(control_plane, stub):
            request = register_request("n1")
            request.cluster_uid = "0" * 32
            code, details = await refusal(stub.RegisterNode(request))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "belongs to another cluster" in details and control_plane.cluster_uid in details
        assert_short(details)
        status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
        [warning] = [w for w in status.warnings if "refused" in w]
        assert "of node n1 from" in warning and "belongs to another cluster" in warning
        request.cluster_uid = control_plane.cluster_uid  # its own: welcome
        assert (await stub.RegisterNode(request)).cluster_uid == control_plane.cluster_uid

    @pytest.mark.parametrize("uid", ["x" * 32, "0" * 31, "A" * 32, "0" * 5000])
    async def test_a_malformed_identity_is_invalid_argument(
        self, control_plane: ControlPlaneApp, stub: Stub, uid: str
    ) -> None:
        async with Unchanged(control_plane, stub):
            request = register_request("n1")
            request.cluster_uid = uid
            code, details = await refusal(stub.RegisterNode(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "cluster_uid" in details
        assert_short(details)
