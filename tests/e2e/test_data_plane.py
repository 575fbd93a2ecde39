"""End to end: the data plane with real processes (etcd, a control plane, shard nodes),
killed and paused with real signals, driven through the routing client.

Checks issue 7's acceptance: grants survive SIGKILL of the busiest primary and are
applied once however often they are retried; a paused primary refuses STRONG writes once
it resumes; a primary restarted at once with its data dir loses its shards to promotion at
a higher epoch, rejoins as a replica and catches up; a node with an empty data dir is
bootstrapped by snapshot; a deposed primary holding unacknowledged entries converges to
its successor's history; and with every control-plane replica down, reads and EVENTUAL
writes go on while STRONG writes stop once the lease may have expired.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest

from bluemarble.api.conversions import assignment_from_proto, placement_node_from_proto
from bluemarble.client.routing import RoutingClient
from bluemarble.core.errors import BlueMarbleError
from bluemarble.core.ids import ShardId, shard_id
from bluemarble.core.placement import PlacementConfig, violations
from bluemarble.v1 import common_pb2, shardnode_pb2, shardnode_pb2_grpc
from bluemarble.v1 import controlplane_pb2 as pb
from shardnode.dataplane import HOLD_REPLICATION_FAILPOINT
from tests.e2e.conftest import ProcessCluster

pytestmark = pytest.mark.e2e

TTL_S = 2
PRIMARY = common_pb2.SHARD_ROLE_PRIMARY
REPLICA = common_pb2.SHARD_ROLE_REPLICA


async def eventually(condition: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Waits (without blocking the event loop) until ``condition`` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.1)


def start(
    cluster: ProcessCluster, nodes: dict[str, str], replication_factor: int, shards: int = 8, control_planes: int = 1
) -> None:
    for _ in range(control_planes):
        cluster.start_control_plane(
            "--lease-ttl-s", str(TTL_S), "--replication-factor", str(replication_factor), "--shards", str(shards)
        )
    for node, zone in nodes.items():
        cluster.start_node(node, zone)


def assignments(cluster: ProcessCluster) -> dict[str, pb.Assignment]:
    r = cluster.assignments()
    return {a.shard_id: a for a in r.assignments} if r is not None else {}


def serving(cluster: ProcessCluster, shards: int, replication_factor: int) -> bool:
    """The placement is complete and balanced (the one checker's verdict), and every
    shard's primary serves, as its node reports."""
    current = assignments(cluster)
    if len(current) != shards:
        return False
    nodes = [placement_node_from_proto(n) for n in cluster.nodes()]
    found = violations(
        {ShardId(s): assignment_from_proto(a) for s, a in current.items()},
        nodes,
        PlacementConfig(replication_factor, max_moves_per_round=0),
        shards=[shard_id(i) for i in range(shards)],
    )
    if found:
        return False
    for a in current.values():
        if not a.primary or len(a.replicas) != replication_factor - 1:
            return False
        status = cluster.shard_status(cluster.node_addresses[a.primary])
        if status is None or a.shard_id not in status:
            return False
        s = status[a.shard_id]
        if s.role != PRIMARY or s.epoch != a.epoch or not s.serving:
            return False
    return True


def settled(cluster: ProcessCluster, shards: int, replication_factor: int) -> Callable[[], Awaitable[bool]]:
    """A condition: :func:`serving`, and no assignment changed over the last ~1.5 s (the
    reconciler paces rebalancing rounds 1 s apart: a placement quiet for longer is done)."""
    seen: list[int] = []

    async def check() -> bool:
        r = cluster.assignments()
        if r is None or not serving(cluster, shards, replication_factor):
            seen.clear()
            return False
        if seen and seen[-1] != r.revision:
            seen.clear()
        seen.append(r.revision)
        if len(seen) < 2:
            await asyncio.sleep(1.5)
            return False
        return True

    return check


def led_by(cluster: ProcessCluster, node: str) -> dict[str, int]:
    return {s: a.epoch for s, a in assignments(cluster).items() if a.primary == node}


def busiest_primary(cluster: ProcessCluster) -> str:
    counts = collections.Counter(a.primary for a in assignments(cluster).values())
    return max(sorted(counts), key=lambda n: counts[n])


def failed_over(cluster: ProcessCluster, led: dict[str, int], old: str) -> bool:
    current = assignments(cluster)
    return all(current[s].epoch > epoch and current[s].primary not in ("", old) for s, epoch in led.items())


def players_on(client: RoutingClient, shards: set[str], count: int, prefix: str) -> list[str]:
    found = []
    i = 0
    while len(found) < count:
        player = f"{prefix}-{i}"
        if client.resolve(player).shard_id in shards:
            found.append(player)
        i += 1
    return found


async def grant_all(
    client: RoutingClient,
    grants: dict[str, tuple[str, list[str], int]],
    concurrency: int = 8,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, bool]:
    """Runs every grant (request id -> (player, items, gold)); request id -> replayed."""
    results: dict[str, bool] = {}
    gate = asyncio.Semaphore(concurrency)

    async def one(request_id: str, player: str, items: list[str], gold: int) -> None:
        async with gate:
            r = await client.grant_items(player, items, gold=gold, request_id=request_id, deadline_s=30)
            results[request_id] = r.replayed
            if on_progress is not None:
                on_progress(len(results))

    await asyncio.gather(*(one(rid, *g) for rid, g in grants.items()))
    return results


async def assert_exactly_once(client: RoutingClient, grants: dict[str, tuple[str, list[str], int]]) -> None:
    """Every grant is in its player's inventory exactly once (items once, gold once)."""
    expected: dict[str, tuple[list[str], int]] = collections.defaultdict(lambda: ([], 0))
    for player, items, gold in grants.values():
        have_items, have_gold = expected[player]
        expected[player] = (have_items + items, have_gold + gold)
    for player, (items, gold) in expected.items():
        inventory = await client.get_inventory(player, deadline_s=20)
        assert sorted(inventory.item_ids) == sorted(items), player
        assert inventory.gold == gold, player
        assert not inventory.stale


def node_call(address: str) -> shardnode_pb2_grpc.ShardNodeStub:
    return shardnode_pb2_grpc.ShardNodeStub(grpc.insecure_channel(address))  # type: ignore[no-untyped-call]


async def test_grants_survive_sigkill_of_the_busiest_primary_and_apply_once(process_cluster: ProcessCluster) -> None:
    nodes = {"n1": "z1", "n2": "z2", "n3": "z3", "n4": "z1"}
    start(process_cluster, nodes, replication_factor=3)
    await eventually(settled(process_cluster, 8, 3), 40, "every shard to be served, placement settled")
    grants = {f"grant-{i}": (f"player-{i}", [f"item-{i}-a", f"item-{i}-b"], i + 1) for i in range(200)}
    async with RoutingClient(process_cluster.control_planes) as client:
        await client.wait_ready(20)
        victim = busiest_primary(process_cluster)
        led = led_by(process_cluster, victim)
        killed = asyncio.Event()

        def halfway(done: int) -> None:
            if done >= 100 and not killed.is_set():
                process_cluster.process(victim).signal(signal.SIGKILL)
                killed.set()

        first = await grant_all(client, grants, on_progress=halfway)
        assert killed.is_set()
        await eventually(lambda: failed_over(process_cluster, led, victim), 20, f"{victim}'s shards to fail over")
        await assert_exactly_once(client, grants)
        # Every grant retried with its request id is answered from the record: nothing twice.
        again = await grant_all(client, grants)
        assert all(again.values()), "a retried grant was applied again"
        assert len(first) == len(grants)
        await assert_exactly_once(client, grants)


async def test_a_primary_paused_past_the_ttl_refuses_strong_writes_when_it_resumes(
    process_cluster: ProcessCluster,
) -> None:
    nodes = {"n1": "z1", "n2": "z2", "n3": "z3"}
    start(process_cluster, nodes, replication_factor=3, control_planes=2)
    await eventually(settled(process_cluster, 8, 3), 40, "every shard to be served, placement settled")
    async with RoutingClient(process_cluster.control_planes) as client:
        await client.wait_ready(20)
        victim = busiest_primary(process_cluster)
        led = led_by(process_cluster, victim)
        players = players_on(client, set(led), 20, "paused")
        before = {f"before-{p}": (p, [f"{p}-x"], 5) for p in players}
        await grant_all(client, before)
        process_cluster.process(victim).signal(signal.SIGSTOP)
        await eventually(lambda: failed_over(process_cluster, led, victim), 20, f"{victim}'s shards to fail over")
        during = {f"during-{p}": (p, [f"{p}-y"], 7) for p in players}
        await grant_all(client, during)
        incarnation = node_call(process_cluster.node_addresses[victim])
        logged_before = len(process_cluster.log_text(victim).splitlines())
        process_cluster.process(victim).signal(signal.SIGCONT)
        # Straight to the resumed node, as a client with a stale cache would: refused,
        # at the old epoch always, and at "whatever epoch you have" until it registers again.
        refused = 0
        accepted: dict[str, tuple[str, list[str], int]] = {}
        resumed_at = time.monotonic()
        while time.monotonic() - resumed_at < 3.0:
            for p in players[:5]:
                shard = client.resolve(p).shard_id
                for epoch in (led[shard], 0):
                    status = incarnation.GetShardStatus(shardnode_pb2.GetShardStatusRequest(), timeout=5)
                    attempt = f"stale-{p}-{epoch}-{refused}-{len(accepted)}"
                    request = shardnode_pb2.GrantItemsRequest(
                        request_id=attempt, player_id=p, item_ids=[attempt], epoch=epoch
                    )
                    try:
                        incarnation.GrantItems(request, timeout=5)
                    except grpc.RpcError as e:
                        assert e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE), e
                        refused += 1
                        continue
                    # Accepted: only by a new incarnation, as a legitimately promoted primary.
                    assert epoch == 0
                    now = assignments(process_cluster)[shard]
                    assert now.primary == victim and now.epoch > led[shard], "a deposed primary accepted a write"
                    assert status.incarnation != 0
                    accepted[attempt] = (p, [attempt], 0)
            await asyncio.sleep(0.05)
        assert refused >= 10
        await assert_exactly_once(client, {**before, **during, **accepted})
        # The resumed node says it was the one that stopped, and blames no control-plane
        # replica for the silence of its streams meanwhile (nor moves away from one).
        resumed_log = process_cluster.log_text(victim).splitlines()[logged_before:]
        assert any("this process did not run for a while" in line for line in resumed_log), resumed_log[:20]
        blamed = [line for line in resumed_log if "may be hung" in line or "moving to another control-plane" in line]
        assert not blamed, blamed


