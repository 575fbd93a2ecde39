"""The one retry policy and the injected clock, driven by a fake clock (no real waiting)."""

from __future__ import annotations

import asyncio
import contextlib
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


class TestARepeatingFailureIsLoggedWithoutFlooding:
    """A dependency that stays down: the first failure is a warning, then one summary line
    every few seconds with the count so far, and one line when it recovers."""

    async def test_call_logs_the_first_failure_summaries_and_the_recovery(self) -> None:
        clock = FakeClock()
        down = True

        async def control_plane() -> str:
            if down:
                raise Unavailable("control plane unreachable")
            return "ring"

        policy = retry.RetryPolicy(initial_s=0.05, max_backoff_s=0.1, deadline_s=None, max_attempts=10_000)
        with structlog.testing.capture_logs() as lines:
            task = asyncio.create_task(retry.call(control_plane, what="fetch ring (flood)", policy=policy, clock=clock))
            await clock.advance(30, step_s=0.02)
            down = False
            await clock.advance(1, step_s=0.02)
            assert task.result() == "ring"
        shown = [e for e in lines if e["log_level"] != "debug"]
        attempts = len([e for e in lines if e["event"].startswith("retrying")])
        assert attempts > 200  # about 13 a second
        assert shown[0]["event"] == "retrying" and shown[0]["log_level"] == "warning"
        assert shown[0]["attempt"] == 1
        summaries = [e for e in shown if e["event"] == "retrying (still failing)"]
        assert 5 <= len(summaries) <= 7, [e["event"] for e in shown]  # one per 5 s of 30 s
        assert all(e["log_level"] == "warning" for e in summaries)
        assert summaries[-1]["failures"] > 200 and summaries[-1]["failing_for_s"] >= 25
        assert shown[-1]["event"] == "retried operation succeeded" and shown[-1]["log_level"] == "info"
        assert shown[-1]["failures"] == attempts
        assert len(shown) == len(summaries) + 2
        numbers = [e["attempt"] for e in lines if e["event"].startswith("retrying")]
        assert numbers[:3] == [1, 2, 3]  # one count, not tenacity's own from the second attempt

    async def test_a_failure_long_after_the_last_is_a_new_first_failure(self) -> None:
        failures = retry.FailureLog()
        with structlog.testing.capture_logs() as lines:
            failures.failed("k", 0.0, "x failed")
            failures.failed("k", 1.0, "x failed")
            failures.failed("k", 1.0 + retry.FORGET_AFTER_S + 1, "x failed")
            failures.recovered("other", 100.0, "x recovered")
        assert [(e["event"], e["log_level"]) for e in lines] == [
            ("x failed", "warning"), ("x failed", "debug"), ("x failed", "warning")]

    async def test_expected_retries_are_logged_at_info_once_they_last_a_second(self) -> None:
        """A trade following its shard's failover says so; each of 600 trades retried once,
        quickly, by a replica at its limit does not (two info lines a trade, before)."""
        clock = FakeClock()

        async def run(failing_s: float) -> list[str]:
            started = clock.monotonic_s()

            async def prepare() -> str:
                if clock.monotonic_s() - started < failing_s:
                    raise Unavailable("shard-1 is failing over")
                return "prepared"

            policy = retry.RetryPolicy(initial_s=0.05, max_backoff_s=0.1, deadline_s=10)
            with structlog.testing.capture_logs() as lines:
                task = asyncio.create_task(retry.call(prepare, what=f"prepare t{failing_s} on shard-1", policy=policy,
                                                      clock=clock, expected=True))
                await clock.advance(failing_s + 1, step_s=0.02)
                assert task.result() == "prepared"
            return [f"{e['event']} {e['log_level']}" for e in lines if e["log_level"] != "debug"]

        assert await run(0.2) == []
        assert await run(2.5) == ["retrying (still failing) info", "retried operation succeeded info"]

    def test_it_follows_a_bounded_number_of_kinds(self) -> None:
        failures = retry.FailureLog(max_tracked=3)
        for n in range(10):
            failures.failed(f"trade {n}", float(n), "prepare failed")
        assert [failures.failing(f"trade {n}") for n in range(10)] == [False] * 7 + [True] * 3

    async def test_supervise_summarises_a_loop_that_keeps_failing_and_says_when_it_recovered(self) -> None:
        clock = FakeClock()
        stop = asyncio.Event()
        down = True

        async def watch() -> None:
            if down:
                raise Unavailable("etcd down")
            await clock.sleep(3600)

        with structlog.testing.capture_logs() as lines:
            task = asyncio.create_task(
                retry.supervise(watch, name="watch-x", clock=clock, stop=stop, healthy_after_s=2.0))
            await clock.advance(30, step_s=0.05)
            down = False
            await clock.advance(10, step_s=0.05)
            stop.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        shown = [(e["event"], e["log_level"]) for e in lines if e["log_level"] != "debug"]
        failed = len([e for e in lines if e["event"].startswith("loop step failed")])
        assert failed > 20
        assert shown[0] == ("loop step failed; restarting", "warning")
        assert shown[-1] == ("loop recovered", "info")
        assert 4 <= len(shown) - 2 <= 7, shown
        assert {event for event, _ in shown[1:-1]} == {"loop step failed; restarting (still failing)"}
