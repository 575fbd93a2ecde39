"""The coordinator of one cross-shard ExecuteTrade attempt, as a state machine: messages
in, actions out (like etcd-io/raft's ``Ready``), no I/O.

Why this module exists: the coordinator is stateless across attempts (any control-plane
replica runs it, and it may die at any point), so all it must get right is the order of
one attempt: prepare both legs, propose, adopt the *recorded* decision (never its own
proposal), settle both legs, answer. The driver executes each returned action:

- :class:`SendPrepare`: send Prepare(leg) to the primary of ``leg.player``'s shard;
  feed its answer to :meth:`Coordinator.on_prepare_reply` (UNAVAILABLE for an RPC
  error), and call :meth:`Coordinator.on_prepare_timeout` when the prepare deadline
  passes;
- :class:`ProposeDecision`: create-if-absent of the decision record (one etcd
  transaction); feed the record as stored, written or not, to
  :meth:`Coordinator.on_decision`. If etcd cannot be reached the attempt ends without
  an answer (the caller retries; the participants' termination settles the escrows);
- :class:`SendSettle`: Commit/Abort to that side's primary; feed
  :meth:`Coordinator.on_settle_ack` or :meth:`Coordinator.on_settle_failed` (after the
  driver's own bounded retries);
- :class:`Reply`: answer the caller with this decision (emitted once both settles have
  finished, acknowledged or failed: a failed settle never changes the answer);
- :class:`Abandon`: end the attempt without a decision and without an answer (the caller
  retries the trade id): ABORTED would need evidence that no side ever applied COMMITTED,
  and neither answer gave it (see :func:`propose`);
- :class:`Retain`: both participants applied the decision: attach the record to its
  retention lease (off the critical path).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bluemarble.core.trades.model import COORDINATOR, AbortCause, Decision, Leg, Outcome, Trade


class Side(enum.Enum):
    A = "a"
    B = "b"


class ReplyKind(enum.Enum):
    PREPARED = "prepared"
    REFUSED = "refused"
    DECIDED = "decided"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class PrepareReply:
    """A participant's answer to Prepare: PREPARED, REFUSED(reason), DECIDED(outcome)
    (an outcome was already applied there), or UNAVAILABLE(reason) (the RPC failed).
    ``earlier``: PREPARED by an earlier Prepare of the trade id, not by this one."""

    kind: ReplyKind
    reason: str = ""
    outcome: Outcome | None = None
    earlier: bool = False
    pending: bool = False
    """REFUSED because of other trades not settled yet (participant.refusal)."""

    @staticmethod
    def prepared(earlier: bool = False) -> PrepareReply:
        return PrepareReply(ReplyKind.PREPARED, earlier=earlier)

    @staticmethod
    def refused(reason: str, pending: bool = False) -> PrepareReply:
        return PrepareReply(ReplyKind.REFUSED, reason, pending=pending)

    @staticmethod
    def decided(outcome: Outcome, reason: str = "") -> PrepareReply:
        return PrepareReply(ReplyKind.DECIDED, reason, outcome)

    @staticmethod
    def unavailable(reason: str) -> PrepareReply:
        return PrepareReply(ReplyKind.UNAVAILABLE, reason)

    @property
    def votes_commit(self) -> bool:
        return self.kind is ReplyKind.PREPARED or self.committed

    @property
    def committed(self) -> bool:
        """This side already applied COMMITTED: a participant does so only from a COMMITTED
        record of these terms, so that is the trade's decision, whatever the other side
        answers (or whether it answers)."""
        return self.kind is ReplyKind.DECIDED and self.outcome is Outcome.COMMITTED

    @property
    def never_committed(self) -> bool:
        """This side's answer proves that no side ever applied COMMITTED: it refused (it
        holds no record of the trade id), escrowed just now (it held none), or applied
        ABORTED. A COMMITTED record exists only once both sides escrowed, and a side
        applies only its trade's record."""
        return (self.kind is ReplyKind.REFUSED or (self.kind is ReplyKind.PREPARED and not self.earlier)
                or (self.kind is ReplyKind.DECIDED and self.outcome is Outcome.ABORTED))


@dataclass(frozen=True)
class SendPrepare:
    side: Side
    leg: Leg


@dataclass(frozen=True)
class ProposeDecision:
    decision: Decision


