"""Issue 13 items 7 and 12 through the OpenAI Agents SDK adapter: an execution ends when its run
produces its final output (not when it pauses for an approval), identities minted for handoffs
and ``as_tool`` sub-runs always end with their run, and an allowed call is charged when its tool
may have run, cancelled when it never started."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from agents import Agent, Runner, ToolGuardrailFunctionOutput, function_tool, tool_input_guardrail
from agents.exceptions import UserError

from agentic_iam import ExecutionIdentity, ExecutionToken
from agentic_iam.errors import RevokedTokenError
from agentic_iam.integrations.openai_agents import IAMRunContext, IAMRunHooks, protect
from tests.conftest import Env
from tests.integrations.openai_agents.conftest import (
    MODES,
    REQUEST,
    Backend,
    Mode,
    Scripted,
    call,
    execute,
    refund_tools,
    say,
    support_tools,
)

IDS = {"triage": "support-agent", "refunds": "refund-bot"}
REFUND_15 = {"amount": 15, "currency": "USD", "account": "acct-42"}


def alive(env: Env, token: ExecutionToken) -> bool:
    try:
        env.guard.verifier.verify(token.token)
    except RevokedTokenError:
        return False
    return True


def ended(env: Env) -> list[tuple[str | None, str | None]]:
    """(agent, reason) of every ``execution.ended`` record, in order."""
    return [(e.agent_id, (e.extra or {}).get("reason")) for e in env.sink.events
            if e.event_type == "execution.ended"]


def minted(env: Env) -> list[str]:
    """Keys (issuer|jti) of the tokens the broker sub-delegated."""
    return [f"{e.issuer}|{e.jti}" for e in env.sink.events
            if e.event_type == "delegation.subdelegated"]


def revoked(env: Env, keys: list[str]) -> bool:
    return bool(keys) and set(env.store.revoked(keys)) == set(keys)


def one_search(backend: Backend, call_id: str = "k1") -> tuple[Agent[Any], Scripted]:
    model = Scripted([say("Searching."), call("search_kb", call_id, query="refunds")],
                     [say("done")])
    agent = Agent(name="support-agent", model=model, tools=support_tools(backend))
    return agent, model


def at_most_20(parent: ExecutionIdentity, child: str) -> list[str] | None:
    return ["refund:create amount<=20"] if child == "refund-bot" else None


# --- item 12 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_the_execution_ends_when_the_run_finishes(env: Env, mode: Mode) -> None:
    backend = Backend()
    agent, _ = one_search(backend)
    protect(agent, env.guard, broker=env.broker)
    token = env.refund_token(capabilities=["kb:search"])
    execute(mode, agent, REQUEST, context=IAMRunContext(token), hooks=IAMRunHooks(env.guard))

    assert backend.names() == ["search_kb"]
    assert not alive(env, token)
    assert ended(env) == [("support-agent", "completed")]

    # a later run with the same token: every call is refused
    again, model = one_search(backend, "k2")
    protect(again, env.guard, broker=env.broker)
    execute(mode, again, REQUEST, context=IAMRunContext(token))
    assert "was refused by the access layer" in model.outputs()["k2"]
    assert backend.names() == ["search_kb"]


def test_opting_out_keeps_the_execution_for_a_conversation(env: Env) -> None:
    backend = Backend()
    token = env.refund_token(capabilities=["kb:search"])
    for turn in range(2):
        agent, _ = one_search(backend, f"k{turn}")
        protect(agent, env.guard, broker=env.broker)
        execute("run", agent, REQUEST, context=IAMRunContext(token, end_on_finish=False))
        assert alive(env, token)
    assert backend.names() == ["search_kb", "search_kb"]
    assert ended(env) == []
    env.guard.end_execution(token.token)
    assert not alive(env, token)


def test_an_approval_pause_is_not_the_end(env: Env) -> None:
    backend = Backend()
    model = Scripted([say("Refunding 150."), call("create_refund", "a1", amount=150,
                                                  currency="USD", account="acct-42")],
                     [say("done")])
    agent = protect(Agent(name="support-agent", model=model, tools=support_tools(backend)),
                    env.guard, broker=env.broker)
    token = env.refund_token(max_amount=200)
    context = IAMRunContext(token)

    async def scenario() -> None:
        paused = await Runner.run(agent, REQUEST, context=context)
        assert paused.interruptions and alive(env, token)
        state = paused.to_state()
        context.approve(state, paused.interruptions[0], approver="bob@example.com")
        await Runner.run(agent, state)

    asyncio.run(scenario())
    assert backend.names() == ["create_refund"]
    assert not alive(env, token)


@pytest.mark.parametrize("root_ends", [True, False], ids=["root-ends", "root-opts-out"])
def test_a_handoff_identity_ends_with_the_run(env: Env, root_ends: bool) -> None:
    backend = Backend()
    refunds_model = Scripted([call("create_refund", "d1", **REFUND_15)], [say("Refunded 15.")])
    refunds = Agent(name="refunds", model=refunds_model, tools=refund_tools(backend))
    triage = Agent(name="triage", model=Scripted([call("transfer_to_refunds", "h1")]),
                   tools=support_tools(backend), handoffs=[refunds])
    protect(triage, env.guard, broker=env.broker, agent_ids=IDS, narrow=at_most_20)
    token = env.refund_token()
    context = IAMRunContext(token, end_on_finish=root_ends)

    execute("run", triage, REQUEST, context=context)

    assert backend.executions == [("create_refund", REFUND_15)]
    child = minted(env)
    assert len(child) == 1 and revoked(env, child)  # always
    assert alive(env, token) is not root_ends
    if not root_ends:
        assert context.token is token  # the context holds the root token again
        assert ended(env) == [("refund-bot", "completed")]
    else:
        assert ended(env) == [("refund-bot", "completed"), ("support-agent", "completed")]


@pytest.mark.parametrize("root_ends", [True, False], ids=["root-ends", "root-opts-out"])
def test_an_as_tool_identity_ends_with_the_sub_run(env: Env, root_ends: bool) -> None:
    backend = Backend()
    refunds_model = Scripted([call("create_refund", "e1", **REFUND_15)], [say("Refunded 15.")])
    refunds = Agent(name="refunds", model=refunds_model, tools=refund_tools(backend))
    supervisor = Agent(name="triage", model=Scripted(
        [call("ask_refunds", "t1", input="refund 15 USD to acct-42")], [say("Done.")]),
        tools=[refunds.as_tool(tool_name="ask_refunds", tool_description="Delegate refunds.")])
    protect(supervisor, env.guard, broker=env.broker, agent_ids=IDS, narrow=at_most_20)
    token = env.refund_token()

    execute("run", supervisor, REQUEST, context=IAMRunContext(token, end_on_finish=root_ends))

    assert backend.executions == [("create_refund", REFUND_15)]
    child = minted(env)
    assert len(child) == 1 and revoked(env, child)
    assert alive(env, token) is not root_ends
    assert ended(env)[0] == ("refund-bot", "completed")  # once, when the sub-run finished


def test_a_failed_as_tool_sub_run_ends_its_identity(env: Env) -> None:
    class Broken(Scripted):
        async def get_response(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the sub-agent's model is down")

    refunds = Agent(name="refunds", model=Broken([say("-")]), tools=refund_tools(Backend()))
    supervisor_model = Scripted([call("ask_refunds", "t1", input="refund 15 USD")],
                                [say("The refunds agent failed.")])
    supervisor = Agent(name="triage", model=supervisor_model, tools=[
        refunds.as_tool(tool_name="ask_refunds", tool_description="Delegate refunds.")])
    protect(supervisor, env.guard, broker=env.broker, agent_ids=IDS)
    token = env.refund_token()

    execute("run", supervisor, REQUEST, context=IAMRunContext(token, end_on_finish=False))

    assert "error" in supervisor_model.outputs()["t1"].lower()  # the SDK's failure message
    child = minted(env)
    assert len(child) == 1 and revoked(env, child)
    assert ended(env) == [("refund-bot", "failed")]
    assert alive(env, token)


# --- item 7 -------------------------------------------------------------------------------------


def test_a_tool_that_raises_through_the_run_is_charged(env: Env) -> None:
    """The tool raises after its side effect and the run aborts (no ``failure_error_function``):
    the call is charged, so with a budget of one call a second run sends nothing."""
    sent: list[str] = []

    @function_tool(failure_error_function=None)
    def send_email(to: str, subject: str, body: str) -> str:
        """Send an e-mail."""
        sent.append(to)
        raise RuntimeError("connection reset after the message was accepted")

    token = env.refund_token(capabilities=["email:send"], budget={"tool_calls": 1})
    for attempt in range(2):
        model = Scripted([call("send_email", f"m{attempt}", to="ops@example.com",
                               subject="s", body="b")], [say("done")])
        agent = protect(Agent(name="support-agent", model=model, tools=[send_email]),
                        env.guard, broker=env.broker) if attempt == 0 else Agent(
            name="support-agent", model=model, tools=[send_email])
        if attempt == 0:
            with pytest.raises((RuntimeError, UserError)):
                execute("run", agent, REQUEST, context=IAMRunContext(token))
        else:
            execute("run", agent, REQUEST, context=IAMRunContext(token))
            assert "budget is exhausted" in model.outputs()["m1"]
    assert sent == ["ops@example.com"]
    outcomes = [e.result.outcome for e in env.sink.events
                if e.event_type == "tool_call.completed" and e.result is not None]
    assert outcomes == ["error"]


def test_a_call_refused_before_our_guardrail_is_cancelled(env: Env) -> None:
    """An input guardrail of the application's own rejects the call after the Guard allowed it
    (in ``needs_approval``): the tool never ran, so the reservation is given back."""

    @tool_input_guardrail
    def no_refunds_today(data: Any) -> ToolGuardrailFunctionOutput:
        return ToolGuardrailFunctionOutput.reject_content("no refunds today")

    backend = Backend()
    tools = refund_tools(backend)
    for tool in tools:
        tool.tool_input_guardrails = [no_refunds_today]
    model = Scripted([call("create_refund", "r1", **REFUND_15)], [say("done")])
    agent = protect(Agent(name="support-agent", model=model, tools=tools),
                    env.guard, broker=env.broker)
    token = env.refund_token()
    execute("run", agent, REQUEST, context=IAMRunContext(token, end_on_finish=False))

    assert backend.executions == []
    assert model.outputs()["r1"] == "no refunds today"
    (completed,) = [e for e in env.sink.events if e.event_type == "tool_call.completed"]
    assert completed.result is not None and completed.result.outcome == "cancelled"
    assert completed.result.budget_settled == {}
    left = env.store.remaining(token.identity.key, token.identity.budget.as_dict())
    assert left["tool_calls"] == token.identity.budget.tool_calls
