"""``Store.finish`` and ``AdmitRequest.seed_values``: the two steps of a guarded call, run
unchanged against MemoryStore, SqliteStore and a real Redis."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agentic_iam.core.store import FinishRequest, Store
from agentic_iam.core.store.base import MAX_TAINT_SOURCES
from agentic_iam.errors import StoreError

from ._support import req

CHILD = "iss|child"
LIMITS = {"cost": 100, "tool_calls": 5, "risk": 50}


def admit(store: Store, rid: str, cost: int = 30, risk: int = 0) -> None:
    amounts = {"cost": cost, "tool_calls": 1, "risk": risk}
    assert store.admit(req(rid, charges=((CHILD, LIMITS),), amounts=amounts)).outcome == (
        "admitted")


def test_finish_settles_and_records_observations_and_the_event_in_one_step(
        store: Store) -> None:
    admit(store, "r1", risk=10)
    store.finish(FinishRequest(
        CHILD, "r1", {"cost": 20, "tool_calls": 1, "risk": 4}, risk=7,
        labels=("untrusted_content", "tainted"), tainted_by=("tool:read#c1",),
        values={"d1": "untrusted", "d2": "trusted"},
        event={"call_id": "c1", "outcome": "success"}))
    assert store.remaining(CHILD, LIMITS) == {"cost": 80, "tool_calls": 4, "risk": 46}
    state = store.session_state(CHILD)
    assert state.risk == 4 + 7  # settled risk plus observed risk
    assert state.labels == frozenset({"untrusted_content", "tainted"})
    assert state.tainted_by == ("tool:read#c1",)
    assert state.call_count == 1
    assert store.value_labels(CHILD, ["d1", "d2", "d3"]) == {"d1": "untrusted", "d2": "trusted"}
    assert store.events(CHILD) == [{"call_id": "c1", "outcome": "success"}]


def test_finish_without_actual_releases(store: Store) -> None:
    admit(store, "r1")
    store.finish(FinishRequest(CHILD, "r1", None, risk=3, labels=("x",)))
    assert store.remaining(CHILD, LIMITS) == {"cost": 100, "tool_calls": 5, "risk": 50}
    state = store.session_state(CHILD)
    assert (state.call_count, state.risk, state.labels) == (0, 3, frozenset({"x"}))


def test_an_absent_dimension_is_charged_in_full(store: Store) -> None:
    admit(store, "r1")
    store.finish(FinishRequest(CHILD, "r1", {}))
    assert store.remaining(CHILD, LIMITS) == {"cost": 70, "tool_calls": 4, "risk": 50}


def test_finish_without_a_reservation_only_records_observations(store: Store) -> None:
    admit(store, "r1")
    store.finish(FinishRequest(CHILD, None, risk=2, tainted_by=("tool:a#1", "tool:b#2"),
                               values={"d": "untrusted"}))
    state = store.session_state(CHILD)
    assert state.tainted_by == ("tool:a#1", "tool:b#2")
    assert state.risk == 2
    assert store.remaining(CHILD, LIMITS)["cost"] == 70  # still reserved
    assert store.value_labels(CHILD, ["d"]) == {"d": "untrusted"}
    assert store.events(CHILD) == []


def test_finishing_twice_settles_once_and_unknown_reservations_are_noops(
        store: Store) -> None:
    admit(store, "r1")
    request = FinishRequest(CHILD, "r1", {"cost": 10})
    store.finish(request)
    store.finish(request)  # a retry after a lost reply
    store.finish(FinishRequest(CHILD, "never", {"cost": 10}))
    store.finish(FinishRequest(CHILD, "never", None))
    assert store.remaining(CHILD, LIMITS)["cost"] == 90


def test_finish_keeps_the_best_value_label_and_bounds_taint_and_values(store: Store) -> None:
    store.add_values(CHILD, {"d0": "request"})
    sources = tuple(f"tool:t#{i}" for i in range(MAX_TAINT_SOURCES + 3))
    store.finish(FinishRequest(CHILD, None, tainted_by=sources,
                               values={"d0": "untrusted", **{f"u{i}": "untrusted"
                                                             for i in range(5)}},
                               max_values=3))
    assert store.value_labels(CHILD, ["d0"]) == {"d0": "request"}  # never downgraded, kept
    assert len(store.value_labels(CHILD, ["d0", *(f"u{i}" for i in range(5))])) == 3
    assert store.session_state(CHILD).tainted_by == sources[-MAX_TAINT_SOURCES:]


def test_events_from_finish_are_bounded(store: Store) -> None:
    for i in range(6):
        store.finish(FinishRequest(CHILD, None, event={"i": i}, max_events=4))
    assert store.events(CHILD) == [{"i": i} for i in range(2, 6)]


def test_an_expired_reservation_is_released_not_charged_by_finish(make_store: object) -> None:
    import time

    store = make_store()  # type: ignore[operator]
    assert store.admit(req("r1", charges=((CHILD, LIMITS),), amounts={"cost": 30},
                           ttl_s=0.05)).outcome == "admitted"
    time.sleep(0.2)
    store.finish(FinishRequest(CHILD, "r1", {"cost": 30}, risk=1))
    assert store.remaining(CHILD, LIMITS)["cost"] == 100
    assert store.session_state(CHILD).risk == 1


@pytest.mark.parametrize("bad", [
    {"session": ""}, {"reservation_id": ""}, {"actual": {"cost": -1}}, {"risk": -1},
    {"risk": 1.5}, {"labels": ("",)}, {"tainted_by": ("",)}, {"values": {"d": "bogus"}},
    {"max_values": 0}, {"max_events": 0}, {"event": {"x": object()}},
])
def test_a_malformed_finish_changes_nothing(store: Store, bad: dict[str, object]) -> None:
    admit(store, "r1")
    request = replace(FinishRequest(CHILD, "r1", {"cost": 10}, risk=5, labels=("l",),
                                    values={"d": "trusted"}, event={"e": 1}), **bad)
    with pytest.raises(StoreError):
        store.finish(request)
    assert store.remaining(CHILD, LIMITS)["cost"] == 70
    state = store.session_state(CHILD)
    assert (state.risk, state.labels) == (0, frozenset())
    assert store.value_labels(CHILD, ["d"]) == {}
    assert store.events(CHILD) == []


def test_admit_seeds_values_before_looking_them_up_only_when_admitted(store: Store) -> None:
    seeded = replace(req("r1", charges=((CHILD, {"cost": 10}),), amounts={"cost": 5}),
                     seed_values={"d1": "request", "d2": "request"}, value_digests=("d1", "d9"))
    result = store.admit(seeded)
    assert result.outcome == "admitted"
    assert dict(result.value_labels) == {"d1": "request"}
    assert store.value_labels(CHILD, ["d2"]) == {"d2": "request"}
    refused = replace(req("r2", charges=((CHILD, {"cost": 10}),), amounts={"cost": 50}),
                      seed_values={"d3": "request"})
    assert store.admit(refused).outcome == "budget_exhausted"
    assert store.value_labels(CHILD, ["d3"]) == {}


def test_admit_refuses_malformed_seeds(store: Store) -> None:
    with pytest.raises(StoreError):
        store.admit(replace(req("r1"), seed_values={"d": "bogus"}))
    assert store.session_state(CHILD).call_count == 0
