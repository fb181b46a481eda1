"""Handoffs and agents-as-tools run under a sub-delegated, narrower identity."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from agents import Agent, Runner
from agents.exceptions import ModelBehaviorError

from agentic_iam import ExecutionIdentity, ExecutionToken
from agentic_iam.integrations.openai_agents import (
    IAMRunContext,
    IAMRunHooks,
    iam_run_config,
    protect,
)
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

IDS = {"triage": "support-agent", "refunds": "refund-bot", "reconciler": "reconcile-agent"}


def at_most_20(parent: ExecutionIdentity, child: str) -> list[str] | None:
    """The narrowing hook: refund-bot may refund at most 20, whatever the parent may."""
    return ["refund:create amount<=20"] if child == "refund-bot" else None


def refund(amount: int) -> dict[str, Any]:
    return {"amount": amount, "currency": "USD", "account": "acct-42"}


def decided(env: Env) -> dict[str, Any]:
    return {e.call_id: e for e in env.sink.events if e.event_type == "tool_call.decided"}


def refunds_agent(model: Scripted, backend: Backend) -> Agent[Any]:
    return Agent(name="refunds", handoff_description="Executes refunds.", model=model,
                 tools=refund_tools(backend))


def test_handoff_target_runs_narrower_and_cannot_exceed_its_grant(env: Env) -> None:
    backend = Backend()
    refunds_model = Scripted(
        [say("Refunding 80, then 15."), call("create_refund", "d1", **refund(80)),
         call("create_refund", "d2", **refund(15))],
        [say("Refunded 15 USD; 80 was refused.")])
    triage_model = Scripted([say("Handing over to refunds."), call("transfer_to_refunds", "h1")])
    triage = Agent(name="triage", model=triage_model, tools=support_tools(backend),
                   handoffs=[refunds_agent(refunds_model, backend)])
    protect(triage, env.guard, broker=env.broker, agent_ids=IDS, narrow=at_most_20)
    parent = env.refund_token(max_amount=100)
    context = IAMRunContext(parent)

    result = execute("run", triage, REQUEST, context=context, hooks=IAMRunHooks(env.guard))

    assert result.last_agent.name == "refunds"
    assert result.final_output == "Refunded 15 USD; 80 was refused."
    # the parent's grant would have allowed 80 ...
    assert parent.identity.capabilities.check("refund:create", refund(80)).ok
    # ... the child's did not
    assert backend.executions == [("create_refund", refund(15))]
    assert "was refused by the access layer" in refunds_model.outputs()["d1"]
    events = decided(env)
    child_execution = events["d1"].execution_id
    assert events["d1"].decision.outcome == "deny" and events["d2"].decision.outcome == "allow"
    assert events["d1"].agent_id == events["d2"].agent_id == "refund-bot"
    assert child_execution != parent.identity.execution_id
    assert [hop.id for hop in events["d1"].chain] == [
        "alice@example.com", "support-agent", "refund-bot"]
    assert events["d1"].chain[1].execution_id == parent.identity.execution_id
    assert events["d1"].reasoning.message == "Refunding 80, then 15."
    # the shared run context now carries the child's token (a one-way transfer)
    assert isinstance(context.token, ExecutionToken)
    assert context.token.identity.agent_id == "refund-bot"
    assert [c.describe() for c in context.token.identity.capabilities] == [
        "refund:create amount<=20"]
    minted = [e for e in env.sink.events if e.event_type == "delegation.subdelegated"]
    assert len(minted) == 1 and minted[0].parent_execution_id == parent.identity.execution_id
    assert env.guard.stats == {"allow": 1, "deny": 1, "approval_required": 0}


def test_handoff_outside_the_registry_is_hidden_and_refused(env: Env) -> None:
    backend = Backend()
    reconciler_model = Scripted([say("reconciling")])
    reconciler = Agent(name="reconciler", model=reconciler_model, tools=[])
    triage_model = Scripted([call("transfer_to_reconciler", "h2")],
                            [say("I cannot hand this over.")])
    triage = Agent(name="triage", model=triage_model, handoffs=[reconciler],
                   tools=support_tools(backend))
    protect(triage, env.guard, broker=env.broker, agent_ids=IDS)
    context = IAMRunContext(env.refund_token())

    result = execute("run", triage, REQUEST, context=context, run_config=iam_run_config())

    assert "transfer_to_reconciler" not in triage_model.offered[0]  # is_enabled hid it
    assert result.final_output == "I cannot hand this over."
    assert result.last_agent.name == "triage"
    refusal = triage_model.outputs()["h2"]
    assert "refused by the access layer" in refusal
    assert "may not delegate to `reconcile-agent`" in refusal
    assert reconciler_model.inputs == []
    assert context.token.identity.agent_id == "support-agent"  # type: ignore[union-attr]


def test_forced_hidden_handoff_without_run_config_aborts_without_transfer(env: Env) -> None:
    reconciler_model = Scripted([say("reconciling")])
    triage_model = Scripted([call("transfer_to_reconciler", "h3")], [say("?")])
    triage = Agent(name="triage", model=triage_model,
                   handoffs=[Agent(name="reconciler", model=reconciler_model)])
    protect(triage, env.guard, broker=env.broker, agent_ids=IDS)
    # the SDK's default for an unknown tool is to raise; nothing was transferred
    with pytest.raises(ModelBehaviorError):
        execute("run", triage, REQUEST, context=IAMRunContext(env.refund_token()))
    assert reconciler_model.inputs == []


def test_handoff_refused_at_invocation_keeps_the_run_going(env: Env) -> None:
    def too_wide(parent: ExecutionIdentity, child: str) -> list[str]:
        return ["refund:create amount<=1000"]  # wider than the parent: the broker refuses

    backend = Backend()
    refunds_model = Scripted([say("refunding")])
    triage_model = Scripted([call("transfer_to_refunds", "h4")], [say("Handled it myself.")])
    triage = Agent(name="triage", model=triage_model,
                   handoffs=[refunds_agent(refunds_model, backend)])
    protect(triage, env.guard, broker=env.broker, agent_ids=IDS, narrow=too_wide)
    context = IAMRunContext(env.refund_token(max_amount=100))

    result = execute("run", triage, REQUEST, context=context)

    assert result.final_output == "Handled it myself."
    assert result.last_agent.name == "triage"
    assert refunds_model.inputs == []
    assert "was refused by the access layer" in triage_model.outputs()["h4"]
    assert "widen" in triage_model.outputs()["h4"]
    assert context.token.identity.agent_id == "support-agent"  # type: ignore[union-attr]


def test_agent_as_tool_runs_narrower_and_parent_keeps_its_identity(env: Env) -> None:
    backend = Backend()
    refunds_model = Scripted(
        [say("Sub-agent: refunding 80, then 15."), call("create_refund", "e1", **refund(80)),
         call("create_refund", "e2", **refund(15))],
        [say("Refunded 15 USD.")])
    refunds = refunds_agent(refunds_model, backend)
    supervisor_model = Scripted(
        [say("Asking the refunds agent."),
         call("ask_refunds", "t1", input="refund 80 then 15 USD to acct-42")],
        [say("The refunds agent refunded 15 USD.")])
    supervisor = Agent(name="triage", model=supervisor_model, tools=[
        refunds.as_tool(tool_name="ask_refunds", tool_description="Delegate refunds.")])
    protect(supervisor, env.guard, broker=env.broker, agent_ids=IDS, narrow=at_most_20)
    parent = env.refund_token(max_amount=100)
    context = IAMRunContext(parent)

    result = execute("run", supervisor, REQUEST, context=context, hooks=IAMRunHooks(env.guard))

    assert result.final_output == "The refunds agent refunded 15 USD."
    assert supervisor_model.outputs()["t1"] == "Refunded 15 USD."
    assert backend.executions == [("create_refund", refund(15))]
    assert context.token is parent  # the parent's identity is untouched
    events = decided(env)
    assert events["e1"].decision.outcome == "deny"
    assert events["e1"].agent_id == "refund-bot"
    assert events["e1"].execution_id != parent.identity.execution_id
    # reasoning captured inside the nested run (the SDK does not pass run hooks to it)
    assert "Sub-agent: refunding 80" in events["e1"].reasoning.message
    assert events["e1"].reasoning.parent_run_id is not None
    assert "t1" not in events  # the delegation itself is not a registry tool call


def test_agent_as_tool_outside_the_registry_is_hidden_and_refused(env: Env) -> None:
    reconciler_model = Scripted([say("reconciling")])
    reconciler = Agent(name="reconciler", model=reconciler_model)
    supervisor_model = Scripted([call("reconcile", "t2", input="reconcile the ledger")],
                                [say("Could not reconcile.")])
    supervisor = Agent(name="triage", model=supervisor_model, tools=[
        reconciler.as_tool(tool_name="reconcile", tool_description="Reconcile.")])
    protect(supervisor, env.guard, broker=env.broker, agent_ids=IDS)

    result = execute("run", supervisor, REQUEST, context=IAMRunContext(env.refund_token()),
                     run_config=iam_run_config())

    assert "reconcile" not in supervisor_model.offered[0]
    assert result.final_output == "Could not reconcile."
    assert "refused by the access layer" in supervisor_model.outputs()["t2"]
    assert reconciler_model.inputs == []


def test_approval_inside_an_agent_tool_pauses_the_whole_run(env: Env) -> None:
    backend = Backend()
    refunds_model = Scripted([call("create_refund", "n1", **refund(150))],
                             [say("Refunded 150 USD.")])
    refunds = refunds_agent(refunds_model, backend)
    supervisor_model = Scripted([call("ask_refunds", "t3", input="refund 150 USD to acct-42")],
                                [say("Done.")])
    supervisor = Agent(name="triage", model=supervisor_model, tools=[
        refunds.as_tool(tool_name="ask_refunds", tool_description="Delegate refunds.")])
    protect(supervisor, env.guard, broker=env.broker, agent_ids=IDS)
    context = IAMRunContext(env.refund_token(max_amount=200))

    async def scenario() -> Any:
        result = await Runner.run(supervisor, REQUEST, context=context)
        assert [i.raw_item.call_id for i in result.interruptions] == ["n1"]
        assert backend.executions == []
        state = result.to_state()
        context.approve(state, result.interruptions[0], approver="bob@example.com")
        return await Runner.run(supervisor, state)

    result = asyncio.run(scenario())
    assert result.final_output == "Done."
    assert backend.executions == [("create_refund", refund(150))]
    granted = [e for e in env.sink.events if e.event_type == "approval.granted"]
    assert granted[0].extra["approver"] == "bob@example.com"
    assert [e.decision.outcome for e in env.sink.events
            if e.event_type == "tool_call.decided"] == ["approval_required", "allow"]


def test_default_narrowing_is_the_registry_intersection(env: Env) -> None:
    backend = Backend()
    refunds_model = Scripted([call("create_refund", "g1", **refund(50)),
                              call("search_kb", "g2", query="refund policy")],
                             [say("Refunded 50 USD.")])
    refunds = Agent(name="refunds", model=refunds_model,
                    tools=[*refund_tools(backend),
                           *[t for t in support_tools(backend) if t.name == "search_kb"]])
    triage = Agent(name="triage", model=Scripted([call("transfer_to_refunds", "h5")]),
                   handoffs=[refunds])
    protect(triage, env.guard, broker=env.broker, agent_ids=IDS)
    parent = env.refund_token(capabilities=["refund:create amount<=100", "ticket:read",
                                            "kb:search"])
    context = IAMRunContext(parent)

    execute("run", triage, REQUEST, context=context)

    child = context.token
    assert isinstance(child, ExecutionToken) and child.identity.agent_id == "refund-bot"
    # kb:search is in the parent's grant but not among refund-bot's registry tools
    assert sorted(c.describe() for c in child.identity.capabilities) == [
        "refund:create amount<=100", "ticket:read"]
    assert child.identity.budget.tool_calls == 10  # refund-bot's maximum, below the parent's
    assert backend.executions == [("create_refund", refund(50))]
    assert decided(env)["g2"].decision.reasons[0].code == "registry.tool_unregistered"
