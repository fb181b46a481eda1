"""Sub-agents run under their own narrowed identity (``broker.subdelegate_for``), never the
parent's: handoff targets, ``as_tool`` agents and agents started from inside a tool. Without a
broker their calls are refused (``identity.agent_mismatch``). Their identities end with their
run."""

from __future__ import annotations

from typing import Any

import pytest
from agents import Agent, Runner, function_tool
from agents.tool_context import ToolContext

from agentic_iam.integrations.openai_agents import IAMRunContext, protect
from tests.conftest import Env
from tests.integrations.openai_agents.conftest import (
    MODES,
    REQUEST,
    Backend,
    Mode,
    Scripted,
    call,
    decided,
    events,
    execute,
    refund_tools,
    say,
    support_tools,
)


def refund(amount: int) -> dict[str, Any]:
    return {"amount": amount, "currency": "USD", "account": "acct-42"}


def refund_bot(model: Scripted, backend: Backend) -> Agent[Any]:
    return Agent(name="refunds", handoff_description="Executes refunds.", model=model,
                 tools=refund_tools(backend))


IDS = {"refunds": "refund-bot"}


def child_of(env: Env, root: Any, event: Any) -> None:
    """``event`` was decided under a child of ``root`` minted for refund-bot."""
    parent = env.guard.verifier.verify(root.token, check_revocation=False)
    assert event.agent_id == "refund-bot"
    assert event.execution_id != parent.execution_id
    minted = [e for e in env.sink.events if e.event_type == "delegation.subdelegated"
              and e.execution_id == event.execution_id]
    assert len(minted) == 1 and minted[0].parent_execution_id == parent.execution_id


@pytest.mark.parametrize("mode", MODES)
def test_handoff_target_runs_under_a_narrower_child(env: Env, backend: Backend,
                                                    mode: Mode) -> None:
    target_model = Scripted([call("create_refund", "d1", **refund(80)),
                             call("read_ticket", "d2", ticket_id="T-1042")],
                            [say("Refunded.")])
    triage = Agent(name="triage", model=Scripted([call("transfer_to_refunds", "h1")]),
                   tools=support_tools(backend), handoffs=[refund_bot(target_model, backend)])
    protect(triage, env.guard, broker=env.broker, agent_id="support-agent", agent_ids=IDS)
    # refund:create only: read_ticket is not in the parent's grant, so not in the child's
    root = env.refund_token(capabilities=["refund:create amount<=100"])

    result = execute(mode, triage, REQUEST, context=IAMRunContext(root, end_on_finish=False))

    assert result.final_output == "Refunded."
    assert backend.executions == [("create_refund", refund(80))]
    found = decided(env)
    child_of(env, root, found["d1"])
    assert found["d2"].decision.outcome == "deny"
    # the child ended with the run; the opted-out root did not
    ended = events(env, "execution.ended")
    assert [e.execution_id for e in ended] == [found["d1"].execution_id]


def test_as_tool_runs_under_its_own_child_and_the_parent_keeps_its_identity(
        env: Env, backend: Backend) -> None:
    sub_model = Scripted([call("create_refund", "s1", **refund(40))], [say("refunded 40")])
    sub = refund_bot(sub_model, backend)
    parent_model = Scripted([call("refunds", "p1", input="refund 40"),
                             call("create_refund", "p2", **refund(10))],
                            [say("done")])
    parent = Agent(name="triage", model=parent_model,
                   tools=[sub.as_tool("refunds", "Executes refunds."), *refund_tools(backend)])
    protect(parent, env.guard, broker=env.broker, agent_id="support-agent", agent_ids=IDS)
    root = env.refund_token()

    execute("run", parent, REQUEST, context=IAMRunContext(root))

    assert sorted(backend.executions, key=str) == sorted(
        [("create_refund", refund(40)), ("create_refund", refund(10))], key=str)
    found = decided(env)
    child_of(env, root, found["s1"])
    assert found["p2"].agent_id == "support-agent"
    assert parent_model.outputs()["p1"] == "refunded 40"
    ended = {e.execution_id for e in events(env, "execution.ended")}
    assert found["s1"].execution_id in ended


