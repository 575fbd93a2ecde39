"""The control plane with etcd gone: clear UNAVAILABLE, keeps running, recovers alone;
and it refuses to start when etcd never answers."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest

from bluemarble.core.errors import Unavailable
from bluemarble.core.ids import NodeId
from bluemarble.v1 import controlplane_pb2 as pb
from bluemarble.v1 import controlplane_pb2_grpc
from controlplane.server.app import ControlPlaneApp, ControlPlaneSettings
from controlplane.store.etcd import EtcdStore, KeyValue
from controlplane.store.watchcache import PrefixCache
from scripts.localcluster import LocalEtcd, free_port

pytestmark = pytest.mark.integration
T = TypeVar("T")


async def until_available(call: Callable[[], Awaitable[T]], timeout_s: float = 15.0) -> T:
    """Retries ``call`` while it answers UNAVAILABLE, up to ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            assert loop.time() < deadline, f"still UNAVAILABLE after {timeout_s} s: {e.details()}"
            await asyncio.sleep(0.1)


async def _started(etcd: LocalEtcd, cluster: str, rpc_timeout_s: float) -> ControlPlaneApp:
    """A control plane on ``etcd`` (TTL 5 s), started."""
    app = ControlPlaneApp(
        ControlPlaneSettings(
            listen="127.0.0.1:0", etcd_endpoints=(etcd.endpoint,), cluster=cluster,
            lease_ttl_s=5, etcd_rpc_timeout_s=rpc_timeout_s, shutdown_grace_s=0.5,
        )
    )
    await app.start()
    return app


async def test_unavailable_while_etcd_is_down_then_recovers(tmp_path: Path) -> None:
    etcd = LocalEtcd(tmp_path).start()
    app = await _started(etcd, "outage", rpc_timeout_s=1.0)
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
            r = await stub.RegisterNode(pb.RegisterNodeRequest(node_id="n1", address="127.0.0.1:7101"))

            etcd.kill()
            for call in (
                stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id), timeout=10),
                stub.RegisterNode(pb.RegisterNodeRequest(node_id="n2", address="127.0.0.1:7102"), timeout=10),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "etcd" in (info.value.details() or "")
            # Still serving: the status answers from the replica's mirrors, saying so.
            status = await stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=10)
            assert (status.etcd_healthy, status.node_count, status.leader) == (False, 1, "")

            etcd.start()  # same data dir and ports
            # Each call recovers by itself within a deadline (callers retry UNAVAILABLE).
            nodes = (await until_available(lambda: stub.ListNodes(pb.ListNodesRequest(), timeout=2))).nodes
            # Data survived the restart; the lease is still refreshable.
            assert [n.node_id for n in nodes] == ["n1"]
            await until_available(
                lambda: stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", lease_id=r.lease_id), timeout=2)
            )
            await stub.RegisterNode(pb.RegisterNodeRequest(node_id="n2", address="127.0.0.1:7102"), timeout=5)
            # The status answered all along; it turns healthy once the mirrors follow etcd again.
            deadline = asyncio.get_running_loop().time() + 15
            while not (status := await stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=5)).etcd_healthy:
                assert asyncio.get_running_loop().time() < deadline, f"status still unhealthy: {status.warnings}"
                await asyncio.sleep(0.1)
            assert status.node_count == 2
    finally:
        await app.stop()
        etcd.kill()


async def test_refuses_to_start_when_etcd_never_answers() -> None:
    dead = f"127.0.0.1:{free_port()}"
    app = ControlPlaneApp(
        ControlPlaneSettings(listen="127.0.0.1:0", etcd_endpoints=(dead,), etcd_startup_timeout_s=1.0)
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Unavailable) as info:
        await app.start()
    assert "did not answer within 1 s" in str(info.value)
    assert dead in str(info.value)
    assert loop.time() - started < 5
    assert app.server is None


