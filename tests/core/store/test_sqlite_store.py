"""SqliteStore specifics: schema, threads, reopening, purging."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from agentic_iam.core.store import SqliteStore

from ._support import req


def test_schema_is_idempotent_and_state_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    first = SqliteStore(path, initialize=True)
    first.charge(["iss|a"], {"cost": 40})
    first.close()
    second = SqliteStore(path)
    try:
        assert second.remaining("iss|a", {"cost": 100}) == {"cost": 60}
    finally:
        second.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_each_thread_gets_its_own_connection_and_close_closes_all(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", initialize=True)
    seen: list[int] = []

    def work() -> None:
        store.charge(["iss|a"], {"cost": 1})
        seen.append(id(store._local.conn))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == 4
    assert store.remaining("iss|a", {"cost": 10}) == {"cost": 6}
    assert len(store._all) == 5
    store.close()
    assert store._all == []


def test_stale_state_is_purged_after_state_ttl(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = SqliteStore(tmp_path / "s.db", clock=lambda: now[0], state_ttl_s=100.0,
                        initialize=True)
    try:
        store.admit(req("r1", session="iss|old", charges=(("iss|old", {}),), amounts={"cost": 5}))
        store.settle("r1", {})
        store.append_event("iss|old", {"e": 1})
        now[0] += 500.0
        store.admit(req("r2", session="iss|new", charges=(("iss|new", {}),), amounts={"cost": 1}))
        assert store.session_state("iss|old").call_count == 0
        assert store.events("iss|old") == []
        assert store.remaining("iss|old", {"cost": 10}) == {"cost": 10}
        assert store.session_state("iss|new").call_count == 1  # live reservation kept
    finally:
        store.close()
