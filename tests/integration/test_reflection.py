"""Server reflection and health, as grpcurl uses them (`list`, `describe`)."""

from __future__ import annotations

import asyncio

import grpc.aio
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bluemarble.runtime.grpc_server import build_server
from controlplane.server.app import ControlPlaneApp

pytestmark = pytest.mark.integration


async def _reflect(
    address: str, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([request]))
        async for response in call:
            return response
    raise AssertionError("no reflection response")


async def test_list_shows_the_services(control_plane: ControlPlaneApp) -> None:
    r = await _reflect(control_plane.address, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in r.list_services_response.service}
    assert {
        "bluemarble.v1.ControlPlane",
        "bluemarble.v1.TradeCoordinator",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


async def test_reflection_v1_answers_like_v1alpha(control_plane: ControlPlaneApp) -> None:
    """Clients that ask grpc.reflection.v1 first (newer grpcurl, Postman) find it, and can
    describe it as well as our services through it."""
    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        method = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="bluemarble.v1.TradeCoordinator"),
        ]
        answers = [r async for r in method(iter(requests))]
    listed, v1_file, ours = answers
    names = {s.name for s in listed.list_services_response.service}
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names

    def files_of(r: reflection_pb2.ServerReflectionResponse) -> list[descriptor_pb2.FileDescriptorProto]:
        raw_files = r.file_descriptor_response.file_descriptor_proto
        return [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in raw_files]

    [v1] = files_of(v1_file)
    assert (v1.name, v1.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    [service] = v1.service
    assert service.method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert not v1.options.deprecated
    assert "bluemarble/v1/trade.proto" in [f.name for f in files_of(ours)]


async def test_describe_shows_contract_fields(control_plane: ControlPlaneApp) -> None:
    r = await _reflect(
        control_plane.address,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="bluemarble.v1.ControlPlane"),
    )
    raw_files = r.file_descriptor_response.file_descriptor_proto
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in raw_files]
    messages = {m.name: [f.name for f in m.field] for f in files for m in f.message_type}
    rpcs = {m.name for f in files for s in f.service for m in s.method}
    assert {"RegisterNode", "Heartbeat", "DeregisterNode", "WatchAssignments", "ListNodes", "SetConfig"} <= rpcs
    assert messages["RegisterNodeRequest"][:5] == ["node_id", "address", "region", "zone", "capacity"]
    assert messages["RegisterNodeResponse"][:3] == ["lease_id", "ttl_ms", "heartbeat_interval_ms"]
    assert messages["HeartbeatRequest"][:4] == ["node_id", "lease_id", "shards", "leaving"]
    assert messages["ShardStatus"][:4] == ["shard_id", "epoch", "role", "applied_lsn"]


async def test_describe_finds_a_method_by_its_full_name(control_plane: ControlPlaneApp) -> None:
    """``grpcurl describe bluemarble.v1.ControlPlane.ListNodes`` asks for the file
    containing the method."""
    for symbol, file in (("bluemarble.v1.ControlPlane.ListNodes", "bluemarble/v1/controlplane.proto"),
                         ("bluemarble.v1.TradeCoordinator.ExecuteTrade", "bluemarble/v1/trade.proto")):
        r = await _reflect(control_plane.address, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
        names = [descriptor_pb2.FileDescriptorProto.FromString(raw).name
                 for raw in r.file_descriptor_response.file_descriptor_proto]
        assert file in names, (symbol, r)
    missing = await _reflect(control_plane.address, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="bluemarble.v1.ControlPlane.NoSuchMethod"))
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_health_is_serving(control_plane: ControlPlaneApp) -> None:
    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "bluemarble.v1.ControlPlane"):
            r = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:  # NOT_FOUND said nothing more
            await stub.Check(health_pb2.HealthCheckRequest(service="nope" * 100_000))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        details = unknown.value.details() or ""
        assert "'bluemarble.v1.ControlPlane'" in details and len(details) < 400, details


