"""One control-plane replica: etcd connection, config bootstrap, gRPC server.

:class:`ControlPlaneApp` is what ``bluemarble-controlplane`` runs and what integration
tests start in-process. Start-up order: check that the listen address can be bound,
connect to etcd (bounded by a start-up timeout), read the cluster config, identity and
ring and create whichever is absent, then serve. Each is read first, so that a restart
while etcd refuses writes (out of space) writes nothing and serves; a write etcd refuses
is retried within the start-up timeout. The listen check comes first so that a replica
that could never serve does not create a new cluster's config and ring in etcd.
Shutdown: health NOT_SERVING, drain calls in flight, close etcd.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from bluemarble.api import cluster_config
from bluemarble.api.conversions import holds_role
from bluemarble.core import limits
from bluemarble.core.errors import Unavailable
from bluemarble.core.ids import NodeId
from bluemarble.core.ring import Ring
from bluemarble.runtime import background, frames, metrics, retry
from bluemarble.runtime.auth import AdminToken, ServerAuth
from bluemarble.runtime.clock import Clock, SystemClock
from bluemarble.runtime.grpc_server import STOPPING_TRAILER, Server, ServiceBinding, build_server, check_listen
from bluemarble.v1 import common_pb2, controlplane_pb2, controlplane_pb2_grpc, trade_pb2, trade_pb2_grpc
from controlplane.server.crash_watch import CrashWatch
from controlplane.server.election import Election
from controlplane.server.node_probe import NodeProbe
from controlplane.server.reconciler import Reconciler
from controlplane.server.registry import NodeRegistry
from controlplane.server.service import ControlPlaneDeps, ControlPlaneService
from controlplane.server.trades import (
    Locator,
    TradeCoordinator,
    TradeCoordinatorService,
    TradeSettings,
    TradeSweep,
)
from controlplane.store.config_store import ConfigStore
from controlplane.store.etcd import EtcdSecurity, EtcdStore
from controlplane.store.keys import KeySchema
from controlplane.store.records import (
    decode_assignment,
    decode_config,
    decode_force_promotion,
    decode_node,
    decode_ring,
)
from controlplane.store.ring_store import ensure_ring
from controlplane.store.trade_store import TradeStore
from controlplane.store.watchcache import PrefixCache

log = structlog.get_logger(__name__)

T = TypeVar("T")

GAUGE_REFRESH_S = 1.0
"""How often the mirror-derived gauges (registered nodes, shards without a primary) are
recomputed: O(shards) each time, instead of on every node record change of a burst."""


@dataclass(frozen=True)
class ControlPlaneSettings:
    listen: str
    etcd_endpoints: tuple[str, ...]
    cluster: str = "default"
    lease_ttl_s: int = 10
    replication_factor: int = 3
    shards: int = 16
    etcd_startup_timeout_s: float = 30.0
    etcd_rpc_timeout_s: float = 3.0
    replica_id: str = ""
    shutdown_grace_s: float = 5.0
    crash_grace_ms: int = 300
    """After a node's heartbeat stream closes from its side, how long it has to heartbeat
    again before its address is checked and, if refused, its lease revoked (0: off)."""
    trades: TradeSettings = field(default_factory=TradeSettings)
    """The trade coordinator's timeouts, the decision records' retention and the sweep."""
    admin_token: AdminToken | None = None
    """Required (as a bearer token) by admin RPCs; None: admin RPCs are open. Client
    certificates are checked against node ids when the process serves mutual TLS
    (:func:`bluemarble.runtime.tls.configure`)."""
    node_id_pattern: re.Pattern[str] | None = None
    """Node ids must match it in full to register or act as a node (None: any id)."""
    etcd_security: EtcdSecurity | None = None
    """TLS and user/password to etcd (None: plaintext, no authentication)."""
    frames_port: int = 0
    """The framed port for ExecuteTrades streams on the --listen host (0: a free one, -1:
    none): bluemarble.runtime.frames."""
    # Flags given explicitly on the command line (vs defaults), to warn on config drift.
    explicit: frozenset[str] = field(default_factory=frozenset)
    backup_dir: str = ""
    """Set: take one etcd backup into this directory and exit (no replica runs)."""
    backup_keep: int = 24
    """Backups of the cluster kept in ``backup_dir`` (the newest)."""


class ControlPlaneApp:
    def __init__(self, settings: ControlPlaneSettings, clock: Clock | None = None):
        self.settings = settings
        self.keys = KeySchema(settings.cluster)
        self.clock = clock or SystemClock()
        self.store = EtcdStore(
            settings.etcd_endpoints,
            rpc_timeout_s=settings.etcd_rpc_timeout_s,
            clock=self.clock,
            security=settings.etcd_security,
        )
        self.server: Server | None = None
        self.frame_server: frames.FrameServer | None = None
        self.nodes: PrefixCache[common_pb2.Node] | None = None
        self.cluster_uid = ""  # read (or made) at start
        self.assignments: PrefixCache[common_pb2.Assignment] | None = None
        self.ring: PrefixCache[Ring] | None = None
        self.election: Election | None = None
        self.reconciler: Reconciler | None = None
        self.probe: NodeProbe | None = None
        self.config_mirror: PrefixCache[common_pb2.ClusterConfig] | None = None
        self.forced: PrefixCache[controlplane_pb2.ForcePromoteRequest] | None = None
        self.crash_watch: CrashWatch | None = None
        self.trade_store: TradeStore | None = None
        self.trade_coordinator: TradeCoordinator | None = None
        self.trade_sweep: TradeSweep | None = None
        self._gauges: asyncio.Task[None] | None = None

    @property
    def replica_id(self) -> str:
        return self.settings.replica_id or f"{socket.gethostname()}/{self.settings.listen}"

    @property
    def address(self) -> str:
        assert self.server is not None
        host = self.settings.listen.rsplit(":", 1)[0]
        return f"{host}:{self.server.port}"

    async def start(self) -> None:
        """Connects to etcd, bootstraps the config and starts serving.

        Raises Unavailable when etcd does not answer within the start-up timeout (or keeps
        refusing, out of space, a record that is absent and must be created), or the
        listen address cannot be bound; CorruptRecord when a stored config or ring does not
        decode or the config is invalid.
        """
        s = self.settings
        await check_listen(s.listen)  # before etcd: a port in use is said at once
        await self.store.connect(s.etcd_startup_timeout_s)
        configs = ConfigStore(self.store, self.keys)
        defaults = cluster_config.default_config(
            replication_factor=s.replication_factor, lease_ttl_s=s.lease_ttl_s, shard_count=s.shards
        )
        stored, _ = await self._bootstrap("the cluster config", lambda: configs.ensure(defaults))
        self.cluster_uid = await self._bootstrap("the cluster identity", configs.ensure_cluster_uid)
        self._warn_on_drift(stored)
        await self._bootstrap("the ring", lambda: ensure_ring(self.store, self.keys, stored))
        self.nodes = PrefixCache(self.store, self.keys.nodes_prefix(), decode_node, name="nodes", clock=self.clock)
        self.assignments = PrefixCache(
            self.store, self.keys.assignments_prefix(), decode_assignment, name="assignments", clock=self.clock
        )
        self.ring = PrefixCache(self.store, self.keys.ring(), decode_ring, name="ring", clock=self.clock)
        self.config_mirror = PrefixCache(self.store, self.keys.config(), decode_config, name="config", clock=self.clock)
        self.forced = PrefixCache(
            self.store, self.keys.force_promotions_prefix(), decode_force_promotion, name="force-promote",
            clock=self.clock,
        )
        for cache in (self.nodes, self.assignments, self.ring, self.config_mirror, self.forced):
            await cache.start()
        self.election = Election(
            self.store, self.keys, self.replica_id, s.listen, ttl_s=stored.lease_ttl_s, clock=self.clock
        )
        self.probe = NodeProbe(replica_id=self.replica_id)
        registry = NodeRegistry(self.store, self.keys, self.clock, self.nodes)
        nodes = self.nodes

        def registration(node: NodeId) -> tuple[int, str] | None:
            record = nodes.entries.get(self.keys.node(node))
            return None if record is None else (record.lease_id, record.address)

        self.crash_watch = CrashWatch(
            clock=self.clock,
            grace_s=s.crash_grace_ms / 1000,
            registration=registration,
            refuses_connections=self.probe.refuses_connections,
            revoke=registry.revoke,
        )
        self.reconciler = Reconciler(
            store=self.store,
            keys=self.keys,
            election=self.election,
            nodes=self.nodes,
            assignments=self.assignments,
            ring=self.ring,
            configs=configs,
            probe=self.probe,
            clock=self.clock,
            forced=self.forced,
        )
        server_auth = ServerAuth.for_process(s.admin_token, s.node_id_pattern)
        deps = ControlPlaneDeps(
            replica_id=self.replica_id,
            keys=self.keys,
            store=self.store,
            registry=registry,
            config=configs,
            clock=self.clock,
            nodes=self.nodes,
            assignments=self.assignments,
            ring=self.ring,
            election=self.election,
            placement_hold=lambda: self.reconciler.holding if self.reconciler else "",
            probe=self.probe,
            crash_watch=self.crash_watch,
            config_mirror=self.config_mirror,
            auth=server_auth,
            cluster_uid=self.cluster_uid,
            forced=self.forced,
        )
        self.trade_store = TradeStore(self.store, self.keys, self.clock, retention_s=s.trades.retention_s)
        locator = Locator(self.keys, self.ring, self.assignments, self.nodes)
        self.trade_coordinator = TradeCoordinator(
            self.replica_id, locator, self.trade_store, self.clock, s.trades
        )
        self.trade_sweep = TradeSweep(self.trade_coordinator, self.trade_store, self.election, self.clock, s.trades)
        trade_service = TradeCoordinatorService(self.trade_coordinator, self.trade_store, locator, server_auth)
        self.server = await build_server(
            s.listen,
            [
                ServiceBinding(
                    controlplane_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name,
                    ControlPlaneService(deps),
                    controlplane_pb2_grpc.add_ControlPlaneServicer_to_server,
                ),
                ServiceBinding(
                    trade_pb2.DESCRIPTOR.services_by_name["TradeCoordinator"].full_name,
                    trade_service,
                    trade_pb2_grpc.add_TradeCoordinatorServicer_to_server,
                ),
            ],
            max_request_bytes=limits.CONTROL_PLANE_MAX_REQUEST_BYTES,
        )
        if s.frames_port >= 0:
            self.frame_server = frames.FrameServer(
                {"/bluemarble.v1.TradeCoordinator/ExecuteTrades": frames.Method(
                    trade_service.ExecuteTrades, trade_pb2.TradeCalls.FromString)},
                max_request_bytes=limits.CONTROL_PLANE_MAX_REQUEST_BYTES,
            )
            await self.frame_server.start(s.listen.rsplit(":", 1)[0], s.frames_port)
            trade_service.frames_port = lambda: self.frame_server.port if self.frame_server else 0
        await self.election.start()
        await self.reconciler.start()
        await self.trade_store.start()
        await self.trade_sweep.start()
        self._gauges = background.start(self._refresh_gauges(), "metrics-gauges")
        log.info(
            "control plane serving",
            address=self.address,
            cluster=s.cluster,
            etcd=",".join(s.etcd_endpoints),
            replica=self.replica_id,
            frames_port=self.frame_server.port if self.frame_server else None,
        )

    async def _bootstrap(self, record: str, ensure: Callable[[], Awaitable[T]]) -> T:
        """Runs one create-if-absent step of start-up (``record``: what it reads or makes),
        retrying what may pass (etcd not answering, or out of space while the record is
        truly absent: each step reads first, so a record that exists needs no write) for up
        to ``etcd_startup_timeout_s``, as waiting for etcd does; each failure is logged
        (the first a warning naming the record and etcd's error, then a summary every few
        seconds). Raises Unavailable naming the record once the time is up, and anything
        fatal (a stored record that does not decode) at once."""
        timeout_s = self.settings.etcd_startup_timeout_s
        try:
            return await retry.call(
                ensure,
                what=f"start-up: reading or creating {record} in etcd",
                policy=retry.RetryPolicy(deadline_s=timeout_s),
                clock=self.clock,
            )
        except Unavailable as e:
            raise Unavailable(f"could not read or create {record} in etcd within {timeout_s:g} s: {e}") from e

    def refresh_gauges(self) -> None:
        """Sets ``bluemarble_registered_nodes`` and ``bluemarble_shards_without_primary``
        from this replica's mirrors. A shard counts as without a primary when its record
        is missing, names none, or names a node that is not registered (its lease ended
        and no replica has been promoted yet) or registered again since it was given the
        role (a restart: its copy may be gone)."""
        if self.nodes is None or self.assignments is None or self.ring is None:
            return
        nodes = self.nodes.entries
        metrics.REGISTERED_NODES.set(len(nodes))
        ring = self.ring.entries.get(self.keys.ring())
        if ring is None:
            return
        assignments = self.assignments.entries
        leases = {n.node_id: n.lease_id for n in nodes.values()}
        missing = 0
        for shard in ring.shard_ids:
            a = assignments.get(self.keys.assignment(shard))
            if a is None or not holds_role(a, a.primary, leases):
                missing += 1
        metrics.SHARDS_WITHOUT_PRIMARY.set(missing)

    async def _refresh_gauges(self) -> None:
        while True:
            self.refresh_gauges()
            await self.clock.sleep(GAUGE_REFRESH_S)

    def _warn_on_drift(self, stored: object) -> None:
        s = self.settings
        asked = {
            "lease_ttl_s": s.lease_ttl_s,
            "replication_factor": s.replication_factor,
            "shard_count": s.shards,
        }
        for name, value in asked.items():
            current = getattr(stored, name)
            if name in s.explicit and current != value:
                log.warning(
                    "flag differs from the stored cluster config; the stored value applies "
                    "(change it with SetConfig)",
                    setting=name,
                    flag=value,
                    stored=current,
                )

    async def _end_streams(self) -> None:
        assert self.server is not None
        reason = f"control-plane replica {self.replica_id} is shutting down; reconnect to another replica"
        ended = await self.server.end_streams(reason)
        if self.frame_server is not None:
            ended += self.frame_server.end_streams(reason, STOPPING_TRAILER)
        log.info("streams ended for shutdown", replica=self.replica_id, streams=ended)

    async def stop(self) -> None:
        """Stops reconciling, resigns leadership (so another replica takes over at
        once), ends watch streams, drains calls in flight, then closes etcd. Each step
        is bounded, so a stuck dependency cannot hold the process forever."""
        steps: list[tuple[str, Awaitable[None] | None]] = [
            # First: the heartbeat streams this shutdown ends are not node crashes.
            ("crash watch", self.crash_watch.close() if self.crash_watch else None),
            ("metrics gauges", background.stop(self._gauges)),
            ("reconciler", self.reconciler.stop() if self.reconciler else None),
            ("trade sweep", self.trade_sweep.stop() if self.trade_sweep else None),
            ("election", self.election.stop() if self.election else None),
            # Watches and heartbeat streams never end by themselves: ended now, their
            # clients move to another replica at once instead of when the grace runs out.
            ("streams", self._end_streams() if self.server else None),
            *[
                (c.name, c.stop())
                for c in (self.nodes, self.assignments, self.ring, self.config_mirror, self.forced)
                if c is not None
            ],
            (
                "server",
                self.server.stop_gracefully(self.settings.shutdown_grace_s) if self.server else None,
            ),
            ("framed port", self.frame_server.stop(self.settings.shutdown_grace_s) if self.frame_server else None),
            # After the server: trades still running (their callers may have gone) stop,
            # then the records that trades finishing during the drain queued are written.
            ("trades", self.trade_coordinator.close() if self.trade_coordinator else None),
            ("trade retention", self.trade_store.stop() if self.trade_store else None),
            ("etcd", self.store.close()),
        ]
        for name, step in steps:
            if step is None:
                continue
            try:
                async with asyncio.timeout(self.settings.shutdown_grace_s + 5.0):
                    await step
            except TimeoutError:
                log.error("shutdown step timed out; continuing", step=name)
        self.server = None
        self.frame_server = None
        log.info("control plane stopped", replica=self.replica_id)
