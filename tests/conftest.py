from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from agentic_iam import (
    AgentRegistry,
    CedarEngine,
    DelegationBroker,
    Guard,
    GuardConfig,
    Human,
    KeySet,
    MemorySink,
    MemoryStore,
    Recorder,
)
from agentic_iam._resources import default_policies_dir, default_registry_path
from agentic_iam.core.store.base import Store

AUDIENCE = "agentic-iam-test"
ALICE = Human("alice@example.com")
APPROVERS = frozenset({"bob", "bob@example.com"})
"""The configured approvers of a test Guard (unless a test passes its own ``config``)."""


@dataclass
class Env:
    registry: AgentRegistry
    keys: KeySet
    broker: DelegationBroker
    guard: Guard
    sink: MemorySink
    recorder: Recorder
    store: Store

    def refund_token(self, *, max_amount: int = 100, ttl: int = 900, **kw: Any) -> Any:
        caps = kw.pop("capabilities", [f"refund:create amount<={max_amount}", "ticket:read"])
        return self.broker.delegate(ALICE, "support-agent", "refund T-1042", caps, ttl, **kw)


EnvFactory = Callable[..., Env]


@pytest.fixture
def make_env() -> Iterator[EnvFactory]:
    made: list[Env] = []

    def factory(*, store: Store | None = None, approver: Any = None,
                policies: Any = None, config: GuardConfig | None = None,
                keys: KeySet | None = None) -> Env:
        registry = AgentRegistry.from_yaml(default_registry_path())
        keyset = keys or KeySet.generate("https://broker.test")
        sink = MemorySink()
        recorder = Recorder([sink])
        backing = store or MemoryStore()
        broker = DelegationBroker(registry, keyset, audience=AUDIENCE, store=backing,
                                  recorder=recorder)
        engine = CedarEngine.from_directory(policies or default_policies_dir(), registry)
        guard = Guard.from_broker(broker, engine, approver=approver,
                                  config=config or GuardConfig(approvers=APPROVERS))
        env = Env(registry, keyset, broker, guard, sink, recorder, backing)
        made.append(env)
        return env

    yield factory


@pytest.fixture
def env(make_env: EnvFactory) -> Env:
    return make_env()


def redis_url() -> str:
    return os.environ.get("AIAM_TEST_REDIS", "redis://127.0.0.1:6379/0")


def require_redis() -> None:
    """Skip without Redis locally; fail in CI (ARCHITECTURE §5)."""
    try:
        import redis

        redis.Redis.from_url(redis_url(), socket_timeout=0.5).ping()
    except Exception as exc:
        message = f"Redis at {redis_url()} is not reachable: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