async def test_health_watch_streams_the_status_and_its_changes() -> None:
    # grpcio's Health.Watch sends with context.write() (a coroutine, not a generator): the
    # server's request guard must wrap it as such, or the call ends UNKNOWN.
    server = await build_server("127.0.0.1:0", [])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            first = await asyncio.wait_for(call.read(), timeout=5)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            await server.set_serving(False)
            second = await asyncio.wait_for(call.read(), timeout=5)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            call.cancel()
    finally:
        await server.grpc.stop(None)


async def test_an_open_health_watch_ends_at_a_graceful_stop_instead_of_holding_it() -> None:
    """The watcher hears NOT_SERVING, then its stream ends; the stop does not wait out its
    grace (30 s here) for it."""
    server = await build_server("127.0.0.1:0", [])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        first = await asyncio.wait_for(call.read(), timeout=5)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        loop = asyncio.get_running_loop()
        started = loop.time()
        stopping = asyncio.ensure_future(server.stop_gracefully(30.0))
        last = await asyncio.wait_for(call.read(), timeout=10)
        assert last.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await asyncio.wait_for(call.read(), timeout=10) is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, timeout=10)
        assert loop.time() - started < 10  # not the 30 s grace


async def test_health_watch_and_list_on_the_control_plane(control_plane: ControlPlaneApp) -> None:
    async with grpc.aio.insecure_channel(control_plane.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        call = stub.Watch(health_pb2.HealthCheckRequest(service="bluemarble.v1.ControlPlane"))
        first = await asyncio.wait_for(call.read(), timeout=5)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        call.cancel()
        listed = await stub.List(health_pb2.HealthListRequest(), timeout=5)
        statuses = {name: r.status for name, r in listed.statuses.items()}
        serving = health_pb2.HealthCheckResponse.SERVING
        assert statuses[""] == serving
        assert statuses["bluemarble.v1.ControlPlane"] == serving
        assert statuses["bluemarble.v1.TradeCoordinator"] == serving


async def test_a_huge_name_is_not_found_and_not_echoed_back_whole(control_plane: ControlPlaneApp) -> None:
    """The reflection protocol echoes each request in ``original_request``: a 1 MB name
    (no served name comes near MAX_REFLECTION_NAME_CHARS) gets NOT_FOUND, cut to 100."""
    huge = "bluemarble.v1." + "X" * 1_000_000
    for request in (reflection_pb2.ServerReflectionRequest(file_containing_symbol=huge),
                    reflection_pb2.ServerReflectionRequest(file_by_filename=huge),
                    reflection_pb2.ServerReflectionRequest(host=huge, list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_extension=reflection_pb2.ExtensionRequest(
                        containing_type=huge, extension_number=1))):
        r = await _reflect(control_plane.address, request)
        assert r.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0], r.error_response
        assert "at most 1024" in r.error_response.error_message and r.ByteSize() < 1000
    ok = await _reflect(control_plane.address, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="bluemarble.v1.ControlPlane"))  # the service serves on
    assert ok.file_descriptor_response.file_descriptor_proto


async def test_describe_shows_the_comments_of_methods_and_messages(control_plane: ControlPlaneApp) -> None:
    """``grpcurl describe`` prints a descriptor's comments when the file carries its
    source info: reflection answers the API's files with it (its dependencies too)."""
    r = await _reflect(control_plane.address, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="bluemarble.v1.ControlPlane.DrainNode"))
    files = {f.name: f for f in (descriptor_pb2.FileDescriptorProto.FromString(raw)
                                 for raw in r.file_descriptor_response.file_descriptor_proto)}
    assert {"bluemarble/v1/controlplane.proto", "bluemarble/v1/common.proto"} <= set(files)

    def comment(file: descriptor_pb2.FileDescriptorProto, path: list[int]) -> str:
        return next((loc.leading_comments for loc in file.source_code_info.location if list(loc.path) == path), "")

    control = files["bluemarble/v1/controlplane.proto"]
    [service] = control.service
    drain = [m.name for m in service.method].index("DrainNode")
    assert "marks a node DRAINING" in comment(control, [6, 0, 2, drain])  # service 0, method DrainNode
    common = files["bluemarble/v1/common.proto"]
    node = [m.name for m in common.message_type].index("Node")
    assert "A node as recorded in the registry" in comment(common, [4, node])  # message Node
