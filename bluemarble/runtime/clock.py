"""Injected time: production code asks a Clock, tests give a fake one."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic_s(self) -> float:
        """Seconds on a clock that never goes back (for deadlines and intervals)."""

    def wall_ms(self) -> int:
        """Unix time in milliseconds (for values shown to people and other processes)."""


class SystemClock:
    def monotonic_s(self) -> float:
        return time.monotonic()

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000
