"""The etcd key schema: the only module that builds or parses BlueMarble keys.

Layout (DESIGN.md)::

    /bluemarble/<cluster>/config                  cluster config
    /bluemarble/<cluster>/ring                    ring: version, hash name, shards with tokens
    /bluemarble/<cluster>/nodes/<node_id>         node record, attached to the node's lease
    /bluemarble/<cluster>/assignments/<shard_id>  epoch, primary, replicas, state
    /bluemarble/<cluster>/leader                  control-plane election
    /bluemarble/<cluster>/trades/<trade_id>       2PC decision record
    /bluemarble/<cluster>/trades-unretained/<trade_id>  a copy of a record not yet retained

Ids are validated before they reach here (no '/' in node ids; shard ids are
``shard-<n>``), so a key parses back to exactly the id it was built from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bluemarble.core.errors import InvalidArgument
from bluemarble.core.ids import NodeId, ShardId, TradeId
from bluemarble.core.limits import echo

ROOT = "/bluemarble"
_CLUSTER_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def validate_cluster_name(name: str) -> str:
    """A cluster name is a DNS label: 1..63 of a-z, 0-9 and '-', not at either end."""
    if not _CLUSTER_RE.match(name):
        raise InvalidArgument(
            f"--cluster: cluster name {echo(name)} is not a DNS label (1..63 of a-z, 0-9, '-')"
        )
    return name


@dataclass(frozen=True)
class KeySchema:
    """Builders and parsers for one cluster's keys."""

    cluster: str

    def __post_init__(self) -> None:
        validate_cluster_name(self.cluster)

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.cluster}/"

    def config(self) -> str:
        return self.prefix + "config"

    def cluster_uid(self) -> str:
        return self.prefix + "cluster-uid"

    def ring(self) -> str:
        return self.prefix + "ring"

    def leader(self) -> str:
        return self.prefix + "leader"

    def nodes_prefix(self) -> str:
        return self.prefix + "nodes/"

    def node(self, node_id: NodeId) -> str:
        return self.nodes_prefix() + node_id

    def parse_node(self, key: str) -> NodeId:
        return NodeId(self._tail(key, self.nodes_prefix()))

    def assignments_prefix(self) -> str:
        return self.prefix + "assignments/"

    def assignment(self, shard: ShardId) -> str:
        return self.assignments_prefix() + shard

    def parse_assignment(self, key: str) -> ShardId:
        return ShardId(self._tail(key, self.assignments_prefix()))

    def force_promotions_prefix(self) -> str:
        return self.prefix + "force-promote/"

    def force_promotion(self, shard: ShardId) -> str:
        return self.force_promotions_prefix() + shard

    def parse_force_promotion(self, key: str) -> ShardId:
        return ShardId(self._tail(key, self.force_promotions_prefix()))

    def trades_prefix(self) -> str:
        return self.prefix + "trades/"

    def trade(self, trade_id: TradeId) -> str:
        return self.trades_prefix() + trade_id

    def parse_trade(self, key: str) -> TradeId:
        return TradeId(self._tail(key, self.trades_prefix()))

    def unretained_trades_prefix(self) -> str:
        # Beside trades/, not under it: a listing of the records never sees these.
        return self.prefix + "trades-unretained/"

    def unretained_trade(self, trade_id: TradeId) -> str:
        return self.unretained_trades_prefix() + trade_id

    @staticmethod
    def _tail(key: str, prefix: str) -> str:
        if not key.startswith(prefix) or len(key) == len(prefix):
            raise ValueError(f"key {echo(key)} is not below {prefix!r}")
        return key[len(prefix):]
