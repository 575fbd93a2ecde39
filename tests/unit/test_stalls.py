"""The stall watch (bluemarble.runtime.stalls): a process that did not run (SIGSTOP, a
frozen VM, CPU starvation) says so once, and the timeouts that overlapped the stall are
its own, not its peers' (SelfStalled: logged at info, no move to another replica)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest
import structlog

from bluemarble.client import control_plane
from bluemarble.core.errors import SelfStalled, Unavailable
from bluemarble.runtime import retry, stalls
from bluemarble.runtime.clock import FakeClock
from bluemarble.v1 import controlplane_pb2


def test_a_late_tick_is_a_stall_logged_once_with_its_length() -> None:
    clock = FakeClock(start_s=100.0)
    watch = stalls.LoopWatch(clock)
    with structlog.testing.capture_logs() as logs:
        assert watch.tick(100.25) == 0.0
        assert watch.tick(100.5 + 0.9) == 0.0  # late, but under a second: not a stall
        assert watch.tick(101.4 + 0.25 + 5.0) == pytest.approx(5.25)  # SIGSTOPped for about 5 s
        assert watch.tick(106.9) == 0.0
        assert watch.tick(106.9 + 0.25 + 1.2) == pytest.approx(1.45)  # starved: a short stall
    assert watch.stalls == 2
    [warning, note] = [e for e in logs if "did not run" in e["event"]]
    assert (warning["log_level"], warning["stalled_s"]) == ("warning", 5.25)
    assert (note["log_level"], note["stalled_s"]) == ("info", 1.45)


async def test_start_up_before_the_watch_first_runs_is_no_stall() -> None:
    clock = FakeClock(start_s=100.0)
    watch = stalls.LoopWatch(clock)
    await clock.advance(5.0)  # a process's synchronous start-up
    task = asyncio.create_task(watch.run())
    await asyncio.sleep(0)
    await clock.advance(0.25)
    await asyncio.sleep(0)
    task.cancel()
    assert watch.stalls == 0 and watch.stalled_within(3.0) == 0.0


def test_stalled_within_covers_a_stall_just_ended_and_one_not_yet_ticked() -> None:
    clock = FakeClock(start_s=100.0)
    watch = stalls.LoopWatch(clock)
    watch.tick(100.25)
    # Resumed, the watch not ticked yet (another timer ran first): the silence counts.
    assert watch.stalled_within(3.0, now_s=100.25 + 4.0) == pytest.approx(4.0)
    assert watch.stalled_within(3.0, now_s=100.25 + 0.5) == 0.0  # on time
    watch.tick(104.25)
    assert watch.stalled_within(3.0, now_s=105.0) == pytest.approx(4.0)
    for i in range(1, 15):  # on time again
        assert watch.tick(104.25 + 0.25 * i) == 0.0
    assert watch.stalled_within(3.0, now_s=107.75) == 0.0  # the stall ended outside the window


class _SilentCall:
    """A stream that never delivers (a hung replica, or one this process did not read)."""

    def __init__(self) -> None:
        self.cancelled = False

    async def read(self) -> object:
        await asyncio.Event().wait()
        return None

    def cancel(self) -> bool:
        self.cancelled = True
        return True


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> Iterator[stalls.LoopWatch]:
    clock = FakeClock()
    watch = stalls.LoopWatch(clock)
    monkeypatch.setattr(stalls, "_watch", watch)
    yield watch


async def test_a_stream_silent_while_this_process_stalled_blames_no_replica(watch: stalls.LoopWatch) -> None:
    clock = FakeClock()
    client = control_plane.ControlPlaneClient(["127.0.0.1:1", "127.0.0.1:2"])
    try:
        def open_stream(stub: object) -> _SilentCall:
            return _SilentCall()

        follow = asyncio.create_task(control_plane.follow_stream(
            client, open_stream, controlplane_pb2.WatchAssignmentsResponse, lambda m: None, clock=clock,
            idle_timeout_s=3.0, what="assignment"))
        await asyncio.sleep(0)
        watch.last_tick_s -= 5.0  # this process did not run for 5 s: the watch's tick is overdue
        await clock.advance(3.0)
        with pytest.raises(SelfStalled, match="did not run for 5"):
            await follow
        assert client.current_address == "127.0.0.1:1"  # the same replica is asked again
        watch.last_tick_s = watch._clock.monotonic_s()
        watch.last_stall_end_s = float("-inf")
        follow = asyncio.create_task(control_plane.follow_stream(
            client, open_stream, controlplane_pb2.WatchAssignmentsResponse, lambda m: None, clock=clock,
            idle_timeout_s=3.0, what="assignment"))
        await asyncio.sleep(0)
        await clock.advance(3.0)
        with pytest.raises(Unavailable, match="may be hung") as raised:
            await follow
        assert not isinstance(raised.value, SelfStalled)
        assert client.current_address == "127.0.0.1:2"  # a silent replica without a stall: the next one
    finally:
        await client.close()


async def test_supervise_logs_a_self_stalled_failure_at_info() -> None:
    clock = FakeClock()
    stop = asyncio.Event()
    errors: list[Exception] = [SelfStalled("stream silent while this process stalled"), Unavailable("hung")]

    async def step() -> None:
        if not errors:
            stop.set()
            return
        raise errors.pop(0)

    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(retry.supervise(step, name="t", clock=clock, stop=stop))
        await clock.advance(10)
        await asyncio.wait_for(task, 1)
    levels = [e["log_level"] for e in logs if e["event"] == "loop step failed; restarting"]
    assert levels == ["info", "warning"]


async def test_a_stopped_watch_is_forgotten() -> None:
    task = stalls.start(FakeClock())
    assert stalls._watch is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert stalls._watch is None and stalls.stalled_within(3.0) == 0.0
