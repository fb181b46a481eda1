"""Provenance: the audit event schema, the sinks that record it, and verification of the log.

What it is for
    One :class:`AuditEvent` per delegation, decision, result, approval and model-usage report,
    fanned out by a :class:`Recorder` to sinks behind the :class:`AuditSink` protocol:

    * :class:`JsonlSink`, the durable local record: canonical JSON lines in one hash chain, with an
      optional Ed25519-signed head so that truncation and wholesale rewrites are detectable;
    * :class:`OTelSink`, a side channel: one ``execute_tool`` span per tool call with the GenAI
      semantic-convention attributes and an ``aiam.*`` namespace;
    * :class:`MemorySink`, the test double.

    :func:`verify_log` checks a JSONL log and says which record is the first bad one.

What it must never do
    * Let a raw token or secret reach a sink. Every string of every event passes through
      :func:`redact_secrets` (the rule set of :mod:`agentic_iam.core.redaction`, the same the
      tool firewall applies: private keys, cloud and SaaS keys, JWTs, ``Bearer``/``Basic``
      credentials, passwords in URLs and assignments, labelled and high-entropy keys) before any
      sink sees it, whatever redactor the caller configured, and a string stored under a key
      that names a secret (``password``, ``api_key``, ``token``…) is replaced whole; log
      messages and error messages about events are scrubbed the same way.
    * Lose a decision silently. A durable sink that fails makes :meth:`Recorder.record` raise
      :class:`~agentic_iam.errors.AuditError`; the Guard turns that into a deny, so the tool does
      not run without its record.
    * Trust a torn log tail, or append after one; sign a head over a log that does not match
      its last signed head (see :class:`JsonlSink`).
    * Import an agent framework, or need opentelemetry at import time (it is the ``otel`` extra and
      is imported when an :class:`OTelSink` is created).

File format (one JSON object per line, UTF-8, ``\\n``-terminated)
    Each line is the canonical JSON (:func:`canonical_json`: sorted keys, ``(",", ":")``
    separators, no ASCII escaping, no NaN/Infinity) of the event's fields, without the ones that are
    ``None``, plus three chain members:

    ``sequence``  the record's index in the file (0, 1, 2, …), assigned by the sink under the file
                  lock, so it is per file, not per process (the Recorder's own counter is replaced);
    ``prev``      the ``hash`` of the previous record, or 64 zeros for the first;
    ``hash``      ``sha256`` (hex) of the canonical JSON of the record without its ``hash`` member,
                  that is, of the line's canonical bytes with that one member left out.

    Because ``hash`` covers ``prev`` and ``sequence``, a changed record fails its own hash (or, if
    the hash was recomputed, the next record's ``prev``); a deleted or moved record shows as a gap
    in ``sequence``. Neither catches a cut-off tail or a rewrite of the whole file: that is what the
    signed head is for. With a :class:`HeadSigner`, the sink replaces ``<log>.head`` atomically
    (temporary file + ``os.replace``) after each write, and when it creates a log, with::

        {"count": N, "head_hash": "<hash of record N-1, or 64 zeros>", "kid": "...", "sig": "…"}

    where ``sig`` is Ed25519 over ``canonical_json({"count", "head_hash", "kid"})``. Keep the head
    (or a copy of it) somewhere the writer of the log cannot roll back: a head restored together
    with an older copy of the log is, by construction, valid. The sink itself never signs a
    head over records it has not checked (see :class:`JsonlSink`).

    The hash is over Python's canonical JSON: keys sorted by code point and floats in ``repr``
    form. That is stable across processes and Python versions but it is not RFC 8785 (JCS).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import json
import logging
import os
import re
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, get_args, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator

from agentic_iam.core.redaction import may_hold_secret, redact_secrets, secret_field_kind
from agentic_iam.errors import AuditError, AuditIntegrityError, KeySetError, MissingExtraError

if sys.platform != "win32":
    import fcntl

try:  # an optional speedup for canonical JSON; the bytes are the same without it
    _orjson: Any = importlib.import_module("orjson")
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider
    from opentelemetry.util.types import AttributeValue

__all__ = [
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "ZERO_HASH",
    "AuditEvent",
    "AuditSink",
    "ChainHop",
    "DecisionInfo",
    "EventType",
    "HeadSigner",
    "JsonlSink",
    "MemorySink",
    "OTelSink",
    "ReasonInfo",
    "ReasoningInfo",
    "Recorder",
    "Redactor",
    "ResultInfo",
    "SessionInfo",
    "TraceContext",
    "VerifyReport",
    "canonical_json",
    "digest",
    "iter_records",
    "json_safe",
    "public_keys_from_jwks",
    "redact_secrets",
    "verify_log",
]

logger = logging.getLogger("agentic_iam.audit")

SCHEMA_VERSION: Final = 1
ZERO_HASH: Final = "0" * 64

EventType = Literal[
    "delegation.minted",
    "delegation.subdelegated",
    "delegation.revoked",
    "delegation.refused",
    "tool_call.decided",
    "tool_call.completed",
    "approval.requested",
    "approval.granted",
    "approval.denied",
    "model.usage",
    "audit.continued",
    "execution.ended",
    "execution.suspended",
    "memory.retrieved",
]
EVENT_TYPES: Final[tuple[str, ...]] = get_args(EventType)

Redactor = Callable[[str], str]
"""Maps a text to a copy that is safe to store. Must not raise; if it does, the text is dropped."""

_TIME_RE = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$"
_HEX64_RE = r"^[0-9a-f]{64}$"
_CHAIN_KEYS: Final = frozenset({"sequence", "prev", "hash"})


# --- canonical JSON and digests --------------------------------------------------------------


# json.dumps builds a JSONEncoder per call when given options; one built once with the same
# options produces the same bytes by construction, without that cost.
_CANONICAL: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_json(value: Any) -> bytes:
    """The canonical UTF-8 JSON bytes of ``value``: sorted keys, no spaces, no NaN/Infinity.

    Raises :class:`AuditError` for values JSON cannot hold faithfully (NaN, objects, lone
    surrogates), because a record we cannot reproduce byte for byte cannot be verified.
    """
    try:
        return _CANONICAL.encode(value).encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise AuditError(f"value is not JSON-safe: {redact_secrets(str(exc))}") from None


def digest(value: Any) -> str:
    """``sha256`` (hex) of :func:`canonical_json` of ``value``; the key order does not matter.

    Tool arguments may hold values JSON has no type for: a ``Decimal`` is digested as
    ``{"$decimal": "<str>"}`` and a set as a list sorted by ``repr``, the same bytes as
    ``agentic_iam.core.approvals.canonical_json``, so both modules agree on a call's digest.
    """
    return hashlib.sha256(canonical_json(json_safe(value))).hexdigest()


def json_safe(value: Any) -> Any:
    """``value`` with ``Decimal`` and sets turned into JSON (see :func:`digest`); tuples as lists.

    Anything else that JSON cannot hold is left alone, for :func:`canonical_json` to refuse.
    """
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return [json_safe(item) for item in sorted(value, key=repr)]
    return value


# --- redaction -------------------------------------------------------------------------------

# The rules are agentic_iam.core.redaction's: the same set the tool firewall applies to tool
# outputs, so a secret it removes from an output is also removed from the reasoning that quotes
# it here. redact_secrets is re-exported from this module (it is part of its API).


# Strings redact_secrets left unchanged, so that the identity, tool and session strings every
# event repeats are scanned once. Only clean strings are kept (never a secret), each at most
# _CLEAN_MAX_CHARS long and at most _CLEAN_MAX_ENTRIES of them (oldest dropped first). The
# answer depends on nothing but the string, so an entry can never be stale.
_CLEAN_STRINGS: dict[str, None] = {}
_CLEAN_MAX_CHARS: Final = 2048
_CLEAN_MAX_ENTRIES: Final = 2048


def _redacted(text: str) -> str:
    """:func:`redact_secrets` of ``text``, remembering the strings it leaves unchanged."""
    if text in _CLEAN_STRINGS:
        return text
    clean = redact_secrets(text)
    if clean == text and len(text) <= _CLEAN_MAX_CHARS:
        if len(_CLEAN_STRINGS) >= _CLEAN_MAX_ENTRIES:
            # Another thread may have dropped it first.
            with contextlib.suppress(KeyError, StopIteration, RuntimeError):
                del _CLEAN_STRINGS[next(iter(_CLEAN_STRINGS))]
        _CLEAN_STRINGS[text] = None
    return clean


def _secret_field(key: Any, item: Any) -> str | None:
    """``[REDACTED:<kind>]`` for a string stored under a key that names a secret, else None."""
    if not isinstance(key, str) or not isinstance(item, str) or not item:
        return None
    if item.startswith("[REDACT"):  # already redacted, or "[REDACTION FAILED]"
        return None
    kind = secret_field_kind(key)
    return f"[REDACTED:{kind}]" if kind is not None else None


def _scrub(value: Any) -> tuple[Any, bool]:
    """Apply :func:`redact_secrets` to every string (keys included) of a JSON value, and
    replace whole every string stored under a key that names a secret (``"password"``)."""
    if isinstance(value, str):
        clean = _redacted(value)
        return clean, clean != value
    if isinstance(value, dict):
        changed = False
        out: dict[Any, Any] = {}
        for key, item in value.items():
            new_key, key_changed = _scrub(key) if isinstance(key, str) else (key, False)
            hidden = _secret_field(key, item)
            new_item, item_changed = (hidden, True) if hidden is not None else _scrub(item)
            out[new_key] = new_item
            changed = changed or key_changed or item_changed
        return (out, True) if changed else (value, False)
    if isinstance(value, (list, tuple)):
        items = [_scrub(item) for item in value]
        if any(changed for _, changed in items):
            return [item for item, _ in items], True
        return value, False
    return value, False


# --- the event schema (the JSON boundary) ----------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChainHop(_Model):
    """One hop of the delegation chain; the delegator comes first, then each agent."""

    principal_type: Literal["human", "workload", "agent"]
    id: str
    execution_id: str | None = None


class ReasonInfo(_Model):
    """One reason of a decision."""

    code: str
    message: str = ""
    policy_id: str | None = None


class DecisionInfo(_Model):
    """The Guard's decision on a tool call."""

    outcome: Literal["allow", "deny", "approval_required"]
    reasons: tuple[ReasonInfo, ...] = ()
    policy_ids: tuple[str, ...] = ()


class ResultInfo(_Model):
    """How a tool call ended (``tool_call.completed``)."""

    outcome: Literal["success", "error", "blocked", "cancelled"]
    duration_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    output_digest: str | None = Field(default=None, pattern=_HEX64_RE)
    output_labels: tuple[str, ...] = ()
    budget_settled: dict[str, int] = Field(default_factory=dict)
    error: str | None = None


