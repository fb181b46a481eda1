"""The four principal tiers: humans, workloads, agents (registry entries) and executions.

Humans and workloads live in an IdP; agents are persistent definitions in the agent registry;
an execution is one run, carried by a signed, short-lived token. These are plain values: nothing
here verifies, signs or decides. It must never grow behaviour that trusts a value it did not
receive from a verified token or a validated registry file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from agentic_iam.core.capabilities import CapabilitySet

__all__ = [
    "DIMENSIONS",
    "Actor",
    "AgentSpec",
    "AgentStatus",
    "Budget",
    "ExecutionIdentity",
    "Human",
    "OutputTrust",
    "Principal",
    "ToolSpec",
    "Workload",
]

AgentStatus = Literal["active", "suspended"]
OutputTrust = Literal["trusted", "untrusted"]

#: Budget dimensions, in the order they are shown. All are integers.
DIMENSIONS: tuple[str, ...] = ("tool_calls", "cost", "llm_tokens")


@dataclass(frozen=True)
class Human:
    """A person, as asserted by an IdP (or by the caller for local use)."""

    id: str
    """Subject identifier, e.g. ``alice@example.com``."""
    issuer: str = "local"
    """Who vouches for the id: an OIDC issuer URL, or ``local``."""
    scopes: frozenset[str] | None = None
    """Scopes the IdP granted this person (``None`` when the IdP token carries none). When set,
    only actions covered by a scope can be delegated (``refund:create`` is covered by the scope
    ``refund:create`` or ``refund:*``)."""

    @property
    def principal_type(self) -> Literal["human"]:
        return "human"


@dataclass(frozen=True)
class Workload:
    """A non-human caller (a job, a service) that may delegate to an agent."""

    id: str
    """Workload identifier, e.g. ``nightly-reconcile-job`` or a SPIFFE id."""
    issuer: str = "local"
    """Who vouches for the id."""
    scopes: frozenset[str] | None = None
    """Scopes bounding what the workload may delegate (``None`` = not bounded by scopes)."""

    @property
    def principal_type(self) -> Literal["workload"]:
        return "workload"


Principal = Human | Workload


@dataclass(frozen=True)
class Budget:
    """Limits of one grant. ``None`` means the dimension is not limited."""

    tool_calls: int | None = None
    """Number of tool calls."""
    cost: int | None = None
    """Cost in integer minor units (cents), from the tools' declared or argument-given cost."""
    llm_tokens: int | None = None
    """LLM tokens charged by adapters from model usage."""

    def __post_init__(self) -> None:
        for name in DIMENSIONS:
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 0):
                raise ValueError(f"budget `{name}` must be a non-negative integer, got {value!r}")

    def as_dict(self) -> dict[str, int | None]:
        return {name: getattr(self, name) for name in DIMENSIONS}

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> Budget:
        unknown = set(data) - set(DIMENSIONS)
        if unknown:
            raise ValueError(f"unknown budget dimension `{sorted(unknown)[0]}`")
        values: dict[str, int | None] = {}
        for name in DIMENSIONS:
            value = data.get(name)
            if value is not None and type(value) is not int:
                raise ValueError(f"budget `{name}` must be an integer, got {value!r}")
            values[name] = value
        return cls(**values)

    def within(self, other: Budget) -> str | None:
        """The first dimension where ``self`` exceeds ``other`` (``None`` when it does not)."""
        for name in DIMENSIONS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None and (mine is None or mine > theirs):
                return name
        return None


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the registry knows it: what it does and how dangerous it is."""

    name: str
    """The tool's name as the framework calls it."""
    action: str = ""
    """The action it performs (``refund:create``); defaults to the tool name."""
    description: str = ""
    """What the tool does, for humans."""
    risk: int = 0
    """Risk points each call adds to the execution's accumulated risk."""
    output_trust: OutputTrust = "trusted"
    """``untrusted`` for output written by others (tickets, e-mails, web pages): it taints."""
    consequential: bool = False
    """True when the tool changes state or sends data out."""
    cost: int | None = None
    """Fixed cost per call in integer minor units, if any."""
    cost_argument: str | None = None
    """Name of an integer argument that carries the call's cost (e.g. ``amount``)."""
    target_arguments: frozenset[str] = frozenset()
    """Arguments that name a target (recipient, account, URL...) and need provenance."""
    recipient_arguments: frozenset[str] | None = None
    """Arguments holding e-mail recipient lists, parsed into ``context.recipients`` and
    ``context.recipient_domains``; ``None`` = the usual names (``to``, ``cc``, ``bcc``,
    ``recipient``, ``recipients``, ``reply_to``)."""
    arguments: Mapping[str, str] = field(default_factory=dict)
    """Declared argument types (``Long``, ``String``, ``Bool``, ``Decimal``; ``?`` = optional)
    for the policy schema."""
    screening: Mapping[str, object] = field(default_factory=dict)
    """Firewall settings for this tool's output (see ``agentic_iam.core.firewall.ScreenConfig``)."""

    def __post_init__(self) -> None:
        if not self.action:
            object.__setattr__(self, "action", self.name)


