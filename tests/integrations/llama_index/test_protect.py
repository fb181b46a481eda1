"""`protect(agent, guard, ...)` guards an existing FunctionAgent / AgentWorkflow in one call: the
same object comes back, and every tool call of its runs passes the Guard — tools added after
wiring, parallel sync and async tools, streaming runs, a stock multi-agent workflow (guarded at
the workflow's step, handoffs narrowed). The token comes from the Context or from
`binding.bind` (what `with project.delegate(...)` does), and the execution ends with the run.
The two-line start through `agentic_iam.load` is here too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from llama_index.core.agent.workflow import (
    AgentStream,
    AgentWorkflow,
    FunctionAgent,
    ReActAgent,
    ToolCallResult,
)
from llama_index.core.tools import FunctionTool

import agentic_iam
from agentic_iam.core.binding import bind
from agentic_iam.errors import RevokedTokenError
from agentic_iam.integrations.llama_index import protect, run_with_identity
from tests.conftest import Env
from tests.integrations.llama_index.conftest import (
    FRAMEWORK_WARNINGS,
    REQUEST,
    SECRET,
    Backend,
    ai,
    call,
    chain_ids,
    decided,
    drive,
    results,
    scripted,
)

pytestmark = FRAMEWORK_WARNINGS

REFUND = {"amount": 50, "currency": "USD", "account": "acct-alice"}


def alive(env: Env, token: Any) -> bool:
    try:
        env.guard.verifier.verify(token.token)
    except RevokedTokenError:
        return False
    return True


async def test_protect_returns_the_same_agent_and_guards_tools_added_later(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    llm = scripted(ai("Refunding, and closing the account.",
                      call("create_refund", "c_ok", **REFUND),
                      call("create_refund", "c_over", amount=500, currency="USD",
                           account="acct-alice"),
                      call("delete_account", "c_del", account="acct-alice")),
                   ai("Done."))
    agent = FunctionAgent(name="support", description="Support", tools=[tools["search_kb"]],
                          llm=llm)
    guarded = protect(agent, env.guard, agent_id="support-agent")
    assert guarded is agent and isinstance(agent, FunctionAgent)
    # wired first, tools added afterwards: they go through the same step
    agent.tools = [*(agent.tools or []), tools["create_refund"], tools["delete_account"]]

    _, events = await drive(await run_with_identity(agent, REQUEST, env.refund_token()))
    assert backend.executed("create_refund") == [REFUND]
    assert backend.executed("delete_account") == []
    out = results(events)
    assert [out[c].tool_output.is_error for c in ("c_ok", "c_over", "c_del")] == [
        False, True, True]
    assert decided(env, "c_del").decision.reasons[0].code == "registry.tool_unregistered"
    assert decided(env, "c_ok").agent_id == "support-agent"


async def test_parallel_sync_and_async_tools_while_streaming(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    llm = scripted(ai("All three at once.",
                      call("create_refund", "p_sync", **REFUND),
                      call("read_ticket", "p_async", ticket_id="T-1042"),
                      call("delete_account", "p_denied", account="acct-alice")),
                   ai("Done."))
    agent = protect(FunctionAgent(name="support-agent", description="Support", llm=llm,
                                  tools=list(tools.values()), streaming=True), env.guard)
    _, events = await drive(await run_with_identity(agent, REQUEST, env.refund_token()))
    assert any(isinstance(e, AgentStream) for e in events)
    assert backend.executed("create_refund") == [REFUND]
    assert backend.executed("read_ticket") == [{"ticket_id": "T-1042"}]
    assert backend.executed("delete_account") == []
    # the async tool's output was screened before anything was streamed
    assert all(SECRET not in repr(e) for e in events)
    assert SECRET not in llm.tool_results(1)["p_async"]
    completed = sorted(e.call_id or "" for e in env.sink.events
                       if e.event_type == "tool_call.completed")
    assert completed == ["p_async", "p_sync"]


async def test_a_stock_agent_workflow_is_guarded_at_its_step(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    triage = FunctionAgent(name="triage", description="Routes.", tools=[tools["search_kb"]],
                           llm=scripted(ai("Handing over.", call("handoff", "h1",
                                                                 to_agent="refunds",
                                                                 reason="a refund"))),
                           can_handoff_to=["refunds"])
    refunds = ReActAgent(name="refunds", description="Refunds.",
                         tools=[tools["create_refund"], tools["delete_account"]],
                         llm=scripted(ai(
                             "Thought: refund it.\nAction: create_refund\nAction Input: "
                             + json.dumps(REFUND)), ai(
                             "Thought: and delete.\nAction: delete_account\nAction Input: "
                             '{"account": "acct-alice"}'), ai("Thought: ok.\nAnswer: done")))
    workflow = protect(AgentWorkflow(agents=[triage, refunds], root_agent="triage"), env.guard,
                       broker=env.broker, agent_id="support-agent",
                       agent_ids={"refunds": "refund-bot"})
    root = env.refund_token(capabilities=["refund:create amount<=100", "kb:search"])
    _, events = await drive(await run_with_identity(workflow, REQUEST, root))

    assert backend.executed("create_refund") == [REFUND]
    assert backend.executed("delete_account") == []
    refund = next(e for e in events if isinstance(e, ToolCallResult)
                  and e.tool_name == "create_refund")
    event = decided(env, refund.tool_id)
    # the receiving agent acted under its own, narrower identity, never the parent's
    assert event.agent_id == "refund-bot" and event.execution_id != root.identity.execution_id
    assert chain_ids(event) == ["alice@example.com", "support-agent", "refund-bot"]
    minted = [e for e in env.sink.events if e.event_type == "delegation.subdelegated"]
    assert len(minted) == 1 and minted[0].parent_execution_id == root.identity.execution_id
    # both identities ended with the run
    assert not alive(env, root)
    assert sorted(e.agent_id or "" for e in env.sink.events
                  if e.event_type == "execution.ended") == ["refund-bot", "support-agent"]


async def test_the_token_bound_with_bind_is_used_and_ends_with_the_run(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    agent = protect(FunctionAgent(name="support", description="Support",
                                  tools=[tools["create_refund"]],
                                  llm=scripted(ai("Refund.", call("create_refund", "b1",
                                                                  **REFUND)))),
                    env.guard, agent_id="support-agent")
    token = env.refund_token()
    with bind(token):
        handler = agent.run(user_msg=REQUEST)
    await drive(handler)
    assert backend.executed("create_refund") == [REFUND]
    assert decided(env, "b1").execution_id == token.identity.execution_id
    assert not alive(env, token)


async def test_end_on_finish_false_keeps_a_bound_token(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    agent = protect(FunctionAgent(name="support", description="Support",
                                  tools=[tools["create_refund"]],
                                  llm=scripted(ai("Refund.", call("create_refund", "k1",
                                                                  **REFUND)))),
                    env.guard, agent_id="support-agent", end_on_finish=False)
    token = env.refund_token()
    with bind(token):
        await drive(agent.run(user_msg=REQUEST))
    assert backend.executed("create_refund") == [REFUND]
    assert alive(env, token)


async def test_a_run_without_identity_calls_nothing(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    llm = scripted(ai("Refund.", call("create_refund", "n1", **REFUND)))
    agent = protect(FunctionAgent(name="support", description="Support",
                                  tools=[tools["create_refund"]], llm=llm), env.guard)
    await drive(agent.run(user_msg=REQUEST))
    assert backend.calls == []
    assert "no execution identity" in llm.tool_results(1)["n1"]
    assert decided(env, "n1").decision.outcome == "deny"  # decided and on the record


def test_protect_refuses_what_it_cannot_guard(env: Env,
                                              tools: dict[str, FunctionTool]) -> None:
    agent = FunctionAgent(name="support", description="Support", tools=[], llm=scripted())
    protect(agent, env.guard)
    with pytest.raises(ValueError, match="already protected"):
        protect(agent, env.guard)
    with pytest.raises(TypeError, match="unknown options: agent_name"):
        protect(FunctionAgent(name="x", description="x", llm=scripted()), env.guard,
                agent_name="x")
    with pytest.raises(ValueError, match="on_approval"):
        protect(FunctionAgent(name="x", description="x", llm=scripted()), env.guard,
                on_approval="later")
    with pytest.raises(TypeError, match="workflow agent or AgentWorkflow"):
        protect(tools["search_kb"], env.guard)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="needs a Guard"):
        protect(FunctionAgent(name="x", description="x", llm=scripted()), None)  # type: ignore[arg-type]


async def test_two_line_start_with_a_project(tmp_path: Path) -> None:
    """`agentic_iam.load(DIR)` + `iam.protect(agent, agent_id=...)`, then the run inside
    `with iam.delegate(...)`: all a user writes to guard an existing agent."""
    agentic_iam.init_project(tmp_path, agent_id="support-agent")
    ran: list[dict[str, Any]] = []

    def create_refund(amount: int, currency: str, account: str) -> str:
        """Refund an amount to an account."""
        ran.append({"amount": amount, "currency": currency, "account": account})
        return f"refunded {amount} {currency} to {account}"

    llm = scripted(ai("Refunding 50, then 500.", call("create_refund", "q1", **REFUND),
                      call("create_refund", "q2", amount=500, currency="USD",
                           account="acct-alice")), ai("Done."))
    agent = FunctionAgent(name="support", description="Support", llm=llm,
                          tools=[FunctionTool.from_defaults(create_refund)])

    with agentic_iam.load(tmp_path) as iam:
        agent = iam.protect(agent, agent_id="support-agent")
        with iam.delegate("alice@example.com", "refund T-1042", ["refund:create amount<=100"]):
            await agent.run(user_msg=REQUEST)

    assert ran == [REFUND]
    assert "refused by the access layer" in llm.tool_results(1)["q2"]
    audit = [json.loads(line) for line in (tmp_path / "aiam-audit.jsonl").read_text().splitlines()
             if line.strip()]
    decisions = {e["call_id"]: e["decision"]["outcome"] for e in audit
                 if e.get("event_type") == "tool_call.decided"}
    assert decisions == {"q1": "allow", "q2": "deny"}
    assert [e["agent_id"] for e in audit if e.get("event_type") == "execution.ended"] == [
        "support-agent"]


async def test_a_copy_of_a_protected_agent_is_protected(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    agent = protect(FunctionAgent(name="support", description="Support", tools=[],
                                  llm=scripted()), env.guard, agent_id="support-agent")
    llm = scripted(ai("Refund and delete.", call("create_refund", "k1", **REFUND),
                      call("delete_account", "k2", account="acct-alice")), ai("Done."))
    clone = agent.model_copy(update={"llm": llm, "tools": [tools["create_refund"],
                                                           tools["delete_account"]]})
    assert type(clone) is type(agent)
    await drive(await run_with_identity(clone, REQUEST, env.refund_token()))
    assert backend.executed("create_refund") == [REFUND]
    assert backend.executed("delete_account") == []
    assert decided(env, "k2").decision.outcome == "deny"


async def test_a_protected_workflow_under_a_bound_token(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    """What `with iam.delegate(...)` does for a multi-agent workflow: the bound token is the
    root agent's; the handoff mints the receiver its own; both end with the run."""
    triage = FunctionAgent(name="triage", description="Routes.", tools=[],
                           llm=scripted(ai("Handing over.", call("handoff", "w1",
                                                                 to_agent="refunds",
                                                                 reason="a refund"))),
                           can_handoff_to=["refunds"])
    refunds = FunctionAgent(name="refunds", description="Refunds.",
                            tools=[tools["create_refund"]],
                            llm=scripted(ai("Refunding.", call("create_refund", "w2", **REFUND)),
                                         ai("Done.")))
    workflow = protect(AgentWorkflow(agents=[triage, refunds], root_agent="triage"), env.guard,
                       broker=env.broker, agent_id="support-agent",
                       agent_ids={"refunds": "refund-bot"})
    token = env.refund_token()
    with bind(token):
        result = await workflow.run(user_msg=REQUEST)
    assert result.current_agent_name == "refunds"
    assert backend.executed("create_refund") == [REFUND]
    event = decided(env, "w2")
    assert event.agent_id == "refund-bot" and event.execution_id != token.identity.execution_id
    assert not alive(env, token)
    assert sorted(e.agent_id or "" for e in env.sink.events
                  if e.event_type == "execution.ended") == ["refund-bot", "support-agent"]
