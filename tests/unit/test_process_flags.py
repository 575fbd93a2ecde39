"""The processes' command lines: a bad flag is one usage line (exit 2), never a traceback
or a failure later on (a NaN that kills a background task, a config written to etcd by a
replica that cannot serve)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import structlog

from bluemarble.api import cluster_config
from bluemarble.core.errors import InvalidArgument
from bluemarble.runtime import logs
from controlplane.server import main as cp_main
from controlplane.store.etcd import EtcdStore


def usage_error(parse: Callable[[list[str]], object], argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line ``parse(argv)`` printed (exit 2)."""
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if ": error: " in line]
    return line


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--lease-ttl-s", "-1"], "--lease-ttl-s is -1; give 2..300"),
        (["--replication-factor", "-3"], "--replication-factor is -3; give 1..7"),
        (["--shards", "-1"], "--shards is -1; give 1..418"),
        (["--shards", "1180591620717411303424"], "--shards is 1180591620717411303424; give 1..418"),
        (["--shards", "4096"], "give 1..418"),
        (["--etcd-startup-timeout-s", "nan"], "--etcd-startup-timeout-s is nan"),
        (["--etcd-startup-timeout-s", "inf"], "--etcd-startup-timeout-s is inf"),
        (["--etcd-startup-timeout-s", "-1"], "--etcd-startup-timeout-s is -1; give a number above 0"),
        (["--etcd-startup-timeout-s", "0"], "--etcd-startup-timeout-s is 0; give a number above 0"),
        (["--etcd-startup-timeout-s", "86400"], "at most 3600"),
        (["--trade-sweep-interval-s", "nan"], "--trade-sweep-interval-s is nan"),
        (["--trade-prepare-timeout-s", "inf"], "--trade-prepare-timeout-s is inf"),
        (["--trade-retention-h=-inf"], "--trade-retention-h is -inf"),
        (["--crash-grace-ms", "-1"], "--crash-grace-ms is -1"),
        (["--log-level", "bogus"], "argument --log-level: invalid choice: 'bogus'"),
        (["--etcd", ""], "--etcd names no endpoint"),
        (["--etcd", " , "], "--etcd names no endpoint"),
        (["--etcd", "etcd-without-port"], "--etcd 'etcd-without-port' is malformed"),
        (["--listen", "foo"], "--listen 'foo' is malformed"),
        (["--cluster", "Prod"], "--cluster: cluster name 'Prod' is not a DNS label"),
    ],
)
def test_control_plane_flags_out_of_range_are_one_usage_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = usage_error(cp_main.parse_args, argv, capsys)
    assert line.startswith("bluemarble-controlplane: error: ") and says in line, line


def test_the_stated_shard_range_is_the_real_one(capsys: pytest.CaptureFixture[str]) -> None:
    most = cluster_config.max_shards()
    settings, *_ = cp_main.parse_args(["--shards", str(most)])
    cluster_config.default_config(shard_count=settings.shards)  # accepted by the config too
    line = usage_error(cp_main.parse_args, ["--shards", str(most + 1)], capsys)
    assert f"give 1..{most}" in line


def test_log_levels_are_checked_at_parse_time_in_every_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from shardnode.main import parse_args as node_args

    base = ["--node-id", "n1", "--data-dir", "/nonexistent"]
    line = usage_error(node_args, [*base, "--log-level", "bogus"], capsys)
    assert line.startswith("bluemarble-node: error: argument --log-level: invalid choice")
    assert node_args([*base, "--log-level", "WARNING"])[1] == "warning"
    monkeypatch.setenv("BLUEMARBLE_LOG_LEVEL", "loud")
    line = usage_error(cp_main.parse_args, [], capsys)
    assert "BLUEMARBLE_LOG_LEVEL='loud' is invalid" in line
    with pytest.raises(ValueError, match="unknown log level"):
        logs.level_name("loud")


