"""``bluemarble-controlplane``: runs one control-plane replica until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from bluemarble.api import cluster_config
from bluemarble.core import limits, validation
from bluemarble.core.errors import BlueMarbleError, InvalidArgument
from bluemarble.runtime import auth, event_loop, logs, metrics, tls, tracing
from bluemarble.runtime.auth import AdminToken
from bluemarble.runtime.channels import split_addresses
from bluemarble.runtime.settings import EnvArgumentParser, env_name
from controlplane.server.app import ControlPlaneApp, ControlPlaneSettings
from controlplane.server.trades import TradeSettings
from controlplane.store.backup import Backup, take_backup
from controlplane.store.etcd import EtcdSecurity, EtcdStore
from controlplane.store.keys import validate_cluster_name

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Each stops the process as SIGTERM does (SIGHUP: a terminal that went away; left to its
default, it killed the process with nothing logged, drained or deregistered)."""

log = structlog.get_logger(__name__)

FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "etcd_startup_timeout_s": (0.0, 3600.0),
    "trade_retention_h": (0.0, 24.0 * 366),
    "trade_prepare_timeout_s": (0.0, 60.0),
    "trade_sweep_interval_s": (0.0, 3600.0),
}
"""Each float flag's range, above the first bound and at most the second: a NaN, an
infinity or a value out of range is a usage error (a NaN or infinite start-up timeout
would wait for etcd for ever; a NaN sweep interval killed the sweep task)."""

MAX_BACKUPS_KEPT = 10_000

MAX_CRASH_GRACE_MS = 60_000
"""Longest --crash-grace-ms: past a minute, waiting for the lease's TTL is as good."""


def _check_numbers(p: EnvArgumentParser, args: argparse.Namespace) -> None:
    """Refuses (usage error, exit 2) every numeric flag out of its range, before any of
    them is used: the cluster-config seeds against the config's own ranges (--shards
    against what the ring can hold at the default virtual nodes per shard), the floats
    against :data:`FLOAT_RANGES`."""
    seeds = {
        "lease_ttl_s": cluster_config.LIMITS["lease_ttl_s"],
        "replication_factor": cluster_config.LIMITS["replication_factor"],
        "shards": (cluster_config.LIMITS["shard_count"][0], cluster_config.max_shards()),
    }
    for name, (low, high) in seeds.items():
        value = getattr(args, name)
        if not low <= value <= high:
            p.error(f"--{name.replace('_', '-')} is {limits.echo(value, 24)}; give {low}..{high}")
    for name, (above, most) in FLOAT_RANGES.items():
        seconds: float = getattr(args, name)
        if not (math.isfinite(seconds) and above < seconds <= most):
            p.error(f"--{name.replace('_', '-')} is {seconds:g}; give a number above {above:g} and at most {most:g}")
    if not 1 <= args.etcd_backup_keep <= MAX_BACKUPS_KEPT:
        p.error(f"--etcd-backup-keep is {args.etcd_backup_keep}; give 1..{MAX_BACKUPS_KEPT}")
    if not 0 <= args.crash_grace_ms <= MAX_CRASH_GRACE_MS:
        p.error(f"--crash-grace-ms is {args.crash_grace_ms}; use 0 (off) or up to {MAX_CRASH_GRACE_MS} ms")


def _etcd_security(p: EnvArgumentParser, args: argparse.Namespace) -> EtcdSecurity | None:
    if not (args.etcd_ca or args.etcd_cert or args.etcd_key or args.etcd_user):
        if args.etcd_password:
            p.error("--etcd-password (BLUEMARBLE_ETCD_PASSWORD) is set without --etcd-user; give the user too")
        return None
    if args.etcd_user and not args.etcd_password:
        p.error(f"--etcd-user {args.etcd_user} needs a password: set BLUEMARBLE_ETCD_PASSWORD (or --etcd-password)")
    if (args.etcd_cert or args.etcd_key) and not args.etcd_ca:
        p.error("--etcd-cert/--etcd-key need --etcd-ca (the CA that signed etcd's certificate)")
    material = None
    files = None
    try:
        files = tls.files_from_flags(args.etcd_cert, args.etcd_key, args.etcd_ca, flag_prefix="--etcd")
        if files is not None:
            material = tls.load_material(files, flag_prefix="--etcd")
    except BlueMarbleError as e:
        p.error(str(e))
    return EtcdSecurity(
        ca=material.ca if material else None,
        cert=material.cert if material else None,
        key=material.key if material else None,
        server_name=args.etcd_server_name or None,
        user=args.etcd_user,
        password=args.etcd_password,
        files=files,
    )


