"""A node stopping on SIGTERM asks for a drain and waits for it within its leave timeout,
but not while nobody can record that drain: with no heartbeat through for a whole lease
(etcd or the control plane down), it stops at once and says why. An outside probe saw a
node wait its full 30 s during an etcd outage, logging only that it ran out of time."""

from __future__ import annotations

import asyncio

import structlog

from shardnode.agent import SessionState
from shardnode.main import _leave_when_asked


class _LeavingAgent:
    def __init__(self, state: SessionState):
        self.registration = object()
        self.shards = {"shard-1": object()}
        self.leave_declined = asyncio.Event()
        self.session_state = state
        self.asked = False

    def leave(self) -> None:
        self.asked = True


async def _leave(agent: _LeavingAgent, timeout_s: float) -> tuple[float, list[dict[str, object]]]:
    asked, stop = asyncio.Event(), asyncio.Event()
    asked.set()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(_leave_when_asked(agent, asked, stop, timeout_s), timeout_s + 5)  # type: ignore[arg-type]
    assert stop.is_set() and agent.asked
    return loop.time() - started, logs


async def test_a_node_whose_lease_lapsed_stops_at_once_and_says_why() -> None:
    took_s, logs = await _leave(_LeavingAgent(SessionState.LOST), timeout_s=20)
    assert took_s < 2
    assert any("no heartbeat got through for a whole lease" in str(e["event"]) for e in logs), logs


async def test_a_connected_node_waits_for_its_drain_until_the_timeout() -> None:
    took_s, logs = await _leave(_LeavingAgent(SessionState.CONNECTED), timeout_s=1.2)
    assert took_s >= 1.2
    assert any("roles not all moved away in time" in str(e["event"]) for e in logs), logs


async def test_a_declined_drain_stops_the_node_at_once() -> None:
    agent = _LeavingAgent(SessionState.CONNECTED)
    asyncio.get_running_loop().call_later(0.1, agent.leave_declined.set)
    took_s, logs = await _leave(agent, timeout_s=20)
    assert took_s < 2
    assert any("did not drain this node" in str(e["event"]) for e in logs), logs
