"""The policy engine protocol: what the Guard asks a policy engine, and what it gets back.

The Guard has already verified the token, checked the registry, matched the capability and
admitted the call in the store when it builds a :class:`PolicyRequest`; the engine answers with a
:class:`PolicyResult` (``allow``, ``deny`` or ``approval_required``, with reasons).

What an engine must never do: raise out of ``evaluate`` (any failure is a ``deny`` with code
``policy.error``), coerce an argument to the type a policy expects, or answer ``allow`` when it
could not evaluate every policy that applies. There is deliberately no "allow everything"
engine; :class:`StaticEngine` answers a fixed result and exists as a test double only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from agentic_iam.core.decision import Reason
from agentic_iam.core.identity import AgentSpec, ExecutionIdentity, ToolSpec

__all__ = [
    "REASON_CODES",
    "PolicyEngine",
    "PolicyOutcome",
    "PolicyRequest",
    "PolicyResult",
    "StaticEngine",
    "policy_error",
    "unverified_arguments",
]

PolicyOutcome = Literal["allow", "deny", "approval_required"]

#: The reason codes an engine uses, and when.
REASON_CODES: Mapping[str, str] = {
    "policy.permit": "allowed; policy_id names each determining permit",
    "policy.forbid": "denied by at least one forbid without @approval",
    "policy.approval": "denied only by @approval forbids: a human may lift it for this call",
    "policy.no_permit": "denied because no permit matched",
    "policy.error": "denied because the request or a policy could not be evaluated",
}


@dataclass(frozen=True)
class PolicyRequest:
    """One tool call, as the policy engine sees it."""

    identity: ExecutionIdentity
    """The verified token content. The Cedar principal is ``Execution::"<execution_id>"``,
    member of ``Agent::"<agent_id>"``."""
    agent: AgentSpec
    """The registry entry of the acting agent."""
    tool: ToolSpec
    """The registry entry of the tool. Resource ``Tool::"<name>"``, action
    ``Action::"<tool.action>"``."""
    arguments: Mapping[str, Any]
    """The call's arguments exactly as checked by the capability step. Never coerced: a value
    of the wrong type denies the call."""
    context: Mapping[str, Any]
    """Everything else the Guard knows: ``delegation``, ``session``, ``risk``, ``budget``,
    ``confidence`` (``None`` = absent), ``time``, ``provenance``, ``untrusted_args``,
    ``unverified_args``, ``secret_args``, ``recipients``, ``recipient_domains``. Sets may be
    Python sets or frozensets. See ``policies/README.md`` for the exact shape."""


@dataclass(frozen=True)
class PolicyResult:
    """The engine's answer."""

    outcome: PolicyOutcome
    """``allow``, ``deny`` or ``approval_required``."""
    reasons: tuple[Reason, ...]
    """Why, most important first; codes are listed in :data:`REASON_CODES`."""

    @property
    def allowed(self) -> bool:
        return self.outcome == "allow"

    @property
    def policy_ids(self) -> tuple[str, ...]:
        return tuple(r.policy_id for r in self.reasons if r.policy_id)


def policy_error(message: str) -> PolicyResult:
    """A ``deny`` with code ``policy.error``: the answer to anything that went wrong."""
    return PolicyResult("deny", (Reason("policy.error", message),))


@runtime_checkable
class PolicyEngine(Protocol):
    """Decides one tool call. Implementations: ``CedarEngine``, ``OpaEngine``."""

    def evaluate(self, request: PolicyRequest) -> PolicyResult:
        """Decide. Never raises: any failure is a ``deny`` with code ``policy.error``."""
        ...

    def close(self) -> None:
        """Release resources (HTTP clients, caches). Idempotent."""
        ...


@dataclass(frozen=True)
class StaticEngine:
    """A test double that answers the same result for every request.

    It exists for tests of the Guard and of adapters. Give it the result you need, e.g.
    ``StaticEngine(PolicyResult("deny", (Reason("policy.forbid", "no"),)))``; there is no
    default, so it cannot be wired in by accident as an "allow everything" engine.
    """

    result: PolicyResult
    """The answer to every request."""

    def evaluate(self, request: PolicyRequest) -> PolicyResult:
        return self.result

    def close(self) -> None:
        return None


def unverified_arguments(provenance: Mapping[str, str], *, tainted: bool) -> frozenset[str]:
    """Target arguments whose value is not traced to the request or a trusted output.

    ``untrusted`` always; ``unknown`` once the session has seen untrusted content. An unknown
    value in a tainted session may be the attacker's (an odd spelling, a value split or encoded,
    an id evicted from the index): not knowing where a value came from is not permission.
    """
    return frozenset(name for name, label in provenance.items()
                     if label == "untrusted" or (label == "unknown" and tainted))
