"""Runs a process's main coroutine on the fastest event loop available.

uvloop (libuv) cuts the event loop's own share of the control plane's CPU; it is used
when installed, unless ``BLUEMARBLE_EVENT_LOOP=asyncio`` asks for the standard loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    choice = os.environ.get("BLUEMARBLE_EVENT_LOOP", "auto")
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.run(main)
    return asyncio.run(main)
