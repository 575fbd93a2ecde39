"""Security against a real etcd: a control plane serving mutual TLS with an admin token.

A client without a certificate signed by the cluster's CA is refused during the
handshake; admin RPCs need the bearer token (UNAUTHENTICATED without, PERMISSION_DENIED
with a wrong one); a node may register, heartbeat and deregister only under the node id
its certificate names; a shard node's server refuses clients without a certificate; a
server picks up a rotated certificate without a restart, and so does a client's channel.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import os
import shutil
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bluemarble.client.control_plane import ControlPlaneClient
from bluemarble.client.trades import TradeClient
from bluemarble.core.errors import BlueMarbleError, NotFound
from bluemarble.runtime import channels, tls
from bluemarble.runtime.auth import AdminToken, ClusterPeers, bearer_metadata
from bluemarble.runtime.grpc_server import Server, ServiceBinding, build_server
from bluemarble.v1 import controlplane_pb2, controlplane_pb2_grpc, shardnode_pb2, shardnode_pb2_grpc
from controlplane.server.app import ControlPlaneApp
from controlplane.store.etcd import EtcdSecurity, EtcdStore
from scripts.dev_certs import DevCerts, issue, make_ca, make_dev_certs
from scripts.localcluster import ManagedProcess, find_etcd, free_port
from shardnode.service import ShardNodeService
from tests.conftest import StartControlPlane, wait_for

TOKEN = "integration-admin-token"
CALL_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return make_dev_certs(tmp_path_factory.mktemp("certs"), ("n1", "n2"))


def config_for(certs: DevCerts, name: str) -> tls.TlsConfig:
    return tls.TlsConfig(tls.TlsFiles(certs[name].cert, certs[name].key, certs.ca))


@pytest.fixture
def mtls(certs: DevCerts) -> Iterator[tls.TlsConfig]:
    """This process serves (and dials) with the control plane's certificate and the CA."""
    config = config_for(certs, "controlplane")
    tls.configure(config)
    try:
        yield config
    finally:
        tls.configure(None)


@pytest.fixture
async def secured(mtls: tls.TlsConfig, start_control_plane: StartControlPlane) -> ControlPlaneApp:
    return await start_control_plane(admin_token=AdminToken(value=TOKEN))


def credentials(certs: DevCerts, name: str | None) -> grpc.ChannelCredentials:
    """What a client holding ``name``'s certificate dials with (None: the CA only)."""
    if name is None:
        return grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=certs[name].key.read_bytes(),
        certificate_chain=certs[name].cert.read_bytes(),
    )


@pytest.fixture
async def as_client(certs: DevCerts, secured: ControlPlaneApp) -> AsyncIterator[
    dict[str, controlplane_pb2_grpc.ControlPlaneStub]
]:
    """ControlPlane stubs of clients holding the admin's and each node's certificate."""
    channels = {name: grpc.aio.secure_channel(secured.address, credentials(certs, name)) for name in ("admin", "n1")}
    try:
        yield {name: controlplane_pb2_grpc.ControlPlaneStub(ch)  # type: ignore[no-untyped-call]
            for name, ch in channels.items()}
    finally:
        for ch in channels.values():
            await ch.close(None)


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def test_a_client_without_a_certificate_of_the_ca_is_refused(
    certs: DevCerts, secured: ControlPlaneApp, tmp_path: Path
) -> None:
    other_ca, other_key = make_ca(tmp_path, stem="other-ca")
    stranger = issue(other_ca, other_key, "n1", tmp_path, file_name="stranger")
    dials = {
        "plaintext": grpc.aio.insecure_channel(secured.address),
        "TLS without a client certificate": grpc.aio.secure_channel(secured.address, credentials(certs, None)),
        "a certificate from another CA": grpc.aio.secure_channel(
            secured.address,
            grpc.ssl_channel_credentials(
                certs.ca.read_bytes(), stranger.key.read_bytes(), stranger.cert.read_bytes()
            ),
        ),
    }
    try:
        for what, channel in dials.items():
            stub = controlplane_pb2_grpc.ControlPlaneStub(channel)  # type: ignore[no-untyped-call]
            code = await code_of(stub.ListNodes(controlplane_pb2.ListNodesRequest(), timeout=CALL_TIMEOUT_S))
            assert code == grpc.StatusCode.UNAVAILABLE, what
    finally:
        for channel in dials.values():
            await channel.close(None)
    async with grpc.aio.secure_channel(secured.address, credentials(certs, "admin")) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)  # type: ignore[no-untyped-call]
        await stub.ListNodes(controlplane_pb2.ListNodesRequest(), timeout=CALL_TIMEOUT_S)