async def test_status_answers_within_half_a_second_and_assignments_say_stale_while_etcd_is_gone(
    tmp_path: Path,
) -> None:
    etcd = LocalEtcd(tmp_path).start()
    app = await _started(etcd, "outage-fast", rpc_timeout_s=3.0)
    loop = asyncio.get_running_loop()

    async def timed_status(stub: controlplane_pb2_grpc.ControlPlaneStub) -> tuple[pb.GetClusterStatusResponse, float]:
        started = loop.time()
        status = await stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=1.5)
        return status, loop.time() - started

    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
            await stub.RegisterNode(pb.RegisterNodeRequest(node_id="n1", address="127.0.0.1:7101"))
            listed = await stub.ListAssignments(pb.ListAssignmentsRequest())
            assert (listed.stale, listed.stale_reason) == (False, "")
            # The registration reaches this replica's mirror through its watch: wait for
            # it before etcd stops, or the mirror's answer below has no node.
            assert app.nodes is not None
            registered = loop.time() + 10
            while app.keys.node(NodeId("n1")) not in app.nodes.entries:
                assert loop.time() < registered, "the node mirror never saw n1"
                await asyncio.sleep(0.01)

            # A hung etcd (stopped, sockets open): the mirrors keep their watches, reads
            # hang. The status gives up on etcd after 0.5 s, well inside a 1.5 s deadline.
            assert etcd.process is not None
            etcd.process.signal(signal.SIGSTOP)
            try:
                status, took_s = await timed_status(stub)
            finally:
                etcd.process.signal(signal.SIGCONT)
            assert not status.etcd_healthy and status.node_count == 1
            assert any("etcd is unreachable" in w for w in status.warnings)
            assert took_s < 1.0, took_s
            etcd.process.signal(signal.SIGSTOP)
            try:  # the nodes as the mirror saw them, marked stale, within the same budget
                nodes = await stub.ListNodes(pb.ListNodesRequest(), timeout=1.5)
            finally:
                etcd.process.signal(signal.SIGCONT)
            assert nodes.stale and [n.node_id for n in nodes.nodes] == ["n1"]
            assert "could not read etcd" in nodes.stale_reason and "may be out of date" in nodes.stale_reason
            fresh = await stub.ListNodes(pb.ListNodesRequest(), timeout=5)
            assert not fresh.stale and not fresh.stale_reason and [n.node_id for n in fresh.nodes] == ["n1"]

            # A dead etcd: the mirrors lose their watches, and then answer at once.
            etcd.kill()
            deadline = loop.time() + 10
            while app.assignments is not None and app.assignments.healthy:
                assert loop.time() < deadline, "the assignments mirror never noticed etcd was gone"
                await asyncio.sleep(0.05)
            status, took_s = await timed_status(stub)
            assert (status.etcd_healthy, status.node_count, status.leader) == (False, 1, "")
            assert took_s < 0.3, took_s
            stale = await stub.ListAssignments(pb.ListAssignmentsRequest(), timeout=1.5)
            assert stale.stale
            assert "lost its watch on etcd" in stale.stale_reason
            assert stale.revision >= listed.revision
    finally:
        await app.stop()
        etcd.kill()


