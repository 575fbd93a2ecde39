"""The consistent hash ring: which shard owns a player id, and where a new shard's tokens go.

Why this module exists: every process that routes a player (control plane replicas, shard
nodes, clients that route locally) must map a player id to the same shard for one ring
version (invariant I6), and resharding must move as few players as possible. So the ring
is a plain value: a version, the name of the key hash and, per shard, its tokens. Tokens
are *stored* (in etcd, by the control plane), never re-derived by readers, which lets the
allocator here place a new shard's tokens wherever they balance the ring best.

The rule (contract, reproducible in any language):

* ``h = key_hash(player_id)``: xxh3_64 with seed 0 of the UTF-8 bytes, an unsigned 64-bit
  integer (see :func:`key_hash`).
* The ring is the circle of integers ``0 .. 2**64 - 1``. A key belongs to the shard owning
  the first token ``>= h``; when ``h`` is above the largest token it wraps around to the
  smallest token. So a token ``t`` with predecessor ``p`` owns the hashes ``(p, t]``, and
  the smallest token also owns everything above the largest one.

The module is purely computational: it imports no grpc, no etcd client, no asyncio and no
clock. Building, looking up and reallocating are deterministic functions of their inputs.
"""

from __future__ import annotations

import heapq
import itertools
import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import xxhash

from bluemarble.core.ids import ShardId, shard_id, shard_index

HASH_NAME = "xxh3_64"
"""Name of the key hash, as stored with the ring (the ``hash`` field of the proto ``Ring``)."""

HASH_SPACE = 1 << 64
"""Number of distinct hash values (and of positions on the ring)."""

MAX_TOKEN = HASH_SPACE - 1
"""The largest valid token (tokens are unsigned 64-bit integers)."""

DEFAULT_VNODES = 150
"""Tokens per shard unless the cluster config says otherwise (DESIGN.md, "ring")."""

MAX_SHARDS = 10_000
"""Upper bound on shards in one ring: bounds memory, lookup tables and allocation time."""

MAX_TOKENS_PER_SHARD = 10_000
"""Upper bound on tokens of one shard, for the same reason."""

_xxh3_64 = xxhash.xxh3_64_intdigest

# Lookups first try a table indexed by the top 16 bits of the hash (65,536 buckets, 512 KiB
# per ring on 64-bit CPython): a bucket that holds no token maps to one shard, and with a
# few thousand tokens over 96% of buckets hold none, so most lookups skip the bisect,
# whose ~12 comparisons of 64-bit ints cost more than everything else in a lookup.
_BUCKET_SHIFT = 48
_BUCKET_COUNT = 1 << (64 - _BUCKET_SHIFT)
_AMBIGUOUS = ShardId("")  # bucket holding a token: bisect decides


def key_hash(player_id: str) -> int:
    """The position of ``player_id`` on the ring: an unsigned 64-bit integer.

    Contract, so that any language reproduces it: the XXH3 64-bit hash (xxHash >= 0.8,
    ``XXH3_64bits``, i.e. ``XXH3_64bits_withSeed`` with seed 0 and no secret) of the
    player id encoded as UTF-8, read as an unsigned integer in ``0 .. 2**64 - 1``. For
    example ``key_hash("") == 0x2D06800538D394C2`` (the reference XXH3 value of empty input) and
    ``key_hash("player-1") == 0x773E787C25339B5A``; more values are pinned in the unit tests.
    Never Python's ``hash()``, which is salted per process.

    Raises UnicodeEncodeError for a string that is not valid Unicode text (lone surrogates).
    """
    return _xxh3_64(player_id.encode("utf-8"))


