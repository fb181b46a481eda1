"""A project folder in one call: ``aiam init`` writes it, :func:`load` turns it into a ready Guard.

What it is for
    ``aiam init DIR`` (:func:`init_project`) writes a working project: ``aiam.yaml`` (the
    configuration), ``agents.yaml`` (one sample agent), ``policies/`` (a baseline and one policy
    set that validate against the schema generated from that registry, with ``ALLOW/`` and
    ``DENY/`` request fixtures, and the schema itself), and the signing keys (mode 0600).
    ``agentic_iam.load(DIR)`` reads it back and builds the registry, keys, store, audit recorder,
    :class:`~agentic_iam.core.broker.DelegationBroker`, Cedar engine (only the project's own
    policies: a user's registry never meets the demo's policy sets) and
    :class:`~agentic_iam.core.guard.Guard`, so guarding an existing agent is two lines::

        iam = agentic_iam.load("my-project")
        agent = iam.protect(agent, agent_id="support-agent")
        with iam.delegate("alice@example.com", "refund T-1042", ["refund:create amount<=100"]):
            agent.invoke(...)

    The configuration is YAML, not TOML: Python 3.10 (supported) has no ``tomllib``, and the
    registry is YAML already (pyyaml is a dependency).

What it must never do
    Start with a piece missing or half-read (a broken file is a
    :class:`~agentic_iam.errors.ConfigurationError` naming the file and the field, a shared store
    that is down or has no epoch a :class:`~agentic_iam.errors.StoreError` naming the command
    that fixes it, and whatever was opened is closed again); decide anything itself (the Guard
    does); leave a delegated execution alive after its ``with`` block; or overwrite a folder or
    a signing key it was not told to.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from importlib.resources import files
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from agentic_iam.core.binding import bind
from agentic_iam.core.guard import Guard, GuardConfig
from agentic_iam.core.identity import Human, Workload
from agentic_iam.core.keys import KeySet
from agentic_iam.core.policy.cedar import CedarEngine, generate_schema
from agentic_iam.core.registry import AgentRegistry, parse_duration
from agentic_iam.core.tokens import ExecutionToken
from agentic_iam.errors import ConfigurationError

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

    from agentic_iam.core.approvals import Approver
    from agentic_iam.core.broker import CapabilitiesLike, DelegationBroker
    from agentic_iam.core.identity import Budget
    from agentic_iam.core.provenance import Recorder
    from agentic_iam.core.store.base import Store

__all__ = [
    "CONFIG_FILE",
    "Delegation",
    "Project",
    "ProjectConfig",
    "init_project",
    "load",
    "open_store",
    "read_config",
]

log = logging.getLogger("agentic_iam.project")

#: The configuration file of a project folder.
CONFIG_FILE = "aiam.yaml"
#: The agent id ``aiam init`` writes unless told otherwise.
DEFAULT_AGENT = "support-agent"

_AGENT_PLACEHOLDER = "__AGENT__"
_AGENT_ID = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,62}$")  # the registry's own rule for ids
_CONFIG_KEYS = frozenset({"version", "issuer", "audience", "keys", "registry", "policies",
                          "schema", "store", "store_prefix", "audit", "approvers", "guard"})
# GuardConfig fields a config file may set, with the types YAML must give them (no coercion:
# `"10"` for a rate is a mistake to report, not a number to guess).
_GUARD_FIELDS: dict[str, tuple[type, ...]] = {
    "execution_rate_per_s": (int, float), "execution_burst": (int,),
    "agent_rate_per_s": (int, float), "agent_burst": (int,),
    "reservation_ttl_s": (int, float), "session_events": (int,), "approval_ttl_s": (int,),
}
# Which adapter guards an object, by the top-level module of a class in its MRO.
_ADAPTERS = {"langchain": "langchain", "langchain_core": "langchain", "langgraph": "langchain",
             "llama_index": "llama_index", "agents": "openai_agents"}

A = TypeVar("A")


def _problem(file: Path, field_name: str | None, message: str) -> ConfigurationError:
    where = f"{file}: field `{field_name}`" if field_name else str(file)
    return ConfigurationError(f"{where}: {message}")


# --- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectConfig:
    """A parsed ``aiam.yaml``: every path resolved against the file's folder."""

    file: Path
    """The configuration file."""
    issuer: str
    """The broker's issuer (the ``iss`` claim); must match the key file's."""
    audience: str
    """The tokens' audience (the ``aud`` claim)."""
    keys: Path
    """The private signing key file."""
    registry: Path
    """The agent registry (a YAML file or a folder of them)."""
    policies: Path
    """The project's Cedar policy folder (``baseline/`` and one folder per policy set)."""
    schema: Path | None
    """A Cedar JSON schema; ``None``: generated from the registry at load."""
    store: str
    """``memory``, ``sqlite:PATH`` (resolved) or ``redis://…``."""
    audit: Path | None
    """The JSONL audit log (head signed with the active key); ``None``: no log."""
    approvers: frozenset[str]
    """Configured approver ids."""
    guard: GuardConfig
    """The Guard's limits."""
    store_prefix: str = "aiam:"
    """The key prefix of a Redis store (several projects can share one Redis)."""


