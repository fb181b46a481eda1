"""Scripted LLMs, recording tools and workflow builders for the LlamaIndex adapter tests.

No network, no API key: each "LLM" replays a list of assistant ``ChatMessage``s (text, thinking
and ``ToolCallBlock``s) and reports a fixed token usage. Every tool records its real executions
in a :class:`Backend`, so tests can compare executions with the Guard's decisions (complete
mediation).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from llama_index.core.agent.workflow import ToolCallResult
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    LLMMetadata,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field
from llama_index.core.llms import MockFunctionCallingLLM
from llama_index.core.llms.callbacks import llm_chat_callback
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import Event
from workflows.handler import WorkflowHandler

from agentic_iam.core.approvals import arguments_digest
from agentic_iam.integrations.llama_index import ApprovalRequestEvent
from tests.conftest import Env

# Constructing any LlamaIndex workflow agent (a pydantic model) runs `inspect.getmembers` over
# the instance (workflows/utils.py `get_steps_from_instance`), which touches pydantic's deprecated
# instance attributes. Unavoidable with the stock classes too; scoped to those messages and
# applied as `pytestmark` in each test module.
FRAMEWORK_WARNINGS = [
    pytest.mark.filterwarnings(
        "ignore:The `__fields(_set)?__` attribute is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings(
        "ignore:Accessing the 'model_(computed_)?fields' attribute on the instance is "
        "deprecated:DeprecationWarning"),
    # ReActAgent.take_step checks `ctx.is_running` inside its step (react_agent.py).
    pytest.mark.filterwarnings(
        "ignore:is_running called from within a step:DeprecationWarning"),
]

MODEL = "scripted-model"
SECRET = "AKIAABCDEFGHIJKLMNOP"
REQUEST = "Please refund Alice's double charge on ticket T-1042: 50 USD to acct-alice."


class Scripted(MockFunctionCallingLLM):
    """Replays ``script`` in order (then says "done"); records every input it was shown."""

    script: list[ChatMessage] = Field(default_factory=list)
    seen: list[list[ChatMessage]] = Field(default_factory=list)
    usage: dict[str, int] | None = None

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(is_function_calling_model=True, is_chat_model=True,
                           model_name=MODEL)

    def _next(self, messages: Sequence[ChatMessage]) -> ChatResponse:
        self.seen.append(list(messages))
        message = self.script.pop(0) if self.script else ChatMessage(role="assistant",
                                                                     content="done")
        return ChatResponse(message=message, delta=message.content or "",
                            additional_kwargs=dict(self.usage or {}))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage],
                           **kwargs: Any) -> AsyncGenerator[ChatResponse, None]:
        response = self._next(messages)

        async def gen() -> AsyncGenerator[ChatResponse, None]:
            yield response

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._next(messages)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._next(messages)

    def tool_results(self, turn: int = -1) -> dict[str, str]:
        """tool_call_id -> the tool message text the model was shown on ``turn``."""
        return {str(m.additional_kwargs.get("tool_call_id")): m.content or ""
                for m in self.seen[turn] if m.role == "tool"}


def call(name: str, call_id: str, **kwargs: Any) -> ToolCallBlock:
    return ToolCallBlock(tool_call_id=call_id, tool_name=name, tool_kwargs=kwargs)


def ai(text: str, *calls: ToolCallBlock, thinking: str | None = None) -> ChatMessage:
    blocks: list[Any] = []
    if thinking is not None:
        blocks.append(ThinkingBlock(content=thinking))
    if text:
        blocks.append(TextBlock(text=text))
    blocks.extend(calls)
    return ChatMessage(role="assistant", blocks=blocks)


def scripted(*messages: ChatMessage, usage: dict[str, int] | None = None) -> Scripted:
    return Scripted(script=list(messages), usage=usage)


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


def make_tools(backend: Backend) -> dict[str, FunctionTool]:
    def create_refund(amount: int, currency: str, account: str) -> str:
        """Refund an amount (integer cents) to a customer account."""
        backend.record("create_refund", amount=amount, currency=currency, account=account)
        return f"refund of {amount} {currency} to {account} created"

    async def read_ticket(ticket_id: str) -> str:
        """Read a customer ticket."""
        backend.record("read_ticket", ticket_id=ticket_id)
        return f"Ticket {ticket_id}: my card was charged twice. debug: aws_key={SECRET}"

    def search_kb(query: str) -> str:
        """Search the knowledge base."""
        backend.record("search_kb", query=query)
        return f"kb results for {query}: refunds under 100 USD need no approval"

    def delete_account(account: str) -> str:
        """Delete a customer account."""
        backend.record("delete_account", account=account)
        return f"account {account} deleted"

    tools = [FunctionTool.from_defaults(create_refund),
             FunctionTool.from_defaults(async_fn=read_ticket),
             FunctionTool.from_defaults(search_kb),
             FunctionTool.from_defaults(delete_account)]
    return {t.metadata.get_name(): t for t in tools}


@pytest.fixture
def backend() -> Backend:
    return Backend()


@pytest.fixture
def tools(backend: Backend) -> dict[str, FunctionTool]:
    return make_tools(backend)


async def drive(handler: WorkflowHandler, *, approve: bool | None = None,
                approver: str = "bob") -> tuple[Any, list[Event]]:
    """Run to the end, answering approval requests; returns (result, streamed events)."""
    events: list[Event] = []
    async for ev in handler.stream_events():
        events.append(ev)
        if isinstance(ev, ApprovalRequestEvent) and approve is not None:
            assert handler.ctx is not None
            handler.ctx.send_event(ev.answer(approved=approve, approver=approver))
    return await handler, events


def results(events: list[Event]) -> dict[str, ToolCallResult]:
    return {e.tool_id: e for e in events if isinstance(e, ToolCallResult)}


def decided(env: Env, call_id: str) -> Any:
    found = [e for e in env.sink.events
             if e.event_type == "tool_call.decided" and e.call_id == call_id]
    assert found, f"no decision recorded for {call_id}"
    return found[-1]


def chain_ids(event: Any) -> list[str]:
    return [hop.id for hop in event.chain]


def assert_mediated(env: Env, backend: Backend) -> None:
    """The audit invariant: every tool execution has exactly one matching allow decision in the
    audit log (same tool, same arguments), and every call whose final decision was not an allow
    never executed (no result on the record)."""
    events = env.sink.events
    allows = Counter((e.tool, e.arguments_digest) for e in events
                     if e.event_type == "tool_call.decided" and e.decision is not None
                     and e.decision.outcome == "allow")
    # an allowed call cancelled before its tool finished (a wait for an event) did not execute
    allows.subtract((e.tool, e.arguments_digest) for e in events
                    if e.event_type == "tool_call.completed" and e.result is not None
                    and e.result.outcome == "cancelled")
    ran = Counter((name, arguments_digest(args)) for name, args in backend.calls)
    assert ran == +allows, f"executions {dict(ran)} vs allow decisions {dict(+allows)}"
    final: dict[str | None, str] = {}
    for e in events:
        if e.event_type == "tool_call.decided" and e.decision is not None:
            final[e.call_id] = e.decision.outcome
    completed = {e.call_id for e in events if e.event_type == "tool_call.completed"}
    refused = {c for c, outcome in final.items() if outcome != "allow"}
    assert not refused & completed, f"refused calls with a result: {refused & completed}"


@pytest.fixture(autouse=True)
def _complete_mediation(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test that used both: the audit invariant holds (:func:`assert_mediated`)."""
    names = request.fixturenames
    if "env" not in names or "backend" not in names:
        yield
        return
    env: Env = request.getfixturevalue("env")
    backend: Backend = request.getfixturevalue("backend")
    yield
    assert_mediated(env, backend)
