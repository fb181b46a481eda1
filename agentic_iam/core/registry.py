"""The agent registry: agents as code, loaded from YAML and validated strictly.

Answers "which agents exist", "what may agent X do" and "which agents may perform action Y".
Validation errors name the file, the agent and the field. The registry only describes; it never
grants anything by itself (the broker mints, the Guard decides).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agentic_iam.core.capabilities import action_covers
from agentic_iam.core.identity import AgentSpec, Budget, ToolSpec
from agentic_iam.errors import RegistryError

__all__ = ["AgentRegistry", "parse_duration"]

_ID_RE = r"^[a-z0-9][a-z0-9_.\-]{0,62}$"
_ACTION_RE = r"^[A-Za-z0-9_.\-]+(:[A-Za-z0-9_.\-]+)*$"
_ARG_TYPES = {"Long", "String", "Bool", "Decimal"}
_DURATION_RE = re.compile(r"^([0-9]+)\s*(s|m|h|d)?$")


def parse_duration(value: object) -> int:
    """Seconds from ``900``, ``"900"``, ``"15m"``, ``"2h"`` or ``"1d"``."""
    if type(value) is int and value > 0:
        return value
    if isinstance(value, str):
        match = _DURATION_RE.match(value.strip())
        if match:
            number, unit = int(match.group(1)), match.group(2) or "s"
            seconds = number * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
            if seconds > 0:
                return seconds
    raise ValueError(f"{value!r} is not a duration (e.g. 900, '15m', '2h')")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _ToolFile(_Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")
    action: str | None = Field(default=None, pattern=_ACTION_RE)
    description: str = ""
    risk: int = Field(default=0, ge=0, le=1000)
    output: Literal["trusted", "untrusted"] = "trusted"
    consequential: bool = False
    cost: int | None = Field(default=None, ge=0)
    cost_argument: str | None = None
    target_arguments: list[str] = Field(default_factory=list)
    recipient_arguments: list[str] | None = None
    arguments: dict[str, str] = Field(default_factory=dict)
    screening: dict[str, Any] = Field(default_factory=dict)

    @field_validator("arguments")
    @classmethod
    def _known_types(cls, value: dict[str, str]) -> dict[str, str]:
        for name, kind in value.items():
            if kind.removesuffix("?") not in _ARG_TYPES:
                raise ValueError(
                    f"argument `{name}` has type `{kind}`; use one of {sorted(_ARG_TYPES)} "
                    "(a trailing `?` marks an optional argument)"
                )
        return value

    @field_validator("screening")
    @classmethod
    def _screening(cls, value: dict[str, Any]) -> dict[str, Any]:
        from agentic_iam.core.firewall import ScreenConfig

        ScreenConfig.from_mapping(value)
        return value


class _AgentFile(_Strict):
    id: str = Field(pattern=_ID_RE)
    name: str
    owner: str = Field(min_length=1)
    description: str = ""
    trust_level: int = Field(default=1, ge=0, le=3)
    policy_set: str = "baseline"
    tools: list[_ToolFile] = Field(default_factory=list)
    memory_scopes: list[str] = Field(default_factory=list)
    may_delegate_to: list[str] = Field(default_factory=list)
    max_ttl: int | str = 3600
    max_budget: dict[str, int] = Field(default_factory=dict)
    max_risk: int = Field(default=100, ge=0)
    status: Literal["active", "suspended"] = "active"

    @field_validator("max_ttl")
    @classmethod
    def _ttl(cls, value: int | str) -> int:
        return parse_duration(value)

    @field_validator("max_budget")
    @classmethod
    def _budget(cls, value: dict[str, int]) -> dict[str, int]:
        Budget.from_mapping(value)
        return value


class _RegistryFile(_Strict):
    version: Literal[1] = 1
    agents: list[_AgentFile]


def _to_spec(agent: _AgentFile) -> AgentSpec:
    tools = {
        tool.name: ToolSpec(
            name=tool.name,
            action=tool.action or tool.name,
            description=tool.description,
            risk=tool.risk,
            output_trust=tool.output,
            consequential=tool.consequential,
            cost=tool.cost,
            cost_argument=tool.cost_argument,
            target_arguments=frozenset(tool.target_arguments),
            recipient_arguments=(frozenset(tool.recipient_arguments)
                                 if tool.recipient_arguments is not None else None),
            arguments=dict(tool.arguments),
            screening=dict(tool.screening),
        )
        for tool in agent.tools
    }
    return AgentSpec(
        id=agent.id,
        name=agent.name,
        owner=agent.owner,
        description=agent.description,
        trust_level=agent.trust_level,
        policy_set=agent.policy_set,
        tools=tools,
        memory_scopes=frozenset(agent.memory_scopes),
        may_delegate_to=frozenset(agent.may_delegate_to),
        max_ttl_s=int(agent.max_ttl),
        max_budget=Budget.from_mapping(agent.max_budget),
        max_risk=agent.max_risk,
        status=agent.status,
    )


def _describe_error(error: Mapping[str, Any], raw: object) -> tuple[str | None, str, str]:
    """(agent id, field path, message) for one pydantic error on a registry document."""
    loc = list(error.get("loc", ()))
    agent_id: str | None = None
    if len(loc) >= 2 and loc[0] == "agents" and isinstance(loc[1], int):
        agents = raw.get("agents") if isinstance(raw, Mapping) else None
        if (isinstance(agents, list) and loc[1] < len(agents)
                and isinstance(agents[loc[1]], Mapping)):
            found = agents[loc[1]].get("id")
            agent_id = str(found) if found is not None else f"#{loc[1]}"
        loc = loc[2:]
    if len(loc) >= 2 and loc[0] == "tools" and isinstance(loc[1], int) and agent_id is not None:
        loc = [f"tools[{loc[1]}]", *loc[2:]]
    path = ".".join(str(part) for part in loc) or "<document>"
    message = str(error.get("msg", "invalid"))
    return agent_id, path, message


class AgentRegistry:
    """Agents by id, loaded from YAML files or given as :class:`AgentSpec` values."""

    def __init__(self, agents: Iterable[AgentSpec] = (), *,
                 sources: Mapping[str, str] | None = None) -> None:
        self._agents: dict[str, AgentSpec] = {}
        for agent in agents:
            if agent.id in self._agents:
                raise RegistryError("agent id is defined twice", agent=agent.id, field="id")
            self._agents[agent.id] = agent
        self.sources: dict[str, str] = dict(sources or {})
        self._check_references()

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, *paths: str | Path) -> AgentRegistry:
        """Load one or more YAML files, or every ``*.yaml``/``*.yml`` in a directory."""
        files: list[Path] = []
        for path in map(Path, paths):
            if path.is_dir():
                files.extend(sorted([*path.glob("*.yaml"), *path.glob("*.yml")]))
            elif path.is_file():
                files.append(path)
            else:
                raise RegistryError("no such registry file or directory", file=str(path))
        if not files:
            raise RegistryError("no registry files found", file=", ".join(map(str, paths)))
        agents: list[AgentSpec] = []
        sources: dict[str, str] = {}
        for file in files:
            for agent in cls._load_file(file):
                if agent.id in sources:
                    raise RegistryError(
                        f"agent id is already defined in `{sources[agent.id]}`",
                        file=str(file), agent=agent.id, field="id",
                    )
                sources[agent.id] = str(file)
                agents.append(agent)
        return cls(agents, sources=sources)

    @classmethod
    def from_text(cls, text: str, *, name: str = "<string>") -> AgentRegistry:
        agents = cls._parse(text, name)
        return cls(agents, sources={a.id: name for a in agents})

    @classmethod
    def _load_file(cls, file: Path) -> list[AgentSpec]:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"cannot read: {exc}", file=str(file)) from None
        return cls._parse(text, str(file))

    @staticmethod
    def _parse(text: str, name: str) -> list[AgentSpec]:
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" (line {mark.line + 1})" if mark is not None else ""
            raise RegistryError(f"not valid YAML{line}: {exc}", file=name) from None
        try:
            document = _RegistryFile.model_validate(raw)
        except ValidationError as exc:
            agent_id, path, message = _describe_error(exc.errors()[0], raw)
            raise RegistryError(message, file=name, agent=agent_id, field=path) from None
        except ValueError as exc:
            raise RegistryError(str(exc), file=name) from None
        ids = [a.id for a in document.agents]
        for agent_id in ids:
            if ids.count(agent_id) > 1:
                raise RegistryError("agent id is defined twice", file=name, agent=agent_id,
                                    field="id")
        for agent in document.agents:
            names = [t.name for t in agent.tools]
            for tool in names:
                if names.count(tool) > 1:
                    raise RegistryError(
                        f"tool `{tool}` is listed twice", file=name, agent=agent.id, field="tools"
                    )
        return [_to_spec(agent) for agent in document.agents]

    def _check_references(self) -> None:
        for agent in self._agents.values():
            for target in sorted(agent.may_delegate_to):
                if target not in self._agents:
                    raise RegistryError(
                        f"`may_delegate_to` names unknown agent `{target}`",
                        file=self.sources.get(agent.id), agent=agent.id, field="may_delegate_to",
                    )

    # --- queries ------------------------------------------------------------------------

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._agents

    def __iter__(self) -> Iterator[AgentSpec]:
        return iter(self._agents.values())

    def __len__(self) -> int:
        return len(self._agents)

    def get(self, agent_id: str) -> AgentSpec | None:
        return self._agents.get(agent_id)

    def list_agents(self) -> list[AgentSpec]:
        return sorted(self._agents.values(), key=lambda a: a.id)

    def allowed_actions(self, agent_id: str) -> frozenset[str]:
        """What agent X may do: the actions of its registered tools (empty if unknown)."""
        agent = self._agents.get(agent_id)
        return agent.actions if agent is not None else frozenset()

    def agents_for_action(self, action: str) -> list[AgentSpec]:
        """Which (active) agents have a tool performing ``action`` (a pattern is allowed)."""
        return [
            agent for agent in self.list_agents()
            if agent.status == "active" and any(action_covers(action, a) for a in agent.actions)
        ]

    def tool(self, agent_id: str, tool_name: str) -> ToolSpec | None:
        agent = self._agents.get(agent_id)
        return agent.tools.get(tool_name) if agent is not None else None

    def all_actions(self) -> frozenset[str]:
        return frozenset(a for agent in self._agents.values() for a in agent.actions)
