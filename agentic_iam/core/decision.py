"""Decisions, reasons and tool calls: the values the Guard and the adapters exchange.

A :class:`Decision` is what ``Guard.authorize`` returns; reasons carry a stable code (for
programs), the policy id when a policy decided, and a message for humans. Messages meant for the
model (``Decision.model_message``) say what was refused and why without policy internals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Decision", "Outcome", "Reason", "ReasoningContext", "ToolCall"]

Outcome = Literal["allow", "deny", "approval_required"]


@dataclass(frozen=True)
class Reason:
    """Why a decision came out as it did."""

    code: str
    """Stable code, e.g. ``capability.constraint``, ``budget.exhausted``, ``policy.forbid``."""
    message: str
    """Human explanation (no secrets, no token)."""
    policy_id: str | None = None
    """The ``@id`` of the policy that decided, when a policy decided."""

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "policy_id": self.policy_id}


@dataclass(frozen=True)
class ReasoningContext:
    """What an adapter found about why the model asked for the call."""

    message: str | None = None
    """The model's message text (and reasoning summary) that requested the call."""
    model: str | None = None
    """Model name."""
    run_id: str | None = None
    """Framework run id."""
    parent_run_id: str | None = None
    """Parent run id."""
    response_id: str | None = None
    """Provider response id."""
    trace_id: str | None = None
    """Framework trace id, for linking."""
    span_id: str | None = None
    """Framework span id, for linking."""


@dataclass(frozen=True)
class ToolCall:
    """One tool call as an adapter saw it."""

    name: str
    """The tool's name."""
    arguments: Mapping[str, Any]
    """The arguments exactly as the model gave them."""
    call_id: str | None = None
    """The framework's call id (one is generated when absent)."""
    reasoning: ReasoningContext = field(default_factory=ReasoningContext)
    """Why the model asked for it."""
    framework: str | None = None
    """``langchain``, ``llama_index``, ``openai_agents`` or ``None`` for direct use."""
    confidence: int | None = None
    """Optional 0..100 confidence an adapter or caller attaches; policies may read it."""


@dataclass(frozen=True)
class Decision:
    """The Guard's answer for one call."""

    outcome: Outcome
    """``allow``, ``deny`` or ``approval_required``."""
    reasons: tuple[Reason, ...]
    """Why; the first reason is the main one."""
    call_id: str
    """The call this decision is about."""
    tool: str
    """The tool name."""
    action: str | None = None
    """The tool's action, when known."""
    execution_id: str | None = None
    """The execution, when the token verified."""
    approval_id: str | None = None
    """For ``approval_required``: the approval request to resolve."""
    reservation_id: str | None = field(default=None, repr=False)
    """Internal: the budget reservation to settle on completion."""
    remaining: Mapping[str, int | None] = field(default_factory=dict)
    """Budget left on the calling grant after this call's reservation."""
    arguments: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """For ``allow``: a private copy of the checked arguments. Run the tool with these, never
    with the model's original object, which may change after the check."""
    ticket: str | None = field(default=None, repr=False, compare=False)
    """Internal: for ``allow``, the Guard-issued handle of the call's pending state. ``screen``
    and ``complete`` find the call by this handle, never by the model's or framework's call id,
    so a second call reusing a call id cannot take over the first call's state."""

    @property
    def allowed(self) -> bool:
        return self.outcome == "allow"

    @property
    def policy_ids(self) -> tuple[str, ...]:
        return tuple(r.policy_id for r in self.reasons if r.policy_id)

    def summary(self) -> str:
        main = self.reasons[0] if self.reasons else Reason("unknown", "no reason given")
        return f"{self.outcome} `{self.tool}`: {main.code}: {main.message}"

    def model_message(self) -> str:
        """A message the model can act on: what was refused and why, no policy internals."""
        main = self.reasons[0] if self.reasons else Reason("unknown", "no reason given")
        if self.outcome == "approval_required":
            return (f"The call to `{self.tool}` needs a human's approval and was not run. "
                    f"Reason: {main.message}")
        return (f"The call to `{self.tool}` was refused by the access layer and was not run. "
                f"Reason: {main.message}. Do not retry the same call; choose a permitted action "
                f"or tell the user what you could not do.")

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "reasons": [r.to_json() for r in self.reasons],
            "policy_ids": list(self.policy_ids),
        }
