"""The Cedar policy engine: schema-validated, parsed once, sliced by action, handles reused.

What it is for
    :class:`CedarEngine` decides tool calls with Cedar policies kept in a directory::

        policies/
          baseline/*.cedar       applies to every agent
          <set>/*.cedar          applies to agents whose registry ``policy_set`` is <set>
          <set>/ALLOW/*.json     request fixtures that must be allowed (see fixtures.py)
          <set>/DENY/*.json      request fixtures that must be denied

    A schema is mandatory: by default it is generated from the agent registry
    (:func:`generate_schema`, also printed by ``aiam policy schema``). Every file is parsed and
    validated against it when the engine loads; a file that does not parse or validate raises
    :class:`~agentic_iam.errors.PolicyLoadError` naming the file and the line.

    Each policy is parsed once. For every (policy set, action) pair the engine keeps one
    ``cedarpy.PolicySet`` handle holding only the policies whose action scope can match that
    action, so the cost of a decision does not grow with unrelated policies. The entities of an
    execution (the execution, its agent, the agent's tools) are built once and reused.

    The request context is checked against the schema in Python, strictly, on every call (that
    is what makes a schema-less Cedar call safe here), and only the attributes the slice's
    policies read are sent: parsing the context is most of Cedar's time.
    ``validate_requests=True`` makes Cedar check the whole context against the schema as well.

Decisions
    * ``Allow`` → ``allow`` (``policy.permit``, one reason per determining permit);
    * ``Deny`` with no determining policy → ``deny`` (``policy.no_permit``);
    * ``Deny`` where every determining policy is an ``@approval`` forbid →
      ``approval_required`` (``policy.approval``);
    * ``Deny`` with at least one plain forbid → ``deny`` (``policy.forbid`` first);
    * ``NoDecision``, any entry in Cedar's ``diagnostics.errors``, a request that does not fit
      the schema, or any exception → ``deny`` (``policy.error``).

What it must never do
    Evaluate without a schema; coerce an argument to the type the schema declares (``"500"`` is
    not a Long, ``True`` is not a Long, ``50.0`` is not a Decimal); answer ``allow`` when Cedar
    reported an error for any policy (without a schema Cedar skips an erroring ``forbid`` and
    allows, see reference/security-findings.md §4); or raise out of :meth:`CedarEngine.evaluate`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import cedarpy

from agentic_iam.core.capabilities import CapabilitySet
from agentic_iam.core.decision import Reason
from agentic_iam.core.firewall import DEFAULT_TARGET_ARGUMENTS
from agentic_iam.core.identity import Actor, AgentSpec, Budget, ExecutionIdentity, ToolSpec
from agentic_iam.core.policy.base import PolicyRequest, PolicyResult, policy_error
from agentic_iam.core.registry import AgentRegistry
from agentic_iam.errors import PolicyLoadError

__all__ = [
    "BASELINE",
    "CedarEngine",
    "PolicyInfo",
    "context_type",
    "generate_schema",
]

log = logging.getLogger("agentic_iam.policy.cedar")

#: The policy set that applies to every agent.
BASELINE = "baseline"

_FIXTURE_DIRS = frozenset({"ALLOW", "DENY"})
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
# Cedar's decimal is a 64-bit integer of 1/10000 units.
_DECIMAL_MAX = Decimal(_I64_MAX).scaleb(-4)
_DECIMAL_MIN = Decimal(_I64_MIN).scaleb(-4)
_ENTITY_CACHE_SIZE = 4096
#: Decisions remembered by default (see :class:`CedarEngine`); 0 turns the cache off.
DECISION_CACHE_SIZE = 8192

# --- the schema -------------------------------------------------------------------------------

_LONG: dict[str, Any] = {"type": "Long"}
_STRING: dict[str, Any] = {"type": "String"}
_BOOL: dict[str, Any] = {"type": "Boolean"}
_STRINGS: dict[str, Any] = {"type": "Set", "element": {"type": "String"}}


def _record(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "Record", "attributes": dict(attributes)}


def _optional(kind: Mapping[str, Any]) -> dict[str, Any]:
    return {**kind, "required": False}


_ARGUMENT_TYPES: Mapping[str, dict[str, Any]] = {
    "Long": _LONG,
    "String": _STRING,
    "Bool": _BOOL,
    "Decimal": {"type": "Extension", "name": "decimal"},
}

_COMMON_TYPES: dict[str, Any] = {
    "Delegation": _record({
        "delegator": _STRING, "delegator_type": _STRING, "agent": _STRING, "depth": _LONG,
        "chain_agents": _STRINGS, "hops": _LONG, "purpose": _STRING,
    }),
    "Session": _record({
        "call_count": _LONG, "action_count": _LONG, "prior_actions": _STRINGS,
        "labels": _STRINGS, "tainted": _BOOL,
    }),
    "Risk": _record({"score": _LONG, "envelope": _LONG, "call": _LONG}),
    "Budget": _record({"tool_calls": _optional(_LONG), "cost": _optional(_LONG),
                       "llm_tokens": _optional(_LONG)}),
    "Time": _record({"now": _LONG, "hour": _LONG, "weekday": _LONG}),
}

_ENTITY_TYPES: dict[str, Any] = {
    "User": {},
    "Workload": {},
    "Agent": {"shape": _record({"trust_level": _LONG, "owner": _STRING, "policy_set": _STRING})},
    "Execution": {"memberOfTypes": ["Agent"],
                  "shape": _record({"trust": _LONG, "delegator": _STRING})},
    "Tool": {"shape": _record({"consequential": _BOOL, "risk": _LONG, "output_trust": _STRING})},
}


def _target_arguments(tool: ToolSpec) -> frozenset[str]:
    """The arguments whose provenance the Guard reports (mirrors ``Guard.target_arguments``)."""
    if tool.target_arguments:
        return frozenset(tool.target_arguments)
    if tool.consequential:
        return frozenset(a for a in tool.arguments if a in DEFAULT_TARGET_ARGUMENTS)
    return frozenset()


def context_type(tools: Sequence[tuple[str, ToolSpec]]) -> dict[str, Any]:
    """The Cedar context record type of one action, from the ``(agent id, tool)`` pairs
    performing it.

    An argument is required when every tool declares it without ``?``; an argument declared with
    two different types raises :class:`PolicyLoadError`.
    """
    kinds: dict[str, tuple[str, str]] = {}  # argument -> (base type, "agent/tool" first seen)
    optional: set[str] = set()
    targets: set[str] = set()
    for agent_id, tool in tools:
        where = f"{agent_id}/{tool.name}"
        for name, declared in tool.arguments.items():
            base = declared.removesuffix("?")
            if base not in _ARGUMENT_TYPES:
                raise PolicyLoadError(
                    f"tool `{where}`: argument `{name}` has unknown type `{declared}`")
            if declared.endswith("?"):
                optional.add(name)
            seen = kinds.get(name)
            if seen is None:
                kinds[name] = (base, where)
            elif seen[0] != base:
                raise PolicyLoadError(
                    f"action `{tool.action}`: argument `{name}` is `{seen[0]}` in tool "
                    f"`{seen[1]}` but `{base}` in tool `{where}`")
        targets.update(_target_arguments(tool))
    for name in kinds:
        if any(name not in tool.arguments for _, tool in tools):
            optional.add(name)
    args = {
        name: (_optional(_ARGUMENT_TYPES[base]) if name in optional else _ARGUMENT_TYPES[base])
        for name, (base, _) in sorted(kinds.items())
    }
    return _record({
        "args": _record(args),
        "delegation": {"type": "Delegation"},
        "session": {"type": "Session"},
        "risk": {"type": "Risk"},
        "budget": {"type": "Budget"},
        "confidence": _optional(_LONG),
        "time": {"type": "Time"},
        "provenance": _record({name: _optional(_STRING) for name in sorted(targets)}),
        "untrusted_args": _STRINGS,
        "unverified_args": _STRINGS,
        "secret_args": _STRINGS,
        "recipients": _STRINGS,
        "recipient_domains": _STRINGS,
    })


def generate_schema(registry: AgentRegistry) -> dict[str, Any]:
    """The Cedar JSON schema for a registry.

    Entity types ``User``, ``Workload``, ``Agent``, ``Execution`` (member of ``Agent``) and
    ``Tool``; one action per tool action of any agent, applying to principal ``Execution`` and
    resource ``Tool``, with a context type built from the argument types and target arguments of
    the tools performing it (:func:`context_type`). Deterministic: same registry, same schema.
    """
    by_action: dict[str, list[tuple[str, ToolSpec]]] = {}
    for agent in registry.list_agents():
        for tool in sorted(agent.tools.values(), key=lambda t: t.name):
            by_action.setdefault(tool.action, []).append((agent.id, tool))
    actions = {
        action: {"appliesTo": {"principalTypes": ["Execution"], "resourceTypes": ["Tool"],
                               "context": context_type(tools)}}
        for action, tools in sorted(by_action.items())
    }
    return {"": {"commonTypes": json.loads(json.dumps(_COMMON_TYPES)),
                 "entityTypes": json.loads(json.dumps(_ENTITY_TYPES)),
                 "actions": actions}}


# --- the context encoder ----------------------------------------------------------------------
#
# The request context is converted to Cedar JSON by closures compiled once per (policy set,
# action) from the schema, so the hot path does no schema lookups. They are the schema check: a
# value of the wrong Python type is refused, never converted (an ``int`` is a Long, a ``bool`` is
# not; a ``str`` is a String; a ``Decimal`` is a decimal, a ``float`` is nothing). ``None`` for
# an optional attribute means "absent".
#
# Every attribute is checked, but only the attributes the slice's policies read are sent to
# Cedar: building the request (parsing the context) is most of Cedar's time, and a full context
# costs about twice a pruned one. This is exact: validated policies can only read attributes they
# name, and a record used as a whole value is sent whole. With ``validate_requests`` the whole
# context is sent, since Cedar then checks it against the schema.


class _Mismatch(Exception):
    """A context value that does not fit the schema."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def message(self) -> str:
        if self.path.startswith("args."):
            return f"argument `{self.path[5:]}` {self.problem}"
        return f"context `{self.path}` {self.problem}"


