"""The routing client's resolve logic and retry decisions, against a fake node transport
(the client's own adapter boundary) and a fake clock: no server, no real waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any

import pytest

from bluemarble.client.control_plane import ControlPlaneClient
from bluemarble.client.ring_router import RingRouter
from bluemarble.client.routing import (
    EPOCH_AHEAD_GRACE_S,
    AssignmentCache,
    ClientClosed,
    CrossShardTrade,
    Route,
    RoutingClient,
    Target,
    is_redirect,
    should_retry,
    targets_for,
)
from bluemarble.client.trades import TradeClient
from bluemarble.core import errors
from bluemarble.core.ids import NodeId, PlayerId
from bluemarble.core.limits import echo
from bluemarble.core.ring import initial_ring
from bluemarble.core.trades.model import AbortCause, Outcome
from bluemarble.runtime.clock import FakeClock, SystemClock
from bluemarble.v1 import common_pb2, shardnode_pb2
from bluemarble.v1 import controlplane_pb2 as pb

RING = initial_ring(4, 10)
PLAYER = "player-42"
SHARD = RING.shard_for(PLAYER)
ADDRESSES = {"n1": "10.0.0.1:7101", "n2": "10.0.0.2:7101", "n3": "10.0.0.3:7101"}


def snapshot(primary: str, replicas: list[str], epoch: int = 1, revision: int = 10) -> pb.WatchAssignmentsResponse:
    """Every shard of RING led by ``primary``."""
    return pb.WatchAssignmentsResponse(
        revision=revision,
        snapshot=True,
        assignments=[
            common_pb2.Assignment(shard_id=s, epoch=epoch, primary=primary, replicas=replicas)
            for s in RING.shard_ids
        ],
        nodes=[common_pb2.NodeRef(node_id=n, address=a) for n, a in ADDRESSES.items()],
    )


def change(primary: str, replicas: list[str], epoch: int, revision: int) -> pb.WatchAssignmentsResponse:
    return pb.WatchAssignmentsResponse(
        revision=revision,
        assignments=[common_pb2.Assignment(shard_id=SHARD, epoch=epoch, primary=primary, replicas=replicas)],
    )


Handler = Callable[[str, Any], Any]


class FakeTransport:
    """Answers each call with ``handler(address, request)``: a response, an exception to
    raise, or an awaitable (a call that hangs until it is set). Records every call."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.calls: list[tuple[str, str, Any, float]] = []
        self.retained: list[set[str]] = []
        self.closed = False

    async def _answer(self, method: str, address: str, request: Any, timeout_s: float) -> Any:
        self.calls.append((method, address, request, timeout_s))
        result = self.handler(address, request)
        if isinstance(result, BaseException):
            raise result
        if isinstance(result, asyncio.Future):
            return await result
        return result

    async def get_inventory(self, address: str, request: Any, timeout_s: float) -> Any:
        return await self._answer("GetInventory", address, request, timeout_s)

    async def grant_items(self, address: str, request: Any, timeout_s: float) -> Any:
        return await self._answer("GrantItems", address, request, timeout_s)

    async def get_player_data(self, address: str, request: Any, timeout_s: float) -> Any:
        return await self._answer("GetPlayerData", address, request, timeout_s)

    async def set_player_data(self, address: str, request: Any, timeout_s: float) -> Any:
        return await self._answer("SetPlayerData", address, request, timeout_s)

    async def execute_local_trade(self, address: str, request: Any, timeout_s: float) -> Any:
        return await self._answer("ExecuteLocalTrade", address, request, timeout_s)

    def retain(self, addresses: Collection[str]) -> None:
        self.retained.append(set(addresses))

    async def close(self) -> None:
        self.closed = True

    def addresses_called(self) -> list[str]:
        return [address for _, address, _, _ in self.calls]


def inventory(node: str, epoch: int = 1, *, stale: bool = False, gold: int = 5) -> shardnode_pb2.GetInventoryResponse:
    return shardnode_pb2.GetInventoryResponse(
        player_id=PLAYER, item_ids=["sword"], gold=gold, shard_id=SHARD, epoch=epoch,
        staleness=shardnode_pb2.Staleness(stale=stale, lag_entries=3 if stale else 0, lag_ms=40 if stale else 0,
                                          served_by=node),
    )


def make_client(handler: Handler, clock: FakeClock | None = None) -> tuple[RoutingClient, FakeTransport]:
    transport = FakeTransport(handler)
    cache = AssignmentCache()
    cache.apply(snapshot("n1", ["n2", "n3"]))
    client = RoutingClient(
        None, router=RingRouter.from_ring(RING), assignments=cache, transport=transport,
        clock=clock or FakeClock(), retry_initial_s=0.05, retry_max_backoff_s=0.2,
    )
    return client, transport


