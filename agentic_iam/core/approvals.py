"""Approval requests for calls a policy lets a human lift (``@approval`` forbids).

An ``approval_required`` decision yields an :class:`ApprovalRequest` bound to the execution id and
a digest of the tool and its exact arguments. An approval lets *that exact call* through *once*
(the store consumes it atomically); a different amount or recipient needs its own approval.
Approvers are tiny: a callback, a console prompt, or a queue another process resolves
(``aiam approvals approve ID``).

Every answer has an accountable approver, checked before anything changes:

* **who**: a :class:`~agentic_iam.core.identity.Human` verified by an IdP (its ``issuer`` is the
  IdP, e.g. from :meth:`OIDCProvider.verify <agentic_iam.core.broker.OIDCProvider.verify>`), or
  the id of a *configured* approver (``ApprovalManager(approvers=...)``,
  ``GuardConfig.approvers``, ``aiam approvals --approvers``). The ``name`` of an in-process
  approver (:class:`CallbackApprover`, :class:`ConsoleApprover`) is configured by whoever built
  it and counts for its own answers. Any other string is only a claim and is refused;
* **separation of duties**: never the requesting agent, its execution, or an agent (or
  execution) anywhere in its delegation chain — the request records all three;
* **on the record**: every grant and denial is an ``approval.granted`` / ``approval.denied``
  event naming the approver, written *before* the store changes (an answer that cannot be
  recorded is not applied); a refused answer is an ``approval.denied`` event with the refusal's
  reason code and ``extra.refused``, and leaves the request pending.

Nothing here may let a call through without a consumed, approved record in the store, or let an
approval through whose approver is not on the record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from agentic_iam.core.identity import Human
from agentic_iam.core.provenance import canonical_json as _canonical_bytes
from agentic_iam.core.provenance import json_safe
from agentic_iam.errors import ApprovalError, ApproverRefusedError, AuditError

if TYPE_CHECKING:
    from agentic_iam.core.provenance import EventType, Recorder
    from agentic_iam.core.store.base import Store

__all__ = [
    "ApprovalManager",
    "ApprovalRequest",
    "Approver",
    "ApproverLike",
    "CallbackApprover",
    "ConsoleApprover",
    "QueuedApprover",
    "call_binding",
    "canonical_json",
]

log = logging.getLogger("agentic_iam.approvals")

ApproverLike = Human | str
"""Who answers an approval request: a :class:`Human` verified by an IdP, or the id of a
configured approver."""


def canonical_json(value: object) -> str:
    """Sorted keys, compact, UTF-8, no NaN: the same text for the same value everywhere.

    One definition for the whole package (:func:`agentic_iam.core.provenance.canonical_json`,
    with ``Decimal`` and sets made JSON-safe), so that approval bindings, argument digests and
    audit records agree. Raises ``ValueError`` for values JSON cannot hold faithfully.
    """
    try:
        return _canonical_bytes(json_safe(value)).decode("utf-8")
    except AuditError as exc:
        raise ValueError(str(exc)) from None


def arguments_digest(arguments: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the arguments' canonical JSON: what audit records call
    ``arguments_digest``."""
    return hashlib.sha256(canonical_json(dict(arguments)).encode("utf-8")).hexdigest()


def call_binding(execution_id: str, tool: str, arguments: Mapping[str, Any]) -> str:
    """What an approval is bound to: the execution and the exact call."""
    digest = hashlib.sha256(
        canonical_json({"tool": tool, "arguments": dict(arguments)}).encode("utf-8")
    ).hexdigest()
    return f"{execution_id}:{digest}"


@dataclass(frozen=True)
class ApprovalRequest:
    """A pending request for a human to lift an ``@approval`` policy for one call."""

    request_id: str
    """Id to approve or deny (``apr_…``)."""
    binding: str
    """Execution id + digest of the tool and its exact arguments."""
    execution_id: str
    """The execution asking."""
    agent_id: str
    """The agent asking."""
    delegator: str
    """On whose behalf."""
    tool: str
    """Tool name."""
    action: str
    """Tool action."""
    arguments: Mapping[str, Any]
    """The exact arguments (shown to the approver)."""
    reasons: tuple[str, ...]
    """Why approval is needed (policy messages)."""
    policy_ids: tuple[str, ...]
    """The approval policies that fired."""
    created_at: int
    """Unix seconds."""
    expires_at: int
    """Unix seconds; an unanswered request lapses."""
    chain: tuple[Mapping[str, str | None], ...] = ()
    """The delegation chain of the asking execution (delegator first, then each agent hop with
    its execution id): none of these agents may answer (separation of duties)."""

    def payload(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id, "agent_id": self.agent_id,
            "delegator": self.delegator, "tool": self.tool, "action": self.action,
            "arguments": json.loads(canonical_json(dict(self.arguments))),
            "reasons": list(self.reasons), "policy_ids": list(self.policy_ids),
            "chain": [dict(hop) for hop in self.chain],
        }

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.arguments.items()))
        return (f"{self.agent_id} (for {self.delegator}) wants {self.tool}({args}): "
                + "; ".join(self.reasons))


