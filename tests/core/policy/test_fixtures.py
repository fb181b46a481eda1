"""The fixture loader is strict, and its requests look like the Guard's."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agentic_iam.core.policy.base import PolicyRequest, PolicyResult
from agentic_iam.core.policy.cedar import CedarEngine
from agentic_iam.core.policy.fixtures import (
    DEFAULT_NOW,
    build_request,
    load_fixtures,
    run_fixture,
    run_fixtures,
)
from agentic_iam.core.registry import AgentRegistry
from agentic_iam.errors import PolicyLoadError


def write_fixture(root: Path, folder: str, data: Any, name: str = "f.json") -> Path:
    path = root / "support" / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


BASE = {"agent": "support-agent", "tool": "create_refund",
        "arguments": {"amount": 5, "currency": "USD", "account": "A"}}


@pytest.mark.parametrize(("folder", "data", "message"), [
    ("ALLOW", {**BASE, "expect": "deny"}, "cannot expect `deny`"),
    ("DENY", {**BASE, "expect": "allow"}, "cannot expect `allow`"),
    ("DENY", {**BASE, "expect": "maybe"}, "must be one of"),
    ("DENY", {**BASE, "extra": 1}, "unknown key `extra`"),
    ("DENY", {**BASE, "context": {"sesion": {}}}, "unknown context key `sesion`"),
    ("DENY", {**BASE, "identity": {"agent": "x"}}, "unknown identity key `agent`"),
    ("DENY", {**BASE, "agent": 5}, "`agent` must be a string"),
    ("DENY", {**BASE, "arguments": [1]}, "`arguments` must be an object"),
    ("DENY", {**BASE, "arguments": {"amount": {"$decimal": 5}}}, "takes a string"),
    ("DENY", {**BASE, "arguments": {"amount": {"$decimal": "x"}}}, "not a decimal"),
    ("DENY", [1], "JSON object"),
    ("DENY", '{\n  "agent": "support-agent",\n  oops\n}', "not JSON"),
])
def test_broken_fixtures_refuse_to_load(tmp_path: Path, folder: str, data: Any,
                                        message: str) -> None:
    path = write_fixture(tmp_path, folder, data)
    with pytest.raises(PolicyLoadError, match=message) as info:
        load_fixtures(tmp_path)
    assert info.value.file == str(path)


def test_json_errors_carry_the_line(tmp_path: Path) -> None:
    write_fixture(tmp_path, "DENY", '{\n  "agent": "support-agent",\n  oops\n}')
    with pytest.raises(PolicyLoadError) as info:
        load_fixtures(tmp_path)
    assert info.value.line == 3


def test_defaults_and_decimals(tmp_path: Path) -> None:
    write_fixture(tmp_path, "ALLOW", {**BASE, "arguments": {"rate": {"$decimal": "12.50"},
                                                            "nested": [{"$decimal": "1"}]}})
    write_fixture(tmp_path, "DENY", BASE, "d.json")
    write_fixture(tmp_path, "DENY", {**BASE, "expect": "approval_required"}, "e.json")
    allow, deny, approval = load_fixtures(tmp_path)
    assert allow.expect == "allow" and allow.policy_set == "support"
    assert allow.arguments == {"rate": Decimal("12.50"), "nested": [Decimal("1")]}
    assert deny.expect == "deny" and approval.expect == "approval_required"


def test_requests_look_like_the_guards(tmp_path: Path, registry: AgentRegistry) -> None:
    write_fixture(tmp_path, "DENY", {
        **BASE,
        "context": {"session": {"labels": ["secret_seen"], "action_count": 2},
                    "provenance": {"account": "untrusted"}, "time": {"now": DEFAULT_NOW - 43200},
                    "confidence": 80},
        "identity": {"delegator": "nightly-job", "delegator_type": "workload", "trust": 1},
    })
    (fixture,) = load_fixtures(tmp_path)
    request = build_request(registry, fixture)
    context = request.context
    assert request.identity.delegator_id == "nightly-job"
    assert request.identity.agent_trust == 1
    assert context["delegation"] == {
        "delegator": "nightly-job", "delegator_type": "workload", "agent": "support-agent",
        "depth": 0, "chain_agents": frozenset({"support-agent"}), "hops": 1,
        "purpose": "policy fixture"}
    assert context["session"] == {"call_count": 0, "action_count": 2,
                                  "prior_actions": frozenset(),
                                  "labels": frozenset({"secret_seen"}), "tainted": False}
    assert context["risk"] == {"score": 0, "envelope": 100, "call": 5}
    assert context["budget"] == {"tool_calls": 50, "cost": 50000, "llm_tokens": 200000}
    assert context["time"] == {"now": DEFAULT_NOW - 43200, "hour": 0, "weekday": 4}
    assert context["provenance"] == {"account": "untrusted"}
    assert context["untrusted_args"] == frozenset({"account"})
    assert context["confidence"] == 80
    # the same keys as the Guard's context
    assert context["secret_args"] == frozenset()
    assert context["unverified_args"] == frozenset({"account"})
    assert context["recipients"] == context["recipient_domains"] == frozenset()
    assert set(context) == {"delegation", "session", "risk", "budget", "confidence", "time",
                            "provenance", "untrusted_args", "unverified_args", "secret_args",
                            "recipients", "recipient_domains"}


def test_unknown_agent_or_tool_is_a_failed_fixture(tmp_path: Path,
                                                   registry: AgentRegistry) -> None:
    write_fixture(tmp_path, "DENY", {**BASE, "agent": "ghost"}, "a.json")
    write_fixture(tmp_path, "DENY", {**BASE, "tool": "delete_account"}, "b.json")

    class Never:
        def evaluate(self, request: PolicyRequest) -> PolicyResult:
            raise AssertionError("not evaluated")

        def close(self) -> None: ...

    for fixture in load_fixtures(tmp_path):
        outcome = run_fixture(Never(), registry, fixture)
        assert not outcome.ok and outcome.reasons[0].code == "fixture.invalid"


def test_a_wrong_expectation_is_reported(tmp_path: Path, registry: AgentRegistry,
                                         engine: CedarEngine) -> None:
    write_fixture(tmp_path, "DENY", BASE)  # a refund of 5 is allowed
    (fixture,) = load_fixtures(tmp_path)
    outcome = run_fixture(engine, registry, fixture)
    assert not outcome.ok
    assert (outcome.expected, outcome.actual) == ("deny", "allow")


def test_run_fixtures_uses_the_demo_registry_by_default() -> None:
    from agentic_iam._resources import default_policies_dir, default_registry_path

    results = run_fixtures(default_policies_dir())
    assert len(results) >= 24 and all(outcome.ok for _, outcome in results)
    again = run_fixtures(default_policies_dir(), registry_path=default_registry_path())
    assert [o.actual for _, o in again] == [o.actual for _, o in results]