async def run_on(clock: FakeClock, work: Any, *, advance_s: float = 10.0) -> Any:
    """Runs ``work`` while moving the fake clock on (at most ``advance_s``)."""
    task = asyncio.ensure_future(work)
    moved = 0.0
    while not task.done() and moved < advance_s:
        await clock.advance(0.05)
        moved += 0.05
    return await task


# ---- resolving ----


def test_resolve_maps_player_to_shard_primary_replicas_and_addresses() -> None:
    client, _ = make_client(lambda a, r: None)
    route = client.resolve(PLAYER)
    assert (route.shard_id, route.epoch, route.primary, route.replicas) == (SHARD, 1, "n1", ("n2", "n3"))
    assert dict(route.addresses) == ADDRESSES
    assert route.revision == 10


def test_resolve_refuses_a_bad_player_id_and_says_when_it_cannot_route() -> None:
    client, _ = make_client(lambda a, r: None)
    with pytest.raises(errors.InvalidArgument, match="player_id is empty"):
        client.resolve("")
    empty = RoutingClient(None, router=RingRouter.from_ring(RING), assignments=AssignmentCache(),
                          transport=FakeTransport(lambda a, r: None))
    with pytest.raises(errors.Unavailable, match="no assignments yet"):
        empty.resolve(PLAYER)


def test_targets_prefer_the_primary_then_replicas_only_for_stale_reads() -> None:
    route = Route(PlayerId(PLAYER), SHARD, 3, NodeId("n1"), (NodeId("n2"), NodeId("n3")),
                  {NodeId("n1"): "a1", NodeId("n3"): "a3"}, 10)
    assert targets_for(route, allow_stale=False) == [Target(NodeId("n1"), "a1", primary=True)]
    assert [(t.node_id, t.address) for t in targets_for(route, allow_stale=True)] == [
        ("n1", "a1"), ("n2", None), ("n3", "a3")]
    lost = Route(PlayerId(PLAYER), SHARD, 3, None, (NodeId("n2"),), {NodeId("n2"): "a2"}, 10)
    assert targets_for(lost, allow_stale=False) == []
    assert targets_for(lost, allow_stale=True) == [Target(NodeId("n2"), "a2", primary=False)]


def test_the_cache_applies_snapshots_changes_removals_and_ignores_progress() -> None:
    retained: list[set[str]] = []
    cache = AssignmentCache(on_addresses=lambda a: retained.append(set(a)))
    cache.apply(snapshot("n1", ["n2"]))
    assert cache.synced.is_set() and len(cache.view.assignments) == 4
    assert set(cache.view.addresses) == {"n1", "n2"}  # n3 is named by no assignment: forgotten
    event = cache.changed
    cache.apply(pb.WatchAssignmentsResponse(revision=11))  # progress
    assert not event.is_set() and cache.view.revision == 10
    cache.apply(change("n2", ["n3"], epoch=2, revision=12))
    assert event.is_set() and cache.view.assignments[SHARD].primary == "n2"
    cache.apply(pb.WatchAssignmentsResponse(revision=13, removed_shard_ids=[SHARD]))
    assert SHARD not in cache.view.assignments
    cache.apply(change("n3", [], epoch=3, revision=12))  # older than what we have: ignored
    assert SHARD not in cache.view.assignments
    # A new snapshot replaces everything; a node nobody names any more loses its channel.
    cache.apply(pb.WatchAssignmentsResponse(
        revision=20, snapshot=True,
        assignments=[common_pb2.Assignment(shard_id=SHARD, epoch=4, primary="n1")],
        nodes=[common_pb2.NodeRef(node_id="n1", address=ADDRESSES["n1"])],
    ))
    assert list(cache.view.assignments) == [SHARD] and retained[-1] == {ADDRESSES["n1"]}


def test_addresses_from_list_nodes_fill_gaps_but_never_override_the_stream() -> None:
    cache = AssignmentCache()
    cache.apply(pb.WatchAssignmentsResponse(
        revision=5, snapshot=True,
        assignments=[common_pb2.Assignment(shard_id=SHARD, epoch=1, primary="n1", replicas=["n2"])],
        nodes=[common_pb2.NodeRef(node_id="n1", address="stream:1")],
    ))
    cache.add_addresses([common_pb2.Node(node_id=n, address=f"list:{n[1]}") for n in ("n1", "n2", "n9")])
    assert dict(cache.view.addresses) == {"n1": "stream:1", "n2": "list:2"}


