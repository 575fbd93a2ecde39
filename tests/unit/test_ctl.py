"""bluemarblectl's tables and argument handling (pure rendering, no server)."""

from __future__ import annotations

import pytest

from bluemarble.api.conversions import ring_to_proto
from bluemarble.cli import bluemarblectl as ctl
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


def test_shards_table_shows_epochs_and_missing_primaries() -> None:
    r = pb.ListAssignmentsResponse(
        revision=9,
        assignments=[
            common_pb2.Assignment(shard_id="shard-0", epoch=3, primary="n1", replicas=["n2", "n3"]),
            common_pb2.Assignment(shard_id="shard-1", epoch=1),
        ],
    )
    lines = ctl.render_shards(r).splitlines()
    assert lines[2].split() == ["shard-0", "3", "n1", "n2,n3"]
    assert lines[3].split() == ["shard-1", "1", "(none)", "-"]
    assert lines[-1] == "revision 9"


def test_ring_table_shows_each_shards_share() -> None:
    text = ctl.render_ring(ring_to_proto(initial_ring(4, 10)))
    assert text.count("25.00%") == 4
    assert "ring version 1, hash xxh3_64" in text


def test_status_names_the_leader_or_says_none() -> None:
    r = pb.GetClusterStatusResponse(cluster="c", served_by="cp-0", leader="", node_count=3)
    assert "(none elected)" in ctl.render_status(r)
    r.leader = "cp-1"
    assert "cp-1" in ctl.render_status(r)


@pytest.mark.parametrize(
    ("pairs", "message"),
    [(["lease_ttl_s"], "KEY=VALUE"), (["nope=1"], "unknown config key"), (["lease_ttl_s=x"], "integer"),
     (["consistency.chat=LOUD"], "STRONG, EVENTUAL or CAUSAL")],
)
def test_config_set_refuses_bad_pairs(pairs: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        ctl._parse_config_assignments(pairs, common_pb2.ClusterConfig())


def test_config_set_applies_pairs() -> None:
    config = common_pb2.ClusterConfig()
    ctl._parse_config_assignments(["lease_ttl_s=5", "consistency.chat=eventual"], config)
    assert config.lease_ttl_s == 5
    assert config.consistency["chat"] == common_pb2.CONSISTENCY_MODEL_EVENTUAL


def test_unreachable_control_plane_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from scripts.localcluster import free_port

    code = ctl.main(["--control-plane", f"127.0.0.1:{free_port()}", "--timeout-s", "0.5", "status"])
    assert code == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_status_shows_replication_figures_and_warnings() -> None:
    r = pb.GetClusterStatusResponse(
        cluster="c", served_by="cp-0", shards_under_replicated=3, live_nodes_eligible=2,
        warnings=["replication_factor is 3 but only 2 live nodes are eligible"],
    )
    text = ctl.render_status(r)
    assert "shards under-replicated  3" in text and "eligible live nodes      2" in text
    assert "warning                  replication_factor is 3 but only 2" in text


def test_shards_say_when_the_answer_may_be_stale() -> None:
    fresh = pb.ListAssignmentsResponse(revision=7)
    assert "STALE" not in ctl.render_shards(fresh)
    stale = pb.ListAssignmentsResponse(revision=7, stale=True, stale_reason="watch lost 3 s ago")
    assert ctl.render_shards(stale).endswith("STALE: watch lost 3 s ago")
