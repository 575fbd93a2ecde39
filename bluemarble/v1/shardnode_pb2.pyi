from bluemarble.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TradeVote(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRADE_VOTE_UNSPECIFIED: _ClassVar[TradeVote]
    TRADE_VOTE_PREPARED: _ClassVar[TradeVote]
    TRADE_VOTE_REFUSED: _ClassVar[TradeVote]
    TRADE_VOTE_DECIDED: _ClassVar[TradeVote]

class ParticipantTradeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARTICIPANT_TRADE_STATE_UNSPECIFIED: _ClassVar[ParticipantTradeState]
    PARTICIPANT_TRADE_STATE_NONE: _ClassVar[ParticipantTradeState]
    PARTICIPANT_TRADE_STATE_PREPARED: _ClassVar[ParticipantTradeState]
    PARTICIPANT_TRADE_STATE_COMMITTED: _ClassVar[ParticipantTradeState]
    PARTICIPANT_TRADE_STATE_ABORTED: _ClassVar[ParticipantTradeState]

class AckResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_RESULT_UNSPECIFIED: _ClassVar[AckResult]
    ACK_RESULT_OK: _ClassVar[AckResult]
    ACK_RESULT_STALE_EPOCH: _ClassVar[AckResult]
    ACK_RESULT_MISMATCH: _ClassVar[AckResult]
    ACK_RESULT_NOT_REPLICA: _ClassVar[AckResult]
    ACK_RESULT_SNAPSHOTTING: _ClassVar[AckResult]
TRADE_VOTE_UNSPECIFIED: TradeVote
TRADE_VOTE_PREPARED: TradeVote
TRADE_VOTE_REFUSED: TradeVote
TRADE_VOTE_DECIDED: TradeVote
PARTICIPANT_TRADE_STATE_UNSPECIFIED: ParticipantTradeState
PARTICIPANT_TRADE_STATE_NONE: ParticipantTradeState
PARTICIPANT_TRADE_STATE_PREPARED: ParticipantTradeState
PARTICIPANT_TRADE_STATE_COMMITTED: ParticipantTradeState
PARTICIPANT_TRADE_STATE_ABORTED: ParticipantTradeState
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
    __slots__ = ("player_id", "item_ids", "gold", "shard_id", "epoch", "staleness", "escrowed_item_ids", "escrowed_gold")
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    GOLD_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    ESCROWED_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    ESCROWED_GOLD_FIELD_NUMBER: _ClassVar[int]
    player_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    gold: int
    shard_id: str
    epoch: int
    staleness: Staleness
    escrowed_item_ids: _containers.RepeatedScalarFieldContainer[str]
    escrowed_gold: int
    def __init__(self, player_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., gold: _Optional[int] = ..., shard_id: _Optional[str] = ..., epoch: _Optional[int] = ..., staleness: _Optional[_Union[Staleness, _Mapping]] = ..., escrowed_item_ids: _Optional[_Iterable[str]] = ..., escrowed_gold: _Optional[int] = ...) -> None: ...

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

class TakeItemsRequest(_message.Message):
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

class TakeItemsResponse(_message.Message):
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
    __slots__ = ("player_id", "gives", "receives", "counterpart_player_id")
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    GIVES_FIELD_NUMBER: _ClassVar[int]
    RECEIVES_FIELD_NUMBER: _ClassVar[int]
    COUNTERPART_PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    player_id: str
    gives: _common_pb2.Offer
    receives: _common_pb2.Offer
    counterpart_player_id: str
    def __init__(self, player_id: _Optional[str] = ..., gives: _Optional[_Union[_common_pb2.Offer, _Mapping]] = ..., receives: _Optional[_Union[_common_pb2.Offer, _Mapping]] = ..., counterpart_player_id: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("prepared", "reason", "vote", "outcome", "epoch", "deadline_ms", "escrowed_before", "refused_pending")
    PREPARED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VOTE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    ESCROWED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    REFUSED_PENDING_FIELD_NUMBER: _ClassVar[int]
    prepared: bool
    reason: str
    vote: TradeVote
    outcome: _common_pb2.TradeOutcome
    epoch: int
    deadline_ms: int
    escrowed_before: bool
    refused_pending: bool
    def __init__(self, prepared: _Optional[bool] = ..., reason: _Optional[str] = ..., vote: _Optional[_Union[TradeVote, str]] = ..., outcome: _Optional[_Union[_common_pb2.TradeOutcome, str]] = ..., epoch: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., escrowed_before: _Optional[bool] = ..., refused_pending: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: ParticipantTradeState
    def __init__(self, state: _Optional[_Union[ParticipantTradeState, str]] = ...) -> None: ...

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
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: ParticipantTradeState
    def __init__(self, state: _Optional[_Union[ParticipantTradeState, str]] = ...) -> None: ...

class TradeBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[TradeBatchItem]
    def __init__(self, items: _Optional[_Iterable[_Union[TradeBatchItem, _Mapping]]] = ...) -> None: ...

class TradeBatchItem(_message.Message):
    __slots__ = ("prepare", "commit", "abort")
    PREPARE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    prepare: PrepareRequest
    commit: CommitRequest
    abort: AbortRequest
    def __init__(self, prepare: _Optional[_Union[PrepareRequest, _Mapping]] = ..., commit: _Optional[_Union[CommitRequest, _Mapping]] = ..., abort: _Optional[_Union[AbortRequest, _Mapping]] = ...) -> None: ...

class TradeBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TradeBatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[TradeBatchResult, _Mapping]]] = ...) -> None: ...

