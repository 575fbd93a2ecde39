"""End to end: every unary RPC of every service, called with inputs no test lists by hand
(seeded: empty messages, oversized and odd strings, huge repeated fields, extreme
numbers, in every field of the request), answers with a proper status: never UNKNOWN or
INTERNAL, never a message longer than a person reads, never a crashed process. The way
an outside checker meets the product through reflection, against a real cluster (etcd, a
control plane, two nodes, R = 2)."""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import Iterator

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from bluemarble.v1 import common_pb2, controlplane_pb2, shardnode_pb2, trade_pb2  # noqa: F401  (registers the types)
from tests.e2e.conftest import ProcessCluster
from tests.e2e.test_data_plane import eventually, settled

pytestmark = pytest.mark.e2e

SERVICES = ("bluemarble.v1.ControlPlane", "bluemarble.v1.TradeCoordinator", "bluemarble.v1.ShardNode")
SKIPPED = {
    # Would stop the process under test or end the cluster's membership: covered elsewhere.
    "/bluemarble.v1.ControlPlane/DeregisterNode",
    "/bluemarble.v1.ControlPlane/DrainNode",
}
MAX_DETAILS = 600
"""No error message needs more: inputs are quoted at most 80 characters (limits.echo)."""
CASES_PER_RPC = 8


def _value(field: FieldDescriptor, rng: random.Random) -> object:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(["", "x" * 100_000, "a/b", " ", "\u00e9\u4e16\U0001f600", "../../etc", "p-1", "shard-0",
                           "n1", "\x00", "t" * 129, "127.0.0.1:1"])
    if kind == FieldDescriptor.TYPE_BYTES:
        return rng.choice([b"", b"\xff" * 70_000, b"\x00\x01"])
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.choice([True, False])
    if kind == FieldDescriptor.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [99])
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return rng.choice([0, 1, 2**53 + 1, 2**64 - 1])
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return rng.choice([0, 1, 2**32 - 1])
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return rng.choice([0, -1, 2**63 - 1, -(2**63)])
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return rng.choice([0, -1, 2**31 - 1])
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice([0.0, -1.0, 1e308, float("nan")])
    raise AssertionError(f"unhandled field type {kind}")


MAX_REQUEST_BYTES = 32 * 1024 * 1024
"""Rough cap on one generated request: past the servers' 8 MiB limit (so that refusal is
tested too), far below what would take the test itself seconds to build and encode
(nested repeated messages multiply: a TradeBatch of Prepares of legs of item lists)."""


def _size(value: object) -> int:
    return len(value) if isinstance(value, str | bytes) else 8


def _fill(message: Message, rng: random.Random, depth: int = 0, budget: list[int] | None = None) -> None:
    budget = budget if budget is not None else [MAX_REQUEST_BYTES]
    descriptor: Descriptor = message.DESCRIPTOR
    for field in descriptor.fields:
        if rng.random() < 0.4 or budget[0] <= 0:
            continue
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry or depth > 3:
                continue
            if repeated:
                for _ in range(rng.choice([1, 3, 300])):
                    if budget[0] <= 0:
                        break
                    _fill(getattr(message, field.name).add(), rng, depth + 1, budget)
            else:
                _fill(getattr(message, field.name), rng, depth + 1, budget)
            continue
        if repeated:
            count = rng.choice([1, 2, 5000])
            value = _value(field, rng)
            values = [value] * count if rng.random() < 0.5 else [_value(field, rng) for _ in range(min(count, 50))]
            kept: list[object] = []
            for v in values:
                if budget[0] <= 0:
                    break
                budget[0] -= _size(v) + 2
                kept.append(v)
            try:
                getattr(message, field.name).extend(kept)
            except (ValueError, TypeError):
                pass
        else:
            value = _value(field, rng)
            budget[0] -= _size(value) + 2
            try:
                setattr(message, field.name, value)
            except (ValueError, TypeError):
                pass


def _requests(method_input: Descriptor, seed: int) -> Iterator[Message]:
    cls = message_factory.GetMessageClass(method_input)
    yield cls()
    rng = random.Random(seed)
    for _ in range(CASES_PER_RPC - 1):
        message = cls()
        _fill(message, rng)
        yield message


