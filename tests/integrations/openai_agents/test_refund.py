"""Alice's refund through Runner.run, Runner.run_streamed and Runner.run_sync."""

from __future__ import annotations

from typing import Any

import pytest
from agents import Agent, RunConfig, ToolExecutionConfig

from agentic_iam.core.approvals import arguments_digest
from agentic_iam.integrations.openai_agents import (
    DEFAULT_APPROVER,
    IAMRunContext,
    IAMRunHooks,
    protect,
)
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
    execute,
    say,
    support_tools,
    think,
)

REFUND_50 = {"amount": 50, "currency": "USD", "account": "acct-42"}


def events(env: Env, kind: str = "tool_call.decided") -> list[Any]:
    return [e for e in env.sink.events if e.event_type == kind]


def support_agent(env: Env, model: Scripted, backend: Backend) -> Agent[Any]:
    agent: Agent[Any] = Agent(name="support-agent", instructions="Help the customer.",
                              model=model, tools=support_tools(backend))
    return protect(agent, env.guard, broker=env.broker)


@pytest.mark.parametrize("mode", MODES)
def test_allowed_runs_denied_are_model_readable(env: Env, mode: Mode) -> None:
    backend = Backend()
    model = Scripted(
        [think("Alice was double charged: refund 50, and try the full 500 and a cleanup."),
         say("Refunding 50 USD to acct-42."),
         call("create_refund", "c1", **REFUND_50),
         call("create_refund", "c2", amount=500, currency="USD", account="acct-42"),
         call("delete_account", "c3", account="acct-42")],
        [say("Refunded 50 USD; the rest was refused.")])
    agent = support_agent(env, model, backend)
    context = IAMRunContext(env.refund_token(max_amount=100))

    result = execute(mode, agent, REQUEST, context=context, hooks=IAMRunHooks(env.guard))

    assert result.final_output == "Refunded 50 USD; the rest was refused."
    assert backend.executions == [("create_refund", REFUND_50)]
    # the next model turn saw the tool result and both refusals (reject_content), run went on
    seen = model.outputs()
    assert seen["c1"] == "refund of 50 USD to acct-42 created"
    for call_id, tool in (("c2", "create_refund"), ("c3", "delete_account")):
        assert seen[call_id].startswith(
            f"The call to `{tool}` was refused by the access layer and was not run.")
    assert "`delete_account` is not registered for agent `support-agent`" in seen["c3"]
    decided = {e.call_id: e for e in events(env)}
    assert {k: e.decision.outcome for k, e in decided.items()} == {
        "c1": "allow", "c2": "deny", "c3": "deny"}
    assert decided["c2"].decision.reasons[0].code.startswith("capability")
    assert decided["c3"].decision.reasons[0].code == "registry.tool_unregistered"
    for event in decided.values():
        assert event.framework == "openai_agents"
        assert event.reasoning is not None
        assert "Refunding 50 USD to acct-42." in event.reasoning.message
        assert "(reasoning) Alice was double charged" in event.reasoning.message
        assert event.reasoning.response_id and event.reasoning.model == "scripted-model"
        assert event.reasoning.run_id and event.reasoning.run_id.startswith("oa_run_")
    completed = events(env, "tool_call.completed")
    assert [e.call_id for e in completed] == ["c1"]
    assert completed[0].result.outcome == "success"
    assert env.guard.stats == {"allow": 1, "deny": 2, "approval_required": 0}
    # the tool ran with the Guard's checked copy, which is what the audit recorded
    assert decided["c1"].arguments_digest == arguments_digest(REFUND_50)


