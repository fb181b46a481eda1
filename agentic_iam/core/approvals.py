"""Approval requests for calls a policy lets a human lift (``@approval`` forbids).

An ``approval_required`` decision yields an :class:`ApprovalRequest` bound to the execution id and
a digest of the tool and its exact arguments. An approval lets *that exact call* through *once*
(the store consumes it atomically); a different amount or recipient needs its own approval.
Approvers are tiny: a callback, a console prompt, or a queue another process resolves
(``aiam approvals approve ID``). Every step is recorded. Nothing here may let a call through
without a consumed, approved record in the store.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from agentic_iam.core.provenance import canonical_json as _canonical_bytes
from agentic_iam.core.provenance import json_safe
from agentic_iam.errors import ApprovalError, AuditError

if TYPE_CHECKING:
    from agentic_iam.core.provenance import EventType, Recorder
    from agentic_iam.core.store.base import Store

__all__ = [
    "ApprovalManager",
    "ApprovalRequest",
    "Approver",
    "CallbackApprover",
    "ConsoleApprover",
    "QueuedApprover",
    "call_binding",
    "canonical_json",
]


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

    def payload(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id, "agent_id": self.agent_id,
            "delegator": self.delegator, "tool": self.tool, "action": self.action,
            "arguments": json.loads(canonical_json(dict(self.arguments))),
            "reasons": list(self.reasons), "policy_ids": list(self.policy_ids),
        }

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.arguments.items()))
        return (f"{self.agent_id} (for {self.delegator}) wants {self.tool}({args}): "
                + "; ".join(self.reasons))


class Approver(Protocol):
    """Decides an approval request now (True/False) or leaves it pending (None)."""

    def decide(self, request: ApprovalRequest) -> bool | None: ...


@dataclass(frozen=True)
class CallbackApprover:
    """Calls a function with the request; its bool is the answer (None leaves it pending)."""

    callback: Callable[[ApprovalRequest], bool | None]
    """The function that decides."""
    name: str = "callback"
    """Recorded as the approver's identity."""

    def decide(self, request: ApprovalRequest) -> bool | None:
        return self.callback(request)


@dataclass(frozen=True)
class ConsoleApprover:
    """Asks on the console (for notebooks and the CLI); anything but y/yes denies."""

    input_fn: Callable[[str], str] = input
    """Reads the answer (replaceable for tests)."""
    name: str = "console"
    """Recorded as the approver's identity."""

    def decide(self, request: ApprovalRequest) -> bool | None:
        answer = self.input_fn(f"Approve? {request.describe()} [y/N] ")
        return answer.strip().lower() in ("y", "yes")


@dataclass(frozen=True)
class QueuedApprover:
    """Leaves every request pending in the store; another process resolves it later."""

    name: str = "queue"
    """Recorded as the approver's identity."""

    def decide(self, request: ApprovalRequest) -> bool | None:
        return None


class ApprovalManager:
    """Creates, resolves and consumes approval requests in a store, recording each step."""

    def __init__(self, store: Store, approver: Approver | None = None, *, ttl_s: int = 900,
                 recorder: Recorder | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.approver = approver or QueuedApprover()
        self.ttl_s = ttl_s
        self.recorder = recorder
        self._clock = clock

    def request(self, *, binding: str, execution_id: str, agent_id: str, delegator: str,
                tool: str, action: str, arguments: Mapping[str, Any], reasons: tuple[str, ...],
                policy_ids: tuple[str, ...], audit: Mapping[str, Any] | None = None,
                ) -> tuple[ApprovalRequest, bool | None]:
        """Create a request and ask the approver. Returns the request and the answer given
        now (``None`` when it stays pending)."""
        now = int(self._clock())
        request = ApprovalRequest(
            request_id="apr_" + secrets.token_urlsafe(10), binding=binding,
            execution_id=execution_id, agent_id=agent_id, delegator=delegator, tool=tool,
            action=action, arguments=dict(arguments), reasons=reasons, policy_ids=policy_ids,
            created_at=now, expires_at=now + self.ttl_s,
        )
        self.store.put_approval(request.request_id, binding, request.payload(), ttl_s=self.ttl_s)
        self._record("approval.requested", request, audit, None)
        answer = self.approver.decide(request)
        if answer is not None:
            name = getattr(self.approver, "name", type(self.approver).__name__)
            self.resolve(request.request_id, approved=bool(answer), approver=str(name),
                         audit=audit)
        return request, answer

    def resolve(self, request_id: str, *, approved: bool, approver: str,
                audit: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
        record = self.store.resolve_approval(request_id, approved=approved, approver=approver)
        if self.recorder is not None:
            payload = record.get("payload") or {}
            self.recorder.record(
                "approval.granted" if approved else "approval.denied",
                **{**dict(audit or {}),
                   "execution_id": payload.get("execution_id"),
                   "agent_id": payload.get("agent_id"), "tool": payload.get("tool"),
                   "action": payload.get("action"),
                   "extra": {"approval_id": request_id, "approver": approver}},
            )
        return record

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

    def _record(self, event: EventType, request: ApprovalRequest, audit: Mapping[str, Any] | None,
                approver: str | None) -> None:
        if self.recorder is None:
            return
        extra = {"approval_id": request.request_id}
        if approver:
            extra["approver"] = approver
        self.recorder.record(event, **{**dict(audit or {}), "extra": extra})
