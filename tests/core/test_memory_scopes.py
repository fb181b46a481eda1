"""Memory scopes are part of the grant: minted, narrowed, checked at every retrieval, recorded."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from agentic_iam.core.audit_export import to_ocsf
from agentic_iam.core.identity import Human
from agentic_iam.core.tokens import identity_to_claims
from agentic_iam.errors import LimitExceededError, WideningError
from tests.conftest import Env


@dataclass(frozen=True)
class Doc:
    id: str
    scope: object
    text: str = "content"


DOCS = [Doc("d1", "support", "refund policy"), Doc("d2", "kb:public", "faq"),
        Doc("d3", "finance", "SECRET ledger"), Doc("d4", None, "unscoped"),
        Doc("d5", "", "empty scope")]


def retrieve(env: Env, token: object, docs: list[Doc] = DOCS, query: str = "refund"):
    return env.guard.filter_memory(token, docs, scope_of=lambda d: d.scope,  # type: ignore[arg-type]
                                   id_of=lambda d: d.id, query=query, framework="test")


def memory_events(env: Env) -> list:
    return [e for e in env.sink.events if e.event_type == "memory.retrieved"]


def test_the_grant_carries_the_agents_registry_scopes_by_default(env: Env) -> None:
    token = env.refund_token()
    assert token.identity.memory_scopes == {"support", "kb:public"}
    assert sorted(identity_to_claims(token.identity)["mem"]) == ["kb:public", "support"]
    verified = env.guard.verifier.verify(token.token)
    assert verified.memory_scopes == {"support", "kb:public"}


def test_a_delegation_may_narrow_the_scopes_but_never_widen_them(env: Env) -> None:
    narrow = env.refund_token(memory_scopes=["support"])
    assert narrow.identity.memory_scopes == {"support"}
    with pytest.raises(LimitExceededError, match="`finance`"):
        env.refund_token(memory_scopes=["support", "finance"])
    with pytest.raises(LimitExceededError):
        env.refund_token(memory_scopes="support")
    none = env.refund_token(memory_scopes=[])
    assert none.identity.memory_scopes == frozenset()
    assert "mem" not in identity_to_claims(none.identity)


def test_a_sub_delegation_is_narrowed_to_parent_and_child_agent(env: Env) -> None:
    parent = env.refund_token()
    child = env.broker.subdelegate_for(parent, "refund-bot")
    assert child.identity.memory_scopes == {"support"}  # parent ∩ refund-bot's registry scopes
    parent_narrow = env.refund_token(memory_scopes=["kb:public"])
    assert env.broker.subdelegate_for(parent_narrow, "refund-bot").identity.memory_scopes \
        == frozenset()
    with pytest.raises(WideningError, match="parent's memory scopes"):
        env.broker.subdelegate_for(parent_narrow, "refund-bot", memory_scopes=["support"])
    with pytest.raises(LimitExceededError, match="refund-bot"):
        env.broker.subdelegate_for(parent, "refund-bot", memory_scopes=["kb:public"])


def test_retrieval_keeps_only_items_in_the_grants_scopes(env: Env) -> None:
    token = env.refund_token()
    result = retrieve(env, token)
    assert [d.id for d in result.kept] == ["d1", "d2"]
    assert {(d.id, d.scope) for d in result.dropped} == {
        ("d3", "finance"), ("d4", "<missing>"), ("d5", "<missing>")}
    assert result.reason is None
    [event] = memory_events(env)
    assert event.memory is not None and event.execution_id == token.identity.execution_id
    assert event.memory.kept_ids == ("d1", "d2") and event.memory.dropped_count == 3
    assert "SECRET" not in json.dumps(event.to_json_dict())  # ids and scopes, never content
    ocsf = to_ocsf(event)
    assert ocsf["class_uid"] == 6003 and ocsf["activity_name"] == "Read"


def test_a_sub_agent_reads_only_its_narrowed_scopes(env: Env) -> None:
    child = env.broker.subdelegate_for(env.refund_token(), "refund-bot")
    assert [d.id for d in retrieve(env, child).kept] == ["d1"]


def test_a_revoked_or_ended_run_reads_nothing(env: Env) -> None:
    token = env.refund_token()
    child = env.broker.subdelegate_for(token, "refund-bot")
    env.broker.end(token)
    for t in (token, child):
        result = retrieve(env, t)
        assert result.kept == () and len(result.dropped) == len(DOCS)
        assert result.reason is not None and "revoked" in result.reason
    assert all(e.memory is not None and e.memory.reason for e in memory_events(env))
    assert to_ocsf(memory_events(env)[0])["status_id"] == 2


def test_an_expired_forged_or_missing_token_reads_nothing(env: Env) -> None:
    clock = [1_000_000.0]
    env.broker._clock = lambda: clock[0]  # type: ignore[method-assign]
    expired = env.refund_token(ttl=60)
    for bad in (expired, expired.token[:-4] + "AAAA", "not-a-token", None):
        result = retrieve(env, bad)
        assert result.kept == () and result.reason


def test_a_scope_function_that_raises_keeps_nothing(env: Env) -> None:
    def broken(doc: Doc) -> object:
        raise KeyError("scope")

    result = env.guard.filter_memory(env.refund_token(), DOCS, scope_of=broken,
                                     id_of=lambda d: d.id)
    assert result.kept == () and result.reason is not None


def test_scopes_asked_for_at_delegation_are_what_the_run_reads(env: Env) -> None:
    token = env.broker.delegate(Human("bob@example.com"), "support-agent", "triage",
                                ["ticket:read"], 600, memory_scopes=["kb:public"])
    assert [d.id for d in retrieve(env, token).kept] == ["d2"]
