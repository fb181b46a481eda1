"""Accountable approvals (issue 13 item 9): who may answer, separation of duties, on the record.

Every answer is checked before anything changes: an IdP-verified ``Human`` or a configured
approver id, never the requesting agent, its execution or an agent of its delegation chain; every
grant, denial and refusal is an audit event naming the approver, written before the store changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentic_iam import (
    ApprovalError,
    ApprovalManager,
    ApproverRefusedError,
    AuditError,
    CallbackApprover,
    ConsoleApprover,
    GuardConfig,
    Human,
    MemorySink,
    MemoryStore,
    OIDCProvider,
    Recorder,
    ToolCall,
)
from agentic_iam.core.approvals import ApprovalRequest, call_binding
from agentic_iam.core.provenance import AuditEvent

from ..conftest import ALICE, Env, EnvFactory

CHAIN = [
    {"principal_type": "human", "id": "alice@example.com", "execution_id": None},
    {"principal_type": "agent", "id": "support-agent", "execution_id": "exec_parent"},
    {"principal_type": "agent", "id": "refund-bot", "execution_id": "exec_child"},
]


@dataclass
class Setup:
    store: MemoryStore
    sink: MemorySink
    manager: ApprovalManager

    def ask(self, **overrides: Any) -> ApprovalRequest:
        fields: dict[str, Any] = {
            "binding": call_binding("exec_child", "create_refund", {"amount": 150}),
            "execution_id": "exec_child", "agent_id": "refund-bot",
            "delegator": "alice@example.com", "tool": "create_refund",
            "action": "refund:create", "arguments": {"amount": 150},
            "reasons": ("refunds over 100 need a human",), "policy_ids": ("refund-over-100",),
            "chain": CHAIN}
        fields.update(overrides)
        request, answer = self.manager.request(**fields)
        assert answer is None
        return request

    def events(self, kind: str) -> list[AuditEvent]:
        return [e for e in self.sink.events if e.event_type == kind]

    def status(self, request_id: str) -> str:
        record = self.store.get_approval(request_id)
        assert record is not None
        return str(record["status"])


def make(approvers: tuple[str, ...] = ("bob@example.com",), **kwargs: Any) -> Setup:
    store, sink = MemoryStore(), MemorySink()
    manager = ApprovalManager(store, recorder=Recorder([sink]), approvers=approvers, **kwargs)
    return Setup(store, sink, manager)


# --- who may answer -------------------------------------------------------------------------------


def test_a_configured_approver_answers_on_the_record() -> None:
    s = make()
    request = s.ask()
    record = s.manager.resolve(request.request_id, approved=True, approver="bob@example.com")
    assert record["status"] == "approved" and record["approver"] == "bob@example.com"
    (granted,) = s.events("approval.granted")
    assert granted.extra == {"approval_id": request.request_id, "approver": "bob@example.com"}
    assert granted.decision is not None and granted.decision.outcome == "allow"
    assert granted.decision.reasons[0].code == "approval.granted"
    # the event says who asked, for whom, and through which chain
    assert granted.execution_id == "exec_child" and granted.agent_id == "refund-bot"
    assert granted.delegator == "alice@example.com"
    assert granted.chain is not None and [h.id for h in granted.chain] == [
        "alice@example.com", "support-agent", "refund-bot"]


def test_a_denial_names_the_approver() -> None:
    s = make()
    request = s.ask()
    s.manager.resolve(request.request_id, approved=False, approver="bob@example.com")
    assert s.status(request.request_id) == "denied"
    (denied,) = s.events("approval.denied")
    assert denied.extra == {"approval_id": request.request_id, "approver": "bob@example.com"}
    assert denied.decision is not None and denied.decision.reasons[0].code == "approval.denied"


@pytest.mark.parametrize(("approver", "message"), [
    ("mallory", "approver `mallory` is not a configured approver"),
    ("Bob@example.com", "approver `Bob@example.com` is not a configured approver"),
    ("", "the approver is empty"),
    ("   ", "the approver is empty"),
    (42, "an approver must be a `Human` or a configured approver id, got `int`"),
    (None, "got `NoneType`"),
    (Human("mallory"), "approver `mallory` is not a configured approver"),
])
def test_anyone_else_is_refused_recorded_and_changes_nothing(approver: Any,
                                                             message: str) -> None:
    s = make()
    request = s.ask()
    with pytest.raises(ApproverRefusedError) as info:
        s.manager.resolve(request.request_id, approved=True, approver=approver)
    assert message in str(info.value)
    assert info.value.code == "approval.approver_unknown"
    assert info.value.request_id == request.request_id
    assert s.status(request.request_id) == "pending"
    assert s.events("approval.granted") == []
    (refused,) = s.events("approval.denied")
    assert refused.extra is not None and refused.extra["refused"] == "approve"
    assert refused.decision is not None
    assert refused.decision.reasons[0].code == "approval.approver_unknown"
    assert message in refused.decision.reasons[0].message
    # a configured approver can still answer afterwards
    s.manager.resolve(request.request_id, approved=True, approver="bob@example.com")
    assert s.status(request.request_id) == "approved"


def test_with_no_approvers_configured_no_name_is_accepted() -> None:
    s = make(approvers=())
    request = s.ask()
    with pytest.raises(ApproverRefusedError, match="not a configured approver"):
        s.manager.resolve(request.request_id, approved=True, approver="bob@example.com")
    assert s.status(request.request_id) == "pending"


def test_a_local_human_is_a_name_and_must_be_configured() -> None:
    s = make()
    request = s.ask()
    s.manager.resolve(request.request_id, approved=True, approver=Human("bob@example.com"))
    assert s.events("approval.granted")[0].extra == {"approval_id": request.request_id,
                                                     "approver": "bob@example.com"}


@pytest.fixture
def idp() -> tuple[Ed25519PrivateKey, OIDCProvider]:
    private = Ed25519PrivateKey.generate()
    jwk = jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk["kid"] = "idp-1"
    return private, OIDCProvider("https://idp.example.com", "aiam-approvals",
                                 jwks={"keys": [jwk]})


def _id_token(private: Ed25519PrivateKey, sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"iss": "https://idp.example.com", "aud": "aiam-approvals", "sub": sub,
                       "iat": now, "exp": now + 300}, private, algorithm="EdDSA",
                      headers={"kid": "idp-1"})


def test_a_human_verified_by_an_idp_answers_without_configuration(
        idp: tuple[Ed25519PrivateKey, OIDCProvider]) -> None:
    private, provider = idp
    s = make(approvers=())
    request = s.ask()
    s.manager.resolve(request.request_id, approved=True,
                      approver=provider.verify(_id_token(private, "carol@example.com")))
    record = s.store.get_approval(request.request_id)
    assert record is not None and record["approver"] == "carol@example.com"
    (granted,) = s.events("approval.granted")
    assert granted.extra == {"approval_id": request.request_id, "approver": "carol@example.com",
                             "approver_issuer": "https://idp.example.com"}


# --- separation of duties -------------------------------------------------------------------------


@pytest.mark.parametrize(("approver", "message"), [
    ("refund-bot", "the requesting agent cannot approve its own call"),
    ("REFUND-BOT", "the requesting agent cannot approve its own call"),
    (" ｒｅｆｕｎｄ-ｂｏｔ ", "the requesting agent cannot approve its own call"),  # fullwidth
    ("exec_child", "the requesting execution cannot approve its own call"),
    ("support-agent", "agent `support-agent` is in the requesting delegation chain"),
    ("exec_parent", "agent `support-agent` is in the requesting delegation chain"),
])
def test_the_requesting_agent_and_its_chain_are_refused_even_when_configured(
        approver: str, message: str) -> None:
    s = make(approvers=("bob@example.com", approver.strip()))
    request = s.ask()
    for answer in (True, False):
        with pytest.raises(ApproverRefusedError) as info:
            s.manager.resolve(request.request_id, approved=answer, approver=approver)
        assert message in str(info.value)
        assert info.value.code == "approval.separation_of_duties"
    assert s.status(request.request_id) == "pending"
    refusals = s.events("approval.denied")
    assert [e.extra["refused"] for e in refusals if e.extra] == ["approve", "deny"]
    assert all(e.decision and e.decision.reasons[0].code == "approval.separation_of_duties"
               for e in refusals)


def test_an_idp_human_with_an_agents_id_is_refused(
        idp: tuple[Ed25519PrivateKey, OIDCProvider]) -> None:
    private, provider = idp
    s = make()
    request = s.ask()
    with pytest.raises(ApproverRefusedError, match="requesting delegation chain"):
        s.manager.resolve(request.request_id, approved=True,
                          approver=provider.verify(_id_token(private, "support-agent")))


def test_the_delegator_may_approve_the_call_made_on_her_behalf() -> None:
    s = make(approvers=("alice@example.com",))
    request = s.ask()
    s.manager.resolve(request.request_id, approved=True, approver="alice@example.com")
    assert s.status(request.request_id) == "approved"


def test_the_request_records_agent_execution_and_chain() -> None:
    s = make()
    request = s.ask()
    record = s.manager.get(request.request_id)
    payload = record["payload"]
    assert payload["agent_id"] == "refund-bot" and payload["execution_id"] == "exec_child"
    assert payload["chain"] == CHAIN
    (asked,) = s.events("approval.requested")
    assert asked.chain is not None and [h.id for h in asked.chain][-1] == "refund-bot"


def test_the_chain_defaults_to_the_audit_chain_then_to_the_agent_alone() -> None:
    s = make()
    from_audit = s.ask(chain=None, audit={"chain": CHAIN[:2], "call_id": "c1"})
    assert s.manager.get(from_audit.request_id)["payload"]["chain"] == CHAIN[:2]
    alone = s.ask(chain=None, binding="other")
    assert s.manager.get(alone.request_id)["payload"]["chain"] == [
        {"principal_type": "agent", "id": "refund-bot", "execution_id": "exec_child"}]
    with pytest.raises(ApproverRefusedError, match="requesting agent"):
        s.manager.resolve(alone.request_id, approved=True, approver="refund-bot")


def test_a_request_that_does_not_say_who_asked_cannot_be_answered() -> None:
    s = make()
    s.store.put_approval("apr_legacy", "exec_x:digest", {"agent_id": "support-agent",
                                                         "execution_id": "exec_x"}, ttl_s=60)
    with pytest.raises(ApproverRefusedError) as info:
        s.manager.resolve("apr_legacy", approved=True, approver="bob@example.com")
    assert info.value.code == "approval.unattributed"
    assert "does not record the requesting agent" in str(info.value)
    assert s.status("apr_legacy") == "pending"


# --- in-process approvers ---------------------------------------------------------------------


def test_an_in_process_approver_answers_as_its_name() -> None:
    store, sink = MemoryStore(), MemorySink()
    manager = ApprovalManager(store, CallbackApprover(lambda r: True, name="on-call-lead"),
                              recorder=Recorder([sink]))
    request, answer = manager.request(
        binding="b", execution_id="exec_1", agent_id="support-agent", delegator="alice",
        tool="t", action="a", arguments={}, reasons=(), policy_ids=())
    assert answer is True
    record = store.get_approval(request.request_id)
    assert record is not None and record["approver"] == "on-call-lead"
    granted = [e for e in sink.events if e.event_type == "approval.granted"]
    assert granted[0].extra == {"approval_id": request.request_id, "approver": "on-call-lead"}
    # its name is not a configured approver for anyone else's answer
    other, _ = ApprovalManager(store).request(
        binding="c", execution_id="exec_1", agent_id="support-agent", delegator="alice",
        tool="t", action="a", arguments={}, reasons=(), policy_ids=())
    with pytest.raises(ApproverRefusedError):
        manager.resolve(other.request_id, approved=True, approver="on-call-lead")


def test_a_console_approver_has_a_name() -> None:
    s = make(approvers=())
    manager = ApprovalManager(s.store, ConsoleApprover("bob@example.com",
                                                       input_fn=lambda prompt: "y"),
                              recorder=Recorder([s.sink]))
    request, answer = manager.request(
        binding="b", execution_id="exec_1", agent_id="support-agent", delegator="alice",
        tool="t", action="a", arguments={}, reasons=(), policy_ids=())
    assert answer is True and s.status(request.request_id) == "approved"
    assert s.events("approval.granted")[0].extra == {"approval_id": request.request_id,
                                                     "approver": "bob@example.com"}


@dataclass(frozen=True)
class Nameless:
    def decide(self, request: ApprovalRequest) -> bool | None:
        return True


@pytest.mark.parametrize("approver", [
    CallbackApprover(lambda r: True, name=""), CallbackApprover(lambda r: True, name="  "),
    Nameless(),
])
def test_an_approver_without_an_accountable_identity_is_refused_up_front(approver: Any) -> None:
    with pytest.raises(ApprovalError, match="no accountable identity"):
        ApprovalManager(MemoryStore(), approver)


def test_configured_approvers_are_checked() -> None:
    with pytest.raises(ApprovalError, match="not one string"):
        ApprovalManager(MemoryStore(), approvers="bob")
    with pytest.raises(ApprovalError, match="non-empty id"):
        ApprovalManager(MemoryStore(), approvers=["bob", ""])


# --- on the record, before it takes effect -------------------------------------------------------


@dataclass
class FailingSink:
    durable: bool = True
    fail_on: str = "approval.granted"

    def emit(self, event: AuditEvent) -> None:
        if event.event_type == self.fail_on:
            raise OSError("disk full")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_an_answer_that_cannot_be_recorded_is_not_applied() -> None:
    store = MemoryStore()
    manager = ApprovalManager(store, recorder=Recorder([FailingSink()]),
                              approvers=["bob@example.com"])
    request, _ = manager.request(
        binding="b", execution_id="exec_1", agent_id="support-agent", delegator="alice",
        tool="t", action="a", arguments={}, reasons=(), policy_ids=())
    with pytest.raises(AuditError):
        manager.resolve(request.request_id, approved=True, approver="bob@example.com")
    record = store.get_approval(request.request_id)
    assert record is not None and record["status"] == "pending"
    assert not store.consume_approval("b")


@dataclass
class RacingSink:
    """Records events; when the grant is recorded, another approver denies the request first."""

    store: MemoryStore
    events: list[AuditEvent] = field(default_factory=list)
    durable: bool = True

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)
        if event.event_type == "approval.granted" and event.extra:
            self.store.resolve_approval(event.extra["approval_id"], approved=False,
                                        approver="carol@example.com")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_recorded_answer_that_did_not_apply_is_marked_so() -> None:
    store = MemoryStore()
    sink = RacingSink(store)
    manager = ApprovalManager(store, recorder=Recorder([sink]), approvers=["bob@example.com"])
    request, _ = manager.request(
        binding="b", execution_id="exec_1", agent_id="support-agent", delegator="alice",
        tool="t", action="a", arguments={}, reasons=(), policy_ids=())
    with pytest.raises(ApprovalError, match="already resolved"):
        manager.resolve(request.request_id, approved=True, approver="bob@example.com")
    kinds = [(e.event_type, e.decision.reasons[0].code if e.decision else None)
             for e in sink.events]
    assert kinds[-2:] == [("approval.granted", "approval.granted"),
                          ("approval.denied", "approval.not_applied")]
    assert not store.consume_approval("b")


def test_an_answered_request_cannot_be_answered_again() -> None:
    s = make(approvers=("bob@example.com", "carol@example.com"))
    request = s.ask()
    s.manager.resolve(request.request_id, approved=False, approver="bob@example.com")
    with pytest.raises(ApprovalError, match="already resolved"):
        s.manager.resolve(request.request_id, approved=True, approver="carol@example.com")
    assert s.events("approval.granted") == []
    with pytest.raises(ApprovalError, match="unknown or expired"):
        s.manager.resolve("apr_nope", approved=True, approver="bob@example.com")


# --- end to end through the Guard -------------------------------------------------------------


def refund(amount: int) -> ToolCall:
    return ToolCall("create_refund", {"amount": amount, "currency": "USD", "account": "ACC-1001"})


def test_an_agent_cannot_approve_its_own_call_through_the_guard(make_env: EnvFactory) -> None:
    # Even a misconfiguration that lists the agent as an approver does not let it approve.
    env = make_env(config=GuardConfig(approvers=frozenset({"bob@example.com",
                                                           "support-agent"})))
    token = env.refund_token(max_amount=200)
    asked = env.guard.authorize(token, refund(150))
    assert asked.outcome == "approval_required" and asked.approval_id is not None

    for approver in ("support-agent", token.identity.execution_id):
        with pytest.raises(ApproverRefusedError, match="cannot approve its own call"):
            env.guard.resolve_approval(asked.approval_id, approved=True, approver=approver)
    with pytest.raises(ApproverRefusedError, match="approver `mallory` is not a configured"):
        env.guard.resolve_approval(asked.approval_id, approved=True, approver="mallory")

    again = env.guard.authorize(token, refund(150))
    assert again.outcome == "approval_required" and again.approval_id == asked.approval_id
    refusals = [e for e in env.sink.events if e.event_type == "approval.denied"]
    assert [(e.extra or {}).get("approver") for e in refusals] == [
        "support-agent", token.identity.execution_id, "mallory"]
    for event in refusals:
        assert event.execution_id == token.identity.execution_id
        assert event.agent_id == "support-agent"
        assert event.chain is not None and event.chain[-1].id == "support-agent"
    assert [e for e in env.sink.events if e.event_type == "approval.granted"] == []

    env.guard.resolve_approval(asked.approval_id, approved=True, approver="bob@example.com")
    allowed = env.guard.authorize(token, refund(150))
    assert allowed.outcome == "allow" and allowed.reasons[0].code == "approval.granted"
    (granted,) = [e for e in env.sink.events if e.event_type == "approval.granted"]
    assert granted.extra == {"approval_id": asked.approval_id, "approver": "bob@example.com"}


def test_a_parent_agent_cannot_approve_its_childs_call(env: Env) -> None:
    parent = env.broker.delegate(ALICE, "support-agent", "refund T-1042",
                                 ["refund:create amount<=200", "ticket:read"], 900)
    child = env.broker.subdelegate(parent, "refund-bot", ["refund:create amount<=200"],
                                   ttl=300)
    asked = env.guard.authorize(child, refund(150))
    assert asked.outcome == "approval_required" and asked.approval_id is not None
    for approver in ("support-agent", parent.identity.execution_id, "refund-bot"):
        with pytest.raises(ApproverRefusedError) as info:
            env.guard.resolve_approval(asked.approval_id, approved=True, approver=approver)
        assert info.value.code == "approval.separation_of_duties"
    assert env.guard.authorize(child, refund(150)).outcome == "approval_required"


def test_an_in_process_approver_named_as_the_agent_is_refused(make_env: EnvFactory) -> None:
    env = make_env(approver=CallbackApprover(lambda request: True, name="support-agent"))
    token = env.refund_token(max_amount=200)
    decision = env.guard.authorize(token, refund(150))
    assert decision.outcome == "deny"
    (refused,) = [e for e in env.sink.events if e.event_type == "approval.denied"]
    assert refused.extra is not None and refused.extra["approver"] == "support-agent"
    assert refused.decision is not None
    assert refused.decision.reasons[0].message == (
        "the requesting agent cannot approve its own call")
    assert [e for e in env.sink.events if e.event_type == "approval.granted"] == []


def test_a_human_from_the_idp_approves_in_one_line(
        make_env: EnvFactory, idp: tuple[Ed25519PrivateKey, OIDCProvider]) -> None:
    private, provider = idp
    env = make_env(config=GuardConfig())  # nobody configured by name
    token = env.refund_token(max_amount=200)
    asked = env.guard.authorize(token, refund(150))
    assert asked.approval_id is not None
    env.guard.resolve_approval(asked.approval_id, approved=True,
                               approver=provider.verify(_id_token(private, "carol@example.com")))
    assert env.guard.authorize(token, refund(150)).outcome == "allow"
