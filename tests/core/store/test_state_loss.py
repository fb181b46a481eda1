"""Issue 13 item 8: a store that lost its state denies until an operator re-initialises it.

Before the epoch, a Redis that restarted empty or a deleted SQLite file silently forgot
exhausted budgets, revocations and consumed approvals, and the next call was allowed. The Redis
restarts run against a private ``redis-server`` of the test's own (never the shared one).
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentic_iam.core.store import MemoryStore, RedisStore, SqliteStore, Store
from agentic_iam.errors import StoreError, StoreStateLostError

from ._support import PrivateRedis, req
from .conftest import fail_or_skip

CHILD = "iss|child"
REVOKED = "iss|revoked"


def remember(store: Store) -> None:
    """State that must keep saying no: a spent budget, a revoked token, a used approval."""
    spent = store.admit(req("spend", charges=((CHILD, {"cost": 10}),), amounts={"cost": 10}))
    assert spent.outcome == "admitted"
    store.settle("spend", {"cost": 10})
    store.revoke(REVOKED, expires_at=int(time.time()) + 600)
    store.put_approval("q1", "bind", {}, ttl_s=60)
    store.resolve_approval("q1", approved=True, approver="alice")
    assert store.consume_approval("bind") is True


def assert_still_says_no(store: Store) -> None:
    again = store.admit(req("again", charges=((CHILD, {"cost": 10}),), amounts={"cost": 1}))
    assert again.outcome == "budget_exhausted"
    revoked = store.admit(
        req("rv", session="iss|x", charges=(("iss|x", {}),), revocation_keys=(REVOKED,))
    )
    assert revoked.outcome == "revoked"
    assert store.revoked([REVOKED]) == frozenset({REVOKED})
    assert store.consume_approval("bind") is False


# Every operation of the protocol: each one's answer would be wrong after a loss.
OPERATIONS: list[tuple[str, Callable[[Store], object]]] = [
    ("admit", lambda s: s.admit(req("r-new", charges=((CHILD, {"cost": 10}),),
                                    amounts={"cost": 1}))),
    ("settle", lambda s: s.settle("spend", {"cost": 1})),
    ("release", lambda s: s.release("spend")),
    ("charge", lambda s: s.charge([CHILD], {"cost": 1})),
    ("remaining", lambda s: s.remaining(CHILD, {"cost": 10})),
    ("add_risk", lambda s: s.add_risk(CHILD, 1, ["x"], "t")),
    ("session_state", lambda s: s.session_state(CHILD)),
    ("append_event", lambda s: s.append_event(CHILD, {"e": 1})),
    ("events", lambda s: s.events(CHILD)),
    ("add_values", lambda s: s.add_values(CHILD, {"d": "request"})),
    ("value_labels", lambda s: s.value_labels(CHILD, ["d"])),
    ("revoke", lambda s: s.revoke("iss|other", expires_at=2_000_000_000)),
    ("revoked", lambda s: s.revoked([REVOKED])),
    ("put_approval", lambda s: s.put_approval("q2", "b2", {}, ttl_s=60)),
    ("resolve_approval", lambda s: s.resolve_approval("q1", approved=True, approver="bob")),
    ("consume_approval", lambda s: s.consume_approval("bind")),
    ("get_approval", lambda s: s.get_approval("q1")),
    ("list_approvals", lambda s: s.list_approvals()),
]


def assert_lost(store: Store) -> None:
    for op, call in OPERATIONS:
        with pytest.raises(StoreStateLostError, match="aiam store init") as caught:
            call(store)
        assert caught.value.store, op


@dataclass
class Durable:
    """Opens stores sharing one backing state, and can delete the epoch behind their back."""

    kind: str
    open: Callable[..., SqliteStore | RedisStore]
    drop_epoch: Callable[[], None]


@pytest.fixture(params=["sqlite", "redis"])
def durable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Durable]:
    opened: list[SqliteStore | RedisStore] = []
    if request.param == "sqlite":
        path = tmp_path / "store.db"

        def open_sqlite(**kw: object) -> SqliteStore:
            store = SqliteStore(path, timeout_s=10.0, **kw)  # type: ignore[arg-type]
            opened.append(store)
            return store

        def drop_sqlite() -> None:
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                conn.execute("DELETE FROM meta WHERE name = 'epoch'")
            finally:
                conn.close()

        yield Durable("sqlite", open_sqlite, drop_sqlite)
    else:
        import redis

        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")

        def open_redis(**kw: object) -> RedisStore:
            store = RedisStore(url, prefix=prefix, timeout_s=5.0, **kw)  # type: ignore[arg-type]
            opened.append(store)
            return store

        def drop_redis() -> None:  # only this test's prefix: never FLUSHALL the shared server
            client = redis.Redis.from_url(url)
            try:
                client.delete(f"{prefix}epoch")
            finally:
                client.close()

        yield Durable("redis", open_redis, drop_redis)
    for store in opened:
        store.close()


@pytest.mark.parametrize(("op", "call"), OPERATIONS, ids=[op for op, _ in OPERATIONS])
def test_every_operation_checks_the_epoch_and_changes_nothing_without_it(
    durable: Durable, op: str, call: Callable[[Store], object]
) -> None:
    store = durable.open(initialize=True)
    remember(store)
    epoch = store.epoch
    before = (store.remaining(CHILD, {"cost": 10}), store.session_state(CHILD),
              store.events(CHILD), store.list_approvals())
    durable.drop_epoch()
    with pytest.raises(StoreStateLostError, match="aiam store init"):
        call(store)
    # Put the same epoch back by hand: the refused operation must have changed nothing.
    if durable.kind == "sqlite":
        conn = sqlite3.connect(store._path, isolation_level=None)  # type: ignore[union-attr]
        conn.execute("INSERT INTO meta (name, value) VALUES ('epoch', ?)", (epoch,))
        conn.close()
    else:
        store._client.set(f"{store._prefix}epoch", str(epoch))  # type: ignore[union-attr]
    after = (store.remaining(CHILD, {"cost": 10}), store.session_state(CHILD),
             store.events(CHILD), store.list_approvals())
    assert after == before
    assert store.revoked(["iss|other"]) == frozenset()
    assert store.value_labels(CHILD, ["d"]) == {}


def test_a_store_that_was_never_initialised_refuses_everything(durable: Durable) -> None:
    if durable.kind == "sqlite":
        durable.open(initialize=True).close()
        durable.drop_epoch()  # a file with the schema but no epoch (e.g. from an old version)
    store = durable.open()
    assert store.epoch is None
    assert_lost(store)
    assert store.read_epoch() is None


def test_initialize_keeps_an_existing_epoch(durable: Durable) -> None:
    first = durable.open(initialize=True)
    remember(first)
    second = durable.open(initialize=True)  # a second process with the same setting
    assert second.epoch == first.epoch == second.read_epoch()
    assert_still_says_no(second)


def test_init_refuses_an_existing_epoch_and_a_forced_one_is_adopted_with_a_warning(
    durable: Durable, caplog: pytest.LogCaptureFixture
) -> None:
    running = durable.open(initialize=True)
    remember(running)
    old = running.epoch
    operator = durable.open()
    with pytest.raises(StoreError, match=r"already has epoch.*--force"):
        operator.init_epoch()
    new = operator.init_epoch(force=True)
    assert new != old and operator.read_epoch() == new
    with caplog.at_level(logging.WARNING):
        assert_still_says_no(running)  # state is kept; the running client adopts the epoch
    assert running.epoch == new
    assert f"epoch changed from {old} to {new}" in caplog.text


def test_an_operator_init_after_a_loss_lets_running_clients_continue(
    durable: Durable, caplog: pytest.LogCaptureFixture
) -> None:
    running = durable.open(initialize=True)
    remember(running)
    durable.drop_epoch()
    assert_lost(running)
    new = durable.open().init_epoch()
    with caplog.at_level(logging.WARNING):
        result = running.admit(req("after", charges=((CHILD, {"cost": 10}),),
                                   amounts={"cost": 1}))
    assert result.outcome == "budget_exhausted"  # dropping the epoch lost nothing else here
    assert running.epoch == new and "adopting it" in caplog.text


def test_memory_store_epoch_lives_with_its_state() -> None:
    a, b = MemoryStore(), MemoryStore()
    assert a.epoch.startswith("ep-") and a.epoch != b.epoch
    assert a.read_epoch() == a.epoch


# --- SQLite: the file deleted or replaced under running processes ------------------------------


def test_sqlite_store_never_creates_its_file_without_initialize(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with pytest.raises(StoreStateLostError, match="does not exist"):
        SqliteStore(path)
    assert not path.exists()


def _remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


NEW_PROCESS = """
import sys
from agentic_iam.core.store import SqliteStore
from agentic_iam.core.store.base import AdmitRequest, Charge
try:
    store = SqliteStore(sys.argv[1])
    result = store.admit(AdmitRequest("p1", "iss|child", "refund:create", (), (),
                                      (Charge("iss|child", {"cost": 10}),), {"cost": 1}))
    print(result.outcome)
