"""The Cedar decision cache returns exactly what an uncached evaluation returns (issue 15).

A cache that ignores something a policy reads is a security bug, so the property test replays
generated sequences of requests (with repeats, so the cache is hit) against a cached engine and
an engine with the cache off, and compares every answer: outcome, reasons, policy ids.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentic_iam.core.policy.base import PolicyRequest, PolicyResult
from agentic_iam.core.policy.cedar import CedarEngine
from agentic_iam.core.registry import AgentRegistry

from .conftest import POLICIES, make_request

TOOLS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "create_refund": st.fixed_dictionaries({
        "amount": st.one_of(st.integers(-5, 400), st.sampled_from([100, 101, 0])),
        "currency": st.sampled_from(["USD", "EUR", "GBP"]),
        "account": st.sampled_from(["ACC-1001", "ACC-2002", "x"])}),
    "read_ticket": st.fixed_dictionaries({"ticket_id": st.sampled_from(["T-1", "T-2"])}),
    "search_kb": st.fixed_dictionaries({"query": st.sampled_from(["refunds", "a", ""])}),
    "send_email": st.fixed_dictionaries({
        "to": st.sampled_from(["ops@example.com", "x@evil.example",
                               "ops@example.com, b@evil.example"]),
        "subject": st.just("s"), "body": st.just("b")}),
}
LABELS = ["pii", "secret", "external", "untrusted"]


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    tool = draw(st.sampled_from(sorted(TOOLS)))
    context: dict[str, Any] = {
        "session": {
            "action_count": draw(st.integers(0, 5)),
            "call_count": draw(st.integers(0, 8)),
            "tainted": draw(st.booleans()),
            "labels": draw(st.lists(st.sampled_from(LABELS), unique=True, max_size=2)),
        },
        "risk": {"score": draw(st.integers(0, 120))},
    }
    if draw(st.booleans()):
        context["delegation"] = {"hops": draw(st.integers(1, 3))}
    identity: dict[str, Any] = {}
    if draw(st.booleans()):
        identity["trust"] = draw(st.integers(0, 5))
    if draw(st.booleans()):
        identity["delegator"] = draw(st.sampled_from(["alice@example.com",
                                                      "mallory@evil.example"]))
    return {"tool": tool, "arguments": draw(TOOLS[tool]), "context": context,
            "identity": identity}


def same(left: PolicyResult, right: PolicyResult) -> bool:
    return left.outcome == right.outcome and left.reasons == right.reasons


@pytest.fixture(scope="module")
def engines(registry: AgentRegistry) -> tuple[CedarEngine, CedarEngine]:
    return (CedarEngine.from_directory(POLICIES, registry),
            CedarEngine.from_directory(POLICIES, registry, decision_cache_size=0))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(pool=st.lists(requests(), min_size=1, max_size=6),
       order=st.lists(st.integers(0, 5), min_size=1, max_size=25))
def test_cached_decisions_equal_uncached_ones(engines: tuple[CedarEngine, CedarEngine],
                                              registry: AgentRegistry,
                                              pool: list[dict[str, Any]],
                                              order: list[int]) -> None:
    cached, uncached = engines
    built = [make_request(registry, **spec) for spec in pool]
    for index in order:
        request = built[index % len(built)]
        assert same(cached.evaluate(request), uncached.evaluate(request)), request


def counting(engine: CedarEngine) -> list[int]:
    calls = [0]
    authorize = engine._backend.authorize

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return authorize(*args)

    engine._backend.authorize = counted  # type: ignore[method-assign]
    return calls


def test_a_repeated_request_is_answered_from_the_cache(registry: AgentRegistry) -> None:
    engine = CedarEngine.from_directory(POLICIES, registry)
    calls = counting(engine)
    request = make_request(registry, tool="search_kb", arguments={"query": "refunds"})
    first, second = engine.evaluate(request), engine.evaluate(request)
    assert calls[0] == 1 and first == second and first.outcome == "allow"


def test_each_part_of_what_cedar_sees_is_part_of_the_key(registry: AgentRegistry) -> None:
    engine = CedarEngine.from_directory(POLICIES, registry)
    calls = counting(engine)
    base = make_request(registry, context={"session": {"action_count": 3}})
    assert engine.evaluate(base).outcome == "deny"  # a fourth refund in the session
    variants: list[PolicyRequest] = [
        make_request(registry, context={"session": {"action_count": 1}}),  # context
        make_request(registry, arguments={"amount": 60, "currency": "USD", "account": "A"},
                     context={"session": {"action_count": 3}}),  # arguments
        make_request(registry, context={"session": {"action_count": 3}},
                     identity={"trust": 1}),  # principal attribute
        make_request(registry, context={"session": {"action_count": 3}},
                     identity={"delegator": "bob@example.com"}),  # principal attribute
        replace(base, identity=replace(base.identity, execution_id="exec_other")),  # principal
    ]
    for variant in variants:
        engine.evaluate(variant)
    assert calls[0] == 1 + len(variants)
    assert engine.evaluate(variants[0]).outcome == "allow" and calls[0] == 1 + len(variants)


def test_a_reloaded_registry_entry_never_hits_an_old_decision(registry: AgentRegistry) -> None:
    engine = CedarEngine.from_directory(POLICIES, registry)
    calls = counting(engine)
    request = make_request(registry, tool="search_kb", arguments={"query": "refunds"})
    engine.evaluate(request)
    reloaded = replace(request.agent)  # an equal but new registry entry (a reload)
    tool = reloaded.tools["search_kb"]
    engine.evaluate(replace(request, agent=reloaded, tool=tool))
    assert calls[0] == 2


def test_errors_are_not_cached_and_the_cache_is_bounded(registry: AgentRegistry) -> None:
    engine = CedarEngine.from_directory(POLICIES, registry, decision_cache_size=2)
    authorize = engine._backend.authorize
    engine._backend.authorize = lambda *a: {"decision": "Deny",  # type: ignore[method-assign]
                                            "diagnostics": {"errors": ["boom"]}}
    request = make_request(registry, tool="search_kb", arguments={"query": "refunds"})
    assert engine.evaluate(request).reasons[0].code == "policy.error"
    engine._backend.authorize = authorize  # type: ignore[method-assign]
    assert engine.evaluate(request).outcome == "allow"  # the error was not remembered
    for score in (1, 2, 3):
        engine.evaluate(make_request(registry, tool="search_kb", arguments={"query": "a"},
                                     context={"risk": {"score": score}}))
    assert len(engine._decisions) == 2
    with pytest.raises(ValueError):
        CedarEngine.from_directory(POLICIES, registry, decision_cache_size=-1)
