from bluemarble.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterNodeRequest(_message.Message):
    __slots__ = ("node_id", "address", "region", "zone", "capacity", "cluster_uid")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_UID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    region: str
    zone: str
    capacity: int
    cluster_uid: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., region: _Optional[str] = ..., zone: _Optional[str] = ..., capacity: _Optional[int] = ..., cluster_uid: _Optional[str] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("lease_id", "ttl_ms", "heartbeat_interval_ms", "cluster_uid")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_UID_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    ttl_ms: int
    heartbeat_interval_ms: int
    cluster_uid: str
    def __init__(self, lease_id: _Optional[int] = ..., ttl_ms: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ..., cluster_uid: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "lease_id", "shards", "leaving", "trouble", "trouble_since_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    TROUBLE_FIELD_NUMBER: _ClassVar[int]
    TROUBLE_SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    lease_id: int
    shards: _containers.RepeatedCompositeFieldContainer[_common_pb2.ShardStatus]
    leaving: bool
    trouble: str
    trouble_since_ms: int
    def __init__(self, node_id: _Optional[str] = ..., lease_id: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[_common_pb2.ShardStatus, _Mapping]]] = ..., leaving: _Optional[bool] = ..., trouble: _Optional[str] = ..., trouble_since_ms: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_deadline_ms", "ttl_ms", "draining", "config_revision")
    LEASE_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    CONFIG_REVISION_FIELD_NUMBER: _ClassVar[int]
    lease_deadline_ms: int
    ttl_ms: int
    draining: bool
    config_revision: int
    def __init__(self, lease_deadline_ms: _Optional[int] = ..., ttl_ms: _Optional[int] = ..., draining: _Optional[bool] = ..., config_revision: _Optional[int] = ...) -> None: ...

class DeregisterNodeRequest(_message.Message):
    __slots__ = ("node_id", "lease_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    lease_id: int
    def __init__(self, node_id: _Optional[str] = ..., lease_id: _Optional[int] = ...) -> None: ...

class DeregisterNodeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchAssignmentsRequest(_message.Message):
    __slots__ = ("node_id", "start_revision", "progress_interval_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    start_revision: int
    progress_interval_ms: int
    def __init__(self, node_id: _Optional[str] = ..., start_revision: _Optional[int] = ..., progress_interval_ms: _Optional[int] = ...) -> None: ...

class WatchAssignmentsResponse(_message.Message):
    __slots__ = ("revision", "snapshot", "assignments", "removed_shard_ids", "nodes")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_SHARD_IDS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    revision: int
    snapshot: bool
    assignments: _containers.RepeatedCompositeFieldContainer[_common_pb2.Assignment]
    removed_shard_ids: _containers.RepeatedScalarFieldContainer[str]
    nodes: _containers.RepeatedCompositeFieldContainer[_common_pb2.NodeRef]
    def __init__(self, revision: _Optional[int] = ..., snapshot: _Optional[bool] = ..., assignments: _Optional[_Iterable[_Union[_common_pb2.Assignment, _Mapping]]] = ..., removed_shard_ids: _Optional[_Iterable[str]] = ..., nodes: _Optional[_Iterable[_Union[_common_pb2.NodeRef, _Mapping]]] = ...) -> None: ...

class GetRingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchRingRequest(_message.Message):
    __slots__ = ("progress_interval_ms",)
    PROGRESS_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    progress_interval_ms: int
    def __init__(self, progress_interval_ms: _Optional[int] = ...) -> None: ...

class ResolvePlayerRequest(_message.Message):
    __slots__ = ("player_id",)
    PLAYER_ID_FIELD_NUMBER: _ClassVar[int]
    player_id: str
    def __init__(self, player_id: _Optional[str] = ...) -> None: ...

class ResolvePlayerResponse(_message.Message):
    __slots__ = ("shard_id", "epoch", "primary", "replicas", "ring_version")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    RING_VERSION_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    epoch: int
    primary: _common_pb2.NodeRef
    replicas: _containers.RepeatedCompositeFieldContainer[_common_pb2.NodeRef]
    ring_version: int
    def __init__(self, shard_id: _Optional[str] = ..., epoch: _Optional[int] = ..., primary: _Optional[_Union[_common_pb2.NodeRef, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[_common_pb2.NodeRef, _Mapping]]] = ..., ring_version: _Optional[int] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes", "revision", "stale", "stale_reason")
    NODES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    STALE_REASON_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[_common_pb2.Node]
    revision: int
    stale: bool
    stale_reason: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[_common_pb2.Node, _Mapping]]] = ..., revision: _Optional[int] = ..., stale: _Optional[bool] = ..., stale_reason: _Optional[str] = ...) -> None: ...

class ListAssignmentsRequest(_message.Message):
    __slots__ = ("include_status",)
    INCLUDE_STATUS_FIELD_NUMBER: _ClassVar[int]
    include_status: bool
    def __init__(self, include_status: _Optional[bool] = ...) -> None: ...

class MemberStatus(_message.Message):
    __slots__ = ("shard_id", "node_id", "status", "age_ms")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AGE_MS_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    node_id: str
    status: _common_pb2.ShardStatus
    age_ms: int
    def __init__(self, shard_id: _Optional[str] = ..., node_id: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.ShardStatus, _Mapping]] = ..., age_ms: _Optional[int] = ...) -> None: ...

