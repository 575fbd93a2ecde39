"""The repair phases of a round: make every record valid, before any balancing.

:func:`failover` comes first and is never limited by the budget: a shard whose primary
is dead gets the live replica with the greatest log position ``(epoch, lsn)``, and only a shard
with no live copy at all gets a fresh node (its data may be lost; the move says so).
The budgeted repairs follow, in :data:`REPAIRS` order: restore the replica count
(shards with the fewest copies first), hand off the primaries of draining nodes, remove
excess replicas (which also finishes primary relocations), move replicas off draining
nodes, repair zone spread.

Each phase takes the :class:`~bluemarble.core.placement.moves.Round` and returns False
as soon as the round is over (budget spent or probe answered), True otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.placement.moves import Round
from bluemarble.core.placement.preference import destination, fill_key, fresh_primary_key, primary_key, share_gap
from bluemarble.core.placement.state import State
from bluemarble.core.placement.values import Positions, ShardAssignment
from bluemarble.core.replication.position import ZERO, LogPosition
from bluemarble.core.replication.primary import required_acks_for


def _rank(positions: Positions, shard: ShardId, node: NodeId) -> tuple[bool, LogPosition]:
    """How ``node``'s copy of ``shard`` ranks for promotion: reported positions by
    ``(epoch, lsn)``, a replica missing from ``positions`` below any reported one."""
    position = positions.get((shard, node))
    return (False, ZERO) if position is None else (True, position)


def down_replicas_that_may_hold_more(
    replicas: Collection[NodeId], live: Collection[NodeId], old: NodeId | None
) -> list[NodeId]:
    """The replicas of a shard whose primary ``old`` is lost that a promotion must wait
    for: the down ones (not in ``live``, which holds the nodes up with what they had on
    disk: one back with an empty data dir counts as down), when they are as many as the
    replica acks a STRONG write needs
    (:func:`~bluemarble.core.replication.primary.required_acks_for`), else none.

    An acknowledged write is on the primary and on that many replicas, any of them. When
    every replica that may have acknowledged it is down with the primary (two nodes killed
    at once, R = 3), the live copies may all lack it, and promoting the best of them would
    discard it: once the down nodes come back with their data, they would be cut back to
    the new primary's log. Waiting for one of them (or for the old primary) loses nothing;
    an operator who knows they will not come back may accept the loss (ForcePromote).
    With fewer down than that, at least one live copy holds every acknowledged write, and
    the greatest position among the live copies has them all (logs are prefixes).
    """
    others = [r for r in dict.fromkeys(replicas) if r != old]
    down = [r for r in others if r not in live]
    return down if down and len(down) >= required_acks_for(len(others)) else []


def unsafe_outside_copies(
    copies: Mapping[NodeId, LogPosition], members: Collection[NodeId], term: int, replication_factor: int
) -> frozenset[NodeId]:
    """The nodes among ``copies`` (a lost shard's copies found on live nodes) that are not
    ``members`` of the shard and cannot be promoted without risking acknowledged writes.
    ``term`` is the epoch the shard was lost at.

    A node outside the shard is a replica that was moved away. Its copy is complete only
    in one case: R <= 2, and it left during this term (its copy reaches ``term``). After it
    left, a STRONG write needed the ack of the one new replica, and that replica still
    holds nothing (that is why non-members are asked at all), so nothing was acknowledged
    since. With R >= 3 the other replica, now lost too, may have acknowledged writes after
    it left. A copy from an earlier term lacks every write of this term. Members are never
    excluded here: their positions are what failover compares.
    """
    return frozenset(
        n for n, last in copies.items()
        if n not in members and (replication_factor > 2 or last.epoch < term)
    )


def failover(rnd: Round, current: Mapping[ShardId, ShardAssignment], positions: Positions) -> bool:
    """Give every shard without a live primary one: the live replica with the greatest
    position ``(epoch, lsn)`` (ties: smallest node id), else, with no live copy left, the best node."""
    state = rnd.state
    for shard in state.shards:
        if state.primary[shard] is not None:
            continue
        record = current.get(shard)
        old = record.primary if record is not None else None
        if state.replicas[shard]:
            # The greatest (epoch, lsn); ties go to the smallest node id (max keeps the
            # first of equal keys, and the candidates are sorted by id).
            best = max(sorted(state.replicas[shard]), key=lambda n: _rank(positions, shard, n))
            gone = "the shard has no primary" if old is None else f"primary {old} is gone"
            if not rnd.promote(shard, old, best, f"{gone}; {best} has the highest applied position"):
                return False
        else:
            best = min(state.candidates(), key=lambda n: fresh_primary_key(state, n))
            never_placed = record is None or (record.primary is None and record.epoch == 0)
            reason = (
                "new shard" if never_placed
                else f"no live copy of the shard is left (primary was {old}): data may be lost"
            )
            if not rnd.assign_primary(shard, old, best, reason):
                return False
    return True


def restore_replication(rnd: Round) -> bool:
    state = rnd.state
    want = state.layout.r - 1
    # The shards with the fewest copies are the most at risk: they go first.
    for shard in sorted(state.shards, key=lambda s: (len(state.replicas[s]), state.rank[s])):
        while len(state.replicas[shard]) < want:
            target = destination(state, shard)
            if target is None:
                break
            reason = f"restore replication ({len(state.replicas[shard])} of {want} replicas)"
            if not rnd.add_replica(shard, target, reason):
                return False
    return True


def drain_primaries(rnd: Round) -> bool:
    """Hand the primary of a draining node to a replica that has the data; a shard
    without an eligible replica first gets one (the handoff is then next round's)."""
    state = rnd.state
    if state.layout.drain_ignored:
        return True
    for shard in state.shards:
        primary = state.primary[shard]
        if primary is None or not state.draining(primary) or shard in state.fresh_primary:
            continue
        eligible = [n for n in state.replicas[shard] if n in state.layout.eligible]
        ready = [n for n in eligible if n in state.has_data[shard]]
        if ready:
            target = min(ready, key=lambda n: primary_key(state, n))
            if not rnd.handoff(shard, target, f"primary {primary} is draining"):
                return False
        elif not eligible:
            spare = destination(state, shard)
            if spare is not None and not rnd.add_replica(shard, spare, f"handoff target for draining {primary}"):
                return False
    return True


def trim_excess(rnd: Round) -> bool:
    """Remove replicas beyond ``R - 1`` (one more for a draining primary: the replica
    that will take over), except on shards whose primary relocation started this round."""
    state = rnd.state
    for shard in state.shards:
        allowed = state.layout.r - 1
        if state.draining(state.primary[shard]) and not state.layout.drain_ignored:
            allowed += 1  # the replica that will take over the primary
        if shard in state.relocating:
            continue
        while len(state.replicas[shard]) > allowed:
            if not _drop_one(rnd, shard, f"more than {allowed} replicas"):
                return False
    return True


def _drop_one(rnd: Round, shard: ShardId, reason: str) -> bool:
    """Remove one replica of ``shard``: the option whose result has the fewest draining
    copies, then the fewest zone-spread problems, then the lowest imbalance, then the
    fewest moves. Besides removing a replica, an option is to hand the primary to a
    replica and remove the old primary's copy: this is how a primary relocation (see
    :meth:`Round.start_relocation`) finishes, one round after its target was added.
    Choosing by the resulting state keeps successive rounds from undoing each other
    when the budget splits a handoff from its removal."""
    state = rnd.state
    primary = state.primary[shard]
    options: list[tuple[tuple[int, int, int, int, NodeId, NodeId], NodeId | None, NodeId]] = []
    for victim in state.replicas[shard]:
        score = (
            _draining_after(state, shard, victim),
            _spread_problems_after(state, shard, victim),
            state.delta(victim, -1, 0),
            1,
            victim,
            victim,
        )
        options.append((score, None, victim))
    if primary is not None and not state.draining(primary) and shard not in state.fresh_primary:
        for target in state.replicas[shard]:
            if target in state.layout.eligible and target in state.has_data[shard]:
                score = (
                    _draining_after(state, shard, primary),
                    _spread_problems_after(state, shard, primary),
                    state.delta(primary, -1, -1) + state.delta(target, 0, 1),
                    2,
                    primary,
                    target,
                )
                options.append((score, target, primary))
    _, new_primary, victim = min(options)
    if new_primary is not None:
        if not rnd.handoff(shard, new_primary, f"relocating the primary from {victim}"):
            return False
        reason = f"primary relocated to {new_primary}"
    return rnd.remove_replica(shard, victim, reason)


def _draining_after(state: State, shard: ShardId, removed: NodeId) -> int:
    return sum(1 for n in state.members(shard) if n != removed and state.draining(n))


def _spread_problems_after(state: State, shard: ShardId, removed: NodeId) -> int:
    """Zones outside their per-shard bounds once ``removed``'s copy is gone."""
    layout = state.layout
    counts = state.zone_counts(shard, without=removed)
    return sum(
        1 for zone in layout.zone_min
        if not layout.zone_min[zone] <= counts[zone] <= layout.zone_max[zone]
    )


def drain_replicas(rnd: Round) -> bool:
    """Move the replicas of draining nodes to the best destination (or remove them
    when no node can take them)."""
    state = rnd.state
    if state.layout.drain_ignored:
        return True
    for shard in state.shards:
        for replica in [n for n in state.replicas[shard] if state.draining(n)]:
            target = destination(state, shard, leaving=replica)
            if target is None:
                applied = rnd.remove_replica(shard, replica, f"{replica} is draining")
            else:
                applied = rnd.move_replica(shard, replica, target, f"{replica} is draining")
            if not applied:
                return False
    return True


def repair_spread(rnd: Round) -> bool:
    """Move replicas between zones until every zone holds between its minimum and
    maximum of each complete shard's copies (incomplete shards: the other phases first)."""
    state = rnd.state
    layout = state.layout
    zones = layout.zones
    for shard in state.shards:
        for _ in range(layout.r):
            counts = state.zone_counts(shard)
            if sum(counts.values()) != layout.r:
                break  # still draining or short of copies: the other phases go first
            short = [z for z in zones if counts[z] < layout.zone_min[z]]
            crowded = [z for z in zones if counts[z] > layout.zone_max[z]]
            if not short and not crowded:
                break
            # A zone below its minimum takes from one above its maximum, else from any
            # zone above its minimum; a zone above its maximum gives to any with room.
            sources = crowded or [z for z in zones if counts[z] > layout.zone_min[z]]
            sinks = short or [z for z in zones if counts[z] < layout.zone_max[z]]
            movable = [
                n for n in state.replicas[shard] if n in layout.eligible and layout.zone(n) in sources
            ]
            members = set(state.members(shard))
            targets = [n for n in state.candidates() if n not in members and layout.zone(n) in sinks]
            if not movable or not targets:
                break
            source = min(movable, key=lambda n: (state.delta(n, -1, 0), share_gap(state, n), n))
            target = min(targets, key=lambda n: fill_key(state, n))
            if not rnd.move_replica(shard, source, target, "spread copies over zones"):
                return False
    return True


REPAIRS: tuple[Callable[[Round], bool], ...] = (
    restore_replication,
    drain_primaries,
    trim_excess,
    drain_replicas,
    repair_spread,
)
"""The budgeted repair phases, in the order a round runs them (after failover)."""