async def test_a_primary_restarted_at_once_loses_its_shards_and_catches_up(process_cluster: ProcessCluster) -> None:
    nodes = {"n1": "z1", "n2": "z2", "n3": "z3"}
    start(process_cluster, nodes, replication_factor=3)
    await eventually(settled(process_cluster, 8, 3), 40, "every shard to be served, placement settled")
    async with RoutingClient(process_cluster.control_planes) as client:
        await client.wait_ready(20)
        victim = busiest_primary(process_cluster)
        led = led_by(process_cluster, victim)
        players = players_on(client, set(led), 30, "restart")
        await grant_all(client, {f"r-{p}": (p, [f"{p}-sword", f"{p}-potion"], 11) for p in players})
        # Each player then spends 5 gold and uses the potion up (TakeItems): what is left
        # is what every copy must hold after the failover.
        for p in players:
            await client.take_items(p, [f"{p}-potion"], gold=5, request_id=f"t-{p}", deadline_s=20)
        grants = {f"r-{p}": (p, [f"{p}-sword"], 6) for p in players}
        await assert_exactly_once(client, grants)
        process_cluster.process(victim).signal(signal.SIGKILL)
        process_cluster.start_node(victim, nodes[victim])
        await eventually(lambda: failed_over(process_cluster, led, victim), 30, "promotion at a higher epoch")

        def caught_up() -> bool:
            current = assignments(process_cluster)
            mine = process_cluster.shard_status(process_cluster.node_addresses[victim]) or {}
            for shard in led:
                a = current[shard]
                theirs = (process_cluster.shard_status(process_cluster.node_addresses[a.primary]) or {}).get(shard)
                held = mine.get(shard)
                if victim not in a.replicas or held is None or theirs is None:
                    return False
                if held.role != REPLICA or (held.last_epoch, held.applied_lsn) != (
                    theirs.last_epoch,
                    theirs.applied_lsn,
                ):
                    return False
            return True

        await eventually(caught_up, 30, f"{victim} to rejoin as a replica and catch up")
        await assert_exactly_once(client, grants)
        # The new primaries answer a retried take from the replicated record: nothing twice.
        for p in players:
            again = await client.take_items(p, [f"{p}-potion"], gold=5, request_id=f"t-{p}", deadline_s=20)
            assert again.replayed, p
        await assert_exactly_once(client, grants)
        # A node with an empty data dir is bootstrapped by snapshot.
        process_cluster.start_node("n4", "z1")
        await eventually(
            lambda: "installed a snapshot" in process_cluster.log_text("n4"),
            40,
            "n4 to bootstrap a shard from a snapshot",
        )
        await assert_exactly_once(client, grants)


