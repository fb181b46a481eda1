"""The agent registry: agents as code, validation errors that name file, agent and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentic_iam._resources import default_registry_path
from agentic_iam.core.registry import AgentRegistry
from agentic_iam.errors import RegistryError


def test_demo_registry_loads_and_answers_queries() -> None:
    registry = AgentRegistry.from_yaml(default_registry_path())
    support = registry.get("support-agent")
    assert support is not None
    assert support.tools["create_refund"].action == "refund:create"
    assert support.tools["read_ticket"].output_trust == "untrusted"
    assert support.max_ttl_s == 3600
    assert "refund:create" in registry.allowed_actions("support-agent")
    assert "account:delete" not in registry.allowed_actions("support-agent")
    assert [a.id for a in registry.agents_for_action("refund:create")] == [
        "refund-bot", "support-agent"]
    assert [a.id for a in registry.agents_for_action("ticket:*")] == ["refund-bot", "support-agent"]
    assert registry.get("legacy-agent") is not None
    assert registry.get("legacy-agent").status == "suspended"  # type: ignore[union-attr]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agents.yaml"
    path.write_text(text)
    return path


def test_error_names_file_agent_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path, """
version: 1
agents:
  - id: good-agent
    name: Good
    owner: a@example.com
  - id: bad-agent
    name: Bad
    owner: b@example.com
    tools:
      - name: refund
        risk: lots
""")
    with pytest.raises(RegistryError) as info:
        AgentRegistry.from_yaml(path)
    error = info.value
    assert error.file == str(path)
    assert error.agent == "bad-agent"
    assert error.field == "tools[0].risk"
    assert str(path) in str(error) and "bad-agent" in str(error)


@pytest.mark.parametrize(("body", "field"), [
    ("    owner: x\n    colour: red\n", "colour"),
    ("    owner: x\n    trust_level: 9\n", "trust_level"),
    ("    owner: x\n    max_ttl: forever\n", "max_ttl"),
    ("    owner: x\n    max_budget: {dollars: 5}\n", "max_budget"),
    ("    owner: x\n    status: sleeping\n", "status"),
    ("    owner: x\n    tools: [{name: t, arguments: {a: Float}}]\n", "tools[0].arguments"),
    ("    owner: x\n    tools: [{name: t, output: maybe}]\n", "tools[0].output"),
    ("    owner: x\n    tools: [{name: t, action: 'bad action'}]\n", "tools[0].action"),
])
def test_invalid_fields(tmp_path: Path, body: str, field: str) -> None:
    path = _write(tmp_path, f"version: 1\nagents:\n  - id: a1\n    name: A\n{body}")
    with pytest.raises(RegistryError) as info:
        AgentRegistry.from_yaml(path)
    assert info.value.agent == "a1"
    assert info.value.field == field


def test_duplicate_agent_and_unknown_delegate_target(tmp_path: Path) -> None:
    dup = _write(tmp_path, "agents:\n  - {id: a1, name: A, owner: x}\n"
                           "  - {id: a1, name: B, owner: y}\n")
    with pytest.raises(RegistryError, match="twice"):
        AgentRegistry.from_yaml(dup)
    unknown = _write(tmp_path,
                     "agents:\n  - {id: a1, name: A, owner: x, may_delegate_to: [ghost]}\n")
    with pytest.raises(RegistryError) as info:
        AgentRegistry.from_yaml(unknown)
    assert info.value.field == "may_delegate_to" and "ghost" in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no such"):
        AgentRegistry.from_yaml(tmp_path / "nope.yaml")
    bad = _write(tmp_path, "agents: [\n")
    with pytest.raises(RegistryError, match="YAML"):
        AgentRegistry.from_yaml(bad)


def test_tool_action_defaults_to_name() -> None:
    registry = AgentRegistry.from_text(
        "agents:\n  - {id: a1, name: A, owner: x, tools: [{name: lookup}]}\n")
    assert registry.tool("a1", "lookup").action == "lookup"  # type: ignore[union-attr]
