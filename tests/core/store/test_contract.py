"""The Store contract, run unchanged against MemoryStore, SqliteStore and a real Redis."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from agentic_iam.core.store import RateLimit, SessionState, Store
from agentic_iam.core.store.base import MAX_TAINT_SOURCES
from agentic_iam.errors import ApprovalError, StoreError

from ._support import req
from .conftest import StoreFactory

CHILD = "iss|child"
SIBLING = "iss|sibling"
PARENT = "iss|parent"


def spend(store: Store, rid: str, grant: str, cost: int, **kw: object) -> str:
    """Admit ``cost`` on grant (+ parent) and return the outcome (settled in full if admitted)."""
    limits = kw.pop("limits", {"cost": 1000})
    parent_limits = kw.pop("parent_limits", {"cost": 1000})
    result = store.admit(
        req(
            rid,
            session=grant,
            charges=((grant, limits), (PARENT, parent_limits)),  # type: ignore[arg-type]
            amounts={"cost": cost},
        )
    )
    if result.outcome == "admitted":
        store.settle(rid, {"cost": cost})
    return result.outcome


# --- admit / settle / release ------------------------------------------------------------------


def test_every_implementation_satisfies_the_protocol(store: Store) -> None:
    assert isinstance(store, Store)


def test_admit_reserves_and_reports_remaining_after_the_reservation(store: Store) -> None:
    result = store.admit(
        req("r1", charges=((CHILD, {"cost": 100, "tool_calls": 5}),), amounts={"cost": 30})
    )
    assert result.outcome == "admitted"
    assert result.detail == ""
    assert result.retry_after_s == 0
    assert dict(result.remaining) == {"cost": 70, "tool_calls": 5}
    assert store.remaining(CHILD, {"cost": 100}) == {"cost": 70}


def test_admit_looks_up_argument_provenance_in_the_same_step(store: Store) -> None:
    from dataclasses import replace

    store.add_values(CHILD, {"d-request": "request", "d-ticket": "untrusted"})
    request = replace(req("rv1", charges=((CHILD, {"cost": 100}),), amounts={"cost": 1}),
                      value_digests=("d-request", "d-ticket", "d-never"))
    result = store.admit(request)
    assert result.outcome == "admitted"
    assert dict(result.value_labels) == {"d-request": "request", "d-ticket": "untrusted"}
    refused = store.admit(replace(req("rv2", charges=((CHILD, {"cost": 1}),),
                                      amounts={"cost": 5}), value_digests=("d-request",)))
    assert refused.outcome == "budget_exhausted" and dict(refused.value_labels) == {}


def test_remaining_reports_unlimited_as_none_but_still_counts(store: Store) -> None:
    result = store.admit(req("r1", charges=((CHILD, {"cost": None}),), amounts={"cost": 30}))
    assert result.outcome == "admitted"
    assert dict(result.remaining) == {"cost": None}
    store.settle("r1", {"cost": 30})
    # Unlimited on the grant, but the spend was counted: a limit applied later sees it.
    assert store.remaining(CHILD, {"cost": 100, "llm_tokens": None}) == {
        "cost": 70,
        "llm_tokens": None,
    }


def test_settle_charges_actual_capped_at_reserved_and_releases_the_rest(store: Store) -> None:
    charges = ((CHILD, {"cost": 100, "tool_calls": 10}),)
    store.admit(req("r1", charges=charges, amounts={"cost": 30, "tool_calls": 1}))
    store.settle("r1", {"cost": 12})  # tool_calls absent: charged at the reserved 1
    assert store.remaining(CHILD, {"cost": 100, "tool_calls": 10}) == {"cost": 88, "tool_calls": 9}

    store.admit(req("r2", charges=charges, amounts={"cost": 10}))
    store.settle("r2", {"cost": 500})  # never more than reserved
    assert store.remaining(CHILD, {"cost": 100}) == {"cost": 78}

    store.admit(req("r3", charges=charges, amounts={"cost": 10}))
    store.settle("r3", {"cost": 0, "llm_tokens": 99})  # unreserved dimension: nothing
    assert store.remaining(CHILD, {"cost": 100, "llm_tokens": 1000}) == {
        "cost": 78,
        "llm_tokens": 1000,
    }


def test_release_returns_everything_and_is_idempotent(store: Store) -> None:
    store.admit(req("r1", charges=((CHILD, {"cost": 100}),), amounts={"cost": 60}))
    store.release("r1")
    store.release("r1")
    store.settle("r1", {"cost": 60})  # after release: no-op
    assert store.remaining(CHILD, {"cost": 100}) == {"cost": 100}
    assert store.session_state(CHILD).call_count == 0


def test_settle_is_idempotent_and_unknown_ids_are_noops(store: Store) -> None:
    store.admit(req("r1", charges=((CHILD, {"cost": 100}),), amounts={"cost": 60}))
    store.settle("r1", {"cost": 50})
    store.settle("r1", {"cost": 50})
    store.release("r1")  # after settle: no-op, the spend stays
    store.settle("never-admitted", {"cost": 1})
    store.release("never-admitted")
    assert store.remaining(CHILD, {"cost": 100}) == {"cost": 50}
    assert store.session_state(CHILD).call_count == 1


def test_duplicate_live_reservation_id_is_refused(store: Store) -> None:
    store.admit(req("r1", amounts={"cost": 1}))
    with pytest.raises(StoreError, match="already exists"):
        store.admit(req("r1", amounts={"cost": 1}))
    assert store.session_state(CHILD).call_count == 1


def test_unsettled_reservation_expires_and_its_amounts_and_counts_return(store: Store) -> None:
    charges = ((CHILD, {"cost": 100}), (PARENT, {"cost": 100}))
    assert store.admit(req("r1", charges=charges, amounts={"cost": 90}, ttl_s=0.3)).outcome == (
        "admitted"
    )
    assert store.admit(req("r2", charges=charges, amounts={"cost": 20})).outcome == (
        "budget_exhausted"
    )
    time.sleep(0.6)
    result = store.admit(req("r3", charges=charges, amounts={"cost": 20}))
    assert result.outcome == "admitted"
    assert result.session.call_count == 0  # r1 was released by expiry
    assert dict(result.remaining) == {"cost": 80}
    store.settle("r1", {"cost": 90})  # expired: no-op, nothing charged
    assert store.remaining(PARENT, {"cost": 100}) == {"cost": 80}


def test_expired_reservation_is_released_for_readers_too(store: Store) -> None:
    store.admit(req("r1", charges=((CHILD, {"cost": 100}),), amounts={"cost": 90}, ttl_s=0.3))
    time.sleep(0.6)
    assert store.remaining(CHILD, {"cost": 100}) == {"cost": 100}
    assert store.session_state(CHILD).call_count == 0


# --- hierarchy ---------------------------------------------------------------------------------


def test_child_spending_is_charged_to_every_ancestor(store: Store) -> None:
    root = "iss|root"
    result = store.admit(
        req(
            "r1",
            charges=((CHILD, {"cost": 50}), (PARENT, {"cost": 100}), (root, {"cost": 1000})),
            amounts={"cost": 40},
        )
    )
    assert result.outcome == "admitted"
    assert store.remaining(PARENT, {"cost": 100}) == {"cost": 60}
    assert store.remaining(root, {"cost": 1000}) == {"cost": 960}
    store.settle("r1", {"cost": 25})
    assert store.remaining(CHILD, {"cost": 50}) == {"cost": 25}
    assert store.remaining(PARENT, {"cost": 100}) == {"cost": 75}
    assert store.remaining(root, {"cost": 1000}) == {"cost": 975}


def test_siblings_together_cannot_exceed_the_parent(store: Store) -> None:
    child_limits = {"cost": 60}
    parent = {"cost": 100}
    assert spend(store, "a1", CHILD, 50, limits=child_limits, parent_limits=parent) == "admitted"
    # Each sibling is within its own 60, but together they would spend 110 of the parent's 100.
    result = store.admit(
        req(
            "b1",
            session=SIBLING,
            charges=((SIBLING, child_limits), (PARENT, parent)),
            amounts={"cost": 60},
        )
    )
    assert result.outcome == "budget_exhausted"
    assert result.detail == f"{PARENT}|cost"
    assert dict(result.remaining) == {"cost": 60}  # the calling grant's own view, unchanged
    assert spend(store, "b2", SIBLING, 50, limits=child_limits, parent_limits=parent) == (
        "admitted"
    )
    assert store.remaining(PARENT, parent) == {"cost": 0}
    assert spend(store, "b3", SIBLING, 1, limits=child_limits, parent_limits=parent) == (
        "budget_exhausted"
    )


def test_budget_exhausted_names_grant_and_dimension_and_changes_nothing(store: Store) -> None:
    charges = ((CHILD, {"cost": 100, "tool_calls": 2}), (PARENT, {"cost": 1000}))
    store.admit(req("r1", charges=charges, amounts={"cost": 10, "tool_calls": 1}))
    store.admit(req("r2", charges=charges, amounts={"cost": 10, "tool_calls": 1}))
    before = store.session_state(CHILD)
    result = store.admit(req("r3", charges=charges, amounts={"cost": 10, "tool_calls": 1}))
    assert (result.outcome, result.detail) == ("budget_exhausted", f"{CHILD}|tool_calls")
    assert result.session == before
    assert store.session_state(CHILD) == before
    assert store.remaining(PARENT, {"cost": 1000}) == {"cost": 980}
    store.release("r3")  # never existed: no-op
    assert store.session_state(CHILD) == before


def test_charge_is_unconditional_and_later_admits_fail(store: Store) -> None:
    store.charge([CHILD, PARENT, CHILD], {"llm_tokens": 700})  # a grant listed twice: once
    store.charge([CHILD], {"llm_tokens": 700})
    assert store.remaining(CHILD, {"llm_tokens": 1000}) == {"llm_tokens": 0}  # clamped at 0
    assert store.remaining(PARENT, {"llm_tokens": 1000}) == {"llm_tokens": 300}
    result = store.admit(req("r1", charges=((CHILD, {"llm_tokens": 1000}),), amounts={"cost": 1}))
    assert (result.outcome, result.detail) == ("budget_exhausted", f"{CHILD}|llm_tokens")


# --- rate limits (GCRA) ---------------------------------------------------------------------


def test_rate_limit_allows_the_burst_then_refuses_without_consuming(store: Store) -> None:
    slow = RateLimit("agent:support", per_second=0.01, burst=3)  # one per 100 s after the burst
    outcomes = [store.admit(req(f"r{i}", rate_limits=(slow,))) for i in range(3)]
    assert [r.outcome for r in outcomes] == ["admitted"] * 3
    refused = store.admit(req("r3", rate_limits=(slow,)))
    assert (refused.outcome, refused.detail) == ("rate_limited", "agent:support")
    assert 90 < refused.retry_after_s <= 100
    again = store.admit(req("r4", rate_limits=(slow,)))
    # A refused attempt consumed nothing: the wait did not grow.
    assert again.outcome == "rate_limited"
    assert again.retry_after_s <= refused.retry_after_s
    assert store.session_state(CHILD).call_count == 3


def test_a_refusing_limit_means_no_other_limit_is_consumed(store: Store) -> None:
    wide = RateLimit("agent:wide", per_second=0.01, burst=3)
    narrow = RateLimit("exec:narrow", per_second=0.01, burst=1)
    assert store.admit(req("r1", rate_limits=(wide, narrow))).outcome == "admitted"
    refused = store.admit(req("r2", rate_limits=(wide, narrow)))
    assert (refused.outcome, refused.detail) == ("rate_limited", "exec:narrow")
    # "wide" was not consumed by the refused call: two of its three slots are left.
    assert [store.admit(req(f"w{i}", rate_limits=(wide,))).outcome for i in range(3)] == [
        "admitted",
        "admitted",
        "rate_limited",
    ]


def test_rate_limit_refills_at_its_rate(store: Store) -> None:
    fast = RateLimit("exec:fast", per_second=10.0, burst=1)
    assert store.admit(req("r1", rate_limits=(fast,))).outcome == "admitted"
    refused = store.admit(req("r2", rate_limits=(fast,)))
    assert refused.outcome == "rate_limited"
    assert 0 < refused.retry_after_s <= 0.1
    time.sleep(refused.retry_after_s + 0.05)
    assert store.admit(req("r3", rate_limits=(fast,))).outcome == "admitted"


def test_rate_limited_and_released_calls_keep_budget_but_not_rate(store: Store) -> None:
    one = RateLimit("exec:one", per_second=0.01, burst=1)
    charges = ((CHILD, {"cost": 10}),)
    assert store.admit(req("r1", rate_limits=(one,), charges=charges, amounts={"cost": 4})).outcome
    store.release("r1")  # budget returns, the rate-limit slot does not
    refused = store.admit(req("r2", rate_limits=(one,), charges=charges, amounts={"cost": 4}))
    assert refused.outcome == "rate_limited"
    assert dict(refused.remaining) == {"cost": 10}


# --- revocation --------------------------------------------------------------------------------


def test_revoked_token_or_ancestor_refuses_and_changes_nothing(store: Store) -> None:
    future = int(time.time()) + 600
    store.revoke(PARENT, expires_at=future)
    assert store.revoked([CHILD, PARENT, "iss|other"]) == frozenset({PARENT})
    result = store.admit(
        req(
            "r1",
            revocation_keys=(CHILD, PARENT),
            charges=((CHILD, {"cost": 10}),),
            amounts={"cost": 5},
            rate_limits=(RateLimit("exec:x", per_second=0.01, burst=1),),
        )
    )
    assert (result.outcome, result.detail) == ("revoked", PARENT)
    assert store.remaining(CHILD, {"cost": 10}) == {"cost": 10}
    assert store.session_state(CHILD).call_count == 0
    # The rate limit was not consumed either.
    assert store.admit(req("r2", rate_limits=(RateLimit("exec:x", 0.01, 1),))).outcome == (
        "admitted"
    )


def test_revocation_outlives_expires_at_by_a_grace_period(store: Store) -> None:
    store.revoke(CHILD, expires_at=int(time.time()) - 5)  # already expired token: still held
    store.revoke(CHILD, expires_at=0)  # an earlier expiry never shortens it
    assert store.revoked([CHILD]) == frozenset({CHILD})
    assert store.revoked([]) == frozenset()


# --- sessions ----------------------------------------------------------------------------------


def test_session_counts_are_before_the_call_and_released_with_the_reservation(
    store: Store,
) -> None:
    first = store.admit(req("r1", action="refund:create"))
    assert first.session.call_count == 0
    assert dict(first.session.action_counts) == {}
    second = store.admit(req("r2", action="refund:create"))
    assert second.session.call_count == 1
    assert dict(second.session.action_counts) == {"refund:create": 1}
    third = store.admit(req("r3", action="ticket:read"))
    assert dict(third.session.action_counts) == {"refund:create": 2}

    store.settle("r1", {})
    store.release("r2")
    state = store.session_state(CHILD)
    assert state.call_count == 2
    assert dict(state.action_counts) == {"refund:create": 1, "ticket:read": 1}
    fourth = store.admit(req("r4", action="refund:create"))
    assert fourth.session.call_count == 2
    assert dict(fourth.session.action_counts) == {"refund:create": 1, "ticket:read": 1}


def test_unknown_session_is_empty(store: Store) -> None:
    assert store.session_state("iss|nobody") == SessionState(0, {}, frozenset(), 0, ())


def test_add_risk_accumulates_labels_and_taint(store: Store) -> None:
    state = store.add_risk(CHILD, 5, ["untrusted_content"], tainted_by="tool:read_ticket#call_1")
    assert state.risk == 5
    assert state.labels == frozenset({"untrusted_content"})
    assert state.tainted_by == ("tool:read_ticket#call_1",)
    state = store.add_risk(CHILD, 3, ["secret_redacted"], tainted_by="tool:read_ticket#call_1")
    assert state.risk == 8
    assert state.labels == frozenset({"untrusted_content", "secret_redacted"})
    assert state.tainted_by == ("tool:read_ticket#call_1",)  # no duplicates
    assert store.session_state(CHILD) == state


def test_taint_sources_are_bounded_newest_kept(store: Store) -> None:
    for i in range(MAX_TAINT_SOURCES + 5):
        state = store.add_risk(CHILD, 0, tainted_by=f"tool:t#{i}")
    assert len(state.tainted_by) == MAX_TAINT_SOURCES
    assert state.tainted_by[0] == "tool:t#5"
    assert state.tainted_by[-1] == f"tool:t#{MAX_TAINT_SOURCES + 4}"


def test_reserved_risk_counts_in_the_session_until_released(store: Store) -> None:
    store.add_risk(CHILD, 2)
    store.admit(req("r1", charges=((CHILD, {"risk": 50}),), amounts={"risk": 10}))
    store.admit(req("r2", charges=((CHILD, {"risk": 50}),), amounts={"risk": 10}))
    assert store.session_state(CHILD).risk == 22
    store.release("r1")
    store.settle("r2", {"risk": 4})
    assert store.session_state(CHILD).risk == 6
    assert store.remaining(CHILD, {"risk": 50}) == {"risk": 46}


def test_events_are_bounded_oldest_dropped(store: Store) -> None:
    for i in range(10):
        store.append_event(CHILD, {"i": i, "tool": "refund"}, max_events=4)
    assert store.events(CHILD) == [{"i": i, "tool": "refund"} for i in range(6, 10)]
    assert store.events("iss|nobody") == []
    with pytest.raises(StoreError, match="JSON"):
        store.append_event(CHILD, {"bad": object()})


def test_value_labels_keep_the_best_label(store: Store) -> None:
    store.add_values(CHILD, {"d1": "untrusted", "d2": "request", "d3": "trusted"})
    store.add_values(CHILD, {"d1": "trusted", "d2": "untrusted", "d3": "request"})
    assert dict(store.value_labels(CHILD, ["d1", "d2", "d3", "d4"])) == {
        "d1": "trusted",
        "d2": "request",
        "d3": "request",
    }
    assert dict(store.value_labels("iss|nobody", ["d1"])) == {}
    with pytest.raises(StoreError, match="label"):
        store.add_values(CHILD, {"d9": "trusted-ish"})


def test_values_are_bounded_oldest_evicted(store: Store) -> None:
    store.add_values(CHILD, {f"d{i}": "untrusted" for i in range(5)}, max_values=5)
    store.add_values(CHILD, {"d0": "request"}, max_values=5)  # re-added: now the newest
    store.add_values(CHILD, {"d5": "trusted", "d6": "trusted"}, max_values=5)
    assert set(store.value_labels(CHILD, [f"d{i}" for i in range(7)])) == {
        "d0",
        "d3",
        "d4",
        "d5",
        "d6",
    }


def test_a_flood_of_untrusted_values_never_evicts_request_or_trusted_values(
    store: Store,
) -> None:
    """Issue 13 item 5: the attacker's own content must not push the user's targets out."""
    requested = {f"req-{i}": "request" for i in range(20)}
    trusted = {f"kb-{i}": "trusted" for i in range(20)}
    store.add_values(CHILD, requested)
    store.add_values(CHILD, trusted)
    flood = [f"evil-{i}" for i in range(5000)]  # past the default bound of 4096
    for start in range(0, len(flood), 500):
        store.add_values(CHILD, {d: "untrusted" for d in flood[start:start + 500]})
    assert dict(store.value_labels(CHILD, list(requested) + list(trusted))) == {
        **requested,
        **trusted,
    }
    kept = store.value_labels(CHILD, flood)
    assert len(kept) == 4096 - 40  # the bound holds, paid for by untrusted values only
    assert set(kept) == set(flood[-len(kept):])  # the oldest untrusted went first


def test_values_are_evicted_untrusted_then_trusted_then_request_oldest_first(
    store: Store,
) -> None:
    store.add_values(CHILD, {"r1": "request", "t1": "trusted", "u1": "untrusted"}, max_values=6)
    store.add_values(CHILD, {"r2": "request", "t2": "trusted", "u2": "untrusted"}, max_values=6)
    store.add_values(CHILD, {"u1": "trusted"}, max_values=6)  # upgraded: now the newest trusted
    store.add_values(CHILD, {"r3": "request"}, max_values=6)  # 7 held: u2, the only untrusted
    everything = ["r1", "r2", "r3", "t1", "t2", "u1", "u2"]
    assert set(store.value_labels(CHILD, everything)) == {"r1", "r2", "r3", "t1", "t2", "u1"}
    store.add_values(CHILD, {"r4": "request", "r5": "request"}, max_values=6)  # t1 then t2
    assert set(store.value_labels(CHILD, [*everything, "r4", "r5"])) == {
        "r1", "r2", "r3", "r4", "r5", "u1"
    }
    store.add_values(CHILD, {"r6": "request", "r7": "request"}, max_values=6)  # u1, then r1
    assert set(store.value_labels(CHILD, [*everything, "r4", "r5", "r6", "r7"])) == {
        "r2", "r3", "r4", "r5", "r6", "r7"
    }
    assert store.value_labels(CHILD, ["u1"]) == {}


# --- approvals ---------------------------------------------------------------------------------


def test_approval_lifecycle(store: Store) -> None:
    store.put_approval("req-1", "exec-1:abc", {"tool": "refund", "amount": 500}, ttl_s=60)
    record = store.get_approval("req-1")
    assert record is not None
    assert record["status"] == "pending"
    assert record["approver"] is None
    assert record["payload"] == {"tool": "refund", "amount": 500}
    assert record["binding"] == "exec-1:abc"
    assert record["created_at"] < record["expires_at"] <= record["created_at"] + 60.01
    assert store.consume_approval("exec-1:abc") is False  # pending is not approved

    resolved = store.resolve_approval("req-1", approved=True, approver="alice@example.com")
    assert resolved["status"] == "approved"
    assert resolved["approver"] == "alice@example.com"
    with pytest.raises(ApprovalError, match="already resolved"):
        store.resolve_approval("req-1", approved=False, approver="mallory")

    assert store.consume_approval("exec-1:abc") is True
    assert store.consume_approval("exec-1:abc") is False
    assert store.consume_approval("exec-2:other") is False
    consumed = store.get_approval("req-1")
    assert consumed is not None
    assert consumed["status"] == "consumed"


def test_denied_approval_is_never_consumed(store: Store) -> None:
    store.put_approval("req-1", "b", {}, ttl_s=60)
    assert store.resolve_approval("req-1", approved=False, approver="bob")["status"] == "denied"
    assert store.consume_approval("b") is False


def test_unknown_duplicate_and_expired_approvals(store: Store) -> None:
    with pytest.raises(ApprovalError, match="unknown"):
        store.resolve_approval("nope", approved=True, approver="alice")
    assert store.get_approval("nope") is None
    store.put_approval("req-1", "b1", {}, ttl_s=60)
    with pytest.raises(ApprovalError, match="already exists"):
        store.put_approval("req-1", "b1", {}, ttl_s=60)

    store.put_approval("req-2", "b2", {}, ttl_s=0.3)
    store.put_approval("req-3", "b3", {}, ttl_s=0.3)
    store.resolve_approval("req-3", approved=True, approver="alice")
    time.sleep(0.6)
    with pytest.raises(ApprovalError, match="unknown or expired"):
        store.resolve_approval("req-2", approved=True, approver="alice")
    assert store.get_approval("req-2") is None
    assert store.consume_approval("b3") is False  # approved, but too late
    assert [r["request_id"] for r in store.list_approvals()] == ["req-1"]


def test_list_approvals_filters_by_status_oldest_first(store: Store) -> None:
    for i in range(3):
        store.put_approval(f"req-{i}", f"b{i}", {"i": i}, ttl_s=60)
        time.sleep(0.002)
    store.resolve_approval("req-1", approved=True, approver="alice")
    assert [r["request_id"] for r in store.list_approvals()] == ["req-0", "req-1", "req-2"]
    assert [r["request_id"] for r in store.list_approvals("pending")] == ["req-0", "req-2"]
    assert [r["request_id"] for r in store.list_approvals("approved")] == ["req-1"]
    assert store.list_approvals("consumed") == []


def test_an_approval_is_consumed_exactly_once_under_concurrency(
    make_store: StoreFactory,
) -> None:
    setup = make_store()
    setup.put_approval("req-1", "exec-1:digest", {}, ttl_s=60)
    setup.resolve_approval("req-1", approved=True, approver="alice")
    workers = 16
    stores = [make_store() for _ in range(workers)]  # own connections (memory: shared)
    barrier = threading.Barrier(workers)

    def attempt(store: Store) -> bool:
        barrier.wait(timeout=10)
        return store.consume_approval("exec-1:digest")

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(attempt, stores))
    assert results.count(True) == 1


def test_threads_never_overspend(make_store: StoreFactory) -> None:
    workers, attempts = 8, 25
    stores = [make_store() for _ in range(workers)]
    barrier = threading.Barrier(workers)

    def race(index: int) -> int:
        store = stores[index]
        barrier.wait(timeout=10)
        admitted = 0
        for i in range(attempts):
            rid = f"t{index}-{i}"
            result = store.admit(req(rid, charges=((CHILD, {"cost": 100}),), amounts={"cost": 7}))
            if result.outcome == "admitted":
                admitted += 1
                store.settle(rid, {"cost": 7})
        return admitted

    with ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(race, range(workers)))
    assert total == 14
    assert stores[0].remaining(CHILD, {"cost": 100}) == {"cost": 2}


def test_state_is_shared_between_store_instances(make_store: StoreFactory) -> None:
    a, b = make_store(), make_store()
    a.admit(req("r1", charges=((CHILD, {"cost": 100}),), amounts={"cost": 40}))
    b.settle("r1", {"cost": 30})
    assert a.remaining(CHILD, {"cost": 100}) == b.remaining(CHILD, {"cost": 100}) == {"cost": 70}


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "amounts",
    [{"cost": -1}, {"cost": 1.5}, {"cost": True}, {"cost": "7"}, {"cost": 2**53}],
)
def test_amounts_must_be_non_negative_integers(store: Store, amounts: dict[str, object]) -> None:
    with pytest.raises(StoreError):
        store.admit(req("r1", amounts=amounts))  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        store.charge([CHILD], amounts)  # type: ignore[arg-type]
    assert store.session_state(CHILD).call_count == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"rate_limits": (RateLimit("k", per_second=0, burst=1),)},
        {"rate_limits": (RateLimit("k", per_second=1, burst=0),)},
        {"rate_limits": (RateLimit("k", per_second=float("nan"), burst=1),)},
        {"charges": ((CHILD, {"cost": 1.0}),)},
        {"ttl_s": 0},
    ],
)
def test_malformed_requests_are_refused(store: Store, bad: dict[str, object]) -> None:
    with pytest.raises(StoreError):
        store.admit(req("r1", **bad))  # type: ignore[arg-type]
