"""Loading: every bundled file validates; broken files refuse to load with file and line."""

from __future__ import annotations

import json
from pathlib import Path

import cedarpy
import pytest

from agentic_iam.core.identity import AgentSpec, ToolSpec
from agentic_iam.core.policy.cedar import CedarEngine, generate_schema
from agentic_iam.core.registry import AgentRegistry
from agentic_iam.errors import PolicyLoadError

from .conftest import POLICIES, write_policies

PERMIT = '@id("base.permit")\npermit (principal, action, resource);\n'


def test_every_bundled_cedar_file_validates_against_the_generated_schema(
        registry: AgentRegistry) -> None:
    schema = cedarpy.Schema.from_json_str(json.dumps(generate_schema(registry)))
    files = sorted(POLICIES.glob("*/*.cedar"))
    assert {f.parent.name for f in files} == {"baseline", "support", "finance"}
    for file in files:
        result = cedarpy.validate_policies(file.read_text(), schema)
        assert result.validation_passed, (file, result.errors)


def test_the_bundled_directory_loads(engine: CedarEngine) -> None:
    assert engine.policy_count == sum(
        f.read_text().count("\n@id(") + f.read_text().startswith("@id(")
        for f in POLICIES.glob("*/*.cedar"))
    assert engine.policy_sets == {"baseline", "support", "finance"}
    ids = {p.id for p in engine.policies}
    assert {"baseline.permit-delegated", "baseline.untrusted-target",
            "baseline.no-secret-egress", "support.refund-over-100",
            "finance.export-destination"} <= ids
    approvals = {p.id for p in engine.policies if p.approval}
    assert approvals == {"baseline.low-confidence", "baseline.untrusted-target",
                         "support.refund-over-100", "support.refund-tainted-session",
                         "support.email-external", "finance.adjustment-over-10000"}
    assert all(p.message for p in engine.policies)


@pytest.mark.parametrize(("text", "line"), [
    # a missing `}` found at the `;` on line 5
    (PERMIT + "\nforbid (principal, action, resource)\n  when { context.risk.score > 3 ;\n", 5),
    # an unknown keyword on line 4
    (PERMIT + "\nallow (principal, action, resource);\n", 4),
    # the error is on the third line of a multi-line policy
    (PERMIT + "// comment; with a semicolon and \"quote\n@id(\"x\")\nforbid (principal,\n"
     "  action,\n  resource) when { context.risk.score >> 3 };\n", 7),
    # a string holding a `;` does not split the statement
    ('@id("a;b")\npermit (principal, action, resource)\nwhen { "x;y" == "x;y" }\n'
     "unless { 1 + };\n", 4),
    # a missing `;` at the end of the file: the last line
    (PERMIT + "\nforbid (principal, action, resource)\nwhen { true }\n", 5),
    # a missing `;` between two policies: where the second one starts
    ('permit (principal, action, resource)\n\n@id("b")\nforbid (principal, action, resource);\n',
     3),
])
def test_a_syntax_error_names_the_file_and_the_line(
        tmp_path: Path, registry: AgentRegistry, text: str, line: int) -> None:
    root = write_policies(tmp_path, {"support/broken.cedar": text})
    with pytest.raises(PolicyLoadError) as info:
        CedarEngine.from_directory(root, registry)
    assert info.value.file == str(root / "support" / "broken.cedar")
    assert info.value.line == line, info.value
    assert "does not parse" in str(info.value)
    assert f"broken.cedar:{line}:" in str(info.value)


@pytest.mark.parametrize(("body", "line", "needle"), [
    # the line naming the unknown attribute
    ("when {\n  context.args.nonexistent > 1\n}", 6, "nonexistent"),
    ("when { resource.color == \"red\" }", 5, "color"),
    # a type error names nothing to search for: the line where the policy starts
    ("when {\n  context.args.amount > 1 &&\n  context.args.currency > 3\n}", 3, "Long"),
])
def test_a_policy_that_does_not_validate_refuses_to_load(
        tmp_path: Path, registry: AgentRegistry, body: str, line: int, needle: str) -> None:
    # lines 1-2: the permit; 3: @id; 4: forbid; 5: the body
    text = (PERMIT + '@id("bad")\nforbid (principal, action == Action::"refund:create", '
            f"resource)\n{body};\n")
    root = write_policies(tmp_path, {"support/bad.cedar": text})
    with pytest.raises(PolicyLoadError) as info:
        CedarEngine.from_directory(root, registry)
    assert info.value.file == str(root / "support" / "bad.cedar")
    assert info.value.line == line, info.value
    assert "does not validate" in str(info.value) and needle in str(info.value)


