"""Which replication stream sends a waiting STRONG entry at once (R = 3: the first
replica's stream leads, the second lingers), and when a stream carries an entry."""

from __future__ import annotations

from types import SimpleNamespace

from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.replication import LogPosition
from bluemarble.runtime.clock import FakeClock
from bluemarble.v1 import shardnode_pb2 as pb
from shardnode.replication import COVER_WINDOW_S, MAX_BATCH_ENTRIES, Peer, ShardView, Shipper, must_send_now

SHARD = ShardId("shard-1")
N2, N3 = NodeId("n2"), NodeId("n3")


def shipper(replica: NodeId, *, sent_lsn: int = 0, exchange_since_s: float | None = None,
            known: bool = True) -> Shipper:
    s = Shipper(replica, SimpleNamespace(), FakeClock())  # type: ignore[arg-type]
    s.peers[SHARD] = Peer(next_lsn=sent_lsn + 1 if known else None, sent_lsn=sent_lsn)
    s.exchange_started_s = exchange_since_s
    return s


def sends(replica: NodeId, streams: dict[NodeId, Shipper], need: int, now_s: float = 100.0) -> bool:
    def carries(node: NodeId, next_batch: bool) -> bool:
        return streams[node].covers(SHARD, need, now_s, next_batch=next_batch)

    return must_send_now(replica, [N2, N3], carries)


def test_a_stream_carries_what_it_sent_and_the_next_batch_of_a_recent_exchange() -> None:
    assert shipper(N2, sent_lsn=7).covers(SHARD, 7, 100.0, next_batch=False)
    assert not shipper(N2, sent_lsn=6).covers(SHARD, 7, 100.0, next_batch=True)
    busy = shipper(N2, sent_lsn=6, exchange_since_s=100.0 - COVER_WINDOW_S / 2)
    assert busy.covers(SHARD, 7, 100.0, next_batch=True)
    assert not busy.covers(SHARD, 7, 100.0, next_batch=False)
    stuck = shipper(N2, sent_lsn=6, exchange_since_s=100.0 - 2 * COVER_WINDOW_S)
    assert not stuck.covers(SHARD, 7, 100.0, next_batch=True)
    # A replica the stream does not know yet (a probe first) carries nothing.
    assert not shipper(N2, sent_lsn=9, known=False).covers(SHARD, 7, 100.0, next_batch=True)


def test_the_first_replicas_stream_leads_and_the_second_lingers() -> None:
    idle = {N2: shipper(N2, sent_lsn=6), N3: shipper(N3, sent_lsn=6)}
    # Nobody has sent lsn 7: both must (whichever runs first then carries it).
    assert sends(N2, idle, 7) and sends(N3, idle, 7)
    # The first sent it: the second need not.
    sent = {N2: shipper(N2, sent_lsn=7), N3: shipper(N3, sent_lsn=6)}
    assert not sends(N3, sent, 7)
    # The first is mid-exchange and sends it next: the second still need not ...
    busy = {N2: shipper(N2, sent_lsn=6, exchange_since_s=99.995), N3: shipper(N3, sent_lsn=6)}
    assert not sends(N3, busy, 7)
    # ... but the second's exchange in progress does not excuse the first.
    second_busy = {N2: shipper(N2, sent_lsn=6), N3: shipper(N3, sent_lsn=6, exchange_since_s=99.995)}
    assert sends(N2, second_busy, 7)


def test_the_second_takes_over_when_the_first_is_stuck_or_unknown() -> None:
    stuck = {N2: shipper(N2, sent_lsn=6, exchange_since_s=100.0 - 2 * COVER_WINDOW_S), N3: shipper(N3, sent_lsn=6)}
    assert sends(N3, stuck, 7)
    unknown = {N2: shipper(N2, known=False), N3: shipper(N3, sent_lsn=6)}
    assert sends(N3, unknown, 7)


def test_with_one_replica_its_stream_always_sends_and_without_any_nobody_waits() -> None:
    assert must_send_now(N2, [N2], lambda node, next_batch: True)
    assert not must_send_now(N2, [], lambda node, next_batch: False)


class CatchUpLink:
    """Four shards each 5,000 entries ahead of the replica; one 3 entries ahead."""

    node_id = "n1"

    def __init__(self) -> None:
        self.views = [ShardView(ShardId(f"shard-{i}"), 1, LogPosition(1, 5_000), 1, True) for i in range(4)]
        self.views.append(ShardView(ShardId("shard-9"), 1, LogPosition(1, 3), 1, True))

    def shipped_shards(self, replica: NodeId) -> list[ShardView]:
        return self.views

    def incarnation(self) -> int:
        return 1

    def epoch_at(self, shard: ShardId, lsn: int) -> int:
        return 1

    def entries(self, shard: ShardId, from_lsn: int, max_entries: int, max_bytes: int) -> list[pb.LogEntry]:
        last = next(v.last.lsn for v in self.views if v.shard_id == shard)
        upto = min(last, from_lsn + max_entries - 1)
        return [pb.LogEntry(lsn=n, epoch=1, payload=b"x" * 30) for n in range(from_lsn, upto + 1)]


def test_a_batch_carries_a_bounded_number_of_entries_the_live_shard_first() -> None:
    """Small entries: the byte budget alone let one batch carry thousands, applied by the
    replica in one transaction while its heartbeats waited."""
    link = CatchUpLink()
    s = Shipper(N2, link, FakeClock())  # type: ignore[arg-type]
    for view in link.views:
        s.peers[view.shard_id] = Peer(next_lsn=1)
    batch, _ = s._build()
    assert batch is not None
    counts = {g.shard_id: len(g.entries) for g in batch.shards if g.entries}
    assert sum(counts.values()) == MAX_BATCH_ENTRIES
    assert counts["shard-9"] == 3  # the shard with least to send is not held behind the catch-up
