"""ALLOW/DENY request fixtures: policies tested as data (``aiam policy test`` and the tests).

What it is for
    Every policy set directory may hold ``ALLOW/`` and ``DENY/`` folders of JSON request files
    (the format is in ``policies/README.md``). :func:`load_fixtures` reads them strictly and
    :func:`run_fixture` builds the request the Guard would build — a synthetic execution of the
    fixture's agent delegated by ``alice@example.com``, a default context with the fixture's
    partial overrides — and compares the engine's outcome with the folder's.

What it must never do
    Guess: an unknown key, an unknown agent or tool, or an expectation that contradicts its
    folder is an error, never a skipped fixture. It only builds requests; it never relaxes an
    engine or touches a store.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, cast

from agentic_iam._resources import default_registry_path
from agentic_iam.core.capabilities import CapabilitySet
from agentic_iam.core.decision import Reason
from agentic_iam.core.firewall import DEFAULT_TARGET_ARGUMENTS
from agentic_iam.core.identity import Actor, AgentSpec, ExecutionIdentity, ToolSpec
from agentic_iam.core.policy.base import (
    PolicyEngine,
    PolicyOutcome,
    PolicyRequest,
    unverified_arguments,
)
from agentic_iam.core.recipients import recipients_context
from agentic_iam.core.registry import AgentRegistry
from agentic_iam.errors import PolicyLoadError

__all__ = [
    "DEFAULT_DELEGATOR",
    "DEFAULT_NOW",
    "Fixture",
    "FixtureOutcome",
    "build_request",
    "load_fixtures",
    "run_fixture",
    "run_fixtures",
]

#: Who delegates the synthetic executions of fixtures.
DEFAULT_DELEGATOR = "alice@example.com"
#: The fixtures' default clock: 2026-01-01T12:00:00Z, a Thursday.
DEFAULT_NOW = 1767268800

_KEYS = frozenset({"description", "agent", "tool", "arguments", "context", "expect", "identity"})
_CONTEXT_KEYS = frozenset({"delegation", "session", "risk", "budget", "confidence", "time",
                           "provenance", "untrusted_args", "unverified_args", "secret_args",
                           "recipients", "recipient_domains"})
_IDENTITY_KEYS = frozenset({"trust", "delegator", "delegator_type", "depth", "purpose"})
_SET_FIELDS = {"delegation": ("chain_agents",), "session": ("prior_actions", "labels")}
_OUTCOMES: tuple[PolicyOutcome, ...] = ("allow", "deny", "approval_required")


@dataclass(frozen=True)
class Fixture:
    """One request file."""

    path: Path
    """The JSON file."""
    policy_set: str
    """The set directory it lives in."""
    folder: Literal["ALLOW", "DENY"]
    """``ALLOW`` or ``DENY``."""
    description: str
    """What it checks, for humans."""
    agent: str
    """The acting agent's id."""
    tool: str
    """The tool's name (the action comes from the registry)."""
    arguments: Mapping[str, Any]
    """The call's arguments (``{"$decimal": "12.50"}`` already turned into a ``Decimal``)."""
    context: Mapping[str, Any]
    """Partial overrides of the default context, section by section."""
    identity: Mapping[str, Any]
    """Overrides of the synthetic identity (``trust``, ``delegator``, ``delegator_type``,
    ``depth``, ``purpose``)."""
    expect: PolicyOutcome
    """The outcome the engine must give."""


@dataclass(frozen=True)
class FixtureOutcome:
    """What running a fixture gave."""

    ok: bool
    """True when the engine's outcome is the expected one."""
    expected: PolicyOutcome
    """What the fixture expects."""
    actual: PolicyOutcome
    """What the engine answered."""
    reasons: tuple[Reason, ...] = field(default_factory=tuple)
    """The engine's reasons (or why the fixture could not run)."""


def _decode_arguments(value: Any, file: str) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$decimal"}:
            text = value["$decimal"]
            if not isinstance(text, str):
                raise PolicyLoadError("`$decimal` takes a string, e.g. \"12.50\"", file=file)
            try:
                return Decimal(text)
            except InvalidOperation:
                raise PolicyLoadError(f"`{text}` is not a decimal", file=file) from None
        return {k: _decode_arguments(v, file) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_arguments(v, file) for v in value]
    return value


