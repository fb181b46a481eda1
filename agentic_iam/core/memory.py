"""Memory scopes at retrieval time: a run reads only what its grant names.

The memory scopes a run may read are part of its signed grant (token claim ``mem``): the agent's
registry scopes or fewer at delegation, never more than the parent's at sub-delegation. Every
retrieval an adapter makes passes its results through :meth:`Guard.filter_memory`, which checks
the token as strictly as a tool call does (signature, expiry, and revocation of the token and
every ancestor in the store), keeps the items whose scope the grant names (exact match), and
records a ``memory.retrieved`` audit event with what was kept and what was dropped.

What it must never do: return anything for a token that is expired, revoked or does not verify,
or for an item without a scope; raise into the caller's retrieval (every failure keeps nothing,
with the reason); or put an item's content in the audit log (ids and scopes only).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from agentic_iam.core.identity import ExecutionIdentity
from agentic_iam.core.tokens import ExecutionToken
from agentic_iam.errors import TokenError

if TYPE_CHECKING:
    from agentic_iam.core.guard import Guard, TokenLike

__all__ = ["DroppedItem", "MemoryFiltered", "filter_memory"]

log = logging.getLogger("agentic_iam.memory")

T = TypeVar("T")

MISSING_SCOPE = "<missing>"
#: Most ids recorded per retrieval event (the counts are always exact).
_MAX_RECORDED_IDS = 200


@dataclass(frozen=True)
class DroppedItem:
    """One retrieved item the run may not read."""

    id: str
    """The item's id (as ``id_of`` gave it)."""
    scope: str
    """Its scope, or ``<missing>`` when it had none."""


@dataclass(frozen=True)
class MemoryFiltered(Generic[T]):
    """What one retrieval may hand to the model."""

    kept: tuple[T, ...]
    """The items within the run's memory scopes, in their original order."""
    dropped: tuple[DroppedItem, ...]
    """The items withheld."""
    reason: str | None = None
    """Why nothing was kept at all (the token did not verify, was revoked or expired, or the
    check failed), or ``None`` when the items were filtered by scope."""
    execution_id: str | None = None
    """The execution the retrieval was made for, when the token verified."""


def _scope_text(scope: object) -> str | None:
    return scope if isinstance(scope, str) and scope else None


def _identify(guard: Guard, token: TokenLike | None) -> ExecutionIdentity:
    if token is None:
        raise TokenError("this run carries no execution identity")
    if isinstance(token, ExecutionIdentity):
        identity = guard._identity(token)
    else:
        raw = token.token if isinstance(token, ExecutionToken) else token
        identity = guard.verifier.verify(raw, check_revocation=False)
    revoked = guard.store.revoked((identity.key, *identity.ancestor_keys))
    if revoked:
        raise TokenError("the execution token or one of its ancestors was revoked")
    return identity


def filter_memory(guard: Guard, token: TokenLike | None, items: Iterable[T], *,
                  scope_of: Callable[[T], object], id_of: Callable[[T], object],
                  query: str | None = None, framework: str | None = None) -> MemoryFiltered[T]:
    """Keep the ``items`` the run may read; record the retrieval. Never raises."""
    listed = list(items)
    identity: ExecutionIdentity | None = None
    kept: list[T] = []
    dropped: list[DroppedItem] = []
    reason: str | None = None
    try:
        identity = _identify(guard, token)
        for item in listed:
            scope = _scope_text(scope_of(item))
            if scope is not None and scope in identity.memory_scopes:
                kept.append(item)
            else:
                dropped.append(DroppedItem(str(id_of(item)), scope or MISSING_SCOPE))
    except Exception as exc:  # fail closed: nothing is read
        reason = str(exc) if isinstance(exc, TokenError) else (
            f"the memory check failed ({type(exc).__name__})")
        kept = []
        dropped = [DroppedItem(_safe_id(id_of, item), _safe_scope(scope_of, item))
                   for item in listed]
    result = MemoryFiltered(tuple(kept), tuple(dropped), reason,
                            identity.execution_id if identity is not None else None)
    try:
        _record(guard, identity, result, [_safe_id(id_of, item) for item in kept], query,
                framework)
    except Exception as exc:  # an unrecorded read is no read: fail closed
        log.warning("memory retrieval could not be recorded: %s", type(exc).__name__)
        return MemoryFiltered((), tuple(DroppedItem(_safe_id(id_of, i), _safe_scope(scope_of, i))
                                        for i in listed),
                              f"the audit record could not be written ({type(exc).__name__})",
                              result.execution_id)
    if dropped:
        log.info("memory scopes: withheld %d item(s) for execution %s", len(dropped),
                 result.execution_id or "-")
    return result


def _safe_id(id_of: Callable[[T], object], item: T) -> str:
    try:
        return str(id_of(item))
    except Exception:  # an id is for the record only
        return "<unknown>"


def _safe_scope(scope_of: Callable[[T], object], item: T) -> str:
    try:
        return _scope_text(scope_of(item)) or MISSING_SCOPE
    except Exception:  # a scope is for the record only here
        return MISSING_SCOPE


def _record(guard: Guard, identity: ExecutionIdentity | None, result: MemoryFiltered[T],
            kept_ids: list[str], query: str | None, framework: str | None) -> None:
    if guard.recorder is None:
        return
    audit: dict[str, object] = {}
    if identity is not None:
        guard._identity_audit(identity, audit)
    guard.recorder.record(
        "memory.retrieved", **audit,
        framework=framework or guard.config.framework,
        memory={
            "query_digest": hashlib.sha256(query.encode("utf-8")).hexdigest()
            if query is not None else None,
            "granted_scopes": sorted(identity.memory_scopes) if identity is not None else [],
            "kept_count": len(result.kept),
            "kept_ids": kept_ids[:_MAX_RECORDED_IDS],
            "dropped_count": len(result.dropped),
            "dropped": [{"id": d.id, "scope": d.scope}
                        for d in result.dropped[:_MAX_RECORDED_IDS]],
            "reason": result.reason,
        })
