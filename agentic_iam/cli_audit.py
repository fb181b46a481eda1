"""``aiam audit``: verify, show, tree and export JSONL audit logs.

A typer sub-app (``audit_app``) mounted by :mod:`agentic_iam.cli`. It only reads logs: it must
never write to a log or its head, never print a traceback for wrong input (one ``error:`` line on
stderr and exit 2), and never let text from a log drive the terminal (all log text is printed
through rich ``Text``, which strips control codes, or sanitized first).

Exit codes: 0 success; 1 the log does not verify (``verify``) or the execution is unknown
(``tree``); 2 wrong input (missing file, bad JSON, bad JWKS).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
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
    to_ocsf,
)
from agentic_iam.core.provenance import (
    AuditEvent,
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


def _console() -> Console:
    # Created per command so that it writes to the stdout in effect (CliRunner swaps it).
    console = Console(file=sys.stdout, highlight=False, soft_wrap=False)
    if not console.is_terminal:
        # Piped output keeps the timeline's columns readable instead of folding at 80.
        console = Console(file=sys.stdout, highlight=False, soft_wrap=False, width=180)
    return console


# --- verify ----------------------------------------------------------------------------------


@audit_app.command()
@_friendly
def verify(
    file: FileArg,
    jwks: Annotated[
        Path | None,
        typer.Option("--jwks", help="JWKS with the Ed25519 key(s) that sign the log's head."),
    ] = None,
    head: Annotated[
        Path | None, typer.Option("--head", help="Head file [default: FILE.head].")
    ] = None,
) -> None:
    """Check the hash chain (and the signed head); exit 1 at the first bad record."""
    keys = load_jwks_file(jwks) if jwks is not None else None
    report = verify_log(_existing(file), public_keys=keys, head_path=head)
    if not report.ok:
        where = f"record {report.first_bad_index}" if report.first_bad_index is not None else "log"
        detail = f" ({report.detail})" if report.detail else ""
        typer.echo(f"{where}: {report.problem}{detail}")
        raise typer.Exit(1)
    notes: list[str] = []
    if report.head_signed:
        notes.append(f"signed head covers {report.head_count}")
    elif report.head_count is not None:
        notes.append("head not signature-checked: pass --jwks")
    if report.unsigned_tail:
        notes.append(f"{report.unsigned_tail} after the head")
    suffix = f" ({'; '.join(notes)})" if notes else ""
    typer.echo(f"intact: {report.count} records{suffix}")


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
) -> None:
    """Export the log as JSON lines in another schema (OCSF 1.3.0)."""
    lines = (canonical_json(to_ocsf(event)).decode("utf-8") + "\n" for event in _events(file))
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
