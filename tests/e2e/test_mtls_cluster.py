"""End to end: a cluster under mutual TLS everywhere with an admin token.

Real processes (a control plane and two shard nodes, R = 2 so the nodes also replicate to
each other over mutual TLS), each with its own certificate from ``scripts/dev_certs.py``;
driven through bluemarblectl with the admin certificate: nodes register, placement
settles, a grant and a cross-shard trade commit. A client without a certificate is
refused; an admin command without the token, or with a wrong one, is refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bluemarble.cli import bluemarblectl
from scripts.localcluster import ClusterSecurity, LocalEtcd, ManagedProcess, free_port, secure_cluster_files, wait_until

pytestmark = pytest.mark.e2e

SHARDS = 4
NODES = ("n1", "n2")


def json_of(out: str) -> dict[str, object]:
    """The JSON document bluemarblectl printed (in-process, the client library's log
    lines share stdout with it)."""
    lines = out.splitlines()
    start = lines.index("{")
    parsed: dict[str, object] = json.loads("\n".join(lines[start:]))
    return parsed


class SecureCluster:
    def __init__(self, security: ClusterSecurity, address: str, processes: list[ManagedProcess]):
        self.security = security
        self.address = address
        self.processes = processes

    def ctl(self, *words: str, flags: list[str] | None = None) -> tuple[int, str, str]:
        """Runs bluemarblectl in this process: (exit status, stdout, stderr). ``flags``
        replace the admin certificate and token."""
        out, err = io.StringIO(), io.StringIO()
        chosen = self.security.ctl_flags() if flags is None else flags
        argv = ["--control-plane", self.address, "--timeout-s", "10", *chosen, *words]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = bluemarblectl.main(argv)
            except SystemExit as e:
                code = int(e.code or 0)
        return code, out.getvalue(), err.getvalue()

    def ctl_json(self, *words: str) -> dict[str, object] | None:
        code, out, _ = self.ctl("--json", *words)
        return json_of(out) if code == 0 else None

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in self.processes)


@pytest.fixture
def secure_cluster(etcd: LocalEtcd, cluster_name: str, tmp_path: Path) -> Iterator[SecureCluster]:
    security = secure_cluster_files(tmp_path, NODES, token="e2e-admin-token")
    address = f"127.0.0.1:{free_port()}"
    processes = [ManagedProcess(
        "cp-0",
        [sys.executable, "-m", "controlplane.server.main", "--listen", address, "--etcd", etcd.endpoint,
         "--cluster", cluster_name, "--replica-id", "cp-0", "--lease-ttl-s", "2", "--replication-factor", "2",
         "--shards", str(SHARDS), *security.control_plane_flags()],
        tmp_path / "cp-0.log",
    ).start()]
    for zone, node in enumerate(NODES):
        processes.append(ManagedProcess(
            node,
            [sys.executable, "-m", "shardnode.main", "--node-id", node, "--listen", f"127.0.0.1:{free_port()}",
             "--control-plane", address, "--data-dir", str(tmp_path / node), "--zone", f"z{zone}",
             *security.node_flags(node)],
            tmp_path / f"{node}.log",
        ).start())
    cluster = SecureCluster(security, address, processes)
    try:
        yield cluster
    finally:
        for proc in reversed(processes):
            proc.kill()


def settled(cluster: SecureCluster) -> bool:
    shards = cluster.ctl_json("shards")
    if shards is None:
        return False
    assignments = shards.get("assignments", [])
    assert isinstance(assignments, list)
    return len(assignments) == SHARDS and all(a.get("primary") and len(a.get("replicas", [])) == 1
                                              for a in assignments)


def test_a_cluster_under_mutual_tls_with_an_admin_token(secure_cluster: SecureCluster) -> None:
    cluster = secure_cluster
    try:
        wait_until(lambda: (cluster.ctl_json("nodes") or {}).get("nodes") is not None
                   and len(cluster.ctl_json("nodes")["nodes"]) == len(NODES), 30,  # type: ignore[index, arg-type]
                   "both nodes registered over mutual TLS")
        wait_until(lambda: settled(cluster), 30, "every shard with a primary and a replica")
    except TimeoutError:
        pytest.fail(f"cluster did not come up:\n{cluster.logs()}")

    # Grants through the routing client (straight to each player's primary, mTLS).
    shard_of: dict[str, str] = {}
    for i in range(16):
        player = f"tls-player-{i}"
        code, out, err = cluster.ctl("--json", "grant", player, f"{player}-sword", "--gold", "100",
                                     "--request-id", f"g-{i}")
        assert code == 0, err
        shard_of[player] = str(json_of(out)["inventory"]["shard_id"])  # type: ignore[index]
        if len(set(shard_of.values())) >= 2:
            break
    a = next(iter(shard_of))
    b = next(p for p, s in shard_of.items() if s != shard_of[a])

    code, out, err = cluster.ctl("--json", "trade", "execute", "tls-trade-1", a, b,
                                 "--a-items", f"{a}-sword", "--b-gold", "40")
    assert code == 0, (out, err)
    traded = json_of(out)
    assert traded["outcome"] == "TRADE_OUTCOME_COMMITTED" and traded["cross_shard"] is True
    inventory = cluster.ctl_json("inventory", b)
    assert inventory is not None
    assert f"{a}-sword" in inventory["item_ids"] and inventory["gold"] == 60  # type: ignore[operator]

    # A client without a certificate is refused (during the TLS handshake: UNAVAILABLE).
    ca_only = ["--tls-ca", str(cluster.security.ca)]
    for flags in (ca_only, []):
        code, _, err = cluster.ctl("nodes", flags=flags)
        assert code == 1 and "UNAVAILABLE" in err, err

    # Admin commands need the token; reads do not.
    admin_cert = cluster.security.tls_flags("admin")
    code, _, err = cluster.ctl("config", "set", "max_moves_per_round=8", flags=admin_cert)
    assert code == 1 and "needs 'authorization: Bearer" in err, err
    code, _, err = cluster.ctl("drain", "n1", flags=[*admin_cert, "--token", "wrong-token"])
    assert code == 1 and "not this cluster's admin token" in err, err
    code, out, err = cluster.ctl("config", "set", "max_moves_per_round=8")
    assert code == 0, err
    assert json_of(out)["config"]["max_moves_per_round"] == 8  # type: ignore[index]