@pytest.mark.parametrize("mode", MODES)
def test_approval_pauses_and_resumes_once(env: Env, mode: Mode) -> None:
    backend = Backend()
    refund = {"amount": 150, "currency": "USD", "account": "acct-42"}
    model = Scripted([say("Refunding 150 USD."), call("create_refund", "a1", **refund)],
                     [say("Refund of 150 USD done after approval.")])
    agent = support_agent(env, model, backend)
    context = IAMRunContext(env.refund_token(max_amount=200))
    hooks = IAMRunHooks(env.guard)

    result = execute(mode, agent, REQUEST, context=context, hooks=hooks)

    assert backend.executions == []
    assert [item.raw_item.call_id for item in result.interruptions] == ["a1"]
    assert env.guard.stats["approval_required"] == 1
    state = result.to_state()
    context.approve(state, result.interruptions[0], approver="bob@example.com")
    resumed = execute(mode, agent, state, hooks=hooks)

    assert resumed.final_output == "Refund of 150 USD done after approval."
    assert backend.executions == [("create_refund", refund)]
    assert model.outputs()["a1"] == "refund of 150 USD to acct-42 created"
    a1 = [e for e in events(env) if e.call_id == "a1"]
    assert [e.decision.outcome for e in a1] == ["approval_required", "allow"]
    assert all(e.reasoning.message == "Refunding 150 USD." for e in a1)
    granted = events(env, "approval.granted")
    assert len(granted) == 1 and granted[0].extra["approver"] == "bob@example.com"
    assert env.guard.stats == {"allow": 1, "deny": 0, "approval_required": 1}


def test_plain_run_state_approval_names_nobody_and_is_refused(env: Env) -> None:
    # Issue 13 item 9: the SDK's own `state.approve(item)` does not say who approved. It used to
    # be granted as DEFAULT_APPROVER; an approval needs an accountable approver, so it is refused
    # (and recorded), and the call does not run.
    backend = Backend()
    model = Scripted([call("create_refund", "p1", amount=150, currency="USD", account="acct-42")],
                     [say("done")])
    agent = support_agent(env, model, backend)
    context = IAMRunContext(env.refund_token(max_amount=200))
    result = execute("run", agent, REQUEST, context=context)
    state = result.to_state()
    state.approve(result.interruptions[0])  # the SDK's own call, no approver given
    execute("run", agent, state)
    assert backend.executions == []
    assert events(env, "approval.granted") == []
    (refused,) = events(env, "approval.denied")
    assert refused.extra["approver"] == DEFAULT_APPROVER and refused.extra["refused"] == "approve"
    assert refused.decision.reasons[0].code == "approval.approver_unknown"
    assert env.store.list_approvals("pending")  # still waiting for an accountable answer


def test_plain_run_state_approval_counts_for_the_contexts_configured_approver(env: Env) -> None:
    backend = Backend()
    model = Scripted([call("create_refund", "p1", amount=150, currency="USD", account="acct-42")],
                     [say("done")])
    agent = support_agent(env, model, backend)
    context = IAMRunContext(env.refund_token(max_amount=200), approver="bob@example.com")
    result = execute("run", agent, REQUEST, context=context)
    state = result.to_state()
    state.approve(result.interruptions[0])
    execute("run", agent, state)
    assert len(backend.executions) == 1
    assert events(env, "approval.granted")[0].extra["approver"] == "bob@example.com"


def test_rejection_is_recorded_and_nothing_runs(env: Env) -> None:
    backend = Backend()
    model = Scripted([call("create_refund", "r1", amount=150, currency="USD", account="acct-42")],
                     [say("The refund was not approved.")])
    agent = support_agent(env, model, backend)
    context = IAMRunContext(env.refund_token(max_amount=200))
    result = execute("run", agent, REQUEST, context=context)
    state = result.to_state()
    context.reject(state, result.interruptions[0], approver="bob@example.com",
                   message="Bob did not approve this refund.")
    resumed = execute("run", agent, state)
    assert resumed.final_output == "The refund was not approved."
    assert backend.executions == []
    assert model.outputs()["r1"] == "Bob did not approve this refund."
    denied = events(env, "approval.denied")
    assert len(denied) == 1 and denied[0].extra["approver"] == "bob@example.com"
    assert env.guard.stats["allow"] == 0


def test_an_approval_lets_one_call_through(env: Env) -> None:
    backend = Backend()
    refund = {"amount": 150, "currency": "USD", "account": "acct-42"}
    model = Scripted([call("create_refund", "o1", **refund)],
                     [call("create_refund", "o2", **refund)], [say("done")])
    agent = support_agent(env, model, backend)
    context = IAMRunContext(env.refund_token(max_amount=200))
    result = execute("run", agent, REQUEST, context=context)
    state = result.to_state()
    context.approve(state, result.interruptions[0], approver="bob@example.com")
    again = execute("run", agent, state)
    # the same refund a second time needs its own approval
    assert [item.raw_item.call_id for item in again.interruptions] == ["o2"]
    assert len(backend.executions) == 1


