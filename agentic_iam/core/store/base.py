"""The Store protocol: where budgets, rate limits, revocations, sessions and approvals live.

The Guard talks to a store through :class:`Store` only. Every method that checks and changes
state is one atomic step in every implementation (a lock in :class:`MemoryStore`, one
``BEGIN IMMEDIATE`` transaction in :class:`SqliteStore`, one Lua script in :class:`RedisStore`),
so two processes can never both spend the last unit of a budget.

This module holds the value types, the protocol and the few pure helpers that every
implementation shares (validation, GCRA arithmetic, settlement rules), so the three stores cannot
drift apart on semantics. It must never do I/O, keep state, or read a clock.

Semantics shared by all stores (the contract tests check each one):

* Budgets are integers (minor units), never floats. A grant's budget per dimension is
  ``spent + reserved``; ``admit`` reserves, ``settle`` turns a reservation into spend,
  ``release`` (or expiry) returns it.
* ``settle(rid, actual)`` charges, per reserved dimension, ``min(actual[dim], reserved[dim])``;
  a dimension *absent* from ``actual`` is charged at its full reserved amount (the reservation
  was the estimate, saying nothing means it was used: fail closed). Spend beyond the
  reservation must be recorded with :meth:`Store.charge`.
* A reservation older than its ttl that was never settled is released (amounts, call count and
  action count return). Settling it afterwards is a no-op: the tool ran "for free", so the ttl
  must exceed the longest tool run.
* Rate limits are not part of the reservation: a released call still consumed its rate-limit slot.
* Revocations are kept until ``expires_at + REVOCATION_GRACE_S`` (clock skew and verifier leeway).
* Sessions and grant budgets are forgotten ``state_ttl_s`` after they were last written (default
  one day). That must exceed the longest execution-token lifetime, or a grant's spend could be
  forgotten while its token is still valid.
* The value index (``add_values``) is bounded per session; when full it evicts by label rank,
  lowest first (oldest ``untrusted``, then oldest ``trusted``, then oldest ``request``), so a
  flood of the attacker's own untrusted content can never push out what the user asked for.
* **Epoch.** Every durable store holds an *epoch*: a random id created together with its state
  (``initialize=True`` or ``aiam store init``). A client remembers the epoch it first saw and
  every operation checks, in the same atomic step, that the store still holds one. A store that
  lost its state (Redis restarted without persistence, the SQLite file deleted or replaced)
  has none, and every operation raises :class:`~agentic_iam.errors.StoreStateLostError` (the
  Guard denies) until an operator re-initialises it; forgotten budgets and revocations can
  therefore never turn into allows. An epoch that is present but different (an operator
  re-initialised) is adopted with a warning. A :class:`MemoryStore`'s epoch lives and dies with
  its process, like its state.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol, runtime_checkable

from agentic_iam.errors import StoreError, StoreStateLostError

__all__ = [
    "DEFAULT_MAX_VALUES",
    "DEFAULT_STATE_TTL_S",
    "MAX_AMOUNT",
    "MAX_TAINT_SOURCES",
    "REVOCATION_GRACE_S",
    "VALUE_LABELS",
    "AdmitRequest",
    "AdmitResult",
    "ApprovalStatus",
    "Charge",
    "Dimension",
    "FinishRequest",
    "Outcome",
    "RateLimit",
    "SessionState",
    "Store",
]

Dimension = str
"""A budget dimension: ``"tool_calls"``, ``"cost"``, ``"llm_tokens"``, ``"risk"``."""

Outcome = Literal["admitted", "revoked", "rate_limited", "budget_exhausted"]
ApprovalStatus = Literal["pending", "approved", "denied", "consumed"]

#: Largest amount or limit a store accepts. Redis runs Lua, whose numbers are doubles: above
#: 2**53 integers stop being exact, so every store refuses them for identical behaviour.
MAX_AMOUNT = 2**53 - 1

#: ``SessionState.tainted_by`` keeps at most this many sources (the newest; the session stays
#: tainted through its labels even when an old source is dropped).
MAX_TAINT_SOURCES = 32

#: A revocation outlives the token's ``exp`` by this much, so a verifier with leeway or a host
#: with a skewed clock cannot accept a revoked token just after its expiry.
REVOCATION_GRACE_S = 300

#: Sessions and grant budgets are purged this long after their last write.
DEFAULT_STATE_TTL_S = 86_400.0

#: Default bound of a session's value index (``add_values``' ``max_values``).
DEFAULT_MAX_VALUES = 4096

#: Argument-provenance labels, best first rank highest. ``add_values`` keeps the best label.
VALUE_LABELS: Mapping[str, int] = MappingProxyType({"untrusted": 1, "trusted": 2, "request": 3})

# Tolerance for GCRA comparisons: float arithmetic on epoch seconds is exact to ~0.2 us, so an
# exact comparison could refuse the last call of a burst. One microsecond is far below any
# configured emission interval.
_GCRA_EPSILON_S = 1e-6


@dataclass(frozen=True)
class Charge:
    """One grant that a call is charged to, with that grant's limits."""

    grant: str
    """Grant key ``"iss|jti"``: the calling token first, then each ancestor."""

    limits: Mapping[str, int | None] = field(default_factory=dict)
    """Limit per dimension; ``None`` or absent means unlimited for this grant (still counted)."""


