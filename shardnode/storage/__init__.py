"""Durable storage of a shard node: players, items, gold, player data, the replicated
log, request ids and escrows of every shard the node holds, in one SQLite database
(``<data_dir>/node.db``). See :mod:`shardnode.storage.node_storage` for the contract and
:mod:`shardnode.storage.schema` for the tables."""

from shardnode.storage.node_storage import NodeStorage
from shardnode.storage.records import ShardMeta, WriteResult

__all__ = ["NodeStorage", "ShardMeta", "WriteResult"]
