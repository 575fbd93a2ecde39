"""The one retry policy of every BlueMarble process, built on tenacity.

Exponential backoff with full jitter (tenacity's ``wait_random_exponential``: each delay
is uniform in ``[0, min(max_backoff_s, initial_s * 2**n)]``), so a thousand nodes that lost
the same control plane at the same instant do not come back in lockstep. Every retry is
bounded: by a deadline, a number of attempts, or both; only errors that say they are
retryable (:attr:`bluemarble.core.errors.BlueMarbleError.retryable`) are retried.
Time comes from the injected :class:`~bluemarble.runtime.clock.Clock`.

Three shapes, one policy:

* :func:`call` retries one operation until it succeeds, fails for good, or the deadline
  passes (registration, an etcd read at start-up, a client RPC).
* :class:`Backoff` is the same schedule for a loop that owns its own control flow (a
  heartbeat that must also switch addresses): ``await backoff.sleep()`` after a failure,
  ``backoff.reset()`` after a success.
* :func:`supervise` keeps a long-running step alive forever (a watch, a stream, a
  campaign): it logs every end, backs off, and restarts it; a step that ran healthily
  for a while starts again from the shortest delay. Unexpected exceptions are bugs: they
  are logged with their traceback and the step is restarted too, so one bug does not
  leave a process running on stale state until someone restarts it.

A dependency that stays down makes the same failure over and over (a node retried its
registration a dozen times a second). :class:`FailureLog` keeps that readable: the first
failure is a warning, repeats are summarised in at most one line every
:data:`SUMMARY_INTERVAL_S` (how many so far, for how long; each repeat is still there
at debug), and the recovery is one info line. :func:`call` keeps one per ``what``,
:func:`supervise` one per loop.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import structlog
import tenacity

from bluemarble.core.errors import BlueMarbleError, PeerStopping, SelfStalled
from bluemarble.runtime.clock import Clock, SystemClock, wait_event

log = structlog.get_logger(__name__)

_jitter = random.Random()

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff schedule and bounds. Units are in the names.

    ``deadline_s``: give up once this much time has passed since the first attempt
    (None: no time bound). ``max_attempts``: give up after this many attempts (None: no
    count bound). :func:`call` requires at least one of the two.
    """

    initial_s: float = 0.1
    max_backoff_s: float = 2.0
    deadline_s: float | None = 30.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_backoff_s < self.initial_s:
            raise ValueError(f"invalid backoff: initial {self.initial_s} s, max {self.max_backoff_s} s")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    def wait(self) -> tenacity.wait.wait_base:
        """The tenacity wait strategy: exponential, full jitter, capped."""
        return tenacity.wait_random_exponential(multiplier=self.initial_s, max=self.max_backoff_s)


DEFAULT = RetryPolicy()
"""Operations a caller waits for: up to 30 s, delays 0.1 s .. 2 s."""

FOREVER = RetryPolicy(deadline_s=None)
"""Background loops (watches, streams, campaigns): never give up, delays 0.1 s .. 2 s."""


SUMMARY_INTERVAL_S = 5.0
"""At most one line per this many seconds about a failure that keeps repeating."""

FORGET_AFTER_S = 60.0
"""A failure this long after the previous one of the same kind starts a new episode
(logged as a first failure again): whatever was failing had stopped being retried."""

MAX_TRACKED = 512
"""Failure kinds a :class:`FailureLog` follows at once (``what`` may name a trade): past
that, the episodes quiet the longest are forgotten."""


@dataclass
class _Episode:
    first_s: float
    last_s: float
    logged_s: float
    failures: int = 1
    loud: bool = True  # a line above debug was logged for it


