"""Two real shard nodes (``shardnode.main.run``, in this process) against a real control
plane and etcd, R = 2: when the primary's node.db is found damaged while it serves, the
call that met the damage answers UNAVAILABLE naming the node and what to do, the node
leaves service (deregisters, ``run`` returns EXIT_STORAGE_DAMAGED), and the player's
shard fails over to the healthy replica, which still holds the acknowledged grant."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import grpc
import grpc.aio
import pytest

from bluemarble.v1 import controlplane_pb2, controlplane_pb2_grpc, shardnode_pb2, shardnode_pb2_grpc
from shardnode import main as node_main
from shardnode.storage import NodeStorage
from tests.conftest import StartControlPlane, wait_for

pytestmark = pytest.mark.integration

PAGE = 4096


class _Opened:
    """Stands in for NodeStorage in shardnode.main, keeping each node's storage so the
    test can damage its file under it."""

    by_node: ClassVar[dict[str, NodeStorage]] = {}

    @classmethod
    def open(cls, data_dir: Path, **options: Any) -> NodeStorage:
        storage = NodeStorage.open(data_dir, **options)
        cls.by_node[options["node_id"]] = storage
        return storage


def damage_under(storage: NodeStorage) -> None:
    """Overwrites every page but the first while the node holds the file, and drops the
    page cache so the next read goes to the file (as damage found late would)."""
    conn = storage._conn
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = storage.path.stat().st_size
    with open(storage.path, "r+b") as f:
        f.seek(PAGE)
        f.write(random.Random(7).randbytes(size - PAGE))
    conn.execute("PRAGMA shrink_memory")


@contextlib.asynccontextmanager
async def nodes(tmp_path: Path, address: str, *names: str) -> AsyncIterator[dict[str, asyncio.Task[int]]]:
    tasks: dict[str, asyncio.Task[int]] = {}
    for name in names:
        settings = node_main.NodeSettings(
            node_id=name, listen="127.0.0.1:0", control_plane=(address,), data_dir=tmp_path / name
        )
        tasks[name] = asyncio.create_task(node_main.run(settings))
    try:
        yield tasks
    finally:
        for task in tasks.values():
            task.cancel()
        for task in tasks.values():
            with contextlib.suppress(BaseException):
                await task


async def test_damage_found_while_serving_answers_unavailable_and_the_node_leaves_service(
    start_control_plane: StartControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_main, "NodeStorage", _Opened)
    monkeypatch.setattr(_Opened, "by_node", {})
    app = await start_control_plane(replication_factor=2, shards=2)
    async with (
        nodes(tmp_path, app.address, "n1", "n2") as tasks,
        grpc.aio.insecure_channel(app.address) as cp_channel,
    ):
        cp = controlplane_pb2_grpc.ControlPlaneStub(cp_channel)  # type: ignore[no-untyped-call]
        primary: list[controlplane_pb2.ResolvePlayerResponse] = []

        async def granted() -> bool:
            try:
                found = await cp.ResolvePlayer(controlplane_pb2.ResolvePlayerRequest(player_id="alice"))
                if not found.primary.address or len(found.replicas) < 1:
                    return False
                async with grpc.aio.insecure_channel(found.primary.address) as channel:
                    await shardnode_pb2_grpc.ShardNodeStub(channel).GrantItems(  # type: ignore[no-untyped-call]
                        shardnode_pb2.GrantItemsRequest(request_id="g1", player_id="alice", item_ids=["sword"]),
                        timeout=2,
                    )
            except grpc.aio.AioRpcError:
                return False
            primary[:] = [found]
            return True

        await wait_for(granted, 20.0, "a grant acknowledged by alice's primary with a replica")
        damaged_id, address = primary[0].primary.node_id, primary[0].primary.address
        healthy_id = "n2" if damaged_id == "n1" else "n1"
        damage_under(_Opened.by_node[damaged_id])

        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await shardnode_pb2_grpc.ShardNodeStub(channel).GetInventory(  # type: ignore[no-untyped-call]
                    shardnode_pb2.GetInventoryRequest(player_id="alice"), timeout=5
                )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        details = info.value.details() or ""
        assert f"node {damaged_id} cannot serve" in details and "damaged" in details, details
        assert "empty --data-dir" in details, details

        # The node leaves service: deregistered, its run ends with the distinct code.
        code = await asyncio.wait_for(asyncio.shield(tasks[damaged_id]), 15)
        assert code == node_main.EXIT_STORAGE_DAMAGED
        listed = await cp.ListNodes(controlplane_pb2.ListNodesRequest())
        assert [n.node_id for n in listed.nodes] == [healthy_id]

        # The shard failed over to the healthy replica, which holds the acknowledged grant.
        async def served_by_healthy() -> bool:
            try:
                found = await cp.ResolvePlayer(controlplane_pb2.ResolvePlayerRequest(player_id="alice"))
                if found.primary.node_id != healthy_id:
                    return False
                async with grpc.aio.insecure_channel(found.primary.address) as channel:
                    answer = await shardnode_pb2_grpc.ShardNodeStub(channel).GetInventory(  # type: ignore[no-untyped-call]
                        shardnode_pb2.GetInventoryRequest(player_id="alice"), timeout=2
                    )
            except grpc.aio.AioRpcError:
                return False
            return list(answer.item_ids) == ["sword"]

        await wait_for(served_by_healthy, 20.0, "alice's shard to be served by the healthy replica")