async def test_a_deposed_primary_with_unacknowledged_entries_converges(process_cluster: ProcessCluster) -> None:
    nodes = {"n1": "z1", "n2": "z2", "n3": "z3"}
    start(process_cluster, nodes, replication_factor=2)
    await eventually(settled(process_cluster, 8, 2), 40, "every shard to be served, placement settled")
    async with RoutingClient(process_cluster.control_planes) as client:
        await client.wait_ready(20)
        shard, a = sorted(assignments(process_cluster).items())[0]
        primary, replica = a.primary, a.replicas[0]
        [player] = players_on(client, {shard}, 1, "deposed")
        await grant_all(client, {"acked": (player, ["kept"], 1)})
        # The fault: the only replica stops applying and acknowledging (a failpoint file
        # in its data dir); the primary commits entries locally that nobody else has.
        failpoint = process_cluster.workdir / replica / HOLD_REPLICATION_FAILPOINT
        failpoint.touch()
        stub = node_call(process_cluster.node_addresses[primary])
        for i in range(2):
            with pytest.raises(grpc.RpcError) as refused:
                stub.GrantItems(
                    shardnode_pb2.GrantItemsRequest(
                        request_id=f"unacked-{i}", player_id=player, item_ids=[f"lost-{i}"]
                    ),
                    timeout=0.5,
                )
            assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        before = (process_cluster.shard_status(process_cluster.node_addresses[primary]) or {})[shard]
        assert before.applied_lsn >= 3  # the acked grant and the two unacknowledged ones
        process_cluster.process(primary).signal(signal.SIGKILL)
        await eventually(
            lambda: (
                assignments(process_cluster)[shard].primary == replica
                and assignments(process_cluster)[shard].epoch > a.epoch
            ),
            30,
            f"{replica} to be promoted",
        )
        failpoint.unlink()  # the held batch of the dead primary is now refused: fenced
        await grant_all(client, {"after": (player, ["new"], 2)})
        process_cluster.start_node(primary, nodes[primary])

        def converged() -> bool:
            new = (process_cluster.shard_status(process_cluster.node_addresses[replica]) or {}).get(shard)
            old = (process_cluster.shard_status(process_cluster.node_addresses[primary]) or {}).get(shard)
            return (
                new is not None
                and old is not None
                and not old.on_disk_only
                and (old.last_epoch, old.applied_lsn) == (new.last_epoch, new.applied_lsn)
            )

        await eventually(converged, 40, f"{primary} to converge to {replica}'s history")
        inventory = await client.get_inventory(player, deadline_s=20)
        assert sorted(inventory.item_ids) == ["kept", "new"]
        stale = node_call(process_cluster.node_addresses[primary]).GetInventory(
            shardnode_pb2.GetInventoryRequest(player_id=player, allow_stale=True), timeout=5
        )
        assert sorted(stale.item_ids) == ["kept", "new"] and stale.gold == 3