_Encoder = Callable[[Any], Any]
_SETS = (set, frozenset, list, tuple)
# What to send of a record: everything (True), or only some attributes (a nested mapping).
_Keep = Mapping[str, Any] | bool


def _wrong(expected: str, value: object) -> str:
    return f"must be {expected}, got `{type(value).__name__}`"


def _decimal_text(value: Decimal) -> str | None:
    """Cedar's text for a Decimal, or ``None`` when Cedar's decimal cannot hold it exactly."""
    if not value.is_finite() or not _DECIMAL_MIN <= value <= _DECIMAL_MAX:
        return None
    try:
        normal = value.normalize()
    except InvalidOperation:  # pragma: no cover - finite values normalize
        return None
    exponent = normal.as_tuple().exponent
    if not isinstance(exponent, int) or exponent < -4:
        return None
    text = format(normal, "f")
    return text if "." in text else text + ".0"


def _scalar(kind: Mapping[str, Any], common: Mapping[str, Any]) -> type | None:
    """The exact Python type of a Long, String or Boolean attribute (else None)."""
    name = kind.get("type")
    if name == "EntityOrCommon":
        name = kind.get("name")
    if isinstance(name, str) and name in common:
        return _scalar(common[name], common)
    return {"Long": int, "String": str, "Boolean": bool}.get(str(name))


