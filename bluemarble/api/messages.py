"""Carrier messages: the calls a ``ShardNode.Calls`` message may carry, grouping messages
into the repeated field of one carrier, and the metadata a stream's end may carry."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar


class _Sized(Protocol):
    def ByteSize(self) -> int: ...


M = TypeVar("M", bound=_Sized)

NODE_CALL_RPCS = {
    "get_inventory": "GetInventory",
    "grant_items": "GrantItems",
    "take_items": "TakeItems",
    "get_player_data": "GetPlayerData",
    "set_player_data": "SetPlayerData",
    "execute_local_trade": "ExecuteLocalTrade",
    "prepare": "Prepare",
    "commit": "Commit",
    "abort": "Abort",
}
"""NodeCall's request fields and the ShardNode RPC each stands for (its unary twin, and
the method name its metrics and logs carry)."""


SHUTTING_DOWN_KEY = "bluemarble-shutting-down"
"""Trailing metadata of a stream a node ended because it is shutting down (a graceful
stop, e.g. a rolling restart): its peer expects it back and need not warn meanwhile."""


def by_size(messages: Sequence[M], max_count: int, max_bytes: int) -> Iterator[list[M]]:
    """``messages`` in order, in groups of at most ``max_count`` and, beyond the first of
    each group, at most ``max_bytes`` serialized: each group fits one carrier message (a
    message larger than ``max_bytes`` alone still goes, alone)."""
    group: list[M] = []
    size = 0
    for message in messages:
        n = message.ByteSize() + 8  # its tag and length prefix in the carrier, at most
        if group and (len(group) >= max_count or size + n > max_bytes):
            yield group
            group, size = [], 0
        group.append(message)
        size += n
    if group:
        yield group