async def _call(channel: grpc.aio.Channel, path: str, request: Message, server_streaming: bool,
                response_type: type[Message]) -> tuple[grpc.StatusCode, str]:
    try:
        if server_streaming:
            call = channel.unary_stream(path, request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=response_type.FromString)(request, timeout=3)
            async for _ in call:
                break
            call.cancel()
            return grpc.StatusCode.OK, ""
        await channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=response_type.FromString)(request, timeout=5)
        return grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""


CALLS = "/bluemarble.v1.ShardNode/Calls"
BAD_CODES = ("UNKNOWN", "INTERNAL", "UNIMPLEMENTED")


def _call_stream(address: str, path: str, request: Message, response_type: type[Message]) -> list[str]:
    """``request`` twice on its own stream of the client-streaming ``path`` (a peer that
    repeats itself), then the end of the requests: what is wrong with the status the server
    ended the stream with and, for Calls, with how each call ended.

    On a blocking channel (run in a thread): when the server ends a stream before the
    client's last write, grpc.aio reports the failed write as INTERNAL "Internal error
    from Core" instead of the server's status (grpc/grpc#36066); the blocking client,
    like grpcurl, reports what the server said."""
    problems: list[str] = []
    with grpc.insecure_channel(address) as channel:
        stream = channel.stream_stream(path, request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=response_type.FromString)
        requests = [request, request]
        try:
            for message in stream(iter(requests), timeout=15):
                for result in getattr(message, "results", ()) if path == CALLS else ():
                    if result.WhichOneof("result") == "error" and (
                            result.error.code in BAD_CODES or len(result.error.message) > MAX_DETAILS):
                        problems.append(f"call {result.call_id}: {result.error.code} {result.error.message[:200]!r}")
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""  # type: ignore[attr-defined]
            if code.name in BAD_CODES or len(details) > MAX_DETAILS:
                problems.append(f"stream: {code.name} {details[:200]!r}")
    return problems


async def test_every_rpc_answers_odd_inputs_with_a_proper_status(process_cluster: ProcessCluster) -> None:
    cp = process_cluster.start_control_plane("--replication-factor", "2", "--shards", "2", "--lease-ttl-s", "4")
    process_cluster.start_node("n1", "z1")
    process_cluster.start_node("n2", "z2")
    await eventually(settled(process_cluster, 2, 2), 60, "the cluster to settle")
    pool = descriptor_pool.Default()
    targets = {"bluemarble.v1.ShardNode": process_cluster.node_addresses["n1"]}
    failures: list[str] = []
    calls = 0
    for service_name in SERVICES:
        service = pool.FindServiceByName(service_name)
        address = targets.get(service_name, cp)
        async with grpc.aio.insecure_channel(address) as channel:
            for method in service.methods:
                path = f"/{service_name}/{method.name}"
                if path in SKIPPED:
                    continue
                response_type = message_factory.GetMessageClass(method.output_type)
                if method.client_streaming:  # Calls, Replicate, HeartbeatStream
                    for i, request in enumerate(_requests(method.input_type, zlib.crc32(path.encode()))):
                        failures += [f"{path} case {i}: {f}" for f in await asyncio.to_thread(
                            _call_stream, address, path, request, response_type)]
                        calls += 1
                    continue
                for i, request in enumerate(_requests(method.input_type, zlib.crc32(path.encode()))):
                    code, details = await _call(channel, path, request, method.server_streaming, response_type)
                    calls += 1
                    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED):
                        failures.append(f"{path} case {i}: {code.name} {details[:200]!r}")
                    elif len(details) > MAX_DETAILS:
                        failures.append(f"{path} case {i}: {code.name} message of {len(details)} characters")
    assert calls > 100
    assert not failures, "\n".join(failures)
    # Nothing crashed on the way, and forged heartbeats and replication batches (node ids
    # and shard ids of the real cluster among the inputs) cost no node its lease or role.
    for proc in process_cluster.processes:
        assert proc.alive(), f"{proc.name} died:\n{proc.log_tail()}"
    nodes = process_cluster.assignments()
    assert nodes is not None and all(a.primary and len(a.replicas) == 1 for a in nodes.assignments)
    await eventually(settled(process_cluster, 2, 2), 60, "the cluster to be settled after the inputs")
    await asyncio.sleep(0)
