"""TLS configuration from flags, certificate reloading, and the admin token checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bluemarble.core.errors import InvalidArgument
from bluemarble.runtime import tls
from bluemarble.runtime.auth import (
    ADMIN_TOKEN_ENV,
    CONTROL_PLANE_IDENTITY,
    AdminToken,
    ClusterPeers,
    ServerAuth,
    Verdict,
    bearer_metadata,
    check_bearer,
    compile_node_id_pattern,
    control_plane_identities,
    read_token_file,
)
from controlplane.server import main as cp_main
from scripts.dev_certs import DevCerts, make_dev_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return make_dev_certs(tmp_path_factory.mktemp("certs"), ("n1",))


def test_no_flag_means_plaintext() -> None:
    assert tls.files_from_flags("", "", "") is None


def test_files_from_flags_names_the_flag_and_the_fix(certs: DevCerts, tmp_path: Path) -> None:
    cp = certs["controlplane"]
    cases = {
        (str(cp.cert), "", ""): "--tls-cert is given without --tls-key",
        ("", str(cp.key), ""): "--tls-key is given without --tls-cert",
        (str(tmp_path / "absent.pem"), str(cp.key), ""): "no such file",
        (str(cp.cert), str(certs["n1"].key), ""): "do not form a certificate and its private key",
        (str(cp.cert), str(cp.key), str(tmp_path)): "is a directory",
    }
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    cases[(str(cp.cert), str(cp.key), str(not_pem))] = "--tls-ca " + str(not_pem) + ": not a PEM file"
    for (cert, key, ca), expected in cases.items():
        with pytest.raises(InvalidArgument, match=expected.replace(".", r"\.")):
            tls.files_from_flags(cert, key, ca)
    files = tls.files_from_flags(str(cp.cert), str(cp.key), str(certs.ca))
    assert files is not None and files.mutual
    ca_only = tls.files_from_flags("", "", str(certs.ca))
    assert ca_only is not None and not ca_only.has_identity and not ca_only.mutual


def test_a_server_process_needs_a_certificate_and_says_so(certs: DevCerts, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, expected in (
        (["--tls-ca", str(certs.ca)], "--tls-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "/nonexistent/cp.pem", "--tls-key", str(certs["controlplane"].key)], "no such file"),
        (["--admin-token-file", "/nonexistent/token"], "--admin-token-file /nonexistent/token: no such file"),
        (["--etcd-user", "root"], "needs a password"),
        (["--etcd-cert", str(certs["etcd"].cert), "--etcd-key", str(certs["etcd"].key)], "need --etcd-ca"),
    ):
        with pytest.raises(SystemExit) as exited:
            cp_main.parse_args(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
    tls.configure(None)


def test_material_is_reread_when_a_file_changes_and_a_bad_rewrite_keeps_the_last_good(
    certs: DevCerts, tmp_path: Path
) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    shutil.copy(certs["controlplane"].cert, cert)
    shutil.copy(certs["controlplane"].key, key)
    config = tls.TlsConfig(tls.TlsFiles(cert, key, certs.ca))
    first = config.material()
    assert config.material() is first  # nothing changed: no re-read
    assert config.generation == 0
    shutil.copy(certs["n1"].key, key)
    shutil.copy(certs["n1"].cert, cert)
    second = config.material()
    assert second is not first and second.cert == certs["n1"].cert.read_bytes()
    assert config.generation == 1  # channels built before are outdated now
    cert.write_text("garbage")  # a broken rotation
    assert config.material().cert == second.cert
    assert config.generation == 1  # not a reload: channels keep what they have
    config.channel_credentials()  # still usable
    config.server_credentials()


def test_the_generation_looks_at_the_files_at_most_every_recheck_interval(
    certs: DevCerts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    shutil.copy(certs["controlplane"].cert, cert)
    shutil.copy(certs["controlplane"].key, key)
    config = tls.TlsConfig(tls.TlsFiles(cert, key, certs.ca))
    shutil.copy(certs["n1"].key, key)
    shutil.copy(certs["n1"].cert, cert)
    assert config.current_generation() == 0  # looked at when loaded, less than RECHECK_S ago
    monkeypatch.setattr(tls, "RECHECK_S", 0.0)
    assert config.current_generation() == 1
    assert config.current_generation() == 1


def test_peer_identities_are_the_common_name_and_dns_names() -> None:
    context = {
        "x509_common_name": [b"n1"],
        "peer_dns": [b"n1", b"localhost"],
        "x509_subject_alternative_name": [b"n1", b"localhost", b"127.0.0.1"],
    }
    assert tls.peer_identities(context) == {"n1", "localhost"}
    assert tls.peer_identities({}) == frozenset()


@pytest.mark.parametrize(
    ("authorization", "verdict"),
    [
        (None, Verdict.MISSING),
        ("", Verdict.MISSING),
        ("Bearer ", Verdict.MISSING),
        ("Basic s3cret", Verdict.MISSING),
        ("bearer s3cret", Verdict.OK),  # the scheme's name is case-insensitive
        ("BEARER  s3cret", Verdict.OK),
        ("Bearers3cret", Verdict.MISSING),
        ("s3cret", Verdict.MISSING),
        ("Bearer s3cre", Verdict.WRONG),
        ("Bearer s3cret2", Verdict.WRONG),
        ("Bearer \u00e9", Verdict.WRONG),
        ("Bearer s3cret", Verdict.OK),
        ("Bearer s3cret ", Verdict.OK),
    ],
)
def test_check_bearer(authorization: str | None, verdict: Verdict) -> None:
    assert check_bearer(authorization, "s3cret") is verdict


def test_bearer_metadata() -> None:
    assert bearer_metadata(None) == ()
    assert bearer_metadata("t") == (("authorization", "Bearer t"),)


def test_token_files_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "token"
    path.write_text("abc123\n")
    assert read_token_file(path, "--token-file") == "abc123"
    for bad, expected in (("\n", "the token is empty"), ("two words", "spaces or control characters")):
        path.write_text(bad)
        with pytest.raises(InvalidArgument, match=expected):
            read_token_file(path, "--token-file")
    path.write_text("first")
    token = AdminToken(path=path)
    assert token.value() == "first"
    path.write_text("second-token")
    assert token.value() == "second-token"  # a rotated Secret is picked up
    path.write_text("")
    assert token.value() == "second-token"  # an unusable rewrite keeps the previous token
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    assert AdminToken.from_settings("") is None
    monkeypatch.setenv(ADMIN_TOKEN_ENV, " ")  # set but empty (a Secret key without a value): refused
    with pytest.raises(InvalidArgument, match="set but empty"):
        AdminToken.from_settings("")
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "from-env")
    from_env = AdminToken.from_settings("")
    assert from_env is not None and from_env.value() == "from-env"
    path.write_text("file-token")
    from_file = AdminToken.from_settings(str(path))  # the file wins over the environment
    assert from_file is not None and from_file.value() == "file-token"


def test_a_node_under_mutual_tls_must_be_named_by_its_certificate(
    certs: DevCerts, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from shardnode import main as node_main

    assert "n1" in tls.certificate_names(certs["n1"].cert.read_bytes())
    base = ["--listen", "127.0.0.1:7101", "--control-plane", "127.0.0.1:7000", "--data-dir", str(tmp_path),
            "--tls-cert", str(certs["n1"].cert), "--tls-key", str(certs["n1"].key), "--tls-ca", str(certs.ca)]
    try:
        settings, *_ = node_main.parse_args(["--node-id", "n1", *base])
        assert settings.node_id == "n1"
        with pytest.raises(SystemExit) as exited:
            node_main.parse_args(["--node-id", "n2", *base])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "--tls-cert names" in err and "n1" in err and "'n2'" in err and "Traceback" not in err, err
    finally:
        tls.configure(None)


def test_the_control_plane_is_known_by_its_name_and_the_dns_names_nodes_dial() -> None:
    assert control_plane_identities(["127.0.0.1:7000", "[::1]:7000", "localhost:7000"]) == {CONTROL_PLANE_IDENTITY}
    assert control_plane_identities(["bm-controlplane.games.svc:7000", "10.0.0.4:7000"], ["cp", ""]) == {
        "cp", "bm-controlplane.games.svc"}


def test_cluster_calls_are_open_without_mutual_tls_and_need_the_right_certificate_with_it() -> None:
    class Context:
        def __init__(self, names: list[bytes]):
            self.names = names

        def auth_context(self) -> dict[str, list[bytes]]:
            return {"x509_common_name": self.names[:1], "peer_dns": self.names[1:]}

    open_peers = ClusterPeers({"controlplane"}, lambda _: False, enabled=False)
    assert open_peers.is_control_plane(Context([]))  # type: ignore[arg-type]
    peers = ClusterPeers({"controlplane"}, lambda name: name == "n1", enabled=True)
    assert peers.is_control_plane(Context([b"admin", b"controlplane"]))  # type: ignore[arg-type]
    assert not peers.is_control_plane(Context([b"n1", b"localhost"]))  # type: ignore[arg-type]
    assert not peers.is_control_plane(Context([]))  # type: ignore[arg-type]


def test_the_node_id_pattern_is_checked_when_given() -> None:
    assert compile_node_id_pattern("", "--node-id-pattern") is None
    pattern = compile_node_id_pattern("bm-node-[0-9]+", "--node-id-pattern")
    assert pattern is not None and pattern.fullmatch("bm-node-3") and not pattern.fullmatch("gs-1")
    for bad in ("(", "x" * 300):
        with pytest.raises(InvalidArgument, match="--node-id-pattern"):
            compile_node_id_pattern(bad, "--node-id-pattern")


class _AdminCallContext:
    def __init__(self, peer: str, authorization: str):
        self._peer, self._authorization = peer, authorization
        self.aborted: list[tuple[object, str]] = []

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", self._authorization),)

    async def abort(self, code: object, details: str) -> None:
        self.aborted.append((code, details))


async def test_a_peer_repeating_a_wrong_admin_token_logs_one_warning_then_summaries() -> None:
    import grpc
    import structlog

    auth = ServerAuth(AdminToken(value="s3cret"))
    with structlog.testing.capture_logs() as logs:
        for port in range(40000, 40050):  # one client host, a new connection each time
            context = _AdminCallContext(f"ipv4:10.0.0.9:{port}", "Bearer guess")
            await auth.admin(context, "DrainNode")  # type: ignore[arg-type]
            assert context.aborted == [(grpc.StatusCode.PERMISSION_DENIED,
                                        "DrainNode: the bearer token is not this cluster's admin token")]
        other = _AdminCallContext("ipv4:10.0.0.10:40000", "Bearer guess")
        await auth.admin(other, "DrainNode")  # type: ignore[arg-type]
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [(e["event"], e["peer"]) for e in warnings] == [
        ("admin rpc refused", "ipv4:10.0.0.9:40000"), ("admin rpc refused", "ipv4:10.0.0.10:40000")]
    assert sum(e["event"] == "admin rpc refused" for e in logs) == 51  # each one still at debug at least
