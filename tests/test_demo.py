"""`aiam demo` tells the same story through every adapter, and the audit log verifies."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from agentic_iam.demo.run import FRAMEWORKS, available_frameworks, run_demo

# LlamaIndex's workflow agents touch pydantic's deprecated instance attributes when built
# (workflows/utils.py get_steps_from_instance); unavoidable with the stock classes.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:The `__fields(_set)?__` attribute is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings(
        "ignore:Accessing the 'model_(computed_)?fields' attribute on the instance is "
        "deprecated:DeprecationWarning"),
]

EXPECTED = ["allow", "deny", "allow", "allow", "deny", "deny", "deny", "allow"]


def test_every_installed_adapter_tells_the_same_story(tmp_path: Path) -> None:
    frameworks = available_frameworks()
    assert set(frameworks) == set(FRAMEWORKS), "with [all] installed every adapter runs"
    report = run_demo(frameworks, audit_path=tmp_path / "audit.jsonl")
    assert report.verify.ok and report.verify.count > 0
    by_framework: dict[str, list[str]] = defaultdict(list)
    for step in report.steps:
        by_framework[step.framework].append(step.outcome)
    for framework in frameworks:
        assert by_framework[framework] == EXPECTED, framework
    # Refused calls never reached the back-end: only the allowed ones ran, per framework.
    assert len(report.executed) == EXPECTED.count("allow") * len(frameworks)
    assert not any(tool == "delete_account" for tool, _ in report.executed)
    assert not any(args.get("account") == "ACC-666" for _, args in report.executed)
    injected = [s for s in report.steps if s.tool == "read_ticket"]
    assert len(injected) == len(frameworks)
    for step in injected:
        seen = step.model_saw or ""
        assert "evil.example/pixel.png" not in seen      # exfiltration markup removed
        assert "⟪untrusted:" in seen                 # spotlighted as untrusted content
    assert len(report.trees) == len(frameworks)
    assert all(tree.children for tree in report.trees), "each story has a sub-agent"
