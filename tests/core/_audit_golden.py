"""Events for the golden-log test: written once by the Recorder before its fast path existed
(``data/audit_golden.jsonl``), so a change that alters a single stored byte is noticed."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

GOLDEN_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
GOLDEN_START = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)

_IDENTITY: dict[str, Any] = {
    "execution_id": "exec_01HZX3M9Q2",
    "jti": "d04b7196cbfd477282dc75048e22ca4c",
    "issuer": "https://broker.example.com",
    "chain": [
        {"principal_type": "human", "id": "alice@example.com", "execution_id": None},
        {"principal_type": "agent", "id": "support-agent", "execution_id": "exec_01HZX3M9Q2"},
    ],
    "delegator": "alice@example.com",
    "agent_id": "support-agent",
    "purpose": "refund T-1042 (café, \u00e9t\u00e9, \U0001f600)",
}
_SESSION: dict[str, Any] = {
    "call_count": 1, "risk": 5, "risk_envelope": 100,
    "budget_remaining": {"cost": 49950, "llm_tokens": None, "tool_calls": 49},
    "labels": [], "tainted": False,
}
_DECISION: dict[str, Any] = {
    "outcome": "allow",
    "reasons": [{"code": "policy.permit", "message": "the delegated capability admits this call",
                 "policy_id": "baseline.permit-delegated"}],
    "policy_ids": ["baseline.permit-delegated"],
}


def golden_events() -> list[tuple[str, dict[str, Any]]]:
    """(event type, fields) in order; fresh dicts each time."""
    calls: list[tuple[str, dict[str, Any]]] = []
    for i, message in enumerate([
        None,
        "Refund 42.00 USD on T-1042.",
        "use key sk-proj-abcdefghijklmnopqrstuvwxyz012345 and password=hunter22 now",
        "line\nbreak \"quoted\" tab\t and \\ backslash \u2028 sep \x7f del",
    ]):
        digest = f"{i:064x}"
        reasoning = {"message": message, "model": "gpt-4.1", "run_id": f"run-{i}",
                     "parent_run_id": None, "response_id": None}
        calls.append(("tool_call.decided", {
            **_IDENTITY, "tool": "create_refund", "action": "refund:create",
            "call_id": f"call_{i}", "arguments_digest": digest,
            "arguments": {"amount": 50, "currency": "USD"},
            "session": dict(_SESSION, call_count=i + 1), "decision": _DECISION,
            "reasoning": reasoning, "framework": "langchain",
            "trace": {"trace_id": "0af7651916cd43dd8448eb211c80319c",
                      "span_id": "b7ad6b7169203331"},
        }))
        calls.append(("tool_call.completed", {
            **_IDENTITY, "tool": "create_refund", "action": "refund:create",
            "call_id": f"call_{i}", "arguments_digest": digest,
            "session": dict(_SESSION, call_count=i + 1, labels=["pii"], tainted=True),
            "reasoning": reasoning, "framework": None,
            "result": {"outcome": "success" if i % 2 else "error", "duration_ms": i * 7,
                       "output_digest": "ab" * 32, "output_labels": ["pii"],
                       "budget_settled": {"tool_calls": 1, "cost": 50, "llm_tokens": 0},
                       "error": None if i % 2 else "Bearer abcdefghijklmnop failed"},
        }))
    calls.append(("tool_call.decided", {
        **_IDENTITY, "tool": "send_email", "call_id": "call_x",
        "decision": {"outcome": "deny", "reasons": [
            {"code": "capability.denied", "message": "amount `5000` exceeds 100"}]},
        "extra": {"approval_id": "ap_1", "client_secret": "s3cr3t-value"},
    }))
    calls.append(("model.usage", {**_IDENTITY, "usage": {"input_tokens": 10, "output_tokens": 3},
                                  "reasoning": {"model": "gpt-4.1"}, "framework": "openai"}))
    calls.append(("execution.ended", {**_IDENTITY, "extra": {"reason": "completed"}}))
    calls.append(("delegation.minted", {
        **_IDENTITY, "capabilities": ["refund:create amount<=100", "ticket:read"],
        "parent_execution_id": "exec_parent", "agent_name": "Support Agent",
    }))
    return calls


def golden_clock() -> Any:
    """A clock that advances 1.5 ms per reading, from :data:`GOLDEN_START`."""
    state = {"now": GOLDEN_START}

    def clock() -> datetime:
        now = state["now"]
        state["now"] = now + timedelta(microseconds=1500)
        return now

    return clock
