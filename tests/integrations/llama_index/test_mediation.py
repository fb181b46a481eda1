"""The bypass is closed. In a stock AgentWorkflow a guard on one agent never runs (the workflow
has its own `call_tool`); here, every tool call by any agent of a multi-agent workflow, over
every path (allowed, denied, parallel, after a handoff, ReAct, approval pause/resume, no
identity, a tool-less agent), has a Guard decision of its own, and executions equal allows."""

from __future__ import annotations

import pytest
from llama_index.core.agent.workflow import (
    AgentWorkflow,
    FunctionAgent,
    ReActAgent,
)
from llama_index.core.agent.workflow import ToolCall as ToolCallEvent
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import Event

from agentic_iam.errors import ConfigurationError
from agentic_iam.integrations.llama_index import GuardedFunctionAgent, run_with_identity
from tests.conftest import Env
from tests.integrations.llama_index.conftest import (
    FRAMEWORK_WARNINGS,
    REQUEST,
    Backend,
    ai,
    call,
    drive,
    scripted,
)
from tests.integrations.llama_index.test_workflow import (
    build,
    refunds_script,
    root_token,
    triage_script,
)

pytestmark = FRAMEWORK_WARNINGS


def announced(events: list[Event]) -> list[str]:
    """Every tool call the workflow dispatched, except the built-in handoff."""
    return [e.tool_id for e in events
            if type(e) is ToolCallEvent and e.tool_name != "handoff"]


async def test_every_call_of_every_agent_is_decided(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    dispatched: list[str] = []

    # 1. handoff, then allowed / over-limit / unregistered in parallel, then a ticket read
    wf = build(env, tools, scripted(*triage_script()), scripted(*refunds_script()))
    _, events = await drive(await run_with_identity(wf, REQUEST, root_token(env)))
    dispatched += announced(events)

    # 2. a ReAct receiving agent
    react = scripted(
        ChatMessage(role="assistant", content=(
            "Thought: refund.\nAction: create_refund\nAction Input: "
            '{"amount": 7, "currency": "USD", "account": "acct-alice"}')),
        ChatMessage(role="assistant", content=(
            "Thought: delete.\nAction: delete_account\nAction Input: "
            '{"account": "acct-alice"}')),
        ChatMessage(role="assistant", content="Thought: ok.\nAnswer: done"),
    )
    wf = build(env, tools, scripted(*triage_script()), react, refunds_cls=ReActAgent)
    _, events = await drive(await run_with_identity(wf, REQUEST, root_token(env)))
    dispatched += announced(events)

    # 3. an approval pause and resume in the receiving agent
    wf = build(env, tools, scripted(*triage_script()), scripted(
        ai("150.", call("create_refund", "m150", amount=150, currency="USD",
                        account="acct-alice"))))
    _, events = await drive(await run_with_identity(wf, REQUEST, root_token(env, 200)),
                            approve=True)
    dispatched += announced(events)

    # 4. no identity at all: everything refused, still decided
    wf = build(env, tools, scripted(
        ai("kb.", call("search_kb", "n1", query="x"), call("read_ticket", "n2",
                                                           ticket_id="T-1042"))), scripted())
    _, events = await drive(wf.run(user_msg=REQUEST))
    dispatched += announced(events)

    decided_ids = [e.call_id for e in env.sink.events if e.event_type == "tool_call.decided"]
    # each dispatched call was decided (a paused approval is decided three times: asked, asked
    # again when the step replays on resume, then allowed)
    assert set(dispatched) == set(decided_ids)
    assert len(decided_ids) == len(dispatched) + env.guard.stats["approval_required"]
    assert sum(env.guard.stats.values()) == len(decided_ids)
    assert len(backend.calls) == env.guard.stats["allow"]  # and the autouse check again
    assert env.guard.stats == {"allow": 7, "deny": 5, "approval_required": 2}


async def test_guarded_agent_in_a_stock_workflow_refuses_to_run(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    """The pitfall from the reference: a stock AgentWorkflow runs its own call_tool, so a
    guarded agent inside it would be bypassed. It refuses to take a step instead."""
    agent = GuardedFunctionAgent(
        name="refunds", description="Executes refunds.", tools=list(tools.values()),
        llm=scripted(ai("Refund.", call("create_refund", "x1", amount=5, currency="USD",
                                        account="acct-alice"))),
        guard=env.guard, agent_ids={"refunds": "support-agent"})
    stock = AgentWorkflow(agents=[agent])
    with pytest.raises(ConfigurationError, match="does not guard tool calls"):
        await drive(stock.run(user_msg=REQUEST))
    assert backend.calls == []
    assert sum(env.guard.stats.values()) == 0


async def test_stock_agents_in_a_stock_workflow_are_not_mediated(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    """Control: what the guarded workflow prevents. Nothing decides these calls."""
    agent = FunctionAgent(
        name="refunds", description="Executes refunds.", tools=list(tools.values()),
        llm=scripted(ai("Delete.", call("delete_account", "x1", account="acct-alice"))))
    await drive(AgentWorkflow(agents=[agent]).run(user_msg=REQUEST))
    assert backend.executed("delete_account") == [{"account": "acct-alice"}]
    assert sum(env.guard.stats.values()) == 0
    backend.calls.clear()  # keep the autouse mediation check about the guarded paths only