# ---- retry decisions ----


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (errors.FailedPrecondition("n1 is not the primary of shard-3; the primary is n2"), True),
        (errors.FailedPrecondition("stale epoch 4 for shard-3: current epoch is 5"), True),
        (errors.FailedPrecondition("n1's lease may have expired; no STRONG operation as primary"), True),
        (errors.FailedPrecondition("n2 is a replica of shard-3; pass allow_stale"), True),
        (errors.FailedPrecondition("item 'sword' is already owned by another player (shard-3)"), False),
        (errors.FailedPrecondition("node n1 holds no copy of shard-3; ask the control plane where it is"), True),
        (errors.FailedPrecondition("node n1 stopped being the primary of shard-3 (deposed)"), True),
        (errors.FailedPrecondition("shard-3 is fenced at epoch 5; a write at epoch 4 is refused"), True),
        (errors.FailedPrecondition("item 'x' is already owned by a player of shard-3"), False),
        (errors.FailedPrecondition("request id 'r' was already used for a different request on shard-3"), False),
        (errors.FailedPrecondition("player 'p' of shard-3 would hold 9 gold; a player holds at most 2^53"), False),
        (errors.FailedPrecondition("something else entirely"), False),
        (errors.Unavailable("node down"), True),
        (errors.DeadlineExceeded("slow"), True),
        (errors.Aborted("race"), True),
        (errors.ResourceExhausted("this server is running 16384 calls and streams at once (its limit); retry"), True),
        (errors.ResourceExhausted("Received message larger than max (9000000 vs. 8388608)"), False),
        (errors.InvalidArgument("bad"), False),
        (errors.NotFound("no such player"), False),
        (errors.Unimplemented("later"), False),
        (errors.BlueMarbleError("internal"), False),
    ],
)
def test_which_errors_are_retried(error: errors.BlueMarbleError, retry: bool) -> None:
    assert should_retry(error) is retry
    assert is_redirect(error) is (retry and isinstance(error, errors.FailedPrecondition))


# ---- calls ----


async def test_a_read_goes_to_the_primary_with_the_remaining_deadline() -> None:
    client, transport = make_client(lambda a, r: inventory("n1"))
    result = await client.get_inventory(PLAYER, deadline_s=2.0)
    assert (result.gold, result.item_ids, result.shard_id, result.served_by, result.stale) == (5, ("sword",), SHARD,
                                                                                               "n1", False)
    [(method, address, request, timeout_s)] = transport.calls
    assert (method, address, request.allow_stale, timeout_s) == ("GetInventory", ADDRESSES["n1"], False, 2.0)


async def test_a_redirect_is_followed_once_the_cache_names_the_new_primary() -> None:
    clock = FakeClock()
    client, transport = make_client(lambda a, r: None, clock)

    def handler(address: str, request: Any) -> Any:
        if address == ADDRESSES["n1"]:
            # The control plane moves the shard while the old primary refuses.
            client.assignments.apply(change("n2", ["n3"], epoch=2, revision=11))
            return errors.FailedPrecondition(f"n1 is not the primary of {SHARD} at epoch 2; the primary is n2")
        response = shardnode_pb2.GrantItemsResponse(inventory=inventory("n2", epoch=2), lsn=7)
        return response

    transport.handler = handler
    result = await run_on(clock, client.grant_items(PLAYER, ["sword"], gold=5, request_id="req-1"))
    assert transport.addresses_called() == [ADDRESSES["n1"], ADDRESSES["n2"]]
    assert {c[2].request_id for c in transport.calls} == {"req-1"} and {c[2].epoch for c in transport.calls} == {0}
    assert (result.lsn, result.inventory.epoch, result.request_id, result.replayed) == (7, 2, "req-1", False)


async def test_every_retry_of_one_grant_reuses_its_generated_request_id() -> None:
    clock = FakeClock()
    answers = iter([errors.Unavailable("node n1 unavailable"), errors.DeadlineExceeded("slow"),
                    shardnode_pb2.GrantItemsResponse(inventory=inventory("n1"), lsn=3, replayed=True)])
    client, transport = make_client(lambda a, r: next(answers), clock)
    result = await run_on(clock, client.grant_items(PLAYER, ["sword"]))
    ids = {c[2].request_id for c in transport.calls}
    assert len(transport.calls) == 3 and len(ids) == 1 and result.request_id in ids
    # The node's "replayed" answers this call's own first attempt (only it used the generated
    # id): the call applied the grant, so it is no replay of another write.
    assert not result.replayed


async def test_a_callers_request_id_answered_from_an_earlier_write_is_replayed() -> None:
    client, _ = make_client(lambda a, r: shardnode_pb2.GrantItemsResponse(inventory=inventory("n1"), lsn=3,
                                                                           replayed=True))
    result = await client.grant_items(PLAYER, ["sword"], request_id="login-reward-7")
    assert result.replayed and result.request_id == "login-reward-7"


async def test_an_attempt_in_flight_is_abandoned_when_the_primary_changes() -> None:
    clock = FakeClock()
    hang: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    client, transport = make_client(
        lambda a, r: hang if a == ADDRESSES["n1"] else shardnode_pb2.GrantItemsResponse(inventory=inventory("n2", 2)),
        clock,
    )
    task = asyncio.ensure_future(client.grant_items(PLAYER, ["sword"], deadline_s=5.0))
    await clock.advance(0.1)
    assert transport.addresses_called() == [ADDRESSES["n1"]] and not task.done()
    client.assignments.apply(change("n2", ["n3"], epoch=2, revision=11))
    result = await run_on(clock, task, advance_s=0.5)
    assert result.inventory.served_by == "n2" and hang.cancelled()