@dataclass(frozen=True)
class RateLimit:
    """A GCRA rate limit (sustained rate plus burst) on one key."""

    key: str
    """What is limited, e.g. ``"exec:iss|jti"`` or ``"agent:support-agent"``."""

    per_second: float
    """Sustained rate; GCRA emission interval = ``1 / per_second``. Configuration, not money."""

    burst: int
    """Bucket size: how many calls may arrive at once after a quiet period."""


@dataclass(frozen=True)
class AdmitRequest:
    """Everything ``Store.admit`` needs to admit one tool call in one atomic step."""

    reservation_id: str
    """Unique per call; names the reservation for ``settle`` and ``release``."""

    session: str
    """Session key of the calling execution, ``"iss|jti"``."""

    action: str
    """The tool action, counted per session in ``SessionState.action_counts``."""

    revocation_keys: tuple[str, ...]
    """``"iss|jti"`` of the token and all its ancestors; any revoked one refuses the call."""

    rate_limits: tuple[RateLimit, ...]
    """Every limit must allow the call; none is consumed unless all allow it."""

    charges: tuple[Charge, ...]
    """The calling grant first, then its ancestors; amounts are reserved on every one."""

    amounts: Mapping[str, int]
    """Amount per dimension to reserve, each ``>= 0``."""

    reservation_ttl_s: float = 300.0
    """An unsettled reservation expires after this long and its amounts return."""

    value_digests: tuple[str, ...] = ()
    """Argument-provenance digests to look up in the same step (``AdmitResult.value_labels``),
    so that a call with target arguments still costs one round trip."""

    seed_values: Mapping[str, str] = field(default_factory=dict)
    """Digest → label to add to the session's value index (``add_values`` semantics, bound
    ``DEFAULT_MAX_VALUES``) in the same step, only if the call is admitted, and before
    ``value_digests`` are looked up. The Guard seeds what the delegator asked for with the
    first admitted call of a session, so that call still costs one round trip."""


@dataclass(frozen=True)
class FinishRequest:
    """Everything the end of one call changes, for ``Store.finish`` (one atomic step).

    What screening observed in the tool's output (risk, labels, taint, argument provenance)
    travels with the settlement, so a guarded call costs two round trips: ``admit`` and
    ``finish``. With ``reservation_id`` None it only records observations (a flush).
    """

    session: str
    """Session key of the calling execution, ``"iss|jti"`` of the root grant."""

    reservation_id: str | None = None
    """The reservation to settle or release; None: no reservation (observations only)."""

    actual: Mapping[str, int] | None = None
    """Settle with these amounts (``settle`` semantics); None: release the reservation."""

    risk: int = 0
    """Risk to add to the session (``add_risk``), whatever happens to the reservation."""

    labels: tuple[str, ...] = ()
    """Labels to add to the session (``add_risk``)."""

    tainted_by: tuple[str, ...] = ()
    """Taint sources to add, oldest first (``add_risk``, bounded by ``MAX_TAINT_SOURCES``)."""

    values: Mapping[str, str] = field(default_factory=dict)
    """Digest → label to add to the value index (``add_values``)."""

    max_values: int = DEFAULT_MAX_VALUES
    """Bound of the value index (``add_values``)."""

    event: Mapping[str, Any] | None = None
    """A JSON-serialisable event to append to the session (``append_event``), or None."""

    max_events: int = 256
    """Bound of the session's event list (``append_event``)."""

    @property
    def observes(self) -> bool:
        """Whether it changes the session's risk, labels, taint or value index."""
        return bool(self.risk or self.labels or self.tainted_by or self.values)