async def test_admin_rpcs_need_the_bearer_token(
    as_client: dict[str, controlplane_pb2_grpc.ControlPlaneStub],
) -> None:
    stub = as_client["admin"]
    current = await stub.GetConfig(controlplane_pb2.GetConfigRequest(), timeout=CALL_TIMEOUT_S)  # reads are open
    set_config = controlplane_pb2.SetConfigRequest(config=current.config, expected_revision=current.revision)
    drain = controlplane_pb2.DrainNodeRequest(node_id="nobody")
    promote = controlplane_pb2.ForcePromoteRequest(shard_id="shard-0", node_id="nobody", accept_data_loss=True)
    undrain = controlplane_pb2.UndrainNodeRequest(node_id="nobody")
    requests = {stub.SetConfig: set_config, stub.DrainNode: drain, stub.ForcePromote: promote,
                stub.UndrainNode: undrain}
    for call, request in requests.items():
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await call(request, timeout=CALL_TIMEOUT_S)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer" in (missing.value.details() or "")
        for wrong in (bearer_metadata("not-the-token"), (("authorization", "Basic " + TOKEN),)):
            code = await code_of(call(request, timeout=CALL_TIMEOUT_S, metadata=wrong))
            expected = grpc.StatusCode.PERMISSION_DENIED if wrong[0][1].startswith("Bearer") else (
                grpc.StatusCode.UNAUTHENTICATED
            )
            assert code == expected, (call, wrong)
        with pytest.raises(grpc.aio.AioRpcError) as basic:
            await call(request, timeout=CALL_TIMEOUT_S, metadata=(("authorization", "Basic " + TOKEN),))
        assert "the authorization given is not a Bearer one" in (basic.value.details() or "")
    answered = await stub.SetConfig(set_config, timeout=CALL_TIMEOUT_S, metadata=bearer_metadata(TOKEN))
    assert answered.revision > current.revision
    code = await code_of(stub.DrainNode(drain, timeout=CALL_TIMEOUT_S, metadata=bearer_metadata(TOKEN)))
    assert code == grpc.StatusCode.NOT_FOUND  # past the token check: there is no such node
    lowercase = (("authorization", "bearer " + TOKEN),)  # the scheme's name is case-insensitive
    assert await code_of(stub.DrainNode(drain, timeout=CALL_TIMEOUT_S, metadata=lowercase)) == grpc.StatusCode.NOT_FOUND
    code = await code_of(stub.UndrainNode(undrain, timeout=CALL_TIMEOUT_S, metadata=bearer_metadata(TOKEN)))
    assert code == grpc.StatusCode.NOT_FOUND  # past the token check
    code = await code_of(stub.ForcePromote(promote, timeout=CALL_TIMEOUT_S, metadata=bearer_metadata(TOKEN)))
    assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)  # past the token check


