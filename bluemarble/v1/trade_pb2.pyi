from bluemarble.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
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
    __slots__ = ("trade_id", "outcome", "reason")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    outcome: _common_pb2.TradeOutcome
    reason: str
    def __init__(self, trade_id: _Optional[str] = ..., outcome: _Optional[_Union[_common_pb2.TradeOutcome, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class GetTradeRequest(_message.Message):
    __slots__ = ("trade_id",)
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    def __init__(self, trade_id: _Optional[str] = ...) -> None: ...

class GetTradeResponse(_message.Message):
    __slots__ = ("trade_id", "state", "outcome", "reason", "request")
    TRADE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    trade_id: str
    state: TradeState
    outcome: _common_pb2.TradeOutcome
    reason: str
    request: ExecuteTradeRequest
    def __init__(self, trade_id: _Optional[str] = ..., state: _Optional[_Union[TradeState, str]] = ..., outcome: _Optional[_Union[_common_pb2.TradeOutcome, str]] = ..., reason: _Optional[str] = ..., request: _Optional[_Union[ExecuteTradeRequest, _Mapping]] = ...) -> None: ...
