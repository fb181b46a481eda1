"""The Guard: the one object adapters talk to, deciding every tool call.

``authorize`` runs the pipeline of ARCHITECTURE §2 for one call — verify the token, check the
registry, match the capability (typed, no coercion), admit the call in the store (revocation,
rate limits, budget reservation on the grant and every ancestor, in one atomic step), evaluate
the policy with the delegation, session, risk, budget and provenance context, decide, and make
the decision event durable — and returns a :class:`Decision`. ``enforce`` raises
:class:`AuthorizationDenied` instead. ``screen`` runs the firewall over the tool's output and
updates taint, risk and argument provenance; ``complete`` settles the budget and records the
result.

It must never let a call run without a decision, and never turn an error into an allow: any
exception in any step is a deny with a reason, and a reservation made before the failure is
released.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from agentic_iam.core.approvals import (
    ApprovalManager,
    Approver,
    ApproverLike,
    call_binding,
    canonical_json,
)
from agentic_iam.core.decision import Decision, Reason, ToolCall
from agentic_iam.core.firewall import (
    DEFAULT_TARGET_ARGUMENTS,
    Firewall,
    ScreenConfig,
    ScreenResult,
    ValueIndex,
)
from agentic_iam.core.identity import AgentSpec, ExecutionIdentity, ToolSpec
from agentic_iam.core.mediation import Mediated, Mediator
from agentic_iam.core.memory import MemoryFiltered, filter_memory
from agentic_iam.core.policy.base import PolicyEngine, PolicyRequest, unverified_arguments
from agentic_iam.core.recipients import (
    INVALID_DOMAIN,
    parse_recipients,
    recipient_argument_names,
    recipients_context,
)
from agentic_iam.core.registry import AgentRegistry
from agentic_iam.core.store.base import (
    AdmitRequest,
    AdmitResult,
    Charge,
    FinishRequest,
    RateLimit,
    Store,
    better_label,
)
from agentic_iam.core.tokens import ExecutionToken, TokenVerifier
from agentic_iam.errors import (
    AuthorizationDenied,
    ExpiredTokenError,
    InvalidSignatureError,
    RevokedTokenError,
    StoreError,
    StoreStateLostError,
    StoreUnavailableError,
    TokenError,
)

if TYPE_CHECKING:
    from agentic_iam.core.broker import DelegationBroker
    from agentic_iam.core.provenance import Recorder

__all__ = ["Guard", "GuardConfig", "Screened"]

log = logging.getLogger("agentic_iam.guard")

#: How many used call ids the Guard remembers (per process) to refuse their reuse.
_MAX_USED_CALL_IDS = 200_000
#: How many ended executions the Guard remembers, to end each one once.
_MAX_ENDED = 50_000
#: Attempts to record a call's spend before its execution is suspended.
_SETTLE_ATTEMPTS = 3
#: Sessions whose screened observations may wait in this process for their call's
#: ``complete``; past it, ``screen`` writes the oldest session's at once.
_MAX_UNFLUSHED_SESSIONS = 4096
#: Observed value digests one session may hold back before ``screen`` writes them at once.
_MAX_UNFLUSHED_VALUES = 4096
#: How long a decision waits for its session's observations that are being written.
_WRITE_WAIT_S = 30.0

TokenLike = str | ExecutionToken | ExecutionIdentity
T = TypeVar("T")
R = TypeVar("R")
_TOKEN_CODES: dict[type[TokenError], str] = {
    ExpiredTokenError: "token.expired",
    RevokedTokenError: "token.revoked",
    InvalidSignatureError: "token.signature",
}


@dataclass(frozen=True)
class GuardConfig:
    """Limits and behaviour of a Guard."""

    execution_rate_per_s: float = 10.0
    """Sustained tool calls per second per execution (GCRA)."""
    execution_burst: int = 20
    """Burst size per execution."""
    agent_rate_per_s: float = 200.0
    """Sustained tool calls per second per agent, across executions."""
    agent_burst: int = 400
    """Burst size per agent."""
    reservation_ttl_s: float = 300.0
    """An unsettled budget reservation is released after this long."""
    session_events: int = 256
    """Bounded per-session history kept in the store."""
    approval_ttl_s: int = 900
    """How long an approval request stays answerable."""
    approvers: frozenset[str] = frozenset()
    """Ids of the configured approvers who may answer approval requests by name
    (:meth:`Guard.resolve_approval`, the adapters' resume paths). A :class:`Human` verified by
    an IdP needs no entry; the requesting agent, its execution and its delegation chain are
    refused whatever is configured."""
    framework: str | None = None
    """Default framework name recorded on events."""


@dataclass(frozen=True)
class Screened:
    """A screened tool output: what the model may see, and what the firewall found."""

    text: str
    """The text to hand to the model."""
    result: ScreenResult
    """The firewall's findings."""


@dataclass
class _Pending:
    """What ``complete`` needs about an allowed call (kept by the Guard, keyed by its ticket)."""

    identity: ExecutionIdentity
    agent: AgentSpec
    tool: ToolSpec
    call: ToolCall
    reservation_id: str
    amounts: dict[str, int]
    started: float
    screened: ScreenResult | None = None
    audit: dict[str, Any] = field(default_factory=dict)
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Observed:
    """What screening saw in a session's tool outputs that the store does not hold yet."""

    risk: int = 0
    labels: set[str] = field(default_factory=set)
    tainted_by: list[str] = field(default_factory=list)
    """Taint sources, oldest first, each once."""
    values: dict[str, str] = field(default_factory=dict)
    """Value digest → best label."""

    def add(self, risk: int, labels: Iterable[str], source: str | None,
            values: Mapping[str, str]) -> None:
        self.risk += risk
        self.labels.update(labels)
        if source is not None and source not in self.tainted_by:
            self.tainted_by.append(source)
        for digest, label in values.items():
            self.values[digest] = better_label(self.values.get(digest), label)

    def merge_older(self, older: _Observed) -> None:
        """Put back ``older`` observations (a write that failed) before these."""
        self.risk += older.risk
        self.labels |= older.labels
        self.tainted_by = [*older.tainted_by,
                           *(s for s in self.tainted_by if s not in older.tainted_by)]
        for digest, label in older.values.items():
            self.values[digest] = better_label(self.values.get(digest), label)

    def observes(self) -> bool:
        return bool(self.risk or self.labels or self.tainted_by or self.values)

    def request(self, session: str, **rest: Any) -> FinishRequest:
        return FinishRequest(session, risk=self.risk, labels=tuple(sorted(self.labels)),
                             tainted_by=tuple(self.tainted_by), values=dict(self.values),
                             **rest)


class Guard:
    """Decides every tool call of every execution. Thread-safe."""

    def __init__(
        self,
        registry: AgentRegistry,
        verifier: TokenVerifier,
        policy: PolicyEngine,
        *,
        store: Store | None = None,
        firewall: Firewall | None = None,
        recorder: Recorder | None = None,
        approver: Approver | None = None,
        config: GuardConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if store is None:
            from agentic_iam.core.store.memory import MemoryStore

            store = MemoryStore()
        self.registry = registry
        self.verifier = verifier
        self.policy = policy
        self.store = store
        self.firewall = firewall or Firewall()
        self.recorder = recorder
        self.config = config or GuardConfig()
        self.approvals = ApprovalManager(store, approver, ttl_s=self.config.approval_ttl_s,
                                         recorder=recorder, clock=clock)
        self._clock = clock
        # Allowed calls waiting for screen/complete, keyed by a ticket the Guard issues: a key the
        # model or framework chose (a call id) could be reused to take over another call's state.
        self._pending: dict[str, _Pending] = {}
        # (execution key, call id) of every call id that was allowed (or is being decided): a
        # call id is single-use per execution. Bounded; the oldest are forgotten first.
        self._used_calls: OrderedDict[tuple[str, str], None] = OrderedDict()
        # Executions whose spend could not be recorded: they may not make another call.
        self._suspended: dict[str, str] = {}
        self._lock = threading.Lock()
        self._screen_configs: dict[tuple[str, str], ScreenConfig] = {}
        self._seeded: OrderedDict[str, None] = OrderedDict()
        # Screened observations not yet in the store, per session (see ``screen``). Bounded:
        # past _MAX_UNFLUSHED_SESSIONS the oldest session's are written at once.
        self._observed: OrderedDict[str, _Observed] = OrderedDict()
        # Sessions whose observations are being written right now (count per session), and
        # the condition a decision of such a session waits on until they are in the store.
        self._writing: dict[str, int] = {}
        self._written = threading.Condition(self._lock)
        # Executions this Guard has ended (bounded), so that ending twice records once.
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._mediator = Mediator(self)
        #: Counters for tests and operators: decisions by outcome.
        self.stats: dict[str, int] = {"allow": 0, "deny": 0, "approval_required": 0}

    @classmethod
    def from_broker(cls, broker: DelegationBroker, policy: PolicyEngine, **kwargs: Any) -> Guard:
        """A Guard sharing the broker's registry, verifier, store and recorder."""
        kwargs.setdefault("store", broker.store)
        kwargs.setdefault("recorder", broker.recorder)
        return cls(broker.registry, broker.verifier, policy, **kwargs)

    # --- authorize ----------------------------------------------------------------------

    def authorize(self, token: TokenLike, call: ToolCall, *,
                  agent_id: str | None = None) -> Decision:
        """Decide one call. Never raises: every failure is a deny with a reason.

        ``agent_id``: the registry agent the calling enforcement point guards; a token of
        another agent is refused (``identity.agent_mismatch``), so a sub-agent never runs under
        its parent's grant.
        """
        call_id = call.call_id or "call_" + secrets.token_hex(8)
        if call.call_id != call_id:
            call = replace(call, call_id=call_id)
        audit: dict[str, Any] = {"tool": call.name, "call_id": call_id}
        reservation: str | None = None
        claimed: list[tuple[str, str]] = []
        try:
            decision, reservation = self._authorize(token, call, audit, claimed, agent_id)
        except Exception as exc:  # fail closed, whatever failed
            log.warning("guard step failed for `%s`: %s", call.name, type(exc).__name__)
            if reservation is not None:
                self._release_quietly(reservation)
            decision = self._deny(call, "guard.error",
                                  f"the access check failed ({type(exc).__name__}); failing closed",
                                  audit)
            reservation = None
        try:
            self._record_decision(decision, call, audit)
        except Exception as exc:  # the decision must be durable before the tool runs
            # The decision must be durable before the tool runs; if it cannot be, nothing runs.
            if decision.reservation_id is not None:
                self._release_quietly(decision.reservation_id)
            if decision.ticket is not None:
                with self._lock:
                    self._pending.pop(decision.ticket, None)
            decision = Decision("deny", (Reason("audit.failed",
                                                f"the audit record could not be written "
                                                f"({type(exc).__name__})"),),
                                call_id, call.name, decision.action, decision.execution_id)
        with self._lock:
            if not decision.allowed:
                # Only an allowed call uses up its id: a refused or paused call may be retried.
                for used in claimed:
                    self._used_calls.pop(used, None)
            self.stats[decision.outcome] += 1
        return decision

    def enforce(self, token: TokenLike, call: ToolCall) -> Decision:
        """Like :meth:`authorize`, but raise :class:`AuthorizationDenied` unless allowed."""
        decision = self.authorize(token, call)
        if not decision.allowed:
            raise AuthorizationDenied(decision)
        return decision

    def _identity(self, token: TokenLike) -> ExecutionIdentity:
        if isinstance(token, ExecutionIdentity):
            # Already verified in this process (documented): only the clock is re-checked.
            if token.expires_at <= self._clock() - self.verifier.leeway_s:
                raise ExpiredTokenError("token has expired")
            return token
        raw = token.token if isinstance(token, ExecutionToken) else token
        # Revocation is checked atomically in the store's admit step (one round trip).
        return self.verifier.verify(raw, check_revocation=False)

    def _authorize(self, token: TokenLike, call: ToolCall, audit: dict[str, Any],
                   claimed: list[tuple[str, str]],
                   agent_id: str | None = None) -> tuple[Decision, str | None]:
        # 1. token
        try:
            identity = self._identity(token)
        except TokenError as exc:
            code = next((c for t, c in _TOKEN_CODES.items() if isinstance(exc, t)),
                        "token.invalid")
            return self._deny(call, code, str(exc), audit), None
        self._identity_audit(identity, audit)
        if agent_id is not None and identity.agent_id != agent_id:
            return self._deny(call, "identity.agent_mismatch",
                              f"this run's execution identity belongs to agent "
                              f"`{identity.agent_id}`, not to `{agent_id}`; a sub-agent needs "
                              f"its own delegated identity", audit, identity), None
        suspended = self._suspension(identity)
        if suspended is not None:
            return self._deny(call, "execution.suspended", suspended, audit, identity), None
        if not self._claim_call_id(identity, call.call_id or "", claimed):
            return self._deny(call, "call.reused",
                              f"call id `{call.call_id}` was already used in this execution; "
                              f"every tool call needs a new id", audit, identity), None
        # 2. registry
        agent = self.registry.get(identity.agent_id)
        if agent is None:
            return self._deny(call, "registry.unknown_agent",
                              f"agent `{identity.agent_id}` is not in the registry", audit,
                              identity), None
        if agent.status != "active":
            return self._deny(call, "registry.agent_suspended",
                              f"agent `{agent.id}` is suspended", audit, identity), None
        tool = agent.tools.get(call.name)
        if tool is None:
            return self._deny(call, "registry.tool_unregistered",
                              f"tool `{call.name}` is not registered for agent `{agent.id}`",
                              audit, identity), None
        audit["action"] = tool.action
        checked = self._checked_arguments(call.arguments)
        if isinstance(checked, str):
            return self._deny(call, "arguments.invalid", checked, audit, identity, tool), None
        arguments, canonical = checked
        audit["arguments_digest"] = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        audit["arguments"] = arguments
        # 3. capability
        match = identity.capabilities.check(tool.action, arguments)
        if not match.ok:
            return self._deny(call, match.code, match.message, audit, identity, tool), None
        # 4. limits: revocation, rate limits, budget reservation (one atomic store step)
        amounts = self._amounts(tool, arguments)
        if isinstance(amounts, str):
            return self._deny(call, "arguments.cost", amounts, audit, identity, tool), None
        seeds = self._request_seeds(identity)
        reservation_id = "res_" + secrets.token_hex(10)
        targets = self._target_digests(tool, arguments)
        try:
            # What earlier outputs of this session showed must be in the store before it
            # decides (a screened call whose complete has not run yet: a by-hand caller).
            if self._observed or self._writing:
                self._flush(identity.session_key, wait=True)
            admitted = self.store.admit(self._admit_request(
                identity, tool, amounts, reservation_id,
                tuple(dict.fromkeys(d for ds in targets.values() for d in ds if d)), seeds))
        except StoreStateLostError as exc:
            return self._deny(call, "store.state_lost", str(exc), audit, identity, tool), None
        except StoreError as exc:
            return self._deny(call, "store.unavailable", str(exc), audit, identity, tool), None
        if seeds and admitted.outcome == "admitted":
            self._seeded_now(identity)
        denial = self._admission_denial(admitted, identity, tool)
        if denial is not None:
            if admitted.outcome == "admitted":
                self.store.release(reservation_id)
            self._session_audit(admitted, identity, audit)
            return self._deny(call, denial[0], denial[1], audit, identity, tool), None
        self._session_audit(admitted, identity, audit, after_call=tool.risk)
        # 5. policy
        try:
            provenance = {name: _least_trusted(admitted.value_labels, digests)
                          for name, digests in targets.items()}
            result = self.policy.evaluate(PolicyRequest(
                identity=identity, agent=agent, tool=tool, arguments=arguments,
                context=self._context(identity, tool, call, arguments, admitted,
                                      provenance),
            ))
        except Exception:
            self.store.release(reservation_id)
            raise
        # 6. decision
        if result.outcome == "allow":
            decision = self._allow(call, identity, tool, arguments, reservation_id, admitted,
                                   result.reasons, audit, agent, amounts)
            return decision, reservation_id
        self.store.release(reservation_id)
        if result.outcome == "approval_required":
            return self._approval(call, identity, agent, tool, arguments, result.reasons,
                                  audit, amounts), None
        return Decision("deny", result.reasons or (Reason("policy.forbid", "denied by policy"),),
                        call.call_id or "", call.name, tool.action, identity.execution_id), None

    def _approval(self, call: ToolCall, identity: ExecutionIdentity, agent: AgentSpec,
                  tool: ToolSpec, arguments: Mapping[str, Any], reasons: tuple[Reason, ...],
                  audit: dict[str, Any], amounts: dict[str, int]) -> Decision:
        binding = call_binding(identity.execution_id, call.name, arguments)
        request, answer = None, None
        if not self.approvals.consume(binding):
            # A framework that re-runs a paused call (LangGraph replays the node on resume)
            # asks again for the same exact call: answer with the request already pending.
            pending = self.approvals.pending_for(binding)
            if pending is not None:
                return Decision("approval_required", reasons, call.call_id or "", call.name,
                                tool.action, identity.execution_id, approval_id=pending)
            request, answer = self.approvals.request(
                binding=binding, execution_id=identity.execution_id, agent_id=agent.id,
                delegator=identity.delegator_id, tool=call.name, action=tool.action,
                arguments=arguments, reasons=tuple(r.message for r in reasons),
                policy_ids=tuple(r.policy_id for r in reasons if r.policy_id),
                audit=self._audit_base(audit),
            )
            if answer is not True or not self.approvals.consume(binding):
                outcome: Literal["deny", "approval_required"] = (
                    "deny" if answer is False else "approval_required")
                why = reasons if outcome == "approval_required" else (
                    Reason("approval.denied", "a human denied this call"), *reasons)
                return Decision(outcome, why, call.call_id or "", call.name, tool.action,
                                identity.execution_id, approval_id=request.request_id)
        # An approved, now consumed, approval lifts the approval policies for this exact call.
        # The budget and limits still apply: admit again for this call.
        reservation_id = "res_" + secrets.token_hex(10)
        admitted = self.store.admit(self._admit_request(identity, tool, amounts, reservation_id))
        denial = self._admission_denial(admitted, identity, tool)
        if denial is not None:
            if admitted.outcome == "admitted":
                self.store.release(reservation_id)
            return self._deny(call, denial[0], denial[1], audit, identity, tool)
        granted = (Reason("approval.granted", "a human approved this exact call",
                          None), *reasons)
        return self._allow(call, identity, tool, arguments, reservation_id, admitted, granted,
                           audit, agent, amounts,
                           approval_id=request.request_id if request else None)

    def _allow(self, call: ToolCall, identity: ExecutionIdentity, tool: ToolSpec,
               arguments: Mapping[str, Any], reservation_id: str, admitted: AdmitResult,
               reasons: tuple[Reason, ...], audit: dict[str, Any], agent: AgentSpec,
               amounts: dict[str, int], approval_id: str | None = None) -> Decision:
        call_id = call.call_id or ""
        checked = copy.deepcopy(dict(arguments))
        ticket = secrets.token_urlsafe(18)
        with self._lock:
            self._pending[ticket] = _Pending(
                identity, agent, tool, call, reservation_id, amounts, self._clock(),
                audit=self._audit_base(audit), arguments=copy.deepcopy(checked))
        return Decision("allow", reasons or (Reason("policy.permit", "allowed"),), call_id,
                        call.name, tool.action, identity.execution_id,
                        approval_id=approval_id, reservation_id=reservation_id,
                        remaining=dict(admitted.remaining), arguments=checked, ticket=ticket)

    def _claim_call_id(self, identity: ExecutionIdentity, call_id: str,
                       claimed: list[tuple[str, str]]) -> bool:
        """Reserve ``call_id`` for this execution, or False when it was used already.

        Checked and claimed under one lock so that two concurrent calls with one id cannot both
        pass; ``authorize`` gives the claim back unless the call is allowed.
        """
        key = (identity.key, call_id)
        with self._lock:
            if key in self._used_calls:
                return False
            self._used_calls[key] = None
            while len(self._used_calls) > _MAX_USED_CALL_IDS:
                self._used_calls.popitem(last=False)
        claimed.append(key)
        return True

    def _suspension(self, identity: ExecutionIdentity) -> str | None:
        if not self._suspended:
            return None
        with self._lock:
            for key in (identity.key, *identity.ancestor_keys):
                why = self._suspended.get(key)
                if why is not None:
                    return why
        return None

    # --- pieces of authorize ------------------------------------------------------------

    @staticmethod
    def _checked_arguments(arguments: object) -> tuple[dict[str, Any], str] | str:
        """The arguments as a plain dict with their canonical JSON, or why they are unusable."""
        if not isinstance(arguments, Mapping):
            return f"arguments must be an object, got {type(arguments).__name__}"
        out: dict[str, Any] = {}
        for key, value in arguments.items():
            if type(key) is not str:
                return "argument names must be strings"
            out[key] = value
        try:
            canonical = canonical_json(out)
        except (TypeError, ValueError) as exc:
            return f"arguments are not plain JSON values: {exc}"
        return out, canonical

    @staticmethod
    def _amounts(tool: ToolSpec, arguments: Mapping[str, Any]) -> dict[str, int] | str:
        cost = tool.cost or 0
        if tool.cost_argument is not None:
            value = arguments.get(tool.cost_argument)
            if type(value) is not int or value < 0:
                return (f"argument `{tool.cost_argument}` carries the call's cost and must be a "
                        f"non-negative integer")
            cost += value
        return {"tool_calls": 1, "cost": cost, "llm_tokens": 0, "risk": tool.risk}

    def _admit_request(self, identity: ExecutionIdentity, tool: ToolSpec,
                       amounts: Mapping[str, int], reservation_id: str,
                       value_digests: tuple[str, ...] = (),
                       seeds: Mapping[str, str] | None = None) -> AdmitRequest:
        return AdmitRequest(
            reservation_id=reservation_id,
            session=identity.session_key,
            action=tool.action,
            revocation_keys=(identity.key, *identity.ancestor_keys),
            rate_limits=(
                RateLimit(f"exec:{identity.key}", self.config.execution_rate_per_s,
                          self.config.execution_burst),
                RateLimit(f"agent:{identity.agent_id}", self.config.agent_rate_per_s,
                          self.config.agent_burst),
            ),
            charges=self._charges(identity),
            amounts=amounts,
            reservation_ttl_s=self.config.reservation_ttl_s,
            value_digests=value_digests,
            seed_values=seeds or {},
        )

    @staticmethod
    def _charges(identity: ExecutionIdentity) -> tuple[Charge, ...]:
        # A child's spend is charged to every ancestor with that ancestor's own limits (carried
        # in the signed token), so siblings together can never exceed their parent.
        own = Charge(identity.key, identity.budget.as_dict())
        return (own, *(Charge(key, budget.as_dict()) for key, budget
                       in zip(identity.ancestor_keys, identity.ancestor_budgets, strict=True)))

    def _admission_denial(self, admitted: AdmitResult, identity: ExecutionIdentity,
                          tool: ToolSpec) -> tuple[str, str] | None:
        if admitted.outcome == "revoked":
            return "token.revoked", "the execution token or one of its ancestors was revoked"
        if admitted.outcome == "rate_limited":
            return ("rate.limited",
                    f"rate limit reached; retry in {admitted.retry_after_s:.2f}s")
        if admitted.outcome == "budget_exhausted":
            grant, _, dimension = admitted.detail.rpartition("|")
            whose = "this execution's" if grant == identity.key else "a parent execution's"
            return "budget.exhausted", f"{whose} `{dimension}` budget is exhausted"
        if admitted.outcome != "admitted":
            return "store.unexpected", f"unexpected store outcome `{admitted.outcome}`"
        llm_left = admitted.remaining.get("llm_tokens")
        if llm_left is not None and llm_left <= 0 and identity.budget.llm_tokens is not None:
            return "budget.exhausted", "this execution's `llm_tokens` budget is exhausted"
        if admitted.session.risk + tool.risk > identity.risk_envelope:
            return ("risk.envelope",
                    f"accumulated risk {admitted.session.risk} + {tool.risk} would exceed the "
                    f"envelope {identity.risk_envelope}")
        return None

    def _context(self, identity: ExecutionIdentity, tool: ToolSpec, call: ToolCall,
                 arguments: Mapping[str, Any],
                 admitted: AdmitResult, provenance: dict[str, str]) -> dict[str, Any]:
        session = admitted.session
        now = int(self._clock())
        moment = datetime.fromtimestamp(now, tz=timezone.utc)
        tainted = bool(session.tainted_by) or "tainted" in session.labels
        return {
            "delegation": {
                "delegator": identity.delegator_id,
                "delegator_type": identity.delegator_type,
                "agent": identity.agent_id,
                "depth": identity.depth,
                "chain_agents": frozenset(a.agent_id for a in identity.actors),
                "hops": len(identity.actors),
                "purpose": identity.purpose,
            },
            "session": {
                "call_count": session.call_count,
                "action_count": session.action_counts.get(tool.action, 0),
                "prior_actions": frozenset(session.action_counts),
                "labels": frozenset(session.labels),
                "tainted": tainted,
            },
            "risk": {"score": session.risk, "envelope": identity.risk_envelope,
                     "call": tool.risk},
            "budget": {k: v for k, v in admitted.remaining.items()
                       if v is not None and k != "risk"},
            "confidence": call.confidence,
            "time": {"now": now, "hour": moment.hour, "weekday": moment.isoweekday()},
            "provenance": provenance,
            "untrusted_args": frozenset(k for k, v in provenance.items() if v == "untrusted"),
            "unverified_args": unverified_arguments(provenance, tainted=tainted),
            "secret_args": self._secret_arguments(tool, arguments),
            **self._recipients(tool, arguments),
        }

    @staticmethod
    def _recipients(tool: ToolSpec, arguments: Mapping[str, Any]) -> dict[str, Any]:
        return recipients_context(tool.recipient_arguments, arguments)

    # --- argument provenance ------------------------------------------------------------

    def target_arguments(self, tool: ToolSpec, arguments: Mapping[str, Any]) -> list[str]:
        if tool.target_arguments:
            return sorted(a for a in tool.target_arguments if a in arguments)
        if tool.consequential:
            return sorted(a for a in arguments if a in DEFAULT_TARGET_ARGUMENTS)
        return []

    def _secret_arguments(self, tool: ToolSpec, arguments: Mapping[str, Any]) -> frozenset[str]:
        """String arguments of a consequential call that carry a secret (a key, a token, a
        password): the firewall's secret detectors label the value, wherever it came from."""
        if not tool.consequential:
            return frozenset()
        return frozenset(name for name, value in arguments.items()
                         if isinstance(value, str) and self.firewall.redact_text(value) != value)

    def _target_digests(self, tool: ToolSpec,
                        arguments: Mapping[str, Any]) -> dict[str, tuple[str | None, ...]]:
        """Each target argument's value digests, looked up in the store's admit step.

        A recipient list has one digest per address: ``"a@x.com, b@y.com"`` is as trusted as
        its least trusted address, not as the string (which nobody ever saw whole).
        """
        out: dict[str, tuple[str | None, ...]] = {}
        recipient_names = recipient_argument_names(tool.recipient_arguments, arguments)
        for name in self.target_arguments(tool, arguments):
            value = arguments[name]
            if name in recipient_names:
                parsed = parse_recipients({name: value}, (name,))
                if parsed.addresses and INVALID_DOMAIN not in parsed.domains:
                    out[name] = tuple(ValueIndex.digest(a) for a in sorted(parsed.addresses))
                    continue
            out[name] = (ValueIndex.digest(value),)
        return out


    def _request_seeds(self, identity: ExecutionIdentity) -> dict[str, str] | None:
        """What the delegator asked for (purpose, constraint values), as value digests to seed
        in the admit step, until a call of this execution was admitted with them.

        Only the root execution speaks for the delegator: a child's purpose and constraint
        values were written by the parent agent, possibly from untrusted content, so they are
        never indexed as the request (the child shares the root's session and sees its values).
        """
        if identity.ancestors or identity.key in self._seeded:
            return None
        values: list[object] = [identity.purpose]
        for capability in identity.capabilities:
            for constraint in capability.constraints.values():
                if constraint.eq is not None:
                    values.append(constraint.eq)
                values.extend(constraint.one_of or ())
        digests: dict[str, str] = {}
        for value in values:
            for digest in ValueIndex.digests_of(value):
                digests[digest] = "request"
        if not digests:
            self._seeded_now(identity)
            return None
        return digests

    def _seeded_now(self, identity: ExecutionIdentity) -> None:
        with self._lock:
            self._seeded[identity.key] = None
            if len(self._seeded) > 10_000:
                self._seeded.popitem(last=False)

    def observe(self, token: TokenLike, values: Iterable[object],
                source: Literal["request", "trusted", "untrusted"]) -> None:
        """Record values (text or scalars) as seen from ``source`` for argument provenance.

        Adapters call this with the user's request (``request``) so that targets the user named
        are told apart from targets that only appear in untrusted tool output. Only a root
        execution speaks for the delegator: ``request`` values for a sub-delegated execution
        (whose input a parent model wrote) are ignored.
        """
        identity = token if isinstance(token, ExecutionIdentity) else self._identity(token)
        if source == "request" and identity.ancestors:
            log.info("ignored request values for sub-delegated execution %s",
                     identity.execution_id)
            return
        digests: dict[str, str] = {}
        for value in values:
            for digest in ValueIndex.digests_of(value):
                digests[digest] = source
        if digests:
            self.store.add_values(identity.session_key, digests)

    # --- screening and completion -------------------------------------------------------

    def screen(self, decision: Decision, output: object) -> Screened:
        """Screen a tool's output before the model sees it (never raises; blocks on error).

        What it observes (risk, labels, taint, the values the output names) is kept in this
        process and written to the store with the call's :meth:`complete`, in the same round
        trip as the settlement, so a guarded call costs two: ``authorize`` and ``complete``.
        It is never lost and is in the store before any later decision of the session that
        could depend on the output: :meth:`mediate` completes a call before it hands the
        output on; a by-hand caller's next ``authorize`` of the same session in this process
        writes what is still held first (one extra round trip, only then), and so do
        :meth:`end_execution` and :meth:`close`. A by-hand caller that hands the output to
        another process must call ``complete`` first. Past the bounds (sessions, values) the
        observations are written at once, and if that fails the output is blocked.
        """
        with self._lock:
            pending = self._pending.get(decision.ticket) if decision.ticket else None
        if pending is None or not decision.allowed:
            result = ScreenResult(text="[agentic-iam: output withheld: no allowed call]",
                                  findings=(), risk=0, labels=frozenset(), blocked=True,
                                  redactions=())
            return Screened(result.text, result)
        text = output if isinstance(output, str) else _to_text(output)
        tool = pending.tool
        untrusted = tool.output_trust == "untrusted"
        try:
            config = self._screen_config(pending.agent.id, tool)
            result = self.firewall.screen(text, config, untrusted=untrusted)
        except Exception as exc:  # a broken screen blocks the output
            result = ScreenResult(
                text=f"[agentic-iam: tool output blocked: screening failed ({type(exc).__name__})]",
                findings=(), risk=0, labels=frozenset({"screen_failed"}), blocked=True,
                redactions=())
        labels = set(result.labels)
        if untrusted:
            labels.add("tainted")
        try:
            values = {} if result.blocked else self._output_values(pending, result.text,
                                                                   untrusted)
            self._hold(pending.identity.session_key, result.risk, labels,
                       f"tool:{tool.name}#{decision.call_id}" if untrusted else None, values)
        except Exception as exc:  # taint that cannot be recorded blocks the output
            # Taint that cannot be recorded must not be silently dropped: block the output.
            result = ScreenResult(
                text=f"[agentic-iam: tool output blocked: session update failed "
                     f"({type(exc).__name__})]",
                findings=result.findings, risk=result.risk, labels=frozenset(labels),
                blocked=True, redactions=result.redactions)
        pending.screened = result
        return Screened(result.text, result)

    def _output_values(self, pending: _Pending, text: str, untrusted: bool) -> dict[str, str]:
        """What the output names, as trusted or untrusted content (digest → label).

        A tool that repeats its own arguments ("no article matches 'ACC-666'") is not a source
        for them: values that were arguments of this call keep the label they had, so a trusted
        tool cannot be used to launder a value the model got from untrusted content.
        """
        digests = ValueIndex.digests_of(text)
        if not untrusted:
            echoed = set(ValueIndex.digests_of(pending.arguments))
            digests = [d for d in digests if d not in echoed]
        return dict.fromkeys(digests, "untrusted" if untrusted else "trusted")

    def _hold(self, session: str, risk: int, labels: Iterable[str], source: str | None,
              values: Mapping[str, str]) -> None:
        """Keep a screen's observations for the session's next write (see :meth:`screen`)."""
        over: list[str] = []
        with self._lock:
            observed = self._observed.get(session)
            if observed is None:
                observed = self._observed[session] = _Observed()
            observed.add(risk, labels, source, values)
            if len(observed.values) > _MAX_UNFLUSHED_VALUES:
                over.append(session)
            while len(self._observed) - len(over) > _MAX_UNFLUSHED_SESSIONS:
                oldest = next(iter(self._observed))
                over.append(oldest)
                self._observed.move_to_end(oldest)
        for key in over:
            self._flush(key)

    def _take_observed(self, session: str) -> _Observed | None:
        """The session's held observations, now marked as being written: the caller must
        end with :meth:`_written_back` (whether the write worked or not)."""
        with self._lock:
            observed = self._observed.pop(session, None)
            if observed is not None:
                self._writing[session] = self._writing.get(session, 0) + 1
            return observed

    def _written_back(self, session: str, failed: _Observed | None = None) -> None:
        """A write of held observations ended; ``failed``: it did not reach the store, so
        they are held again for the session's next write."""
        with self._lock:
            if failed is not None:
                newer = self._observed.get(session)
                if newer is None:
                    self._observed[session] = failed
                else:
                    newer.merge_older(failed)
            left = self._writing.get(session, 0) - 1
            if left > 0:
                self._writing[session] = left
            else:
                self._writing.pop(session, None)
            self._written.notify_all()

    def _flush(self, session: str, *, wait: bool = False) -> None:
        """Write the session's held observations now (one round trip); raises if it fails,
        and then keeps them for the next attempt. ``wait``: first wait for writes of this
        session that are in flight (a decision must not overtake them)."""
        if wait:
            with self._lock:
                deadline = time.monotonic() + _WRITE_WAIT_S
                while session in self._writing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise StoreUnavailableError(
                            "the session's earlier observations are still being written")
                    self._written.wait(left)
        observed = self._take_observed(session)
        if observed is None:
            return
        try:
            self._store_finish(observed.request(session))
        except BaseException:
            self._written_back(session, observed)
            raise
        self._written_back(session)

    def _store_finish(self, request: FinishRequest) -> None:
        finish = getattr(self.store, "finish", None)
        if finish is not None:
            finish(request)
            return
        # A Store written before ``finish`` existed: the same changes, in its own steps.
        if request.reservation_id is not None:
            if request.actual is None:
                self.store.release(request.reservation_id)
            else:
                self.store.settle(request.reservation_id, request.actual)
        if request.observes:
            for source in request.tainted_by or (None,):
                self.store.add_risk(request.session, request.risk, request.labels, source)
                request = replace(request, risk=0)
            if request.values:
                self.store.add_values(request.session, request.values,
                                      max_values=request.max_values)
        if request.event is not None:
            self.store.append_event(request.session, request.event,
                                    max_events=request.max_events)

    def complete(self, decision: Decision,
                 outcome: Literal["success", "error", "cancelled"] = "success",
                 *, actual_cost: int | None = None) -> None:
        """Settle the call's budget and record its result. Idempotent per call.

        ``success`` and ``error`` both charge the call: a tool that raised may have had its side
        effect already (a payment sent, then a timeout), so the reserved amounts are spent unless
        ``actual_cost`` states the cost. Only ``cancelled`` — the tool was never started — gives
        the reservation back. If the spend cannot be recorded after a few attempts, the execution
        is suspended (its later calls deny) and the failure is recorded: an unrecorded spend
        would otherwise expire with its reservation and the budget would be spent twice.
        """
        with self._lock:
            pending = self._pending.pop(decision.ticket, None) if decision.ticket else None
        if pending is None:
            return
        amounts = dict(pending.amounts)
        if actual_cost is not None and type(actual_cost) is int and actual_cost >= 0:
            amounts["cost"] = min(actual_cost, amounts["cost"])
        charged = outcome != "cancelled"
        if not charged:
            with self._lock:
                # The call never ran: a framework that replays a paused step may ask again.
                self._used_calls.pop((pending.identity.key, pending.call.call_id or ""), None)
        # One round trip: the session's held observations, the settlement (or release) and
        # the call's event, in one atomic store step.
        session = pending.identity.session_key
        held = self._take_observed(session)
        observed = held or _Observed()
        failure: str | None = "interrupted"
        try:
            failure = self._finish_call(observed.request(
                session, reservation_id=pending.reservation_id,
                actual=amounts if charged else None,
                event={"call_id": decision.call_id, "tool": pending.tool.name,
                       "action": pending.tool.action, "outcome": outcome,
                       "time": int(self._clock())},
                max_events=self.config.session_events), charged)
        finally:
            if held is not None:
                # On failure the observations are held again: written with the next call.
                self._written_back(session, held if failure is not None else None)
        if failure is not None and charged:
            self._suspend(pending.identity,
                          f"the spend of call `{decision.call_id}` could not be recorded "
                          f"({failure}); the execution is suspended", decision)
        if self.recorder is not None:
            screened = pending.screened
            state = self._session_after(pending, amounts if charged else None)
            self.recorder.record_fast(
                "tool_call.completed",
                **{**pending.audit,
                   "session": state,
                   "result": {
                       "outcome": "blocked" if screened is not None and screened.blocked
                       else outcome,
                       "duration_ms": int((self._clock() - pending.started) * 1000),
                       "output_digest": hashlib.sha256(screened.text.encode()).hexdigest()
                       if screened is not None else None,
                       "output_labels": sorted(screened.labels) if screened else [],
                       "budget_settled": amounts if charged else {},
                   }},
            )

    def cancel(self, decision: Decision) -> None:
        """An allowed call whose tool never ran, or was paused by the framework before it
        finished (an interrupt, a wait for a human) and will be replayed: give its reservation
        and its call id back. Only adapters call this, never on the model's word."""
        self.complete(decision, "cancelled")

    def _finish_call(self, request: FinishRequest, charged: bool) -> str | None:
        """End a call in the store, retrying a failing store when it spent something; the
        last failure's description, or None. A retry after a lost reply settles once but may
        add the observed risk twice, which errs towards denying."""
        failure: str | None = None
        attempts = _SETTLE_ATTEMPTS if charged else 1
        for attempt in range(attempts):
            try:
                self._store_finish(request)
                return None
            except Exception as exc:  # retried, then the execution is suspended
                failure = f"{type(exc).__name__}: {exc}"
                log.warning("finishing %s failed (attempt %d): %s", request.reservation_id,
                            attempt + 1, failure)
                if attempt + 1 < attempts:
                    time.sleep(0.05 * (attempt + 1))
        return failure

    def _suspend(self, identity: ExecutionIdentity, why: str,
                 decision: Decision | None = None) -> None:
        """Stop an execution in this process at once, and everywhere through the store."""
        with self._lock:
            self._suspended[identity.key] = why
        try:
            self.store.revoke(identity.key, expires_at=identity.expires_at)
        except Exception as exc:  # the in-process suspension still holds
            log.warning("could not revoke suspended execution %s: %s", identity.execution_id,
                        type(exc).__name__)
        if self.recorder is not None:
            audit: dict[str, Any] = {}
            self._identity_audit(identity, audit)
            self.recorder.record_fast(
                "execution.suspended", **audit,
                **({"tool": decision.tool, "call_id": decision.call_id,
                    "action": decision.action} if decision is not None else {}),
                decision={"outcome": "deny",
                          "reasons": [{"code": "execution.suspended", "message": why,
                                       "policy_id": None}],
                          "policy_ids": []})

    def end_execution(self, token: TokenLike, *, reason: str = "completed") -> None:
        """End an execution: its token, and every token sub-delegated from it, stop working.

        Adapters call this when a run finishes ("when the task ends, the identity is gone").
        The token's ``jti`` is revoked in the store (children are refused through their
        ancestors), calls still pending in this process are charged, and an
        ``execution.ended`` event is recorded. Idempotent: ending an execution this Guard has
        already ended does nothing (and records nothing) again.
        """
        identity = token if isinstance(token, ExecutionIdentity) else self.verifier.verify(
            token.token if isinstance(token, ExecutionToken) else token, check_revocation=False)
        with self._lock:
            if identity.key in self._ended:
                return
        self.store.revoke(identity.key, expires_at=identity.expires_at)
        with self._lock:
            self._ended[identity.key] = None
            while len(self._ended) > _MAX_ENDED:
                self._ended.popitem(last=False)
        with self._lock:
            orphans = [ticket for ticket, p in self._pending.items()
                       if p.identity.key == identity.key
                       or identity.key in p.identity.ancestor_keys]
        for ticket in orphans:
            with self._lock:
                pending = self._pending.get(ticket)
            if pending is not None:
                self.complete(Decision("allow", (), pending.call.call_id or "", pending.tool.name,
                                       pending.tool.action, pending.identity.execution_id,
                                       ticket=ticket), "error")
        try:  # what its screened calls observed outlives it: the session may go on
            self._flush(identity.session_key)
        except Exception as exc:  # kept; written with the session's next call
            log.warning("could not write the observations of session %s: %s",
                        identity.session_key, type(exc).__name__)
        if self.recorder is not None:
            audit: dict[str, Any] = {}
            self._identity_audit(identity, audit)
            self.recorder.record_fast("execution.ended", **audit, extra={"reason": reason})

    def charge_usage(self, token: TokenLike, *, input_tokens: int, output_tokens: int,
                     model: str | None = None, framework: str | None = None) -> None:
        """Charge LLM tokens to the execution and every ancestor (adapters call this)."""
        identity = self._identity(token)
        total = int(input_tokens) + int(output_tokens)
        if total <= 0:
            return
        self.store.charge((identity.key, *identity.ancestor_keys), {"llm_tokens": total})
        if self.recorder is not None:
            audit: dict[str, Any] = {}
            self._identity_audit(identity, audit)
            self.recorder.record_fast("model.usage", **audit,
                                 usage={"input_tokens": int(input_tokens),
                                        "output_tokens": int(output_tokens)},
                                 reasoning={"model": model},
                                 framework=framework or self.config.framework)

    def resolve_approval(self, approval_id: str, *, approved: bool,
                         approver: ApproverLike) -> None:
        """Answer an approval request as an accountable approver (adapters call this when a
        paused run resumes).

        ``approver`` is a :class:`Human` verified by an IdP (``OIDCProvider.verify(id_token)``)
        or the id of a configured approver (:attr:`GuardConfig.approvers`), never the requesting
        agent, its execution or an agent in its delegation chain. A refusal raises
        :class:`ApproverRefusedError` naming what is wrong, is recorded, and changes nothing;
        every grant and denial is recorded naming the approver before it takes effect.
        """
        self.approvals.resolve(approval_id, approved=approved, approver=approver,
                               approvers=self.config.approvers)

    # --- one-call helpers for adapters and direct use --------------------------------------

    def mediate(self, token: TokenLike | None, call: ToolCall,
                run: Callable[[dict[str, Any]], T], *,
                screen: Callable[[T, Callable[[object], Screened]], R] | None = None,
                failed: Callable[[T], bool] | None = None,
                ask: Callable[[dict[str, Any]], object] | None = None,
                paused: Callable[[BaseException], bool] | None = None,
                agent_id: str | None = None) -> Mediated[R]:
        """The one mediation path: authorize → approval → run → screen → complete.

        See :mod:`agentic_iam.core.mediation` for each argument. Adapters and gateways call
        this (or :meth:`amediate`) and only translate their framework's types. Returns a
        :class:`Mediated`; raises only what ``run`` or ``ask`` raised (after settling).
        """
        return self._mediator.mediate(token, call, run, screen=screen, failed=failed, ask=ask,
                                      paused=paused, agent_id=agent_id)

    async def amediate(self, token: TokenLike | None, call: ToolCall,
                       run: Callable[[dict[str, Any]], Awaitable[T]], *,
                       screen: Callable[[T, Callable[[object], Screened]], R] | None = None,
                       failed: Callable[[T], bool] | None = None,
                       ask: Callable[[dict[str, Any]], object] | None = None,
                       paused: Callable[[BaseException], bool] | None = None,
                       agent_id: str | None = None) -> Mediated[R]:
        """Async :meth:`mediate`: ``run`` returns an awaitable; ``ask`` may return one."""
        return await self._mediator.amediate(token, call, run, screen=screen, failed=failed,
                                             ask=ask, paused=paused, agent_id=agent_id)

    def filter_memory(self, token: TokenLike | None, items: Iterable[T], *,
                      scope_of: Callable[[T], object], id_of: Callable[[T], object],
                      query: str | None = None,
                      framework: str | None = None) -> MemoryFiltered[T]:
        """Keep the retrieved ``items`` the run's grant may read; record the retrieval.

        The token is checked like a tool call's (a revoked or expired run reads nothing); an
        item is kept when ``scope_of(item)`` is one of the grant's memory scopes. Never raises.
        See :mod:`agentic_iam.core.memory`.
        """
        return filter_memory(self, token, items, scope_of=scope_of, id_of=id_of, query=query,
                             framework=framework)

    def call(self, token: TokenLike, call: ToolCall, fn: Callable[..., Any]) -> Screened:
        """Mediate ``fn(**checked_arguments)``; raise :class:`AuthorizationDenied` unless it ran.

        No approval is waited for (use :meth:`mediate` with ``ask``): ``approval_required``
        raises like a deny.
        """
        done = self.mediate(token, call, lambda args: fn(**args), screen=_keep_screened)
        return _screened_or_raise(done)

    async def acall(self, token: TokenLike, call: ToolCall,
                    fn: Callable[..., Awaitable[Any]]) -> Screened:
        """Async variant of :meth:`call`."""
        done = await self.amediate(token, call, lambda args: fn(**args), screen=_keep_screened)
        return _screened_or_raise(done)

    # --- audit plumbing -----------------------------------------------------------------

    def _identity_audit(self, identity: ExecutionIdentity, audit: dict[str, Any]) -> None:
        audit.update(
            execution_id=identity.execution_id, jti=identity.jti, issuer=identity.issuer,
            chain=identity.chain(), delegator=identity.delegator_id,
            agent_id=identity.agent_id, purpose=identity.purpose,
        )

    def _session_audit(self, admitted: AdmitResult, identity: ExecutionIdentity,
                       audit: dict[str, Any], after_call: int = 0) -> None:
        session = admitted.session
        audit["session"] = {
            "call_count": session.call_count + (1 if admitted.outcome == "admitted" else 0),
            "risk": session.risk + after_call,
            "risk_envelope": identity.risk_envelope,
            "budget_remaining": {k: v for k, v in admitted.remaining.items() if k != "risk"},
            "labels": sorted(session.labels),
            "tainted": bool(session.tainted_by) or "tainted" in session.labels,
        }

    @staticmethod
    def _session_after(pending: _Pending, settled: Mapping[str, int] | None) -> dict[str, Any]:
        """The session as this call left it, derived without another store round trip: the
        state seen at admission plus what screening added and what settling gave back."""
        before = dict(pending.audit.get("session") or {})
        screened = pending.screened
        if screened is not None:
            before["risk"] = int(before.get("risk", 0)) + screened.risk
            labels = set(before.get("labels", ())) | set(screened.labels)
            if pending.tool.output_trust == "untrusted":
                labels.add("tainted")
            before["labels"] = sorted(labels)
            before["tainted"] = bool(before.get("tainted")) or "tainted" in labels
        remaining = dict(before.get("budget_remaining") or {})
        for name, left in remaining.items():
            if left is not None and name in pending.amounts:
                unused = pending.amounts[name] - (settled or {}).get(name, 0)
                remaining[name] = left + max(unused, 0)
        before["budget_remaining"] = remaining
        return before

    @staticmethod
    def _audit_base(audit: Mapping[str, Any]) -> dict[str, Any]:
        return dict(audit)

    def _record_decision(self, decision: Decision, call: ToolCall,
                         audit: dict[str, Any]) -> None:
        if self.recorder is None:
            return
        reasoning = call.reasoning
        fields = dict(audit)
        fields["decision"] = decision.to_json()
        fields["reasoning"] = {
            "message": reasoning.message, "model": reasoning.model,
            "run_id": reasoning.run_id, "parent_run_id": reasoning.parent_run_id,
            "response_id": reasoning.response_id,
        }
        if reasoning.trace_id or reasoning.span_id:
            fields["trace"] = {"trace_id": reasoning.trace_id, "span_id": reasoning.span_id}
        fields["framework"] = call.framework or self.config.framework
        if decision.approval_id:
            fields["extra"] = {"approval_id": decision.approval_id}
        self.recorder.record_fast("tool_call.decided", **fields)
        with self._lock:
            pending = self._pending.get(decision.ticket) if decision.ticket else None
            if pending is not None:
                pending.audit.update(reasoning=fields["reasoning"],
                                     framework=fields["framework"],
                                     **({"trace": fields["trace"]} if "trace" in fields else {}))

    def _deny(self, call: ToolCall, code: str, message: str, audit: dict[str, Any],
              identity: ExecutionIdentity | None = None, tool: ToolSpec | None = None) -> Decision:
        return Decision("deny", (Reason(code, message),), call.call_id or "", call.name,
                        tool.action if tool else None,
                        identity.execution_id if identity else None)

    def _release_quietly(self, reservation_id: str) -> None:
        try:
            self.store.release(reservation_id)
        except Exception:  # an unsettled reservation also expires on its own
            log.warning("could not release reservation %s", reservation_id)

    def _screen_config(self, agent_id: str, tool: ToolSpec) -> ScreenConfig:
        key = (agent_id, tool.name)
        config = self._screen_configs.get(key)
        if config is None:
            config = ScreenConfig.from_mapping(tool.screening)
            self._screen_configs[key] = config
        return config

    def close(self) -> None:
        with self._lock:
            sessions = list(self._observed)
        for session in sessions:
            try:
                self._flush(session)
            except Exception as exc:  # nothing later can decide in this Guard
                log.warning("could not write the observations of session %s at close: %s",
                            session, type(exc).__name__)
        self.policy.close()
        self.store.close()
        if self.recorder is not None:
            self.recorder.close()


_LABEL_ORDER = ("untrusted", "unknown", "trusted", "request")


def _least_trusted(labels: Mapping[str, str], digests: Iterable[str | None]) -> str:
    """The worst provenance among a target's digests (an unindexable value is unknown)."""
    found = [labels.get(d, "unknown") if d else "unknown" for d in digests] or ["unknown"]
    return min(found, key=lambda label: _LABEL_ORDER.index(label)
               if label in _LABEL_ORDER else 0)


def _keep_screened(output: object, screen_text: Callable[[object], Screened]) -> Screened:
    return screen_text(output)


def _screened_or_raise(done: Mediated[Screened]) -> Screened:
    if done.status == "refused":
        raise AuthorizationDenied(done.decision)
    if done.value is None:  # blocked: the output could not be screened
        result = ScreenResult(text=done.refusal or "", findings=(), risk=0,
                              labels=frozenset({"screen_failed"}), blocked=True, redactions=())
        return Screened(result.text, result)
    return done.value


def _to_text(output: object) -> str:
    try:
        return canonical_json(output)
    except (TypeError, ValueError):
        return str(output)