async def test_a_node_acts_only_under_the_id_its_certificate_names(
    as_client: dict[str, controlplane_pb2_grpc.ControlPlaneStub],
) -> None:
    n1 = as_client["n1"]
    denied = grpc.StatusCode.PERMISSION_DENIED
    register = controlplane_pb2.RegisterNodeRequest(node_id="n2", address="127.0.0.1:1", zone="z")
    assert await code_of(n1.RegisterNode(register, timeout=CALL_TIMEOUT_S)) == denied
    own = await n1.RegisterNode(
        controlplane_pb2.RegisterNodeRequest(node_id="n1", address="127.0.0.1:2", zone="z"), timeout=CALL_TIMEOUT_S
    )
    # The admin's certificate names no node either.
    assert await code_of(as_client["admin"].Heartbeat(
        controlplane_pb2.HeartbeatRequest(node_id="n1", lease_id=own.lease_id), timeout=CALL_TIMEOUT_S)) == denied
    beat = controlplane_pb2.HeartbeatRequest(node_id="n2", lease_id=own.lease_id)
    assert await code_of(n1.Heartbeat(beat, timeout=CALL_TIMEOUT_S)) == denied
    leave = controlplane_pb2.DeregisterNodeRequest(node_id="n2", lease_id=own.lease_id)
    assert await code_of(n1.DeregisterNode(leave, timeout=CALL_TIMEOUT_S)) == denied

    stream = n1.HeartbeatStream(timeout=CALL_TIMEOUT_S)
    await stream.write(controlplane_pb2.HeartbeatRequest(node_id="n1", lease_id=own.lease_id))
    assert (await stream.read()).ttl_ms > 0
    await stream.write(beat)  # the same stream, now for another node
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await stream.read()
    assert ended.value.code() == denied
    assert "n2" in (ended.value.details() or "")

    await n1.Heartbeat(controlplane_pb2.HeartbeatRequest(node_id="n1", lease_id=own.lease_id), timeout=CALL_TIMEOUT_S)
    await n1.DeregisterNode(
        controlplane_pb2.DeregisterNodeRequest(node_id="n1", lease_id=own.lease_id), timeout=CALL_TIMEOUT_S
    )


async def node_server(certs: DevCerts, service: ShardNodeService) -> Server:
    """A ShardNode server for ``service`` serving mutual TLS with n1's certificate."""
    tls.configure(config_for(certs, "n1"))
    try:
        return await build_server(
            "127.0.0.1:0",
            [ServiceBinding(shardnode_pb2.DESCRIPTOR.services_by_name["ShardNode"].full_name, service,
                            shardnode_pb2_grpc.add_ShardNodeServicer_to_server)],
        )
    finally:
        tls.configure(None)


async def test_a_shard_node_serves_only_clients_with_a_certificate_of_the_ca(certs: DevCerts) -> None:
    server = await node_server(certs, ShardNodeService("n1", list))
    address = f"127.0.0.1:{server.port}"
    request = shardnode_pb2.GetShardStatusRequest()
    try:
        for creds in (credentials(certs, None), None):
            channel = grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)
            async with channel:
                stub = shardnode_pb2_grpc.ShardNodeStub(channel)  # type: ignore[no-untyped-call]
                assert await code_of(stub.GetShardStatus(request, timeout=CALL_TIMEOUT_S)) == (
                    grpc.StatusCode.UNAVAILABLE
                )
        for peer in ("controlplane", "n2", "admin"):
            async with grpc.aio.secure_channel(address, credentials(certs, peer)) as channel:
                stub = shardnode_pb2_grpc.ShardNodeStub(channel)  # type: ignore[no-untyped-call]
                answer = await stub.GetShardStatus(request, timeout=CALL_TIMEOUT_S)
                assert answer.node_id == "n1"
    finally:
        await server.stop_gracefully(0.1)


class RecordingDataPlane:
    """Stands in for the data plane behind ShardNodeService: records the batches that
    reach it (the check under test is the service's, before any batch does)."""

    def __init__(self) -> None:
        self.batches: list[str] = []

    async def hold_if_failpoint(self) -> None:
        return None

    def replicate(self, batch: shardnode_pb2.ReplicateBatch) -> shardnode_pb2.ReplicateAck:
        self.batches.append(batch.primary)
        return shardnode_pb2.ReplicateAck(replica="n1")


async def test_a_node_replicates_to_another_only_as_the_primary_its_certificate_names(certs: DevCerts) -> None:
    # Any node's certificate used to ship batches claiming another node as their primary:
    # with a made-up epoch that deposed the real primary and planted the sender's entries.
    recorder = RecordingDataPlane()
    peers = ClusterPeers({"controlplane"}, lambda name: name in {"n1", "n2"}, enabled=True)
    server = await node_server(certs, ShardNodeService("n1", list, lambda: recorder,  # type: ignore[arg-type, return-value]
                                                       peers=peers))
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials(certs, "n2")) as channel:
            stub = shardnode_pb2_grpc.ShardNodeStub(channel)  # type: ignore[no-untyped-call]
            call = stub.Replicate(timeout=CALL_TIMEOUT_S)
            await call.write(shardnode_pb2.ReplicateBatch(primary="n2"))
            assert (await call.read()).replica == "n1"
            await call.write(shardnode_pb2.ReplicateBatch(primary="n1"))  # the same stream, as another node
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call.read()
            assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
            details = ended.value.details() or ""
            assert "primary 'n1'" in details and "n2" in details and "only as itself" in details, details
        assert recorder.batches == ["n2"]
    finally:
        await server.stop_gracefully(0.1)


