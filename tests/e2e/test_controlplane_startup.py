"""End to end: a control-plane process started while etcd does not answer stops at once
on SIGTERM or SIGINT, as after a normal stop. It used to keep retrying until
--etcd-startup-timeout-s ran out (for ever with ``nan`` or ``inf``): only SIGKILL ended it.
And a replica that cannot bind its listen address fails before it writes anything to etcd.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from bluemarble.v1 import controlplane_pb2 as pb
from bluemarble.v1 import controlplane_pb2_grpc
from scripts.localcluster import LocalEtcd, ManagedProcess, free_port, wait_until

pytestmark = pytest.mark.e2e


def _control_plane(tmp_path: Path, etcd: str, *extra: str, name: str = "cp") -> ManagedProcess:
    return ManagedProcess(
        name,
        [sys.executable, "-m", "controlplane.server.main", "--listen", f"127.0.0.1:{free_port()}",
         "--etcd", etcd, "--cluster", "startup", *extra],
        tmp_path / f"{name}.log",
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])  # SIGHUP: as SIGTERM
def test_a_signal_ends_the_wait_for_etcd_at_once(tmp_path: Path, sig: signal.Signals) -> None:
    # Nothing listens on the etcd port; the start-up timeout is an hour.
    cp = _control_plane(tmp_path, f"127.0.0.1:{free_port()}", "--etcd-startup-timeout-s", "3600").start()
    try:
        wait_until(lambda: "waiting for etcd" in cp.log_tail(), 20, "the replica to wait for etcd")
        sent = time.monotonic()
        cp.signal(sig)
        assert cp.proc is not None
        try:
            code = cp.proc.wait(5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 5 s after {sig.name}:\n{cp.log_tail()}")
        took_s = time.monotonic() - sent
    finally:
        cp.kill()
    log = cp.log_path.read_text()
    assert code == 0, log  # as after a normal stop
    assert took_s < 5
    assert "stopped while waiting for etcd during start-up" in log
    assert "Traceback" not in log


def test_a_listen_address_that_cannot_be_bound_writes_nothing_to_etcd(
    tmp_path: Path, etcd: LocalEtcd
) -> None:
    taken = f"127.0.0.1:{free_port()}"
    with socket.socket() as holder:
        host, port = taken.rsplit(":", 1)
        holder.bind((host, int(port)))
        holder.listen()
        cp = ManagedProcess(
            "cp-busy",
            [sys.executable, "-m", "controlplane.server.main", "--listen", taken, "--etcd", etcd.endpoint,
             "--cluster", "startup-busy"],
            tmp_path / "cp-busy.log",
        ).start()
        try:
            assert cp.proc is not None
            code = cp.proc.wait(20)
        finally:
            cp.kill()
    log = cp.log_path.read_text()
    assert code == 1 and "cannot listen on" in log, log
    assert "cluster config created" not in log and "ring created" not in log
    # A replica that can serve sees a cluster without a config, and creates it.
    ok = _control_plane(tmp_path, etcd.endpoint, name="cp-ok")
    ok.argv[ok.argv.index("--cluster") + 1] = "startup-busy"
    address = ok.argv[ok.argv.index("--listen") + 1]
    ok.start()
    try:
        def serving() -> bool:
            with grpc.insecure_channel(address) as channel:
                try:
                    controlplane_pb2_grpc.ControlPlaneStub(channel).GetConfig(pb.GetConfigRequest(), timeout=2)
                except grpc.RpcError:
                    return False
            return True

        wait_until(serving, 20, "the second replica to serve")
        assert "cluster config created" in ok.log_path.read_text()
    finally:
        ok.stop()