async def test_a_move_seen_as_the_answer_arrives_never_cancels_the_caller_later() -> None:
    """On the system clock an attempt runs in the caller's task and a move cancels that
    task. A move whose callback runs just after the answer (both in one loop turn) must not
    cancel anything: the caller has its answer and has moved on (to its next call, say)."""
    answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    called = asyncio.Event()
    transport = FakeTransport(lambda a, r: (called.set(), answer)[1])
    cache = AssignmentCache()
    cache.apply(snapshot("n1", ["n2", "n3"]))
    client = RoutingClient(None, router=RingRouter.from_ring(RING), assignments=cache, transport=transport,
                           clock=SystemClock())

    async def caller() -> str:
        inv = await client.get_inventory(PLAYER, deadline_s=5.0)
        await asyncio.sleep(0.05)  # the caller's next await: a late cancel would land here
        return inv.served_by

    task = asyncio.ensure_future(caller())
    await asyncio.wait_for(called.wait(), 5.0)
    answer.set_result(inventory("n1"))  # the attempt resumes first ...
    cache.apply(change("n2", ["n3"], epoch=2, revision=11))  # ... then the move's callback runs
    assert await task == "n1"


@pytest.mark.parametrize("error", [errors.NotFound("no player"), errors.InvalidArgument("bad item"),
                                   errors.FailedPrecondition("item 'sword' is already owned by another player")])
async def test_final_errors_are_raised_at_once(error: errors.BlueMarbleError) -> None:
    client, transport = make_client(lambda a, r: error)
    with pytest.raises(type(error)):
        await client.grant_items(PLAYER, ["sword"])
    assert len(transport.calls) == 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.grant_items(PLAYER, ["a", "a"]), "lists item 'a' twice"),
        (lambda c: c.grant_items(PLAYER, [""]), r"item_ids\[0\] is empty"),
        (lambda c: c.grant_items(PLAYER, [f"i{i}" for i in range(257)]), "at most 256"),
        (lambda c: c.grant_items(PLAYER, ["x" * 129]), "at most 128 bytes"),
        (lambda c: c.grant_items(PLAYER, [], gold=2**53 + 1), "between 0 and 2"),
        (lambda c: c.grant_items(PLAYER, ["a"], request_id=""), "request_id is empty"),
        (lambda c: c.set_player_data(PLAYER, "guild", "k", b"x" * (64 * 1024 + 1)), "64 KiB"),
        (lambda c: c.get_player_data(PLAYER, "guild", ""), "key is 0 bytes"),
        (lambda c: c.get_inventory("p" * 129), "player_id is 129 bytes"),
    ],
)
async def test_bad_input_is_refused_before_anything_is_sent(call: Any, message: str) -> None:
    client, transport = make_client(lambda a, r: None)
    with pytest.raises(errors.InvalidArgument, match=message):
        await call(client)
    assert transport.calls == []


async def test_retryable_errors_are_retried_until_the_deadline_then_raised() -> None:
    clock = FakeClock()
    client, transport = make_client(lambda a, r: errors.Unavailable(f"node {a} unavailable"), clock)
    started = clock.monotonic_s()
    with pytest.raises(errors.Unavailable, match="unavailable"):
        await run_on(clock, client.get_inventory(PLAYER, deadline_s=1.0), advance_s=3.0)
    assert 1.0 <= clock.monotonic_s() - started <= 1.2
    assert len(transport.calls) >= 3
    assert all(timeout_s <= 1.0 for *_, timeout_s in transport.calls)


async def test_attempts_used_up_before_the_deadline_say_so_and_stay_retryable() -> None:
    """A shard that keeps moving can use up the attempts before the deadline: the caller
    gets UNAVAILABLE saying what happened, not a node's "ask the control plane"."""
    clock = FakeClock()
    client, transport = make_client(
        lambda a, r: errors.FailedPrecondition(f"node {a} is not the primary of {SHARD}; ask the control plane"), clock
    )
    client._max_attempts = 3
    with pytest.raises(errors.Unavailable, match="gave up after 3 attempts") as info:
        await run_on(clock, client.get_inventory(PLAYER, deadline_s=20.0), advance_s=25.0)
    assert "primary kept changing" in str(info.value) and "not the primary" in str(info.value)
    assert len(transport.calls) == 3


async def test_a_silent_primary_costs_the_call_its_deadline_not_more() -> None:
    clock = FakeClock()
    client, transport = make_client(lambda a, r: asyncio.get_running_loop().create_future(), clock)
    with pytest.raises(errors.DeadlineExceeded, match="did not answer before the call's deadline") as info:
        await run_on(clock, client.get_inventory(PLAYER, deadline_s=0.5), advance_s=2.0)
    assert len(transport.calls) == 1 and transport.calls[0][3] == 0.5
    assert "a replica takes its shard over once its lease expires" in str(info.value)  # what to expect next


