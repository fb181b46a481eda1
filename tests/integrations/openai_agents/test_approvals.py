"""Approvals through the SDK's own pause: ``result.interruptions`` → approve / reject →
``Runner.run(agent, state)``. Only the approved call runs, once; its sibling calls keep their
outcome; an SDK approval counts for the exact call the run paused on and nothing else."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from agents import Agent, Runner

from agentic_iam.integrations.openai_agents import IAMRunContext, approve, protect, reject
from tests.conftest import Env
from tests.integrations.openai_agents.conftest import (
    MODES,
    REQUEST,
    Backend,
    Scripted,
    call,
    decided,
    events,
    execute,
    say,
    support_tools,
)

REFUND_150 = {"amount": 150, "currency": "USD", "account": "acct-42"}
REFUND_20 = {"amount": 20, "currency": "USD", "account": "acct-42"}


def paused_run(env: Env, backend: Backend, *, approver: str | None = None,
               mode: str = "run") -> tuple[Agent[Any], Any, Scripted]:
    """Turn 1: a refund over 100 (needs a human) next to an allowed one; turn 2: done."""
    model = Scripted([say("Refunding 150 and 20."), call("create_refund", "p1", **REFUND_150),
                      call("create_refund", "p2", **REFUND_20)],
                     [say("Both refunds are done.")])
    agent = protect(Agent(name="support-agent", model=model, tools=support_tools(backend)),
                    env.guard, broker=env.broker, approver=approver)
    result = execute(mode, agent, REQUEST,  # type: ignore[arg-type]
                     context=IAMRunContext(env.refund_token(max_amount=200)))
    return agent, result, model


def resume(agent: Agent[Any], state: Any) -> Any:
    return asyncio.run(Runner.run(agent, state))


@pytest.mark.parametrize("mode", MODES)
def test_approval_pauses_and_the_approved_call_runs_once(env: Env, backend: Backend,
                                                         mode: str) -> None:
    agent, result, model = paused_run(env, backend, mode=mode)
    # paused: the allowed sibling ran, the refund over 100 did not
    assert backend.executions == [("create_refund", REFUND_20)]
    (item,) = result.interruptions
    assert item.raw_item.call_id == "p1"
    assert decided(env)["p1"].decision.outcome == "approval_required"

    state = result.to_state()
    approve(state, item, approver="bob")
    final = resume(agent, state)

    assert final.final_output == "Both refunds are done."
    assert backend.executions == [("create_refund", REFUND_20), ("create_refund", REFUND_150)]
    granted = events(env, "approval.granted")
    assert len(granted) == 1
    assert decided(env)["p1"].decision.outcome == "allow"
    assert model.all_outputs()["p1"] == "refund of 150 USD to acct-42 created"


def test_resuming_the_same_state_twice_runs_nothing_twice(env: Env, backend: Backend) -> None:
    agent, result, _ = paused_run(env, backend)
    (item,) = result.interruptions
    state = result.to_state()
    approve(state, item, approver="bob")
    assert resume(agent, state).final_output == "Both refunds are done."
    assert resume(agent, state).final_output == "Both refunds are done."  # a replayed resume
    assert backend.executions.count(("create_refund", REFUND_150)) == 1
    assert backend.executions.count(("create_refund", REFUND_20)) == 1


def test_a_rejection_is_recorded_and_nothing_runs(env: Env, backend: Backend) -> None:
    agent, result, model = paused_run(env, backend)
    (item,) = result.interruptions
    state = result.to_state()
    reject(state, item, approver="bob", message="Not without the manager.")
    final = resume(agent, state)

    assert final.final_output == "Both refunds are done."
    assert backend.executions == [("create_refund", REFUND_20)]
    assert len(events(env, "approval.denied")) == 1
    assert model.all_outputs()["p1"] == "Not without the manager."


def test_plain_state_approve_names_nobody_and_is_refused(env: Env, backend: Backend) -> None:
    agent, result, model = paused_run(env, backend)  # no approver configured for protect()
    (item,) = result.interruptions
    state = result.to_state()
    state.approve(item)
    resume(agent, state)

    assert backend.executions == [("create_refund", REFUND_20)]
    assert events(env, "approval.granted") == []
    assert "was not run" in model.all_outputs()["p1"]


def test_plain_state_approve_counts_as_the_configured_approver(env: Env,
                                                               backend: Backend) -> None:
    agent, result, _ = paused_run(env, backend, approver="bob")
    (item,) = result.interruptions
    state = result.to_state()
    state.approve(item)
    resume(agent, state)
    assert backend.executions == [("create_refund", REFUND_20), ("create_refund", REFUND_150)]
    assert len(events(env, "approval.granted")) == 1


def test_always_approve_does_not_approve_later_calls(env: Env, backend: Backend) -> None:
    model = Scripted([call("create_refund", "q1", **REFUND_150)],
                     [call("create_refund", "q2", amount=160, currency="USD",
                           account="acct-42")],
                     [say("done")])
    agent = protect(Agent(name="support-agent", model=model, tools=support_tools(backend)),
                    env.guard, broker=env.broker, approver="bob")
    result = execute("run", agent, REQUEST,
                     context=IAMRunContext(env.refund_token(max_amount=200)))
    (item,) = result.interruptions
    state = result.to_state()
    state.approve(item, always_approve=True)  # sticky in the SDK: every later create_refund
    final = resume(agent, state)

    # q1 was approved by a human and ran; q2 (160) was never shown to one: refused, pending
    assert backend.executions == [("create_refund", REFUND_150)]
    assert final.final_output == "done"
    assert "needs a human's approval" in model.all_outputs()["q2"]
    assert decided(env)["q2"].decision.outcome == "approval_required"
    assert len(events(env, "approval.granted")) == 1
    assert len(env.guard.approvals.pending()) == 1


def test_a_tools_own_approval_is_the_humans_answer_for_the_guard(env: Env,
                                                                 backend: Backend) -> None:
    tools = support_tools(backend)
    for tool in tools:
        tool.needs_approval = True  # the application asks a human for every call
    model = Scripted([call("create_refund", "o1", **REFUND_150)], [say("done")])
    agent = protect(Agent(name="support-agent", model=model, tools=tools), env.guard,
                    broker=env.broker)
    result = execute("run", agent, REQUEST,
                     context=IAMRunContext(env.refund_token(max_amount=200)))
    (item,) = result.interruptions
    assert env.guard.stats["allow"] + env.guard.stats["deny"] == 0  # nothing decided yet
    state = result.to_state()
    approve(state, item, approver="bob")
    resume(agent, state)

    # the Guard needed approval too (over 100): the human's answer counted, once
    assert backend.executions == [("create_refund", REFUND_150)]
    assert len(events(env, "approval.granted")) == 1


def test_an_approval_inside_an_as_tool_sub_agent_resumes_under_the_same_child(
        env: Env, backend: Backend) -> None:
    sub_model = Scripted([call("create_refund", "s1", **REFUND_150)], [say("refunded 150")])
    sub = Agent(name="refunds", model=sub_model, tools=support_tools(backend)[:1])
    parent_model = Scripted([call("refunds", "p1", input="refund 150")], [say("done")])
    parent = protect(Agent(name="triage", model=parent_model,
                           tools=[sub.as_tool("refunds", "Executes refunds.")]),
                     env.guard, broker=env.broker, agent_id="support-agent",
                     agent_ids={"refunds": "refund-bot"})
    result = execute("run", parent, REQUEST,
                     context=IAMRunContext(env.refund_token(max_amount=200)))
    (item,) = result.interruptions  # the whole run paused for the sub-agent's call
    assert backend.executions == []
    state = result.to_state()
    approve(state, item, approver="bob")
    final = resume(parent, state)

    assert final.final_output == "done"
    assert backend.executions == [("create_refund", REFUND_150)]
    found = decided(env)["s1"]
    assert found.decision.outcome == "allow" and found.agent_id == "refund-bot"
    children = {e.execution_id for e in events(env, "delegation.subdelegated")}
    assert children == {found.execution_id}  # one child, kept across the pause, then ended
    assert found.execution_id in {e.execution_id for e in events(env, "execution.ended")}
