"""The delegation broker: consent in, a narrowly scoped execution token out.

``delegate`` turns a delegator's consent (a :class:`Human`/:class:`Workload`, or an access/ID
token from an external OIDC IdP, RFC 8693 ``subject_token`` semantics) into a token for one
agent, one purpose, one window, one budget and one risk envelope, after checking the registry.
``subdelegate`` mints a child for another agent that is *provably* narrower; ``revoke`` revokes a
token and therefore every descendant (descendants list their ancestors' ``jti``).

The broker must never mint anything the registry, the delegator's scopes or the parent grant
does not cover: every check here refuses by raising, naming what was too wide.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import jwt

from agentic_iam.core.approvals import canonical_json
from agentic_iam.core.capabilities import Capability, CapabilitySet, action_covers, parse_capability
from agentic_iam.core.identity import (
    DIMENSIONS,
    Actor,
    AgentSpec,
    Budget,
    ExecutionIdentity,
    Human,
    Principal,
    Workload,
)
from agentic_iam.core.keys import KeySet
from agentic_iam.core.registry import AgentRegistry
from agentic_iam.core.tokens import ExecutionToken, TokenVerifier, mint_token
from agentic_iam.errors import (
    AgentSuspendedError,
    CapabilityNotPermittedError,
    DelegationError,
    LimitExceededError,
    SubjectTokenError,
    TokenError,
    UnknownAgentError,
    WideningError,
)

if TYPE_CHECKING:
    from agentic_iam.core.provenance import EventType, Recorder
    from agentic_iam.core.store.base import Store

__all__ = ["DelegationBroker", "OIDCProvider"]

log = logging.getLogger("agentic_iam.broker")

CapabilitiesLike = CapabilitySet | Iterable[Capability | str]


def _capabilities(value: CapabilitiesLike) -> CapabilitySet:
    if isinstance(value, CapabilitySet):
        return value
    return CapabilitySet(tuple(parse_capability(c) if isinstance(c, str) else c for c in value))


def _seconds(ttl: int | timedelta) -> int:
    seconds = int(ttl.total_seconds()) if isinstance(ttl, timedelta) else ttl
    if type(seconds) is not int or seconds <= 0:
        raise LimitExceededError(f"ttl must be a positive number of seconds, got {ttl!r}",
                                 limit="ttl")
    return seconds


def _sub_purpose(requested: object, inherited: str | None) -> str | None:
    """A child's sub-purpose: the parent's unless a new one is given (a non-empty string)."""
    if requested is None:
        return inherited
    if not isinstance(requested, str) or not requested.strip() or len(requested) > 1024:
        raise DelegationError("a sub-purpose must be a non-empty string of at most 1024 "
                              "characters")
    return requested


def _memory_scopes(requested: Iterable[str] | None, allowed: frozenset[str],
                   whose: str) -> frozenset[str] | str:
    """The memory scopes to grant (``allowed`` by default, or the request if within it), or
    why the request cannot be granted."""
    if requested is None:
        return allowed
    if isinstance(requested, str):
        return "memory_scopes must be a collection of scope names, not one string"
    scopes = frozenset(requested)
    if any(not isinstance(s, str) or not s for s in scopes):
        return "memory scopes must be non-empty strings"
    outside = sorted(scopes - allowed)
    if outside:
        return f"memory scopes {', '.join(f'`{s}`' for s in outside)} are outside {whose}"
    return scopes


def _budget(value: Budget | Mapping[str, int | None] | None) -> Budget | None:
    if value is None or isinstance(value, Budget):
        return value
    try:
        return Budget.from_mapping(value)
    except ValueError as exc:
        raise LimitExceededError(str(exc), limit="budget") from None


@dataclass(frozen=True)
class OIDCProvider:
    """An external IdP whose access or ID tokens may stand for a delegating human.

    The JWKS is given (offline) or fetched from ``jwks_uri`` with httpx and cached. Issuer,
    audience and algorithms are configuration; nothing is read from the token to choose them.
    """

    issuer: str
    """Expected ``iss``."""
    audience: str
    """Expected ``aud`` (this broker's client id at the IdP)."""
    jwks: Mapping[str, Any] | None = None
    """The IdP's JWKS document, if known in advance."""
    jwks_uri: str | None = None
    """Where to fetch the JWKS when ``jwks`` is not given."""
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    """Accepted signing algorithms."""
    subject_claim: str = "sub"
    """Claim naming the human (``sub`` or ``email``)."""
    scope_claims: tuple[str, ...] = ("scope", "scp")
    """Claims carrying the human's scopes (space-separated string or list)."""
    leeway_s: int = 30
    """Clock skew tolerance."""
    _fetched: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def _keys(self) -> Mapping[str, Any]:
        if self.jwks is not None:
            return self.jwks
        if not self._fetched:
            if self.jwks_uri is None:
                raise SubjectTokenError(f"IdP `{self.issuer}` has neither `jwks` nor `jwks_uri`")
            import httpx

            try:
                response = httpx.get(self.jwks_uri, timeout=5.0)
                response.raise_for_status()
                self._fetched.update(response.json())
            except (httpx.HTTPError, ValueError) as exc:
                raise SubjectTokenError(
                    f"cannot fetch the JWKS of `{self.issuer}`: {exc}") from None
        return self._fetched

    def verify(self, subject_token: str) -> Human:
        try:
            header = jwt.get_unverified_header(subject_token)
            jwk_set = jwt.PyJWKSet.from_dict(dict(self._keys()))
            kid = header.get("kid")
            candidates = [k for k in jwk_set.keys if kid is None or k.key_id == kid]
            if not candidates:
                raise SubjectTokenError(f"no key `{kid}` in the JWKS of `{self.issuer}`")
            claims = jwt.decode(
                subject_token,
                candidates[0],
                algorithms=list(self.algorithms),
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iat", "iss", "aud", "sub"], "strict_aud": True},
            )
        except SubjectTokenError:
            raise
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            raise SubjectTokenError(
                f"subject token from `{self.issuer}` is invalid: {exc}") from None
        if type(claims.get("exp")) is not int or type(claims.get("iat")) is not int:
            raise SubjectTokenError("subject token times must be integers")
        subject = claims.get(self.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise SubjectTokenError(f"subject token has no `{self.subject_claim}`")
        scopes: set[str] | None = None
        for name in self.scope_claims:
            raw = claims.get(name)
            if isinstance(raw, str):
                scopes = (scopes or set()) | set(raw.split())
            elif isinstance(raw, list) and all(isinstance(s, str) for s in raw):
                scopes = (scopes or set()) | set(raw)
        return Human(subject, issuer=self.issuer,
                     scopes=frozenset(scopes) if scopes is not None else None)


def _scope_covers(scopes: frozenset[str], action: str) -> bool:
    return any(action_covers(scope, action) for scope in scopes)


class DelegationBroker:
    """Mints, sub-delegates and revokes execution tokens."""

    def __init__(
        self,
        registry: AgentRegistry,
        keys: KeySet,
        *,
        audience: str,
        issuer: str | None = None,
        store: Store | None = None,
        idps: Sequence[OIDCProvider] = (),
        max_ttl_s: int = 24 * 3600,
        max_depth: int = 3,
        recorder: Recorder | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if issuer is not None and issuer != keys.issuer:
            raise DelegationError(f"issuer `{issuer}` does not match the key set's `{keys.issuer}`")
        if store is None:
            from agentic_iam.core.store.memory import MemoryStore

            store = MemoryStore()
        self.registry = registry
        self.keys = keys
        self.issuer = keys.issuer
        self.audience = audience
        self.store = store
        self.idps = {idp.issuer: idp for idp in idps}
        self.max_ttl_s = max_ttl_s
        self.max_depth = max_depth
        self.recorder = recorder
        self._clock = clock
        self.verifier = TokenVerifier(keys, audience=audience, max_lifetime_s=max_ttl_s,
                                      revoked=store.revoked, clock=clock)

    # --- helpers ------------------------------------------------------------------------

    def _agent(self, agent_id: str) -> AgentSpec:
        agent = self.registry.get(agent_id)
        if agent is None:
            raise UnknownAgentError(agent_id)
        if agent.status != "active":
            raise AgentSuspendedError(agent_id)
        return agent

    def _resolve_delegator(self, delegator: Principal | str) -> Principal:
        if isinstance(delegator, (Human, Workload)):
            return delegator
        if not isinstance(delegator, str):
            raise SubjectTokenError("the delegator must be a Human, a Workload or an IdP token")
        try:
            unverified = jwt.decode(delegator, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise SubjectTokenError("the subject token is not a JWT") from None
        idp = self.idps.get(str(unverified.get("iss")))
        if idp is None:
            raise SubjectTokenError("the subject token's issuer is not a configured IdP")
        return idp.verify(delegator)

    def _check_within_agent(self, agent: AgentSpec, capabilities: CapabilitySet) -> None:
        actions = sorted(agent.actions)
        for capability in capabilities:
            if not any(capability.covers(action) for action in actions):
                raise CapabilityNotPermittedError(
                    f"capability `{capability.describe()}` is not permitted for agent "
                    f"`{agent.id}`: registry rule `agents.{agent.id}.tools` has no tool performing "
                    f"`{capability.action}` (its actions: {', '.join(actions) or 'none'})",
                    capability=capability.action,
                    rule=f"agents.{agent.id}.tools",
                )

    def _mint(self, identity: ExecutionIdentity, event: EventType,
              parent_execution_id: str | None = None) -> ExecutionToken:
        token = mint_token(identity, self.keys)
        if self.recorder is not None:
            self.recorder.record(
                event,
                execution_id=identity.execution_id,
                jti=identity.jti,
                issuer=identity.issuer,
                chain=identity.chain(),
                delegator=identity.delegator_id,
                agent_id=identity.agent_id,
                purpose=identity.purpose,
                capabilities=[c.describe() for c in identity.capabilities],
                parent_execution_id=parent_execution_id,
                extra={"expires_at": str(identity.expires_at),
                       "budget": canonical_json(identity.budget.as_dict()),
                       "risk_envelope": str(identity.risk_envelope),
                       **({"sub_purpose": identity.sub_purpose}
                          if identity.sub_purpose is not None else {})},
            )
        return token

    def _refused(self, exc: DelegationError, *, agent: str, delegator: str | None,
                 parent: ExecutionIdentity | None = None) -> None:
        """Put a refused delegation on the record (never the subject token itself)."""
        if self.recorder is None:
            return
        code = "delegation." + (getattr(exc, "widened", None) or getattr(exc, "limit", None)
                                or getattr(exc, "rule", None) or type(exc).__name__)
        try:
            self.recorder.record(
                "delegation.refused", agent_id=agent, delegator=delegator,
                issuer=self.issuer,
                execution_id=parent.execution_id if parent else None,
                jti=parent.jti if parent else None,
                chain=parent.chain() if parent else None,
                decision={"outcome": "deny", "reasons": [
                    {"code": code, "message": str(exc), "policy_id": None}],
                          "policy_ids": []},
            )
        except Exception:  # the refusal stands whether or not it was recorded
            log.warning("could not record a refused delegation to `%s`", agent)

    @staticmethod
    def _new_ids() -> tuple[str, str]:
        return "exec_" + secrets.token_urlsafe(12), uuid.uuid4().hex

    # --- public API ---------------------------------------------------------------------

    def delegate(
        self,
        delegator: Principal | str,
        agent: str,
        purpose: str,
        capabilities: CapabilitiesLike,
        ttl: int | timedelta,
        budget: Budget | Mapping[str, int | None] | None = None,
        risk: int | None = None,
        *,
        depth: int = 1,
        memory_scopes: Iterable[str] | None = None,
    ) -> ExecutionToken:
        """Mint an execution token for ``agent`` on behalf of ``delegator``.

        ``memory_scopes``: what the run may read; default the agent's registry scopes, and
        never more than them. Every refusal raises a :class:`DelegationError` and is recorded
        as ``delegation.refused``.
        """
        principal: Principal | None = None
        try:
            principal = self._resolve_delegator(delegator)
            return self._delegate(principal, agent, purpose, capabilities, ttl, budget, risk,
                                  depth, memory_scopes)
        except DelegationError as exc:
            self._refused(exc, agent=agent, delegator=principal.id if principal else None)
            raise

    def _delegate(self, principal: Principal, agent: str, purpose: str,
                  capabilities: CapabilitiesLike, ttl: int | timedelta,
                  budget: Budget | Mapping[str, int | None] | None, risk: int | None,
                  depth: int, memory_scopes: Iterable[str] | None = None) -> ExecutionToken:
        spec = self._agent(agent)
        scopes = _memory_scopes(memory_scopes, spec.memory_scopes,
                                f"the registry scopes of agent `{agent}`")
        if isinstance(scopes, str):
            raise LimitExceededError(scopes, limit="memory_scopes")
        caps = _capabilities(capabilities)
        if not len(caps):
            raise CapabilityNotPermittedError("a delegation needs at least one capability",
                                              capability="", rule="broker.nonempty")
        self._check_within_agent(spec, caps)
        if principal.scopes is not None:
            for capability in caps:
                if not _scope_covers(principal.scopes, capability.action):
                    raise CapabilityNotPermittedError(
                        f"capability `{capability.action}` is outside the delegator's own scopes "
                        f"({', '.join(sorted(principal.scopes)) or 'none'})",
                        capability=capability.action, rule="delegator.scopes",
                    )
        seconds = _seconds(ttl)
        if seconds > spec.max_ttl_s or seconds > self.max_ttl_s:
            raise LimitExceededError(
                f"ttl {seconds}s exceeds the maximum of {min(spec.max_ttl_s, self.max_ttl_s)}s "
                f"for agent `{agent}`", limit="ttl",
            )
        requested = _budget(budget) or spec.max_budget
        # A dimension the caller leaves open takes the agent's maximum: never unlimited when
        # the registry limits it.
        grant = Budget(**{
            name: getattr(requested, name) if getattr(requested, name) is not None
            else getattr(spec.max_budget, name)
            for name in DIMENSIONS
        })
        over = grant.within(spec.max_budget)
        if over is not None:
            raise LimitExceededError(
                f"budget `{over}` exceeds the maximum of agent `{agent}` "
                f"({getattr(spec.max_budget, over)})", limit=f"budget.{over}",
            )
        envelope = spec.max_risk if risk is None else risk
        if type(envelope) is not int or not 0 <= envelope <= spec.max_risk:
            raise LimitExceededError(
                f"risk envelope {envelope!r} exceeds the maximum of agent `{agent}` "
                f"({spec.max_risk})", limit="risk",
            )
        if type(depth) is not int or not 0 <= depth <= self.max_depth:
            raise LimitExceededError(f"depth must be 0..{self.max_depth}", limit="depth")
        now = int(self._clock())
        execution_id, jti = self._new_ids()
        identity = ExecutionIdentity(
            execution_id=execution_id, jti=jti, issuer=self.issuer, audience=self.audience,
            issued_at=now, not_before=now, expires_at=now + seconds,
            agent_id=spec.id, agent_trust=spec.trust_level,
            delegator_type=principal.principal_type, delegator_id=principal.id,
            delegator_issuer=principal.issuer,
            actors=(Actor(spec.id, execution_id),), purpose=purpose, capabilities=caps,
            budget=grant, risk_envelope=envelope, depth=depth, ancestors=(),
            memory_scopes=scopes,
        )
        return self._mint(identity, "delegation.minted")

    def subdelegate(
        self,
        parent: ExecutionToken | str,
        agent: str,
        capabilities: CapabilitiesLike,
        ttl: int | timedelta | None,
        budget: Budget | Mapping[str, int | None] | None = None,
        risk: int | None = None,
        *,
        purpose: str | None = None,
        depth: int | None = None,
        memory_scopes: Iterable[str] | None = None,
    ) -> ExecutionToken:
        """Mint a child token for ``agent`` that is provably narrower than ``parent``.

        ``ttl=None``: what is left of the parent's window, capped by ``agent``'s maximum
        (computed from the same clock reading as the check that the child ends in time).

        ``memory_scopes`` default to the parent's scopes that ``agent``'s registry entry also
        has; asking for one outside either is refused.

        Every refusal raises a :class:`DelegationError` (:class:`WideningError` naming what
        would widen) and is recorded as ``delegation.refused``.
        """
        token = parent.token if isinstance(parent, ExecutionToken) else parent
        up: ExecutionIdentity | None = None
        try:
            try:
                up = self.verifier.verify(token)
            except TokenError as exc:
                raise DelegationError(f"the parent token is not valid: {exc}") from exc
            return self._subdelegate(up, agent, capabilities, ttl, budget, risk, purpose, depth,
                                     memory_scopes)
        except DelegationError as exc:
            self._refused(exc, agent=agent, delegator=up.delegator_id if up else None,
                          parent=up)
            raise

    def _subdelegate(self, up: ExecutionIdentity, agent: str, capabilities: CapabilitiesLike,
                     ttl: int | timedelta | None, budget: Budget | Mapping[str, int | None] | None,
                     risk: int | None, purpose: str | None, depth: int | None,
                     memory_scopes: Iterable[str] | None = None) -> ExecutionToken:
        parent_agent = self.registry.get(up.agent_id)
        if parent_agent is None or parent_agent.status != "active":
            raise DelegationError(f"parent agent `{up.agent_id}` is not active in the registry")
        if up.depth < 1:
            raise WideningError("the parent grant may not be sub-delegated (depth 0)",
                                widened="depth")
        child_depth = up.depth - 1 if depth is None else depth
        if type(child_depth) is not int or not 0 <= child_depth <= up.depth - 1:
            raise WideningError(
                f"depth {child_depth!r} is not below the parent's {up.depth}", widened="depth"
            )
        if agent not in parent_agent.may_delegate_to:
            raise WideningError(
                f"agent `{up.agent_id}` may not delegate to `{agent}` (registry rule "
                f"`agents.{up.agent_id}.may_delegate_to`)", widened="agent",
            )
        spec = self._agent(agent)
        from_parent = _memory_scopes(memory_scopes, up.memory_scopes,
                                     "the parent's memory scopes")
        if isinstance(from_parent, str):
            raise WideningError(from_parent, widened="memory_scopes")
        scopes = from_parent & spec.memory_scopes
        if memory_scopes is not None and scopes != from_parent:
            raise LimitExceededError(
                f"memory scopes {', '.join(f'`{s}`' for s in sorted(from_parent - scopes))} "
                f"are outside the registry scopes of agent `{agent}`", limit="memory_scopes")
        caps = _capabilities(capabilities)
        if not len(caps):
            raise WideningError(
                f"a sub-delegation needs at least one capability; nothing in the parent's grant "
                f"applies to agent `{agent}` (its actions: "
                f"{', '.join(sorted(spec.actions)) or 'none'})", widened="capability")
        widened = caps.widening(up.capabilities)
        if widened is not None:
            raise WideningError(f"capabilities widen the parent: {widened}", widened="capability")
        self._check_within_agent(spec, caps)
        now = int(self._clock())
        seconds = max(1, min(up.expires_at - now, spec.max_ttl_s)) if ttl is None \
            else _seconds(ttl)
        expires = now + seconds
        if expires > up.expires_at:
            raise WideningError(
                f"window ends {expires - up.expires_at}s after the parent's", widened="window"
            )
        if seconds > spec.max_ttl_s:
            raise LimitExceededError(f"ttl {seconds}s exceeds the maximum of agent `{agent}`",
                                     limit="ttl")
        remaining = self.store.remaining(up.key, up.budget.as_dict())
        requested = _budget(budget)
        values: dict[str, int | None] = {}
        for name in DIMENSIONS:
            left = remaining.get(name)
            mine = getattr(requested, name) if requested is not None else None
            if mine is None:
                # An open dimension inherits what is left of the parent's: never wider.
                mine = left
            agent_max = getattr(spec.max_budget, name)
            if left is not None and (mine is None or mine > left):
                raise WideningError(
                    f"budget `{name}` {mine!r} exceeds the parent's remaining {left}",
                    widened=f"budget.{name}",
                )
            if agent_max is not None and (mine is None or mine > agent_max):
                if requested is None or getattr(requested, name) is None:
                    mine = agent_max
                else:
                    raise LimitExceededError(
                        f"budget `{name}` exceeds the maximum of agent `{agent}` ({agent_max})",
                        limit=f"budget.{name}",
                    )
            values[name] = mine
        envelope = min(up.risk_envelope, spec.max_risk) if risk is None else risk
        if type(envelope) is not int or envelope > up.risk_envelope or envelope < 0:
            raise WideningError(f"risk envelope {envelope!r} exceeds the parent's "
                                f"{up.risk_envelope}", widened="risk")
        if envelope > spec.max_risk:
            raise LimitExceededError(f"risk envelope exceeds the maximum of agent `{agent}`",
                                     limit="risk")
        execution_id, jti = self._new_ids()
        identity = ExecutionIdentity(
            execution_id=execution_id, jti=jti, issuer=self.issuer, audience=self.audience,
            issued_at=now, not_before=max(now, up.not_before), expires_at=expires,
            agent_id=spec.id, agent_trust=spec.trust_level,
            delegator_type=up.delegator_type, delegator_id=up.delegator_id,
            delegator_issuer=up.delegator_issuer,
            actors=(Actor(spec.id, execution_id), *up.actors),
            # The consented purpose is the delegator's: a parent agent may add a narrower
            # sub-purpose (recorded as such), never rewrite what the human agreed to.
            purpose=up.purpose,
            sub_purpose=_sub_purpose(purpose, up.sub_purpose),
            capabilities=caps, budget=Budget(**values), risk_envelope=envelope,
            depth=child_depth, ancestors=(*up.ancestors, up.jti),
            ancestor_budgets=(*up.ancestor_budgets, up.budget),
            memory_scopes=scopes,
        )
        return self._mint(identity, "delegation.subdelegated",
                          parent_execution_id=up.execution_id)

    def narrowed_capabilities(self, parent: ExecutionIdentity, agent: str) -> CapabilitySet:
        """The parent's grant intersected with ``agent``'s registry tools.

        Each parent capability is kept for every registry action of ``agent`` it covers, with
        the parent's constraints (a wildcard ``refund:*`` becomes ``refund:create`` …).
        """
        spec = self._agent(agent)
        narrowed: list[Capability] = []
        for action in sorted(spec.actions):
            for capability in parent.capabilities:
                if capability.covers(action):
                    candidate = Capability(action, capability.constraints)
                    if candidate not in narrowed:
                        narrowed.append(candidate)
        return CapabilitySet(tuple(narrowed))

    def subdelegate_for(
        self,
        parent: ExecutionToken | str,
        agent: str,
        *,
        capabilities: CapabilitiesLike | None = None,
        ttl: int | timedelta | None = None,
        budget: Budget | Mapping[str, int | None] | None = None,
        purpose: str | None = None,
        memory_scopes: Iterable[str] | None = None,
    ) -> ExecutionToken:
        """Sub-delegate to ``agent`` with sensible narrowing defaults (used by the adapters).

        Capabilities default to :meth:`narrowed_capabilities`; the window to what is left of the
        parent's (capped by the agent's maximum); the budget to the parent's remainder capped by
        the agent's maxima. Raises :class:`WideningError` when nothing of the grant applies.
        """
        token = parent.token if isinstance(parent, ExecutionToken) else parent
        up = self.verifier.verify(token)
        caps = _capabilities(capabilities) if capabilities is not None else (
            self.narrowed_capabilities(up, agent))
        # Every refusal (agent not delegable, nothing applies, ...) is decided and recorded
        # by subdelegate, in that order.
        return self.subdelegate(token, agent, caps, ttl, budget, purpose=purpose,
                                memory_scopes=memory_scopes)

    def end(self, token: ExecutionToken | ExecutionIdentity | str, *,
            reason: str = "completed") -> None:
        """End an execution when its task is done: the token and every token sub-delegated
        from it stop working (revocation reaches descendants through their ancestors), and an
        ``execution.ended`` event is recorded. Idempotent."""
        if isinstance(token, ExecutionToken):
            identity = token.identity
        elif isinstance(token, ExecutionIdentity):
            identity = token
        else:
            identity = self.verifier.verify(token, check_revocation=False)
        self.store.revoke(identity.key, expires_at=identity.expires_at)
        if self.recorder is not None:
            self.recorder.record(
                "execution.ended", execution_id=identity.execution_id, jti=identity.jti,
                issuer=identity.issuer, chain=identity.chain(), delegator=identity.delegator_id,
                agent_id=identity.agent_id, purpose=identity.purpose,
                extra={"reason": reason},
            )

    def revoke(self, token: ExecutionToken | ExecutionIdentity | str, *,
               expires_at: int | None = None) -> str:
        """Revoke a token (or a ``jti``); every descendant stops verifying with it.

        Revoking by ``jti`` without the token keeps the entry for the broker's maximum TTL.
        """
        if isinstance(token, ExecutionToken):
            identity: ExecutionIdentity | None = token.identity
        elif isinstance(token, ExecutionIdentity):
            identity = token
        elif token.count(".") == 2:
            identity = self.verifier.verify(token, check_revocation=False)
        else:
            identity = None
        if identity is not None:
            jti, until = identity.jti, identity.expires_at
        else:
            jti, until = token, int(self._clock()) + self.max_ttl_s  # type: ignore[assignment]
        self.store.revoke(f"{self.issuer}|{jti}", expires_at=expires_at or until)
        if self.recorder is not None:
            self.recorder.record(
                "delegation.revoked", jti=jti, issuer=self.issuer,
                execution_id=identity.execution_id if identity else None,
                agent_id=identity.agent_id if identity else None,
            )
        return str(jti)
