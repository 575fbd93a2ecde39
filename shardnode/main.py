"""``bluemarble-node``: a shard node process. Registers, heartbeats, serves ShardNode,
and on SIGTERM/SIGINT deregisters and exits 0.

Exit codes: 0 after a graceful stop; 1 when the node cannot start or run (the log's last
line says why); 2 for a bad command line; :data:`EXIT_STORAGE_DAMAGED` when its node.db is
damaged, at start or while serving. In the second case the node deregisters on the way
out, so its shards fail over to their replicas at once; a restart by a supervisor then
meets the start-up check and exits again with the same code and message, until an
operator moves the data dir away. :data:`EXIT_STORAGE_FAILING` when every write to
node.db failed for a while (a full disk): it deregisters the same way; started again once
there is room, it rejoins on the same data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from bluemarble.client.control_plane import ControlPlaneClient
from bluemarble.client.ring_router import RingRouter
from bluemarble.core import limits, validation
from bluemarble.core.errors import BlueMarbleError, InvalidArgument, Unavailable
from bluemarble.runtime import auth, background, event_loop, frames, logs, metrics, retry, tls, tracing
from bluemarble.runtime.channels import checked_addresses
from bluemarble.runtime.grpc_server import Server, ServiceBinding, build_server
from bluemarble.runtime.settings import EnvArgumentParser
from bluemarble.v1 import shardnode_pb2, shardnode_pb2_grpc
from shardnode.agent import NodeAgent, NodeIdentity, SessionState
from shardnode.dataplane import RECLAIM_AFTER_S, DataPlane
from shardnode.participant import DEFAULT_ESCROW_TIMEOUT_S, Participant
from shardnode.service import ShardNodeService
from shardnode.storage import NodeStorage
from shardnode.storage.node_storage import StorageDamaged

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Each stops the process as SIGTERM does (SIGHUP: a terminal that went away; left to its
default, it killed the process with nothing logged, drained or deregistered)."""

log = structlog.get_logger(__name__)

EXIT_STORAGE_DAMAGED = 3
EXIT_STORAGE_FAILING = 4
"""The process ended because every write to its storage failed for
:data:`shardnode.storage.node_storage.STORAGE_FAILING_LIMIT_S` (a full disk, I/O errors):
its shards fail over to their replicas; free the space (or replace the volume) and start
it again, on the same data dir."""
SHARD_NODE_SERVICE = shardnode_pb2.DESCRIPTOR.services_by_name["ShardNode"].full_name
"""Its health is the node's readiness (:meth:`DataPlane.not_ready_reason`); the health of
"" stays SERVING while the process runs (liveness)."""
READINESS_INTERVAL_S = 0.5
DEFAULT_LEAVE_TIMEOUT_S = 30.0
MAX_RECLAIM_AFTER_S = 30 * 86_400.0
"""How long a node stopping on SIGTERM/SIGINT waits for the control plane to move its
roles away (a drain) before it leaves anyway: within Kubernetes' default 30 s and the
chart's 60 s grace, with room for the shutdown itself."""
LEAVE_CHECK_S = 0.5
"""How often a leaving node checks that its heartbeats still get through."""
NOT_READY_LOG_INTERVAL_S = 10.0
"""The process ended because its database file is damaged (see
:class:`shardnode.storage.node_storage.StorageDamaged`); restarting it on the same data dir
does not help."""


@dataclass(frozen=True)
class NodeSettings:
    node_id: str
    listen: str
    control_plane: tuple[str, ...]
    data_dir: Path
    advertise: str = ""
    region: str = ""
    zone: str = ""
    capacity: int = 1
    synchronous: str = "NORMAL"
    trade_escrow_timeout_s: float = DEFAULT_ESCROW_TIMEOUT_S
    leave_timeout_s: float = DEFAULT_LEAVE_TIMEOUT_S
    reclaim_after_s: float = RECLAIM_AFTER_S
    control_plane_identity: tuple[str, ...] = (auth.CONTROL_PLANE_IDENTITY,)
    frames_port: int = 0


