"""The Guard across processes and against real servers: budgets never overspend, revocation
reaches other processes, and a Redis that stops mid-run denies within the store's timeout."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agentic_iam import (
    AgentRegistry,
    Budget,
    CedarEngine,
    DelegationBroker,
    Guard,
    GuardConfig,
    Human,
    KeySet,
    RedisStore,
    SqliteStore,
    TokenVerifier,
    ToolCall,
)

from ..conftest import redis_url, require_redis

AUD = "agentic-iam-scale"
REGISTRY = """
version: 1
agents:
  - id: billing-agent
    name: Billing
    owner: billing@example.com
    max_budget: {tool_calls: 10000, cost: 100000}
    max_risk: 1000
    may_delegate_to: [billing-child]
    tools:
      - {name: charge_card, action: "card:charge", cost: 7, arguments: {}}
  - id: billing-child
    name: Billing child
    owner: billing@example.com
    max_budget: {tool_calls: 10000, cost: 100000}
    tools:
      - {name: charge_card, action: "card:charge", cost: 7, arguments: {}}
"""
POLICY = '@id("permit-all") permit(principal, action, resource);\n'


def _write_world(root: Path) -> tuple[Path, Path]:
    registry = root / "registry.yaml"
    registry.write_text(REGISTRY)
    policies = root / "policies" / "baseline"
    policies.mkdir(parents=True)
    (policies / "permit.cedar").write_text(POLICY)
    return registry, root / "policies"


def _open_store(spec: str, initialize: bool = False) -> Any:
    if spec.startswith("sqlite:"):
        return SqliteStore(spec.removeprefix("sqlite:"), timeout_s=10.0, initialize=initialize)
    url, prefix = spec.split("#", 1)
    return RedisStore(url, prefix=prefix, timeout_s=2.0, initialize=initialize)


def _worker(args: tuple[str, str, str, str, str, Any, int]) -> int:
    registry_path, policies, jwks, token, store_spec, barrier, attempts = args
    registry = AgentRegistry.from_yaml(registry_path)
    keys = KeySet.from_jwks("https://broker.scale", json.loads(jwks))
    guard = Guard(registry, TokenVerifier(keys, audience=AUD),
                  CedarEngine.from_directory(policies, registry), store=_open_store(store_spec),
                  config=GuardConfig(execution_rate_per_s=1e6, execution_burst=10**6,
                                     agent_rate_per_s=1e6, agent_burst=10**6))
    barrier.wait()
    approved = 0
    for _ in range(attempts):
        decision = guard.authorize(token, ToolCall("charge_card", {}))
        if decision.allowed:
            guard.complete(decision)
            approved += 1
    return approved


def _race(tmp_path: Path, store_spec: str) -> tuple[int, Any]:
    registry_path, policies = _write_world(tmp_path)
    registry = AgentRegistry.from_yaml(registry_path)
    keys = KeySet.generate("https://broker.scale")
    store = _open_store(store_spec, initialize=True)
    broker = DelegationBroker(registry, keys, audience=AUD, store=store)
    token = broker.delegate(Human("alice@example.com"), "billing-agent", "race",
                            ["card:charge"], ttl=600, budget=Budget(cost=1000))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(16)
        work = [(str(registry_path), str(policies), json.dumps(keys.to_jwks()), token.token,
                 store_spec, barrier, 40)] * 16
        with ctx.Pool(16) as pool:
            approved = sum(pool.map(_worker, work))
    remaining = store.remaining(token.identity.key, token.identity.budget.as_dict())
    return approved, remaining


def test_sixteen_processes_never_overspend_on_sqlite(tmp_path: Path) -> None:
    approved, remaining = _race(tmp_path, f"sqlite:{tmp_path / 'store.db'}")
    assert approved == 142
    assert remaining["cost"] == 1000 - 994


def test_sixteen_processes_never_overspend_on_redis(tmp_path: Path) -> None:
    require_redis()
    prefix = f"aiam-test-race-{os.getpid()}-{time.time_ns()}:"
    try:
        approved, remaining = _race(tmp_path, f"{redis_url()}#{prefix}")
        assert approved == 142
        assert remaining["cost"] == 1000 - 994
    finally:
        import redis

        client = redis.Redis.from_url(redis_url())
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)


def test_revoking_a_parent_denies_its_children_in_another_process(tmp_path: Path) -> None:
    registry_path, policies = _write_world(tmp_path)
    registry = AgentRegistry.from_yaml(registry_path)
    keys = KeySet.generate("https://broker.scale")
    spec = f"sqlite:{tmp_path / 'store.db'}"
    broker = DelegationBroker(registry, keys, audience=AUD, store=_open_store(spec, True))
    parent = broker.delegate(Human("alice@example.com"), "billing-agent", "revoke",
                             ["card:charge"], ttl=600, budget=Budget(cost=1000), depth=1)
    child = broker.subdelegate(parent, "billing-child", ["card:charge"], ttl=300,
                               budget=Budget(cost=100))
    script = (
        "import json, sys\n"
        "from agentic_iam import *\n"
        "registry = AgentRegistry.from_yaml(sys.argv[1])\n"
        "keys = KeySet.from_jwks('https://broker.scale', json.loads(sys.argv[3]))\n"
        "guard = Guard(registry, TokenVerifier(keys, audience=sys.argv[5]),"
        " CedarEngine.from_directory(sys.argv[2], registry),"
        " store=SqliteStore(sys.argv[4].removeprefix('sqlite:')))\n"
        "d = guard.authorize(sys.argv[6], ToolCall('charge_card', {}))\n"
        "print(d.outcome, d.reasons[0].code)\n"
    )

    def other_process() -> str:
        out = subprocess.run(
            [sys.executable, "-c", script, str(registry_path), str(policies),
             json.dumps(keys.to_jwks()), spec, AUD, child.token],
            capture_output=True, text=True, timeout=60, check=True)
        return out.stdout.strip()

    assert other_process().startswith("allow")
    broker.revoke(parent)
    assert other_process() == "deny token.revoked"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_redis_stopped_mid_run_denies_within_the_timeout(tmp_path: Path) -> None:
    port = _free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        registry_path, policies = _write_world(tmp_path)
        registry = AgentRegistry.from_yaml(registry_path)
        keys = KeySet.generate("https://broker.scale")
        store = RedisStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.25, initialize=True)
        broker = DelegationBroker(registry, keys, audience=AUD, store=store)
        guard = Guard.from_broker(broker, CedarEngine.from_directory(policies, registry))
        token = broker.delegate(Human("alice@example.com"), "billing-agent", "outage",
                                ["card:charge"], ttl=600, budget=Budget(cost=1000))
        first = guard.authorize(token, ToolCall("charge_card", {}))
        assert first.allowed
        guard.complete(first)
        server.kill()  # stopped mid-run, without warning
        server.wait(timeout=10)
        started = time.monotonic()
        decision = guard.authorize(token, ToolCall("charge_card", {}))
        elapsed = time.monotonic() - started
        assert decision.outcome == "deny"
        assert decision.reasons[0].code == "store.unavailable"
        assert elapsed < 0.25 * 4 + 0.5
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
