from bluemarble.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AckResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_RESULT_UNSPECIFIED: _ClassVar[AckResult]
    ACK_RESULT_OK: _ClassVar[AckResult]
    ACK_RESULT_STALE_EPOCH: _ClassVar[AckResult]
    ACK_RESULT_MISMATCH: _ClassVar[AckResult]
    ACK_RESULT_NOT_REPLICA: _ClassVar[AckResult]
    ACK_RESULT_SNAPSHOTTING: _ClassVar[AckResult]
ACK_RESULT_UNSPECIFIED: AckResult
ACK_RESULT_OK: AckResult
ACK_RESULT_STALE_EPOCH: AckResult
ACK_RESULT_MISMATCH: AckResult
ACK_RESULT_NOT_REPLICA: AckResult
ACK_RESULT_SNAPSHOTTING: AckResult

class Staleness(_message.Message):
    __slots__ = ("stale", "lag_entries", "lag_ms", "served_by", "applied_lsn")
    STALE_FIELD_NUMBER: _ClassVar[int]
    LAG_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LAG_MS_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    APPLIED_LSN_FIELD_NUMBER: _ClassVar[int]
    stale: bool
    lag_entries: int
    lag_ms: int
    served_by: str
    applied_lsn: int
    def __init__(self, stale: _Optional[bool] = ..., lag_entries: _Optional[int] = ..., lag_ms: _Optional[int] = ..., served_by: _Optional[str] = ..., applied_lsn: _Optional[int] = ...) -> None: ...

class GetInventoryRequest(_message.Message):
    __slots__ = ("player_id", "allow_stale")
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOW_STALE_FIELD_NUMBER: _ClassVar[int]
    player_id: str
    allow_stale: bool
    def __init__(self, player_id: _Optional[str] = ..., allow_stale: _Optional[bool] = ...) -> None: ...

class GetInventoryResponse(_message.Message):
    __slots__ = ("player_id", "item_ids", "gold", "shard_id", "epoch", "staleness")
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    GOLD_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    player_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    gold: int
    shard_id: str
    epoch: int
    staleness: Staleness
    def __init__(self, player_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., gold: _Optional[int] = ..., shard_id: _Optional[str] = ..., epoch: _Optional[int] = ..., staleness: _Optional[_Union[Staleness, _Mapping]] = ...) -> None: ...

