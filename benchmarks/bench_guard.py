"""Guard overhead: ``authorize()`` p50/p99 for the support policy set, and scaling ratios.

Run ``python -m benchmarks.bench_guard``. Measured in one run, on one machine:
- ``authorize`` p50/p99 with the memory store and a cached token (refund 50, support policies);
- the ratio of p50 with 1000 policies (990 forbids on unrelated actions added) to 10 policies:
  policies are sliced by action, so unrelated ones should cost ~nothing;
- the ratios SQLite/memory and Redis/memory for ``authorize`` + ``complete``.
Targets from issue 3 (2-core machine): p50 <= 50 us; 1000/10 <= 1.5; Redis/memory <= 1.5.
They are goals: this prints what was measured. The machine is noisy; read ratios.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from agentic_iam import (
    AgentRegistry,
    Budget,
    CedarEngine,
    DelegationBroker,
    Guard,
    GuardConfig,
    Human,
    KeySet,
    MemoryStore,
    RedisStore,
    SqliteStore,
    ToolCall,
)
from agentic_iam._resources import default_policies_dir, default_registry_path

__all__ = ["run"]

FAST = GuardConfig(execution_rate_per_s=1e9, execution_burst=10**9, agent_rate_per_s=1e9,
                   agent_burst=10**9)
CALL = ToolCall("create_refund", {"amount": 50, "currency": "USD", "account": "ACC-1001"})


def _world(root: Path, unrelated: int) -> tuple[Path, Path]:
    policies = root / "policies"
    shutil.copytree(default_policies_dir(), policies,
                    ignore=shutil.ignore_patterns("ALLOW", "DENY"))
    data = yaml.safe_load(default_registry_path().read_text())
    if unrelated:
        data["agents"].append({
            "id": "unrelated-agent", "name": "Unrelated", "owner": "nobody@example.com",
            "tools": [{"name": f"tool_{i}", "action": f"unrelated:a{i}", "arguments": {}}
                      for i in range(unrelated)],
        })
        (policies / "baseline" / "unrelated.cedar").write_text("".join(
            f'@id("unrelated.{i}")\nforbid (principal, action == Action::"unrelated:a{i}", '
            f"resource) when {{ context.risk.score > {i} }};\n" for i in range(unrelated)))
    registry = root / "registry.yaml"
    registry.write_text(yaml.safe_dump(data))
    return registry, policies


def _guard(registry_path: Path, policies: Path, store: Any) -> tuple[Guard, Any]:
    registry = AgentRegistry.from_yaml(registry_path)
    broker = DelegationBroker(registry, KeySet.generate("https://bench"), audience="bench",
                              store=store)
    guard = Guard.from_broker(broker, CedarEngine.from_directory(policies, registry),
                              config=FAST)
    token = broker.delegate(Human("alice@example.com"), "support-agent", "bench",
                            ["refund:create amount<=100"], ttl=3600,
                            budget=Budget(tool_calls=50, cost=50_000))
    return guard, token


def _samples(guard: Guard, token: Any, n: int, *, complete: bool) -> list[float]:
    out = []
    for i in range(n + n // 10):
        start = time.perf_counter_ns()
        decision = guard.authorize(token, CALL)
        if complete:
            guard.complete(decision)
        elapsed = (time.perf_counter_ns() - start) / 1000
        if not complete:
            # Outside the timed region: the budget would run out, so give the reservation back.
            guard.store.release(decision.reservation_id or "")
        if i >= n // 10:
            out.append(elapsed)
        if not decision.allowed:
            raise RuntimeError(f"benchmark call was not allowed: {decision.summary()}")
    return out


OUTPUT = ("Refund of 50 USD to ACC-1001 created; reference R-2231. " * 4)[:200]


def _full_call_samples(registry_path: Path, policies: Path, n: int,
                       *, mediated: bool) -> list[float]:
    """authorize → tool → screen → complete for a 200-character output, by hand or through
    ``Guard.mediate``. A fresh token every 3 calls (outside the timed region): the support
    policies allow 3 refunds per session."""
    registry = AgentRegistry.from_yaml(registry_path)
    broker = DelegationBroker(registry, KeySet.generate("https://bench"), audience="bench")
    guard = Guard.from_broker(broker, CedarEngine.from_directory(policies, registry),
                              config=FAST)
    out: list[float] = []
    token: Any = None
    for i in range(n + n // 10):
        if i % 3 == 0:
            token = broker.delegate(Human("alice@example.com"), "support-agent", "bench",
                                    ["refund:create amount<=100"], ttl=3600)
        call = ToolCall(CALL.name, CALL.arguments, call_id=f"c{i}")
        start = time.perf_counter_ns()
        if mediated:
            done = guard.mediate(token, call, lambda args: OUTPUT)
            ok = done.status == "ran"
        else:
            decision = guard.authorize(token, call)
            ok = decision.allowed
            guard.screen(decision, OUTPUT)
            guard.complete(decision)
        elapsed = (time.perf_counter_ns() - start) / 1000
        if not ok:
            raise RuntimeError(f"benchmark call {i} was not allowed")
        if i >= n // 10:
            out.append(elapsed)
    return out


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(n: int = 2000) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    root = Path(tempfile.mkdtemp(prefix="aiam-bench-"))
    try:
        small = _world(root / "small", 0)
        large = _world(root / "large", 990)
        # The budget would run out: the bench releases reservations instead of settling.
        guard, token = _guard(*small, MemoryStore())
        guard.authorize(token, CALL)  # warm the token cache and the entity cache
        base = _samples(guard, token, n, complete=False)
        rows.append(("authorize p50 (memory, cached token, support set)", _p(base, 0.5)))
        rows.append(("authorize p99 (memory, cached token, support set)", _p(base, 0.99)))
        guard_l, token_l = _guard(*large, MemoryStore())
        guard_l.authorize(token_l, CALL)
        big = _samples(guard_l, token_l, n, complete=False)
        rows.append(("authorize p50 with 990 unrelated policies added", _p(big, 0.5)))
        rows.append(("ratio 1000-policy / 10-policy (p50)",
                     _p(big, 0.5) / _p(base, 0.5)))
        by_hand = _full_call_samples(*small, n // 2, mediated=False)
        mediated = _full_call_samples(*small, n // 2, mediated=True)
        rows.append(("authorize+screen+complete p50 (by hand, 200-char output)",
                     _p(by_hand, 0.5)))
        rows.append(("Guard.mediate p50 (same call, one mediation path)", _p(mediated, 0.5)))
        rows.append(("ratio mediate / by hand (p50)", _p(mediated, 0.5) / _p(by_hand, 0.5)))
        per_store: dict[str, float] = {}
        stores: dict[str, Any] = {
            "memory": MemoryStore(),
            "sqlite": SqliteStore(str(root / "store.db"), initialize=True)}
        try:
            url = os.environ.get("AIAM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
            redis_store = RedisStore(url, prefix=f"aiam-bench-{uuid.uuid4().hex}:",
                                     initialize=True)
            redis_store.session_state("probe")
            stores["redis"] = redis_store
        except Exception:
            pass
        for name, store in stores.items():
            g, t = _guard(*small, store)
            g.authorize(t, CALL)
            per_store[name] = statistics.median(_samples(g, t, n // 2, complete=False))
            rows.append((f"authorize p50 ({name} store)", per_store[name]))
        for name in ("sqlite", "redis"):
            if name in per_store:
                rows.append((f"ratio {name} / memory (authorize p50)",
                             per_store[name] / per_store["memory"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main() -> None:
    for label, value in run():
        unit = "x" if label.startswith("ratio") else "us"
        print(f"{label:<58} {value:10.2f} {unit}")


if __name__ == "__main__":
    main()