def parse_args(argv: Sequence[str] | None = None) -> tuple[ControlPlaneSettings, str, str, str]:
    p = EnvArgumentParser(
        prog="bluemarble-controlplane",
        description="BlueMarble control plane replica: node registry, placement, trades.",
    )
    p.add_flag("--listen", default="127.0.0.1:7000", help="gRPC listen address host:port")
    p.add_flag(
        "--frames-port",
        default=0,
        type=int,
        help="port of the framed listener (on the --listen host) that carries game servers' ExecuteTrades streams "
        "for less CPU than gRPC; 0: a free port; -1: none (those streams stay on gRPC)",
    )
    p.add_flag("--etcd", default="127.0.0.1:2379", help="etcd endpoints, comma-separated")
    p.add_flag("--cluster", default="default", help="cluster name (etcd key prefix)")
    p.add_flag("--lease-ttl-s", default=10, type=int, help="node lease TTL for a new cluster")
    p.add_flag("--replication-factor", default=3, type=int, help="copies per shard for a new cluster")
    p.add_flag("--shards", default=16, type=int, help="shards of a new cluster's ring")
    metrics.add_flag(p)
    p.add_flag("--replica-id", default="", help="this replica's name (default host/listen)")
    p.add_flag("--etcd-startup-timeout-s", default=30.0, type=float, help="give up start-up after")
    p.add_flag(
        "--crash-grace-ms",
        default=300,
        type=int,
        help="after a node's heartbeat stream closes, revoke its lease once this long has passed "
        "without a heartbeat and its address refuses connections (0: wait for the TTL)",
    )
    p.add_flag(
        "--trade-retention-h",
        default=24.0,
        type=float,
        help="keep trade decision records (and so the same answer for a retried trade id) this many hours",
    )
    p.add_flag(
        "--trade-prepare-timeout-s",
        default=2.0,
        type=float,
        help="a trade participant that has not answered prepare within this is unavailable (ABORTED)",
    )
    p.add_flag(
        "--trade-sweep-interval-s",
        default=15.0,
        type=float,
        help="how often the leader finishes phase 2 of trades whose coordinator did not",
    )
    tls.add_flags(p, "control plane")
    p.add_flag(
        "--admin-token-file",
        default="",
        help="file holding the bearer token admin RPCs (SetConfig, DrainNode, UndrainNode, ForcePromote) require; "
        "re-read when it changes (or set BLUEMARBLE_ADMIN_TOKEN; default: admin RPCs are open)",
    )
    p.add_flag(
        "--node-id-pattern",
        default="",
        help="regular expression every node id must match in full to register (the chart: its StatefulSet's pod "
        "names); with mutual TLS this keeps a game server's or operator's certificate from joining as a node "
        "(default: any id)",
    )
    p.add_flag("--etcd-ca", default="", help="PEM CA that signed etcd's certificate (turns on TLS to etcd)")
    p.add_flag("--etcd-cert", default="", help="PEM client certificate for etcd (--client-cert-auth)")
    p.add_flag("--etcd-key", default="", help="PEM private key of --etcd-cert")
    p.add_flag("--etcd-server-name", default="", help="name in etcd's certificate (default: first endpoint's host)")
    p.add_flag("--etcd-user", default="", help="etcd user (with etcd authentication enabled)")
    p.add_flag("--etcd-password", default="", help="password of --etcd-user (prefer the environment variable)")
    p.add_flag(
        "--etcd-backup-dir",
        default="",
        help="take one snapshot of etcd into this directory (etcd-<cluster>-<UTC time>-r<revision>.db, checked "
        "against its SHA-256), keep the newest --etcd-backup-keep there, and exit: no replica runs "
        "(the chart's backup CronJob; restore with etcdctl snapshot restore)",
    )
    p.add_flag("--etcd-backup-keep", default=24, type=int, help="backups of this cluster to keep (1..10000)")
    p.add_flag("--log-level", default="info", help="debug, info, warning or error")
    p.add_flag(
        "--log-format",
        default="auto",
        choices=("auto", "console", "json"),
        help="log format; auto: console on a terminal, JSON otherwise (containers)",
    )
    args = p.parse_args(argv)
    _check_numbers(p, args)
    etcd_endpoints = tuple(split_addresses(args.etcd))
    try:
        # Before anything is written to etcd: a replica that cannot serve must not
        # create the cluster's config and ring.
        validation.address(args.listen, "--listen")
        if not -1 <= args.frames_port <= 65535:
            raise InvalidArgument(f"--frames-port is {args.frames_port}; give a port, 0 (a free one) or -1 (none)")
        validate_cluster_name(args.cluster)
        if not etcd_endpoints:
            p.error("--etcd names no endpoint; give at least one host:port (comma-separated)")
        for endpoint in etcd_endpoints:
            validation.address(endpoint, "--etcd")
    except BlueMarbleError as e:
        p.error(str(e))
    # Settings that only seed a new cluster's config: remember which ones the operator
    # chose (flag or environment), to warn when the stored config differs.
    seeded = {"lease_ttl_s": "lease_ttl_s", "replication_factor": "replication_factor", "shards": "shard_count"}
    explicit = frozenset(
        config_name
        for name, config_name in seeded.items()
        if getattr(args, name) != p.get_default(name) or env_name(f"--{name}") in os.environ
        or any(a == f"--{name.replace('_', '-')}" or a.startswith(f"--{name.replace('_', '-')}=")
               for a in (argv if argv is not None else sys.argv[1:]))
    )
    trades = TradeSettings(
        prepare_timeout_s=args.trade_prepare_timeout_s,
        retention_s=max(1, round(args.trade_retention_h * 3600)),
        sweep_interval_s=args.trade_sweep_interval_s,
    )
    tls_config = tls.config_from_flags(p, args, server=True)
    try:
        admin_token = AdminToken.from_settings(args.admin_token_file)
        node_id_pattern = auth.compile_node_id_pattern(args.node_id_pattern, "--node-id-pattern")
    except BlueMarbleError as e:
        p.error(str(e))
    settings = ControlPlaneSettings(
        listen=args.listen,
        etcd_endpoints=etcd_endpoints,
        cluster=args.cluster,
        lease_ttl_s=args.lease_ttl_s,
        replication_factor=args.replication_factor,
        shards=args.shards,
        etcd_startup_timeout_s=args.etcd_startup_timeout_s,
        replica_id=args.replica_id,
        crash_grace_ms=args.crash_grace_ms,
        trades=trades,
        explicit=explicit,
        admin_token=admin_token,
        node_id_pattern=node_id_pattern,
        etcd_security=_etcd_security(p, args),
        frames_port=args.frames_port,
        backup_dir=args.etcd_backup_dir,
        backup_keep=args.etcd_backup_keep,
    )
    # Process-wide from here on: this replica's server and every channel it opens.
    tls.configure(tls_config)
    return settings, args.log_level, args.log_format, metrics.listen_from_args(p, args)