async def test_a_write_of_unknown_outcome_names_the_request_id_to_retry_with() -> None:
    # Without it, a grant that ran out of time under a generated id could not be retried
    # safely: a fresh id would grant twice.
    clock = FakeClock()
    client, _ = make_client(lambda a, r: asyncio.get_running_loop().create_future(), clock)
    with pytest.raises(errors.DeadlineExceeded, match="did not answer before the call's deadline") as info:
        await run_on(clock, client.grant_items(PLAYER, ["sword"], deadline_s=0.5), advance_s=2.0)
    sent = info.value.request_id
    assert sent and f"retry with request_id '{sent}', never a new one" in str(info.value), info.value
    with pytest.raises(errors.DeadlineExceeded) as info:
        await run_on(clock, client.set_player_data(PLAYER, "chat", "k", b"v", request_id="mine", deadline_s=0.5),
                     advance_s=2.0)
    assert info.value.request_id == "mine" and "request_id 'mine'" in str(info.value)


async def test_a_stale_read_falls_back_to_a_replica_when_the_primary_fails() -> None:
    clock = FakeClock()

    def handler(address: str, request: Any) -> Any:
        if address == ADDRESSES["n1"]:
            return errors.Unavailable("node n1 unavailable: connection refused")
        return inventory("n2", stale=True, gold=4)

    client, transport = make_client(handler, clock)
    result = await run_on(clock, client.get_inventory(PLAYER, allow_stale=True))
    assert (result.stale, result.served_by, result.lag_entries, result.lag_ms, result.gold) == (True, "n2", 3, 40, 4)
    assert transport.addresses_called() == [ADDRESSES["n1"], ADDRESSES["n2"]]
    assert all(c[2].allow_stale for c in transport.calls)
    # Without allow_stale, a replica is never asked.
    transport.calls.clear()
    with pytest.raises(errors.Unavailable):
        await run_on(clock, client.get_inventory(PLAYER, deadline_s=0.3))
    assert set(transport.addresses_called()) == {ADDRESSES["n1"]}


async def test_a_hung_primary_leaves_a_stale_read_time_for_the_replicas() -> None:
    clock = FakeClock()
    # The primary and the first replica hang; the second replica answers.
    def handler(address: str, request: Any) -> Any:
        return asyncio.get_running_loop().create_future() if address != ADDRESSES["n3"] else inventory("n3", stale=True)

    client, transport = make_client(handler, clock)
    client._stale_primary_timeout_s = 0.4
    result = await run_on(clock, client.get_inventory(PLAYER, allow_stale=True, deadline_s=3.0))
    assert result.served_by == "n3"
    assert [(a, t) for _, a, _, t in transport.calls][:2] == [(ADDRESSES["n1"], 0.4), (ADDRESSES["n2"], 0.4)]


async def test_a_shard_without_primary_is_waited_for_within_the_deadline() -> None:
    clock = FakeClock()
    client, transport = make_client(lambda a, r: inventory("n2", epoch=2), clock)
    client.assignments.apply(pb.WatchAssignmentsResponse(
        revision=11, assignments=[common_pb2.Assignment(shard_id=SHARD, epoch=1, primary="", replicas=["n2"])]))
    task = asyncio.ensure_future(client.get_inventory(PLAYER, deadline_s=5.0))
    await clock.advance(1.0)
    assert transport.calls == [] and not task.done()
    client.assignments.apply(change("n2", ["n3"], epoch=2, revision=12))
    result = await run_on(clock, task, advance_s=1.0)
    assert result.served_by == "n2" and transport.addresses_called() == [ADDRESSES["n2"]]


async def test_a_caller_epoch_older_than_the_shards_is_refused_at_once() -> None:
    client, transport = make_client(lambda a, r: None)
    client.assignments.apply(change("n2", ["n3"], epoch=4, revision=11))
    with pytest.raises(errors.FailedPrecondition, match="epoch 3 is older"):
        await client.grant_items(PLAYER, ["sword"], epoch=3)
    assert transport.calls == []


@pytest.mark.parametrize("request_id", ["release-gift-1", "primary-quest-2", "epoch2-reward-3", "replica-x" * 12])
async def test_a_request_id_that_reads_like_a_redirect_does_not_make_a_refusal_retryable(request_id: str) -> None:
    """The node's refusal quotes the caller's request id; words in it ("lease", "primary",
    "epoch") must not turn a final refusal into "ask the current primary"."""

    def refuse(address: str, request: Any) -> errors.BlueMarbleError:
        return errors.FailedPrecondition(
            f"request id {echo(request.request_id)} was already used for a different request; use a new one")

    client, transport = make_client(refuse)
    with pytest.raises(errors.FailedPrecondition, match="already used for a different request"):
        await client.grant_items(PLAYER, ["sword"], request_id=request_id)
    assert len(transport.calls) == 1  # final at once, not retried to the deadline
    # Read without the id, the same words still mark a node's "not here" as a redirect.
    moved = errors.FailedPrecondition(f"node n1 stopped being the primary of shard-3 (write {echo(request_id)})")
    assert is_redirect(moved, [request_id]) and should_retry(moved, [request_id])
    quoted_only = errors.FailedPrecondition(f"refused: {echo(request_id)}")
    assert is_redirect(quoted_only) and not is_redirect(quoted_only, [request_id])
    # Only whole ids are left out: a player "a" or "mary" leaves the node's words alone.
    assert is_redirect(errors.FailedPrecondition("node n4 is not the primary of shard-1"), ["a", "mary", "n4"])


