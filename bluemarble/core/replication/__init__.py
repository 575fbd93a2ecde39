"""Replication and promotion rules of the data plane, as pure functions and state
machines (messages and ticks in, decisions out; no I/O, no clock, no asyncio)."""

from bluemarble.core.replication.position import ZERO, LogPosition

__all__ = ["ZERO", "LogPosition"]
