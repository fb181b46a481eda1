"""Fixtures: the same contract tests run against MemoryStore, SqliteStore and a real Redis.

Redis rule: with ``CI=true`` an unreachable Redis FAILS the Redis tests; elsewhere they skip.
Each Redis test gets its own key prefix and deletes its keys afterwards. Never a mock.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from agentic_iam.core.store import MemoryStore, RedisStore, SqliteStore, Store

from ._support import redis_url as _redis_url

STORE_KINDS = ("memory", "sqlite", "redis")


def fail_or_skip(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: the Redis tests must run against a real server)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a reachable real Redis server, or fail (CI) / skip."""
    url = _redis_url()
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        fail_or_skip("redis-py is not installed")
    client = redis.Redis.from_url(
        url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        fail_or_skip(f"no Redis server at {url}: {exc}")
    finally:
        client.close()
    return url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix unique to this test; every key under it is deleted afterwards."""
    import redis

    prefix = f"aiam-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_timeout=5.0)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


StoreFactory = Callable[..., Store]


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def make_store(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[StoreFactory]:
    """Opens stores of one kind that share their backing state (same file / same prefix).

    The first store opened creates the state and its epoch (``initialize=True``); later ones
    open it as a service would. A memory store has no shared backing: every call returns the
    same instance.
    """
    opened: list[Store] = []
    memory: list[MemoryStore] = []
    prefix = ""
    url = ""
    if store_kind == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")

    def factory(**kwargs: Any) -> Store:
        store: Store
        if store_kind == "memory":
            if not memory:
                memory.append(MemoryStore(**kwargs))
            return memory[0]
        if not opened:
            kwargs.setdefault("initialize", True)
        if store_kind == "sqlite":
            kwargs.setdefault("timeout_s", 10.0)
            store = SqliteStore(tmp_path / "store.db", **kwargs)
        else:
            kwargs.setdefault("timeout_s", 5.0)
            store = RedisStore(url, prefix=prefix, **kwargs)
        opened.append(store)
        return store

    yield factory
    for store in opened + memory:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> Store:
    return make_store()
