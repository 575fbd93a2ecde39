"""``bluemarblectl trade``: rendering, the request it builds, and exit statuses against a
small in-process TradeCoordinator."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio
import pytest

from bluemarble.cli import bluemarblectl as ctl
from bluemarble.runtime.grpc_server import ServiceBinding, build_server
from bluemarble.v1 import common_pb2, controlplane_pb2, controlplane_pb2_grpc, shardnode_pb2, trade_pb2, trade_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]


def test_trade_result_says_outcome_reason_and_kind() -> None:
    text = ctl.render_trade_result(trade_pb2.ExecuteTradeResponse(
        trade_id="t1", outcome=common_pb2.TRADE_OUTCOME_ABORTED, reason="player b has 3 gold available",
        cross_shard=True))
    assert "ABORTED" in text and "player b has 3 gold available" in text and "cross-shard" in text
    assert "cause" not in text  # no cause given, none shown
    for cause, says in ((common_pb2.TRADE_ABORT_CAUSE_REFUSED, "refused: the terms"),
                        (common_pb2.TRADE_ABORT_CAUSE_UNAVAILABLE, "a new trade id may commit"),
                        (common_pb2.TRADE_ABORT_CAUSE_CONTENDED, "other trades not settled yet")):
        shown = ctl.render_trade_result(trade_pb2.ExecuteTradeResponse(
            trade_id="t1", outcome=common_pb2.TRADE_OUTCOME_ABORTED, reason="x", abort_cause=cause))
        assert says in shown, shown
        assert says in ctl.render_trade(trade_pb2.GetTradeResponse(
            trade_id="t1", outcome=common_pb2.TRADE_OUTCOME_ABORTED, abort_cause=cause))


def test_trade_show_lists_terms_decision_and_each_side() -> None:
    r = trade_pb2.GetTradeResponse(
        trade_id="t1", state=trade_pb2.TRADE_STATE_COMMITTED, outcome=common_pb2.TRADE_OUTCOME_COMMITTED,
        request=trade_pb2.ExecuteTradeRequest(
            trade_id="t1", player_a="a", player_b="b", a_gives=common_pb2.Offer(item_ids=["sword"], gold=5)),
        decided_by="coordinator cp-0", cross_shard=True,
        sides=[shardnode_pb2.ParticipantTrade(
            trade_id="t1", shard_id="shard-2", node_id="n1", state=shardnode_pb2.PARTICIPANT_TRADE_STATE_PREPARED,
            leg=shardnode_pb2.TradeLeg(player_id="b"), deadline_ms=99)],
    )
    text = ctl.render_trade(r)
    assert "a gives sword + 5 gold; b gives nothing" in text
    assert "coordinator cp-0" in text and "not yet (phase 2 unfinished)" in text
    row = text.splitlines()[-1].split()
    assert row[:5] == ["t1", "shard-2", "n1", "PREPARED", "b"]


def test_in_doubt_leaves_out_trades_in_flight_and_tells_deadlines_from_now() -> None:
    """Escrows prepared a moment ago belong to trades in flight: counted, not listed. A
    deadline reads from now, not as wall-clock milliseconds."""
    now = 1_800_000_000_000

    def escrow(trade_id: str, age_ms: int, deadline_in_ms: int) -> shardnode_pb2.ParticipantTrade:
        return shardnode_pb2.ParticipantTrade(
            trade_id=trade_id, shard_id="shard-1", node_id="n1", state=shardnode_pb2.PARTICIPANT_TRADE_STATE_PREPARED,
            leg=shardnode_pb2.TradeLeg(player_id="p"), prepared_at_ms=now - age_ms, deadline_ms=now + deadline_in_ms)

    listed = trade_pb2.ListInDoubtTradesResponse(
        trades=[escrow("stuck", 12_000, -2_000), escrow("old", 3_000, 7_000), escrow("young", 40, 9_960)])
    text = ctl.render_in_doubt(listed, min_age_s=2.0, now_ms=now)
    rows = {line.split()[0]: line for line in text.splitlines()}
    assert "young" not in rows and "stuck" in rows and "old" in rows
    assert "12.0" in rows["stuck"] and "passed 2.0 s ago" in rows["stuck"] and "in 7.0 s" in rows["old"]
    assert "2 escrow(s) in doubt, 1 past their deadline" in text
    assert "1 younger than 2 s left out" in text
    assert "young" in ctl.render_in_doubt(listed, min_age_s=0, now_ms=now)


def test_a_done_trade_not_retained_yet_says_its_sides_applied_it() -> None:
    r = trade_pb2.GetTradeResponse(trade_id="t1", state=trade_pb2.TRADE_STATE_DONE,
                                   outcome=common_pb2.TRADE_OUTCOME_ABORTED, decided_by="participant shard-3",
                                   cross_shard=True)
    assert "not yet (both sides applied it;" in ctl.render_trade(r)


def test_in_doubt_lists_unreachable_nodes() -> None:
    text = ctl.render_in_doubt(trade_pb2.ListInDoubtTradesResponse(unreachable_nodes=["n3"]))
    assert "0 escrow(s) in doubt" in text and "unreachable (their escrows are missing): n3" in text


def test_in_doubt_and_show_name_the_shards_with_no_primary_to_ask(capsys: pytest.CaptureFixture[str]) -> None:
    listed = trade_pb2.ListInDoubtTradesResponse(unled_shards=["shard-9", "shard-11"])
    assert "no primary right now (their escrows are missing): shard-9, shard-11" in ctl.render_in_doubt(listed)
    shown = trade_pb2.GetTradeResponse(trade_id="t1", unled_shards=["shard-9"])
    assert "no primary right now (a side there is missing): shard-9" in ctl.render_trade(shown)
    assert ctl._partial([], listed.unled_shards) == ctl.EXIT_NO_ANSWER  # a part is not the whole
    assert "shard-9, shard-11 have no primary to ask: the answer is partial" in capsys.readouterr().err
    assert ctl._partial([], []) == 0


class _Coordinator(trade_pb2_grpc.TradeCoordinatorServicer):
    def __init__(self) -> None:
        self.requests: list[trade_pb2.ExecuteTradeRequest] = []

    async def ExecuteTrade(self, request: trade_pb2.ExecuteTradeRequest, context: Ctx
                           ) -> trade_pb2.ExecuteTradeResponse:
        self.requests.append(request)
        if request.trade_id == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the trade is empty")
        outcome = common_pb2.TRADE_OUTCOME_COMMITTED if request.a_gives.gold else common_pb2.TRADE_OUTCOME_ABORTED
        return trade_pb2.ExecuteTradeResponse(trade_id=request.trade_id, outcome=outcome, cross_shard=True)


async def test_execute_exit_status_is_0_committed_3_aborted_1_error(capsys: pytest.CaptureFixture[str]) -> None:
    servicer = _Coordinator()
    server = await build_server("127.0.0.1:0", [ServiceBinding(
        trade_pb2.DESCRIPTOR.services_by_name["TradeCoordinator"].full_name, servicer,
        trade_pb2_grpc.add_TradeCoordinatorServicer_to_server)])
    try:
        base = ["--control-plane", f"127.0.0.1:{server.port}", "trade", "execute"]
        first = [*base, "t1", "a", "b", "--a-items", "x", "y", "--a-gold", "3", "--b-items", "z"]
        assert await ctl.run(_args(first)) == 0
        assert servicer.requests[-1] == trade_pb2.ExecuteTradeRequest(
            trade_id="t1", player_a="a", player_b="b", a_gives=common_pb2.Offer(item_ids=["x", "y"], gold=3),
            b_gives=common_pb2.Offer(item_ids=["z"]))
        assert "COMMITTED" in capsys.readouterr().out
        assert await ctl.run(_args([*base, "t2", "a", "b", "--b-gold", "1"])) == ctl.EXIT_ABORTED
        assert await ctl.run(_args([*base, "bad", "a", "b"])) == 1
        assert "INVALID_ARGUMENT: the trade is empty" in capsys.readouterr().err
    finally:
        await server.stop_gracefully(0.1)


def _args(argv: list[str]) -> Any:
    captured: dict[str, Any] = {}

    async def fake_run(args: Any) -> int:
        captured["args"] = args
        return 0

    real_run, ctl.run = ctl.run, fake_run  # type: ignore[assignment]
    real_asyncio_run = ctl.asyncio.run
    try:
        ctl.asyncio.run = lambda coro: _close(coro)  # type: ignore[assignment]
        ctl.main(argv)
    finally:
        ctl.run = real_run  # type: ignore[assignment]
        ctl.asyncio.run = real_asyncio_run  # type: ignore[assignment]
    return captured["args"]


def _close(coro: Any) -> int:
    try:
        coro.send(None)
    except StopIteration as stop:
        return int(stop.value)
    raise AssertionError("the parsed-arguments hook awaited something")


@pytest.mark.parametrize(
    ("flag", "value"), [("--a-gold", "99999999999999999999999"), ("--b-gold", str(2**64)), ("--a-gold", "-1"),
                        ("--b-gold", str(2**53 + 1))],
)
def test_out_of_range_gold_is_bad_usage(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2, as every number flag out of its range (--limit, config values): refused
    before the request is built (protobuf cannot hold 2^64) or a cluster is asked."""
    from scripts.localcluster import free_port

    argv = ["--control-plane", f"127.0.0.1:{free_port()}", "--timeout-s", "0.5", "trade", "execute", "t", "a", "b",
            "--a-items", "x", flag, value]
    with pytest.raises(SystemExit) as exited:
        ctl.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: gold is " in err and "between 0 and 2^53" in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exited:
        ctl.main(["--control-plane", "127.0.0.1:1", "grant", "p", "--gold", value])
    assert exited.value.code == 2 and "argument --gold: gold is " in capsys.readouterr().err


