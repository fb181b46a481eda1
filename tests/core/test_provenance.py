"""Provenance: event schema, canonical JSON, redaction, the Recorder and the JSONL sink."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agentic_iam.core.provenance import (
    ZERO_HASH,
    AuditEvent,
    AuditSink,
    HeadSigner,
    JsonlSink,
    MemorySink,
    Recorder,
    canonical_json,
    digest,
    public_keys_from_jwks,
    redact_secrets,
    verify_log,
)
from agentic_iam.errors import AuditError, AuditIntegrityError, KeySetError

ROOT = Path(__file__).parents[2]
JWT = (
    "eyJhbGciOiJFZERTQSIsInR5cCI6ImFpYW0tZXhlYytqd3QifQ"
    ".eyJzdWIiOiJleGVjXzEyMyIsImp0aSI6ImFiYyJ9"
    ".c2lnbmF0dXJlLWJ5dGVzLWhlcmUtMDEyMzQ1Njc4OQ"
)
JWT_RE = r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"

FULL_FIELDS: dict[str, Any] = {
    "execution_id": "exec_1",
    "parent_execution_id": "exec_0",
    "jti": "jti-1",
    "issuer": "https://broker.test",
    "chain": [
        {"principal_type": "human", "id": "alice@example.com", "execution_id": None},
        {"principal_type": "agent", "id": "triage", "execution_id": "exec_0"},
        {"principal_type": "agent", "id": "support-agent", "execution_id": "exec_1"},
    ],
    "delegator": "alice@example.com",
    "agent_id": "support-agent",
    "agent_name": "Support agent",
    "purpose": "refund T-1042",
    "tool": "create_refund",
    "action": "refund:create",
    "call_id": "call_1",
    "decision": {
        "outcome": "deny",
        "reasons": [
            {"code": "capability.constraint", "message": "amount > 100", "policy_id": "p1"}
        ],
        "policy_ids": ["p1"],
    },
    "result": {
        "outcome": "error",
        "duration_ms": 12.5,
        "output_digest": "a" * 64,
        "output_labels": ["untrusted"],
        "budget_settled": {"tool_calls": 1, "cost": 250},
        "error": "boom",
    },
    "session": {
        "call_count": 3,
        "risk": 20,
        "risk_envelope": 50,
        "budget_remaining": {"tool_calls": 17, "cost": None},
        "labels": ["pii"],
        "tainted": True,
    },
    "reasoning": {
        "message": "refund it",
        "model": "gpt-x",
        "run_id": "r1",
        "parent_run_id": "r0",
        "response_id": "resp_1",
    },
    "framework": "langchain",
    "trace": {"trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331"},
    "usage": {"input_tokens": 10, "output_tokens": 5},
    "extra": {"approval_id": "ap_1"},
    "capabilities": ["refund:create amount<=100"],
}


def make_signer(kid: str = "audit-1", seed: int = 1) -> HeadSigner:
    return HeadSigner(Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32), kid)


class FailingSink:
    def __init__(self, *, durable: bool) -> None:
        self.durable = durable
        self.calls = 0

    def emit(self, event: AuditEvent) -> None:
        self.calls += 1
        raise OSError(f"disk on fire while writing {JWT}")

    def flush(self) -> None:
        raise OSError("flush failed")

    def close(self) -> None:
        return None


# --- schema ----------------------------------------------------------------------------------


def test_schema_round_trip_keeps_every_field() -> None:
    sink = MemorySink()
    event = Recorder([sink], record_arguments=True).record(
        "tool_call.completed", arguments={"amount": 250, "note": "é"}, **FULL_FIELDS
    )
    assert sink.events == [event]
    stored = event.to_json_dict()
    assert AuditEvent.model_validate(stored) == event
    assert AuditEvent.model_validate_json(canonical_json(stored)) == event
    assert stored["schema_version"] == 1
    assert stored["chain"][0] == {"principal_type": "human", "id": "alice@example.com"}
    assert stored["session"]["budget_remaining"] == {"tool_calls": 17, "cost": None}
    assert stored["arguments"] == {"amount": 250, "note": "é"}
    assert stored["arguments_digest"] == digest({"note": "é", "amount": 250})
    assert stored["decision"]["reasons"][0]["policy_id"] == "p1"


def test_schema_is_strict() -> None:
    base = {"time": "2025-01-02T03:04:05.000006Z", "sequence": 0, "event_type": "model.usage"}
    assert AuditEvent.model_validate(base).schema_version == 1
    with pytest.raises(ValidationError):
        AuditEvent.model_validate({**base, "unknown": 1})
    with pytest.raises(ValidationError):
        AuditEvent.model_validate({**base, "schema_version": 2})
    with pytest.raises(ValidationError):
        AuditEvent.model_validate({**base, "event_type": "tool_call.maybe"})
    for bad_time in ("2025-01-02T03:04:05Z", "2025-13-02T03:04:05.000000Z", "2025-01-02 03:04"):
        with pytest.raises(ValidationError):
            AuditEvent.model_validate({**base, "time": bad_time})
    with pytest.raises(ValidationError):
        AuditEvent.model_validate({**base, "arguments_digest": "not-a-digest"})
    with pytest.raises(ValidationError):
        AuditEvent.model_validate({**base, "result": {"outcome": "success", "duration_ms": "nan"}})
    event = AuditEvent.model_validate(base)
    with pytest.raises(ValidationError):
        event.sequence = 5


def test_time_ns_is_exact() -> None:
    event = AuditEvent.model_validate(
        {"time": "2025-01-02T03:04:05.123456Z", "sequence": 0, "event_type": "model.usage"}
    )
    expected = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp()
    assert event.time_ns == int(expected) * 1_000_000_000 + 123_456_000


# --- canonical JSON --------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=10), json_values, max_size=8))
@settings(max_examples=150, deadline=None)
def test_canonical_json_ignores_key_order(value: dict[str, Any]) -> None:
    reordered = dict(reversed(list(value.items())))
    assert canonical_json(value) == canonical_json(reordered)
    assert digest(value) == digest(reordered)
    assert json.loads(canonical_json(value)) == value


def test_canonical_json_form() -> None:
    assert canonical_json({"b": 1, "a": [1.5, "é", None]}) == '{"a":[1.5,"é",null],"b":1}'.encode()
    for bad in (float("nan"), float("inf"), {"x": float("-inf")}, object(), "\ud800"):
        with pytest.raises(AuditError):
            canonical_json(bad)
    with pytest.raises(AuditError):
        digest({"amount": float("nan")})


def test_digest_does_not_depend_on_the_process() -> None:
    value = {"z": [1, {"y": "ü", "x": 2.5}], "a": None, "m": {"k": True}}
    script = (
        "import json,sys; from agentic_iam.core.provenance import digest; "
        "print(digest(json.loads(sys.argv[1])))"
    )
    shuffled = json.dumps(dict(reversed(list(value.items()))))
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script, shuffled],
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outputs == {digest(value)}


# --- redaction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "leaked"),
    [
        (f"token {JWT} end", JWT),
        ("Authorization: Bearer abc.DEF-123_x/y+z==", "abc.DEF-123_x/y+z=="),
        ("bearer\tsecret-value", "secret-value"),
        (
            "key sk-proj-abcdefghijklmnopqrstuvwxyz012345",
            "sk-proj-abcdefghijklmnopqrstuvwxyz012345",
        ),
        ("-----BEGIN PRIVATE KEY-----\nMIIBVQ\n-----END PRIVATE KEY-----", "MIIBVQ"),
        ("aws AKIAABCDEFGHIJKLMNOP", "AKIAABCDEFGHIJKLMNOP"),
    ],
)
def test_redact_secrets_removes_tokens(text: str, leaked: str) -> None:
    clean = redact_secrets(text)
    assert leaked not in clean
    assert "REDACTED" in clean


def test_redact_secrets_keeps_ordinary_text() -> None:
    text = "refund 100 USD for ticket T-1042 to alice@example.com; see https://x.test/a.b.c"
    assert redact_secrets(text) == text


# --- recorder --------------------------------------------------------------------------------


def test_recorder_stamps_time_and_sequence() -> None:
    sink = MemorySink()
    moment = datetime(2025, 5, 6, 7, 8, 9, 10, tzinfo=timezone.utc)
    recorder = Recorder([sink], clock=lambda: moment)
    events = [recorder.record("model.usage", usage={"input_tokens": i}) for i in range(3)]
    assert [e.sequence for e in sink.events] == [0, 1, 2]
    assert events[0].time == "2025-05-06T07:08:09.000010Z"
    with pytest.raises(AuditError, match="assigned by the recorder"):
        recorder.record("model.usage", sequence=9)
    with pytest.raises(AuditError, match="invalid audit event"):
        recorder.record("tool_call.decided", decision={"outcome": "perhaps"})
    assert len(sink.events) == 3  # an invalid event is not emitted and uses no number


def test_recorder_digests_arguments_and_stores_them_only_when_asked() -> None:
    arguments = {"amount": 50, "note": f"pay with Bearer {JWT}"}
    plain = Recorder([MemorySink()]).record("tool_call.decided", arguments=arguments)
    assert plain.arguments is None
    assert plain.arguments_digest == digest(arguments)

    upper = Recorder([MemorySink()], redactor=str.upper, record_arguments=True)
    kept = upper.record("tool_call.decided", arguments={"amount": 50, "to": "bob", "l": ["x"]})
    assert kept.arguments == {"amount": 50, "to": "BOB", "l": ["X"]}
    assert kept.arguments_digest == digest({"amount": 50, "to": "bob", "l": ["x"]})

    # The configured redactor may miss tokens; the built-in floor still removes them.
    leaky = Recorder([MemorySink()], redactor=lambda text: text, record_arguments=True)
    event = leaky.record("tool_call.decided", arguments=arguments, purpose=f"use {JWT}")
    assert JWT not in canonical_json(event.to_json_dict()).decode()


def test_recorder_redacts_before_truncating_reasoning() -> None:
    recorder = Recorder([MemorySink()], max_reasoning_chars=40)
    message = "x" * 30 + JWT  # truncating first would leave a JWT prefix behind
    event = recorder.record("tool_call.decided", reasoning={"message": message, "model": "m"})
    assert event.reasoning is not None
    assert event.reasoning.truncated is True
    assert event.reasoning.message is not None
    assert len(event.reasoning.message) == 40
    assert "eyJ" not in event.reasoning.message
    assert event.reasoning.model == "m"


def test_a_failing_redactor_drops_the_text(caplog: pytest.LogCaptureFixture) -> None:
    def broken(text: str) -> str:
        raise RuntimeError(f"cannot handle {text}")

    recorder = Recorder([MemorySink()], redactor=broken, record_arguments=True)
    event = recorder.record(
        "tool_call.decided", arguments={"secret": "hunter2"}, reasoning={"message": "hunter2"}
    )
    assert event.arguments == {"secret": "[REDACTION FAILED]"}
    assert event.reasoning is not None and event.reasoning.message == "[REDACTION FAILED]"
    assert "hunter2" not in caplog.text


def test_durable_sink_failure_raises_after_trying_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failing, memory = FailingSink(durable=True), MemorySink()
    recorder = Recorder([failing, memory])
    with pytest.raises(AuditError, match="durable audit sink failed") as raised:
        recorder.record("tool_call.decided", call_id="c1", decision={"outcome": "allow"})
    assert "FailingSink" in str(raised.value)
    assert JWT not in str(raised.value)
    assert failing.calls == 1
    assert [e.call_id for e in memory.events] == ["c1"]
    assert "FailingSink" in caplog.text
    assert JWT not in caplog.text
    with pytest.raises(AuditError, match="failed to flush"):
        recorder.flush()


def test_non_durable_failure_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="agentic_iam.audit")
    failing, memory = FailingSink(durable=False), MemorySink()
    recorder = Recorder([memory, failing])
    recorder.record("tool_call.decided", call_id="c1")
    recorder.record("tool_call.decided", call_id="c2")
    assert recorder.failures == 2
    assert [e.call_id for e in memory.events] == ["c1", "c2"]
    assert "FailingSink failed on tool_call.decided #1" in caplog.text
    assert JWT not in caplog.text
    assert recorder.durable is True


def test_sink_without_durable_flag_is_treated_as_durable() -> None:
    class Anonymous:
        def emit(self, event: AuditEvent) -> None:
            raise OSError("no")

        def flush(self) -> None: ...

        def close(self) -> None: ...

    with pytest.raises(AuditError):
        Recorder([Anonymous()]).record("model.usage")  # type: ignore[list-item]


def test_sinks_satisfy_the_protocol(tmp_path: Path) -> None:
    with JsonlSink(tmp_path / "a.jsonl") as jsonl:
        assert isinstance(jsonl, AuditSink)
        assert jsonl.durable is True
    assert isinstance(MemorySink(), AuditSink)


def test_recorder_is_thread_safe(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    memory = MemorySink()
    recorder = Recorder([JsonlSink(path, signer=make_signer()), memory])

    def work(worker: int) -> None:
        for i in range(50):
            recorder.record("tool_call.decided", call_id=f"{worker}-{i}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorder.close()
    assert [e.sequence for e in memory.events] == list(range(400))
    report = verify_log(path, public_keys={"audit-1": make_signer().public_key()})
    assert report.ok and report.count == 400 and report.head_count == 400


# --- JSONL sink ------------------------------------------------------------------------------


def test_jsonl_records_are_canonical_and_chained(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    recorder = Recorder([JsonlSink(path)])
    for i in range(3):
        recorder.record("tool_call.decided", call_id=f"c{i}", arguments={"n": i})
    recorder.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    prev = ZERO_HASH
    for index, line in enumerate(lines[:-1]):
        record = json.loads(line)
        assert canonical_json(record) == line
        assert record["sequence"] == index
        assert record["prev"] == prev
        without_hash = {k: v for k, v in record.items() if k != "hash"}
        assert record["hash"] == hashlib.sha256(canonical_json(without_hash)).hexdigest()
        assert "arguments" not in record and record["arguments_digest"] == digest({"n": index})
        prev = record["hash"]
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_jsonl_sequence_continues_across_sinks_and_recorders(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = Recorder([JsonlSink(path)])
    second = Recorder([JsonlSink(path)])
    first.record("model.usage", extra={"who": "first"})
    second.record("model.usage", extra={"who": "second"})
    first.record("model.usage", extra={"who": "first"})
    first.close()
    second.close()
    third = Recorder([JsonlSink(path)])
    third.record("model.usage", extra={"who": "third"})
    third.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["sequence"] for r in records] == [0, 1, 2, 3]
    assert [r["extra"]["who"] for r in records] == ["first", "second", "first", "third"]
    assert verify_log(path).ok


def test_signed_head_is_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    signer = make_signer()
    recorder = Recorder([JsonlSink(path, signer=signer)])
    recorder.record("model.usage")
    recorder.record("model.usage")
    recorder.close()
    head = json.loads((tmp_path / "audit.jsonl.head").read_text())
    assert set(head) == {"count", "head_hash", "kid", "sig"}
    assert head["count"] == 2 and head["kid"] == "audit-1"
    assert head["head_hash"] == json.loads(path.read_text().splitlines()[-1])["hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl", "audit.jsonl.head"]
    keys = public_keys_from_jwks({"keys": [signer.public_jwk()]})
    assert verify_log(path, public_keys=keys).head_signed


def test_buffered_mode_writes_on_flush_and_when_full(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path, durability="buffered", max_buffer=3, signer=make_signer())
    recorder = Recorder([sink])
    recorder.record("model.usage")
    recorder.record("model.usage")
    assert path.read_bytes() == b""
    recorder.record("model.usage")  # the third fills the buffer
    assert len(path.read_bytes().splitlines()) == 3
    recorder.record("model.usage")
    recorder.flush()
    assert len(path.read_bytes().splitlines()) == 4
    recorder.record("model.usage")
    recorder.close()
    report = verify_log(path, public_keys={"audit-1": make_signer().public_key()})
    assert report.ok and report.count == 5 and report.head_count == 5


def test_closed_sink_and_bad_options_raise(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "a.jsonl")
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(AuditError, match="closed"):
        Recorder([sink]).record("model.usage")
    with pytest.raises(AuditError, match="durability"):
        JsonlSink(tmp_path / "b.jsonl", durability="sometimes")  # type: ignore[arg-type]
    with pytest.raises(AuditError, match="cannot open"):
        JsonlSink(tmp_path / "missing-dir" / "c.jsonl")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_write_failure_raises_audit_error() -> None:
    sink = JsonlSink("/dev/full", file_mode=0o666)
    with pytest.raises(AuditError, match="cannot write"):
        Recorder([sink]).record("model.usage")


def test_torn_tail_is_refused_then_repaired_on_request(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    recorder = Recorder([JsonlSink(path)])
    for _ in range(3):
        recorder.record("model.usage")
    recorder.close()
    whole = path.read_bytes()
    torn = b'{"event_type":"tool_call.decided","hash":"ab'
    path.write_bytes(whole + torn)

    with pytest.raises(AuditIntegrityError, match="torn record at index 3") as raised:
        JsonlSink(path)
    assert raised.value.index == 3
    report = verify_log(path)
    assert (report.ok, report.problem, report.first_bad_index) == (False, "torn last line", 3)

    repaired = Recorder([JsonlSink(path, repair_torn_tail=True)])
    repaired.record("model.usage")
    repaired.close()
    assert (tmp_path / "audit.jsonl.torn").read_bytes() == torn + b"\n"
    report = verify_log(path)
    assert report.ok and report.count == 4


def test_sink_refuses_to_extend_a_bad_last_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    recorder = Recorder([JsonlSink(path)])
    recorder.record("model.usage", extra={"a": "1"})
    recorder.close()
    path.write_bytes(path.read_bytes().replace(b'"a":"1"', b'"a":"2"'))
    with pytest.raises(AuditIntegrityError, match="does not verify"):
        JsonlSink(path)


def test_public_keys_from_jwks_rejects_bad_documents() -> None:
    good = make_signer().public_jwk()
    assert set(public_keys_from_jwks({"keys": [{"kty": "RSA"}, good]})) == {"audit-1"}
    for bad in (
        {},
        {"keys": "x"},
        {"keys": [{"kty": "RSA"}]},
        {"keys": [{**good, "kid": ""}]},
        {"keys": [{**good, "x": "!!"}]},
        {"keys": [{**good, "x": "AAAA"}]},
    ):
        with pytest.raises(KeySetError):
            public_keys_from_jwks(bad)


def test_a_signed_sink_signs_the_log_when_it_opens_it(tmp_path: Path) -> None:
    # A writer killed after its first append must not leave a log without a head.
    path = tmp_path / "audit.jsonl"
    JsonlSink(path, signer=make_signer()).close()
    head = json.loads((tmp_path / "audit.jsonl.head").read_text())
    assert (head["count"], head["head_hash"]) == (0, ZERO_HASH)
    # Issue 13 item 3: a sink without the signer cannot keep that head current, so it refuses
    # the log instead of appending records the head does not cover (it used to append them).
    with pytest.raises(AuditIntegrityError, match="open it with its HeadSigner"):
        JsonlSink(path)
    report = verify_log(path, public_keys={"audit-1": make_signer().public_key()})
    assert report.intact and (report.count, report.head_count) == (0, 0)


def test_head_can_be_kept_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    path.parent.mkdir()
    head = tmp_path / "elsewhere.head"
    recorder = Recorder([JsonlSink(path, signer=make_signer(), head_path=head)])
    recorder.record("model.usage")
    recorder.close()
    assert not (tmp_path / "logs" / "audit.jsonl.head").exists()
    keys = {"audit-1": make_signer().public_key()}
    assert verify_log(path, public_keys=keys, head_path=head).head_count == 1
    assert verify_log(path, public_keys=keys).problem == "head missing"


def test_arguments_with_decimals_and_sets() -> None:
    from decimal import Decimal

    arguments = {"amount": Decimal("12.50"), "tags": {"b", "a"}, "pair": (1, 2)}
    expected = b'{"amount":{"$decimal":"12.50"},"pair":[1,2],"tags":["a","b"]}'
    assert digest(arguments) == hashlib.sha256(expected).hexdigest()
    event = Recorder([MemorySink()], record_arguments=True).record(
        "tool_call.decided", arguments=arguments
    )
    assert event.arguments == {"amount": {"$decimal": "12.50"}, "tags": ["a", "b"], "pair": [1, 2]}
    assert event.arguments_digest == hashlib.sha256(expected).hexdigest()
    given = Recorder([MemorySink()]).record(
        "tool_call.decided", arguments={"x": object()}, arguments_digest="b" * 64
    )
    assert given.arguments_digest == "b" * 64  # a digest the caller computed is kept
