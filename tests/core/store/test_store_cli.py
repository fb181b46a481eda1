"""``aiam store init`` and ``aiam store status``: the operator's side of the store epoch."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from typer.testing import CliRunner

from agentic_iam.cli import app
from agentic_iam.core.store import RedisStore, SqliteStore

from ._support import req

runner = CliRunner()


def aiam(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_init_creates_a_sqlite_store_once_and_status_reports_it(tmp_path: Path) -> None:
    spec = f"sqlite:{tmp_path / 'store.db'}"
    code, out, _ = aiam("store", "status", "--store", spec)
    assert code == 1 and "lost or never initialised" in out
    assert not (tmp_path / "store.db").exists()  # status never creates the file

    code, out, err = aiam("store", "init", "--store", spec)
    assert code == 0, err
    epoch = SqliteStore(tmp_path / "store.db").read_epoch()
    assert epoch is not None and f"epoch {epoch}" in out

    code, _, err = aiam("store", "init", "--store", spec)
    assert code == 2 and "already has epoch" in err and "--force" in err

    code, out, _ = aiam("store", "status", "--store", spec, "--json")
    assert code == 0
    assert json.loads(out) == {"store": spec, "epoch": epoch, "ok": True, "warnings": []}


def test_after_a_loss_services_deny_until_store_init(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    running = SqliteStore(path, initialize=True)
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("DELETE FROM meta WHERE name = 'epoch'")  # the state is gone
        conn.close()
        code, out, _ = aiam("store", "status", "--store", f"sqlite:{path}")
        assert code == 1 and "aiam store init" in out
        code, _, err = aiam("approvals", "list", "--store", f"sqlite:{path}")
        assert code == 2 and "aiam store init" in err  # every command refuses, with the fix

        code, _, err = aiam("store", "init", "--store", f"sqlite:{path}")
        assert code == 0, err
        assert running.admit(req("r1")).outcome == "admitted"  # adopted the operator's epoch
    finally:
        running.close()


def test_force_replaces_the_epoch(tmp_path: Path) -> None:
    spec = f"sqlite:{tmp_path / 'store.db'}"
    assert aiam("store", "init", "--store", spec)[0] == 0
    old = SqliteStore(tmp_path / "store.db").read_epoch()
    code, out, err = aiam("store", "init", "--store", spec, "--force")
    assert code == 0, err
    new = SqliteStore(tmp_path / "store.db").read_epoch()
    assert new != old and f"replaced epoch {old}" in out


def test_redis_init_and_status_with_a_prefix(redis_url: str, redis_prefix: str) -> None:
    code, out, _ = aiam("store", "status", "--store", redis_url, "--prefix", redis_prefix,
                        "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and f"--prefix {redis_prefix}" in report["problem"]
    code, out, err = aiam("store", "init", "--store", redis_url, "--prefix", redis_prefix)
    assert code == 0, err
    store = RedisStore(redis_url, prefix=redis_prefix)
    try:
        epoch = store.read_epoch()
        assert epoch is not None and epoch in out
        code, out, _ = aiam("store", "status", "--store", redis_url, "--prefix", redis_prefix,
                            "--json")
        report = json.loads(out)
        assert code == 0 and report["epoch"] == epoch and report["prefix"] == redis_prefix
        # The shared test server runs without AOF: status says what that risks.
        settings = store.persistence()
        if settings.get("appendonly") == "no":
            assert any("appendonly" in w for w in report["warnings"])
    finally:
        store.close()


def test_redis_url_password_is_never_printed(redis_prefix: str) -> None:
    code, out, err = aiam("store", "status", "--store", "redis://:hunter2@127.0.0.1:1/0",
                          "--prefix", redis_prefix)
    assert code == 2  # nothing listens on port 1
    assert "hunter2" not in out + err


def test_memory_store_has_nothing_to_initialise() -> None:
    code, _, err = aiam("store", "init", "--store", "memory")
    assert code == 2 and "lives and dies with its process" in err
