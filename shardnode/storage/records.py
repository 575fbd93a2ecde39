"""The values node storage hands out, and the rules that make a primary and its replicas
record the same thing for the same entry.

An entry's answer (the encoded GrantItemsResponse, TakeItemsResponse or SetPlayerDataResponse remembered
with its request id) is computed from the entry and the shard's state alone: no clock,
no node id. So a replica that applies the entry records byte for byte what the primary
recorded, and after a failover the new primary answers a retry exactly as the old one
did.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from bluemarble.core import limits, validation
from bluemarble.core.errors import CorruptRecord, InvalidArgument
from bluemarble.core.ids import PlayerId, ShardId
from bluemarble.core.limits import echo
from bluemarble.core.replication.position import ZERO, LogPosition
from bluemarble.v1 import shardnode_pb2
from shardnode.storage.trades import TRADE_KINDS, TRADE_SETTLE, check_trade_op

GRANT = "grant"
TAKE = "take"
SET_DATA = "set_data"
EPOCH_START = "epoch_start"


@dataclass(frozen=True)
class ShardMeta:
    """What this node holds of one shard's log, and the newest epoch it has seen."""

    shard_id: ShardId
    fenced_epoch: int
    """Newest epoch seen or fenced for the shard. Durable; it only grows (entries and
    writes of an older primary are refused against it)."""
    last: LogPosition
    """Position of the last log entry (ZERO for none)."""
    first_retained_lsn: int
    """Lowest lsn still in the log (``last.lsn + 1`` when the log is empty): a replica
    that needs an older entry must bootstrap from a snapshot."""
    synced: bool = False
    """This node holds a copy of the shard's log (it caught up with a primary, installed
    a snapshot, or served as primary): it may be promoted. Set with
    :meth:`~shardnode.storage.NodeStorage.mark_synced`, cleared by ``drop_shard``; a
    shard known only by its fence is not synced."""

    @property
    def has_data(self) -> bool:
        """False for a shard known here only by its fence (never written, or dropped)."""
        return self.last != ZERO


def empty_meta(shard: ShardId) -> ShardMeta:
    """The meta of a shard this node holds nothing of."""
    return ShardMeta(shard, 0, ZERO, 1)


@dataclass(frozen=True)
class WriteResult:
    """The outcome of one write on the primary."""

    lsn: int
    """Log position (lsn) of the entry the write appended, or of the first attempt's."""
    response: bytes
    """The recorded answer: an encoded GrantItemsResponse or SetPlayerDataResponse. Its
    own ``replayed`` field is always false; set it from :attr:`replayed` when answering."""
    replayed: bool
    """True: the request id was seen before with the same op; nothing was applied now
    and ``lsn``/``response`` are the first attempt's."""
    payload: bytes = field(default=b"", compare=False, repr=False)
    """The encoded op the write appended to the log (what replicas receive, so the data
    plane ships these bytes without encoding the op again); empty when replayed."""


def op_digest(payload: bytes) -> bytes:
    """The fingerprint of an encoded WriteOp that tells a retry from a different request
    reusing its id. Computed on the bytes that travel in the log, so a replica that
    records the entry stores the primary's digest."""
    return hashlib.blake2b(payload, digest_size=16).digest()


def check_op(op: shardnode_pb2.WriteOp) -> str:
    """Validates a WriteOp a primary is asked to apply; returns its kind (:data:`GRANT`,
    :data:`TAKE`, :data:`SET_DATA`, :data:`EPOCH_START` or a trade kind of :mod:`shardnode.storage.trades`).
    Raises InvalidArgument naming the bad field. The gRPC layer
    checks the same limits first; this keeps storage safe on its own."""
    kind = str(op.WhichOneof("op"))
    if kind == EPOCH_START:
        if op.request_id or op.player_id:
            raise InvalidArgument("an epoch-start entry names no request and no player")
        return kind
    if kind in TRADE_KINDS:
        # Idempotent by trade id (the trades table), not by request id: a retried prepare
        # carries new times, which a request record would take for a different request.
        if op.request_id:
            raise InvalidArgument("a trade entry carries no request id (trades are idempotent by trade id)")
        if op.player_id or kind != TRADE_SETTLE:
            validation.player_id(op.player_id)
        try:
            check_trade_op(op, kind)
        except CorruptRecord as e:
            raise InvalidArgument(str(e)) from e
        return kind
    if op.request_id:
        validation.request_id(op.request_id)
    validation.player_id(op.player_id)
    if kind == GRANT:
        validation.item_ids(op.grant.item_ids)
        validation.gold(op.grant.gold)
    elif kind == TAKE:
        validation.item_ids(op.take.item_ids)
        validation.gold(op.take.gold)
    elif kind == SET_DATA:
        if not op.set_data.system:
            raise InvalidArgument("system is empty; name a game system of the cluster config")
        validation.data_key(op.set_data.key)
        validation.data_value(op.set_data.value)
    else:
        raise InvalidArgument("the write names no operation (grant, take, set_data or epoch_start)")
    return kind