def _compile(kind: Mapping[str, Any], path: str, common: Mapping[str, Any],
             *, lenient_records: frozenset[str] = frozenset(), keep: _Keep = True) -> _Encoder:
    name = kind.get("type")
    if name == "EntityOrCommon":
        name = kind.get("name")
    if isinstance(name, str) and name in common:
        return _compile(common[name], path, common, lenient_records=lenient_records, keep=keep)
    if name == "Long":
        def long_(value: Any) -> Any:
            if type(value) is int and _I64_MIN <= value <= _I64_MAX:
                return value
            raise _Mismatch(path, _wrong("a Long (an integer)", value)
                            if type(value) is not int else "is out of the 64-bit range")
        return long_
    if name == "String":
        def string(value: Any) -> Any:
            if type(value) is str:
                return value
            raise _Mismatch(path, _wrong("a String", value))
        return string
    if name == "Boolean":
        def boolean(value: Any) -> Any:
            if type(value) is bool:
                return value
            raise _Mismatch(path, _wrong("a Bool", value))
        return boolean
    if name == "Extension" and kind.get("name") == "decimal":
        def decimal(value: Any) -> Any:
            if type(value) is not Decimal:
                raise _Mismatch(path, _wrong("a Decimal", value))
            text = _decimal_text(value)
            if text is None:
                raise _Mismatch(path, "is not a finite decimal with at most 4 fractional digits "
                                      "within Cedar's range")
            return {"__extn": {"fn": "decimal", "arg": text}}
        return decimal
    if name == "Set":
        element = kind.get("element")
        if not isinstance(element, Mapping):
            raise PolicyLoadError(f"schema: set `{path}` has no element type")
        if element.get("type") == "String":
            def strings(value: Any) -> Any:
                if type(value) not in _SETS:
                    raise _Mismatch(path, _wrong("a set", value))
                for item in value:
                    if type(item) is not str:
                        raise _Mismatch(path, _wrong("a set of Strings", item))
                return list(value)
            return strings
        inner = _compile(element, path + "[]", common)

        def set_(value: Any) -> Any:
            if type(value) not in _SETS:
                raise _Mismatch(path, _wrong("a set", value))
            return [inner(item) for item in value]
        return set_
    if name == "Record":
        attributes = kind.get("attributes") or {}
        fields = []
        for attr, sub in sorted(attributes.items()):
            sub_keep = True if keep is True else (keep or {}).get(attr)
            fields.append((
                attr,
                _scalar(sub, common),
                _compile(sub, f"{path}.{attr}" if path else attr, common,
                         lenient_records=lenient_records,
                         keep=True if sub_keep is None else sub_keep),
                sub.get("required", True) is not False,
                sub_keep is not None,
            ))
        known = frozenset(attributes)
        lenient = path in lenient_records

        def record(value: Any) -> Any:
            if type(value) is not dict and not isinstance(value, Mapping):
                raise _Mismatch(path or "<context>", _wrong("a record", value))
            out: dict[str, Any] = {}
            present = 0
            get = value.get
            for attr, scalar, encode, required, emit in fields:
                item = get(attr)
                if item is None:
                    if required:
                        raise _Mismatch(f"{path}.{attr}" if path else attr,
                                        "is missing" if attr not in value else "must not be null")
                    continue
                present += 1
                # Scalars are checked inline (a call per value is most of the cost); a value
                # that fails the inline check goes to its encoder, which raises the mismatch.
                if scalar is int:
                    if type(item) is not int or item > _I64_MAX or item < _I64_MIN:
                        encode(item)
                elif scalar is not None:
                    if type(item) is not scalar:
                        encode(item)
                else:
                    item = encode(item)
                if emit:
                    out[attr] = item
            if not lenient and len(value) > present:
                extra = sorted(k for k in value if k not in known and value[k] is not None)
                if extra:
                    where = f"{path}.{extra[0]}" if path else str(extra[0])
                    raise _Mismatch(where, "is not in the schema")
            return out
        return record
    raise PolicyLoadError(f"schema: context attribute `{path}` has type `{name}`, which the "
                          "engine cannot encode (use Long, String, Boolean, decimal, Set, Record)")


def _chain(expr: Any) -> list[str] | None:
    """``["a", "b"]`` for the expression ``context.a.b`` (``[]`` for ``context``), else None."""
    if not isinstance(expr, Mapping) or len(expr) != 1:
        return None
    if expr.get("Var") == "context":
        return []
    access = expr.get(".")
    if isinstance(access, Mapping):
        base = _chain(access.get("left"))
        if base is not None:
            return [*base, str(access.get("attr"))]
    return None


def _context_paths(node: Any, found: set[tuple[str, ...]]) -> None:
    """Add to ``found`` every context path a policy (in Cedar's JSON form) reads as a value."""
    if isinstance(node, list):
        for item in node:
            _context_paths(item, found)
        return
    if not isinstance(node, Mapping):
        return
    chain = _chain(node)
    if chain is not None:
        found.add(tuple(chain))
        return
    if len(node) == 1 and isinstance(node.get("has"), Mapping):
        base = _chain(node["has"].get("left"))
        if base is not None:
            found.add((*base, str(node["has"].get("attr"))))
            return
    for key, value in node.items():
        if key != "Value":  # literals never mention `context`
            _context_paths(value, found)


def _keep_of(paths: Iterable[tuple[str, ...]]) -> _Keep:
    """The attributes to send, as a trie: ``True`` marks a subtree sent whole."""
    trie: dict[str, Any] = {}
    for path in sorted(set(paths), key=len):
        if not path:
            return True
        node = trie
        for attr in path[:-1]:
            child = node.get(attr)
            if child is True:
                break
            if child is None:
                child = node[attr] = {}
            node = child
        else:
            node[path[-1]] = True
    return trie


