"""Scripted models, recording tools and agent builders for the LangChain adapter tests.

No network, no API key: the "model" replays a list of AIMessages (with tool calls). Every tool
records its real executions in a :class:`Backend`, so tests can compare executions with the
Guard's decisions (complete mediation).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from pydantic import Field

from agentic_iam import MemorySink
from agentic_iam.core.approvals import arguments_digest
from agentic_iam.integrations.langchain import GuardMiddleware, IAMContext
from tests.conftest import Env


class Scripted(FakeMessagesListChatModel):
    """Replays ``responses`` in order; records what it was shown on each turn."""

    seen: list[list[BaseMessage]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kwargs: Any) -> Scripted:
        return self

    def _generate(self, messages: list[BaseMessage], stop: Any = None,
                  run_manager: Any = None, **kwargs: Any) -> Any:
        self.seen.append(list(messages))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def call(name: str, call_id: str, **args: Any) -> dict[str, Any]:
    return {"name": name, "args": args, "id": call_id, "type": "tool_call"}


def ai(text: str, *calls: dict[str, Any], reasoning: str | None = None,
       usage: dict[str, int] | None = None, model: str = "scripted-model") -> AIMessage:
    content: Any = text
    if reasoning is not None:
        content = [{"type": "reasoning", "reasoning": reasoning}, {"type": "text", "text": text}]
    extra: dict[str, Any] = {}
    if usage is not None:
        extra["usage_metadata"] = {**usage, "total_tokens": sum(usage.values())}
    return AIMessage(content=content, tool_calls=list(calls),
                     response_metadata={"model_name": model}, **extra)


def scripted(*responses: AIMessage) -> Scripted:
    return Scripted(responses=list(responses), seen=[])


@dataclass
class Backend:
    """The tools' side effects: every real execution is appended here."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, name: str, **args: Any) -> None:
        with self.lock:
            self.calls.append((name, args))

    def executed(self, name: str) -> list[dict[str, Any]]:
        return [args for tool_name, args in self.calls if tool_name == name]


SECRET = "AKIAABCDEFGHIJKLMNOP"
REQUEST_TEXT = {"messages": [HumanMessage("Please refund Alice's double charge on ticket T-1042")]}


def make_tools(backend: Backend) -> dict[str, BaseTool]:
    @tool
    def create_refund(amount: int, currency: str, account: str) -> str:
        """Refund an amount (integer cents) to a customer account."""
        backend.record("create_refund", amount=amount, currency=currency, account=account)
        return f"refund of {amount} {currency} to {account} created"

    @tool
    def read_ticket(ticket_id: str) -> str:
        """Read a customer ticket."""
        backend.record("read_ticket", ticket_id=ticket_id)
        return f"Ticket {ticket_id}: my card was charged twice. debug: aws_key={SECRET}"

    @tool
    def search_kb(query: str) -> str:
        """Search the knowledge base."""
        backend.record("search_kb", query=query)
        return f"kb results for {query}: refunds under 100 USD need no approval"

    @tool
    def delete_account(account: str) -> str:
        """Delete a customer account."""
        backend.record("delete_account", account=account)
        return f"account {account} deleted"

    tools = [create_refund, read_ticket, search_kb, delete_account]
    return {t.name: t for t in tools}


@pytest.fixture
def backend() -> Backend:
    return Backend()


@pytest.fixture
def tools(backend: Backend) -> dict[str, BaseTool]:
    return make_tools(backend)


def build_agent(env: Env, model: Scripted, tools: list[BaseTool], *,
                checkpointer: Any = None, name: str = "support-agent", **kwargs: Any) -> Any:
    return create_agent(model, tools=tools, middleware=[GuardMiddleware(env.guard)],
                        context_schema=IAMContext, checkpointer=checkpointer, name=name,
                        **kwargs)


def tool_messages(result: dict[str, Any]) -> dict[str, ToolMessage]:
    return {m.tool_call_id: m for m in result["messages"] if isinstance(m, ToolMessage)}


def decided(env: Env, call_id: str) -> Any:
    events = [e for e in env.sink.events
              if e.event_type == "tool_call.decided" and e.call_id == call_id]
    assert events, f"no decision recorded for {call_id}"
    return events[-1]


def assert_one_allow_per_execution(
        sink: MemorySink, executions: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """Complete mediation, from the audit log: every real execution (tool, arguments) has its
    own ``allow`` decision for that tool and those exact arguments, and every ``allow`` has one
    execution. An allowed call that was cancelled (``tool_call.completed`` with outcome
    ``cancelled``: its tool never started, or an interrupt paused it and the framework replays
    it) may have none. So a denied call that ran, a call that ran twice under one decision, or
    a call that ran with arguments other than the allowed ones fails."""
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


def total_decisions(env: Env) -> int:
    return sum(env.guard.stats.values())


@pytest.fixture(autouse=True)
def _complete_mediation(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test that used both: each real execution had exactly one allow decision."""
    names = request.fixturenames
    env_name = next((n for n in ("env", "denv") if n in names), None)
    if env_name is None or "backend" not in names:
        yield
        return
    # Resolved here (set-up time) so that both outlive this fixture's teardown.
    env: Env = request.getfixturevalue(env_name)
    backend: Backend = request.getfixturevalue("backend")
    yield
    assert_one_allow_per_execution(env.sink, backend.calls)
