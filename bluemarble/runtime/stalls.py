"""Notices when this process did not run for a while: SIGSTOP, a frozen VM or container,
a long synchronous step on the event loop, or CPU starvation.

Why: after such a stall every timer fires at once, and each timeout looks like a peer's
fault. A shard node resumed from SIGSTOP logged "assignment stream ... delivered nothing
for 3 s (the replica may be hung)" and moved its streams away from a healthy
control-plane replica. A :class:`LoopWatch` ticks every :data:`TICK_S` on the event
loop; a tick late by :data:`STALL_S` or more is a stall: logged once with its length (a
warning from :data:`WARN_S`), counted in ``bluemarble_event_loop_stalls_total``, and
remembered, so that a timeout overlapping it is reported as this process's
(:func:`stalled_within`, :class:`~bluemarble.core.errors.SelfStalled`) and the peer is
not blamed.

Every server process runs one (:func:`bluemarble.runtime.event_loop.run`); elsewhere
(tools, a game server's routing client) :func:`stalled_within` answers 0.0 and nothing
changes. A tick costs a timer wake-up four times a second.
"""

from __future__ import annotations

import asyncio

import structlog

from bluemarble.runtime.clock import Clock, SystemClock

log = structlog.get_logger(__name__)

TICK_S = 0.25
STALL_S = 1.0
"""A tick this much later than due is a stall (an event loop busy for a second is one
too: nothing else ran meanwhile)."""
WARN_S = 2.0
"""Stalls this long are warnings (as long as the shortest lease TTL: a node's lease may
have expired in one); shorter ones are logged at info (a busy machine starves a process
for a second now and then)."""


class LoopWatch:
    """The stalls of one event loop (module docstring)."""

    def __init__(self, clock: Clock | None = None, *, tick_s: float = TICK_S, stall_s: float = STALL_S) -> None:
        self._clock = clock or SystemClock()
        self.tick_s = tick_s
        self.stall_s = stall_s
        self.last_tick_s = self._clock.monotonic_s()
        self.stalls = 0
        self.last_stall_s = 0.0  # length of the last stall
        self.last_stall_end_s = float("-inf")

    async def run(self) -> None:
        """Ticks until cancelled (from its first turn: a process's start-up, before the
        loop first runs the watch, is no stall)."""
        self.last_tick_s = self._clock.monotonic_s()
        while True:
            await self._clock.sleep(self.tick_s)
            self.tick(self._clock.monotonic_s())

    def tick(self, now_s: float) -> float:
        """Records a tick at ``now_s``; returns how long the loop stalled before it (0.0
        when the tick was on time)."""
        late_s = now_s - self.last_tick_s - self.tick_s
        self.last_tick_s = now_s
        if late_s < self.stall_s:
            return 0.0
        stalled_s = late_s + self.tick_s  # nothing ran from the last tick on
        self.stalls += 1
        self.last_stall_s, self.last_stall_end_s = stalled_s, now_s
        from bluemarble.runtime import metrics  # not at import: tools need not load prometheus-client

        metrics.EVENT_LOOP_STALLS.inc()
        (log.warning if stalled_s >= WARN_S else log.info)(
            "this process did not run for a while (paused, frozen or starved of CPU); timeouts it noticed meanwhile "
            "are its own, and its lease may have expired",
            stalled_s=round(stalled_s, 2),
        )
        return stalled_s

    def stalled_within(self, window_s: float, now_s: float | None = None) -> float:
        """How long this process stalled within the last ``window_s`` seconds: the last
        stall's length if it ended in the window, or the time since the last tick if that
        is already a stall (the loop is just resuming and the watch has not ticked yet);
        0.0 when neither."""
        now_s = self._clock.monotonic_s() if now_s is None else now_s
        silent_s = now_s - self.last_tick_s
        if silent_s - self.tick_s >= self.stall_s:
            return silent_s
        if now_s - self.last_stall_end_s <= window_s:
            return self.last_stall_s
        return 0.0


_watch: LoopWatch | None = None


def start(clock: Clock | None = None) -> asyncio.Task[None]:
    """Starts this process's watch on the running loop (the one :func:`stalled_within`
    asks) and returns its task; cancel it to stop."""
    global _watch
    watch = _watch = LoopWatch(clock)
    task = asyncio.get_running_loop().create_task(watch.run(), name="loop-watch")

    def forget(_: asyncio.Task[None]) -> None:
        global _watch
        if _watch is watch:  # a stopped watch's last tick would read as a stall forever
            _watch = None

    task.add_done_callback(forget)
    return task


def stalled_within(window_s: float) -> float:
    """:meth:`LoopWatch.stalled_within` of this process's watch; 0.0 without one."""
    return _watch.stalled_within(window_s) if _watch is not None else 0.0
