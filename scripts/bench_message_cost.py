"""What one message costs on this machine: a round trip on a grpc.aio stream, side by side
with the same round trip as a grpc.aio unary call, on a plain asyncio TCP socket, and on
the framed transport that carries the nodes' Calls and Replicate streams
(:mod:`bluemarble.runtime.frames`), one message in flight.

Each transport is measured twice:

- **back to back**: the next message leaves as soon as the answer is in (the processes
  never go idle);
- **at a fixed rate** (``--rate``, default 200/s): the processes go idle between
  messages, as the nodes and control plane do between the messages of isolated trades.

The figure is CPU microseconds per round trip, client and server (the server's from
``/proc/<pid>/schedstat``, the scheduler's own count). The gap between the two columns of
one transport is what waking from idle costs; the gap between the transports is what
gRPC's threads add to it. A cross-shard trade at a low rate is about 20 such messages
(docs/benchmarks.md), which is why its CPU per trade is two to three times the closed
loop's. Loopback only.

    .venv/bin/python scripts/bench_message_cost.py [--rate 200] [--count 1000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio
from google.protobuf.wrappers_pb2 import BytesValue

from bluemarble.runtime import frames, logs
from bluemarble.runtime.event_loop import run as run_loop

SERVICE = "bluemarble.bench.Echo"
PAYLOAD = b"x" * 200  # about a Prepare's size
WARMUP = 100
HEADER = 4


def _identity(b: bytes) -> bytes:
    return b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve_grpc(port: int) -> None:
    async def echo(requests: AsyncIterator[bytes],
                   _context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message

    async def unary(request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Stream": grpc.stream_stream_rpc_method_handler(echo, request_deserializer=_identity,
                                                        response_serializer=_identity),
        "Unary": grpc.unary_unary_rpc_method_handler(unary, request_deserializer=_identity,
                                                     response_serializer=_identity)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def serve_raw(port: int) -> None:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                header = await reader.readexactly(HEADER)
                writer.write(header + await reader.readexactly(int.from_bytes(header, "big")))
        writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", port)
    await server.serve_forever()


async def serve_frames(port: int) -> None:
    """The framed transport of the Calls and Replicate streams (bluemarble.runtime.frames)."""
    async def echo(requests: AsyncIterator[BytesValue], _context: object) -> AsyncIterator[BytesValue]:
        async for message in requests:
            yield message

    server = frames.FrameServer({f"/{SERVICE}/Stream": frames.Method(echo, BytesValue.FromString)},
                                max_request_bytes=1 << 20)
    await server.start("127.0.0.1", port)
    await asyncio.Event().wait()


def server_cpu_ns(pid: int) -> int:
    """The process's CPU so far over all its threads, in nanoseconds."""
    return sum(int((task / "schedstat").read_text().split()[0]) for task in Path(f"/proc/{pid}/task").iterdir())


