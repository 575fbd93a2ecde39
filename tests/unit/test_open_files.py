"""A server process raises its soft open-files limit to the hard one, and warns when
even that is low (at the limit gRPC stops accepting connections, and says so only in its
own log lines)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
from bluemarble.runtime import logs
logs.configure("info", "console")
from bluemarble.runtime.event_loop import raise_open_files_limit
print("limit", raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0], flush=True)
"""


@pytest.mark.parametrize(("soft", "hard", "warns"), [(64, 8192, False), (64, 256, True)])
def test_the_soft_limit_goes_up_to_the_hard_one_and_a_low_one_is_warned_of(soft: int, hard: int, warns: bool) -> None:
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(soft=soft, hard=hard)], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    out = child.stdout + child.stderr
    assert f"limit {hard} {hard}" in out, out
    assert ("few open files allowed" in out) is warns, out
