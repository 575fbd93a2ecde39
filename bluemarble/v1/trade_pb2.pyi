from bluemarble.v1 import common_pb2 as _common_pb2
from bluemarble.v1 import shardnode_pb2 as _shardnode_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TradeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRADE_STATE_UNSPECIFIED: _ClassVar[TradeState]
    TRADE_STATE_PREPARING: _ClassVar[TradeState]
    TRADE_STATE_COMMITTED: _ClassVar[TradeState]
    TRADE_STATE_ABORTED: _ClassVar[TradeState]
    TRADE_STATE_DONE: _ClassVar[TradeState]
TRADE_STATE_UNSPECIFIED: TradeState
TRADE_STATE_PREPARING: TradeState
TRADE_STATE_COMMITTED: TradeState
TRADE_STATE_ABORTED: TradeState
TRADE_STATE_DONE: TradeState

class ExecuteTradeRequest(_message.Message):
    __slots__ = ("trade_id", "player_a", "player_b", "a_gives", "b_gives")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    PLAYER_A_FIELD_NUMBER: _ClassVar[int]
    PLAYER_B_FIELD_NUMBER: _ClassVar[int]
    A_GIVES_FIELD_NUMBER: _ClassVar[int]
    B_GIVES_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    player_a: str
    player_b: str
    a_gives: _common_pb2.Offer
    b_gives: _common_pb2.Offer
    def __init__(self, trade_id: _Optional[str] = ..., player_a: _Optional[str] = ..., player_b: _Optional[str] = ..., a_gives: _Optional[_Union[_common_pb2.Offer, _Mapping]] = ..., b_gives: _Optional[_Union[_common_pb2.Offer, _Mapping]] = ...) -> None: ...

class ExecuteTradeResponse(_message.Message):
    __slots__ = ("trade_id", "outcome", "reason", "cross_shard", "abort_cause")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CROSS_SHARD_FIELD_NUMBER: _ClassVar[int]
    ABORT_CAUSE_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    outcome: _common_pb2.TradeOutcome
    reason: str
    cross_shard: bool
    abort_cause: _common_pb2.TradeAbortCause
    def __init__(self, trade_id: _Optional[str] = ..., outcome: _Optional[_Union[_common_pb2.TradeOutcome, str]] = ..., reason: _Optional[str] = ..., cross_shard: _Optional[bool] = ..., abort_cause: _Optional[_Union[_common_pb2.TradeAbortCause, str]] = ...) -> None: ...

class TradeCalls(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[TradeCall]
    def __init__(self, calls: _Optional[_Iterable[_Union[TradeCall, _Mapping]]] = ...) -> None: ...

class TradeCall(_message.Message):
    __slots__ = ("call_id", "timeout_ms", "execute_trade")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_TRADE_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    timeout_ms: int
    execute_trade: ExecuteTradeRequest
    def __init__(self, call_id: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., execute_trade: _Optional[_Union[ExecuteTradeRequest, _Mapping]] = ...) -> None: ...

class TradeResults(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TradeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[TradeResult, _Mapping]]] = ...) -> None: ...

class TradeResult(_message.Message):
    __slots__ = ("call_id", "execute_trade", "error")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_TRADE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    execute_trade: ExecuteTradeResponse
    error: _shardnode_pb2.CallError
    def __init__(self, call_id: _Optional[int] = ..., execute_trade: _Optional[_Union[ExecuteTradeResponse, _Mapping]] = ..., error: _Optional[_Union[_shardnode_pb2.CallError, _Mapping]] = ...) -> None: ...

class GetTradeRequest(_message.Message):
    __slots__ = ("trade_id", "player_id")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    player_id: str
    def __init__(self, trade_id: _Optional[str] = ..., player_id: _Optional[str] = ...) -> None: ...

