"""``aiam audit``: verify, show, tree and export JSONL audit logs.

A typer sub-app (``audit_app``) mounted by :mod:`agentic_iam.cli`. It only reads logs: it must
never write to a log or its head, never print a traceback for wrong input (one ``error:`` line on
stderr and exit 2), and never let text from a log drive the terminal (all log text is printed
through rich ``Text``, which strips control codes, or sanitized first).

Exit codes: 0 success (``verify``: proved intact); 1 the log does not verify (``verify``,
``export``) or the execution is unknown (``tree``); 2 wrong input (missing file, bad JSON, bad
JWKS, unreachable JWKS URL); 3 nothing wrong was found but intactness is not proved (``verify``,
``export``: no key, no head, an unknown kid, records after the head).

Where the verifier finds the public key: ``--jwks FILE|URL``, else ``$AIAM_AUDIT_JWKS`` (a file
or an https URL, e.g. the broker's published JWKS). Never from a file next to the log: whoever
can rewrite the log can rewrite a key beside it. The head names the key by ``kid``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from agentic_iam.core.audit_export import (
    ExecutionNode,
    delegation_tree,
    read_events,
    read_records,
    to_ocsf,
)
from agentic_iam.core.provenance import (
    AuditEvent,
    VerifyReport,
    canonical_json,
    public_keys_from_jwks,
    verify_log,
)
from agentic_iam.errors import AgenticIAMError

__all__ = ["audit_app"]

F = TypeVar("F", bound=Callable[..., Any])

audit_app = typer.Typer(
    name="audit",
    help="Verify, show and export agentic-iam audit logs (JSONL).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class DecisionChoice(str, Enum):
    allow = "allow"
    deny = "deny"
    approval_required = "approval_required"


class ExportFormat(str, Enum):
    ocsf = "ocsf"


FileArg = Annotated[Path, typer.Argument(help="The JSONL audit log.", show_default=False)]


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _friendly(command: F) -> F:
    """Turn expected errors into one stderr line and exit 2, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BrokenPipeError:
            # `aiam audit export log | head`: the reader left. Point stdout at devnull so the
            # interpreter's final flush does not fail again (Python docs, "Note on SIGPIPE").
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(1) from None
        except AgenticIAMError as exc:
            _fail(str(exc))
        except OSError as exc:
            _fail(f"{exc.filename or 'I/O'}: {exc.strerror or exc}")
        except (ValueError, UnicodeDecodeError) as exc:
            _fail(str(exc))

    return wrapper  # type: ignore[return-value]


def _existing(path: Path) -> Path:
    if not path.exists():
        _fail(f"audit log `{path}` does not exist")
    if not path.is_file():
        _fail(f"`{path}` is not a file")
    return path


def _console() -> Console:
    # Created per command so that it writes to the stdout in effect (CliRunner swaps it).
    console = Console(file=sys.stdout, highlight=False, soft_wrap=False)
    if not console.is_terminal:
        # Piped output keeps the timeline's columns readable instead of folding at 80.
        console = Console(file=sys.stdout, highlight=False, soft_wrap=False, width=180)
    return console


# --- verify ----------------------------------------------------------------------------------


JWKS_ENV = "AIAM_AUDIT_JWKS"
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_MAX_JWKS_BYTES = 1_000_000


def load_jwks_file(path: Path) -> dict[str, Ed25519PublicKey]:
    """Ed25519 public keys by kid from a JWKS JSON file (OKP/Ed25519 keys)."""
    if not path.is_file():
        _fail(f"JWKS file `{path}` does not exist")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        _fail(f"JWKS file `{path}` is not valid JSON: {exc}")
    if not isinstance(document, dict):
        _fail(f"JWKS file `{path}` must hold a JSON object with `keys`")
    return public_keys_from_jwks(document)