def _load_one(path: Path, policy_set: str, folder: Literal["ALLOW", "DENY"]) -> Fixture:
    file = str(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyLoadError(f"cannot read: {exc}", file=file) from None
    except json.JSONDecodeError as exc:
        raise PolicyLoadError(f"not JSON: {exc.msg}", file=file, line=exc.lineno) from None
    if not isinstance(raw, dict):
        raise PolicyLoadError("a fixture is a JSON object", file=file)
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise PolicyLoadError(f"unknown key `{unknown[0]}`", file=file)
    for key in ("agent", "tool"):
        if not isinstance(raw.get(key), str):
            raise PolicyLoadError(f"`{key}` must be a string", file=file)
    arguments = raw.get("arguments", {})
    context = raw.get("context", {})
    identity = raw.get("identity", {})
    for key, value in (("arguments", arguments), ("context", context), ("identity", identity)):
        if not isinstance(value, dict):
            raise PolicyLoadError(f"`{key}` must be an object", file=file)
    unknown = sorted(set(context) - _CONTEXT_KEYS)
    if unknown:
        raise PolicyLoadError(f"unknown context key `{unknown[0]}`", file=file)
    unknown = sorted(set(identity) - _IDENTITY_KEYS)
    if unknown:
        raise PolicyLoadError(f"unknown identity key `{unknown[0]}`", file=file)
    expect = raw.get("expect", "allow" if folder == "ALLOW" else "deny")
    if expect not in _OUTCOMES:
        raise PolicyLoadError(f"`expect` must be one of {list(_OUTCOMES)}", file=file)
    if (folder == "ALLOW") != (expect == "allow"):
        raise PolicyLoadError(f"a fixture in {folder}/ cannot expect `{expect}`", file=file)
    return Fixture(
        path=path, policy_set=policy_set, folder=folder,
        description=str(raw.get("description", "")), agent=raw["agent"], tool=raw["tool"],
        arguments=_decode_arguments(arguments, file), context=context, identity=identity,
        expect=cast(PolicyOutcome, expect),
    )


def load_fixtures(policy_dir: str | Path) -> list[Fixture]:
    """Every fixture under ``<policy_dir>/<set>/{ALLOW,DENY}/*.json``, in path order."""
    root = Path(policy_dir)
    if not root.is_dir():
        raise PolicyLoadError("no such policy directory", file=str(root))
    fixtures: list[Fixture] = []
    for set_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if set_dir.name.startswith((".", "_")):
            continue
        for folder in ("ALLOW", "DENY"):
            for path in sorted((set_dir / folder).glob("*.json")):
                fixtures.append(_load_one(path, set_dir.name, folder))
    return fixtures


def _identity(agent: AgentSpec, overrides: Mapping[str, Any]) -> ExecutionIdentity:
    execution_id = f"exec_fixture_{agent.id}"
    return ExecutionIdentity(
        execution_id=execution_id, jti="fixture", issuer="aiam-fixtures",
        audience="aiam-fixtures", issued_at=DEFAULT_NOW - 60, not_before=DEFAULT_NOW - 60,
        expires_at=DEFAULT_NOW + 840, agent_id=agent.id,
        agent_trust=overrides.get("trust", agent.trust_level),
        delegator_type=overrides.get("delegator_type", "human"),
        delegator_id=overrides.get("delegator", DEFAULT_DELEGATOR),
        delegator_issuer="local", actors=(Actor(agent.id, execution_id),),
        purpose=overrides.get("purpose", "policy fixture"), capabilities=CapabilitySet(),
        budget=agent.max_budget, risk_envelope=agent.max_risk,
        depth=overrides.get("depth", 0), ancestors=(),
    )


def _targets(tool: ToolSpec) -> list[str]:
    if tool.target_arguments:
        return sorted(tool.target_arguments)
    if tool.consequential:
        return sorted(a for a in tool.arguments if a in DEFAULT_TARGET_ARGUMENTS)
    return []


def _time(overrides: Mapping[str, Any]) -> dict[str, Any]:
    now = overrides.get("now", DEFAULT_NOW)
    moment = datetime.fromtimestamp(now if type(now) is int else DEFAULT_NOW, tz=timezone.utc)
    return {"now": now, "hour": moment.hour, "weekday": moment.isoweekday(), **overrides}


def default_context(identity: ExecutionIdentity, agent: AgentSpec,
                    tool: ToolSpec) -> dict[str, Any]:
    """The context the Guard would build for a fresh session of ``identity``."""
    return {
        "delegation": {
            "delegator": identity.delegator_id, "delegator_type": identity.delegator_type,
            "agent": agent.id, "depth": identity.depth,
            "chain_agents": frozenset(a.agent_id for a in identity.actors),
            "hops": len(identity.actors), "purpose": identity.purpose,
        },
        "session": {"call_count": 0, "action_count": 0, "prior_actions": frozenset(),
                    "labels": frozenset(), "tainted": False},
        "risk": {"score": 0, "envelope": identity.risk_envelope, "call": tool.risk},
        "budget": {k: v for k, v in agent.max_budget.as_dict().items() if v is not None},
        "confidence": None,
        "time": _time({}),
        "provenance": dict.fromkeys(_targets(tool), "request"),
    }


def build_request(registry: AgentRegistry, fixture: Fixture) -> PolicyRequest:
    """The request the Guard would send for ``fixture``."""
    agent = registry.get(fixture.agent)
    if agent is None:
        raise PolicyLoadError(f"unknown agent `{fixture.agent}`", file=str(fixture.path))
    tool = agent.tools.get(fixture.tool)
    if tool is None:
        raise PolicyLoadError(f"agent `{agent.id}` has no tool `{fixture.tool}`",
                              file=str(fixture.path))
    identity = _identity(agent, fixture.identity)
    context = default_context(identity, agent, tool)
    for key, value in fixture.context.items():
        if key == "time" and isinstance(value, Mapping):
            context["time"] = _time(value)
        elif isinstance(value, Mapping) and isinstance(context.get(key), dict):
            context[key] = {**context[key], **value}
        else:
            context[key] = value
    for section, names in _SET_FIELDS.items():
        for name in names:
            if isinstance(context[section].get(name), list):
                context[section][name] = frozenset(context[section][name])
    if "untrusted_args" in fixture.context:
        if isinstance(context["untrusted_args"], list):
            context["untrusted_args"] = frozenset(context["untrusted_args"])
    else:
        context["untrusted_args"] = frozenset(
            k for k, v in context["provenance"].items() if v == "untrusted")
    if "unverified_args" in fixture.context:
        context["unverified_args"] = frozenset(context["unverified_args"] or ())
    else:
        context["unverified_args"] = unverified_arguments(
            context["provenance"], tainted=bool(context["session"].get("tainted")))
    context["secret_args"] = frozenset(context.get("secret_args") or ())
    for key, value in recipients_context(tool.recipient_arguments, fixture.arguments).items():
        context[key] = frozenset(context[key]) if key in fixture.context else value
    return PolicyRequest(identity=identity, agent=agent, tool=tool,
                         arguments=dict(fixture.arguments), context=context)


def run_fixture(engine: PolicyEngine, registry: AgentRegistry,
                fixture: Fixture) -> FixtureOutcome:
    """Evaluate ``fixture`` with ``engine``; ``ok`` when the outcome is the expected one.

    A fixture naming an agent or tool the registry lacks is not ok (``fixture.invalid``).
    """
    try:
        request = build_request(registry, fixture)
    except PolicyLoadError as exc:
        return FixtureOutcome(False, fixture.expect, "deny",
                              (Reason("fixture.invalid", exc.detail),))
    result = engine.evaluate(request)
    return FixtureOutcome(result.outcome == fixture.expect, fixture.expect, result.outcome,
                          result.reasons)


def run_fixtures(policy_dir: str | Path, *, registry_path: str | Path | None = None,
                 engine: PolicyEngine | None = None) -> list[tuple[Fixture, FixtureOutcome]]:
    """Load the registry (``examples/registry.yaml`` by default) and, unless ``engine`` is
    given, a :class:`~agentic_iam.core.policy.cedar.CedarEngine` for ``policy_dir``; run every
    fixture under ``policy_dir``."""
    from agentic_iam.core.policy.cedar import CedarEngine

    registry = AgentRegistry.from_yaml(registry_path or default_registry_path())
    chosen = engine if engine is not None else CedarEngine.from_directory(policy_dir, registry)
    return [(fixture, run_fixture(chosen, registry, fixture))
            for fixture in load_fixtures(policy_dir)]
