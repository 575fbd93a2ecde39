"""Unit tests of the pure consistent hash ring (bluemarble.core.ring), grouped by behaviour.

The lookup is checked against a deliberately naive reference (a linear scan over every
token); the allocator against its promises (share of the new shard, balance, only keys
that the new shard takes move). Everything here is in-memory and fast.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bluemarble.core.ids import ShardId, shard_id
from bluemarble.core.ring import (
    DEFAULT_VNODES,
    HASH_NAME,
    HASH_SPACE,
    MAX_TOKEN,
    MAX_TOKENS_PER_SHARD,
    Ring,
    initial_ring,
    key_hash,
)

PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# -- helpers ------------------------------------------------------------------------------


def reference_shard_for_hash(ring: Ring, h: int) -> ShardId:
    """The ring rule, spelled out: the first token >= h, else the smallest token."""
    above = [(token, shard) for shard, tokens in ring.shards for token in tokens if token >= h]
    every = [(token, shard) for shard, tokens in ring.shards for token in tokens]
    return min(above)[1] if above else min(every)[1]


def player_ids(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"player-{rng.getrandbits(64):016x}" for _ in range(count)]


def relative_deviation(ring: Ring) -> dict[ShardId, float]:
    """Per shard, its owned space relative to a perfectly even share, minus one."""
    even = HASH_SPACE / len(ring.shards)
    return {shard: owned / even - 1 for shard, owned in ring.owned_space().items()}


# Tokens worth testing: anywhere, at the edges of the ring, and next to lookup-bucket
# boundaries (multiples of 2**48), where the bucket table and the bisect hand over.
tokens_strategy = st.one_of(
    st.integers(0, MAX_TOKEN),
    st.sampled_from([0, 1, 2, MAX_TOKEN - 1, MAX_TOKEN]),
    st.builds(
        lambda bucket, delta: min(MAX_TOKEN, max(0, (bucket << 48) + delta)),
        st.integers(0, (1 << 16) - 1),
        st.integers(-2, 2),
    ),
)


@st.composite
def rings(draw: st.DrawFn, max_shards: int = 6, max_tokens: int = 40) -> Ring:
    """Arbitrary valid rings: 1..max_shards shards, distinct tokens dealt at random."""
    shard_count = draw(st.integers(1, max_shards))
    tokens = draw(
        st.lists(tokens_strategy, min_size=shard_count, max_size=max_tokens, unique=True)
    )
    owners = list(range(shard_count)) + draw(
        st.lists(
            st.integers(0, shard_count - 1),
            min_size=len(tokens) - shard_count,
            max_size=len(tokens) - shard_count,
        )
    )
    draw(st.randoms(use_true_random=False)).shuffle(owners)
    by_shard: dict[ShardId, list[int]] = {}
    for token, owner in zip(tokens, owners, strict=True):
        by_shard.setdefault(shard_id(owner), []).append(token)
    return Ring.from_tokens(draw(st.integers(1, 10)), by_shard)


def interesting_hashes(ring: Ring) -> list[int]:
    """Hashes on, just around and between tokens, at both ends and at bucket edges."""
    hashes = {0, 1, MAX_TOKEN - 1, MAX_TOKEN}
    for _, tokens in ring.shards:
        for token in tokens:
            hashes.update(h for h in (token - 1, token, token + 1) if 0 <= h <= MAX_TOKEN)
            bucket_start = token >> 48 << 48
            hashes.update({bucket_start, bucket_start - 1 if bucket_start else 0})
            hashes.add(min(MAX_TOKEN, bucket_start + (1 << 48)))
    return sorted(hashes)


# -- the key hash -------------------------------------------------------------------------


class TestKeyHash:
    def test_hash_name_is_the_documented_one(self) -> None:
        assert HASH_NAME == "xxh3_64"
        assert initial_ring(1).hash_name == HASH_NAME

    @pytest.mark.parametrize(
        ("player_id", "expected"),
        [
            # The XXH3_64bits reference value of empty input: anchors other languages.
            ("", 0x2D06800538D394C2),
            ("player-1", 0x773E787C25339B5A),
            ("player-42", 0xC37CCACE5C720EC3),
            ("héllo", 0x6A45B79A7B549B1F),
            ("\U0001f5e1\ufe0f sword", 0x02B0B28C9E88B048),
            ("a" * 128, 0x7A22200AADC3D36C),
        ],
    )
    def test_pinned_values_never_change(self, player_id: str, expected: int) -> None:
        # A change here reassigns every player of every cluster: never do it in place.
        assert key_hash(player_id) == expected

    @given(st.text(max_size=64))
    def test_is_xxh3_64_seed_0_of_the_utf8_bytes(self, player_id: str) -> None:
        h = key_hash(player_id)
        assert h == xxhash.xxh3_64_intdigest(player_id.encode("utf-8"), seed=0)
        assert 0 <= h <= MAX_TOKEN


# -- lookup -------------------------------------------------------------------------------


class TestLookup:
    @PROPERTY_SETTINGS
    @given(ring=rings(), keys=st.lists(st.text(max_size=20), max_size=30))
    def test_shard_for_matches_the_linear_scan_reference(
        self, ring: Ring, keys: list[str]
    ) -> None:
        for key in keys:
            assert ring.shard_for(key) == reference_shard_for_hash(ring, key_hash(key))

    @PROPERTY_SETTINGS
    @given(ring=rings(), hashes=st.lists(st.integers(0, MAX_TOKEN), max_size=10))
    def test_shard_for_hash_matches_the_reference_on_every_edge_and_anywhere(
        self, ring: Ring, hashes: list[int]
    ) -> None:
        for h in interesting_hashes(ring) + hashes:
            assert ring.shard_for_hash(h) == reference_shard_for_hash(ring, h), h

    def test_batch_lookup_equals_single_lookups(self) -> None:
        ring = initial_ring(16)
        keys = player_ids(2_000, seed=7)
        assert ring.shards_for(keys) == [ring.shard_for(key) for key in keys]
        assert ring.shards_for(iter(keys[:10])) == [ring.shard_for(key) for key in keys[:10]]

    def test_a_hash_equal_to_a_token_belongs_to_that_token(self) -> None:
        ring = Ring.from_tokens(1, {shard_id(0): [100], shard_id(1): [200]})
        assert ring.shard_for_hash(100) == shard_id(0)
        assert ring.shard_for_hash(200) == shard_id(1)
        assert ring.shard_for_hash(101) == shard_id(1)
        assert ring.shard_for_hash(99) == shard_id(0)

    def test_a_hash_above_the_largest_token_wraps_to_the_smallest(self) -> None:
        ring = Ring.from_tokens(1, {shard_id(0): [100], shard_id(1): [200]})
        assert ring.shard_for_hash(201) == shard_id(0)
        assert ring.shard_for_hash(MAX_TOKEN) == shard_id(0)
        assert ring.shard_for_hash(0) == shard_id(0)

    def test_tokens_at_the_ends_of_the_ring(self) -> None:
        ring = Ring.from_tokens(1, {shard_id(0): [0], shard_id(1): [MAX_TOKEN]})
        assert ring.shard_for_hash(0) == shard_id(0)
        assert ring.shard_for_hash(1) == shard_id(1)
        assert ring.shard_for_hash(MAX_TOKEN) == shard_id(1)

    def test_one_token_owns_everything(self) -> None:
        ring = Ring.from_tokens(1, {shard_id(3): [12345]})
        assert {ring.shard_for(key) for key in player_ids(100, seed=1)} == {shard_id(3)}
        assert ring.owned_space() == {shard_id(3): HASH_SPACE}

    @pytest.mark.parametrize("h", [-1, HASH_SPACE])
    def test_a_hash_outside_64_bits_is_refused(self, h: int) -> None:
        with pytest.raises(ValueError, match="outside"):
            initial_ring(2).shard_for_hash(h)


# -- ownership ----------------------------------------------------------------------------


class TestOwnership:
    def test_is_exact_on_a_small_ring(self) -> None:
        ring = Ring.from_tokens(1, {shard_id(0): [10, 30], shard_id(1): [20]})
        # shard-1 owns (10, 20]; shard-0 owns (20, 30] and the wrap (30, 2**64) + [0, 10].
        assert ring.owned_space() == {shard_id(0): HASH_SPACE - 10, shard_id(1): 10}
        assert ring.ownership()[shard_id(1)] == 10 / HASH_SPACE

    @PROPERTY_SETTINGS
    @given(ring=rings())
    def test_covers_the_whole_space(self, ring: Ring) -> None:
        owned = ring.owned_space()
        assert set(owned) == set(ring.shard_ids)
        assert sum(owned.values()) == HASH_SPACE
        assert sum(ring.ownership().values()) == pytest.approx(1.0)


# -- the initial ring ---------------------------------------------------------------------


class TestInitialRing:
    def test_is_version_1_with_canonical_shards_and_vnodes_each(self) -> None:
        ring = initial_ring(16)
        assert ring.version == 1
        assert ring.shard_ids == tuple(shard_id(i) for i in range(16))
        assert all(len(tokens) == DEFAULT_VNODES for _, tokens in ring.shards)
        assert ring.token_count == 16 * DEFAULT_VNODES

    def test_is_the_same_in_every_process(self) -> None:
        # Pinned: the tokens are a pure function of (shard_count, vnodes), never random.
        assert initial_ring(3, 4).shards == (
            (shard_id(0), (768614336404564650, 8454757700450211157,
                           13066443718877599061, 14603672391686728362)),
            (shard_id(1), (2305843009213693952, 5380300354831952554,
                           11529215046068469760, 17678129737304986965)),
            (shard_id(2), (3843071682022823253, 6917529027641081856,
                           9991986373259340458, 16140901064495857664)),
        )  # fmt: skip
        digest = xxhash.xxh3_64_intdigest(repr(initial_ring(16).shards).encode())
        assert digest == 0x3E0B2A8B743E9B2F
        assert initial_ring(16) == initial_ring(16)

    @PROPERTY_SETTINGS
    @given(shard_count=st.integers(1, 40), vnodes=st.integers(1, 200))
    def test_balance_is_exact_to_vnodes_hash_values(self, shard_count: int, vnodes: int) -> None:
        owned = initial_ring(shard_count, vnodes).owned_space()
        assert max(owned.values()) - min(owned.values()) <= vnodes

    def test_keys_spread_evenly(self) -> None:
        ring = initial_ring(16)
        counts: dict[ShardId, int] = dict.fromkeys(ring.shard_ids, 0)
        for shard in ring.shards_for(player_ids(100_000, seed=3)):
            counts[shard] += 1
        assert max(counts.values()) / (100_000 / 16) <= 1.03  # ~4 sigma at 6,250 per shard

    def test_removing_any_shard_spreads_its_share(self) -> None:
        ring = initial_ring(16)
        for i in range(16):
            after = ring.with_removed_shard(shard_id(i))
            assert max(relative_deviation(after).values()) <= 0.0126, i

    @pytest.mark.parametrize(
        ("shard_count", "vnodes"), [(0, 150), (-1, 150), (2, 0), (2, MAX_TOKENS_PER_SHARD + 1)]
    )
    def test_refuses_impossible_sizes(self, shard_count: int, vnodes: int) -> None:
        with pytest.raises(ValueError, match="must be in"):
            initial_ring(shard_count, vnodes)


# -- adding a shard -----------------------------------------------------------------------


class TestAddShard:
    def test_production_default_is_exact(self) -> None:
        before = initial_ring(16)
        after = before.with_added_shard(shard_id(16), 150)
        assert after.version == 2
        assert after.tokens_of(shard_id(16)) and len(after.tokens_of(shard_id(16))) == 150
        for shard, deviation in relative_deviation(after).items():
            assert abs(deviation) < 1e-12, shard

    @PROPERTY_SETTINGS
    @given(shard_count=st.integers(1, 20), data=st.data())
    def test_new_shard_takes_its_share_and_the_rest_stays_tight(
        self, shard_count: int, data: st.DataObject
    ) -> None:
        vnodes = data.draw(st.integers(shard_count, 160), label="vnodes")
        before = initial_ring(shard_count, vnodes)
        new = shard_id(shard_count)
        after = before.with_added_shard(new, vnodes)
        deviation = relative_deviation(after)
        assert abs(deviation[new]) <= 0.01
        # A donor whose share does not fit its tokens stays less than one range above.
        bound = (shard_count + 1) / (shard_count * vnodes)
        assert all(abs(d) <= bound for d in deviation.values()), deviation
        if vnodes // shard_count >= vnodes / (shard_count + 1):
            assert all(abs(d) < 1e-9 for d in deviation.values()), deviation

    @PROPERTY_SETTINGS
    @given(ring=rings(max_shards=5, max_tokens=30), vnodes=st.integers(1, 30), seed=st.integers())
    def test_only_keys_the_new_shard_takes_move(self, ring: Ring, vnodes: int, seed: int) -> None:
        new = shard_id(99)
        after = ring.with_added_shard(new, vnodes)
        assert len(after.tokens_of(new)) == vnodes
        assert after.token_count == ring.token_count + vnodes  # no duplicates (validated too)
        for shard, tokens in ring.shards:
            assert after.tokens_of(shard) == tokens
        keys = player_ids(300, seed)
        for key, old, moved in zip(keys, ring.shards_for(keys), after.shards_for(keys), strict=False):
            assert moved in (old, new), key
        for h in interesting_hashes(after):
            old_owner = ring.shard_for_hash(h)
            assert after.shard_for_hash(h) in (old_owner, new), h

    def test_moved_keys_match_the_new_shards_share(self) -> None:
        before = initial_ring(16)
        after = before.with_added_shard(shard_id(16), 150)
        keys = player_ids(50_000, seed=11)
        moved = [old != new for old, new in zip(before.shards_for(keys), after.shards_for(keys), strict=False)]
        assert sum(moved) / len(keys) <= 1.02 / 17 * 1.05  # sampling margin on 50k keys

    def test_repeated_growth_stays_tight(self) -> None:
        ring = initial_ring(16)
        for i in range(16, 24):
            ring = ring.with_added_shard(shard_id(i), 150)
            assert max(abs(d) for d in relative_deviation(ring).values()) <= 0.01
        assert ring.version == 9

    def test_takes_from_the_most_loaded_shards_of_an_unbalanced_ring(self) -> None:
        unbalanced = initial_ring(16).with_removed_shard(shard_id(5))
        before = unbalanced.owned_space()
        after = unbalanced.with_added_shard(shard_id(16), 150)
        share = after.owned_space()
        assert share[shard_id(16)] == pytest.approx(HASH_SPACE / 16, rel=1e-9)
        # Everybody ends at the common level; nobody below it gave anything.
        assert max(abs(d) for d in relative_deviation(after).values()) < 1e-9
        assert all(share[s] <= before[s] for s in before)

    def test_is_deterministic(self) -> None:
        ring = initial_ring(7, 50)
        assert ring.with_added_shard(shard_id(7), 50) == ring.with_added_shard(shard_id(7), 50)

    def test_spare_tokens_split_the_new_shards_own_ranges(self) -> None:
        # One range in the whole ring: only one new token can take anything from it.
        ring = Ring.from_tokens(1, {shard_id(0): [0]})
        after = ring.with_added_shard(shard_id(1), 64)
        assert len(after.tokens_of(shard_id(1))) == 64
        assert after.owned_space()[shard_id(1)] == HASH_SPACE // 2

    def test_refuses_an_existing_shard(self) -> None:
        with pytest.raises(ValueError, match="already in the ring"):
            initial_ring(2).with_added_shard(shard_id(1), 150)

    @pytest.mark.parametrize("vnodes", [0, -3, MAX_TOKENS_PER_SHARD + 1])
    def test_refuses_a_bad_token_count(self, vnodes: int) -> None:
        with pytest.raises(ValueError, match="vnodes"):
            initial_ring(2).with_added_shard(shard_id(2), vnodes)

    @pytest.mark.parametrize("name", ["node-1", "shard-02", "shard-", "shard-x"])
    def test_refuses_a_non_canonical_shard_id(self, name: str) -> None:
        with pytest.raises(ValueError, match="shard id"):
            initial_ring(2).with_added_shard(ShardId(name), 150)


# -- removing a shard ---------------------------------------------------------------------


class TestRemoveShard:
    @PROPERTY_SETTINGS
    @given(ring=rings(), data=st.data())
    def test_only_the_removed_shards_keys_move(self, ring: Ring, data: st.DataObject) -> None:
        if len(ring.shards) < 2:
            return
        gone = data.draw(st.sampled_from(ring.shard_ids), label="removed")
        after = ring.with_removed_shard(gone)
        assert after.version == ring.version + 1
        assert gone not in after.shard_ids
        for h in interesting_hashes(ring):
            old = ring.shard_for_hash(h)
            new = after.shard_for_hash(h)
            assert new == old if old != gone else new != gone
            assert new == reference_shard_for_hash(after, h)

    def test_removing_the_newest_shard_restores_the_previous_tokens(self) -> None:
        before = initial_ring(16)
        grown = before.with_added_shard(shard_id(16), 150)
        assert grown.with_removed_shard(shard_id(16)).shards == before.shards

    def test_adding_after_a_removal_rebalances(self) -> None:
        ring = initial_ring(16).with_removed_shard(shard_id(3)).with_added_shard(shard_id(16))
        assert max(abs(d) for d in relative_deviation(ring).values()) < 1e-9

    def test_refuses_an_unknown_shard(self) -> None:
        with pytest.raises(ValueError, match="not in the ring"):
            initial_ring(2).with_removed_shard(shard_id(5))

    def test_refuses_the_last_shard(self) -> None:
        with pytest.raises(ValueError, match="only shard"):
            initial_ring(1).with_removed_shard(shard_id(0))


# -- validation and value semantics -------------------------------------------------------


def _ring(**changes: object) -> Ring:
    fields: dict[str, object] = {
        "version": 1,
        "hash_name": HASH_NAME,
        "shards": ((shard_id(0), (1, 5)), (shard_id(1), (3,))),
    }
    fields.update(changes)
    return Ring(**fields)  # type: ignore[arg-type]


class TestValidation:
    def test_a_valid_ring_is_accepted(self) -> None:
        assert _ring().token_count == 3

    @pytest.mark.parametrize(
        ("changes", "message"),
        [
            ({"hash_name": "md5"}, "unsupported ring hash"),
            ({"version": 0}, "version"),
            ({"version": True}, "version"),
            ({"shards": ()}, "at least one shard"),
            ({"shards": ((shard_id(0), ()),)}, "has no tokens"),
            ({"shards": ((shard_id(0), (1,)), (shard_id(1), (1,)))}, "owned by both"),
            ({"shards": ((shard_id(0), (1, 1)),)}, "duplicate token"),
            ({"shards": ((shard_id(0), (5, 1)),)}, "unsorted token"),
            ({"shards": ((shard_id(0), (-1,)),)}, "outside"),
            ({"shards": ((shard_id(0), (HASH_SPACE,)),)}, "outside"),
            ({"shards": ((shard_id(1), (1,)), (shard_id(0), (2,)))}, "sorted by number"),
            ({"shards": ((shard_id(1), (1,)), (shard_id(1), (2,)))}, "sorted by number"),
            ({"shards": ((ShardId("shard-01"), (1,)),)}, "not canonical"),
            ({"shards": ((ShardId("node-1"), (1,)),)}, "does not start with"),
            (
                {"shards": ((shard_id(0), tuple(range(MAX_TOKENS_PER_SHARD + 1))),)},
                "more than",
            ),
        ],
    )
    def test_rejects_with_a_clear_message(self, changes: dict[str, object], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            _ring(**changes)

    @pytest.mark.parametrize(
        "shards",
        [
            ((shard_id(0), (1.0,)),),
            ((shard_id(0), (True,)),),
            ((shard_id(0), [1]),),
            ((7, (1,)),),
        ],
    )
    def test_rejects_wrong_types(self, shards: object) -> None:
        with pytest.raises(TypeError):
            _ring(shards=shards)

    def test_from_tokens_sorts_shards_numerically_and_tokens(self) -> None:
        ring = Ring.from_tokens(4, {shard_id(10): [9, 2], shard_id(2): {7}, shard_id(0): (5,)})
        assert ring.shards == (
            (shard_id(0), (5,)),
            (shard_id(2), (7,)),
            (shard_id(10), (2, 9)),
        )
        assert ring.version == 4

    def test_from_tokens_reports_duplicates_instead_of_merging(self) -> None:
        with pytest.raises(ValueError, match="duplicate token 4"):
            Ring.from_tokens(1, {shard_id(0): [4, 4]})

    def test_is_an_immutable_value(self) -> None:
        ring = initial_ring(4, 10)
        with pytest.raises(dataclasses.FrozenInstanceError):
            ring.version = 2  # type: ignore[misc]
        assert ring == initial_ring(4, 10)
        assert hash(ring) == hash(initial_ring(4, 10))
        assert ring != initial_ring(4, 11)
        assert repr(ring) == "Ring(version=1, hash_name='xxh3_64', shards=4, tokens=40)"
