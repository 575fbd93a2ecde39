"""etcd endpoints given by DNS name, as Kubernetes gives them (a Service, the members of a
StatefulSet): the adapter must reach etcd through them, not only through IP literals."""

from __future__ import annotations

import pytest

from controlplane.store import etcd as etcd_module
from controlplane.store.etcd import EtcdStore, grpc_target
from scripts.localcluster import LocalEtcd

pytestmark = pytest.mark.integration


def test_targets() -> None:
    assert grpc_target(["127.0.0.1:2379", "10.0.0.7:2379"]) is None  # etcd3aio's ipv4 list
    assert grpc_target(["etcd-headless.game.svc:2379"]) == "dns:///etcd-headless.game.svc:2379"
    assert grpc_target(["etcd-0.etcd:2379", "etcd-1.etcd:2379"]) is None  # resolved at connect


@pytest.fixture
def names_are_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """"localhost" (the one name this machine resolves) taken as any DNS name."""
    monkeypatch.setattr(etcd_module, "_is_ipv4", lambda host: host != "localhost" and host[0].isdigit())


async def _round_trip(store: EtcdStore, key: str) -> None:
    await store.connect(startup_timeout_s=10)
    try:
        await store.put(key, b"v")
        assert (await store.get(key)) is not None
    finally:
        await store.close()


@pytest.mark.usefixtures("names_are_dns")
async def test_one_name_is_dialled_through_dns(etcd: LocalEtcd, cluster_name: str) -> None:
    port = etcd.endpoint.rsplit(":", 1)[1]
    store = EtcdStore([f"localhost:{port}"])
    assert store._client._manager.target == f"dns:///localhost:{port}"
    await _round_trip(store, f"/{cluster_name}/k")


@pytest.mark.usefixtures("names_are_dns")
async def test_several_names_are_resolved_at_connect(etcd: LocalEtcd, cluster_name: str) -> None:
    port = etcd.endpoint.rsplit(":", 1)[1]
    store = EtcdStore([f"localhost:{port}", f"localhost:{port}"])
    await _round_trip(store, f"/{cluster_name}/k")
    assert store._client._manager.target == f"ipv4:127.0.0.1:{port}"
