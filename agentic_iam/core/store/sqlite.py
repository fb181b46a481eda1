"""SQLite store: one host, many processes (and threads) sharing one database file.

Each operation is one transaction. Operations that change state start with ``BEGIN IMMEDIATE``,
which takes the database's single write lock before the first read, so a check and the change
that depends on it can never interleave with another writer (the budget race in
``shared/reference/security-findings.md`` §0.5). WAL mode lets readers run beside the writer.
Waiting for the lock is bounded by ``timeout_s`` (SQLite's busy timeout); a lock held longer, or
any other SQLite error, is a :class:`~agentic_iam.errors.StoreUnavailableError`, which the Guard
turns into a deny.

Each thread of each process gets its own connection (``sqlite3`` connections must not be shared
across threads mid-transaction, and never across ``fork``). This module must never hold a
transaction open across a call back into the caller, and never put a database on a network
file system (SQLite's locking is not reliable there: use :class:`RedisStore`).

Durability: ``synchronous=NORMAL`` in WAL mode survives a process crash but may lose the last
transactions on power loss (a few milliseconds of spend), a deliberate trade of ~120 us/call.

State loss: the file holds an epoch (``meta``, created by ``initialize=True`` or ``aiam store
init``) and every transaction reads it first; none means the state is gone and the operation
raises :class:`~agentic_iam.errors.StoreStateLostError`. Deleting or replacing the file under
running processes leaves their connections on the old inode while new processes would open a
fresh file (split brain), so each transaction also compares the path's inode with the one its
connection opened (one ``stat``) and a missing or different file is state loss too. Only a
store constructed with ``initialize=True`` ever creates the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from agentic_iam.core.store.base import (
    DEFAULT_MAX_VALUES,
    DEFAULT_STATE_TTL_S,
    REVOCATION_GRACE_S,
    VALUE_LABELS,
    AdmitRequest,
    AdmitResult,
    FinishRequest,
    SessionState,
    add_taint,
    approval_record,
    better_label,
    check_admit,
    check_amounts,
    check_bound,
    check_finish,
    check_int,
    check_key,
    check_label,
    check_limits,
    check_positive,
    check_values,
    distinct_grants,
    dump_json,
    gcra,
    make_result,
    make_session,
    new_epoch,
    remaining_of,
    result_dims,
    settled_amount,
    state_lost,
)
from agentic_iam.errors import ApprovalError, StoreError, StoreUnavailableError

__all__ = ["SqliteStore"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_SCHEMA_VERSION = "2"

# A value label's eviction rank as SQL; the eviction index and query must use this exact text.
_RANK_SQL = (
    "(CASE label "
    + " ".join(f"WHEN '{label}' THEN {rank}" for label, rank in VALUE_LABELS.items())
    + " END)"
)

# Purge stale rows at most this often per connection (seconds).
_PURGE_EVERY_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS budgets (
    grant_key TEXT NOT NULL, dim TEXT NOT NULL,
    spent INTEGER NOT NULL DEFAULT 0, reserved INTEGER NOT NULL DEFAULT 0,
    touched REAL NOT NULL,
    PRIMARY KEY (grant_key, dim)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY, session TEXT NOT NULL, action TEXT NOT NULL,
    grants TEXT NOT NULL, amounts TEXT NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reservations_expiry ON reservations (expires_at);
CREATE INDEX IF NOT EXISTS reservations_session ON reservations (session);
CREATE TABLE IF NOT EXISTS sessions (
    session TEXT PRIMARY KEY,
    call_count INTEGER NOT NULL DEFAULT 0, risk INTEGER NOT NULL DEFAULT 0,
    labels TEXT NOT NULL DEFAULT '[]', tainted_by TEXT NOT NULL DEFAULT '[]',
    touched REAL NOT NULL,
    value_count INTEGER NOT NULL DEFAULT 0, value_seq INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session_actions (
    session TEXT NOT NULL, action TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (session, action)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rate_limits (
    name TEXT PRIMARY KEY, tat REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS revocations (
    name TEXT PRIMARY KEY, until REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, session TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_session ON events (session, seq);
CREATE TABLE IF NOT EXISTS value_labels (
    session TEXT NOT NULL, digest TEXT NOT NULL, label TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (session, digest)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS value_labels_evict ON value_labels (session, %RANK%, seq);
CREATE TABLE IF NOT EXISTS approvals (
    request_id TEXT PRIMARY KEY, binding TEXT NOT NULL, status TEXT NOT NULL,
    approver TEXT, payload TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS approvals_binding ON approvals (binding);
CREATE INDEX IF NOT EXISTS approvals_expiry ON approvals (expires_at);
""".replace("%RANK%", _RANK_SQL)