# --- loading policies -------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyInfo:
    """One loaded policy."""

    id: str
    """Its ``@id``, or ``<set>/<file>:<line>`` when it has none."""
    policy_set: str
    """The set it belongs to (``baseline`` or a set directory name)."""
    file: str
    """The file it was read from."""
    line: int
    """The line where it starts (1-based)."""
    effect: Literal["permit", "forbid"]
    """``permit`` or ``forbid``."""
    approval: bool
    """True for an ``@approval`` forbid: a human may lift it for one exact call."""
    actions: frozenset[str] | None
    """The action ids its scope names, or ``None`` when it applies to every action."""
    message: str | None
    """Its ``@message`` annotation: the human explanation used in reasons."""
    est: Mapping[str, Any]
    """The policy in Cedar's JSON form (what the sliced policy sets are built from)."""


@dataclass(frozen=True)
class _Chunk:
    """One policy statement of a file, as the splitter found it."""

    text: str
    line: int
    end_line: int


def _split(text: str) -> list[_Chunk]:
    """Split Cedar text at the ``;`` ending each policy, skipping ``//`` comments and strings."""
    chunks: list[_Chunk] = []
    start: int | None = None
    start_line = line = 1
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
        elif ch == "/" and text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
            continue
        elif ch.isspace():
            pass
        else:
            if start is None:
                start, start_line = i, line
            if ch == '"':
                i += 1
                while i < n and text[i] != '"':
                    if text[i] == "\\":
                        i += 1
                    elif text[i] == "\n":
                        line += 1
                    i += 1
            elif ch == ";":
                chunks.append(_Chunk(text[start:i + 1], start_line, line))
                start = None
        i += 1
    if start is not None:
        rest = text[start:].rstrip()
        chunks.append(_Chunk(rest, start_line, start_line + rest.count("\n")))
    return chunks


def _parse_error_line(chunk: _Chunk, message: str) -> int:
    """The line of a parse error inside a statement: the first line whose prefix of the statement
    fails with the same message (earlier prefixes fail with "unexpected end of input")."""
    lines = chunk.text.split("\n")
    if "end of input" in message:
        return chunk.end_line
    for count in range(1, len(lines) + 1):
        try:
            cedarpy.policies_to_json_str("\n".join(lines[:count]))
        except ValueError as exc:
            if str(exc) == message:
                return chunk.line + count - 1
    return chunk.line


_BACKTICKED = re.compile(r"`([^`]+)`")


def _validation_error_line(chunk: _Chunk, message: str) -> int:
    """The line of a validation error: the first line of the policy mentioning a name quoted in
    the message (the unknown attribute, action or type), else where the policy starts."""
    code = [line.split("//", 1)[0] for line in chunk.text.split("\n")]
    for quoted in _BACKTICKED.findall(message):
        if re.fullmatch(r"policy\d+", quoted):
            continue
        pattern = re.compile(r"(?<![A-Za-z0-9_])" + re.escape(quoted) + r"(?![A-Za-z0-9_])")
        for offset, text in enumerate(code):
            if pattern.search(text):
                return chunk.line + offset
    return chunk.line


def _scope_actions(scope: Mapping[str, Any], file: str, line: int) -> frozenset[str] | None:
    op = scope.get("op")
    if op == "All":
        return None
    if op == "==" or (op == "in" and "entity" in scope):
        entities = [scope.get("entity")]
    elif op == "in":
        entities = list(scope.get("entities") or [])
    else:
        raise PolicyLoadError(f"unsupported action scope `{op}`", file=file, line=line)
    ids: set[str] = set()
    for entity in entities:
        if not isinstance(entity, Mapping) or entity.get("type") != "Action":
            raise PolicyLoadError("action scope names something that is not an `Action`",
                                  file=file, line=line)
        ids.add(str(entity.get("id")))
    return frozenset(ids)


def _load_file(text: str, *, policy_set: str, name: str, file: str,
               schema: cedarpy.Schema) -> list[PolicyInfo]:
    """Parse and validate one file; ``name`` is ``<set>/<file>`` (for generated ids)."""
    chunks = _split(text)
    policies: list[PolicyInfo] = []
    for chunk in chunks:
        try:
            est = json.loads(cedarpy.policies_to_json_str(chunk.text))
        except ValueError as exc:
            message = str(exc)
            raise PolicyLoadError(f"does not parse: {message}", file=file,
                                  line=_parse_error_line(chunk, message)) from None
        if est.get("templates") or est.get("templateLinks"):
            raise PolicyLoadError("templates (`?principal`, `?resource`) are not supported",
                                  file=file, line=chunk.line)
        static = list((est.get("staticPolicies") or {}).values())
        if len(static) != 1:  # pragma: no cover - the splitter found exactly one `;`
            raise PolicyLoadError("expected exactly one policy here", file=file, line=chunk.line)
        policies.append(_policy_info(static[0], policy_set=policy_set, name=name, file=file,
                                     line=chunk.line))
    result = cedarpy.validate_policies(text, schema)
    if not result.validation_passed:
        errors = result.errors
        first = errors[0] if errors else None
        message = first.error if first is not None else "does not validate against the schema"
        line: int | None = None
        match = re.fullmatch(r"policy(\d+)", first.policy_id if first is not None else "")
        if match and int(match.group(1)) < len(chunks):
            line = _validation_error_line(chunks[int(match.group(1))], message)
        message = re.sub(r"^for policy `policy\d+`, ", "", message)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise PolicyLoadError(f"does not validate against the schema: {message}{more}",
                              file=file, line=line)
    return policies


