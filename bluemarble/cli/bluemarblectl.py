"""``bluemarblectl``: the operator's command line for a BlueMarble cluster.

    bluemarblectl --control-plane 127.0.0.1:7000 status | nodes | shards | ring | drain NODE
    bluemarblectl config get | config set KEY=VALUE...

Prints readable tables; ``--json`` prints the raw response as JSON instead. Exit status:
0 on success, 1 when the control plane answered with an error (printed on stderr),
2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from bluemarble.client.control_plane import ControlPlaneClient
from bluemarble.core.errors import BlueMarbleError
from bluemarble.runtime.channels import split_addresses
from bluemarble.runtime.settings import EnvArgumentParser
from bluemarble.v1 import common_pb2, controlplane_pb2


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with left-aligned columns sized to their content."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _state(value: int) -> str:
    return common_pb2.NodeState.Name(value).removeprefix("NODE_STATE_")


def _consistency(value: int) -> str:
    return common_pb2.ConsistencyModel.Name(value).removeprefix("CONSISTENCY_MODEL_")


def render_status(r: controlplane_pb2.GetClusterStatusResponse) -> str:
    c = r.config
    pairs = [
        ("cluster", r.cluster),
        ("served by", r.served_by),
        ("leader", r.leader or "(none elected)"),
        ("nodes", r.node_count),
        ("shards", r.shard_count),
        ("shards without primary", r.shards_without_primary),
        ("shards under-replicated", r.shards_under_replicated),
        ("eligible live nodes", r.live_nodes_eligible),
        ("etcd", f"revision {r.etcd_revision}" + ("" if r.etcd_healthy else " (UNREACHABLE: figures may be stale)")),
        ("replication factor", c.replication_factor),
        ("lease TTL", f"{c.lease_ttl_s} s"),
        ("vnodes per shard", c.vnodes_per_shard),
        ("max moves per round", c.max_moves_per_round),
        ("consistency", ", ".join(f"{k}={_consistency(v)}" for k, v in sorted(c.consistency.items()))),
    ]
    pairs += [("warning", w) for w in r.warnings]
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def render_nodes(r: controlplane_pb2.ListNodesResponse) -> str:
    rows = [
        (n.node_id, n.address, n.region or "-", n.zone or "-", n.capacity, _state(n.state), f"{n.lease_id:#x}")
        for n in r.nodes
    ]
    return table(("NODE", "ADDRESS", "REGION", "ZONE", "CAPACITY", "STATE", "LEASE"), rows) + (
        f"\n{len(rows)} node(s)"
    )


def render_shards(r: controlplane_pb2.ListAssignmentsResponse) -> str:
    rows = [
        (a.shard_id, a.epoch, a.primary or "(none)", ",".join(a.replicas) or "-")
        for a in r.assignments
    ]
    stale = f"\nSTALE: {r.stale_reason or 'this replica lost its etcd watch'}" if r.stale else ""
    return table(("SHARD", "EPOCH", "PRIMARY", "REPLICAS"), rows) + f"\nrevision {r.revision}" + stale


def render_ring(r: common_pb2.Ring) -> str:
    from bluemarble.api.conversions import ring_from_proto

    ring = ring_from_proto(r)
    shares = ring.ownership()
    rows = [(s, len(tokens), f"{shares[s] * 100:.2f}%") for s, tokens in ring.shards]
    return table(("SHARD", "TOKENS", "SHARE"), rows) + f"\nring version {r.version}, hash {r.hash}"


def _parse_config_assignments(pairs: Sequence[str], config: common_pb2.ClusterConfig) -> None:
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"bluemarblectl: expected KEY=VALUE, got {pair!r}")
        if key.startswith("consistency."):
            system = key.removeprefix("consistency.")
            name = "CONSISTENCY_MODEL_" + value.upper()
            if name not in common_pb2.ConsistencyModel.keys():
                raise SystemExit(f"bluemarblectl: {value!r} is not STRONG, EVENTUAL or CAUSAL")
            config.consistency[system] = common_pb2.ConsistencyModel.Value(name)  # type: ignore[assignment]
            continue
        field = config.DESCRIPTOR.fields_by_name.get(key)
        if field is None or key == "consistency":
            known = ", ".join(f.name for f in config.DESCRIPTOR.fields if f.name != "consistency")
            raise SystemExit(f"bluemarblectl: unknown config key {key!r}; known: {known}, consistency.SYSTEM")
        if not value.isdigit():
            raise SystemExit(f"bluemarblectl: {key} must be a non-negative integer, got {value!r}")
        setattr(config, key, int(value))


# Read-only subcommands: which RPC, its (empty) request, and how to print the answer.
READS: dict[str, tuple[Callable[[Any], Any], Callable[[], Message], Callable[[Any], str]]] = {
    "status": (lambda s: s.GetClusterStatus, controlplane_pb2.GetClusterStatusRequest, render_status),
    "nodes": (lambda s: s.ListNodes, controlplane_pb2.ListNodesRequest, render_nodes),
    "shards": (lambda s: s.ListAssignments, controlplane_pb2.ListAssignmentsRequest, render_shards),
    "ring": (lambda s: s.GetRing, controlplane_pb2.GetRingRequest, render_ring),
}


async def run(args: argparse.Namespace) -> int:
    client = ControlPlaneClient(split_addresses(args.control_plane), timeout_s=args.timeout_s, attempts=3)
    try:
        response: Message
        text: str
        if args.command in READS:
            pick, request_type, render = READS[args.command]
            response = await client.call(pick, request_type())
            text = render(response)
        elif args.command == "drain":
            response = await client.call(lambda s: s.DrainNode, controlplane_pb2.DrainNodeRequest(node_id=args.node))
            text = f"draining {args.node}"
        elif args.command == "config" and args.action == "get":
            response = await client.call(lambda s: s.GetConfig, controlplane_pb2.GetConfigRequest())
            text = json_format.MessageToJson(response, preserving_proto_field_name=True)
        else:
            current: controlplane_pb2.GetConfigResponse = await client.call(
                lambda s: s.GetConfig, controlplane_pb2.GetConfigRequest()
            )
            config = common_pb2.ClusterConfig()
            config.CopyFrom(current.config)
            _parse_config_assignments(args.pairs, config)
            response = await client.call(
                lambda s: s.SetConfig,
                controlplane_pb2.SetConfigRequest(config=config, expected_revision=current.revision),
            )
            text = json_format.MessageToJson(response, preserving_proto_field_name=True)
        if args.json:
            text = json_format.MessageToJson(response, preserving_proto_field_name=True)
        print(text)
        return 0
    except BlueMarbleError as e:
        print(f"bluemarblectl: {e.status}: {e}", file=sys.stderr)
        return 1
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = EnvArgumentParser(prog="bluemarblectl", description="Operate a BlueMarble cluster.")
    p.add_flag("--control-plane", default="127.0.0.1:7000", help="control-plane addresses, comma-separated")
    p.add_flag("--timeout-s", default=5.0, type=float, help="per-call deadline in seconds")
    p.add_argument("--json", action="store_true", help="print the raw response as JSON")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="cluster summary")
    sub.add_parser("nodes", help="registered nodes")
    sub.add_parser("shards", help="shard assignments")
    sub.add_parser("ring", help="each shard's share of the key space")
    drain = sub.add_parser("drain", help="move a node's roles away, then let it leave")
    drain.add_argument("node")
    config = sub.add_parser("config", help="get or set the cluster config")
    config_sub = config.add_subparsers(dest="action", required=True)
    config_sub.add_parser("get")
    config_set = config_sub.add_parser("set", help="e.g. config set lease_ttl_s=5 consistency.chat=EVENTUAL")
    config_set.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