class Approver(Protocol):
    """Decides an approval request now (True/False) or leaves it pending (None).

    ``name`` is the accountable identity its answers are recorded under: a configured approver
    id, or a :class:`Human`. It is checked like any other approver (never the requesting agent,
    its execution or its delegation chain).
    """

    @property
    def name(self) -> ApproverLike: ...

    def decide(self, request: ApprovalRequest) -> bool | None: ...


@dataclass(frozen=True)
class CallbackApprover:
    """Calls a function with the request; its bool is the answer (None leaves it pending).

    ``CallbackApprover(ask_bob, name="bob@example.com")``: ``name`` says who answers.
    """

    callback: Callable[[ApprovalRequest], bool | None]
    """The function that decides."""
    name: ApproverLike
    """Who answers: the approver id (or :class:`Human`) every answer is recorded under."""

    def decide(self, request: ApprovalRequest) -> bool | None:
        return self.callback(request)


@dataclass(frozen=True)
class ConsoleApprover:
    """Asks on the console (for notebooks and the CLI); anything but y/yes denies.

    ``ConsoleApprover("bob@example.com")``: ``name`` is the person at the console.
    """

    name: ApproverLike
    """Who answers: the approver id (or :class:`Human`) every answer is recorded under."""
    input_fn: Callable[[str], str] = input
    """Reads the answer (replaceable for tests)."""

    def decide(self, request: ApprovalRequest) -> bool | None:
        answer = self.input_fn(f"Approve? {request.describe()} [y/N] ")
        return answer.strip().lower() in ("y", "yes")


@dataclass(frozen=True)
class QueuedApprover:
    """Leaves every request pending in the store; another process resolves it later, as a
    configured or IdP-verified approver (``aiam approvals approve``,
    :meth:`ApprovalManager.resolve`)."""

    name: str = "queue"
    """Never recorded: a queue does not answer."""

    def decide(self, request: ApprovalRequest) -> bool | None:
        return None


# --- who may answer -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Accountable:
    """An approver that passed the identity check."""

    id: str
    """Recorded (and stored) as the approver."""
    issuer: str | None
    """The IdP that verified a :class:`Human` (``None`` for a configured id)."""


def _fold(value: object) -> str:
    """Ids compared for separation of duties: NFKC, case folded, outer blanks removed."""
    return unicodedata.normalize("NFKC", str(value)).casefold().strip()


def _claimed_id(approver: object) -> str:
    """The id an answer claims (before it is checked), or ApproverRefusedError."""
    name = approver.id if isinstance(approver, Human) else approver
    if not isinstance(name, str):
        raise ApproverRefusedError(
            f"an approver must be a `Human` or a configured approver id, got "
            f"`{type(approver).__name__}`", code="approval.approver_unknown", approver="")
    if not name.strip():
        raise ApproverRefusedError("the approver is empty: name an accountable approver",
                                   code="approval.approver_unknown", approver="")
    return name.strip()


def _accountable(approver: object, configured: frozenset[str],
                 trusted: ApproverLike | None = None) -> _Accountable:
    """The approver if it is authenticated or configured, else ApproverRefusedError."""
    name = _claimed_id(approver)
    if isinstance(approver, Human):
        if approver.issuer != "local":
            return _Accountable(name, approver.issuer)
        if name in configured or approver == trusted:
            return _Accountable(name, None)
        raise ApproverRefusedError(
            f"approver `{name}` is not a configured approver (a `Human` from `local` is only a "
            f"name: configure it, or verify the person with an IdP)",
            code="approval.approver_unknown", approver=name)
    if name in configured or (isinstance(trusted, str) and name == trusted.strip()):
        return _Accountable(name, None)
    raise ApproverRefusedError(f"approver `{name}` is not a configured approver",
                               code="approval.approver_unknown", approver=name)


