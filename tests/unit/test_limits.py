"""The limits every server and message is sized from, and ``echo``, the one way error
messages and logs quote a caller's input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bluemarble.api import cluster_config
from bluemarble.api.conversions import ring_to_proto
from bluemarble.core import limits
from bluemarble.core.errors import InvalidArgument
from bluemarble.core.ids import MAX_SHARD_INDEX_DIGITS, ShardId, shard_id, shard_index
from bluemarble.core.ring import initial_ring
from bluemarble.v1 import common_pb2, controlplane_pb2
from controlplane.store import codec


class TestEcho:
    def test_short_values_are_quoted_whole(self) -> None:
        assert limits.echo("n1") == "'n1'"
        assert limits.echo(b"\xff") == "b'\\xff'"
        assert limits.echo(7) == "7"

    def test_long_values_are_cut_and_their_size_is_said(self) -> None:
        text = limits.echo("x" * 1_000_000)
        assert len(text) < limits.MAX_ECHO_CHARS + 30
        assert text.endswith("... (1000000 chars)")

    def test_the_limit_can_be_tightened(self) -> None:
        assert len(limits.echo("y" * 100, 10)) < 40

    @given(st.one_of(st.text(max_size=5000), st.binary(max_size=5000), st.integers()))
    def test_never_longer_than_the_limit_plus_the_size_note(self, value: object) -> None:
        assert len(limits.echo(value)) <= limits.MAX_ECHO_CHARS + 30


class TestRequestCaps:
    def test_the_largest_legal_heartbeat_fits_the_control_plane_cap(self) -> None:
        request = controlplane_pb2.HeartbeatRequest(node_id="n" * 128, lease_id=2**63 - 1)
        for i in range(limits.MAX_SHARD_STATUSES):
            request.shards.add(
                shard_id=shard_id(i), epoch=2**64 - 1, role=common_pb2.SHARD_ROLE_REPLICA, applied_lsn=2**64 - 1
            )
        assert request.ByteSize() < limits.CONTROL_PLANE_MAX_REQUEST_BYTES

    def test_caps_are_ordered(self) -> None:
        assert limits.CONTROL_PLANE_MAX_REQUEST_BYTES < limits.ETCD_MAX_REQUEST_BYTES
        assert limits.CONTROL_PLANE_MAX_REQUEST_BYTES <= limits.SHARD_NODE_MAX_REQUEST_BYTES
        assert limits.SHARD_NODE_MAX_REQUEST_BYTES <= limits.MAX_MESSAGE_BYTES


class TestShardIndex:
    @pytest.mark.parametrize(("name", "index"), [("shard-0", 0), ("shard-7", 7), ("shard-4095", 4095)])
    def test_canonical_names_parse(self, name: str, index: int) -> None:
        assert shard_index(ShardId(name)) == index

    @pytest.mark.parametrize(
        ("name", "text"),
        [
            ("shard-١", "ASCII digits"),  # str.isdigit() says yes, int() reads 1
            ("shard-²", "ASCII digits"),
            ("shard-01", "not canonical"),
            ("shard-00", "not canonical"),
            ("shard-", "does not end with a number"),
            ("shard-+1", "does not end with a number"),
            ("shard- 1", "does not end with a number"),
            ("shard-1_000", "does not end with a number"),
            ("shard-" + "9" * (MAX_SHARD_INDEX_DIGITS + 1), "more than"),
            ("Shard-1", "does not start with"),
        ],
    )
    def test_everything_else_is_refused_without_python_internals(self, name: str, text: str) -> None:
        with pytest.raises(ValueError) as info:
            shard_index(ShardId(name))
        assert text in str(info.value)
        assert "invalid literal" not in str(info.value)

    def test_a_huge_name_gives_a_short_message(self) -> None:
        with pytest.raises(ValueError) as info:
            shard_index(ShardId("shard-" + "1" * 1_000_000))
        assert len(str(info.value)) < 200

    @given(st.text(max_size=20))
    def test_parses_exactly_what_shard_id_builds(self, name: str) -> None:
        try:
            index = shard_index(ShardId(name))
        except ValueError:
            return
        assert shard_id(index) == name


def test_the_largest_ring_the_config_allows_fits_one_etcd_request() -> None:
    vnodes = 150
    shards = limits.MAX_RING_TOKENS // vnodes  # 418
    cluster_config.validate(cluster_config.default_config(shard_count=shards, vnodes_per_shard=vnodes))
    encoded = codec.encode(ring_to_proto(initial_ring(shards, vnodes=vnodes)))
    assert len(encoded) <= limits.ETCD_MAX_REQUEST_BYTES - limits.RING_OVERHEAD_BYTES, len(encoded)
    with pytest.raises(InvalidArgument, match="one etcd value"):
        cluster_config.default_config(shard_count=shards + 1, vnodes_per_shard=vnodes)
