"""LangChain adapter overhead: one tool call, bare against guarded, in one run.

Run ``python -m benchmarks.bench_langchain``. The bare row is what LangGraph's ``ToolNode`` does
for a call: ``tool.invoke(ToolCall)`` -> ``ToolMessage``. The guarded rows add the whole Guard
pipeline (token check, registry, capability, store admission, Cedar, audit record, output
screening, settlement, all in ``Guard.mediate``) through the two adapter paths:
``GuardMiddleware.wrap_tool_call`` (the same wrapper ``protect`` and ``guarded_tool_node`` put
on a ``ToolNode``) and a ``guard_tools`` wrapper. A "guard only"
row times the same Guard calls without the framework, for reference. Samples are interleaved in
blocks so that drift on a shared machine hits every row alike; read the ratios, not the
absolute numbers. This module must never touch the network or write outside memory.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any, cast

import yaml
from langchain_core.messages import AIMessage
from langchain_core.tools import BaseTool, tool
from langgraph.prebuilt.tool_node import ToolCallRequest, ToolRuntime

from agentic_iam import (
    AgentRegistry,
    AuditEvent,
    CedarEngine,
    Decision,
    DelegationBroker,
    Guard,
    GuardConfig,
    Human,
    KeySet,
    MemoryStore,
    ReasoningContext,
    Recorder,
    Screened,
    ScreenResult,
    ToolCall,
)
from agentic_iam._resources import default_policies_dir, default_registry_path
from agentic_iam.core.mediation import Mediated
from agentic_iam.integrations.langchain import GuardMiddleware, IAMContext, guard_tools

__all__ = ["SAMPLES", "run"]

#: The raw samples (microseconds) of the last run, by case, for percentiles.
SAMPLES: dict[str, list[float]] = {}

WARMUP = 300
BLOCK = 100
BLOCKS = 20
TARGET_RATIO = 1.25
# Every case is called with a running counter (warm-up, then every block of every case).
_SAMPLES = WARMUP + BLOCKS * BLOCK * 8


OUTPUT = "kb results for double charge: refunds under 100 USD need no approval"


@tool
def search_kb(query: str) -> str:
    """Search the internal knowledge base."""
    return OUTPUT


class _CountingSink:
    """An audit sink that builds every event (as a real sink would) and keeps only a count, so
    the heap does not grow over the run and garbage collection does not skew later samples."""

    durable = True

    def __init__(self) -> None:
        self.count = 0

    def emit(self, event: AuditEvent) -> None:
        self.count += 1

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


class _NoopGuard:
    """Allows everything at no cost: isolates what the adapter itself adds to a call."""

    def mediate(self, token: object, call: ToolCall, run: Callable[[dict[str, Any]], Any], *,
                screen: Callable[..., Any] | None = None, **_: Any) -> Mediated[Any]:
        decision = Decision("allow", (), call.call_id or "", call.name, "kb:search",
                            "exec_bench", arguments=dict(call.arguments))
        output = run(dict(decision.arguments))
        value = screen(output, self._screen) if screen is not None else self._screen(output).text
        return Mediated(decision, "ran", value)

    @staticmethod
    def _screen(output: object) -> Screened:
        text = str(output)
        return Screened(text, ScreenResult(text=text, findings=(), risk=0, labels=frozenset(),
                                           blocked=False, redactions=()))


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
    recorder = Recorder([_CountingSink()])
    broker = DelegationBroker(registry, keys, audience="bench", store=store, recorder=recorder)
    config = GuardConfig(execution_rate_per_s=1e9, execution_burst=10**9,
                         agent_rate_per_s=1e9, agent_burst=10**9)
    guard = Guard.from_broker(broker, CedarEngine.from_directory(default_policies_dir(), registry),
                              config=config)
    token = broker.delegate(Human("alice@example.com"), "support-agent", "bench",
                            ["kb:search"], 3600,
                            budget={"tool_calls": 10**9, "cost": 10**12, "llm_tokens": 10**9})
    return guard, token.token


def _request(call: dict[str, Any], context: IAMContext) -> ToolCallRequest:
    """What ToolNode hands a wrapper: the call, the tool, the state with the model's message."""
    message = AIMessage("Searching the KB.", tool_calls=[call])
    state: dict[str, Any] = {"messages": [message]}
    runtime: ToolRuntime[Any, Any] = ToolRuntime(state=state, context=context, config={},
                                                 stream_writer=print, tool_call_id=call["id"],
                                                 store=None)
    return ToolCallRequest(tool_call=call, tool=search_kb, state=state,  # type: ignore[arg-type]
                           runtime=runtime)