def test_an_unknown_action_refuses_to_load(tmp_path: Path, registry: AgentRegistry) -> None:
    text = PERMIT + '\n\nforbid (principal, action == Action::"refund:delete", resource);\n'
    root = write_policies(tmp_path, {"baseline/a.cedar": text})
    with pytest.raises(PolicyLoadError) as info:
        CedarEngine.from_directory(root, registry)
    assert info.value.line == 5
    assert "refund:delete" in str(info.value)


def test_policies_without_id_get_file_and_line(tmp_path: Path, registry: AgentRegistry) -> None:
    text = ("permit (principal, action, resource);\n\n// the refund rule\n"
            'forbid (principal, action == Action::"refund:create", resource)\n'
            "when { context.args.amount > 5 };\n")
    engine = CedarEngine.from_directory(write_policies(tmp_path, {"support/r.cedar": text}),
                                        registry)
    assert [p.id for p in engine.policies] == ["support/r.cedar:1", "support/r.cedar:4"]
    forbid = engine.policies[1]
    assert forbid.effect == "forbid" and forbid.actions == frozenset({"refund:create"})
    assert forbid.line == 4 and forbid.file == str(tmp_path / "support" / "r.cedar")


def test_duplicate_ids_refuse_to_load(tmp_path: Path, registry: AgentRegistry) -> None:
    root = write_policies(tmp_path, {
        "baseline/a.cedar": PERMIT,
        "support/b.cedar": "// again\n" + PERMIT,
    })
    with pytest.raises(PolicyLoadError) as info:
        CedarEngine.from_directory(root, registry)
    assert "`base.permit` is already used" in str(info.value)
    assert info.value.line == 2


@pytest.mark.parametrize(("text", "message"), [
    ('@approval\npermit (principal, action, resource);\n', "only has a meaning on a `forbid`"),
    ('@approval("yes")\nforbid (principal, action, resource);\n', "takes no value"),
    ('@id("")\nforbid (principal, action, resource);\n', "non-empty"),
    ("permit (principal == ?principal, action, resource);\n", "templates"),
])
def test_annotation_and_template_misuse_refuses_to_load(
        tmp_path: Path, registry: AgentRegistry, text: str, message: str) -> None:
    root = write_policies(tmp_path, {"support/x.cedar": text})
    with pytest.raises(PolicyLoadError, match=message):
        CedarEngine.from_directory(root, registry)


def test_a_policy_file_outside_a_set_refuses_to_load(
        tmp_path: Path, registry: AgentRegistry) -> None:
    root = write_policies(tmp_path, {"stray.cedar": PERMIT})
    with pytest.raises(PolicyLoadError, match="belong in"):
        CedarEngine.from_directory(root, registry)


def test_an_agent_whose_policy_set_is_missing_refuses_to_load(
        tmp_path: Path, registry: AgentRegistry) -> None:
    root = tmp_path / "policies"
    (root / "baseline").mkdir(parents=True)
    (root / "baseline" / "a.cedar").write_text(PERMIT)
    with pytest.raises(PolicyLoadError, match=r"policy set `(finance|support)`"):
        CedarEngine.from_directory(root, registry)


def test_a_missing_directory_refuses_to_load(tmp_path: Path, registry: AgentRegistry) -> None:
    with pytest.raises(PolicyLoadError, match="no such policy directory"):
        CedarEngine.from_directory(tmp_path / "nope", registry)


# --- the schema ---------------------------------------------------------------------------------


