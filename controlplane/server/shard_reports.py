"""What nodes last reported about their shards in heartbeats, kept in memory per
control-plane replica, for ``ListAssignments(include_status=true)``.

Only the latest report of each node is kept, with when it arrived and under which
registration; a report of an earlier registration, or older than ``fresh_s``, is not
served (the caller then asks the node). Bounded: at most ``max_nodes`` nodes, the least
recently reporting dropped first. Each replica only sees the heartbeats sent to it, so a
node heartbeating elsewhere has no report here.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

from bluemarble.core.ids import NodeId, ShardId
from bluemarble.v1 import common_pb2

DEFAULT_MAX_NODES = 20_000


@dataclass(frozen=True, slots=True)
class ShardReport:
    """One node's latest heartbeat report: its statuses by shard."""

    lease_id: int
    received_s: float  # monotonic
    fresh_s: float
    statuses: dict[ShardId, common_pb2.ShardStatus]


class ShardReports:
    def __init__(self, max_nodes: int = DEFAULT_MAX_NODES):
        self._max_nodes = max_nodes
        self._reports: collections.OrderedDict[NodeId, ShardReport] = collections.OrderedDict()

    def record(
        self, node: NodeId, lease_id: int, statuses: Sequence[common_pb2.ShardStatus], now_s: float, fresh_s: float
    ) -> None:
        """Keeps ``statuses`` (validated already) as ``node``'s latest report, servable for
        ``fresh_s`` seconds from ``now_s``."""
        self._reports[node] = ShardReport(lease_id, now_s, fresh_s, {ShardId(s.shard_id): s for s in statuses})
        self._reports.move_to_end(node)
        while len(self._reports) > self._max_nodes:
            self._reports.popitem(last=False)

    def latest(
        self, node: NodeId, shard: ShardId, lease_id: int, now_s: float
    ) -> tuple[common_pb2.ShardStatus, float] | None:
        """``node``'s fresh status of ``shard`` under ``lease_id`` and its age in seconds,
        or None when there is none."""
        report = self._reports.get(node)
        if report is None or report.lease_id != lease_id or now_s - report.received_s > report.fresh_s:
            return None
        status = report.statuses.get(shard)
        return None if status is None else (status, max(0.0, now_s - report.received_s))

    def __len__(self) -> int:
        return len(self._reports)