async def test_without_a_control_plane_reads_and_eventual_writes_go_on_strong_writes_stop(
    process_cluster: ProcessCluster,
) -> None:
    nodes = {"n1": "z1", "n2": "z2", "n3": "z3"}
    start(process_cluster, nodes, replication_factor=3)
    await eventually(settled(process_cluster, 8, 3), 40, "every shard to be served, placement settled")
    async with RoutingClient(process_cluster.control_planes) as client:
        await client.wait_ready(20)
        player = "static-player"
        route = client.resolve(player)
        await client.grant_items(player, ["shield"], gold=3, deadline_s=20)
        await client.set_player_data(player, "guild", "name", b"owls", deadline_s=20)
        assert route.primary is not None
        primary = process_cluster.node_addresses[route.primary]
        process_cluster.process("cp-0").signal(signal.SIGKILL)
        stub = node_call(primary)
        # Well past the TTL: the lease may have expired, so the primary self-fences.
        await asyncio.sleep(0)  # the routing client's tasks notice the loss in the background
        deadline = time.monotonic() + 2 * TTL_S + 1
        while time.monotonic() < deadline:
            inventory = stub.GetInventory(
                shardnode_pb2.GetInventoryRequest(player_id=player, allow_stale=True), timeout=5
            )
            assert list(inventory.item_ids) == ["shield"]
            await asyncio.sleep(0.2)
        with pytest.raises(grpc.RpcError) as strong:
            stub.GrantItems(
                shardnode_pb2.GrantItemsRequest(request_id="late", player_id=player, item_ids=["late"]), timeout=5
            )
        assert strong.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "lease may have expired" in (strong.value.details() or "")
        with pytest.raises(grpc.RpcError) as strong_read:
            stub.GetInventory(shardnode_pb2.GetInventoryRequest(player_id=player), timeout=5)
        assert strong_read.value.code() == grpc.StatusCode.UNAVAILABLE
        # EVENTUAL writes and stale reads go on, on the primary and on a replica.
        stub.SetPlayerData(
            shardnode_pb2.SetPlayerDataRequest(
                request_id="eventual", player_id=player, system="guild", key="name", value=b"larks"
            ),
            timeout=5,
        )
        got = stub.GetPlayerData(
            shardnode_pb2.GetPlayerDataRequest(player_id=player, system="guild", key="name"), timeout=5
        )
        assert got.value == b"larks"
        replica = process_cluster.node_addresses[route.replicas[0]]
        from_replica = node_call(replica).GetInventory(
            shardnode_pb2.GetInventoryRequest(player_id=player, allow_stale=True), timeout=5
        )
        assert list(from_replica.item_ids) == ["shield"] and from_replica.staleness.stale
        with pytest.raises(BlueMarbleError):
            await client.grant_items(player, ["nope"], deadline_s=1.0)