@dataclass(frozen=True)
class SessionState:
    """What a policy may know about the session so far."""

    call_count: int
    """Admitted calls (settled or still reserved) before this one."""

    action_counts: Mapping[str, int]
    """Admitted calls per action before this one (so a policy can say "at most 3 refunds")."""

    labels: frozenset[str]
    """Labels added by ``add_risk`` (e.g. ``"untrusted_content"``)."""

    risk: int
    """Accumulated risk: settled + reserved ``risk`` amounts + everything added by ``add_risk``."""

    tainted_by: tuple[str, ...]
    """Sources that tainted the session (e.g. ``"tool:read_ticket#call_1"``), oldest first.

    Bounded: the newest ``MAX_TAINT_SOURCES`` are kept.
    """


@dataclass(frozen=True)
class AdmitResult:
    """The outcome of ``Store.admit``."""

    outcome: Outcome
    """``"admitted"`` or why not."""

    detail: str
    """The revoked key, the rate-limit key, or the exhausted ``"grant|dimension"``; else ``""``."""

    retry_after_s: float
    """For ``rate_limited``: seconds until every refusing limit would allow the call; else 0."""

    remaining: Mapping[str, int | None]
    """Calling grant, per dimension, after this reservation (``None`` = unlimited)."""

    session: SessionState
    """Session state before this call."""

    value_labels: Mapping[str, str] = field(default_factory=dict)
    """For ``admitted``: the best label of each requested digest that was seen (see
    ``Store.value_labels``); digests never seen are absent."""