# Schema 1 -> 2: the value index evicts by label rank and keeps its size and sequence per
# session (no scan per add). ``value_labels_evict`` is created by _SCHEMA above.
_MIGRATE_1_TO_2 = (
    "ALTER TABLE sessions ADD COLUMN value_count INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE sessions ADD COLUMN value_seq INTEGER NOT NULL DEFAULT 0",
    "UPDATE sessions SET"
    " value_count = (SELECT COUNT(*) FROM value_labels v WHERE v.session = sessions.session),"
    " value_seq = (SELECT COALESCE(MAX(seq), 0) FROM value_labels v"
    " WHERE v.session = sessions.session)",
    "DROP INDEX IF EXISTS value_labels_order",
    "UPDATE meta SET value = '2' WHERE name = 'schema'",
)


class _Local(threading.local):
    """This thread's connection, the pid that opened it (a forked child must reopen) and the
    file it opened, as ``(st_dev, st_ino)``."""

    conn: sqlite3.Connection | None = None
    pid: int = 0
    inode: tuple[int, int] = (0, 0)
    last_purge: float = 0.0


class SqliteStore:
    """A :class:`~agentic_iam.core.store.base.Store` in one SQLite file shared by processes.

    ``timeout_s`` bounds every wait for the write lock. ``clock`` (unix seconds) must be the
    same wall clock in every process that shares the file; tests may pass a fake one.
    ``state_ttl_s``: sessions and budgets not written for that long are purged.

    ``initialize``: create the file and its epoch if they do not exist yet (atomically; an
    existing epoch is kept). Leave it False in services: a store whose file or epoch is missing
    then raises :class:`~agentic_iam.errors.StoreStateLostError` (the Guard denies) until an
    operator runs ``aiam store init``. With True, a process restarted after the file was
    deleted would silently start from nothing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        state_ttl_s: float = DEFAULT_STATE_TTL_S,
        initialize: bool = False,
    ) -> None:
        # Absolute: the per-transaction inode check must keep naming the same file even if the
        # process changes its working directory.
        self._path = os.path.abspath(os.fspath(path))
        self._timeout_s = check_positive(timeout_s, "timeout_s")
        self._clock = clock
        self._state_ttl_s = check_positive(state_ttl_s, "state_ttl_s")
        self._local = _Local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._epoch: str | None = None
        self._initialize = bool(initialize)
        try:
            self._run("open", self._open, check=False, create=self._initialize)
        except BaseException:
            self.close()  # do not leak the connection of a store that never opened
            raise

    @property
    def epoch(self) -> str | None:
        """The epoch this client saw first (or adopted); None before it saw one."""
        return self._epoch

    def read_epoch(self) -> str | None:
        """The epoch the file holds now (None: lost or never initialised). Checks nothing."""
        return self._run("read_epoch", lambda conn, now: self._stored_epoch(conn),
                         write=False, check=False)

    def init_epoch(self, *, force: bool = False) -> str:
        """Create the file's epoch and return it (``aiam store init``).

        Refuses (``StoreError``) if the file already holds one, unless ``force``: then a new
        epoch replaces it and running clients adopt it with a warning. State is kept.
        """

        def body(conn: sqlite3.Connection, now: float) -> str:
            current = self._stored_epoch(conn)
            if current is not None and not force:
                raise StoreError(
                    f"sqlite store `{self._path}` already has epoch `{current}`; "
                    "use --force to replace it"
                )
            epoch = new_epoch(now)
            conn.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES ('epoch', ?)", (epoch,)
            )
            return epoch

        self._epoch = self._run("init_epoch", body, check=False)
        return self._epoch

    # --- connection and transaction plumbing ---------------------------------------------------

    def _lost(self, what: str) -> Exception:
        return state_lost(f"sqlite store `{self._path}`", what, f"sqlite:{self._path}")

    def _conn(self, create: bool = False) -> sqlite3.Connection:
        local = self._local
        if local.conn is not None and local.pid == os.getpid():
            return local.conn
        # mode=rw never creates the file: a process must not open a fresh, empty store beside
        # the connections that still hold a deleted one (split brain). Only initialize creates.
        uri = Path(self._path).as_uri() + ("?mode=rwc" if create else "?mode=rw")
        try:
            before: os.stat_result | None = os.stat(self._path)
        except FileNotFoundError:
            if not create:
                raise self._lost("the database file does not exist (deleted, or never "
                                 "initialised)") from None
            before = None
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, so the sqlite3
        # module never opens an implicit (deferred) transaction behind our back.
        conn = sqlite3.connect(
            uri, timeout=self._timeout_s, isolation_level=None, check_same_thread=False, uri=True
        )
        try:
            # stat before and after connecting: the same inode both times is the file we opened
            # (sqlite3 gives no access to its file descriptor).
            after = os.stat(self._path)
            if before is not None and (before.st_dev, before.st_ino) != (
                after.st_dev, after.st_ino
            ):
                raise self._lost("the database file was replaced while it was being opened")
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        except FileNotFoundError:
            conn.close()
            raise self._lost("the database file was deleted while it was being opened") from None
        except BaseException:
            conn.close()
            raise
        local.conn, local.pid, local.last_purge = conn, os.getpid(), 0.0
        local.inode = (after.st_dev, after.st_ino)
        with self._all_lock:
            self._all.append(conn)
        return conn

    def _drop_conn(self) -> None:
        """Close this thread's connection (it is on a file the path no longer names)."""
        conn, self._local.conn = self._local.conn, None
        if conn is None:
            return
        with self._all_lock:
            if conn in self._all:
                self._all.remove(conn)
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def _same_file(self) -> None:
        """Raise StoreStateLostError if the path is gone; reconnect if it names another file.

        After a reconnect the epoch check decides: a fresh file has no epoch (lost), a file an
        operator initialised has a new one (adopted with a warning).
        """
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            raise self._lost("the database file does not exist (deleted, or never "
                             "initialised)") from None
        local = self._local
        if local.conn is not None and local.pid == os.getpid() and local.inode != (
            st.st_dev, st.st_ino
        ):
            log.warning("sqlite store %s: the file was replaced under this process; reopening",
                        self._path)
            self._drop_conn()

    @staticmethod
    def _stored_epoch(conn: sqlite3.Connection) -> str | None:
        try:
            row = conn.execute("SELECT value FROM meta WHERE name = 'epoch'").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None  # a file without our schema holds no epoch either
            raise
        return None if row is None else str(row[0])

    def _check_epoch(self, conn: sqlite3.Connection) -> None:
        """Inside the transaction: the epoch must be present; a new one is adopted."""
        stored = self._stored_epoch(conn)
        if stored is None:
            raise self._lost("the store holds no epoch: its state was lost (file deleted or "
                             "replaced) or it was never initialised")
        if stored != self._epoch:
            if self._epoch is not None:
                log.warning(
                    "sqlite store %s: epoch changed from %s to %s (re-initialised by an "
                    "operator); adopting it", self._path, self._epoch, stored)
            self._epoch = stored

    def _run(
        self,
        op: str,
        body: Callable[[sqlite3.Connection, float], _T],
        *,
        write: bool = True,
        check: bool = True,
        create: bool = False,
    ) -> _T:
        """Run ``body`` in one transaction; any SQLite error becomes StoreUnavailableError.

        ``check``: verify the file and its epoch first, in the same transaction.
        """
        if self._closed:
            raise StoreError(f"sqlite store: `{op}` called after close()")
        try:
            if not create:
                self._same_file()
            conn = self._conn(create)
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as exc:
            raise StoreUnavailableError(
                f"sqlite store `{self._path}`: `{op}` could not start a transaction "
                f"within {self._timeout_s}s: {exc}"
            ) from exc
        except OSError as exc:
            raise StoreUnavailableError(
                f"sqlite store `{self._path}`: `{op}` could not open the file: {exc}"
            ) from exc
        try:
            if check:
                self._check_epoch(conn)
            result = body(conn, self._clock())
            conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):  # the original error is the one to report
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreUnavailableError(
                    f"sqlite store `{self._path}`: `{op}` failed: {exc}"
                ) from exc
            raise
        return result

    def _open(self, conn: sqlite3.Connection, now: float) -> None:
        # Statement by statement: executescript() would COMMIT our BEGIN IMMEDIATE first.
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(
            "INSERT OR IGNORE INTO meta (name, value) VALUES ('schema', ?)", (_SCHEMA_VERSION,)
        )
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        if row[0] == "1":
            for statement in _MIGRATE_1_TO_2:
                conn.execute(statement)
        elif row[0] != _SCHEMA_VERSION:
            raise StoreError(
                f"sqlite store `{self._path}` has schema version {row[0]}, "
                f"this library needs {_SCHEMA_VERSION}"
            )
        if self._initialize:
            conn.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('epoch', ?)", (new_epoch(now),)
            )
        self._epoch = self._stored_epoch(conn)

    # --- internals (inside a write transaction) ------------------------------------------------

    def _finish(
        self, conn: sqlite3.Connection, rid: str, actual: Mapping[str, int] | None, now: float
    ) -> None:
        """Settle (``actual`` given) or release (None) a reservation; expired ones are released."""
        row = conn.execute(
            "SELECT session, action, grants, amounts, expires_at FROM reservations WHERE id = ?",
            (rid,),
        ).fetchone()
        if row is None:
            return
        session, action, grants_json, amounts_json, expires_at = row
        if expires_at <= now:
            actual = None  # expired: its amounts already belong back to the grants
        grants: list[str] = json.loads(grants_json)
        amounts: dict[str, int] = json.loads(amounts_json)
        risk_back = 0
        for dim, reserved in amounts.items():
            charged = 0 if actual is None else settled_amount(reserved, actual.get(dim))
            conn.executemany(
                "UPDATE budgets SET reserved = MAX(reserved - ?, 0), spent = spent + ?, touched = ?"
                " WHERE grant_key = ? AND dim = ?",
                [(reserved, charged, now, grant, dim) for grant in grants],
            )
            if dim == "risk":
                risk_back = reserved - charged
        if actual is None:  # release: the call never counted
            conn.execute(
                "UPDATE sessions SET call_count = MAX(call_count - 1, 0),"
                " risk = MAX(risk - ?, 0) WHERE session = ?",
                (risk_back, session),
            )
            conn.execute(
                "UPDATE session_actions SET count = count - 1 WHERE session = ? AND action = ?",
                (session, action),
            )
            conn.execute(
                "DELETE FROM session_actions WHERE session = ? AND action = ? AND count <= 0",
                (session, action),
            )
        elif risk_back:
            conn.execute(
                "UPDATE sessions SET risk = MAX(risk - ?, 0) WHERE session = ?",
                (risk_back, session),
            )
        conn.execute("DELETE FROM reservations WHERE id = ?", (rid,))

    def _maintain(self, conn: sqlite3.Connection, now: float) -> None:
        """Release expired reservations; now and then purge what nobody needs any more."""
        expired = conn.execute(
            "SELECT id FROM reservations WHERE expires_at <= ? ORDER BY expires_at", (now,)
        ).fetchall()
        for (rid,) in expired:
            self._finish(conn, rid, None, now)
        if now - self._local.last_purge < _PURGE_EVERY_S:
            return
        self._local.last_purge = now
        cutoff = now - self._state_ttl_s
        stale = (
            "SELECT session FROM sessions WHERE touched < ?"
            " AND session NOT IN (SELECT session FROM reservations)"
        )
        for table in ("session_actions", "events", "value_labels"):
            conn.execute(f"DELETE FROM {table} WHERE session IN ({stale})", (cutoff,))
        conn.execute(f"DELETE FROM sessions WHERE session IN ({stale})", (cutoff,))
        conn.execute("DELETE FROM budgets WHERE touched < ? AND reserved = 0", (cutoff,))
        conn.execute("DELETE FROM rate_limits WHERE tat <= ?", (now,))
        conn.execute("DELETE FROM revocations WHERE until <= ?", (now,))
        conn.execute("DELETE FROM approvals WHERE expires_at <= ?", (now,))

    @staticmethod
    def _budget(conn: sqlite3.Connection, grant: str) -> tuple[dict[str, int], dict[str, int]]:
        spent: dict[str, int] = {}
        reserved: dict[str, int] = {}
        for dim, s, r in conn.execute(
            "SELECT dim, spent, reserved FROM budgets WHERE grant_key = ?", (grant,)
        ):
            spent[dim], reserved[dim] = s, r
        return spent, reserved

    @staticmethod
    def _session_state(conn: sqlite3.Connection, session: str) -> SessionState:
        row = conn.execute(
            "SELECT call_count, risk, labels, tainted_by FROM sessions WHERE session = ?",
            (session,),
        ).fetchone()
        if row is None:
            return make_session(0, {}, (), 0, ())
        actions = dict(
            conn.execute(
                "SELECT action, count FROM session_actions WHERE session = ?", (session,)
            ).fetchall()
        )
        return make_session(row[0], actions, json.loads(row[2]), row[1], json.loads(row[3]))

    @staticmethod
    def _touch_session(conn: sqlite3.Connection, session: str, now: float) -> None:
        conn.execute(
            "INSERT INTO sessions (session, touched) VALUES (?, ?)"
            " ON CONFLICT (session) DO UPDATE SET touched = excluded.touched",
            (session, now),
        )

    # --- budgets and rate limits ------------------------------------------------------------

    def admit(self, request: AdmitRequest) -> AdmitResult:
        check_admit(request)
        seeds = check_values(request.seed_values, "seed_values")
        wanted = list(dict.fromkeys(request.value_digests))
        amounts = dict(request.amounts)
        positive = {dim: amount for dim, amount in amounts.items() if amount > 0}
        grants = distinct_grants(request.charges)
        dims = result_dims(request)
        calling_limits = (
            check_limits(request.charges[0].limits, "limits") if request.charges else {}
        )

        def body(conn: sqlite3.Connection, now: float) -> AdmitResult:
            self._maintain(conn, now)
            if conn.execute(
                "SELECT 1 FROM reservations WHERE id = ?", (request.reservation_id,)
            ).fetchone():
                raise StoreError(f"reservation `{request.reservation_id}` already exists")
            before = self._session_state(conn, request.session)
            budgets = {grant: self._budget(conn, grant) for grant in grants}

            def current() -> dict[str, int | None]:
                spent, reserved = budgets[grants[0]] if grants else ({}, {})
                return remaining_of(dims, calling_limits, spent, reserved)

            for key in request.revocation_keys:
                if conn.execute(
                    "SELECT 1 FROM revocations WHERE name = ? AND until > ?", (key, now)
                ).fetchone():
                    return make_result("revoked", key, 0.0, current(), before)

            new_tats: dict[str, float] = {}
            refused: str | None = None
            retry_after = 0.0
            for rate in request.rate_limits:
                if rate.key in new_tats:
                    tat: float | None = new_tats[rate.key]
                else:
                    row = conn.execute(
                        "SELECT tat FROM rate_limits WHERE name = ?", (rate.key,)
                    ).fetchone()
                    tat = None if row is None else row[0]
                allowed, new_tat, wait = gcra(tat, now, rate.per_second, rate.burst)
                if allowed:
                    new_tats[rate.key] = new_tat
                else:
                    refused = refused or rate.key
                    retry_after = max(retry_after, wait)
            if refused is not None:
                return make_result("rate_limited", refused, retry_after, current(), before)

            for charge in request.charges:
                spent, reserved = budgets[charge.grant]
                for dim, limit in sorted(charge.limits.items()):
                    if limit is None:
                        continue
                    if spent.get(dim, 0) + reserved.get(dim, 0) + amounts.get(dim, 0) > limit:
                        return make_result(
                            "budget_exhausted", f"{charge.grant}|{dim}", 0.0, current(), before
                        )

            # Every check passed: only now change anything.
            conn.executemany(
                "INSERT INTO rate_limits (name, tat) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET tat = excluded.tat",
                list(new_tats.items()),
            )
            conn.executemany(
                "INSERT INTO budgets (grant_key, dim, reserved, touched) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (grant_key, dim) DO UPDATE"
                " SET reserved = reserved + excluded.reserved, touched = excluded.touched",
                [(g, dim, amount, now) for g in grants for dim, amount in positive.items()],
            )
            for grant in grants:
                _, reserved = budgets[grant]
                for dim, amount in positive.items():
                    reserved[dim] = reserved.get(dim, 0) + amount
            conn.execute(
                "INSERT INTO sessions (session, call_count, risk, touched) VALUES (?, 1, ?, ?)"
                " ON CONFLICT (session) DO UPDATE SET call_count = call_count + 1,"
                " risk = risk + excluded.risk, touched = excluded.touched",
                (request.session, positive.get("risk", 0), now),
            )
            conn.execute(
                "INSERT INTO session_actions (session, action, count) VALUES (?, ?, 1)"
                " ON CONFLICT (session, action) DO UPDATE SET count = count + 1",
                (request.session, request.action),
            )
            conn.execute(
                "INSERT INTO reservations (id, session, action, grants, amounts, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    request.reservation_id,
                    request.session,
                    request.action,
                    json.dumps(list(grants)),
                    json.dumps(positive),
                    now + request.reservation_ttl_s,
                ),
            )
            # The request's seeds, then its provenance lookups, in the same transaction.
            if seeds:
                self._add_values(conn, request.session, seeds, DEFAULT_MAX_VALUES, now)
            labels = self._value_labels(conn, request.session, wanted)
            return make_result("admitted", "", 0.0, current(), before, labels)

        return self._run("admit", body)

    def settle(self, reservation_id: str, actual: Mapping[str, int]) -> None:
        check_key(reservation_id, "reservation_id")
        actual = check_amounts(actual, "actual")

        def body(conn: sqlite3.Connection, now: float) -> None:
            self._maintain(conn, now)
            self._finish(conn, reservation_id, actual, now)

        self._run("settle", body)

    def release(self, reservation_id: str) -> None:
        check_key(reservation_id, "reservation_id")

        def body(conn: sqlite3.Connection, now: float) -> None:
            self._maintain(conn, now)
            self._finish(conn, reservation_id, None, now)

        self._run("release", body)

    def charge(self, grants: Sequence[str], amounts: Mapping[str, int]) -> None:
        grant_keys = tuple(dict.fromkeys(check_key(g, "grants[]") for g in grants))
        amounts = check_amounts(amounts, "amounts")

        def body(conn: sqlite3.Connection, now: float) -> None:
            conn.executemany(
                "INSERT INTO budgets (grant_key, dim, spent, touched) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (grant_key, dim) DO UPDATE"
                " SET spent = spent + excluded.spent, touched = excluded.touched",
                [(g, dim, amount, now) for g in grant_keys for dim, amount in amounts.items()],
            )

        self._run("charge", body)

    def remaining(self, grant: str, limits: Mapping[str, int | None]) -> Mapping[str, int | None]:
        check_key(grant, "grant")
        limits = check_limits(limits, "limits")

        def body(conn: sqlite3.Connection, now: float) -> dict[str, int | None]:
            self._maintain(conn, now)  # expired reservations must not count
            spent, reserved = self._budget(conn, grant)
            return remaining_of(limits, limits, spent, reserved)

        return self._run("remaining", body)

    # --- sessions ----------------------------------------------------------------------------

    def add_risk(
        self,
        session: str,
        amount: int,
        labels: Iterable[str] = (),
        tainted_by: str | None = None,
    ) -> SessionState:
        check_key(session, "session")
        check_int(amount, "amount")
        label_set = {check_key(label, "labels[]") for label in labels}
        if tainted_by is not None:
            check_key(tainted_by, "tainted_by")

        def body(conn: sqlite3.Connection, now: float) -> SessionState:
            self._maintain(conn, now)
            self._observe(conn, session, amount, label_set,
                          () if tainted_by is None else (tainted_by,), now)
            return self._session_state(conn, session)

        return self._run("add_risk", body)

    def _observe(self, conn: sqlite3.Connection, session: str, amount: int,
                 labels: Iterable[str], sources: Iterable[str], now: float) -> None:
        """``add_risk`` inside a write transaction (arguments validated)."""
        self._touch_session(conn, session, now)
        row = conn.execute(
            "SELECT labels, tainted_by FROM sessions WHERE session = ?", (session,)
        ).fetchone()
        new_labels = sorted(set(json.loads(row[0])) | set(labels))
        new_taint = json.loads(row[1])
        for source in sources:
            new_taint = add_taint(new_taint, source)
        conn.execute(
            "UPDATE sessions SET risk = risk + ?, labels = ?, tainted_by = ? WHERE session = ?",
            (amount, json.dumps(new_labels), json.dumps(new_taint), session),
        )

    def finish(self, request: FinishRequest) -> None:
        """See :meth:`Store.finish`: one ``BEGIN IMMEDIATE`` transaction."""
        event = check_finish(request)
        values = list(request.values.items())

        def body(conn: sqlite3.Connection, now: float) -> None:
            self._maintain(conn, now)
            session = request.session
            if request.observes:
                self._observe(conn, session, request.risk, request.labels,
                              request.tainted_by, now)
            if values:
                self._add_values(conn, session, values, request.max_values, now)
            if request.reservation_id is not None:
                actual = None if request.actual is None else dict(request.actual)
                self._finish(conn, request.reservation_id, actual, now)
            if event is not None:
                self._append_event(conn, session, event, request.max_events, now)

        self._run("finish", body)

    def session_state(self, session: str) -> SessionState:
        check_key(session, "session")

        def body(conn: sqlite3.Connection, now: float) -> SessionState:
            self._maintain(conn, now)  # expired reservations must not count
            return self._session_state(conn, session)

        return self._run("session_state", body)

    def append_event(
        self, session: str, event: Mapping[str, Any], *, max_events: int = 256
    ) -> None:
        check_key(session, "session")
        check_bound(max_events, "max_events")
        text = dump_json(event, "event")

        def body(conn: sqlite3.Connection, now: float) -> None:
            self._append_event(conn, session, text, max_events, now)

        self._run("append_event", body)

    def _append_event(self, conn: sqlite3.Connection, session: str, text: str,
                      max_events: int, now: float) -> None:
        """``append_event`` inside a write transaction (arguments validated)."""
        self._touch_session(conn, session, now)
        conn.execute("INSERT INTO events (session, body) VALUES (?, ?)", (session, text))
        conn.execute(
            "DELETE FROM events WHERE session = ? AND seq <= (SELECT seq FROM events"
            " WHERE session = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (session, session, max_events),
        )

    def events(self, session: str) -> list[dict[str, Any]]:
        check_key(session, "session")

        def body(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT body FROM events WHERE session = ? ORDER BY seq", (session,)
            ).fetchall()
            return [json.loads(text) for (text,) in rows]

        return self._run("events", body, write=False)

    def add_values(
        self, session: str, digests: Mapping[str, str], *, max_values: int = 4096
    ) -> None:
        check_key(session, "session")
        check_bound(max_values, "max_values")
        items = [(check_key(d, "digest"), check_label(label)) for d, label in digests.items()]

        def body(conn: sqlite3.Connection, now: float) -> None:
            self._add_values(conn, session, items, max_values, now)

        self._run("add_values", body)

    def _add_values(self, conn: sqlite3.Connection, session: str,
                    items: Iterable[tuple[str, str]], max_values: int, now: float) -> None:
        """``add_values`` inside a write transaction (arguments validated)."""
        self._touch_session(conn, session, now)
        count, seq = conn.execute(
            "SELECT value_count, value_seq FROM sessions WHERE session = ?", (session,)
        ).fetchone()
        for digest, label in items:
            seq += 1
            row = conn.execute(
                "SELECT label FROM value_labels WHERE session = ? AND digest = ?",
                (session, digest),
            ).fetchone()
            if row is None:
                count += 1
            conn.execute(
                "INSERT OR REPLACE INTO value_labels (session, digest, label, seq)"
                " VALUES (?, ?, ?, ?)",
                (session, digest, better_label(None if row is None else row[0], label), seq),
            )
        if count > max_values:
            # Lowest rank first, oldest first within it (index value_labels_evict): the
            # attacker's own untrusted content cannot push out request or trusted values.
            count -= conn.execute(
                "DELETE FROM value_labels WHERE session = ? AND digest IN (SELECT digest"
                f" FROM value_labels WHERE session = ? ORDER BY {_RANK_SQL}, seq LIMIT ?)",
                (session, session, count - max_values),
            ).rowcount
        conn.execute(
            "UPDATE sessions SET value_count = ?, value_seq = ? WHERE session = ?",
            (count, seq, session),
        )

    def value_labels(self, session: str, digests: Sequence[str]) -> Mapping[str, str]:
        check_key(session, "session")
        wanted = list(dict.fromkeys(digests))

        def body(conn: sqlite3.Connection, now: float) -> dict[str, str]:
            return self._value_labels(conn, session, wanted)

        return self._run("value_labels", body, write=False)

    @staticmethod
    def _value_labels(conn: sqlite3.Connection, session: str,
                      wanted: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for digest in wanted:
            row = conn.execute(
                "SELECT label FROM value_labels WHERE session = ? AND digest = ?",
                (session, digest),
            ).fetchone()
            if row is not None:
                found[digest] = row[0]
        return found

    # --- revocation ---------------------------------------------------------------------------

    def revoke(self, key: str, *, expires_at: int) -> None:
        check_key(key, "key")
        check_int(expires_at, "expires_at")

        def body(conn: sqlite3.Connection, now: float) -> None:
            until = max(float(expires_at), now) + REVOCATION_GRACE_S
            conn.execute(
                "INSERT INTO revocations (name, until) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET until = MAX(until, excluded.until)",
                (key, until),
            )

        self._run("revoke", body)

    def revoked(self, keys: Sequence[str]) -> frozenset[str]:
        wanted = list(dict.fromkeys(keys))

        def body(conn: sqlite3.Connection, now: float) -> frozenset[str]:
            return frozenset(
                key
                for key in wanted
                if conn.execute(
                    "SELECT 1 FROM revocations WHERE name = ? AND until > ?", (key, now)
                ).fetchone()
            )

        return self._run("revoked", body, write=False)

    # --- approvals ----------------------------------------------------------------------------

    @staticmethod
    def _approval(conn: sqlite3.Connection, request_id: str, now: float) -> dict[str, Any] | None:
        row = conn.execute(
            "SELECT request_id, binding, status, approver, payload, created_at, expires_at"
            " FROM approvals WHERE request_id = ? AND expires_at > ?",
            (request_id, now),
        ).fetchone()
        return None if row is None else _record(row)

    def put_approval(
        self, request_id: str, binding: str, payload: Mapping[str, Any], *, ttl_s: float
    ) -> None:
        check_key(request_id, "request_id")
        check_key(binding, "binding")
        ttl = check_positive(ttl_s, "ttl_s")
        text = dump_json(payload, "payload")

        def body(conn: sqlite3.Connection, now: float) -> None:
            conn.execute(
                "DELETE FROM approvals WHERE request_id = ? AND expires_at <= ?", (request_id, now)
            )
            if conn.execute(
                "SELECT 1 FROM approvals WHERE request_id = ?", (request_id,)
            ).fetchone():
                raise ApprovalError(f"approval request `{request_id}` already exists")
            conn.execute(
                "INSERT INTO approvals (request_id, binding, status, approver, payload,"
                " created_at, expires_at) VALUES (?, ?, 'pending', NULL, ?, ?, ?)",
                (request_id, binding, text, now, now + ttl),
            )

        self._run("put_approval", body)

    def resolve_approval(
        self, request_id: str, *, approved: bool, approver: str
    ) -> Mapping[str, Any]:
        check_key(approver, "approver")

        def body(conn: sqlite3.Connection, now: float) -> Mapping[str, Any]:
            record = self._approval(conn, request_id, now)
            if record is None:
                raise ApprovalError(f"approval request `{request_id}` is unknown or expired")
            if record["status"] != "pending":
                raise ApprovalError(
                    f"approval request `{request_id}` was already resolved ({record['status']})"
                )
            record["status"] = "approved" if approved else "denied"
            record["approver"] = approver
            conn.execute(
                "UPDATE approvals SET status = ?, approver = ? WHERE request_id = ?",
                (record["status"], approver, request_id),
            )
            return record

        return self._run("resolve_approval", body)

    def consume_approval(self, binding: str) -> bool:
        def body(conn: sqlite3.Connection, now: float) -> bool:
            row = conn.execute(
                "SELECT request_id FROM approvals WHERE binding = ? AND status = 'approved'"
                " AND expires_at > ? ORDER BY created_at LIMIT 1",
                (binding, now),
            ).fetchone()
            if row is None:
                return False
            conn.execute("UPDATE approvals SET status = 'consumed' WHERE request_id = ?", (row[0],))
            return True

        return self._run("consume_approval", body)

    def get_approval(self, request_id: str) -> Mapping[str, Any] | None:
        return self._run(
            "get_approval", lambda conn, now: self._approval(conn, request_id, now), write=False
        )

    def list_approvals(self, status: str | None = None) -> list[Mapping[str, Any]]:
        def body(conn: sqlite3.Connection, now: float) -> list[Mapping[str, Any]]:
            rows = conn.execute(
                "SELECT request_id, binding, status, approver, payload, created_at, expires_at"
                " FROM approvals WHERE expires_at > ? AND (? IS NULL OR status = ?)"
                " ORDER BY created_at",
                (now, status, status),
            ).fetchall()
            return [_record(row) for row in rows]

        return self._run("list_approvals", body, write=False)

    def close(self) -> None:
        """Close every connection this store opened, in any thread."""
        self._closed = True
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local.conn = None


def _record(row: tuple[Any, ...]) -> dict[str, Any]:
    request_id, binding, status, approver, payload, created_at, expires_at = row
    return approval_record(
        request_id, binding, status, approver, json.loads(payload), created_at, expires_at
    )
