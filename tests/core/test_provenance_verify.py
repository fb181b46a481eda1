"""verify_log: every kind of tampering is found at the right index; an untouched log verifies."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agentic_iam.core.provenance import (
    HeadSigner,
    JsonlSink,
    Recorder,
    canonical_json,
    verify_log,
)

N = 8


def signer(seed: int = 7, kid: str = "audit-1") -> HeadSigner:
    return HeadSigner(Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32), kid)


def keys() -> dict[str, Ed25519PublicKey]:
    return {"audit-1": signer().public_key()}


def write_log(path: Path, count: int = N, *, signed: bool = True) -> Path:
    recorder = Recorder([JsonlSink(path, signer=signer() if signed else None)])
    for i in range(count):
        recorder.record(
            "tool_call.decided",
            execution_id="exec_1",
            tool="create_refund",
            call_id=f"call-{i}",
            decision={"outcome": "allow" if i % 3 else "deny"},
            arguments={"amount": i * 10},
        )
    recorder.close()
    return path


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rehash(record: dict[str, Any]) -> bytes:
    """Re-seal a changed record the way a careful forger would: recompute its own hash."""
    record = {k: v for k, v in record.items() if k != "hash"}
    record["hash"] = hashlib.sha256(canonical_json(record)).hexdigest()
    return canonical_json(record) + b"\n"


def modify_field(path: Path) -> None:
    rows = lines(path)
    changed = rows[3].replace(b'"time":"2', b'"time":"1', 1)  # back-date record 3
    assert changed != rows[3]
    rows[3] = changed
    path.write_bytes(b"".join(rows))


def modify_and_rehash(path: Path) -> None:
    rows = lines(path)
    record = json.loads(rows[3])
    record["agent_id"] = "someone-else"
    rows[3] = rehash(record)
    path.write_bytes(b"".join(rows))


def delete_record(path: Path) -> None:
    rows = lines(path)
    del rows[3]
    path.write_bytes(b"".join(rows))


def delete_first(path: Path) -> None:
    path.write_bytes(b"".join(lines(path)[1:]))


def swap_records(path: Path) -> None:
    rows = lines(path)
    rows[3], rows[4] = rows[4], rows[3]
    path.write_bytes(b"".join(rows))


def truncate_tail(path: Path) -> None:
    path.write_bytes(b"".join(lines(path)[:-2]))


def torn_tail(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b'{"call_id":"call-x","event')


def reformat(path: Path) -> None:
    rows = lines(path)
    rows[5] = json.dumps(json.loads(rows[5]), indent=None).encode() + b"\n"  # spaces
    path.write_bytes(b"".join(rows))


def duplicate_member(path: Path) -> None:
    rows = lines(path)
    rows[2] = rows[2].replace(b'{"arguments_digest"', b'{"tool":"x","arguments_digest"', 1)
    path.write_bytes(b"".join(rows))


def rewrite_last_with_hash(path: Path) -> None:
    rows = lines(path)
    record = json.loads(rows[-1])
    record["tool"] = "delete_database"
    rows[-1] = rehash(record)
    path.write_bytes(b"".join(rows))


def rewrite_everything(path: Path) -> None:
    # A full, internally consistent chain written without the signing key; the old head stays.
    forged = path.with_name("forged.jsonl")
    recorder = Recorder([JsonlSink(forged)])
    for i in range(N):
        recorder.record("tool_call.decided", tool="nothing_to_see", call_id=f"call-{i}")
    recorder.close()
    shutil.copyfile(forged, path)


CASES: list[tuple[str, Callable[[Path], None], int | None, str]] = [
    ("modify a field", modify_field, 3, "modified"),
    ("modify and recompute the hash", modify_and_rehash, 3, "modified"),
    ("delete a record", delete_record, 3, "deleted"),
    ("delete the first record", delete_first, 0, "deleted"),
    ("swap two records", swap_records, 3, "reordered"),
    ("truncate the tail", truncate_tail, N - 2, f"truncated (head says {N} records)"),
    ("torn last line", torn_tail, N, "torn last line"),
    ("non-canonical whitespace", reformat, 5, "modified"),
    ("duplicate member", duplicate_member, 2, "modified"),
    ("rewrite the last record", rewrite_last_with_hash, N - 1, "rewritten"),
    ("rewrite the whole log", rewrite_everything, N - 1, "rewritten"),
]


def test_untouched_log_verifies(tmp_path: Path) -> None:
    path = write_log(tmp_path / "audit.jsonl")
    report = verify_log(path, public_keys=keys())
    assert report.ok
    assert (report.count, report.head_count, report.head_signed) == (N, N, True)
    assert report.problem is None and report.first_bad_index is None
    unsigned = verify_log(path)
    assert unsigned.ok and not unsigned.head_signed


@pytest.mark.parametrize(("name", "tamper", "index", "problem"), CASES, ids=[c[0] for c in CASES])
def test_tampering_is_found_at_the_right_index(
    tmp_path: Path, name: str, tamper: Callable[[Path], None], index: int | None, problem: str
) -> None:
    path = write_log(tmp_path / "audit.jsonl")
    tamper(path)
    report = verify_log(path, public_keys=keys())
    assert not report.ok, name
    assert report.first_bad_index == index, report
    assert report.problem is not None and report.problem.startswith(problem), report


def test_a_plain_chain_cannot_see_truncation_but_the_head_can(tmp_path: Path) -> None:
    unsigned = write_log(tmp_path / "plain.jsonl", signed=False)
    truncate_tail(unsigned)
    assert verify_log(unsigned).ok  # the limit of a hash chain on its own
    signed = write_log(tmp_path / "signed.jsonl")
    truncate_tail(signed)
    assert not verify_log(signed).ok  # the head's count still finds it without the key
    assert not verify_log(signed, public_keys=keys()).ok


def test_head_problems(tmp_path: Path) -> None:
    path = write_log(tmp_path / "audit.jsonl")
    head_path = tmp_path / "audit.jsonl.head"
    head = json.loads(head_path.read_text())

    head_path.write_text(json.dumps({**head, "count": N + 5}))
    report = verify_log(path, public_keys=keys())
    assert (report.ok, report.problem) == (False, "head signature invalid")

    forged = signer(seed=9)  # right kid, wrong key
    payload = {"count": head["count"], "head_hash": head["head_hash"], "kid": "audit-1"}
    sig = forged.sign(canonical_json(payload))
    import base64

    head_path.write_text(
        json.dumps({**payload, "sig": base64.urlsafe_b64encode(sig).rstrip(b"=").decode()})
    )
    assert verify_log(path, public_keys=keys()).problem == "head signature invalid"

    head_path.write_text(json.dumps({**head, "kid": "other\x1b[31m"}))
    report = verify_log(path, public_keys=keys())
    assert report.problem == "head signed by unknown key"
    assert report.detail is not None and "\x1b" not in report.detail

    head_path.write_text("not json")
    assert verify_log(path, public_keys=keys()).problem == "head unreadable"

    head_path.unlink()
    assert verify_log(path, public_keys=keys()).problem == "head missing"
    assert verify_log(path).ok  # without keys a missing head is only a missing extra check


def append_forged(path: Path, count: int = 1) -> None:
    """Append records that continue the chain correctly, written without the signing key."""
    for _ in range(count):
        last = json.loads(lines(path)[-1])
        record = {"event_type": "model.usage", "schema_version": 1, "time": last["time"],
                  "sequence": last["sequence"] + 1, "prev": last["hash"]}
        with path.open("ab") as handle:
            handle.write(rehash(record))


def test_records_after_the_head_are_reported_as_unsigned(tmp_path: Path) -> None:
    path = write_log(tmp_path / "audit.jsonl")
    append_forged(path)  # appended without the key, so without updating the head
    report = verify_log(path, public_keys=keys())
    assert report.ok and report.count == N + 1
    assert (report.head_count, report.unsigned_tail) == (N, 1)
    assert not report.intact  # issue 13 item 4: nothing wrong found is not proved intact


def test_empty_log_verifies(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    JsonlSink(path).close()
    report = verify_log(path)
    assert report.ok and report.count == 0
