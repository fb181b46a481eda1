"""A store that is down or hangs must fail with StoreUnavailableError within its timeout.

The Guard turns that error into a deny, so these bounds are the latency of failing closed.
Elapsed times are only bounded from above (no speed is asserted otherwise).
"""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agentic_iam.core.store import RedisStore, SqliteStore, Store
from agentic_iam.errors import MissingExtraError, StoreUnavailableError

from ._support import hold_sqlite_lock, req

TIMEOUT_S = 0.25


def bound(timeout_s: float) -> float:
    return timeout_s * 4 + 0.5


def assert_unavailable_quickly(call: Callable[[], object], timeout_s: float, op: str) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=f"`{op}`"):
        call()
    assert time.monotonic() - started < bound(timeout_s)


OPERATIONS: list[tuple[str, Callable[[Store], object]]] = [
    ("admit", lambda s: s.admit(req("r1", amounts={"cost": 1}))),
    ("settle", lambda s: s.settle("r1", {"cost": 1})),
    ("release", lambda s: s.release("r1")),
    ("charge", lambda s: s.charge(["iss|a"], {"cost": 1})),
    ("remaining", lambda s: s.remaining("iss|a", {"cost": 1})),
    ("revoked", lambda s: s.revoked(["iss|a"])),
    ("session_state", lambda s: s.session_state("iss|a")),
    ("consume_approval", lambda s: s.consume_approval("b")),
]


@pytest.mark.parametrize(("op", "call"), OPERATIONS, ids=[op for op, _ in OPERATIONS])
def test_redis_down_fails_within_timeout(op: str, call: Callable[[Store], object]) -> None:
    pytest.importorskip("redis")
    store = RedisStore("redis://127.0.0.1:1/0", timeout_s=TIMEOUT_S)  # nothing listens on 1
    try:
        assert_unavailable_quickly(lambda: call(store), TIMEOUT_S, op)
    finally:
        store.close()


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port whose kernel accepts connections that nobody ever answers: a hung server."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_redis_hanging_server_fails_within_timeout(black_hole: int) -> None:
    pytest.importorskip("redis")
    store = RedisStore(f"redis://127.0.0.1:{black_hole}/0", timeout_s=TIMEOUT_S)
    try:
        assert_unavailable_quickly(
            lambda: store.admit(req("r1", amounts={"cost": 1})), TIMEOUT_S, "admit"
        )
    finally:
        store.close()


def test_redis_client_pause_fails_within_timeout_and_recovers(
    redis_url: str, redis_prefix: str
) -> None:
    """Freeze the real server with CLIENT PAUSE from a second client while the store admits.

    WRITE mode pauses every script (Redis treats EVALSHA as a possible write) but leaves
    reads and CLIENT UNPAUSE working; the pause is kept short because the server is shared.
    """
    import redis

    store = RedisStore(redis_url, prefix=redis_prefix, timeout_s=TIMEOUT_S, initialize=True)
    admin = redis.Redis.from_url(redis_url, socket_timeout=5.0)
    grant = "iss|paused"
    charges = ((grant, {"cost": 100}),)
    try:
        assert store.admit(req("warm", session=grant, charges=charges)).outcome == "admitted"
        store.release("warm")
        admin.client_pause(2000, all=False)
        try:
            assert_unavailable_quickly(
                lambda: store.admit(
                    req("r1", session=grant, charges=charges, amounts={"cost": 60}, ttl_s=0.5)
                ),
                TIMEOUT_S,
                "admit",
            )
        finally:
            admin.client_unpause()
        # The timed-out admit may or may not have run once the pause ended. Either way its
        # reservation is never settled and expires, so the counters come back consistent.
        time.sleep(0.8)
        assert store.remaining(grant, {"cost": 100}) == {"cost": 100}
        assert store.session_state(grant).call_count == 0
        assert store.admit(
            req("r2", session=grant, charges=charges, amounts={"cost": 100})
        ).outcome == ("admitted")
    finally:
        admin.close()
        store.close()


def test_sqlite_lock_held_longer_than_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "locked.db")
    timeout_s = 0.3
    store = SqliteStore(path, timeout_s=timeout_s, initialize=True)
    ctx = multiprocessing.get_context("spawn")
    locked = ctx.Event()
    holder = ctx.Process(target=hold_sqlite_lock, args=(path, 3.0, locked))
    holder.start()
    try:
        assert locked.wait(timeout=30), "the lock holder never took the lock"
        assert_unavailable_quickly(
            lambda: store.admit(req("r1", amounts={"cost": 1})), timeout_s, "admit"
        )
        assert_unavailable_quickly(lambda: store.revoke("iss|a", expires_at=0), timeout_s, "revoke")
        assert store.events("iss|a") == []  # WAL: readers are not blocked by the writer
        holder.join(timeout=30)
        assert store.admit(req("r2", amounts={"cost": 1})).outcome == "admitted"
    finally:
        if holder.is_alive():
            holder.kill()
        holder.join()
        store.close()


def test_sqlite_unopenable_path_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailableError, match="`open`"):
        SqliteStore(tmp_path / "no" / "such" / "dir" / "store.db", initialize=True)


def test_redis_store_without_redis_py_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # makes `import redis` raise ImportError
    with pytest.raises(MissingExtraError, match=r'pip install "agentic-iam\[redis\]"'):
        RedisStore()


def test_importing_the_stores_does_not_import_redis() -> None:
    code = (
        "import sys, agentic_iam.core.store as s; "
        "assert 'redis' not in sys.modules, 'redis imported'; s.MemoryStore(); print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