def parse_args(argv: Sequence[str] | None = None) -> tuple[NodeSettings, str, str, str]:
    p = EnvArgumentParser(prog="bluemarble-node", description="BlueMarble shard node.")
    p.add_flag("--node-id", required=True, help="this node's unique id (1..128 bytes)")
    p.add_flag("--listen", default="127.0.0.1:7101", help="gRPC listen address host:port")
    p.add_flag("--advertise", default="", help="address others use to reach this node (default --listen)")
    p.add_flag(
        "--frames-port",
        default=0,
        type=int,
        help="port of the framed listener (on the --listen host) that carries the Calls and Replicate streams "
        "for less CPU than gRPC; 0: a free port; -1: none (those streams stay on gRPC)",
    )
    p.add_flag("--control-plane", default="127.0.0.1:7000", help="control-plane addresses, comma-separated")
    p.add_flag("--data-dir", required=True, help="directory for this node's storage")
    p.add_flag("--region", default="", help="region label")
    p.add_flag("--zone", default="", help="zone label (replicas spread over zones)")
    p.add_flag("--capacity", default=1, type=int, help="relative placement weight")
    p.add_flag(
        "--synchronous",
        default="normal",
        choices=("normal", "full"),
        help="SQLite durability: normal survives a process crash; full also a power loss (slower)",
    )
    p.add_flag(
        "--trade-escrow-timeout-s",
        default=DEFAULT_ESCROW_TIMEOUT_S,
        type=float,
        help="how long a trade escrow waits for its decision before this node asks for it (seconds)",
    )
    p.add_flag(
        "--leave-timeout-s",
        default=DEFAULT_LEAVE_TIMEOUT_S,
        type=float,
        help="on SIGTERM/SIGINT, how long to wait for the control plane to move this node's roles away before "
        "leaving anyway (0: leave at once, as a crash does; a second signal also stops at once)",
    )
    p.add_flag(
        "--reclaim-after-s",
        default=RECLAIM_AFTER_S,
        type=float,
        help="delete the copy of a shard this node holds no role in once it has been so for this long (seconds; "
        "0: keep such copies); the control plane may still count on a copy it names as retained, never deleted",
    )
    metrics.add_flag(p)
    tls.add_flags(p, "node (its CN or a DNS SAN must be the node id under mutual TLS)")
    p.add_flag(
        "--control-plane-identity",
        default=auth.CONTROL_PLANE_IDENTITY,
        help="under mutual TLS, names (CN or DNS SAN, comma-separated) of the control plane's certificate: only "
        "it may send trade and fencing calls; the DNS hosts of --control-plane count too",
    )
    p.add_flag("--log-level", default="info", help="debug, info, warning or error")
    p.add_flag(
        "--log-format",
        default="auto",
        choices=("auto", "console", "json"),
        help="log format; auto: console on a terminal, JSON otherwise (containers)",
    )
    args = p.parse_args(argv)
    try:
        validation.node_id(args.node_id, "--node-id")
        validation.address(args.listen, "--listen")
        if args.advertise:
            validation.reachable_address(args.advertise, "--advertise")
        else:  # the node advertises its listen address: others must be able to reach it
            validation.reachable_address(args.listen, "--listen (advertised: no --advertise given)")
        validation.capacity(args.capacity, "--capacity")
        if not args.data_dir.strip():
            # Path("") is the current directory: node.db would land wherever the node was started.
            raise InvalidArgument("--data-dir is empty; give the directory for this node's storage")
        identities = [n.strip() for n in args.control_plane_identity.split(",") if n.strip()]
        if len(identities) > 16 or any(len(n) > 253 or not n.isprintable() for n in identities):
            raise InvalidArgument(
                "--control-plane-identity takes at most 16 comma-separated certificate names of at most 253 "
                "printable characters each"
            )
        if not 0 < args.trade_escrow_timeout_s <= 3600:
            raise InvalidArgument(
                f"--trade-escrow-timeout-s is {args.trade_escrow_timeout_s}; give 0 < seconds <= 3600"
            )
        if not 0 <= args.leave_timeout_s <= 3600:
            raise InvalidArgument(f"--leave-timeout-s is {args.leave_timeout_s}; give 0 <= seconds <= 3600")
        if not (args.reclaim_after_s == 0 or 1 <= args.reclaim_after_s <= MAX_RECLAIM_AFTER_S):
            raise InvalidArgument(
                f"--reclaim-after-s is {args.reclaim_after_s}; give 0 (keep copies) or 1 <= seconds <= "
                f"{MAX_RECLAIM_AFTER_S:.0f} (30 days)"
            )
        if not -1 <= args.frames_port <= 65535:
            raise InvalidArgument(f"--frames-port is {args.frames_port}; give a port, 0 (a free one) or -1 (none)")
    except BlueMarbleError as e:
        p.error(str(e))
    tls_config = tls.config_from_flags(p, args, server=True)
    if tls_config is not None and tls_config.mutual:
        cert = tls_config.material().cert
        names = tls.certificate_names(cert) if cert else frozenset()
        if args.node_id not in names:
            # The control plane would refuse every registration (PERMISSION_DENIED): say why now.
            p.error(
                f"--tls-cert names {', '.join(sorted(names)) or 'nothing'}; under mutual TLS a node may register "
                f"only as an id its certificate names (Common Name or DNS SAN): give --node-id one of them, or a "
                f"certificate that names {limits.echo(args.node_id)}"
            )
    try:
        addresses = checked_addresses(args.control_plane, "--control-plane")
    except BlueMarbleError as e:
        p.error(str(e))
    settings = NodeSettings(
        node_id=args.node_id,
        listen=args.listen,
        advertise=args.advertise,
        control_plane=tuple(addresses),
        data_dir=Path(args.data_dir),
        region=args.region,
        zone=args.zone,
        capacity=args.capacity,
        synchronous=args.synchronous.upper(),
        trade_escrow_timeout_s=args.trade_escrow_timeout_s,
        leave_timeout_s=args.leave_timeout_s,
        reclaim_after_s=args.reclaim_after_s,
        control_plane_identity=tuple(identities),
        frames_port=args.frames_port,
    )
    # Process-wide from here on: the ShardNode server (mutual TLS with a CA: only clients
    # holding a certificate the CA signed get in) and every channel the node opens.
    tls.configure(tls_config)
    return settings, args.log_level, args.log_format, metrics.listen_from_args(p, args)