def _check_separation(who: _Accountable, payload: Mapping[str, Any], request_id: str) -> None:
    """Refuse the requesting agent, its execution and every agent hop of its chain (checked
    first, so that an agent answering its own call is told exactly that)."""
    agent_id, execution_id = payload.get("agent_id"), payload.get("execution_id")
    chain = payload.get("chain")
    if not isinstance(agent_id, str) or not isinstance(execution_id, str) or not agent_id \
            or not execution_id or not isinstance(chain, list):
        raise ApproverRefusedError(
            f"approval request `{request_id}` does not record the requesting agent, execution "
            f"and delegation chain, so no approver can be checked against them",
            code="approval.unattributed", approver=who.id, request_id=request_id)
    me = _fold(who.id)
    refusal: str | None = None
    if me == _fold(agent_id):
        refusal = "the requesting agent cannot approve its own call"
    elif me == _fold(execution_id):
        refusal = "the requesting execution cannot approve its own call"
    else:
        for hop in chain:
            if not isinstance(hop, Mapping) or hop.get("principal_type") != "agent":
                continue
            if me in (_fold(hop.get("id") or ""), _fold(hop.get("execution_id") or "")):
                refusal = (f"agent `{hop.get('id')}` is in the requesting delegation chain and "
                           f"cannot approve its call")
                break
    if refusal is not None:
        raise ApproverRefusedError(refusal, code="approval.separation_of_duties",
                                   approver=who.id, request_id=request_id)


def _identity_of(approver: Approver) -> ApproverLike:
    """The accountable identity an in-process approver answers as (checked at construction)."""
    name = getattr(approver, "name", None)
    if isinstance(name, Human) and isinstance(name.id, str) and name.id.strip():
        return name
    if isinstance(name, str) and name.strip():
        return name.strip()
    raise ApprovalError(
        f"approver `{type(approver).__name__}` has no accountable identity: give it a `name` "
        f"(a configured approver id or a `Human`)")


