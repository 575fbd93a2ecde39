"""Local processes for development, tests and benchmarks: etcd and BlueMarble servers.

A :class:`LocalEtcd` is a single-member etcd on free loopback ports with its data in a
directory of the caller's choosing; :class:`ManagedProcess` runs any command with its
output in a log file and stops it with a real signal. Everything binds to 127.0.0.1 only.

Plaintext by default. :func:`secure_cluster_files` makes what a cluster under mutual TLS
with an admin token needs (a dev CA, a certificate per process, a token file); its
:class:`ClusterSecurity` gives each process's flags (``--tls-*``, ``--admin-token-file``,
bluemarblectl's ``--token-file``).
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ETCD_STARTUP_TIMEOUT_S = 20.0


_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=4096)
_HANDED_OUT_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, and not one this process
    handed out lately: the kernel may give a port just released to the next bind(0), so
    two processes started one after the other could be told the same port (a CI run saw
    a node fail to start so)."""
    with _HANDED_OUT_LOCK:
        for _ in range(64):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in _HANDED_OUT:
                break
        _HANDED_OUT.append(port)
        return port


def wait_until(
    condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05
) -> None:
    """Polls ``condition`` until it is true; raises TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def find_etcd() -> str:
    """Path of the etcd binary (Debian's etcd-server installs /usr/bin/etcd)."""
    path = os.environ.get("BLUEMARBLE_ETCD_BIN") or shutil.which("etcd")
    if not path:
        raise FileNotFoundError(
            "etcd not found on PATH; install it with `apt-get install etcd-server` "
            "or set BLUEMARBLE_ETCD_BIN"
        )
    return path


class ManagedProcess:
    """A child process in its own process group, with stdout+stderr in ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Log files are read by people and by tests: key=value, unless asked otherwise.
                env={"BLUEMARBLE_LOG_FORMAT": "console", **os.environ, **(self._env or {})},
                start_new_session=True,
            )
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        """The process's exit status once it has exited (negative: the signal that ended
        it), None while it runs or before it starts."""
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


@dataclass(frozen=True)
class ClusterSecurity:
    """Certificates (from ``scripts/dev_certs.py``) and the admin token file of a local
    cluster under mutual TLS. Certificates are named after the process: ``controlplane``,
    each node id, ``admin`` for bluemarblectl."""

    certs_dir: Path
    token_file: Path

    @property
    def ca(self) -> Path:
        return self.certs_dir / "ca.pem"

    def tls_flags(self, name: str) -> list[str]:
        """``--tls-cert/--tls-key/--tls-ca`` for the process holding ``name``'s certificate."""
        return [
            "--tls-cert", str(self.certs_dir / f"{name}.pem"),
            "--tls-key", str(self.certs_dir / f"{name}-key.pem"),
            "--tls-ca", str(self.ca),
        ]  # fmt: skip

    def control_plane_flags(self) -> list[str]:
        return [*self.tls_flags("controlplane"), "--admin-token-file", str(self.token_file)]

    def node_flags(self, node_id: str) -> list[str]:
        return self.tls_flags(node_id)

    def ctl_flags(self) -> list[str]:
        """bluemarblectl's flags (before the command): the admin certificate and token."""
        return [*self.tls_flags("admin"), "--token-file", str(self.token_file)]


def secure_cluster_files(directory: Path, node_ids: Sequence[str], token: str | None = None) -> ClusterSecurity:
    """Writes a dev CA, certificates for the control plane, ``node_ids`` and an admin, and
    an admin token file (a random token unless given) under ``directory``. Needs the
    ``cryptography`` package (a dev dependency)."""
    import secrets

    from scripts.dev_certs import make_dev_certs

    certs = make_dev_certs(directory / "certs", node_ids)
    token_file = directory / "admin-token"
    token_file.write_text((token or secrets.token_hex(32)) + "\n")
    token_file.chmod(0o600)
    return ClusterSecurity(certs.ca.parent, token_file)


class LocalEtcd:
    """A single-member etcd on 127.0.0.1 with its data under ``data_dir``."""

    def __init__(self, data_dir: Path, client_port: int | None = None, peer_port: int | None = None):
        self.data_dir = data_dir
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.process: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout_s: float = ETCD_STARTUP_TIMEOUT_S) -> LocalEtcd:
        client_url = f"http://127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            find_etcd(),
            "--name", "bluemarble-local",
            "--data-dir", str(self.data_dir / "etcd"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"bluemarble-local={peer_url}",
            "--initial-cluster-state", "new",
            "--log-level", "warn",
            "--logger", "zap",
            # History of the last hour (as the chart): without compaction every write of a long run
            # (heartbeats, trade records) stays in the database until it fills its quota.
            "--auto-compaction-mode", "periodic",
            "--auto-compaction-retention", "1h",
        ]  # fmt: skip
        self.process = ManagedProcess("etcd", argv, self.data_dir / "etcd.log").start()
        wait_until(self.healthy, timeout_s, f"etcd on {self.endpoint} to be healthy")
        return self

    def healthy(self) -> bool:
        if self.process is None or not self.process.alive():
            assert self.process is not None
            raise RuntimeError(f"etcd exited:\n{self.process.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as resp:
                return b'"true"' in resp.read()
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
