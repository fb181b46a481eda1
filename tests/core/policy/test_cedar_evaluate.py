"""Evaluation: fixtures, no coercion, fail closed, @approval, slicing, entity reuse."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import cedarpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentic_iam.core.identity import AgentSpec, ToolSpec
from agentic_iam.core.policy import cedar as cedar_module
from agentic_iam.core.policy.base import PolicyEngine, PolicyResult, StaticEngine
from agentic_iam.core.policy.cedar import CedarEngine, generate_schema
from agentic_iam.core.policy.fixtures import load_fixtures, run_fixture
from agentic_iam.core.registry import AgentRegistry
from agentic_iam.errors import PolicyLoadError

from .conftest import POLICIES, REFUND, RequestFactory, make_request, write_policies

FIXTURES = load_fixtures(POLICIES)


def test_there_are_enough_fixtures() -> None:
    for policy_set in ("baseline", "support", "finance"):
        for folder in ("ALLOW", "DENY"):
            count = sum(1 for f in FIXTURES if f.policy_set == policy_set and f.folder == folder)
            assert count >= 4, (policy_set, folder, count)


@pytest.fixture(scope="module", params=["raw", "public"])
def both_engines(request: pytest.FixtureRequest, registry: AgentRegistry) -> CedarEngine:
    engine = CedarEngine.from_directory(POLICIES, registry)
    if request.param == "public":
        engine._backend = cedar_module._Backend(raw=False)
    else:
        assert engine._backend.raw, "the raw cedarpy core is expected with cedarpy 4.12.2"
    return engine


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f"{f.policy_set}/{f.folder}/{f.path.name}"
                                                   for f in FIXTURES])
def test_every_fixture_gives_its_folders_decision(
        both_engines: CedarEngine, registry: AgentRegistry, fixture: Any) -> None:
    outcome = run_fixture(both_engines, registry, fixture)
    assert outcome.ok, (fixture.description, outcome)
    assert outcome.actual == ("allow" if fixture.folder == "ALLOW" else fixture.expect)
    assert outcome.reasons
    if outcome.actual == "allow":
        assert [r.code for r in outcome.reasons] == ["policy.permit"]
        assert outcome.reasons[0].policy_id == "baseline.permit-delegated"


def test_the_same_fixtures_pass_with_cedar_request_validation(registry: AgentRegistry) -> None:
    engine = CedarEngine.from_directory(POLICIES, registry, validate_requests=True)
    for fixture in FIXTURES:
        outcome = run_fixture(engine, registry, fixture)
        assert outcome.ok, (fixture.path, outcome)


def test_every_forbid_is_the_reason_of_some_deny_fixture(
        engine: CedarEngine, registry: AgentRegistry) -> None:
    seen: set[str] = set()
    for fixture in FIXTURES:
        outcome = run_fixture(engine, registry, fixture)
        seen.update(r.policy_id for r in outcome.reasons if r.policy_id)
    assert seen >= {p.id for p in engine.policies}


# --- no coercion ----------------------------------------------------------------------------


@pytest.mark.parametrize(("amount", "kind"), [
    ("500", "str"), (True, "bool"), (False, "bool"), (50.0, "float"), (Decimal("50"), "Decimal"),
    ([50], "list"), ({"value": 50}, "dict"), (2**63, None),
])
def test_a_long_argument_of_the_wrong_type_is_denied_not_coerced(
        engine: CedarEngine, request_for: RequestFactory, amount: Any, kind: str | None) -> None:
    result = engine.evaluate(request_for(arguments={**REFUND, "amount": amount}))
    assert result.outcome == "deny"
    assert [r.code for r in result.reasons] == ["policy.error"]
    message = result.reasons[0].message
    assert "argument `amount`" in message
    assert (f"got `{kind}`" in message) if kind else ("64-bit" in message)


@pytest.mark.parametrize(("name", "value"), [("currency", 840), ("account", None),
                                             ("account", b"ACC-1")])
def test_string_arguments_are_typed_too(
        engine: CedarEngine, request_for: RequestFactory, name: str, value: Any) -> None:
    result = engine.evaluate(request_for(arguments={**REFUND, name: value}))
    assert result.outcome == "deny" and result.reasons[0].code == "policy.error"
    assert f"argument `{name}`" in result.reasons[0].message


def test_missing_argument_is_denied(engine: CedarEngine, request_for: RequestFactory) -> None:
    result = engine.evaluate(request_for(arguments={"amount": 5, "currency": "USD"}))
    assert result.outcome == "deny"
    assert result.reasons[0].message.endswith("argument `account` is missing")


@pytest.mark.parametrize(("section", "value", "path"), [
    ("session", {"call_count": "1"}, "session.call_count"),
    ("session", {"tainted": 1}, "session.tainted"),
    ("session", {"labels": ["a", 1]}, "session.labels"),
    ("session", {"labels": "secret_seen"}, "session.labels"),
    ("risk", {"score": True}, "risk.score"),
    ("budget", {"cost": 1.5}, "budget.cost"),
    ("budget", {"dollars": 5}, "budget.dollars"),
    ("confidence", "90", "confidence"),
    ("time", {"hour": None}, "time.hour"),
])
def test_a_context_value_of_the_wrong_type_is_denied(
        engine: CedarEngine, request_for: RequestFactory, section: str, value: Any,
        path: str) -> None:
    request = request_for(context={section: value})
    result = engine.evaluate(request)
    assert result.outcome == "deny" and result.reasons[0].code == "policy.error"
    assert f"context `{path}`" in result.reasons[0].message


def test_an_unknown_context_section_is_denied(
        engine: CedarEngine, request_for: RequestFactory) -> None:
    request = request_for()
    result = engine.evaluate(replace(request, context={**request.context, "extra": 1}))
    assert result.outcome == "deny" and "context `extra` is not in the schema" in \
        result.reasons[0].message


def test_provenance_of_undeclared_targets_is_dropped(
        engine: CedarEngine, request_for: RequestFactory) -> None:
    request = request_for(context={"provenance": {"account": "request", "url": "trusted"}})
    assert engine.evaluate(request).outcome == "allow"


# --- decimals ---------------------------------------------------------------------------------


def _decimal_engine(tmp_path: Path) -> tuple[CedarEngine, AgentRegistry]:
    tool = ToolSpec("convert", action="fx:convert",
                    arguments={"rate": "Decimal", "note": "String?"})
    agent = AgentSpec(id="fx-agent", name="fx", owner="o", tools={"convert": tool})
    registry = AgentRegistry([agent])
    root = write_policies(tmp_path, {
        "baseline/p.cedar": 'permit (principal, action, resource);\n'
                            '@id("fx.rate")\nforbid (principal, action, resource)\n'
                            'when { context.args.rate.greaterThan(decimal("1.5")) };\n'
                            '@id("fx.note")\nforbid (principal, action, resource)\n'
                            'when { context.args has note && context.args.note == "no" };\n',
    })
    return CedarEngine.from_directory(root, registry), registry


@pytest.mark.parametrize(("rate", "outcome"), [
    (Decimal("1.25"), "allow"), (Decimal("1.5000"), "allow"), (Decimal("1.50001"), "error"),
    (Decimal("2"), "deny"), (Decimal("1E+1"), "deny"), (Decimal("-3.1"), "allow"),
    (Decimal("NaN"), "error"), (Decimal("Infinity"), "error"), (Decimal("1e20"), "error"),
    (1.25, "error"), ("1.25", "error"), (1, "error"),
])
def test_decimal_arguments(tmp_path: Path, rate: Any, outcome: str) -> None:
    engine, registry = _decimal_engine(tmp_path)
    request = make_request(registry, "fx-agent", "convert", {"rate": rate})
    result = engine.evaluate(request)
    if outcome == "error":
        assert result.outcome == "deny" and result.reasons[0].code == "policy.error"
        assert "argument `rate`" in result.reasons[0].message
    else:
        assert result.outcome == outcome, result


def test_optional_arguments_may_be_absent_or_none(tmp_path: Path) -> None:
    engine, registry = _decimal_engine(tmp_path)
    for arguments in ({"rate": Decimal("1")}, {"rate": Decimal("1"), "note": None},
                      {"rate": Decimal("1"), "note": "ok"}):
        assert engine.evaluate(make_request(registry, "fx-agent", "convert",
                                            arguments)).outcome == "allow"
    no = engine.evaluate(make_request(registry, "fx-agent", "convert",
                                      {"rate": Decimal("1"), "note": "no"}))
    assert no.outcome == "deny" and no.policy_ids == ("fx.note",)


# --- fail closed ------------------------------------------------------------------------------


def _engine(tmp_path: Path, registry: AgentRegistry, text: str) -> CedarEngine:
    return CedarEngine.from_directory(
        write_policies(tmp_path, {"baseline/p.cedar": text}), registry)


PERMIT = '@id("permit")\npermit (principal, action, resource);\n'


def test_a_forbid_whose_evaluation_errors_denies(
        tmp_path: Path, registry: AgentRegistry, request_for: RequestFactory) -> None:
    # Integer overflow is a Cedar evaluation error; without the engine's rule Cedar would skip
    # this forbid and allow (security-findings §4).
    engine = _engine(tmp_path, registry, PERMIT + (
        '@id("overflow")\nforbid (principal, action == Action::"refund:create", resource)\n'
        "when { context.args.amount * 1000000000000 > 1 && context.args.amount > 100 };\n"))
    assert engine.evaluate(request_for(arguments={**REFUND, "amount": 5})).outcome == "allow"
    result = engine.evaluate(request_for(arguments={**REFUND, "amount": 50_000_000}))
    assert result.outcome == "deny"
    assert result.reasons[0].code == "policy.error"
    assert result.reasons[0].policy_id == "overflow"
    assert "overflow" in result.reasons[0].message
    # Cedar alone allows this very request: the error is only in its diagnostics.
    raw = engine._backend.authorize(
        {"principal": {"type": "Execution", "id": "exec_fixture_support-agent"},
         "action": {"type": "Action", "id": "refund:create"},
         "resource": {"type": "Tool", "id": "create_refund"},
         "context": json.dumps(engine._slice("support", "refund:create").encode(
             {**request_for().context, "args": {**REFUND, "amount": 50_000_000}}))},
        engine._slice("support", "refund:create").policies,
        engine._entities_of(request_for().identity, request_for().agent), None)
    assert raw["decision"] == "Allow" and raw["diagnostics"]["errors"]


def test_an_erroring_approval_forbid_is_a_deny_not_an_approval(
        tmp_path: Path, registry: AgentRegistry, request_for: RequestFactory) -> None:
    engine = _engine(tmp_path, registry, PERMIT + (
        '@id("big")\n@approval\nforbid (principal, action == Action::"refund:create", resource)\n'
        "when { context.args.amount > 100 };\n"
        '@id("overflow")\n@approval\n'
        'forbid (principal, action == Action::"refund:create", resource)\n'
        "when { context.args.amount * 1000000000000 > 1 };\n"))
    result = engine.evaluate(request_for(arguments={**REFUND, "amount": 50_000_000}))
    assert result.outcome == "deny" and result.reasons[0].code == "policy.error"


def test_no_permit_denies(tmp_path: Path, registry: AgentRegistry,
                          request_for: RequestFactory) -> None:
    engine = _engine(tmp_path, registry, '@id("only-email")\npermit (principal, '
                     'action == Action::"email:send", resource);\n')
    result = engine.evaluate(request_for())
    assert result.outcome == "deny"
    assert [(r.code, r.policy_id) for r in result.reasons] == [("policy.no_permit", None)]
    assert engine.slice_ids("support", "refund:create") == ()


def test_no_decision_and_engine_exceptions_deny(
        engine: CedarEngine, request_for: RequestFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    class Answers:
        def __init__(self, answer: Any) -> None:
            self.answer = answer
            self.raw = True

        def authorize(self, *args: Any) -> Any:
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

        def entities(self, *args: Any) -> Any:
            raise AssertionError("cached")

    request = request_for()
    assert engine.evaluate(request).outcome == "allow"  # warms the entity cache
    original = engine._backend
    try:
        for answer, text in [
            ({"decision": "NoDecision", "diagnostics": {"errors": ["failed to build request"]}},
             "failed to build request"),
            ({"decision": "NoDecision"}, "NoDecision"),
            ({"decision": "Allow", "diagnostics": {"reason": ["baseline.permit-delegated"],
                                                   "errors": ["something"]}}, "something"),
            ({"decision": "Maybe", "diagnostics": {}}, "Maybe"),
            (RuntimeError("boom"), "RuntimeError"),
            (ValueError("cedar says no"), "ValueError"),
        ]:
            engine._backend = Answers(answer)  # type: ignore[assignment]
            result = engine.evaluate(request)
            assert result.outcome == "deny", answer
            assert result.reasons[0].code == "policy.error"
            assert text in result.reasons[0].message
    finally:
        engine._backend = original


def test_requests_that_do_not_belong_together_are_denied(
        engine: CedarEngine, registry: AgentRegistry, request_for: RequestFactory) -> None:
    request = request_for()
    other_agent = registry.get("reconcile-agent")
    assert other_agent is not None
    mismatched = replace(request, agent=other_agent)
    assert "runs as `support-agent`" in engine.evaluate(mismatched).reasons[0].message
    foreign_tool = ToolSpec("create_refund", action="refund:create", risk=0,
                            arguments={"amount": "Long", "currency": "String",
                                       "account": "String"})
    result = engine.evaluate(replace(request, tool=foreign_tool))
    assert result.outcome == "deny" and "not registered" in result.reasons[0].message
    unknown_action = replace(request, tool=ToolSpec("x", action="x:y"),
                             agent=replace(request.agent, tools={"x": ToolSpec("x",
                                                                               action="x:y")}))
    assert "not in the policy schema" in engine.evaluate(unknown_action).reasons[0].message
    other_set = replace(request, agent=replace(request.agent, policy_set="marketing"))
    assert "`marketing` is not loaded" in engine.evaluate(other_set).reasons[0].message


# --- @approval ----------------------------------------------------------------------------------


def test_only_approval_forbids_give_approval_required(
        engine: CedarEngine, request_for: RequestFactory) -> None:
    result = engine.evaluate(request_for(arguments={**REFUND, "amount": 150},
                                         context={"session": {"tainted": True}}))
    assert result.outcome == "approval_required"
    assert [(r.code, r.policy_id) for r in result.reasons] == [
        ("policy.approval", "support.refund-over-100"),
        ("policy.approval", "support.refund-tainted-session")]
    assert result.reasons[0].message == "refunds over 100 need a human's approval"


def test_an_approval_forbid_with_a_plain_forbid_denies(
        engine: CedarEngine, request_for: RequestFactory) -> None:
    result = engine.evaluate(request_for(arguments={**REFUND, "amount": 150},
                                         context={"session": {"action_count": 3}}))
    assert result.outcome == "deny"
    assert [(r.code, r.policy_id) for r in result.reasons] == [
        ("policy.forbid", "support.refund-session-limit"),
        ("policy.approval", "support.refund-over-100")]


# --- slicing ----------------------------------------------------------------------------------


def _big_registry(registry: AgentRegistry, unrelated: int) -> AgentRegistry:
    support = registry.get("support-agent")
    assert support is not None
    tools = {f"noise_{i}": ToolSpec(f"noise_{i}", action=f"noise:a{i}",
                                    arguments={"n": "Long"}) for i in range(unrelated)}
    noisy = replace(support, id="noise-agent", name="noise", tools=tools,
                    may_delegate_to=frozenset())
    return AgentRegistry([*registry, noisy])


def _noise(unrelated: int) -> str:
    return "".join(f'@id("noise.{i}")\nforbid (principal, action == Action::"noise:a{i}", '
                   f"resource)\nwhen {{ context.args.n > {i} }};\n" for i in range(unrelated))


def test_slices_hold_only_the_policies_of_their_action(
        tmp_path: Path, registry: AgentRegistry) -> None:
    unrelated = 1000
    big = _big_registry(registry, unrelated)
    root = write_policies(tmp_path, {
        "baseline/noise.cedar": _noise(unrelated),
        "baseline/two.cedar": ('@id("grouped")\nforbid (principal, action in '
                               '[Action::"noise:a1", Action::"refund:create"], resource)\n'
                               "when { false };\n"),
    })
    for file in POLICIES.glob("*/*.cedar"):
        (root / file.parent.name / file.name).write_text(file.read_text())
    engine = CedarEngine.from_directory(root, big)
    relevant = (*CedarEngine.from_directory(POLICIES, registry).slice_ids(
        "support", "refund:create"), "grouped")
    assert engine.policy_count >= unrelated + len(relevant)
    refund_slice = engine.slice_ids("support", "refund:create")
    assert sorted(refund_slice) == sorted(relevant)
    assert len(engine._slice("support", "refund:create").policies) == len(relevant)
    noise_slice = engine.slice_ids("support", "noise:a1")
    assert "noise.1" in noise_slice and "grouped" in noise_slice and "noise.2" not in noise_slice
    assert not any(p.startswith("support.refund") for p in noise_slice)
    request = make_request(big, arguments={**REFUND, "amount": 150})
    result = engine.evaluate(request)
    assert result.outcome == "approval_required"
    noise = make_request(big, "noise-agent", "noise_7", {"n": 8})
    assert engine.evaluate(noise).policy_ids == ("noise.7",)


def test_action_groups_of_a_custom_schema_are_sliced(
        tmp_path: Path, registry: AgentRegistry) -> None:
    schema = generate_schema(registry)
    actions = schema[""]["actions"]
    actions["money"] = {}
    actions["refund:create"]["memberOf"] = [{"id": "money"}]
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    root = write_policies(tmp_path / "p", {"baseline/p.cedar": PERMIT + (
        '@id("money")\n@approval\nforbid (principal, action in Action::"money", resource);\n')})
    engine = CedarEngine.from_directory(root, registry, schema_path=path)
    assert engine.slice_ids("support", "refund:create") == ("permit", "money")
    assert engine.slice_ids("support", "ticket:read") == ("permit",)
    assert engine.evaluate(make_request(registry)).outcome == "approval_required"


# --- entities ---------------------------------------------------------------------------------


def test_entities_are_built_once_per_execution(
        registry: AgentRegistry, request_for: RequestFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = CedarEngine.from_directory(POLICIES, registry)
    built: list[str] = []
    original = engine._build_entities

    def counting(identity: Any, agent: Any) -> Any:
        built.append(identity.execution_id)
        return original(identity, agent)

    monkeypatch.setattr(engine, "_build_entities", counting)
    request = request_for()
    for _ in range(5):
        assert engine.evaluate(request).outcome == "allow"
    assert built == ["exec_fixture_support-agent"]
    # a different trust for the same execution id is not served from the cache
    low = replace(request, identity=replace(request.identity, agent_trust=0))
    assert engine.evaluate(low).policy_ids == ("baseline.untrusted-agent-consequential",)
    assert len(built) == 2
    engine.close()
    engine.evaluate(request)
    assert len(built) == 3


def test_principal_is_a_member_of_its_agent(
        tmp_path: Path, registry: AgentRegistry, request_for: RequestFactory) -> None:
    engine = _engine(tmp_path, registry, PERMIT + (
        '@id("no-refund-bot")\nforbid (principal in Agent::"refund-bot", action, resource);\n'
        '@id("owner")\nforbid (principal, action, resource) when '
        '{ principal.delegator == "mallory@example.com" };\n'))
    assert engine.evaluate(request_for()).outcome == "allow"
    assert engine.evaluate(request_for("refund-bot")).policy_ids == ("no-refund-bot",)
    mallory = request_for(identity={"delegator": "mallory@example.com"})
    assert engine.evaluate(mallory).policy_ids == ("owner",)


# --- the engine's encoder is the schema check -----------------------------------------------------

_values = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64), st.booleans(), st.text(max_size=5),
    st.floats(allow_nan=False), st.none(), st.decimals(allow_nan=True, places=None),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(amount=_values, currency=_values)
def test_what_the_encoder_accepts_cedar_with_a_schema_accepts(
        registry: AgentRegistry, amount: Any, currency: Any) -> None:
    engine = _ENGINES.setdefault("plain", CedarEngine.from_directory(POLICIES, registry))
    strict = _ENGINES.setdefault("strict", CedarEngine.from_directory(
        POLICIES, registry, validate_requests=True))
    request = make_request(registry, arguments={"amount": amount, "currency": currency,
                                                "account": "ACC-1"})
    ours = engine.evaluate(request)
    theirs = strict.evaluate(request)
    assert ours == theirs or (ours.reasons[0].code == theirs.reasons[0].code == "policy.error")
    if ours.reasons[0].code != "policy.error":
        assert type(amount) is int and type(currency) is str


_ENGINES: dict[str, CedarEngine] = {}


def test_static_engine_is_only_a_double() -> None:
    result = PolicyResult("deny", ())
    engine: PolicyEngine = StaticEngine(result)
    assert isinstance(engine, PolicyEngine)
    with pytest.raises(TypeError):
        StaticEngine()  # type: ignore[call-arg]
    assert not hasattr(cedar_module, "AllowAllEngine")
    assert cedarpy is not None


# --- only what the slice reads is sent to Cedar ------------------------------------------------


def test_context_paths_and_keep_trie() -> None:
    est = json.loads(cedarpy.policies_to_json_str(
        'forbid (principal, action, resource) when { context.risk.score > 1 && '
        'context has confidence && context.session.labels.contains("x") && '
        'context.args.amount > principal.trust && context.time == {"now": 1} };'))
    found: set[tuple[str, ...]] = set()
    cedar_module._context_paths(est["staticPolicies"]["policy0"]["conditions"], found)
    assert found == {("risk", "score"), ("confidence",), ("session", "labels"),
                     ("args", "amount"), ("time",)}
    assert cedar_module._keep_of(found | {("risk",)}) == {
        "risk": True, "confidence": True, "session": {"labels": True},
        "args": {"amount": True}, "time": True}
    assert cedar_module._keep_of({("a", "b"), ()}) is True


def test_the_sent_context_is_pruned_to_what_the_slice_reads(
        engine: CedarEngine, request_for: RequestFactory) -> None:
    request = request_for(context={"confidence": 90})
    chosen = engine._slice("support", "refund:create")
    sent = chosen.encode({**request.context, "args": request.arguments})
    assert sent == {
        "args": {"amount": 50, "currency": "USD"},
        "confidence": 90,
        "delegation": {"hops": 1},
        "risk": {"call": 5, "envelope": 100, "score": 0},
        "secret_args": [],
        "session": {"action_count": 0, "labels": [], "tainted": False},
        # the baseline's target rules read `unverified_args` (untrusted, or unknown once tainted)
        "unverified_args": [],
    }
    # ... but every attribute is still checked
    bad = request_for(context={"time": {"weekday": "Thursday"}})
    with pytest.raises(cedar_module._Mismatch, match=r"time\.weekday"):
        chosen.encode({**bad.context, "args": bad.arguments})


def test_a_slice_that_reads_no_context_sends_an_empty_record(
        tmp_path: Path, registry: AgentRegistry, request_for: RequestFactory) -> None:
    engine = _engine(tmp_path, registry, PERMIT)
    request = request_for()
    chosen = engine._slice("support", "refund:create")
    assert chosen.encode({**request.context, "args": request.arguments}) == {}
    assert engine.evaluate(request).outcome == "allow"


def test_records_read_whole_are_sent_whole(
        tmp_path: Path, registry: AgentRegistry, request_for: RequestFactory) -> None:
    engine = _engine(tmp_path, registry, PERMIT + (
        '@id("whole")\nforbid (principal, action == Action::"refund:create", resource)\n'
        'when { context.risk == {"score": 0, "envelope": 100, "call": 5} && '
        '!(context has confidence) && context.time.hour == 12 };\n'))
    assert engine.evaluate(request_for()).policy_ids == ("whole",)
    assert engine.evaluate(request_for(context={"confidence": 10})).outcome == "allow"
    assert engine.evaluate(request_for(context={"risk": {"score": 1}})).outcome == "allow"


def test_the_constructor_validates_policies_too(registry: AgentRegistry,
                                                engine: CedarEngine) -> None:
    good = engine.policies
    est = json.loads(cedarpy.policies_to_json_str(
        'forbid (principal, action, resource) when { context.args.nope == 1 };'))
    bad = replace(good[0], id="hand-made", est=est["staticPolicies"]["policy0"], line=7)
    with pytest.raises(PolicyLoadError, match=r"hand-made.*does not validate") as info:
        CedarEngine([*good, bad], generate_schema(registry), registry=registry)
    assert info.value.line == 7
    assert CedarEngine(good, generate_schema(registry), registry=registry).policy_count == len(good)


def test_concurrent_evaluations_agree(registry: AgentRegistry) -> None:
    from concurrent.futures import ThreadPoolExecutor

    engine = CedarEngine.from_directory(POLICIES, registry)
    requests = [make_request(registry, identity={"purpose": f"p{i % 7}"},
                             arguments={**REFUND, "amount": 40 + i % 120})
                for i in range(400)]
    expected = [engine.evaluate(r).outcome for r in requests]
    engine.close()
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda r: engine.evaluate(r).outcome, requests))
    assert got == expected
    assert set(got) == {"allow", "approval_required"}
