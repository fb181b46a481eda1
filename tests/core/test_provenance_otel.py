"""OTelSink: GenAI-convention spans per tool call; no raw token reaches any sink or log."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from agentic_iam.core.provenance import JsonlSink, MemorySink, OTelSink, Recorder
from agentic_iam.errors import AuditError

ROOT = Path(__file__).parents[2]
JWT = (
    "eyJhbGciOiJFZERTQSIsInR5cCI6ImFpYW0tZXhlYytqd3QifQ"
    ".eyJzdWIiOiJleGVjXzEyMyIsImp0aSI6ImFiYyJ9"
    ".c2lnbmF0dXJlLWJ5dGVzLWhlcmUtMDEyMzQ1Njc4OQ"
)
JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
BEARER_SECRET = "opaque-bearer-secret-42"

IDENTITY: dict[str, Any] = {
    "execution_id": "exec_1",
    "jti": "jti-1",
    "issuer": "https://broker.test",
    "delegator": "alice@example.com",
    "agent_id": "support-agent",
    "purpose": "refund T-1042",
    "chain": [
        {"principal_type": "human", "id": "alice@example.com"},
        {"principal_type": "agent", "id": "support-agent", "execution_id": "exec_1"},
    ],
}
SESSION = {
    "call_count": 2,
    "risk": 15,
    "risk_envelope": 50,
    "budget_remaining": {"tool_calls": 18, "cost": 9750, "llm_tokens": None},
    "labels": ["untrusted"],
    "tainted": True,
}


@pytest.fixture
def exporter() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield provider, memory
    provider.shutdown()


def by_name(spans: tuple[ReadableSpan, ...], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


def test_one_execute_tool_span_per_call(
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, memory = exporter
    sink = OTelSink(provider)
    recorder = Recorder([MemorySink(), sink])
    common = {**IDENTITY, "tool": "create_refund", "action": "refund:create", "session": SESSION}
    decided = recorder.record(
        "tool_call.decided",
        call_id="call_1",
        decision={"outcome": "allow", "reasons": [], "policy_ids": ["refund-limit"]},
        reasoning={"message": "refund it", "model": "gpt-x", "run_id": "r1"},
        **common,
    )
    assert not memory.get_finished_spans()  # the span stays open while the tool runs
    assert sink.open_spans == 1
    completed = recorder.record(
        "tool_call.completed",
        call_id="call_1",
        result={"outcome": "success", "duration_ms": 3.0, "budget_settled": {"cost": 250}},
        **common,
    )
    recorder.record(
        "tool_call.decided",
        call_id="call_2",
        decision={
            "outcome": "deny",
            "reasons": [{"code": "capability.constraint", "message": "amount > 100"}],
            "policy_ids": [],
        },
        **common,
    )
    spans = memory.get_finished_spans()
    assert [s.name for s in spans] == ["execute_tool create_refund"] * 2
    allowed, denied = spans
    attrs = dict(allowed.attributes or {})
    assert attrs["gen_ai.operation.name"] == "execute_tool"
    assert attrs["gen_ai.tool.name"] == "create_refund"
    assert attrs["gen_ai.tool.call.id"] == "call_1"
    assert attrs["gen_ai.agent.id"] == "support-agent"
    assert attrs["gen_ai.agent.name"] == "support-agent"
    assert attrs["gen_ai.request.model"] == "gpt-x"
    assert attrs["aiam.execution.id"] == "exec_1"
    assert attrs["aiam.jti"] == "jti-1"
    assert attrs["aiam.delegator"] == "alice@example.com"
    assert attrs["aiam.chain"] == ("human:alice@example.com", "agent:support-agent")
    assert attrs["aiam.purpose"] == "refund T-1042"
    assert attrs["aiam.action"] == "refund:create"
    assert attrs["aiam.decision.outcome"] == "allow"
    assert attrs["aiam.decision.policy_ids"] == ("refund-limit",)
    assert attrs["aiam.session.risk"] == 15
    assert attrs["aiam.session.call_count"] == 2
    assert attrs["aiam.session.labels"] == ("untrusted",)
    assert attrs["aiam.budget.remaining.tool_calls"] == 18
    assert attrs["aiam.budget.remaining.cost"] == 9750
    assert "aiam.budget.remaining.llm_tokens" not in attrs  # unlimited: no value to export
    assert attrs["aiam.result.outcome"] == "success"
    assert "aiam.reasoning.message" not in attrs  # content is opt-in
    assert allowed.start_time == decided.time_ns
    assert allowed.end_time == completed.time_ns
    assert allowed.status.status_code == StatusCode.UNSET

    denied_attrs = dict(denied.attributes or {})
    assert denied_attrs["aiam.decision.outcome"] == "deny"
    assert denied_attrs["aiam.decision.reasons"] == ("capability.constraint",)
    assert denied.status.status_code == StatusCode.ERROR
    assert denied.start_time == denied.end_time
    assert sink.open_spans == 0 and sink.failures == 0


def test_span_links_to_the_framework_trace(
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, memory = exporter
    recorder = Recorder([OTelSink(provider)])
    trace_id, span_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    recorder.record(
        "tool_call.decided",
        tool="t",
        call_id="c",
        decision={"outcome": "deny"},
        trace={"trace_id": trace_id, "span_id": span_id},
    )
    recorder.record(
        "tool_call.decided",
        tool="t",
        call_id="d",
        decision={"outcome": "deny"},
        trace={"trace_id": "trace_abc", "span_id": "span_def"},  # not OTel ids: kept, no parent
    )
    linked, other = memory.get_finished_spans()
    assert linked.context is not None and linked.parent is not None
    assert linked.context.trace_id == int(trace_id, 16)
    assert linked.parent.span_id == int(span_id, 16)
    assert other.parent is None
    assert dict(other.attributes or {})["aiam.trace.trace_id"] == "trace_abc"


def test_completion_without_open_span_and_other_events(
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, memory = exporter
    sink = OTelSink(provider)
    recorder = Recorder([sink])
    recorder.record("delegation.minted", capabilities=["refund:create"], **IDENTITY)
    recorder.record(
        "tool_call.decided", tool="t", call_id="c9", decision={"outcome": "approval_required"}
    )
    recorder.record("approval.granted", tool="t", call_id="c9", extra={"approver": "bob"})
    done = recorder.record(
        "tool_call.completed",
        tool="t",
        call_id="c9",
        result={"outcome": "error", "duration_ms": 2.0, "error": "timeout"},
    )
    recorder.record(
        "model.usage", usage={"input_tokens": 7, "output_tokens": 3}, reasoning={"model": "m"}
    )
    spans = memory.get_finished_spans()
    names = [s.name for s in spans]
    assert names == [
        "aiam.delegation",
        "execute_tool t",
        "aiam.approval",
        "execute_tool t",
        "aiam.model_usage",
    ]
    delegation = spans[0]
    assert [e.name for e in delegation.events] == ["delegation.minted"]
    assert dict(delegation.attributes or {})["aiam.capabilities"] == ("refund:create",)
    approval_required = spans[1]
    assert approval_required.status.status_code == StatusCode.UNSET
    late = spans[3]  # the completion found no open span: one is made for its duration
    assert late.end_time == done.time_ns
    assert late.start_time == done.time_ns - 2_000_000
    assert late.status.status_code == StatusCode.ERROR
    usage = dict(spans[4].attributes or {})
    assert (usage["gen_ai.usage.input_tokens"], usage["gen_ai.usage.output_tokens"]) == (7, 3)


def test_otel_failures_are_counted_logged_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agentic_iam.audit")

    class BrokenTracer:
        def start_span(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"collector rejected Bearer {BEARER_SECRET}")

    class BrokenProvider:
        def get_tracer(self, *args: Any, **kwargs: Any) -> BrokenTracer:
            return BrokenTracer()

    sink = OTelSink(BrokenProvider())  # type: ignore[arg-type]
    path = tmp_path / "audit.jsonl"
    recorder = Recorder([JsonlSink(path), sink])
    recorder.record("tool_call.decided", tool="t", call_id="c", decision={"outcome": "allow"})
    assert sink.failures == 1
    assert len(path.read_text().splitlines()) == 1  # the local record is kept
    assert "otel audit sink failed on tool_call.decided" in caplog.text
    assert BEARER_SECRET not in caplog.text


def test_no_raw_token_lands_in_any_sink_or_log(
    tmp_path: Path,
    exporter: tuple[TracerProvider, InMemorySpanExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    provider, memory = exporter
    path = tmp_path / "audit.jsonl"
    leaky = Recorder(
        [JsonlSink(path), OTelSink(provider, record_reasoning=True), MemorySink()],
        redactor=lambda text: text,  # a configured redactor that catches nothing
        record_arguments=True,
    )
    for call in ("a", "b"):
        leaky.record(
            "tool_call.decided",
            tool="http_get",
            call_id=call,
            purpose=f"fetch with {JWT}",
            arguments={
                "url": "https://api.test",
                "headers": {"Authorization": f"Bearer {BEARER_SECRET}"},
                "token": JWT,
                JWT: "a token as a key",
            },
            reasoning={"message": f"I will call it with Bearer {JWT} and {JWT}"},
            decision={"outcome": "allow", "reasons": [{"code": "ok", "message": JWT}]},
            extra={"note": JWT},
        )
        leaky.record(
            "tool_call.completed",
            tool="http_get",
            call_id=call,
            result={"outcome": "error", "error": f"401 for Bearer {BEARER_SECRET}"},
        )
    leaky.close()
    # A failing durable sink must not leak either (its error text is logged and raised).
    failing = Recorder([_LeakyFailingSink()])
    with pytest.raises(AuditError) as raised:
        failing.record("tool_call.decided", purpose=JWT)

    written = path.read_text(encoding="utf-8")
    span_text = repr(
        [
            (dict(s.attributes or {}), [dict(e.attributes or {}) for e in s.events], s.status)
            for s in memory.get_finished_spans()
        ]
    )
    assert len(written.splitlines()) == 4 and len(memory.get_finished_spans()) == 2
    # One rule set with the firewall (issue 13 item 11): kinds are named the same way.
    assert "[REDACTED:jwt]" in written and "Bearer [REDACTED:bearer_token]" in written
    for text in (written, span_text, caplog.text, str(raised.value)):
        assert not JWT_RE.search(text)
        assert BEARER_SECRET not in text


class _LeakyFailingSink:
    durable = True

    def emit(self, event: Any) -> None:
        raise OSError(f"cannot store {JWT} for Bearer {BEARER_SECRET}")

    def flush(self) -> None: ...

    def close(self) -> None: ...


def test_provenance_imports_without_opentelemetry() -> None:
    script = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
from agentic_iam.core.provenance import MemorySink, OTelSink, Recorder
from agentic_iam.errors import MissingExtraError
Recorder([MemorySink()]).record("model.usage")
try:
    OTelSink()
except MissingExtraError as exc:
    print("missing:", exc)
assert not any(m.startswith("opentelemetry") for m in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert 'pip install "agentic-iam[otel]"' in result.stdout