def test_generated_schema_shape(registry: AgentRegistry) -> None:
    schema = generate_schema(registry)
    assert schema == generate_schema(registry)  # deterministic
    namespace = schema[""]
    assert set(namespace["entityTypes"]) == {"User", "Workload", "Agent", "Execution", "Tool"}
    assert namespace["entityTypes"]["Execution"]["memberOfTypes"] == ["Agent"]
    assert set(namespace["actions"]) == registry.all_actions()
    refund = namespace["actions"]["refund:create"]["appliesTo"]
    assert refund["principalTypes"] == ["Execution"] and refund["resourceTypes"] == ["Tool"]
    context = refund["context"]["attributes"]
    assert context["args"]["attributes"] == {
        "account": {"type": "String"}, "amount": {"type": "Long"}, "currency": {"type": "String"}}
    assert context["provenance"]["attributes"] == {"account": {"type": "String",
                                                               "required": False}}
    assert context["confidence"] == {"type": "Long", "required": False}
    # send_email has no declared target arguments beyond `to`; fetch_url is not consequential
    email = namespace["actions"]["email:send"]["appliesTo"]["context"]["attributes"]
    assert set(email["provenance"]["attributes"]) == {"to"}
    fetch = namespace["actions"]["web:fetch"]["appliesTo"]["context"]["attributes"]
    assert fetch["provenance"]["attributes"] == {}
    cedarpy.Schema.from_json_str(json.dumps(schema))  # Cedar accepts it


def _agent(agent_id: str, *tools: ToolSpec) -> AgentSpec:
    return AgentSpec(id=agent_id, name=agent_id, owner="o", tools={t.name: t for t in tools})


def test_schema_merges_tools_of_one_action() -> None:
    a = ToolSpec("pay", action="pay:send", arguments={"amount": "Long", "memo": "String?",
                                                      "rate": "Decimal", "urgent": "Bool"})
    b = ToolSpec("pay2", action="pay:send", arguments={"amount": "Long", "rate": "Decimal"})
    schema = generate_schema(AgentRegistry([_agent("a", a), _agent("b", b)]))
    args = schema[""]["actions"]["pay:send"]["appliesTo"]["context"]["attributes"]["args"]
    assert args["attributes"] == {
        "amount": {"type": "Long"},
        "memo": {"type": "String", "required": False},
        "rate": {"type": "Extension", "name": "decimal"},
        "urgent": {"type": "Boolean", "required": False},
    }


def test_schema_refuses_conflicting_argument_types() -> None:
    a = ToolSpec("pay", action="pay:send", arguments={"amount": "Long"})
    b = ToolSpec("pay2", action="pay:send", arguments={"amount": "String"})
    with pytest.raises(PolicyLoadError, match="argument `amount` is `Long`"):
        generate_schema(AgentRegistry([_agent("a", a), _agent("b", b)]))


def test_a_schema_file_can_replace_the_generated_one(
        tmp_path: Path, registry: AgentRegistry) -> None:
    schema = generate_schema(registry)
    args = schema[""]["actions"]["refund:create"]["appliesTo"]["context"]["attributes"]["args"]
    args["attributes"]["note"] = {"type": "String"}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    text = (PERMIT + 'forbid (principal, action == Action::"refund:create", resource)\n'
            'when { context.args.note == "x" };\n')
    root = write_policies(tmp_path / "p", {"support/n.cedar": text})
    with pytest.raises(PolicyLoadError, match="note"):
        CedarEngine.from_directory(root, registry)  # not in the generated schema
    engine = CedarEngine.from_directory(root, registry, schema_path=path)
    assert "note" in engine.schema[""]["actions"]["refund:create"]["appliesTo"]["context"][
        "attributes"]["args"]["attributes"]


def test_a_broken_schema_file_refuses_to_load(tmp_path: Path, registry: AgentRegistry) -> None:
    path = tmp_path / "schema.json"
    path.write_text('{"": {\n  "entityTypes": ,\n}}')
    with pytest.raises(PolicyLoadError) as info:
        CedarEngine.from_directory(POLICIES, registry, schema_path=path)
    assert info.value.file == str(path) and info.value.line == 2
    path.write_text(json.dumps({"": {"entityTypes": {}, "actions": {}}}))
    with pytest.raises(PolicyLoadError):
        CedarEngine.from_directory(POLICIES, registry, schema_path=path)
