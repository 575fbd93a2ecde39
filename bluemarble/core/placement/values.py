"""The values placement takes and returns: frozen dataclasses and enums, no behaviour
beyond a few derived properties. Everything else in the package works on these."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.replication.position import LogPosition

Positions = Mapping[tuple[ShardId, NodeId], LogPosition]
"""Log position ``(epoch, lsn)`` of the last entry per (shard, node), as the fenced
candidates reported it at promotion time. Ordered like Raft's ``(term, index)``: an
entry of a newer primary is ahead of any entry of an older one, whatever the lsns."""


@dataclass(frozen=True, slots=True)
class PlacementNode:
    """A live shard node as placement sees it. Nodes absent from the list are dead.

    ``capacity`` is a relative weight (>= 1): a node of capacity 2 should hold twice the
    roles of a node of capacity 1. A ``draining`` node keeps serving what it holds but
    receives no new role; placement moves its roles away.
    """

    node_id: NodeId
    zone: str
    capacity: int
    draining: bool = False


@dataclass(frozen=True, slots=True)
class ShardAssignment:
    """Who holds one shard: its epoch (the fencing token), primary and replicas.

    ``primary`` is None only for a shard that has never had a live node to live on.
    """

    shard_id: ShardId
    epoch: int
    primary: NodeId | None
    replicas: tuple[NodeId, ...]

    @property
    def members(self) -> tuple[NodeId, ...]:
        """The primary (if any) followed by the replicas."""
        head = () if self.primary is None else (self.primary,)
        return head + self.replicas


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    """The cluster settings placement depends on (validated where the config is loaded).

    ``replication_factor`` (>= 1): copies per shard wanted, capped by eligible nodes.
    ``max_moves_per_round`` (>= 0): budgeted moves per plan (see :attr:`MoveKind.budgeted`).
    """

    replication_factor: int
    max_moves_per_round: int


class MoveKind(enum.Enum):
    """What one :class:`Move` does to one shard."""

    PROMOTE = "promote"
    """Failover: the shard's primary is dead; live replica ``target`` becomes primary."""
    ASSIGN_PRIMARY = "assign_primary"
    """The shard has no live copy (new shard, or every copy lost): ``target`` becomes
    primary without any data from before."""
    DROP_REPLICA = "drop_replica"
    """Bookkeeping: ``source`` is dead, unknown, or listed twice; its entry is removed."""
    ADD_REPLICA = "add_replica"
    """``target`` becomes a new replica (it bootstraps from a snapshot plus the log)."""
    REMOVE_REPLICA = "remove_replica"
    """Replica ``source`` is no longer needed and is removed."""
    MOVE_REPLICA = "move_replica"
    """Replica ``source`` is replaced by a new replica on ``target``."""
    HANDOFF_PRIMARY = "handoff_primary"
    """Primary ``source`` hands the shard to its replica ``target`` and stays a replica."""

    @property
    def budgeted(self) -> bool:
        """Whether the move counts against ``max_moves_per_round``.

        Restoring a primary (PROMOTE, ASSIGN_PRIMARY) and dropping entries of nodes that
        are gone (DROP_REPLICA) are never deferred: a shard without a primary is
        unavailable, and a dead entry is only a stale record.
        """
        return self not in _UNBUDGETED


_UNBUDGETED = frozenset({MoveKind.PROMOTE, MoveKind.ASSIGN_PRIMARY, MoveKind.DROP_REPLICA})


@dataclass(frozen=True, slots=True)
class Move:
    """One step of a plan on one shard: ``source`` gives up a role, ``target`` takes one.

    Either node may be None when the kind has no such side (see :class:`MoveKind`).
    ``reason`` is for people: logs, ``bluemarblectl`` and events.
    """

    shard_id: ShardId
    kind: MoveKind
    source: NodeId | None
    target: NodeId | None
    reason: str


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    """The result of one placement round: a decision, not yet applied.

    * ``assignments``: the new record of every shard asked about (read-only mapping).
    * ``moves``: the steps from ``current`` to ``assignments``, in the order they were
      decided (failover first); budgeted ones number at most ``max_moves_per_round``.
    * ``changed``: the shards whose record differs from ``current`` (sorted by shard
      number); exactly these need to be written.
    * ``converged``: planning again from ``assignments`` would change nothing. False
      when the budget, or a safety rule that needs a new round (a new replica must exist
      before it can take a primary), cut the round short.

    The executor writes the changed records in one etcd transaction guarded by the
    leader's key, then nodes learn them through WatchAssignments.
    """

    assignments: Mapping[ShardId, ShardAssignment]
    moves: tuple[Move, ...]
    changed: tuple[ShardId, ...]
    converged: bool