class TradeBatchResult(_message.Message):
    __slots__ = ("prepare", "commit", "abort", "error")
    PREPARE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    prepare: PrepareResponse
    commit: CommitResponse
    abort: AbortResponse
    error: TradeBatchError
    def __init__(self, prepare: _Optional[_Union[PrepareResponse, _Mapping]] = ..., commit: _Optional[_Union[CommitResponse, _Mapping]] = ..., abort: _Optional[_Union[AbortResponse, _Mapping]] = ..., error: _Optional[_Union[TradeBatchError, _Mapping]] = ...) -> None: ...

class TradeBatchError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ExecuteLocalTradeRequest(_message.Message):
    __slots__ = ("trade_id", "shard_id", "epoch", "player_a", "player_b", "a_gives", "b_gives")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PLAYER_A_FIELD_NUMBER: _ClassVar[int]
    PLAYER_B_FIELD_NUMBER: _ClassVar[int]
    A_GIVES_FIELD_NUMBER: _ClassVar[int]
    B_GIVES_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    shard_id: str
    epoch: int
    player_a: str
    player_b: str
    a_gives: _common_pb2.Offer
    b_gives: _common_pb2.Offer
    def __init__(self, trade_id: _Optional[str] = ..., shard_id: _Optional[str] = ..., epoch: _Optional[int] = ..., player_a: _Optional[str] = ..., player_b: _Optional[str] = ..., a_gives: _Optional[_Union[_common_pb2.Offer, _Mapping]] = ..., b_gives: _Optional[_Union[_common_pb2.Offer, _Mapping]] = ...) -> None: ...

class ExecuteLocalTradeResponse(_message.Message):
    __slots__ = ("trade_id", "outcome", "reason", "replayed", "abort_cause")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    ABORT_CAUSE_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    outcome: _common_pb2.TradeOutcome
    reason: str
    replayed: bool
    abort_cause: _common_pb2.TradeAbortCause
    def __init__(self, trade_id: _Optional[str] = ..., outcome: _Optional[_Union[_common_pb2.TradeOutcome, str]] = ..., reason: _Optional[str] = ..., replayed: _Optional[bool] = ..., abort_cause: _Optional[_Union[_common_pb2.TradeAbortCause, str]] = ...) -> None: ...

