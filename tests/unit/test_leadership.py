"""Election and reconciler driven by a fake clock and an in-memory etcd: no real waiting.

What a leader must never do is write after it stopped being leader. These tests depose
it in the three ways that happen in production (another term took the key while it was
paused, its key was deleted, its session cannot be refreshed) and check that it writes
nothing and stops acting in time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import structlog

from bluemarble.api.conversions import assignment_to_proto
from bluemarble.core.ids import NodeId, ShardId, shard_id
from bluemarble.core.placement import PlacementNode, ShardAssignment
from bluemarble.core.replication.position import ZERO, LogPosition
from bluemarble.core.ring import initial_ring
from bluemarble.runtime.clock import FakeClock
from bluemarble.v1 import common_pb2, controlplane_pb2, shardnode_pb2
from controlplane.server import reconciler as reconciler_module
from controlplane.server.election import Election
from controlplane.server.node_probe import CopyView, FencedCopy
from controlplane.server.reconciler import Reconciler
from controlplane.store import codec
from controlplane.store.etcd import Compare, Delete
from controlplane.store.keys import KeySchema
from controlplane.store.records import decode_assignment, decode_force_promotion, decode_node
from tests.unit.fake_etcd import FakeEtcd, FakeMirror, TxnRecord

TTL_S = 10
SHARDS = 4


class FakeConfigs:
    def __init__(self, replication_factor: int = 3) -> None:
        self.config = common_pb2.ClusterConfig(
            replication_factor=replication_factor, lease_ttl_s=TTL_S, max_moves_per_round=32
        )

    async def get(self) -> tuple[common_pb2.ClusterConfig, int]:
        return self.config, 1


class FakeProbe:
    """Every node answers, except those in ``silent``. Fences and position reads answer
    ``copies`` (by default (1, 1) with data); fences are recorded in ``fences``."""

    def __init__(self) -> None:
        self.silent: set[str] = set()
        self.refusing: set[str] = set()  # addresses whose process is gone (connections refused)
        self.copies: dict[tuple[str, str], LogPosition | None] = {}  # None: no data
        self.fences: list[tuple[NodeId, dict[ShardId, int]]] = []
        self.fenced_at: dict[tuple[str, str], int] = {}  # a copy already fenced higher than asked
        self.reports: dict[str, list[common_pb2.ShardStatus]] = {}  # GetShardStatus answers by node
        self.records: Callable[[], Iterable[common_pb2.Assignment]] | None = None  # the stored records
        self.counting: dict[tuple[str, str], frozenset[NodeId]] = {}  # a primary's replicas, if not the record's

    async def reachable(self, addresses: Mapping[NodeId, str]) -> set[NodeId]:
        return {n for n in addresses if n not in self.silent}

    async def refuses_connections(self, address: str) -> bool:
        return address in self.refusing

    async def statuses(self, addresses: Mapping[NodeId, str]) -> dict[NodeId, shardnode_pb2.GetShardStatusResponse]:
        return {n: shardnode_pb2.GetShardStatusResponse(node_id=n, shards=self.statuses_of(n))
                for n in addresses if n not in self.silent}

    def statuses_of(self, node: str) -> list[common_pb2.ShardStatus]:
        """``reports[node]`` if set; else what a node applying the stored records at once
        reports: each of its roles, serving, caught up."""
        if node in self.reports or self.records is None:
            return self.reports.get(node, [])
        out = []
        for a in self.records():
            role = (common_pb2.SHARD_ROLE_PRIMARY if a.primary == node
                    else common_pb2.SHARD_ROLE_REPLICA if node in a.replicas else None)
            if role is not None:
                out.append(common_pb2.ShardStatus(shard_id=a.shard_id, epoch=a.epoch, role=role, serving=True))
        return out

    async def positions(
        self, addresses: Mapping[NodeId, str], shards: Iterable[ShardId]
    ) -> dict[tuple[ShardId, NodeId], LogPosition]:
        asked = list(shards)
        return {(shard, node): last for node in addresses if node not in self.silent for shard in asked
                if (last := self.copies.get((shard, node), LogPosition(1, 1))) is not None}

    async def views(
        self, addresses: Mapping[NodeId, str], shards: Iterable[ShardId]
    ) -> dict[tuple[ShardId, NodeId], CopyView]:
        """A primary of the stored records counts the replicas they name, unless
        ``counting`` says otherwise (a primary that has not applied the latest record)."""
        records = {ShardId(a.shard_id): a for a in self.records()} if self.records else {}
        views = {}
        for (shard, node), last in (await self.positions(addresses, shards)).items():
            a = records.get(shard)
            counts = self.counting.get((shard, node))
            if counts is None and a is not None and a.primary == node:
                counts = frozenset(NodeId(r) for r in a.replicas)
            views[(shard, node)] = CopyView(last, counts)
        return views

    async def fence(
        self, targets: Mapping[NodeId, tuple[str, Mapping[ShardId, int]]]
    ) -> dict[NodeId, dict[ShardId, FencedCopy] | None]:
        answers: dict[NodeId, dict[ShardId, FencedCopy] | None] = {}
        for node, (_, epochs) in targets.items():
            if node in self.silent:
                answers[node] = None
                continue
            self.fences.append((node, dict(epochs)))
            answers[node] = {}
            for shard, epoch in epochs.items():
                last = self.copies.get((shard, node), LogPosition(1, 1))
                fenced = max(epoch, self.fenced_at.get((shard, node), 0))
                answers[node][shard] = FencedCopy(fenced, last or ZERO, last is not None)  # type: ignore[index]
        return answers


class RingMirror:
    def __init__(self, keys: KeySchema) -> None:
        self.name = "ring"
        self.entries = {keys.ring(): initial_ring(SHARDS, vnodes=8)}
        self.revision = 1
        self.healthy = True

    def add_listener(self, callback: Any) -> None:
        pass


def address_of(node_id: str) -> str:
    return f"10.0.0.1:{7000 + sum(map(ord, node_id))}"  # distinct for n0..n9


@dataclass
class World:
    clock: FakeClock
    etcd: FakeEtcd
    keys: KeySchema
    probe: FakeProbe

    async def add_node(self, node_id: str, zone: str) -> int:
        lease, _ = await self.etcd.grant_lease(TTL_S)
        node = common_pb2.Node(node_id=node_id, address=address_of(node_id), zone=zone,
                               capacity=1, lease_id=lease, state=common_pb2.NODE_STATE_ACTIVE)
        await self.etcd.put(self.keys.node(NodeId(node_id)), codec.encode(node), lease=lease)
        return lease

    def keep_alive(self, leases: Callable[[], Iterable[int]]) -> asyncio.Task[None]:
        """Refreshes the leases ``leases()`` names every second (the nodes heartbeat), until
        the task is cancelled."""

        async def beat() -> None:
            while True:
                for lease in leases():
                    await self.etcd.keepalive(lease)
                await self.clock.sleep(1.0)

        return asyncio.ensure_future(beat())

    def assignments(self) -> dict[str, common_pb2.Assignment]:
        prefix = self.keys.assignments_prefix()
        return {k: decode_assignment(kv) for k, kv in self.etcd.kvs.items() if k.startswith(prefix)}

    def assignment_txns(self) -> list[TxnRecord]:
        """Transactions that write assignments (the leader's placement writes)."""
        prefix = self.keys.assignments_prefix()
        return [t for t in self.etcd.txn_log if any(getattr(op, "key", "").startswith(prefix) for op in t.success)]


@pytest.fixture
async def world() -> AsyncIterator[World]:
    clock = FakeClock()
    etcd = FakeEtcd(clock)
    lessor = asyncio.create_task(etcd.run_lessor())
    world = World(clock, etcd, KeySchema("test"), FakeProbe())
    world.probe.records = lambda: world.assignments().values()  # primaries apply records at once
    yield world
    lessor.cancel()
    await etcd.close()
    with contextlib.suppress(asyncio.CancelledError):
        await lessor


def make_reconciler(world: World, election: Election, **kwargs: Any) -> Reconciler:
    return Reconciler(
        store=world.etcd,  # type: ignore[arg-type]
        keys=world.keys,
        election=election,
        nodes=FakeMirror(world.etcd, world.keys.nodes_prefix(), decode_node, "nodes"),  # type: ignore[arg-type]
        assignments=FakeMirror(  # type: ignore[arg-type]
            world.etcd, world.keys.assignments_prefix(), decode_assignment, "assignments"
        ),
        ring=RingMirror(world.keys),  # type: ignore[arg-type]
        configs=FakeConfigs(),  # type: ignore[arg-type]
        probe=world.probe,  # type: ignore[arg-type]
        clock=world.clock,
        plan_off_loop=False,  # a planning thread's real time would let the fake clock run ahead
        **kwargs,
    )


async def elect(world: World, name: str = "cp-0") -> Election:
    election = Election(world.etcd, world.keys, name, "127.0.0.1:7000", TTL_S, clock=world.clock)  # type: ignore[arg-type]
    await election.start()
    for _ in range(100):
        if election.leadership is not None:
            return election
        await world.clock.advance(0.05)
    raise AssertionError("no leader elected")


async def placed_cluster(
    world: World, zones: str, **kwargs: Any
) -> tuple[dict[str, int], Election, Reconciler]:
    """A node per zone (n0, n1, ...), an elected leader and its reconciler, 3 s on: the
    shards placed. Returns the nodes' leases, the election and the reconciler."""
    leases = {f"n{i}": await world.add_node(f"n{i}", zone) for i, zone in enumerate(zones)}
    election = await elect(world)
    reconciler = make_reconciler(world, election, **kwargs)
    await reconciler.start()
    await world.clock.advance(3.0)
    return leases, election, reconciler


async def test_a_leader_whose_key_is_deleted_steps_down_at_once(world: World) -> None:
    election = await elect(world)
    first = election.leadership
    assert first is not None
    ended_at: list[float] = []
    election.add_listener(lambda: ended_at.append(world.clock.monotonic_s()) if election._leadership is None else None)
    started = world.clock.monotonic_s()
    await world.etcd.delete(world.keys.leader())
    await world.clock.advance(0.02)
    assert ended_at and ended_at[0] - started < 0.05  # at once, not after a TTL
    # It campaigns again and wins a new term with a new fencing token.
    await world.clock.advance(1.0)
    second = election.leadership
    assert second is not None and second.token > first.token and election.terms == 2
    await election.stop()


def stepped_down_at(world: World, election: Election) -> list[float]:
    """The clock's times at which ``election`` lost its term, from now on."""
    ended_at: list[float] = []
    election.add_listener(lambda: ended_at.append(world.clock.monotonic_s()) if election._leadership is None else None)
    return ended_at


async def test_a_leader_whose_key_is_rewritten_without_its_lease_steps_down_and_the_key_is_replaced(
    world: World,
) -> None:
    """`etcdctl put .../leader 'garbage{'` detaches the key from the leader's lease and
    keeps its create revision: the leader went on acting, and the key, which never
    expires, kept every later campaign out. Now the leader steps down at once, and a
    campaign removes the leaseless key (a delete guarded by its mod revision) and wins a
    new term with a new token."""
    election = await elect(world)
    first = election.leadership
    assert first is not None
    ended_at = stepped_down_at(world, election)
    key = world.keys.leader()
    with structlog.testing.capture_logs() as logged:
        started = world.clock.monotonic_s()
        garbage_revision = await world.etcd.put(key, b"garbage{")
        assert world.etcd.kvs[key].create_revision == first.token  # the old guard would still pass
        await world.clock.advance(0.02)
        assert ended_at and ended_at[0] - started < 0.05  # at once
        await world.clock.advance(3.0)
    second = election.leadership
    assert second is not None and second.token > first.token and election.terms == 2
    assert world.etcd.kvs[key].lease == second.lease_id
    removals = [t for t in world.etcd.txn_log if any(isinstance(op, Delete) and op.key == key for op in t.success)]
    assert [(t.compares, t.succeeded) for t in removals] == [((Compare.mod_revision(key, garbage_revision),), True)]
    events = [e["event"] for e in logged if e["log_level"] == "warning"]
    assert any(e.startswith("leader key rewritten behind this leader's back") for e in events), events
    assert any(e.startswith("the leader key is attached to no lease") for e in events), events
    await election.stop()


async def test_a_leader_whose_key_gets_another_value_under_its_lease_steps_down_and_is_elected_again(
    world: World,
) -> None:
    """A value rewritten under the leader's own lease: the key is not what it wrote (status
    shows "(unreadable)"). It steps down; revoking its lease removes the key; a new term
    follows."""
    election = await elect(world)
    first = election.leadership
    assert first is not None
    ended_at = stepped_down_at(world, election)
    started = world.clock.monotonic_s()
    await world.etcd.put(world.keys.leader(), b"garbage{", lease=first.lease_id)
    await world.clock.advance(0.02)
    assert ended_at and ended_at[0] - started < 0.05  # at once
    await world.clock.advance(3.0)
    second = election.leadership
    assert second is not None and second.token > first.token
    await election.stop()


async def test_verify_finds_a_key_detached_from_the_leaders_lease_is_no_longer_its_own(world: World) -> None:
    """A detached key keeps its create revision (the token): verify looks at the lease
    too, so a leader whose watch is stalled still steps down when it re-checks."""
    election = await elect(world)
    assert election.leadership is not None
    world.etcd.hold_watches = True
    await world.etcd.put(world.keys.leader(), b'{"replica_id": "cp-0"}')  # same token, no lease
    assert not await election.verify()
    assert election.leadership is None
    await world.etcd.release_watches()
    await election.stop()


async def test_a_leaseless_leader_key_left_behind_does_not_keep_a_new_replica_out(world: World) -> None:
    """The garbage key outlived its leader (killed and restarted): nobody was ever elected.
    A campaigner now removes it and is elected."""
    await world.etcd.put(world.keys.leader(), b"garbage{")
    election = await elect(world, "cp-1")  # raises unless elected within 5 s
    assert election.leadership is not None
    await election.stop()


async def test_a_campaigner_never_removes_a_leader_key_attached_to_a_live_lease(world: World) -> None:
    """Whatever its value, a key attached to a lease may be a live leader's: campaigners
    wait for it to go (its lease ends) and never delete it."""
    other_lease, _ = await world.etcd.grant_lease(TTL_S)
    await world.etcd.put(world.keys.leader(), b"garbage{", lease=other_lease)
    alive = world.keep_alive(lambda: [other_lease])
    election = Election(world.etcd, world.keys, "cp-1", "127.0.0.1:7001", TTL_S, clock=world.clock)  # type: ignore[arg-type]
    await election.start()
    try:
        await world.clock.advance(3 * TTL_S)
        assert election.leadership is None
        assert world.etcd.kvs[world.keys.leader()].lease == other_lease
        assert not [t for t in world.etcd.txn_log if any(isinstance(op, Delete) for op in t.success)]
        alive.cancel()
        await world.clock.advance(TTL_S + 3.0)  # the lease runs out: the key goes with it
        assert election.leadership is not None
    finally:
        alive.cancel()
        await election.stop()


async def test_a_leader_that_cannot_refresh_stops_acting_before_its_lease_could_expire(world: World) -> None:
    for i, zone in enumerate("abc"):
        await world.add_node(f"n{i}", zone)
    election = await elect(world)
    term = election.leadership
    assert term is not None
    lease_granted_at = world.clock.monotonic_s()  # an upper bound: granted just before
    reconciler = make_reconciler(world, election)
    await reconciler.start()
    await world.clock.advance(2.0)
    assert len(world.assignments()) == SHARDS  # it acted while it was leader

    ended: list[float] = []
    election.add_listener(lambda: ended.append(world.clock.monotonic_s()) if election._leadership is None else None)
    world.etcd.hang_keepalive = True  # refreshes are sent, never answered
    await world.clock.advance(2 * TTL_S)
    assert ended, "the leader never stopped acting"
    # No refresh was acknowledged after the grant (the first one is due at TTL/3, after
    # the keepalives started hanging), so the lease may expire TTL after the grant; the
    # term ended a safety margin before that, not when etcd deleted the key.
    assert ended[0] <= lease_granted_at + TTL_S - 1.0, ended[0] - lease_granted_at
    # Nothing was written under the old term's token after it ended.
    old_guard = term.guard(world.keys)
    late = [t for t in world.assignment_txns() if old_guard in t.compares and t.at_s >= ended[0]]
    assert late == []
    await reconciler.stop()
    await election.stop()


async def test_a_deposed_leader_writes_nothing_and_rechecks_instead_of_replanning(world: World) -> None:
    for i, zone in enumerate("abc"):
        await world.add_node(f"n{i}", zone)
    election = await elect(world)
    old_term = election.leadership
    assert old_term is not None
    # While this replica was paused, its key went to another replica's term; the watch
    # that would have told it is stalled, so it still believes it leads.
    world.etcd.hold_watches = True
    await world.etcd.delete(world.keys.leader())
    other_lease, _ = await world.etcd.grant_lease(TTL_S)
    await world.etcd.put(world.keys.leader(), b'{"replica_id": "cp-1"}', lease=other_lease)
    assert election.leadership is old_term

    reconciler = make_reconciler(world, election)
    await reconciler.start()
    await world.clock.advance(10.0)
    # One guarded write was tried and failed; then the leader re-checked and stepped down.
    assert [t.succeeded for t in world.assignment_txns()] == [False]
    assert election.leadership is None
    assert world.assignments() == {}  # nothing was written
    await reconciler.stop()
    await election.stop()


async def test_moves_are_held_after_a_mass_expiry_until_the_nodes_come_back(world: World) -> None:
    leases, election, reconciler = await placed_cluster(world, "abcd")
    placed = world.assignments()
    assert len(placed) == SHARDS and all(a.primary for a in placed.values())

    # Two of four leases end at once (an etcd hiccup, not two crashes): hold, don't move.
    for node in ("n0", "n1"):
        await world.etcd.revoke_lease(leases[node])
    await world.clock.advance(1.5)
    assert reconciler.holding
    assert world.assignments() == placed
    # They come back (new leases, same ids): the hold ends and nothing moved. Being new
    # incarnations, n0 and n1 lost their primaries, which go through fence-then-promote
    # at a higher epoch: their disks hold the newest entries, so they win them back.
    for a in placed.values():
        world.probe.copies[(a.shard_id, a.primary)] = LogPosition(1, 9)
    await world.add_node("n0", "a")
    await world.add_node("n1", "b")
    await world.clock.advance(2.0)
    assert not reconciler.holding
    after = world.assignments()
    for key, a in placed.items():
        b = after[key]
        reborn = a.primary in ("n0", "n1")
        assert (b.primary, list(b.replicas)) == (a.primary, list(a.replicas)) or reborn
        assert b.primary == a.primary and set(b.replicas) == set(a.replicas)
        assert b.epoch == a.epoch + reborn
    await reconciler.stop()
    await election.stop()


GONE = ("n0", "n1")


def _failed_over(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Every shard whose primary is gone has a live one now, but for the shards that
    also lost a replica that may hold their latest acknowledged writes (R = 3, one ack
    per write): those wait for a gone node to come back, and keep their record."""
    for shard, a in before.items():
        if a.primary not in GONE:
            continue
        waits = any(r in GONE for r in a.replicas)
        if waits != (after[shard].primary in GONE):
            return False
    return True


async def test_two_crashes_in_a_row_are_not_held_as_a_mass_expiry(world: World) -> None:
    leases, election, reconciler = await placed_cluster(world, "abcd")
    before = world.assignments()
    assert any(a.primary in GONE and any(r in GONE for r in a.replicas) for a in before.values())
    # Two leases end, and their addresses refuse connections: the processes are gone.
    world.probe.refusing = {address_of(n) for n in GONE}
    for node in GONE:
        await world.etcd.revoke_lease(leases[node])
    # Failed over within a few seconds (a hold would last 2 TTLs, 20 s). Planning runs in
    # a thread, on the real clock: a busy machine stretches rounds in fake time too.
    for _ in range(40):
        await world.clock.advance(0.25)
        if _failed_over(before, world.assignments()):
            break
    assert not reconciler.holding
    assert _failed_over(before, world.assignments())
    await reconciler.stop()
    await election.stop()


async def test_held_moves_happen_once_the_hold_ends_without_the_nodes(world: World) -> None:
    leases, election, reconciler = await placed_cluster(world, "abcd", hold_s=4.0)
    before = world.assignments()
    for node in GONE:
        await world.etcd.revoke_lease(leases[node])
    await world.clock.advance(2.0)
    assert world.assignments() == before  # held: nothing moves
    await world.clock.advance(4.0)
    after = world.assignments()
    assert _failed_over(before, after)
    # The shards whose primary lives got copies elsewhere in place of the gone nodes.
    assert all(not set(a.replicas) & set(GONE) for a in after.values() if a.primary not in GONE)
    assert any(set(a.replicas) & set(GONE) for a in before.values() if a.primary not in GONE)
    await reconciler.stop()
    await election.stop()


async def test_a_node_that_does_not_answer_gets_no_role(world: World) -> None:
    world.probe.silent = {"n3"}
    for i, zone in enumerate("abcd"):
        await world.add_node(f"n{i}", zone)
    election = await elect(world)
    reconciler = make_reconciler(world, election)
    await reconciler.start()
    await world.clock.advance(5.0)
    roles = [m for a in world.assignments().values() for m in (a.primary, *a.replicas)]
    assert len(roles) == SHARDS * 3 and "n3" not in roles
    world.probe.silent = set()  # it answers now: the next probe lets it in
    await world.clock.advance(5.0)
    roles = [m for a in world.assignments().values() for m in (a.primary, *a.replicas)]
    assert "n3" in roles
    await reconciler.stop()
    await election.stop()


async def test_an_unreadable_assignment_is_replaced_above_its_epoch_floor(world: World) -> None:
    for i, zone in enumerate("abc"):
        await world.add_node(f"n{i}", zone)
    key = world.keys.assignment(shard_id(0))
    good = assignment_to_proto(ShardAssignment(shard_id(0), 1, NodeId("n0"), (NodeId("n1"), NodeId("n2"))))
    for _ in range(5):
        await world.etcd.put(key, codec.encode(good))
    await world.etcd.put(key, b"{not json")  # version 6: every epoch it ever held is <= 6
    election = await elect(world)
    reconciler = make_reconciler(world, election)
    await reconciler.start()
    await world.clock.advance(3.0)
    replaced = world.assignments()[key]
    assert replaced.epoch == 7 and replaced.primary
    assert [ok for _, ok in world.etcd.txns].count(False) == 0  # the swap did not fail every round
    await reconciler.stop()
    await election.stop()


def etcd_hiccup(reconciler: Reconciler) -> None:
    """What the reconciler sees of a short etcd outage: its nodes mirror unhealthy for a
    moment (its listener is told), then healthy again."""
    reconciler._nodes.healthy = False  # type: ignore[attr-defined]
    reconciler._on_change()
    reconciler._nodes.healthy = True  # type: ignore[attr-defined]


async def test_an_etcd_outage_holds_moves_only_while_it_is_recent(world: World) -> None:
    """A replica notes every etcd outage it sees, leader or not. Elected long after one
    ended, it has no lease expiries to wait for: no hold (it used to hold its first moves
    for the full hold time, delaying a failover by 15 s)."""
    election = await elect(world)
    reconciler = make_reconciler(world, election, hold_s=4.0)  # not started: rounds driven here
    etcd_hiccup(reconciler)
    await world.clock.advance(10.0)  # ended well over a hold ago
    assert not reconciler._held([], {}, 1, new_term=False)
    assert not reconciler.holding
    etcd_hiccup(reconciler)
    await world.clock.advance(1.0)
    assert reconciler._held([], {ShardId("shard-0"): ShardAssignment(ShardId("shard-0"), 1, NodeId("n0"), ())}, 1,
                            new_term=False)
    assert "lost touch with etcd" in reconciler.holding
    await world.clock.advance(3.5)  # the rest of the hold: 4 s from the outage, not from the election
    assert not reconciler.holding
    await election.stop()


async def test_an_outage_hold_ends_once_its_expiries_had_time_to_show_and_every_node_is_live(world: World) -> None:
    """Nodes whose leases survived an etcd outage never register again: past the few
    seconds expiries take to show, the hold waits only for nodes that are not live (it
    used to run its full length, 20 s in an outside check)."""
    election = await elect(world)
    reconciler = make_reconciler(world, election, hold_s=20.0)
    shard = ShardId("shard-0")
    current = {shard: ShardAssignment(shard, 1, NodeId("n0"), (NodeId("n1"),))}
    live = [PlacementNode(NodeId("n0"), "a", 1), PlacementNode(NodeId("n1"), "b", 1)]
    etcd_hiccup(reconciler)
    assert reconciler._held(live, current, 2, new_term=False)  # expiries may still show
    await world.clock.advance(1.0)
    assert reconciler._held(live, current, 2, new_term=False)
    await world.clock.advance(2.5)
    assert not reconciler._held(live, current, 2, new_term=False)  # 3.5 s, not 20
    assert not reconciler.holding
    # Had a node gone with its lease, the hold would wait for it to come back.
    etcd_hiccup(reconciler)
    assert reconciler._held(live, current, 2, new_term=False)
    await world.clock.advance(5.0)
    assert reconciler._held(live[:1], current, 2, new_term=False)  # n1 gone: still held
    await election.stop()


async def heartbeating_cluster(
    world: World, zones: str
) -> tuple[list[int], asyncio.Task[None], Election, Reconciler]:
    """A node per zone whose leases stay refreshed (the list: append a joining node's
    lease to keep it alive too), an elected leader and its reconciler, 2 s on."""
    leases = [await world.add_node(f"n{i}", zone) for i, zone in enumerate(zones)]
    beating = world.keep_alive(lambda: leases)
    election = await elect(world)
    reconciler = make_reconciler(world, election)
    await reconciler.start()
    await world.clock.advance(2.0)
    return leases, beating, election, reconciler


async def test_a_joining_node_takes_primaries_only_once_its_copies_had_time(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rebalancing hands primaries to a node that just joined only after its replicas
    had CATCH_UP_GRACE_S to copy: handed at once, a primary with no data yet refused
    writes while it copied (5-7 s for a 200 MB shard). Here n3 says nothing of its copies
    (GetShardStatus lists no shard), so the age of its roles decides. (A grace of 3 s.)"""
    monkeypatch.setattr(reconciler_module, "CATCH_UP_GRACE_S", 3.0)
    leases, beating, election, reconciler = await heartbeating_cluster(world, "abc")
    world.probe.reports["n3"] = []  # answers, and lists no shard
    leases.append(await world.add_node("n3", "a"))
    for _ in range(40):  # it gets copies (a round or two after its probe)
        await world.clock.advance(0.25)
        placed = world.assignments().values()
        if any("n3" in a.replicas for a in placed):
            break
    assert any("n3" in a.replicas for a in placed)
    got_copies_s = world.clock.monotonic_s()
    while world.clock.monotonic_s() - got_copies_s < 2.5:  # no primary while they copy
        assert not any(a.primary == "n3" for a in world.assignments().values())
        await world.clock.advance(0.25)
    await world.clock.advance(6.0)  # past the grace; rounds are paced a second apart
    assert any(a.primary == "n3" for a in world.assignments().values())  # then its share
    beating.cancel()
    await reconciler.stop()
    await election.stop()


async def join_n3(world: World, leases: list[int]) -> list[common_pb2.Assignment]:
    """Registers n3 (answering, holding nothing yet) and waits for its first copies."""
    world.probe.reports["n3"] = []
    leases.append(await world.add_node("n3", "a"))
    for _ in range(40):
        await world.clock.advance(0.25)
        copies = [a for a in world.assignments().values() if "n3" in a.replicas]
        if copies:
            return copies
    raise AssertionError("n3 got no copies")


def caught_up(copies: list[common_pb2.Assignment]) -> list[common_pb2.ShardStatus]:
    return [common_pb2.ShardStatus(shard_id=a.shard_id, epoch=a.epoch, role=common_pb2.SHARD_ROLE_REPLICA,
                                   serving=True, lag_entries=0) for a in copies]


async def test_a_node_that_does_not_answer_takes_no_primary_by_rebalancing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new replica that does not answer GetShardStatus (restarted with old data under
    load, it answered nothing for 12 s) cannot say how far behind it is: the age of its
    roles does not stand in for an answer, and handoffs to it wait until it answers that
    its copies are done. (A grace of 3 s.)"""
    monkeypatch.setattr(reconciler_module, "CATCH_UP_GRACE_S", 3.0)
    leases, beating, election, reconciler = await heartbeating_cluster(world, "abc")
    copies = await join_n3(world, leases)
    world.probe.silent.add("n3")
    await world.clock.advance(10.0)  # three graces
    assert not any(a.primary == "n3" for a in world.assignments().values())
    world.probe.silent.discard("n3")
    world.probe.reports["n3"] = caught_up(copies)
    await world.clock.advance(2.5)
    assert any(a.primary == "n3" for a in world.assignments().values())  # it answers: its share
    beating.cancel()
    await reconciler.stop()
    await election.stop()


async def test_a_repair_hands_no_primary_to_a_node_that_reports_no_status_of_the_shard(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round that must repair is not held by the age of the roles, but a target that
    answers GetShardStatus without a replica's status of the shard (it registered again
    moments ago: its roles have not reached it) takes no primary in it. (A grace of 60 s,
    so that only the report decides.)"""
    monkeypatch.setattr(reconciler_module, "CATCH_UP_GRACE_S", 60.0)
    leases, beating, election, reconciler = await heartbeating_cluster(world, "abc")
    copies = await join_n3(world, leases)
    await world.clock.advance(2.0)
    leases.remove(leases[1])  # n1 dies: its primaries are promoted, the rounds must repair
    await world.clock.advance(10.0)
    after = world.assignments().values()
    assert not any("n1" in (a.primary, *a.replicas) for a in after)  # repaired
    assert not any(a.primary == "n3" for a in after)  # n3 never said it holds its copies
    world.probe.reports["n3"] = caught_up([a for a in after if "n3" in a.replicas])
    await world.clock.advance(5.0)
    assert copies and any(a.primary == "n3" for a in world.assignments().values())  # once it does
    beating.cancel()
    await reconciler.stop()
    await election.stop()


async def test_a_node_whose_storage_refuses_writes_takes_no_primary_by_rebalancing(world: World) -> None:
    """A new replica whose heartbeats report storage trouble (a full disk) answers
    GetShardStatus as caught up, but as a primary it could write nothing: handoffs to it
    wait until the trouble clears."""
    leases, beating, election, reconciler = await heartbeating_cluster(world, "abc")
    copies = await join_n3(world, leases)
    world.probe.reports["n3"] = caught_up(copies)
    record = common_pb2.Node(node_id="n3", address=address_of("n3"), zone="a", capacity=1, lease_id=leases[-1],
                             trouble="storage refuses writes: database or disk is full")
    await world.etcd.put(world.keys.node(NodeId("n3")), codec.encode(record), lease=leases[-1])
    await world.clock.advance(reconciler_module.CATCH_UP_GRACE_S + 3.0)
    assert not any(a.primary == "n3" for a in world.assignments().values())
    record.trouble = ""  # space again
    await world.etcd.put(world.keys.node(NodeId("n3")), codec.encode(record), lease=leases[-1])
    await world.clock.advance(2.5)
    assert any(a.primary == "n3" for a in world.assignments().values())
    beating.cancel()
    await reconciler.stop()
    await election.stop()


async def test_a_copy_fenced_at_the_last_epoch_stops_its_promotion_without_overflowing(world: World) -> None:
    leases, election, reconciler = await placed_cluster(world, "abc")
    placed = world.assignments()
    victim = next(iter(placed.values()))
    lost = [a for a in placed.values() if a.primary == victim.primary]
    for a in lost:  # a forged or corrupt fence on every surviving copy
        for r in a.replicas:
            world.probe.fenced_at[(a.shard_id, r)] = 2**63 - 1
    await world.etcd.revoke_lease(leases[victim.primary])
    await world.clock.advance(5.0)
    after = world.assignments()
    assert all(0 < a.epoch < 2**63 - 1 for a in after.values())  # nothing written past the last epoch
    for a in lost:  # not promoted (no epoch is left above that fence); the others still run
        assert after[world.keys.assignment(ShardId(a.shard_id))].epoch == a.epoch
    await reconciler.stop()
    await election.stop()


async def test_a_live_primary_fenced_above_its_epoch_is_promoted_past_the_fence(world: World) -> None:
    leases, election, reconciler = await placed_cluster(world, "abc")

    beating = world.keep_alive(leases.values)  # the nodes stay registered throughout
    placed = world.assignments()
    key, victim = next(iter(placed.items()))
    fenced = victim.epoch + 5  # a newer epoch it saw (a stray or forged fence): it stopped writing
    world.probe.fenced_at[(victim.shard_id, victim.primary)] = fenced
    world.probe.reports[victim.primary] = [common_pb2.ShardStatus(
        shard_id=victim.shard_id, epoch=victim.epoch, role=common_pb2.SHARD_ROLE_PRIMARY, serving=False,
        fenced_epoch=fenced)]
    await world.clock.advance(4.0)
    assert world.assignments()[key].epoch == victim.epoch  # not yet: it must last STALL_CONFIRM_S
    await world.clock.advance(12.0)
    after = world.assignments()[key]
    assert after.epoch >= fenced and after.primary, after  # promoted past the fence: writable again
    others = {k: a for k, a in world.assignments().items() if k != key}
    assert all(a.epoch == placed[k].epoch for k, a in others.items())  # nothing else moved
    beating.cancel()
    await reconciler.stop()
    await election.stop()


async def test_a_drained_node_keeps_its_copies_until_their_replacements_can_take_over(world: World) -> None:
    """Draining a node hands its primaries off and moves its replicas in the same round
    (make before break, bluemarble.core.placement.handoff): its copies stay, as replicas,
    until each new primary serves at its epoch and each new replica has copied the shard,
    as the nodes report it. Only then do they go."""
    leases, election, reconciler = await placed_cluster(world, "abcd")

    beating = world.keep_alive(leases.values)
    before = world.assignments()
    for node in leases:  # each node reports the roles it holds now; copies made later say nothing yet
        world.probe.reports[node] = world.probe.statuses_of(node)
    victim = next(iter(before.values())).primary
    led = [key for key, a in before.items() if a.primary == victim]
    record = common_pb2.Node(node_id=victim, address=address_of(victim), zone="a", capacity=1,
                             lease_id=leases[victim], state=common_pb2.NODE_STATE_DRAINING)
    await world.etcd.put(world.keys.node(NodeId(victim)), codec.encode(record), lease=leases[victim])
    await world.clock.advance(4.0)
    held = world.assignments()
    for key in led:
        assert held[key].primary not in (victim, "") and held[key].epoch == before[key].epoch + 1
    held_by_victim = [key for key, a in before.items() if victim in (a.primary, *a.replicas)]
    assert len(held_by_victim) > len(led)  # it held replicas too
    for key in held_by_victim:
        a = held[key]
        assert victim in a.replicas, a  # kept: nothing it hands over can take over yet
        assert len(a.replicas) == 3  # its replacement is there too
    # The nodes report: new primaries serve, new replicas hold their copies.
    world.probe.reports.clear()
    for a in held.values():
        world.probe.reports.setdefault(a.primary, []).append(common_pb2.ShardStatus(
            shard_id=a.shard_id, epoch=a.epoch, role=common_pb2.SHARD_ROLE_PRIMARY, serving=True))
        for replica in a.replicas:
            world.probe.reports.setdefault(replica, []).append(common_pb2.ShardStatus(
                shard_id=a.shard_id, epoch=a.epoch, role=common_pb2.SHARD_ROLE_REPLICA, serving=True))
    await world.clock.advance(4.0)
    after = world.assignments()
    assert not any(victim in (a.primary, *a.replicas) for a in after.values()), after
    assert all(len(a.replicas) == 2 for a in after.values())
    beating.cancel()
    await reconciler.stop()
    await election.stop()


async def test_a_new_term_that_finds_named_nodes_gone_holds_moves_until_they_register_again(world: World) -> None:
    """The only control-plane replica restarts more slowly than the nodes' leases last:
    some leases ran out meanwhile and the others are about to. The new leader moves
    nothing until the nodes are back; a node that never comes back fails over within
    1.5 lease TTLs."""
    leases, election, reconciler = await placed_cluster(world, "abcab")

    await reconciler.stop()
    await election.stop()
    placed = world.assignments()
    await world.etcd.revoke_lease(leases["n0"])  # ran out while no control plane answered
    await world.etcd.revoke_lease(leases["n4"])  # and this node really died
    beating = world.keep_alive(lambda: [leases[node] for node in ("n0", "n1", "n2", "n3")])  # the live ones
    election = await elect(world, "cp-1")
    reconciler = make_reconciler(world, election)
    await reconciler.start()
    await world.clock.advance(2.0)
    assert "not registered" in reconciler.holding
    assert world.assignments() == placed  # nothing moved: no failover to the first nodes back
    leases["n0"] = await world.add_node("n0", "a")  # it registers again
    await world.clock.advance(1.5 * TTL_S)
    after = world.assignments()
    assert not any("n4" in (a.primary, *a.replicas) for a in after.values())  # the dead node's roles moved
    assert all(a.primary and len(a.replicas) == 2 for a in after.values())
    beating.cancel()
    await reconciler.stop()
    await election.stop()


async def test_a_new_term_does_not_wait_for_a_named_node_whose_process_is_gone(world: World) -> None:
    """As above, but the next leader watched the nodes while it followed, and the node
    that is gone refuses connections: its process is gone, it will not register again on
    its own, so the new term holds nothing for it and it fails over at once (not 1.5 lease
    TTLs later)."""
    leases, election, reconciler = await placed_cluster(world, "abcab")
    follower_election = Election(world.etcd, world.keys, "cp-1", "127.0.0.1:7001", TTL_S,  # type: ignore[arg-type]
                                 clock=world.clock)
    await follower_election.start()
    follower = make_reconciler(world, follower_election)
    await follower.start()
    await world.clock.advance(1.0)  # the follower has seen every node live
    await reconciler.stop()
    await election.stop()
    beating = world.keep_alive(lambda: [leases[node] for node in ("n0", "n1", "n2", "n3")])
    world.probe.refusing = {address_of("n4")}  # its process is gone
    await world.etcd.revoke_lease(leases["n4"])
    moved = False
    for _ in range(30):  # 3 s, well within the 15 s a hold for it would last
        await world.clock.advance(0.1)
        assert "not registered" not in follower.holding, follower.holding
        moved = not any("n4" in (a.primary, *a.replicas) for a in world.assignments().values())
        if moved and follower_election.leadership is not None:
            break
    assert follower_election.leadership is not None and moved
    assert all(a.primary and len(a.replicas) == 2 for a in world.assignments().values())
    beating.cancel()
    await follower.stop()
    await follower_election.stop()


async def test_a_joining_node_takes_primaries_as_soon_as_it_reports_its_copies_done(world: World) -> None:
    """Handoffs to a new replica wait for its copy, as the node reports it (ShardStatus:
    not copying, following its primary): not the fixed CATCH_UP_GRACE_S when it answers."""
    leases, beating, election, reconciler = await heartbeating_cluster(world, "abc")
    world.probe.reports["n3"] = []  # answers, and holds nothing yet
    leases.append(await world.add_node("n3", "a"))
    await world.clock.advance(2.5)
    placed = world.assignments()
    copies = [a for a in placed.values() if "n3" in a.replicas]
    assert copies and not any(a.primary == "n3" for a in placed.values())
    world.probe.reports["n3"] = [  # still copying: held, even past the grace
        common_pb2.ShardStatus(shard_id=a.shard_id, epoch=a.epoch, role=common_pb2.SHARD_ROLE_REPLICA,
                               serving=True, copying=True, lag_entries=5000) for a in copies]
    await world.clock.advance(reconciler_module.CATCH_UP_GRACE_S)
    assert not any(a.primary == "n3" for a in world.assignments().values())
    for status in world.probe.reports["n3"]:  # done copying
        status.copying, status.lag_entries = False, 0
    await world.clock.advance(2.5)
    assert any(a.primary == "n3" for a in world.assignments().values())
    beating.cancel()
    await reconciler.stop()
    await election.stop()


async def test_a_drain_held_for_copying_replicas_hands_over_once_they_report_done(world: World) -> None:
    """A node drains while the replicas that would take its primaries are still copying:
    the handoffs wait, and go as soon as the replicas report their copies done, with
    nothing else changing in etcd (a round that held them must not count as settled; a
    SIGTERM moments after placement once waited for the drain's whole timeout)."""
    leases, election, reconciler = await placed_cluster(world, "abc")
    beating = world.keep_alive(leases.values)
    before = world.assignments()
    victim = next(iter(before.values())).primary
    led = [key for key, a in before.items() if a.primary == victim]
    statuses = [common_pb2.ShardStatus(shard_id=before[key].shard_id, epoch=before[key].epoch,
                                       role=common_pb2.SHARD_ROLE_REPLICA, serving=True, copying=True,
                                       lag_entries=5000) for key in led]
    for key, status in zip(led, statuses, strict=True):  # every replica that could take it: copying
        for replica in before[key].replicas:
            world.probe.reports.setdefault(replica, []).append(status)
    record = common_pb2.Node(node_id=victim, address=address_of(victim), zone="a", capacity=1,
                             lease_id=leases[victim], state=common_pb2.NODE_STATE_DRAINING)
    await world.etcd.put(world.keys.node(NodeId(victim)), codec.encode(record), lease=leases[victim])
    await world.clock.advance(4.0)
    assert all(world.assignments()[key].primary == victim for key in led)  # held: every target copying
    for status in statuses:  # done copying; nothing else changes
        status.copying, status.lag_entries = False, 0
    await world.clock.advance(3.0)
    after = world.assignments()
    assert not any(after[key].primary == victim for key in led), after
    beating.cancel()
    await reconciler.stop()
    await election.stop()


async def test_a_round_that_must_repair_still_hands_no_primary_to_a_replica_copying(world: World) -> None:
    """A node dies while a new one is copying its replicas: the repair is written at once,
    but the balance handoffs to the new node in the same plan wait for its copies."""
    leases = {f"n{i}": await world.add_node(f"n{i}", zone) for i, zone in enumerate("abcd")}

    beating = world.keep_alive(lambda: [lease for node, lease in leases.items() if node != "n1"])
    election = await elect(world)
    reconciler = make_reconciler(world, election)
    await reconciler.start()
    await world.clock.advance(2.0)
    world.probe.reports["n4"] = []
    leases["n4"] = await world.add_node("n4", "b")
    await world.clock.advance(2.5)
    copying = [a for a in world.assignments().values() if "n4" in a.replicas]
    assert copying
    world.probe.reports["n4"] = [
        common_pb2.ShardStatus(shard_id=a.shard_id, epoch=a.epoch, role=common_pb2.SHARD_ROLE_REPLICA,
                               serving=True, copying=True, lag_entries=5000) for a in copying]
    await world.etcd.revoke_lease(leases["n1"])  # a node dies: the next rounds must repair
    await world.clock.advance(reconciler_module.CATCH_UP_GRACE_S + 2.0)
    after = world.assignments()
    assert not any("n1" in (a.primary, *a.replicas) for a in after.values())  # repaired
    assert not any(a.primary == "n4" for a in after.values())  # no primary for a copying replica
    beating.cancel()
    await reconciler.stop()
    await election.stop()


async def test_a_dead_replica_stays_in_its_shard_until_a_staying_replica_holds_the_primarys_log(world: World) -> None:
    """R = 3: a replica dies while the other one lags its primary. Dropped, it would no
    longer count as a copy that may hold acknowledged writes the lagging one lacks, and a
    death of the primary next would promote the lagging copy over them. It stays retained
    (down, not a replica the primary waits for) until a replica of the new record reports
    the primary's position (a handoff's old primary, kept as a replica, does at once)."""
    leases = {f"n{i}": await world.add_node(f"n{i}", zone) for i, zone in enumerate("abc")}
    dead = "n1"
    beating = world.keep_alive(lambda: [lease for node, lease in leases.items() if node != dead])
    election = await elect(world)
    reconciler = make_reconciler(world, election)
    await reconciler.start()
    await world.clock.advance(3.0)
    placed = world.assignments()
    lagging = {k: a for k, a in placed.items() if a.primary != dead}
    for a in lagging.values():
        world.probe.copies[(a.shard_id, a.primary)] = LogPosition(1, 9)
        world.probe.copies.update({(a.shard_id, r): LogPosition(1, 5) for r in a.replicas if r != dead})
    await world.etcd.revoke_lease(leases[dead])
    await world.clock.advance(4.0)
    after = world.assignments()
    kept = [k for k in lagging if dead in after[k].retained]
    assert kept  # balance hands some primaries over, not all
    assert not any(dead in after[k].replicas for k in kept)
    for k, a in lagging.items():
        assert k in kept or (a.primary in after[k].replicas and after[k].epoch > a.epoch), after[k]
    for k in kept:
        assert after[k].incarnations[dead] == leases[dead]  # back with an empty disk, a new incarnation
    world.probe.silent = {after[k].primary for k in kept}  # primaries that do not answer: nothing known
    world.probe.copies.update({(after[k].shard_id, r): LogPosition(1, 9) for k in kept for r in after[k].replicas})
    await world.clock.advance(2.0)
    assert all(dead in world.assignments()[k].retained for k in kept)
    world.probe.silent = set()  # they answer: the staying replicas hold their logs
    await world.clock.advance(2.0)
    assert not any(dead in (*world.assignments()[k].replicas, *world.assignments()[k].retained) for k in kept)
    beating.cancel()
    await reconciler.stop()
    await election.stop()


async def test_a_live_replica_a_plan_drops_is_retained_until_its_primary_stops_counting_it(world: World) -> None:
    """A new node takes replicas over from live ones. Once it holds the primary's log, the
    replica it replaces goes to ``retained``, not away: until the primary applies the new
    record it counts that replica's acknowledgements, so a write past the position the new
    copy was checked against could be held by the primary and the old replica alone. It
    leaves once the primary answers without it among the replicas it counts."""
    leases = {f"n{i}": await world.add_node(f"n{i}", zone) for i, zone in enumerate("abc")}
    beating = world.keep_alive(lambda: list(leases.values()))
    election = await elect(world)
    reconciler = make_reconciler(world, election)
    await reconciler.start()
    await world.clock.advance(3.0)
    placed = world.assignments()
    # The primaries have not applied any record after these: they count these replicas.
    world.probe.counting = {(a.shard_id, a.primary): frozenset(NodeId(r) for r in a.replicas) for a in placed.values()}
    leases["n3"] = await world.add_node("n3", "d")
    await world.clock.advance(2.0)
    world.probe.reports["n3"] = [  # done copying
        common_pb2.ShardStatus(shard_id=a.shard_id, epoch=a.epoch, role=common_pb2.SHARD_ROLE_REPLICA, serving=True)
        for a in world.assignments().values() if "n3" in a.replicas
    ]
    await world.clock.advance(2.0)
    after = world.assignments()
    moved = {k: [r for r in placed[k].replicas if r not in after[k].replicas] for k in placed}
    moved = {k: gone for k, gone in moved.items() if gone}
    assert moved  # the new node took replicas over
    for k, gone in moved.items():
        assert "n3" in after[k].replicas and after[k].primary == placed[k].primary, after[k]
        assert list(after[k].retained) == gone, after[k]  # live, but counted by the primary
    world.probe.counting = {}  # the primaries applied the new records
    with structlog.testing.capture_logs() as logs:
        await world.clock.advance(2.0)
    final = world.assignments()
    assert not any(final[k].retained for k in moved), [final[k] for k in moved]
    # Said as what it is: no member registered again.
    events = [e["event"] for e in logs]
    assert "recorded the copies kept through handoffs, or released" in events, events
    assert "recorded the new registrations of members that registered again" not in events, events
    assert all(final[k].replicas == after[k].replicas for k in moved)
    beating.cancel()
    await reconciler.stop()
    await election.stop()


async def _primary_lost_past_a_lagging_replica(
    world: World, gone: set[str], **kwargs: Any
) -> tuple[dict[str, int], Election, Reconciler, dict[str, common_pb2.Assignment], asyncio.Task[None]]:
    """R = 3 on n0-n2; n1 dies (added to ``gone``, whose leases are not kept alive) while,
    in each shard it led, one replica (the first by id) is ahead of the other. Returns the
    leases, the election, the reconciler, the records before the death and the task that
    keeps the other leases alive."""
    leases = {f"n{i}": await world.add_node(f"n{i}", zone) for i, zone in enumerate("abc")}
    beating = world.keep_alive(lambda: [lease for node, lease in leases.items() if node not in gone])
    election = await elect(world)
    reconciler = make_reconciler(world, election, **kwargs)
    await reconciler.start()
    await world.clock.advance(3.0)
    placed = world.assignments()
    for a in placed.values():
        if a.primary == "n1":
            ahead, behind = sorted(a.replicas)
            world.probe.copies[(a.shard_id, ahead)] = LogPosition(1, 9)
            world.probe.copies[(a.shard_id, behind)] = LogPosition(1, 5)
    gone.add("n1")
    await world.etcd.revoke_lease(leases["n1"])
    await world.clock.advance(4.0)
    return leases, election, reconciler, placed, beating


async def test_a_dead_primary_stays_in_its_shard_until_a_replica_holds_the_promoted_ones_log(world: World) -> None:
    """R = 3: the primary dies; the replica with the greatest position is promoted, and
    the other one lags it. Dropped, the old primary would no longer count as a copy that
    may hold acknowledged writes the lagging one lacks, should the new primary die too.
    It stays retained (down, not a replica the new primary waits for) until the lagging
    replica reports the new primary's position."""
    gone: set[str] = set()
    leases, election, reconciler, placed, beating = await _primary_lost_past_a_lagging_replica(world, gone)
    led = {k: a for k, a in placed.items() if a.primary == "n1"}
    after = world.assignments()
    assert led
    for k, a in led.items():
        ahead, behind = sorted(a.replicas)
        assert after[k].primary == ahead and after[k].epoch == a.epoch + 1, after[k]
        assert list(after[k].retained) == ["n1"] and after[k].incarnations["n1"] == leases["n1"], after[k]
        assert "n1" not in after[k].replicas  # nobody waits for its answer
        world.probe.copies[(a.shard_id, behind)] = LogPosition(1, 9)  # it caught up
    await world.clock.advance(2.0)
    assert not any("n1" in (*world.assignments()[k].replicas, *world.assignments()[k].retained) for k in led)
    beating.cancel()
    await reconciler.stop()
    await election.stop()


async def _the_promoted_replica_dies(
    world: World, gone: set[str], leases: dict[str, int], placed: dict[str, common_pb2.Assignment]
) -> tuple[dict[str, common_pb2.Assignment], dict[str, common_pb2.Assignment], str]:
    """After :func:`_primary_lost_past_a_lagging_replica`: the replica promoted in the
    shards n1 led dies too. Returns those shards' records before n1 died, as promoted,
    and the promoted node."""
    led = {k: a for k, a in placed.items() if a.primary == "n1"}
    promoted = world.assignments()
    [ahead] = {sorted(a.replicas)[0] for a in led.values()}
    gone.add(ahead)
    await world.etcd.revoke_lease(leases[ahead])
    await world.clock.advance(6.0)
    return led, promoted, ahead


async def test_a_promoted_replica_that_dies_too_leaves_the_shard_waiting_for_the_retained_copy(world: World) -> None:
    """Then the promoted replica dies as well: its only live replica lags, and the shard
    waits for the retained old primary, which takes it back once it returns with its data."""
    gone: set[str] = set()
    leases, election, reconciler, placed, beating = await _primary_lost_past_a_lagging_replica(world, gone)
    led, promoted, ahead = await _the_promoted_replica_dies(world, gone, leases, placed)
    after = world.assignments()
    for k in led:
        assert after[k].epoch == promoted[k].epoch and after[k].primary == ahead, after[k]  # waits: n1 may hold more
    leases["n1"] = await world.add_node("n1", "b")  # back with its data (1, 9): it takes the shards
    gone.discard("n1")
    for a in led.values():
        world.probe.copies[(a.shard_id, "n1")] = LogPosition(1, 9)
    await world.clock.advance(2 * TTL_S + 2.0)  # two leases gone within a TTL: moves are held meanwhile
    after = world.assignments()
    for k in led:
        assert after[k].primary == "n1" and after[k].epoch > promoted[k].epoch, after[k]
    beating.cancel()
    await reconciler.stop()
    await election.stop()


async def test_a_forced_promotion_of_a_node_without_a_copy_does_not_lift_the_wait(world: World) -> None:
    """The shard waits for the retained old primary, which comes back with an empty data
    dir, and an operator names it in ForcePromote: it holds nothing, so the wait stands
    (lifting it would promote the lagging copy, a node the operator did not name)."""
    gone: set[str] = set()
    forced = FakeMirror(world.etcd, world.keys.force_promotions_prefix(), decode_force_promotion, "forced")
    leases, election, reconciler, placed, beating = await _primary_lost_past_a_lagging_replica(
        world, gone, forced=forced)
    led, promoted, ahead = await _the_promoted_replica_dies(world, gone, leases, placed)
    leases["n1"] = await world.add_node("n1", "b")  # back with an empty data dir
    gone.discard("n1")
    for a in led.values():
        world.probe.copies[(a.shard_id, "n1")] = None
        request = controlplane_pb2.ForcePromoteRequest(shard_id=a.shard_id, node_id="n1", accept_data_loss=True)
        await world.etcd.put(world.keys.force_promotion(ShardId(a.shard_id)), codec.encode(request))
    await world.clock.advance(2 * TTL_S + 2.0)
    after = world.assignments()
    for k in led:
        assert (after[k].primary, after[k].epoch) == (ahead, promoted[k].epoch), after[k]
    beating.cancel()
    await reconciler.stop()
    await election.stop()
