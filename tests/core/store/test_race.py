"""The budget race (security-findings §0.5): 16 processes x 40 attempts, budget 1000, cost 7.

A naive check-then-increment approved 151 calls and spent 1057 in this harness; an atomic
store must admit exactly 142 and spend exactly 994. Runs against a SQLite file and a real Redis.
"""

from __future__ import annotations

import multiprocessing
import queue
import uuid
from pathlib import Path

import pytest

from ._support import budget_race_worker, open_store

PROCESSES = 16
ATTEMPTS = 40
LIMIT = 1000
COST = 7


def race(kind: str, target: str, prefix: str) -> None:
    grant = f"iss|race-{uuid.uuid4().hex}"
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, no inherited connections
    barrier = ctx.Barrier(PROCESSES)  # every racer set up before any starts
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=budget_race_worker,
            args=(kind, target, prefix, grant, ATTEMPTS, barrier, results),
        )
        for _ in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    outcomes = []
    try:
        for _ in range(PROCESSES):
            outcomes.append(results.get(timeout=60))
    except queue.Empty:
        pytest.fail(f"only {len(outcomes)} of {PROCESSES} racers reported: {outcomes}")
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()
        results.join_thread()
    errors = [detail for status, detail in outcomes if status != "ok"]
    assert not errors, errors
    admitted = sum(count for _, count in outcomes)

    store = open_store(kind, target, prefix, timeout_s=5.0)
    try:
        assert admitted == LIMIT // COST == 142
        assert store.remaining(grant, {"cost": LIMIT}) == {"cost": LIMIT - 142 * COST}  # spent 994
        assert store.session_state(grant).call_count == 142  # settled calls stay counted
    finally:
        store.close()


def test_budget_race_sqlite(tmp_path: Path) -> None:
    path = str(tmp_path / "race.db")
    # create the schema and epoch once
    open_store("sqlite", path, "", timeout_s=5.0, initialize=True).close()
    race("sqlite", path, "")


def test_budget_race_redis(redis_url: str, redis_prefix: str) -> None:
    open_store("redis", redis_url, redis_prefix, timeout_s=5.0, initialize=True).close()
    race("redis", redis_url, redis_prefix)
