"""Registrations this replica refused lately, for GetClusterStatus to show.

A second process started under a node id that a live node holds (a copied config, a
StatefulSet ordinal reused by hand), or a node whose data dir belongs to another cluster,
is refused at RegisterNode and retries on its own side, saying why in its own log. The
operator looking at ``bluemarblectl status`` saw nothing of it. Each replica keeps the
refusals it answered, in memory (a refused caller makes no etcd write), per node id and
address, and status words those of the last :data:`SHOWN_FOR_S` seconds as warnings.

Bounded: at most :data:`MAX_KEPT` (node id, address) pairs (the oldest go first), and only
short texts: a node id or an address that is not short printable text is kept as
:func:`~bluemarble.core.limits.echo` quotes it, and a reason is cut to 400 characters.
"""

from __future__ import annotations

from dataclasses import dataclass

from bluemarble.core.limits import echo
from bluemarble.runtime.clock import Clock

SHOWN_FOR_S = 60.0
"""How long after its last attempt a refused registration is shown."""

MAX_KEPT = 64
"""(node id, address) pairs remembered at most."""

MAX_SHOWN = 8
"""Warnings GetClusterStatus words at most (the most recent first)."""


@dataclass
class Refusal:
    node_id: str
    address: str
    reason: str
    count: int
    first_s: float
    last_s: float


class RegistrationRefusals:
    def __init__(self, clock: Clock):
        self._clock = clock
        self._kept: dict[tuple[str, str], Refusal] = {}

    def refused(self, node_id: str, address: str, reason: str) -> bool:
        """Notes that a registration of ``node_id`` from ``address`` was refused for
        ``reason`` (the refusal's message). True when it starts a new episode (none of
        that pair in the last :data:`SHOWN_FOR_S` seconds): the caller logs those only."""
        now = self._clock.monotonic_s()
        key = (_shown(node_id, 64), _shown(address, 128))
        kept = self._kept.pop(key, None)  # re-inserted last: the dict's order is recency
        new = kept is None or now - kept.last_s > SHOWN_FOR_S
        if kept is None or new:
            kept = Refusal(key[0], key[1], "", 0, now, now)
        kept.reason, kept.count, kept.last_s = _cut(reason, 400), kept.count + 1, now
        self._kept[key] = kept
        while len(self._kept) > MAX_KEPT:
            del self._kept[next(iter(self._kept))]
        return new

    def recent(self) -> list[Refusal]:
        """The refusals of the last :data:`SHOWN_FOR_S` seconds, the most recent first."""
        now = self._clock.monotonic_s()
        for key in [k for k, r in self._kept.items() if now - r.last_s > SHOWN_FOR_S]:
            del self._kept[key]
        return sorted(self._kept.values(), key=lambda r: r.last_s, reverse=True)

    def warnings(self, replica_id: str) -> list[str]:
        """GetClusterStatus's words for :meth:`recent` (at most :data:`MAX_SHOWN`)."""
        now = self._clock.monotonic_s()
        recent = self.recent()
        shown = [
            f"replica {replica_id} refused {r.count} registration(s) of node {r.node_id} from {r.address} "
            f"(last {now - r.last_s:.0f} s ago): {r.reason}"
            for r in recent[:MAX_SHOWN]
        ]
        if len(recent) > MAX_SHOWN:
            shown.append(f"and {len(recent) - MAX_SHOWN} more refused registrations on replica {replica_id}")
        return shown


def _shown(text: str, limit: int) -> str:
    """``text`` itself when it is short printable text, else as ``echo`` quotes it."""
    return text if len(text) <= limit and text.isprintable() and text.strip() == text and text else echo(text, limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
