"""MCP tools (rebuilt by the SDK on every turn) go through the same mediation as function tools.

The MCP server is an in-process ``mcp`` 2.x ``MCPServer`` reached through ``mcp.Client`` (no
subprocess, no network), wrapped in a minimal ``agents.mcp.MCPServer`` adapter. What the server
really received is the backend's record.
"""

from __future__ import annotations

import pytest
from agents import Agent, Runner

from agentic_iam.integrations.openai_agents import IAMRunContext, approve, protect
from tests.conftest import Env
from tests.integrations.openai_agents.conftest import (
    REQUEST,
    Backend,
    Scripted,
    call,
    decided,
    say,
)

mcp = pytest.importorskip("mcp")
from tests.integrations.openai_agents._mcp_support import (  # noqa: E402
    InProcessMCP,
    upstream_server,
)

REFUND_50 = {"amount": 50, "currency": "USD", "account": "acct-42"}


async def test_mcp_tools_are_decided_run_with_the_checked_copy_and_screened(
        env: Env, backend: Backend) -> None:
    server = InProcessMCP(upstream_server(backend.executions))
    model = Scripted(
        [say("Refunding 50, trying 500."), call("create_refund", "m1", **REFUND_50),
         call("create_refund", "m2", amount=500, currency="USD", account="acct-42")],
        [say("Reading the ticket."), call("read_ticket", "m3", ticket_id="T-1042")],
        [say("done")])
    agent = protect(Agent(name="support-agent", model=model, mcp_servers=[server]), env.guard,
                    broker=env.broker)
    await server.connect()
    try:
        await Runner.run(agent, REQUEST, context=IAMRunContext(env.refund_token()))
    finally:
        await server.cleanup()

    assert backend.executions == [("create_refund", REFUND_50),
                                  ("read_ticket", {"ticket_id": "T-1042"})]
    seen = model.all_outputs()
    assert "refund of 50 USD to acct-42 created" in seen["m1"]
    assert seen["m2"].startswith("The call to `create_refund` was refused by the access layer")
    assert "hunter2" not in seen["m3"] and "REDACTED" in seen["m3"]
    assert {k: e.decision.outcome for k, e in decided(env).items()} == {
        "m1": "allow", "m2": "deny", "m3": "allow"}


async def test_an_mcp_call_that_needs_approval_pauses_and_resumes(env: Env,
                                                                  backend: Backend) -> None:
    server = InProcessMCP(upstream_server(backend.executions))
    refund = {"amount": 150, "currency": "USD", "account": "acct-42"}
    model = Scripted([call("create_refund", "m4", **refund)], [say("refunded 150")])
    agent = protect(Agent(name="support-agent", model=model, mcp_servers=[server]), env.guard,
                    broker=env.broker)
    await server.connect()
    try:
        result = await Runner.run(agent, REQUEST,
                                  context=IAMRunContext(env.refund_token(max_amount=200)))
        assert backend.executions == []
        (item,) = result.interruptions
        state = result.to_state()
        approve(state, item, approver="bob")
        final = await Runner.run(agent, state)
    finally:
        await server.cleanup()
    assert final.final_output == "refunded 150"
    assert backend.executions == [("create_refund", refund)]
