"""Reading logs back: read_events, the delegation tree of a run, and the OCSF mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agentic_iam.core.audit_export import OCSF_VERSION, delegation_tree, read_events, to_ocsf
from agentic_iam.core.provenance import AuditEvent, JsonlSink, MemorySink, Recorder
from agentic_iam.errors import AuditIntegrityError

ALICE = {"principal_type": "human", "id": "alice@example.com"}


def hop(agent: str, execution: str) -> dict[str, Any]:
    return {"principal_type": "agent", "id": agent, "execution_id": execution}


def run_events(recorder: Recorder) -> None:
    """A run: alice → triage (exec_root) → refunder (exec_child) → auditor (exec_grandchild)."""
    recorder.record(
        "delegation.minted",
        execution_id="exec_root",
        jti="j0",
        delegator="alice@example.com",
        agent_id="triage",
        purpose="refund T-1042",
        chain=[ALICE, hop("triage", "exec_root")],
        capabilities=["ticket:read", "refund:create amount<=100"],
    )
    recorder.record(
        "tool_call.decided",
        execution_id="exec_root",
        agent_id="triage",
        tool="read_ticket",
        action="ticket:read",
        call_id="c1",
        decision={"outcome": "allow"},
    )
    recorder.record(
        "tool_call.completed",
        execution_id="exec_root",
        agent_id="triage",
        tool="read_ticket",
        action="ticket:read",
        call_id="c1",
        result={"outcome": "success"},
    )
    recorder.record(
        "delegation.subdelegated",
        execution_id="exec_child",
        jti="j1",
        delegator="alice@example.com",
        agent_id="refunder",
        chain=[ALICE, hop("triage", "exec_root"), hop("refunder", "exec_child")],
        capabilities=["refund:create amount<=50"],
    )
    recorder.record(
        "tool_call.decided",
        execution_id="exec_child",
        agent_id="refunder",
        tool="create_refund",
        action="refund:create",
        call_id="c2",
        decision={"outcome": "deny", "reasons": [{"code": "capability.constraint"}]},
        delegator="alice@example.com",
    )
    recorder.record(
        "delegation.subdelegated",
        execution_id="exec_grandchild",
        parent_execution_id="exec_child",
        agent_id="auditor",
        capabilities=["ticket:read"],
    )
    recorder.record("delegation.revoked", execution_id="exec_grandchild", jti="j2")
    recorder.record("delegation.minted", execution_id="exec_unrelated", agent_id="other")


def test_delegation_tree_from_any_execution_of_the_run() -> None:
    sink = MemorySink()
    run_events(Recorder([sink]))
    for start in ("exec_root", "exec_child", "exec_grandchild"):
        root = delegation_tree(sink.events, start)
        assert root is not None
        assert root.execution_id == "exec_root"
        assert root.agent_id == "triage" and root.delegator == "alice@example.com"
        assert root.capabilities == ("ticket:read", "refund:create amount<=100")
        assert [(c.tool, c.decision, c.result) for c in root.calls] == [
            ("read_ticket", "allow", "success")
        ]
        (child,) = root.children
        assert child.execution_id == "exec_child" and child.how == "delegation.subdelegated"
        assert [(c.tool, c.decision, c.reasons) for c in child.calls] == [
            ("create_refund", "deny", ("capability.constraint",))
        ]
        (grandchild,) = child.children
        assert grandchild.execution_id == "exec_grandchild" and grandchild.revoked
        assert grandchild.children == ()
    assert delegation_tree(sink.events, "exec_nowhere") is None


def test_delegation_tree_survives_a_forged_cycle() -> None:
    sink = MemorySink()
    recorder = Recorder([sink])
    recorder.record("delegation.minted", execution_id="a", parent_execution_id="b")
    recorder.record("delegation.minted", execution_id="b", parent_execution_id="a")
    root = delegation_tree(sink.events, "a")
    assert root is not None and root.execution_id in {"a", "b"}


def test_read_events_names_the_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    recorder = Recorder([JsonlSink(path)])
    recorder.record("model.usage")
    recorder.record("model.usage")
    recorder.close()
    assert [e.sequence for e in read_events(path)] == [0, 1]
    path.write_bytes(path.read_bytes() + b'{"x":1}\n{"torn')
    with pytest.raises(AuditIntegrityError, match="record 2") as raised:
        list(read_events(path))
    assert raised.value.index == 2
    skipped: list[tuple[int, str]] = []
    events = list(read_events(path, on_invalid=lambda i, p: skipped.append((i, p))))
    assert len(events) == 2
    assert skipped == [(2, "not a valid audit event"), (3, "torn last line")]


def one(event_type: str, **fields: Any) -> AuditEvent:
    sink = MemorySink()
    Recorder([sink]).record(event_type, **fields)  # type: ignore[arg-type]
    return sink.events[0]


def test_ocsf_api_activity_for_tool_calls() -> None:
    event = one(
        "tool_call.decided",
        execution_id="exec_1",
        issuer="https://broker.test",
        delegator="alice@example.com",
        agent_id="support-agent",
        tool="create_refund",
        action="refund:create",
        call_id="c1",
        framework="langchain",
        decision={
            "outcome": "deny",
            "reasons": [{"code": "policy.forbid", "message": "no", "policy_id": "p9"}],
            "policy_ids": ["p9"],
        },
    )
    record = to_ocsf(event)
    assert record["class_uid"] == 6003 and record["category_uid"] == 6
    assert record["activity_id"] == 1 and record["type_uid"] == 600301
    assert (record["status_id"], record["severity_id"]) == (2, 3)
    assert record["status_detail"] == "policy.forbid"
    assert record["time"] == event.time_ns // 1_000_000
    assert record["actor"]["user"]["uid"] == "alice@example.com"
    assert record["actor"]["app_name"] == "support-agent"
    assert record["actor"]["session"] == {"uid": "exec_1", "issuer": "https://broker.test"}
    assert record["actor"]["authorizations"] == [{"decision": "deny", "policy": {"uid": "p9"}}]
    assert record["api"]["operation"] == "refund:create"
    assert record["api"]["service"] == {"name": "create_refund"}
    assert record["api"]["request"] == {"uid": "c1"}
    assert record["resources"] == [
        {"name": "create_refund", "type": "tool", "uid": "refund:create"}
    ]
    assert record["src_endpoint"] == {"svc_name": "langchain"}
    assert record["metadata"]["version"] == OCSF_VERSION == "1.3.0"
    assert record["metadata"]["product"]["name"] == "agentic-iam"
    assert record["metadata"]["product"]["vendor_name"] == "agentic-iam"
    assert record["metadata"]["correlation_uid"] == "c1"
    assert record["unmapped"]["aiam"] == event.to_json_dict()


@pytest.mark.parametrize(
    ("event_type", "fields", "expected"),
    [
        (
            "tool_call.decided",
            {"action": "ticket:read", "decision": {"outcome": "allow"}},
            (6003, 2, 1, 1),
        ),
        (
            "tool_call.decided",
            {"action": "x:frobnicate", "decision": {"outcome": "approval_required"}},
            (6003, 99, 99, 2),
        ),
        (
            "tool_call.completed",
            {"action": "db:delete", "result": {"outcome": "success"}},
            (6003, 4, 1, 1),
        ),
        (
            "tool_call.completed",
            {"action": "db:update", "result": {"outcome": "blocked"}},
            (6003, 3, 2, 3),
        ),
        ("approval.denied", {}, (6003, 99, 2, 2)),
        ("model.usage", {"usage": {"input_tokens": 1}}, (6003, 99, 1, 1)),
        ("delegation.minted", {"capabilities": ["a:b"], "jti": "j"}, (3003, 1, 1, 1)),
        ("delegation.subdelegated", {}, (3003, 1, 1, 1)),
        ("delegation.revoked", {}, (3001, 5, 1, 2)),
    ],
)
def test_ocsf_classes_and_status(
    event_type: str, fields: dict[str, Any], expected: tuple[int, int, int, int]
) -> None:
    record = to_ocsf(one(event_type, execution_id="exec_1", agent_id="a", **fields))
    got = (record["class_uid"], record["activity_id"], record["status_id"], record["severity_id"])
    assert got == expected
    assert record["type_uid"] == record["class_uid"] * 100 + record["activity_id"]
    if record["class_uid"] == 3003:
        assert record["user"] == {"uid": "exec_1", "name": "a"}
        assert record["privileges"] == list(fields.get("capabilities", []))
