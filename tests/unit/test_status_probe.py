"""Status calls share their probe of the nodes (ControlPlaneService._probe_members): many
operators' and dashboards' GetClusterStatus calls at once cost the nodes one round of
GetShardStatus, not one each."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from bluemarble.core.ids import NodeId
from bluemarble.runtime.clock import FakeClock
from bluemarble.v1 import shardnode_pb2
from controlplane.server.service import STATUS_ANSWERS_REUSED_S, ControlPlaneDeps, ControlPlaneService


class GatedProbe:
    """Answers every node asked, once ``gate`` opens; counts the probes."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()

    async def statuses(self, addresses: Mapping[NodeId, str]) -> dict[NodeId, shardnode_pb2.GetShardStatusResponse]:
        self.calls += 1
        await self.gate.wait()
        return {n: shardnode_pb2.GetShardStatusResponse(node_id=n) for n in addresses}


def service_with(probe: GatedProbe, clock: FakeClock) -> ControlPlaneService:
    unused: Any = None  # what status probes do not touch
    return ControlPlaneService(ControlPlaneDeps(
        replica_id="cp-0", keys=unused, store=unused, registry=unused, config=unused, clock=clock,
        nodes=unused, assignments=unused, ring=unused, election=unused, probe=probe,  # type: ignore[arg-type]
    ))


ASK = {NodeId("n1"): "127.0.0.1:7101", NodeId("n2"): "127.0.0.1:7102"}


async def test_status_calls_at_once_share_one_probe() -> None:
    clock, probe = FakeClock(), GatedProbe()
    service = service_with(probe, clock)
    calls = [asyncio.ensure_future(service._probe_members(dict(ASK), 1.0)) for _ in range(50)]
    await asyncio.sleep(0)
    probe.gate.set()
    answers = await asyncio.gather(*calls)
    assert probe.calls == 1
    assert all(set(a) == set(ASK) for a in answers)
    # Other nodes get a probe of their own; the same ones again, later, a new one.
    await service._probe_members({NodeId("n3"): "127.0.0.1:7103"}, 1.0)
    assert probe.calls == 2
    await service._probe_members(dict(ASK), 1.0)
    assert probe.calls == 3
    await clock.advance(STATUS_ANSWERS_REUSED_S + 0.1)
    await service._probe_members(dict(ASK), 1.0)
    assert probe.calls == 4


async def test_a_caller_whose_budget_ends_leaves_the_probe_to_the_others() -> None:
    clock, probe = FakeClock(), GatedProbe()
    service = service_with(probe, clock)
    impatient = asyncio.ensure_future(service._probe_members(dict(ASK), 0.1))
    patient = asyncio.ensure_future(service._probe_members(dict(ASK), 1.0))
    await asyncio.sleep(0)
    await clock.advance(0.2)
    assert await impatient is None  # no answer in its budget (None: no node judged silent): heartbeat reports instead
    probe.gate.set()
    assert set(await patient or {}) == set(ASK)  # the shared probe went on
    assert probe.calls == 1