class ListAssignmentsResponse(_message.Message):
    __slots__ = ("revision", "assignments", "stale", "stale_reason", "statuses", "nodes")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    STALE_REASON_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    revision: int
    assignments: _containers.RepeatedCompositeFieldContainer[_common_pb2.Assignment]
    stale: bool
    stale_reason: str
    statuses: _containers.RepeatedCompositeFieldContainer[MemberStatus]
    nodes: _containers.RepeatedCompositeFieldContainer[_common_pb2.NodeRef]
    def __init__(self, revision: _Optional[int] = ..., assignments: _Optional[_Iterable[_Union[_common_pb2.Assignment, _Mapping]]] = ..., stale: _Optional[bool] = ..., stale_reason: _Optional[str] = ..., statuses: _Optional[_Iterable[_Union[MemberStatus, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[_common_pb2.NodeRef, _Mapping]]] = ...) -> None: ...

class GetClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetClusterStatusResponse(_message.Message):
    __slots__ = ("cluster", "served_by", "leader", "node_count", "shard_count", "etcd_revision", "etcd_healthy", "ring_version", "config", "shards_without_primary", "live_nodes_eligible", "effective_replication_factor", "shards_under_replicated", "warnings")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    NODE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    ETCD_REVISION_FIELD_NUMBER: _ClassVar[int]
    ETCD_HEALTHY_FIELD_NUMBER: _ClassVar[int]
    RING_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    SHARDS_WITHOUT_PRIMARY_FIELD_NUMBER: _ClassVar[int]
    LIVE_NODES_ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_REPLICATION_FACTOR_FIELD_NUMBER: _ClassVar[int]
    SHARDS_UNDER_REPLICATED_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    served_by: str
    leader: str
    node_count: int
    shard_count: int
    etcd_revision: int
    etcd_healthy: bool
    ring_version: int
    config: _common_pb2.ClusterConfig
    shards_without_primary: int
    live_nodes_eligible: int
    effective_replication_factor: int
    shards_under_replicated: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cluster: _Optional[str] = ..., served_by: _Optional[str] = ..., leader: _Optional[str] = ..., node_count: _Optional[int] = ..., shard_count: _Optional[int] = ..., etcd_revision: _Optional[int] = ..., etcd_healthy: _Optional[bool] = ..., ring_version: _Optional[int] = ..., config: _Optional[_Union[_common_pb2.ClusterConfig, _Mapping]] = ..., shards_without_primary: _Optional[int] = ..., live_nodes_eligible: _Optional[int] = ..., effective_replication_factor: _Optional[int] = ..., shards_under_replicated: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class DrainNodeRequest(_message.Message):
    __slots__ = ("node_id", "force")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    force: bool
    def __init__(self, node_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DrainNodeResponse(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: _common_pb2.Node
    def __init__(self, node: _Optional[_Union[_common_pb2.Node, _Mapping]] = ...) -> None: ...

class UndrainNodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class UndrainNodeResponse(_message.Message):
    __slots__ = ("node", "was_draining")
    NODE_FIELD_NUMBER: _ClassVar[int]
    WAS_DRAINING_FIELD_NUMBER: _ClassVar[int]
    node: _common_pb2.Node
    was_draining: bool
    def __init__(self, node: _Optional[_Union[_common_pb2.Node, _Mapping]] = ..., was_draining: _Optional[bool] = ...) -> None: ...

class ForcePromoteRequest(_message.Message):
    __slots__ = ("shard_id", "node_id", "accept_data_loss")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_DATA_LOSS_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    node_id: str
    accept_data_loss: bool
    def __init__(self, shard_id: _Optional[str] = ..., node_id: _Optional[str] = ..., accept_data_loss: _Optional[bool] = ...) -> None: ...

class ForcePromoteResponse(_message.Message):
    __slots__ = ("assignment", "lost_members", "already_primary")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    LOST_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRIMARY_FIELD_NUMBER: _ClassVar[int]
    assignment: _common_pb2.Assignment
    lost_members: _containers.RepeatedScalarFieldContainer[str]
    already_primary: bool
    def __init__(self, assignment: _Optional[_Union[_common_pb2.Assignment, _Mapping]] = ..., lost_members: _Optional[_Iterable[str]] = ..., already_primary: _Optional[bool] = ...) -> None: ...

class GetConfigRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetConfigResponse(_message.Message):
    __slots__ = ("config", "revision")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    config: _common_pb2.ClusterConfig
    revision: int
    def __init__(self, config: _Optional[_Union[_common_pb2.ClusterConfig, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class SetConfigRequest(_message.Message):
    __slots__ = ("config", "expected_revision")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    config: _common_pb2.ClusterConfig
    expected_revision: int
    def __init__(self, config: _Optional[_Union[_common_pb2.ClusterConfig, _Mapping]] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class SetConfigResponse(_message.Message):
    __slots__ = ("config", "revision", "warnings")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    config: _common_pb2.ClusterConfig
    revision: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, config: _Optional[_Union[_common_pb2.ClusterConfig, _Mapping]] = ..., revision: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...
