"""Cluster configuration: defaults and validation (pure).

The config lives in etcd (:meth:`controlplane.store.keys.KeySchema.config`). It is created
with :func:`default_config` on the first start of a cluster and validated with
:func:`validate` on every change, so a bad value is refused before anything is written.
"""

from __future__ import annotations

import re

from bluemarble.core import limits
from bluemarble.core.errors import InvalidArgument
from bluemarble.v1 import common_pb2

STRONG = common_pb2.CONSISTENCY_MODEL_STRONG
EVENTUAL = common_pb2.CONSISTENCY_MODEL_EVENTUAL
CAUSAL = common_pb2.CONSISTENCY_MODEL_CAUSAL

# Consistency per game system (DESIGN.md, "Consistency per game system").
DEFAULT_CONSISTENCY = {
    "inventory": STRONG,
    "trade": STRONG,
    "chat": EVENTUAL,
    "guild": EVENTUAL,
    "leaderboard": EVENTUAL,
    "position": CAUSAL,
    "world_events": CAUSAL,
}
# Systems whose model is part of the data plane's correctness: they stay STRONG.
STRONG_ONLY = ("inventory", "trade")

LIMITS = limits.CONFIG_RANGES
MAX_SYSTEMS = limits.MAX_SYSTEMS
MAX_SYSTEM_NAME = limits.MAX_SYSTEM_NAME_BYTES
_SYSTEM_NAME = re.compile(r"[a-z0-9_]+")


DEFAULT_VNODES_PER_SHARD = 150
"""Virtual nodes per shard of a new cluster's ring."""


def max_shards(vnodes_per_shard: int = DEFAULT_VNODES_PER_SHARD) -> int:
    """The most shards a ring of ``vnodes_per_shard`` virtual nodes per shard may have:
    the config's own bound, or fewer where the ring's etcd value would not hold the
    tokens (418 at the default 150)."""
    return min(LIMITS["shard_count"][1], limits.MAX_RING_TOKENS // max(1, vnodes_per_shard))


def default_config(
    *,
    replication_factor: int = 3,
    lease_ttl_s: int = 10,
    shard_count: int = 16,
    vnodes_per_shard: int = DEFAULT_VNODES_PER_SHARD,
    max_moves_per_round: int = 32,
) -> common_pb2.ClusterConfig:
    """The config a new cluster starts with (validated).

    Raises InvalidArgument naming each value out of range, before any message is built
    (protobuf would refuse a value past 32 bits with a bare ValueError)."""
    numbers = {
        "replication_factor": replication_factor,
        "lease_ttl_s": lease_ttl_s,
        "shard_count": shard_count,
        "vnodes_per_shard": vnodes_per_shard,
        "max_moves_per_round": max_moves_per_round,
    }
    _raise_if(_number_problems(numbers))
    config = common_pb2.ClusterConfig(
        replication_factor=replication_factor,
        lease_ttl_s=lease_ttl_s,
        shard_count=shard_count,
        vnodes_per_shard=vnodes_per_shard,
        max_moves_per_round=max_moves_per_round,
    )
    config.consistency.update(DEFAULT_CONSISTENCY)
    validate(config)
    return config


def problems(config: common_pb2.ClusterConfig) -> list[str]:
    """Every reason ``config`` is invalid, each a sentence a person can act on."""
    found = _number_problems({name: getattr(config, name) for name in LIMITS})
    if len(config.consistency) > MAX_SYSTEMS:
        # Too many to be a real table: say so once instead of judging every entry.
        found.append(f"consistency lists {len(config.consistency)} systems; at most {MAX_SYSTEMS}")
        return found
    for system, model in sorted(config.consistency.items()):
        if problem := system_name_problem(system):
            found.append(problem)
        if model not in (STRONG, EVENTUAL, CAUSAL):
            found.append(f"consistency of {limits.echo(system)} must be STRONG, EVENTUAL or CAUSAL")
    if not config.consistency:
        # A config sent with only the numeric fields would delete every game system.
        found.append(
            "consistency is empty; send the whole table (GetConfig, edit, SetConfig): every game system "
            f"with its model, {' and '.join(STRONG_ONLY)} as STRONG"
        )
        return found
    for system in STRONG_ONLY:
        if system not in config.consistency:
            found.append(
                f"consistency lacks {system!r}, which must stay listed as STRONG; send the whole table "
                "(GetConfig, edit, SetConfig)"
            )
        elif config.consistency[system] != STRONG:
            found.append(
                f"consistency of {system!r} must stay STRONG: items and gold are only safe "
                "with primary-only writes and synchronous replication"
            )
    return found


def system_name_problem(system: str) -> str | None:
    """Why ``system`` cannot name a game system of the consistency table (None: it can)."""
    if len(system) > MAX_SYSTEM_NAME or not _SYSTEM_NAME.fullmatch(system):
        return f"consistency system name {limits.echo(system)} must be 1..{MAX_SYSTEM_NAME} of a-z, 0-9 or '_'"
    return None


def _number_problems(values: dict[str, int]) -> list[str]:
    """The integer settings out of their range, and a ring too large for one etcd value."""
    found = []
    for name, (low, high) in LIMITS.items():
        value = values[name]
        if not low <= value <= high:
            found.append(f"{name} is {limits.echo(value, 24)}; it must be between {low} and {high}")
    if found:
        return found
    tokens = values["shard_count"] * values["vnodes_per_shard"]
    if tokens > limits.MAX_RING_TOKENS:
        found.append(
            f"shard_count x vnodes_per_shard is {tokens} tokens; the ring is one etcd value "
            f"(at most 1.5 MiB), which holds at most {limits.MAX_RING_TOKENS} tokens: at "
            f"{values['vnodes_per_shard']} virtual nodes per shard, at most "
            f"{max_shards(values['vnodes_per_shard'])} shards"
        )
    return found


MAX_REPORTED_PROBLEMS = 3
"""Problems named in one error message; the rest are counted (a message stays short)."""


def validate(config: common_pb2.ClusterConfig) -> None:
    """Raises InvalidArgument naming the first :data:`MAX_REPORTED_PROBLEMS` problems
    (and counting the others), or returns."""
    _raise_if(problems(config))


def _raise_if(found: list[str]) -> None:
    if found:
        shown = found[:MAX_REPORTED_PROBLEMS]
        if len(found) > len(shown):
            shown.append(f"and {len(found) - len(shown)} more")
        raise InvalidArgument("invalid cluster config: " + "; ".join(shown))
