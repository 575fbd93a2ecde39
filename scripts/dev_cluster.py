#!/usr/bin/env python3
"""Runs a local BlueMarble cluster: etcd, one control plane and N shard nodes.

    python scripts/dev_cluster.py             # until Ctrl-C
    python scripts/dev_cluster.py --once      # bring up, show status, tear down
    python scripts/dev_cluster.py --tls       # mutual TLS everywhere and an admin token

Data and logs go under .bluemarble/ in the project directory (etcd data, node data
dirs, one log file per process). Everything listens on 127.0.0.1 only. Ctrl-C (or
SIGTERM) stops the nodes first (they deregister), then the control plane, then etcd.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path

import grpc

from bluemarble.runtime import logs, tls
from bluemarble.v1 import controlplane_pb2, controlplane_pb2_grpc
from scripts.demo import seed_and_show
from scripts.localcluster import ClusterSecurity, LocalEtcd, ManagedProcess, free_port, secure_cluster_files, wait_until

ROOT = Path(__file__).resolve().parent.parent
ZONES = ("zone-a", "zone-b", "zone-c")
SECURITY: ClusterSecurity | None = None
"""Set by --tls: the cluster's certificates and admin token (this script is the admin)."""


def _channel(address: str) -> grpc.Channel:
    if SECURITY is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        SECURITY.ca.read_bytes(),
        (SECURITY.certs_dir / "admin-key.pem").read_bytes(),
        (SECURITY.certs_dir / "admin.pem").read_bytes(),
    )
    return grpc.secure_channel(address, credentials)


