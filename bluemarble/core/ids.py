"""Typed identifiers shared by every BlueMarble package.

They are plain strings at run time; the NewTypes keep a node id from being passed
where a shard id is expected. Validation of ids received from the network lives in
:mod:`bluemarble.core.validation`.
"""

from __future__ import annotations

from typing import NewType

from bluemarble.core.limits import echo

NodeId = NewType("NodeId", str)
ShardId = NewType("ShardId", str)
PlayerId = NewType("PlayerId", str)
TradeId = NewType("TradeId", str)

SHARD_ID_PREFIX = "shard-"
MAX_SHARD_INDEX_DIGITS = 9
_ASCII_DIGITS = frozenset("0123456789")


def shard_id(index: int) -> ShardId:
    """The canonical name of shard number ``index`` (``shard-<n>``, n >= 0)."""
    assert index >= 0, index
    return ShardId(f"{SHARD_ID_PREFIX}{index}")


def shard_index(shard: ShardId) -> int:
    """Inverse of :func:`shard_id`; raises ValueError (with a short message that quotes
    the input through :func:`bluemarble.core.limits.echo`) for a name not of that form.

    Exactly the names :func:`shard_id` builds parse: ASCII digits only (``str.isdigit``
    would accept "shard-١" and ``int()`` read it as 1), no leading zeros ("shard-01" would
    name shard-1 twice), at most :data:`MAX_SHARD_INDEX_DIGITS` digits.
    """
    if not shard.startswith(SHARD_ID_PREFIX):
        raise ValueError(f"shard id {echo(shard)} does not start with {SHARD_ID_PREFIX!r}")
    digits = shard[len(SHARD_ID_PREFIX):]
    if not digits or not all(c in _ASCII_DIGITS for c in digits):
        raise ValueError(f"shard id {echo(shard)} does not end with a number (ASCII digits 0-9)")
    if len(digits) > MAX_SHARD_INDEX_DIGITS:
        raise ValueError(f"shard id {echo(shard)} has more than {MAX_SHARD_INDEX_DIGITS} digits")
    if len(digits) > 1 and digits[0] == "0":
        raise ValueError(
            f"shard id {echo(shard)} is not canonical (leading zero); write {shard_id(int(digits))}"
        )
    return int(digits)