async def test_a_server_picks_up_a_rotated_certificate_without_a_restart(certs: DevCerts, tmp_path: Path) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server-key.pem"
    shutil.copy(certs["controlplane"].cert, cert)
    shutil.copy(certs["controlplane"].key, key)
    tls.configure(tls.TlsConfig(tls.TlsFiles(cert, key, certs.ca)))
    try:
        server = await build_server("127.0.0.1:0", [])
    finally:
        tls.configure(None)
    address = f"127.0.0.1:{server.port}"
    new_ca, new_ca_key = make_ca(tmp_path, stem="new-ca")
    rotated = issue(new_ca, new_ca_key, "controlplane", tmp_path, file_name="rotated")
    trusts_new_ca = grpc.ssl_channel_credentials(
        (tmp_path / "new-ca.pem").read_bytes(), certs["admin"].key.read_bytes(), certs["admin"].cert.read_bytes()
    )
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def check(creds: grpc.ChannelCredentials) -> grpc.StatusCode:
        async with grpc.aio.secure_channel(address, creds) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return await code_of(stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S))

    try:
        assert await check(credentials(certs, "admin")) == grpc.StatusCode.OK
        assert await check(trusts_new_ca) == grpc.StatusCode.UNAVAILABLE
        # Rotate: the new key first, then the certificate (a reader may see a mismatched
        # pair in between; it keeps the previous pair then, and reloads at the next change).
        shutil.copy(rotated.key, key)
        shutil.copy(rotated.cert, cert)
        assert await check(trusts_new_ca) == grpc.StatusCode.OK
        assert await check(credentials(certs, "admin")) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop_gracefully(0.1)


async def test_a_client_presents_a_rotated_certificate_without_a_restart(
    certs: DevCerts, secured: ControlPlaneApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's control-plane client, whose files rotate from n1's certificate to n2's,
    acts as n2 on its next call: the channel built with n1's certificate is replaced
    (gRPC would otherwise keep presenting it, on this connection and every reconnect)."""
    monkeypatch.setattr(tls, "RECHECK_S", 0.0)
    cert, key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    shutil.copy(certs["n1"].cert, cert)
    shutil.copy(certs["n1"].key, key)
    tls.configure(tls.TlsConfig(tls.TlsFiles(cert, key, certs.ca)))
    client = ControlPlaneClient([secured.address])

    def register(node: str) -> object:
        return client.control_plane().RegisterNode(
            controlplane_pb2.RegisterNodeRequest(node_id=node, address=f"127.0.0.1:{4000 + int(node[1:])}", zone="z"),
            timeout=CALL_TIMEOUT_S,
        )

    trades = TradeClient(client)  # keeps a stub per replica, and follows the new channel
    try:
        assert await code_of(register("n1")) == grpc.StatusCode.OK
        assert await code_of(register("n2")) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(NotFound):
            await trades.get_trade("t-unknown")
        shutil.copy(certs["n2"].key, key)
        shutil.copy(certs["n2"].cert, cert)
        assert await code_of(register("n2")) == grpc.StatusCode.OK
        assert await code_of(register("n1")) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(NotFound):
            await trades.get_trade("t-unknown")
    finally:
        await trades.close()
        await client.close()


async def test_channels_built_before_a_rotation_are_outdated_and_dropped_without_cutting_their_streams(
    certs: DevCerts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What every cache of channels relies on: a channel keeps presenting the certificate
    it was built with, :func:`channels.outdated` says so once the files rotated, a new
    channel presents the new one, and dropping the old channel (the caches drop it rather
    than close it) leaves a stream on it running."""
    monkeypatch.setattr(tls, "RECHECK_S", 0.0)

    async def who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return ",".join(sorted(tls.peer_identities(context.auth_context()))).encode()

    async def echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Who", {
        "Who": grpc.unary_unary_rpc_method_handler(who), "Echo": grpc.stream_stream_rpc_method_handler(echo),
    }),))
    port = server.add_secure_port("127.0.0.1:0", config_for(certs, "controlplane").server_credentials())
    await server.start()
    cert, key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    shutil.copy(certs["n1"].cert, cert)
    shutil.copy(certs["n1"].key, key)
    tls.configure(tls.TlsConfig(tls.TlsFiles(cert, key, certs.ca)))

    async def ask(channel: grpc.aio.Channel) -> str:
        answer: bytes = await channel.unary_unary("/test.Who/Who")(b"", timeout=CALL_TIMEOUT_S)
        return answer.decode()

    try:
        old = channels.channel(f"127.0.0.1:{port}")
        assert "n1" in await ask(old)
        assert not channels.outdated(old)
        stream = old.stream_stream("/test.Who/Echo")(timeout=30)
        await stream.write(b"before")
        assert await stream.read() == b"before"
        shutil.copy(certs["n2"].key, key)
        shutil.copy(certs["n2"].cert, cert)
        assert channels.outdated(old)
        assert "n1" in await ask(old)  # gRPC keeps the credentials a channel was built with
        new = channels.channel(f"127.0.0.1:{port}")
        assert not channels.outdated(new)
        assert "n2" in await ask(new)
        dropped = weakref.ref(old)
        del old
        gc.collect()
        assert dropped() is None
        await stream.write(b"after")  # the stream outlives its channel object
        assert await stream.read() == b"after"
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK
        await new.close(None)
    finally:
        tls.configure(None)
        await server.stop(None)


