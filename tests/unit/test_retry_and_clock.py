"""The one retry policy and the injected clock, driven by a fake clock (no real waiting)."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import structlog

from bluemarble.core.errors import FailedPrecondition, Unavailable
from bluemarble.runtime import retry
from bluemarble.runtime.clock import FakeClock, run_with_timeout, wait_event


async def test_fake_clock_wakes_sleepers_in_deadline_order() -> None:
    clock = FakeClock()
    woke: list[str] = []

    async def sleeper(name: str, s: float) -> None:
        await clock.sleep(s)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper("late", 3)), asyncio.create_task(sleeper("early", 1))]
    await clock.advance(0.5)
    assert woke == []
    await clock.advance(1.0)
    assert woke == ["early"]
    await clock.advance(2.0)
    assert woke == ["early", "late"]
    await asyncio.gather(*tasks)


async def test_wait_event_and_timeout_follow_the_fake_clock() -> None:
    clock = FakeClock()
    event = asyncio.Event()
    waiter = asyncio.create_task(wait_event(clock, event, 5))
    await clock.advance(4.9)
    assert not waiter.done()
    await clock.advance(0.2)
    assert waiter.done() and waiter.result() is False

    never = asyncio.Event()
    timed = asyncio.create_task(run_with_timeout(clock, never.wait(), 2))
    await clock.advance(2.1)
    with pytest.raises(TimeoutError):
        await timed


async def test_call_retries_retryable_errors_with_jittered_capped_delays() -> None:
    clock = FakeClock()
    attempts: list[float] = []

    async def flaky() -> str:
        attempts.append(clock.monotonic_s())
        if len(attempts) < 4:
            raise Unavailable("etcd down")
        return "ok"

    policy = retry.RetryPolicy(initial_s=0.1, max_backoff_s=0.4, deadline_s=10)
    task = asyncio.create_task(retry.call(flaky, what="flaky", policy=policy, clock=clock))
    await clock.advance(3)
    assert task.result() == "ok"
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(gaps) == 3
    assert all(0 <= g <= 0.4 + 0.011 for g in gaps), gaps


async def test_call_does_not_retry_fatal_errors() -> None:
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise FailedPrecondition("no")

    with pytest.raises(FailedPrecondition):
        await retry.call(refused, what="refused", clock=FakeClock())
    assert calls == 1


async def test_call_gives_up_at_the_deadline_with_the_last_error() -> None:
    clock = FakeClock()
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise Unavailable(f"down {calls}")

    policy = retry.RetryPolicy(initial_s=0.1, max_backoff_s=1.0, deadline_s=5)
    task = asyncio.create_task(retry.call(down, what="down", policy=policy, clock=clock))
    await clock.advance(6)
    with pytest.raises(Unavailable, match=f"down {calls}"):
        await task
    assert 3 <= calls, calls
    assert clock.monotonic_s() - 1000.0 <= 6.1


async def test_call_gives_up_after_max_attempts() -> None:
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise Unavailable("down")

    clock = FakeClock()
    task = asyncio.create_task(
        retry.call(down, what="down", policy=retry.RetryPolicy(deadline_s=None, max_attempts=3), clock=clock)
    )
    await clock.advance(10)
    with pytest.raises(Unavailable):
        await task
    assert calls == 3


def test_backoff_grows_capped_and_resets() -> None:
    backoff = retry.Backoff(retry.RetryPolicy(initial_s=0.1, max_backoff_s=1.0), FakeClock())
    delays = [backoff.next_delay_s() for _ in range(30)]
    assert all(0 <= d <= 1.0 for d in delays)
    assert len(set(delays)) > 20, "delays are jittered"
    backoff.reset()
    assert backoff.next_delay_s() <= 0.1


async def test_supervise_restarts_a_step_after_errors_and_crashes() -> None:
    clock = FakeClock()
    runs = 0
    stop = asyncio.Event()

    async def step() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise Unavailable("broken stream")
        if runs == 2:
            raise KeyError("a bug")
        if runs == 3:
            return
        stop.set()

    task = asyncio.create_task(retry.supervise(step, name="t", clock=clock, stop=stop))
    await clock.advance(10)
    await asyncio.wait_for(task, 1)
    assert runs == 4


async def test_supervise_logs_expected_failures_at_info_while_quiet() -> None:
    """A peer that said it is restarting: its stream's failures are news, not warnings."""
    clock = FakeClock()
    runs = 0
    stop = asyncio.Event()
    quiet = True

    async def step() -> None:
        nonlocal runs, quiet
        runs += 1
        if runs == 3:
            stop.set()
            return
        if runs == 2:
            quiet = False
        raise Unavailable("peer restarting")

    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(retry.supervise(step, name="t", clock=clock, stop=stop, quiet=lambda: quiet))
        await clock.advance(10)
        await asyncio.wait_for(task, 1)
    levels = [e["log_level"] for e in logs if e["event"] == "loop step failed; restarting"]
    assert levels == ["info", "warning"]


async def test_call_accepts_a_lambda_returning_an_awaitable() -> None:
    calls = 0

    async def flaky(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Unavailable("once")
        return x * 2

    clock = FakeClock()
    task = asyncio.create_task(retry.call(lambda: flaky(21), what="lambda", clock=clock))
    await clock.advance(1)
    assert task.result() == 42 and calls == 2