def _policy_info(est: Mapping[str, Any], *, policy_set: str, name: str, file: str,
                 line: int) -> PolicyInfo:
    annotations = est.get("annotations") or {}
    policy_id = annotations.get("id", f"{name}:{line}")
    if not isinstance(policy_id, str) or not policy_id.strip():
        raise PolicyLoadError("`@id` needs a non-empty value", file=file, line=line)
    effect = est.get("effect")
    if effect not in ("permit", "forbid"):  # pragma: no cover - Cedar has two effects
        raise PolicyLoadError(f"unknown effect `{effect}`", file=file, line=line)
    approval = "approval" in annotations
    if approval and annotations["approval"] not in (None, ""):
        raise PolicyLoadError("`@approval` takes no value", file=file, line=line)
    if approval and effect != "forbid":
        raise PolicyLoadError("`@approval` only has a meaning on a `forbid`", file=file, line=line)
    message = annotations.get("message")
    if message is not None and not isinstance(message, str):  # pragma: no cover
        message = None
    return PolicyInfo(
        id=policy_id, policy_set=policy_set, file=file, line=line,
        effect="permit" if effect == "permit" else "forbid", approval=approval,
        actions=_scope_actions(est.get("action") or {"op": "All"}, file, line),
        message=message, est=est,
    )


# --- raw Cedar calls --------------------------------------------------------------------------
#
# ``cedarpy.is_authorized`` wraps its Rust core in a batch of one, copies the request and builds
# result objects; calling the core with pre-built handles, dict uids and a pre-encoded context
# saves about a fifth of a decision (reference/perf-anchors.md, "raw _internal"). The core is a
# private module of cedarpy, so this is guarded: without it the public API is used, and the
# tests run the fixtures through both paths.

try:
    from cedarpy import _internal as _cedar_core

    _RAW = callable(getattr(_cedar_core, "is_authorized", None)) and callable(
        getattr(getattr(_cedar_core, "Entities", None), "from_json_str", None))
except ImportError:  # pragma: no cover - depends on the installed cedarpy
    _RAW = False


class _Backend:
    """How the engine talks to cedarpy: the raw core when available, else the public API."""

    def __init__(self, raw: bool) -> None:
        self.raw = raw and _RAW

    def entities(self, document: str, schema: cedarpy.Schema) -> Any:
        if self.raw:
            return _cedar_core.Entities.from_json_str(document, schema)
        return cedarpy.Entities.from_json_str(document, schema)

    def authorize(self, request: dict[str, Any], policies: cedarpy.PolicySet, entities: Any,
                  schema: cedarpy.Schema | None) -> Mapping[str, Any]:
        if self.raw:
            answer: Mapping[str, Any] = json.loads(
                _cedar_core.is_authorized(request, policies, entities, schema, False))
            return answer
        result = cedarpy.is_authorized(request, policies, entities, schema)
        return {"decision": result.decision.value,
                "diagnostics": {"reason": result.diagnostics.reasons,
                                "errors": result.diagnostics.errors}}


# --- the engine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    """The policies of one (policy set, action) pair, as one parsed handle."""

    policies: cedarpy.PolicySet
    ids: tuple[str, ...]
    approval: frozenset[str]
    order: Mapping[str, int]
    encode: _Encoder


@dataclass(frozen=True)
class _ActionPlan:
    """What the engine knows about one action, computed once."""

    action_uid: Mapping[str, str]
    context: Mapping[str, Any]
    common: Mapping[str, Any]

    def encoder(self, keep: _Keep) -> _Encoder:
        return _compile(self.context, "", self.common, keep=keep,
                        lenient_records=frozenset({"args", "provenance"}))


@dataclass(frozen=True)
class _CachedEntities:
    agent: AgentSpec
    trust: int
    delegator: str
    entities: Any


_POLICY_ERROR = re.compile(r"while evaluating policy `([^`]*)`")