@pytest.mark.parametrize("token", [None, "not-a-token"])
def test_no_valid_token_no_tool(env: Env, token: str | None) -> None:
    backend = Backend()
    model = Scripted([call("search_kb", "n1", query="refund policy"),
                      call("create_refund", "n2", **REFUND_50)], [say("I cannot do that.")])
    agent = support_agent(env, model, backend)
    result = execute("run", agent, REQUEST, context=IAMRunContext(token))
    assert result.final_output == "I cannot do that."
    assert backend.executions == []
    assert all("refused by the access layer" in out for out in model.outputs().values())
    assert {e.decision.outcome for e in events(env)} == {"deny"}
    assert {e.decision.reasons[0].code for e in events(env)} <= {"token.invalid"}


def test_no_context_at_all_no_tool(env: Env) -> None:
    backend = Backend()
    model = Scripted([call("search_kb", "z1", query="refund policy")], [say("no")])
    agent = support_agent(env, model, backend)
    execute("run", agent, REQUEST)
    assert backend.executions == []
    assert "no agentic-iam identity context" in model.outputs()["z1"]


def test_user_context_with_aiam_token(env: Env) -> None:
    class AppContext:
        def __init__(self, aiam_token: Any) -> None:
            self.aiam_token = aiam_token
            self.tenant = "acme"

    backend = Backend()
    model = Scripted([call("create_refund", "u1", **REFUND_50)], [say("done")])
    agent = support_agent(env, model, backend)
    execute("run", agent, REQUEST, context=AppContext(env.refund_token()))
    assert backend.executions == [("create_refund", REFUND_50)]


@pytest.mark.parametrize("run_hooks", [True, False])
def test_llm_usage_is_charged_once_per_response(env: Env, run_hooks: bool) -> None:
    backend = Backend()
    model = Scripted([call("search_kb", "k1", query="refunds")], [say("done")])
    agent = support_agent(env, model, backend)
    context = IAMRunContext(env.refund_token())
    execute("run", agent, REQUEST, context=context,
            hooks=IAMRunHooks(env.guard) if run_hooks else None)
    usage = events(env, "model.usage")
    assert len(usage) == 2  # two model calls, whether or not both hook kinds fired
    assert usage[0].usage == {"input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS}
    remaining = env.store.remaining(context.token.identity.key,  # type: ignore[union-attr]
                                    context.token.identity.budget.as_dict())  # type: ignore[union-attr]
    assert remaining["llm_tokens"] == (context.token.identity.budget.llm_tokens  # type: ignore[union-attr]
                                       - 2 * (INPUT_TOKENS + OUTPUT_TOKENS))


def test_approval_with_pre_approval_guardrails(env: Env) -> None:
    """With pre_approval_tool_input_guardrails the guardrails run before the pause too."""
    backend = Backend()
    refund = {"amount": 150, "currency": "USD", "account": "acct-42"}
    model = Scripted([call("create_refund", "q1", **refund),
                      call("create_refund", "q2", amount=900, currency="USD",
                           account="acct-42")],
                     [say("done")])
    agent = support_agent(env, model, backend)
    context = IAMRunContext(env.refund_token(max_amount=200))
    config = RunConfig(tool_execution=ToolExecutionConfig(pre_approval_tool_input_guardrails=True))
    result = execute("run", agent, REQUEST, context=context, run_config=config)
    assert [item.raw_item.call_id for item in result.interruptions] == ["q1"]
    state = result.to_state()
    context.approve(state, result.interruptions[0], approver="bob@example.com")
    execute("run", agent, state, run_config=config)
    assert backend.executions == [("create_refund", refund)]
    assert "refused by the access layer" in model.outputs()["q2"]
    assert env.guard.stats == {"allow": 1, "deny": 1, "approval_required": 1}