async def test_a_caller_epoch_no_node_knows_is_refused_after_a_grace_not_the_whole_deadline() -> None:
    clock = FakeClock()

    def ahead(address: str, request: Any) -> errors.BlueMarbleError:
        return errors.FailedPrecondition(
            f"epoch {request.epoch} is not the current epoch of shard-3 (the primary n1 is at epoch 1)")

    client, transport = make_client(ahead, clock)
    started = clock.monotonic_s()
    with pytest.raises(errors.FailedPrecondition, match=r"epoch 99 is ahead of .* current epoch 1") as info:
        await run_on(clock, client.grant_items(PLAYER, ["sword"], epoch=99, deadline_s=30.0), advance_s=40.0)
    took = clock.monotonic_s() - started
    assert EPOCH_AHEAD_GRACE_S <= took < EPOCH_AHEAD_GRACE_S + 1.0, took
    assert not info.value.retryable and len(transport.calls) >= 2  # asked again within the grace


async def test_player_data_round_trip_and_unset_values() -> None:
    def handler(address: str, request: Any) -> Any:
        if isinstance(request, shardnode_pb2.SetPlayerDataRequest):
            return shardnode_pb2.SetPlayerDataResponse(shard_id=SHARD, epoch=1, lsn=9,
                                                       consistency=common_pb2.CONSISTENCY_MODEL_EVENTUAL)
        return shardnode_pb2.GetPlayerDataResponse(player_id=PLAYER, system="guild", key=request.key,
                                                   value=b"owls" if request.key == "name" else b"",
                                                   found=request.key == "name", shard_id=SHARD, epoch=1)

    client, _ = make_client(handler)
    written = await client.set_player_data(PLAYER, "guild", "name", b"owls", request_id="r-9")
    assert (written.lsn, written.request_id, written.consistency) == (9, "r-9", common_pb2.CONSISTENCY_MODEL_EVENTUAL)
    assert (await client.get_player_data(PLAYER, "guild", "name")).value == b"owls"
    assert (await client.get_player_data(PLAYER, "guild", "rank")).value is None


async def test_a_closed_client_no_longer_answers_from_its_caches() -> None:
    client, _ = make_client(lambda a, r: None)
    assert client.resolve(PLAYER).shard_id == SHARD
    assert client.same_shard(PLAYER, PLAYER)
    await client.close()
    with pytest.raises(ClientClosed, match="closed"):
        client.resolve(PLAYER)
    with pytest.raises(ClientClosed, match="closed"):
        client.same_shard(PLAYER, PLAYER)
    with pytest.raises(ClientClosed, match="closed"):
        await client.start()
    # Nothing is sent after close, so nothing is in doubt: no "outcome unknown".
    for write in (client.grant_items(PLAYER, ["i1"], request_id="g-1"),
                  client.set_player_data(PLAYER, "guild", "name", b"owls", request_id="d-1")):
        with pytest.raises(ClientClosed) as closed:
            await write
        assert "outcome unknown" not in str(closed.value) and "closed; make a new one" in str(closed.value)


@pytest.mark.parametrize(("addresses", "message"), [
    ("127.0.0.1", "malformed; expected host:port"),
    (["127.0.0.1:7000", "cp-2"], "'cp-2' is malformed"),
    ("127.0.0.1:70000", "outside 1..65535"),
    ([], "no control-plane address given"),
    (" , ", "no control-plane address given"),
    ([7000], "is a int; give a str"),
    (123, "are a int; give a str"),
    (b"127.0.0.1:7000", "are a bytes; give a str"),
])
async def test_control_plane_addresses_are_checked_before_anything_is_dialled(
    addresses: Any, message: str
) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        RoutingClient(addresses)
    with pytest.raises(errors.InvalidArgument, match=message):
        ControlPlaneClient(addresses)
    with pytest.raises(errors.InvalidArgument, match=message):
        TradeClient(addresses)


async def test_a_client_that_was_never_started_says_so() -> None:
    client = RoutingClient(["127.0.0.1:1"], transport=FakeTransport(lambda a, r: None))
    try:
        with pytest.raises(errors.FailedPrecondition, match="not started"):
            await client.wait_ready(0.1)
        with pytest.raises(errors.FailedPrecondition, match="not started"):  # not "retry shortly": it never comes
            client.resolve("player-1")
        with pytest.raises(errors.FailedPrecondition, match="not started"):
            client.same_shard("player-1", "player-2")
    finally:
        await client.close()