@dataclass
class FailureLog:
    """Logs failures of one kind after another (keyed, e.g. by ``what``) without flooding.

    :meth:`failed`: the first failure of an episode is logged at warning with its fields;
    later ones at debug, plus at most one warning per ``summary_interval_s`` saying how
    many failures so far and for how long. :meth:`recovered`: one info line, only when an
    episode was open. Times are the caller's monotonic clock, in seconds."""

    summary_interval_s: float = SUMMARY_INTERVAL_S
    forget_after_s: float = FORGET_AFTER_S
    warn: bool = True
    """False: the first failure and the summaries are logged at info (failures that are
    part of normal operation, e.g. a trade following its shard through a failover)."""
    max_tracked: int = MAX_TRACKED
    quiet_for_s: float = 0.0
    """Above 0: an episode is logged at debug until it has lasted this long (a failure
    this much after its first is logged as a summary, and its recovery then at info): many
    operations that each retry once, quickly (a trade refused by a replica at its limit),
    stay out of the caller's log."""
    _episodes: dict[str, _Episode] = field(default_factory=dict)

    def failing(self, key: str) -> bool:
        """Whether an episode of ``key`` is open (a failure, no recovery since)."""
        return key in self._episodes

    def failed(self, key: str, now_s: float, event: str, **fields: Any) -> None:
        episode = self._episodes.get(key)
        if episode is None or now_s - episode.last_s > self.forget_after_s:
            if len(self._episodes) >= self.max_tracked:
                oldest = min(self._episodes, key=lambda k: self._episodes[k].last_s)
                del self._episodes[oldest]
            quiet = self.quiet_for_s > 0
            self._episodes[key] = _Episode(first_s=now_s, last_s=now_s, logged_s=now_s, loud=not quiet)
            (log.debug if quiet else log.warning if self.warn else log.info)(event, **fields)
            return
        episode.failures += 1
        episode.last_s = now_s
        due = (now_s - episode.first_s >= self.quiet_for_s) if not episode.loud else (
            now_s - episode.logged_s >= self.summary_interval_s)
        if not due:
            log.debug(event, **fields)
            return
        episode.loud = True
        episode.logged_s = now_s
        (log.warning if self.warn else log.info)(
            f"{event} (still failing)",
            failures=episode.failures,
            failing_for_s=round(now_s - episode.first_s, 1),
            **fields,
        )

    def recovered(self, key: str, now_s: float, event: str, **fields: Any) -> None:
        if not self._episodes:  # the common case: nothing failing, one test
            return
        episode = self._episodes.pop(key, None)
        if episode is not None:
            (log.info if episode.loud else log.debug)(
                event, failures=episode.failures, after_s=round(now_s - episode.first_s, 1), **fields)


@dataclass
class LogThrottle:
    """At most one loud log line per key every ``interval_s`` (the rest at debug), for
    events that are not failures of one operation but may repeat fast: a client moving
    between replicas, a caller repeating a refused settle. Keys are the caller's (bounded
    by what it logs about). Times are the caller's monotonic clock, in seconds."""

    interval_s: float
    _last: dict[Hashable, tuple[float, int]] = field(default_factory=dict)  # key -> (logged at, held back)

    def allow(self, key: Hashable, now_s: float) -> int | None:
        """The number of lines held back since the last loud one when this one may be
        loud; None when it should go at debug."""
        logged_s, held_back = self._last.get(key, (-math.inf, 0))
        if now_s - logged_s < self.interval_s:
            self._last[key] = (logged_s, held_back + 1)
            return None
        self._last[key] = (now_s, 0)
        return held_back


_CALL_FAILURES = FailureLog()
_EXPECTED_FAILURES = FailureLog(warn=False, quiet_for_s=1.0)
"""The failures of :func:`call`, one episode per ``what``."""


def is_retryable(error: BaseException) -> bool:
    """Retry BlueMarble errors that say so (Unavailable, Aborted, DeadlineExceeded...)."""
    return isinstance(error, BlueMarbleError) and error.retryable


async def call(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    policy: RetryPolicy = DEFAULT,
    clock: Clock | None = None,
    retry_if: Callable[[BaseException], bool] = is_retryable,
    expected: bool = False,
) -> T:
    """Runs ``operation()`` until it succeeds; retries the errors ``retry_if`` accepts.

    Raises the last error when the policy's deadline or attempts are used up, and any
    other error at once. Never sleeps past the deadline. ``expected``: retries are part
    of normal operation (one ``what`` per request, e.g. a trade following its shard's
    failover): logged at info, not warning, and only once they have gone on for a second
    (quicker ones at debug: a burst of trades each retried once would fill the log).
    """
    failures = _EXPECTED_FAILURES if expected else _CALL_FAILURES
    if policy.deadline_s is None and policy.max_attempts is None:
        raise ValueError("retry.call needs a deadline or a number of attempts")
    clock = clock or SystemClock()
    deadline = math.inf if policy.deadline_s is None else clock.monotonic_s() + policy.deadline_s
    # The first attempt goes without tenacity: nearly every call succeeds at once, and
    # tenacity's set-up per call cost more CPU than a short attempt's own work (the
    # trade path makes two to four such calls per trade).
    try:
        result = await operation()
    except Exception as e:
        if not retry_if(e) or policy.max_attempts == 1 or clock.monotonic_s() >= deadline:
            raise
        first = e
    else:
        if failures.failing(what):  # the hot path (nearly every call) skips the clock read
            failures.recovered(what, clock.monotonic_s(), "retried operation succeeded", what=what)
        return result
    delay_s = max(0.0, min(_jitter.uniform(0.0, policy.initial_s), deadline - clock.monotonic_s()))
    failures.failed(
        what, clock.monotonic_s(), "retrying", what=what, attempt=1, error=str(first), next_in_s=round(delay_s, 3)
    )
    await clock.sleep(delay_s)
    attempts_left = None if policy.max_attempts is None else policy.max_attempts - 1
    jitter = policy.wait()

    def stop(state: tenacity.RetryCallState) -> bool:
        if attempts_left is not None and state.attempt_number >= attempts_left:
            return True
        return clock.monotonic_s() >= deadline

    def wait(state: tenacity.RetryCallState) -> float:
        return max(0.0, min(jitter(state), deadline - clock.monotonic_s()))

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        failures.failed(
            what,
            clock.monotonic_s(),
            "retrying",
            what=what,
            attempt=state.attempt_number + 1,  # tenacity counts from the second attempt
            error=str(error),
            next_in_s=round(state.upcoming_sleep, 3),
        )

    retrying = tenacity.AsyncRetrying(
        sleep=clock.sleep,
        stop=stop,
        wait=wait,
        retry=tenacity.retry_if_exception(retry_if),
        before_sleep=before_sleep,
        reraise=True,
    )
    async def attempt() -> T:
        # tenacity awaits only coroutine functions; ``operation`` may be a lambda that
        # returns an awaitable, so await it here.
        result = await operation()
        failures.recovered(what, clock.monotonic_s(), "retried operation succeeded", what=what)
        return result

    return await retrying(attempt)


