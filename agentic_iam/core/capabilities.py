"""Capabilities: an action pattern plus typed argument constraints, and their algebra.

A capability says *what* may be done (``refund:create`` or ``refund:*``) and *with which
arguments* (``amount <= 100``, ``currency in {USD}``). ``matches`` checks a call;
``is_narrower_than`` decides attenuation, so that a sub-delegation can be proved to only narrow.

Typing is strict and nothing is coerced: a bool is not an int, ``"100"`` is not ``100``, floats are
refused for numeric bounds (money is integer minor units or :class:`~decimal.Decimal`), NaN and
infinities are refused everywhere. ``is_narrower_than`` is sound, not complete: a pair it cannot
prove narrower is reported as *not* narrower. This module must never widen a grant to be helpful.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from agentic_iam.errors import CapabilityError

__all__ = [
    "ArgumentConstraint",
    "Capability",
    "CapabilitySet",
    "MatchResult",
    "Scalar",
    "action_covers",
    "parse_capability",
]

Scalar = str | int | Decimal | bool
Number = int | Decimal

#: Regex constraints are matched only against strings up to this length (and patterns are
#: bounded), to keep the backtracking engine's worst case small.
MAX_REGEX_INPUT = 1024
MAX_REGEX_PATTERN = 256
MAX_IN_VALUES = 256

_ACTION_RE = re.compile(r"^[A-Za-z0-9_.\-]+(:[A-Za-z0-9_.\-]+)*(:\*)?$")
_ARG_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KEYS = ("eq", "in", "min", "max", "gt", "lt", "prefix", "regex")


def _is_number(value: object) -> bool:
    if type(value) is int:
        return True
    return type(value) is Decimal and value.is_finite()


def _kind(value: object) -> str:
    """The comparison kind of a value; values of different kinds are never equal."""
    if type(value) is bool:
        return "bool"
    if _is_number(value):
        return "number"
    if type(value) is str:
        return "string"
    return "invalid"


def _check_scalar(value: object, where: str) -> Scalar:
    if _kind(value) == "invalid":
        raise CapabilityError(
            f"{where}: value {value!r} is not a string, integer, finite Decimal or bool"
        )
    return value  # type: ignore[return-value]


def _same(a: object, b: object) -> bool:
    kind = _kind(a)
    return kind != "invalid" and kind == _kind(b) and a == b


def _describe(value: object) -> str:
    if type(value) is Decimal:
        return f"Decimal('{value}')"
    return repr(value)


@dataclass(frozen=True)
class ArgumentConstraint:
    """Constraints on one argument; every bound that is set must hold (a conjunction)."""

    eq: Scalar | None = None
    """The argument must equal this value (same type)."""
    one_of: frozenset[Scalar] | None = None
    """The argument must be one of these values (``in``)."""
    min: Number | None = None
    """Inclusive lower bound."""
    max: Number | None = None
    """Inclusive upper bound."""
    gt: Number | None = None
    """Exclusive lower bound."""
    lt: Number | None = None
    """Exclusive upper bound."""
    prefix: str | None = None
    """The string argument must start with this."""
    regex: str | None = None
    """The string argument must fully match this pattern (length-limited)."""
    _compiled: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.eq is not None:
            _check_scalar(self.eq, "eq")
        if self.one_of is not None:
            if not self.one_of:
                raise CapabilityError("`in` needs at least one value")
            if len(self.one_of) > MAX_IN_VALUES:
                raise CapabilityError(f"`in` takes at most {MAX_IN_VALUES} values")
            for value in self.one_of:
                _check_scalar(value, "in")
        for name in ("min", "max", "gt", "lt"):
            bound = getattr(self, name)
            if bound is not None and not _is_number(bound):
                raise CapabilityError(
                    f"`{name}` must be an integer or a finite Decimal, got {bound!r}"
                )
        if self.prefix is not None and type(self.prefix) is not str:
            raise CapabilityError(f"`prefix` must be a string, got {self.prefix!r}")
        if self.regex is not None:
            if type(self.regex) is not str or len(self.regex) > MAX_REGEX_PATTERN:
                raise CapabilityError(f"`regex` must be a string of at most {MAX_REGEX_PATTERN}")
            try:
                object.__setattr__(self, "_compiled", re.compile(self.regex))
            except re.error as exc:
                raise CapabilityError(f"`regex` {self.regex!r} does not compile: {exc}") from None
        if self.is_empty():
            raise CapabilityError("an argument constraint needs at least one bound")

    def is_empty(self) -> bool:
        return all(getattr(self, key) is None for key in _FIELDS)

    # --- matching -----------------------------------------------------------------------

    def violation(self, value: object) -> str | None:
        """Why ``value`` does not satisfy the constraint, or ``None`` when it does."""
        kind = _kind(value)
        if kind == "invalid":
            if isinstance(value, float):
                return f"{value!r} is a float; use integer minor units or a Decimal"
            if type(value) is Decimal:
                return f"{_describe(value)} is not finite"
            return f"value of type {type(value).__name__} is not allowed"
        if self.eq is not None and not _same(value, self.eq):
            return f"must equal {_describe(self.eq)}, got {_describe(value)}"
        if self.one_of is not None and not any(_same(value, item) for item in self.one_of):
            allowed = ", ".join(sorted(_describe(v) for v in self.one_of))
            return f"must be one of {{{allowed}}}, got {_describe(value)}"
        bounds = ((self.min, "min"), (self.max, "max"), (self.gt, "gt"), (self.lt, "lt"))
        if any(bound is not None for bound, _ in bounds):
            if kind != "number":
                return f"must be a number (integer or Decimal), got {_describe(value)}"
            number: Number = value  # type: ignore[assignment]
            if self.min is not None and not number >= self.min:
                return f"must be >= {self.min}, got {number}"
            if self.max is not None and not number <= self.max:
                return f"must be <= {self.max}, got {number}"
            if self.gt is not None and not number > self.gt:
                return f"must be > {self.gt}, got {number}"
            if self.lt is not None and not number < self.lt:
                return f"must be < {self.lt}, got {number}"
        if self.prefix is not None or self.regex is not None:
            if kind != "string":
                return f"must be a string, got {_describe(value)}"
            text: str = value  # type: ignore[assignment]
            if self.prefix is not None and not text.startswith(self.prefix):
                return f"must start with {self.prefix!r}"
            if self._compiled is not None:
                if len(text) > MAX_REGEX_INPUT:
                    return f"is longer than {MAX_REGEX_INPUT} characters"
                if self._compiled.fullmatch(text) is None:
                    return f"must match /{self.regex}/"
        return None

    def holds(self, value: object) -> bool:
        return self.violation(value) is None

    # --- attenuation --------------------------------------------------------------------

    def is_narrower_than(self, parent: ArgumentConstraint) -> bool:
        """True when every value this constraint admits is admitted by ``parent``.

        Proved clause by clause: each bound of the parent must be implied by the child's
        finite value set (``eq``/``in``) or by a single bound of the child. Anything else is
        reported as not narrower.
        """
        finite = self._finite_values()
        if finite is not None:
            return all(parent.holds(value) for value in finite)
        return all(self._implies(name, getattr(parent, name), parent) for name in _FIELDS
                   if getattr(parent, name) is not None)

    def _finite_values(self) -> tuple[Scalar, ...] | None:
        if self.eq is not None:
            return (self.eq,) if self.holds(self.eq) else ()
        if self.one_of is not None:
            return tuple(value for value in self.one_of if self.holds(value))
        return None

    def _implies(self, name: str, bound: Any, parent: ArgumentConstraint) -> bool:
        # Only reached when the child has no finite value set, so parent eq/in cannot be implied.
        if name in ("eq", "one_of"):
            return False
        if name == "max":
            return (self.max is not None and self.max <= bound) or (
                self.lt is not None and self.lt <= bound
            )
        if name == "lt":
            return (self.lt is not None and self.lt <= bound) or (
                self.max is not None and self.max < bound
            )
        if name == "min":
            return (self.min is not None and self.min >= bound) or (
                self.gt is not None and self.gt >= bound
            )
        if name == "gt":
            return (self.gt is not None and self.gt >= bound) or (
                self.min is not None and self.min > bound
            )
        if name == "prefix":
            return self.prefix is not None and self.prefix.startswith(bound)
        if name == "regex":
            # Regular-language inclusion is not decided here; only the identical pattern is
            # accepted, and it must also come with the child's own string-typing.
            return bool(self.regex == bound)
        return False

    # --- serialization ------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in _FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            key = "in" if name == "one_of" else name
            if name == "one_of":
                out[key] = sorted((_encode(v) for v in value), key=_sort_key)
            else:
                out[key] = _encode(value)
        return out

    @classmethod
    def from_json(cls, data: object, *, where: str = "constraint") -> ArgumentConstraint:
        if not isinstance(data, Mapping):
            raise CapabilityError(f"{where}: expected a mapping of bounds, got {data!r}")
        kwargs: dict[str, Any] = {}
        for key, raw in data.items():
            if key not in _KEYS:
                raise CapabilityError(
                    f"{where}: unknown constraint `{key}` (known: {', '.join(_KEYS)})"
                )
            if key == "in":
                if not isinstance(raw, (list, tuple, set, frozenset)):
                    raise CapabilityError(f"{where}: `in` needs a list of values")
                values = [_decode(v, f"{where}.in") for v in raw]
                kwargs["one_of"] = frozenset(values)
            else:
                kwargs[key] = _decode(raw, f"{where}.{key}")
        try:
            return cls(**kwargs)
        except CapabilityError as exc:
            raise CapabilityError(f"{where}: {exc}") from None

    def describe(self, argument: str) -> str:
        parts: list[str] = []
        if self.eq is not None:
            parts.append(f"{argument}={_literal(self.eq)}")
        if self.one_of is not None:
            parts.append(f"{argument}=" + "|".join(sorted(_literal(v) for v in self.one_of)))
        for name, op in (("min", ">="), ("max", "<="), ("gt", ">"), ("lt", "<")):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{argument}{op}{_literal(value)}")
        if self.prefix is not None:
            parts.append(f"{argument}^={_literal(self.prefix)}")
        if self.regex is not None:
            parts.append(f"{argument}~={_literal(self.regex)}")
        return " ".join(parts)


_FIELDS = ("eq", "one_of", "min", "max", "gt", "lt", "prefix", "regex")


def _encode(value: Scalar) -> Any:
    # JSON has no Decimal; a tagged object keeps it exact and distinct from a float.
    if type(value) is Decimal:
        return {"$decimal": str(value)}
    return value


def _decode(raw: object, where: str) -> Scalar:
    if isinstance(raw, Mapping):
        if set(raw) != {"$decimal"} or type(raw["$decimal"]) is not str:
            raise CapabilityError(f"{where}: expected a scalar or {{'$decimal': '...'}}")
        try:
            value = Decimal(raw["$decimal"])
        except InvalidOperation:
            raise CapabilityError(f"{where}: {raw['$decimal']!r} is not a decimal") from None
        return _check_scalar(value, where)
    if isinstance(raw, float):
        raise CapabilityError(
            f"{where}: {raw!r} is a float; use integer minor units or a quoted decimal"
        )
    return _check_scalar(raw, where)


def _sort_key(value: Any) -> tuple[str, str]:
    return (type(value).__name__, repr(value))


def _literal(value: Scalar) -> str:
    if type(value) is bool:
        return "true" if value else "false"
    if type(value) is str:
        bare = re.fullmatch(r"[A-Za-z_@./\-][A-Za-z0-9_@./\-]*", value)
        if bare and value not in ("true", "false"):
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def action_covers(pattern: str, action: str) -> bool:
    """True when the action pattern (``refund:create`` or ``refund:*``) covers ``action``.

    ``action`` may itself be a pattern: ``refund:*`` covers ``refund:sub:*``.
    """
    if pattern == action:
        return True
    if pattern.endswith(":*"):
        stem = pattern[:-1]  # keep the colon so that `refund:*` never covers `refunds:x`
        return action.startswith(stem)
    return False


@dataclass(frozen=True)
class MatchResult:
    """The outcome of checking a call against a capability set."""

    ok: bool
    """True when some capability admits the call."""
    code: str
    """``capability.ok``, ``capability.action`` (not delegated) or ``capability.constraint``."""
    argument: str | None = None
    """The argument whose constraint failed."""
    message: str = ""
    """A human explanation."""
    capability: Capability | None = None
    """The capability that admitted the call, or the closest one that did not."""


@dataclass(frozen=True)
class Capability:
    """An action pattern plus argument constraints."""

    action: str
    """``refund:create`` or ``refund:*``."""
    constraints: Mapping[str, ArgumentConstraint] = field(default_factory=dict)
    """Per-argument constraints; an argument not named here is not constrained."""

    def __post_init__(self) -> None:
        if type(self.action) is not str or not _ACTION_RE.fullmatch(self.action):
            raise CapabilityError(
                f"invalid action pattern {self.action!r}: use `name:verb` or `name:*`"
            )
        for name in self.constraints:
            if not _ARG_RE.fullmatch(name):
                raise CapabilityError(f"invalid argument name {name!r} in `{self.action}`")
        object.__setattr__(self, "constraints", dict(sorted(self.constraints.items())))

    def __hash__(self) -> int:
        return hash((self.action, tuple(self.constraints.items())))

    def covers(self, action: str) -> bool:
        return action_covers(self.action, action)

    def check(self, action: str, arguments: Mapping[str, object]) -> MatchResult:
        if not self.covers(action):
            return MatchResult(False, "capability.action", None, f"`{action}` is not delegated")
        for name, constraint in self.constraints.items():
            if name not in arguments:
                return MatchResult(
                    False, "capability.constraint", name,
                    f"argument `{name}` is required by the grant but missing", self,
                )
            problem = constraint.violation(arguments[name])
            if problem is not None:
                return MatchResult(
                    False, "capability.constraint", name, f"argument `{name}` {problem}", self
                )
        return MatchResult(True, "capability.ok", None, "", self)

    def matches(self, action: str, arguments: Mapping[str, object]) -> bool:
        return self.check(action, arguments).ok

    def is_narrower_than(self, parent: Capability) -> bool:
        return self.widening(parent) is None

    def widening(self, parent: Capability) -> str | None:
        """What this capability widens relative to ``parent``, or ``None`` when narrower."""
        if not action_covers(parent.action, self.action):
            return f"action `{self.action}` is outside `{parent.action}`"
        for name, parent_constraint in parent.constraints.items():
            mine = self.constraints.get(name)
            if mine is None:
                return f"argument `{name}` of `{self.action}` is left unconstrained"
            if not mine.is_narrower_than(parent_constraint):
                return (
                    f"argument `{name}` of `{self.action}`: `{mine.describe(name)}` is not "
                    f"within `{parent_constraint.describe(name)}`"
                )
        return None

    def describe(self) -> str:
        parts = [self.action] + [c.describe(n) for n, c in self.constraints.items()]
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "constraints": {name: c.to_json() for name, c in self.constraints.items()},
        }

    @classmethod
    def from_json(cls, data: object) -> Capability:
        if not isinstance(data, Mapping):
            raise CapabilityError(f"a capability must be a mapping, got {data!r}")
        unknown = set(data) - {"action", "constraints"}
        if unknown:
            raise CapabilityError(f"unknown capability field `{sorted(unknown)[0]}`")
        action = data.get("action")
        if type(action) is not str:
            raise CapabilityError("a capability needs an `action` string")
        raw = data.get("constraints") or {}
        if not isinstance(raw, Mapping):
            raise CapabilityError(f"`constraints` of `{action}` must be a mapping")
        constraints = {
            str(name): ArgumentConstraint.from_json(bounds, where=f"{action}.{name}")
            for name, bounds in raw.items()
        }
        return cls(action, constraints)


@dataclass(frozen=True)
class CapabilitySet:
    """The capabilities of one grant. A call is allowed when any one capability admits it."""

    capabilities: tuple[Capability, ...] = ()
    """The capabilities, in the order they were granted."""

    def __iter__(self) -> Any:
        return iter(self.capabilities)

    def __len__(self) -> int:
        return len(self.capabilities)

    def check(self, action: str, arguments: Mapping[str, object]) -> MatchResult:
        closest: MatchResult | None = None
        for capability in self.capabilities:
            result = capability.check(action, arguments)
            if result.ok:
                return result
            if result.code == "capability.constraint" and closest is None:
                closest = result
        if closest is not None:
            return closest
        return MatchResult(False, "capability.action", None, f"action `{action}` is not delegated")

    def covers_action(self, action: str) -> bool:
        return any(c.covers(action) for c in self.capabilities)

    def widening(self, parent: CapabilitySet) -> str | None:
        """What this set widens relative to ``parent`` (``None`` when every capability of
        this set is narrower than some capability of the parent)."""
        for capability in self.capabilities:
            reasons = [capability.widening(p) for p in parent.capabilities]
            if all(reason is not None for reason in reasons):
                relevant = [r for r, p in zip(reasons, parent.capabilities, strict=True)
                            if action_covers(p.action, capability.action)]
                return (relevant or reasons or [f"action `{capability.action}` is not granted"])[0]
        return None

    def is_narrower_than(self, parent: CapabilitySet) -> bool:
        return self.widening(parent) is None

    def actions(self) -> tuple[str, ...]:
        return tuple(c.action for c in self.capabilities)

    def to_json(self) -> list[dict[str, Any]]:
        return [c.to_json() for c in self.capabilities]

    @classmethod
    def from_json(cls, data: object) -> CapabilitySet:
        if not isinstance(data, (list, tuple)):
            raise CapabilityError("capabilities must be a list")
        return cls(tuple(Capability.from_json(item) for item in data))

    @classmethod
    def of(cls, items: Iterable[Capability | str]) -> CapabilitySet:
        return cls(tuple(parse_capability(i) if isinstance(i, str) else i for i in items))


# --- the one-line syntax ------------------------------------------------------------------

_CLAUSE_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(<=|>=|\^=|~=|=|<|>)(.*)$", re.S)


def _split(text: str) -> list[str]:
    """Split on whitespace outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            current.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch.isspace() and not quoted:
            if current:
                parts.append("".join(current))
                current = []
        else:
            current.append(ch)
    if quoted:
        raise CapabilityError(f"unterminated quote in {text!r}")
    if current:
        parts.append("".join(current))
    return parts