class SessionInfo(_Model):
    """The run's session state at the time of the event. Budgets are integers."""

    call_count: int | None = None
    risk: int | None = None
    risk_envelope: int | None = None
    budget_remaining: dict[str, int | None] = Field(default_factory=dict)
    labels: tuple[str, ...] = ()
    tainted: bool = False


class ReasoningInfo(_Model):
    """The model context that asked for the call. ``message`` is redacted and truncated."""

    message: str | None = None
    truncated: bool = False
    model: str | None = None
    run_id: str | None = None
    parent_run_id: str | None = None
    response_id: str | None = None


class MemoryItem(_Model):
    """One withheld memory item: its id and scope (never its content)."""

    id: str = Field(max_length=512)
    scope: str = Field(max_length=512)


class MemoryInfo(_Model):
    """What one retrieval kept and withheld (``memory.retrieved``)."""

    query_digest: str | None = Field(default=None, pattern=_HEX64_RE)
    granted_scopes: tuple[str, ...] = ()
    kept_count: int = Field(ge=0)
    kept_ids: tuple[str, ...] = ()
    dropped_count: int = Field(ge=0)
    dropped: tuple[MemoryItem, ...] = ()
    reason: str | None = None


class TraceContext(_Model):
    """The framework's trace position, so that our spans and records can be joined with it.

    Any framework's ids are accepted (OpenAI Agents uses ``trace_…``, LangChain UUIDs): they are
    kept for joining. Only W3C/OpenTelemetry ids (32 and 16 lowercase hex digits) make the
    :class:`OTelSink` span a child of the framework's span.
    """

    trace_id: str | None = Field(default=None, min_length=1, max_length=128)
    span_id: str | None = Field(default=None, min_length=1, max_length=128)


