"""bluemarblectl's tables and argument handling (pure rendering, no server)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from bluemarble.api.conversions import ring_to_proto
from bluemarble.cli import bluemarblectl as ctl
from bluemarble.client.routing import DataWriteResult, GrantResult, Inventory, PlayerData
from bluemarble.core.ids import NodeId, PlayerId, ShardId
from bluemarble.core.ring import initial_ring
from bluemarble.v1 import common_pb2
from bluemarble.v1 import controlplane_pb2 as pb


def test_table_aligns_columns() -> None:
    text = ctl.table(("A", "LONGER"), [("x", 1), ("yyyy", 22)])
    lines = text.splitlines()
    assert lines[0] == "A     LONGER"
    assert lines[1] == "----  ------"
    assert lines[3] == "yyyy  22"


def test_nodes_table() -> None:
    r = pb.ListNodesResponse(
        nodes=[common_pb2.Node(node_id="n1", address="127.0.0.1:7101", zone="z1", capacity=2,
                               state=common_pb2.NODE_STATE_DRAINING, lease_id=255)]
    )
    text = ctl.render_nodes(r)
    assert "n1" in text and "DRAINING" in text and "0xff" in text and "1 node(s)" in text
    assert "STALE" not in text and "TROUBLE" not in text
    r.nodes[0].trouble, r.nodes[0].trouble_since_ms = "storage refuses writes: disk full", 1
    assert "DRAINING (TROUBLE)" in ctl.render_nodes(r) and "\nn1: storage refuses writes: disk full (for " in (
        ctl.render_nodes(r))
    r.nodes[0].trouble = ""
    r.stale, r.stale_reason = True, "replica cp-0 could not read etcd (no answer within 0.5 s)"
    assert ctl.render_nodes(r).endswith("\nSTALE: replica cp-0 could not read etcd (no answer within 0.5 s)")


def test_shards_table_shows_epochs_and_missing_primaries() -> None:
    r = pb.ListAssignmentsResponse(
        revision=9,
        assignments=[
            common_pb2.Assignment(shard_id="shard-0", epoch=3, primary="n1", replicas=["n2", "n3"]),
            common_pb2.Assignment(shard_id="shard-1", epoch=1),
        ],
    )
    lines = ctl.render_shards(r).splitlines()
    assert lines[2].split() == ["shard-0", "3", "n1", "?", "n2", "?,", "n3", "?"]
    assert lines[3].split() == ["shard-1", "1", "(none)", "-"]
    assert lines[-1] == "revision 9"


def test_shards_table_shows_each_members_log_position_and_lag() -> None:
    def member(node: str, last_epoch: int, lsn: int, lag_entries: int = 0, lag_ms: int = 0) -> pb.MemberStatus:
        return pb.MemberStatus(shard_id="shard-0", node_id=node, status=common_pb2.ShardStatus(
            shard_id="shard-0", epoch=3, last_epoch=last_epoch, applied_lsn=lsn, lag_entries=lag_entries,
            lag_ms=lag_ms))

    r = pb.ListAssignmentsResponse(
        revision=9,
        assignments=[common_pb2.Assignment(shard_id="shard-0", epoch=3, primary="n1", replicas=["n2", "n3"])],
        statuses=[member("n1", 3, 120, 4, 35), member("n2", 3, 116, 4, 35)],
    )
    row = ctl.render_shards(r).splitlines()[2]
    assert "n1 (3,120) farthest replica 4/35ms" in row  # the primary: its farthest replica
    assert "n2 (3,116) lag 4/35ms, n3 ?" in row


def test_shards_command_asks_for_member_statuses() -> None:
    _, request, _ = ctl.READS["shards"]
    assert request().include_status  # type: ignore[attr-defined]


def test_ring_table_shows_each_shards_share() -> None:
    text = ctl.render_ring(ring_to_proto(initial_ring(4, 10)))
    assert text.count("25.00%") == 4
    assert "ring version 1, hash xxh3_64" in text


def test_status_names_the_leader_or_says_none() -> None:
    r = pb.GetClusterStatusResponse(cluster="c", served_by="cp-0", leader="", node_count=3)
    assert "unknown (etcd unreachable)" in ctl.render_status(r)  # etcd_healthy is False
    r.etcd_healthy = True
    assert "(none elected)" in ctl.render_status(r)
    r.leader = "cp-1"
    assert "cp-1" in ctl.render_status(r)
    assert "hint" not in ctl.render_status(r)


def test_status_shows_a_config_not_read_yet_as_unknown_not_zero() -> None:
    r = pb.GetClusterStatusResponse(cluster="c", served_by="cp-0", etcd_healthy=False)
    text = ctl.render_status(r)
    assert "unknown (etcd unreachable)" in text and "lease TTL" not in text and "replication factor" not in text
    assert "shards under-replicated  unknown" in text
    r.config.replication_factor, r.config.lease_ttl_s = 2, 10
    text = ctl.render_status(r)
    assert "replication factor" in text and "10 s" in text and "config" not in text


def test_status_says_what_to_do_about_shards_without_a_primary() -> None:
    r = pb.GetClusterStatusResponse(cluster="c", served_by="cp-0", leader="cp-0", shards_without_primary=2)
    text = ctl.render_status(r)
    assert "shards without primary   2" in text
    assert "bring a lost node back" in text and "promote SHARD NODE --accept-data-loss" in text


@pytest.mark.parametrize(
    ("pairs", "message"),
    [(["lease_ttl_s"], "KEY=VALUE"), (["nope=1"], "unknown config key"), (["lease_ttl_s=x"], "integer"),
     (["consistency.chat=LOUD"], "STRONG, EVENTUAL or CAUSAL"),
     (["replication_factor=3", "replication_factor=2"], "'replication_factor' is given twice"),
     (["consistency.chat=STRONG", "consistency.chat=EVENTUAL"], "'consistency.chat' is given twice")],
)
def test_config_set_refuses_bad_pairs(pairs: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        ctl._parse_config_assignments(pairs, common_pb2.ClusterConfig())
    assert info.value.code == 2  # bad usage, as argparse's own
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("pair", ["k" * 100_000 + "=1", "consistency.chat=" + "x" * 100_000])
def test_config_set_never_echoes_a_huge_pair(pair: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ctl._parse_config_assignments([pair], common_pb2.ClusterConfig())
    err = capsys.readouterr().err
    assert "(100000 chars)" in err and len(err) < 1000, len(err)


def test_config_set_applies_pairs() -> None:
    config = common_pb2.ClusterConfig()
    ctl._parse_config_assignments(["lease_ttl_s=5", "consistency.chat=eventual"], config)
    assert config.lease_ttl_s == 5
    assert config.consistency["chat"] == common_pb2.CONSISTENCY_MODEL_EVENTUAL


def test_unreachable_control_plane_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from scripts.localcluster import free_port

    started = time.monotonic()
    code = ctl.main(["--control-plane", f"127.0.0.1:{free_port()}", "--timeout-s", "2", "status"])
    assert code == ctl.EXIT_NO_ANSWER  # the cluster did not answer: worth a retry, unlike an error (1)
    assert "UNAVAILABLE" in capsys.readouterr().err
    # Tried again until its deadline (a control plane restarting answers within it), not
    # three quick refusals and out.
    assert time.monotonic() - started >= 1.5


def test_promote_also_tries_again_until_its_deadline(capsys: pytest.CaptureFixture[str]) -> None:
    """A promotion is safe to send again (a node already primary says so), so a control
    plane not reachable yet is retried within --timeout-s as other commands are."""
    from scripts.localcluster import free_port

    started = time.monotonic()
    code = ctl.main(["--control-plane", f"127.0.0.1:{free_port()}", "--timeout-s", "2",
                     "promote", "shard-1", "n1", "--accept-data-loss"])
    assert code == ctl.EXIT_NO_ANSWER
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert time.monotonic() - started >= 1.5


def test_status_shows_replication_figures_and_warnings() -> None:
    r = pb.GetClusterStatusResponse(
        cluster="c", served_by="cp-0", shards_under_replicated=3, live_nodes_eligible=2,
        warnings=["replication_factor is 3 but only 2 live nodes are eligible"], etcd_healthy=True,
        config=common_pb2.ClusterConfig(replication_factor=3),
    )
    text = ctl.render_status(r)
    assert "shards under-replicated  3" in text and "eligible live nodes      2" in text
    assert "warning                  replication_factor is 3 but only 2" in text


def test_shards_say_when_the_answer_may_be_stale() -> None:
    fresh = pb.ListAssignmentsResponse(revision=7)
    assert "STALE" not in ctl.render_shards(fresh)
    stale = pb.ListAssignmentsResponse(revision=7, stale=True, stale_reason="watch lost 3 s ago")
    assert ctl.render_shards(stale).endswith("STALE: watch lost 3 s ago")


INVENTORY = Inventory(
    player_id=PlayerId("player-42"), item_ids=("sword", "shield"), gold=100, shard_id=ShardId("shard-3"), epoch=2,
    stale=False, lag_entries=0, lag_ms=0, served_by=NodeId("n1"),
)


def test_inventory_names_shard_epoch_server_gold_and_items() -> None:
    text = ctl.render_inventory(INVENTORY)
    assert "shard      shard-3 (epoch 2)" in text and "served by  n1" in text
    assert "gold       100" in text and "items      sword, shield" in text
    assert "stale" not in text


def test_inventory_shows_what_unsettled_trades_hold_in_escrow() -> None:
    assert "escrowed   (none)" in ctl.render_inventory(INVENTORY)
    held = dataclasses.replace(INVENTORY, escrowed_item_ids=("sword",), escrowed_gold=30)
    assert "escrowed   sword, 30 gold (held by trades not yet settled)" in ctl.render_inventory(held)
    only_gold = dataclasses.replace(INVENTORY, escrowed_gold=7)
    assert "escrowed   7 gold (held by trades not yet settled)" in ctl.render_inventory(only_gold)
    shown = json.loads(ctl._as_json(held))
    assert shown["escrowed_item_ids"] == ["sword"] and shown["escrowed_gold"] == 30


def test_the_routing_client_keeps_the_escrow_of_the_answer() -> None:
    from bluemarble.client import routing
    from bluemarble.v1 import shardnode_pb2

    answer = shardnode_pb2.GetInventoryResponse(
        player_id="p", item_ids=["sword", "axe"], gold=40, shard_id="shard-1", epoch=2,
        escrowed_item_ids=["sword"], escrowed_gold=30,
    )
    inv = routing._inventory(answer, NodeId("n1"))
    assert (inv.escrowed_item_ids, inv.escrowed_gold) == (("sword",), 30)


@pytest.mark.parametrize(
    "value", ["nan", "inf", "-1", "0", "0.01", "0.0000001", "1e309", "3601", "1_0", " 3 ", "1e3", "٣"])
def test_a_timeout_that_is_no_number_of_seconds_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        ctl.main(["--timeout-s", value, "status"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--timeout-s" in err and "number of seconds" in err


@pytest.mark.parametrize("command", ["grant", "take"])
def test_grant_and_take_without_arguments_ask_for_the_player_only(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        ctl.main([command])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "the following arguments are required: player" in err, err
    assert "ITEM" not in err.splitlines()[-1], err  # items are optional (--gold alone is a grant)


@pytest.mark.parametrize(
    "pair", ["replication_factor=99999999999999999999", "lease_ttl_s=" + "9" * 5000, "shard_count=0",
             "vnodes_per_shard=\u0661"],
)
def test_config_values_out_of_range_are_refused_in_one_line(pair: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = common_pb2.ClusterConfig()
    with pytest.raises(SystemExit) as info:
        ctl._parse_config_assignments([pair], config)
    assert info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("bluemarblectl: ") and len(message) < 200 and message.count("\n") == 1, message
    assert config == common_pb2.ClusterConfig()


def test_inventory_from_a_replica_says_how_stale_it_is() -> None:
    stale = dataclasses.replace(INVENTORY, item_ids=(), stale=True, lag_entries=3, lag_ms=40, served_by=NodeId("n2"))
    text = ctl.render_inventory(stale)
    assert "items      (none)" in text
    assert "stale      yes: from a replica, 3 entries / 40 ms behind its primary" in text


def test_grant_says_whether_it_was_a_replay() -> None:
    applied = GrantResult(inventory=INVENTORY, lsn=7, replayed=False, request_id="req-1")
    assert "grant       applied" in ctl.render_grant(applied) and "request id  req-1" in ctl.render_grant(applied)
    replayed = dataclasses.replace(applied, replayed=True)
    assert "replayed: an earlier attempt with this request id was applied" in ctl.render_grant(replayed)


def test_player_data_shows_the_value_or_that_it_is_unset() -> None:
    d = PlayerData(player_id=PlayerId("p"), system="guild", key="name", value=b"Night Owls",
                   shard_id=ShardId("shard-1"), epoch=1, lsn=4, stale=False, lag_entries=0, lag_ms=0,
                   served_by=NodeId("n1"))
    assert "value      Night Owls" in ctl.render_player_data(d)
    assert "value      0xff00" in ctl.render_player_data(dataclasses.replace(d, value=b"\xff\x00"))
    assert "(not set)" in ctl.render_player_data(dataclasses.replace(d, value=None))
    # Opaque, often chosen by players: no escape sequence reaches the terminal, no newline forges a row.
    forged = ctl.render_player_data(dataclasses.replace(d, value=b"\x1b[31mRED\x1b]0;pwned\x07\nfake-line: 1"))
    assert "\x1b" not in forged and "\x07" not in forged and "\nfake-line" not in forged
    assert r"value      '\x1b[31mRED\x1b]0;pwned\x07\nfake-line: 1'" in forged
    unicode = dataclasses.replace(d, value="🎮 Nuit Blanche".encode())
    assert "value      🎮 Nuit Blanche" in ctl.render_player_data(unicode)
    w = DataWriteResult(shard_id=ShardId("shard-1"), epoch=1, lsn=5, replayed=False,
                        consistency=common_pb2.CONSISTENCY_MODEL_EVENTUAL, request_id="r")
    assert "consistency  EVENTUAL" in ctl.render_data_write(w)


def test_data_commands_print_json_on_request() -> None:
    d = PlayerData(player_id=PlayerId("p"), system="guild", key="name", value=b"owls", shard_id=ShardId("shard-1"),
                   epoch=1, lsn=4, stale=False, lag_entries=0, lag_ms=0, served_by=NodeId("n1"))
    assert json.loads(ctl._as_json(d))["value"] == "owls"
    grant = json.loads(ctl._as_json(GrantResult(INVENTORY, 7, True, "r")))
    assert grant["inventory"]["item_ids"] == ["sword", "shield"] and grant["replayed"] is True


@pytest.mark.parametrize(
    "argv",
    [["grant", "p", "a", "a"], ["inventory", ""], ["data", "set", "p", "guild", "", "v"]],
)
def test_bad_data_input_is_one_line_and_exit_1(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from scripts.localcluster import free_port

    # Refused by the client's own validation, before it needs a reachable cluster.
    code = ctl.main(["--control-plane", f"127.0.0.1:{free_port()}", "--timeout-s", "0.5", *argv])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("bluemarblectl: INVALID_ARGUMENT: ") and err.count("\n") == 1


def test_data_commands_against_an_unreachable_cluster_fail_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from scripts.localcluster import free_port

    code = ctl.main(["--control-plane", f"127.0.0.1:{free_port()}", "--timeout-s", "0.5", "inventory", "p"])
    err = capsys.readouterr().err
    assert code == ctl.EXIT_NO_ANSWER and "UNAVAILABLE" in err and err.count("\n") == 1


def test_config_is_shown_as_the_pairs_config_set_takes() -> None:
    config = common_pb2.ClusterConfig(
        replication_factor=3, lease_ttl_s=10, vnodes_per_shard=150, shard_count=16, max_moves_per_round=4,
        consistency={"inventory": common_pb2.CONSISTENCY_MODEL_STRONG, "chat": common_pb2.CONSISTENCY_MODEL_EVENTUAL},
    )
    text = ctl.render_config(config, 42)
    assert text.splitlines() == [
        "# revision 42", "replication_factor=3", "lease_ttl_s=10", "vnodes_per_shard=150", "shard_count=16",
        "max_moves_per_round=4", "consistency.chat=EVENTUAL", "consistency.inventory=STRONG",
    ]
    parsed = common_pb2.ClusterConfig()
    ctl._parse_config_assignments([line for line in text.splitlines() if not line.startswith("#")], parsed)
    assert parsed == config  # every line is a valid `config set` pair, and together they give the config back


@pytest.mark.parametrize(
    "argv", [["x" * 100_000], ["status", "--" + "y" * 100_000], ["--timeout-s", "9" * 100_000, "status"],
             ["config", "z" * 100_000]],
)
def test_usage_errors_never_echo_a_huge_argument(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        ctl.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "chars)" in err and len(err) < 2000, len(err)  # the word, quotes included


def test_a_huge_environment_value_is_refused_without_being_echoed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("BLUEMARBLE_TIMEOUT_S", "9" * 100_000)
    with pytest.raises(SystemExit) as info:
        ctl.main(["status"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "BLUEMARBLE_TIMEOUT_S" in err and len(err) < 2000, len(err)


def test_promote_waits_20_s_by_default_and_a_given_timeout_bounds_it() -> None:
    from tests.unit.test_ctl_trade import _args

    assert _args(["promote", "shard-1", "n1", "--accept-data-loss"]).timeout_s == ctl.PROMOTE_TIMEOUT_S == 20
    assert _args(["--timeout-s", "2", "promote", "shard-1", "n1", "--accept-data-loss"]).timeout_s == 2
    assert _args(["status"]).timeout_s == ctl.DEFAULT_TIMEOUT_S == 5


@pytest.mark.parametrize(
    ("pairs", "message"),
    [(["consistency.Bad-Name=STRONG"], "must be 1..64 of a-z, 0-9 or '_'"),
     (["consistency.newsys=UNSPECIFIED"], "is not STRONG, EVENTUAL or CAUSAL"),
     (["lease_ttl_s=0"], "lease_ttl_s must be between")],
)
def test_config_set_refuses_bad_pairs_before_asking_the_cluster(
    pairs: list[str], message: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """Exit 2 at once, as with the cluster up, not 4 after the timeout."""
    from scripts.localcluster import free_port

    started = time.monotonic()
    with pytest.raises(SystemExit) as info:
        ctl.main(["--control-plane", f"127.0.0.1:{free_port()}", "--timeout-s", "5", "config", "set", *pairs])
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert time.monotonic() - started < 2


def test_config_set_removes_a_system_given_no_model(capsys: pytest.CaptureFixture[str]) -> None:
    config = common_pb2.ClusterConfig()
    config.consistency.update({"inventory": common_pb2.CONSISTENCY_MODEL_STRONG,
                               "typo": common_pb2.CONSISTENCY_MODEL_EVENTUAL})
    ctl._parse_config_assignments(["consistency.typo="], config)
    assert dict(config.consistency) == {"inventory": common_pb2.CONSISTENCY_MODEL_STRONG}
    with pytest.raises(SystemExit) as info:
        ctl._parse_config_assignments(["consistency.typo="], config)
    assert info.value.code == 2 and "has no 'typo'; nothing to remove" in capsys.readouterr().err