@runtime_checkable
class Store(Protocol):
    """Budgets, rate limits, revocations, session state and approvals, each change atomic.

    A store that cannot answer within its timeout raises
    :class:`~agentic_iam.errors.StoreUnavailableError`; the Guard turns that into a deny.
    Invalid arguments raise :class:`~agentic_iam.errors.StoreError`.
    """

    def admit(self, request: AdmitRequest) -> AdmitResult:
        """Admit one call atomically, or say why not (nothing changes unless admitted).

        In order: expired reservations are released; (1) a revoked ``revocation_keys`` entry
        gives ``"revoked"``; (2) every rate limit is checked with GCRA on the store's clock, and
        if any refuses, ``"rate_limited"`` and no rate-limit state is consumed; (3) for every
        charge and every dimension with a limit, ``spent + reserved + amount <= limit`` or
        ``"budget_exhausted"`` naming ``grant|dimension``; (4) amounts are reserved on every
        charge, the rate limits consumed, the session's call and action counts incremented (part
        of the reservation), and the result carries ``remaining`` and the session state before
        the call. A ``reservation_id`` that is already live raises ``StoreError``.
        """
        ...

    def settle(self, reservation_id: str, actual: Mapping[str, int]) -> None:
        """Turn a reservation into spend (see the module docstring for the amounts charged).

        Call and action counts stay. Settling or releasing twice, or an unknown or expired
        reservation, is a no-op.
        """
        ...

    def release(self, reservation_id: str) -> None:
        """Undo a reservation: amounts, call count and action count return. Idempotent."""
        ...

    def finish(self, request: FinishRequest) -> None:
        """End one call in one atomic step (one round trip).

        The observations (``risk``, ``labels``, ``tainted_by`` as ``add_risk``; ``values`` as
        ``add_values``) are recorded unconditionally; the reservation, if named, is settled
        with ``actual`` (``settle``) or released (``actual`` None, ``release``), an unknown or
        expired one as those say; the ``event`` is appended (``append_event``). The request is
        validated before anything changes. Running the same request twice settles once but may
        add its risk twice (errs towards denying), so a caller may retry a failed ``finish``.
        """
        ...

    def charge(self, grants: Sequence[str], amounts: Mapping[str, int]) -> None:
        """Spend unconditionally on every listed grant (e.g. LLM tokens reported afterwards).

        May exceed a limit; later admits on that grant are then refused.
        """
        ...

    def remaining(self, grant: str, limits: Mapping[str, int | None]) -> Mapping[str, int | None]:
        """``limit - spent - reserved`` per dimension of ``limits`` (>= 0; None = unlimited)."""
        ...

    def add_risk(
        self,
        session: str,
        amount: int,
        labels: Iterable[str] = (),
        tainted_by: str | None = None,
    ) -> SessionState:
        """Add risk, labels and a taint source unconditionally (firewall findings).

        Returns the new state.
        """
        ...

    def session_state(self, session: str) -> SessionState:
        """The session's current state (zeros for an unknown session)."""
        ...

    def append_event(
        self, session: str, event: Mapping[str, Any], *, max_events: int = 256
    ) -> None:
        """Append a JSON-serialisable event; the list keeps the newest ``max_events``."""
        ...

    def events(self, session: str) -> list[dict[str, Any]]:
        """The session's events, oldest first."""
        ...

    def add_values(
        self, session: str, digests: Mapping[str, str], *, max_values: int = 4096
    ) -> None:
        """Record argument provenance: digest → label, keeping the best label.

        Rank ``"request"`` > ``"trusted"`` > ``"untrusted"``. Bounded: when more than
        ``max_values`` digests are held, the lowest-ranked are evicted first, least recently
        added first within a rank (all ``untrusted`` before any ``trusted``, all ``trusted``
        before any ``request``). Each add costs O(log n) plus the number evicted.
        """
        ...

    def value_labels(self, session: str, digests: Sequence[str]) -> Mapping[str, str]:
        """The best known label of each digest that is known."""
        ...

    def revoke(self, key: str, *, expires_at: int) -> None:
        """Revoke ``"iss|jti"`` until ``expires_at`` (unix seconds) plus ``REVOCATION_GRACE_S``."""
        ...

    def revoked(self, keys: Sequence[str]) -> frozenset[str]:
        """The subset of ``keys`` that is revoked."""
        ...

    def put_approval(
        self, request_id: str, binding: str, payload: Mapping[str, Any], *, ttl_s: float
    ) -> None:
        """Record a pending approval request; ``binding`` = execution id + digest of tool and args.

        A ``request_id`` that already exists raises ``ApprovalError``. The record is gone
        ``ttl_s`` after creation, whatever its status.
        """
        ...

    def resolve_approval(
        self, request_id: str, *, approved: bool, approver: str
    ) -> Mapping[str, Any]:
        """Move a pending request to approved/denied and return the record.

        Raises ``ApprovalError`` if it is unknown, expired or already resolved.
        """
        ...

    def consume_approval(self, binding: str) -> bool:
        """Atomically mark one approved, unconsumed, unexpired approval for ``binding`` consumed.

        True exactly once per approval, however many callers race.
        """
        ...

    def get_approval(self, request_id: str) -> Mapping[str, Any] | None:
        """The record, or None if unknown or expired."""
        ...

    def list_approvals(self, status: str | None = None) -> list[Mapping[str, Any]]:
        """Unexpired records (optionally of one status), oldest first."""
        ...

    def close(self) -> None:
        """Release connections. The store must not be used afterwards."""
        ...


# --- shared helpers (internal: used by the implementations, not exported by the package) ---


def check_key(value: object, what: str) -> str:
    """A non-empty string key, or StoreError naming the field."""
    if not isinstance(value, str) or not value:
        raise StoreError(f"`{what}` must be a non-empty string")
    return value


def check_int(value: object, what: str) -> int:
    """An integer amount in ``[0, MAX_AMOUNT]``. Bools and floats are refused (no coercion)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise StoreError(f"`{what}` must be an integer (minor units), got {type(value).__name__}")
    if value < 0 or value > MAX_AMOUNT:
        raise StoreError(f"`{what}` must be between 0 and {MAX_AMOUNT}, got {value}")
    return value


def check_amounts(amounts: Mapping[str, int], what: str) -> dict[str, int]:
    """A validated copy of a dimension → amount mapping."""
    if not isinstance(amounts, Mapping):
        raise StoreError(f"`{what}` must be a mapping of dimension to integer")
    return {
        check_key(dim, f"{what} dimension"): check_int(v, f"{what}[{dim}]")
        for dim, v in amounts.items()
    }


def check_limits(limits: Mapping[str, int | None], what: str) -> dict[str, int | None]:
    """A validated copy of a dimension → limit mapping (``None`` = unlimited)."""
    if not isinstance(limits, Mapping):
        raise StoreError(f"`{what}` must be a mapping of dimension to integer or None")
    return {
        check_key(dim, f"{what} dimension"): None if v is None else check_int(v, f"{what}[{dim}]")
        for dim, v in limits.items()
    }


def check_positive(value: object, what: str) -> float:
    """A finite number > 0 (durations, rates)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StoreError(f"`{what}` must be a number")
    if not math.isfinite(value) or value <= 0:
        raise StoreError(f"`{what}` must be finite and > 0, got {value}")
    return float(value)


