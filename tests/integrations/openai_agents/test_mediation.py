"""Complete mediation: every tool execution on every path has exactly one allow decision.

One run covers function tools, an agent used ``as_tool``, an MCP server and a handoff target;
the tools record what really ran, and the count is compared with the Guard's decisions.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from agents import Agent, Runner

from agentic_iam import ExecutionIdentity
from agentic_iam.integrations.openai_agents import IAMRunContext, IAMRunHooks, protect
from tests.conftest import Env
from tests.integrations.openai_agents.conftest import (
    REQUEST,
    Backend,
    Scripted,
    call,
    refund_tools,
    say,
    support_tools,
)

pytest.importorskip("mcp")
from tests.integrations.openai_agents._mcp_support import (
    InProcessMCP,
    Received,
    upstream_server,
)

IDS = {"triage": "support-agent", "refunds_a": "refund-bot", "refunds_b": "refund-bot"}


def at_most_20(parent: ExecutionIdentity, child: str) -> list[str] | None:
    return ["refund:create amount<=20", "ticket:read"] if child == "refund-bot" else None


def refund(amount: int) -> dict[str, Any]:
    return {"amount": amount, "currency": "USD", "account": "acct-42"}


async def test_decisions_equal_executions_over_all_paths(env: Env) -> None:
    backend = Backend()
    received: Received = []
    server = InProcessMCP(upstream_server(received, refunds=False))
    refunds_a_model = Scripted(
        [say("A: refunding 10 and 90."), call("create_refund", "a1", **refund(10)),
         call("create_refund", "a2", **refund(90))],
        [say("A: refunded 10.")])
    refunds_b_model = Scripted(
        [say("B: reading and refunding 99."), call("read_ticket", "b1", ticket_id="T-1042"),
         call("create_refund", "b2", **refund(99))],
        [say("B: done.")])
    refunds_a = Agent(name="refunds_a", model=refunds_a_model, tools=refund_tools(backend))
    refunds_b = Agent(name="refunds_b", model=refunds_b_model, tools=refund_tools(backend))
    triage_tools = [t for t in support_tools(backend) if t.name != "read_ticket"]
    triage_model = Scripted(
        [say("Looking things up and refunding."),
         call("search_kb", "s1", query="double charge"),
         call("create_refund", "s2", **refund(30)),
         call("create_refund", "s3", **refund(500)),
         call("delete_account", "s4", account="acct-42"),
         call("ask_refunds", "s5", input="refund 10 and 90 USD to acct-42")],
        [say("Reading the ticket over MCP."), call("read_ticket", "s6", ticket_id="T-1042")],
        [say("Handing over."), call("transfer_to_refunds_b", "s7")])
    triage = Agent(
        name="triage", model=triage_model, mcp_servers=[server], handoffs=[refunds_b],
        tools=[*triage_tools, refunds_a.as_tool(tool_name="ask_refunds",
                                                tool_description="Delegate refunds.")])
    protect(triage, env.guard, broker=env.broker, agent_ids=IDS, narrow=at_most_20)

    await server.connect()
    try:
        token = env.refund_token(capabilities=["refund:create amount<=100", "ticket:read",
                                               "kb:search"])
        result = await Runner.run(triage, REQUEST, context=IAMRunContext(token),
                                  hooks=IAMRunHooks(env.guard))
    finally:
        await server.cleanup()

    assert result.final_output == "B: done."
    executed = backend.executions + received
    decided = [e for e in env.sink.events if e.event_type == "tool_call.decided"]
    allowed = [e for e in decided if e.decision.outcome == "allow"]
    # every execution has an allow decision and every allow decision one execution
    assert env.guard.stats["allow"] == len(allowed) == len(executed) == 5
    assert Counter(e.tool for e in allowed) == Counter(name for name, _ in executed)
    # every tool call the models asked for was decided once (delegations are not tool calls)
    requested = {"s1", "s2", "s3", "s4", "s6", "a1", "a2", "b1", "b2"}
    assert sorted(e.call_id for e in decided) == sorted(requested)
    assert sum(env.guard.stats.values()) == len(requested)
    assert {e.call_id for e in decided if e.decision.outcome == "deny"} == {
        "s3", "s4", "a2", "b2"}
    completed = {e.call_id for e in env.sink.events if e.event_type == "tool_call.completed"}
    assert completed == {e.call_id for e in allowed}
    by_call = {e.call_id: e for e in decided}
    assert by_call["a1"].agent_id == by_call["b1"].agent_id == "refund-bot"
    assert by_call["s6"].agent_id == "support-agent"