class CedarEngine:
    """Decide tool calls with schema-validated Cedar policies, sliced by action.

    Build it with :meth:`from_directory` (or :meth:`from_sources`). It is thread-safe.

    Decision cache: a Cedar answer is a pure function of the policy slice, the request (principal,
    action, resource), the entities and the context. The engine sends Cedar only the context
    attributes the slice's policies read, so the cache key is exactly what Cedar sees: the policy
    set and action (the slice), the tool (the resource), the execution, its agent entity and
    attributes (trust, delegator; the registry entry by object identity, so a reloaded registry
    never hits an old entry) and the encoded context bytes; an answer is reused only from the same
    Cedar backend that produced it. Error answers are not cached. The
    cache holds ``decision_cache_size`` entries (LRU; ``0`` turns it off). A hit skips the Cedar
    call; tests check cached answers equal uncached ones over generated requests.
    """

    def __init__(self, policies: Iterable[PolicyInfo], schema: Mapping[str, Any], *,
                 registry: AgentRegistry | None = None, sets: Iterable[str] = (),
                 validate_requests: bool = False,
                 decision_cache_size: int = DECISION_CACHE_SIZE) -> None:
        """Prefer :meth:`from_directory`. Every policy is validated against ``schema`` here,
        so no way of building an engine evaluates an unvalidated policy."""
        self._setup(policies, schema, registry=registry, sets=sets,
                    validate_requests=validate_requests, validated=False,
                    decision_cache_size=decision_cache_size)

    def _setup(self, policies: Iterable[PolicyInfo], schema: Mapping[str, Any], *,
               registry: AgentRegistry | None, sets: Iterable[str], validate_requests: bool,
               validated: bool, decision_cache_size: int = DECISION_CACHE_SIZE) -> None:
        if type(decision_cache_size) is not int or decision_cache_size < 0:
            raise ValueError("decision_cache_size must be a non-negative int")
        self._decision_cache_size = decision_cache_size
        self._decisions: OrderedDict[tuple[Any, ...],
                                     tuple[AgentSpec, _Backend, PolicyResult]] = OrderedDict()
        # ``validated``: the loader already validated every file (with better line numbers);
        # validating a large set costs seconds with a large schema, so not twice.
        self._policies: tuple[PolicyInfo, ...] = tuple(policies)
        self._schema: dict[str, Any] = json.loads(json.dumps(schema))
        try:
            self._schema_handle = cedarpy.Schema.from_json_str(json.dumps(self._schema))
        except ValueError as exc:
            raise PolicyLoadError(f"the schema is not valid: {exc}", file="<schema>") from None
        self._backend = _Backend(raw=True)
        self._request_schema = self._schema_handle if validate_requests else None
        self._sets = frozenset({BASELINE, *sets, *(p.policy_set for p in self._policies)})
        self._by_set: dict[str, tuple[PolicyInfo, ...]] = {
            name: tuple(p for p in self._policies if p.policy_set == name) for name in self._sets
        }
        self._plans, self._ancestors = self._compile_actions(self._schema)
        self._slices: dict[tuple[str, str], _Slice] = {}
        self._entities: OrderedDict[tuple[str, str], _CachedEntities] = OrderedDict()
        self._lock = threading.Lock()
        self._messages: dict[str, str | None] = {p.id: p.message for p in self._policies}
        seen: dict[str, PolicyInfo] = {}
        for policy in self._policies:
            other = seen.get(policy.id)
            if other is not None:
                raise PolicyLoadError(
                    f"policy id `{policy.id}` is already used at {other.file}:{other.line}",
                    file=policy.file, line=policy.line)
            seen[policy.id] = policy
        if not validated:
            self._validate(seen)
        if registry is not None:
            self._check_registry(registry)

    def _validate(self, policies: Mapping[str, PolicyInfo]) -> None:
        """Validate every policy, as it will be evaluated, in one Cedar call (a call costs time
        in proportion to the schema, so not one call per policy)."""
        if not policies:
            return
        document = {"staticPolicies": {
            pid: {**p.est, "annotations": {**(p.est.get("annotations") or {}), "id": pid}}
            for pid, p in policies.items()}, "templates": {}, "templateLinks": []}
        try:
            text = cedarpy.policies_from_json_str(json.dumps(document))
            result = cedarpy.validate_policies(text, self._schema_handle)
        except ValueError as exc:
            raise PolicyLoadError(f"the policies are not valid Cedar: {exc}") from None
        if result.validation_passed:
            return
        first = result.errors[0] if result.errors else None
        pid = result.id_annotations_by_policy_id.get(first.policy_id) if first else None
        policy = policies.get(pid) if isinstance(pid, str) else None
        detail = re.sub(r"^for policy `[^`]*`, ", "", first.error if first else "invalid")
        raise PolicyLoadError(
            f"policy `{pid}` does not validate against the schema: {detail}",
            file=policy.file if policy else None, line=policy.line if policy else None)

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_directory(cls, path: str | Path, registry: AgentRegistry, *,
                       schema_path: str | Path | None = None,
                       validate_requests: bool = False,
                       decision_cache_size: int = DECISION_CACHE_SIZE) -> CedarEngine:
        """Load ``path`` (``baseline/`` and one directory per policy set).

        The schema is generated from ``registry`` unless ``schema_path`` names a Cedar JSON
        schema file. Every ``.cedar`` file is parsed and validated against it; the first problem
        raises :class:`PolicyLoadError` with the file and line. ``validate_requests=True`` also
        has Cedar re-check every request against the schema (the engine already encodes the
        context strictly from the schema, so this is defence in depth at a cost of tens of µs).
        """
        root = Path(path)
        if not root.is_dir():
            raise PolicyLoadError("no such policy directory", file=str(root))
        sources: dict[str, str] = {}
        sets: list[str] = []
        for entry in sorted(root.iterdir()):
            if entry.name.startswith((".", "_")):
                continue
            if entry.is_file() and entry.suffix == ".cedar":
                raise PolicyLoadError("policy files belong in `baseline/` or a policy set "
                                      "directory", file=str(entry))
            if not entry.is_dir():
                continue
            sets.append(entry.name)
            for file in sorted(entry.glob("*.cedar")):
                try:
                    sources[f"{entry.name}/{file.name}"] = file.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    raise PolicyLoadError(f"cannot read: {exc}", file=str(file)) from None
        schema: Mapping[str, Any] | None = None
        if schema_path is not None:
            schema = _read_schema(Path(schema_path))
        return cls.from_sources(sources, registry, schema=schema, root=str(root), sets=sets,
                                validate_requests=validate_requests,
                                decision_cache_size=decision_cache_size)

    @classmethod
    def from_sources(cls, sources: Mapping[str, str], registry: AgentRegistry, *,
                     schema: Mapping[str, Any] | None = None, root: str | None = None,
                     sets: Iterable[str] = (), validate_requests: bool = False,
                     decision_cache_size: int = DECISION_CACHE_SIZE) -> CedarEngine:
        """Load policies given as text, keyed ``"<set>/<file>.cedar"``.

        ``schema`` defaults to :func:`generate_schema` of ``registry``; ``root`` only prefixes
        file names in errors.
        """
        if schema is None:
            schema = generate_schema(registry)
        try:
            handle = cedarpy.Schema.from_json_str(json.dumps(schema))
        except ValueError as exc:
            raise PolicyLoadError(f"the schema is not valid: {exc}", file="<schema>") from None
        policies: list[PolicyInfo] = []
        names = set(sets)
        for key, text in sorted(sources.items()):
            set_name, sep, file_name = key.partition("/")
            if not sep or not set_name or "/" in file_name or set_name in _FIXTURE_DIRS:
                raise PolicyLoadError("policy files are keyed `<set>/<file>.cedar`", file=key)
            names.add(set_name)
            file = f"{root}/{key}" if root else key
            policies.extend(_load_file(text, policy_set=set_name, name=key, file=file,
                                       schema=handle))
        engine = cls.__new__(cls)
        engine._setup(policies, schema, registry=registry, sets=names,
                      validate_requests=validate_requests, validated=True,
                      decision_cache_size=decision_cache_size)
        return engine

    @staticmethod
    def _compile_actions(schema: Mapping[str, Any]
                         ) -> tuple[dict[str, _ActionPlan], dict[str, frozenset[str]]]:
        if len(schema) != 1 or "" not in schema:
            raise PolicyLoadError("the schema must use the empty namespace `\"\"`",
                                  file="<schema>")
        namespace = schema[""]
        common = namespace.get("commonTypes") or {}
        actions = namespace.get("actions") or {}
        plans: dict[str, _ActionPlan] = {}
        parents: dict[str, set[str]] = {}
        for action, spec in actions.items():
            applies = (spec or {}).get("appliesTo") or {}
            context = applies.get("context") or {"type": "Record", "attributes": {}}
            plan = _ActionPlan({"type": "Action", "id": action}, context, common)
            plan.encoder(True)  # refuse a context type the engine cannot encode, at load
            plans[action] = plan
            parents[action] = {str(p.get("id")) for p in (spec or {}).get("memberOf") or []
                               if isinstance(p, Mapping)}
        ancestors: dict[str, frozenset[str]] = {}
        for action in actions:
            found: set[str] = set()
            todo = list(parents.get(action, ()))
            while todo:
                group = todo.pop()
                if group not in found:
                    found.add(group)
                    todo.extend(parents.get(group, ()))
            ancestors[action] = frozenset(found)
        return plans, ancestors

    def _check_registry(self, registry: AgentRegistry) -> None:
        for agent in registry.list_agents():
            if agent.policy_set not in self._sets:
                raise PolicyLoadError(
                    f"agent `{agent.id}` uses policy set `{agent.policy_set}`, which has no "
                    "directory", file=registry.sources.get(agent.id))
            for action in sorted(agent.actions):
                if action not in self._plans:
                    raise PolicyLoadError(f"the schema has no action `{action}` (agent "
                                          f"`{agent.id}`)", file="<schema>")
                self._slice(agent.policy_set, action)
        probe = next(iter(registry.list_agents()), None)
        if probe is not None:
            try:
                self._build_entities(_probe_identity(probe), probe)
            except ValueError as exc:
                raise PolicyLoadError(f"the schema does not fit the engine's entities: {exc}",
                                      file="<schema>") from None

    # --- introspection ------------------------------------------------------------------

    @property
    def policy_count(self) -> int:
        """How many policies were loaded, over all sets."""
        return len(self._policies)

    @property
    def policies(self) -> tuple[PolicyInfo, ...]:
        """Every loaded policy."""
        return self._policies

    @property
    def schema(self) -> dict[str, Any]:
        """A copy of the Cedar JSON schema in use."""
        result: dict[str, Any] = json.loads(json.dumps(self._schema))
        return result

    @property
    def policy_sets(self) -> frozenset[str]:
        """The known policy sets (``baseline`` included)."""
        return self._sets

    def slice_ids(self, policy_set: str, action: str) -> tuple[str, ...]:
        """The ids of the policies evaluated for ``action`` in ``policy_set``."""
        return self._slice(policy_set, action).ids

    # --- evaluation ---------------------------------------------------------------------

    def evaluate(self, request: PolicyRequest) -> PolicyResult:
        """Decide one call. Never raises: any failure is a ``deny`` with ``policy.error``."""
        try:
            return self._evaluate(request)
        except _Mismatch as exc:
            return policy_error(f"the request does not fit the policy schema: {exc.message()}")
        except _RequestError as exc:
            return policy_error(str(exc))
        except Exception as exc:
            log.exception("cedar evaluation failed")
            return policy_error(f"the policy engine failed ({type(exc).__name__})")

    def _evaluate(self, request: PolicyRequest) -> PolicyResult:
        identity, agent, tool = request.identity, request.agent, request.tool
        if identity.agent_id != agent.id:
            raise _RequestError(f"the execution runs as `{identity.agent_id}`, not `{agent.id}`")
        registered = agent.tools.get(tool.name)
        if registered is not tool and registered != tool:
            raise _RequestError(f"tool `{tool.name}` is not registered for agent `{agent.id}`")
        plan = self._plans.get(tool.action)
        if plan is None:
            raise _RequestError(f"action `{tool.action}` is not in the policy schema")
        if agent.policy_set not in self._sets:
            raise _RequestError(f"policy set `{agent.policy_set}` is not loaded")
        chosen = self._slices.get((agent.policy_set, tool.action))
        if chosen is None:
            chosen = self._slice(agent.policy_set, tool.action)
        context = dict(request.context)
        context["args"] = request.arguments
        encoded = json.dumps(chosen.encode(context), separators=(",", ":"))
        key = (agent.policy_set, tool.action, tool.name, identity.execution_id, agent.id,
               identity.agent_trust, identity.delegator_id, encoded)
        cached = self._cached_decision(key, agent)
        if cached is not None:
            return cached
        answer = self._backend.authorize(
            {"principal": {"type": "Execution", "id": identity.execution_id},
             "action": plan.action_uid,
             "resource": {"type": "Tool", "id": tool.name},
             "context": encoded},
            chosen.policies, self._entities_of(identity, agent), self._request_schema)
        result = _interpret(answer, chosen, self._messages)
        self._remember_decision(key, agent, result)
        return result

    def _cached_decision(self, key: tuple[Any, ...], agent: AgentSpec) -> PolicyResult | None:
        if not self._decision_cache_size:
            return None
        with self._lock:
            hit = self._decisions.get(key)
            if hit is None or hit[0] is not agent or hit[1] is not self._backend:
                return None
            self._decisions.move_to_end(key)
            return hit[2]

    def _remember_decision(self, key: tuple[Any, ...], agent: AgentSpec,
                           result: PolicyResult) -> None:
        if not self._decision_cache_size or any(r.code == "policy.error"
                                                for r in result.reasons):
            return
        with self._lock:
            self._decisions[key] = (agent, self._backend, result)
            self._decisions.move_to_end(key)
            while len(self._decisions) > self._decision_cache_size:
                self._decisions.popitem(last=False)

    def _slice(self, policy_set: str, action: str) -> _Slice:
        key = (policy_set, action)
        found = self._slices.get(key)
        if found is not None:
            return found
        if policy_set not in self._sets:
            raise _RequestError(f"policy set `{policy_set}` is not loaded")
        names = {action, *self._ancestors.get(action, ())}
        chosen = [p for p in (*self._by_set.get(BASELINE, ()),
                              *(self._by_set.get(policy_set, ()) if policy_set != BASELINE
                                else ()))
                  if p.actions is None or not p.actions.isdisjoint(names)]
        document = {"staticPolicies": {p.id: p.est for p in chosen}, "templates": {},
                    "templateLinks": []}
        plan = self._plans.get(action)
        if plan is None:
            raise _RequestError(f"action `{action}` is not in the policy schema")
        keep: _Keep = True
        if self._request_schema is None:
            paths: set[tuple[str, ...]] = set()
            for policy in chosen:
                _context_paths(policy.est.get("conditions") or [], paths)
            keep = _keep_of(paths)
        built = _Slice(cedarpy.PolicySet.from_json_str(json.dumps(document)),
                       tuple(p.id for p in chosen),
                       frozenset(p.id for p in chosen if p.approval),
                       {p.id: index for index, p in enumerate(chosen)},
                       plan.encoder(keep))
        with self._lock:
            return self._slices.setdefault(key, built)

    def _entities_of(self, identity: ExecutionIdentity, agent: AgentSpec) -> Any:
        key = (identity.execution_id, agent.id)
        with self._lock:
            hit = self._entities.get(key)
            if hit is not None and hit.agent is agent and hit.trust == identity.agent_trust \
                    and hit.delegator == identity.delegator_id:
                self._entities.move_to_end(key)
                return hit.entities
        entities = self._build_entities(identity, agent)
        with self._lock:
            self._entities[key] = _CachedEntities(agent, identity.agent_trust,
                                                  identity.delegator_id, entities)
            self._entities.move_to_end(key)
            while len(self._entities) > _ENTITY_CACHE_SIZE:
                self._entities.popitem(last=False)
        return entities

    def _build_entities(self, identity: ExecutionIdentity, agent: AgentSpec) -> Any:
        document = [
            {"uid": {"type": "Execution", "id": identity.execution_id},
             "attrs": {"trust": identity.agent_trust, "delegator": identity.delegator_id},
             "parents": [{"type": "Agent", "id": agent.id}]},
            {"uid": {"type": "Agent", "id": agent.id},
             "attrs": {"trust_level": agent.trust_level, "owner": agent.owner,
                       "policy_set": agent.policy_set},
             "parents": []},
            *({"uid": {"type": "Tool", "id": tool.name},
               "attrs": {"consequential": tool.consequential, "risk": tool.risk,
                         "output_trust": tool.output_trust},
               "parents": []} for tool in agent.tools.values()),
        ]
        return self._backend.entities(json.dumps(document), self._schema_handle)

    def close(self) -> None:
        with self._lock:
            self._entities.clear()
            self._decisions.clear()


