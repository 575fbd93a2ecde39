"""Conversions between the pure core values (ring, assignments, trade legs) and their messages.

The core knows nothing of protobuf; the stores, servicers and clients know nothing of the
core's internals. Conversion from a message validates: one that does not describe a valid
value raises :class:`bluemarble.core.errors.CorruptRecord` naming where it came from.
"""

from __future__ import annotations

from collections.abc import Mapping

from bluemarble.core.errors import CorruptRecord
from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.placement import PlacementNode, ShardAssignment
from bluemarble.core.replication.position import ZERO, LogPosition
from bluemarble.core.ring import Ring
from bluemarble.core.trades import AbortCause, Leg, Offer, TradeState
from bluemarble.v1 import common_pb2, shardnode_pb2


def ring_to_proto(ring: Ring) -> common_pb2.Ring:
    return common_pb2.Ring(
        version=ring.version,
        hash=ring.hash_name,
        shards=[common_pb2.RingShard(shard_id=s, tokens=list(t)) for s, t in ring.shards],
    )


def ring_from_proto(message: common_pb2.Ring, source: str = "ring") -> Ring:
    """The ring a message describes; CorruptRecord naming ``source`` when it is invalid."""
    try:
        return Ring.from_tokens(
            message.version,
            {ShardId(s.shard_id): list(s.tokens) for s in message.shards},
            hash_name=message.hash,
        )
    except (ValueError, TypeError) as e:
        raise CorruptRecord(f"{source} does not hold a valid ring: {e}") from e


def assignment_to_proto(
    a: ShardAssignment, incarnations: Mapping[NodeId, int] | None = None
) -> common_pb2.Assignment:
    """The record of ``a``. ``incarnations``: the registration (lease id) of each member
    when it was given its role; entries for nodes that are not members are left out."""
    message = common_pb2.Assignment(
        shard_id=a.shard_id,
        epoch=a.epoch,
        primary=a.primary or "",
        replicas=list(a.replicas),
        state=common_pb2.ASSIGNMENT_STATE_ACTIVE
        if a.primary
        else common_pb2.ASSIGNMENT_STATE_PRIMARY_LOST,
    )
    if incarnations:
        for member in a.members:
            lease = incarnations.get(member)
            if lease is not None:
                message.incarnations[member] = lease
    return message


def assignment_incarnations(message: common_pb2.Assignment) -> dict[NodeId, int]:
    """The recorded registration (lease id) of each member; empty for a record written
    before incarnations were recorded (its members then count as current)."""
    return {NodeId(node): lease for node, lease in message.incarnations.items()}


def holds_role(message: common_pb2.Assignment, node: str, leases: Mapping[str, int]) -> bool:
    """Whether ``node`` still holds the role ``message`` gives it: it is registered
    (``leases``: node id -> lease id of each registered node) in the incarnation the role
    was given to. A node registered again since has lost its roles (its copy may be gone,
    and nothing it held is served until the leader places it again). Records without
    incarnations count as current."""
    lease = leases.get(node)
    if not node or lease is None:
        return False
    given = message.incarnations.get(node)
    return given is None or given == lease


def assignment_from_proto(message: common_pb2.Assignment) -> ShardAssignment:
    return ShardAssignment(
        shard_id=ShardId(message.shard_id),
        epoch=message.epoch,
        primary=NodeId(message.primary) if message.primary else None,
        replicas=tuple(NodeId(r) for r in message.replicas),
    )


def placement_node_from_proto(message: common_pb2.Node) -> PlacementNode:
    """A registered node (a ListNodes entry) as placement sees it: its zone, its capacity
    (an unset 0 counts as 1, the smallest valid weight) and whether it is draining."""
    return PlacementNode(
        node_id=NodeId(message.node_id),
        zone=message.zone,
        capacity=max(message.capacity, 1),
        draining=message.state == common_pb2.NODE_STATE_DRAINING,
    )


