"""``aiam audit``: verify, show, tree and export, through typer's CliRunner."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from agentic_iam.cli_audit import audit_app
from agentic_iam.core.provenance import HeadSigner, JsonlSink, Recorder

from .test_provenance_export import run_events
from .test_provenance_verify import (
    delete_record,
    modify_and_rehash,
    modify_field,
    swap_records,
    torn_tail,
    truncate_tail,
)

runner = CliRunner()
SIGNER = HeadSigner(Ed25519PrivateKey.from_private_bytes(bytes([5]) * 32), "audit-cli")
WIDE = {"COLUMNS": "220", "NO_COLOR": "1", "TERM": "dumb"}


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(audit_app, list(args), env=WIDE)
    return result.exit_code, result.output


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    recorder = Recorder([JsonlSink(path, signer=SIGNER)])
    run_events(recorder)
    for i in range(4):
        recorder.record(
            "tool_call.decided",
            execution_id="exec_other",
            agent_id="billing",
            delegator="bob@example.com",
            tool="charge",
            call_id=f"x{i}",
            decision={"outcome": "allow"},
        )
    recorder.close()
    return path


@pytest.fixture
def jwks(tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [SIGNER.public_jwk()]}))
    return path


def test_verify_intact(log: Path, jwks: Path) -> None:
    code, output = invoke("verify", str(log), "--jwks", str(jwks))
    assert code == 0
    assert output.startswith("intact: 12 records")
    assert "signed head covers 12" in output
    # Issue 13 item 4: without a key the head's signature is not checked, so the log is not
    # proved intact (this printed "intact" with exit 0 before).
    code, output = invoke("verify", str(log))
    assert code == 3 and output.startswith("not verified: 12 records")
    assert "intact" not in output and "pass --jwks" in output


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (modify_field, "record 3: modified"),
        (modify_and_rehash, "record 3: modified"),
        (delete_record, "record 3: deleted"),
        (swap_records, "record 3: reordered"),
        (truncate_tail, "record 10: truncated (head says 12 records)"),
        (torn_tail, "record 12: torn last line"),
    ],
)
def test_verify_reports_the_first_bad_record(
    log: Path, jwks: Path, tamper: Callable[[Path], None], expected: str
) -> None:
    tamper(log)
    code, output = invoke("verify", str(log), "--jwks", str(jwks))
    assert code == 1
    assert output.startswith(expected), output


def test_verify_with_the_wrong_key(log: Path, tmp_path: Path) -> None:
    other = HeadSigner(Ed25519PrivateKey.from_private_bytes(bytes([6]) * 32), "audit-cli")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"keys": [other.public_jwk()]}))
    code, output = invoke("verify", str(log), "--jwks", str(wrong))
    assert code == 1 and output.startswith("log: head signature invalid")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing-log", "does not exist"),
        ("missing-jwks", "JWKS file"),
        ("bad-jwks", "not valid JSON"),
        ("empty-jwks", "no OKP/Ed25519 key"),
    ],
)
def test_wrong_input_is_one_error_line(log: Path, tmp_path: Path, setup: str, message: str) -> None:
    jwks = tmp_path / "k.json"
    target = str(log)
    if setup == "missing-log":
        target = str(tmp_path / "nope.jsonl")
    elif setup == "bad-jwks":
        jwks.write_text("{not json")
    elif setup == "empty-jwks":
        jwks.write_text(json.dumps({"keys": []}))
    result = runner.invoke(audit_app, ["verify", target, "--jwks", str(jwks)], env=WIDE)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_show_filters_and_json(log: Path) -> None:
    code, output = invoke("show", str(log))
    assert code == 0
    assert "12 events" in output and "exec_child" in output and "capability.constraint" in output

    code, output = invoke("show", str(log), "--agent", "billing", "--json")
    assert code == 0
    records = [json.loads(line) for line in output.splitlines()]
    assert [r["call_id"] for r in records] == ["x0", "x1", "x2", "x3"]

    code, output = invoke("show", str(log), "--decision", "deny", "--json")
    assert [json.loads(line)["call_id"] for line in output.splitlines()] == ["c2"]

    code, output = invoke("show", str(log), "--execution", "exec_root", "--json")
    assert {json.loads(line)["execution_id"] for line in output.splitlines()} == {"exec_root"}
    assert len(output.splitlines()) == 3

    code, output = invoke("show", str(log), "--user", "bob@example.com", "--json")
    assert len(output.splitlines()) == 4

    code, output = invoke("show", str(log), "--decision", "maybe")
    assert code == 2


def test_show_warns_about_bad_records(log: Path) -> None:
    log.write_bytes(log.read_bytes() + b"garbage\n")
    result = runner.invoke(audit_app, ["show", str(log), "--json"], env=WIDE)
    assert result.exit_code == 0
    assert "warning: record 12: not a valid audit event; skipped" in result.stderr
    assert len(result.stdout.splitlines()) == 12


def test_tree(log: Path) -> None:
    code, output = invoke("tree", str(log), "--execution", "exec_child")
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].startswith("exec_root  agent triage  delegated by alice@example.com")
    assert "capabilities: ticket:read, refund:create amount<=100" in output
    assert "call read_ticket (ticket:read) → allow → success" in output
    assert "call create_refund (refund:create) → deny [capability.constraint]" in output
    assert any("exec_child  agent refunder" in line and "◀" in line for line in lines)
    assert any("exec_grandchild  agent auditor" in line and "REVOKED" in line for line in lines)
    assert "exec_other" not in output and "exec_unrelated" not in output
    # children are indented under their parent
    child_line = next(i for i, line in enumerate(lines) if "exec_child" in line)
    grandchild_line = next(i for i, line in enumerate(lines) if "exec_grandchild" in line)
    assert lines[grandchild_line].index("exec_grandchild") > lines[child_line].index("exec_child")

    code, output = invoke("tree", str(log), "--execution", "exec_missing")
    assert code == 1 and "no events for execution `exec_missing`" in output


def test_export_ocsf(log: Path, tmp_path: Path, jwks: Path) -> None:
    code, output = invoke("export", str(log), "--format", "ocsf", "--jwks", str(jwks))
    assert code == 0
    records = [json.loads(line) for line in output.splitlines()]
    assert len(records) == 12
    assert [r["class_uid"] for r in records[:3]] == [3003, 6003, 6003]
    assert all(r["metadata"]["version"] == "1.3.0" for r in records)

    target = tmp_path / "out.jsonl"
    result = runner.invoke(
        audit_app,
        ["export", str(log), "--format", "ocsf", "--output", str(target), "--jwks", str(jwks)],
        env=WIDE,
    )
    assert result.exit_code == 0
    assert "wrote 12 ocsf records" in result.stderr
    assert [json.loads(line) for line in target.read_text().splitlines()] == records

    code, _ = invoke("export", str(log), "--format", "cef", "--jwks", str(jwks))
    assert code == 2