class _RequestError(Exception):
    """A request the engine refuses to evaluate (its message is safe to show)."""


def _interpret(answer: Mapping[str, Any], chosen: _Slice,
               messages: Mapping[str, str | None]) -> PolicyResult:
    decision = answer.get("decision")
    diagnostics = answer.get("diagnostics") or {}
    errors = list(diagnostics.get("errors") or [])
    determining = sorted((str(r) for r in diagnostics.get("reason") or []),
                         key=lambda p: chosen.order.get(p, len(chosen.order)))
    if errors or decision not in ("Allow", "Deny"):
        if not errors:
            errors = [f"cedar returned `{decision}`"]
        reasons = []
        for error in errors:
            match = _POLICY_ERROR.search(str(error))
            reasons.append(Reason("policy.error", f"policy evaluation error: {error}",
                                  match.group(1) if match else None))
        return PolicyResult("deny", tuple(reasons))
    if decision == "Allow":
        if not determining:  # pragma: no cover - Cedar allows only through a permit
            return policy_error("cedar allowed without a determining permit")
        return PolicyResult("allow", tuple(
            Reason("policy.permit", messages.get(p) or f"permitted by `{p}`", p)
            for p in determining))
    if not determining:
        return PolicyResult("deny", (Reason("policy.no_permit",
                                            "no policy permits this call"),))
    plain = [p for p in determining if p not in chosen.approval]
    approval = [p for p in determining if p in chosen.approval]
    approval_reasons = tuple(
        Reason("policy.approval", messages.get(p) or f"needs approval under `{p}`", p)
        for p in approval)
    if not plain:
        return PolicyResult("approval_required", approval_reasons)
    return PolicyResult("deny", (*(
        Reason("policy.forbid", messages.get(p) or f"forbidden by `{p}`", p) for p in plain),
        *approval_reasons))


def _read_schema(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyLoadError(f"cannot read the schema: {exc}", file=str(path)) from None
    except json.JSONDecodeError as exc:
        raise PolicyLoadError(f"the schema is not JSON: {exc.msg}", file=str(path),
                              line=exc.lineno) from None
    if not isinstance(data, dict):
        raise PolicyLoadError("the schema must be a Cedar JSON schema object", file=str(path))
    return data


def _probe_identity(agent: AgentSpec) -> ExecutionIdentity:
    """A synthetic identity, only used to check that the schema fits the engine's entities."""
    return ExecutionIdentity(
        execution_id="exec_probe", jti="probe", issuer="probe", audience="probe", issued_at=0,
        not_before=0, expires_at=1, agent_id=agent.id, agent_trust=agent.trust_level,
        delegator_type="human", delegator_id="probe@example.com", delegator_issuer="probe",
        actors=(Actor(agent.id, "exec_probe"),), purpose="probe", capabilities=CapabilitySet(),
        budget=Budget(), risk_envelope=0, depth=0, ancestors=(),
    )
