"""The Recorder's fast path writes the same bytes as the validated path, and old logs verify.

The fast path (``provenance._fast_body``) builds an event's JSON object from plain values
without a pydantic round trip; the validated path (``AuditEvent.model_validate``, then the
whole-event secret scrub) is the reference. Generated events must come out byte-identical
through both, or be refused by both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentic_iam.core import provenance
from agentic_iam.core.provenance import (
    EVENT_TYPES,
    AuditEvent,
    HeadSigner,
    JsonlSink,
    MemorySink,
    Recorder,
    canonical_json,
    verify_log,
)
from agentic_iam.core.redaction import redact_secrets, secret_field_kind
from agentic_iam.errors import AuditError
from tests.core._audit_golden import GOLDEN_KEY, golden_clock, golden_events

DATA = Path(__file__).parent / "data"


# --- logs written before the fast path ---------------------------------------------------------


def _write_golden(path: Path, method: str) -> None:
    sink = JsonlSink(path, signer=HeadSigner(GOLDEN_KEY, "golden"))
    recorder = Recorder([sink], clock=golden_clock(), record_arguments=True)
    for event_type, fields in golden_events():
        getattr(recorder, method)(event_type, **fields)
    recorder.close()


def test_the_golden_log_still_verifies() -> None:
    keys = {"golden": GOLDEN_KEY.public_key()}
    report = verify_log(DATA / "audit_golden.jsonl", public_keys=keys)
    assert report.intact and report.count == len(golden_events())


@pytest.mark.parametrize("method", ["record", "record_fast"])
def test_the_recorder_writes_the_golden_log_byte_for_byte(tmp_path: Path, method: str) -> None:
    path = tmp_path / "audit.jsonl"
    _write_golden(path, method)
    assert path.read_bytes() == (DATA / "audit_golden.jsonl").read_bytes()
    head = path.with_name(path.name + ".head")
    assert head.read_bytes() == (DATA / "audit_golden.jsonl.head").read_bytes()


def test_the_golden_events_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[bool] = []
    fast = provenance._fast_body

    def spy(*args: Any) -> Any:
        result = fast(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(provenance, "_fast_body", spy)
    recorder = Recorder([MemorySink()], clock=golden_clock(), record_arguments=True)
    for event_type, fields in golden_events():
        recorder.record_fast(event_type, **fields)
    assert taken and all(taken)


# --- generated events: fast path == validated path ---------------------------------------------

SECRETS = [
    "sk-proj-abcdefghijklmnopqrstuvwxyz012345",
    "password=hunter22",
    "Bearer abcdefghijklmnop",
    "https://user:pa55word@db.example.com/x",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
    "AKIAABCDEFGHIJKLMNOP",
    "api_key: Zx8Qw2Er4Ty6Ui8Op0As",
    "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dF3hJ5",
    "[REDACTED:jwt]",
]
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(SECRETS),
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=8), st.sampled_from(SECRETS),
              st.text(max_size=8)),
    st.sampled_from(["https://broker.example.com", "alice@example.com", "", "\u2028\x00\x7f"]),
)
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
keys = st.one_of(st.sampled_from(["password", "api_key", "client_secret", "reason", "cost",
                                  "X-Api-Key", "sk-proj-abcdefghijklmnopqrstuvwxyz012345"]),
                 st.text(max_size=12))
# Mostly the shapes the Guard builds; now and then a value the fast path must hand over.
odd = st.sampled_from([True, 1.5, float("nan"), -1, "x", (), None, object()])
ints = st.one_of(st.integers(-(2**70), 2**70), st.just(None), st.booleans())
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), texts,
              st.floats(allow_nan=True, allow_infinity=True)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(keys, children, max_size=3)),
    max_leaves=8,
)


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(strategy, strategy, strategy, st.none(), odd)


hops = st.fixed_dictionaries(
    {"principal_type": st.sampled_from(["human", "workload", "agent", "robot"]), "id": texts},
    optional={"execution_id": st.one_of(st.none(), texts)},
)
reasons = st.fixed_dictionaries(
    {"code": texts}, optional={"message": texts, "policy_id": st.one_of(st.none(), texts)}
)
decisions = st.fixed_dictionaries(
    {"outcome": st.sampled_from(["allow", "deny", "approval_required", "maybe"])},
    optional={"reasons": st.lists(reasons, max_size=3),
              "policy_ids": st.one_of(st.lists(texts, max_size=3), st.tuples(texts))},
)
sessions = st.fixed_dictionaries({}, optional={
    "call_count": ints, "risk": ints, "risk_envelope": ints,
    "budget_remaining": st.dictionaries(keys, ints, max_size=3),
    "labels": st.lists(texts, max_size=3), "tainted": st.one_of(st.booleans(), odd),
})
results = st.fixed_dictionaries(
    {"outcome": st.sampled_from(["success", "error", "blocked", "cancelled", "nope"])},
    optional={
        "duration_ms": st.one_of(st.none(), st.integers(-5, 2**60),
                                 st.floats(allow_nan=True, allow_infinity=True)),
        "output_digest": st.one_of(st.none(), hex64, texts),
        "output_labels": st.lists(texts, max_size=3),
        "budget_settled": st.dictionaries(keys, st.integers(0, 10**6), max_size=3),
        "error": st.one_of(st.none(), texts),
    },
)
reasonings = st.fixed_dictionaries({}, optional={
    "message": st.one_of(st.none(), texts, st.text(max_size=300)),
    "model": st.one_of(st.none(), texts), "run_id": st.one_of(st.none(), texts),
    "parent_run_id": st.one_of(st.none(), texts), "truncated": st.booleans(),
})
traces = st.fixed_dictionaries({}, optional={
    "trace_id": st.one_of(st.none(), st.text(max_size=130), hex64),
    "span_id": st.one_of(st.none(), st.text(max_size=20)),
})
fields_strategy = st.fixed_dictionaries({}, optional={
    **{name: _maybe(texts) for name in (
        "execution_id", "parent_execution_id", "jti", "issuer", "delegator", "agent_id",
        "agent_name", "purpose", "tool", "action", "call_id", "framework")},
    "chain": _maybe(st.lists(hops, max_size=3)),
    "capabilities": _maybe(st.lists(texts, max_size=3)),
    "arguments_digest": _maybe(hex64),
    "arguments": _maybe(st.dictionaries(keys, json_values, max_size=4)),
    "decision": _maybe(decisions),
    "result": _maybe(results),
    "session": _maybe(sessions),
    "reasoning": _maybe(reasonings),
    "trace": _maybe(traces),
    "usage": _maybe(st.dictionaries(keys, st.integers(0, 2**70), max_size=3)),
    "extra": _maybe(st.dictionaries(keys, texts, max_size=3)),
    "unknown_field": st.just(None),
})


def _outcome(recorder: Recorder, event_type: str, fields: dict[str, Any]) -> Any:
    try:
        return recorder.record(event_type, **_copy(fields)).to_json_dict()
    except AuditError:
        return AuditError


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(event_type=st.sampled_from(EVENT_TYPES), fields=fields_strategy,
       record_arguments=st.booleans())
def test_fast_and_validated_paths_write_the_same_bytes(
    tmp_path_factory: pytest.TempPathFactory, event_type: str, fields: dict[str, Any],
    record_arguments: bool,
) -> None:
    folder = tmp_path_factory.mktemp("fast")
    fast_sink, slow_sink = JsonlSink(folder / "fast.jsonl"), JsonlSink(folder / "slow.jsonl")
    fast = Recorder([fast_sink], clock=golden_clock(), record_arguments=record_arguments)
    slow = Recorder([slow_sink], clock=golden_clock(), record_arguments=record_arguments)
    fast_body = provenance._fast_body
    try:
        fast_result = _outcome(fast, event_type, fields)
        provenance._fast_body = lambda *args: None  # type: ignore[assignment]
        slow_result = _outcome(slow, event_type, fields)
    finally:
        provenance._fast_body = fast_body
    fast.close()
    slow.close()
    assert fast_result == slow_result
    assert (folder / "fast.jsonl").read_bytes() == (folder / "slow.jsonl").read_bytes()


@settings(max_examples=300, deadline=None)
@given(fields=fields_strategy)
def test_memory_sink_events_are_the_validated_events(fields: dict[str, Any]) -> None:
    fast_sink, slow_sink = MemorySink(), MemorySink()
    fast = Recorder([fast_sink], clock=golden_clock())
    slow = Recorder([slow_sink], clock=golden_clock())
    try:
        fast.record_fast("tool_call.decided", **_copy(fields))
    except AuditError:
        with pytest.raises(AuditError):
            slow.record("tool_call.decided", **_copy(fields))
        return
    fast_body = provenance._fast_body
    provenance._fast_body = lambda *args: None  # type: ignore[assignment]
    try:
        slow.record("tool_call.decided", **_copy(fields))
    finally:
        provenance._fast_body = fast_body
    assert fast_sink.events == slow_sink.events


# --- the pieces the fast path relies on ---------------------------------------------------------


def _schema_keys(model: type[Any]) -> set[str]:
    names: set[str] = set()
    for name, info in model.model_fields.items():
        names.add(name)
        for inner in getattr(info.annotation, "__args__", ()) or ():
            for candidate in (inner, *getattr(inner, "__args__", ())):
                if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
                    names |= _schema_keys(candidate)
    return names


def test_schema_names_and_fixed_values_are_never_redacted() -> None:
    # The fast path does not scrub the schema's own member names and literal values (the
    # validated path does, to no effect): prove that it is to no effect.
    names = _schema_keys(AuditEvent)
    assert {"principal_type", "policy_id", "budget_settled", "trace_id"} <= names
    literals = {*EVENT_TYPES, "human", "workload", "agent", "allow", "deny",
                "approval_required", "success", "error", "blocked", "cancelled"}
    for text in names | literals:
        assert redact_secrets(text) == text
        assert secret_field_kind(text) is None, text


@settings(max_examples=500, deadline=None)
@given(value=st.dictionaries(st.text(max_size=10), json_values, max_size=6))
def test_encoded_parts_are_canonical_json(value: dict[str, Any]) -> None:
    # Keys outside the schema: an event's own members hold floats only where the encoder looks.
    body = {key: item for key, item in value.items()
            if key not in ("hash", "prev", "sequence") and key not in AuditEvent.model_fields}
    try:
        expected = canonical_json({**body, "sequence": 3, "prev": "0" * 64})
    except AuditError:
        with pytest.raises(AuditError):
            provenance._chain_line(body, 3, "0" * 64)
        return
    line, record_hash = provenance._chain_line(body, 3, "0" * 64)
    assert json.loads(line) == {**json.loads(expected), "hash": record_hash}
    assert canonical_json(json.loads(line)) == line
    without_hash = {k: v for k, v in json.loads(line).items() if k != "hash"}
    assert canonical_json(without_hash) == expected


def test_encoding_without_orjson_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    events = golden_events()
    recorder = Recorder([MemorySink()], clock=golden_clock(), record_arguments=True)
    bodies = [recorder.record(kind, **fields).to_json_dict() for kind, fields in events]
    with_orjson = [provenance._encode_parts(body) for body in bodies]
    monkeypatch.setattr(provenance, "_orjson", None)
    assert [provenance._encode_parts(body) for body in bodies] == with_orjson


def test_only_clean_strings_are_remembered_and_the_memory_is_bounded() -> None:
    secret = "token=" + SECRETS[0]
    assert provenance._redacted(secret) != secret
    assert secret not in provenance._CLEAN_STRINGS
    for i in range(provenance._CLEAN_MAX_ENTRIES + 50):
        provenance._redacted(f"clean text {i}")
    assert len(provenance._CLEAN_STRINGS) <= provenance._CLEAN_MAX_ENTRIES
    long_text = "a b " * provenance._CLEAN_MAX_CHARS
    provenance._redacted(long_text)
    assert long_text not in provenance._CLEAN_STRINGS


def test_a_sink_subclass_with_its_own_emit_gets_the_model() -> None:
    seen: list[AuditEvent] = []

    class Spy(MemorySink):
        def emit(self, event: AuditEvent) -> None:
            seen.append(event)
            super().emit(event)

    sink = Spy()
    Recorder([sink]).record_fast("tool_call.decided", tool="t", call_id="c")
    assert len(seen) == 1 and isinstance(seen[0], AuditEvent)
    assert sink.events == seen