except Exception as exc:
    print(type(exc).__name__)
"""


def test_sqlite_file_deleted_under_running_processes_denies_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    worker_a = SqliteStore(path, initialize=True)
    worker_b = SqliteStore(path)  # a second worker of the same deployment
    try:
        remember(worker_a)
        assert_still_says_no(worker_b)
        _remove_database(path)  # `rm store.db*` while both run

        # A process started now must not open a fresh, empty store (split brain) ...
        out = subprocess.run([sys.executable, "-c", NEW_PROCESS, str(path)], capture_output=True,
                             text=True, timeout=60, check=True)
        assert out.stdout.strip() == "StoreStateLostError", out.stderr
        assert not path.exists()
        # ... and the running ones, whose connections still hold the unlinked file, stop too.
        assert_lost(worker_a)
        assert_lost(worker_b)

        # Someone recreates an empty file (an old version, a script): still no epoch, still lost.
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE unrelated (x)")
        conn.close()
        assert_lost(worker_a)
    finally:
        worker_a.close()
        worker_b.close()


def test_sqlite_file_replaced_under_a_running_process_is_detected_by_its_inode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "store.db"
    running = SqliteStore(path, initialize=True)
    try:
        remember(running)
        old = running.epoch
        _remove_database(path)
        fresh = SqliteStore(path, initialize=True)  # an operator (or a careless service) inits
        new = fresh.epoch
        fresh.close()
        with caplog.at_level(logging.WARNING):
            result = running.admit(req("x", charges=((CHILD, {"cost": 10}),), amounts={"cost": 1}))
        # Without the inode check this process would keep using the deleted file on its own.
        assert result.outcome == "admitted"  # the new file's empty state, seen by everyone
        assert running.epoch == new != old
        assert "file was replaced" in caplog.text and "adopting it" in caplog.text
        assert SqliteStore(path).remaining(CHILD, {"cost": 10}) == {"cost": 9}
    finally:
        running.close()


def test_sqlite_schema_1_file_is_migrated_and_needs_an_epoch(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(
        """
        CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE sessions (
            session TEXT PRIMARY KEY,
            call_count INTEGER NOT NULL DEFAULT 0, risk INTEGER NOT NULL DEFAULT 0,
            labels TEXT NOT NULL DEFAULT '[]', tainted_by TEXT NOT NULL DEFAULT '[]',
            touched REAL NOT NULL) WITHOUT ROWID;
        CREATE TABLE value_labels (
            session TEXT NOT NULL, digest TEXT NOT NULL, label TEXT NOT NULL,
            seq INTEGER NOT NULL, PRIMARY KEY (session, digest)) WITHOUT ROWID;
        CREATE INDEX value_labels_order ON value_labels (session, seq);
        INSERT INTO sessions (session, touched) VALUES ('iss|child', 1e10);
        INSERT INTO value_labels VALUES ('iss|child', 'req', 'request', 1);
        INSERT INTO value_labels VALUES ('iss|child', 'u1', 'untrusted', 2);
        INSERT INTO value_labels VALUES ('iss|child', 'u2', 'untrusted', 3);
        """
    )
    conn.close()
    store = SqliteStore(path)
    try:
        assert store.read_epoch() is None  # state written by the old library: not vouched for
        assert_lost(store)
        store.init_epoch()
        store.add_values(CHILD, {"u3": "untrusted"}, max_values=3)  # count carried over: 4 > 3
        assert dict(store.value_labels(CHILD, ["req", "u1", "u2", "u3"])) == {
            "req": "request", "u2": "untrusted", "u3": "untrusted"
        }
    finally:
        store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() == ("2",)
    conn.close()


# --- Redis: a private server restarted -------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[[bool], PrivateRedis]]:
    if shutil.which("redis-server") is None or shutil.which("timeout") is None:
        fail_or_skip("needs the redis-server and timeout binaries")
    pytest.importorskip("redis")
    servers: list[PrivateRedis] = []

    def start(appendonly: bool) -> PrivateRedis:
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        server = PrivateRedis(directory, appendonly=appendonly)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.crash()


def test_redis_restarted_empty_denies_until_an_operator_initialises(
    private_redis: Callable[[bool], PrivateRedis], caplog: pytest.LogCaptureFixture
) -> None:
    server = private_redis(False)  # --save "" --appendonly no: a restart forgets everything
    running = RedisStore(server.url, timeout_s=2.0, initialize=True)
    try:
        remember(running)
        assert_still_says_no(running)
        server.restart()

        # The exhausted budget, the revocation and the used approval are gone from the server:
        # before the epoch each of these calls would have been allowed.
        assert_lost(running)
        restarted = RedisStore(server.url, timeout_s=2.0)  # a service restarted after the loss
        assert_lost(restarted)
        restarted.close()

        epoch = RedisStore(server.url, timeout_s=2.0).init_epoch()  # `aiam store init`
        with caplog.at_level(logging.WARNING):
            assert running.revoked([REVOKED]) == frozenset()  # the operator's call now
        assert running.epoch == epoch and "adopting it" in caplog.text
    finally:
        running.close()


def test_redis_with_aof_keeps_state_and_epoch_across_a_crash(
    private_redis: Callable[[bool], PrivateRedis],
) -> None:
    server = private_redis(True)  # --appendonly yes --appendfsync always
    store = RedisStore(server.url, timeout_s=2.0, initialize=True)
    try:
        remember(store)
        epoch = store.epoch
        server.restart()  # kill -9, then start on the same directory: the AOF is replayed
        assert_still_says_no(store)
        assert store.epoch == epoch
        other = RedisStore(server.url, timeout_s=2.0)
        assert other.read_epoch() == epoch
        assert_still_says_no(other)
        other.close()
    finally:
        store.close()


def test_redis_epoch_key_has_no_ttl_and_lives_under_the_prefix(
    redis_url: str, redis_prefix: str
) -> None:
    import redis

    store = RedisStore(redis_url, prefix=redis_prefix, initialize=True)
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert admin.get(f"{redis_prefix}epoch") == store.epoch
        assert admin.pttl(f"{redis_prefix}epoch") == -1
    finally:
        admin.close()
        store.close()
