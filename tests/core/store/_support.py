"""Helpers for the store tests, importable by spawned worker processes (keep imports light)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
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


def open_store(
    kind: str, target: str, prefix: str, timeout_s: float, *, initialize: bool = False
) -> Store:
    if kind == "sqlite":
        return SqliteStore(target, timeout_s=timeout_s, initialize=initialize)
    if kind == "redis":
        return RedisStore(target, prefix=prefix, timeout_s=timeout_s, initialize=initialize)
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test's own, on a free port with its data in ``directory``.

    Never the shared server on 6379: this one is killed and restarted. It stops by itself:
    ``timeout -s KILL`` ends it after ``lifetime_s`` even if the test process dies first.
    """

    def __init__(self, directory: Path, *, appendonly: bool, lifetime_s: int = 120) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.lifetime_s = lifetime_s
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = 0

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly
            else ["--appendonly", "no"]
        )
        self._proc = subprocess.Popen(
            ["timeout", "-s", "KILL", str(self.lifetime_s), "redis-server",
             "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", *persistence],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 15
        try:
            while True:
                try:
                    self._pid = int(client.info("server")["process_id"])
                    return
                except redis.RedisError:
                    if time.monotonic() > deadline or self._proc.poll() is not None:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def crash(self) -> None:
        """SIGKILL the server: nothing is written beyond what its persistence already did."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGKILL)
        self._proc.wait(timeout=15)
        self._proc = None

    def restart(self) -> None:
        self.crash()
        self.start()
