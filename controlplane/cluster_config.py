"""Cluster configuration: defaults and validation (pure).

The config lives in etcd (:meth:`controlplane.keys.KeySchema.config`). It is created
with :func:`default_config` on the first start of a cluster and validated with
:func:`validate` on every change, so a bad value is refused before anything is written.
"""

from __future__ import annotations

from bluemarble.errors import InvalidArgument
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

LIMITS = {
    "replication_factor": (1, 7),
    "lease_ttl_s": (2, 300),
    "vnodes_per_shard": (1, 4096),
    "shard_count": (1, 4096),
    "max_moves_per_round": (1, 10_000),
}
MAX_SYSTEMS = 64
MAX_SYSTEM_NAME = 64


def default_config(
    *,
    replication_factor: int = 3,
    lease_ttl_s: int = 10,
    shard_count: int = 16,
    vnodes_per_shard: int = 150,
    max_moves_per_round: int = 32,
) -> common_pb2.ClusterConfig:
    """The config a new cluster starts with (validated)."""
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
    found = []
    for name, (low, high) in LIMITS.items():
        value = getattr(config, name)
        if not low <= value <= high:
            found.append(f"{name} is {value}; it must be between {low} and {high}")
    if len(config.consistency) > MAX_SYSTEMS:
        found.append(f"consistency lists {len(config.consistency)} systems; at most {MAX_SYSTEMS}")
    for system, model in sorted(config.consistency.items()):
        if not system or len(system) > MAX_SYSTEM_NAME or not system.replace("_", "").isalnum():
            found.append(
                f"consistency system name {system!r} must be 1..{MAX_SYSTEM_NAME} letters, "
                "digits or '_'"
            )
        if model not in (STRONG, EVENTUAL, CAUSAL):
            found.append(f"consistency of {system!r} must be STRONG, EVENTUAL or CAUSAL")
    for system in STRONG_ONLY:
        model = config.consistency.get(system, STRONG)
        if model != STRONG:
            found.append(
                f"consistency of {system!r} must stay STRONG: items and gold are only safe "
                "with primary-only writes and synchronous replication"
            )
    return found


def validate(config: common_pb2.ClusterConfig) -> None:
    """Raises InvalidArgument listing every problem, or returns."""
    found = problems(config)
    if found:
        raise InvalidArgument("invalid cluster config: " + "; ".join(found))