class GetTradeResponse(_message.Message):
    __slots__ = ("trade_id", "state", "outcome", "reason", "request", "decided_by", "decided_at_ms", "cross_shard", "retained", "sides", "unreachable_nodes", "abort_cause", "unled_shards")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    CROSS_SHARD_FIELD_NUMBER: _ClassVar[int]
    RETAINED_FIELD_NUMBER: _ClassVar[int]
    SIDES_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_NODES_FIELD_NUMBER: _ClassVar[int]
    ABORT_CAUSE_FIELD_NUMBER: _ClassVar[int]
    UNLED_SHARDS_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    state: TradeState
    outcome: _common_pb2.TradeOutcome
    reason: str
    request: ExecuteTradeRequest
    decided_by: str
    decided_at_ms: int
    cross_shard: bool
    retained: bool
    sides: _containers.RepeatedCompositeFieldContainer[_shardnode_pb2.ParticipantTrade]
    unreachable_nodes: _containers.RepeatedScalarFieldContainer[str]
    abort_cause: _common_pb2.TradeAbortCause
    unled_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, trade_id: _Optional[str] = ..., state: _Optional[_Union[TradeState, str]] = ..., outcome: _Optional[_Union[_common_pb2.TradeOutcome, str]] = ..., reason: _Optional[str] = ..., request: _Optional[_Union[ExecuteTradeRequest, _Mapping]] = ..., decided_by: _Optional[str] = ..., decided_at_ms: _Optional[int] = ..., cross_shard: _Optional[bool] = ..., retained: _Optional[bool] = ..., sides: _Optional[_Iterable[_Union[_shardnode_pb2.ParticipantTrade, _Mapping]]] = ..., unreachable_nodes: _Optional[_Iterable[str]] = ..., abort_cause: _Optional[_Union[_common_pb2.TradeAbortCause, str]] = ..., unled_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class TradeRecord(_message.Message):
    __slots__ = ("trade_id", "outcome", "reason", "decided_by", "decided_at_ms", "request", "shard_a", "shard_b", "abort_cause")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    SHARD_A_FIELD_NUMBER: _ClassVar[int]
    SHARD_B_FIELD_NUMBER: _ClassVar[int]
    ABORT_CAUSE_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    outcome: _common_pb2.TradeOutcome
    reason: str
    decided_by: str
    decided_at_ms: int
    request: ExecuteTradeRequest
    shard_a: str
    shard_b: str
    abort_cause: _common_pb2.TradeAbortCause
    def __init__(self, trade_id: _Optional[str] = ..., outcome: _Optional[_Union[_common_pb2.TradeOutcome, str]] = ..., reason: _Optional[str] = ..., decided_by: _Optional[str] = ..., decided_at_ms: _Optional[int] = ..., request: _Optional[_Union[ExecuteTradeRequest, _Mapping]] = ..., shard_a: _Optional[str] = ..., shard_b: _Optional[str] = ..., abort_cause: _Optional[_Union[_common_pb2.TradeAbortCause, str]] = ...) -> None: ...

class ResolveTradeRequest(_message.Message):
    __slots__ = ("trade_id", "shard_id", "node_id", "reason", "leg", "if_decided", "wait_for_counterpart")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LEG_FIELD_NUMBER: _ClassVar[int]
    IF_DECIDED_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_COUNTERPART_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    shard_id: str
    node_id: str
    reason: str
    leg: _shardnode_pb2.TradeLeg
    if_decided: bool
    wait_for_counterpart: bool
    def __init__(self, trade_id: _Optional[str] = ..., shard_id: _Optional[str] = ..., node_id: _Optional[str] = ..., reason: _Optional[str] = ..., leg: _Optional[_Union[_shardnode_pb2.TradeLeg, _Mapping]] = ..., if_decided: _Optional[bool] = ..., wait_for_counterpart: _Optional[bool] = ...) -> None: ...

class ResolveTradeResponse(_message.Message):
    __slots__ = ("trade_id", "outcome", "reason", "created")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    outcome: _common_pb2.TradeOutcome
    reason: str
    created: bool
    def __init__(self, trade_id: _Optional[str] = ..., outcome: _Optional[_Union[_common_pb2.TradeOutcome, str]] = ..., reason: _Optional[str] = ..., created: _Optional[bool] = ...) -> None: ...

class ListInDoubtTradesRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListInDoubtTradesResponse(_message.Message):
    __slots__ = ("trades", "unreachable_nodes", "unled_shards")
    TRADES_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_NODES_FIELD_NUMBER: _ClassVar[int]
    UNLED_SHARDS_FIELD_NUMBER: _ClassVar[int]
    trades: _containers.RepeatedCompositeFieldContainer[_shardnode_pb2.ParticipantTrade]
    unreachable_nodes: _containers.RepeatedScalarFieldContainer[str]
    unled_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, trades: _Optional[_Iterable[_Union[_shardnode_pb2.ParticipantTrade, _Mapping]]] = ..., unreachable_nodes: _Optional[_Iterable[str]] = ..., unled_shards: _Optional[_Iterable[str]] = ...) -> None: ...
