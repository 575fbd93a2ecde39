from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_ACTIVE: _ClassVar[NodeState]
    NODE_STATE_DRAINING: _ClassVar[NodeState]

class ShardRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARD_ROLE_UNSPECIFIED: _ClassVar[ShardRole]
    SHARD_ROLE_PRIMARY: _ClassVar[ShardRole]
    SHARD_ROLE_REPLICA: _ClassVar[ShardRole]

class AssignmentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ASSIGNMENT_STATE_UNSPECIFIED: _ClassVar[AssignmentState]
    ASSIGNMENT_STATE_ACTIVE: _ClassVar[AssignmentState]
    ASSIGNMENT_STATE_PRIMARY_LOST: _ClassVar[AssignmentState]

class TradeOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRADE_OUTCOME_UNSPECIFIED: _ClassVar[TradeOutcome]
    TRADE_OUTCOME_COMMITTED: _ClassVar[TradeOutcome]
    TRADE_OUTCOME_ABORTED: _ClassVar[TradeOutcome]

class TradeAbortCause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRADE_ABORT_CAUSE_UNSPECIFIED: _ClassVar[TradeAbortCause]
    TRADE_ABORT_CAUSE_REFUSED: _ClassVar[TradeAbortCause]
    TRADE_ABORT_CAUSE_UNAVAILABLE: _ClassVar[TradeAbortCause]
    TRADE_ABORT_CAUSE_CONTENDED: _ClassVar[TradeAbortCause]

class ConsistencyModel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSISTENCY_MODEL_UNSPECIFIED: _ClassVar[ConsistencyModel]
    CONSISTENCY_MODEL_STRONG: _ClassVar[ConsistencyModel]
    CONSISTENCY_MODEL_EVENTUAL: _ClassVar[ConsistencyModel]
    CONSISTENCY_MODEL_CAUSAL: _ClassVar[ConsistencyModel]
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_ACTIVE: NodeState
NODE_STATE_DRAINING: NodeState
SHARD_ROLE_UNSPECIFIED: ShardRole
SHARD_ROLE_PRIMARY: ShardRole
SHARD_ROLE_REPLICA: ShardRole
ASSIGNMENT_STATE_UNSPECIFIED: AssignmentState
ASSIGNMENT_STATE_ACTIVE: AssignmentState
ASSIGNMENT_STATE_PRIMARY_LOST: AssignmentState
TRADE_OUTCOME_UNSPECIFIED: TradeOutcome
TRADE_OUTCOME_COMMITTED: TradeOutcome
TRADE_OUTCOME_ABORTED: TradeOutcome
TRADE_ABORT_CAUSE_UNSPECIFIED: TradeAbortCause
TRADE_ABORT_CAUSE_REFUSED: TradeAbortCause
TRADE_ABORT_CAUSE_UNAVAILABLE: TradeAbortCause
TRADE_ABORT_CAUSE_CONTENDED: TradeAbortCause
CONSISTENCY_MODEL_UNSPECIFIED: ConsistencyModel
CONSISTENCY_MODEL_STRONG: ConsistencyModel
CONSISTENCY_MODEL_EVENTUAL: ConsistencyModel
CONSISTENCY_MODEL_CAUSAL: ConsistencyModel

class Node(_message.Message):
    __slots__ = ("node_id", "address", "region", "zone", "capacity", "state", "lease_id", "registered_at_ms", "trouble", "trouble_since_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    TROUBLE_FIELD_NUMBER: _ClassVar[int]
    TROUBLE_SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    region: str
    zone: str
    capacity: int
    state: NodeState
    lease_id: int
    registered_at_ms: int
    trouble: str
    trouble_since_ms: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., region: _Optional[str] = ..., zone: _Optional[str] = ..., capacity: _Optional[int] = ..., state: _Optional[_Union[NodeState, str]] = ..., lease_id: _Optional[int] = ..., registered_at_ms: _Optional[int] = ..., trouble: _Optional[str] = ..., trouble_since_ms: _Optional[int] = ...) -> None: ...

class NodeRef(_message.Message):
    __slots__ = ("node_id", "address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class ShardStatus(_message.Message):
    __slots__ = ("shard_id", "epoch", "role", "applied_lsn", "last_epoch", "lag_entries", "lag_ms", "on_disk_only", "serving", "fenced_epoch", "copying", "replicas")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_LSN_FIELD_NUMBER: _ClassVar[int]
    LAST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAG_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LAG_MS_FIELD_NUMBER: _ClassVar[int]
    ON_DISK_ONLY_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    FENCED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    COPYING_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    epoch: int
    role: ShardRole
    applied_lsn: int
    last_epoch: int
    lag_entries: int
    lag_ms: int
    on_disk_only: bool
    serving: bool
    fenced_epoch: int
    copying: bool
    replicas: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shard_id: _Optional[str] = ..., epoch: _Optional[int] = ..., role: _Optional[_Union[ShardRole, str]] = ..., applied_lsn: _Optional[int] = ..., last_epoch: _Optional[int] = ..., lag_entries: _Optional[int] = ..., lag_ms: _Optional[int] = ..., on_disk_only: _Optional[bool] = ..., serving: _Optional[bool] = ..., fenced_epoch: _Optional[int] = ..., copying: _Optional[bool] = ..., replicas: _Optional[_Iterable[str]] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("shard_id", "epoch", "primary", "replicas", "state", "incarnations", "retained")
    class IncarnationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INCARNATIONS_FIELD_NUMBER: _ClassVar[int]
    RETAINED_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    epoch: int
    primary: str
    replicas: _containers.RepeatedScalarFieldContainer[str]
    state: AssignmentState
    incarnations: _containers.ScalarMap[str, int]
    retained: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shard_id: _Optional[str] = ..., epoch: _Optional[int] = ..., primary: _Optional[str] = ..., replicas: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[AssignmentState, str]] = ..., incarnations: _Optional[_Mapping[str, int]] = ..., retained: _Optional[_Iterable[str]] = ...) -> None: ...

class RingShard(_message.Message):
    __slots__ = ("shard_id", "tokens")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, shard_id: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class Ring(_message.Message):
    __slots__ = ("version", "hash", "shards")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    hash: str
    shards: _containers.RepeatedCompositeFieldContainer[RingShard]
    def __init__(self, version: _Optional[int] = ..., hash: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[RingShard, _Mapping]]] = ...) -> None: ...

class Offer(_message.Message):
    __slots__ = ("item_ids", "gold")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    GOLD_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    gold: int
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., gold: _Optional[int] = ...) -> None: ...

class ClusterConfig(_message.Message):
    __slots__ = ("replication_factor", "lease_ttl_s", "vnodes_per_shard", "shard_count", "consistency", "max_moves_per_round")
    class ConsistencyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ConsistencyModel
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ConsistencyModel, str]] = ...) -> None: ...
    REPLICATION_FACTOR_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    VNODES_PER_SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_MOVES_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    replication_factor: int
    lease_ttl_s: int
    vnodes_per_shard: int
    shard_count: int
    consistency: _containers.ScalarMap[str, ConsistencyModel]
    max_moves_per_round: int
    def __init__(self, replication_factor: _Optional[int] = ..., lease_ttl_s: _Optional[int] = ..., vnodes_per_shard: _Optional[int] = ..., shard_count: _Optional[int] = ..., consistency: _Optional[_Mapping[str, ConsistencyModel]] = ..., max_moves_per_round: _Optional[int] = ...) -> None: ...
