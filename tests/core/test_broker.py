"""The delegation broker: the mission's example, refusals, sub-delegation that only narrows."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from agentic_iam._resources import default_registry_path
from agentic_iam.core.broker import DelegationBroker, OIDCProvider
from agentic_iam.core.identity import Budget, Human, Workload
from agentic_iam.core.keys import KeySet
from agentic_iam.core.registry import AgentRegistry
from agentic_iam.core.store.memory import MemoryStore
from agentic_iam.core.tokens import TokenVerifier
from agentic_iam.errors import (
    AgentSuspendedError,
    CapabilityNotPermittedError,
    DelegationError,
    LimitExceededError,
    RevokedTokenError,
    SubjectTokenError,
    UnknownAgentError,
    WideningError,
)

ALICE = Human("alice@example.com")
AUD = "agentic-iam-test"


@pytest.fixture
def broker() -> DelegationBroker:
    registry = AgentRegistry.from_yaml(default_registry_path())
    return DelegationBroker(registry, KeySet.generate("https://broker.test"), audience=AUD,
                            store=MemoryStore())


def refund_for_alice(broker: DelegationBroker, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "delegator": ALICE, "agent": "support-agent", "purpose": "refund T-1042",
        "capabilities": ["refund:create amount<=100", "ticket:read"], "ttl": 15 * 60,
        "budget": Budget(tool_calls=20, cost=500),
    }
    args.update(kw)
    return broker.delegate(**args)


def test_mission_example(broker: DelegationBroker) -> None:
    token = refund_for_alice(broker)
    identity = broker.verifier.verify(token.token)
    assert identity.delegator_id == "alice@example.com"
    assert identity.agent_id == "support-agent"
    assert identity.expires_at - identity.issued_at == 900
    assert [c.describe() for c in identity.capabilities] == [
        "refund:create amount<=100", "ticket:read"]
    assert identity.capabilities.check("refund:create", {"amount": 50}).ok
    assert not identity.capabilities.check("refund:create", {"amount": 500}).ok
    assert not identity.capabilities.check("account:delete", {}).ok
    # llm_tokens was left open: it takes the agent's registry maximum, never "unlimited".
    assert identity.budget == Budget(tool_calls=20, cost=500, llm_tokens=200_000)
    assert identity.depth == 1 and identity.ancestors == ()
    assert [(a.agent_id, a.execution_id) for a in identity.actors] == [
        ("support-agent", identity.execution_id)]
    assert token.token not in repr(token)


def test_account_delete_is_refused_naming_capability_and_rule(broker: DelegationBroker) -> None:
    with pytest.raises(CapabilityNotPermittedError) as info:
        refund_for_alice(broker, capabilities=["account:delete", "ticket:read"])
    assert info.value.capability == "account:delete"
    assert info.value.rule == "agents.support-agent.tools"
    assert "account:delete" in str(info.value) and "agents.support-agent.tools" in str(info.value)


def test_registry_checks(broker: DelegationBroker) -> None:
    with pytest.raises(UnknownAgentError):
        refund_for_alice(broker, agent="ghost-agent")
    with pytest.raises(AgentSuspendedError):
        refund_for_alice(broker, agent="legacy-agent", capabilities=["ticket:read"])
    with pytest.raises(LimitExceededError) as ttl:
        refund_for_alice(broker, ttl=2 * 3600)
    assert ttl.value.limit == "ttl"
    with pytest.raises(LimitExceededError) as budget:
        refund_for_alice(broker, budget=Budget(cost=10**9))
    assert budget.value.limit == "budget.cost"
    with pytest.raises(LimitExceededError):
        refund_for_alice(broker, risk=10**6)
    with pytest.raises(CapabilityNotPermittedError):
        refund_for_alice(broker, capabilities=[])


def test_workload_delegator(broker: DelegationBroker) -> None:
    token = broker.delegate(Workload("nightly-reconcile-job"), "reconcile-agent", "reconcile",
                            ["ledger:read", "ledger:adjust amount<=1000"], ttl=3600)
    assert token.identity.delegator_type == "workload"


# --- sub-delegation ---------------------------------------------------------------------------


def test_narrower_subdelegation_succeeds_with_both_hops(broker: DelegationBroker) -> None:
    parent = refund_for_alice(broker)
    child = broker.subdelegate(parent, "refund-bot", ["refund:create amount<=50"], ttl=300,
                               budget=Budget(tool_calls=5, cost=200))
    identity = broker.verifier.verify(child.token)
    assert [(a.agent_id, a.execution_id) for a in identity.actors] == [
        ("refund-bot", identity.execution_id), ("support-agent", parent.identity.execution_id)]
    assert identity.ancestors == (parent.identity.jti,)
    assert identity.ancestor_budgets == (parent.identity.budget,)
    assert identity.depth == 0
    assert identity.delegator_id == "alice@example.com"
    assert identity.expires_at <= parent.identity.expires_at
    chain = identity.chain()
    assert [h["id"] for h in chain] == ["alice@example.com", "support-agent", "refund-bot"]


@pytest.mark.parametrize(("kwargs", "widened"), [
    ({"capabilities": ["ticket:read", "refund:create amount<=50"], "agent": "support-agent"},
     "agent"),
    ({"capabilities": ["refund:*"]}, "capability"),
    ({"capabilities": ["refund:create amount<=150"]}, "capability"),
    ({"capabilities": ["refund:create"]}, "capability"),
    ({"capabilities": ["refund:create amount<=50"], "ttl": 3600}, "window"),
    ({"capabilities": ["refund:create amount<=50"], "budget": Budget(tool_calls=5, cost=501)},
     "budget.cost"),
    ({"capabilities": ["refund:create amount<=50"], "budget": Budget(tool_calls=21, cost=5)},
     "budget.tool_calls"),
    ({"capabilities": ["refund:create amount<=50"], "depth": 1}, "depth"),
    ({"capabilities": ["refund:create amount<=50"], "risk": 101}, "risk"),
])
def test_widening_subdelegation_is_refused(broker: DelegationBroker, kwargs: dict[str, Any],
                                           widened: str) -> None:
    parent = refund_for_alice(broker)
    args: dict[str, Any] = {"agent": "refund-bot", "ttl": 300,
                            "budget": Budget(tool_calls=5, cost=100)}
    args.update(kwargs)
    with pytest.raises(WideningError) as info:
        broker.subdelegate(parent, **args)
    assert info.value.widened == widened
    assert str(info.value)


def test_open_budget_dimensions_inherit_the_parents_remainder(broker: DelegationBroker) -> None:
    parent = refund_for_alice(broker, budget=Budget(tool_calls=4, cost=500))
    child = broker.subdelegate(parent, "refund-bot", ["refund:create amount<=50"], ttl=60,
                               budget=Budget(cost=5))
    assert child.identity.budget.tool_calls == 4          # the parent's remainder
    assert child.identity.budget.llm_tokens == 50_000     # capped by refund-bot's maximum


def test_subdelegation_from_depth_zero_is_refused(broker: DelegationBroker) -> None:
    parent = refund_for_alice(broker, depth=0)
    with pytest.raises(WideningError) as info:
        broker.subdelegate(parent, "refund-bot", ["refund:create amount<=50"], ttl=60,
                           budget=Budget(tool_calls=1, cost=1))
    assert info.value.widened == "depth"


def test_budget_is_carved_from_the_parents_remainder(broker: DelegationBroker) -> None:
    parent = refund_for_alice(broker)
    broker.store.charge([parent.identity.key], {"cost": 450})
    with pytest.raises(WideningError) as info:
        broker.subdelegate(parent, "refund-bot", ["refund:create amount<=50"], ttl=60,
                           budget=Budget(tool_calls=1, cost=100))
    assert info.value.widened == "budget.cost" and "50" in str(info.value)
    child = broker.subdelegate(parent, "refund-bot", ["refund:create amount<=50"], ttl=60,
                               budget=Budget(tool_calls=1, cost=50))
    assert child.identity.budget.cost == 50


# --- revocation -------------------------------------------------------------------------------


def test_revoking_a_parent_revokes_every_descendant(broker: DelegationBroker) -> None:
    parent = refund_for_alice(broker, depth=2)
    child = broker.subdelegate(parent, "refund-bot", ["refund:create amount<=50"], ttl=300,
                               budget=Budget(tool_calls=5, cost=100))
    broker.revoke(parent)
    with pytest.raises(RevokedTokenError):
        broker.verifier.verify(parent.token)
    with pytest.raises(RevokedTokenError) as info:
        broker.verifier.verify(child.token)
    assert info.value.jti == parent.identity.jti
    with pytest.raises(DelegationError):
        broker.subdelegate(parent, "refund-bot", ["refund:create amount<=5"], ttl=60,
                           budget=Budget(tool_calls=1, cost=1))


def test_revoke_by_jti(broker: DelegationBroker) -> None:
    token = refund_for_alice(broker)
    broker.revoke(token.identity.jti)
    with pytest.raises(RevokedTokenError):
        broker.verifier.verify(token.token)


# --- external IdP tokens (RFC 8693 subject_token) ------------------------------------------------


@pytest.fixture
def idp() -> tuple[Any, OIDCProvider]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk["kid"] = "idp-key-1"
    provider = OIDCProvider("https://idp.example.com", "aiam-broker", jwks={"keys": [jwk]},
                            algorithms=("RS256",))
    return private, provider


def _idp_token(private: Any, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": "https://idp.example.com", "aud": "aiam-broker", "sub": "alice@example.com",
            "iat": now, "exp": now + 300, "scope": "refund:create ticket:read"}
    body.update(claims)
    return jwt.encode(body, private, algorithm="RS256", headers={"kid": "idp-key-1"})


def test_idp_token_delegates_within_the_humans_scopes(idp: tuple[Any, OIDCProvider]) -> None:
    private, provider = idp
    registry = AgentRegistry.from_yaml(default_registry_path())
    broker = DelegationBroker(registry, KeySet.generate("https://broker.test"), audience=AUD,
                              idps=[provider])
    token = broker.delegate(_idp_token(private), "support-agent", "refund",
                            ["refund:create amount<=100"], ttl=600)
    assert token.identity.delegator_id == "alice@example.com"
    assert token.identity.delegator_issuer == "https://idp.example.com"
    with pytest.raises(CapabilityNotPermittedError) as info:
        broker.delegate(_idp_token(private), "support-agent", "mail", ["email:send"], ttl=600)
    assert info.value.rule == "delegator.scopes"


@pytest.mark.parametrize("claims", [
    {"aud": "someone-else"}, {"iss": "https://evil.example.com"}, {"exp": int(time.time()) - 100},
])
def test_bad_idp_tokens_are_refused(idp: tuple[Any, OIDCProvider], claims: dict[str, Any]) -> None:
    private, provider = idp
    registry = AgentRegistry.from_yaml(default_registry_path())
    broker = DelegationBroker(registry, KeySet.generate("https://broker.test"), audience=AUD,
                              idps=[provider])
    with pytest.raises(SubjectTokenError):
        broker.delegate(_idp_token(private, **claims), "support-agent", "refund",
                        ["ticket:read"], ttl=600)


def test_idp_token_signed_by_another_key_is_refused(idp: tuple[Any, OIDCProvider]) -> None:
    _, provider = idp
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    registry = AgentRegistry.from_yaml(default_registry_path())
    broker = DelegationBroker(registry, KeySet.generate("https://broker.test"), audience=AUD,
                              idps=[provider])
    with pytest.raises(SubjectTokenError):
        broker.delegate(_idp_token(other), "support-agent", "refund", ["ticket:read"], ttl=600)


def test_verifier_from_published_jwks(broker: DelegationBroker) -> None:
    token = refund_for_alice(broker)
    public = KeySet.from_jwks(broker.issuer, broker.keys.to_jwks())
    assert TokenVerifier(public, audience=AUD).verify(token.token) == token.identity


def test_refused_delegations_are_on_the_record() -> None:
    from agentic_iam import MemorySink, Recorder

    sink = MemorySink()
    registry = AgentRegistry.from_yaml(default_registry_path())
    broker = DelegationBroker(registry, KeySet.generate("https://broker.test"), audience=AUD,
                              recorder=Recorder([sink]))
    with pytest.raises(CapabilityNotPermittedError):
        broker.delegate(ALICE, "support-agent", "x", ["account:delete"], ttl=60)
    parent = broker.delegate(ALICE, "support-agent", "x", ["refund:create amount<=100"],
                             ttl=600, budget=Budget(tool_calls=5, cost=100))
    with pytest.raises(WideningError):
        broker.subdelegate(parent, "refund-bot", ["refund:create amount<=500"], ttl=60)
    refused = [e for e in sink.events if e.event_type == "delegation.refused"]
    assert len(refused) == 2
    first, second = refused
    assert first.delegator == "alice@example.com" and first.agent_id == "support-agent"
    assert first.decision is not None and first.decision.outcome == "deny"
    assert "account:delete" in first.decision.reasons[0].message
    assert second.decision is not None
    assert second.decision.reasons[0].code == "delegation.capability"
    assert second.execution_id == parent.identity.execution_id
