"""MemoryStore specifics, with a fake clock: exact GCRA arithmetic, expiry, purging, a model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agentic_iam.core.store import MemoryStore, RateLimit
from agentic_iam.core.store.base import gcra

from ._support import req


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_gcra_burst_then_one_per_interval() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    limit = RateLimit("k", per_second=2.0, burst=3)
    outcomes = [store.admit(req(f"a{i}", rate_limits=(limit,))).outcome for i in range(4)]
    assert outcomes == ["admitted"] * 3 + ["rate_limited"]
    refused = store.admit(req("b", rate_limits=(limit,)))
    assert abs(refused.retry_after_s - 0.5) < 1e-6
    clock.now += 0.5
    assert store.admit(req("c", rate_limits=(limit,))).outcome == "admitted"
    assert store.admit(req("d", rate_limits=(limit,))).outcome == "rate_limited"
    clock.now += 10  # a quiet period refills the whole burst, no more
    outcomes = [store.admit(req(f"e{i}", rate_limits=(limit,))).outcome for i in range(4)]
    assert outcomes == ["admitted"] * 3 + ["rate_limited"]


def test_gcra_helper_refusal_keeps_state() -> None:
    allowed, tat, wait = gcra(None, 100.0, 1.0, 1)
    assert (allowed, tat, wait) == (True, 101.0, 0.0)
    allowed, same, wait = gcra(tat, 100.0, 1.0, 1)
    assert (allowed, same, wait) == (False, 101.0, 1.0)


def test_expiry_without_sleeping() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    store.admit(req("r1", charges=(("iss|a", {"cost": 10}),), amounts={"cost": 10}, ttl_s=30))
    clock.now += 29.9
    assert store.remaining("iss|a", {"cost": 10}) == {"cost": 0}
    clock.now += 0.1
    assert store.remaining("iss|a", {"cost": 10}) == {"cost": 10}
    store.settle("r1", {"cost": 10})
    assert store.remaining("iss|a", {"cost": 10}) == {"cost": 10}


def test_stale_state_and_expired_records_are_purged() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock, state_ttl_s=100.0)
    store.admit(req("r1", session="iss|old", charges=(("iss|old", {}),), amounts={"cost": 1}))
    store.settle("r1", {})
    store.revoke("iss|old", expires_at=int(clock.now))
    store.put_approval("q", "b", {}, ttl_s=10)
    clock.now += 1000
    store.session_state("iss|x")  # any operation may purge
    assert store._sessions == {}
    assert store._budgets == {}
    assert store._revoked == {}
    assert store._approvals == {}
    assert store._rates == {}


# A model check: whatever the interleaving of admit/settle/release/expiry, a child and its
# sibling never push spent + reserved past their own limit or the parent's.
op = st.one_of(
    st.tuples(st.just("admit"), st.sampled_from(["iss|a", "iss|b"]), st.integers(0, 40)),
    st.tuples(st.just("settle"), st.integers(0, 30), st.integers(0, 50)),
    st.tuples(st.just("release"), st.integers(0, 30), st.just(0)),
    st.tuples(st.just("tick"), st.just(0), st.integers(1, 20)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=60))
def test_model_never_overspends(ops: list[tuple[str, object, int]]) -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    limits = {"iss|a": 60, "iss|b": 60, "iss|p": 100}
    admitted: list[str] = []
    for index, (kind, arg, value) in enumerate(ops):
        if kind == "admit":
            grant = str(arg)
            result = store.admit(
                req(
                    f"r{index}",
                    session=grant,
                    charges=((grant, {"cost": limits[grant]}), ("iss|p", {"cost": 100})),
                    amounts={"cost": value},
                    ttl_s=30,
                )
            )
            if result.outcome == "admitted":
                admitted.append(f"r{index}")
        elif kind == "settle" and admitted:
            store.settle(admitted[int(str(arg)) % len(admitted)], {"cost": value})
        elif kind == "release" and admitted:
            store.release(admitted[int(str(arg)) % len(admitted)])
        elif kind == "tick":
            clock.now += value
        for grant, limit in limits.items():
            budget = store._budgets.get(grant)
            if budget is not None:
                assert budget.spent.get("cost", 0) + budget.reserved.get("cost", 0) <= limit
    clock.now += 31  # everything unsettled expires
    store.session_state("iss|a")
    assert all(not any(b.reserved.values()) for b in store._budgets.values())
    assert store._reservations == {}


def test_expiry_heap_stays_proportional_to_live_reservations() -> None:
    store = MemoryStore()
    for i in range(5000):
        store.admit(req(f"r{i}", amounts={"cost": 1}))
        store.settle(f"r{i}", {})
    assert len(store._expiry) <= 1024 + 1
    assert store.session_state("iss|child").call_count == 5000
