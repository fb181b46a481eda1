"""In-process store: the default for one process, and the test double for everything else.

All state lives in dicts behind one ``threading.Lock``, so each operation is atomic with respect
to other threads of the same process. It must never be shared between processes (each process
would get its own copy and budgets would multiply): use :class:`SqliteStore` or
:class:`RedisStore` for that.
"""

from __future__ import annotations

import heapq
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentic_iam.core.store.base import (
    DEFAULT_MAX_VALUES,
    DEFAULT_STATE_TTL_S,
    EMPTY_SESSION,
    REVOCATION_GRACE_S,
    VALUE_LABELS,
    AdmitRequest,
    AdmitResult,
    FinishRequest,
    SessionState,
    add_taint,
    approval_record,
    better_label,
    check_admit,
    check_amounts,
    check_bound,
    check_finish,
    check_int,
    check_key,
    check_label,
    check_limits,
    check_positive,
    check_values,
    distinct_grants,
    dump_json,
    gcra,
    make_result,
    make_session,
    new_epoch,
    remaining_of,
    result_dims,
    settled_amount,
    with_value_labels,
)
from agentic_iam.errors import ApprovalError, StoreError

__all__ = ["MemoryStore"]

# How often (store clock seconds) stale sessions, budgets and expired records are purged.
_PURGE_EVERY_S = 60.0


@dataclass
class _Reservation:
    """A live reservation (internal, mutable)."""

    session: str
    """Session whose counts it holds."""
    action: str
    """Action whose count it holds."""
    grants: tuple[str, ...]
    """Grants it is reserved on."""
    amounts: dict[str, int]
    """Reserved amount per dimension."""
    expires_at: float
    """Store-clock time after which it is released."""


@dataclass
class _Session:
    """Mutable per-session state (internal)."""

    touched: float
    """Last write, for purging."""
    call_count: int = 0
    """Admitted calls (settled or reserved)."""
    actions: dict[str, int] = field(default_factory=dict)
    """Admitted calls per action."""
    labels: set[str] = field(default_factory=set)
    """Labels from ``add_risk``."""
    risk: int = 0
    """Accumulated risk."""
    tainted_by: list[str] = field(default_factory=list)
    """Taint sources, oldest first."""
    live: int = 0
    """Live reservations held by this session (it is never purged while > 0)."""
    events: list[str] = field(default_factory=list)
    """Events as JSON text, oldest first."""
    values: dict[str, str] = field(default_factory=dict)
    """Digest → best label."""
    value_order: dict[str, OrderedDict[str, None]] = field(default_factory=dict)
    """Per label, its digests least recently added first (eviction order within a rank)."""

    def state(self) -> SessionState:
        return make_session(self.call_count, self.actions, self.labels, self.risk, self.tainted_by)


@dataclass
class _Budget:
    """Spend and reservations of one grant (internal)."""

    touched: float
    """Last write, for purging."""
    spent: dict[str, int] = field(default_factory=dict)
    """Settled or charged amount per dimension."""
    reserved: dict[str, int] = field(default_factory=dict)
    """Reserved amount per dimension."""