class ParticipantTrade(_message.Message):
    __slots__ = ("trade_id", "shard_id", "node_id", "state", "leg", "reason", "prepared_at_ms", "deadline_ms", "settled_at_ms", "cross_shard")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LEG_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREPARED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    SETTLED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    CROSS_SHARD_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    shard_id: str
    node_id: str
    state: ParticipantTradeState
    leg: TradeLeg
    reason: str
    prepared_at_ms: int
    deadline_ms: int
    settled_at_ms: int
    cross_shard: bool
    def __init__(self, trade_id: _Optional[str] = ..., shard_id: _Optional[str] = ..., node_id: _Optional[str] = ..., state: _Optional[_Union[ParticipantTradeState, str]] = ..., leg: _Optional[_Union[TradeLeg, _Mapping]] = ..., reason: _Optional[str] = ..., prepared_at_ms: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., settled_at_ms: _Optional[int] = ..., cross_shard: _Optional[bool] = ...) -> None: ...

class ListTradesRequest(_message.Message):
    __slots__ = ("trade_id", "limit", "shard_id")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    limit: int
    shard_id: str
    def __init__(self, trade_id: _Optional[str] = ..., limit: _Optional[int] = ..., shard_id: _Optional[str] = ...) -> None: ...

class ListTradesResponse(_message.Message):
    __slots__ = ("trades",)
    TRADES_FIELD_NUMBER: _ClassVar[int]
    trades: _containers.RepeatedCompositeFieldContainer[ParticipantTrade]
    def __init__(self, trades: _Optional[_Iterable[_Union[ParticipantTrade, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ("request_id", "player_id", "grant", "set_data", "epoch_start", "trade_prepare", "trade_settle", "local_trade", "take")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    SET_DATA_FIELD_NUMBER: _ClassVar[int]
    EPOCH_START_FIELD_NUMBER: _ClassVar[int]
    TRADE_PREPARE_FIELD_NUMBER: _ClassVar[int]
    TRADE_SETTLE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_TRADE_FIELD_NUMBER: _ClassVar[int]
    TAKE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    player_id: str
    grant: GrantOp
    set_data: SetDataOp
    epoch_start: EpochStartOp
    trade_prepare: TradePrepareOp
    trade_settle: TradeSettleOp
    local_trade: LocalTradeOp
    take: TakeOp
    def __init__(self, request_id: _Optional[str] = ..., player_id: _Optional[str] = ..., grant: _Optional[_Union[GrantOp, _Mapping]] = ..., set_data: _Optional[_Union[SetDataOp, _Mapping]] = ..., epoch_start: _Optional[_Union[EpochStartOp, _Mapping]] = ..., trade_prepare: _Optional[_Union[TradePrepareOp, _Mapping]] = ..., trade_settle: _Optional[_Union[TradeSettleOp, _Mapping]] = ..., local_trade: _Optional[_Union[LocalTradeOp, _Mapping]] = ..., take: _Optional[_Union[TakeOp, _Mapping]] = ...) -> None: ...

class TradePrepareOp(_message.Message):
    __slots__ = ("trade_id", "leg", "prepared_at_ms", "deadline_ms")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    LEG_FIELD_NUMBER: _ClassVar[int]
    PREPARED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    leg: TradeLeg
    prepared_at_ms: int
    deadline_ms: int
    def __init__(self, trade_id: _Optional[str] = ..., leg: _Optional[_Union[TradeLeg, _Mapping]] = ..., prepared_at_ms: _Optional[int] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class TradeSettleOp(_message.Message):
    __slots__ = ("trade_id", "outcome", "reason", "settled_at_ms")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SETTLED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    outcome: _common_pb2.TradeOutcome
    reason: str
    settled_at_ms: int
    def __init__(self, trade_id: _Optional[str] = ..., outcome: _Optional[_Union[_common_pb2.TradeOutcome, str]] = ..., reason: _Optional[str] = ..., settled_at_ms: _Optional[int] = ...) -> None: ...

class LocalTradeOp(_message.Message):
    __slots__ = ("trade_id", "player_a", "player_b", "a_gives", "b_gives", "outcome", "reason", "settled_at_ms")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    PLAYER_A_FIELD_NUMBER: _ClassVar[int]
    PLAYER_B_FIELD_NUMBER: _ClassVar[int]
    A_GIVES_FIELD_NUMBER: _ClassVar[int]
    B_GIVES_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SETTLED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    player_a: str
    player_b: str
    a_gives: _common_pb2.Offer
    b_gives: _common_pb2.Offer
    outcome: _common_pb2.TradeOutcome
    reason: str
    settled_at_ms: int
    def __init__(self, trade_id: _Optional[str] = ..., player_a: _Optional[str] = ..., player_b: _Optional[str] = ..., a_gives: _Optional[_Union[_common_pb2.Offer, _Mapping]] = ..., b_gives: _Optional[_Union[_common_pb2.Offer, _Mapping]] = ..., outcome: _Optional[_Union[_common_pb2.TradeOutcome, str]] = ..., reason: _Optional[str] = ..., settled_at_ms: _Optional[int] = ...) -> None: ...

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

class TakeOp(_message.Message):
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

class GetEntriesRequest(_message.Message):
    __slots__ = ("shard_id", "epoch", "after", "node_id")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    epoch: int
    after: LogPosition
    node_id: str
    def __init__(self, shard_id: _Optional[str] = ..., epoch: _Optional[int] = ..., after: _Optional[_Union[LogPosition, _Mapping]] = ..., node_id: _Optional[str] = ...) -> None: ...

class GetEntriesResponse(_message.Message):
    __slots__ = ("shard_id", "entries", "last")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    entries: _containers.RepeatedCompositeFieldContainer[LogEntry]
    last: LogPosition
    def __init__(self, shard_id: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ..., last: _Optional[_Union[LogPosition, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("shard_id", "last", "players", "values", "requests", "tail", "trades")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    PLAYERS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    TRADES_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    last: LogPosition
    players: _containers.RepeatedCompositeFieldContainer[SnapshotPlayer]
    values: _containers.RepeatedCompositeFieldContainer[SnapshotValue]
    requests: _containers.RepeatedCompositeFieldContainer[SnapshotRequest]
    tail: _containers.RepeatedCompositeFieldContainer[LogEntry]
    trades: _containers.RepeatedCompositeFieldContainer[ParticipantTrade]
    def __init__(self, shard_id: _Optional[str] = ..., last: _Optional[_Union[LogPosition, _Mapping]] = ..., players: _Optional[_Iterable[_Union[SnapshotPlayer, _Mapping]]] = ..., values: _Optional[_Iterable[_Union[SnapshotValue, _Mapping]]] = ..., requests: _Optional[_Iterable[_Union[SnapshotRequest, _Mapping]]] = ..., tail: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ..., trades: _Optional[_Iterable[_Union[ParticipantTrade, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ("node_id", "shards", "incarnation", "ready", "not_ready_reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    NOT_READY_REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    shards: _containers.RepeatedCompositeFieldContainer[_common_pb2.ShardStatus]
    incarnation: int
    ready: bool
    not_ready_reason: str
    def __init__(self, node_id: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[_common_pb2.ShardStatus, _Mapping]]] = ..., incarnation: _Optional[int] = ..., ready: _Optional[bool] = ..., not_ready_reason: _Optional[str] = ...) -> None: ...

class NodeCalls(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[NodeCall]
    def __init__(self, calls: _Optional[_Iterable[_Union[NodeCall, _Mapping]]] = ...) -> None: ...

class NodeCall(_message.Message):
    __slots__ = ("call_id", "timeout_ms", "get_inventory", "grant_items", "get_player_data", "set_player_data", "execute_local_trade", "prepare", "commit", "abort", "take_items")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    GET_INVENTORY_FIELD_NUMBER: _ClassVar[int]
    GRANT_ITEMS_FIELD_NUMBER: _ClassVar[int]
    GET_PLAYER_DATA_FIELD_NUMBER: _ClassVar[int]
    SET_PLAYER_DATA_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_LOCAL_TRADE_FIELD_NUMBER: _ClassVar[int]
    PREPARE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    TAKE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    timeout_ms: int
    get_inventory: GetInventoryRequest
    grant_items: GrantItemsRequest
    get_player_data: GetPlayerDataRequest
    set_player_data: SetPlayerDataRequest
    execute_local_trade: ExecuteLocalTradeRequest
    prepare: PrepareRequest
    commit: CommitRequest
    abort: AbortRequest
    take_items: TakeItemsRequest
    def __init__(self, call_id: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., get_inventory: _Optional[_Union[GetInventoryRequest, _Mapping]] = ..., grant_items: _Optional[_Union[GrantItemsRequest, _Mapping]] = ..., get_player_data: _Optional[_Union[GetPlayerDataRequest, _Mapping]] = ..., set_player_data: _Optional[_Union[SetPlayerDataRequest, _Mapping]] = ..., execute_local_trade: _Optional[_Union[ExecuteLocalTradeRequest, _Mapping]] = ..., prepare: _Optional[_Union[PrepareRequest, _Mapping]] = ..., commit: _Optional[_Union[CommitRequest, _Mapping]] = ..., abort: _Optional[_Union[AbortRequest, _Mapping]] = ..., take_items: _Optional[_Union[TakeItemsRequest, _Mapping]] = ...) -> None: ...

class NodeResults(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[NodeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[NodeResult, _Mapping]]] = ...) -> None: ...

class NodeResult(_message.Message):
    __slots__ = ("call_id", "get_inventory", "grant_items", "get_player_data", "set_player_data", "execute_local_trade", "prepare", "commit", "abort", "take_items", "error")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    GET_INVENTORY_FIELD_NUMBER: _ClassVar[int]
    GRANT_ITEMS_FIELD_NUMBER: _ClassVar[int]
    GET_PLAYER_DATA_FIELD_NUMBER: _ClassVar[int]
    SET_PLAYER_DATA_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_LOCAL_TRADE_FIELD_NUMBER: _ClassVar[int]
    PREPARE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    TAKE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    get_inventory: GetInventoryResponse
    grant_items: GrantItemsResponse
    get_player_data: GetPlayerDataResponse
    set_player_data: SetPlayerDataResponse
    execute_local_trade: ExecuteLocalTradeResponse
    prepare: PrepareResponse
    commit: CommitResponse
    abort: AbortResponse
    take_items: TakeItemsResponse
    error: CallError
    def __init__(self, call_id: _Optional[int] = ..., get_inventory: _Optional[_Union[GetInventoryResponse, _Mapping]] = ..., grant_items: _Optional[_Union[GrantItemsResponse, _Mapping]] = ..., get_player_data: _Optional[_Union[GetPlayerDataResponse, _Mapping]] = ..., set_player_data: _Optional[_Union[SetPlayerDataResponse, _Mapping]] = ..., execute_local_trade: _Optional[_Union[ExecuteLocalTradeResponse, _Mapping]] = ..., prepare: _Optional[_Union[PrepareResponse, _Mapping]] = ..., commit: _Optional[_Union[CommitResponse, _Mapping]] = ..., abort: _Optional[_Union[AbortResponse, _Mapping]] = ..., take_items: _Optional[_Union[TakeItemsResponse, _Mapping]] = ..., error: _Optional[_Union[CallError, _Mapping]] = ...) -> None: ...

class CallError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
