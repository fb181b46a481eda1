"""Reading audit logs back: events, the delegation tree of a run, and OCSF export.

What it is for
    :func:`read_events` turns a JSONL log written by :class:`~agentic_iam.core.provenance.JsonlSink`
    back into :class:`~agentic_iam.core.provenance.AuditEvent` values, :func:`delegation_tree`
    rebuilds who delegated what to whom in a run and which calls each execution made, and
    :func:`to_ocsf` maps an event to OCSF 1.3.0 for a SIEM.

What it must never do
    Write to a log, or present a record it could not parse as if it were one: unreadable records
    raise (or are handed to ``on_invalid``). Reading is not verifying: run
    :func:`~agentic_iam.core.provenance.verify_log` to know that nobody changed the log.

OCSF mapping (``metadata.version`` 1.3.0)
    ===============================  =====================================  ========================
    event                            class (``class_uid``)                  ``activity_id``
    ===============================  =====================================  ========================
    tool_call.decided / .completed   API Activity (6003), category 6        from the action's verb:
                                                                            1 Create, 2 Read,
                                                                            3 Update, 4 Delete,
                                                                            else 99 Other
    approval.*, model.usage          API Activity (6003)                    99 Other
    delegation.minted / subdelegated Authorize Session (3003), category 3   1 Assign Privileges
    delegation.revoked,              Account Change (3001), category 3      5 Disable
    execution.ended / .suspended
    delegation.refused               Authorize Session (3003), category 3   1 Assign Privileges
                                                                            (status Failure)
    ===============================  =====================================  ========================

    ``type_uid`` = ``class_uid * 100 + activity_id``; ``time`` = epoch milliseconds (and
    ``metadata.original_time`` the RFC 3339 string).

    ``status_id``: allow, success, approval granted, delegation → 1 Success; deny, error, blocked,
    approval denied → 2 Failure; approval required/requested → 99 Other. ``status_detail`` holds the
    reason codes. ``severity_id``: deny and blocked → 3 Medium; error, approval required/requested/
    denied and revocation → 2 Low; everything else → 1 Informational.

    Common members: ``actor.user`` (``uid``/``name`` = delegator), ``actor.app_name`` (agent id),
    ``actor.session`` (``uid`` = execution id, ``issuer``), ``actor.authorizations`` (decision and
    policy ids), ``metadata.product`` (``name`` and ``vendor_name`` "agentic-iam"),
    ``metadata.uid`` (the record's chain ``hash`` when read from a log with
    :func:`read_records`, else a digest of the event), ``metadata.correlation_uid`` (call id, else
    execution id), ``metadata.event_code`` (the event type). API Activity adds ``api.operation``
    (the action, else the tool or event type), ``api.service.name`` (the tool, or the model),
    ``api.request.uid`` (call id), ``api.response`` (result outcome and error), ``resources``
    (the tool) and ``src_endpoint.svc_name`` (the framework). Authorize Session adds ``user`` (the
    execution: ``uid`` execution id, ``name`` agent id), ``privileges`` (capabilities) and
    ``session`` (``uid`` = jti); Account Change adds ``user``. The whole event, as stored, is kept
    under ``unmapped.aiam``, so nothing is lost; ``unmapped.aiam_chain`` holds the record's
    ``sequence``, ``prev`` and ``hash`` and ``unmapped.aiam_integrity`` what verification said
    about it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Final

from pydantic import ValidationError

from agentic_iam.core.provenance import AuditEvent, _strict_loads, canonical_json, iter_records
from agentic_iam.errors import AuditIntegrityError

__all__ = [
    "OCSF_VERSION",
    "CallSummary",
    "ChainLink",
    "ExecutionNode",
    "delegation_tree",
    "read_events",
    "read_records",
    "to_ocsf",
]

OCSF_VERSION: Final = "1.3.0"


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainLink:
    """Where a record sits in its log's hash chain (the members :func:`read_events` drops)."""

    index: int
    """The line's index in the file (0-based)."""
    prev: str | None
    """The ``prev`` member as stored (``None`` when absent or not a string)."""
    hash: str | None
    """The ``hash`` member as stored: the record hash a SIEM can match against the log."""