class MemoryStore:
    """A :class:`~agentic_iam.core.store.base.Store` in this process's memory.

    ``clock`` (unix seconds) drives GCRA, reservation expiry and approvals; tests may pass a
    fake one. ``state_ttl_s``: sessions and budgets not written for that long are purged.
    Its epoch is created with it and dies with it, like its state: nothing to check.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        state_ttl_s: float = DEFAULT_STATE_TTL_S,
    ) -> None:
        self._clock = clock
        self._state_ttl_s = check_positive(state_ttl_s, "state_ttl_s")
        self._lock = threading.Lock()
        self._budgets: dict[str, _Budget] = {}
        self._reservations: dict[str, _Reservation] = {}
        self._expiry: list[tuple[float, str]] = []  # heap of (expires_at, reservation id)
        self._sessions: dict[str, _Session] = {}
        self._rates: dict[str, float] = {}  # key -> GCRA theoretical arrival time
        self._revoked: dict[str, float] = {}  # key -> held until
        self._approvals: dict[str, dict[str, Any]] = {}
        self._last_purge = clock()
        self._epoch = new_epoch(self._last_purge)

    @property
    def epoch(self) -> str:
        """This store's epoch (created with it; see the module docstring of ``base``)."""
        return self._epoch

    def read_epoch(self) -> str:
        """The epoch the store holds: for a memory store, always its own."""
        return self._epoch

    # --- internals (call with the lock held) ------------------------------------------------

    def _session(self, key: str, now: float) -> _Session:
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = _Session(touched=now)
        session.touched = now
        return session

    def _budget(self, grant: str, now: float) -> _Budget:
        budget = self._budgets.get(grant)
        if budget is None:
            budget = self._budgets[grant] = _Budget(touched=now)
        budget.touched = now
        return budget

    def _finish(self, rid: str, actual: Mapping[str, int] | None, now: float) -> None:
        """Settle (``actual`` given) or release (None) a reservation; expired ones are released."""
        resv = self._reservations.pop(rid, None)
        if resv is None:
            return
        if resv.expires_at <= now:
            actual = None  # expired: its amounts already belong back to the grants
        risk_back = 0
        for dim, reserved in resv.amounts.items():
            charged = 0 if actual is None else settled_amount(reserved, actual.get(dim))
            for grant in resv.grants:
                budget = self._budget(grant, now)
                budget.reserved[dim] = max(0, budget.reserved.get(dim, 0) - reserved)
                if charged:
                    budget.spent[dim] = budget.spent.get(dim, 0) + charged
            if dim == "risk":
                risk_back = reserved - charged
        session = self._sessions.get(resv.session)
        if session is not None:
            session.live -= 1
            session.risk = max(0, session.risk - risk_back)
            if actual is None:  # release: the call never counted
                session.call_count = max(0, session.call_count - 1)
                left = session.actions.get(resv.action, 0) - 1
                if left > 0:
                    session.actions[resv.action] = left
                else:
                    session.actions.pop(resv.action, None)

    def _maintain(self, now: float) -> None:
        """Release expired reservations; now and then purge what nobody needs any more."""
        while self._expiry and self._expiry[0][0] <= now:
            _, rid = heapq.heappop(self._expiry)
            resv = self._reservations.get(rid)
            if resv is not None and resv.expires_at <= now:
                self._finish(rid, None, now)
        if len(self._expiry) > 2 * len(self._reservations) + 1024:
            # Settled reservations leave their heap entries behind; rebuild now and then so
            # the heap stays proportional to the live reservations, not to the call rate.
            self._expiry = [(r.expires_at, rid) for rid, r in self._reservations.items()]
            heapq.heapify(self._expiry)
        if now - self._last_purge < _PURGE_EVERY_S:
            return
        self._last_purge = now
        cutoff = now - self._state_ttl_s
        for key in [k for k, s in self._sessions.items() if s.touched < cutoff and s.live <= 0]:
            del self._sessions[key]
        for key in [
            k
            for k, b in self._budgets.items()
            if b.touched < cutoff and not any(b.reserved.values())
        ]:
            del self._budgets[key]
        for key in [k for k, tat in self._rates.items() if tat <= now]:
            del self._rates[key]  # a TAT in the past is the same as no state
        for key in [k for k, until in self._revoked.items() if until <= now]:
            del self._revoked[key]
        for key in [k for k, a in self._approvals.items() if a["expires_at"] <= now]:
            del self._approvals[key]

    def _session_state(self, key: str) -> SessionState:
        session = self._sessions.get(key)
        return EMPTY_SESSION if session is None else session.state()

    def _is_revoked(self, key: str, now: float) -> bool:
        until = self._revoked.get(key)
        return until is not None and until > now

    def _live_approval(self, request_id: str, now: float) -> dict[str, Any] | None:
        record = self._approvals.get(request_id)
        if record is None or record["expires_at"] <= now:
            return None
        return record

    # --- budgets and rate limits ------------------------------------------------------------

    def admit(self, request: AdmitRequest) -> AdmitResult:
        return with_value_labels(self, request, self._admit(request))

    def _admit(self, request: AdmitRequest) -> AdmitResult:
        check_admit(request)
        seeds = check_values(request.seed_values, "seed_values")
        amounts = dict(request.amounts)
        grants = distinct_grants(request.charges)
        dims = result_dims(request)
        calling_limits = (
            check_limits(request.charges[0].limits, "limits") if request.charges else {}
        )
        with self._lock:
            now = self._clock()
            self._maintain(now)
            if request.reservation_id in self._reservations:
                raise StoreError(f"reservation `{request.reservation_id}` already exists")
            before = self._session_state(request.session)

            def current() -> dict[str, int | None]:
                budget = self._budgets.get(grants[0]) if grants else None
                if budget is None:
                    return remaining_of(dims, calling_limits, {}, {})
                return remaining_of(dims, calling_limits, budget.spent, budget.reserved)

            for key in request.revocation_keys:
                if self._is_revoked(key, now):
                    return make_result("revoked", key, 0.0, current(), before)

            new_tats: dict[str, float] = {}
            refused: str | None = None
            retry_after = 0.0
            for rate in request.rate_limits:
                tat = new_tats.get(rate.key, self._rates.get(rate.key))
                allowed, new_tat, wait = gcra(tat, now, rate.per_second, rate.burst)
                if allowed:
                    new_tats[rate.key] = new_tat
                else:
                    refused = refused or rate.key
                    retry_after = max(retry_after, wait)
            if refused is not None:
                return make_result("rate_limited", refused, retry_after, current(), before)

            for charge in request.charges:
                budget = self._budgets.get(charge.grant)
                spent = budget.spent if budget else {}
                reserved = budget.reserved if budget else {}
                for dim, limit in sorted(charge.limits.items()):
                    if limit is None:
                        continue
                    if spent.get(dim, 0) + reserved.get(dim, 0) + amounts.get(dim, 0) > limit:
                        return make_result(
                            "budget_exhausted", f"{charge.grant}|{dim}", 0.0, current(), before
                        )

            # Every check passed: only now change anything.
            self._rates.update(new_tats)
            positive = {dim: amount for dim, amount in amounts.items() if amount > 0}
            for grant in grants:
                budget = self._budget(grant, now)
                for dim, amount in positive.items():
                    budget.reserved[dim] = budget.reserved.get(dim, 0) + amount
            session = self._session(request.session, now)
            session.call_count += 1
            session.actions[request.action] = session.actions.get(request.action, 0) + 1
            session.risk += positive.get("risk", 0)
            session.live += 1
            expires_at = now + request.reservation_ttl_s
            self._reservations[request.reservation_id] = _Reservation(
                session=request.session,
                action=request.action,
                grants=grants,
                amounts=positive,
                expires_at=expires_at,
            )
            heapq.heappush(self._expiry, (expires_at, request.reservation_id))
            if seeds:
                self._add_values(session, seeds, DEFAULT_MAX_VALUES)
            return make_result("admitted", "", 0.0, current(), before)

    def settle(self, reservation_id: str, actual: Mapping[str, int]) -> None:
        check_key(reservation_id, "reservation_id")
        actual = check_amounts(actual, "actual")
        with self._lock:
            now = self._clock()
            self._maintain(now)
            self._finish(reservation_id, actual, now)

    def release(self, reservation_id: str) -> None:
        check_key(reservation_id, "reservation_id")
        with self._lock:
            now = self._clock()
            self._maintain(now)
            self._finish(reservation_id, None, now)

    def finish(self, request: FinishRequest) -> None:
        """See :meth:`Store.finish`. Runs as this store's own ``settle`` (or ``release``) step
        and then one session step under the lock: a subclass that overrides ``settle`` keeps
        its behaviour, and a settle that raises leaves the session unchanged (so the caller's
        retry adds nothing twice). In one process the output is not handed on before
        ``finish`` returns, so nothing can decide on it between the two steps."""
        event = check_finish(request)
        values = list(request.values.items())
        if request.reservation_id is not None:
            if request.actual is None:
                self.release(request.reservation_id)
            else:
                self.settle(request.reservation_id, request.actual)
        if not request.observes and event is None:
            return
        with self._lock:
            now = self._clock()
            state = self._session(request.session, now)
            state.risk += request.risk
            state.labels.update(request.labels)
            for source in request.tainted_by:
                state.tainted_by = add_taint(state.tainted_by, source)
            if values:
                self._add_values(state, values, request.max_values)
            if event is not None:
                state.events.append(event)
                del state.events[:-request.max_events]

    def charge(self, grants: Sequence[str], amounts: Mapping[str, int]) -> None:
        grant_keys = tuple(dict.fromkeys(check_key(g, "grants[]") for g in grants))
        amounts = check_amounts(amounts, "amounts")
        with self._lock:
            now = self._clock()
            self._maintain(now)
            for grant in grant_keys:
                budget = self._budget(grant, now)
                for dim, amount in amounts.items():
                    budget.spent[dim] = budget.spent.get(dim, 0) + amount

    def remaining(self, grant: str, limits: Mapping[str, int | None]) -> Mapping[str, int | None]:
        check_key(grant, "grant")
        limits = check_limits(limits, "limits")
        with self._lock:
            self._maintain(self._clock())
            budget = self._budgets.get(grant)
            if budget is None:
                return remaining_of(limits, limits, {}, {})
            return remaining_of(limits, limits, budget.spent, budget.reserved)

    # --- sessions ----------------------------------------------------------------------------

    def add_risk(
        self,
        session: str,
        amount: int,
        labels: Iterable[str] = (),
        tainted_by: str | None = None,
    ) -> SessionState:
        check_key(session, "session")
        check_int(amount, "amount")
        label_set = {check_key(label, "labels[]") for label in labels}
        if tainted_by is not None:
            check_key(tainted_by, "tainted_by")
        with self._lock:
            now = self._clock()
            self._maintain(now)
            state = self._session(session, now)
            state.risk += amount
            state.labels |= label_set
            state.tainted_by = add_taint(state.tainted_by, tainted_by)
            return state.state()

    def session_state(self, session: str) -> SessionState:
        check_key(session, "session")
        with self._lock:
            self._maintain(self._clock())
            return self._session_state(session)

    def append_event(
        self, session: str, event: Mapping[str, Any], *, max_events: int = 256
    ) -> None:
        check_key(session, "session")
        check_bound(max_events, "max_events")
        text = dump_json(event, "event")
        with self._lock:
            state = self._session(session, self._clock())
            state.events.append(text)
            del state.events[:-max_events]

    def events(self, session: str) -> list[dict[str, Any]]:
        check_key(session, "session")
        with self._lock:
            state = self._sessions.get(session)
            texts = list(state.events) if state else []
        return [json.loads(text) for text in texts]

    def add_values(
        self, session: str, digests: Mapping[str, str], *, max_values: int = 4096
    ) -> None:
        check_key(session, "session")
        check_bound(max_values, "max_values")
        items = [(check_key(d, "digest"), check_label(label)) for d, label in digests.items()]
        with self._lock:
            self._add_values(self._session(session, self._clock()), items, max_values)

    @staticmethod
    def _add_values(state: _Session, items: Iterable[tuple[str, str]], max_values: int) -> None:
        """``add_values`` on one session (lock held, items validated)."""
        values, order = state.values, state.value_order
        for digest, label in items:
            old = values.get(digest)
            best = better_label(old, label)
            if old is not None:
                del order[old][digest]
            values[digest] = best
            order.setdefault(best, OrderedDict())[digest] = None  # re-add = newest
        # Evict lowest rank first, oldest first within it: the attacker's own untrusted
        # content can never push out a request or trusted value (issue 13, item 5).
        excess = len(values) - max_values
        for label in sorted(order, key=VALUE_LABELS.__getitem__):
            bucket = order[label]
            while excess > 0 and bucket:
                digest, _ = bucket.popitem(last=False)
                del values[digest]
                excess -= 1

    def value_labels(self, session: str, digests: Sequence[str]) -> Mapping[str, str]:
        check_key(session, "session")
        with self._lock:
            state = self._sessions.get(session)
            if state is None:
                return {}
            return {d: state.values[d] for d in digests if d in state.values}

    # --- revocation ---------------------------------------------------------------------------

    def revoke(self, key: str, *, expires_at: int) -> None:
        check_key(key, "key")
        check_int(expires_at, "expires_at")
        with self._lock:
            now = self._clock()
            until = max(float(expires_at), now) + REVOCATION_GRACE_S
            self._revoked[key] = max(until, self._revoked.get(key, 0.0))

    def revoked(self, keys: Sequence[str]) -> frozenset[str]:
        with self._lock:
            now = self._clock()
            return frozenset(k for k in keys if self._is_revoked(k, now))

    # --- approvals ----------------------------------------------------------------------------

    def put_approval(
        self, request_id: str, binding: str, payload: Mapping[str, Any], *, ttl_s: float
    ) -> None:
        check_key(request_id, "request_id")
        check_key(binding, "binding")
        ttl = check_positive(ttl_s, "ttl_s")
        text = dump_json(payload, "payload")
        with self._lock:
            now = self._clock()
            self._maintain(now)
            if self._live_approval(request_id, now) is not None:
                raise ApprovalError(f"approval request `{request_id}` already exists")
            self._approvals[request_id] = approval_record(
                request_id, binding, "pending", None, json.loads(text), now, now + ttl
            )

    def resolve_approval(
        self, request_id: str, *, approved: bool, approver: str
    ) -> Mapping[str, Any]:
        check_key(approver, "approver")
        with self._lock:
            record = self._live_approval(request_id, self._clock())
            if record is None:
                raise ApprovalError(f"approval request `{request_id}` is unknown or expired")
            if record["status"] != "pending":
                raise ApprovalError(
                    f"approval request `{request_id}` was already resolved ({record['status']})"
                )
            record["status"] = "approved" if approved else "denied"
            record["approver"] = approver
            return _copy(record)

    def consume_approval(self, binding: str) -> bool:
        with self._lock:
            now = self._clock()
            candidates = [
                r
                for r in self._approvals.values()
                if r["binding"] == binding and r["status"] == "approved" and r["expires_at"] > now
            ]
            if not candidates:
                return False
            min(candidates, key=lambda r: r["created_at"])["status"] = "consumed"
            return True

    def get_approval(self, request_id: str) -> Mapping[str, Any] | None:
        with self._lock:
            record = self._live_approval(request_id, self._clock())
            return None if record is None else _copy(record)

    def list_approvals(self, status: str | None = None) -> list[Mapping[str, Any]]:
        with self._lock:
            now = self._clock()
            records = [
                _copy(r)
                for r in self._approvals.values()
                if r["expires_at"] > now and (status is None or r["status"] == status)
            ]
        return sorted(records, key=lambda r: r["created_at"])

    def close(self) -> None:
        """Nothing to release; kept for the protocol."""


def _copy(record: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy, so callers cannot change stored records through what they were given."""
    copied: dict[str, Any] = json.loads(json.dumps(record))
    return copied
