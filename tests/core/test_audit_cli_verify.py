"""Issue 13 item 4: ``aiam audit verify`` says "intact" only when it can prove it.

Exit codes: 0 intact, 1 a check failed, 2 wrong input, 3 nothing wrong found but not proved.
``aiam audit export`` verifies first and carries each record's hash.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from agentic_iam.cli_audit import JWKS_ENV, audit_app
from agentic_iam.core.provenance import HeadSigner, JsonlSink, Recorder

from .test_provenance_verify import append_forged, lines, modify_field, truncate_tail

runner = CliRunner()
SIGNER = HeadSigner(Ed25519PrivateKey.from_private_bytes(bytes([5]) * 32), "audit-cli")
OTHER_KID = HeadSigner(Ed25519PrivateKey.from_private_bytes(bytes([6]) * 32), "someone-else")
BASE_ENV = {"COLUMNS": "220", "NO_COLOR": "1", "TERM": "dumb"}


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = runner.invoke(audit_app, list(args), env={**BASE_ENV, JWKS_ENV: "", **(env or {})})
    return result.exit_code, result.stdout, result.stderr


def write(path: Path, *, signed: bool = True, count: int = 5) -> Path:
    recorder = Recorder([JsonlSink(path, signer=SIGNER if signed else None)])
    for i in range(count):
        recorder.record("tool_call.decided", tool="charge", call_id=f"c{i}",
                        decision={"outcome": "allow"})
    recorder.close()
    return path


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return write(tmp_path / "audit.jsonl")


@pytest.fixture
def jwks(tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [SIGNER.public_jwk()]}))
    return path


@pytest.fixture
def jwks_url(jwks: Path) -> Iterator[str]:
    body = jwks.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/.well-known/jwks.json":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    finally:
        server.shutdown()
        server.server_close()


def test_intact_only_with_a_checked_signature(log: Path, jwks: Path) -> None:
    code, out, _ = invoke("verify", str(log), "--jwks", str(jwks))
    assert code == 0
    assert out.splitlines()[0] == ("intact: 5 records (hash chain verified; signed head "
                                   "covers 5, kid `audit-cli`)")
    assert "verified: the head's signature (kid `audit-cli`" in out
    assert "not verified" not in out


def test_the_key_comes_from_the_environment_or_a_url(
    log: Path, jwks: Path, jwks_url: str
) -> None:
    code, out, _ = invoke("verify", str(log), env={JWKS_ENV: str(jwks)})
    assert code == 0 and out.startswith("intact: 5 records")
    code, out, _ = invoke("verify", str(log), "--jwks", jwks_url)
    assert code == 0 and out.startswith("intact: 5 records"), out
    code, out, _ = invoke("verify", str(log), env={JWKS_ENV: jwks_url})
    assert code == 0 and jwks_url in out


def test_without_a_key_it_says_what_was_and_was_not_verified(log: Path) -> None:
    code, out, _ = invoke("verify", str(log))
    assert code == 3
    assert out.splitlines()[0] == "not verified: 5 records, the head's signature was not checked"
    assert "verified: the hash chain of all 5 records" in out
    assert "verified: the head's count (5) and hash match record 4" in out
    assert "not verified: the head's signature: no key" in out
    assert "intact" not in out


def test_a_key_that_is_not_in_the_jwks_proves_nothing(log: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"keys": [OTHER_KID.public_jwk()]}))
    code, out, _ = invoke("verify", str(log), "--jwks", str(other))
    assert code == 3
    assert "kid `audit-cli` is not in the JWKS" in out
    assert "verified: the hash chain of all 5 records" in out


def test_a_missing_head_is_not_intact_unless_the_log_is_unsigned_by_design(
    tmp_path: Path, jwks: Path
) -> None:
    plain = write(tmp_path / "plain.jsonl", signed=False)
    for extra in ((), ("--jwks", str(jwks))):
        code, out, _ = invoke("verify", str(plain), *extra)
        assert code == 3, out
        assert "no signed head" in out and "--unsigned" in out
    code, out, _ = invoke("verify", str(plain), "--unsigned")
    assert code == 0 and out.startswith("intact (unsigned): 5 records")
    assert "cannot be detected" in out
    # --unsigned accepts no head; it does not excuse a broken chain.
    modify_field_at(plain, 2)
    code, out, _ = invoke("verify", str(plain), "--unsigned")
    assert code == 1 and out.startswith("record 2: modified")


def modify_field_at(path: Path, index: int) -> None:
    rows = lines(path)
    rows[index] = rows[index].replace(b'"time":"2', b'"time":"1', 1)
    path.write_bytes(b"".join(rows))


def test_records_after_the_head_are_not_intact(log: Path, jwks: Path) -> None:
    append_forged(log, 2)
    code, out, _ = invoke("verify", str(log), "--jwks", str(jwks))
    assert code == 3
    assert out.splitlines()[0] == "not verified: 7 records, records after the signed head"
    assert "not verified: 2 record(s) after the signed head" in out
    assert "verified: the head's signature" in out


def test_a_failed_check_is_exit_1(log: Path, jwks: Path) -> None:
    truncate_tail(log)
    code, out, _ = invoke("verify", str(log), "--jwks", str(jwks))
    assert code == 1 and out.startswith("record 3: truncated (head says 5 records)")
    code, out, _ = invoke("verify", str(log))  # found without a key too: the head's count
    assert code == 1 and "truncated" in out


@pytest.mark.parametrize("url", [
    "https://127.0.0.1:1/jwks.json",           # nothing listens
    "http://jwks.example.invalid/jwks.json",   # plain http to another host
])
def test_a_jwks_url_that_cannot_be_used_is_wrong_input(log: Path, url: str) -> None:
    code, _, err = invoke("verify", str(log), "--jwks", url)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


# --- export ----------------------------------------------------------------------------------


def test_export_verifies_first_and_refuses_a_broken_log(log: Path, jwks: Path) -> None:
    modify_field(log_with(log, 8))
    code, out, err = invoke("export", str(log), "--jwks", str(jwks))
    assert code == 1 and out == ""
    assert err.startswith("refusing to export") and "--allow-unverified" in err


def log_with(path: Path, count: int) -> Path:
    """The log, grown to ``count`` records (modify_field changes record 3)."""
    recorder = Recorder([JsonlSink(path, signer=SIGNER)])
    for i in range(count - len(lines(path))):
        recorder.record("model.usage", usage={"input_tokens": i})
    recorder.close()
    return path


def test_export_refuses_a_log_it_cannot_prove(log: Path) -> None:
    code, out, err = invoke("export", str(log))
    assert code == 3 and out == "" and "no key" in err


def test_export_lines_carry_the_record_hash(log: Path, jwks: Path) -> None:
    code, out, _ = invoke("export", str(log), "--jwks", str(jwks))
    assert code == 0
    exported = [json.loads(line) for line in out.splitlines()]
    stored = [json.loads(line) for line in lines(log)]
    assert [r["metadata"]["uid"] for r in exported] == [s["hash"] for s in stored]
    assert [r["unmapped"]["aiam_chain"] for r in exported] == [
        {"sequence": s["sequence"], "prev": s["prev"], "hash": s["hash"]} for s in stored
    ]
    assert all(r["unmapped"]["aiam_integrity"] == {"verified": True, "log_status": "intact"}
               for r in exported)


def test_export_anyway_marks_what_is_not_verified(log: Path, jwks: Path) -> None:
    append_forged(log, 2)
    code, out, _ = invoke("export", str(log), "--jwks", str(jwks), "--allow-unverified")
    assert code == 0
    marks = [json.loads(line)["unmapped"]["aiam_integrity"] for line in out.splitlines()]
    assert [m["verified"] for m in marks] == [True] * 5 + [False] * 2
    assert {m["log_status"] for m in marks} == {
        "not verified: 7 records, records after the signed head"}

    truncate_tail(log)
    truncate_tail(log)
    code, out, _ = invoke("export", str(log), "--jwks", str(jwks), "--allow-unverified")
    assert code == 0
    marks = [json.loads(line)["unmapped"]["aiam_integrity"] for line in out.splitlines()]
    assert marks and not any(m["verified"] for m in marks)
    assert marks[0]["log_status"].startswith("record 3: truncated")