def test_an_etcd_stop_and_start_under_active_watches_leaves_no_pending_task_or_running_generator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outage that used to log "Task was destroyed but it is pending!" and "aclose():
    asynchronous generator is already running": streams whose request-iterator task
    outlived them. Run in an event loop of its own, so that what its closing reports, and
    what garbage collection finds afterwards, is checked too."""
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    caplog.set_level(logging.WARNING)
    etcd = LocalEtcd(tmp_path).start()
    try:
        asyncio.run(_outage_under_watches(etcd))
    finally:
        etcd.kill()
    gc.collect()
    complaints = [
        line
        for line in caplog.text.splitlines() + [repr(u) for u in unraisable]
        if "destroyed but it is pending" in line or "already running" in line or "never retrieved" in line
    ]
    assert complaints == []
    assert unraisable == []


async def _outage_under_watches(etcd: LocalEtcd) -> None:
    store = EtcdStore([etcd.endpoint], rpc_timeout_s=1.0, watch_progress_interval_s=0.5)
    await store.connect(5)
    prefix = "/bluemarble/outage-hygiene/nodes/"
    cache: PrefixCache[bytes] = PrefixCache(store, prefix, lambda kv: kv.value, name="hygiene")
    seen: list[KeyValue] = []

    async def follow() -> None:  # a bare watch besides the mirror's, as the election has
        async for batch in store.watch_prefix(prefix, 1):
            seen.extend(ev.kv for ev in batch.events)

    async def until(condition: Callable[[], bool], what: str) -> None:
        deadline = asyncio.get_running_loop().time() + 15
        while not condition():
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    follower = asyncio.create_task(follow())
    try:
        lease_id, _ = await store.grant_lease(30)
        await store.put(prefix + "a", b"1", lease=lease_id)
        await cache.start()
        assert await store.keepalive(lease_id) > 0
        await until(lambda: len(seen) == 1, "the first event")

        await asyncio.to_thread(etcd.stop)
        with pytest.raises(Unavailable):
            await store.keepalive(lease_id)
        await until(lambda: not cache.healthy, "the mirror to notice")
        await asyncio.sleep(1.5)  # several reconnect attempts of each stream, all refused
        gc.collect()
        await asyncio.to_thread(etcd.start)

        async def refreshed() -> int:
            try:
                return await store.keepalive(lease_id)
            except Unavailable:
                await asyncio.sleep(0.1)
                return 0

        async with asyncio.timeout(15):
            while await refreshed() <= 0:
                pass
        revision = await store.put(prefix + "b", b"2")
        assert await cache.wait_for_revision(revision, 10)
        await until(lambda: len(seen) == 2, "the event after the restart")
        assert cache.healthy and cache.entries == {prefix + "a": b"1", prefix + "b": b"2"}
        gc.collect()
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await cache.stop()
        await store.close()


def _etcd_alarm(etcd: LocalEtcd, action: str) -> None:
    """Raises (ACTIVATE) or clears (DEACTIVATE) etcd's NOSPACE alarm, as a full backend does,
    through etcd's JSON gateway."""
    def post(path: str, body: dict[str, object]) -> dict[str, Any]:
        request = urllib.request.Request(f"http://{etcd.endpoint}{path}", data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=5) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            return answer

    member = post("/v3/maintenance/status", {})["header"]["member_id"]
    post("/v3/maintenance/alarm", {"action": action, "memberID": member, "alarm": "NOSPACE"})


async def test_etcd_out_of_space_is_unavailable_naming_the_way_out_and_passes(tmp_path: Path) -> None:
    """etcd with its NOSPACE alarm refuses every write with RESOURCE_EXHAUSTED: callers get
    UNAVAILABLE (retry later) saying what an operator must do, not INTERNAL, and a node
    registering then keeps trying instead of giving up."""
    etcd = LocalEtcd(tmp_path).start()
    app = await _started(etcd, "nospace", rpc_timeout_s=2.0)
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
            _etcd_alarm(etcd, "ACTIVATE")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RegisterNode(pb.RegisterNodeRequest(node_id="n1", address="127.0.0.1:7101"))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
            details = info.value.details() or ""
            assert "etcd is out of space" in details and "NOSPACE" in details and len(details) < 400, details
            status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
            assert status.etcd_healthy and any("NOSPACE alarm" in w for w in status.warnings), status.warnings
            _etcd_alarm(etcd, "DEACTIVATE")
            answer = await until_available(
                lambda: stub.RegisterNode(pb.RegisterNodeRequest(node_id="n1", address="127.0.0.1:7101"))
            )
            assert answer.lease_id
            status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
            assert not any("alarm" in w for w in status.warnings), status.warnings
    finally:
        await app.stop()
        etcd.stop()
