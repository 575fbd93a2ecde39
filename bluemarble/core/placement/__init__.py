"""Shard placement: which live node holds the primary and the replicas of every shard.

Why this package exists: the leader's reconciler must turn "these nodes are alive, these
shards exist, this is what etcd says today" into "this is what etcd should say next",
and that decision is the part of the control plane where a mistake loses data (promoting
a replica that never had the writes), loses availability (a shard left without a primary)
or churns the cluster (moving shards that were fine). So it is one pure function,
:func:`plan_assignments`: values in, a frozen :class:`PlacementPlan` out. It imports no
grpc, no etcd client, no asyncio, no clock and no randomness; the same input always gives
the same plan, and every tie is broken by shard id or node id. The reconciler writes the
plan's assignments in one transaction guarded by its leadership; nothing here does I/O.
Arguments that break the calling contract (duplicate ids, capacity < 1, ...) raise
:class:`ValueError`.

What a valid, balanced placement is (DESIGN.md, flows 3 and 4), checked by
:func:`violations` and reached by repeated calls of :func:`plan_assignments`:

* *Eligible* nodes are the live nodes that are not draining. If every live node is
  draining, draining cannot make progress (there is nowhere to go) and the drain flags
  are ignored altogether.
* Effective replication ``R = min(replication_factor, len(eligible))``: every shard has
  one primary and ``R - 1`` replicas on distinct eligible nodes.
* Zone spread comes first: the copies of a shard span ``min(R, zones among eligible
  nodes)`` distinct zones.
* Balance by capacity (:class:`FairShare`, :func:`fair_shares`): every eligible node's
  number of primaries is its fair share ``S * capacity / total capacity`` (S = number of
  shards) rounded down or up, so with equal capacities primary counts differ by at most
  one; its number of roles (primaries + replicas) is its fair share of the ``S * R``
  roles rounded down or up; its number of replicas is within one of its fair share of
  replicas (roles share minus primaries share). Replicas get the looser "within one"
  because they are the difference of the other two counts: asking for the same
  rounding of all three over-constrains placement, often beyond what zone spread
  leaves possible. A node can hold at most one role per shard, and zone spread can force
  a zone to hold more or fewer copies than its capacity's worth; so the fair share of
  roles is the capacity-proportional share *capped* by those limits (water-filling,
  first over zones, then over the nodes of each zone), which is plainly
  ``S * R * capacity / total capacity`` whenever no cap binds.

How a round moves toward it, in this order:

1. *Failover*, never limited by the move budget: a shard whose primary is dead gets the
   live replica with the greatest log position ``(epoch, lsn)`` (``positions``,
   compared like Raft's ``(term, index)``, not by lsn alone; ties go to the
   smallest node id), a ``PROMOTE``. A node that was not already a replica of the shard
   is never promoted while a live replica exists, since it would not have the writes.
   Only when no live replica exists at all is a fresh node assigned
   (``ASSIGN_PRIMARY``), and the move's reason then says that the shard's data may be
   lost. Dead or unknown nodes and duplicate entries are dropped from replica lists
   (``DROP_REPLICA``: bookkeeping, not budgeted either).
2. Then, with at most ``max_moves_per_round`` moves: restore the replica count (shards
   with the fewest copies first), hand off the primaries of draining nodes, remove
   excess replicas, move replicas off draining nodes, repair zone spread, rebalance.
   Rebalancing applies, while the total imbalance (how far counts are outside their
   ranges) is above zero, the step that removes it at the lowest cost in changed roles:
   the shortest chain of replica moves, or of handoffs, or a primary relocation (the
   target is added as an extra replica; a later round hands the primary to it and drops
   the old primary's copy). A chain is applied whole or not at all, so it is at most
   one round's budget long: when the only repair is a chain longer than the budget,
   balance stops one role short. Seen with budgets of 1 and 2 (zone spread can make the
   shortest chain 3 moves long), never with 3 or more in the property tests; the default
   budget is 32. Nothing moves when nothing is wrong, so a valid, balanced ``current``
   yields a plan that changes nothing.

Safety rules every plan obeys: a shard with a live primary keeps a primary in every plan
(a handoff sets, in one step, a new primary that already holds the data: a replica
listed in ``current``, never one added by the same plan); a shard promoted in a plan is
not handed off again in the same plan (the promoted replica is the one with the writes);
draining nodes receive no new roles (the old primary of a handoff stays a replica until
its copy is moved); a shard may have one replica more than ``R - 1`` between two rounds,
the one about to take over a primary. The next round treats every listed replica as
holding the data, so the caller applies a plan, and lets new replicas catch up, before
planning again. Repeated rounds converge (``PlacementPlan.converged``), in a number of
rounds that grows with the work to do divided by the budget.

Minimal movement: the planner is greedy, not a global optimizer. When a node is lost,
only that node's roles move, plus what balance then requires: fair shares change with
the set of nodes, and promotions can leave a node above its primary range, which then
costs handoffs, possibly of shards that never involved the lost node. Compared with the
least number of role changes that reaches a valid balanced placement (an exhaustive
search in the tests, on small clusters), the result is equal in about 95% of cases and
was never above twice the least plus one (plus one per primary of a draining node,
which is handed to an existing replica first by design). The difference comes from
rounds (a replica added in one round can only take a primary in the next) and from
repairs that are chosen before balance.

Epochs: a shard's epoch increases by exactly one when its primary changes (promotion,
assignment, handoff) and is unchanged otherwise; a shard absent from ``current`` counts
as epoch 0 with no primary, so a brand-new shard gets epoch 1 with its first primary.

Cost: thousands of idle nodes cost little more than none; see
:mod:`bluemarble.core.placement.state`.

With no live node at all nothing can be improved, and forgetting who held the data would
turn a full-cluster restart into data loss: every shard keeps its record unchanged
(a shard absent from ``current`` is recorded with epoch 0, no primary and no replicas),
the plan has no moves and is converged. (The caller should also not plan while nodes
are still re-registering after such an outage: a shard whose copies are all on nodes
not yet back would get a fresh, empty primary.)

The package, one concept per module (import the public names from here):

* :mod:`~bluemarble.core.placement.values`: the frozen values and enums;
* :mod:`~bluemarble.core.placement.fair_share`: fair shares (water-filling);
* :mod:`~bluemarble.core.placement.layout`: the rules for one cluster (eligible
  nodes, R, zone bounds, fair-share ranges) and the argument checks;
* :mod:`~bluemarble.core.placement.checker`: :func:`violations`, the one checker;
* :mod:`~bluemarble.core.placement.state`: the working state of a round, with a cheap
  copy;
* :mod:`~bluemarble.core.placement.budget` and :mod:`~bluemarble.core.placement.moves`:
  the move budget, and the recorded, budgeted changes of a round;
* :mod:`~bluemarble.core.placement.preference`: which node is best for a role;
* :mod:`~bluemarble.core.placement.repair`: failover and the repair phases;
* :mod:`~bluemarble.core.placement.chains` and
  :mod:`~bluemarble.core.placement.rebalance`: the rebalancing search;
* :mod:`~bluemarble.core.placement.planner`: :func:`plan_assignments`;
* :mod:`~bluemarble.core.placement.handoff`: :func:`keep_copies`, which the
  reconciler applies to every plan (make before break): a handed-off primary, or the
  source of a replica move, keeps its copy until what replaces it can take over.
"""

from bluemarble.core.placement.checker import violations
from bluemarble.core.placement.fair_share import FairShare
from bluemarble.core.placement.handoff import handoffs_of, keep_copies, replica_moves_of, without_shards
from bluemarble.core.placement.layout import fair_shares
from bluemarble.core.placement.planner import plan_assignments
from bluemarble.core.placement.values import (
    Move,
    MoveKind,
    PlacementConfig,
    PlacementNode,
    PlacementPlan,
    Positions,
    ShardAssignment,
)

__all__ = [
    "FairShare",
    "Move",
    "MoveKind",
    "PlacementConfig",
    "PlacementNode",
    "PlacementPlan",
    "Positions",
    "ShardAssignment",
    "fair_shares",
    "handoffs_of",
    "keep_copies",
    "plan_assignments",
    "replica_moves_of",
    "violations",
    "without_shards",
]