def read_events(
    path: str | os.PathLike[str],
    *,
    on_invalid: Callable[[int, str], None] | None = None,
) -> Iterator[AuditEvent]:
    """The events of a JSONL log, in file order (the chain members are dropped).

    A line that is torn or is not a valid event raises :class:`AuditIntegrityError` naming its
    index, unless ``on_invalid(index, problem)`` is given, in which case it is called and the line
    skipped.
    """
    for event, _link in read_records(path, on_invalid=on_invalid):
        yield event


def read_records(
    path: str | os.PathLike[str],
    *,
    on_invalid: Callable[[int, str], None] | None = None,
) -> Iterator[tuple[AuditEvent, ChainLink]]:
    """Like :func:`read_events`, with each event's place in the chain (as stored, unchecked)."""
    for index, raw in iter_records(path):
        problem = ""
        event: AuditEvent | None = None
        link = ChainLink(index, None, None)
        if not raw.endswith(b"\n"):
            problem = "torn last line"
        else:
            try:
                record = _strict_loads(raw[:-1])
                if not isinstance(record, dict):
                    raise ValueError("not an object")
                event = AuditEvent.model_validate(
                    {k: v for k, v in record.items() if k not in ("prev", "hash")}
                )
                prev, own = record.get("prev"), record.get("hash")
                link = ChainLink(index, prev if isinstance(prev, str) else None,
                                 own if isinstance(own, str) else None)
            except (UnicodeDecodeError, ValueError, ValidationError):
                problem = "not a valid audit event"
        if event is not None:
            yield event, link
        elif on_invalid is not None:
            on_invalid(index, problem)
        else:
            raise AuditIntegrityError(f"record {index}: {problem}", index=index)


# --- delegation tree -------------------------------------------------------------------------


@dataclass(frozen=True)
class CallSummary:
    """One tool call made under an execution, merged from its decided/approval/completed events."""

    call_id: str | None
    """The framework's tool-call id."""
    tool: str | None
    """Tool name."""
    action: str | None
    """The action the tool maps to."""
    decision: str | None
    """``allow``, ``deny`` or ``approval_required`` (``None`` if no decision was recorded)."""
    reasons: tuple[str, ...]
    """Reason codes of the decision."""
    approval: str | None
    """``requested``, ``granted`` or ``denied`` when an approval was involved."""
    result: str | None
    """``success``, ``error`` or ``blocked`` (``None`` if the call did not complete)."""
    time: str
    """Time of the first event of the call."""


@dataclass(frozen=True)
class ExecutionNode:
    """One execution in a delegation tree."""

    execution_id: str
    """The execution's id."""
    agent_id: str | None
    """The agent it runs as."""
    delegator: str | None
    """The human or workload at the root of the chain."""
    purpose: str | None
    """The consented purpose."""
    capabilities: tuple[str, ...]
    """Capabilities granted to it (from the delegation event)."""
    jti: str | None
    """Its token id."""
    how: str | None
    """``delegation.minted`` or ``delegation.subdelegated``; ``None`` if only calls were seen."""
    revoked: bool
    """Whether a ``delegation.revoked`` event names it."""
    calls: tuple[CallSummary, ...]
    """Tool calls made under it, in order."""
    children: tuple[ExecutionNode, ...]
    """Executions it sub-delegated to."""


def _parent_of(event: AuditEvent) -> str | None:
    if event.parent_execution_id is not None:
        return event.parent_execution_id
    hops = [hop.execution_id for hop in event.chain or () if hop.execution_id is not None]
    if event.execution_id in hops:
        position = hops.index(event.execution_id)
        return hops[position - 1] if position > 0 else None
    return hops[-1] if hops and hops[-1] != event.execution_id else None


