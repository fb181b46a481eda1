"""guard_tools: wrapped BaseTools for any executor (invoke/ainvoke/run, ToolNode without
middleware), with refusals as tool error output, screened results and injected arguments."""

from __future__ import annotations

from typing import Any

import pytest
from langchain.tools import ToolRuntime
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langgraph.prebuilt import ToolNode

from agentic_iam.core.approvals import arguments_digest
from agentic_iam.integrations.langchain import (
    GuardedTool,
    IAMCallbackHandler,
    IAMContext,
    guard_tools,
)
from tests.conftest import Env
from tests.integrations.langchain.conftest import SECRET, Backend, ai, call, decided, scripted
from tests.integrations.langchain.test_toolnode import build_graph


def refund_call(call_id: str, amount: int) -> dict[str, Any]:
    return call("create_refund", call_id, amount=amount, currency="USD", account="acct-1")


def test_allowed_call_runs_and_returns_a_tool_message(env: Env, backend: Backend,
                                                      tools: dict[str, BaseTool]) -> None:
    refund, = guard_tools([tools["create_refund"]], env.guard, env.refund_token())
    out = refund.invoke(refund_call("g1", 50))
    assert isinstance(out, ToolMessage) and out.status == "success"
    assert out.tool_call_id == "g1" and out.name == "create_refund"
    assert backend.executed("create_refund") == [
        {"amount": 50, "currency": "USD", "account": "acct-1"}]
    assert decided(env, "g1").framework == "langchain"


def test_refusals_are_tool_output_not_exceptions(env: Env, backend: Backend,
                                                 tools: dict[str, BaseTool]) -> None:
    wrapped = guard_tools([tools["create_refund"], tools["delete_account"]], env.guard,
                          env.refund_token())
    refund, delete = wrapped
    over = refund.invoke(refund_call("g2", 500))
    assert isinstance(over, ToolMessage) and over.status == "error"
    assert "refused" in over.text and over.tool_call_id == "g2"
    text = refund.invoke({"amount": 500, "currency": "USD", "account": "acct-1"})
    assert isinstance(text, str) and "refused" in text
    gone = delete.invoke(call("delete_account", "g3", account="acct-1"))
    assert gone.status == "error"
    assert backend.calls == []


def test_output_is_screened(env: Env, backend: Backend, tools: dict[str, BaseTool]) -> None:
    ticket, = guard_tools([tools["read_ticket"]], env.guard, env.refund_token())
    out = ticket.invoke({"ticket_id": "T-1042"})
    assert isinstance(out, str) and SECRET not in out and "REDACTED" in out
    message = ticket.invoke(call("read_ticket", "g4", ticket_id="T-1042"))
    assert SECRET not in message.text


async def test_async_paths(env: Env, backend: Backend, tools: dict[str, BaseTool]) -> None:
    refund, = guard_tools([tools["create_refund"]], env.guard, env.refund_token())
    ok = await refund.ainvoke(refund_call("g5", 10))
    refused = await refund.ainvoke(refund_call("g6", 900))
    assert ok.status == "success" and refused.status == "error"
    assert len(backend.calls) == 1


def test_schema_and_identity_of_the_tool_are_kept(env: Env, tools: dict[str, BaseTool]) -> None:
    original = tools["create_refund"]
    refund, = guard_tools([original], env.guard, env.refund_token())
    assert isinstance(refund, GuardedTool) and refund.wrapped is original
    assert refund.name == original.name and refund.description == original.description
    assert refund.args == original.args
    assert refund.tool_call_schema is original.tool_call_schema
    with pytest.raises(ValueError, match="already guarded"):
        guard_tools([refund], env.guard, env.refund_token())


def test_approval_is_refused_outside_a_graph(env: Env, backend: Backend,
                                             tools: dict[str, BaseTool]) -> None:
    refund, = guard_tools([tools["create_refund"]], env.guard, env.refund_token(max_amount=200))
    out = refund.invoke(refund_call("g7", 150))
    assert out.status == "error" and "approval" in out.text
    refund_i, = guard_tools([tools["create_refund"]], env.guard, env.refund_token(max_amount=200),
                            on_approval="interrupt")
    out = refund_i.invoke(refund_call("g8", 150))  # no graph to pause: refused, left pending
    assert out.status == "error"
    assert backend.calls == []


def test_injected_arguments_pass_through_and_are_not_authorized(env: Env,
                                                                backend: Backend) -> None:
    """In a plain ToolNode (no middleware) the wrapped tool still decides; ToolRuntime is
    injected by LangGraph, not supplied by the model, and is not part of the checked call."""
    seen: dict[str, Any] = {}

    @tool
    def create_refund(amount: int, currency: str, account: str,
                      runtime: ToolRuntime[Any, Any]) -> str:
        """Refund."""
        seen["call_id"] = runtime.tool_call_id
        backend.record("create_refund", amount=amount, currency=currency, account=account)
        return "ok"

    wrapped = guard_tools([create_refund], env.guard, env.refund_token())
    graph = build_graph(scripted(ai("Refund.", refund_call("g9", 25)), ai("done")),
                        ToolNode(wrapped))
    result = graph.invoke({"messages": [HumanMessage("go")]}, context=IAMContext("unused"))
    assert [m.status for m in result["messages"] if isinstance(m, ToolMessage)] == ["success"]
    assert seen["call_id"] == "g9"
    checked = {"amount": 25, "currency": "USD", "account": "acct-1"}
    assert decided(env, "g9").arguments_digest == arguments_digest(checked)


def test_observer_supplies_reasoning(env: Env, backend: Backend,
                                     tools: dict[str, BaseTool]) -> None:
    token = env.refund_token()
    observer = IAMCallbackHandler(env.guard, token)
    model = scripted(ai("Refunding twenty for the duplicate charge.", refund_call("g10", 20)))
    message = model.invoke([HumanMessage("refund")], config={"callbacks": [observer]})
    refund, = guard_tools([tools["create_refund"]], env.guard, token, observer=observer)
    refund.invoke(message.tool_calls[0])
    reasoning = decided(env, "g10").reasoning
    assert "duplicate charge" in reasoning.message
    assert reasoning.model == "scripted-model"
