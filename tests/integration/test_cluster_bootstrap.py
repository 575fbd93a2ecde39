"""What a control plane reads and makes at start-up (the cluster's config, identity and
ring), and a stored config every reader must refuse.

- A restart writes nothing, so it serves while etcd is out of space (NOSPACE refuses
  every transaction holding a Put, even one whose compare fails); a first start then
  retries within its start-up timeout and says why.
- An identity missing beside an existing config (a deleted key, or an upgrade from a
  release without identities) is made anew with an error line saying how to put the old
  one back; replicas starting together on a new cluster make one identity, quietly.
- A config that parses but fails validation (``{}``) is DATA_LOSS naming the key and
  the problems, for RPCs, the mirror, the reconciler (no crash loop) and start-up.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio
import pytest
import structlog

from bluemarble.core.errors import CorruptRecord, Unavailable
from bluemarble.v1 import controlplane_pb2 as pb
from bluemarble.v1 import controlplane_pb2_grpc
from controlplane.server.app import ControlPlaneApp, ControlPlaneSettings
from controlplane.store import codec
from controlplane.store.config_store import ConfigStore
from scripts.localcluster import LocalEtcd
from tests.conftest import StartControlPlane, wait_for
from tests.integration.test_etcd_outage import _etcd_alarm

pytestmark = pytest.mark.integration


def _settings(etcd: LocalEtcd, cluster: str, startup_timeout_s: float) -> ControlPlaneSettings:
    return ControlPlaneSettings(
        listen="127.0.0.1:0", etcd_endpoints=(etcd.endpoint,), cluster=cluster, lease_ttl_s=5,
        etcd_startup_timeout_s=startup_timeout_s, etcd_rpc_timeout_s=2.0, shutdown_grace_s=0.5,
    )


def _nospace_alarm(etcd: LocalEtcd, action: str) -> None:
    _etcd_alarm(etcd, action)


class TestOutOfSpace:
    async def test_a_restart_while_etcd_is_out_of_space_serves_and_status_says_why(self, tmp_path: Path) -> None:
        etcd = LocalEtcd(tmp_path).start()
        try:
            first = ControlPlaneApp(_settings(etcd, "full", 5.0))
            await first.start()
            uid = first.cluster_uid
            await first.stop()
            _nospace_alarm(etcd, "ACTIVATE")
            again = ControlPlaneApp(_settings(etcd, "full", 5.0))
            try:
                await again.start()  # refused before: its create-if-absent transactions hold a Put
                assert again.cluster_uid == uid
                async with grpc.aio.insecure_channel(again.address) as channel:
                    stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
                    status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
                    assert status.etcd_healthy and status.config.replication_factor == 3, status
                    assert any("NOSPACE alarm" in w for w in status.warnings), status.warnings
            finally:
                await again.stop()
        finally:
            etcd.stop()

    async def test_a_new_cluster_waits_for_space_within_the_start_up_timeout(self, tmp_path: Path) -> None:
        etcd = LocalEtcd(tmp_path).start()
        try:
            _nospace_alarm(etcd, "ACTIVATE")
            # Nothing to read, so the config must be written: refused until the timeout,
            # with a line saying what it waits for and why, then a clear error.
            doomed = ControlPlaneApp(_settings(etcd, "new-a", 1.0))
            with structlog.testing.capture_logs() as logged:
                with pytest.raises(Unavailable) as info:
                    await doomed.start()
            await doomed.stop()
            text = str(info.value)
            assert "the cluster config" in text and "out of space" in text and "1 s" in text, text
            waits = [e for e in logged if e["event"] == "retrying" and "the cluster config" in e["what"]]
            assert waits and waits[0]["log_level"] == "warning" and "out of space" in waits[0]["error"], logged
            # Space freed while it waits: start-up goes on by itself.
            app = ControlPlaneApp(_settings(etcd, "new-b", 30.0))
            with structlog.testing.capture_logs() as logged:
                starting = asyncio.ensure_future(app.start())
                try:
                    await wait_for(lambda: _true(any(e["event"] == "retrying" for e in logged)), 10.0,
                                   "a refused write retried")
                    assert not starting.done()
                    _nospace_alarm(etcd, "DEACTIVATE")
                    await asyncio.wait_for(starting, 15.0)
                    assert len(app.cluster_uid) == 32
                finally:
                    if not starting.done():
                        starting.cancel()
                    await asyncio.gather(starting, return_exceptions=True)
                    await app.stop()
        finally:
            etcd.stop()


async def _true(value: bool) -> bool:
    return value


class TestClusterIdentity:
    async def test_an_identity_missing_beside_the_config_is_made_anew_loudly(
        self, start_control_plane: StartControlPlane
    ) -> None:
        with structlog.testing.capture_logs() as logged:
            first = await start_control_plane()
        made = [e for e in logged if e["event"] == "cluster identity created"]
        assert made and made[0]["log_level"] == "info", logged
        old = first.cluster_uid
        key = first.keys.cluster_uid()
        assert await first.store.delete(key)
        # A deleted key, or an upgrade from a release without identities: the same to it.
        with structlog.testing.capture_logs() as logged:
            second = await start_control_plane()
        assert second.cluster_uid != old and len(second.cluster_uid) == 32
        loud = [e for e in logged if e["log_level"] == "error"]
        assert len(loud) == 1 and loud[0]["key"] == key and loud[0]["cluster_uid"] == second.cluster_uid, logged
        assert f"etcdctl put {key} OLD" in loud[0]["event"] and "upgrade" in loud[0]["event"], loud
        async with grpc.aio.insecure_channel(second.address) as channel:
            stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
            # An upgraded node (no identity in its data dir) adopts the new one.
            answer = await stub.RegisterNode(pb.RegisterNodeRequest(node_id="n1", address="127.0.0.1:7101"))
            assert answer.cluster_uid == second.cluster_uid
            # A node of the old identity is refused with it in the message, as the log says.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RegisterNode(
                    pb.RegisterNodeRequest(node_id="n2", address="127.0.0.1:7102", cluster_uid=old))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and old in (info.value.details() or "")
        # Put back as the log says: the next replica reads it and writes nothing.
        await second.store.put(key, old.encode())
        with structlog.testing.capture_logs() as logged:
            third = await start_control_plane()
        assert third.cluster_uid == old
        assert not [e for e in logged if e["log_level"] == "error" or "created" in e["event"]], logged

    async def test_replicas_starting_together_on_a_new_cluster_make_one_identity_quietly(
        self, start_control_plane: StartControlPlane
    ) -> None:
        with structlog.testing.capture_logs() as logged:
            apps = await asyncio.gather(*(start_control_plane() for _ in range(3)))
        assert len({a.cluster_uid for a in apps}) == 1
        assert not [e for e in logged if e["log_level"] == "error"], logged
        assert sum(e["event"] == "cluster identity created" for e in logged) == 1, logged


class TestInvalidStoredConfig:
    async def test_an_invalid_config_is_data_loss_naming_the_key_and_its_problems(
        self, start_control_plane: StartControlPlane, etcd: LocalEtcd, cluster_name: str
    ) -> None:
        app = await start_control_plane()
        key = app.keys.config()
        valid = await app.store.get(key)
        assert valid is not None
        assert app.config_mirror is not None and app.reconciler is not None
        mirror = app.config_mirror
        reconciler = app.reconciler
        await wait_for(lambda: _true(app.election is not None and app.election.leadership is not None), 10.0,
                       "leadership")
        with structlog.testing.capture_logs() as logged:
            await app.store.put(key, b"{}")  # valid JSON, no valid config: replication_factor 0, no shards
            await wait_for(lambda: _true(key in mirror.unreadable), 5.0, "the mirror setting the config aside")
            assert key not in mirror.entries and "replication_factor" in mirror.unreadable[key].error
            async with grpc.aio.insecure_channel(app.address) as channel:
                stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
                calls = {
                    "GetConfig": lambda: stub.GetConfig(pb.GetConfigRequest()),
                    "GetClusterStatus": lambda: stub.GetClusterStatus(pb.GetClusterStatusRequest()),
                    "RegisterNode": lambda: stub.RegisterNode(
                        pb.RegisterNodeRequest(node_id="n1", address="127.0.0.1:7101")),
                }
                for name, call in calls.items():
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call()
                    details = info.value.details() or ""
                    assert info.value.code() == grpc.StatusCode.DATA_LOSS, (name, info.value)
                    assert key in details and "replication_factor is 0" in details, (name, details)
            # Rounds go on every tick, each refused with the error (a crash is not counted).
            await wait_for(lambda: _true(reconciler._round_failures.failing("round")
                                         and reconciler._round_failures._episodes["round"].failures >= 3),
                           10.0, "three rounds refusing the config")
        failed = [e for e in logged if e["event"].startswith("reconcile round failed")]
        assert key in failed[0]["error"] and "replication_factor is 0" in failed[0]["error"], failed
        assert not [e for e in logged if "crashed" in e["event"]], logged
        # A replica starting meanwhile refuses to run, saying why (not a ValueError making the ring).
        late = ControlPlaneApp(_settings(etcd, cluster_name, 5.0))
        try:
            with pytest.raises(CorruptRecord, match="replication_factor is 0") as refused:
                await late.start()
            assert key in str(refused.value)
        finally:
            await late.stop()
        # Fixed in etcd: every reader takes it again.
        await app.store.put(key, valid.value)
        await wait_for(lambda: _true(key in mirror.entries), 5.0, "the mirror reading the fixed config")
        config, _ = await ConfigStore(app.store, app.keys).get()
        assert config == codec.decode(valid.value, type(config))


    async def test_set_config_replaces_an_unreadable_config_checked_against_the_ring(
        self, start_control_plane: StartControlPlane
    ) -> None:
        app = await start_control_plane()
        key = app.keys.config()
        assert app.config_mirror is not None
        mirror = app.config_mirror
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
            good = (await stub.GetConfig(pb.GetConfigRequest())).config
            await app.store.put(key, b"not json")
            await wait_for(lambda: _true(key in mirror.unreadable), 5.0, "the mirror setting the config aside")
            stored = await app.store.get(key)
            assert stored is not None

            async def refused(config: object, revision: int = 0) -> tuple[grpc.StatusCode, str]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.SetConfig(pb.SetConfigRequest(config=config, expected_revision=revision))
                return info.value.code(), info.value.details() or ""

            with pytest.raises(grpc.aio.AioRpcError) as unreadable:
                await stub.GetConfig(pb.GetConfigRequest())
            assert unreadable.value.code() == grpc.StatusCode.DATA_LOSS
            # The fields fixed at creation are checked against the ring, the stored config cannot say.
            for name in ("shard_count", "vnodes_per_shard"):
                other = type(good)()
                other.CopyFrom(good)
                setattr(other, name, getattr(good, name) + 1)
                code, details = await refused(other)
                assert code == grpc.StatusCode.FAILED_PRECONDITION and f"{name} {getattr(good, name) + 1}" in details
                assert "is not the ring's" in details, details
            code, details = await refused(good, stored.mod_revision + 5)
            assert code == grpc.StatusCode.FAILED_PRECONDITION and str(stored.mod_revision) in details
            assert (await app.store.get(key)) == stored  # nothing written by the refusals
            good.replication_factor = 1
            answer = await stub.SetConfig(pb.SetConfigRequest(config=good, expected_revision=stored.mod_revision))
            assert answer.config == good and answer.revision > stored.mod_revision
            assert any("unreadable" in w for w in answer.warnings), answer.warnings
            await wait_for(lambda: _true(key in mirror.entries), 5.0, "the mirror reading the new config")
            assert (await stub.GetConfig(pb.GetConfigRequest())).config == good


async def test_a_deleted_ring_is_made_again_by_the_leader(start_control_plane: StartControlPlane) -> None:
    """Every trade and routing answer waits on the ring: its key deleted by hand (or gone
    with a restore from an old snapshot) is made again, from the fields fixed at creation."""
    app = await start_control_plane()
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        before = await stub.GetRing(pb.GetRingRequest())
        with structlog.testing.capture_logs() as logs:
            assert await app.store.delete(app.keys.ring())

            async def back() -> bool:
                return await app.store.get(app.keys.ring()) is not None

            await wait_for(back, 10.0, "the ring to be made again")
        assert any(e["event"].startswith("the ring key is missing") for e in logs), logs

        async def served() -> bool:
            try:
                return (await stub.GetRing(pb.GetRingRequest())) == before
            except grpc.aio.AioRpcError:
                return False

        await wait_for(served, 10.0, "the same ring to be served")