# ---- the system clock's path (the call runs in the caller's task) ----


def make_system_client(handler: Handler) -> tuple[RoutingClient, FakeTransport]:
    transport = FakeTransport(handler)
    cache = AssignmentCache()
    cache.apply(snapshot("n1", ["n2", "n3"]))
    client = RoutingClient(
        None, router=RingRouter.from_ring(RING), assignments=cache, transport=transport,
        clock=SystemClock(), retry_initial_s=0.01, retry_max_backoff_s=0.05,
    )
    return client, transport


async def test_on_the_system_clock_a_move_abandons_the_attempt_and_the_retry_reaches_the_new_primary() -> None:
    hang: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    called = asyncio.Event()

    def handler(address: str, request: Any) -> Any:
        called.set()
        return hang if address == ADDRESSES["n1"] else shardnode_pb2.GrantItemsResponse(inventory=inventory("n2", 2))

    client, transport = make_system_client(handler)
    task = asyncio.ensure_future(client.grant_items(PLAYER, ["sword"], deadline_s=5.0))
    await asyncio.wait_for(called.wait(), 5.0)
    client.assignments.apply(change("n2", ["n3"], epoch=2, revision=11))
    result = await asyncio.wait_for(task, 5.0)
    assert result.inventory.served_by == "n2" and hang.cancelled()
    assert transport.addresses_called() == [ADDRESSES["n1"], ADDRESSES["n2"]]


async def test_on_the_system_clock_a_silent_primary_costs_the_call_its_deadline() -> None:
    client, transport = make_system_client(lambda a, r: asyncio.get_running_loop().create_future())
    with pytest.raises(errors.DeadlineExceeded, match="did not answer before the call's deadline"):
        await asyncio.wait_for(client.get_inventory(PLAYER, deadline_s=0.2), 5.0)
    assert len(transport.calls) == 1


