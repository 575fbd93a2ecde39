"""bluemarble.api.messages.by_size: groups that fit one carrier message."""

from __future__ import annotations

from dataclasses import dataclass

from bluemarble.api.messages import by_size


@dataclass
class Sized:
    n: int

    def ByteSize(self) -> int:
        return self.n


def test_groups_keep_order_and_respect_count_and_bytes() -> None:
    items = [Sized(10), Sized(10), Sized(10), Sized(100), Sized(5)]
    groups = list(by_size(items, max_count=2, max_bytes=1000))
    assert [[i.n for i in g] for g in groups] == [[10, 10], [10, 100], [5]]
    groups = list(by_size(items, max_count=10, max_bytes=50))  # 8 bytes of framing each
    assert [[i.n for i in g] for g in groups] == [[10, 10], [10], [100], [5]]
    assert [i for g in groups for i in g] == items


def test_a_message_over_the_limit_goes_alone_and_nothing_is_empty() -> None:
    assert [[i.n for i in g] for g in by_size([Sized(5000), Sized(1)], 64, 100)] == [[5000], [1]]
    assert list(by_size([], 64, 100)) == []
