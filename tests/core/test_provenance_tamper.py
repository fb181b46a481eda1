"""Issue 13 item 3: the audit writer never signs over a log it cannot vouch for.

An insider with file access but no signing key truncates the log, appends forged records,
rewrites it with a fresh chain, deletes or replaces the head, or swaps the file while the writer
runs. Each attack is found when the sink opens the log or before its next append; the sink then
refuses to record (so the Guard denies with ``audit.failed``) and the signed head is never moved
over the tampered file. Recovery is a new log that continues the old one.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentic_iam import Recorder, ToolCall
from agentic_iam.core.audit_export import read_events
from agentic_iam.core.provenance import (
    HeadSigner,
    JsonlSink,
    MemorySink,
    canonical_json,
    verify_log,
)
from agentic_iam.errors import AuditError, AuditIntegrityError

from ..conftest import Env
from .test_provenance_verify import (
    N,
    append_forged,
    keys,
    lines,
    rewrite_everything,
    rewrite_last_with_hash,
    signer,
    truncate_tail,
    write_log,
)


def head_of(path: Path) -> bytes:
    return path.with_name(path.name + ".head").read_bytes()


def record(sink: JsonlSink, call_id: str = "c", outcome: str = "allow") -> None:
    """Emit straight into the sink, so that its own error is what a test sees."""
    event = Recorder([MemorySink()]).record("tool_call.decided", tool="t", call_id=call_id,
                                            decision={"outcome": outcome})
    sink.emit(event)


def delete_head(path: Path) -> None:
    path.with_name(path.name + ".head").unlink()


def truncate_to_nothing(path: Path) -> None:
    path.write_bytes(b"")


def append_forged_record(path: Path) -> None:
    append_forged(path)


def append_three_forged(path: Path) -> None:
    append_forged(path, 3)


def head_from_other_key(path: Path) -> None:
    # A rewritten log with a head the attacker signed with a key of their own (same kid).
    rewrite_everything(path)
    last = json.loads(lines(path)[-1])
    forged = HeadSigner(Ed25519PrivateKey.from_private_bytes(bytes([99]) * 32), "audit-1")
    payload = {"count": last["sequence"] + 1, "head_hash": last["hash"], "kid": "audit-1"}
    sig = base64.urlsafe_b64encode(forged.sign(canonical_json(payload))).rstrip(b"=").decode()
    path.with_name(path.name + ".head").write_bytes(canonical_json({**payload, "sig": sig}))


ATTACKS: list[tuple[str, Callable[[Path], None], str]] = [
    ("truncate the tail", truncate_tail, "truncated"),
    ("truncate everything", truncate_to_nothing, "truncated"),
    ("append a forged record", append_forged_record, "after the signed head"),
    ("append three forged records", append_three_forged, "after the signed head"),
    ("rewrite the whole log with a fresh chain", rewrite_everything, "rewritten"),
    ("rewrite the last record and its hash", rewrite_last_with_hash, "rewritten"),
    ("delete the head", delete_head, "no signed head"),
    ("sign a forged head with another key", head_from_other_key, "does not verify"),
]


@pytest.mark.parametrize(("name", "attack", "message"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_opening_a_tampered_log_refuses_and_never_re_signs(
    tmp_path: Path, name: str, attack: Callable[[Path], None], message: str
) -> None:
    path = write_log(tmp_path / "audit.jsonl")
    attack(path)
    head_file = path.with_name(path.name + ".head")
    head_before = head_file.read_bytes() if head_file.exists() else None
    log_before = path.read_bytes()

    with pytest.raises(AuditIntegrityError, match=message):
        JsonlSink(path, signer=signer())

    # Nothing was written: not the log, and above all not a new head over the tampered file.
    assert path.read_bytes() == log_before
    assert (head_file.read_bytes() if head_file.exists() else None) == head_before
    assert not verify_log(path, public_keys=keys()).intact


def test_an_untouched_log_reopens_and_continues(tmp_path: Path) -> None:
    path = write_log(tmp_path / "audit.jsonl")
    sink = JsonlSink(path, signer=signer())
    record(sink)
    sink.close()
    report = verify_log(path, public_keys=keys())
    assert report.intact and report.count == N + 1


def test_a_brand_new_log_is_fine_to_start(tmp_path: Path) -> None:
    path = tmp_path / "new.jsonl"
    sink = JsonlSink(path, signer=signer())
    record(sink)
    sink.close()
    assert verify_log(path, public_keys=keys()).intact
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")  # an empty file without a head is new too
    JsonlSink(empty, signer=signer()).close()
    assert verify_log(empty, public_keys=keys()).intact


# --- attacks while the writer runs -----------------------------------------------------------


def live_truncate(path: Path) -> None:
    truncate_tail(path)


def live_append(path: Path) -> None:
    append_forged(path)


def live_modify_last_in_place(path: Path) -> None:
    data = path.read_bytes()
    assert data.endswith(b'"tool":"t"}\n')
    changed = data[:-4] + b'x"}\n'  # the last record now names another tool
    with path.open("r+b") as handle:  # same inode, same size
        handle.write(changed)


def live_replace_file(path: Path) -> None:
    copy = path.with_name("copy.jsonl")
    shutil.copyfile(path, copy)
    os.replace(copy, path)  # the same content under a new inode


def live_delete_log(path: Path) -> None:
    path.unlink()


def live_delete_head(path: Path) -> None:
    delete_head(path)


LIVE: list[tuple[str, Callable[[Path], None]]] = [
    ("truncate", live_truncate),
    ("append a forged record", live_append),
    ("modify the last record in place", live_modify_last_in_place),
    ("replace the file", live_replace_file),
    ("delete the file", live_delete_log),
    ("delete the head", live_delete_head),
]


@pytest.mark.parametrize(("name", "attack"), LIVE, ids=[a[0] for a in LIVE])
def test_tampering_while_open_is_found_before_the_next_append(
    tmp_path: Path, name: str, attack: Callable[[Path], None]
) -> None:
    path = write_log(tmp_path / "audit.jsonl")
    sink = JsonlSink(path, signer=signer())
    record(sink, "before")
    attack(path)
    head_file = path.with_name(path.name + ".head")
    head_before = head_file.read_bytes() if head_file.exists() else None

    with pytest.raises(AuditIntegrityError):
        record(sink, "after")
    # ... and it stays refused (until an operator opens a new log), even if the file is put
    # back or the check would pass now.
    with pytest.raises(AuditIntegrityError, match="until an operator acts"):
        record(sink, "again")
    assert (head_file.read_bytes() if head_file.exists() else None) == head_before
    if path.exists():
        assert b'"after"' not in path.read_bytes() and b'"again"' not in path.read_bytes()
    sink.close()


def test_a_head_rolled_back_while_open_is_found(tmp_path: Path) -> None:
    path = write_log(tmp_path / "audit.jsonl")
    head = path.with_name(path.name + ".head")
    older = head.read_bytes()
    sink = JsonlSink(path, signer=signer())
    record(sink, "one")
    record(sink, "two")
    head.write_bytes(older)  # a valid signature, for a shorter log
    with pytest.raises(AuditIntegrityError, match="no longer names the last record"):
        record(sink, "three")
    sink.close()


def test_an_unsigned_sink_checks_the_file_it_writes_too(tmp_path: Path) -> None:
    path = write_log(tmp_path / "plain.jsonl", signed=False)
    sink = JsonlSink(path)
    record(sink)
    truncate_tail(path)
    with pytest.raises(AuditIntegrityError, match="shrank"):
        record(sink)
    sink.close()


def test_two_writers_in_one_process_keep_one_signed_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = JsonlSink(path, signer=signer())
    second = JsonlSink(path, signer=signer())
    for i in range(5):
        record(first, f"a{i}")
        record(second, f"b{i}")
    # A forger who appends between two writers is caught by the next one to write.
    append_forged(path)
    with pytest.raises(AuditIntegrityError):
        record(first, "late")
    first.close()
    second.close()
    report = verify_log(path, public_keys=keys())
    assert report.ok and report.head_count == 10 and report.unsigned_tail == 1


# --- a failed head write leaves no record behind --------------------------------------------


@dataclass(frozen=True)
class FlakySigner(HeadSigner):
    """Signs until ``budget`` runs out (a key service that goes away, an HSM error)."""

    budget: list[int] = None  # type: ignore[assignment]

    def sign(self, payload: bytes) -> bytes:
        if self.budget[0] <= 0:
            raise RuntimeError("signing service unavailable")
        self.budget[0] -= 1
        return super().sign(payload)


def flaky(signatures: int) -> FlakySigner:
    base = signer()
    return FlakySigner(base.private_key, base.kid, budget=[signatures])


def test_a_failed_head_write_takes_the_record_out_again(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path, signer=flaky(2))  # the head of the new log, then one record
    record(sink, "ok")
    with pytest.raises(AuditError, match="cannot sign"):
        record(sink, "unsigned")
    sink.close()
    assert [e.call_id for e in read_events(path)] == ["ok"]
    assert verify_log(path, public_keys=keys()).intact


def test_buffered_records_are_kept_for_the_next_flush_when_the_head_fails(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    budget = flaky(1)
    sink = JsonlSink(path, durability="buffered", signer=budget)
    record(sink, "a")
    record(sink, "b")
    with pytest.raises(AuditError):
        sink.flush()
    assert path.read_bytes() == b""
    budget.budget[0] = 5
    sink.close()
    assert [e.call_id for e in read_events(path)] == ["a", "b"]
    assert verify_log(path, public_keys=keys()).intact


# --- through the Guard -----------------------------------------------------------------------


def refund(amount: int, call_id: str) -> ToolCall:
    return ToolCall("create_refund", {"amount": amount, "currency": "USD", "account": "ACC-1001"},
                    call_id=call_id)


def test_a_tampered_log_makes_the_guard_deny(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    env.guard.recorder = Recorder([JsonlSink(path, signer=signer())])
    token = env.refund_token()
    first = env.guard.authorize(token, refund(10, "first"))
    assert first.outcome == "allow", first.reasons

    append_forged(path)  # an insider appends a record without the key

    for call_id in ("second", "third"):
        denied = env.guard.authorize(token, refund(10, call_id))
        assert denied.outcome == "deny"
        assert denied.reasons[0].code == "audit.failed"
    assert b'"second"' not in path.read_bytes()
    report = verify_log(path, public_keys=keys())
    assert report.unsigned_tail == 1 and not report.intact  # the forgery was not signed over


def test_a_failed_head_write_leaves_no_allow_for_a_denied_call(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    budget = flaky(1000)
    env.guard.recorder = Recorder([JsonlSink(path, signer=budget)])
    token = env.refund_token()
    assert env.guard.authorize(token, refund(10, "signed")).outcome == "allow"
    budget.budget[0] = 0
    decision = env.guard.authorize(token, refund(10, "unsigned"))
    assert decision.outcome == "deny" and decision.reasons[0].code == "audit.failed"
    records: list[dict[str, Any]] = [json.loads(line) for line in lines(path)]
    assert not any(r.get("call_id") == "unsigned" for r in records)
    assert verify_log(path, public_keys=keys()).intact


# --- recovery: a new log that continues the old one ------------------------------------------


def test_continue_a_tampered_log_in_a_new_one(tmp_path: Path) -> None:
    old = write_log(tmp_path / "audit.jsonl")
    signed_hash = json.loads(head_of(old))["head_hash"]
    rewrite_everything(old)
    with pytest.raises(AuditIntegrityError):
        JsonlSink(old, signer=signer())

    new = tmp_path / "audit-2.jsonl"
    sink = JsonlSink(new, signer=signer(), continues_from=old)
    record(sink, "after-recovery")
    sink.close()

    first = next(iter(read_events(new)))
    assert first.event_type == "audit.continued" and first.sequence == 0
    assert first.extra is not None
    assert first.extra["continues_from"] == str(old.resolve())
    assert first.extra["previous_count"] == str(N)
    assert first.extra["previous_head_hash"] == signed_hash  # the last *verified* hash
    assert first.extra["previous_status"].startswith("rewritten")
    assert verify_log(new, public_keys=keys()).intact

    # A restart with the same configuration checks the first record and carries on.
    again = JsonlSink(new, signer=signer(), continues_from=old)
    record(again, "after-restart")
    again.close()
    assert [e.call_id for e in read_events(new)][1:] == ["after-recovery", "after-restart"]
    # Pointing it at another old log is a configuration error, not a silent new chain.
    with pytest.raises(AuditError, match="does not start by continuing"):
        JsonlSink(new, signer=signer(), continues_from=tmp_path / "other.jsonl")


def test_continue_an_intact_log_after_a_key_rotation(tmp_path: Path) -> None:
    old = write_log(tmp_path / "audit.jsonl")
    rotated = HeadSigner(Ed25519PrivateKey.from_private_bytes(bytes([8]) * 32), "audit-2")
    new = tmp_path / "audit-2.jsonl"
    JsonlSink(new, signer=rotated, continues_from=old,
              previous_keys={"audit-1": signer().public_key()}).close()
    first = next(iter(read_events(new)))
    assert first.extra is not None
    assert first.extra["previous_status"] == "intact"
    assert first.extra["previous_kid"] == "audit-1"
    assert verify_log(new, public_keys={"audit-2": rotated.public_key()}).intact


def test_continues_from_needs_a_signer_and_another_file(tmp_path: Path) -> None:
    old = write_log(tmp_path / "audit.jsonl")
    with pytest.raises(AuditError, match="needs a `signer`"):
        JsonlSink(tmp_path / "n.jsonl", continues_from=old)
    with pytest.raises(AuditError, match="not the new one"):
        JsonlSink(old, signer=signer(), continues_from=old)


def test_repair_moves_unsigned_records_aside(tmp_path: Path) -> None:
    path = write_log(tmp_path / "audit.jsonl")
    append_forged(path, 2)
    forged = b"".join(lines(path)[-2:])
    JsonlSink(path, signer=signer(), repair_torn_tail=True).close()
    assert path.with_name("audit.jsonl.torn").read_bytes() == forged
    report = verify_log(path, public_keys=keys())
    assert report.intact and report.count == N
