"""Command-line flags that can also come from ``BLUEMARBLE_...`` environment variables.

Precedence: a flag on the command line, then the environment variable (the flag's
name upper-cased, '-' -> '_', prefixed with BLUEMARBLE_), then the built-in default.
This is what Kubernetes manifests use: env vars from a ConfigMap, flags for overrides.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import Any

from bluemarble.runtime import logs

ENV_PREFIX = "BLUEMARBLE_"


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose ``add_flag`` reads defaults from the environment.

    A value from the environment is checked as the flag's own would be (its type and
    choices): a bad one is a usage error naming the variable, not a traceback later.
    ``--log-level`` always takes :data:`bluemarble.runtime.logs.LEVELS` (any case), in
    every process that declares it, so a bad level is refused at parse time too.
    """

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
            except ValueError as e:
                self.error(f"environment variable {env}={raw!r} is invalid: {e}")
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
