"""The working state of one planning round: who holds what, as the round plans it.

Per shard: the primary and replicas being planned, which nodes held the data when the
round started (``has_data``: the only legal handoff targets), whether the shard got a
new primary in this round (``fresh_primary``: not handed off again before the next
round) and whether a primary relocation was started for it (``relocating``). Per node:
the shards it is primary and replica of, and the relocations it takes part in
(``moving_out``, ``moving_in``), counted as done so the round does not start more than
balance needs. Derived bookkeeping is kept up to date by every change, so no decision
rescans everything: ``busy`` (nodes that hold a role or take part in a relocation), the
candidate list derived from it, and the number of replicas that did not hold the data
when the round started.

A :class:`State` changes only through :meth:`State.set_primary`,
:meth:`State.fail_over_to`, :meth:`State.add`, :meth:`State.remove` and
:meth:`State.start_relocation`; none of them records a move (that is
:class:`bluemarble.core.placement.moves.Round`'s job). To find out what a change would
allow, a search applies it to a :meth:`State.copy` and drops the copy: nothing is ever
undone by hand.

Cost: the planner runs on every join and leave, and clusters have many more nodes than
shards. A round looks only at the nodes that hold a role plus, of the nodes that hold
nothing, one per zone and fair share: such nodes are alike but for their ids, and every
tie goes to the smallest id, so that one stands for all of them (see
:meth:`State.candidates`; the plans are exactly those of looking at every node). Fair
shares are computed per distinct capacity and compared as integers. So thousands of idle
nodes cost little more than none.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence

from bluemarble.core.ids import NodeId, ShardId
from bluemarble.core.placement.layout import Layout, outside
from bluemarble.core.placement.values import ShardAssignment

Dropped = tuple[ShardId, NodeId, str]
"""A replica entry removed while loading: (shard, node, why)."""


class State:
    """The holdings of one round (see the module doc). Build with :meth:`load`.

    Read the fields freely; change them only through the methods below (after a
    :meth:`copy`, the containers they hold may be shared with another state).
    """

    __slots__ = (
        "_own_nodes", "_own_shards", "_shared", "busy", "busy_version", "candidates_cache",
        "fresh_primary", "has_data", "layout", "moving_in", "moving_out", "new_replicas",
        "primary", "primary_of", "rank", "relocating", "replica_of", "replicas", "shards",
    )

    layout: Layout
    shards: Sequence[ShardId]
    rank: Mapping[ShardId, int]
    primary: dict[ShardId, NodeId | None]
    replicas: dict[ShardId, list[NodeId]]
    has_data: dict[ShardId, frozenset[NodeId]]
    fresh_primary: set[ShardId]
    relocating: set[ShardId]
    moving_out: Counter[NodeId]
    moving_in: Counter[NodeId]
    primary_of: dict[NodeId, set[ShardId]]
    replica_of: dict[NodeId, set[ShardId]]
    busy: set[NodeId]
    busy_version: int
    candidates_cache: tuple[int, list[NodeId]]
    new_replicas: int
    # Copy-on-write: after copy(), both states share their per-node sets and per-shard
    # lists; each copies one before its first change to it (see _own_node, _own_shard).
    _shared: bool
    _own_nodes: set[NodeId]
    _own_shards: set[ShardId]

    @classmethod
    def load(
        cls, layout: Layout, shards: Sequence[ShardId], current: Mapping[ShardId, ShardAssignment],
        copying: Collection[tuple[ShardId, NodeId]] = (),
    ) -> tuple[State, list[Dropped]]:
        """The state ``current`` describes for ``shards`` (in planning order), and the
        replica entries dropped on the way: those of dead or unknown nodes, and nodes
        listed twice. A primary that is not live is simply absent (failover's job).
        ``copying``: (shard, replica) pairs known to be still copying the shard: they do
        not count as holding its data (no handoff to them this round)."""
        state = cls.__new__(cls)
        state.layout = layout
        state.shards = shards
        state.rank = {shard: i for i, shard in enumerate(shards)}
        state.primary, state.replicas, state.has_data = {}, {}, {}
        state.fresh_primary, state.relocating = set(), set()
        state.moving_out, state.moving_in = Counter(), Counter()
        state.primary_of = {n: set() for n in layout.live}
        state.replica_of = {n: set() for n in layout.live}
        state._shared, state._own_nodes, state._own_shards = False, set(), set()
        dropped: list[Dropped] = []
        live = layout.live
        for shard in shards:
            record = current.get(shard)
            primary = record.primary if record is not None else None
            if primary is not None and primary in live:
                state.primary[shard] = primary
                state.primary_of[primary].add(shard)
            else:
                state.primary[shard] = None
            replicas: list[NodeId] = []
            state.replicas[shard] = replicas
            for replica in record.replicas if record is not None else ():
                if replica not in live:
                    dropped.append((shard, replica, "node is gone"))
                elif replica == state.primary[shard] or replica in replicas:
                    dropped.append((shard, replica, "listed twice"))
                else:
                    replicas.append(replica)
                    state.replica_of[replica].add(shard)
            state.has_data[shard] = frozenset(m for m in state.members(shard) if (shard, m) not in copying)
        state.busy = {n for n in live if state.primary_of[n] or state.replica_of[n]}
        state.busy_version = 0
        state.candidates_cache = (-1, [])
        state.new_replicas = 0
        return state, dropped

    def copy(self) -> State:
        """An independent copy, cheap whatever the number of nodes: the per-node sets and
        per-shard lists are shared until either state changes one (copy-on-write)."""
        other = State.__new__(State)
        other.layout, other.shards, other.rank = self.layout, self.shards, self.rank
        other.has_data = self.has_data  # never changes after load
        other.primary = dict(self.primary)
        other.replicas = dict(self.replicas)
        other.fresh_primary = set(self.fresh_primary)
        other.relocating = set(self.relocating)
        other.moving_out = Counter(self.moving_out)
        other.moving_in = Counter(self.moving_in)
        other.primary_of = dict(self.primary_of)
        other.replica_of = dict(self.replica_of)
        other.busy = set(self.busy)
        other.busy_version = self.busy_version
        other.candidates_cache = self.candidates_cache  # its list is never changed
        other.new_replicas = self.new_replicas
        for state in (self, other):
            state._shared, state._own_nodes, state._own_shards = True, set(), set()
        return other

    def _own_node(self, node: NodeId) -> None:
        if self._shared and node not in self._own_nodes:
            self._own_nodes.add(node)
            self.primary_of[node] = set(self.primary_of[node])
            self.replica_of[node] = set(self.replica_of[node])

    def _own_shard(self, shard: ShardId) -> None:
        if self._shared and shard not in self._own_shards:
            self._own_shards.add(shard)
            self.replicas[shard] = list(self.replicas[shard])

    # -- reading ------------------------------------------------------------------------

    def members(self, shard: ShardId) -> list[NodeId]:
        """The shard's primary (if any) followed by its replicas."""
        primary = self.primary[shard]
        return ([] if primary is None else [primary]) + self.replicas[shard]

    # Counts as they will be once the primary relocations started in this round finish
    # (the target's extra replica becomes the primary, the source's copy goes).

    def roles(self, node: NodeId) -> int:
        return len(self.primary_of[node]) + len(self.replica_of[node]) - self.moving_out.get(node, 0)

    def primaries(self, node: NodeId) -> int:
        return len(self.primary_of[node]) - self.moving_out.get(node, 0) + self.moving_in.get(node, 0)

    def replica_count(self, node: NodeId) -> int:
        return len(self.replica_of[node]) - self.moving_in.get(node, 0)

    def draining(self, node: NodeId | None) -> bool:
        """Whether ``node`` holds roles it should give up (a live node not eligible)."""
        return node is not None and node not in self.layout.eligible

    def imbalance(self, node: NodeId) -> int:
        """How far ``node`` is outside its fair-share ranges: the distances of its
        roles, primaries and replicas from their ranges, summed. 0 means balanced; a
        node that takes no roles (draining) counts every role it holds."""
        roles = self.roles(node)
        if node not in self.layout.eligible:
            return roles
        return outside(roles, self.primaries(node), self.layout.ranges[node])

    def delta(self, node: NodeId, d_roles: int, d_primaries: int) -> int:
        """Change of ``node``'s :meth:`imbalance` if it gains ``d_roles`` roles of which
        ``d_primaries`` primaries (negative: loses). Every preference and every search
        step is built on this."""
        held, replicas = len(self.primary_of[node]), len(self.replica_of[node])
        out, into = self.moving_out.get(node, 0), self.moving_in.get(node, 0)
        roles = held + replicas - out
        if node not in self.layout.eligible:
            return d_roles
        primaries = held - out + into
        ranges = self.layout.ranges[node]
        return (
            outside(roles + d_roles, primaries + d_primaries, ranges)
            - outside(roles, primaries, ranges)
        )

    def zone_counts(self, shard: ShardId, without: NodeId | None = None) -> Counter[str]:
        """Copies of ``shard`` per zone on eligible nodes, ``without``'s not counted."""
        counts: Counter[str] = Counter()
        eligible, live = self.layout.eligible, self.layout.live
        for node in self.members(shard):
            if node in eligible and node != without:
                counts[live[node].zone] += 1
        return counts

    def candidates(self) -> list[NodeId]:
        """The eligible nodes every decision of the round chooses among, sorted: those
        that hold a role (or take part in a relocation), and of each class of
        :attr:`Layout.classes` the empty node with the smallest id.

        Why this loses nothing: an eligible node that holds nothing is a member of no
        shard, and every rule reads only its zone, its fair share and its (zero) counts,
        so the empty nodes of one class are alike but for their ids. Every choice among
        nodes is a minimum over keys that end with the node id, or a first match in
        node-id order, so where any empty node of a class would be chosen, the one with
        the smallest id is; and an empty node has no role to give, so in a chain search
        it can only be an end. With thousands of empty nodes this is a handful of
        candidates instead of thousands."""
        version, cached = self.candidates_cache
        if version == self.busy_version:
            return cached
        busy, eligible = self.busy, self.layout.eligible
        candidates = [n for n in busy if n in eligible]
        for members in self.layout.classes:
            for n in members:
                if n not in busy:
                    candidates.append(n)
                    break
        candidates.sort()
        self.candidates_cache = (self.busy_version, candidates)
        return candidates

    def records(self, current: Mapping[ShardId, ShardAssignment]) -> dict[ShardId, ShardAssignment]:
        """The planned record of every shard; the epoch is ``current``'s (0 for a shard
        it lacks) plus one where the primary changed."""
        result: dict[ShardId, ShardAssignment] = {}
        for shard in self.shards:
            before = current.get(shard)
            epoch = before.epoch if before is not None else 0
            primary = before.primary if before is not None else None
            if self.primary[shard] != primary:
                epoch += 1
            result[shard] = ShardAssignment(shard, epoch, self.primary[shard], tuple(self.replicas[shard]))
        return result

    # -- changing -----------------------------------------------------------------------

    def set_primary(self, shard: ShardId, node: NodeId) -> None:
        """Make ``node`` the primary of ``shard``; the old primary loses the role, and
        ``node`` its replica entry if it had one."""
        old = self.primary[shard]
        if old is not None:
            self._own_node(old)
            self.primary_of[old].discard(shard)
            self._touch(old)
        self._own_node(node)
        if node in self.replicas[shard]:
            self._own_shard(shard)
            self.replicas[shard].remove(node)
            self.replica_of[node].discard(shard)
            if node not in self.has_data[shard]:
                self.new_replicas -= 1
        self.primary[shard] = node
        self.primary_of[node].add(shard)
        self._touch(node)

    def fail_over_to(self, shard: ShardId, node: NodeId) -> None:
        """:meth:`set_primary` for a shard that lost its primary: ``node`` has the
        writes, so it is not handed off again in this round (``fresh_primary``)."""
        self.set_primary(shard, node)
        self.fresh_primary.add(shard)

    def add(self, shard: ShardId, node: NodeId) -> None:
        """Make ``node``, not yet a member of ``shard``, one of its replicas."""
        assert node not in self.members(shard), (shard, node)  # the planner's invariant
        self._own_shard(shard)
        self._own_node(node)
        self.replicas[shard].append(node)
        self.replica_of[node].add(shard)
        if node not in self.has_data[shard]:
            self.new_replicas += 1
        self._touch(node)

    def remove(self, shard: ShardId, node: NodeId) -> None:
        """Remove replica ``node`` of ``shard``."""
        self._own_shard(shard)
        self._own_node(node)
        self.replicas[shard].remove(node)
        self.replica_of[node].discard(shard)
        if node not in self.has_data[shard]:
            self.new_replicas -= 1
        self._touch(node)

    def start_relocation(self, shard: ShardId, source: NodeId, target: NodeId) -> None:
        """Count the move of ``shard``'s primary from ``source`` to ``target`` as done
        (``target`` was just added as a replica; a later round hands off to it)."""
        self.relocating.add(shard)
        self.moving_out[source] += 1
        self.moving_in[target] += 1
        self._touch(source)
        self._touch(target)

    def _touch(self, node: NodeId) -> None:
        """Update ``busy`` after ``node``'s roles or relocation counts changed."""
        busy = bool(
            self.primary_of[node] or self.replica_of[node]
            or self.moving_in.get(node) or self.moving_out.get(node)
        )
        if busy != (node in self.busy):
            if busy:
                self.busy.add(node)
            else:
                self.busy.discard(node)
            self.busy_version += 1