class AuditEvent(_Model):
    """One audit event (schema version 1). Everything except time/sequence/event_type is optional.

    Collections default to ``None`` (absent) rather than empty so that records stay short.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    time: str = Field(pattern=_TIME_RE)
    sequence: int = Field(ge=0)
    event_type: EventType
    execution_id: str | None = None
    parent_execution_id: str | None = None
    jti: str | None = None
    issuer: str | None = None
    chain: tuple[ChainHop, ...] | None = None
    delegator: str | None = None
    agent_id: str | None = None
    agent_name: str | None = None
    purpose: str | None = None
    capabilities: tuple[str, ...] | None = None
    tool: str | None = None
    action: str | None = None
    call_id: str | None = None
    arguments_digest: str | None = Field(default=None, pattern=_HEX64_RE)
    arguments: dict[str, JsonValue] | None = None
    decision: DecisionInfo | None = None
    result: ResultInfo | None = None
    session: SessionInfo | None = None
    reasoning: ReasoningInfo | None = None
    framework: str | None = None
    trace: TraceContext | None = None
    usage: dict[str, int] | None = None
    extra: dict[str, str] | None = None
    memory: MemoryInfo | None = None

    @field_validator("time")
    @classmethod
    def _real_time(cls, value: str) -> str:
        _parse_time(value)  # raises on 2024-13-45
        return value

    def to_json_dict(self) -> dict[str, Any]:
        """The event as the JSON object stored in sinks (``None`` members left out)."""
        return self.model_dump(mode="json", exclude_none=True)

    @property
    def time_ns(self) -> int:
        """``time`` as integer nanoseconds since the epoch (exact, no float rounding)."""
        return _time_ns(self.time)


_TIME_PARTS: Final = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})\.(\d{6})Z")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND: Final = timedelta(microseconds=1)


def _parse_time(value: str) -> datetime:
    # Not strptime: it costs 20 us, a tenth of a whole record.
    match = _TIME_PARTS.fullmatch(value)
    if match is None:
        raise ValueError("time must look like 2025-01-31T12:00:00.000000Z")
    year, month, day, hour, minute, second, micro = (int(part) for part in match.groups())
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=timezone.utc)


def _time_ns(value: str) -> int:
    return (_parse_time(value) - _EPOCH) // _MICROSECOND * 1_000


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _format_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise AuditError("audit clock returned a naive datetime; it must be timezone-aware")
    if moment.tzinfo is not timezone.utc:
        moment = moment.astimezone(timezone.utc)
    if moment.year < 1000:  # strftime does not pad such years; the schema then refuses them
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # What strftime("%Y-%m-%dT%H:%M:%S.%fZ") writes, at a third of its cost.
    return (
        f"{moment.year}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
        f"{moment.minute:02d}:{moment.second:02d}.{moment.microsecond:06d}Z"
    )


# Events already scrubbed, so that the sinks behind a Recorder do not scrub them again. Keyed by
# id() with the event as a weak value: an entry dies with its event, so an id is never reused.
_CLEAN_EVENTS: weakref.WeakValueDictionary[int, AuditEvent] = weakref.WeakValueDictionary()
_CLEAN_LOCK = threading.Lock()


_WITHOUT_MESSAGE: Final = {"reasoning": {"message"}}


def _scrubbed_event(event: AuditEvent, *, message_is_clean: bool = False) -> AuditEvent:
    """The event with :func:`redact_secrets` applied to every string (keys included).

    ``message_is_clean``: ``reasoning.message`` is already an output of :func:`redact_secrets`
    (the Recorder made it so), so the test for secrets need not read it again; when the event
    is scrubbed, the message is scrubbed with the rest.
    """
    with _CLEAN_LOCK:
        if _CLEAN_EVENTS.get(id(event)) is event:
            return event
    clean = event
    exclude = _WITHOUT_MESSAGE if message_is_clean else None
    if may_hold_secret(event.model_dump_json(exclude_none=True, exclude=exclude)):
        data, changed = _scrub(event.to_json_dict())
        if changed:
            try:
                clean = AuditEvent.model_validate(data)
            except ValidationError:
                # Redaction broke a constrained field (cannot happen for a hex digest; this is a
                # guard): refuse rather than store the raw value.
                raise AuditError("an audit event still holds a secret after redaction") from None
    with _CLEAN_LOCK:
        _CLEAN_EVENTS[id(clean)] = clean
    return clean


# --- the fast path: events the library builds itself ------------------------------------------
#
# The Guard records two events per tool call from values it built (strings, ints, lists and
# dicts of them). Validating those through pydantic, dumping them back to JSON and then
# scanning the whole JSON for secrets cost most of the audit time. _fast_body builds the same
# JSON object directly: it accepts only exact built-in types in the shapes AuditEvent declares,
# applies the same checks, defaults and coercions, and redacts every string on the way (each
# string once, see _redacted). Anything else — a model instance, a str subclass, a NaN, a field
# it does not know — returns None and the event takes the validated path, which raises the
# usual AuditError for invalid input. A property test holds the two paths to the same bytes.


class _Fallback(Exception):
    """The fields are not in the subset the fast path handles: validate them instead."""


_HEX64: Final = re.compile(_HEX64_RE)
_TIME_FORMAT: Final = re.compile(_TIME_RE)
_EVENT_TYPE_SET: Final = frozenset(EVENT_TYPES)
_PRINCIPAL_TYPES: Final = frozenset({"human", "workload", "agent"})
_DECISION_OUTCOMES: Final = frozenset({"allow", "deny", "approval_required"})
_RESULT_OUTCOMES: Final = frozenset({"success", "error", "blocked", "cancelled"})
_PLAIN_STR_FIELDS: Final = frozenset({
    "execution_id", "parent_execution_id", "jti", "issuer", "delegator", "agent_id",
    "agent_name", "purpose", "tool", "action", "call_id", "framework",
})
_FIELD_NAMES: Final = frozenset(AuditEvent.model_fields) - {
    "schema_version", "time", "sequence", "event_type"}
_HOP_KEYS: Final = frozenset({"principal_type", "id", "execution_id"})
_REASON_KEYS: Final = frozenset({"code", "message", "policy_id"})
_DECISION_KEYS: Final = frozenset({"outcome", "reasons", "policy_ids"})
_RESULT_KEYS: Final = frozenset(
    {"outcome", "duration_ms", "output_digest", "output_labels", "budget_settled", "error"}
)
_SESSION_KEYS: Final = frozenset(
    {"call_count", "risk", "risk_envelope", "budget_remaining", "labels", "tainted"}
)
_REASONING_KEYS: Final = frozenset(
    {"message", "truncated", "model", "run_id", "parent_run_id", "response_id"}
)
_REASONING_TEXT: Final = ("message", "model", "run_id", "parent_run_id", "response_id")
_TRACE_KEYS: Final = frozenset({"trace_id", "span_id"})
_MAX_EXACT_FLOAT_INT: Final = 2**53


class _Scrubber:
    """Redacts the strings of one event as it is built; remembers whether anything changed."""

    __slots__ = ("changed",)

    def __init__(self) -> None:
        self.changed = False

    def text(self, value: Any) -> str:
        if type(value) is not str:
            raise _Fallback
        clean = _redacted(value)
        if clean is not value and clean != value:
            self.changed = True
        return clean

    def optional_text(self, value: Any) -> str | None:
        return None if value is None else self.text(value)

    def texts(self, value: Any) -> list[str]:
        if type(value) is not list and type(value) is not tuple:
            raise _Fallback
        return [self.text(item) for item in value]

    def key(self, key: Any) -> str:
        return self.text(key)

    def field(self, key: str, item: str) -> str:
        """A string stored under ``key`` in a free-form mapping (see :func:`_scrub`)."""
        hidden = _secret_field(key, item)
        if hidden is not None:
            self.changed = True
            return hidden
        return self.text(item)

    def ints(self, value: Any, *, optional: bool) -> dict[str, int | None]:
        if type(value) is not dict:
            raise _Fallback
        out: dict[str, int | None] = {}
        for key, item in value.items():
            if type(item) is not int and not (optional and item is None):
                raise _Fallback
            out[self.key(key)] = item
        return out

    def json_value(self, value: Any) -> Any:
        kind = type(value)
        if kind is str:
            return self.text(value)
        if value is None or kind is int or kind is bool:
            return value
        if kind is float:
            if value != value or value in (float("inf"), float("-inf")):
                raise _Fallback
            return value
        if kind is list:
            return [self.json_value(item) for item in value]
        if kind is dict:
            out: dict[str, Any] = {}
            for key, item in value.items():
                if type(key) is not str:
                    raise _Fallback
                hidden = _secret_field(key, item)
                if hidden is not None:
                    self.changed = True
                    out[self.key(key)] = hidden
                else:
                    out[self.key(key)] = self.json_value(item)
            return out
        raise _Fallback


def _mapping(value: Any, allowed: frozenset[str]) -> dict[str, Any]:
    if type(value) is not dict or not allowed.issuperset(value):
        raise _Fallback
    return value


def _optional_int(value: Any) -> int | None:
    if value is not None and type(value) is not int:
        raise _Fallback
    return value


def _fast_part(name: str, value: Any, scrub: _Scrubber) -> Any:
    """The JSON form of one event field, as ``AuditEvent(...).to_json_dict()`` holds it."""
    if name in _PLAIN_STR_FIELDS:
        return scrub.text(value)
    if name == "chain":
        if type(value) is not list and type(value) is not tuple:
            raise _Fallback
        hops = []
        for hop in value:
            hop = _mapping(hop, _HOP_KEYS)
            principal = hop.get("principal_type")
            if type(principal) is not str or principal not in _PRINCIPAL_TYPES:
                raise _Fallback
            out: dict[str, Any] = {"principal_type": principal,
                                   "id": scrub.text(hop.get("id"))}
            execution = hop.get("execution_id")
            if execution is not None:
                out["execution_id"] = scrub.text(execution)
            hops.append(out)
        return hops
    if name == "decision":
        decision = _mapping(value, _DECISION_KEYS)
        outcome = decision.get("outcome")
        if type(outcome) is not str or outcome not in _DECISION_OUTCOMES:
            raise _Fallback
        reasons = decision.get("reasons", ())
        if type(reasons) is not list and type(reasons) is not tuple:
            raise _Fallback
        reason_list = []
        for reason in reasons:
            reason = _mapping(reason, _REASON_KEYS)
            item = {"code": scrub.text(reason.get("code")),
                    "message": scrub.text(reason.get("message", ""))}
            policy_id = reason.get("policy_id")
            if policy_id is not None:
                item["policy_id"] = scrub.text(policy_id)
            reason_list.append(item)
        return {"outcome": outcome, "reasons": reason_list,
                "policy_ids": scrub.texts(decision.get("policy_ids", ()))}
    if name == "session":
        session = _mapping(value, _SESSION_KEYS)
        out = {
            "budget_remaining": scrub.ints(session.get("budget_remaining", {}), optional=True),
            "labels": scrub.texts(session.get("labels", ())),
        }
        tainted = session.get("tainted", False)
        if type(tainted) is not bool:
            raise _Fallback
        out["tainted"] = tainted
        for key in ("call_count", "risk", "risk_envelope"):
            number = _optional_int(session.get(key))
            if number is not None:
                out[key] = number
        return out
    if name == "reasoning":
        reasoning = _mapping(value, _REASONING_KEYS)
        truncated = reasoning.get("truncated", False)
        if type(truncated) is not bool:
            raise _Fallback
        out = {"truncated": truncated}
        for key in _REASONING_TEXT:
            text = reasoning.get(key)
            if text is not None:
                out[key] = scrub.text(text)
        return out
    if name == "result":
        result = _mapping(value, _RESULT_KEYS)
        outcome = result.get("outcome")
        if type(outcome) is not str or outcome not in _RESULT_OUTCOMES:
            raise _Fallback
        out = {"outcome": outcome, "output_labels": scrub.texts(result.get("output_labels", ())),
               "budget_settled": scrub.ints(result.get("budget_settled", {}), optional=False)}
        duration = result.get("duration_ms")
        if duration is not None:
            if type(duration) is int and 0 <= duration <= _MAX_EXACT_FLOAT_INT:
                duration = float(duration)  # pydantic's float coercion, exact in this range
            elif type(duration) is not float or not 0 <= duration < float("inf"):
                raise _Fallback
            out["duration_ms"] = duration
        digest_hex = result.get("output_digest")
        if digest_hex is not None:
            if type(digest_hex) is not str or _HEX64.fullmatch(digest_hex) is None:
                raise _Fallback
            out["output_digest"] = scrub.text(digest_hex)
        error = result.get("error")
        if error is not None:
            out["error"] = scrub.text(error)
        return out
    if name == "arguments_digest":
        if type(value) is not str or _HEX64.fullmatch(value) is None:
            raise _Fallback
        return scrub.text(value)
    if name == "trace":
        trace = _mapping(value, _TRACE_KEYS)
        out = {}
        for key in ("trace_id", "span_id"):
            text = trace.get(key)
            if text is not None:
                if type(text) is not str or not 1 <= len(text) <= 128:
                    raise _Fallback
                out[key] = scrub.text(text)
        return out
    if name == "capabilities":
        return scrub.texts(value)
    if name == "usage":
        return scrub.ints(value, optional=False)
    if name == "extra":
        if type(value) is not dict:
            raise _Fallback
        extra: dict[str, str] = {}
        for key, text in value.items():
            if type(text) is not str:
                raise _Fallback
            extra[scrub.key(key)] = scrub.field(key, text)
        return extra
    if name == "arguments":
        if type(value) is not dict:
            raise _Fallback
        return scrub.json_value(value)
    raise _Fallback  # memory, schema_version, or a name AuditEvent does not have


def _fast_body(event_type: str, fields: Mapping[str, Any], time: str, sequence: int
               ) -> tuple[dict[str, Any], bool] | None:
    """``(json object, redaction changed something)`` for the event, or None (validate it)."""
    if event_type not in _EVENT_TYPE_SET or _TIME_FORMAT.fullmatch(time) is None:
        return None
    scrub = _Scrubber()
    body: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "time": time,
                            "sequence": sequence, "event_type": event_type}
    try:
        for name, value in fields.items():
            if name not in _FIELD_NAMES:
                raise _Fallback  # unknown (or assigned by the recorder): let validation say so
            if value is not None:
                body[name] = _fast_part(name, value, scrub)
    except _Fallback:
        return None
    return body, scrub.changed


class _Record:
    """One event on its way to the sinks: its JSON object, and the model only when asked for.

    The sinks of this module take the object (:class:`JsonlSink` encodes it once, for every
    sink that shares the record); other sinks get :meth:`event`, built once and shared.
    """

    __slots__ = ("_event", "_parts", "body")

    def __init__(self, body: dict[str, Any], event: AuditEvent | None = None) -> None:
        self.body = body
        """The scrubbed event as :meth:`AuditEvent.to_json_dict` returns it (with sequence)."""
        self._event = event
        self._parts: _Parts | None = None

    @property
    def event_type(self) -> str:
        return str(self.body["event_type"])

    @property
    def sequence(self) -> int:
        return int(self.body["sequence"])

    def event(self) -> AuditEvent:
        """The event as a (scrubbed) model, validated from :attr:`body` on first use."""
        event = self._event
        if event is None:
            try:
                event = AuditEvent.model_validate(self.body)
            except ValidationError as exc:  # a bug in _fast_body: refuse rather than guess
                raise AuditError(
                    f"invalid audit event `{self.event_type}` ({exc.error_count()} schema errors)"
                ) from None
            with _CLEAN_LOCK:
                _CLEAN_EVENTS[id(event)] = event
            self._event = event
        return event

    def parts(self) -> _Parts:
        """The canonical encoding of the body without ``sequence`` (see :func:`_encode_parts`)."""
        if self._parts is None:
            body = dict(self.body)
            body.pop("sequence", None)
            self._parts = _encode_parts(body)
        return self._parts


# --- the sink protocol and the memory sink ----------------------------------------------------


@runtime_checkable
class AuditSink(Protocol):
    """Where audit events go. ``durable`` sinks are the local record: their failure denies."""

    durable: bool

    def emit(self, event: AuditEvent) -> None:
        """Record one event. A durable sink raises :class:`AuditError` when it cannot."""
        ...

    def flush(self) -> None:
        """Push anything buffered to its destination."""
        ...

    def close(self) -> None:
        """Flush and release resources. Idempotent."""
        ...


class MemorySink:
    """Keeps events in a list. The test double of :class:`AuditSink`."""

    def __init__(self, *, durable: bool = True) -> None:
        self.durable = durable
        self._events: list[AuditEvent | _Record] = []
        self._lock = threading.Lock()

    @property
    def events(self) -> list[AuditEvent]:
        """A copy of the events recorded so far, in order."""
        with self._lock:
            kept = list(self._events)
        return [item if isinstance(item, AuditEvent) else item.event() for item in kept]

    def emit(self, event: AuditEvent) -> None:
        event = _scrubbed_event(event)
        with self._lock:
            self._events.append(event)

    def _emit_record(self, record: _Record) -> None:
        """What the Recorder calls: the model is built when :attr:`events` is read."""
        with self._lock:
            self._events.append(record)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None

    def clear(self) -> None:
        with self._lock:
            self._events.clear()


# --- signed head -----------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class HeadSigner:
    """Signs the head of a JSONL log (count and last hash) with Ed25519."""

    private_key: Ed25519PrivateKey = field(repr=False)
    """The signing key. Keep it away from whoever can write the log, or the head proves little."""
    kid: str
    """Key id, written into the head so the verifier picks the right public key."""

    def sign(self, payload: bytes) -> bytes:
        return self.private_key.sign(payload)

    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def public_jwk(self) -> dict[str, str]:
        """The public key as an OKP/Ed25519 JWK, for a JWKS given to ``aiam audit verify``."""
        raw = self.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw), "kid": self.kid, "use": "sig"}


def public_keys_from_jwks(jwks: Mapping[str, Any]) -> dict[str, Ed25519PublicKey]:
    """Ed25519 public keys by ``kid`` from a JWKS (``{"keys": [{"kty": "OKP", …}]}``).

    Keys of other types are skipped; a JWKS without any usable Ed25519 key, a key without ``kid``,
    or a malformed ``x`` raises :class:`KeySetError`.
    """
    keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(keys, list):
        raise KeySetError("JWKS must be an object with a `keys` array")
    found: dict[str, Ed25519PublicKey] = {}
    for position, jwk in enumerate(keys):
        if not isinstance(jwk, Mapping):
            raise KeySetError(f"JWKS key #{position} is not an object")
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        kid, x = jwk.get("kid"), jwk.get("x")
        if not isinstance(kid, str) or not kid:
            raise KeySetError(f"JWKS key #{position} has no `kid`")
        if not isinstance(x, str):
            raise KeySetError(f"JWKS key `{kid}` has no `x`")
        try:
            raw = _b64url_decode(x)
            if len(raw) != 32:
                raise ValueError("wrong length")
            found[kid] = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            raise KeySetError(f"JWKS key `{kid}`: `x` is not a base64url Ed25519 key") from None
    if not found:
        raise KeySetError("JWKS holds no OKP/Ed25519 key")
    return found


# --- JSONL sink ------------------------------------------------------------------------------

# A record's canonical line is its members in key order. The chain members fall between the
# event's own members: "hash" < "prev" < "sequence". So the event is encoded once, in the four
# key ranges they cut (an event has no member named like them), and each line is a join.
_Parts = tuple[bytes, bytes, bytes, bytes]


_ORJSON_FIELDS: Final = frozenset(AuditEvent.model_fields) - {"arguments"}


def _plain_float(value: Any) -> bool:
    # orjson writes a float as repr() does except in exponent form (1e-05 vs 0.00001); a float
    # whose repr has no exponent (and is finite) comes out the same from both.
    text = float.__repr__(value)
    return "e" not in text and "n" not in text


def _orjson_exact(group: Mapping[str, Any]) -> bool:
    """Whether orjson writes ``group`` (a part of an event's JSON object) byte for byte as
    :func:`canonical_json` does. Events hold floats only in ``result.duration_ms`` and in
    recorded ``arguments``; everything else is str, int, bool, None, list and dict."""
    if not _ORJSON_FIELDS.issuperset(group):
        return False  # not an event's members (or "arguments"): the reference encoder
    result = group.get("result")
    if isinstance(result, dict):
        duration = result.get("duration_ms")
        if duration is not None and (type(duration) is not float or not _plain_float(duration)):
            return False
    return True


def _encode_members(group: Mapping[str, Any]) -> bytes:
    """The canonical JSON of ``group`` without its braces (``b""`` when empty)."""
    if not group:
        return b""
    if _orjson is not None and _orjson_exact(group):
        try:
            return bytes(_orjson.dumps(group, option=_orjson.OPT_SORT_KEYS)[1:-1])
        except TypeError:  # an int beyond 64 bits, a non-str key: the reference encoder decides
            pass
    return canonical_json(group)[1:-1]


def _encode_parts(body: Mapping[str, Any]) -> _Parts:
    """``body`` (an event's JSON object, no chain members) encoded in the key ranges the chain
    members cut: before ``hash``, before ``prev``, before ``sequence``, after ``sequence``."""
    groups: tuple[dict[str, Any], ...] = ({}, {}, {}, {})
    for key, value in body.items():
        if key in _CHAIN_KEYS:
            continue  # assigned by the chain, as before: never taken from the event
        groups[(key > "hash") + (key > "prev") + (key > "sequence")][key] = value
    low, mid, between, high = (_encode_members(group) for group in groups)
    return low, mid, between, high


def _chain_parts_line(parts: _Parts, sequence: int, prev: str) -> tuple[bytes, str]:
    """The canonical line (without ``\\n``) and hash of an encoded event at ``sequence``."""
    low, mid, between, high = parts
    prev_member = b'"prev":' + canonical_json(prev)
    sequence_member = b'"sequence":' + canonical_json(sequence)
    rest = [p for p in (mid, prev_member, between, sequence_member, high) if p]
    unhashed = b"{" + b",".join([low, *rest] if low else rest) + b"}"
    record_hash = hashlib.sha256(unhashed).hexdigest()
    member = b'"hash":"' + record_hash.encode("ascii") + b'"'
    line = b"{" + b",".join([low, member, *rest] if low else [member, *rest]) + b"}"
    return line, record_hash


def _chain_line(body: Mapping[str, Any], sequence: int, prev: str) -> tuple[bytes, str]:
    """The canonical line (without ``\\n``) and hash of ``body`` at ``sequence`` after ``prev``."""
    return _chain_parts_line(_encode_parts(body), sequence, prev)


def _rfind_newline(fd: int, before: int) -> int:
    """Offset of the last ``\\n`` strictly before ``before``, or -1."""
    block = 64 * 1024
    end = before
    while end > 0:
        start = max(0, end - block)
        chunk = os.pread(fd, end - start, start)
        position = chunk.rfind(b"\n")
        if position >= 0:
            return start + position
        end = start
    return -1


def _read_all_at(fd: int, length: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


@dataclass(frozen=True)
class _Tail:
    """What the sink knows the file holds, checked against the file before every append."""

    size: int
    """Bytes in the file (-1: unknown, check the whole state again)."""
    next_sequence: int
    """Records in the file (the last record's sequence + 1)."""
    last_hash: str
    """Hash of the last record (64 zeros for none)."""
    last_line: bytes = b""
    """The last record's bytes with its newline, compared in place before each append."""
    ident: tuple[int, int] = (0, 0)
    """(st_dev, st_ino) of the file: a replaced or deleted log is noticed."""
    head_stamp: tuple[int, int, int] | None = None
    """(st_ino, st_size, st_mtime_ns) of the head as last written or verified."""


_UNKNOWN: Final = _Tail(-1, 0, ZERO_HASH)


class JsonlSink:
    """The durable local audit record: a hash-chained, canonical JSON Lines file.

    ``durability``:

    * ``"buffered"``: events wait in memory (at most ``max_buffer``) and are chained and written on
      :meth:`flush`/:meth:`close`; a crash loses what was waiting. Call :meth:`close`.
    * ``"flush"`` (default): one ``write(2)`` per event; survives a crash of the process.
    * ``"fsync"``: ``write(2)`` + ``fdatasync`` per event (and an fsynced head); survives power
      loss. An emit returns only once its record is on disk.

    Several processes (and threads) may append to one file and it stays one chain: each write
    takes an exclusive ``fcntl.flock`` on the file, checks the file (below), appends, syncs,
    rewrites the head, and unlocks. So ``sequence`` continues from the file's last record,
    whoever wrote it. ``flock`` is advisory: only writers that use it are serialized, and it does
    not work over NFS. Open sinks after ``fork``; a sink that notices it now runs in a child
    reopens its file descriptor (a shared descriptor would share the lock). POSIX only.

    **It never signs over a log it cannot vouch for.** With a ``signer``, opening the log checks
    that its last record is the one the signed head names (count and hash; the head's signature
    is checked with the signer's own key): a log that is shorter than its head, holds records
    the head does not cover, ends in a different record (a rewrite), or has records and no head
    raises :class:`~agentic_iam.errors.AuditIntegrityError`. A brand-new log (no records, no
    head) is signed at once. Before every append the sink compares what it knows (file identity,
    size, the last record's bytes, the head file's identity) with the file; records another
    writer appended since are verified one by one (chain and sequence) against the head they
    signed. Any mismatch raises the same error, and the sink then refuses every later event:
    the Guard turns that into a deny (``audit.failed``) until an operator acts (see
    ``continues_from``). Without a signer there is no head: the sink checks the same in-memory
    state, refuses a log that has a head (it could not keep it current), and cannot tell a
    rewrite made while it was closed (that is what the signed head is for).

    A file that ends with a torn (partial) line — a writer died mid-write — or with records the
    signed head does not cover — a writer died between its append and its head update, or
    someone appended without the key — is never chained onto or signed over. With
    ``repair_torn_tail=True`` (explicit, keyword-only) those bytes are moved to ``<log>.torn``
    and the file is cut back to its last signed record; nothing acknowledged is lost that way,
    because an emit returns only after its head is written.

    ``continues_from`` (with a ``signer``) starts a *new* log after a broken one: when the new
    file is empty, its first record is an ``audit.continued`` event naming the old log, the
    count and hash of its last record covered by a valid signed head (the last verified state)
    and what :func:`verify_log` found; later opens check that the first record is that event.
    ``previous_keys`` adds public keys (by kid) for a head signed before a key rotation.

    A failed head write cuts the records it should have covered off the file again before the
    error is raised, so the log never keeps an ``allow`` for a call that was denied because
    its record could not be made durable. Every failure to write raises
    :class:`~agentic_iam.errors.AuditError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Literal["buffered", "flush", "fsync"] = "flush",
        signer: HeadSigner | None = None,
        head_path: str | os.PathLike[str] | None = None,
        repair_torn_tail: bool = False,
        continues_from: str | os.PathLike[str] | None = None,
        previous_keys: Mapping[str, Ed25519PublicKey] | None = None,
        max_buffer: int = 256,
        file_mode: int = 0o600,
    ) -> None:
        if sys.platform == "win32":  # pragma: no cover - POSIX only
            raise AuditError("JsonlSink needs POSIX file locking (fcntl); not available on Windows")
        if durability not in ("buffered", "flush", "fsync"):
            raise AuditError(f"unknown durability `{durability}`: use buffered, flush or fsync")
        if max_buffer < 1:
            raise AuditError("max_buffer must be at least 1")
        if continues_from is not None and signer is None:
            raise AuditError("`continues_from` needs a `signer`: the new log must be signed")
        self.durable = True
        self.path = Path(path)
        self.head_path = Path(head_path) if head_path is not None else _default_head_path(self.path)
        self.durability = durability
        self._signer = signer
        self._public = signer.public_key() if signer is not None else None
        self._repair = repair_torn_tail
        self._continues = Path(continues_from) if continues_from is not None else None
        self._previous_keys = dict(previous_keys or {})
        if self._continues is not None and self._continues.resolve() == self.path.resolve():
            raise AuditError("`continues_from` must name the old log, not the new one")
        self._max_buffer = max_buffer
        self._mode = file_mode
        self._lock = threading.Lock()
        self._pending: list[_Parts] = []
        self._closed = False
        self._broken: str | None = None
        self._fd = -1
        self._pid = os.getpid()
        self._tail = _UNKNOWN
        self._open()
        try:
            # Check (or repair) the file against its head now, not at the first event; and sign
            # a brand-new log right away, so that a log never lacks its head, even if the writer
            # dies after its first append (a missing head is otherwise indistinguishable from a
            # deleted one).
            self._locked(self._after_open)
        except BaseException:
            os.close(self._fd)
            raise

    # lifecycle

    def _open(self) -> None:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd = os.open(self.path, flags, self._mode)
        except OSError as exc:
            raise AuditError(f"cannot open audit log `{self.path}`: {exc.strerror}") from exc
        self._pid = os.getpid()
        self._tail = _UNKNOWN  # unknown: load and check under the lock

    def emit(self, event: AuditEvent) -> None:
        body = _scrubbed_event(event).to_json_dict()
        body.pop("sequence", None)
        self._emit_parts(_encode_parts(body))

    def _emit_record(self, record: _Record) -> None:
        """What the Recorder calls: the record is scrubbed already, and encoded once."""
        self._emit_parts(record.parts())

    def _emit_parts(self, parts: _Parts) -> None:
        # Encoded at emit time, so a non-JSON-safe event fails now, not at a later flush.
        if self.durability == "buffered":
            with self._lock:
                self._check_open()
                self._pending.append(parts)
                full = len(self._pending) >= self._max_buffer
            if full:
                self.flush()
            return
        self._locked(lambda: self._append([parts]))

    def flush(self) -> None:
        with self._lock:
            if self._closed:
                return
            pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self._locked(lambda: self._append(pending))
        except AuditError:
            with self._lock:  # keep them for the next flush; a partial write was cut back
                self._pending[:0] = pending
            raise

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            with self._lock:
                self._closed = True
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # the critical section

    def _check_open(self) -> None:
        if self._closed:
            raise AuditError(f"audit log `{self.path}` is closed")
        if self._broken is not None:
            raise AuditIntegrityError(
                f"audit log `{self.path}` failed its integrity check ({self._broken}); refusing "
                "to record until an operator acts: verify it with `aiam audit verify`, then "
                "start a new log with `JsonlSink(..., continues_from=...)`"
            )

    def _locked(self, action: Callable[[], None]) -> None:
        with self._lock:
            self._check_open()
            if os.getpid() != self._pid:
                # A forked child shares the parent's open file description, and flock locks
                # belong to descriptions: reopen so that the lock excludes the parent again.
                self._open()
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise AuditError(f"cannot lock audit log `{self.path}`: {exc.strerror}") from exc
            try:
                if self._tail.size < 0:
                    self._tail = self._load()
                else:
                    self._tail = self._recheck(self._tail)
                action()
            except AuditIntegrityError as exc:
                # Tampering, or a state the sink cannot vouch for: nothing more is written
                # through this sink (a new one re-checks the file when it opens).
                self._broken = str(exc)
                raise
            except OSError as exc:
                raise AuditError(f"audit log `{self.path}`: {exc.strerror or exc}") from exc
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _tampered(self, what: str, *, index: int | None = None) -> AuditIntegrityError:
        return AuditIntegrityError(f"audit log `{self.path}`: {what}", index=index)

    # loading and checking

    def _identity(self) -> tuple[int, int]:
        """(st_dev, st_ino) of our descriptor; raises when the path names another file."""
        own = os.fstat(self._fd)
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            raise self._tampered("the file was deleted or moved while open") from None
        if (named.st_dev, named.st_ino) != (own.st_dev, own.st_ino):
            raise self._tampered("the file was replaced while open")
        return own.st_dev, own.st_ino

    def _load(self) -> _Tail:
        """The full check, on open: torn tail, last record, and the signed head."""
        ident = self._identity()
        size = os.fstat(self._fd).st_size
        if size > 0 and _read_all_at(self._fd, 1, size - 1) != b"\n":
            size = self._torn(size)
        tail = self._tail_at(size, ident)
        if self._signer is None:
            if self.head_path.exists():
                raise self._tampered(
                    f"it has a signed head `{self.head_path}`; open it with its HeadSigner "
                    "(a sink without one could not keep the head current)"
                )
            return tail
        head = self._verified_head()
        if head is None:
            if tail.next_sequence == 0:
                return tail  # brand new: signed by _after_open
            raise self._tampered(
                f"{tail.next_sequence} record(s) and no signed head (`{self.head_path}` is "
                "missing): it may have been deleted to hide a rewrite"
            )
        if head.count > tail.next_sequence:
            raise self._tampered(
                f"the signed head covers {head.count} records but the file ends at "
                f"{tail.next_sequence}: it was truncated",
                index=tail.next_sequence,
            )
        if head.count < tail.next_sequence:
            if not self._repair:
                raise self._tampered(
                    f"{tail.next_sequence - head.count} record(s) after the signed head (a "
                    "writer died before signing, or they were appended without the key); "
                    "repair with repair_torn_tail=True or start a new log",
                    index=head.count,
                )
            tail = self._cut_unsigned(tail, head, ident)
        if tail.last_hash != (head.head_hash if head.count else ZERO_HASH):
            raise self._tampered(
                "its last record is not the one the signed head names: it was rewritten",
                index=max(head.count - 1, 0),
            )
        return replace(tail, head_stamp=self._head_stamp())

    def _torn(self, size: int) -> int:
        last_newline = _rfind_newline(self._fd, size)
        complete_end = last_newline + 1
        if not self._repair:
            index = self._tail_at(complete_end, (0, 0)).next_sequence
            raise AuditIntegrityError(
                f"audit log `{self.path}` ends with a torn record at index {index}; "
                "run `aiam audit verify` on it and repair it before appending",
                index=index,
            )
        self._quarantine(complete_end, size, "a torn last record")
        return complete_end

    def _quarantine(self, start: int, end: int, what: str) -> None:
        """Move bytes ``start:end`` (the end of the file) to ``<log>.torn`` and cut them off."""
        torn = _read_all_at(self._fd, end - start, start)
        torn_path = self.path.with_name(self.path.name + ".torn")
        with open(torn_path, "ab") as keep:
            keep.write(torn if torn.endswith(b"\n") else torn + b"\n")
            keep.flush()
            os.fsync(keep.fileno())
        os.ftruncate(self._fd, start)
        os.fsync(self._fd)
        logger.warning(
            "audit log `%s`: moved %s (%d bytes) to `%s`", self.path, what, len(torn), torn_path
        )

    def _tail_at(self, end: int, ident: tuple[int, int]) -> _Tail:
        """The state after the complete record that ends at ``end`` (``end - 1`` is ``\\n``)."""
        if end <= 0:
            return _Tail(0, 0, ZERO_HASH, b"", ident)
        start = _rfind_newline(self._fd, end - 1) + 1
        line = _read_all_at(self._fd, end - start, start)
        record, problem = _check_line(line[:-1])
        if record is None:
            raise AuditIntegrityError(
                f"audit log `{self.path}`: the last record does not verify ({problem}); "
                "refusing to extend its chain"
            )
        return _Tail(end, record["sequence"] + 1, record["hash"], line, ident)

    def _cut_unsigned(self, tail: _Tail, head: _Head, ident: tuple[int, int]) -> _Tail:
        """Move the records after the one the head names to ``<log>.torn`` (repair)."""
        end = tail.size
        while end > 0:
            start = _rfind_newline(self._fd, end - 1) + 1
            try:
                record = _strict_loads(_read_all_at(self._fd, end - 1 - start, start))
            except (UnicodeDecodeError, ValueError):
                record = None
            if (
                isinstance(record, dict)
                and record.get("sequence") == head.count - 1
                and record.get("hash") == head.head_hash
            ):
                break
            end = start
        if head.count and end == 0:
            raise self._tampered(
                "the record its signed head names is not in the file: it was rewritten",
                index=head.count - 1,
            )
        self._quarantine(end, tail.size, f"{tail.next_sequence - head.count} unsigned record(s)")
        return self._tail_at(end, ident)

    def _verified_head(self) -> _Head | None:
        """The head, its signature checked with the signer's key; ``None`` when absent."""
        head = _read_head(self.head_path)
        if isinstance(head, str):
            raise self._tampered(f"its head is unreadable ({head})")
        if head is None:
            return None
        keys = dict(self._previous_keys)
        if self._signer is not None and self._public is not None:
            keys[self._signer.kid] = self._public
        problem = _head_signature_problem(head, keys)
        if problem is not None:
            raise self._tampered(f"its head does not verify ({problem})")
        return head

    def _head_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.head_path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _recheck(self, tail: _Tail) -> _Tail:
        """The cheap check before an append: the file is still what this sink last saw.

        Identity, size and the last record's bytes in place (a few syscalls, no hashing of the
        whole file). Records another writer appended since are verified one by one, and then
        the head they signed must name their last one.
        """
        if self._identity() != tail.ident:
            raise self._tampered("the file was replaced while open")
        size = os.fstat(self._fd).st_size
        if size < tail.size:
            raise self._tampered(
                f"it shrank from {tail.size} to {size} bytes while open: it was truncated",
                index=tail.next_sequence,
            )
        if tail.last_line and _read_all_at(
            self._fd, len(tail.last_line), tail.size - len(tail.last_line)
        ) != tail.last_line:
            raise self._tampered(
                f"record {tail.next_sequence - 1} changed in place while open",
                index=tail.next_sequence - 1,
            )
        grown = size > tail.size
        if grown:
            tail = self._appended_by_others(tail, size)
        if self._signer is not None:
            stamp = self._head_stamp()
            if stamp is None:
                raise self._tampered(f"its head `{self.head_path}` was deleted while open")
            # Records appended since must be covered by the head their writer signed.
            if grown or stamp != tail.head_stamp:
                head = self._verified_head()
                if head is None or (head.count, head.head_hash) != (
                    tail.next_sequence,
                    tail.last_hash,
                ):
                    raise self._tampered(
                        "its head changed while open and no longer names the last record"
                    )
                tail = replace(tail, head_stamp=stamp)
        return tail

    def _appended_by_others(self, tail: _Tail, size: int) -> _Tail:
        data = _read_all_at(self._fd, size - tail.size, tail.size)
        if not data.endswith(b"\n"):
            if not self._repair:
                index = tail.next_sequence + data.count(b"\n")
                raise AuditIntegrityError(
                    f"audit log `{self.path}` ends with a torn record at index {index}; run "
                    "`aiam audit verify` on it and repair it before appending",
                    index=index,
                )
            complete = data.rfind(b"\n") + 1
            self._quarantine(tail.size + complete, size, "a torn last record")
            data = data[:complete]
        sequence, prev, offset = tail.next_sequence, tail.last_hash, tail.size
        line = tail.last_line
        for raw in data.splitlines(keepends=True):
            record, problem = _check_line(raw[:-1])
            if record is None or record["sequence"] != sequence or record["prev"] != prev:
                raise self._tampered(
                    f"record {sequence}, appended while open, does not continue the chain"
                    + (f" ({problem})" if problem else ""),
                    index=sequence,
                )
            sequence, prev, line = sequence + 1, record["hash"], raw
            offset += len(raw)
        return replace(tail, size=offset, next_sequence=sequence, last_hash=prev, last_line=line)

    # writing

    def _after_open(self) -> None:
        fresh = self._tail.next_sequence == 0 and not self.head_path.exists()
        if self._signer is not None and fresh:
            stamp = self._write_head(0, ZERO_HASH, self._signer)
            self._tail = replace(self._tail, head_stamp=stamp)
        if self._continues is not None:
            self._continue_or_check()

    def _continue_or_check(self) -> None:
        assert self._continues is not None and self._signer is not None and self._public is not None
        old = str(self._continues.resolve())
        if self._tail.next_sequence > 0:
            first = _first_record(self._fd)
            extra = first.get("extra") if isinstance(first, dict) else None
            if (
                not isinstance(first, dict)
                or first.get("event_type") != "audit.continued"
                or not isinstance(extra, dict)
                or extra.get("continues_from") != old
            ):
                raise AuditError(
                    f"audit log `{self.path}` does not start by continuing `{old}`; drop "
                    "`continues_from`, or point it at a new, empty file"
                )
            return
        keys = dict(self._previous_keys)
        keys[self._signer.kid] = self._public
        report = verify_log(self._continues, public_keys=keys)
        extra = {
            "continues_from": old,
            "previous_records": str(report.count),
            "previous_status": "intact" if report.intact else (report.problem or "not intact"),
        }
        if report.head_signed and report.head_count is not None and report.head_hash:
            # The last state a valid signature vouches for, whatever happened to the file since.
            extra["previous_count"] = str(report.head_count)
            extra["previous_head_hash"] = report.head_hash
            extra["previous_kid"] = report.head_kid or ""
        event = AuditEvent(
            time=_format_time(_utc_now()), sequence=0, event_type="audit.continued", extra=extra
        )
        body = event.to_json_dict()
        body.pop("sequence", None)
        self._append([_encode_parts(body)])
        logger.warning(
            "audit log `%s` continues `%s` (%s)", self.path, old, extra["previous_status"]
        )

    def _append(self, events: list[_Parts]) -> None:
        tail = self._tail
        sequence, prev = tail.next_sequence, tail.last_hash
        lines: list[bytes] = []
        for parts in events:
            line, prev = _chain_parts_line(parts, sequence, prev)
            lines.append(line + b"\n")
            sequence += 1
        data = b"".join(lines)
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self.durability == "fsync":
                _datasync(self._fd)
        except OSError as exc:
            # Do not leave a torn line behind for the next writer to trip over.
            self._cut_back(tail)
            raise AuditError(f"cannot write audit log `{self.path}`: {exc.strerror}") from exc
        new = replace(
            tail, size=tail.size + len(data), next_sequence=sequence, last_hash=prev,
            last_line=lines[-1],
        )
        if self._signer is not None:
            try:
                stamp = self._write_head(sequence, prev, self._signer)
            except Exception:
                # The records are not covered by a signature: take them out again, so that the
                # log never keeps an `allow` for a call the Guard then denied (audit.failed).
                self._cut_back(tail)
                raise
            new = replace(new, head_stamp=stamp)
        self._tail = new

    def _cut_back(self, tail: _Tail) -> None:
        try:
            os.ftruncate(self._fd, tail.size)
            if self.durability == "fsync":
                _datasync(self._fd)
        except OSError:
            logger.error("audit log `%s`: could not cut back an unfinished write", self.path)
            self._broken = "an unfinished write could not be cut back"
        self._tail = _UNKNOWN

    def _write_head(self, count: int, head_hash: str, signer: HeadSigner) -> tuple[int, int, int]:
        """Sign and atomically replace the head; return its stamp (inode, size, mtime)."""
        payload = {"count": count, "head_hash": head_hash, "kid": signer.kid}
        try:
            signature = signer.sign(canonical_json(payload))
        except Exception as exc:
            raise AuditError(f"cannot sign audit head ({type(exc).__name__})") from None
        head = dict(payload, sig=_b64url(signature))
        temporary = self.head_path.with_name(f"{self.head_path.name}.tmp.{os.getpid()}")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self._mode)
            try:
                os.write(fd, canonical_json(head) + b"\n")
                if self.durability == "fsync":
                    os.fsync(fd)
                st = os.fstat(fd)  # a rename keeps inode, size and mtime
            finally:
                os.close(fd)
            os.replace(temporary, self.head_path)
            if self.durability == "fsync":
                _fsync_dir(self.head_path.parent)
        except OSError as exc:
            raise AuditError(f"cannot write audit head `{self.head_path}`: {exc.strerror}") from exc
        return st.st_ino, st.st_size, st.st_mtime_ns


def _first_record(fd: int) -> Any:
    """The first line of the file, parsed (``None`` when it is not JSON)."""
    end = 0
    chunk = b""
    while b"\n" not in chunk:
        more = os.pread(fd, 64 * 1024, end)
        if not more:
            break
        chunk += more
        end += len(more)
    try:
        return _strict_loads(chunk.split(b"\n", 1)[0])
    except (UnicodeDecodeError, ValueError):
        return None


def _default_head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _datasync(fd: int) -> None:
    sync = getattr(os, "fdatasync", os.fsync)  # fdatasync is enough: size changes are synced
    sync(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading and verifying -------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"`{name}` is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate member `{key}`")
        result[key] = value
    return result


def _strict_loads(data: bytes) -> Any:
    return json.loads(
        data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
    )


def _check_line(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """Parse and check one record on its own: JSON, chain members, own hash, canonical, schema."""
    try:
        record = _strict_loads(line)
    except (UnicodeDecodeError, ValueError):
        return None, "not strict UTF-8 JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    sequence, prev, own = record.get("sequence"), record.get("prev"), record.get("hash")
    if type(sequence) is not int or sequence < 0:
        return None, "missing or invalid `sequence`"
    for name, value in (("prev", prev), ("hash", own)):
        if not isinstance(value, str) or not re.fullmatch(_HEX64_RE, value):
            return None, f"missing or invalid `{name}`"
    unhashed = {k: v for k, v in record.items() if k != "hash"}
    try:
        if hashlib.sha256(canonical_json(unhashed)).hexdigest() != own:
            return None, "content does not match its hash"
        if canonical_json(record) != line:
            return None, "not in canonical form"
    except AuditError:
        return None, "not JSON-safe"
    try:
        AuditEvent.model_validate({k: v for k, v in record.items() if k not in ("prev", "hash")})
    except ValidationError as exc:
        return None, f"not a valid audit event ({exc.error_count()} schema errors)"
    return record, ""


def iter_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """``(index, line)`` for each line of a log; a last line without ``\\n`` keeps no newline."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed in finally, the generator may stop early
    except OSError as exc:
        raise AuditError(f"cannot read audit log `{path}`: {exc.strerror}") from exc
    try:
        yield from enumerate(handle)
    finally:
        handle.close()


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify_log`."""

    ok: bool
    """True when every record and the head (if any) verify."""
    count: int
    """Complete records in the file (lines ending in ``\\n``)."""
    first_bad_index: int | None = None
    """The first record that is bad (0-based), or where the gap is; ``None`` if ok or not local."""
    problem: str | None = None
    """``modified``, ``deleted``, ``reordered``, ``torn last line``, ``truncated (head says N
    records)``, ``rewritten (does not match the signed head)``, ``head signature invalid``,
    ``head signed by unknown key``, ``head missing``, ``head unreadable``."""
    detail: str | None = None
    """A more precise explanation for people."""
    head_count: int | None = None
    """How many records the head covers (``None`` without a head)."""
    head_signed: bool = False
    """True when the head's signature was checked against a given public key."""
    unsigned_tail: int = 0
    """Records after the head (a writer died between its append and its head update, or they
    were appended without the key): not covered by any signature."""
    head_hash: str | None = None
    """The hash the head names (the last record it covers), when there is a head."""
    head_kid: str | None = None
    """The key id the head names (printable), when there is a head."""

    @property
    def intact(self) -> bool:
        """Proved intact: every record verifies and a head whose signature was checked covers
        exactly all of them. ``ok`` alone only means nothing wrong was found."""
        return self.ok and self.head_signed and self.unsigned_tail == 0


@dataclass(frozen=True)
class _Head:
    count: int
    head_hash: str
    kid: str
    sig: str


def _read_head(head_path: Path) -> _Head | str | None:
    """The head, ``None`` if there is none, or a problem string."""
    try:
        data = head_path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read head: {exc.strerror}"
    try:
        head = _strict_loads(data.rstrip(b"\n"))
    except (UnicodeDecodeError, ValueError):
        return "head is not JSON"
    if not isinstance(head, dict) or set(head) != {"count", "head_hash", "kid", "sig"}:
        return "head must have exactly count, head_hash, kid, sig"
    count, head_hash, kid, sig = head["count"], head["head_hash"], head["kid"], head["sig"]
    if type(count) is not int or count < 0:
        return "head `count` is not a non-negative integer"
    if not isinstance(head_hash, str) or not re.fullmatch(_HEX64_RE, head_hash):
        return "head `head_hash` is not a sha256 hex digest"
    if not isinstance(kid, str) or not isinstance(sig, str):
        return "head `kid` and `sig` must be strings"
    return _Head(count, head_hash, kid, sig)


def _printable(text: str, limit: int = 80) -> str:
    """A value read from a file, made safe to put into a message (no control characters)."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    return clean if len(clean) <= limit else clean[:limit] + "…"


def _head_signature_problem(head: _Head, keys: Mapping[str, Ed25519PublicKey]) -> str | None:
    """``None`` when ``head`` is signed by the key ``keys`` holds for its kid, else the problem."""
    key = keys.get(head.kid)
    if key is None:
        return "head signed by unknown key"
    payload = canonical_json({"count": head.count, "head_hash": head.head_hash, "kid": head.kid})
    try:
        key.verify(_b64url_decode(head.sig), payload)
    except (InvalidSignature, ValueError):
        return "head signature invalid"
    return None


def verify_log(
    path: str | os.PathLike[str],
    *,
    public_keys: Mapping[str, Ed25519PublicKey] | None = None,
    head_path: str | os.PathLike[str] | None = None,
) -> VerifyReport:
    """Verify a JSONL audit log; report the first bad record.

    * a record whose content changed fails its own hash, or (hash recomputed) breaks the next
      record's ``prev``: ``modified`` at its index;
    * a gap in ``sequence``: ``deleted`` where the gap shows, or ``reordered`` if the missing
      record comes later (a swap of records i and i+1 is reported at i);
    * a last line without ``\\n``: ``torn last line`` at its index (never trusted);
    * with a head (``<log>.head`` unless ``head_path``): fewer records than it counts is
      ``truncated``; a different hash at its count is ``rewritten``. With ``public_keys`` its
      signature must verify and a missing head is a problem; without, the head is only compared.

    ``ok`` means nothing wrong was found; :attr:`VerifyReport.intact` means it was proved
    (signature checked, no record after the head). Raises :class:`AuditError` only when the
    log cannot be read at all.
    """
    log_path = Path(path)
    head_file = Path(head_path) if head_path is not None else _default_head_path(log_path)
    head = _read_head(head_file)
    signed = False
    if isinstance(head, str):
        return _report_all(log_path, "head unreadable", None, head)
    if head is None and public_keys is not None:
        return _report_all(log_path, "head missing", None, f"no head file `{head_file}`")
    if head is not None and public_keys is not None:
        problem_text = _head_signature_problem(head, public_keys)
        if problem_text is not None:
            detail = f"kid `{_printable(head.kid)}`" if "unknown" in problem_text else None
            return replace(
                _report_all(log_path, problem_text, None, detail),
                head_count=head.count,
                head_kid=_printable(head.kid),
            )
        signed = True

    def report(ok: bool, count: int, index: int | None = None, what: str | None = None,
               detail: str | None = None) -> VerifyReport:
        if head is None:
            return VerifyReport(ok, count, index, what, detail)
        return VerifyReport(
            ok, count, index, what, detail, head.count, signed,
            unsigned_tail=max(count - head.count, 0) if ok else 0,
            head_hash=head.head_hash, head_kid=_printable(head.kid),
        )

    count = 0
    expected = 0
    prev = ZERO_HASH
    hash_at_head: str | None = None
    problem: tuple[int, str, str] | None = None
    lines = iter_records(log_path)
    for index, raw in lines:
        if problem is not None:
            count += raw.endswith(b"\n")
            continue
        if not raw.endswith(b"\n"):
            problem = (index, "torn last line", f"{len(raw)} bytes without a newline")
            break
        count += 1
        record, why = _check_line(raw[:-1])
        if record is None:
            problem = (index, "modified", why)
            continue
        sequence = record["sequence"]
        if sequence != expected:
            if sequence < expected or _sequence_later(log_path, index + 1, expected):
                problem = (index, "reordered", f"sequence {sequence} where {expected} belongs")
            else:
                problem = (
                    index,
                    "deleted",
                    f"{sequence - expected} record(s) missing before sequence {sequence}",
                )
            continue
        if record["prev"] != prev:
            # This record is intact and in place, so the one before it changed (its own hash
            # was recomputed), or the first record does not start a chain.
            at = max(index - 1, 0)
            problem = (at, "modified", "the hash chain breaks after it")
            continue
        prev = record["hash"]
        expected += 1
        if head is not None and index == head.count - 1:
            hash_at_head = prev

    if problem is not None:
        index, what, detail = problem
        return report(False, count, index, what, detail)
    if head is None:
        return report(True, count)
    if head.count > count:
        return report(
            False,
            count,
            count,
            f"truncated (head says {head.count} records)",
            f"{head.count - count} record(s) missing at the end",
        )
    expected_hash = ZERO_HASH if head.count == 0 else hash_at_head
    if expected_hash != head.head_hash:
        return report(
            False,
            count,
            max(head.count - 1, 0),
            "rewritten (does not match the signed head)",
            "the record the head counts last has a different hash",
        )
    return report(True, count)


def _report_all(path: Path, problem: str, index: int | None, detail: str | None) -> VerifyReport:
    count = sum(1 for _, raw in iter_records(path) if raw.endswith(b"\n"))
    return VerifyReport(False, count, index, problem, detail)


def _sequence_later(path: Path, start: int, sequence: int) -> bool:
    """Whether a record with ``sequence`` appears at index ``start`` or later."""
    for index, raw in iter_records(path):
        if index < start:
            continue
        try:
            record = _strict_loads(raw.rstrip(b"\n"))
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(record, dict) and record.get("sequence") == sequence:
            return True
    return False


# --- OpenTelemetry sink ----------------------------------------------------------------------

_OTEL_TRACE_ID: Final = re.compile(r"[0-9a-f]{32}")
_OTEL_SPAN_ID: Final = re.compile(r"[0-9a-f]{16}")


class OTelSink:
    """A side channel: OpenTelemetry spans for tool calls, following the GenAI conventions.

    * ``tool_call.decided`` starts a span ``execute_tool {tool}`` at the event's time (a child of
      the framework's span when the event carries ``trace``). A call that is not allowed ends
      there: ``deny`` with status ERROR, ``approval_required`` with status UNSET.
    * ``tool_call.completed`` (same ``call_id``) adds the result attributes and ends the span at
      its time; ``error``/``blocked`` set status ERROR. Without an open span (the decision was
      recorded by another process), a span covering ``duration_ms`` is created and ended.
    * ``approval.*`` become span events on the call's open span, or on a short ``aiam.approval``
      span; ``delegation.*`` become a short ``aiam.delegation`` span carrying one span event
      named after the event type; ``model.usage`` a short ``aiam.model_usage`` span with
      ``gen_ai.usage.*`` attributes; ``audit.continued`` (a log that continues a broken one;
      written by :class:`JsonlSink` itself, so other sinks rarely see it) an ``aiam.audit`` span.

    Attributes: ``gen_ai.operation.name`` (``execute_tool``), ``gen_ai.tool.name``,
    ``gen_ai.tool.call.id``, ``gen_ai.agent.id``, ``gen_ai.agent.name``, ``gen_ai.request.model``,
    and ``aiam.execution.id``, ``aiam.jti``, ``aiam.delegator``, ``aiam.chain`` (``type:id``),
    ``aiam.purpose``, ``aiam.action``, ``aiam.arguments.digest``, ``aiam.decision.outcome``,
    ``aiam.decision.reasons`` (codes), ``aiam.decision.policy_ids``, ``aiam.session.risk``,
    ``aiam.session.call_count``, ``aiam.session.labels``, ``aiam.session.tainted``,
    ``aiam.budget.remaining.<dim>``, ``aiam.result.outcome``, ``aiam.result.duration_ms``,
    ``aiam.framework``. Reasoning text is exported only with ``record_reasoning=True``.

    Uses the given TracerProvider, or the global one. ``durable`` is False: failures are logged
    to ``agentic_iam.audit`` and counted in ``failures``, never raised. At most ``max_open_spans``
    calls wait for their completion; the oldest is ended (``aiam.result.outcome=unknown``) beyond.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        *,
        tracer_name: str = "agentic_iam",
        record_reasoning: bool = False,
        max_open_spans: int = 10_000,
    ) -> None:
        try:
            from opentelemetry import trace
        except ImportError as exc:  # pragma: no cover - exercised without the extra
            raise MissingExtraError("otel", "opentelemetry-api") from exc
        self.durable = False
        self.failures = 0
        self._trace = trace
        self._tracer = trace.get_tracer(tracer_name, tracer_provider=tracer_provider)
        self._record_reasoning = record_reasoning
        self._max_open = max_open_spans
        self._open: OrderedDict[str, Span] = OrderedDict()
        self._lock = threading.Lock()

    def emit(self, event: AuditEvent) -> None:
        try:
            event = _scrubbed_event(event)
            with self._lock:
                self._emit(event)
        except Exception as exc:  # a side channel never breaks the call; the local record stays
            self.failures += 1
            logger.warning(
                "otel audit sink failed on %s #%d: %s: %s",
                event.event_type,
                event.sequence,
                type(exc).__name__,
                redact_secrets(str(exc)),
            )

    def flush(self) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            while self._open:
                _, span = self._open.popitem(last=False)
                span.set_attribute("aiam.result.outcome", "unknown")
                span.end()

    @property
    def open_spans(self) -> int:
        """Calls whose span waits for a ``tool_call.completed`` event."""
        return len(self._open)

    def _emit(self, event: AuditEvent) -> None:
        kind = event.event_type
        if kind == "tool_call.decided":
            self._decided(event)
        elif kind == "tool_call.completed":
            self._completed(event)
        elif kind.startswith("approval."):
            span = self._open.get(event.call_id) if event.call_id else None
            if span is not None:
                span.add_event(kind, self._attributes(event), timestamp=event.time_ns)
            else:
                self._point_span("aiam.approval", event)
        elif kind.startswith("delegation."):
            self._point_span("aiam.delegation", event)
        elif kind.startswith("audit."):
            self._point_span("aiam.audit", event)
        else:
            self._point_span("aiam.model_usage", event)

    def _context(self, event: AuditEvent) -> Any:
        ids = event.trace
        if ids is None or ids.trace_id is None or ids.span_id is None:
            return None
        if not (_OTEL_TRACE_ID.fullmatch(ids.trace_id) and _OTEL_SPAN_ID.fullmatch(ids.span_id)):
            return None  # not OpenTelemetry ids: kept as aiam.trace.* attributes only
        if int(ids.trace_id, 16) == 0 or int(ids.span_id, 16) == 0:
            return None  # all-zero ids are invalid in W3C trace context
        trace = self._trace
        parent = trace.SpanContext(
            trace_id=int(ids.trace_id, 16),
            span_id=int(ids.span_id, 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
        return trace.set_span_in_context(trace.NonRecordingSpan(parent))

    def _decided(self, event: AuditEvent) -> None:
        start = event.time_ns
        span = self._tracer.start_span(
            f"execute_tool {event.tool or 'unknown'}",
            context=self._context(event),
            kind=self._trace.SpanKind.INTERNAL,
            attributes=self._attributes(event),
            start_time=start,
        )
        outcome = event.decision.outcome if event.decision else None
        if outcome != "allow" or event.call_id is None:
            if outcome == "deny" or outcome is None:
                codes = [r.code for r in event.decision.reasons] if event.decision else []
                span.set_status(self._trace.StatusCode.ERROR, ", ".join(codes) or "denied")
            span.end(end_time=start)
            return
        previous = self._open.pop(event.call_id, None)
        if previous is not None:  # a repeated decision for the same call: keep the latest
            previous.end(end_time=start)
        self._open[event.call_id] = span
        while len(self._open) > self._max_open:
            _, oldest = self._open.popitem(last=False)
            oldest.set_attribute("aiam.result.outcome", "unknown")
            oldest.end()

    def _completed(self, event: AuditEvent) -> None:
        end = event.time_ns
        span = self._open.pop(event.call_id, None) if event.call_id else None
        attributes = self._attributes(event)
        if span is None:
            duration = event.result.duration_ms if event.result and event.result.duration_ms else 0
            span = self._tracer.start_span(
                f"execute_tool {event.tool or 'unknown'}",
                context=self._context(event),
                kind=self._trace.SpanKind.INTERNAL,
                attributes=attributes,
                start_time=end - int(duration * 1_000_000),
            )
        else:
            span.set_attributes(attributes)
        if event.result is not None and event.result.outcome != "success":
            reason = event.result.error or event.result.outcome
            span.set_status(self._trace.StatusCode.ERROR, reason)
        span.end(end_time=end)

    def _point_span(self, name: str, event: AuditEvent) -> None:
        at = event.time_ns
        attributes = self._attributes(event)
        span = self._tracer.start_span(
            name, context=self._context(event), attributes=attributes, start_time=at
        )
        span.add_event(event.event_type, attributes, timestamp=at)
        span.end(end_time=at)

    def _attributes(self, event: AuditEvent) -> dict[str, AttributeValue]:
        attrs: dict[str, AttributeValue] = {"aiam.event_type": event.event_type}

        def put(key: str, value: str | int | float | bool | None) -> None:
            if value is not None:
                attrs[key] = value

        if event.event_type.startswith("tool_call."):
            attrs["gen_ai.operation.name"] = "execute_tool"
        put("gen_ai.tool.name", event.tool)
        put("gen_ai.tool.call.id", event.call_id)
        put("gen_ai.agent.id", event.agent_id)
        put("gen_ai.agent.name", event.agent_name or event.agent_id)
        put("aiam.execution.id", event.execution_id)
        put("aiam.parent_execution.id", event.parent_execution_id)
        put("aiam.jti", event.jti)
        put("aiam.issuer", event.issuer)
        put("aiam.delegator", event.delegator)
        if event.chain:
            attrs["aiam.chain"] = [f"{hop.principal_type}:{hop.id}" for hop in event.chain]
        put("aiam.purpose", event.purpose)
        if event.capabilities:
            attrs["aiam.capabilities"] = list(event.capabilities)
        put("aiam.action", event.action)
        put("aiam.arguments.digest", event.arguments_digest)
        put("aiam.framework", event.framework)
        if event.trace is not None:
            put("aiam.trace.trace_id", event.trace.trace_id)
            put("aiam.trace.span_id", event.trace.span_id)
        if event.decision is not None:
            attrs["aiam.decision.outcome"] = event.decision.outcome
            attrs["aiam.decision.reasons"] = [r.code for r in event.decision.reasons]
            attrs["aiam.decision.policy_ids"] = list(event.decision.policy_ids)
        if event.session is not None:
            session = event.session
            put("aiam.session.risk", session.risk)
            put("aiam.session.risk_envelope", session.risk_envelope)
            put("aiam.session.call_count", session.call_count)
            attrs["aiam.session.labels"] = list(session.labels)
            attrs["aiam.session.tainted"] = session.tainted
            for dimension, remaining in session.budget_remaining.items():
                put(f"aiam.budget.remaining.{dimension}", remaining)
        if event.result is not None:
            result = event.result
            attrs["aiam.result.outcome"] = result.outcome
            put("aiam.result.duration_ms", result.duration_ms)
            put("aiam.result.output_digest", result.output_digest)
            if result.output_labels:
                attrs["aiam.result.output_labels"] = list(result.output_labels)
            put("aiam.result.error", result.error)
        if event.reasoning is not None:
            reasoning = event.reasoning
            put("gen_ai.request.model", reasoning.model)
            put("gen_ai.response.id", reasoning.response_id)
            put("aiam.reasoning.run_id", reasoning.run_id)
            put("aiam.reasoning.parent_run_id", reasoning.parent_run_id)
            if self._record_reasoning:
                put("aiam.reasoning.message", reasoning.message)
        if event.usage:
            for name, tokens in event.usage.items():
                attrs[f"gen_ai.usage.{name}"] = tokens
        if event.extra:
            for name, text in event.extra.items():
                attrs[f"aiam.extra.{name}"] = text
        return attrs


# --- the recorder ----------------------------------------------------------------------------

_REDACTION_FAILED: Final = "[REDACTION FAILED]"


class Recorder:
    """Fans one event out to every sink; the object the Guard calls.

    :meth:`record` stamps ``time`` (UTC, microseconds) and ``sequence`` (per recorder; file sinks
    renumber per file), computes ``arguments_digest`` from raw ``arguments``, keeps a redacted copy
    of the arguments only with ``record_arguments=True``, redacts and truncates
    ``reasoning.message`` (redaction first, so truncation never cuts a secret in half and leaves
    the rest unrecognisable), scrubs every string with :func:`redact_secrets`, and emits.

    A durable sink that raises makes :meth:`record` raise :class:`AuditError` after every other
    sink was tried; a non-durable failure is logged and counted in ``failures``. One lock covers
    numbering and emission, so the sinks see events in sequence order.
    """

    def __init__(
        self,
        sinks: Sequence[AuditSink],
        *,
        redactor: Redactor | None = None,
        max_reasoning_chars: int = 2000,
        record_arguments: bool = False,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if max_reasoning_chars < 0:
            raise AuditError("max_reasoning_chars must not be negative")
        self._sinks = tuple(sinks)
        self._redactor = redactor or redact_secrets
        self._max_reasoning = max_reasoning_chars
        self._record_arguments = record_arguments
        self._clock = clock or _utc_now
        self._sequence = 0
        self._failures = 0
        self._lock = threading.Lock()

    @property
    def sinks(self) -> tuple[AuditSink, ...]:
        return self._sinks

    @property
    def failures(self) -> int:
        """How many times a non-durable sink failed."""
        return self._failures

    @property
    def durable(self) -> bool:
        """Whether at least one sink is a durable record."""
        return any(sink.durable for sink in self._sinks)

    def record(self, event_type: EventType, /, **fields: Any) -> AuditEvent:
        """Build, stamp, redact and emit one event; return it (with this recorder's sequence).

        ``fields`` are :class:`AuditEvent` fields (nested parts as models or dicts). ``arguments``
        is the tool's raw arguments: they are digested, and stored (redacted) only when configured.
        """
        return self._record(event_type, fields).event()

    def record_fast(self, event_type: EventType, /, **fields: Any) -> None:
        """:meth:`record` without returning the event: the same record, for callers on the hot path.

        Fields given as plain built-in values (str, int, bool, None; lists and dicts of them, as
        the Guard builds them) are checked and redacted without building a model: a model is
        only made if a sink needs one (:class:`OTelSink`, sinks of other modules) or
        :attr:`MemorySink.events` is read. Anything else takes the validated path. The records
        are the same bytes either way.
        """
        self._record(event_type, fields)

    def _record(self, event_type: str, fields: dict[str, Any]) -> _Record:
        if "time" in fields or "sequence" in fields:
            raise AuditError("`time` and `sequence` are assigned by the recorder")
        if "arguments" in fields:
            arguments = fields.pop("arguments")
            if arguments is not None:
                if fields.get("arguments_digest") is None:
                    fields["arguments_digest"] = digest(arguments)
                if self._record_arguments:
                    fields["arguments"] = self._redact_tree(json_safe(arguments))
        reasoning = fields.get("reasoning")
        if reasoning is not None:
            fields["reasoning"] = self._reasoning(reasoning)
        with self._lock:
            time = _format_time(self._clock())
            fast = _fast_body(event_type, fields, time, self._sequence)
            if fast is None:
                event = self._validated(event_type, fields, time)
                record = _Record(event.to_json_dict(), event)
            else:
                body, redacted = fast
                if redacted:
                    # Something was redacted: validate the result, as the validated path does
                    # (a redaction that breaks a constrained field refuses the event).
                    try:
                        record = _Record(body, AuditEvent.model_validate(body))
                    except ValidationError:
                        raise AuditError(
                            "an audit event still holds a secret after redaction"
                        ) from None
                else:
                    record = _Record(body)
            self._sequence += 1
            self._emit(record)
        return record

    def _validated(self, event_type: str, fields: Mapping[str, Any], time: str) -> AuditEvent:
        """The event through the model: for fields the fast path does not take."""
        try:
            event = AuditEvent.model_validate(
                {**fields, "event_type": event_type, "time": time, "sequence": self._sequence}
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
                for error in exc.errors(include_input=False)
            )
            raise AuditError(f"invalid audit event `{event_type}`: {problems}") from None
        return _scrubbed_event(event, message_is_clean=True)

    def flush(self) -> None:
        """Flush every sink; a durable failure raises :class:`AuditError` after trying all."""
        self._each("flush")

    def close(self) -> None:
        """Close every sink (flushing them); a durable failure raises after trying all."""
        self._each("close")

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _emit(self, record: _Record) -> None:
        failed: list[str] = []
        for sink in self._sinks:
            try:
                # This module's sinks take the record (no model unless asked for); a subclass
                # or an instance with its own emit gets the model, as any other sink does.
                kind = type(sink)
                if kind in _RECORD_SINKS and kind.emit is _RECORD_SINKS[kind] and (
                    "emit" not in vars(sink)
                ):
                    sink._emit_record(record)  # type: ignore[attr-defined]
                else:
                    sink.emit(record.event())
            except Exception as exc:
                failed.extend(self._failed(sink, "emit", exc, record))
        if failed:
            raise AuditError(
                f"durable audit sink failed to record `{record.event_type}`: {'; '.join(failed)}"
            )

    def _each(self, method: Literal["flush", "close"]) -> None:
        failed: list[str] = []
        with self._lock:
            for sink in self._sinks:
                try:
                    getattr(sink, method)()
                except Exception as exc:
                    failed.extend(self._failed(sink, method, exc, None))
        if failed:
            raise AuditError(f"durable audit sink failed to {method}: {'; '.join(failed)}")

    def _failed(
        self, sink: AuditSink, action: str, exc: Exception, event: _Record | None
    ) -> list[str]:
        name = type(sink).__name__
        message = redact_secrets(f"{type(exc).__name__}: {exc}")
        what = f"{event.event_type} #{event.sequence}" if event is not None else action
        # A sink that does not say it is durable is treated as durable: fail closed.
        if getattr(sink, "durable", True):
            logger.error("durable audit sink %s failed on %s: %s", name, what, message)
            return [f"{name}: {message}"]
        self._failures += 1
        logger.warning("audit sink %s failed on %s: %s", name, what, message)
        return []

    def _redact_text(self, text: str) -> str:
        try:
            clean = self._redactor(text)
        except Exception as exc:  # a broken redactor must not leak the text, nor deny the call
            logger.warning("audit redactor failed: %s", type(exc).__name__)
            return _REDACTION_FAILED
        if not isinstance(clean, str):
            return _REDACTION_FAILED
        return redact_secrets(clean)

    def _redact_tree(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._redact_text(value)
        if isinstance(value, Mapping):
            return {
                redact_secrets(str(key)): self._redact_field(key, item)
                for key, item in value.items()
            }
        if isinstance(value, (list, tuple)):
            return [self._redact_tree(item) for item in value]
        return value

    def _redact_field(self, key: Any, item: Any) -> Any:
        clean = self._redact_tree(item)
        return _secret_field(key, clean) or clean

    def _reasoning(self, reasoning: Any) -> dict[str, Any]:
        if isinstance(reasoning, ReasoningInfo):
            data = reasoning.model_dump()
        elif isinstance(reasoning, Mapping):
            data = dict(reasoning)
        else:
            raise AuditError("`reasoning` must be a ReasoningInfo or a mapping")
        message = data.get("message")
        if isinstance(message, str):
            message = self._redact_text(message)
            if len(message) > self._max_reasoning:
                # Cut, then apply the floor again: a cut can complete a shape (a 40-character
                # AWS secret that was the start of a longer run). The result is what the floor
                # returns, so _scrubbed_event need not read the message again.
                message = redact_secrets(message[: self._max_reasoning])
                data["truncated"] = True
            data["message"] = message
        return data


# Sinks whose own emit the Recorder may bypass with _emit_record (same result, no model).
_RECORD_SINKS: Final[Mapping[type, Any]] = {
    MemorySink: MemorySink.emit,
    JsonlSink: JsonlSink.emit,
}
