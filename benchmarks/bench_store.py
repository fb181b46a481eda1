"""Store overhead: median microseconds of one ``admit`` + ``settle`` pair, per store.

Run ``python -m benchmarks.bench_store``. The request is a realistic one: a token with one
ancestor (two revocation keys, two charges with limits on tool calls and cost) and two rate
limits. The machine is shared and noisy: read the ratios between rows (and against
``reference/perf-anchors.md``: one Redis round trip ~55-70 us, a SQLite WAL write transaction
~14 us), not the absolute numbers. Redis is measured against ``AIAM_BENCH_REDIS_URL``
(default ``redis://127.0.0.1:6379/0``) under a throwaway prefix, and skipped if unreachable.
This module must never write outside a temporary directory or its own Redis prefix.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from agentic_iam.core.store import (
    AdmitRequest,
    Charge,
    MemoryStore,
    RateLimit,
    RedisStore,
    SqliteStore,
    Store,
)
from agentic_iam.errors import MissingExtraError, StoreUnavailableError

__all__ = ["run"]

GRANT = "https://broker.example.com|jti-child"
PARENT = "https://broker.example.com|jti-parent"
# Limits high enough that no iteration is ever refused: we time the admitted path.
LIMITS = {"tool_calls": 10**12, "cost": 10**15}
RATES = (
    RateLimit(f"exec:{GRANT}", per_second=1e6, burst=10**6),
    RateLimit("agent:support-agent", per_second=1e6, burst=10**6),
)


def _request(rid: str) -> AdmitRequest:
    return AdmitRequest(
        reservation_id=rid,
        session=GRANT,
        action="refund:create",
        revocation_keys=(GRANT, PARENT),
        rate_limits=RATES,
        charges=(Charge(GRANT, LIMITS), Charge(PARENT, LIMITS)),
        amounts={"tool_calls": 1, "cost": 4200},
    )


def _median_us(store: Store, iterations: int, warmup: int) -> float:
    samples: list[float] = []
    for i in range(warmup + iterations):
        rid = f"bench-{i}"
        started = time.perf_counter_ns()
        result = store.admit(_request(rid))
        store.settle(rid, {"cost": 4000})
        elapsed = time.perf_counter_ns() - started
        if result.outcome != "admitted":
            raise RuntimeError(f"benchmark request was refused: {result.outcome} {result.detail}")
        if i >= warmup:
            samples.append(elapsed / 1000)
    return statistics.median(samples)


@contextlib.contextmanager
def _redis_store() -> Iterator[RedisStore | None]:
    url = os.environ.get("AIAM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"aiam-bench:{uuid.uuid4().hex}:"
    try:
        store = RedisStore(url, prefix=prefix, timeout_s=1.0, initialize=True)
        store.revoked(["probe"])
    except (MissingExtraError, StoreUnavailableError) as exc:
        print(f"redis skipped: {exc}", file=sys.stderr)
        yield None
        return
    try:
        yield store
    finally:
        import redis

        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
            store.close()


def run(iterations: int = 2000, warmup: int = 200) -> list[tuple[str, float]]:
    """``(label, median us)`` of ``admit`` + ``settle`` for memory, sqlite and (if up) redis."""
    rows: list[tuple[str, float]] = []
    memory = MemoryStore()
    rows.append(("memory  admit+settle", _median_us(memory, iterations, warmup)))
    memory.close()
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SqliteStore(Path(tmp) / "bench.db", initialize=True)
        try:
            rows.append(
                ("sqlite  admit+settle (WAL, NORMAL)", _median_us(sqlite, iterations, warmup))
            )
        finally:
            sqlite.close()
    with _redis_store() as redis_store:
        if redis_store is not None:
            rows.append(
                ("redis   admit+settle (2 EVALSHA)", _median_us(redis_store, iterations, warmup))
            )
    return rows


def main() -> None:
    rows = run()
    base = rows[0][1]
    print(f"{'operation':<40} {'median us':>10} {'x memory':>9}")
    for label, median in rows:
        print(f"{label:<40} {median:>10.1f} {median / base:>9.1f}")


if __name__ == "__main__":
    main()