async def test_on_the_system_clock_the_callers_own_cancellation_is_not_turned_into_an_error() -> None:
    called = asyncio.Event()

    def handler(address: str, request: Any) -> Any:
        called.set()
        return asyncio.get_running_loop().create_future()

    client, _ = make_system_client(handler)
    task = asyncio.ensure_future(client.grant_items(PLAYER, ["sword"], deadline_s=5.0))
    await asyncio.wait_for(called.wait(), 5.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ---- same-shard trades, straight to the primary ----

MATE = next(p for p in (f"mate-{i}" for i in range(1000)) if RING.shard_for(PlayerId(p)) == SHARD)
FAR = next(p for p in (f"far-{i}" for i in range(1000)) if RING.shard_for(PlayerId(p)) != SHARD)


def local_trade(outcome: common_pb2.TradeOutcome = common_pb2.TRADE_OUTCOME_COMMITTED, *, reason: str = "",
                replayed: bool = False) -> shardnode_pb2.ExecuteLocalTradeResponse:
    return shardnode_pb2.ExecuteLocalTradeResponse(trade_id="t1", outcome=outcome, reason=reason, replayed=replayed)


async def test_a_same_shard_trade_goes_to_the_primary_with_its_shard_and_epoch() -> None:
    client, transport = make_client(lambda a, r: local_trade())
    assert client.same_shard(PLAYER, MATE) and not client.same_shard(PLAYER, FAR)
    result = await client.execute_local_trade("t1", PLAYER, MATE, a_items=["sword"], b_gold=7, deadline_s=2.0)
    assert (result.trade_id, result.outcome, result.committed, result.replayed, result.shard_id, result.attempts) == (
        "t1", Outcome.COMMITTED, True, False, SHARD, 1)
    [(method, address, request, timeout_s)] = transport.calls
    assert (method, address, timeout_s) == ("ExecuteLocalTrade", ADDRESSES["n1"], 2.0)
    assert request == shardnode_pb2.ExecuteLocalTradeRequest(
        trade_id="t1", shard_id=SHARD, epoch=1, player_a=PLAYER, player_b=MATE,
        a_gives=common_pb2.Offer(item_ids=["sword"]), b_gives=common_pb2.Offer(gold=7))


async def test_a_refused_local_trade_is_an_aborted_answer_not_an_error() -> None:
    client, _ = make_client(lambda a, r: local_trade(common_pb2.TRADE_OUTCOME_ABORTED, reason="mate has 3 gold"))
    result = await client.execute_local_trade("t1", PLAYER, MATE, b_gold=7)
    assert (result.outcome, result.committed, result.reason) == (Outcome.ABORTED, False, "mate has 3 gold")
    assert not result.worth_retrying  # the cause is UNKNOWN here (the fake names none): not said to be worth it
    contended = shardnode_pb2.ExecuteLocalTradeResponse(
        trade_id="t2", outcome=common_pb2.TRADE_OUTCOME_ABORTED, reason="item held by another trade",
        abort_cause=common_pb2.TRADE_ABORT_CAUSE_CONTENDED)
    client, _ = make_client(lambda a, r: contended)
    result = await client.execute_local_trade("t2", PLAYER, MATE, b_gold=7)
    assert result.worth_retrying and result.abort_cause is AbortCause.CONTENDED


async def test_a_local_trade_follows_a_failover_with_the_same_trade_id_and_the_new_epoch() -> None:
    clock = FakeClock()
    client, transport = make_client(lambda a, r: None, clock)

    def handler(address: str, request: Any) -> Any:
        if address == ADDRESSES["n1"]:
            client.assignments.apply(change("n2", ["n3"], epoch=2, revision=11))
            return errors.FailedPrecondition(f"n1 is not the primary of {SHARD} at epoch 2; the primary is n2")
        return local_trade(replayed=True)

    transport.handler = handler
    result = await run_on(clock, client.execute_local_trade("t1", PLAYER, MATE, a_gold=1, b_items=["gem"]))
    assert transport.addresses_called() == [ADDRESSES["n1"], ADDRESSES["n2"]]
    assert [(c[2].trade_id, c[2].epoch) for c in transport.calls] == [("t1", 1), ("t1", 2)]
    assert result.replayed and result.attempts == 2 and result.committed


async def test_an_unavailable_primary_is_retried_with_the_same_trade_id_until_the_deadline() -> None:
    clock = FakeClock()
    client, transport = make_client(lambda a, r: errors.Unavailable("node n1 unavailable"), clock)
    with pytest.raises(errors.Unavailable):
        await run_on(clock, client.execute_local_trade("t1", PLAYER, MATE, a_gold=1, deadline_s=1.0))
    assert len(transport.calls) >= 2 and {c[2].trade_id for c in transport.calls} == {"t1"}


async def test_players_on_different_shards_are_refused_before_anything_is_sent() -> None:
    client, transport = make_client(lambda a, r: local_trade())
    with pytest.raises(CrossShardTrade, match="different shards"):
        await client.execute_local_trade("t1", PLAYER, FAR, a_gold=1)
    assert transport.calls == []


async def test_a_primary_whose_ring_puts_the_players_apart_is_final_cross_shard() -> None:
    refusal = errors.FailedPrecondition(
        f"players {PLAYER} ({SHARD}) and {MATE} (shard-9) are on different shards; use TradeCoordinator.ExecuteTrade")
    client, transport = make_client(lambda a, r: refusal)
    with pytest.raises(CrossShardTrade):
        await client.execute_local_trade("t1", PLAYER, MATE, a_gold=1)
    assert len(transport.calls) == 1
    assert not should_retry(CrossShardTrade("players primary-1 and epoch-2 are on different shards"))


@pytest.mark.parametrize(("terms", "message"), [
    ({"player_b": PLAYER, "a_gold": 1}, "cannot trade with themselves"),
    ({"a_items": ["x", "x"]}, "twice"),
    ({}, "empty"),
    ({"a_gold": -1}, "gold"),
])
async def test_bad_trade_terms_are_refused_before_anything_is_sent(terms: dict[str, Any], message: str) -> None:
    client, transport = make_client(lambda a, r: local_trade())
    args: dict[str, Any] = {"player_b": MATE, **terms}
    with pytest.raises(errors.InvalidArgument, match=message):
        await client.execute_local_trade("t1", PLAYER, **args)
    assert transport.calls == []


@pytest.mark.parametrize(("call", "message"), [
    (lambda c: c.grant_items(PLAYER, None), "item_ids is a NoneType"),
    (lambda c: c.grant_items(PLAYER, ["sword"], epoch=-1), "epoch is -1"),
    (lambda c: c.grant_items(PLAYER, ["sword"], epoch="1"), "epoch is a str"),
    (lambda c: c.grant_items("p\udcff", ["sword"]), "lone surrogate"),
    (lambda c: c.set_player_data(PLAYER, "guild", 5, b"x"), "key is a int"),
    (lambda c: c.set_player_data(PLAYER, 5, "name", b"x"), "system is a int"),
    (lambda c: c.get_player_data(PLAYER, "guild", "name", allow_stale="no"), "allow_stale is a str"),
    (lambda c: c.get_inventory(PLAYER, allow_stale=None), "allow_stale is a NoneType"),
    (lambda c: c.execute_local_trade("t1", PLAYER, PLAYER + "x", a_items=None, b_gold=1), "a_items is a NoneType"),
])
async def test_arguments_of_the_wrong_type_are_invalid_argument_before_anything_is_sent(
    call: Callable[[RoutingClient], Any], message: str
) -> None:
    sent: list[object] = []
    client, _ = make_client(lambda a, r: sent.append(r))
    with pytest.raises(errors.InvalidArgument, match=message):
        await call(client)
    assert sent == []
    await client.close()