def _execute(request: ToolCallRequest) -> Any:
    return search_kb.invoke({**request.tool_call, "type": "tool_call"})


def _cases() -> dict[str, Callable[[int], Any]]:
    guard, token = _guard()
    noop = cast("Guard", _NoopGuard())
    context = IAMContext(token)
    middleware, noop_middleware = GuardMiddleware(guard), GuardMiddleware(noop)
    wrapped: BaseTool = guard_tools([search_kb], guard, token)[0]
    noop_wrapped: BaseTool = guard_tools([search_kb], noop, token)[0]
    # The model's message exists before the tool node runs: build the requests outside timing.
    # One request (and call id) per sample: the Guard refuses a call id used before.
    requests = [_request(_tool_call(i, "m"), context) for i in range(_SAMPLES)]

    def guard_only(i: int) -> Any:
        decision = guard.authorize(token, ToolCall(
            "search_kb", {"query": "double charge"}, f"g{i}",
            ReasoningContext(message="Searching the KB."), "langchain"))
        screened = guard.screen(decision, OUTPUT)
        guard.complete(decision)
        return screened

    return {
        "bare tool.invoke(ToolCall)": lambda i: search_kb.invoke(_tool_call(i)),
        "GuardMiddleware.wrap_tool_call -> tool.invoke": (
            lambda i: middleware.wrap_tool_call(requests[i], _execute)),
        "guard_tools(...) tool.invoke(ToolCall)": lambda i: wrapped.invoke(_tool_call(i, "w")),
        "guard only (authorize+screen+complete)": guard_only,
        "adapter alone: middleware, no-op Guard": (
            lambda i: noop_middleware.wrap_tool_call(requests[i], _execute)),
        "adapter alone: guard_tools, no-op Guard": lambda i: noop_wrapped.invoke(_tool_call(i)),
    }


def _tool_call(i: int, prefix: str = "c") -> dict[str, Any]:
    return {"name": "search_kb", "args": {"query": "double charge"}, "id": f"{prefix}{i}",
            "type": "tool_call"}


def run() -> list[tuple[str, float]]:
    """(label, median microseconds per call) for each case, measured in one interleaved run."""
    cases = _cases()
    for name, case in cases.items():
        for i in range(WARMUP):
            out = case(i)
        if getattr(out, "status", "success") != "success":
            raise RuntimeError(f"benchmark case `{name}` was refused: {out}")
    samples: dict[str, list[float]] = {name: [] for name in cases}
    gc.collect()
    counter = WARMUP
    for _ in range(BLOCKS):
        for name, case in cases.items():
            for _ in range(BLOCK):
                counter += 1
                started = time.perf_counter_ns()
                case(counter)
                samples[name].append((time.perf_counter_ns() - started) / 1000)
    SAMPLES.clear()
    SAMPLES.update(samples)
    return [(name, statistics.median(values)) for name, values in samples.items()]


def main() -> None:
    rows = run()
    bare = rows[0][1]
    width = max(len(name) for name, _ in rows)
    print(f"{'case':<{width}}  {'median us':>10}  {'ratio':>6}")
    for name, median in rows:
        print(f"{name:<{width}}  {median:>10.1f}  {median / bare:>6.2f}")
    print(f"(target for the guarded paths: ratio <= {TARGET_RATIO}; ratios are against the bare "
          f"call. Costs do not add up exactly: the Guard's work evicts caches the framework "
          f"code then misses.)")


if __name__ == "__main__":
    main()