def _parse_value(raw: str, where: str) -> Scalar:
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        body = raw[1:-1]
        return re.sub(r"\\(.)", r"\1", body)
    if raw == "":
        raise CapabilityError(f"{where}: missing value")
    if raw in ("true", "false"):
        return raw == "true"
    if re.fullmatch(r"-?[0-9]+", raw):
        return int(raw)
    if re.fullmatch(r"-?[0-9]+\.[0-9]+", raw):
        return Decimal(raw)
    return raw


def parse_capability(text: str) -> Capability:
    """Parse the one-line syntax used by the CLI and docs.

    ``ACTION [CLAUSE ...]`` where a clause is ``arg<=N`` (max), ``arg>=N`` (min), ``arg<N`` (lt),
    ``arg>N`` (gt), ``arg=V`` (eq), ``arg=V1|V2`` (in), ``arg^=PREFIX`` (prefix) or
    ``arg~=REGEX`` (regex). Values: ``123`` is an integer, ``12.50`` a Decimal, ``true``/``false``
    booleans, anything else a string; quote to force a string (``account="1234"``). Several
    clauses on one argument are combined (``amount>=1 amount<=100``).
    """
    if type(text) is not str or not text.strip():
        raise CapabilityError("empty capability")
    head, *clauses = _split(text.strip())
    bounds: dict[str, dict[str, Any]] = {}
    for clause in clauses:
        match = _CLAUSE_RE.match(clause)
        if match is None:
            raise CapabilityError(
                f"cannot parse clause {clause!r} of {text!r}: expected e.g. `amount<=100`"
            )
        name, op, raw = match.groups()
        where = f"clause {clause!r}"
        slot = bounds.setdefault(name, {})
        if op == "=":
            alternatives = _split_alternatives(raw)
            values = [_parse_value(v, where) for v in alternatives]
            key, value = ("eq", values[0]) if len(values) == 1 else ("one_of", frozenset(values))
        elif op in ("<=", ">=", "<", ">"):
            value = _parse_value(raw, where)
            if not _is_number(value):
                raise CapabilityError(f"{where}: `{op}` needs a number")
            key = {"<=": "max", ">=": "min", "<": "lt", ">": "gt"}[op]
        else:
            value = _parse_value(raw, where)
            if type(value) is not str:
                value = raw
            key = "prefix" if op == "^=" else "regex"
        if key in slot:
            raise CapabilityError(f"{where}: `{name}` already has a `{key}` bound")
        slot[key] = value
    try:
        return Capability(head, {name: ArgumentConstraint(**kw) for name, kw in bounds.items()})
    except CapabilityError as exc:
        raise CapabilityError(f"{text!r}: {exc}") from None


def _split_alternatives(raw: str) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in raw:
        if ch == '"':
            quoted = not quoted
        if ch == "|" and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return out


def capabilities_from_strings(items: Sequence[str]) -> CapabilitySet:
    return CapabilitySet(tuple(parse_capability(item) for item in items))
