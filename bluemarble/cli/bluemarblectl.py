"""``bluemarblectl``: the operator's command line for a BlueMarble cluster.

    bluemarblectl [-v] --control-plane 127.0.0.1:7000 status | nodes | shards | ring | drain NODE | undrain NODE
    bluemarblectl promote SHARD NODE --accept-data-loss
    bluemarblectl config get | config set KEY=VALUE...
    bluemarblectl inventory PLAYER [--stale]
    bluemarblectl grant PLAYER [ITEM ...] [--gold N] [--request-id ID]
    bluemarblectl data get PLAYER SYSTEM KEY [--stale]
    bluemarblectl data set PLAYER SYSTEM KEY VALUE [--request-id ID]
    bluemarblectl trade execute TRADE_ID PLAYER_A PLAYER_B [--a-items I ...] [--a-gold N]
                                                           [--b-items I ...] [--b-gold N]
    bluemarblectl trade show TRADE_ID [--player P]
    bluemarblectl trade in-doubt [--limit N]

The data commands (inventory, grant, data) go through the routing client
(:mod:`bluemarble.client.routing`), as a game server would: straight to the player's
primary, following redirects and failovers within ``--timeout-s``.

The trade commands call the control plane's TradeCoordinator (any replica; a retried
``trade execute`` with the same trade id is safe: same trade id, same answer).

Security: ``--tls-ca`` verifies the control plane and nodes, ``--tls-cert``/``--tls-key``
present a client certificate (required when the cluster runs mutual TLS), and
``--token-file`` (or ``--token``, or env BLUEMARBLE_ADMIN_TOKEN) sends the admin bearer
token the control plane asks of admin commands (``drain``, ``undrain``, ``promote``, ``config set``).

Prints readable tables; ``--json`` prints the raw response as JSON instead (every integer a
JSON number). The client library's log lines are shown only with ``-v``. Exit status:
0 on success, 1 on an error (one line on stderr: the cluster's answer, or input refused
before anything was sent), 2 on bad usage, 3 when ``trade execute`` answered ABORTED (the trade was refused: a definite
answer, not an error, but a script must be able to tell it from COMMITTED), 4 when the
cluster did not answer (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED: the
outcome of a write or trade is then unknown; retry it, a trade with the same id).
``--json`` prints every field, empty lists and zeros included, so a script finds the
same keys in every answer.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from bluemarble.api import cluster_config
from bluemarble.client.control_plane import MIN_ATTEMPT_S, ControlPlaneClient
from bluemarble.client.routing import DataWriteResult, GrantResult, Inventory, PlayerData, RoutingClient
from bluemarble.core import limits, validation
from bluemarble.core.errors import BlueMarbleError, FailedPrecondition, NotFound
from bluemarble.runtime import logs, tls
from bluemarble.runtime.auth import ADMIN_TOKEN_ENV, MAX_TOKEN_BYTES, bearer_metadata, check_token, read_token_file
from bluemarble.runtime.channels import checked_addresses, split_addresses
from bluemarble.runtime.settings import EnvArgumentParser
from bluemarble.v1 import common_pb2, controlplane_pb2, shardnode_pb2, trade_pb2


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
        ("leader", r.leader or ("(none elected)" if r.etcd_healthy else "unknown (etcd unreachable)")),
        ("nodes", r.node_count),
        ("shards", r.shard_count),
        ("shards without primary", r.shards_without_primary),
        ("shards under-replicated", r.shards_under_replicated),
        ("eligible live nodes", r.live_nodes_eligible),
        ("etcd", f"revision {r.etcd_revision}" + ("" if r.etcd_healthy else " (UNREACHABLE: figures may be stale)")),
    ]
    if c.replication_factor:
        pairs += [
            ("replication factor", c.replication_factor),
            ("lease TTL", f"{c.lease_ttl_s} s"),
            ("vnodes per shard", c.vnodes_per_shard),
            ("max moves per round", c.max_moves_per_round),
            ("consistency", ", ".join(f"{k}={_consistency(v)}" for k, v in sorted(c.consistency.items()))),
        ]
    else:  # the replica answered without the config: unknown, not 0 (nor what depends on it)
        pairs.append(("config", "unknown (etcd unreachable)" if not r.etcd_healthy else "unknown (not read yet)"))
        pairs = [(k, "unknown" if k == "shards under-replicated" else v) for k, v in pairs]
    pairs += [("warning", w) for w in r.warnings]
    if r.shards_without_primary:
        pairs.append((
            "hint",
            "a shard without a primary is failing over, or waits for a lost node (none of its copies is live, or "
            "the ones that may hold its latest writes are lost; `shards` marks them ?): bring a lost node back with "
            "its data dir (nothing is lost), or, if none will return, `promote SHARD NODE --accept-data-loss`",
        ))
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def render_config(config: common_pb2.ClusterConfig, revision: int) -> str:
    """The cluster config as the KEY=VALUE pairs ``config set`` takes, one a line (so a
    line can be copied into a ``config set``), after the revision it was read at."""
    lines = [f"# revision {revision}"]
    lines += [f"{f.name}={getattr(config, f.name)}" for f in config.DESCRIPTOR.fields if f.name != "consistency"]
    lines += [f"consistency.{k}={_consistency(v)}" for k, v in sorted(config.consistency.items())]
    return "\n".join(lines)


def render_nodes(r: controlplane_pb2.ListNodesResponse) -> str:
    rows = [
        (n.node_id, n.address, n.region or "-", n.zone or "-", n.capacity,
         _state(n.state) + (" (TROUBLE)" if n.trouble else ""), f"{n.lease_id:#x}")
        for n in r.nodes
    ]
    now_ms = _now_ms()
    troubles = "".join(
        f"\n{n.node_id}: {n.trouble} (for {max(0, now_ms - n.trouble_since_ms) / 1000:.0f} s)"
        for n in r.nodes if n.trouble
    )
    return table(("NODE", "ADDRESS", "REGION", "ZONE", "CAPACITY", "STATE", "LEASE"), rows) + (
        f"\n{len(rows)} node(s)"
    ) + troubles + (f"\nSTALE: {r.stale_reason or 'this replica could not read etcd'}" if r.stale else "")


def _member(
    node: str, status: controlplane_pb2.MemberStatus | None, *, primary: bool = False, replicas: int = 1,
    primary_status: controlplane_pb2.MemberStatus | None = None, replica_copying: bool = False,
) -> str:
    """A shard member with its log position (last epoch, applied lsn) and lag (entries /
    milliseconds), or ``?`` when nobody knows its status. A primary reports the lag of
    its farthest replica (what it still has to ship), a replica its own, at least what
    the primary's position says it lacks (``primary_status``: a replica that has not
    heard from its primary yet does not know); a replica still copying the shard says so
    (the age of what it misses would be the shard's age), and so does its primary
    (``replica_copying``). A primary without replicas says so."""
    if status is None:
        return f"{node} ?"
    s = status.status
    position = f"{node} ({s.last_epoch},{s.applied_lsn})"
    if primary and not replicas:
        return f"{position} no replica"
    if primary:
        return f"{position} farthest replica " + ("copying" if replica_copying else f"{s.lag_entries}/{s.lag_ms}ms")
    entries = s.lag_entries
    if primary_status is not None:
        entries = max(entries, primary_status.status.applied_lsn - s.applied_lsn)
    if s.copying:
        return f"{position} copying, {entries} entries to go"
    return f"{position} lag {entries}/{s.lag_ms}ms"


def render_shards(r: controlplane_pb2.ListAssignmentsResponse) -> str:
    statuses = {(m.shard_id, m.node_id): m for m in r.statuses}
    rows = []
    for a in r.assignments:
        lead = statuses.get((a.shard_id, a.primary))
        copying = any(
            (m := statuses.get((a.shard_id, n))) is not None and m.status.copying for n in a.replicas
        )
        rows.append((
            a.shard_id,
            a.epoch,
            _member(a.primary, lead, primary=True, replicas=len(a.replicas), replica_copying=copying)
            if a.primary else "(none)",
            ", ".join(
                [_member(n, statuses.get((a.shard_id, n)), primary_status=lead) for n in a.replicas]
                + [f"{n} (retained)" for n in a.retained]
            ) or "-",
        ))
    stale = f"\nSTALE: {r.stale_reason or 'this replica lost its etcd watch'}" if r.stale else ""
    return (
        table(("SHARD", "EPOCH", "PRIMARY", "REPLICAS"), rows)
        + "\nmembers: NODE (last epoch,applied lsn) lag ENTRIES/MS behind the primary (on the primary: of its"
        + " farthest replica); copying = a replica still copying the shard; ? = no status reported;"
        + " retained = a former member that may hold acknowledged writes the replicas lack: down, back"
        + " without its data, or just moved away while its primary still counts it (a promotion waits for it)"
        + f"\nrevision {r.revision}"
        + stale
    )


def _pairs(pairs: Sequence[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def _staleness(stale: bool, lag_entries: int, lag_ms: int) -> list[tuple[str, object]]:
    if not stale:
        return []
    return [("stale", f"yes: from a replica, {lag_entries} entries / {lag_ms} ms behind its primary")]


def _inventory_pairs(inv: Inventory) -> list[tuple[str, object]]:
    return [
        ("player", inv.player_id),
        ("shard", f"{inv.shard_id} (epoch {inv.epoch})"),
        ("served by", inv.served_by),
        ("gold", inv.gold),
        ("items", ", ".join(inv.item_ids) if inv.item_ids else "(none)"),
        ("escrowed", _escrowed(inv)),
        *_staleness(inv.stale, inv.lag_entries, inv.lag_ms),
    ]


def _escrowed(inv: Inventory) -> str:
    """What trades not yet settled hold of the player's, or "(none)"."""
    parts = [*inv.escrowed_item_ids, *([f"{inv.escrowed_gold} gold"] if inv.escrowed_gold else [])]
    return f"{', '.join(parts)} (held by trades not yet settled)" if parts else "(none)"


def render_inventory(inv: Inventory) -> str:
    return _pairs(_inventory_pairs(inv))


def render_grant(result: GrantResult, what: str = "grant") -> str:
    outcome = (
        "replayed: an earlier attempt with this request id was applied; nothing applied now"
        if result.replayed
        else "applied"
    )
    return _pairs([
        *_inventory_pairs(result.inventory),
        ("request id", result.request_id),
        ("lsn", result.lsn),
        (what, outcome),
    ])


def _shown(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + value.hex()


def _on_terminal(text: str) -> str:
    """A stored value as a table shows it: as it is when every character prints, else
    quoted with the others escaped (``'\x1b[31m...\n...'``). Values are opaque, often
    chosen by players: raw, an escape sequence would reach the operator's terminal and a
    newline would forge a row of the table. ``--json`` escapes them its own way."""
    return text if text.isprintable() else repr(text)


def render_player_data(d: PlayerData) -> str:
    return _pairs([
        ("player", d.player_id),
        ("system", d.system),
        ("key", d.key),
        ("shard", f"{d.shard_id} (epoch {d.epoch})"),
        ("served by", d.served_by),
        ("value", "(not set)" if d.value is None else _on_terminal(_shown(d.value))),
        *([("lsn", d.lsn)] if d.value is not None else []),
        *_staleness(d.stale, d.lag_entries, d.lag_ms),
    ])


def render_data_write(w: DataWriteResult) -> str:
    return _pairs([
        ("shard", f"{w.shard_id} (epoch {w.epoch})"),
        ("consistency", _consistency(w.consistency)),
        ("request id", w.request_id),
        ("lsn", w.lsn),
        ("write", "replayed: an earlier attempt with this request id was applied" if w.replayed else "applied"),
    ])


def _as_json(value: Inventory | GrantResult | PlayerData | DataWriteResult) -> str:
    def plain(v: object) -> object:
        return _shown(v) if isinstance(v, bytes) else v

    fields = dataclasses.asdict(value, dict_factory=lambda items: {k: plain(v) for k, v in items})
    return json.dumps(fields, indent=2)


_INT64 = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)


def message_json(message: Message) -> str:
    """``message`` as JSON with its proto field names, every integer a JSON number but the
    64-bit identifiers (:data:`_ID_FIELDS`: lease ids, incarnations), strings.

    Why not protobuf's own form: it writes 64-bit integers (gold, lsns, revisions) as
    strings, while ``inventory --json`` prints them as numbers; a script reading both must
    see one type. Gold stays below 2^53, so any JSON reader holds it; counters (epochs,
    lsns, revisions) do in practice. Lease ids and incarnations are random 63-bit values:
    as numbers, jq and JavaScript round them (three nodes' leases printed as one)."""
    shown = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return json.dumps(_int64_as_numbers(cast(Descriptor, message.DESCRIPTOR), shown), indent=2)


_ID_FIELDS = frozenset({"lease_id", "incarnation", "incarnations"})
"""64-bit fields that identify rather than count: left as protobuf's JSON writes them,
strings (a map's values too)."""


def _int64_as_numbers(descriptor: Descriptor, shown: dict[str, Any]) -> dict[str, Any]:
    for name, value in shown.items():
        field = descriptor.fields_by_name.get(name)
        if field is not None and name not in _ID_FIELDS:
            shown[name] = _field_as_numbers(field, value)
        elif field is not None and isinstance(value, dict):
            shown[name] = dict(sorted(value.items()))  # a map's order is arbitrary
    return shown


def _field_as_numbers(field: FieldDescriptor, value: Any) -> Any:
    if isinstance(value, list):  # a repeated field
        return [_field_as_numbers(field, v) for v in value]
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        # Sorted: a map's order is arbitrary, and the same config must print the same way.
        return {k: _field_as_numbers(entry.fields_by_name["value"], v) for k, v in sorted(value.items())}
    if entry is not None:
        return _int64_as_numbers(entry, value)
    return int(value) if field.cpp_type in _INT64 else value


def render_ring(r: common_pb2.Ring) -> str:
    from bluemarble.api.conversions import ring_from_proto

    ring = ring_from_proto(r)
    shares = ring.ownership()
    rows = [(s, len(tokens), f"{shares[s] * 100:.2f}%") for s, tokens in ring.shards]
    return table(("SHARD", "TOKENS", "SHARE"), rows) + f"\nring version {r.version}, hash {r.hash}"


def _parse_config_assignments(pairs: Sequence[str], config: common_pb2.ClusterConfig, *, dry: bool = False) -> None:
    """Applies ``config set``'s KEY=VALUE ``pairs`` to ``config`` (the stored one); bad
    usage (exit 2) for a malformed pair, an unknown key or a value out of range.
    ``consistency.SYSTEM=`` (no value) removes SYSTEM from the table. ``dry``: only the
    pairs are checked (``config`` is not the stored one), before the cluster is asked."""
    seen: set[str] = set()
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            usage_error(f"bluemarblectl: expected KEY=VALUE, got {limits.echo(pair)}")
        if key in seen:  # which one was meant? Not a guess to make for a cluster's config
            usage_error(f"bluemarblectl: {limits.echo(key)} is given twice; give each key once")
        seen.add(key)
        if key.startswith("consistency."):
            system = key.removeprefix("consistency.")
            if problem := cluster_config.system_name_problem(system):
                usage_error(f"bluemarblectl: {problem}")
            if not value:
                if system not in config.consistency and not dry:
                    usage_error(f"bluemarblectl: the consistency table has no {system!r}; nothing to remove")
                config.consistency.pop(system, None)
                continue
            name = "CONSISTENCY_MODEL_" + value.upper()
            if name not in common_pb2.ConsistencyModel.keys() or name == "CONSISTENCY_MODEL_UNSPECIFIED":
                usage_error(f"bluemarblectl: {limits.echo(value)} is not STRONG, EVENTUAL or CAUSAL")
            config.consistency[system] = common_pb2.ConsistencyModel.Value(name)  # type: ignore[assignment]
            continue
        field = config.DESCRIPTOR.fields_by_name.get(key)
        if field is None or key == "consistency":
            known = ", ".join(f.name for f in config.DESCRIPTOR.fields if f.name != "consistency")
            usage_error(f"bluemarblectl: unknown config key {limits.echo(key)}; known: {known}, consistency.SYSTEM")
        if not validation.ascii_digits(value):
            usage_error(f"bluemarblectl: {key} must be a non-negative integer, got {limits.echo(value)}")
        low, high = limits.CONFIG_RANGES.get(key, (0, _MAX_CONFIG_INT))
        if len(value) > len(str(high)) or not low <= int(value) <= high:
            # Checked here too: a value past the field's type would not even fit the request.
            usage_error(f"bluemarblectl: {key} must be between {low} and {high}, got {limits.echo(value)}")
        setattr(config, key, int(value))


_MAX_CONFIG_INT = 2**31 - 1
"""Largest value of a numeric config field without a range of its own (they are 32-bit)."""

MAX_TIMEOUT_S = 3600.0
MIN_TIMEOUT_S = MIN_ATTEMPT_S
"""The shortest --timeout-s: one attempt's floor in the client library."""
"""Longest ``--timeout-s`` accepted: a call that needs longer is not waiting for an answer."""

VERBOSITY = ("error", "info", "debug")
"""The library's log level by the number of ``-v`` flags."""

CLI_MAX_ATTEMPTS = 1000
"""Attempts of one command's call: in effect, as many as fit in ``--timeout-s``."""

EXIT_ABORTED = 3
"""Exit status of a ``trade execute`` answered ABORTED."""
EXIT_NO_ANSWER = 4
"""Exit status when the cluster did not answer, or answered only in part (retry)."""
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (SIGINT), as a shell reports a command it interrupted."""


def usage_error(message: str) -> NoReturn:
    """Bad usage found after argparse: the message on stderr, exit status 2 (as argparse)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def _outcome(value: int) -> str:
    return common_pb2.TradeOutcome.Name(value).removeprefix("TRADE_OUTCOME_")


def _offer(offer: common_pb2.Offer) -> str:
    parts = [", ".join(offer.item_ids)] if offer.item_ids else []
    if offer.gold:
        parts.append(f"{offer.gold} gold")
    return " + ".join(parts) or "nothing"


_CAUSES = {
    common_pb2.TRADE_ABORT_CAUSE_REFUSED: "refused: the terms (the same terms fail again until the inventories change)",
    common_pb2.TRADE_ABORT_CAUSE_UNAVAILABLE: (
        "unavailable: a side could not take part in time (the same exchange under a new trade id may commit)"),
    common_pb2.TRADE_ABORT_CAUSE_CONTENDED: (
        "contended: other trades not settled yet hold an item or the gold (a new trade id may commit once they "
        "settle)"),
}


def _cause(value: int) -> list[tuple[str, object]]:
    return [("cause", _CAUSES[value])] if value in _CAUSES else []  # type: ignore[index]


def render_trade_result(r: trade_pb2.ExecuteTradeResponse) -> str:
    return _pairs([
        ("trade", r.trade_id),
        ("outcome", _outcome(r.outcome)),
        *([("reason", r.reason)] if r.reason else []),
        *_cause(r.abort_cause),
        ("kind", "cross-shard (two-phase commit)" if r.cross_shard else "same shard (one local transaction)"),
    ])


def _side_state(value: int) -> str:
    return shardnode_pb2.ParticipantTradeState.Name(value).removeprefix("PARTICIPANT_TRADE_STATE_")


IN_FLIGHT_S = 2.0
"""``trade in-doubt`` leaves out escrows younger than this by default: trades in flight
(a cross-shard trade holds its escrows for some milliseconds between phases)."""


def _deadline(t: shardnode_pb2.ParticipantTrade, now_ms: int) -> str:
    """An escrow's deadline from now ("in 4.2 s", "passed 1.0 s ago"); "-" once settled.
    (``--json`` gives the wall-clock milliseconds.)"""
    if t.state != shardnode_pb2.PARTICIPANT_TRADE_STATE_PREPARED or not t.deadline_ms:
        return "-"  # a deadline matters only while the escrow waits for its decision
    left_s = (t.deadline_ms - now_ms) / 1000
    return f"in {left_s:.1f} s" if left_s >= 0 else f"passed {-left_s:.1f} s ago"


def _participant_rows(trades: Sequence[shardnode_pb2.ParticipantTrade], now_ms: int) -> list[tuple[object, ...]]:
    return [
        (t.trade_id, t.shard_id or "-", t.node_id or "-", _side_state(t.state), t.leg.player_id or "-",
         _offer(t.leg.gives) if t.HasField("leg") else "-",
         f"{max(0, now_ms - t.prepared_at_ms) / 1000:.1f}" if t.prepared_at_ms else "-",
         _deadline(t, now_ms), t.reason or "")
        for t in trades
    ]


_PARTICIPANT_HEADERS = ("TRADE", "SHARD", "NODE", "STATE", "PLAYER", "GIVES", "AGE_S", "DEADLINE", "REASON")


def render_trade(r: trade_pb2.GetTradeResponse) -> str:
    state = trade_pb2.TradeState.Name(r.state).removeprefix("TRADE_STATE_")
    pairs: list[tuple[str, object]] = [("trade", r.trade_id), ("state", state)]
    if r.outcome:
        pairs.append(("outcome", _outcome(r.outcome)))
    if r.reason:
        pairs.append(("reason", r.reason))
    pairs += _cause(r.abort_cause)
    if r.request.player_a:
        q = r.request
        pairs.append(("terms", f"{q.player_a} gives {_offer(q.a_gives)}; {q.player_b} gives {_offer(q.b_gives)}"))
    if r.decided_by:
        pairs.append(("decided by", r.decided_by))
    pairs.append(("kind", "cross-shard" if r.cross_shard else "same shard"))
    if r.cross_shard and r.decided_by:
        if r.retained:
            retained = "yes (both sides applied it)"
        elif r.state == trade_pb2.TRADE_STATE_DONE:
            retained = "not yet (both sides applied it; the leader's sweep attaches the record's retention lease)"
        else:
            retained = "not yet (phase 2 unfinished)"
        pairs.append(("retained", retained))
    text = _pairs(pairs)
    if r.sides:
        text += "\n\n" + table(_PARTICIPANT_HEADERS, _participant_rows(r.sides, _now_ms()))
    if r.unreachable_nodes:
        text += "\nunreachable (the sides they lead are missing): " + ", ".join(r.unreachable_nodes)
    if r.unled_shards:
        text += "\nno primary right now (a side there is missing): " + limits.first_few(r.unled_shards)
    return text


def _now_ms() -> int:
    return int(time.time() * 1000)


def render_in_doubt(r: trade_pb2.ListInDoubtTradesResponse, min_age_s: float = 0.0, now_ms: int | None = None) -> str:
    """The escrows ``r`` lists that were prepared at least ``min_age_s`` ago: younger ones
    are trades in flight, counted but not listed."""
    now_ms = _now_ms() if now_ms is None else now_ms
    old = [t for t in r.trades if not t.prepared_at_ms or now_ms - t.prepared_at_ms >= min_age_s * 1000]
    text = table(_PARTICIPANT_HEADERS, _participant_rows(old, now_ms)) + f"\n{len(old)} escrow(s) in doubt"
    if overdue := sum(1 for t in old if t.deadline_ms and t.deadline_ms < now_ms):
        text += f", {overdue} past their deadline (their participants are settling them)"
    if young := len(r.trades) - len(old):
        text += (f"\n{young} younger than {min_age_s:g} s left out: trades in flight, decided in a moment "
                 "(--min-age-s 0 lists them)")
    if r.unreachable_nodes:
        text += "\nunreachable (their escrows are missing): " + ", ".join(r.unreachable_nodes)
    if r.unled_shards:
        text += "\nno primary right now (their escrows are missing): " + limits.first_few(r.unled_shards)
    return text


def trade_request(args: argparse.Namespace) -> trade_pb2.ExecuteTradeRequest:
    """The ExecuteTradeRequest of ``trade execute``'s arguments (checked by the server)."""
    return trade_pb2.ExecuteTradeRequest(
        trade_id=args.trade_id, player_a=args.player_a, player_b=args.player_b,
        a_gives=common_pb2.Offer(item_ids=args.a_items, gold=args.a_gold),
        b_gives=common_pb2.Offer(item_ids=args.b_items, gold=args.b_gold),
    )


async def run_trade(args: argparse.Namespace, client: ControlPlaneClient) -> tuple[Message, str, int]:
    """One trade command: the response, its text and the exit status."""
    if args.action == "execute":
        # Before the request is built: protobuf cannot even hold a gold past 2^64.
        validation.gold(args.a_gold, "--a-gold")
        validation.gold(args.b_gold, "--b-gold")
        executed: trade_pb2.ExecuteTradeResponse = await client.call(
            lambda _: client.trades().ExecuteTrade, trade_request(args))
        status = 0 if executed.outcome == common_pb2.TRADE_OUTCOME_COMMITTED else EXIT_ABORTED
        return executed, render_trade_result(executed), status
    if args.action == "show":
        try:
            shown: trade_pb2.GetTradeResponse = await client.call(
                lambda _: client.trades().GetTrade,
                trade_pb2.GetTradeRequest(trade_id=args.trade_id, player_id=args.player or ""))
        except NotFound as e:
            if args.player:
                raise
            said = str(e)  # the API's words for its field, as this command spells it
            if "give player_id" in said:
                raise NotFound(said.replace("give player_id", "pass --player PLAYER")) from e
            raise NotFound(f"{said} (pass --player PLAYER for a same-shard trade)") from e
        return shown, render_trade(shown), _partial(shown.unreachable_nodes, shown.unled_shards)
    if not 0 < args.limit <= limits.MAX_IN_DOUBT_TRADES:
        usage_error(f"bluemarblectl: --limit must be 1..{limits.MAX_IN_DOUBT_TRADES}")
    listed: trade_pb2.ListInDoubtTradesResponse = await client.call(
        lambda _: client.trades().ListInDoubtTrades, trade_pb2.ListInDoubtTradesRequest(limit=args.limit))
    return listed, render_in_doubt(listed, args.min_age_s), _partial(listed.unreachable_nodes, listed.unled_shards)


def _partial(unreachable: Sequence[str], unled: Sequence[str] = ()) -> int:
    """The exit status of an answer that lists what nodes hold: :data:`EXIT_NO_ANSWER`
    (with a line on stderr) when some did not answer, or some shards have no primary to
    ask, for a script must not read a part as the whole (no escrow in doubt, a side that
    is not there)."""
    if not unreachable and not unled:
        return 0
    missing = [f"{', '.join(unreachable)} did not answer"] if unreachable else []
    if unled:
        missing.append(f"{limits.first_few(unled)} {'has' if len(unled) == 1 else 'have'} no primary to ask")
    print(f"bluemarblectl: {'; '.join(missing)}: the answer is partial; ask again", file=sys.stderr)
    return EXIT_NO_ANSWER



# Read-only subcommands: which RPC, its (empty) request, and how to print the answer.
READS: dict[str, tuple[Callable[[Any], Any], Callable[[], Message], Callable[[Any], str]]] = {
    "status": (lambda s: s.GetClusterStatus, controlplane_pb2.GetClusterStatusRequest, render_status),
    "nodes": (lambda s: s.ListNodes, controlplane_pb2.ListNodesRequest, render_nodes),
    "shards": (
        lambda s: s.ListAssignments,
        lambda: controlplane_pb2.ListAssignmentsRequest(include_status=True),
        render_shards,
    ),
    "ring": (lambda s: s.GetRing, controlplane_pb2.GetRingRequest, render_ring),
}


DATA_COMMANDS = ("inventory", "grant", "take", "data")
DEFAULT_TIMEOUT_S = 5.0
"""``--timeout-s`` when neither the flag nor its environment variable gives it."""
PROMOTE_TIMEOUT_S = 20.0
"""``promote``'s default ``--timeout-s`` (the control plane answers once the leader acted)."""


async def run_data(args: argparse.Namespace, client: ControlPlaneClient) -> str:
    """One data command through a routing client; the text to print."""
    deadline_s = args.timeout_s
    routing = RoutingClient(client)
    # Started, not awaited ready: a call checks its input first, then waits for the
    # client's caches within its own deadline.
    await routing.start()
    try:
        result: Inventory | GrantResult | PlayerData | DataWriteResult
        if args.command == "inventory":
            result = await routing.get_inventory(args.player, allow_stale=args.stale, deadline_s=deadline_s)
            text = render_inventory(result)
        elif args.command == "grant":
            result = await routing.grant_items(
                args.player, args.items, args.gold, request_id=args.request_id, deadline_s=deadline_s
            )
            text = render_grant(result)
        elif args.command == "take":
            result = await routing.take_items(
                args.player, args.items, args.gold, request_id=args.request_id, deadline_s=deadline_s
            )
            text = render_grant(result, "take")
        elif args.action == "get":
            result = await routing.get_player_data(
                args.player, args.system, args.key, allow_stale=args.stale, deadline_s=deadline_s
            )
            text = render_player_data(result)
        else:
            result = await routing.set_player_data(
                args.player, args.system, args.key, args.value.encode("utf-8"),
                request_id=args.request_id, deadline_s=deadline_s,
            )
            text = render_data_write(result)
    finally:
        await routing.close()
    return _as_json(result) if args.json else text


async def run(args: argparse.Namespace) -> int:
    # Retried (with backoff, at most 1 s apart) until --timeout-s: a control plane that is
    # restarting or failing over answers within it. Every command is safe to repeat
    # (trades by their id, drains and promotions by their target, config set by revision).
    # The data commands' routing client retries on its own (and reports the last error).
    client = ControlPlaneClient(
        split_addresses(args.control_plane), timeout_s=args.timeout_s,
        attempts=3 if args.command in DATA_COMMANDS else CLI_MAX_ATTEMPTS,
        deadline_s=args.timeout_s, max_backoff_s=1.0, metadata=bearer_metadata(args.token),
    )
    try:
        response: Message
        text: str
        if args.command in DATA_COMMANDS:
            print(await run_data(args, client))
            return 0
        status = 0
        if args.command == "trade":
            response, text, status = await run_trade(args, client)
        elif args.command in READS:
            pick, request_type, render = READS[args.command]
            response = await client.call(pick, request_type())
            text = render(response)
        elif args.command == "drain":
            response = await client.call(
                lambda s: s.DrainNode, controlplane_pb2.DrainNodeRequest(node_id=args.node, force=args.force)
            )
            text = f"draining {args.node}"
        elif args.command == "undrain":
            response = await client.call(
                lambda s: s.UndrainNode, controlplane_pb2.UndrainNodeRequest(node_id=args.node)
            )
            text = (f"{args.node} is active again: placement gives it roles back (a node stopping on SIGTERM "
                    "drains itself again at its next heartbeat)" if response.was_draining  # type: ignore[attr-defined]
                    else f"{args.node} was not draining: nothing changed")
        elif args.command == "promote":
            request = controlplane_pb2.ForcePromoteRequest(
                shard_id=args.shard, node_id=args.node, accept_data_loss=args.accept_data_loss
            )
            # The control plane answers once the leader has acted (its default timeout is
            # longer than a read's). Retried within --timeout-s on a replica not reachable
            # or stopping; a retry after the leader acted finds the node primary already.
            response = await client.call(
                lambda s: s.ForcePromote, request, timeout_s=args.timeout_s, deadline_s=args.timeout_s)
            a = response.assignment  # type: ignore[attr-defined]
            text = f"{a.shard_id}: primary {a.primary} at epoch {a.epoch}"
            if response.already_primary:  # type: ignore[attr-defined]
                text += " (already its primary: nothing was forced)"
            if lost := list(response.lost_members):  # type: ignore[attr-defined]
                text += (f"\nwrites only {', '.join(lost)} held are lost, sides of cross-shard trades among them: a "
                         "trade its other shard applied may now leave an item in two inventories, or in none")
        elif args.command == "config" and args.action == "get":
            response = await client.call(lambda s: s.GetConfig, controlplane_pb2.GetConfigRequest())
            text = render_config(response.config, response.revision)  # type: ignore[attr-defined]
        else:
            updated = await _set_config(client, args.pairs)
            response, text = updated, render_config(updated.config, updated.revision)
            for warning in updated.warnings:
                print(f"bluemarblectl: warning: {warning}", file=sys.stderr)
        if args.json:
            text = message_json(response)
        print(text)
        return status
    except BlueMarbleError as e:
        said = _in_cli_words(args.command, str(e))
        print(f"bluemarblectl: {e.status}: {said}{_tls_hint(args, e)}{_trade_hint(args, e)}", file=sys.stderr)
        return EXIT_NO_ANSWER if e.retryable else 1
    finally:
        await client.close()


_CLI_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "trade": (("a_gives.item_ids", "--a-items"), ("b_gives.item_ids", "--b-items"), ("a_gives.gold", "--a-gold"),
              ("b_gives.gold", "--b-gold"),
              ("ExecuteTrade with the same id and terms", "trade execute with the same id and terms")),
    "grant": (("request_id", "--request-id"),),
    "take": (("request_id", "--request-id"),),
    "data": (("request_id", "--request-id"),),
    "config": (("read it again with GetConfig and reapply your change", "run config set again"),
               # config set sends the whole table itself: the API's advice is not the CLI user's
               ("send the whole table (GetConfig, edit, SetConfig)", "consistency.SYSTEM= removes other systems only")),
}
"""The API's words in the cluster's and the library's errors, as this command spells them."""