@dataclass(frozen=True, slots=True, repr=False)
class Ring:
    """One version of the ring: an immutable value, cheap to look up in.

    Fields (all public, all plain data, mapped one to one onto the proto ``Ring``):

    * ``version``: >= 1, increased by one by every change (:meth:`with_added_shard`,
      :meth:`with_removed_shard`). Two rings with the same version held by two processes
      are expected to be equal; the store guarantees that, not this class.
    * ``hash_name``: the key hash; only :data:`HASH_NAME` is supported, since lookups
      would silently disagree with other processes under any other name.
    * ``shards``: one ``(shard_id, tokens)`` pair per shard, sorted by shard number
      (``shard-2`` before ``shard-10``); each ``tokens`` is a strictly ascending tuple of
      ints in ``0 .. 2**64 - 1``. No token appears twice in the whole ring.

    The constructor only validates, it does not reorder: it raises ValueError, with a
    message naming the offending shard or token, for an unsupported hash, a version < 1,
    no shards, a shard id not of the canonical form ``shard-<n>``, shards out of order or
    repeated, a shard without tokens, too many shards or tokens (:data:`MAX_SHARDS`,
    :data:`MAX_TOKENS_PER_SHARD`), a token out of range, unsorted or repeated tokens, or a
    token shared by two shards; it raises TypeError for a shard id that is not a string,
    tokens that are not a tuple or a token that is not an int. Use :meth:`from_tokens` to
    build a ring from unordered input (e.g. a decoded message).

    Lookups (:meth:`shard_for`, :meth:`shards_for`, :meth:`shard_for_hash`) use tables
    built once at construction (a bucket table on the top 16 bits of the hash, then a
    sorted token array with a parallel owner array and ``bisect``); all are private tuples,
    so the instance cannot change after construction.
    """

    version: int
    hash_name: str
    shards: tuple[tuple[ShardId, tuple[int, ...]], ...]
    # Lookup tables: _tokens is every token ascending; _owners[i] owns _tokens[i], and
    # _owners has one extra entry, the owner of the smallest token, so that a hash above
    # the largest token (bisect returns len(_tokens)) wraps around without a branch.
    _tokens: tuple[int, ...] = field(init=False, compare=False)
    _owners: tuple[ShardId, ...] = field(init=False, compare=False)
    # _buckets[h >> _BUCKET_SHIFT] is the owner of every hash in that bucket, or _AMBIGUOUS.
    _buckets: tuple[ShardId, ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        tokens, owners = _validate_and_index(self.version, self.hash_name, self.shards)
        object.__setattr__(self, "_tokens", tokens)
        object.__setattr__(self, "_owners", owners + owners[:1])
        object.__setattr__(self, "_buckets", _bucket_table(tokens, owners))

    @classmethod
    def from_tokens(
        cls,
        version: int,
        tokens_by_shard: Mapping[ShardId, Iterable[int]],
        hash_name: str = HASH_NAME,
    ) -> Ring:
        """Build a ring from shards and tokens in any order (sorts both, then validates).

        Raises ValueError like the constructor; duplicate tokens within one shard are
        reported, not silently merged.
        """
        for shard in tokens_by_shard:
            _check_shard_id(shard)
        ordered = sorted(tokens_by_shard.items(), key=lambda item: shard_index(item[0]))
        return cls(
            version=version,
            hash_name=hash_name,
            shards=tuple((shard, tuple(sorted(tokens))) for shard, tokens in ordered),
        )

    def __repr__(self) -> str:
        # The full token list is thousands of numbers; a summary is what a log line needs.
        return (
            f"Ring(version={self.version}, hash_name={self.hash_name!r}, "
            f"shards={len(self.shards)}, tokens={len(self._tokens)})"
        )

    # -- reading ------------------------------------------------------------------------

    @property
    def shard_ids(self) -> tuple[ShardId, ...]:
        """The shards of this ring, sorted by shard number."""
        return tuple(shard for shard, _ in self.shards)

    @property
    def token_count(self) -> int:
        """Number of tokens in the whole ring."""
        return len(self._tokens)

    def tokens_of(self, shard: ShardId) -> tuple[int, ...]:
        """The ascending tokens of ``shard``; raises KeyError if it is not in the ring."""
        for candidate, tokens in self.shards:
            if candidate == shard:
                return tokens
        raise KeyError(shard)

    def shard_for(self, player_id: str) -> ShardId:
        """The shard owning ``player_id``: the owner of the first token >= its hash, wrapping.

        O(1) for most keys, O(log tokens) at worst. Raises UnicodeEncodeError for a string
        that is not valid Unicode (lone surrogates).
        """
        # str.encode() always means UTF-8 in Python 3 (never the locale); the argument-free
        # call is measurably faster on this hot path.
        h = _xxh3_64(player_id.encode())
        return self._buckets[h >> _BUCKET_SHIFT] or self._owners[bisect_left(self._tokens, h)]

    def shards_for(self, player_ids: Iterable[str]) -> list[ShardId]:
        """``[self.shard_for(p) for p in player_ids]``, faster (no per-call method lookup)."""
        buckets, owners, tokens = self._buckets, self._owners, self._tokens
        return [
            buckets[h >> _BUCKET_SHIFT] or owners[bisect_left(tokens, h)]
            for h in map(_xxh3_64, map(str.encode, player_ids))
        ]

    def shard_for_hash(self, key_hash_value: int) -> ShardId:
        """The shard owning the ring position ``key_hash_value`` (see :func:`key_hash`).

        A hash equal to a token belongs to that token's shard; a hash above the largest
        token belongs to the owner of the smallest token. Raises ValueError for a value
        outside ``0 .. 2**64 - 1``.
        """
        if not 0 <= key_hash_value <= MAX_TOKEN:
            raise ValueError(f"hash {key_hash_value} is outside 0..2**64-1")
        return self._buckets[key_hash_value >> _BUCKET_SHIFT] or self._owners[
            bisect_left(self._tokens, key_hash_value)
        ]

    def owned_space(self) -> dict[ShardId, int]:
        """Per shard, the exact number of hash values it owns; the values sum to 2**64."""
        owned = dict.fromkeys(self.shard_ids, 0)
        for size, _start, owner in _ranges(self._tokens, self._owners):
            owned[owner] += size
        return owned

    def ownership(self) -> dict[ShardId, float]:
        """Per shard, the fraction of the 2**64 hash space it owns (exact, from the tokens).

        With a uniform hash this is the expected fraction of players on the shard.
        """
        return {shard: size / HASH_SPACE for shard, size in self.owned_space().items()}

    # -- changing (each returns a new ring, version + 1) ---------------------------------

    def with_added_shard(self, shard: ShardId, vnodes: int = DEFAULT_VNODES) -> Ring:
        """A new ring (version + 1) where ``shard`` owns ``vnodes`` new tokens.

        Every existing token stays where it is, so the only keys that change shard are
        those the new shard takes: each new token lands strictly inside an existing range
        ``(p, t]`` and takes its lower part ``(p, new]`` from the owner of ``t``.

        Placement, for N existing shards: the new shard's target is ``2**64 // (N + 1)``
        hash values. The existing shards give it their excess over a common level
        (water-filling), so from a balanced ring every shard gives ``1/(N(N+1))`` of the
        space and all N + 1 end at ``1/(N+1)``; from an unbalanced ring the most loaded
        give the most and shards below the level give nothing. Tokens are handed out so the
        largest per-token share is as small as possible, each token goes into one of the
        donor's largest ranges, and it is placed anywhere inside that range (not only at
        its midpoint), so the shares are met to the hash value.

        Limits: a token takes part of one range only, so a donor's share must fit in the
        ranges its tokens land in. From an :func:`initial_ring` of N shards x V tokens,
        adding a shard with V tokens is exact when ``V // N >= V / (N + 1)`` (16 x 150:
        yes; always when V >= N(N+1)); otherwise the donors that got one token fewer stay
        above ``1/(N+1)`` by less than one range (relative error below ``(N+1)/(N*V)``,
        about 1/V), and the others give a little more. With ``vnodes`` < N, at most
        ``vnodes`` shards can give at all and the others stay at ``1/N``. If the ring
        cannot give the whole target, the new shard gets what can be given. Tokens that
        have nothing left to take go inside the new shard's own ranges, where they move
        no key.

        Raises ValueError if ``shard`` is already in the ring or not of the form
        ``shard-<n>``, if ``vnodes`` is outside ``1 .. MAX_TOKENS_PER_SHARD``, or if the ring
        already has :data:`MAX_SHARDS` shards.
        """
        _check_shard_id(shard)
        if any(existing == shard for existing, _ in self.shards):
            raise ValueError(f"shard {shard} is already in the ring (version {self.version})")
        _check_vnodes(vnodes)
        if len(self.shards) >= MAX_SHARDS:
            raise ValueError(f"the ring already has the maximum of {MAX_SHARDS} shards")
        new_tokens = _allocate_tokens(self._tokens, self._owners[:-1], self.shard_ids, vnodes)
        tokens_by_shard: dict[ShardId, Iterable[int]] = dict(self.shards)
        tokens_by_shard[shard] = new_tokens
        return Ring.from_tokens(self.version + 1, tokens_by_shard, self.hash_name)

    def with_removed_shard(self, shard: ShardId) -> Ring:
        """A new ring (version + 1) without ``shard`` and its tokens.

        Only the removed shard's keys move: each of its ranges falls to the owner of the
        next token clockwise, and every other token stays put.

        Balance degrades, because a remaining shard inherits the range of every removed
        token whose next surviving token is one of its own: its gain is proportional to
        how many of the removed shard's tokens it directly follows, not to its share.
        Measured (ownership, max/mean):

        * on an :func:`initial_ring`, whose order makes every shard follow every other
          about equally often: 1.0125 after removing any one of 16 x 150 (ideal 1.0);
        * removing the most recently added shard returns its ranges to the shards it took
          them from, and gives back the previous ring's tokens exactly;
        * removing an older shard of a ring grown by :meth:`with_added_shard` is worst:
          tokens added later sit just after its tokens (each took the lower part of the
          next range), so those few shards inherit unevenly (16 x 150 grown to 32 shards,
          then one removed: up to 1.14).

        A later :meth:`with_added_shard` takes from the most loaded shards first and so
        re-tightens the ring (e.g. 16 -> 15 -> 16 shards: back to 1.0).

        Raises ValueError if ``shard`` is not in the ring or is its only shard.
        """
        remaining = {existing: tokens for existing, tokens in self.shards if existing != shard}
        if len(remaining) == len(self.shards):
            raise ValueError(f"shard {shard} is not in the ring (version {self.version})")
        if not remaining:
            raise ValueError(f"cannot remove {shard}: it is the only shard of the ring")
        return Ring.from_tokens(self.version + 1, remaining, self.hash_name)


def initial_ring(shard_count: int, vnodes: int = DEFAULT_VNODES) -> Ring:
    """The first ring (version 1) of a cluster: shards ``shard-0 .. shard-<count-1>``.

    Deterministic (a pure function of its two arguments, no randomness, the same tokens
    in every process and Python version) and balanced to within ``vnodes`` hash values
    per shard.

    Construction and why: the ``shard_count * vnodes`` tokens are evenly spaced (token
    ``k`` of ``M`` sits at the centre of the ``k``-th of ``M`` equal arcs,
    ``((2k + 1) * 2**64) // (2M)``), so every range has the same size and every shard
    owns exactly ``vnodes`` of them: balance is exact by construction rather than
    statistical, as random tokens (or tokens hashed from names) would be. The ``M``
    positions are dealt in ``vnodes`` rounds of one token per shard, and the order of
    shards inside a round changes from round to round so that each shard's tokens are
    followed by every other shard about equally often (zig-zag Hamiltonian paths, see
    :func:`_initial_owner_sequence`). That order decides who inherits a removed shard's
    ranges, so removal spreads the load (16 x 150: max/mean ownership 1.0125 after any one
    removal) instead of doubling one neighbour, as a plain round-robin order would, or
    leaving it to chance (about 1.04), as a random order would. Growing the ring by
    repeated :meth:`Ring.with_added_shard` would also be balanced, but costs one allocation
    per shard and makes the removal of an early shard less even.

    Raises ValueError if ``shard_count`` is outside ``1 .. MAX_SHARDS`` or ``vnodes`` outside
    ``1 .. MAX_TOKENS_PER_SHARD``.
    """
    if not 1 <= shard_count <= MAX_SHARDS:
        raise ValueError(f"shard_count must be in 1..{MAX_SHARDS}, got {shard_count}")
    _check_vnodes(vnodes)
    total = shard_count * vnodes
    tokens_by_shard: dict[ShardId, list[int]] = {shard_id(i): [] for i in range(shard_count)}
    for k, owner in enumerate(_initial_owner_sequence(shard_count, vnodes)):
        tokens_by_shard[shard_id(owner)].append(((2 * k + 1) * HASH_SPACE) // (2 * total))
    return Ring.from_tokens(1, tokens_by_shard)


# -- validation ---------------------------------------------------------------------------


def _check_shard_id(shard: ShardId) -> None:
    if not isinstance(shard, str):
        raise TypeError(f"shard id must be a string, got {shard!r}")
    index = shard_index(shard)  # raises ValueError with a clear message
    if shard != shard_id(index):
        raise ValueError(f"shard id {shard!r} is not canonical; expected {shard_id(index)!r}")


def _check_vnodes(vnodes: int) -> None:
    if not 1 <= vnodes <= MAX_TOKENS_PER_SHARD:
        raise ValueError(f"vnodes must be in 1..{MAX_TOKENS_PER_SHARD}, got {vnodes}")


def _validate_and_index(
    version: int, hash_name: str, shards: Sequence[tuple[ShardId, tuple[int, ...]]]
) -> tuple[tuple[int, ...], tuple[ShardId, ...]]:
    """Check every rule of the Ring docstring; return (tokens ascending, their owners)."""
    if hash_name != HASH_NAME:
        raise ValueError(f"unsupported ring hash {hash_name!r}; only {HASH_NAME!r} is known")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"ring version must be an int >= 1, got {version!r}")
    if not shards:
        raise ValueError("a ring needs at least one shard")
    if len(shards) > MAX_SHARDS:
        raise ValueError(f"a ring holds at most {MAX_SHARDS} shards, got {len(shards)}")
    pairs: list[tuple[int, ShardId]] = []
    previous_index = -1
    for shard, tokens in shards:
        _check_shard_id(shard)
        index = shard_index(shard)
        if index <= previous_index:
            raise ValueError(
                f"shards must be sorted by number without repeats; {shard} comes after "
                f"{shard_id(previous_index)}"
            )
        previous_index = index
        if not isinstance(tokens, tuple):
            raise TypeError(f"tokens of {shard} must be a tuple, got {type(tokens).__name__}")
        if not tokens:
            raise ValueError(f"shard {shard} has no tokens")
        if len(tokens) > MAX_TOKENS_PER_SHARD:
            raise ValueError(
                f"shard {shard} has {len(tokens)} tokens, more than {MAX_TOKENS_PER_SHARD}"
            )
        previous_token = -1
        for token in tokens:
            if isinstance(token, bool) or not isinstance(token, int):
                raise TypeError(f"token {token!r} of {shard} is not an int")
            if not 0 <= token <= MAX_TOKEN:
                raise ValueError(f"token {token} of {shard} is outside 0..2**64-1")
            if token <= previous_token:
                what = "duplicate" if token == previous_token else "unsorted"
                raise ValueError(f"{what} token {token} in {shard}; tokens must ascend strictly")
            previous_token = token
            pairs.append((token, shard))
    pairs.sort()
    for (token, first), (next_token, second) in itertools.pairwise(pairs):
        if token == next_token:
            raise ValueError(f"token {token} is owned by both {first} and {second}")
    return tuple(token for token, _ in pairs), tuple(shard for _, shard in pairs)


# -- geometry -----------------------------------------------------------------------------


def _ranges(
    tokens: Sequence[int], owners: Sequence[ShardId]
) -> Iterable[tuple[int, int, ShardId]]:
    """Each token's range as (size, exclusive start, owner); sizes sum to 2**64.

    ``tokens`` ascend; the range of ``tokens[i]`` is ``(tokens[i-1], tokens[i]]``, and the
    smallest token's range wraps from the largest token (the whole circle for one token).
    """
    previous = tokens[-1]
    for token, owner in zip(tokens, owners, strict=False):
        yield (token - previous) % HASH_SPACE or HASH_SPACE, previous, owner
        previous = token


def _bucket_table(tokens: Sequence[int], owners: Sequence[ShardId]) -> tuple[ShardId, ...]:
    """Owner per bucket of ``2**_BUCKET_SHIFT`` hashes, or _AMBIGUOUS if a token is inside.

    Every hash in a bucket strictly between the buckets of two consecutive tokens belongs
    to the upper token; buckets before the first token's or after the last token's belong
    to the smallest token (wrap-around). Built with slice assignments: O(buckets + tokens).
    """
    table = [_AMBIGUOUS] * _BUCKET_COUNT
    previous_bucket = -1
    for token, owner in zip(tokens, owners, strict=False):
        bucket = token >> _BUCKET_SHIFT
        if bucket > previous_bucket + 1:
            table[previous_bucket + 1 : bucket] = [owner] * (bucket - previous_bucket - 1)
        previous_bucket = bucket
    table[previous_bucket + 1 :] = [owners[0]] * (_BUCKET_COUNT - previous_bucket - 1)
    return tuple(table)


def _initial_owner_sequence(shard_count: int, rounds: int) -> list[int]:
    """Shard numbers for ``rounds * shard_count`` consecutive ring positions.

    Every round of ``shard_count`` positions holds each shard once (so every shard gets the
    same number of equal ranges), and across rounds each shard is followed by every other
    shard about equally often (so a removed shard's ranges spread over all the others).

    How: for an even n, the zig-zag paths ``i, i+1, i-1, i+2, i-2, ..., i+n/2`` (mod n),
    ``i < n/2``, split the edges of the complete graph into n/2 Hamiltonian paths
    (Walecki); taking them forwards, then backwards, gives n orders in which every ordered
    pair of distinct shards is adjacent exactly once. An odd n uses the orders of n + 1
    without the extra vertex. One cycle of rounds uses all these orders; cycle ``c``
    relabels shards by ``v -> a*v + c (mod n)`` with ``a`` the ``c``-th unit mod n, which
    keeps every pair once per cycle but varies the pairs across round boundaries (a plain
    shift would repeat them, since the zig-zag orders are invariant under shifts).
    """
    n = shard_count
    m = n if n % 2 == 0 else n + 1
    half = m // 2
    forwards: list[list[int]] = []
    for start in range(half):
        path = [start]
        for step in range(1, half):
            path.extend(((start + step) % m, (start - step) % m))
        path.append((start + half) % m)
        forwards.append(path)
    orders = [[v for v in order if v < n] for order in forwards + [p[::-1] for p in forwards]]
    units = [a for a in range(1, n + 1) if math.gcd(a, n) == 1]
    owners: list[int] = []
    for round_index in range(rounds):
        cycle, position = divmod(round_index, len(orders))
        scale = units[cycle % len(units)]
        owners.extend((scale * v + cycle) % n for v in orders[position])
    return owners


# -- allocation ---------------------------------------------------------------------------


def _water_fill(levels: Sequence[int], caps: Sequence[int], total: int) -> list[int]:
    """Amounts ``y_i = min(caps[i], max(0, levels[i] - L))`` summing to ``total``.

    ``L`` is the common level the amounts bring everyone down to: the highest ``levels``
    give most, those below ``L`` give nothing, and no one gives more than its cap. All
    integers, exact: the few units of rounding go to the highest levels first (then the
    lowest index). If the caps cannot reach ``total``, every cap is returned.
    """
    if total <= 0 or not levels:
        return [0] * len(levels)
    if sum(caps) <= total:
        return list(caps)

    def amounts(level: int) -> list[int]:
        return [min(cap, max(0, have - level)) for have, cap in zip(levels, caps, strict=False)]

    # Largest integer L with sum(amounts(L)) >= total: sum(amounts(low)) = sum(caps) >= total
    # and sum(amounts(high)) = 0 < total.
    low = min(levels) - max(caps) - 1
    high = max(levels)
    while high - low > 1:
        middle = (low + high) // 2
        if sum(amounts(middle)) >= total:
            low = middle
        else:
            high = middle
    below, above = amounts(low), amounts(low + 1)
    result = above
    remainder = total - sum(above)
    # Going from low + 1 down to low raises each amount by 0 or 1; hand out the remainder.
    steppers = sorted(
        (i for i in range(len(levels)) if below[i] > above[i]), key=lambda i: (-levels[i], i)
    )
    for i in steppers[:remainder]:
        result[i] += 1
    return result


def _allocate_tokens(
    tokens: Sequence[int], owners: Sequence[ShardId], shards: Sequence[ShardId], vnodes: int
) -> list[int]:
    """Positions for a new shard's ``vnodes`` tokens; see :meth:`Ring.with_added_shard`."""
    ranges_by_shard: dict[ShardId, list[tuple[int, int]]] = {shard: [] for shard in shards}
    for size, start, owner in _ranges(tokens, owners):
        ranges_by_shard[owner].append((size, start))
    for ranges in ranges_by_shard.values():
        ranges.sort(key=lambda r: (-r[0], r[1]))  # largest first; ties by position
    owned = [sum(size for size, _ in ranges_by_shard[shard]) for shard in shards]
    target = HASH_SPACE // (len(shards) + 1)

    # 1. What each shard would ideally give (no limit from the number of tokens).
    full_caps = [sum(size - 1 for size, _ in ranges_by_shard[shard]) for shard in shards]
    ideal = _water_fill(owned, full_caps, target)

    # 2. Tokens per shard: each next token goes to the shard with the largest share left
    # per token (minimises the largest piece a token must take); at most one token per
    # range and no more tokens than hash values to give.
    counts = [0] * len(shards)
    heap: list[tuple[float, int, int]] = [
        (-math.inf, -ideal[i], i) for i in range(len(shards)) if ideal[i] > 0
    ]
    heapq.heapify(heap)
    for _ in range(vnodes):
        if not heap:
            break
        _, _, i = heapq.heappop(heap)
        counts[i] += 1
        if counts[i] < min(len(ranges_by_shard[shards[i]]), ideal[i]):
            heapq.heappush(heap, (-ideal[i] / counts[i], -ideal[i], i))

    # 3. What each shard actually gives, limited by the ranges its tokens can split.
    chosen = [ranges_by_shard[shard][: counts[i]] for i, shard in enumerate(shards)]
    caps = [sum(size - 1 for size, _ in ranges) for ranges in chosen]
    gives = _water_fill(owned, caps, target)

    # 4. Inside each donor, equal pieces from its chosen ranges; a token at start + piece
    # takes (start, start + piece] and lies strictly inside the range.
    new_tokens: list[int] = []
    new_ranges: list[tuple[int, int]] = []  # (-size, start) of the new shard's ranges
    for ranges, give in zip(chosen, gives, strict=False):
        if not ranges:
            continue
        pieces = _water_fill([HASH_SPACE] * len(ranges), [s - 1 for s, _ in ranges], give)
        for (_, start), piece in zip(ranges, pieces, strict=False):
            if piece > 0:
                new_tokens.append((start + piece) % HASH_SPACE)
                new_ranges.append((-piece, start))

    # 5. Tokens left over split the new shard's own largest ranges: they move no key.
    heapq.heapify(new_ranges)
    while len(new_tokens) < vnodes:
        if not new_ranges or -new_ranges[0][0] < 2:
            raise ValueError(f"no room on the ring for {vnodes} more tokens")
        negative_size, start = heapq.heappop(new_ranges)
        size = -negative_size
        lower = size // 2
        middle = (start + lower) % HASH_SPACE
        new_tokens.append(middle)
        heapq.heappush(new_ranges, (-lower, start))
        heapq.heappush(new_ranges, (-(size - lower), middle))
    return new_tokens
