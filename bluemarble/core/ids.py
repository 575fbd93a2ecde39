"""Typed identifiers shared by every BlueMarble package.

They are plain strings at run time; the NewTypes keep a node id from being passed
where a shard id is expected. Validation of ids received from the network lives in
:mod:`bluemarble.core.validation`.
"""

from __future__ import annotations

from typing import NewType

NodeId = NewType("NodeId", str)
ShardId = NewType("ShardId", str)
PlayerId = NewType("PlayerId", str)
TradeId = NewType("TradeId", str)

SHARD_ID_PREFIX = "shard-"


def shard_id(index: int) -> ShardId:
    """The canonical name of shard number ``index`` (``shard-<n>``, n >= 0)."""
    assert index >= 0, index
    return ShardId(f"{SHARD_ID_PREFIX}{index}")


def shard_index(shard: ShardId) -> int:
    """Inverse of :func:`shard_id`; raises ValueError for a name not of that form."""
    if not shard.startswith(SHARD_ID_PREFIX):
        raise ValueError(f"shard id {shard!r} does not start with {SHARD_ID_PREFIX!r}")
    digits = shard[len(SHARD_ID_PREFIX):]
    if not digits.isdigit():
        raise ValueError(f"shard id {shard!r} does not end with a number")
    return int(digits)