def check_bound(value: object, what: str) -> int:
    """A positive integer bound (``max_events``, ``max_values``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StoreError(f"`{what}` must be an integer >= 1")
    return value


def check_admit(request: AdmitRequest) -> None:
    """Validate a request before any state is touched, identically for every store."""
    if not isinstance(request, AdmitRequest):
        raise StoreError("`request` must be an AdmitRequest")
    check_key(request.reservation_id, "reservation_id")
    check_key(request.session, "session")
    check_key(request.action, "action")
    for key in request.revocation_keys:
        check_key(key, "revocation_keys[]")
    for rate in request.rate_limits:
        check_key(rate.key, "rate_limits[].key")
        check_positive(rate.per_second, f"rate_limits[{rate.key}].per_second")
        if isinstance(rate.burst, bool) or not isinstance(rate.burst, int) or rate.burst < 1:
            raise StoreError(f"`rate_limits[{rate.key}].burst` must be an integer >= 1")
    for charge in request.charges:
        check_key(charge.grant, "charges[].grant")
        check_limits(charge.limits, f"charges[{charge.grant}].limits")
    check_amounts(request.amounts, "amounts")
    check_positive(request.reservation_ttl_s, "reservation_ttl_s")
    for digest in request.value_digests:
        check_key(digest, "value_digests[]")
    check_values(request.seed_values, "seed_values")


def check_values(values: Mapping[str, str], what: str) -> list[tuple[str, str]]:
    """Validated ``(digest, label)`` pairs of a digest → label mapping."""
    if not isinstance(values, Mapping):
        raise StoreError(f"`{what}` must be a mapping of digest to label")
    return [(check_key(d, f"{what} digest"), check_label(label)) for d, label in values.items()]


def check_finish(request: FinishRequest) -> str | None:
    """Validate a finish request before any state is touched; its event as JSON text."""
    if not isinstance(request, FinishRequest):
        raise StoreError("`request` must be a FinishRequest")
    check_key(request.session, "session")
    if request.reservation_id is not None:
        check_key(request.reservation_id, "reservation_id")
    if request.actual is not None:
        check_amounts(request.actual, "actual")
    check_int(request.risk, "risk")
    for label in request.labels:
        check_key(label, "labels[]")
    for source in request.tainted_by:
        check_key(source, "tainted_by[]")
    check_values(request.values, "values")
    check_bound(request.max_values, "max_values")
    check_bound(request.max_events, "max_events")
    return None if request.event is None else dump_json(request.event, "event")


def check_label(label: object) -> str:
    """One of ``VALUE_LABELS``."""
    if not isinstance(label, str) or label not in VALUE_LABELS:
        raise StoreError(f"value label must be one of {sorted(VALUE_LABELS)}, got `{label}`")
    return label


def better_label(old: str | None, new: str) -> str:
    """The higher-ranked of two provenance labels."""
    if old is None or VALUE_LABELS.get(new, 0) > VALUE_LABELS.get(old, 0):
        return new
    return old


def distinct_grants(charges: Sequence[Charge]) -> tuple[str, ...]:
    """Grants in charge order, each once: a grant listed twice is still charged once."""
    return tuple(dict.fromkeys(c.grant for c in charges))


def gcra(tat: float | None, now: float, per_second: float, burst: int) -> tuple[bool, float, float]:
    """One GCRA step. Returns ``(allowed, new_tat, retry_after_s)``.

    ``tat`` is the theoretical arrival time stored for the key (None if none). A call is allowed
    when, after it, the bucket would not run more than ``burst`` emission intervals ahead of now.
    When refused, ``new_tat`` is the unchanged ``tat`` (refusals consume nothing).
    """
    interval = 1.0 / per_second
    base = now if tat is None or tat < now else tat
    new_tat = base + interval
    ahead = new_tat - now - burst * interval
    if ahead > _GCRA_EPSILON_S:
        return False, base, ahead
    return True, new_tat, 0.0


def settled_amount(reserved: int, actual: int | None) -> int:
    """What settling charges for one dimension: never more than reserved; absent = reserved."""
    if actual is None:
        return reserved
    return min(actual, reserved)


def remaining_of(
    dims: Iterable[str],
    limits: Mapping[str, int | None],
    spent: Mapping[str, int],
    reserved: Mapping[str, int],
) -> dict[str, int | None]:
    """Remaining budget per dimension: ``max(0, limit - spent - reserved)``; None = unlimited."""
    out: dict[str, int | None] = {}
    for dim in sorted(set(dims)):
        limit = limits.get(dim)
        out[dim] = (
            None if limit is None else max(0, limit - spent.get(dim, 0) - reserved.get(dim, 0))
        )
    return out


def result_dims(request: AdmitRequest) -> list[str]:
    """Dimensions in ``AdmitResult.remaining``: the calling grant's limits and the amounts."""
    dims = set(request.amounts)
    if request.charges:
        dims.update(request.charges[0].limits)
    return sorted(dims)


