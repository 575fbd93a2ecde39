"""Injected time: production code asks a :class:`Clock`, tests give a :class:`FakeClock`.

Every loop that waits (election, reconciler, mirrors, node agent, retries) takes a clock
instead of calling ``asyncio.sleep`` or the loop's time directly, so a test can drive
hours of leases, backoffs and timeouts in microseconds, deterministically, and never
sleeps to "let things settle".

Waiting for "an event, or at most T seconds" goes through :func:`wait_event`, which
races the event against ``clock.sleep``: the same code runs on both clocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    def monotonic_s(self) -> float:
        """Seconds on a clock that never goes back (for deadlines and intervals)."""

    def wall_ms(self) -> int:
        """Unix time in milliseconds (for values shown to people and other processes)."""

    async def sleep(self, seconds: float) -> None:
        """Waits ``seconds`` on this clock (0 or less: yields once)."""


class SystemClock:
    """The real clock: ``time.monotonic``, ``time.time_ns`` and ``asyncio.sleep``."""

    def monotonic_s(self) -> float:
        return time.monotonic()

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


class FakeClock:
    """A clock that moves only when a test says so (:meth:`advance`).

    Sleepers are woken in deadline order as time passes them; :meth:`advance` lets the
    woken tasks run before it returns, so after ``await clock.advance(5)`` everything that
    was due within those 5 seconds has had its turn. Wall time moves with monotonic time.
    """

    def __init__(self, start_s: float = 1000.0, wall_start_ms: int = 1_700_000_000_000):
        self._now_s = start_s
        self._wall_offset_ms = wall_start_ms - int(start_s * 1000)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def monotonic_s(self) -> float:
        return self._now_s

    def wall_ms(self) -> int:
        return int(self._now_s * 1000) + self._wall_offset_ms

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now_s + seconds, next(self._order), future))
        await future

    @property
    def sleepers(self) -> int:
        """Tasks currently sleeping on this clock (cancelled ones excluded)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    async def settle(self, rounds: int = 20) -> None:
        """Lets ready tasks run (a few event-loop turns) without moving time."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def advance(self, seconds: float, step_s: float = 0.01) -> None:
        """Moves time forward by ``seconds`` in steps of at most ``step_s``, waking
        sleepers whose deadline passed and letting them run at each step."""
        target = self._now_s + seconds
        await self.settle()
        while True:
            next_due = self._sleepers[0][0] if self._sleepers else target
            self._now_s = min(max(next_due, self._now_s), target, self._now_s + step_s)
            while self._sleepers and self._sleepers[0][0] <= self._now_s:
                _, _, future = heapq.heappop(self._sleepers)
                if not future.done():
                    future.set_result(None)
            await self.settle()
            if self._now_s >= target:
                return


async def wait_event(clock: Clock, event: asyncio.Event, timeout_s: float) -> bool:
    """Waits until ``event`` is set or ``timeout_s`` passed on ``clock``; True if set."""
    if event.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        await run_with_timeout(clock, event.wait(), timeout_s)
    return event.is_set()


async def run_with_timeout(clock: Clock, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
    """Runs ``coro``; if it has not finished after ``timeout_s`` on ``clock``, cancels it
    and raises TimeoutError. (``asyncio.timeout`` reads the loop's own time, which a fake
    clock does not move.)

    On the system clock this is ``asyncio.timeout`` (the loop's time is the same
    monotonic clock): no extra task and no ``asyncio.wait`` per call, which matters on
    paths taken once per write (a STRONG write's wait for its replica, a replication
    batch's ack)."""
    if type(clock) is SystemClock:
        try:
            async with asyncio.timeout(timeout_s):
                return await coro
        except TimeoutError as e:
            raise TimeoutError(f"no answer within {timeout_s:g} s") from e
    work = asyncio.ensure_future(coro)
    timer = asyncio.ensure_future(clock.sleep(timeout_s))
    try:
        await asyncio.wait((work, timer), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        timer.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    return work.result()