@dataclass(frozen=True)
class SendSettle:
    side: Side
    outcome: Outcome


@dataclass(frozen=True)
class Reply:
    decision: Decision


@dataclass(frozen=True)
class Retain:
    trade_id: str


@dataclass(frozen=True)
class Abandon:
    reason: str


Action = SendPrepare | ProposeDecision | SendSettle | Reply | Retain | Abandon

SHARD_UNAVAILABLE = "shard unavailable"


def _abort_reason(side: Side, reply: PrepareReply | None) -> str:
    if reply is None:
        return f"{SHARD_UNAVAILABLE} (side {side.name}: no answer to prepare)"
    if reply.kind is ReplyKind.UNAVAILABLE:
        return f"{SHARD_UNAVAILABLE} (side {side.name}: {reply.reason})" if reply.reason else SHARD_UNAVAILABLE
    if reply.kind is ReplyKind.DECIDED:
        return reply.reason or f"already aborted at side {side.name}"
    return reply.reason


def propose(
    a: PrepareReply | None, b: PrepareReply | None, *, trade_id: str, decided_by: str = COORDINATOR,
    players: tuple[str, ...] = (),
) -> Decision | None:
    """The coordinator's proposal from both answers (None: no answer): COMMITTED when both
    voted commit (PREPARED, or DECIDED(COMMITTED)) or either side already applied COMMITTED
    (the decision was COMMITTED: its record exists, or was lost, as after etcd is restored
    from a backup, and ABORTED would then leave the trade applied on one side only); else
    ABORTED with the reason of the first answer against (A's before B's; a refusal names
    the item or the amount), else "shard unavailable" for the first side that did not
    answer.

    ABORTED only with evidence that no side ever applied COMMITTED
    (:attr:`PrepareReply.never_committed` of either answer), else None: no proposal. Both
    sides silent, or one silent and the other holding an escrow from an earlier attempt,
    is what a trade looks like whose record was lost (etcd restored from a backup) after
    the silent side applied COMMITTED; ABORTED then would split it. With the record
    there, such a proposal was harmless (the record stood), so the only cost is the
    caller's: it gets no answer and retries, while the escrow's holder settles it with
    the other side (termination)."""
    if (a is not None and b is not None and a.votes_commit and b.votes_commit) or any(
            r is not None and r.committed for r in (a, b)):
        return Decision(trade_id, Outcome.COMMITTED, "", decided_by, players)
    if not any(r is not None and r.never_committed for r in (a, b)):
        return None
    answered = [(side, r) for side, r in ((Side.A, a), (Side.B, b)) if r is not None and not r.votes_commit]
    # A refusal of the terms first: it names the item or the amount, and says the same
    # terms would fail again (a caller retrying after "unavailable" would only meet it);
    # then one because of other trades not settled yet.
    answered.sort(key=lambda answer: (answer[1].kind is not ReplyKind.REFUSED, answer[1].pending))
    side, reply = answered[0] if answered else ((Side.A, a) if a is None else (Side.B, b))
    return Decision(trade_id, Outcome.ABORTED, _abort_reason(side, reply), decided_by, players, _cause(reply))


def _cause(reply: PrepareReply | None) -> AbortCause:
    if reply is None or reply.kind is ReplyKind.UNAVAILABLE:
        return AbortCause.UNAVAILABLE
    if reply.kind is ReplyKind.REFUSED:
        return AbortCause.CONTENDED if reply.pending else AbortCause.REFUSED
    return AbortCause.UNKNOWN


class Phase(enum.Enum):
    NEW = "new"
    PREPARING = "preparing"
    DECIDING = "deciding"
    """Proposal sent; waiting for the record as stored."""
    SETTLING = "settling"
    DONE = "done"
    """Both settles finished; the answer was emitted."""