@pytest.mark.parametrize(
    "numbers",
    [{"shard_count": 2**70}, {"lease_ttl_s": -1}, {"replication_factor": 2**40}, {"max_moves_per_round": -(2**64)}],
)
def test_default_config_refuses_values_out_of_range_before_building_the_message(numbers: dict[str, int]) -> None:
    ((name, _),) = numbers.items()
    with pytest.raises(InvalidArgument, match=f"{name} is .*; it must be between"):
        cluster_config.default_config(**numbers)


def test_the_token_limit_says_how_many_shards_fit() -> None:
    with pytest.raises(InvalidArgument, match="at 150 virtual nodes per shard, at most 418 shards"):
        cluster_config.default_config(shard_count=4096)


def test_an_etcd_store_without_endpoints_is_invalid_input() -> None:
    with pytest.raises(InvalidArgument, match="no etcd endpoint given"):
        EtcdStore([])


class TestOnlyTheMetricsServersFailureIsReportedAsSuch:
    def test_an_unrelated_os_error_is_not_blamed_on_metrics(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def broken(*_args: object, **_kwargs: object) -> None:
            raise PermissionError("not about metrics")

        monkeypatch.setattr(cp_main.event_loop, "run", broken)
        monkeypatch.setattr(cp_main, "run", lambda _settings: None)
        monkeypatch.setattr(cp_main.logs, "configure", lambda *_a, **_k: None)
        with structlog.testing.capture_logs() as lines, pytest.raises(PermissionError):
            cp_main.main(["--etcd", "127.0.0.1:1"])
        assert not any("metrics" in str(e["event"]) for e in lines)

    def test_a_metrics_address_in_use_is_reported(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(cp_main.logs, "configure", lambda *_a, **_k: None)
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            with structlog.testing.capture_logs() as lines:
                code = cp_main.main(["--etcd", "127.0.0.1:1", "--metrics-listen", f"127.0.0.1:{port}"])
        assert code == 1
        assert [e["event"] for e in lines] == ["control plane cannot serve metrics"]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "names no address"),
        (" , ", "names no address"),
        ("127.0.0.1:99999", "outside 1..65535"),  # gRPC would wrap it to another port
        ("garbage", "'garbage' is malformed"),
        ("http://127.0.0.1:7000", "has an invalid host name"),
    ],
)
def test_control_plane_addresses_are_checked_at_parse_time(
    value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from bluemarble.cli import bluemarblectl
    from shardnode.main import parse_args as node_args

    line = usage_error(node_args, ["--node-id", "n1", "--data-dir", "/nonexistent", "--control-plane", value], capsys)
    assert line.startswith("bluemarble-node: error: ") and says in line, line
    line = usage_error(bluemarblectl.main, ["--control-plane", value, "status"], capsys)
    assert line.startswith("bluemarblectl: error: ") and says in line, line


def test_an_admin_token_variable_set_but_empty_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLUEMARBLE_ADMIN_TOKEN", "")
    line = usage_error(cp_main.parse_args, [], capsys)
    assert "BLUEMARBLE_ADMIN_TOKEN is set but empty" in line, line


async def test_a_stopping_node_stays_not_ready_while_its_roles_settle() -> None:
    """SIGTERM: the node hands its roles over before it leaves. Its readiness goes to
    NOT_SERVING and stays there, even while the data plane itself would say ready."""
    import asyncio

    from shardnode import main as node_main

    class Server:
        def __init__(self) -> None:
            self.serving: list[bool] = []
            self.changed = asyncio.Event()

        async def set_serving(self, serving: bool, service: str) -> None:
            self.serving.append(serving)
            self.changed.set()

        async def wait_for(self, expected: list[bool]) -> None:
            while self.serving != expected:
                self.changed.clear()
                await self.changed.wait()

    class DataPlane:
        node_id = "n1"

        def not_ready_reason(self) -> str:
            return ""  # ready, as a node whose roles are settling may well be

    server, stopping = Server(), asyncio.Event()
    task = asyncio.ensure_future(node_main._report_readiness(server, DataPlane(), stopping))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(10):
            await server.wait_for([True])
            stopping.set()
            await server.wait_for([True, False])
            await asyncio.sleep(3 * node_main.READINESS_INTERVAL_S)  # rounds pass: no SERVING again
        assert server.serving == [True, False]
    finally:
        task.cancel()