def registered_nodes(address: str) -> int:
    with _channel(address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        try:
            return len(stub.ListNodes(controlplane_pb2.ListNodesRequest(), timeout=2).nodes)
        except grpc.RpcError:
            return -1


def placement_done(address: str, replicas: int) -> bool:
    """Every shard has a primary and ``replicas`` replicas, and the status warns of no
    primary still catching up and no replica still copying (a fresh cluster's primaries
    serve a moment after placement; the replicas' reports arrive with their heartbeats)."""
    with _channel(address) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        try:
            r = stub.ListAssignments(controlplane_pb2.ListAssignmentsRequest(), timeout=2)
            status = stub.GetClusterStatus(controlplane_pb2.GetClusterStatusRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return len(r.assignments) == status.shard_count and all(
        a.primary and len(a.replicas) == replicas for a in r.assignments
    ) and not any("not taking writes" in w or "still copying" in w for w in status.warnings)


def ctl(address: str, *words: str) -> None:
    security = [] if SECURITY is None else [*SECURITY.tls_flags("admin"), "--token-file", str(SECURITY.token_file)]
    command = [sys.executable, "-m", "bluemarble.cli.bluemarblectl", "--control-plane", address, *security, *words]
    subprocess.run(command, check=False)


RESTART_WAIT_S = 30.0
"""How long the last control-plane replica this script started may be gone before the
cluster is stopped: a replica restarted by hand on its address (a rolling restart) serves
again within it."""


def _accepts_connections(endpoint: str) -> bool:
    """Whether something listens at ``endpoint`` (``host:port``)."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def check_processes(watched: list[ManagedProcess], nodes: Collection[str],
                    serving: Callable[[], bool] = lambda: False, wait_s: float = 0.0,
                    etcd_serving: Callable[[], bool] = lambda: False) -> int | None:
    """One look at the cluster's processes: None while the cluster should keep running,
    else the exit status for this script (1).

    A node that exits is reported and dropped from ``watched``, and the rest keep
    running: with status 0 it left on purpose (``bluemarblectl drain``, or a
    deregistering SIGTERM); otherwise it crashed or was killed, and its shards fail over
    to their replicas, which is what a local cluster is there to show. So does a
    control-plane replica while another one runs (the others take over its work), or when
    ``serving()`` (some replica's address answers: one restarted outside this script)
    comes true within ``wait_s``; otherwise the last replica's exit stops the whole
    cluster. So does etcd's, unless ``etcd_serving()`` (an etcd answers at its address:
    one restarted by hand, as in an etcd restart drill) comes true within ``wait_s``.
    """
    for proc in list(watched):
        code = proc.exit_code()
        if code is None:
            continue
        others = [p for p in watched if p is not proc and p.name.startswith("controlplane") and p.exit_code() is None]
        if proc.name.startswith("controlplane") and others:
            print(f"{proc.name} exited (exit {code}); {', '.join(p.name for p in others)} keep serving. "
                  f"Log: {proc.log_path}", flush=True)
            watched.remove(proc)
            continue
        if proc.name.startswith("controlplane") and _serves_within(serving, wait_s):
            print(f"{proc.name} exited (exit {code}); a control plane serves at the cluster's addresses (one "
                  f"started outside this script): the cluster keeps running. Log: {proc.log_path}", flush=True)
            watched.remove(proc)
            continue
        if proc.name == "etcd" and _serves_within(etcd_serving, wait_s):
            print(f"etcd exited (exit {code}); an etcd serves at its address (one started outside this script, "
                  "which this script will not stop): the cluster keeps running", flush=True)
            watched.remove(proc)
            continue
        if proc.name in nodes:
            if code == 0:
                print(f"{proc.name} left the cluster (exit 0, e.g. after a drain); the others keep running. "
                      f"Log: {proc.log_path}", flush=True)
            else:
                print(f"{proc.name} died (exit {code}); its shards fail over to their replicas and the others keep "
                      f"running. Log: {proc.log_path}", flush=True)
            watched.remove(proc)
            continue
        print(f"{proc.name} exited unexpectedly (exit {code}); see {proc.log_path}", flush=True)
        return 1
    return None


def _serves_within(serving: Callable[[], bool], wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        if serving():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=3, help="shard nodes to start (default 3)")
    p.add_argument("--dir", type=Path, default=ROOT / ".bluemarble",
                   help="etcd data, node data and logs; kept from run to run (default .bluemarble in the checkout)")
    p.add_argument("--control-plane-port", type=int, default=7000,
                   help="port of the first control-plane replica, the others on the next ports; 0 picks free ports")
    p.add_argument("--control-planes", type=int, default=1,
                   help="control-plane replicas (default 1); the nodes and clients get every address")
    p.add_argument("--node-base-port", type=int, default=7101, help="0 picks free ports")
    p.add_argument("--lease-ttl-s", type=int, default=10, help="node lease TTL in seconds (default 10)")
    p.add_argument("--players", type=int, default=300, help="players the demo seeds (0: no demo)")
    p.add_argument("--once", action="store_true", help="show the status, then stop everything")
    p.add_argument("--tls", action="store_true",
                   help="mutual TLS on every server and channel, and an admin token (certificates under --dir)")
    args = p.parse_args()
    if not 1 <= args.control_planes <= 5:
        p.error(f"--control-planes is {args.control_planes}; give 1 to 5")
    logs.configure("warning", "console")  # the demo's routing client: only what matters
    global SECURITY
    node_ids = [f"node-{i + 1}" for i in range(args.nodes)]
    if args.tls:
        SECURITY = secure_cluster_files(args.dir / "tls", node_ids)
        # The demo's clients (this process) present the admin certificate.
        tls.configure(tls.TlsConfig(tls.TlsFiles(
            SECURITY.certs_dir / "admin.pem", SECURITY.certs_dir / "admin-key.pem", SECURITY.ca)))
        print(f"mutual TLS: certificates in {SECURITY.certs_dir}, admin token in {SECURITY.token_file}", flush=True)

    args.dir.mkdir(parents=True, exist_ok=True)
    log_dir = args.dir / "logs"
    if log_dir.exists():  # this run's logs alone (the previous run's stay in logs.prev)
        shutil.rmtree(args.dir / "logs.prev", ignore_errors=True)
        log_dir.rename(args.dir / "logs.prev")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a closed terminal stops the cluster too
        signal.signal(sig, lambda *_: stop.set())
    processes: list[ManagedProcess] = []
    etcd = LocalEtcd(args.dir, client_port=free_port(), peer_port=free_port())
    try:
        print(f"starting etcd ({args.dir / 'etcd'}) ...", flush=True)
        etcd.start()
        cp_addresses = [f"127.0.0.1:{args.control_plane_port + i if args.control_plane_port else free_port()}"
                        for i in range(args.control_planes)]
        cp_address = ",".join(cp_addresses)  # what nodes and clients are given: every replica
        control_planes = [ManagedProcess(
            "controlplane" if i == 0 else f"controlplane-{i}",
            [sys.executable, "-m", "controlplane.server.main", "--listen", address, "--etcd", etcd.endpoint,
             "--lease-ttl-s", str(args.lease_ttl_s), "--replica-id", f"cp-{i}",
             *(SECURITY.control_plane_flags() if SECURITY else [])],
            log_dir / ("controlplane.log" if i == 0 else f"controlplane-{i}.log"),
        ).start() for i, address in enumerate(cp_addresses)]
        processes.extend(control_planes)
        print(f"starting control plane on {cp_address} (etcd {etcd.endpoint}) ...", flush=True)

        def serving() -> bool:
            for control_plane in control_planes:
                if not control_plane.alive():  # e.g. its port is taken: say so now, not in 20 s
                    raise RuntimeError(f"{control_plane.name} exited (code {control_plane.exit_code()}) before serving")
            return all(registered_nodes(address) >= 0 for address in cp_addresses)

        wait_until(serving, 20, "the control plane to serve")
        for i, node_id in enumerate(node_ids):
            port = args.node_base_port + i if args.node_base_port else free_port()
            listen = f"127.0.0.1:{port}"
            processes.append(ManagedProcess(
                node_id,
                [sys.executable, "-m", "shardnode.main", "--node-id", node_id, "--listen", listen,
                 "--control-plane", cp_address, "--data-dir", str(args.dir / "nodes" / node_id),
                 "--zone", ZONES[i % len(ZONES)], "--region", "local",
                 *(SECURITY.node_flags(node_id) if SECURITY else [])],
                log_dir / f"{node_id}.log",
            ).start())
        print(f"starting {args.nodes} shard nodes ...", flush=True)
        wait_until(lambda: registered_nodes(cp_addresses[0]) >= args.nodes, 30, f"{args.nodes} nodes to register")
        replicas = min(3, args.nodes) - 1
        wait_until(lambda: placement_done(cp_addresses[0], replicas), 30, "every shard to be placed and served")
        print()
        ctl(cp_address, "status")
        print()
        ctl(cp_address, "nodes")
        print()
        ctl(cp_address, "shards")
        print()
        ctl(cp_address, "ring")
        if args.players:
            print(f"\ndemo: seeding {args.players} players through the routing client ...", flush=True)
            if asyncio.run(seed_and_show(cp_addresses, args.players)):
                print("the demo saw failures (above)", flush=True)
                return 1
            print()
            ctl(cp_address, "inventory", "player-0000")
            print()
            ctl(cp_address, "shards")
        print(f"\nlogs: {log_dir}")
        if not args.once:
            flags = "" if SECURITY is None else " " + " ".join(
                [*SECURITY.tls_flags("admin"), "--token-file", str(SECURITY.token_file)])
            print(f"cluster running; try: .venv/bin/bluemarblectl --control-plane {cp_address}{flags} nodes   "
                  "(Ctrl-C stops)")
            watched = list(processes) + ([etcd.process] if etcd.process is not None else [])
            try:
                while not stop.wait(1.0):
                    failed = check_processes(
                        watched, node_ids, lambda: any(registered_nodes(a) >= 0 for a in cp_addresses),
                        RESTART_WAIT_S, lambda: _accepts_connections(etcd.endpoint))
                    if failed is not None:
                        return failed
            except KeyboardInterrupt:
                pass
        return 0
    except (TimeoutError, RuntimeError, FileNotFoundError) as e:
        print(f"dev cluster failed: {e}", file=sys.stderr)
        for proc in processes:
            print(f"--- {proc.name} ({proc.log_path}) ---\n{proc.log_tail(15)}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C (or a SIGTERM/SIGHUP) must not cut the clean-up short and leave
        # processes behind.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        _say("\nstopping ...")
        for proc in reversed(processes):
            code = proc.stop()
            _say(f"  {proc.name} stopped (exit {code})")
        etcd.stop()
        _say("  etcd stopped")


def _say(text: str) -> None:
    """A line of the clean-up, which must go on when stdout is gone (a closed terminal,
    or a pipe whose reader stopped, e.g. ``| head``): a failed print would skip the
    stops after it and leave processes behind."""
    try:
        print(text, flush=True)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