def load_jwks_url(url: str) -> dict[str, Ed25519PublicKey]:
    """Ed25519 public keys by kid from a JWKS URL (https; http only to this machine)."""
    import httpx

    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in _LOOPBACK):
        _fail(f"JWKS URL `{url}` must use https (plain http only for localhost)")
    try:
        response = httpx.get(url, timeout=10.0, follow_redirects=False)
    except httpx.HTTPError as exc:
        _fail(f"cannot fetch JWKS `{url}`: {type(exc).__name__}")
    if response.status_code != 200:
        _fail(f"cannot fetch JWKS `{url}`: HTTP {response.status_code}")
    if len(response.content) > _MAX_JWKS_BYTES:
        _fail(f"JWKS `{url}` is larger than {_MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(response.content.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        _fail(f"JWKS `{url}` is not valid JSON: {exc}")
    if not isinstance(document, dict):
        _fail(f"JWKS `{url}` must hold a JSON object with `keys`")
    return public_keys_from_jwks(document)


def _load_keys(source: str | None) -> dict[str, Ed25519PublicKey] | None:
    if source is None or not source.strip():
        return None
    if source.startswith(("https://", "http://")):
        return load_jwks_url(source)
    return load_jwks_file(Path(source))


@dataclass(frozen=True)
class Verdict:
    """What ``aiam audit verify`` concluded, and the lines it prints."""

    code: int
    """0 intact (proved), 1 damaged or tampered, 3 nothing wrong found but not proved."""
    headline: str
    """The first line."""
    notes: tuple[str, ...]
    """What was and was not verified, one line each."""
    report: VerifyReport
    """The report the verdict rests on."""

    def covers(self, index: int) -> bool:
        """Whether record ``index`` is proved: the log is intact, or (signed, nothing wrong
        found) the record is one the valid signed head covers."""
        if self.code == 0:
            return True
        report = self.report
        return (
            report.ok and report.head_signed and report.head_count is not None
            and index < report.head_count
        )


JwksOpt = Annotated[
    str | None,
    typer.Option(
        "--jwks", envvar=JWKS_ENV, show_default=False,
        help=f"JWKS file or URL with the key that signs the log's head [env: {JWKS_ENV}].",
    ),
]
HeadOpt = Annotated[Path | None, typer.Option("--head", help="Head file [default: FILE.head].")]
UnsignedOpt = Annotated[
    bool,
    typer.Option(
        "--unsigned",
        help="The log is unsigned by design: accept a verified hash chain without a head "
        "(a cut-off tail or a rewritten log then cannot be detected).",
    ),
]


def verify_verdict(
    path: Path, *, jwks: str | None, head: Path | None, unsigned: bool
) -> Verdict:
    """Verify ``path`` and say what was proved (see :func:`verify` for the exit codes)."""
    keys = _load_keys(jwks)
    source = f"`{jwks}`" if jwks else None
    report = verify_log(path, public_keys=keys, head_path=head)
    unchecked_signature: str | None = None
    if report.problem in ("head missing", "head signed by unknown key"):
        # Nothing proves the log, but the chain (and a head's count and hash) may still be
        # checked: say what holds, and what does not.
        if report.problem == "head signed by unknown key":
            unchecked_signature = (
                f"the head's signature: its kid `{report.head_kid}` is not in the JWKS {source}"
            )
        report = verify_log(path, head_path=head)
    if not report.ok:
        where = f"record {report.first_bad_index}" if report.first_bad_index is not None else "log"
        detail = f" ({report.detail})" if report.detail else ""
        return Verdict(1, f"{where}: {report.problem}{detail}",
                       ("not intact: a check failed; the log was changed or damaged",), report)

    count = report.count
    notes = [
        f"verified: the hash chain of all {count} records (none changed, deleted or reordered)"
        if count else "verified: the log is empty"
    ]
    head_file = head or path.with_name(path.name + ".head")
    if report.head_count is None:
        if unsigned:
            notes.append("not checked: a signed head (--unsigned: a cut-off tail or a rewritten "
                         "log cannot be detected)")
            return Verdict(0, f"intact (unsigned): {count} records", tuple(notes), report)
        notes.append(f"not verified: there is no signed head (`{head_file}` is missing), so a "
                     "cut-off tail or a rewritten log cannot be ruled out; pass --unsigned if "
                     "this log is unsigned by design")
        return Verdict(3, f"not verified: {count} records, no signed head", tuple(notes), report)

    covered = report.head_count
    notes.append(
        f"verified: the head's count ({covered}) and hash match record {covered - 1}"
        if covered else "verified: the head's count (0) matches an empty log"
    )
    if report.head_signed:
        notes.append(f"verified: the head's signature (kid `{report.head_kid}`, key from "
                     f"{source})")
    else:
        notes.append("not verified: " + (unchecked_signature or (
            f"the head's signature: no key (pass --jwks FILE|URL or set ${JWKS_ENV})")))
    if report.unsigned_tail:
        notes.append(f"not verified: {report.unsigned_tail} record(s) after the signed head (a "
                     "writer died before signing them, or they were appended without the key)")
    if report.head_signed and not report.unsigned_tail:
        return Verdict(0, f"intact: {count} records (hash chain verified; signed head covers "
                          f"{covered}, kid `{report.head_kid}`)", tuple(notes), report)
    reason = ("records after the signed head" if report.head_signed
              else "the head's signature was not checked")
    return Verdict(3, f"not verified: {count} records, {reason}", tuple(notes), report)


@audit_app.command()
@_friendly
def verify(
    file: FileArg,
    jwks: JwksOpt = None,
    head: HeadOpt = None,
    unsigned: UnsignedOpt = False,
) -> None:
    """Check the hash chain and the signed head; say what was and was not verified.

    Exit 0 intact (every record chained and covered by a head whose signature verified, or,
    with --unsigned, a verified chain and no head); 1 a check failed (the first bad record is
    named); 2 wrong input; 3 nothing wrong was found but intactness is not proved (no key, no
    head, a key that is not in the JWKS, or records after the head).
    """
    verdict = verify_verdict(_existing(file), jwks=jwks, head=head, unsigned=unsigned)
    typer.echo(verdict.headline)
    for note in verdict.notes:
        typer.echo(f"  {note}")
    if verdict.code:
        raise typer.Exit(verdict.code)


# --- show ------------------------------------------------------------------------------------


def _events(path: Path) -> Iterator[AuditEvent]:
    def skipped(index: int, problem: str) -> None:
        typer.echo(f"warning: record {index}: {problem}; skipped", err=True)

    return read_events(_existing(path), on_invalid=skipped)


def _matches(
    event: AuditEvent,
    execution: str | None,
    agent: str | None,
    user: str | None,
    decision: DecisionChoice | None,
) -> bool:
    if execution is not None and event.execution_id != execution:
        return False
    if agent is not None and event.agent_id != agent:
        return False
    if user is not None and event.delegator != user:
        hops = event.chain or ()
        if not any(hop.id == user and hop.principal_type != "agent" for hop in hops):
            return False
    return decision is None or (
        event.decision is not None and event.decision.outcome == decision.value
    )


_STYLE = {
    "allow": "green",
    "success": "green",
    "deny": "red",
    "error": "red",
    "blocked": "red",
    "approval_required": "yellow",
}


def _outcome(event: AuditEvent) -> Text:
    value: str
    if event.decision is not None:
        value = event.decision.outcome
    elif event.result is not None:
        value = event.result.outcome
    elif event.event_type.startswith("approval."):
        value = event.event_type.removeprefix("approval.")
    else:
        value = ""
    return Text(value, style=_STYLE.get(value, ""))


@audit_app.command()
@_friendly
def show(
    file: FileArg,
    execution: Annotated[str | None, typer.Option("--execution", help="Execution id.")] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Agent id.")] = None,
    user: Annotated[
        str | None, typer.Option("--user", help="Delegating human or workload id.")
    ] = None,
    decision: Annotated[
        DecisionChoice | None, typer.Option("--decision", help="Only decisions with this outcome.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """A readable timeline of the log, optionally filtered."""
    selected = [e for e in _events(file) if _matches(e, execution, agent, user, decision)]
    if as_json:
        for event in selected:
            sys.stdout.write(canonical_json(event.to_json_dict()).decode("utf-8") + "\n")
        return
    table = Table(title=Text(f"{file.name}: {len(selected)} events"), show_lines=False)
    for column in ("#", "time (UTC)", "event"):
        table.add_column(column, no_wrap=True)
    for column in ("execution", "agent", "tool / action", "outcome", "why"):
        table.add_column(column, overflow="fold")
    for event in selected:
        what = " / ".join(x for x in (event.tool, event.action) if x)
        if event.event_type.startswith("delegation.") and event.capabilities:
            what = ", ".join(event.capabilities)
        why = ""
        if event.decision is not None:
            why = ", ".join(r.code for r in event.decision.reasons)
        elif event.result is not None and event.result.error:
            why = event.result.error
        elif event.usage:
            why = ", ".join(f"{k}={v}" for k, v in sorted(event.usage.items()))
        table.add_row(
            Text(str(event.sequence)),
            Text(event.time.replace("T", " ").removesuffix("Z")),
            Text(event.event_type),
            Text(event.execution_id or ""),
            Text(event.agent_id or ""),
            Text(what),
            _outcome(event),
            Text(why),
        )
    _console().print(table)


# --- tree ------------------------------------------------------------------------------------


def _node_label(node: ExecutionNode, focus: str) -> Text:
    label = Text()
    label.append(node.execution_id, style="bold" if node.execution_id == focus else "")
    label.append(f"  agent {node.agent_id or '?'}")
    if node.delegator and node.how == "delegation.minted":
        label.append(f"  delegated by {node.delegator}")
    if node.purpose:
        label.append(f"  purpose: {node.purpose}")
    if node.revoked:
        label.append("  REVOKED", style="red")
    if node.execution_id == focus:
        label.append("  ◀")
    return label


def _add_node(parent: Tree, node: ExecutionNode, focus: str) -> None:
    branch = parent.add(_node_label(node, focus))
    _fill(branch, node, focus)


def _fill(branch: Tree, node: ExecutionNode, focus: str) -> None:
    if node.capabilities:
        branch.add(Text("capabilities: " + ", ".join(node.capabilities)))
    for call in node.calls:
        text = Text("call ")
        text.append(call.tool or "?")
        if call.action:
            text.append(f" ({call.action})")
        if call.decision:
            text.append(" → ")
            text.append(call.decision, style=_STYLE.get(call.decision, ""))
        if call.reasons and call.decision != "allow":
            text.append(f" [{', '.join(call.reasons)}]")
        if call.approval:
            text.append(f" → approval {call.approval}")
        if call.result:
            text.append(" → ")
            text.append(call.result, style=_STYLE.get(call.result, ""))
        branch.add(text)
    for child in node.children:
        _add_node(branch, child, focus)


@audit_app.command()
@_friendly
def tree(
    file: FileArg,
    execution: Annotated[str, typer.Option("--execution", help="Any execution id of the run.")],
) -> None:
    """The delegation tree of a run: executions, capabilities and the calls made under each."""
    root = delegation_tree(_events(file), execution)
    if root is None:
        typer.echo(f"no events for execution `{execution}` in `{file}`", err=True)
        raise typer.Exit(1)
    view = Tree(_node_label(root, execution))
    _fill(view, root, execution)
    _console().print(view)


# --- export ----------------------------------------------------------------------------------


@audit_app.command()
@_friendly
def export(
    file: FileArg,
    format: Annotated[
        ExportFormat, typer.Option("--format", help="Output format.")
    ] = ExportFormat.ocsf,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    jwks: JwksOpt = None,
    head: HeadOpt = None,
    unsigned: UnsignedOpt = False,
    allow_unverified: Annotated[
        bool,
        typer.Option(
            "--allow-unverified",
            help="Export a log that does not verify (or is not proved intact) anyway; every "
            "line says whether its record is verified (unmapped.aiam_integrity).",
        ),
    ] = False,
) -> None:
    """Verify the log, then export it as JSON lines in another schema (OCSF 1.3.0).

    A log that does not verify is refused (exit 1, or 3 when it is only not proved intact)
    unless --allow-unverified. Each line carries the record's hash (metadata.uid and
    unmapped.aiam_chain) and what verification said (unmapped.aiam_integrity).
    """
    verdict = verify_verdict(_existing(file), jwks=jwks, head=head, unsigned=unsigned)
    if verdict.code and not allow_unverified:
        typer.echo(f"refusing to export `{file}`: {verdict.headline}", err=True)
        for note in verdict.notes:
            typer.echo(f"  {note}", err=True)
        typer.echo("  (pass --allow-unverified to export it anyway, each line marked)", err=True)
        raise typer.Exit(verdict.code)
    status = "intact" if verdict.code == 0 else verdict.headline

    def skipped(index: int, problem: str) -> None:
        typer.echo(f"warning: record {index}: {problem}; skipped", err=True)

    lines = (
        canonical_json(
            to_ocsf(event, link=link, integrity={
                "verified": verdict.covers(link.index), "log_status": status,
            })
        ).decode("utf-8") + "\n"
        for event, link in read_records(file, on_invalid=skipped)
    )
    if output is None:
        for line in lines:
            sys.stdout.write(line)
        return
    count = 0
    with output.open("w", encoding="utf-8") as sink:
        for line in lines:
            sink.write(line)
            count += 1
    typer.echo(f"wrote {count} {format.value} records to {output}", err=True)
