"""The leader's fence-then-promote decision for one shard (flow 4, pure).

Why this module exists: choosing the new primary is where a failover either keeps every
acknowledged write (I4) or silently drops some. The leader (the driver) does the I/O in
this order:

1. ``new_epoch = promotion_epoch(current_epoch)``;
2. send the fence (``new_epoch``) to every live replica of the shard; each persists it
   **before** it answers its last position: from then on it refuses entries and acks from
   older epochs, so the old primary (dead, paused or merely cut off) cannot commit
   anything the answers do not show;
3. call :func:`choose_primary` with the answers collected so far (again as more arrive);
4. write the new assignment (epoch, primary) in a guarded etcd transaction, then notify;
5. the promoted node, before accepting writes, catches up from
   :func:`catch_up_source` if a live replica is ahead of it.

Because the fence is what makes promotion safe, the leader may promote early on a crash
(the heartbeat stream reset) without waiting for the old primary's lease to expire.

Positions compare as ``(epoch, lsn)``: a deposed primary may hold *more* entries than a
replica of its successor (unacknowledged writes) but never newer ones; promoting by lsn
alone would throw away the successor's acknowledged writes.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from bluemarble.core.ids import NodeId
from bluemarble.core.replication.position import LogPosition


@dataclass(frozen=True)
class FenceAnswer:
    """A replica's answer to the fence: its durable fenced epoch (after persisting the
    fence) and the position of its last log entry."""

    node_id: NodeId
    fenced_epoch: int
    last: LogPosition
    has_data: bool
    """The node holds a copy of the shard (False: new or wiped, nothing to offer)."""


@dataclass(frozen=True)
class PromotionDecision:
    """The node to promote at the new epoch, or None with the reason to keep waiting."""

    primary: NodeId | None
    reason: str


def promotion_epoch(current_epoch: int) -> int:
    """The epoch a promotion writes: one more than the shard's current epoch."""
    assert current_epoch >= 0, current_epoch
    return current_epoch + 1


def _ahead(position: LogPosition, node: NodeId) -> tuple[int, int, str]:
    """Sort key: greatest (epoch, lsn) first, then the smallest node id (deterministic)."""
    return (-position.epoch, -position.lsn, node)


def choose_primary(
    answers: Mapping[NodeId, FenceAnswer],
    *,
    new_epoch: int,
    must_answer: Collection[NodeId],
    shard_had_data: bool = True,
) -> PromotionDecision:
    """The node to promote at ``new_epoch``, from the fence answers collected so far.

    - None ("waiting for fence of X") until every node of ``must_answer`` (the live
      candidates) has answered with ``fenced_epoch >= new_epoch``. Answers fenced below
      ``new_epoch`` are never candidates: their position could still grow.
    - Among fenced answers with data, the greatest ``last`` as ``(epoch, lsn)`` (not the
      greatest lsn), ties broken by the smallest node id.
    - Nodes without data are candidates only if no candidate has data and the shard never
      had data (``shard_had_data`` False). When it had and nobody with data answered:
      None. An empty log is never promoted over lost data; an operator decides.
    """
    assert new_epoch >= 1, new_epoch
    for node in sorted(must_answer):
        answer = answers.get(node)
        if answer is None or answer.fenced_epoch < new_epoch:
            return PromotionDecision(None, f"waiting for fence of {node} at epoch {new_epoch}")
    fenced = [a for a in answers.values() if a.fenced_epoch >= new_epoch]
    with_data = [a for a in fenced if a.has_data]
    if with_data:
        best = min(with_data, key=lambda a: _ahead(a.last, a.node_id))
        return PromotionDecision(best.node_id, f"greatest last entry {best.last} among {len(fenced)} fenced")
    if not fenced:
        return PromotionDecision(None, "no live candidate answered the fence")
    if shard_had_data:
        return PromotionDecision(
            None, "no fenced candidate holds the shard's data; refusing to promote an empty log over lost data",
        )
    best = min(fenced, key=lambda a: a.node_id)
    return PromotionDecision(best.node_id, "the shard never had data; any fenced node will do")


def catch_up_source(own_last: LogPosition, replicas: Mapping[NodeId, LogPosition]) -> NodeId | None:
    """The live replica a newly promoted primary copies from before it accepts writes:
    the one with the greatest last position (ties: smallest node id), if that is greater
    than ``own_last``; None when the primary is already the most advanced."""
    if not replicas:
        return None
    node = min(replicas, key=lambda n: _ahead(replicas[n], n))
    return node if replicas[node] > own_last else None