def _in_cli_words(command: str, message: str) -> str:
    for api, cli in _CLI_WORDS.get(command, ()):
        message = re.sub(rf"(?<![\w.]){re.escape(api)}(?!\w)", cli, message)
    return message


CONFIG_SET_ATTEMPTS = 3
"""Reads and writes of one ``config set`` when another change lands in between."""


async def _set_config(client: ControlPlaneClient, pairs: Sequence[str]) -> controlplane_pb2.SetConfigResponse:
    """Applies ``pairs`` to the stored config, guarded by its revision. The pairs set
    values outright, so when another change landed between the read and the write they
    are applied again to the new config (a few times), instead of failing the command."""
    for attempt in range(1, CONFIG_SET_ATTEMPTS + 1):
        current: controlplane_pb2.GetConfigResponse = await client.call(
            lambda s: s.GetConfig, controlplane_pb2.GetConfigRequest()
        )
        config = common_pb2.ClusterConfig()
        config.CopyFrom(current.config)
        _parse_config_assignments(pairs, config)
        if found := cluster_config.problems(config):  # what the cluster would refuse, as bad usage
            usage_error("bluemarblectl: " + "; ".join(found))
        try:
            response: controlplane_pb2.SetConfigResponse = await client.call(
                lambda s: s.SetConfig,
                controlplane_pb2.SetConfigRequest(config=config, expected_revision=current.revision),
            )
            return response
        except FailedPrecondition as e:
            # "config changed since revision N", "config changed concurrently": read again.
            if attempt == CONFIG_SET_ATTEMPTS or "config changed" not in str(e):
                raise
    raise AssertionError("unreachable")