class ApprovalManager:
    """Creates, resolves and consumes approval requests in a store, recording each step.

    ``approvers`` are the ids of configured approvers (people or services) who may answer by
    name; a :class:`Human` verified by an IdP needs no entry. ``approver`` answers in-process
    as its ``name``.
    """

    def __init__(self, store: Store, approver: Approver | None = None, *, ttl_s: int = 900,
                 recorder: Recorder | None = None,
                 clock: Callable[[], float] = time.time,
                 approvers: Iterable[str] = ()) -> None:
        self.store = store
        self.approver: Approver = approver or QueuedApprover()
        self._approver_identity = _identity_of(self.approver)
        self.approvers = _configured(approvers)
        self.ttl_s = ttl_s
        self.recorder = recorder
        self._clock = clock

    def request(self, *, binding: str, execution_id: str, agent_id: str, delegator: str,
                tool: str, action: str, arguments: Mapping[str, Any], reasons: tuple[str, ...],
                policy_ids: tuple[str, ...], audit: Mapping[str, Any] | None = None,
                chain: Sequence[Mapping[str, str | None]] | None = None,
                ) -> tuple[ApprovalRequest, bool | None]:
        """Create a request and ask the approver. Returns the request and the answer given
        now (``None`` when it stays pending).

        ``chain`` is the asking execution's delegation chain (``ExecutionIdentity.chain()``;
        default: ``audit["chain"]``, else the asking agent alone): none of its agents may
        answer. An answer the approver may not give raises :class:`ApproverRefusedError`
        (recorded; the request stays pending).
        """
        now = int(self._clock())
        if chain is None:
            recorded = (audit or {}).get("chain")
            chain = recorded if isinstance(recorded, Sequence) else [
                {"principal_type": "agent", "id": agent_id, "execution_id": execution_id}]
        request = ApprovalRequest(
            request_id="apr_" + secrets.token_urlsafe(10), binding=binding,
            execution_id=execution_id, agent_id=agent_id, delegator=delegator, tool=tool,
            action=action, arguments=dict(arguments), reasons=reasons, policy_ids=policy_ids,
            created_at=now, expires_at=now + self.ttl_s,
            chain=tuple(dict(hop) for hop in chain),
        )
        self.store.put_approval(request.request_id, binding, request.payload(), ttl_s=self.ttl_s)
        self._record("approval.requested", request.payload(), request.request_id, audit)
        answer = self.approver.decide(request)
        if answer is not None:
            self._answer(request.request_id, approved=bool(answer),
                         approver=self._approver_identity, configured=self.approvers,
                         trusted=self._approver_identity, audit=audit)
        return request, answer

    def resolve(self, request_id: str, *, approved: bool, approver: ApproverLike,
                audit: Mapping[str, Any] | None = None,
                approvers: Iterable[str] = ()) -> Mapping[str, Any]:
        """Answer a pending request as ``approver`` and record it.

        ``approver`` is a :class:`Human` verified by an IdP or a configured approver id (this
        manager's ``approvers``, plus ``approvers`` given here — the Guard passes
        ``GuardConfig.approvers``), and never the requesting agent, its execution
        or an agent of its delegation chain: otherwise :class:`ApproverRefusedError` (the
        refusal is recorded and the request stays pending). The answer is recorded before the
        store changes; an unknown, expired or already answered request is an
        :class:`ApprovalError`.
        """
        configured = self.approvers | _configured(approvers)
        return self._answer(request_id, approved=approved, approver=approver,
                            configured=configured, trusted=None, audit=audit)

    def _answer(self, request_id: str, *, approved: bool, approver: object,
                configured: frozenset[str], trusted: ApproverLike | None,
                audit: Mapping[str, Any] | None) -> Mapping[str, Any]:
        record = self.store.get_approval(request_id)
        if record is None:
            raise ApprovalError(f"approval request `{request_id}` is unknown or expired")
        payload = record.get("payload") or {}
        answer = "approve" if approved else "deny"
        try:
            _check_separation(_Accountable(_claimed_id(approver), None), payload, request_id)
            who = _accountable(approver, configured, trusted)
        except ApproverRefusedError as exc:
            exc.request_id = request_id
            self._record("approval.denied", payload, request_id, audit, extra={
                "approver": exc.approver or "(none)", "refused": answer},
                decision=("deny", exc.code, str(exc)))
            raise
        if record.get("status") != "pending":
            raise ApprovalError(
                f"approval request `{request_id}` was already resolved ({record.get('status')})")
        extra = {"approver": who.id}
        if who.issuer is not None:
            extra["approver_issuer"] = who.issuer
        verb = "approved" if approved else "denied"
        # On the record first: an answer that cannot be recorded is not applied.
        self._record("approval.granted" if approved else "approval.denied", payload, request_id,
                     audit, extra=extra,
                     decision=("allow", "approval.granted", f"{verb} by `{who.id}`") if approved
                     else ("deny", "approval.denied", f"{verb} by `{who.id}`"))
        try:
            return self.store.resolve_approval(request_id, approved=approved, approver=who.id)
        except Exception as exc:
            try:  # the record above must not stand alone: say that the answer did not apply
                self._record("approval.denied", payload, request_id, audit, extra=extra,
                             decision=("deny", "approval.not_applied",
                                       f"the answer of `{who.id}` was not applied "
                                       f"({type(exc).__name__})"))
            except Exception:
                log.warning("could not record that approval %s was not applied", request_id)
            raise

    def pending_for(self, binding: str) -> str | None:
        """The id of a live, still pending request for this exact call, if there is one.

        Scans the pending requests: fine for the handful a deployment has open at a time.
        """
        for record in self.store.list_approvals("pending"):
            if record.get("binding") == binding:
                return str(record["request_id"])
        return None

    def consume(self, binding: str) -> bool:
        return self.store.consume_approval(binding)

    def pending(self) -> list[Mapping[str, Any]]:
        return self.store.list_approvals("pending")

    def get(self, request_id: str) -> Mapping[str, Any]:
        record = self.store.get_approval(request_id)
        if record is None:
            raise ApprovalError(f"unknown approval request `{request_id}`")
        return record

    def _record(self, event: EventType, payload: Mapping[str, Any], request_id: str,
                audit: Mapping[str, Any] | None, *, extra: Mapping[str, str] | None = None,
                decision: tuple[Literal["allow", "deny"], str, str] | None = None) -> None:
        if self.recorder is None:
            return
        fields: dict[str, Any] = {
            "execution_id": payload.get("execution_id"), "agent_id": payload.get("agent_id"),
            "delegator": payload.get("delegator"), "tool": payload.get("tool"),
            "action": payload.get("action"),
        }
        chain = payload.get("chain")
        if isinstance(chain, list) and chain:
            fields["chain"] = chain
        fields.update(audit or {})
        fields["extra"] = {"approval_id": request_id, **dict(extra or {})}
        if decision is not None:
            outcome, code, message = decision
            fields["decision"] = {"outcome": outcome,
                                  "reasons": [{"code": code, "message": message}]}
        self.recorder.record(event, **fields)


def _configured(approvers: Iterable[str]) -> frozenset[str]:
    """Configured approver ids, each a non-empty string (a bare string is refused: it would
    configure each of its characters)."""
    if isinstance(approvers, str):
        raise ApprovalError("`approvers` must be a collection of ids, not one string")
    ids = []
    for item in approvers:
        if not isinstance(item, str) or not item.strip():
            raise ApprovalError(f"a configured approver must be a non-empty id, got `{item!r}`")
        ids.append(item.strip())
    return frozenset(ids)
