"""A seeded simulated network: messages are delivered at integer ticks, after a random
delay (which reorders them), and may be dropped or duplicated.

Why this module exists: every schedule of the replication simulation comes from here and
from the fault injector, and both draw from the run's one ``random.Random``, so the same
seed gives the same deliveries in the same order. Ties at one tick are broken by send
order (a sequence number), never by hashing.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from typing import Any

LEADER = -1
"""Address of the control-plane leader; nodes are 0..N-1, clients are ``client_address(c)``."""


def client_address(client: int) -> int:
    """The network address of client number ``client`` (>= 0)."""
    return -2 - client


@dataclass
class NetworkConfig:
    """Per-run network behaviour (drawn from the seed)."""

    drop_p: float
    dup_p: float
    max_delay: int
    """Lossy messages take 1..max_delay ticks."""


Envelope = tuple[int, int, int, int, int, tuple[Any, ...]]
"""(deliver_at, seq, src, dst, kind, body); seq is unique, so the body is never compared."""


class Network:
    """In-flight messages, in a heap ordered by (delivery tick, send order).

    ``send`` is the lossy data path (replication, fences, client requests): drop,
    delay, duplicate. ``send_reliable`` is the node <-> leader session (heartbeats,
    registrations, assignment pushes: an etcd lease and a watch stream, which retry under
    the hood): a short delay, never dropped or duplicated, except across a partition.
    """

    def __init__(self, rng: random.Random, config: NetworkConfig) -> None:
        self.rng = rng
        self.config = config
        self._heap: list[Envelope] = []
        self._seq = 0
        self.cut_from_leader: dict[int, int] = {}
        """node -> tick until which every message between it and the leader is lost."""
        self.sent = 0
        self.dropped = 0
        self.duplicated = 0

    def _push(self, deliver_at: int, src: int, dst: int, kind: int, body: tuple[Any, ...]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (deliver_at, self._seq, src, dst, kind, body))

    def _partitioned(self, now: int, src: int, dst: int) -> bool:
        if src == LEADER:
            return self.cut_from_leader.get(dst, -1) > now
        if dst == LEADER:
            return self.cut_from_leader.get(src, -1) > now
        return False

    def send(self, now: int, src: int, dst: int, kind: int, body: tuple[Any, ...], extra_delay: int = 0) -> None:
        """Lossy send: dropped with ``drop_p``, else delivered after 1..max_delay ticks
        (+ ``extra_delay``), and once more, later, with ``dup_p``."""
        self.sent += 1
        random_ = self.rng.random
        config = self.config
        if (self.cut_from_leader and self._partitioned(now, src, dst)) or random_() < config.drop_p:
            self.dropped += 1
            return
        # int(random() * k) rather than randint: the same distribution, several times cheaper.
        self._push(now + 1 + int(random_() * config.max_delay) + extra_delay, src, dst, kind, body)
        if random_() < config.dup_p:
            self.duplicated += 1
            self._push(now + 1 + int(random_() * 2 * config.max_delay) + extra_delay, src, dst, kind, body)

    def send_reliable(self, now: int, src: int, dst: int, kind: int, body: tuple[Any, ...]) -> None:
        """Session send: delivered after 1..2 ticks unless a partition cuts it."""
        self.sent += 1
        if self.cut_from_leader and self._partitioned(now, src, dst):
            self.dropped += 1
            return
        self._push(now + 1 + int(self.rng.random() * 2), src, dst, kind, body)

    def requeue(self, now: int, src: int, dst: int, kind: int, body: tuple[Any, ...]) -> None:
        """Deliver a held message (to a node that was paused) at ``now``, after others due."""
        self._push(now, src, dst, kind, body)

    def due(self, now: int) -> list[Envelope]:
        """Pop every message due at or before ``now``, in delivery order."""
        out: list[Envelope] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            out.append(heapq.heappop(heap))
        return out

    def in_flight(self) -> int:
        return len(self._heap)

    def drop_all(self) -> int:
        """Lose every message in flight (a long outage: each was delivered or lost long
        ago); returns how many."""
        lost = len(self._heap)
        self._heap.clear()
        self.dropped += lost
        return lost