class Backoff:
    """The policy's delay schedule for a hand-driven loop: sleep after a failure, reset
    after a success. Delays follow :meth:`RetryPolicy.wait` (jittered, capped)."""

    def __init__(self, policy: RetryPolicy = FOREVER, clock: Clock | None = None):
        self._policy = policy
        self._clock = clock or SystemClock()
        self._wait = policy.wait()
        self.failures = 0

    def next_delay_s(self) -> float:
        """The delay before the next attempt (counts one more failure)."""
        self.failures += 1
        state = tenacity.RetryCallState(cast(Any, None), None, (), {})
        state.attempt_number = self.failures
        return float(self._wait(state))

    async def sleep(self) -> None:
        await self._clock.sleep(self.next_delay_s())

    def reset(self) -> None:
        self.failures = 0


async def supervise(
    step: Callable[[], Awaitable[None]],
    *,
    name: str,
    policy: RetryPolicy = FOREVER,
    clock: Clock | None = None,
    healthy_after_s: float = 5.0,
    stop: asyncio.Event | None = None,
    quiet: Callable[[], bool] | None = None,
) -> None:
    """Runs ``step()`` again and again until cancelled (or ``stop`` is set).

    ``step`` normally runs for a long time (a watch, a stream). When it returns or raises,
    the end is logged (retryable errors as warnings, anything else with its traceback)
    and it is restarted after a jittered backoff; a step that ran for at least
    ``healthy_after_s`` restarts after the shortest delay again. While ``quiet()`` is
    true, retryable errors are expected (a peer said it is restarting) and logged at info,
    as are PeerStopping and SelfStalled (this process, not the peer, stopped running).
    Retryable failures in a row are logged through a :class:`FailureLog` (the first a
    warning, then a summary every few seconds), and a step that then runs for
    ``healthy_after_s`` logs that the loop recovered.
    """
    clock = clock or SystemClock()
    backoff = Backoff(policy, clock)
    failures = FailureLog()
    while stop is None or not stop.is_set():
        started = clock.monotonic_s()
        recovery = (
            asyncio.ensure_future(_recovered_after(failures, name, clock, healthy_after_s))
            if failures.failing(name) else None
        )
        try:
            await step()
            log.debug("loop step ended; restarting", loop=name)
        except asyncio.CancelledError:
            raise
        except BlueMarbleError as e:
            if not e.retryable:
                log.error("loop step failed; restarting", loop=name, error=str(e))
            elif isinstance(e, PeerStopping | SelfStalled) or (quiet is not None and quiet()):
                log.info("loop step failed; restarting", loop=name, error=str(e))
            else:
                failures.failed(name, clock.monotonic_s(), "loop step failed; restarting", loop=name, error=str(e))
        except Exception:
            log.exception("loop step crashed; restarting (this is a bug)", loop=name)
        finally:
            if recovery is not None:
                recovery.cancel()
        if clock.monotonic_s() - started >= healthy_after_s:
            backoff.reset()
        delay_s = backoff.next_delay_s()
        if policy.max_attempts is not None and backoff.failures >= policy.max_attempts:
            log.error("loop gave up", loop=name, failures=backoff.failures)
            return
        if stop is None:
            await clock.sleep(delay_s)
        else:
            await wait_event(clock, stop, delay_s)


async def _recovered_after(failures: FailureLog, name: str, clock: Clock, healthy_after_s: float) -> None:
    """Logs that loop ``name`` recovered once its current step has run ``healthy_after_s``
    (cancelled when the step ends sooner)."""
    await clock.sleep(healthy_after_s)
    failures.recovered(name, clock.monotonic_s(), "loop recovered", loop=name)
