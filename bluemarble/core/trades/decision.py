"""The decision record's one write rule: create if absent (pure).

Why this module exists: the decision record is the commit point of a cross-shard trade.
Whoever writes first decides, whether the coordinator (COMMITTED or ABORTED) or a
participant's termination (ABORTED-if-absent); everyone else reads what was written. The
etcd driver implements this as one transaction (``create_revision == 0`` then put, else
get) and must return what this function returns.
"""

from __future__ import annotations

from bluemarble.core.trades.model import Decision


def create_if_absent(existing: Decision | None, proposed: Decision) -> tuple[Decision, bool]:
    """The record after a create-if-absent of ``proposed`` over ``existing`` (the record
    as stored, None if absent), and whether ``proposed`` was written.

    An existing record is returned unchanged, even if ``proposed`` has the same outcome:
    the decision of a trade never changes once written (I3), nor does its reason or
    author. Both must be for the same trade id (assertion).
    """
    if existing is not None:
        assert existing.trade_id == proposed.trade_id, (existing.trade_id, proposed.trade_id)
        return existing, False
    return proposed, True
