"""Audit overhead: microseconds per event for each sink, through the Recorder.

Run ``python -m benchmarks.bench_audit``. The machine is shared and noisy: read the ratios between
rows (and against ``reference/perf-anchors.md``: fsync ~180 us, an SDK span 40-60 us), not the
absolute numbers. Every row includes the Recorder's own work (validation, digest, redaction).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentic_iam.core.provenance import HeadSigner, JsonlSink, MemorySink, OTelSink, Recorder

__all__ = ["run"]

# A typical decision event: about 1 KB once stored.
FIELDS: dict[str, Any] = {
    "execution_id": "exec_01HZX3M9Q2",
    "jti": "jti-4f1c2d9a7b",
    "issuer": "https://broker.example.com",
    "chain": [
        {"principal_type": "human", "id": "alice@example.com"},
        {"principal_type": "agent", "id": "support-agent", "execution_id": "exec_01HZX3M9Q2"},
    ],
    "delegator": "alice@example.com",
    "agent_id": "support-agent",
    "purpose": "refund T-1042",
    "tool": "create_refund",
    "action": "refund:create",
    "arguments": {"amount": 4200, "currency": "USD", "ticket_id": "T-1042"},
    "decision": {"outcome": "allow", "reasons": [], "policy_ids": ["refund-limit"]},
    "session": {
        "call_count": 3,
        "risk": 10,
        "risk_envelope": 50,
        "budget_remaining": {"tool_calls": 17, "cost": 5800, "llm_tokens": None},
        "labels": [],
        "tainted": False,
    },
    "reasoning": {
        "message": "The customer was double charged; I will refund 42.00 USD on ticket T-1042.",
        "model": "gpt-4.1",
        "run_id": "run-7",
    },
    "framework": "langchain",
}


def _per_event(batch: Callable[[], int], repeats: int) -> float:
    """Median over ``repeats`` batches of (batch time / events in the batch), in microseconds."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        events = batch()
        samples.append((time.perf_counter() - start) * 1e6 / events)
    return statistics.median(samples)


def _recorder_rows(directory: Path) -> list[tuple[str, float]]:
    signer = HeadSigner(Ed25519PrivateKey.generate(), "bench")
    rows: list[tuple[str, float]] = []
    configs: list[tuple[str, Callable[[Path], Any], int, int]] = [
        ("recorder + MemorySink (floor)", lambda p: MemorySink(), 200, 15),
        (
            "JsonlSink buffered (flush every 256)",
            lambda p: JsonlSink(p, durability="buffered"),
            256,
            15,
        ),
        ("JsonlSink flush (write per event)", lambda p: JsonlSink(p, durability="flush"), 100, 10),
        ("JsonlSink flush + signed head", lambda p: JsonlSink(p, signer=signer), 100, 10),
        (
            "JsonlSink fsync (fdatasync per event)",
            lambda p: JsonlSink(p, durability="fsync"),
            1,
            60,
        ),
        (
            "JsonlSink fsync + signed head",
            lambda p: JsonlSink(p, durability="fsync", signer=signer),
            1,
            40,
        ),
    ]
    for index, (label, make, per_batch, repeats) in enumerate(configs):
        sink = make(directory / f"bench-{index}.jsonl")
        recorder = Recorder([sink])

        def batch(recorder: Recorder = recorder, per_batch: int = per_batch) -> int:
            for i in range(per_batch):
                recorder.record("tool_call.decided", call_id=f"c{i}", **FIELDS)
            recorder.flush()
            return per_batch

        batch()  # warm up
        rows.append((label, _per_event(batch, repeats)))
        recorder.close()
    return rows


def _otel_row() -> tuple[str, float]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    recorder = Recorder([OTelSink(provider)])
    result = {"outcome": "success", "duration_ms": 1.0}

    def batch(per_batch: int = 100) -> int:
        for i in range(per_batch):
            recorder.record("tool_call.decided", call_id=f"c{i}", **FIELDS)
            recorder.record("tool_call.completed", call_id=f"c{i}", result=result, **FIELDS)
        exporter.clear()
        return per_batch

    batch()
    value = _per_event(batch, 15)
    provider.shutdown()
    return "OTelSink span per call (decided + completed)", value


def run() -> list[tuple[str, float]]:
    """(label, median microseconds per event) for each configuration."""
    with tempfile.TemporaryDirectory() as directory:
        rows = _recorder_rows(Path(directory))
    with contextlib.suppress(ImportError):  # the otel extra is optional
        rows.append(_otel_row())
    return rows


def main() -> None:
    rows = run()
    floor = rows[0][1]
    width = max(len(label) for label, _ in rows)
    print(f"{'configuration':<{width}}  {'us/event':>9}  {'x floor':>8}")
    for label, micros in rows:
        print(f"{label:<{width}}  {micros:>9.1f}  {micros / floor:>8.1f}")


if __name__ == "__main__":
    main()