@dataclass
class _Calls:
    first: AuditEvent
    decision: AuditEvent | None = None
    approval: str | None = None
    result: str | None = None


def delegation_tree(events: Iterable[AuditEvent], execution_id: str) -> ExecutionNode | None:
    """The delegation tree that contains ``execution_id``, from the root of its run.

    Built from ``delegation.*`` events (parent: ``parent_execution_id``, else the chain) and the
    tool-call events under each execution. ``None`` when no event names the execution.
    """
    delegations: dict[str, AuditEvent] = {}
    parents: dict[str, str | None] = {}
    revoked: set[str] = set()
    calls: dict[str, dict[str, _Calls]] = {}
    order: list[str] = []
    for event in events:
        exec_id = event.execution_id
        if exec_id is None:
            continue
        if exec_id not in parents and exec_id not in calls:
            order.append(exec_id)
        kind = event.event_type
        if kind in ("delegation.minted", "delegation.subdelegated"):
            delegations[exec_id] = event
            parents[exec_id] = _parent_of(event)
        elif kind == "delegation.revoked":
            revoked.add(exec_id)
        elif kind.startswith(("tool_call.", "approval.")):
            per_exec = calls.setdefault(exec_id, {})
            key = event.call_id or f"#{event.sequence}:{event.time}"
            entry = per_exec.setdefault(key, _Calls(first=event))
            if kind == "tool_call.decided":
                entry.decision = event
            elif kind == "tool_call.completed" and event.result is not None:
                entry.result = event.result.outcome
            elif kind.startswith("approval."):
                entry.approval = kind.removeprefix("approval.")
    if execution_id not in delegations and execution_id not in calls:
        return None
    root = execution_id
    seen = {root}
    while (parent := parents.get(root)) is not None and parent not in seen:
        seen.add(parent)
        root = parent

    children: dict[str, list[str]] = {}
    for exec_id in order:
        parent = parents.get(exec_id)
        if parent is not None:
            children.setdefault(parent, []).append(exec_id)

    def build(exec_id: str, visiting: frozenset[str]) -> ExecutionNode:
        minted = delegations.get(exec_id)
        merged = calls.get(exec_id, {})
        summaries = tuple(
            CallSummary(
                call_id=entry.first.call_id,
                tool=(entry.decision or entry.first).tool,
                action=(entry.decision or entry.first).action,
                decision=entry.decision.decision.outcome
                if entry.decision is not None and entry.decision.decision is not None
                else None,
                reasons=tuple(r.code for r in entry.decision.decision.reasons)
                if entry.decision is not None and entry.decision.decision is not None
                else (),
                approval=entry.approval,
                result=entry.result,
                time=entry.first.time,
            )
            for entry in merged.values()
        )
        agent = minted.agent_id if minted is not None else None
        if agent is None and merged:
            agent = next(iter(merged.values())).first.agent_id
        kids = tuple(
            build(child, visiting | {child})
            for child in children.get(exec_id, [])
            if child not in visiting  # a cycle in forged data must not recurse forever
        )
        return ExecutionNode(
            execution_id=exec_id,
            agent_id=agent,
            delegator=minted.delegator if minted is not None else None,
            purpose=minted.purpose if minted is not None else None,
            capabilities=tuple(minted.capabilities or ()) if minted is not None else (),
            jti=minted.jti if minted is not None else None,
            how=minted.event_type if minted is not None else None,
            revoked=exec_id in revoked,
            calls=summaries,
            children=kids,
        )

    return build(root, frozenset({root}))


# --- OCSF ------------------------------------------------------------------------------------

