"""MCP tools of a protected agent are guarded through the MCP server's tool guardrails.

The MCP server is an in-process ``mcp`` 2.x ``MCPServer`` reached through ``mcp.Client`` (no
subprocess, no network), wrapped in a minimal ``agents.mcp.MCPServer`` adapter.
"""

from __future__ import annotations

import pytest
from agents import Agent, Runner

from agentic_iam.integrations.openai_agents import IAMRunContext, IAMRunHooks, protect
from tests.conftest import Env
from tests.integrations.openai_agents.conftest import REQUEST, Scripted, call, say

mcp = pytest.importorskip("mcp")
from tests.integrations.openai_agents._mcp_support import (  # noqa: E402
    InProcessMCP,
    Received,
    upstream_server,
)


async def test_mcp_tools_are_authorized_and_screened(env: Env) -> None:
    received: Received = []
    refund = {"amount": 50, "currency": "USD", "account": "acct-42"}
    server = InProcessMCP(upstream_server(received))
    model = Scripted(
        [say("Refunding 50, trying 500."), call("create_refund", "m1", **refund),
         call("create_refund", "m2", amount=500, currency="USD", account="acct-42")],
        [say("Reading the ticket."), call("read_ticket", "m3", ticket_id="T-1042")],
        [say("done")])
    agent = protect(Agent(name="support-agent", model=model, mcp_servers=[server]), env.guard,
                    broker=env.broker)
    assert server.tool_input_guardrails is not None and server.tool_output_guardrails
    protect(agent, env.guard, broker=env.broker)  # idempotent
    assert len(server.tool_input_guardrails) == 1 and len(server.tool_output_guardrails) == 1
    await server.connect()
    try:
        await Runner.run(agent, REQUEST, context=IAMRunContext(env.refund_token()),
                         hooks=IAMRunHooks(env.guard))
    finally:
        await server.cleanup()

    # what ran on the MCP server is exactly the checked call
    assert received == [("create_refund", refund), ("read_ticket", {"ticket_id": "T-1042"})]
    seen = model.all_outputs()
    assert "refund of 50 USD to acct-42 created" in seen["m1"]
    assert seen["m2"].startswith("The call to `create_refund` was refused by the access layer")
    assert "hunter2" not in seen["m3"] and "REDACTED" in seen["m3"]
    decided = {e.call_id: e.decision.outcome for e in env.sink.events
               if e.event_type == "tool_call.decided"}
    assert decided == {"m1": "allow", "m2": "deny", "m3": "allow"}
    assert env.guard.stats["allow"] == len(received)


async def test_mcp_approval_is_refused_with_the_approval_message(env: Env) -> None:
    received: Received = []
    server = InProcessMCP(upstream_server(received))
    model = Scripted([call("create_refund", "m4", amount=150, currency="USD",
                           account="acct-42")], [say("needs approval")])
    agent = protect(Agent(name="support-agent", model=model, mcp_servers=[server]), env.guard)
    await server.connect()
    try:
        await Runner.run(agent, REQUEST, context=IAMRunContext(env.refund_token(max_amount=200)))
    finally:
        await server.cleanup()
    assert received == []
    assert "needs a human's approval" in model.outputs()["m4"]
    assert env.guard.stats["approval_required"] == 1