class Coordinator:
    """One ExecuteTrade attempt of a validated cross-shard ``trade``; ``name`` identifies
    the writer in the decision record (``Decision.decided_by``).

    Every method returns the actions to execute, in order; calls that do not fit the
    current phase (a duplicate or late answer) return no action. Not thread-safe.
    """

    def __init__(self, trade: Trade, name: str = COORDINATOR) -> None:
        self.trade = trade
        self.name = name
        self.phase = Phase.NEW
        self.replies: dict[Side, PrepareReply] = {}
        self.proposal: Decision | None = None
        self._answer: Decision | None = None
        self._settled: dict[Side, bool] = {}
        """side -> acknowledged (True) or failed (False)."""

    @property
    def answer(self) -> Decision | None:
        """The recorded decision once known (the caller's answer), else None."""
        return self._answer

    def leg(self, side: Side) -> Leg:
        return self.trade.leg_a() if side is Side.A else self.trade.leg_b()

    def side_of(self, player: str) -> Side:
        """The side ``player`` is on (KeyError-like assertion for a stranger)."""
        assert player in self.trade.players, player
        return Side.A if player == self.trade.player_a else Side.B

    def start(self) -> list[Action]:
        """Prepare both legs (in parallel)."""
        if self.phase is not Phase.NEW:
            return []
        self.phase = Phase.PREPARING
        return [SendPrepare(Side.A, self.trade.leg_a()), SendPrepare(Side.B, self.trade.leg_b())]

    def _propose(self, a: PrepareReply | None, b: PrepareReply | None) -> Decision | None:
        """The proposal rule (a method so that a test can plant a wrong one)."""
        return propose(a, b, trade_id=self.trade.trade_id, decided_by=self.name, players=self.trade.players)

    def _decide(self) -> list[Action]:
        a, b = self.replies.get(Side.A), self.replies.get(Side.B)
        proposal = self._propose(a, b)
        if proposal is None:
            self.phase = Phase.DONE
            silent = [f"side {side.name}: {r.reason if r is not None else 'no answer to prepare'}"
                      for side, r in ((Side.A, a), (Side.B, b)) if r is None or r.kind is ReplyKind.UNAVAILABLE]
            return [Abandon(f"{SHARD_UNAVAILABLE} ({'; '.join(silent)}) and no side's answer shows the trade "
                            "was never committed (it may have been decided before)")]
        self.phase = Phase.DECIDING
        self.proposal = proposal
        return [ProposeDecision(proposal)]

    def on_prepare_reply(self, side: Side, reply: PrepareReply) -> list[Action]:
        """One side's answer. Proposes as soon as the outcome is certain: both voted
        commit, one already applied COMMITTED, or one did not vote commit and some answer
        shows the trade was never committed (no need to wait for the other: its escrow, if
        any, is released by the Abort). Later answers are ignored."""
        if self.phase is not Phase.PREPARING or side in self.replies:
            return []
        self.replies[side] = reply
        if (len(self.replies) == 2 or reply.committed
                or (not reply.votes_commit and any(r.never_committed for r in self.replies.values()))):
            return self._decide()
        return []

    def on_prepare_timeout(self) -> list[Action]:
        """The prepare deadline passed: a side that has not answered counts as
        unavailable (ABORTED)."""
        if self.phase is not Phase.PREPARING:
            return []
        return self._decide()

    def on_decision(self, recorded: Decision) -> list[Action]:
        """The record as stored after the create-if-absent (ours or an earlier writer's:
        it stands either way). Settle both sides with it."""
        assert recorded.trade_id == self.trade.trade_id, (recorded.trade_id, self.trade.trade_id)
        if self.phase in (Phase.SETTLING, Phase.DONE):
            return []
        self.phase = Phase.SETTLING
        self._answer = recorded
        return [SendSettle(Side.A, recorded.outcome), SendSettle(Side.B, recorded.outcome)]

    def _settle_finished(self, side: Side, acked: bool) -> list[Action]:
        if self.phase is not Phase.SETTLING or side in self._settled:
            return []
        self._settled[side] = acked
        if len(self._settled) < 2:
            return []
        self.phase = Phase.DONE
        assert self._answer is not None
        actions: list[Action] = [Reply(self._answer)]
        if all(self._settled.values()):
            actions.append(Retain(self.trade.trade_id))
        return actions

    def on_settle_ack(self, side: Side) -> list[Action]:
        """``side`` applied (or had applied) the recorded outcome."""
        return self._settle_finished(side, True)

    def on_settle_failed(self, side: Side) -> list[Action]:
        """``side`` could not be reached: the answer stands; the participant's termination
        or the leader's sweep finishes phase 2 there (no Retain)."""
        return self._settle_finished(side, False)
