"""One mediation path: allowed calls run with the checked copy and are screened, refused calls are
model-readable, a tool that raises is charged as an error, and a run with no identity is decided
and recorded (refused) — through ``Runner.run``, ``Runner.run_streamed`` and ``Runner.run_sync``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from agents import Agent, function_tool

from agentic_iam import bind
from agentic_iam.integrations.openai_agents import IAMRunContext, protect
from tests.conftest import Env
from tests.integrations.openai_agents.conftest import (
    INPUT_TOKENS,
    MODES,
    OUTPUT_TOKENS,
    REQUEST,
    Backend,
    Mode,
    Scripted,
    call,
    decided,
    events,
    execute,
    say,
    support_tools,
    think,
)

REFUND_50 = {"amount": 50, "currency": "USD", "account": "acct-42"}


def support_agent(env: Env, model: Scripted, backend: Backend) -> Agent[Any]:
    return protect(Agent(name="support-agent", instructions="Help the customer.", model=model,
                         tools=support_tools(backend)), env.guard, broker=env.broker,
                   agent_id="support-agent")


def refund_turns() -> Scripted:
    return Scripted(
        [think("Alice was double charged: refund 50, and try the full 500 and a cleanup."),
         say("Refunding 50 USD to acct-42."),
         call("create_refund", "c1", **REFUND_50),
         call("create_refund", "c2", amount=500, currency="USD", account="acct-42"),
         call("delete_account", "c3", account="acct-42")],
        [say("Refunded 50 USD; the rest was refused.")])


@pytest.mark.parametrize("mode", MODES)
def test_allowed_runs_refused_are_model_readable(env: Env, backend: Backend,
                                                 mode: Mode) -> None:
    model = refund_turns()
    agent = support_agent(env, model, backend)

    result = execute(mode, agent, REQUEST, context=IAMRunContext(env.refund_token()))

    assert result.final_output == "Refunded 50 USD; the rest was refused."
    assert backend.executions == [("create_refund", REFUND_50)]
    seen = model.outputs()
    assert seen["c1"] == "refund of 50 USD to acct-42 created"
    for call_id, tool in (("c2", "create_refund"), ("c3", "delete_account")):
        assert seen[call_id].startswith(
            f"The call to `{tool}` was refused by the access layer and was not run.")
    found = decided(env)
    assert {k: e.decision.outcome for k, e in found.items()} == {
        "c1": "allow", "c2": "deny", "c3": "deny"}
    assert found["c3"].decision.reasons[0].code == "registry.tool_unregistered"
    for event in found.values():
        assert event.framework == "openai_agents"
        assert "Refunding 50 USD to acct-42." in event.reasoning.message
        assert "(reasoning) Alice was double charged" in event.reasoning.message
        assert event.reasoning.response_id and event.reasoning.model == "scripted-model"
    usage = events(env, "model.usage")
    assert usage and usage[0].usage["input_tokens"] == INPUT_TOKENS
    assert usage[0].usage["output_tokens"] == OUTPUT_TOKENS


def test_output_is_screened_before_the_model_sees_it(env: Env, backend: Backend) -> None:
    model = Scripted([call("read_ticket", "r1", ticket_id="T-1042")], [say("read")])
    execute("run", support_agent(env, model, backend), REQUEST,
            context=IAMRunContext(env.refund_token()))
    seen = model.outputs()["r1"]
    assert "hunter2" not in seen and "[REDACTED" in seen
    assert backend.executions == [("read_ticket", {"ticket_id": "T-1042"})]


@pytest.mark.parametrize("mode", MODES)
def test_a_tool_that_raises_is_charged_as_an_error(env: Env, backend: Backend,
                                                   mode: Mode) -> None:
    @function_tool
    def create_refund(amount: int, currency: str, account: str) -> str:
        """Refund an amount to a customer account (the payment service is down)."""
        backend.record("create_refund", amount=amount, currency=currency, account=account)
        raise RuntimeError("payment service unavailable")

    model = Scripted([call("create_refund", "x1", **REFUND_50)], [say("it failed")])
    agent = protect(Agent(name="support-agent", model=model, tools=[create_refund]),
                    env.guard, broker=env.broker)

    result = execute(mode, agent, REQUEST, context=IAMRunContext(env.refund_token()))

    assert result.final_output == "it failed"
    assert backend.names() == ["create_refund"]  # it ran (and may have had its effect)
    completed = events(env, "tool_call.completed")
    assert [e.result.outcome for e in completed] == ["error"]
    # the SDK's failure handler still answers the model (its default text, no internals)
    assert model.outputs()["x1"].startswith("An error occurred while running the tool")


def test_a_run_without_any_identity_is_decided_and_recorded(env: Env,
                                                            backend: Backend) -> None:
    model = Scripted([call("create_refund", "n1", **REFUND_50)], [say("refused")])
    execute("run", support_agent(env, model, backend), REQUEST)  # no context, nothing bound

    assert backend.executions == []
    event = decided(env)["n1"]
    assert event.decision.outcome == "deny"
    assert event.decision.reasons[0].code.startswith("token")
    assert "carries no execution identity" in model.outputs()["n1"]


@pytest.mark.parametrize("token", ["", "not-a-token"])
def test_an_invalid_token_runs_nothing(env: Env, backend: Backend, token: str) -> None:
    model = Scripted([call("create_refund", "v1", **REFUND_50)], [say("refused")])
    execute("run", support_agent(env, model, backend), REQUEST, context=IAMRunContext(token))
    assert backend.executions == []
    assert decided(env)["v1"].decision.outcome == "deny"


def test_the_bound_token_is_used_without_a_context(env: Env, backend: Backend) -> None:
    model = Scripted([call("create_refund", "b1", **REFUND_50)], [say("done")])
    agent = support_agent(env, model, backend)
    with bind(env.refund_token()):
        execute("run", agent, REQUEST)
    assert backend.executions == [("create_refund", REFUND_50)]
    assert decided(env)["b1"].decision.outcome == "allow"


def test_an_application_context_with_aiam_token(env: Env, backend: Backend) -> None:
    @dataclass
    class AppContext:
        aiam_token: Any
        tenant: str

    model = Scripted([call("create_refund", "a1", **REFUND_50)], [say("done")])
    execute("run", support_agent(env, model, backend), REQUEST,
            context=AppContext(env.refund_token(), "acme"))
    assert backend.executions == [("create_refund", REFUND_50)]


def test_the_run_context_wins_over_the_bound_token(env: Env, backend: Backend) -> None:
    narrow = env.refund_token(max_amount=10)
    model = Scripted([call("create_refund", "w1", **REFUND_50)], [say("done")])
    with bind(env.refund_token(max_amount=100)):
        execute("run", support_agent(env, model, backend), REQUEST,
                context=IAMRunContext(narrow))
    assert backend.executions == []
    assert decided(env)["w1"].decision.reasons[0].code.startswith("capability")


def test_the_execution_ends_with_the_run_unless_opted_out(env: Env, backend: Backend) -> None:
    kept, ended = env.refund_token(), env.refund_token()
    for token, end in ((kept, False), (ended, True)):
        model = Scripted([call("create_refund", f"e{int(end)}", **REFUND_50)], [say("done")])
        execute("run", support_agent(env, model, backend), REQUEST,
                context=IAMRunContext(token, end_on_finish=end))
    key = {t.token: env.guard.verifier.verify(t.token, check_revocation=False).key
           for t in (kept, ended)}
    revoked = env.store.revoked(list(key.values()))
    assert key[ended.token] in revoked and key[kept.token] not in revoked


def test_a_call_refused_by_the_users_own_guardrail_is_cancelled(env: Env,
                                                                backend: Backend) -> None:
    from agents import ToolGuardrailFunctionOutput, tool_input_guardrail

    @tool_input_guardrail
    def no_refunds_today(data: Any) -> ToolGuardrailFunctionOutput:
        return ToolGuardrailFunctionOutput.reject_content("no refunds today")

    tools = support_tools(backend)
    for tool in tools:
        tool.tool_input_guardrails = [no_refunds_today]
    model = Scripted([call("create_refund", "g1", **REFUND_50)], [say("ok")])
    agent = protect(Agent(name="support-agent", model=model, tools=tools), env.guard,
                    broker=env.broker)

    execute("run", agent, REQUEST, context=IAMRunContext(env.refund_token()))

    assert backend.executions == []
    assert model.outputs()["g1"] == "no refunds today"
    # the Guard allowed it, the tool never started: cancelled (budget and call id given back)
    assert decided(env)["g1"].decision.outcome == "allow"
    assert [e.result.outcome for e in events(env, "tool_call.completed")] == ["cancelled"]


def test_a_run_torn_down_before_the_tool_started_cancels_the_call(env: Env,
                                                                   backend: Backend) -> None:
    from agents import ToolGuardrailFunctionOutput, tool_input_guardrail
    from agents.exceptions import ToolInputGuardrailTripwireTriggered

    @tool_input_guardrail
    def tripwire(data: Any) -> ToolGuardrailFunctionOutput:
        return ToolGuardrailFunctionOutput.raise_exception()

    tools = support_tools(backend)
    for tool in tools:
        tool.tool_input_guardrails = [tripwire]
    model = Scripted([call("create_refund", "t1", **REFUND_50)], [say("never")])
    agent = protect(Agent(name="support-agent", model=model, tools=tools), env.guard,
                    broker=env.broker)

    with pytest.raises(ToolInputGuardrailTripwireTriggered):
        execute("run", agent, REQUEST, context=IAMRunContext(env.refund_token()))

    assert backend.executions == []
    assert decided(env)["t1"].decision.outcome == "allow"
    assert [e.result.outcome for e in events(env, "tool_call.completed")] == ["cancelled"]
