from bluemarble.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetInventoryRequest(_message.Message):
    __slots__ = ("player_id",)
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    player_id: str
    def __init__(self, player_id: _Optional[str] = ...) -> None: ...

class GetInventoryResponse(_message.Message):
    __slots__ = ("player_id", "item_ids", "gold", "shard_id", "epoch")
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    GOLD_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    player_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    gold: int
    shard_id: str
    epoch: int
    def __init__(self, player_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., gold: _Optional[int] = ..., shard_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("inventory",)
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    inventory: GetInventoryResponse
    def __init__(self, inventory: _Optional[_Union[GetInventoryResponse, _Mapping]] = ...) -> None: ...

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

class LogEntry(_message.Message):
    __slots__ = ("lsn", "epoch", "payload")
    LSN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    lsn: int
    epoch: int
    payload: bytes
    def __init__(self, lsn: _Optional[int] = ..., epoch: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class ReplicateRequest(_message.Message):
    __slots__ = ("shard_id", "epoch", "entries")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    epoch: int
    entries: _containers.RepeatedCompositeFieldContainer[LogEntry]
    def __init__(self, shard_id: _Optional[str] = ..., epoch: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ...) -> None: ...

class ReplicateResponse(_message.Message):
    __slots__ = ("applied_lsn",)
    APPLIED_LSN_FIELD_NUMBER: _ClassVar[int]
    applied_lsn: int
    def __init__(self, applied_lsn: _Optional[int] = ...) -> None: ...

class GetSnapshotRequest(_message.Message):
    __slots__ = ("shard_id", "epoch")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    epoch: int
    def __init__(self, shard_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("lsn", "data")
    LSN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    lsn: int
    data: bytes
    def __init__(self, lsn: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetShardStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetShardStatusResponse(_message.Message):
    __slots__ = ("node_id", "shards")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    shards: _containers.RepeatedCompositeFieldContainer[_common_pb2.ShardStatus]
    def __init__(self, node_id: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[_common_pb2.ShardStatus, _Mapping]]] = ...) -> None: ...
