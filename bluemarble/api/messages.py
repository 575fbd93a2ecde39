"""Grouping protobuf messages into the repeated field of one carrier message."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar


class _Sized(Protocol):
    def ByteSize(self) -> int: ...


M = TypeVar("M", bound=_Sized)


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