def decode_op(shard: ShardId, entry: shardnode_pb2.LogEntry) -> tuple[shardnode_pb2.WriteOp, str]:
    """The WriteOp carried by a replicated entry, and its kind. Raises CorruptRecord for a
    payload no primary writes (undecodable, no operation, no player, gold over the cap)."""
    try:
        op = shardnode_pb2.WriteOp.FromString(entry.payload)
    except DecodeError as e:
        raise CorruptRecord(f"entry {entry.lsn} of {shard} is not an encoded WriteOp: {e}") from e
    kind = op.WhichOneof("op")
    if kind == EPOCH_START:
        return op, kind
    if kind in TRADE_KINDS:
        try:
            check_trade_op(op, kind)
        except CorruptRecord as e:
            raise CorruptRecord(f"entry {entry.lsn} of {shard}: {e}") from e
        return op, kind
    if kind is None or not op.player_id:
        raise CorruptRecord(f"entry {entry.lsn} of {shard} names no operation or no player")
    if kind == GRANT and op.grant.gold > limits.MAX_GOLD:
        raise CorruptRecord(f"entry {entry.lsn} of {shard} grants {op.grant.gold} gold, over the 2^53 cap")
    if kind == TAKE and op.take.gold > limits.MAX_GOLD:
        raise CorruptRecord(f"entry {entry.lsn} of {shard} takes {op.take.gold} gold, over the 2^53 cap")
    return op, kind


def grant_answer(
    shard: ShardId, epoch: int, lsn: int, player: PlayerId, item_ids: list[str], gold: int
) -> bytes:
    """The recorded answer of a grant: the player's inventory right after it (item ids
    sorted), at the entry's epoch and lsn."""
    inventory = shardnode_pb2.GetInventoryResponse(
        player_id=player, item_ids=item_ids, gold=gold, shard_id=shard, epoch=epoch
    )
    return shardnode_pb2.GrantItemsResponse(inventory=inventory, lsn=lsn).SerializeToString(deterministic=True)


def take_answer(
    shard: ShardId, epoch: int, lsn: int, player: PlayerId, item_ids: list[str], gold: int
) -> bytes:
    """The recorded answer of a take: the player's inventory right after it, as a grant's."""
    inventory = shardnode_pb2.GetInventoryResponse(
        player_id=player, item_ids=item_ids, gold=gold, shard_id=shard, epoch=epoch
    )
    return shardnode_pb2.TakeItemsResponse(inventory=inventory, lsn=lsn).SerializeToString(deterministic=True)


def set_data_answer(shard: ShardId, epoch: int, lsn: int) -> bytes:
    """The recorded answer of a player-data write. ``consistency`` is left unset: it is
    the cluster config's, which the gRPC layer adds when it answers."""
    return shardnode_pb2.SetPlayerDataResponse(shard_id=shard, epoch=epoch, lsn=lsn).SerializeToString(
        deterministic=True
    )


def owned_elsewhere(item_id: str, owner_shard: str, *, by_this_player: bool = False) -> str:
    """The refusal of a grant whose item already exists on this node (another player's
    is named only by its shard)."""
    if by_this_player:
        return (f"item {echo(item_id)} is already owned by this player: a grant makes new items (to repeat an "
                "earlier grant, send it again with its request id)")
    return f"item {echo(item_id)} is already owned by a player of {owner_shard}"