def make_session(
    call_count: int,
    action_counts: Mapping[str, int],
    labels: Iterable[str],
    risk: int,
    tainted_by: Iterable[str],
) -> SessionState:
    """A SessionState with read-only copies of its collections."""
    return SessionState(
        call_count=max(0, call_count),
        action_counts=MappingProxyType({a: c for a, c in action_counts.items() if c > 0}),
        labels=frozenset(labels),
        risk=max(0, risk),
        tainted_by=tuple(tainted_by),
    )


EMPTY_SESSION = make_session(0, {}, (), 0, ())


def make_result(
    outcome: Outcome,
    detail: str,
    retry_after_s: float,
    remaining: Mapping[str, int | None],
    session: SessionState,
    value_labels: Mapping[str, str] | None = None,
) -> AdmitResult:
    """An AdmitResult with read-only ``remaining`` and ``value_labels``."""
    return AdmitResult(
        outcome=outcome,
        detail=detail,
        retry_after_s=retry_after_s,
        remaining=MappingProxyType(dict(remaining)),
        session=session,
        value_labels=MappingProxyType(dict(value_labels or {})),
    )


def with_value_labels(store: Store, request: AdmitRequest, result: AdmitResult) -> AdmitResult:
    """``result`` with the request's provenance labels, for stores without a network hop
    (memory, SQLite): the labels are advisory context read right after admission."""
    if result.outcome != "admitted" or not request.value_digests:
        return result
    labels = store.value_labels(request.session, request.value_digests)
    return make_result(result.outcome, result.detail, result.retry_after_s, result.remaining,
                       result.session, labels)


def new_epoch(now: float | None = None) -> str:
    """A fresh store epoch: creation time (UTC, for operators) plus 96 random bits."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"ep-{stamp}-{secrets.token_hex(12)}"


def state_lost(store: str, what: str, init_spec: str) -> StoreStateLostError:
    """The error every durable store raises when its epoch is gone (or was never created)."""
    return StoreStateLostError(
        f"{store}: {what}. Budgets, revocations, sessions and approvals it held may be gone, "
        "so every call is denied. Find out what happened, then run `aiam store init --store "
        f"{init_spec}` to start a new epoch",
        store=store,
    )


def add_taint(sources: list[str], source: str | None) -> list[str]:
    """Append a taint source once, keeping the newest ``MAX_TAINT_SOURCES``."""
    if source is None or source in sources:
        return sources
    return [*sources, source][-MAX_TAINT_SOURCES:]


def dump_json(value: Mapping[str, Any], what: str) -> str:
    """Canonical JSON for stored events and payloads; StoreError if not serialisable.

    Every store round-trips through JSON, so the memory store accepts exactly what the
    durable stores can hold, and callers get copies they cannot alias.
    """
    try:
        return json.dumps(dict(value), separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"`{what}` must be JSON-serialisable: {exc}") from exc


def approval_record(
    request_id: str,
    binding: str,
    status: str,
    approver: str | None,
    payload: Mapping[str, Any],
    created_at: float,
    expires_at: float,
) -> dict[str, Any]:
    """The approval record shape shared by every store."""
    return {
        "request_id": request_id,
        "binding": binding,
        "status": status,
        "approver": approver,
        "payload": payload,
        "created_at": created_at,
        "expires_at": expires_at,
    }
