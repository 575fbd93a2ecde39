"""End to end: a cluster under mutual TLS everywhere with an admin token.

Real processes (a control plane and two shard nodes, R = 2 so the nodes also replicate to
each other over mutual TLS), each with its own certificate from ``scripts/dev_certs.py``;
driven through bluemarblectl with the admin certificate: nodes register, placement
settles, a grant and a cross-shard trade commit. A client without a certificate is
refused; an admin command without the token, or with a wrong one, is refused. The
cluster's own calls (trade prepare/commit, fencing, replication, ResolveTrade) are refused
to a certificate that is not the control plane's or a node's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from bluemarble.cli import bluemarblectl
from bluemarble.v1 import common_pb2, shardnode_pb2, shardnode_pb2_grpc, trade_pb2, trade_pb2_grpc
from scripts.dev_certs import issue, make_ca
from scripts.localcluster import ClusterSecurity, LocalEtcd, ManagedProcess, free_port, secure_cluster_files, wait_until

pytestmark = pytest.mark.e2e

SHARDS = 4
NODES = ("n1", "n2")
LEASE_TTL_S = 2


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


def start_secure_cluster(
    etcd: LocalEtcd, cluster_name: str, tmp_path: Path, security: ClusterSecurity
) -> SecureCluster:
    """A control plane ("cp-0", first) and the :data:`NODES`, under ``security``."""
    address = f"127.0.0.1:{free_port()}"
    processes = [ManagedProcess(
        "cp-0",
        [sys.executable, "-m", "controlplane.server.main", "--listen", address, "--etcd", etcd.endpoint,
         "--cluster", cluster_name, "--replica-id", "cp-0", "--lease-ttl-s", str(LEASE_TTL_S),
         "--replication-factor", "2", "--shards", str(SHARDS), *security.control_plane_flags()],
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
    return SecureCluster(security, address, processes)


@pytest.fixture
def secure_cluster(etcd: LocalEtcd, cluster_name: str, tmp_path: Path) -> Iterator[SecureCluster]:
    cluster = start_secure_cluster(
        etcd, cluster_name, tmp_path, secure_cluster_files(tmp_path, NODES, token="e2e-admin-token"))
    try:
        yield cluster
    finally:
        for proc in reversed(cluster.processes):
            proc.kill()


def settled(cluster: SecureCluster) -> bool:
    """Every shard placed with a primary and a replica, and every primary serving (its
    epoch-start entry written: a shard restarted before that has no copy with data)."""
    shards = cluster.ctl_json("shards")
    if shards is None:
        return False
    assignments = shards.get("assignments", [])
    statuses = shards.get("statuses", [])
    assert isinstance(assignments, list) and isinstance(statuses, list)
    serving = {(m["shard_id"], m["node_id"]) for m in statuses if m.get("status", {}).get("serving")}
    return len(assignments) == SHARDS and all(
        a.get("primary") and len(a.get("replicas", [])) == 1 and (a["shard_id"], a["primary"]) in serving
        for a in assignments
    )


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
    # The coordinator's calls and the replication took the nodes' framed ports, over TLS.
    logs = cluster.logs()
    assert "framed port unreachable" not in logs
    for method in ("Calls", "Replicate"):
        assert re.search(rf"framed stream opened.*method={method}.*tls=True", logs), method

    # A client without a certificate is refused (during the TLS handshake: UNAVAILABLE).
    ca_only = ["--tls-ca", str(cluster.security.ca)]
    for flags in (ca_only, []):
        code, _, err = cluster.ctl("nodes", flags=[*flags, "--timeout-s", "2"])  # retried until then
        assert code == 4 and "UNAVAILABLE" in err, err  # no answer: bluemarblectl's exit status 4
        assert err.count("\n") == 1, err  # one line: gRPC's own handshake lines stay quiet
        if not flags:  # plaintext against TLS: the line says what to pass
            assert "pass --tls-ca" in err, err

    # Admin commands need the token; reads do not.
    admin_cert = cluster.security.tls_flags("admin")
    code, _, err = cluster.ctl("config", "set", "max_moves_per_round=8", flags=admin_cert)
    assert code == 1 and "needs 'authorization: Bearer" in err, err
    code, _, err = cluster.ctl("drain", "n1", flags=[*admin_cert, "--token", "wrong-token"])
    assert code == 1 and "not this cluster's admin token" in err, err
    code, out, err = cluster.ctl("config", "set", "max_moves_per_round=8", "--json")
    assert code == 0, err
    assert json_of(out)["config"]["max_moves_per_round"] == 8  # type: ignore[index]

    # The cluster's own calls, from a certificate that is not the control plane's (an
    # operator's; another node's): refused, and nothing changes.
    nodes = cluster.ctl_json("nodes")
    assert nodes is not None
    address = {str(n["node_id"]): str(n["address"]) for n in nodes["nodes"]}  # type: ignore[union-attr, index]
    primary_a = cluster.ctl_json("inventory", a)
    assert primary_a is not None
    shard_a = str(primary_a["shard_id"])
    leg = shardnode_pb2.TradeLeg(player_id=a, receives=common_pb2.Offer(gold=1000), counterpart_player_id=b)
    for holder in ("admin", "n2"):
        with _secure_channel(cluster, holder, address["n1"]) as channel:
            node = shardnode_pb2_grpc.ShardNodeStub(channel)  # type: ignore[no-untyped-call]
            calls = _forged_calls(node, shard_a, leg)
            if holder == "n2":
                del calls[-2:]  # a node may replicate to another, and copy entries from it
            for name, call in calls:
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, (holder, name)  # type: ignore[attr-defined]
            results = list(node.Calls(iter([shardnode_pb2.NodeCalls(calls=[shardnode_pb2.NodeCall(
                call_id=1, commit=shardnode_pb2.CommitRequest(trade_id="forged", shard_id=shard_a))])]), timeout=5))
            assert [r.error.code for m in results for r in m.results] == ["PERMISSION_DENIED"], (holder, results)
        with _secure_channel(cluster, holder, cluster.address) as channel:
            trades = trade_pb2_grpc.TradeCoordinatorStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as refused:
                trades.ResolveTrade(trade_pb2.ResolveTradeRequest(trade_id="forged", shard_id=shard_a, node_id="n1"),
                                    timeout=5)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    after = cluster.ctl_json("inventory", a)
    assert after is not None and after["gold"] == primary_a["gold"]
    assert settled(cluster)  # no shard lost its primary to the forged fence


def _forged_calls(node: shardnode_pb2_grpc.ShardNodeStub, shard: str,
                  leg: shardnode_pb2.TradeLeg) -> list[tuple[str, Callable[[], object]]]:
    """Calls only the control plane (or, for the last two, a node) may make."""
    fence = shardnode_pb2.FenceRequest(requested_by="x", shards=[shardnode_pb2.ShardFence(shard_id=shard, epoch=1000)])
    batch = shardnode_pb2.TradeBatchRequest(items=[
        shardnode_pb2.TradeBatchItem(abort=shardnode_pb2.AbortRequest(trade_id="forged"))])
    return [
        ("Prepare", lambda: node.Prepare(shardnode_pb2.PrepareRequest(trade_id="forged", shard_id=shard, legs=[leg]),
                                         timeout=5)),
        ("Commit", lambda: node.Commit(shardnode_pb2.CommitRequest(trade_id="forged", shard_id=shard), timeout=5)),
        ("Fence", lambda: node.Fence(fence, timeout=5)),
        ("TradeBatch", lambda: node.TradeBatch(batch, timeout=5)),
        ("Replicate", lambda: list(node.Replicate(iter([shardnode_pb2.ReplicateBatch()]), timeout=5))),
        ("GetEntries", lambda: node.GetEntries(shardnode_pb2.GetEntriesRequest(shard_id=shard, epoch=1), timeout=5)),
    ]


def _secure_channel(cluster: SecureCluster, holder: str, address: str) -> grpc.Channel:
    d = cluster.security.certs_dir
    credentials = grpc.ssl_channel_credentials(
        cluster.security.ca.read_bytes(), (d / f"{holder}-key.pem").read_bytes(), (d / f"{holder}.pem").read_bytes())
    return grpc.secure_channel(address, credentials)


def test_a_running_cluster_moves_to_a_new_ca_without_restarting_a_node(
    etcd: LocalEtcd, cluster_name: str, tmp_path: Path
) -> None:
    """Every certificate is renewed from a new CA while the cluster runs, and the old CA
    stops being trusted (files replaced in place, as a Secret update does). n1 is never
    restarted: to keep its lease through a control-plane restart, and to replicate to n2
    after n2's restart, its channels must present the new certificate, which they do only
    because they are rebuilt after the files change."""
    security = secure_cluster_files(tmp_path, NODES, token="e2e-admin-token")
    certs = security.certs_dir
    new_ca, new_ca_key = make_ca(certs, stem="ca2", common_name="BlueMarble dev CA 2")
    staging = tmp_path / "staging"
    staging.mkdir()

    def replace(name: str, content: bytes) -> None:  # atomically, as the kubelet swaps a Secret
        (staging / name).write_bytes(content)
        os.replace(staging / name, certs / name)

    replace("ca.pem", security.ca.read_bytes() + (certs / "ca2.pem").read_bytes())  # both trusted at first
    cluster = start_secure_cluster(etcd, cluster_name, tmp_path, security)
    try:
        wait_until(lambda: settled(cluster), 40, "every shard with a primary and a replica")
        code, _, err = cluster.ctl("grant", "rot-0", "rot-0-sword", "--request-id", "rot-g-0")
        assert code == 0, err

        for name in ("controlplane", *NODES, "admin"):
            pair = issue(new_ca, new_ca_key, name, staging, file_name=f"new-{name}")
            replace(f"{name}-key.pem", pair.key.read_bytes())
            replace(f"{name}.pem", pair.cert.read_bytes())
        replace("ca.pem", (certs / "ca2.pem").read_bytes())  # the old CA is no longer trusted

        # Every connection is made again: the control plane's (n1 must heartbeat to the
        # new process to keep or regain its lease), and n2's (n1 replicates to it).
        cp, n1, n2 = cluster.processes
        n1_pid = n1.pid
        for i, proc in ((0, cp), (2, n2)):
            proc.kill()
            cluster.processes[i] = ManagedProcess(proc.name, proc.argv, proc.log_path).start()
        restarted_s = time.monotonic()

        def both_serving() -> bool:
            # Past three lease TTLs after the restart: what the old control plane had
            # written (both nodes, their assignments) no longer answers for them; n1 is
            # listed only if it has heartbeated to the new one.
            nodes = (cluster.ctl_json("nodes") or {}).get("nodes", [])
            return time.monotonic() > restarted_s + 3 * LEASE_TTL_S and len(nodes) == 2 and settled(cluster)

        wait_until(both_serving, 60, "both nodes registered and every shard placed, under the new CA only")
        shards: set[str] = set()
        for i in range(1, 40):  # STRONG grants on every shard: each needs its replica's ack
            code, out, err = cluster.ctl("--json", "grant", f"rot-{i}", f"rot-{i}-sword", "--request-id", f"rot-g-{i}")
            assert code == 0, err
            shards.add(str(json_of(out)["inventory"]["shard_id"]))  # type: ignore[index]
            if len(shards) == SHARDS:
                break
        assert len(shards) == SHARDS
        assert n1.alive() and n1.pid == n1_pid
        assert "TLS files reloaded" in n1.log_tail(400)
    except (TimeoutError, AssertionError) as e:
        pytest.fail(f"{e}\n{cluster.logs()}")
    finally:
        for proc in reversed(cluster.processes):
            proc.kill()
