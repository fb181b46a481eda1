"""LlamaIndex adapter overhead: one tool call, bare against guarded, in one run.

Run ``python -m benchmarks.bench_llama_index``. The bare rows are ``FunctionTool.call`` and
``FunctionTool.acall`` (what ``llm.predict_and_call`` and the workflow agents' ``_call_tool``
do for a call), including the adapter's check that refuses a tool run outside a mediation while
an identity is bound (installed by :func:`guard_tools`; no identity is bound here). The guarded
rows run the same tool through :func:`guard_tools`: ``Guard.mediate`` (token check, registry,
capability, store admission, Cedar, audit record, output screening, settlement) plus the
adapter's own work (ToolCall and ToolOutput translation). The
"Guard by hand" row wraps the same tool in the same Guard calls without the adapter, so the
difference between the two is the adapter's own cost; "guard only" times the Guard calls
without any tool. Samples are
interleaved in blocks so that drift on a shared machine hits every row alike; read the ratios,
not the absolute numbers. This module must never touch the network or write outside memory.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import yaml
from llama_index.core.tools import FunctionTool

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
    ReasoningContext,
    Recorder,
    ToolCall,
)
from agentic_iam._resources import default_policies_dir, default_registry_path
from agentic_iam.integrations.llama_index import guard_tools

__all__ = ["SAMPLES", "run"]

#: The raw samples (microseconds) of the last run, by case, for percentiles.
SAMPLES: dict[str, list[float]] = {}

WARMUP = 300
BLOCK = 100
BLOCKS = 20

OUTPUT = "kb results for double charge: refunds under 100 USD need no approval"
ARGS = {"query": "double charge"}


def search_kb(query: str) -> str:
    """Search the internal knowledge base."""
    return OUTPUT


def _registry() -> AgentRegistry:
    """The demo registry, with budgets large enough that no timed call is ever refused."""
    data = yaml.safe_load(default_registry_path().read_text())
    for agent in data["agents"]:
        if agent["id"] == "support-agent":
            agent["max_budget"] = {"tool_calls": 10**9, "cost": 10**12, "llm_tokens": 10**9}
    return AgentRegistry.from_text(yaml.safe_dump(data), name="bench-registry")


def _guard() -> tuple[Guard, str]:
    registry = _registry()
    keys = KeySet.generate("https://broker.bench")
    store = MemoryStore()
    recorder = Recorder([MemorySink()])
    broker = DelegationBroker(registry, keys, audience="bench", store=store, recorder=recorder)
    config = GuardConfig(execution_rate_per_s=1e9, execution_burst=10**9,
                         agent_rate_per_s=1e9, agent_burst=10**9)
    guard = Guard.from_broker(broker, CedarEngine.from_directory(default_policies_dir(), registry),
                              config=config)
    token = broker.delegate(Human("alice@example.com"), "support-agent", "bench",
                            ["kb:search"], 3600,
                            budget={"tool_calls": 10**9, "cost": 10**12, "llm_tokens": 10**9})
    return guard, token.token


Case = Callable[[int], Any]
AsyncCase = Callable[[int], Awaitable[Any]]


def _cases() -> tuple[dict[str, Case], dict[str, AsyncCase]]:
    guard, token = _guard()
    bare = FunctionTool.from_defaults(search_kb)
    guarded = guard_tools([bare], guard, token)[0]

    def guard_only(i: int) -> Any:
        decision = guard.authorize(token, ToolCall(
            "search_kb", ARGS, f"g{i}", ReasoningContext(message="Searching the KB."),
            "llama_index"))
        screened = guard.screen(decision, OUTPUT)
        guard.complete(decision)
        return screened

    def by_hand(i: int) -> Any:
        decision = guard.authorize(token, ToolCall(
            "search_kb", ARGS, f"h{i}", ReasoningContext(message="Searching the KB."),
            "llama_index"))
        output = bare.call(**decision.arguments)
        screened = guard.screen(decision, output.content)
        guard.complete(decision)
        return screened

    async def bare_async(i: int) -> Any:
        return await bare.acall(**ARGS)

    async def guarded_async(i: int) -> Any:
        return await guarded.acall(**ARGS)

    sync_cases: dict[str, Case] = {
        "bare FunctionTool.call": lambda i: bare.call(**ARGS),
        "guard_tools(...) FunctionTool.call": lambda i: guarded.call(**ARGS),
        "Guard by hand around FunctionTool.call": by_hand,
    }
    async_cases: dict[str, AsyncCase] = {
        "bare FunctionTool.acall": bare_async,
        "guard_tools(...) FunctionTool.acall": guarded_async,
    }
    sync_cases["guard only (authorize+screen+complete)"] = guard_only
    return sync_cases, async_cases


async def _measure() -> dict[str, list[float]]:
    sync_cases, async_cases = _cases()
    for name, case in sync_cases.items():
        for i in range(WARMUP):
            out = case(i)
        if getattr(out, "is_error", False):
            raise RuntimeError(f"benchmark case `{name}` was refused: {out}")
    for name, acase in async_cases.items():
        for i in range(WARMUP):
            out = await acase(i)
        if getattr(out, "is_error", False):
            raise RuntimeError(f"benchmark case `{name}` was refused: {out}")
    samples: dict[str, list[float]] = {name: [] for name in (*sync_cases, *async_cases)}
    counter = WARMUP
    for _ in range(BLOCKS):
        for name, case in sync_cases.items():
            for _ in range(BLOCK):
                counter += 1
                started = time.perf_counter_ns()
                case(counter)
                samples[name].append((time.perf_counter_ns() - started) / 1000)
        for name, acase in async_cases.items():
            for _ in range(BLOCK):
                counter += 1
                started = time.perf_counter_ns()
                await acase(counter)
                samples[name].append((time.perf_counter_ns() - started) / 1000)
    return samples


def run() -> list[tuple[str, float]]:
    """(label, median microseconds per call) for each case, measured in one interleaved run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        samples = asyncio.run(_measure())
    order = ["bare FunctionTool.call", "guard_tools(...) FunctionTool.call",
             "Guard by hand around FunctionTool.call", "bare FunctionTool.acall",
             "guard_tools(...) FunctionTool.acall",
             "guard only (authorize+screen+complete)"]
    SAMPLES.clear()
    SAMPLES.update(samples)
    return [(name, statistics.median(samples[name])) for name in order]


def main() -> None:
    rows = dict(run())
    width = max(len(name) for name in rows)
    print(f"{'case':<{width}}  {'median us':>10}  {'ratio':>6}")
    for name, median in rows.items():
        base = rows["bare FunctionTool.acall" if "acall" in name else "bare FunctionTool.call"]
        print(f"{name:<{width}}  {median:>10.1f}  {median / base:>6.2f}")
    own = rows["guard_tools(...) FunctionTool.call"] - rows[
        "Guard by hand around FunctionTool.call"]
    print(f"adapter's own cost (guard_tools call - Guard by hand): {own:.1f} us")

if __name__ == "__main__":
    main()