_VERBS: Final[dict[str, tuple[int, str]]] = {
    **dict.fromkeys(("create", "add", "new", "post", "insert", "send", "issue"), (1, "Create")),
    **dict.fromkeys(("read", "get", "list", "search", "query", "view", "fetch"), (2, "Read")),
    **dict.fromkeys(("update", "edit", "set", "modify", "patch", "put", "write"), (3, "Update")),
    **dict.fromkeys(("delete", "remove", "destroy", "purge", "cancel"), (4, "Delete")),
}
_SEVERITY_NAMES: Final = {1: "Informational", 2: "Low", 3: "Medium"}
_STATUS_NAMES: Final = {1: "Success", 2: "Failure", 99: "Other"}
_IAM: Final = (3, "Identity & Access Management")


def _product() -> dict[str, str]:
    product = {"name": "agentic-iam", "vendor_name": "agentic-iam"}
    with contextlib.suppress(metadata.PackageNotFoundError):  # running from a source tree
        product["version"] = metadata.version("agentic-iam")
    return product


def _api_activity(event: AuditEvent) -> tuple[int, str]:
    if event.event_type == "memory.retrieved":
        return 2, "Read"
    if event.event_type.startswith("tool_call.") and event.action:
        verb = event.action.rsplit(":", 1)[-1].lower()
        return _VERBS.get(verb, (99, "Other"))
    return 99, "Other"


def _status(event: AuditEvent) -> tuple[int, int, str]:
    """(status_id, severity_id, status_detail)."""
    kind = event.event_type
    detail = ""
    if event.decision is not None:
        detail = ", ".join(r.code for r in event.decision.reasons)
    if kind == "tool_call.completed" and event.result is not None:
        result = event.result.outcome
        if result == "success":
            return 1, 1, detail
        return 2, (3 if result == "blocked" else 2), event.result.error or result
    if kind == "tool_call.decided" and event.decision is not None:
        outcome = event.decision.outcome
        if outcome == "allow":
            return 1, 1, detail
        if outcome == "deny":
            return 2, 3, detail
        return 99, 2, detail or "approval required"
    if kind == "approval.requested":
        return 99, 2, "approval requested"
    if kind == "approval.denied":
        return 2, 2, "approval denied"
    if kind in ("delegation.revoked", "execution.ended"):
        return 1, 2, detail
    if kind == "execution.suspended":
        return 2, 3, detail or "execution suspended"
    if kind == "memory.retrieved" and event.memory is not None:
        if event.memory.reason is not None:
            return 2, 3, event.memory.reason
        if event.memory.dropped_count:
            return 1, 2, f"{event.memory.dropped_count} item(s) outside the memory scopes withheld"
    if kind == "delegation.refused":
        return 2, 3, detail or "delegation refused"
    return 1, 1, detail