async def measure(round_trip: Callable[[], Awaitable[None]], server_pid: int, rate: float,
                  count: int) -> dict[str, float]:
    """CPU per round trip (client, server) and the median latency, ``count`` round trips
    at ``rate`` per second (0: back to back)."""
    for _ in range(WARMUP):
        await round_trip()
    client0, server0, start = time.process_time(), server_cpu_ns(server_pid), time.monotonic()
    latencies = []
    for i in range(count):
        t = time.monotonic()
        await round_trip()
        latencies.append(time.monotonic() - t)
        if rate:
            delay = start + (i + 1) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    client_us = round((time.process_time() - client0) * 1e6 / count)
    server_us = round((server_cpu_ns(server_pid) - server0) / 1e3 / count)
    latencies.sort()
    return {"client_us": client_us, "server_us": server_us, "total_us": client_us + server_us,
            "p50_us": round(latencies[len(latencies) // 2] * 1e6)}


async def grpc_round_trips(port: int) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    await asyncio.wait_for(channel.channel_ready(), 10)
    call = channel.stream_stream(f"/{SERVICE}/Stream", request_serializer=_identity,
                                 response_deserializer=_identity)(None)

    async def round_trip() -> None:
        await call.write(PAYLOAD)
        await call.read()

    async def close() -> None:
        call.cancel()
        await channel.close(None)

    return round_trip, close


async def unary_round_trips(port: int) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """A unary call a round trip: one batch of operations, one completion, on each side
    (a stream's round trip is a write's completion and a read's)."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    await asyncio.wait_for(channel.channel_ready(), 10)
    call = channel.unary_unary(f"/{SERVICE}/Unary", request_serializer=_identity, response_deserializer=_identity)

    async def round_trip() -> None:
        await call(PAYLOAD)

    async def close() -> None:
        await channel.close(None)

    return round_trip, close


async def raw_round_trips(port: int) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    for _ in range(100):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:
            await asyncio.sleep(0.1)
    else:
        raise SystemExit(f"the raw echo server on port {port} did not start")
    frame = len(PAYLOAD).to_bytes(HEADER, "big") + PAYLOAD

    async def round_trip() -> None:
        writer.write(frame)
        header = await reader.readexactly(HEADER)
        await reader.readexactly(int.from_bytes(header, "big"))

    async def close() -> None:
        writer.close()

    return round_trip, close


async def frames_round_trips(port: int) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    for _ in range(100):
        try:
            call = await frames.FrameCall.open(f"127.0.0.1:{port}", port, f"/{SERVICE}/Stream", BytesValue.FromString)
            break
        except OSError:
            await asyncio.sleep(0.1)
    else:
        raise SystemExit(f"the framed echo server on port {port} did not start")
    message = BytesValue(value=PAYLOAD)

    async def round_trip() -> None:
        await call.write(message)
        await call.read()

    async def close() -> None:
        call.cancel()

    return round_trip, close


async def bench(rate: float, count: int) -> dict[str, dict[str, float]]:
    transports = (
        ("grpc.aio stream", "grpc", grpc_round_trips),
        ("grpc.aio unary", "grpc", unary_round_trips),
        ("asyncio TCP", "raw", raw_round_trips),
        ("framed (frames.py)", "frames", frames_round_trips),
    )
    # Both servers start before this process makes any gRPC object (no fork under gRPC's threads).
    servers = []
    for _, kind, _ in transports:
        port = free_port()
        servers.append((port, await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", kind, "--port", str(port))))
    results: dict[str, dict[str, float]] = {}
    try:
        for (transport, _, connect), (port, server) in zip(transports, servers, strict=True):
            round_trip, close = await connect(port)
            results[f"{transport}, back to back"] = await measure(round_trip, server.pid, 0, count * 5)
            results[f"{transport}, at {rate:g}/s"] = await measure(round_trip, server.pid, rate, count)
            await close()
    finally:
        for _, server in servers:
            server.terminate()
            await asyncio.wait_for(server.wait(), 10)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=200.0, help="round trips per second of the idle-between phase")
    p.add_argument("--count", type=int, default=1000, help="round trips at that rate (five times as many back to back)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--serve", choices=("grpc", "raw", "frames"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        logs.configure("warning", "console")  # stdout carries the figures
        serve = {"grpc": serve_grpc, "raw": serve_raw, "frames": serve_frames}[args.serve]
        run_loop(serve(args.port))
        return
    if not 1 <= args.rate <= 5000 or not 100 <= args.count <= 1_000_000:
        raise SystemExit("--rate must be within 1-5000 and --count within 100-1000000")
    results = run_loop(bench(args.rate, args.count))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'one message in flight':34} {'client us':>10} {'server us':>10} {'total us':>9} {'p50 us':>8}")
    for name, r in results.items():
        print(f"{name:34} {r['client_us']:>10} {r['server_us']:>10} {r['total_us']:>9} {r['p50_us']:>8}")


if __name__ == "__main__":
    main()