async def run(settings: NodeSettings) -> int:
    """Serves until SIGTERM/SIGINT (returns 0), a fatal error of the agent (1), damage
    found in the node's storage (:data:`EXIT_STORAGE_DAMAGED`) or writes failing for long
    (:data:`EXIT_STORAGE_FAILING`), deregistering on the way out. Raises StorageDamaged, or
    another BlueMarbleError, when it cannot start."""
    logs.bind_process(node_id=settings.node_id)  # every line, request lines too
    storage = NodeStorage.open(
        settings.data_dir,
        synchronous=settings.synchronous,  # type: ignore[arg-type]
        node_id=settings.node_id,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    damage: list[StorageDamaged] = []

    def leave_service(error: StorageDamaged) -> None:
        # Serving on would answer every call on the damaged pages with an error, for good,
        # while heartbeats keep the shards here: stop, and deregister on the way out so the
        # control plane moves them to their replicas now rather than at the lease's expiry.
        damage.append(error)
        log.error("node storage is damaged; leaving service so its shards fail over", error=str(error))
        loop.call_soon_threadsafe(stop.set)

    storage.on_damaged = leave_service
    failing: list[Unavailable] = []

    def leave_service_failing(error: Unavailable) -> None:
        # A full disk: every write of its shards fails (and a primary's trades with them)
        # while its heartbeats keep the shards here. Leave, so its replicas take over.
        failing.append(error)
        log.error("node storage has refused every write for a while; leaving service so its shards fail over",
                  failing_for_s=storage.failing_limit_s, error=str(error))
        loop.call_soon_threadsafe(stop.set)

    storage.on_failing = leave_service_failing
    client = ControlPlaneClient(settings.control_plane)
    holder: list[DataPlane] = []
    participants: list[Participant] = []
    agents: list[NodeAgent] = []
    framed: list[frames.FrameServer] = []
    service = ShardNodeService(
        settings.node_id,
        lambda: agents[0].shard_statuses() if agents else [],
        lambda: holder[0] if holder else None,
        lambda: agents[0].registration.lease_id if agents and agents[0].registration else 0,
        lambda: participants[0] if participants else None,
        auth.ClusterPeers.for_node(
            auth.control_plane_identities(settings.control_plane, settings.control_plane_identity),
            lambda name: bool(holder) and holder[0].is_member(name),
        ),
        lambda: framed[0].port if framed else 0,
    )
    server = await build_server(
        settings.listen,
        [
            ServiceBinding(
                SHARD_NODE_SERVICE,
                service,
                shardnode_pb2_grpc.add_ShardNodeServicer_to_server,
            )
        ],
        max_request_bytes=limits.SHARD_NODE_MAX_REQUEST_BYTES,
        not_ready=[SHARD_NODE_SERVICE],
    )
    host = settings.listen.rsplit(":", 1)[0]
    address = settings.advertise or f"{host}:{server.port}"
    if settings.frames_port >= 0:
        frame_server = frames.FrameServer(
            {
                f"/{SHARD_NODE_SERVICE}/Calls": frames.Method(service.Calls, shardnode_pb2.NodeCalls.FromString),
                f"/{SHARD_NODE_SERVICE}/Replicate": frames.Method(
                    service.Replicate, shardnode_pb2.ReplicateBatch.FromString),
            },
            max_request_bytes=limits.SHARD_NODE_MAX_REQUEST_BYTES,
        )
        await frame_server.start(host, settings.frames_port)
        framed.append(frame_server)
    agent = NodeAgent(
        NodeIdentity(settings.node_id, address, settings.region, settings.zone, settings.capacity),
        client,
        cluster_uid=storage.cluster_uid,
    )
    agent.on_cluster_uid = storage.record_cluster_uid
    agents.append(agent)
    ring = RingRouter(client)
    dataplane = DataPlane(settings.node_id, storage, agent, ring, reclaim_after_s=settings.reclaim_after_s)
    holder.append(dataplane)
    participant = Participant(dataplane, client, escrow_timeout_s=settings.trade_escrow_timeout_s)
    participants.append(participant)
    await dataplane.start()
    await participant.start()
    ring_task = background.start(_start_ring(ring), "ring")
    leave_asked = asyncio.Event()
    readiness_task = background.start(_report_readiness(server, dataplane, leave_asked), "readiness")

    def on_signal() -> None:
        if leave_asked.is_set() or settings.leave_timeout_s <= 0:
            stop.set()  # a second signal, or no graceful leave: stop at once
        else:
            leave_asked.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    leave_task = background.start(_leave_when_asked(agent, leave_asked, stop, settings.leave_timeout_s), "leave")
    log.info(
        "node serving",
        address=address,
        control_plane=",".join(settings.control_plane),
        data_dir=str(settings.data_dir),
        frames_port=framed[0].port if framed else None,
        synchronous=settings.synchronous,
        trade_escrow_timeout_s=settings.trade_escrow_timeout_s,
    )
    code = 0
    try:
        await agent.run(stop)
    except BlueMarbleError as e:
        log.error("node cannot run", error=str(e))
        code = 1
    finally:
        log.info("shutting down")
        await background.stop(leave_task)
        await agent.deregister()
        await background.stop(ring_task)
        await background.stop(readiness_task)
        await ring.stop()
        service.close_streams()  # callers' Calls streams end once their calls in flight are answered
        with contextlib.suppress(Exception):
            await asyncio.gather(server.stop_gracefully(2.0), *(f.stop() for f in framed))
        await participant.stop()
        await dataplane.stop()
        storage.close()
        await client.close()
    if damage:
        return EXIT_STORAGE_DAMAGED
    return EXIT_STORAGE_FAILING if failing else code


async def _leave_when_asked(agent: NodeAgent, asked: asyncio.Event, stop: asyncio.Event, timeout_s: float) -> None:
    """On the first SIGTERM/SIGINT: asks the control plane to drain this node, so its
    primaries are handed over (no trade or write meets a failover) and its copies made
    elsewhere before it goes; the agent then deregisters and sets ``stop`` as after any
    drain. Stops at once if the node is not registered or the control plane declines
    (too few other nodes for its copies), and after ``timeout_s`` in any case."""
    await asked.wait()
    if agent.registration is None or stop.is_set():
        stop.set()
        return
    log.info("stopping: moving this node's roles away first (a second SIGTERM or SIGINT stops at once)",
             within_s=timeout_s, holding=len(agent.shards))
    agent.leave()
    declined = asyncio.ensure_future(agent.leave_declined.wait())
    stopped = asyncio.ensure_future(stop.wait())
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + timeout_s
    lapsed = False
    try:
        while not (declined.done() or stopped.done()):
            left_s = give_up_at - loop.time()
            if left_s <= 0:
                break
            if agent.session_state is SessionState.LOST:
                # No heartbeat got through for a whole lease (the control plane or etcd is
                # unreachable): nobody can record the drain, and the lease ends (or has ended)
                # anyway. Waiting out the timeout would only delay the stop.
                lapsed = True
                break
            await asyncio.wait({declined, stopped}, timeout=min(LEAVE_CHECK_S, left_s),
                               return_when=asyncio.FIRST_COMPLETED)
    finally:
        declined.cancel()
        stopped.cancel()
    if stop.is_set():
        return
    if agent.leave_declined.is_set():
        log.info("the control plane did not drain this node (too few other nodes for its copies); stopping now")
    elif lapsed:
        log.warning("cannot ask for a drain: no heartbeat got through for a whole lease (control plane or etcd "
                    "unreachable); stopping now (its shards fail over)", holding=len(agent.shards))
    else:
        log.warning("roles not all moved away in time; stopping anyway (its shards fail over)",
                    within_s=timeout_s, holding=len(agent.shards))
    stop.set()


async def _report_readiness(server: Server, dataplane: DataPlane, stopping: asyncio.Event | None = None) -> None:
    """Keeps the ShardNode service's health (the readiness probe) and the
    ``bluemarble_node_ready`` gauge on :meth:`DataPlane.not_ready_reason`, logging each
    change with its reason. Once ``stopping`` is set (SIGTERM: the node hands its roles
    over, then leaves) it stays not ready: its roles settling meanwhile must not make it
    ready again."""
    gauge = metrics.NODE_READY.labels(dataplane.node_id)
    gauge.set(0)
    was_ready: bool | None = None
    logged_s = 0.0
    while True:
        if stopping is not None and stopping.is_set():
            reason = "stopping: handing its roles over before it leaves"
        else:
            reason = dataplane.not_ready_reason()
        ready = not reason
        now_s = time.monotonic()
        if ready != was_ready:
            await server.set_serving(ready, SHARD_NODE_SERVICE)
            gauge.set(1 if ready else 0)
        if ready and was_ready is not True:
            log.info("node ready")
        elif not ready and (was_ready or now_s - logged_s >= NOT_READY_LOG_INTERVAL_S):
            # A node that stays not ready says why now and then, not every half second.
            log.info("node not ready", reason=reason)
            logged_s = now_s
        was_ready = ready
        await asyncio.sleep(READINESS_INTERVAL_S)


async def _start_ring(ring: RingRouter) -> None:
    """Fetches the ring, retrying until a control-plane replica answers, then follows it.

    ``ring.start`` gives up after the client's own bounds; a node restarted while no
    replica answers (a leader change, an etcd restart) would then never learn the ring
    and refuse every data-plane call for good, so this keeps trying (jittered backoff)."""
    backoff = retry.Backoff(retry.FOREVER)
    failures = retry.FailureLog()  # one warning, then a summary every few seconds
    while True:
        try:
            await ring.start()
            failures.recovered("ring", time.monotonic(), "ring fetched")
            return
        except BlueMarbleError as e:
            failures.failed("ring", time.monotonic(), "ring not fetched yet; trying again", error=str(e))
            await backoff.sleep()


def main(argv: Sequence[str] | None = None) -> int:
    settings, level, fmt, metrics_listen = parse_args(argv)
    logs.configure(level, fmt)  # type: ignore[arg-type]
    tracing.configure("bluemarble-node")
    if metrics_listen:
        metrics.drop_control_plane_metrics()
        try:
            port = metrics.serve(metrics_listen)
        except OSError as e:
            log.error("node cannot serve metrics", listen=metrics_listen, error=str(e))
            return 1
        log.info("serving metrics", listen=metrics_listen, port=port)
    try:
        return event_loop.run(run(settings), server=True)
    except StorageDamaged as e:
        log.error("node cannot start: its storage is damaged", error=str(e))
        return EXIT_STORAGE_DAMAGED
    except (BlueMarbleError, OSError) as e:
        # Storage errors name the data dir (it is not a directory, cannot be created, is in
        # use, belongs to another node); an OSError is some other resource of the process.
        log.error("node cannot start", error=str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