def _trade_hint(args: argparse.Namespace, e: BlueMarbleError) -> str:
    """What to do when ``trade execute`` got no answer: the trade may have gone through."""
    if args.command != "trade" or args.action != "execute" or not e.retryable:
        return ""
    return (f" (the trade's outcome is unknown: run the same command again, with trade id "
            f"{limits.echo(args.trade_id, 60)}, to learn it; the items move at most once)")


def _tls_hint(args: argparse.Namespace, e: BlueMarbleError) -> str:
    """What to try when a plaintext command meets a server that speaks only TLS: it
    closes the connection at the first bytes, which gRPC reports as "Socket closed"."""
    if args.tls_ca or not e.retryable or "Socket closed" not in str(e):
        return ""
    return " (a control plane with TLS closes plaintext connections: pass --tls-ca, and --tls-cert/--tls-key)"


def _whole_number(text: str) -> int:
    """An integer flag: ASCII digits, optionally after a minus sign (``int()`` would also
    take "1_000", other scripts' digits and surrounding spaces)."""
    digits = text[1:] if text.startswith("-") else text
    if not validation.ascii_digits(digits) or len(digits) > 30:
        raise argparse.ArgumentTypeError(f"{limits.echo(text, 40)} is not a whole number (use the digits 0-9)")
    return int(text)


