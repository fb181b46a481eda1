from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from agentic_iam._resources import default_policies_dir, default_registry_path
from agentic_iam.core.policy.base import PolicyRequest
from agentic_iam.core.policy.cedar import CedarEngine
from agentic_iam.core.policy.fixtures import Fixture, build_request
from agentic_iam.core.registry import AgentRegistry

POLICIES = default_policies_dir()
REFUND = {"amount": 50, "currency": "USD", "account": "ACC-1001"}

RequestFactory = Callable[..., PolicyRequest]


@pytest.fixture(scope="session")
def registry() -> AgentRegistry:
    return AgentRegistry.from_yaml(default_registry_path())


@pytest.fixture(scope="session")
def engine(registry: AgentRegistry) -> CedarEngine:
    return CedarEngine.from_directory(POLICIES, registry)


def make_request(registry: AgentRegistry, agent: str = "support-agent",
                 tool: str = "create_refund", arguments: Mapping[str, Any] | None = None,
                 context: Mapping[str, Any] | None = None,
                 identity: Mapping[str, Any] | None = None) -> PolicyRequest:
    fixture = Fixture(path=Path("<test>"), policy_set="test", folder="DENY", description="",
                      agent=agent, tool=tool,
                      arguments=dict(REFUND if arguments is None else arguments),
                      context=dict(context or {}), identity=dict(identity or {}),
                      expect="deny")
    return build_request(registry, fixture)


@pytest.fixture
def request_for(registry: AgentRegistry) -> RequestFactory:
    def factory(*args: Any, **kwargs: Any) -> PolicyRequest:
        return make_request(registry, *args, **kwargs)

    return factory


def write_policies(root: Path, files: Mapping[str, str]) -> Path:
    """Write ``{"<set>/<file>.cedar": text}`` under ``root`` (plus empty set dirs the demo
    registry needs) and return ``root``."""
    for name in ("baseline", "support", "finance"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for key, text in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root
