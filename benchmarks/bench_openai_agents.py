"""OpenAI Agents SDK adapter overhead: one tool call, bare against guarded, in one run.

Run ``python -m benchmarks.bench_openai_agents``. The bare row is what the SDK does to execute a
function tool: ``await tool.on_invoke_tool(ToolContext, arguments_json)`` (an async tool, so no
thread hop hides the cost). The guarded row runs, for the same call, the two steps of the tool
the protected agent hands the SDK (``agent.get_all_tools``), in the order the SDK runs them:
``needs_approval`` (where ``Guard.amediate`` starts and decides) and ``on_invoke_tool`` (which
runs the tool with the checked copy of the arguments, screens the output and settles the call).
A "guard only" row times the same Guard calls without the SDK. Two more rows time a whole
``Runner.run`` (two scripted model turns, one tool call) on a bare and on a protected agent, to put
the per-call cost next to the SDK's own per-run cost. Samples are interleaved in blocks so that
drift on a shared machine hits every row alike; read the ratios, not the absolute numbers. No
network, no API key, nothing written outside memory; tracing is disabled.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import yaml
from agents import (
    Agent,
    FunctionTool,
    ModelResponse,
    RunContextWrapper,
    Runner,
    Usage,
    function_tool,
)
from agents.models.interface import Model
from agents.tool_context import ToolContext
from agents.tracing import set_tracing_disabled
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)

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
from agentic_iam.integrations.openai_agents import IAMRunContext, protect

__all__ = ["SAMPLES", "run"]

#: The raw samples (microseconds) of the last run, by case, for percentiles.
SAMPLES: dict[str, list[float]] = {}

WARMUP = 300
BLOCK = 100
BLOCKS = 20
RUN_BLOCK = 10
TARGET_RATIO = 1.25

OUTPUT = "kb results for double charge: refunds under 100 USD need no approval"
ARGUMENTS = json.dumps({"query": "double charge"})


def _tool() -> FunctionTool:
    @function_tool
    async def search_kb(query: str) -> str:
        """Search the internal knowledge base."""
        return OUTPUT

    return search_kb


def _registry() -> AgentRegistry:
    """The demo registry, with budgets large enough that no timed call is ever refused."""
    data = yaml.safe_load(default_registry_path().read_text())
    for agent in data["agents"]:
        if agent["id"] == "support-agent":
            agent["max_budget"] = {"tool_calls": 10**9, "cost": 10**12, "llm_tokens": 10**12}
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
                            budget={"tool_calls": 10**9, "cost": 10**12, "llm_tokens": 10**12})
    return guard, token.token


class _OneCall(Model):
    """Turn 1: one ``search_kb`` call; turn 2: a final answer (then it starts over)."""

    def __init__(self) -> None:
        self.turn = 0
        self.ids = itertools.count()

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        self.turn += 1
        if self.turn % 2:
            output: list[Any] = [ResponseFunctionToolCall(
                id="fc", call_id=f"run_{next(self.ids)}", type="function_call",
                name="search_kb", arguments=ARGUMENTS)]
        else:
            output = [ResponseOutputMessage(
                id="m", type="message", role="assistant", status="completed",
                content=[ResponseOutputText(type="output_text", annotations=[], text="done")])]
        return ModelResponse(output=output, usage=Usage(), response_id=f"r{self.turn}")

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


Case = Callable[[int], Awaitable[Any]]


async def _cases() -> tuple[dict[str, Case], dict[str, Case]]:
    guard, token = _guard()
    bare_tool = _tool()
    agent: Agent[Any] = protect(Agent(name="support-agent", tools=[_tool()]), guard,
                                agent_id="support-agent")
    run_context = RunContextWrapper(IAMRunContext(token, end_on_finish=False))
    (guarded_tool,) = await agent.get_all_tools(run_context)  # what the SDK runs
    needs = guarded_tool.needs_approval
    assert callable(needs)

    def tool_context(i: int) -> ToolContext[Any]:
        return ToolContext.from_agent_context(run_context, f"c{i}", tool_name="search_kb",
                                              tool_arguments=ARGUMENTS, agent=agent)

    async def bare(i: int) -> Any:
        return await bare_tool.on_invoke_tool(
            ToolContext(None, tool_name="search_kb", tool_call_id=f"c{i}",
                        tool_arguments=ARGUMENTS), ARGUMENTS)

    async def guarded(i: int) -> Any:
        ctx = tool_context(i)
        if await needs(run_context, {"query": "double charge"}, ctx.tool_call_id):
            raise RuntimeError("the benchmark call needs approval")
        output = await guarded_tool.on_invoke_tool(ctx, ARGUMENTS)
        if output != OUTPUT:
            raise RuntimeError(f"the benchmark call was refused: {output}")
        return output

    async def guard_only(i: int) -> Any:
        decision = guard.authorize(token, ToolCall(
            "search_kb", {"query": "double charge"}, f"g{i}",
            ReasoningContext(message="Searching the KB."), "openai_agents"))
        screened = guard.screen(decision, OUTPUT)
        guard.complete(decision)
        return screened

    bare_agent: Agent[Any] = Agent(name="support-agent", model=_OneCall(), tools=[_tool()])
    protected_agent = protect(Agent(name="support-agent", model=_OneCall(), tools=[_tool()]),
                              guard, agent_id="support-agent")

    async def run_bare(i: int) -> Any:
        return await Runner.run(bare_agent, "search the kb")

    async def run_guarded(i: int) -> Any:
        return await Runner.run(protected_agent, "search the kb",
                                context=IAMRunContext(token, end_on_finish=False))

    calls: dict[str, Case] = {
        "bare FunctionTool.on_invoke_tool": bare,
        "guarded (needs_approval + on_invoke_tool)": guarded,
        "guard only (authorize+screen+complete)": guard_only,
    }
    runs: dict[str, Case] = {
        "Runner.run, 1 tool call, bare agent": run_bare,
        "Runner.run, 1 tool call, protected agent": run_guarded,
    }
    return calls, runs


async def _measure() -> list[tuple[str, float]]:
    calls, runs = await _cases()
    everything = {**calls, **runs}
    for case in everything.values():
        for i in range(WARMUP // 10 if case in runs.values() else WARMUP):
            await case(i)
    samples: dict[str, list[float]] = {name: [] for name in everything}
    counter = itertools.count(WARMUP)
    for _ in range(BLOCKS):
        for name, case in everything.items():
            for _ in range(RUN_BLOCK if name in runs else BLOCK):
                i = next(counter)
                started = time.perf_counter_ns()
                await case(i)
                samples[name].append((time.perf_counter_ns() - started) / 1000)
    SAMPLES.clear()
    SAMPLES.update(samples)
    return [(name, statistics.median(values)) for name, values in samples.items()]


def run() -> list[tuple[str, float]]:
    """(label, median microseconds) for each case, measured in one interleaved run."""
    set_tracing_disabled(True)
    return asyncio.run(_measure())


def main() -> None:
    rows = run()
    bare, guard_only = rows[0][1], rows[2][1]
    run_bare = rows[3][1]
    width = max(len(name) for name, _ in rows)
    print(f"{'case':<{width}}  {'median us':>10}  {'ratio':>7}")
    for index, (name, median) in enumerate(rows):
        base = bare if index < 3 else run_bare
        print(f"{name:<{width}}  {median:>10.1f}  {median / base:>7.2f}")
    print(f"(per-call rows against the bare on_invoke_tool; Runner rows against the bare run; "
          f"target for a guarded call inside a run: ratio <= {TARGET_RATIO})")
    print(f"adapter's own cost per call: {rows[1][1] - bare - guard_only:.1f} us "
          f"(guarded - bare - guard only)")


if __name__ == "__main__":
    main()
