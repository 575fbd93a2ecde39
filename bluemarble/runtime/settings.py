"""Command-line flags that can also come from ``BLUEMARBLE_...`` environment variables.

Precedence: a flag on the command line, then the environment variable (the flag's
name upper-cased, '-' -> '_', prefixed with BLUEMARBLE_), then the built-in default.
This is what Kubernetes manifests use: env vars from a ConfigMap, flags for overrides.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from bluemarble.runtime import logs

ENV_PREFIX = "BLUEMARBLE_"

MAX_WORD_IN_USAGE_ERROR = 80
"""Longest word a usage error prints whole; a longer one is cut to its start and size."""

_LONG_WORD = re.compile(rf"\S{{{MAX_WORD_IN_USAGE_ERROR + 1},}}")


def shortened(message: str) -> str:
    """``message`` with every word longer than :data:`MAX_WORD_IN_USAGE_ERROR` cut to its
    start and its size: argparse quotes whole arguments in its errors ("invalid choice:
    '...'"), and a 100,000-character one would be printed whole."""
    return _LONG_WORD.sub(lambda m: f"{m.group()[:60]}... ({len(m.group())} chars)", message)


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose ``add_flag`` reads defaults from the environment.

    A value from the environment is checked as the flag's own would be (its type and
    choices): a bad one is a usage error naming the variable, not a traceback later.
    ``--log-level`` always takes :data:`bluemarble.runtime.logs.LEVELS` (any case), in
    every process that declares it, so a bad level is refused at parse time too.
    Usage errors quote at most :data:`MAX_WORD_IN_USAGE_ERROR` characters of any word.
    """

    def error(self, message: str) -> NoReturn:
        super().error(shortened(message))

    def add_flag(
        self,
        flag: str,
        *,
        default: Any = None,
        type: Callable[[str], Any] = str,
        help: str,
        required: bool = False,
        choices: Sequence[Any] | None = None,
    ) -> None:
        if flag == "--log-level" and choices is None and type is str:
            type, choices = _log_level, logs.LEVELS
        env = env_name(flag)
        raw = os.environ.get(env)
        if raw is not None:
            try:
                default = type(raw)
            except (ValueError, argparse.ArgumentTypeError) as e:
                # The type's own words, unless they only repeat the value (float's do).
                said = f": {e}" if raw not in str(e) or len(raw) <= 40 else ""
                self.error(f"environment variable {env}={raw!r} is invalid{said}")
            if choices is not None and default not in choices:
                self.error(
                    f"environment variable {env}={raw!r} is invalid: choose from {', '.join(map(str, choices))}"
                )
            required = False
        suffix = f" [env {env}]" + (f" (default: {default})" if default not in (None, "") else "")
        self.add_argument(
            flag,
            default=default,
            type=type,
            help=help + suffix,
            required=required,
            choices=choices,
        )


def _log_level(text: str) -> str:
    # Lower-cased only: an unknown level is left to argparse's choices check, which
    # names the flag and the levels it takes.
    return text.strip().lower()