def tls_etcd(certs: DevCerts, tmp_path: Path, client_port: int = 0) -> tuple[ManagedProcess, str]:
    """A single-member etcd serving TLS with client-certificate auth (certificates of
    ``certs``' CA), data under ``tmp_path``; again on ``client_port`` after a restart."""
    client_port, peer_port = client_port or free_port(), free_port()
    peer = f"http://127.0.0.1:{peer_port}"
    etcd = ManagedProcess("etcd-tls", [
        find_etcd(), "--name", "tls", "--data-dir", str(tmp_path / "data"),
        "--listen-client-urls", f"https://127.0.0.1:{client_port}",
        "--advertise-client-urls", f"https://127.0.0.1:{client_port}",
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"tls={peer}",
        "--cert-file", str(certs["etcd"].cert), "--key-file", str(certs["etcd"].key),
        "--trusted-ca-file", str(certs.ca), "--client-cert-auth", "--log-level", "warn", "--logger", "zap",
    ], tmp_path / "etcd.log").start()  # fmt: skip
    return etcd, f"127.0.0.1:{client_port}"


async def test_the_etcd_adapter_follows_a_renewed_client_certificate(
    certs: DevCerts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control plane's etcd client certificate is renewed in place; the old one then
    expires and etcd restarts, so every connection is made again. The adapter reaches
    etcd again only because it connected anew with the renewed files (gRPC would present
    the expired certificate on every reconnect)."""
    monkeypatch.setattr(tls, "RECHECK_S", 0.2)
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    ca_key = serialization.load_pem_private_key((certs.ca.parent / "ca-key.pem").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    lifetime = datetime.timedelta(seconds=10)
    short = issue(ca, ca_key, "controlplane", tmp_path, file_name="short", valid_for=lifetime)
    expires_at = time.monotonic() + lifetime.total_seconds()
    cert, key = tmp_path / "etcd-client.pem", tmp_path / "etcd-client-key.pem"
    shutil.copy(short.cert, cert)
    shutil.copy(short.key, key)
    etcd, endpoint = tls_etcd(certs, tmp_path)
    store = EtcdStore([endpoint], security=EtcdSecurity(
        certs.ca.read_bytes(), cert.read_bytes(), key.read_bytes(), files=tls.TlsFiles(cert, key, certs.ca)))
    watched: list[str] = []

    async def watch(revision: int) -> None:
        async for batch in store.watch_prefix("/renewal/", revision):
            watched.extend(event.kv.key for event in batch.events)

    watcher: asyncio.Task[None] | None = None
    try:
        await store.connect(8)
        lease_id, _ = await store.grant_lease(30)
        watcher = asyncio.ensure_future(watch(await store.put("/renewal/before", b"1")))
        renewed = issue(ca, ca_key, "controlplane", tmp_path, file_name="renewed")
        for source, target in ((renewed.key, key), (renewed.cert, cert)):
            shutil.copy(source, tmp_path / "staging")
            os.replace(tmp_path / "staging", target)  # atomically, as a Secret update does
        async def renewed_connection() -> bool:
            return store.tls_generation == 1

        async def first_certificate_expired() -> bool:
            return time.monotonic() > expires_at + 1

        async def written_again() -> bool:
            try:
                await store.put("/renewal/after", b"2")
            except BlueMarbleError:
                return False  # etcd is starting, or (without the renewal) refuses the expired certificate
            return True

        await wait_for(renewed_connection, 10, "a connection with the renewed certificate")
        await wait_for(first_certificate_expired, 15, "the first certificate to expire")
        etcd.kill()  # every connection is made again
        etcd, _ = tls_etcd(certs, tmp_path, client_port=int(endpoint.rsplit(":", 1)[1]))
        await wait_for(written_again, 20, "a write through the renewed connection after etcd's restart")
        assert (await store.get("/renewal/before")) is not None
        # The streams broke with the old connection and reopened on the new one.
        assert await store.keepalive(lease_id) > 0

        async def both_watched() -> bool:
            return watched[:1] == ["/renewal/before"] and "/renewal/after" in watched

        await wait_for(both_watched, 20, "the watch to resume and see the write after the restart")
    finally:
        if watcher is not None:
            watcher.cancel()
        await store.close()
        etcd.kill()


async def test_etcd_over_tls_with_a_client_certificate_and_a_password(certs: DevCerts, tmp_path: Path) -> None:
    """The control plane's etcd adapter against an etcd serving TLS with client-cert auth
    and authentication enabled: reads, leases, keepalives and watches carry the token; a
    wrong password is refused with a message naming the flags."""
    import asyncio

    import etcd3aio

    etcd, endpoint = tls_etcd(certs, tmp_path)
    material = {
        "ca": certs.ca.read_bytes(),
        "cert": certs["controlplane"].cert.read_bytes(),
        "key": certs["controlplane"].key.read_bytes(),
    }

    def secured(password: str) -> EtcdSecurity:
        return EtcdSecurity(material["ca"], material["cert"], material["key"], user="root", password=password)

    try:
        admin = etcd3aio.Etcd3Client(
            [endpoint], ca_cert=material["ca"], cert_key=material["key"], cert_chain=material["cert"],
            tls_server_name="127.0.0.1",
        )
        await admin.connect()
        async with asyncio.timeout(20):
            while True:
                try:
                    await admin.kv.get("probe", timeout=1)  # type: ignore[union-attr]
                    break
                except etcd3aio.EtcdError:
                    await asyncio.sleep(0.05)  # etcd is starting; bounded by the timeout above
        await admin.auth.user_add("root", "root-pw")  # type: ignore[union-attr]
        await admin.auth.user_grant_role("root", "root")  # type: ignore[union-attr]
        await admin.auth.auth_enable()  # type: ignore[union-attr]
        await admin.close()

        store = EtcdStore([endpoint], security=secured(password="root-pw"))
        await store.connect(5)
        try:
            lease_id, _ = await store.grant_lease(5)
            assert await store.keepalive(lease_id) > 0
            revision = await store.put("/secure/a", b"1")

            async def first_keys() -> list[str]:
                async for batch in store.watch_prefix("/secure/", revision):
                    return [event.kv.key for event in batch.events]
                return []

            assert await asyncio.wait_for(first_keys(), 5) == ["/secure/a"]
        finally:
            await store.close()

        wrong = EtcdStore([endpoint], security=secured(password="nope"))
        with pytest.raises(BlueMarbleError, match=r"refused user 'root'.*--etcd-password"):
            await wrong.connect(5)
    finally:
        etcd.kill()
