"""protect(): what it attaches, idempotence, refusals, the invoke wrapper, output screening."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from agents import Agent, WebSearchTool
from agents.tool_context import ToolContext
from agents.tool_guardrails import (
    ToolGuardrailFunctionOutput,
    ToolOutputGuardrailData,
    tool_output_guardrail,
)

from agentic_iam import ConfigurationError, ReasoningContext, ToolCall
from agentic_iam.integrations.openai_agents import IAMRunContext, protect
from tests.conftest import Env
from tests.integrations.openai_agents.conftest import (
    REQUEST,
    Backend,
    Scripted,
    call,
    execute,
    refund_tools,
    say,
    support_tools,
)


def test_protect_is_idempotent_and_attaches_to_every_tool(env: Env) -> None:
    backend = Backend()
    tools = support_tools(backend)
    agent: Agent[Any] = Agent(name="support-agent", tools=tools)
    protect(agent, env.guard)
    snapshot = [(t.tool_input_guardrails, t.tool_output_guardrails, t.needs_approval,
                 t.on_invoke_tool) for t in tools]
    protect(agent, env.guard)
    assert snapshot == [(t.tool_input_guardrails, t.tool_output_guardrails, t.needs_approval,
                         t.on_invoke_tool) for t in tools]
    for tool in tools:
        assert [g.get_name() for g in tool.tool_input_guardrails or []] == [
            "agentic_iam.authorize"]
        assert [g.get_name() for g in tool.tool_output_guardrails or []] == [
            "agentic_iam.screen"]


def test_protect_with_another_guard_is_refused(env: Env, make_env: Any) -> None:
    agent: Agent[Any] = Agent(name="support-agent", tools=support_tools(Backend()))
    protect(agent, env.guard)
    with pytest.raises(ConfigurationError, match="already protected"):
        protect(agent, make_env().guard)


def test_unguardable_tools_are_refused_unless_allowed(env: Env) -> None:
    with pytest.raises(ConfigurationError, match="WebSearchTool"):
        protect(Agent(name="support-agent", tools=[WebSearchTool()]), env.guard)
    protect(Agent(name="support-agent", tools=[WebSearchTool()]), env.guard,
            allow_unguarded_tools=True)


def test_cycles_are_handled(env: Env) -> None:
    backend = Backend()
    first: Agent[Any] = Agent(name="support-agent", tools=support_tools(backend))
    second: Agent[Any] = Agent(name="refund-bot", tools=refund_tools(backend),
                               handoffs=[first])
    first.handoffs.append(second)
    protect(first, env.guard, broker=env.broker)
    for agent in (first, second):
        for tool in agent.tools:
            assert tool.tool_input_guardrails  # type: ignore[union-attr]
    assert all(getattr(h, "_aiam_protection", None) is not None
               for h in first.handoffs + second.handoffs)


def test_invoke_wrapper_runs_only_the_checked_copy(env: Env) -> None:
    backend = Backend()
    tool = refund_tools(backend)[0]
    protect(Agent(name="support-agent", tools=[tool]), env.guard)
    context = IAMRunContext(env.refund_token())
    checked = {"amount": 50, "currency": "USD", "account": "acct-42"}
    tampered = json.dumps({**checked, "amount": 99_999})

    def tool_context(call_id: str) -> ToolContext[Any]:
        return ToolContext(context, tool_name="create_refund", tool_call_id=call_id,
                           tool_arguments=json.dumps(checked))

    # no decision for the call: the tool never runs
    out = asyncio.run(tool.on_invoke_tool(tool_context("x1"), json.dumps(checked)))
    assert "not authorized" in out and backend.executions == []
    # an allow decision for the call: the tool runs with the Guard's copy, whatever it is given
    decision = env.guard.authorize(context.token, ToolCall(  # type: ignore[arg-type]
        "create_refund", checked, "x2", ReasoningContext(), "openai_agents"))
    assert decision.allowed
    context._state.authorized["x2"] = decision
    asyncio.run(tool.on_invoke_tool(tool_context("x2"), tampered))
    assert backend.executions == [("create_refund", checked)]


def test_output_is_screened_before_the_models_and_the_tools_own_guardrails(env: Env) -> None:
    backend = Backend()
    seen_by_inner: list[Any] = []

    @tool_output_guardrail
    def app_guardrail(data: ToolOutputGuardrailData) -> ToolGuardrailFunctionOutput:
        seen_by_inner.append(data.output)
        return ToolGuardrailFunctionOutput.allow()

    tools = support_tools(backend)
    read_ticket = next(t for t in tools if t.name == "read_ticket")
    read_ticket.tool_output_guardrails = [app_guardrail]
    model = Scripted([say("Reading."), call("read_ticket", "o1", ticket_id="T-1042")],
                     [say("done")])
    agent = protect(Agent(name="support-agent", model=model, tools=tools), env.guard)
    assert read_ticket.tool_output_guardrails is not None
    assert len(read_ticket.tool_output_guardrails) == 1  # the app's now runs inside ours

    execute("run", agent, REQUEST, context=IAMRunContext(env.refund_token()))

    shown = model.outputs()["o1"]
    assert "hunter2" not in shown and "[REDACTED" in shown
    assert seen_by_inner == [shown]
    (completed,) = [e for e in env.sink.events if e.event_type == "tool_call.completed"]
    assert completed.result.outcome == "success"


def test_identity_of_another_agent_cannot_run_the_tools(env: Env) -> None:
    backend = Backend()
    model = Scripted([call("create_refund", "i1", amount=50, currency="USD", account="acct-42")],
                     [say("done")])
    # SDK agent mapped to refund-bot, run with a token minted for support-agent
    agent = protect(Agent(name="refunds", model=model, tools=refund_tools(backend)), env.guard,
                    agent_ids={"refunds": "refund-bot"})
    execute("run", agent, REQUEST, context=IAMRunContext(env.refund_token()))
    assert backend.executions == []
    assert "belongs to agent `support-agent`" in model.outputs()["i1"]
    (completed,) = [e for e in env.sink.events if e.event_type == "tool_call.completed"]
    # Issue 13 item 7: the tool never ran, so the call is cancelled (reservation given back);
    # "error" now means charged.
    assert completed.result.outcome == "cancelled"
    assert completed.result.budget_settled == {}
