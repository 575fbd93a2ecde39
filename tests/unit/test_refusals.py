"""The registrations a control-plane replica refused lately, as GetClusterStatus words them."""

from __future__ import annotations

from bluemarble.runtime.clock import FakeClock
from controlplane.server.refusals import MAX_KEPT, MAX_SHOWN, SHOWN_FOR_S, RegistrationRefusals


async def test_repeats_count_in_one_episode_and_expire_after_the_window() -> None:
    clock = FakeClock()
    refusals = RegistrationRefusals(clock)
    assert refusals.refused("n1", "10.0.0.2:7101", "node n1 is already registered from 10.0.0.1:7101")
    await clock.advance(5)
    assert not refusals.refused("n1", "10.0.0.2:7101", "node n1 is already registered from 10.0.0.1:7101")
    [warning] = refusals.warnings("cp-a")
    assert warning == ("replica cp-a refused 2 registration(s) of node n1 from 10.0.0.2:7101 (last 0 s ago): "
                       "node n1 is already registered from 10.0.0.1:7101")
    await clock.advance(SHOWN_FOR_S + 1)
    assert refusals.warnings("cp-a") == []
    assert refusals.refused("n1", "10.0.0.2:7101", "again")  # a new episode, counted afresh
    assert "refused 1 registration(s)" in refusals.warnings("cp-a")[0]


async def test_bounded_in_pairs_kept_and_warnings_shown_most_recent_first() -> None:
    clock = FakeClock()
    refusals = RegistrationRefusals(clock)
    for i in range(MAX_KEPT + 10):
        await clock.advance(0.01)
        refusals.refused(f"n{i}", f"10.0.0.{i % 250}:{7000 + i}", "taken")
    assert len(refusals.recent()) == MAX_KEPT
    assert refusals.recent()[0].node_id == f"n{MAX_KEPT + 9}"  # the oldest went first
    words = refusals.warnings("cp-a")
    assert len(words) == MAX_SHOWN + 1
    assert words[-1] == f"and {MAX_KEPT - MAX_SHOWN} more refused registrations on replica cp-a"


async def test_untrusted_text_is_quoted_and_cut() -> None:
    clock = FakeClock()
    refusals = RegistrationRefusals(clock)
    refusals.refused("x" * 10_000, "bad\naddress", "r" * 5_000)
    [kept] = refusals.recent()
    assert len(kept.node_id) < 120 and "(10000 chars)" in kept.node_id
    assert kept.address == repr("bad\naddress")
    assert len(kept.reason) == 403 and kept.reason.endswith("...")
