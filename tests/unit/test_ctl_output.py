"""bluemarblectl as a person or a script meets it: one error line on stderr unless -v,
every integer of --json a number, and ``promote`` refused without its consent flag."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from bluemarble.cli import bluemarblectl as ctl
from bluemarble.v1 import common_pb2, controlplane_pb2, shardnode_pb2, trade_pb2
from scripts.dev_certs import make_ca
from scripts.localcluster import free_port


def test_json_prints_64_bit_integers_as_numbers_in_every_command() -> None:
    shown = trade_pb2.GetTradeResponse(
        trade_id="t1",
        decided_at_ms=1_700_000_000_123,
        request=trade_pb2.ExecuteTradeRequest(a_gives=common_pb2.Offer(gold=2**53, item_ids=["x"])),
        sides=[shardnode_pb2.ParticipantTrade(
            trade_id="t1", deadline_ms=5, leg=shardnode_pb2.TradeLeg(gives=common_pb2.Offer(gold=7)))],
    )
    parsed = json.loads(ctl.message_json(shown))
    assert parsed["decided_at_ms"] == 1_700_000_000_123
    assert parsed["request"]["a_gives"] == {"gold": 2**53, "item_ids": ["x"]}
    assert parsed["sides"][0]["leg"]["gives"]["gold"] == 7 and parsed["sides"][0]["deadline_ms"] == 5
    status = controlplane_pb2.GetClusterStatusResponse(
        etcd_revision=2**40, config=common_pb2.ClusterConfig(consistency={"chat": 2}))
    parsed = json.loads(ctl.message_json(status))
    assert parsed["etcd_revision"] == 2**40
    assert parsed["config"]["consistency"] == {"chat": "CONSISTENCY_MODEL_EVENTUAL"}


def test_json_prints_64_bit_identifiers_as_strings() -> None:
    """Lease ids and incarnations are random 63-bit values: as JSON numbers, jq and
    JavaScript round them (three nodes' leases came out as one)."""
    leases = (5646003488234479183, 5646003488234479175)
    nodes = controlplane_pb2.ListNodesResponse(nodes=[common_pb2.Node(node_id=f"n{i}", lease_id=lease)
                                                      for i, lease in enumerate(leases)])
    parsed = json.loads(ctl.message_json(nodes))
    assert [n["lease_id"] for n in parsed["nodes"]] == [str(lease) for lease in leases]
    shards = controlplane_pb2.ListAssignmentsResponse(assignments=[common_pb2.Assignment(
        shard_id="shard-0", epoch=3, incarnations={"n2": leases[1], "n1": leases[0]})])
    parsed = json.loads(ctl.message_json(shards))
    assert parsed["assignments"][0]["incarnations"] == {"n1": str(leases[0]), "n2": str(leases[1])}
    assert parsed["assignments"][0]["epoch"] == 3  # counters stay numbers


@pytest.mark.parametrize("command", [["status"], ["config", "get"], ["trade", "show", "t1"], ["inventory", "p1"]])
def test_json_may_come_before_or_after_the_command(command: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    async def record(args: argparse.Namespace) -> int:
        seen.append(args.json)
        return 0

    monkeypatch.setattr(ctl, "run", record)
    base = ["--control-plane", f"127.0.0.1:{free_port()}"]
    assert ctl.main([*base, *command]) == 0
    assert ctl.main([*base, "--json", *command]) == 0
    assert ctl.main([*base, *command, "--json"]) == 0
    assert seen == [False, True, True]


def test_promote_without_accept_data_loss_is_a_usage_error_and_sends_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def must_not_run(_args: object) -> int:
        raise AssertionError("the request was sent")

    monkeypatch.setattr(ctl, "run", must_not_run)
    with pytest.raises(SystemExit) as exited:
        ctl.main(["--control-plane", f"127.0.0.1:{free_port()}", "promote", "shard-1", "node-1"])
    assert exited.value.code == 2
    assert "promote needs --accept-data-loss" in capsys.readouterr().err


def _ctl(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bluemarble.cli.bluemarblectl", "--control-plane", f"127.0.0.1:{free_port()}",
         "--timeout-s", "1", *argv],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


def test_an_unreachable_control_plane_is_one_line_on_stderr_unless_verbose() -> None:
    said = (
        "bluemarblectl: UNAVAILABLE: the routing client did not get the ring within 1 s; "
        "is the control plane reachable? (last error: "
    )
    quiet = _ctl("inventory", "p1")
    assert quiet.returncode == ctl.EXIT_NO_ANSWER
    [line] = quiet.stderr.splitlines()
    assert line.startswith(said) and "Connection refused" in line, quiet.stderr  # the cause, on the one line
    verbose = _ctl("-v", "inventory", "p1")
    assert verbose.returncode == ctl.EXIT_NO_ANSWER
    assert "loop step failed; restarting" in verbose.stderr or "retrying" in verbose.stderr, verbose.stderr
    assert verbose.stderr.splitlines()[-1].startswith(said)


def test_json_keeps_empty_lists_and_zeros_so_every_answer_has_the_same_keys() -> None:
    parsed = json.loads(ctl.message_json(trade_pb2.ListInDoubtTradesResponse()))
    assert parsed == {"trades": [], "unreachable_nodes": [], "unled_shards": []}


def test_a_limit_out_of_range_is_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        ctl.main(["--control-plane", "127.0.0.1:1", "trade", "in-doubt", "--limit", "0"])
    assert info.value.code == 2
    assert "--limit must be 1..1000" in capsys.readouterr().err


def test_a_primary_without_replicas_says_so_instead_of_a_lag() -> None:
    r = controlplane_pb2.ListAssignmentsResponse(
        assignments=[common_pb2.Assignment(shard_id="shard-0", epoch=2, primary="n1")],
        statuses=[controlplane_pb2.MemberStatus(shard_id="shard-0", node_id="n1", status=common_pb2.ShardStatus(
            shard_id="shard-0", epoch=2, last_epoch=2, applied_lsn=7))],
    )
    assert "n1 (2,7) no replica" in ctl.render_shards(r)


def test_a_retained_member_is_shown_beside_the_replicas() -> None:
    r = controlplane_pb2.ListAssignmentsResponse(
        assignments=[common_pb2.Assignment(shard_id="shard-0", epoch=2, primary="n1", replicas=["n3"],
                                           retained=["n2"])],
    )
    row = ctl.render_shards(r).splitlines()[2]
    assert row.endswith("n3 ?, n2 (retained)"), row


def _member_status(node: str, *, last_epoch: int, lsn: int, lag: tuple[int, int] = (0, 0),
                   copying: bool = False) -> controlplane_pb2.MemberStatus:
    return controlplane_pb2.MemberStatus(shard_id="shard-0", node_id=node, status=common_pb2.ShardStatus(
        shard_id="shard-0", epoch=3, last_epoch=last_epoch, applied_lsn=lsn, lag_entries=lag[0], lag_ms=lag[1],
        copying=copying))


def test_a_replica_copying_the_shard_says_so_and_what_it_lacks_comes_from_its_primary() -> None:
    """A new replica's own lag figure is the age of the shard's first entry (its oldest
    missing one), and a restarted one that has not heard from its primary yet thinks it
    is 0 behind: the primary's position tells the operator what they lack."""
    r = controlplane_pb2.ListAssignmentsResponse(
        assignments=[common_pb2.Assignment(shard_id="shard-0", epoch=3, primary="n1", replicas=["n2", "n3"])],
        statuses=[
            _member_status("n1", last_epoch=3, lsn=1279, lag=(2584, 324_279)),
            _member_status("n2", last_epoch=0, lsn=0, lag=(2584, 0), copying=True),
            _member_status("n3", last_epoch=2, lsn=473),
        ],
    )
    shown = ctl.render_shards(r)
    assert "n1 (3,1279) farthest replica copying" in shown
    assert "n2 (0,0) copying, 2584 entries to go" in shown
    assert "n3 (2,473) lag 806/0ms" in shown


@pytest.mark.parametrize(("argv", "message"), [
    (["--token", "abc\ndef", "status"], "the token has spaces or control characters"),
    (["--token", "\u00fc", "status"], "the token has characters outside ASCII"),
    (["inventory", "p\udcff"], "player is not valid UTF-8 text"),
    (["grant", "p1", "x\udcff"], "items is not valid UTF-8 text"),
    (["trade", "execute", "t1", "a", "b", "--a-gold", "\u0661\u0660"], "is not a whole number"),
    (["trade", "execute", "t1", "a", "b", "--b-gold", "1_0"], "'1_0' is not a whole number"),
    (["trade", "in-doubt", "--limit", " 5"], "is not a whole number"),
    (["trade", "in-doubt", "--min-age-s", "nan"], "is not a number of seconds from 0 to 3600"),
    (["trade", "in-doubt", "--min-age-s", "-1"], "is not a number of seconds from 0 to 3600"),
])
def test_unusable_arguments_are_usage_errors_and_send_nothing(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def must_not_run(_args: object) -> int:
        raise AssertionError("the request was sent")

    monkeypatch.setattr(ctl, "run", must_not_run)
    with pytest.raises(SystemExit) as exited:
        ctl.main(["--control-plane", f"127.0.0.1:{free_port()}", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_tls_against_a_plaintext_server_is_one_line_on_stderr(tmp_path: Path) -> None:
    """gRPC's C core logs a failed TLS handshake on stderr itself ("Handshake failed ...",
    at info level): bluemarblectl keeps it quiet, so its own line is the only one."""
    make_ca(tmp_path)  # ca.pem: a CA the plaintext server cannot answer to
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        said = subprocess.run(
            [sys.executable, "-m", "bluemarble.cli.bluemarblectl", "--control-plane", f"127.0.0.1:{port}",
             "--timeout-s", "1", "--tls-ca", str(tmp_path / "ca.pem"), "status"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
    finally:
        server.stop(None)
    assert said.returncode == ctl.EXIT_NO_ANSWER, said.stderr
    [line] = said.stderr.splitlines()
    assert line.startswith("bluemarblectl: UNAVAILABLE: ") and "handshake" in line.lower(), said.stderr


def test_ctrl_c_is_one_line_and_exit_130() -> None:
    """SIGINT while a call waits on a control plane that never answers: no traceback of
    every task it cancelled."""
    import signal
    import socket

    with socket.socket() as silent:  # accepts connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(60)
        proc = subprocess.Popen(
            [sys.executable, "-m", "bluemarble.cli.bluemarblectl", "--control-plane",
             f"127.0.0.1:{silent.getsockname()[1]}", "--timeout-s", "60", "status"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        )
        try:
            conn, _ = silent.accept()  # the command is waiting for its answer now
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
            conn.close()
        finally:
            proc.kill()
    assert proc.returncode == ctl.EXIT_INTERRUPTED == 130
    assert err.strip() == "bluemarblectl: interrupted", err