def log_position(epoch: int, lsn: int) -> LogPosition:
    """The position a node reported as ``(epoch, lsn)`` of its last entry.

    Lenient with reports that do not pair an epoch with an lsn (a node that does not
    track the epoch of its entries reports epoch 0 with entries; one with an empty log
    may still report its shard epoch): an lsn of 0 is the empty log, and entries of an
    unknown epoch count as epoch 1, below every entry written at a known later epoch.
    """
    if lsn == 0:
        return ZERO
    return LogPosition(max(epoch, 1), lsn)


def log_position_to_proto(position: LogPosition) -> shardnode_pb2.LogPosition:
    return shardnode_pb2.LogPosition(epoch=position.epoch, lsn=position.lsn)


def log_position_from_proto(message: shardnode_pb2.LogPosition) -> LogPosition | None:
    """The position in ``message``, strictly: None when it pairs a zero with a non-zero
    (only the empty log sits at epoch 0 or lsn 0). Compare :func:`log_position`, which is
    lenient with reports."""
    if (message.epoch == 0) != (message.lsn == 0):
        return None
    return LogPosition(message.epoch, message.lsn)


def offer_from_proto(message: common_pb2.Offer) -> Offer:
    return Offer(tuple(message.item_ids), int(message.gold))


def offer_to_proto(offer: Offer) -> common_pb2.Offer:
    return common_pb2.Offer(item_ids=list(offer.item_ids), gold=offer.gold)


def leg_from_proto(trade_id: str, message: shardnode_pb2.TradeLeg) -> Leg:
    return Leg(trade_id, message.player_id, offer_from_proto(message.gives), offer_from_proto(message.receives),
               message.counterpart_player_id)


def leg_to_proto(leg: Leg) -> shardnode_pb2.TradeLeg:
    return shardnode_pb2.TradeLeg(
        player_id=leg.player, gives=offer_to_proto(leg.gives), receives=offer_to_proto(leg.receives),
        counterpart_player_id=leg.counterpart,
    )


_STATE_PROTO = {
    TradeState.PREPARED: shardnode_pb2.PARTICIPANT_TRADE_STATE_PREPARED,
    TradeState.COMMITTED: shardnode_pb2.PARTICIPANT_TRADE_STATE_COMMITTED,
    TradeState.ABORTED: shardnode_pb2.PARTICIPANT_TRADE_STATE_ABORTED,
}
_STATE_OF_PROTO = {v: k for k, v in _STATE_PROTO.items()}


def participant_state_to_proto(state: TradeState | None) -> shardnode_pb2.ParticipantTradeState:
    """None (nothing known) is PARTICIPANT_TRADE_STATE_NONE."""
    return shardnode_pb2.PARTICIPANT_TRADE_STATE_NONE if state is None else _STATE_PROTO[state]


def participant_state_from_proto(value: int) -> TradeState | None:
    """The state a message field names; None for NONE or a value this release does not know."""
    state: TradeState | None = _STATE_OF_PROTO.get(value)  # type: ignore[call-overload]
    return state


# ---- trade abort causes ----

_CAUSE_TO_PROTO = {
    AbortCause.UNKNOWN: common_pb2.TRADE_ABORT_CAUSE_UNSPECIFIED,
    AbortCause.REFUSED: common_pb2.TRADE_ABORT_CAUSE_REFUSED,
    AbortCause.UNAVAILABLE: common_pb2.TRADE_ABORT_CAUSE_UNAVAILABLE,
    AbortCause.CONTENDED: common_pb2.TRADE_ABORT_CAUSE_CONTENDED,
}
_CAUSE_FROM_PROTO = {v: k for k, v in _CAUSE_TO_PROTO.items()}


def cause_to_proto(cause: AbortCause) -> common_pb2.TradeAbortCause:
    return _CAUSE_TO_PROTO[cause]


def cause_from_proto(value: int) -> AbortCause:
    """The cause of a message field; UNKNOWN for an unset or unknown value (a record of
    a newer version: the reason still says it)."""
    return _CAUSE_FROM_PROTO.get(value, AbortCause.UNKNOWN)  # type: ignore[call-overload,no-any-return]