@dataclass(frozen=True)
class AgentSpec:
    """A persistent agent definition from the registry."""

    id: str
    """Stable identifier, e.g. ``support-agent``."""
    name: str
    """Display name."""
    owner: str
    """Accountable human or team."""
    description: str = ""
    """What the agent is for."""
    trust_level: int = 1
    """0 (untrusted) .. 3 (highly trusted); policies may read it."""
    policy_set: str = "baseline"
    """Name of the policy set under ``policies/`` that governs the agent."""
    tools: Mapping[str, ToolSpec] = field(default_factory=dict)
    """The tools the agent may have, by tool name."""
    memory_scopes: frozenset[str] = frozenset()
    """Memory/document scopes the agent may read."""
    may_delegate_to: frozenset[str] = frozenset()
    """Agent ids this agent may sub-delegate to."""
    max_ttl_s: int = 3600
    """Longest execution window that may be delegated to the agent, in seconds."""
    max_budget: Budget = field(default_factory=Budget)
    """Largest budget that may be delegated to the agent."""
    max_risk: int = 100
    """Largest risk envelope that may be delegated to the agent."""
    status: AgentStatus = "active"
    """``suspended`` agents cannot receive delegations and their executions are denied."""

    @property
    def actions(self) -> frozenset[str]:
        return frozenset(tool.action for tool in self.tools.values())

    def tools_for_action(self, action: str) -> tuple[ToolSpec, ...]:
        return tuple(tool for tool in self.tools.values() if tool.action == action)


@dataclass(frozen=True)
class Actor:
    """One hop of the RFC 8693 ``act`` chain: an agent acting in one execution."""

    agent_id: str
    """The acting agent."""
    execution_id: str
    """The execution in which it acts."""


@dataclass(frozen=True)
class ExecutionIdentity:
    """One run: the verified content of an execution token."""

    execution_id: str
    """``sub``: the execution's id (``exec_…``)."""
    jti: str
    """The token id; revocation and replay are keyed by ``(issuer, jti)``."""
    issuer: str
    """``iss``: the broker that minted it."""
    audience: str
    """``aud``: the one audience it is valid for."""
    issued_at: int
    """``iat`` (unix seconds)."""
    not_before: int
    """``nbf`` (unix seconds)."""
    expires_at: int
    """``exp`` (unix seconds)."""
    agent_id: str
    """The agent this execution runs as."""
    agent_trust: int
    """The agent's trust level at minting time."""
    delegator_type: Literal["human", "workload"]
    """Who delegated: a human or a workload."""
    delegator_id: str
    """The delegator's subject id."""
    delegator_issuer: str
    """Who vouched for the delegator."""
    actors: tuple[Actor, ...]
    """The ``act`` chain, current actor first, prior actors after it."""
    purpose: str
    """What the run is for, as consented."""
    capabilities: CapabilitySet
    """What the run may do."""
    budget: Budget
    """The grant's budget."""
    risk_envelope: int
    """The largest accumulated risk the run may reach."""
    depth: int
    """Remaining sub-delegation depth (0: cannot sub-delegate)."""
    ancestors: tuple[str, ...]
    """``jti`` of every ancestor grant, root first."""
    ancestor_budgets: tuple[Budget, ...] = ()
    """The budget of each ancestor grant (aligned with ``ancestors``): a child's spend is
    charged to every ancestor against that ancestor's own limits."""
    sub_purpose: str | None = None
    """For a sub-delegation: the narrower part of the task the parent agent handed on, in its
    own words. ``purpose`` stays what the delegator consented to; this never replaces it."""
    memory_scopes: frozenset[str] = frozenset()
    """The memory/document scopes this run may read (token claim ``mem``): the agent's
    registry scopes or fewer at delegation, never more than the parent's at sub-delegation.
    Empty: the run reads no memory."""

    @property
    def key(self) -> str:
        """The grant key ``iss|jti`` used by stores for budgets, sessions and revocation."""
        return f"{self.issuer}|{self.jti}"

    @property
    def ancestor_keys(self) -> tuple[str, ...]:
        return tuple(f"{self.issuer}|{jti}" for jti in self.ancestors)

    @property
    def session_key(self) -> str:
        """The key of the task's shared session: the root grant's ``iss|jti``.

        Every execution of one delegation tree shares one session (taint, labels, value
        provenance, risk, call history): a sub-delegation narrows what may be done, it never
        starts the task over with a clean record.
        """
        return f"{self.issuer}|{self.ancestors[0]}" if self.ancestors else self.key

    @property
    def delegator(self) -> str:
        return self.delegator_id

    def chain(self) -> list[dict[str, str | None]]:
        """The delegation chain for provenance: delegator first, then each agent hop."""
        hops: list[dict[str, str | None]] = [
            {"principal_type": self.delegator_type, "id": self.delegator_id, "execution_id": None}
        ]
        for actor in reversed(self.actors):
            hops.append(
                {"principal_type": "agent", "id": actor.agent_id,
                 "execution_id": actor.execution_id}
            )
        return hops
