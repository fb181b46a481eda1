"""Scripted models, recording tools and helpers for the OpenAI Agents SDK adapter tests.

No network, no API key: :class:`Scripted` is an ``agents.models.interface.Model`` that replays
scripted ``ModelResponse``s (reasoning, text and function calls) and records what it was shown
on every turn. Tools record their real executions in a :class:`Backend`, so tests compare
executions with the Guard's decisions. Tracing export is disabled for the whole test session.

Every test that uses the ``env`` and ``backend`` fixtures ends with
:func:`assert_one_allow_per_execution`: each real execution had its own ``allow`` decision for
that exact tool and those exact arguments, and no ``allow`` ran twice.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from agents import Agent, FunctionTool, ModelResponse, RunConfig, Runner, Usage, function_tool
from agents.models.interface import Model
from agents.tracing import set_tracing_disabled
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseUsage,
)
from openai.types.responses.response_reasoning_item import Summary
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

from agentic_iam import MemorySink
from agentic_iam.core.approvals import arguments_digest
from tests.conftest import Env

Mode = Literal["run", "streamed", "sync"]
MODES: tuple[Mode, ...] = ("run", "streamed", "sync")
_ids = itertools.count(1)


@pytest.fixture(autouse=True, scope="session")
def _no_trace_export() -> Iterator[None]:
    set_tracing_disabled(True)  # never export to OpenAI from the tests
    yield


def call(name: str, call_id: str, **args: Any) -> ResponseFunctionToolCall:
    return ResponseFunctionToolCall(id=f"fc_{call_id}", call_id=call_id, type="function_call",
                                    name=name, arguments=json.dumps(args))


def say(text: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(id=f"msg_{next(_ids)}", type="message", role="assistant",
                                 status="completed",
                                 content=[ResponseOutputText(type="output_text", annotations=[],
                                                             text=text)])


def think(text: str) -> ResponseReasoningItem:
    return ResponseReasoningItem(id=f"rs_{next(_ids)}", type="reasoning",
                                 summary=[Summary(type="summary_text", text=text)])


INPUT_TOKENS, OUTPUT_TOKENS = 120, 30


class Scripted(Model):
    """Replays ``turns`` in order (the last one repeats); records every input it was given."""

    def __init__(self, *turns: list[Any], model: str = "scripted-model") -> None:
        self.turns = list(turns)
        self.model = model
        self.inputs: list[list[Any]] = []
        self.offered: list[list[str]] = []
        self._lock = threading.Lock()

    def _next(self, input: Any, tools: Any, handoffs: Any) -> tuple[list[Any], str]:
        with self._lock:
            items = [{"role": "user", "content": input}] if isinstance(input, str) else list(input)
            self.inputs.append(items)
            self.offered.append([getattr(t, "name", "?") for t in tools]
                                + [h.tool_name for h in handoffs])
            turn = self.turns[min(len(self.inputs) - 1, len(self.turns) - 1)]
            return list(turn), f"resp_{next(_ids)}"

    async def get_response(self, system_instructions: Any, input: Any, model_settings: Any,
                           tools: Any, output_schema: Any, handoffs: Any, tracing: Any,
                           **kwargs: Any) -> ModelResponse:
        output, response_id = self._next(input, tools, handoffs)
        return ModelResponse(output=output, usage=Usage(requests=1, input_tokens=INPUT_TOKENS,
                                                        output_tokens=OUTPUT_TOKENS,
                                                        total_tokens=INPUT_TOKENS + OUTPUT_TOKENS),
                             response_id=response_id)

    async def stream_response(self, system_instructions: Any, input: Any, model_settings: Any,
                              tools: Any, output_schema: Any, handoffs: Any, tracing: Any,
                              **kwargs: Any) -> AsyncIterator[Any]:
        output, response_id = self._next(input, tools, handoffs)
        usage = ResponseUsage(
            input_tokens=INPUT_TOKENS, output_tokens=OUTPUT_TOKENS,
            total_tokens=INPUT_TOKENS + OUTPUT_TOKENS,
            input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=0))
        response = Response(
            id=response_id, created_at=0, model=self.model, object="response", output=output,
            tool_choice="auto", tools=[], top_p=None, parallel_tool_calls=True,
            status="completed", usage=usage)
        yield ResponseCompletedEvent(type="response.completed", sequence_number=0,
                                     response=response)

    def outputs(self, turn: int = -1) -> dict[str, str]:
        """``call_id -> output`` of the function results the model was shown on ``turn``."""
        return {item["call_id"]: item["output"] for item in self.inputs[turn]
                if isinstance(item, dict) and item.get("type") == "function_call_output"}

    def all_outputs(self) -> dict[str, str]:
        seen: dict[str, str] = {}
        for turn in range(len(self.inputs)):
            seen.update(self.outputs(turn))
        return seen


@dataclass
class Backend:
    """What the tools really did."""

    executions: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, tool: str, **args: Any) -> None:
        with self.lock:
            self.executions.append((tool, args))

    def names(self) -> list[str]:
        return [name for name, _ in self.executions]


def support_tools(backend: Backend) -> list[FunctionTool]:
    """Fresh tool objects (guardrails are attributes of the tool object)."""

    @function_tool
    def create_refund(amount: int, currency: str, account: str) -> str:
        """Refund an amount (integer cents) to a customer account."""
        backend.record("create_refund", amount=amount, currency=currency, account=account)
        return f"refund of {amount} {currency} to {account} created"

    @function_tool
    def read_ticket(ticket_id: str) -> str:
        """Read a customer ticket."""
        backend.record("read_ticket", ticket_id=ticket_id)
        return f"ticket {ticket_id}: I was charged twice. My password=hunter2 in case you need it."

    @function_tool
    def search_kb(query: str) -> str:
        """Search the internal knowledge base."""
        backend.record("search_kb", query=query)
        return "refunds under 100 USD need no approval"

    @function_tool
    def delete_account(account: str) -> str:
        """Delete a customer account (not in the registry)."""
        backend.record("delete_account", account=account)
        return "deleted"

    return [create_refund, read_ticket, search_kb, delete_account]


def refund_tools(backend: Backend) -> list[FunctionTool]:
    return [t for t in support_tools(backend) if t.name in {"create_refund", "read_ticket"}]


REQUEST = "I was double charged on ticket T-1042, please refund 50 USD to account acct-42."


def execute(mode: Mode, agent: Agent[Any], input: Any, *, context: Any = None,
            hooks: Any = None, run_config: RunConfig | None = None) -> Any:
    """Run ``agent`` through ``Runner.run``, ``Runner.run_streamed`` or ``Runner.run_sync``."""
    if mode == "sync":
        # run_sync deliberately leaves the thread's default loop open; give it one we close.
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            return Runner.run_sync(agent, input, context=context, hooks=hooks,
                                   run_config=run_config)
        finally:
            asyncio.set_event_loop(None)
            loop.close()
    if mode == "run":
        return asyncio.run(Runner.run(agent, input, context=context, hooks=hooks,
                                      run_config=run_config))

    async def streamed() -> Any:
        result = Runner.run_streamed(agent, input, context=context, hooks=hooks,
                                     run_config=run_config)
        async for _ in result.stream_events():
            pass
        return result

    return asyncio.run(streamed())


@pytest.fixture
def backend() -> Backend:
    return Backend()


def assert_one_allow_per_execution(
        sink: MemorySink, executions: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """Complete mediation, from the audit log: every real execution (tool, arguments) has its
    own ``allow`` decision for that tool and those exact arguments, and every ``allow`` has one
    execution, unless it was cancelled (``tool_call.completed`` with outcome ``cancelled``: its
    tool never started). So a refused call that ran, a call that ran twice under one decision,
    or a call that ran with arguments other than the allowed ones fails."""
    allowed: Counter[tuple[str | None, str | None]] = Counter()
    cancelled: Counter[tuple[str | None, str | None]] = Counter()
    for event in sink.events:
        key = (event.tool, event.arguments_digest)
        if (event.event_type == "tool_call.decided" and event.decision is not None
                and event.decision.outcome == "allow"):
            allowed[key] += 1
        elif (event.event_type == "tool_call.completed" and event.result is not None
                and event.result.outcome == "cancelled"):
            cancelled[key] += 1
    ran = Counter((name, arguments_digest(args)) for name, args in executions)
    for key in allowed.keys() | ran.keys():
        assert allowed[key] - cancelled[key] <= ran[key] <= allowed[key], (
            f"{key}: ran {ran[key]} time(s) under {allowed[key]} allow decision(s), "
            f"{cancelled[key]} cancelled")


@pytest.fixture(autouse=True)
def _complete_mediation(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test that used both fixtures: each real execution had one allow decision."""
    if "env" not in request.fixturenames or "backend" not in request.fixturenames:
        yield
        return
    env: Env = request.getfixturevalue("env")
    backend: Backend = request.getfixturevalue("backend")
    yield
    assert_one_allow_per_execution(env.sink, backend.executions)


def decided(env: Env) -> dict[str, Any]:
    """call id → its last ``tool_call.decided`` event."""
    return {e.call_id: e for e in env.sink.events if e.event_type == "tool_call.decided"}


def events(env: Env, kind: str) -> list[Any]:
    return [e for e in env.sink.events if e.event_type == kind]