def test_repeated_item_flags_add_up_and_a_repeated_gold_flag_is_bad_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--a-items x --a-items y` gives both (the last alone would trade y and keep x, with
    the answer never saying so); a second `--a-gold` is a slip, not an override."""
    base = ["trade", "execute", "t1", "a", "b"]
    args = _args([*base, "--a-items", "ring", "--a-items", "helm", "cape", "--b-items", "z", "--b-items", "w"])
    request = ctl.trade_request(args)
    assert list(request.a_gives.item_ids) == ["ring", "helm", "cape"] and list(request.b_gives.item_ids) == ["z", "w"]
    assert list(ctl.trade_request(_args(base)).a_gives.item_ids) == []  # the default list is not shared
    for argv in ([*base, "--a-gold", "1", "--a-gold", "2"], ["grant", "p", "--gold", "1", "--gold", "2"],
                 ["grant", "p", "--request-id", "r1", "--request-id", "r2"],
                 ["trade", "show", "t1", "--player", "a", "--player", "b"]):
        with pytest.raises(SystemExit) as exited:
            ctl.main(argv)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and "given twice; give it once" in err, (argv, err)


def test_trade_show_names_the_nodes_that_did_not_answer() -> None:
    r = trade_pb2.GetTradeResponse(trade_id="t1", state=trade_pb2.TRADE_STATE_DONE, cross_shard=True,
                                   outcome=common_pb2.TRADE_OUTCOME_COMMITTED, unreachable_nodes=["n3"])
    assert "unreachable (the sides they lead are missing): n3" in ctl.render_trade(r)


class _PartialTrades(trade_pb2_grpc.TradeCoordinatorServicer):
    """Answers as a coordinator whose node n3 did not answer."""

    async def GetTrade(self, request: trade_pb2.GetTradeRequest, context: Ctx) -> trade_pb2.GetTradeResponse:
        return trade_pb2.GetTradeResponse(
            trade_id=request.trade_id, state=trade_pb2.TRADE_STATE_COMMITTED, cross_shard=True,
            outcome=common_pb2.TRADE_OUTCOME_COMMITTED, unreachable_nodes=["n3"])

    async def ListInDoubtTrades(self, request: trade_pb2.ListInDoubtTradesRequest, context: Ctx
                                ) -> trade_pb2.ListInDoubtTradesResponse:
        return trade_pb2.ListInDoubtTradesResponse(unreachable_nodes=["n3"])

    async def ExecuteTrade(self, request: trade_pb2.ExecuteTradeRequest, context: Ctx
                           ) -> trade_pb2.ExecuteTradeResponse:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "etcd did not answer")
        raise AssertionError("unreachable")


async def test_a_partial_answer_is_printed_and_exits_4_and_an_unanswered_trade_says_to_retry_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A script reading `trade in-doubt` must not take "0 escrow(s)" from a cluster with a
    node down for "nothing in doubt"."""
    server = await build_server("127.0.0.1:0", [ServiceBinding(
        trade_pb2.DESCRIPTOR.services_by_name["TradeCoordinator"].full_name, _PartialTrades(),
        trade_pb2_grpc.add_TradeCoordinatorServicer_to_server)])
    try:
        base = ["--control-plane", f"127.0.0.1:{server.port}", "--timeout-s", "1", "trade"]
        assert await ctl.run(_args([*base, "show", "t1"])) == ctl.EXIT_NO_ANSWER
        out, err = capsys.readouterr()
        assert "COMMITTED" in out and "n3 did not answer: the answer is partial" in err
        assert await ctl.run(_args([*base, "in-doubt"])) == ctl.EXIT_NO_ANSWER
        out, err = capsys.readouterr()
        assert "0 escrow(s) in doubt" in out and "n3 did not answer" in err
        assert await ctl.run(_args([*base, "execute", "t9", "a", "b", "--a-gold", "1"])) == ctl.EXIT_NO_ANSWER
        err = capsys.readouterr().err
        assert "UNAVAILABLE" in err and "run the same command again, with trade id 't9'" in err, err
    finally:
        await server.stop_gracefully(0.1)


def test_config_errors_do_not_give_the_apis_advice() -> None:
    said = ctl._in_cli_words("config", "consistency lacks 'inventory', which must stay listed as STRONG; send the "
                                       "whole table (GetConfig, edit, SetConfig)")
    assert said == ("consistency lacks 'inventory', which must stay listed as STRONG; consistency.SYSTEM= removes "
                    "other systems only")


def test_errors_name_the_flags_this_command_takes_not_the_api_fields() -> None:
    said = ctl._in_cli_words("trade", "a_gives.item_ids lists 'x' twice; b_gives.gold is -1")
    assert said == "--a-items lists 'x' twice; --b-gold is -1"
    assert ctl._in_cli_words("grant", "outcome unknown: retry with request_id 'r1'") == (
        "outcome unknown: retry with --request-id 'r1'")
    assert ctl._in_cli_words("grant", "my_request_ids") == "my_request_ids"  # whole words only
    assert ctl._in_cli_words("status", "request_id") == "request_id"


class _RacedConfig(controlplane_pb2_grpc.ControlPlaneServicer):
    """A control plane where another change lands between the first read and write."""

    def __init__(self) -> None:
        from bluemarble.api import cluster_config

        self.config = cluster_config.default_config(replication_factor=3, lease_ttl_s=10, shard_count=4)
        self.revision, self.sets = 5, 0

    async def GetConfig(self, request: Any, context: Ctx) -> controlplane_pb2.GetConfigResponse:
        return controlplane_pb2.GetConfigResponse(config=self.config, revision=self.revision)

    async def SetConfig(self, request: controlplane_pb2.SetConfigRequest, context: Ctx
                        ) -> controlplane_pb2.SetConfigResponse:
        self.sets += 1
        if self.sets == 1:  # the other operator's change wins the race
            self.config.max_moves_per_round, self.revision = 9, 6
        if request.expected_revision != self.revision:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"config changed since revision {request.expected_revision} (now {self.revision})")
        self.config, self.revision = request.config, self.revision + 1
        return controlplane_pb2.SetConfigResponse(config=self.config, revision=self.revision)


async def test_config_set_applies_its_pairs_again_over_a_change_that_landed_first() -> None:
    servicer = _RacedConfig()
    server = await build_server("127.0.0.1:0", [ServiceBinding(
        controlplane_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name, servicer,
        controlplane_pb2_grpc.add_ControlPlaneServicer_to_server)])
    try:
        argv = ["--control-plane", f"127.0.0.1:{server.port}", "config", "set", "lease_ttl_s=7"]
        assert await ctl.run(_args(argv)) == 0
        assert servicer.sets == 2
        assert (servicer.config.lease_ttl_s, servicer.config.max_moves_per_round) == (7, 9)  # both changes stand
    finally:
        await server.stop_gracefully(0.1)