def _string(raw: Mapping[str, Any], key: str, file: Path, default: str | None = None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise _problem(file, key, "must be a non-empty string")
    return value.strip()


def _path(raw: Mapping[str, Any], key: str, file: Path, default: str | None = None,
          *, optional: bool = False) -> Path | None:
    if optional and raw.get(key, default) is None:
        return None
    return (file.parent / _string(raw, key, file, default)).resolve()


def _store_spec(raw: Mapping[str, Any], file: Path) -> str:
    spec = _string(raw, "store", file, "memory")
    if spec == "memory" or spec.startswith(("redis://", "rediss://")):
        return spec
    if spec.startswith("sqlite:") and spec.removeprefix("sqlite:"):
        return "sqlite:" + str((file.parent / spec.removeprefix("sqlite:")).resolve())
    raise _problem(file, "store", f"unknown store `{spec}`: use memory, sqlite:PATH or "
                   "redis://HOST:PORT/DB")


def _store_prefix(raw: Mapping[str, Any], store: str, file: Path) -> str:
    if "store_prefix" not in raw:
        return "aiam:"
    if not store.startswith(("redis://", "rediss://")):
        raise _problem(file, "store_prefix", "only a Redis store has a key prefix")
    return _string(raw, "store_prefix", file)


def _guard_config(raw: Mapping[str, Any], approvers: frozenset[str], file: Path) -> GuardConfig:
    section = raw.get("guard") or {}
    if not isinstance(section, Mapping):
        raise _problem(file, "guard", "must be a mapping of Guard limits")
    values: dict[str, Any] = {}
    for key, value in section.items():
        kinds = _GUARD_FIELDS.get(str(key))
        if kinds is None:
            raise _problem(file, f"guard.{key}", "unknown Guard limit (known: "
                           f"{', '.join(sorted(_GUARD_FIELDS))})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not isinstance(value, kinds) or value <= 0:
            raise _problem(file, f"guard.{key}", f"must be a positive number, got {value!r}")
        values[str(key)] = value
    return GuardConfig(**values, approvers=approvers)


def read_config(path: str | Path) -> ProjectConfig:
    """Parse a project's ``aiam.yaml`` (``path`` is the file or its folder), strictly."""
    file = Path(path)
    if file.is_dir():
        file = file / CONFIG_FILE
    file = file.resolve()
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(f"no project configuration `{file}`: create a project with "
                                 f"`aiam init {file.parent}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _problem(file, None, f"cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise _problem(file, None, f"not valid YAML{line}") from None
    if not isinstance(raw, Mapping):
        raise _problem(file, None, "must be a YAML mapping")
    unknown = sorted(str(k) for k in raw if k not in _CONFIG_KEYS)
    if unknown:
        raise _problem(file, unknown[0],
                       f"unknown field (known: {', '.join(sorted(_CONFIG_KEYS))})")
    if raw.get("version", 1) != 1:
        raise _problem(file, "version", "must be 1")
    approvers = raw.get("approvers") or []
    if not isinstance(approvers, list) or not all(isinstance(a, str) and a.strip()
                                                  for a in approvers):
        raise _problem(file, "approvers", "must be a list of approver ids")
    approver_ids = frozenset(a.strip() for a in approvers)
    keys, registry, policies = (_path(raw, "keys", file, "aiam-keys.json"),
                                _path(raw, "registry", file, "agents.yaml"),
                                _path(raw, "policies", file, "policies"))
    assert keys is not None and registry is not None and policies is not None
    store = _store_spec(raw, file)
    return ProjectConfig(
        file=file, issuer=_string(raw, "issuer", file), audience=_string(raw, "audience", file),
        keys=keys, registry=registry, policies=policies,
        schema=_path(raw, "schema", file, optional=True), store=store,
        audit=_path(raw, "audit", file, optional=True), approvers=approver_ids,
        guard=_guard_config(raw, approver_ids, file),
        store_prefix=_store_prefix(raw, store, file))


def open_store(spec: str, *, prefix: str = "aiam:") -> Store:
    """A store from ``memory``, ``sqlite:PATH`` or ``redis://…`` (as ``aiam store`` takes them);
    ``prefix`` is a Redis store's key prefix."""
    if spec == "memory":
        from agentic_iam.core.store.memory import MemoryStore

        return MemoryStore()
    if spec.startswith("sqlite:"):
        from agentic_iam.core.store.sqlite import SqliteStore

        return SqliteStore(spec.removeprefix("sqlite:"))
    if spec.startswith(("redis://", "rediss://")):
        from agentic_iam.core.store.redis import RedisStore

        return RedisStore(spec, prefix=prefix)
    raise ValueError(f"unknown store `{spec}`: use memory, sqlite:PATH or redis://HOST:PORT/DB")


# --- the delegated run ----------------------------------------------------------------------


class _Lifecycle:
    """The mutable part of a :class:`Delegation`: its binding and whether it has ended."""

    def __init__(self, end: Callable[[str], None]) -> None:
        self.end = end
        self.lock = threading.Lock()
        self.binding: AbstractContextManager[object] | None = None
        self.ended = False


@dataclass(frozen=True, eq=False)
class Delegation(ExecutionToken):
    """An execution token minted by :meth:`Project.delegate`, and the run it belongs to.

    It is an :class:`ExecutionToken` (hand it to ``guard.authorize`` or a framework context as
    it is). As a context manager it binds itself as the run's current token
    (:func:`agentic_iam.core.binding.bind`) for the block and ends the execution when the block
    exits, however it exits. Used without ``with``, end it with :meth:`end` (or let it expire).
    Copies and pickles are plain :class:`ExecutionToken` values: a framework that deep-copies
    its context never copies the project along.
    """

    _life: _Lifecycle = field(repr=False, compare=False)
    """Binding and ending state (not part of the token's value)."""

    def __reduce__(self) -> tuple[type[ExecutionToken], tuple[str, Any]]:
        return ExecutionToken, (self.token, self.identity)

    @property
    def ended(self) -> bool:
        """Whether :meth:`end` ran (or the ``with`` block exited)."""
        return self._life.ended

    def end(self, reason: str = "completed") -> None:
        """End the execution: this token and every token sub-delegated from it stop working.
        Idempotent."""
        with self._life.lock:
            if self._life.ended:
                return
            # Marked ended only once it is: after a failure (store down) a retry ends it.
            self._life.end(reason)
            self._life.ended = True

    def __enter__(self) -> Delegation:
        with self._life.lock:
            if self._life.ended:
                raise ConfigurationError(f"execution `{self.identity.execution_id}` has ended: "
                                         "delegate a new one")
            if self._life.binding is not None:
                raise ConfigurationError(f"execution `{self.identity.execution_id}` is already "
                                         "bound by an enclosing `with` block")
            # Bind a plain token: what the run can reach must not lead back to the project.
            binding = bind(ExecutionToken(self.token, self.identity))
            binding.__enter__()
            self._life.binding = binding
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self._life.lock:
            binding, self._life.binding = self._life.binding, None
        if binding is not None:
            binding.__exit__(None, None, None)
        # Ended however the block exits: the identity must not outlive its task. A failure to
        # end propagates (the token would stay valid until it expires, which nobody asked for).
        self.end("completed" if exc_type is None else f"failed: {exc_type.__name__}")

    # ``async with`` too, for async frameworks. The binding is a contextvar set in the task that
    # enters the block, so the agent run awaited inside the block sees it.
    async def __aenter__(self) -> Delegation:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.__exit__(exc_type, exc, tb)


# --- the project ----------------------------------------------------------------------------


def _adapter_module(agent: object) -> ModuleType:
    """The integration module for ``agent``'s framework, by the modules of its classes."""
    for cls in type(agent).__mro__:
        name = _ADAPTERS.get((cls.__module__ or "").split(".")[0])
        if name is not None:
            return importlib.import_module(f"agentic_iam.integrations.{name}")
    kind = type(agent)
    raise ConfigurationError(
        f"cannot guard a `{kind.__module__}.{kind.__qualname__}`: protect() takes a LangChain "
        "agent (create_agent) or LangGraph graph, a LlamaIndex agent or AgentWorkflow, or an "
        "OpenAI Agents SDK Agent")


class Project:
    """A loaded project: registry, keys, store, recorder, broker, policy engine and Guard.

    Build it with :func:`load`. Use it as a context manager or call :meth:`close` (it closes
    the Guard, and so the policy engine, the store and the audit log).
    """

    def __init__(self, config: ProjectConfig, *, registry: AgentRegistry, keys: KeySet,
                 broker: DelegationBroker, policy: CedarEngine, guard: Guard) -> None:
        self.config = config
        """The parsed ``aiam.yaml``."""
        self.registry = registry
        self.keys = keys
        self.broker = broker
        self.policy = policy
        self.guard = guard
        self._closed = False

    @property
    def store(self) -> Store:
        return self.guard.store

    @property
    def recorder(self) -> Recorder | None:
        return self.guard.recorder

    def _agent_id(self, agent: str | None, verb: str) -> str:
        if agent is not None:
            if self.registry.get(agent) is None:
                known = ", ".join(a.id for a in self.registry.list_agents())
                raise ConfigurationError(f"unknown agent `{agent}`: it is not in "
                                         f"{self.config.registry} (known: {known})")
            return agent
        agents = self.registry.list_agents()
        if len(agents) != 1:
            raise ConfigurationError(
                f"{verb}() needs `agent_id`: the registry has {len(agents)} agents "
                f"({', '.join(a.id for a in agents)})")
        return agents[0].id

    def delegate(
        self,
        user: str | Human | Workload,
        purpose: str,
        capabilities: CapabilitiesLike,
        *,
        agent: str | None = None,
        ttl: int | str | timedelta = 900,
        budget: Budget | Mapping[str, int | None] | None = None,
        risk: int | None = None,
        depth: int = 1,
        memory_scopes: Iterable[str] | None = None,
    ) -> Delegation:
        """Mint an execution token for one task of ``agent`` on behalf of ``user``.

        ``user`` is a person's id (a :class:`Human` vouched for locally), a :class:`Human` or a
        :class:`Workload`. ``agent`` may be omitted when the registry has one agent. ``ttl`` is
        seconds, a ``timedelta`` or ``"15m"``. ``memory_scopes`` defaults to the agent's registry
        scopes. The result is the token; ``with`` it to bind it for the run and end it after.
        Every refusal raises :class:`~agentic_iam.errors.DelegationError` (and is recorded).
        """
        principal = Human(user) if isinstance(user, str) else user
        if not isinstance(principal, (Human, Workload)):
            raise ConfigurationError("the delegator must be a user id, a Human or a Workload")
        seconds = parse_duration(ttl) if isinstance(ttl, str) else ttl
        token = self.broker.delegate(principal, self._agent_id(agent, "delegate"), purpose,
                                     capabilities, seconds, budget, risk, depth=depth,
                                     memory_scopes=memory_scopes)
        identity = token.identity
        return Delegation(token.token, identity,
                          _Lifecycle(lambda reason: self._end(identity, reason)))

    def _end(self, identity: Any, reason: str) -> None:
        # Through the Guard rather than the broker: it also charges calls of this run still
        # pending in this process. An adapter may have ended the run at its final output already;
        # then there is nothing left to do (and nothing to record twice).
        if identity.key in self.store.revoked([identity.key]):
            return
        self.guard.end_execution(identity, reason=reason)

    def protect(self, agent: A, agent_id: str | None = None, **options: Any) -> A:
        """Guard an existing agent of any supported framework; returns what to run.

        Dispatches on the framework of ``agent``'s type to the adapter's
        ``protect(agent, guard, *, broker=, agent_id=, **options)`` (the adapter documents
        whether it wraps or mutates and which ``options`` it takes). ``agent_id`` is the
        registry id the agent runs as; it may be omitted when the registry has one agent.
        """
        module = _adapter_module(agent)
        protect = getattr(module, "protect", None)
        if not callable(protect):
            raise ConfigurationError(f"the `{module.__name__}` adapter has no protect()")
        guarded: A = protect(agent, self.guard, broker=self.broker,
                             agent_id=self._agent_id(agent_id, "protect"), **options)
        return guarded

    def close(self) -> None:
        """Close the Guard (policy engine, store, audit log). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.guard.close()

    def __enter__(self) -> Project:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Project {self.config.file.parent} agents="
                f"{[a.id for a in self.registry.list_agents()]} store={self.config.store!r}>")


def _check_epoch(store: Store, config: ProjectConfig) -> None:
    """Refuse to start on a shared store without an epoch (never initialised, or it lost its
    state): every call would be denied, so say so now, with the command that fixes it. This is
    also the first round trip, so an unreachable server is reported here too."""
    from agentic_iam.core.store.base import state_lost

    read_epoch = getattr(store, "read_epoch", None)
    if config.store == "memory" or read_epoch is None or read_epoch() is not None:
        return
    shown, spec = config.store, config.store
    if spec.startswith(("redis://", "rediss://")):
        from agentic_iam.core.store.redis import _safe_url  # never print a password

        shown = spec = _safe_url(spec)
        if config.store_prefix != "aiam:":
            spec += f" --prefix {config.store_prefix}"
    raise state_lost(shown, "the store has no epoch (never initialised, or it lost its state)",
                     spec)


def load(path: str | Path = ".", *, approver: Approver | None = None) -> Project:
    """Load the project in ``path`` (a folder holding ``aiam.yaml``, or the file itself).

    ``approver`` is the Guard's own approver (asked inside ``authorize``), if any. A missing or
    broken file raises a :class:`~agentic_iam.errors.ConfigurationError` naming the file (and
    the field); a shared store that is down or has no epoch a
    :class:`~agentic_iam.errors.StoreError`. Nothing stays open after a failure.
    """
    from agentic_iam.core.broker import DelegationBroker
    from agentic_iam.core.provenance import HeadSigner, JsonlSink, Recorder

    config = read_config(path)
    registry = AgentRegistry.from_yaml(config.registry)
    if not len(registry):
        raise _problem(config.registry, "agents", "the registry has no agents")
    if not config.keys.is_file():
        raise _problem(config.file, "keys", f"no key file `{config.keys}`: create one with "
                       f"`aiam keys generate --issuer {config.issuer} --out {config.keys}`")
    keys = KeySet.load(config.keys)
    if keys.issuer != config.issuer:
        raise _problem(config.file, "issuer", f"`{config.issuer}` does not match the key "
                       f"file's issuer `{keys.issuer}`")
    policy = CedarEngine.from_directory(config.policies, registry, schema_path=config.schema)
    opened: list[Callable[[], None]] = [policy.close]
    try:
        store = open_store(config.store, prefix=config.store_prefix)
        opened.append(store.close)
        _check_epoch(store, config)
        recorder = None
        if config.audit is not None:
            config.audit.parent.mkdir(parents=True, exist_ok=True)
            active = keys.active
            if active.private_key is None:  # KeySet.active refuses this; typed for mypy
                raise _problem(config.keys, "keys", "the active key has no private part")
            recorder = Recorder([JsonlSink(config.audit,
                                           signer=HeadSigner(active.private_key, active.kid))])
            opened.append(recorder.close)
        broker = DelegationBroker(registry, keys, audience=config.audience, store=store,
                                  recorder=recorder)
        guard = Guard.from_broker(broker, policy, approver=approver, config=config.guard)
    except BaseException:
        for close in reversed(opened):
            try:
                close()
            except Exception:  # the original failure is the one to report
                log.warning("could not close a half-loaded project's %s", close)
        raise
    return Project(config, registry=registry, keys=keys, broker=broker, policy=policy,
                   guard=guard)


# --- aiam init ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    """What :func:`init_project` did."""

    directory: Path
    """The project folder."""
    files: tuple[Path, ...]
    """Every file written (relative to ``directory``)."""
    kept: tuple[Path, ...] = ()
    """Files that existed and were kept (an existing key file under ``force``)."""


def _template_files(root: Traversable, prefix: str = "") -> Iterator[tuple[str, str]]:
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.startswith((".", "__")):
            continue
        relative = f"{prefix}{entry.name}"
        if entry.is_dir():
            yield from _template_files(entry, relative + "/")
        else:
            yield relative, entry.read_text(encoding="utf-8")


def _render(agent_id: str) -> dict[str, str]:
    """Every file of a new project, in memory, checked before anything is written."""
    rendered = {name: text.replace(_AGENT_PLACEHOLDER, agent_id)
                for name, text in _template_files(files("agentic_iam") / "_template")}
    registry = AgentRegistry.from_text(rendered["agents.yaml"], name="agents.yaml")
    schema = generate_schema(registry)
    rendered["policies/schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    sources = {name.removeprefix("policies/"): text for name, text in rendered.items()
               if name.startswith("policies/") and name.endswith(".cedar")}
    CedarEngine.from_sources(sources, registry, schema=schema).close()  # validates every file
    rendered[".gitignore"] = "# never commit the signing keys or the audit log\n" \
                             "aiam-keys.json\naiam-audit.jsonl*\n*.db\n"
    return rendered


def init_project(directory: str | Path, *, agent_id: str = DEFAULT_AGENT, force: bool = False,
                 issuer: str = "https://aiam.local") -> Written:
    """Write a working project folder (see the module docstring).

    Refuses a folder that is not empty unless ``force``; with ``force`` the template's files are
    overwritten and an existing signing key file is kept (replacing it would invalidate every
    token it signed). Raises :class:`~agentic_iam.errors.ConfigurationError`.
    """
    if not _AGENT_ID.match(agent_id):
        raise ConfigurationError(f"agent id `{agent_id}`: use 1 to 63 lowercase letters, digits, "
                                 "`.`, `_` or `-`, starting with a letter or digit")
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise ConfigurationError(f"`{target}` exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise ConfigurationError(f"`{target}` is not empty: choose another folder or pass "
                                 "--force to overwrite the project files in it")
    rendered = _render(agent_id)
    config = yaml.safe_load(rendered[CONFIG_FILE])
    if config.get("issuer") != issuer:
        rendered[CONFIG_FILE] = rendered[CONFIG_FILE].replace(
            f"issuer: {config.get('issuer')}", f"issuer: {json.dumps(issuer)}", 1)
    keys_path = target / str(config.get("keys", "aiam-keys.json"))
    # A key file to keep is checked before anything is written: a refusal changes nothing.
    keep_keys = keys_path.exists()
    if keep_keys:
        existing = KeySet.load(keys_path)  # refuse to keep a key file that does not load
        if existing.issuer != issuer:
            raise ConfigurationError(f"`{keys_path}` belongs to issuer `{existing.issuer}`, not "
                                     f"`{issuer}`: move it away or pass that issuer")
    written: list[Path] = []
    kept: list[Path] = [keys_path.relative_to(target)] if keep_keys else []
    for name, text in rendered.items():
        path = target / name
        if name == ".gitignore" and path.exists():  # the user's, not a project file
            kept.append(Path(name))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(Path(name))
    if not keep_keys:
        KeySet.generate(issuer).save(keys_path)  # mode 0600
        written.append(keys_path.relative_to(target))
    return Written(target, tuple(written), tuple(kept))