async def run(settings: ControlPlaneSettings) -> None:
    """Starts the replica and serves until SIGTERM or SIGINT, then stops it.

    A signal during start-up (etcd not answering yet, the config being bootstrapped)
    ends the start-up at once and stops what was started: the process exits as after a
    normal stop, instead of waiting out --etcd-startup-timeout-s. Raises what
    :meth:`ControlPlaneApp.start` raises (Unavailable when etcd never answered)."""
    app = ControlPlaneApp(settings)
    logs.bind_process(replica=app.replica_id)  # every line says which replica wrote it
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        if not await _start_unless_stopped(app, stop):
            return
        try:
            await stop.wait()
            log.info("shutting down")
        finally:
            await app.stop()
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def _start_unless_stopped(app: ControlPlaneApp, stop: asyncio.Event) -> bool:
    """Runs ``app.start()`` until it is done (True) or ``stop`` is set (False: start-up
    cancelled and what it had started stopped)."""
    starting = asyncio.ensure_future(app.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if starting.done():
        starting.result()  # start-up's own error, if any
        return True
    # Why it is safe to cancel anywhere in start(): every step it took is undone by
    # stop(), which skips the parts that were not created yet.
    waiting_for_etcd = app.nodes is None  # etcd connect and config/ring bootstrap come first
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError, BlueMarbleError):
        await starting
    log.info(
        "stopped while waiting for etcd during start-up" if waiting_for_etcd else "stopped during start-up",
        etcd=",".join(app.settings.etcd_endpoints),
    )
    await app.stop()
    return False


def main(argv: Sequence[str] | None = None) -> int:
    settings, level, fmt, metrics_listen = parse_args(argv)
    logs.configure(level, fmt)  # type: ignore[arg-type]
    if settings.backup_dir:  # a one-shot tool: no tracing, no metrics server
        try:
            event_loop.run(backup(settings))
        except BlueMarbleError as e:
            log.error("etcd backup failed", error=str(e), directory=settings.backup_dir)
            return 1
        return 0
    tracing.configure("bluemarble-controlplane")
    if metrics_listen:
        # Only the metrics server's own failure is reported as such: an OSError from
        # the replica itself is not about metrics (and is a bug to be seen whole).
        try:
            port = metrics.serve(metrics_listen)
        except OSError as e:
            log.error("control plane cannot serve metrics", listen=metrics_listen, error=str(e))
            return 1
        log.info("serving metrics", listen=metrics_listen, port=port)
    try:
        event_loop.run(run(settings), server=True)
    except BlueMarbleError as e:
        log.error("control plane cannot run", error=str(e))
        return 1
    return 0


async def backup(settings: ControlPlaneSettings) -> Backup:
    """``--etcd-backup-dir``: one snapshot of etcd, the newest ``--etcd-backup-keep`` kept
    (controlplane.store.backup). Raises Unavailable or CorruptRecord naming what failed."""
    store = EtcdStore(settings.etcd_endpoints, rpc_timeout_s=settings.etcd_rpc_timeout_s,
                      security=settings.etcd_security)
    try:
        await store.connect(settings.etcd_startup_timeout_s)
        return await take_backup(store, Path(settings.backup_dir), settings.cluster, settings.backup_keep)
    finally:
        await store.close()


if __name__ == "__main__":
    sys.exit(main())
