"""Helpers for the store tests, importable by spawned worker processes (keep imports light)."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import Any

from agentic_iam.core.store import AdmitRequest, Charge, RateLimit, RedisStore, SqliteStore, Store

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_url() -> str:
    return os.environ.get("AIAM_TEST_REDIS_URL", DEFAULT_REDIS_URL)


def req(
    rid: str,
    *,
    session: str = "iss|child",
    action: str = "refund:create",
    charges: Sequence[tuple[str, Mapping[str, int | None]]] = (("iss|child", {}),),
    amounts: Mapping[str, int] | None = None,
    revocation_keys: Sequence[str] = (),
    rate_limits: Sequence[RateLimit] = (),
    ttl_s: float = 300.0,
) -> AdmitRequest:
    """An AdmitRequest with test-friendly defaults."""
    return AdmitRequest(
        reservation_id=rid,
        session=session,
        action=action,
        revocation_keys=tuple(revocation_keys),
        rate_limits=tuple(rate_limits),
        charges=tuple(Charge(grant, dict(limits)) for grant, limits in charges),
        amounts=dict(amounts or {}),
        reservation_ttl_s=ttl_s,
    )


def open_store(kind: str, target: str, prefix: str, timeout_s: float) -> Store:
    if kind == "sqlite":
        return SqliteStore(target, timeout_s=timeout_s)
    if kind == "redis":
        return RedisStore(target, prefix=prefix, timeout_s=timeout_s)
    raise ValueError(kind)


def budget_race_worker(
    kind: str,
    target: str,
    prefix: str,
    grant: str,
    attempts: int,
    barrier: Any,
    results: Any,
) -> None:
    """One racer: wait for every racer, then try to spend 7 of 1000, ``attempts`` times."""
    try:
        store = open_store(kind, target, prefix, timeout_s=20.0)
        try:
            barrier.wait(timeout=60)
            admitted = 0
            for i in range(attempts):
                rid = f"{os.getpid()}-{i}"
                result = store.admit(
                    req(
                        rid,
                        session=grant,
                        charges=((grant, {"cost": 1000}),),
                        amounts={"cost": 7},
                        revocation_keys=(grant,),
                    )
                )
                if result.outcome == "admitted":
                    admitted += 1
                    store.settle(rid, {"cost": 7})
            results.put(("ok", admitted))
        finally:
            store.close()
    except BaseException as exc:  # report, so the parent fails with the cause
        results.put(("error", repr(exc)))


def hold_sqlite_lock(path: str, seconds: float, locked: Any) -> None:
    """Take SQLite's write lock in another process and keep it for ``seconds``."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()