def to_ocsf(
    event: AuditEvent,
    *,
    link: ChainLink | None = None,
    integrity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The event as an OCSF 1.3.0 record (see the module docstring for the mapping).

    ``link`` (from :func:`read_records`): ``metadata.uid`` becomes the record's hash and
    ``unmapped.aiam_chain`` holds ``sequence``, ``prev`` and ``hash``, so a SIEM line can be
    matched to the signed log. ``integrity``: what verification said about this record, kept as
    ``unmapped.aiam_integrity`` (``aiam audit export`` always sets it).
    """
    kind = event.event_type
    if kind in ("delegation.minted", "delegation.subdelegated", "delegation.refused"):
        class_uid, class_name, category = 3003, "Authorize Session", _IAM
        activity_id, activity_name = 1, "Assign Privileges"
    elif kind in ("delegation.revoked", "execution.ended", "execution.suspended"):
        class_uid, class_name, category = 3001, "Account Change", _IAM
        activity_id, activity_name = 5, "Disable"
    else:
        class_uid, class_name, category = 6003, "API Activity", (6, "Application Activity")
        activity_id, activity_name = _api_activity(event)
    status_id, severity_id, status_detail = _status(event)
    stored = event.to_json_dict()

    actor: dict[str, Any] = {}
    if event.delegator is not None:
        actor["user"] = {"uid": event.delegator, "name": event.delegator}
    if event.agent_id is not None:
        actor["app_name"] = event.agent_id
    if event.execution_id is not None:
        session: dict[str, Any] = {"uid": event.execution_id}
        if event.issuer is not None:
            session["issuer"] = event.issuer
        actor["session"] = session
    if event.decision is not None:
        policy_ids = event.decision.policy_ids or tuple(
            r.policy_id for r in event.decision.reasons if r.policy_id
        )
        actor["authorizations"] = [
            {"decision": event.decision.outcome, **({"policy": {"uid": p}} if p else {})}
            for p in (policy_ids or (None,))
        ]

    record: dict[str, Any] = {
        "activity_id": activity_id,
        "activity_name": activity_name,
        "category_uid": category[0],
        "category_name": category[1],
        "class_uid": class_uid,
        "class_name": class_name,
        "type_uid": class_uid * 100 + activity_id,
        "type_name": f"{class_name}: {activity_name}",
        "severity_id": severity_id,
        "severity": _SEVERITY_NAMES[severity_id],
        "status_id": status_id,
        "status": _STATUS_NAMES[status_id],
        "time": event.time_ns // 1_000_000,
        "timezone_offset": 0,
        "message": _summary(event),
        "actor": actor,
        "metadata": {
            "version": OCSF_VERSION,
            "product": _product(),
            "uid": link.hash
            if link is not None and link.hash
            else hashlib.sha256(canonical_json(stored)).hexdigest()[:32],
            "event_code": kind,
            "original_time": event.time,
            "log_name": "agentic-iam audit",
            **(
                {"correlation_uid": event.call_id or event.execution_id}
                if (event.call_id or event.execution_id)
                else {}
            ),
        },
        "unmapped": {"aiam": stored},
    }
    if status_detail:
        record["status_detail"] = status_detail
    if link is not None:
        record["unmapped"]["aiam_chain"] = {
            "sequence": event.sequence, "prev": link.prev, "hash": link.hash,
        }
    if integrity is not None:
        record["unmapped"]["aiam_integrity"] = dict(integrity)
    if class_uid == 6003:
        api: dict[str, Any] = {"operation": event.action or event.tool or kind}
        service = event.tool or (event.reasoning.model if event.reasoning else None)
        if service:
            api["service"] = {"name": service}
        if event.call_id:
            api["request"] = {"uid": event.call_id}
        if event.result is not None:
            response: dict[str, Any] = {"message": event.result.outcome}
            if event.result.error:
                response["error"] = event.result.error
            api["response"] = response
        record["api"] = api
        if event.tool:
            resource: dict[str, Any] = {"name": event.tool, "type": "tool"}
            if event.action:
                resource["uid"] = event.action
            record["resources"] = [resource]
        record["src_endpoint"] = {"svc_name": event.framework or "agentic-iam"}
    else:
        user: dict[str, Any] = {"uid": event.execution_id or event.jti or "unknown"}
        if event.agent_id:
            user["name"] = event.agent_id
        record["user"] = user
        if class_uid == 3003:
            record["privileges"] = list(event.capabilities or ())
            if event.jti:
                record["session"] = {"uid": event.jti}
                if event.issuer:
                    record["session"]["issuer"] = event.issuer
    return record


def _summary(event: AuditEvent) -> str:
    who = event.agent_id or "?"
    if event.event_type.startswith("delegation."):
        verb = event.event_type.removeprefix("delegation.")
        return f"{event.delegator or '?'} → {who}: execution {event.execution_id or '?'} {verb}"
    what = event.action or event.tool or event.event_type
    if event.decision is not None:
        return f"{who}: {what} {event.decision.outcome}"
    if event.result is not None:
        return f"{who}: {what} {event.result.outcome}"
    return f"{who}: {event.event_type} {what}"
