"""Key schema round trips, cluster config validation, the JSON codec, env flags."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bluemarble.api import cluster_config
from bluemarble.core import errors
from bluemarble.core.errors import InvalidArgument
from bluemarble.core.ids import NodeId, ShardId, TradeId, shard_id, shard_index
from bluemarble.runtime.settings import EnvArgumentParser, env_name
from bluemarble.v1 import common_pb2
from controlplane.store import codec
from controlplane.store.keys import KeySchema


class TestKeySchema:
    def test_layout_matches_the_design(self) -> None:
        k = KeySchema("prod")
        assert k.config() == "/bluemarble/prod/config"
        assert k.ring() == "/bluemarble/prod/ring"
        assert k.leader() == "/bluemarble/prod/leader"
        assert k.node(NodeId("n1")) == "/bluemarble/prod/nodes/n1"
        assert k.assignment(ShardId("shard-3")) == "/bluemarble/prod/assignments/shard-3"
        assert k.trade(TradeId("t-9")) == "/bluemarble/prod/trades/t-9"

    @given(st.text(alphabet=st.characters(blacklist_characters="/"), min_size=1, max_size=50))
    def test_node_keys_round_trip(self, node: str) -> None:
        k = KeySchema("c1")
        assert k.parse_node(k.node(NodeId(node))) == node

    def test_parse_refuses_foreign_keys(self) -> None:
        k = KeySchema("c1")
        with pytest.raises(ValueError):
            k.parse_node("/bluemarble/c2/nodes/n1")
        with pytest.raises(ValueError):
            k.parse_assignment(k.assignments_prefix())

    @pytest.mark.parametrize("name", ["", "UPPER", "a/b", "-x", "x-", "a" * 64, "a_b"])
    def test_bad_cluster_names(self, name: str) -> None:
        with pytest.raises(InvalidArgument):
            KeySchema(name)

    def test_shard_ids(self) -> None:
        assert shard_id(7) == "shard-7"
        assert shard_index(ShardId("shard-12")) == 12
        with pytest.raises(ValueError):
            shard_index(ShardId("shard-x"))


class TestClusterConfig:
    def test_defaults_are_valid(self) -> None:
        config = cluster_config.default_config()
        assert cluster_config.problems(config) == []
        assert config.consistency["inventory"] == common_pb2.CONSISTENCY_MODEL_STRONG
        assert config.consistency["chat"] == common_pb2.CONSISTENCY_MODEL_EVENTUAL
        assert config.consistency["position"] == common_pb2.CONSISTENCY_MODEL_CAUSAL

    def test_every_problem_is_reported_at_once(self) -> None:
        config = cluster_config.default_config()
        config.replication_factor = 0
        config.lease_ttl_s = 1000
        config.consistency["bad name!"] = common_pb2.CONSISTENCY_MODEL_STRONG
        config.consistency["trade"] = common_pb2.CONSISTENCY_MODEL_EVENTUAL
        found = cluster_config.problems(config)
        assert len(found) == 4, found
        with pytest.raises(InvalidArgument, match="replication_factor is 0"):
            cluster_config.validate(config)

    def test_an_empty_consistency_table_is_refused_once(self) -> None:
        config = cluster_config.default_config()
        config.ClearField("consistency")
        assert cluster_config.problems(config) == [
            "consistency is empty; send the whole table (GetConfig, edit, SetConfig): every game system "
            "with its model, inventory and trade as STRONG"
        ]

    @pytest.mark.parametrize("system", cluster_config.STRONG_ONLY)
    def test_a_system_that_must_stay_strong_cannot_be_removed(self, system: str) -> None:
        config = cluster_config.default_config()
        del config.consistency[system]
        (problem,) = cluster_config.problems(config)
        assert f"consistency lacks {system!r}, which must stay listed as STRONG" in problem
        with pytest.raises(InvalidArgument, match=f"lacks {system!r}"):
            cluster_config.validate(config)

    def test_unspecified_consistency_is_refused(self) -> None:
        config = cluster_config.default_config()
        config.consistency["chat"] = common_pb2.CONSISTENCY_MODEL_UNSPECIFIED
        assert any("chat" in p for p in cluster_config.problems(config))

    @pytest.mark.parametrize("name", ["é", "x²", "", "Chat", "a-b", "١", "a" * 65, "z" * 100_000])
    def test_system_names_outside_their_rule_are_refused_briefly(self, name: str) -> None:
        config = cluster_config.default_config()
        config.consistency[name] = common_pb2.CONSISTENCY_MODEL_EVENTUAL
        (problem,) = cluster_config.problems(config)
        assert "must be 1..64 of a-z, 0-9 or '_'" in problem
        assert len(problem) < 200

    def test_an_error_names_a_few_problems_and_counts_the_rest(self) -> None:
        config = cluster_config.default_config()
        for i in range(cluster_config.MAX_SYSTEMS - len(config.consistency)):
            config.consistency[f"Bad{i}"] = 99  # type: ignore[assignment]
        assert len(cluster_config.problems(config)) > 100
        with pytest.raises(InvalidArgument) as info:
            cluster_config.validate(config)
        assert "more" in str(info.value) and len(str(info.value)) < 600
        config.consistency["one_too_many"] = common_pb2.CONSISTENCY_MODEL_EVENTUAL
        assert cluster_config.problems(config) == ["consistency lists 65 systems; at most 64"]


class TestCodec:
    def test_round_trip_and_readable(self) -> None:
        node = common_pb2.Node(node_id="n1", address="127.0.0.1:1", capacity=2, state=common_pb2.NODE_STATE_ACTIVE)
        data = codec.encode(node)
        assert b'"node_id": "n1"' in data and b"NODE_STATE_ACTIVE" in data
        assert codec.decode(data, common_pb2.Node) == node

    def test_corrupt_value_names_the_key(self) -> None:
        with pytest.raises(codec.CorruptRecord, match="/k"):
            codec.decode(b"{not json", common_pb2.Node, "/k")

    def test_unknown_fields_are_ignored(self) -> None:
        assert codec.decode(b'{"node_id": "n1", "from_the_future": 1}', common_pb2.Node).node_id == "n1"


class TestErrors:
    def test_status_round_trip(self) -> None:
        for cls in (errors.InvalidArgument, errors.NotFound, errors.AlreadyExists, errors.Unavailable):
            err = errors.from_status_name(cls.status, "m")
            assert type(err) is cls and str(err) == "m"
        assert errors.Unavailable.retryable and not errors.NotFound.retryable
        assert type(errors.from_status_name("OUT_OF_RANGE", "m")) is errors.OutOfRange
        assert type(errors.from_status_name("DATA_LOSS", "m")) is errors.CorruptRecord


class TestEnvFlags:
    def test_env_var_is_the_default_and_the_flag_wins(self, monkeypatch: pytest.MonkeyPatch) -> None:
        assert env_name("--lease-ttl-s") == "BLUEMARBLE_LEASE_TTL_S"
        monkeypatch.setenv("BLUEMARBLE_LEASE_TTL_S", "4")
        p = EnvArgumentParser()
        p.add_flag("--lease-ttl-s", default=10, type=int, help="ttl")
        assert p.parse_args([]).lease_ttl_s == 4
        assert p.parse_args(["--lease-ttl-s", "7"]).lease_ttl_s == 7

    def test_env_var_satisfies_a_required_flag(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("BLUEMARBLE_NODE_ID", "n9")
        p = EnvArgumentParser()
        p.add_flag("--node-id", required=True, help="id")
        assert p.parse_args([]).node_id == "n9"

    def test_bad_env_value_is_a_usage_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("BLUEMARBLE_LEASE_TTL_S", "ten")
        p = EnvArgumentParser()
        with pytest.raises(SystemExit):
            p.add_flag("--lease-ttl-s", default=10, type=int, help="ttl")