def _gold(text: str) -> int:
    """A gold flag: a whole number from 0 to 2^53 (out of range is bad usage, as for every
    other number flag, not a refusal by the cluster)."""
    value = _whole_number(text)
    try:
        validation.gold(value, "gold")
    except BlueMarbleError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def _seconds(text: str) -> float:
    """A duration flag: a finite number of seconds from 0 to an hour, in plain decimal
    digits (``float()`` would also take "1_0", " 3 ", "1e3" and other scripts' digits)."""
    value = float(text) if len(text) <= 30 and _DECIMAL.fullmatch(text) else math.nan
    if not (math.isfinite(value) and 0 <= value <= 3600):
        raise argparse.ArgumentTypeError(f"{limits.echo(text, 40)} is not a number of seconds from 0 to 3600")
    return value


class _Once(argparse.Action):
    """Stores a flag's value and refuses a second one: on a command that moves items or
    gold, a repeated flag is more likely a slip than an override."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given: set[str] = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in given:
            parser.error(f"{option_string} given twice; give it once")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


def _accept_after_command(subparsers: Any, flag: str, **kwargs: Any) -> None:
    """Lets ``flag`` of the top-level parser also follow the command (``bluemarblectl
    status --json`` as well as ``bluemarblectl --json status``): each leaf command parser
    gets it too, with no default of its own, so it never resets a value given before."""
    for parser in subparsers.choices.values():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            for inner in nested:
                _accept_after_command(inner, flag, **kwargs)
        else:
            parser.add_argument(flag, default=argparse.SUPPRESS, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    p = EnvArgumentParser(
        prog="bluemarblectl", description="Operate a BlueMarble cluster.",
        epilog="Exit status: 0 success; 1 an error (the cluster's refusal, or the client library's before "
        "sending); 2 bad usage (unknown command or flag, a malformed address, a value out of its range); 3 "
        "`trade execute` answered ABORTED; 4 no answer from the cluster (retry; a trade with the same id), or a "
        "partial one (`trade show` and `trade in-doubt` when a node did not answer; printed all the same). "
        "--timeout-s bounds the command's calls; starting the interpreter adds about a second on top.")
    p.add_flag("--control-plane", default="127.0.0.1:7000", help="control-plane addresses, comma-separated")
    p.add_flag("--timeout-s", type=_seconds,
               help=f"deadline of the command in seconds, retries included (default {DEFAULT_TIMEOUT_S:g}; "
               f"promote {PROMOTE_TIMEOUT_S:g}: it answers once the leader acted)")
    p.add_argument("--json", action="store_true", help="print the raw response as JSON")
    p.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="also print the client library's log lines (-v: from info up, -vv: debug); by default only "
        "errors, and this command's own error line",
    )
    tls.add_flags(p, "client")
    p.add_argument(
        "--token",
        default=os.environ.get(ADMIN_TOKEN_ENV, ""),
        help=f"admin bearer token for drain, undrain, promote and config set [env {ADMIN_TOKEN_ENV}] "
        "(prefer --token-file: a command line is visible to other users)",
    )
    p.add_flag("--token-file", default="", help="file holding the admin bearer token")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="cluster summary")
    sub.add_parser("nodes", help="registered nodes")
    sub.add_parser("shards", help="shard assignments, each member's log position and lag")
    sub.add_parser("ring", help="each shard's share of the key space")
    drain = sub.add_parser("drain", help="move a node's roles away, then let it leave")
    drain.add_argument("node")
    drain.add_argument("--force", action="store_true",
                       help="even if fewer nodes than replication_factor would remain (shards lose copies)")
    undrain = sub.add_parser("undrain", help="end a drain: the node takes roles again (one that has left: start it)")
    undrain.add_argument("node")
    promote = sub.add_parser(
        "promote",
        help="make NODE the primary of a shard left without one because its copies, or the ones that may hold "
        "its latest writes, are lost; loses what only the lost nodes held (sides of cross-shard trades too: "
        "an item may end up in two inventories, or in none)",
    )
    promote.add_argument("shard")
    promote.add_argument("node")
    promote.add_argument(
        "--accept-data-loss", action="store_true", help="required: the shard keeps only what NODE holds"
    )
    config = sub.add_parser("config", help="get or set the cluster config")
    config_sub = config.add_subparsers(dest="action", required=True)
    config_sub.add_parser("get")
    config_set = config_sub.add_parser(
        "set", help="e.g. config set lease_ttl_s=5 consistency.chat=EVENTUAL (consistency.SYSTEM= removes SYSTEM)")
    config_set.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    inventory = sub.add_parser("inventory", help="a player's items and gold (from the shard's primary)")
    inventory.add_argument("player")
    inventory.add_argument("--stale", action="store_true", help="accept an answer from a replica if the primary fails")
    for name, what, gold in (("grant", "give a player new unique items and gold", "gold to add (0..2^53)"),
                             ("take", "take items and gold away from a player", "gold to remove (0..2^53)")):
        write = sub.add_parser(name, help=f"{what} (idempotent by request id)")
        write.add_argument("player")
        write.add_argument("items", nargs="*", default=[], metavar="ITEM")  # a default: argparse calls it optional
        write.add_argument("--gold", type=_gold, default=0, action=_Once, help=gold)
        write.add_argument("--request-id", action=_Once,
                           help="idempotency key (default: a new uuid4); reuse it to retry safely")
    data = sub.add_parser("data", help="get or set a player's value for a game system and key")
    data_sub = data.add_subparsers(dest="action", required=True)
    data_get = data_sub.add_parser("get")
    data_set = data_sub.add_parser("set")
    for data_parser in (data_get, data_set):
        data_parser.add_argument("player")
        data_parser.add_argument("system", help="a game system of the cluster config, e.g. guild")
        data_parser.add_argument("key")
    data_get.add_argument("--stale", action="store_true", help="accept an answer from a replica if the primary fails")
    data_set.add_argument("value", help="the value, stored as UTF-8")
    data_set.add_argument("--request-id", action=_Once,
                          help="idempotency key (default: a new uuid4); reuse it to retry safely")
    trade = sub.add_parser("trade", help="execute a trade, show one, or list the escrows in doubt")
    trade_sub = trade.add_subparsers(dest="action", required=True)
    execute = trade_sub.add_parser(
        "execute", help="swap items and gold between two players (exit 3 when ABORTED)")
    execute.add_argument("trade_id", help="idempotency key: reuse it to retry safely")
    execute.add_argument("player_a")
    execute.add_argument("player_b")
    execute.add_argument("--a-items", nargs="*", default=[], action="extend", metavar="ITEM",
                         help="items player A gives (the flag may repeat)")
    execute.add_argument("--a-gold", type=_gold, default=0, action=_Once, help="gold player A gives")
    execute.add_argument("--b-items", nargs="*", default=[], action="extend", metavar="ITEM",
                         help="items player B gives (the flag may repeat)")
    execute.add_argument("--b-gold", type=_gold, default=0, action=_Once, help="gold player B gives")
    show = trade_sub.add_parser("show", help="a trade's decision and where each side stands")
    show.add_argument("trade_id")
    show.add_argument("--player", action=_Once,
                      help="one of its players (finds a same-shard trade without asking every primary)")
    in_doubt = trade_sub.add_parser("in-doubt", help="escrows the primaries hold, oldest first")
    in_doubt.add_argument("--limit", type=_whole_number, default=1000, help="at most this many (cap 1000)")
    in_doubt.add_argument("--min-age-s", type=_seconds, default=IN_FLIGHT_S,
                          help="list only escrows prepared at least this long ago; younger ones are trades in "
                               f"flight, only counted (default {IN_FLIGHT_S:g})")
    _accept_after_command(sub, "--json", action="store_true", help="print the raw response as JSON")
    args = p.parse_args(argv)
    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    validation.utf8_size(text, name)
                except BlueMarbleError:  # bytes the locale could not decode: they could not be sent either
                    p.error(f"{name.replace('_', '-')} is not valid UTF-8 text; give it in UTF-8")
    if args.command == "config" and args.action == "set":
        # Before the cluster is asked: a typo is bad usage, even when it cannot be reached.
        _parse_config_assignments(args.pairs, common_pb2.ClusterConfig(), dry=True)
    if args.command == "promote" and not args.accept_data_loss:
        # Checked here, not only by the server: the flag is the operator's own consent.
        promote.error(
            "promote needs --accept-data-loss: the shard keeps only what NODE holds, and whatever only "
            "the lost nodes held is gone"
        )
    try:
        checked_addresses(args.control_plane, "--control-plane (or BLUEMARBLE_CONTROL_PLANE)")
    except BlueMarbleError as e:
        p.error(str(e))
    if args.timeout_s is None:
        args.timeout_s = PROMOTE_TIMEOUT_S if args.command == "promote" else DEFAULT_TIMEOUT_S
    if not (math.isfinite(args.timeout_s) and MIN_TIMEOUT_S <= args.timeout_s <= MAX_TIMEOUT_S):
        # (Below the floor, a call could not be answered even on loopback; it used to be raised to it silently.)
        p.error(f"--timeout-s must be a number of seconds from {MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g}")
    if args.token_file:
        try:
            args.token = read_token_file(Path(args.token_file), "--token-file")
        except BlueMarbleError as e:
            p.error(str(e))
    args.token = args.token.strip()
    if len(args.token) > MAX_TOKEN_BYTES:
        p.error(f"the admin token is {len(args.token)} characters; a token is at most {MAX_TOKEN_BYTES}")
    if args.token:
        try:
            check_token(args.token, f"--token (or {ADMIN_TOKEN_ENV})")
        except BlueMarbleError as e:
            p.error(str(e))
    previous = tls.current()
    tls.configure(tls.config_from_flags(p, args, server=False))
    if argv is None:
        # Run as a command: the output is for people, and the client library's own
        # retry lines (a dozen a second while the control plane is unreachable) would
        # drown the one line that says what went wrong. (Tests pass argv and keep their
        # log set-up.)
        logs.configure(VERBOSITY[min(args.verbose, len(VERBOSITY) - 1)], "console")
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        # Ctrl-C: one line, not the traceback of every task it cancelled. A trade or a
        # write may have been sent: repeating the command with the same id is safe.
        print("bluemarblectl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`bluemarblectl shards | head`): nothing left to say to it.
        # Point stdout at /dev/null so the interpreter's final flush fails quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        tls.configure(previous)  # in-process callers (tests) get their own setting back


if __name__ == "__main__":
    sys.exit(main())