class GrantItemsRequest(_message.Message):
    __slots__ = ("request_id", "player_id", "item_ids", "gold", "epoch")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    GOLD_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    player_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    gold: int
    epoch: int
    def __init__(self, request_id: _Optional[str] = ..., player_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., gold: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class GrantItemsResponse(_message.Message):
    __slots__ = ("inventory", "lsn", "replayed")
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    LSN_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    inventory: GetInventoryResponse
    lsn: int
    replayed: bool
    def __init__(self, inventory: _Optional[_Union[GetInventoryResponse, _Mapping]] = ..., lsn: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class GetPlayerDataRequest(_message.Message):
    __slots__ = ("player_id", "system", "key", "allow_stale")
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    ALLOW_STALE_FIELD_NUMBER: _ClassVar[int]
    player_id: str
    system: str
    key: str
    allow_stale: bool
    def __init__(self, player_id: _Optional[str] = ..., system: _Optional[str] = ..., key: _Optional[str] = ..., allow_stale: _Optional[bool] = ...) -> None: ...

class GetPlayerDataResponse(_message.Message):
    __slots__ = ("player_id", "system", "key", "value", "found", "shard_id", "epoch", "staleness", "lsn")
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    LSN_FIELD_NUMBER: _ClassVar[int]
    player_id: str
    system: str
    key: str
    value: bytes
    found: bool
    shard_id: str
    epoch: int
    staleness: Staleness
    lsn: int
    def __init__(self, player_id: _Optional[str] = ..., system: _Optional[str] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ..., found: _Optional[bool] = ..., shard_id: _Optional[str] = ..., epoch: _Optional[int] = ..., staleness: _Optional[_Union[Staleness, _Mapping]] = ..., lsn: _Optional[int] = ...) -> None: ...

class SetPlayerDataRequest(_message.Message):
    __slots__ = ("request_id", "player_id", "system", "key", "value", "epoch")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    player_id: str
    system: str
    key: str
    value: bytes
    epoch: int
    def __init__(self, request_id: _Optional[str] = ..., player_id: _Optional[str] = ..., system: _Optional[str] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ..., epoch: _Optional[int] = ...) -> None: ...

class SetPlayerDataResponse(_message.Message):
    __slots__ = ("shard_id", "epoch", "lsn", "replayed", "consistency")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LSN_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    epoch: int
    lsn: int
    replayed: bool
    consistency: _common_pb2.ConsistencyModel
    def __init__(self, shard_id: _Optional[str] = ..., epoch: _Optional[int] = ..., lsn: _Optional[int] = ..., replayed: _Optional[bool] = ..., consistency: _Optional[_Union[_common_pb2.ConsistencyModel, str]] = ...) -> None: ...

class TradeLeg(_message.Message):
    __slots__ = ("player_id", "gives", "receives")
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    GIVES_FIELD_NUMBER: _ClassVar[int]
    RECEIVES_FIELD_NUMBER: _ClassVar[int]
    player_id: str
    gives: _common_pb2.Offer
    receives: _common_pb2.Offer
    def __init__(self, player_id: _Optional[str] = ..., gives: _Optional[_Union[_common_pb2.Offer, _Mapping]] = ..., receives: _Optional[_Union[_common_pb2.Offer, _Mapping]] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("trade_id", "shard_id", "epoch", "legs")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEGS_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    shard_id: str
    epoch: int
    legs: _containers.RepeatedCompositeFieldContainer[TradeLeg]
    def __init__(self, trade_id: _Optional[str] = ..., shard_id: _Optional[str] = ..., epoch: _Optional[int] = ..., legs: _Optional[_Iterable[_Union[TradeLeg, _Mapping]]] = ...) -> None: ...

class PrepareResponse(_message.Message):
    __slots__ = ("prepared", "reason")
    PREPARED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    prepared: bool
    reason: str
    def __init__(self, prepared: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("trade_id", "shard_id", "epoch")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    shard_id: str
    epoch: int
    def __init__(self, trade_id: _Optional[str] = ..., shard_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("trade_id", "shard_id", "epoch")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    shard_id: str
    epoch: int
    def __init__(self, trade_id: _Optional[str] = ..., shard_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LogPosition(_message.Message):
    __slots__ = ("epoch", "lsn")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LSN_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    lsn: int
    def __init__(self, epoch: _Optional[int] = ..., lsn: _Optional[int] = ...) -> None: ...

class LogEntry(_message.Message):
    __slots__ = ("lsn", "epoch", "payload", "written_at_ms")
    LSN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_AT_MS_FIELD_NUMBER: _ClassVar[int]
    lsn: int
    epoch: int
    payload: bytes
    written_at_ms: int
    def __init__(self, lsn: _Optional[int] = ..., epoch: _Optional[int] = ..., payload: _Optional[bytes] = ..., written_at_ms: _Optional[int] = ...) -> None: ...

class WriteOp(_message.Message):
    __slots__ = ("request_id", "player_id", "grant", "set_data", "epoch_start")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    SET_DATA_FIELD_NUMBER: _ClassVar[int]
    EPOCH_START_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    player_id: str
    grant: GrantOp
    set_data: SetDataOp
    epoch_start: EpochStartOp
    def __init__(self, request_id: _Optional[str] = ..., player_id: _Optional[str] = ..., grant: _Optional[_Union[GrantOp, _Mapping]] = ..., set_data: _Optional[_Union[SetDataOp, _Mapping]] = ..., epoch_start: _Optional[_Union[EpochStartOp, _Mapping]] = ...) -> None: ...

class EpochStartOp(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GrantOp(_message.Message):
    __slots__ = ("item_ids", "gold")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    GOLD_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    gold: int
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., gold: _Optional[int] = ...) -> None: ...

class SetDataOp(_message.Message):
    __slots__ = ("system", "key", "value")
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    system: str
    key: str
    value: bytes
    def __init__(self, system: _Optional[str] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...

class ShardEntries(_message.Message):
    __slots__ = ("shard_id", "epoch", "prev", "entries", "primary_last_lsn", "snapshot_required")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PREV_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_LAST_LSN_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    epoch: int
    prev: LogPosition
    entries: _containers.RepeatedCompositeFieldContainer[LogEntry]
    primary_last_lsn: int
    snapshot_required: bool
    def __init__(self, shard_id: _Optional[str] = ..., epoch: _Optional[int] = ..., prev: _Optional[_Union[LogPosition, _Mapping]] = ..., entries: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ..., primary_last_lsn: _Optional[int] = ..., snapshot_required: _Optional[bool] = ...) -> None: ...

class ReplicateBatch(_message.Message):
    __slots__ = ("primary", "shards", "incarnation")
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    primary: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardEntries]
    incarnation: int
    def __init__(self, primary: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardEntries, _Mapping]]] = ..., incarnation: _Optional[int] = ...) -> None: ...

class ShardAck(_message.Message):
    __slots__ = ("shard_id", "result", "epoch", "last", "reason")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    result: AckResult
    epoch: int
    last: LogPosition
    reason: str
    def __init__(self, shard_id: _Optional[str] = ..., result: _Optional[_Union[AckResult, str]] = ..., epoch: _Optional[int] = ..., last: _Optional[_Union[LogPosition, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class ReplicateAck(_message.Message):
    __slots__ = ("replica", "shards")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    replica: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardAck]
    def __init__(self, replica: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardAck, _Mapping]]] = ...) -> None: ...

class GetSnapshotRequest(_message.Message):
    __slots__ = ("shard_id", "epoch", "replica")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    epoch: int
    replica: str
    def __init__(self, shard_id: _Optional[str] = ..., epoch: _Optional[int] = ..., replica: _Optional[str] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("shard_id", "last", "data", "done", "total_bytes")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    last: LogPosition
    data: bytes
    done: bool
    total_bytes: int
    def __init__(self, shard_id: _Optional[str] = ..., last: _Optional[_Union[LogPosition, _Mapping]] = ..., data: _Optional[bytes] = ..., done: _Optional[bool] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class SnapshotPlayer(_message.Message):
    __slots__ = ("player_id", "gold", "item_ids")
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    GOLD_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    player_id: str
    gold: int
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, player_id: _Optional[str] = ..., gold: _Optional[int] = ..., item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SnapshotValue(_message.Message):
    __slots__ = ("player_id", "system", "key", "value", "lsn")
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LSN_FIELD_NUMBER: _ClassVar[int]
    player_id: str
    system: str
    key: str
    value: bytes
    lsn: int
    def __init__(self, player_id: _Optional[str] = ..., system: _Optional[str] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ..., lsn: _Optional[int] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("request_id", "lsn", "response")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LSN_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    lsn: int
    response: bytes
    def __init__(self, request_id: _Optional[str] = ..., lsn: _Optional[int] = ..., response: _Optional[bytes] = ...) -> None: ...

class ShardSnapshot(_message.Message):
    __slots__ = ("shard_id", "last", "players", "values", "requests", "tail")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    PLAYERS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    last: LogPosition
    players: _containers.RepeatedCompositeFieldContainer[SnapshotPlayer]
    values: _containers.RepeatedCompositeFieldContainer[SnapshotValue]
    requests: _containers.RepeatedCompositeFieldContainer[SnapshotRequest]
    tail: _containers.RepeatedCompositeFieldContainer[LogEntry]
    def __init__(self, shard_id: _Optional[str] = ..., last: _Optional[_Union[LogPosition, _Mapping]] = ..., players: _Optional[_Iterable[_Union[SnapshotPlayer, _Mapping]]] = ..., values: _Optional[_Iterable[_Union[SnapshotValue, _Mapping]]] = ..., requests: _Optional[_Iterable[_Union[SnapshotRequest, _Mapping]]] = ..., tail: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ...) -> None: ...

class ShardFence(_message.Message):
    __slots__ = ("shard_id", "epoch")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    epoch: int
    def __init__(self, shard_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class FenceRequest(_message.Message):
    __slots__ = ("requested_by", "shards")
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    requested_by: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardFence]
    def __init__(self, requested_by: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardFence, _Mapping]]] = ...) -> None: ...

class FencedShard(_message.Message):
    __slots__ = ("shard_id", "epoch", "last", "has_data")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    HAS_DATA_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    epoch: int
    last: LogPosition
    has_data: bool
    def __init__(self, shard_id: _Optional[str] = ..., epoch: _Optional[int] = ..., last: _Optional[_Union[LogPosition, _Mapping]] = ..., has_data: _Optional[bool] = ...) -> None: ...

class FenceResponse(_message.Message):
    __slots__ = ("node_id", "shards")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    shards: _containers.RepeatedCompositeFieldContainer[FencedShard]
    def __init__(self, node_id: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[FencedShard, _Mapping]]] = ...) -> None: ...

class GetShardStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetShardStatusResponse(_message.Message):
    __slots__ = ("node_id", "shards", "incarnation")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    shards: _containers.RepeatedCompositeFieldContainer[_common_pb2.ShardStatus]
    incarnation: int
    def __init__(self, node_id: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[_common_pb2.ShardStatus, _Mapping]]] = ..., incarnation: _Optional[int] = ...) -> None: ...