def test_an_agent_started_from_inside_a_tool_gets_its_own_identity(
        env: Env, backend: Backend) -> None:
    sub_model = Scripted([call("create_refund", "i1", **refund(30))], [say("refunded 30")])
    sub = protect(refund_bot(sub_model, backend), env.guard, broker=env.broker,
                  agent_id="refund-bot")

    @function_tool
    async def search_kb(ctx: ToolContext[Any], query: str) -> str:
        """Search the knowledge base (this one asks the refund bot)."""
        backend.record("search_kb", query=query)
        result = await Runner.run(sub, query, context=ctx.context)  # the parent's context
        return str(result.final_output)

    parent_model = Scripted([call("search_kb", "k1", query="refund 30")], [say("done")])
    parent = protect(Agent(name="triage", model=parent_model, tools=[search_kb]), env.guard,
                     broker=env.broker, agent_id="support-agent")
    root = env.refund_token(capabilities=["refund:create amount<=100", "kb:search"])

    execute("run", parent, REQUEST, context=IAMRunContext(root))

    assert backend.names() == ["search_kb", "create_refund"]
    found = decided(env)
    child_of(env, root, found["i1"])
    assert parent_model.outputs()["k1"] == "refunded 30"
    # the sub-run ended its own identity, not the parent's (which ended with the parent run)
    ended = [e.execution_id for e in events(env, "execution.ended")]
    assert ended == [found["i1"].execution_id, found["k1"].execution_id]


def test_without_a_broker_sub_agents_are_refused(env: Env, backend: Backend) -> None:
    target_model = Scripted([call("create_refund", "n1", **refund(10))], [say("refused")])
    triage = Agent(name="triage", model=Scripted([call("transfer_to_refunds", "h1")]),
                   tools=support_tools(backend), handoffs=[refund_bot(target_model, backend)])
    protect(triage, env.guard, agent_id="support-agent", agent_ids=IDS)  # no broker

    execute("run", triage, REQUEST, context=IAMRunContext(env.refund_token()))

    assert backend.executions == []
    event = decided(env)["n1"]
    assert event.decision.reasons[0].code == "identity.agent_mismatch"


def test_as_tool_without_a_broker_is_refused(env: Env, backend: Backend) -> None:
    sub = refund_bot(Scripted([call("create_refund", "z1", **refund(10))]), backend)
    parent_model = Scripted([call("refunds", "z0", input="refund 10")], [say("done")])
    parent = protect(Agent(name="triage", model=parent_model,
                           tools=[sub.as_tool("refunds", "Executes refunds.")]),
                     env.guard, agent_id="support-agent", agent_ids=IDS)

    execute("run", parent, REQUEST, context=IAMRunContext(env.refund_token()))

    assert backend.executions == []
    assert "was refused by the access layer" in parent_model.outputs()["z0"]


def test_a_delegation_the_registry_does_not_allow_is_refused(env: Env,
                                                              backend: Backend) -> None:
    # reconcile-agent is not in support-agent's may_delegate_to
    target = Agent(name="reconciler", handoff_description="Reconciles.",
                   model=Scripted([call("list_transactions", "r1", account="a", day="d")],
                                  [say("no")]), tools=[])

    @function_tool
    def list_transactions(account: str, day: str) -> str:
        """List ledger transactions."""
        backend.record("list_transactions", account=account, day=day)
        return "[]"

    target.tools.append(list_transactions)
    triage = Agent(name="triage", model=Scripted([call("transfer_to_reconciler", "h1")]),
                   tools=support_tools(backend), handoffs=[target])
    protect(triage, env.guard, broker=env.broker, agent_id="support-agent",
            agent_ids={"reconciler": "reconcile-agent"})

    execute("run", triage, REQUEST, context=IAMRunContext(env.refund_token()))

    assert backend.executions == []
    assert decided(env)["r1"].decision.outcome == "deny"
