"""The hot path of issue 15: one guarded call, end to end, p50 and p99, measured in one run.

Run ``python -m benchmarks.bench_hot_path``. Rows (each a guarded call = ``authorize`` → tool →
``screen`` → ``complete``; memory store, no audit sink unless stated, the support policy set):

- a refund (``refund:create amount<=100``) with a 200-character output. The support policies
  allow 3 refunds per session, so a fresh token is minted every 3 calls (outside the timed
  region; its signature is verified there too: "cached token");
- a knowledge-base search repeated with the same context (the Cedar decision cache answers);
- the refund with a buffered JSONL audit log whose signed head is written on flush;
- the firewall's cost per output character: the refund with a 100 KB output, minus the refund
  with a 200-character output, per extra character (the size cut, ``max_chars``, is 20,000);
- the refund on the Redis store, its ratio to memory, and the Redis round trips per call
  (counted on the client connection: one ``send_packed_command`` is one round trip);
- 1000 policies on the refund action (990 forbids that read the context and never match)
  against the 10 of the support set: every call misses the decision cache (the context
  changes with each refund), so this is Cedar's own scaling;
- decisions per second: full refund calls in 1 and in 2 processes sharing one Redis store.

Every value is a median (``p50``) or 99th percentile (``p99``) in microseconds, a ratio
(``ratio …``) or a rate (``… per s``). The machine is shared and noisy: read the ratios.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentic_iam import (
    AgentRegistry,
    CedarEngine,
    DelegationBroker,
    Guard,
    GuardConfig,
    HeadSigner,
    Human,
    JsonlSink,
    KeySet,
    MemoryStore,
    Recorder,
    RedisStore,
    ToolCall,
)
from agentic_iam._resources import default_policies_dir, default_registry_path

__all__ = ["run"]

FAST = GuardConfig(execution_rate_per_s=1e9, execution_burst=10**9, agent_rate_per_s=1e9,
                   agent_burst=10**9)
REFUND = {"amount": 50, "currency": "USD", "account": "ACC-1001"}
OUTPUT = ("Refund of 50 USD to ACC-1001 created; reference R-2231. " * 4)[:200]
BIG_OUTPUT = ("Ledger line 0042: refund R-2231 of 50 USD to ACC-1001 settled on 2026-12-01. "
              * 1300)[:100_000]
REDIS_URL = os.environ.get("AIAM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
UNLIMITED = {"tool_calls": 10**9, "cost": 10**12, "llm_tokens": 10**9}


def _world(root: Path, same_action: int = 0) -> tuple[AgentRegistry, Path]:
    """The demo registry (budgets that never run out) and the support policies, plus
    ``same_action`` forbids on ``refund:create`` that read the context and never match."""
    policies = root / "policies"
    shutil.copytree(default_policies_dir(), policies,
                    ignore=shutil.ignore_patterns("ALLOW", "DENY"))
    if same_action:
        (policies / "baseline" / "same_action.cedar").write_text("".join(
            f'@id("bench.same-action.{i}")\nforbid (principal, action == '
            f'Action::"refund:create", resource) when {{ context.risk.score > {1000 + i} }};\n'
            for i in range(same_action)))
    data = yaml.safe_load(default_registry_path().read_text())
    for agent in data["agents"]:
        agent["max_budget"] = dict(UNLIMITED)
    registry = AgentRegistry.from_text(yaml.safe_dump(data), name="bench-registry")
    return registry, policies


def _guard(registry: AgentRegistry, policies: Path, store: Any,
           recorder: Recorder | None = None) -> tuple[Guard, DelegationBroker]:
    broker = DelegationBroker(registry, KeySet.generate("https://bench"), audience="bench",
                              store=store)
    guard = Guard.from_broker(broker, CedarEngine.from_directory(policies, registry),
                              config=FAST, recorder=recorder)
    return guard, broker


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _refunds(guard: Guard, broker: DelegationBroker, n: int,
             output: str = OUTPUT) -> list[float]:
    """``n`` timed refund calls (after n/10 untimed ones); a fresh token every 3 calls."""
    warm = n // 10
    tokens = [broker.delegate(Human("alice@example.com"), "support-agent", "bench",
                              ["refund:create amount<=100"], 3600, budget=UNLIMITED)
              for _ in range((n + warm) // 3 + 1)]
    for token in tokens:
        guard._identity(token)  # the cached-token case: verification is not timed
    out: list[float] = []
    gc.collect()
    for i in range(n + warm):
        call = ToolCall("create_refund", REFUND, call_id=f"r{i}")
        token = tokens[i // 3]
        started = time.perf_counter_ns()
        decision = guard.authorize(token, call)
        guard.screen(decision, output)
        guard.complete(decision)
        elapsed = (time.perf_counter_ns() - started) / 1000
        if not decision.allowed:
            raise RuntimeError(f"benchmark refund {i} was not allowed: {decision.summary()}")
        if i >= warm:
            out.append(elapsed)
    return out


def _searches(guard: Guard, broker: DelegationBroker, n: int) -> list[float]:
    token = broker.delegate(Human("alice@example.com"), "support-agent", "bench",
                            ["kb:search"], 3600, budget=UNLIMITED)
    out: list[float] = []
    for i in range(n + n // 10):
        call = ToolCall("search_kb", {"query": "double charge"}, call_id=f"s{i}")
        started = time.perf_counter_ns()
        decision = guard.authorize(token, call)
        guard.screen(decision, OUTPUT)
        guard.complete(decision)
        elapsed = (time.perf_counter_ns() - started) / 1000
        if not decision.allowed:
            raise RuntimeError(f"benchmark search {i} was not allowed: {decision.summary()}")
        if i >= n // 10:
            out.append(elapsed)
    return out


@contextmanager
def _round_trips() -> Iterator[list[int]]:
    """Count Redis round trips: every request the client sends is one packed command."""
    from redis.connection import Connection

    count = [0]
    original = Connection.send_packed_command

    def counted(self: Connection, command: Any, check_health: bool = True) -> None:
        count[0] += 1
        original(self, command, check_health)

    Connection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        yield count
    finally:
        Connection.send_packed_command = original  # type: ignore[method-assign]


def _redis_store() -> RedisStore | None:
    try:
        store = RedisStore(REDIS_URL, prefix=f"aiam-bench-{uuid.uuid4().hex}:", initialize=True)
        store.session_state("probe")
        return store
    except Exception:
        return None


def _worker(root: str, calls: int, prefix: str, ready: Any, start: Any, done: Any) -> None:
    registry, policies = _world(Path(root) / f"w{os.getpid()}")
    store = RedisStore(REDIS_URL, prefix=prefix)
    guard, broker = _guard(registry, policies, store)
    tokens = [broker.delegate(Human("alice@example.com"), "support-agent", "bench",
                              ["refund:create amount<=100"], 3600, budget=UNLIMITED)
              for _ in range(calls // 3 + 1)]
    for token in tokens:
        guard._identity(token)
    ready.put(os.getpid())
    if not start.wait(300):
        return
    for i in range(calls):
        decision = guard.authorize(tokens[i // 3], ToolCall("create_refund", REFUND,
                                                            call_id=f"p{os.getpid()}-{i}"))
        guard.screen(decision, OUTPUT)
        guard.complete(decision)
        if not decision.allowed:
            raise SystemExit(f"refused: {decision.summary()}")
    done.put(time.perf_counter())


def _throughput(root: Path, processes: int, calls: int) -> float:
    """Full refund calls per second, ``processes`` workers on one Redis store (bounded: each
    worker makes ``calls`` calls and stops)."""
    prefix = f"aiam-bench-{uuid.uuid4().hex}:"
    RedisStore(REDIS_URL, prefix=prefix, initialize=True).close()
    context = multiprocessing.get_context("spawn")
    ready, start, done = context.Queue(), context.Event(), context.Queue()
    workers = [context.Process(target=_worker,
                               args=(str(root), calls, prefix, ready, start, done))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    for _ in workers:  # each worker builds its engine and tokens first
        ready.get(timeout=300)
    began = time.perf_counter()
    start.set()
    ends = [done.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        if worker.exitcode != 0:
            raise RuntimeError(f"throughput worker failed with exit code {worker.exitcode}")
    return processes * calls / (max(ends) - began)


def run(n: int = 1500, throughput_calls: int = 600) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    root = Path(tempfile.mkdtemp(prefix="aiam-hot-"))

    def both(label: str, samples: list[float]) -> None:
        rows.append((f"{label} p50", _p(samples, 0.5)))
        rows.append((f"{label} p99", _p(samples, 0.99)))

    try:
        registry, policies = _world(root / "small")
        guard, broker = _guard(registry, policies, MemoryStore())
        refund = _refunds(guard, broker, n)
        both("full call, refund, memory, 200-char output", refund)
        both("full call, kb search repeated (decision cache)", _searches(guard, broker, n))

        signer = HeadSigner(Ed25519PrivateKey.generate(), "bench")
        sink = JsonlSink(root / "audit.jsonl", durability="buffered", signer=signer)
        audited, audited_broker = _guard(registry, policies, MemoryStore(), Recorder([sink]))
        both("full call, refund + JSONL buffered, signed head",
             _refunds(audited, audited_broker, n))
        sink.close()

        big = _refunds(guard, broker, n // 5, BIG_OUTPUT)
        both("full call, refund, 100 KB output", big)
        extra = len(BIG_OUTPUT) - len(OUTPUT)
        rows.append(("firewall per output char (100 KB - 200 B) p50",
                     (_p(big, 0.5) - _p(refund, 0.5)) / extra))
        rows.append(("firewall per output char (100 KB - 200 B) p99",
                     (_p(big, 0.99) - _p(refund, 0.99)) / extra))

        store = _redis_store()
        if store is not None:
            on_redis, redis_broker = _guard(registry, policies, store)
            redis_refund = _refunds(on_redis, redis_broker, n // 3)
            with _round_trips() as trips:  # untimed: the round trips of one guarded call
                token = redis_broker.delegate(Human("alice@example.com"), "support-agent",
                                              "bench", ["refund:create amount<=100"], 3600,
                                              budget=UNLIMITED)
                on_redis._identity(token)
                before = trips[0]
                decision = on_redis.authorize(token, ToolCall("create_refund", REFUND, "rt"))
                on_redis.screen(decision, OUTPUT)
                on_redis.complete(decision)
                per_call = trips[0] - before
            both("full call, refund, redis store", redis_refund)
            rows.append(("ratio redis / memory, full call p50",
                         _p(redis_refund, 0.5) / _p(refund, 0.5)))
            rows.append(("ratio redis / memory, full call p99",
                         _p(redis_refund, 0.99) / _p(refund, 0.99)))
            rows.append(("redis round trips per guarded call", float(per_call)))
            store.close()

        registry_l, policies_l = _world(root / "large", same_action=990)
        guard_l, broker_l = _guard(registry_l, policies_l, MemoryStore())
        large = _refunds(guard_l, broker_l, n // 2)
        both("full call, refund, 1000 policies on the action", large)
        rows.append(("ratio 1000 / 10 policies on the action, p50",
                     _p(large, 0.5) / _p(refund, 0.5)))
        rows.append(("ratio 1000 / 10 policies on the action, p99",
                     _p(large, 0.99) / _p(refund, 0.99)))

        if store is not None:
            rows.append(("decisions per s, 1 process, redis",
                         _throughput(root, 1, throughput_calls)))
            rows.append(("decisions per s, 2 processes, redis",
                         _throughput(root, 2, throughput_calls)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main() -> None:
    for label, value in run():
        unit = "x" if label.startswith("ratio") else "" if "per s" in label else "us"
        print(f"{label:<58} {value:12.2f} {unit}")


if __name__ == "__main__":
    main()
