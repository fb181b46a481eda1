"""Alice's refund with a single guarded agent: allowed calls run with the checked arguments,
denied ones come back to the model as error tool outputs, output is screened before it is
streamed or stored, approvals pause and resume the workflow, and every decision is on the
record with the assistant message that asked for it."""

from __future__ import annotations

from typing import Any

import pytest
from llama_index.core.agent.workflow import ToolCall as ToolCallEvent
from llama_index.core.agent.workflow import ToolCallResult
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import Context, HumanResponseEvent, InputRequiredEvent

from agentic_iam.integrations.llama_index import (
    ApprovalRequestEvent,
    GuardedFunctionAgent,
    GuardedReActAgent,
    bind_identity,
    run_with_identity,
)
from tests.conftest import Env
from tests.integrations.llama_index.conftest import (
    FRAMEWORK_WARNINGS,
    MODEL,
    REQUEST,
    SECRET,
    Backend,
    ai,
    call,
    decided,
    drive,
    results,
    scripted,
)

pytestmark = FRAMEWORK_WARNINGS

THINKING = "Alice was charged twice; refund the duplicate 50 USD."
TEXT = "Refunding the duplicate charge, trying the full amount, and closing the old account."


def alice_script() -> list[Any]:
    return [
        ai(TEXT,
           call("create_refund", "c_ok", amount=50, currency="USD", account="acct-alice"),
           call("create_refund", "c_over", amount=500, currency="USD", account="acct-alice"),
           call("delete_account", "c_unreg", account="acct-alice"),
           thinking=THINKING),
        ai("Now reading the ticket for the record.", call("read_ticket", "c_read",
                                                          ticket_id="T-1042")),
        ai("Refunded 50 USD; the larger refund and the deletion were refused."),
    ]


def agent(env: Env, tools: dict[str, FunctionTool], llm: Any, **kwargs: Any) -> Any:
    return GuardedFunctionAgent(name="support", description="Support agent",
                                tools=list(tools.values()), llm=llm, guard=env.guard,
                                agent_ids={"support": "support-agent"}, **kwargs)


async def test_alice_refund(env: Env, backend: Backend,
                            tools: dict[str, FunctionTool]) -> None:
    llm = scripted(*alice_script())
    handler = await run_with_identity(agent(env, tools, llm), REQUEST, env.refund_token())
    result, events = await drive(handler)

    # allowed: ran once, with the checked arguments; refused: never ran
    assert backend.executed("create_refund") == [
        {"amount": 50, "currency": "USD", "account": "acct-alice"}]
    assert backend.executed("delete_account") == []
    assert backend.executed("read_ticket") == [{"ticket_id": "T-1042"}]
    assert env.guard.stats == {"allow": 2, "deny": 2, "approval_required": 0}

    # denials are error tool outputs the model reads on its next turn; the run goes on
    out = results(events)
    assert not out["c_ok"].tool_output.is_error
    assert out["c_over"].tool_output.is_error and out["c_unreg"].tool_output.is_error
    shown = llm.tool_results(1)
    assert "refused by the access layer" in shown["c_over"]
    assert "amount" in shown["c_over"]
    assert "not registered" in shown["c_unreg"]
    assert shown["c_ok"] == "refund of 50 USD to acct-alice created"
    assert str(result.response.content).startswith("Refunded 50 USD")

    # screened before it was streamed, stored in memory, or shown to the model
    assert SECRET not in out["c_read"].tool_output.content
    assert SECRET not in str(out["c_read"].tool_output.raw_output)
    assert SECRET not in llm.tool_results(2)["c_read"]
    assert all(SECRET not in repr(e) for e in events)
    assert handler.ctx is not None
    memory = await handler.ctx.store.get("memory")
    assert all(SECRET not in (m.content or "") for m in await memory.aget_all())

    # every call on the record with the assistant message (and thinking) that asked for it
    for call_id in ("c_ok", "c_over", "c_unreg"):
        event = decided(env, call_id)
        assert event.reasoning.message.startswith(TEXT)
        assert f"[reasoning] {THINKING}" in event.reasoning.message
        assert event.reasoning.model == MODEL
        assert event.reasoning.run_id == handler.run_id
        assert event.framework == "llama_index"
        assert event.agent_id == "support-agent"
    assert decided(env, "c_read").reasoning.message == "Now reading the ticket for the record."
    assert decided(env, "c_over").decision.outcome == "deny"
    assert decided(env, "c_unreg").decision.reasons[0].code == "registry.tool_unregistered"
    completed = [e.call_id or "" for e in env.sink.events
                 if e.event_type == "tool_call.completed"]
    assert sorted(completed) == ["c_ok", "c_read"]


async def test_bind_identity_then_run(env: Env, backend: Backend,
                                      tools: dict[str, FunctionTool]) -> None:
    wf = agent(env, tools, scripted(*alice_script()))
    ctx = Context(wf)
    token = env.refund_token()
    await bind_identity(ctx, token)
    assert await wf.current_identity(ctx) == token.identity
    await drive(wf.run(user_msg=REQUEST, ctx=ctx))
    assert len(backend.executed("create_refund")) == 1
    # the run finished, so its execution ended (issue 13 item 12): the identity is gone
    assert await wf.current_identity(ctx) is None
    ended = [e for e in env.sink.events if e.event_type == "execution.ended"]
    assert [(e.execution_id, e.agent_id) for e in ended] == [
        (token.identity.execution_id, "support-agent")]
    # the token is not in the prompt-visible state
    assert "eyJ" not in repr(await ctx.store.get("state", default={}))


async def test_no_identity_no_tools(env: Env, backend: Backend,
                                    tools: dict[str, FunctionTool]) -> None:
    llm = scripted(ai("Refunding.", call("create_refund", "c1", amount=5, currency="USD",
                                         account="acct-alice")))
    _, events = await drive(agent(env, tools, llm).run(user_msg=REQUEST))
    assert backend.calls == []
    assert results(events)["c1"].tool_output.is_error
    assert "no execution identity" in llm.tool_results(1)["c1"]
    assert env.guard.stats["deny"] == 1  # the attempt is on the record
    assert decided(env, "c1").decision.reasons[0].code == "token.invalid"


async def test_token_for_another_agent_is_refused(env: Env, backend: Backend,
                                                  tools: dict[str, FunctionTool]) -> None:
    child = env.broker.subdelegate_for(env.refund_token(), "refund-bot",
                                       budget={"tool_calls": 5, "cost": 500})
    llm = scripted(ai("Refunding.", call("create_refund", "c1", amount=5, currency="USD",
                                         account="acct-alice")))
    await drive(await run_with_identity(agent(env, tools, llm), REQUEST, child))
    assert backend.calls == []
    assert "belongs to agent `refund-bot`" in llm.tool_results(1)["c1"]
    assert decided(env, "c1").decision.reasons[0].code == "identity.agent_mismatch"


APPROVAL = [
    ai("This one is 150 USD, over the no-approval limit.",
       call("create_refund", "c_big", amount=150, currency="USD", account="acct-alice")),
    ai("Done."),
]


async def test_approval_pauses_and_resumes(env: Env, backend: Backend,
                                           tools: dict[str, FunctionTool]) -> None:
    llm = scripted(*APPROVAL)
    handler = await run_with_identity(agent(env, tools, llm), REQUEST,
                                      env.refund_token(max_amount=200))
    seen_before_answer: list[int] = []
    requests: list[ApprovalRequestEvent] = []
    async for ev in handler.stream_events():
        if isinstance(ev, ApprovalRequestEvent):
            requests.append(ev)
            seen_before_answer.append(len(backend.calls))  # paused: nothing ran yet
            assert handler.ctx is not None
            handler.ctx.send_event(ev.answer(approved=True, approver="bob"))
    await handler

    assert len(requests) == 1
    request = requests[0]
    assert request.tool == "create_refund" and request.call_id == "c_big"
    assert request.arguments == {"amount": 150, "currency": "USD", "account": "acct-alice"}
    assert request.agent_id == "support-agent" and "support.refund-over-100" in request.policy_ids
    assert "eyJ" not in request.model_dump_json()  # never a token in an event
    assert seen_before_answer == [0]
    assert backend.executed("create_refund") == [
        {"amount": 150, "currency": "USD", "account": "acct-alice"}]
    # the step is replayed from the top on resume: asked again (the same pending request),
    # then allowed once the answer is recorded
    assert env.guard.stats == {"allow": 1, "deny": 0, "approval_required": 2}
    assert [e.event_type for e in env.sink.events].count("approval.requested") == 1
    kinds = [e.event_type for e in env.sink.events]
    assert "approval.requested" in kinds and "approval.granted" in kinds
    granted = next(e for e in env.sink.events if e.event_type == "approval.granted")
    assert granted.extra == {"approval_id": request.approval_id, "approver": "bob"}
    assert llm.tool_results(1)["c_big"] == "refund of 150 USD to acct-alice created"


async def test_approval_declined(env: Env, backend: Backend,
                                 tools: dict[str, FunctionTool]) -> None:
    llm = scripted(*APPROVAL)
    handler = await run_with_identity(agent(env, tools, llm), REQUEST,
                                      env.refund_token(max_amount=200))
    _, events = await drive(handler, approve=False)
    assert backend.calls == []
    assert results(events)["c_big"].tool_output.is_error
    assert "A human declined" in llm.tool_results(1)["c_big"]
    assert "approval.denied" in [e.event_type for e in env.sink.events]


async def test_approval_refuse_mode(env: Env, backend: Backend,
                                    tools: dict[str, FunctionTool]) -> None:
    llm = scripted(*APPROVAL)
    handler = await run_with_identity(agent(env, tools, llm, on_approval="refuse"), REQUEST,
                                      env.refund_token(max_amount=200))
    _, events = await drive(handler)
    assert not any(isinstance(e, ApprovalRequestEvent) for e in events)
    assert backend.calls == []
    assert "needs a human's approval" in llm.tool_results(1)["c_big"]
    assert len(env.guard.approvals.pending()) == 1  # left for `aiam approvals`


async def test_stream_announces_each_call_once(env: Env, backend: Backend,
                                               tools: dict[str, FunctionTool]) -> None:
    handler = await run_with_identity(agent(env, tools, scripted(*APPROVAL)), REQUEST,
                                      env.refund_token(max_amount=200))
    _, events = await drive(handler, approve=True)
    announced = [e.tool_id for e in events if type(e) is ToolCallEvent]
    assert announced == ["c_big"]  # the replay after the pause does not announce it again
    assert [e.tool_id for e in events if isinstance(e, ToolCallResult)] == ["c_big"]


async def test_tool_error_is_screened_and_settled(env: Env, backend: Backend) -> None:
    def search_kb(query: str) -> str:
        """Search the knowledge base."""
        backend.record("search_kb", query=query)
        raise RuntimeError(f"backend down, key={SECRET}")

    llm = scripted(ai("Searching.", call("search_kb", "c1", query="refunds")))
    wf = GuardedFunctionAgent(name="support-agent", description="Support",
                              tools=[FunctionTool.from_defaults(search_kb)], llm=llm,
                              guard=env.guard)
    _, events = await drive(await run_with_identity(
        wf, REQUEST, env.refund_token(capabilities=["kb:search"])))
    out = results(events)["c1"].tool_output
    assert out.is_error and SECRET not in out.content and "backend down" in out.content
    completed = next(e for e in env.sink.events if e.event_type == "tool_call.completed")
    assert completed.result is not None and completed.result.outcome == "error"


@pytest.mark.parametrize("streaming", [True, False])
async def test_react_agent(env: Env, backend: Backend, tools: dict[str, FunctionTool],
                           streaming: bool) -> None:
    from llama_index.core.base.llms.types import ChatMessage

    thought = "I need to refund the duplicate charge."
    llm = scripted(
        ChatMessage(role="assistant", content=(
            f"Thought: {thought}\nAction: create_refund\nAction Input: "
            '{"amount": 50, "currency": "USD", "account": "acct-alice"}')),
        ChatMessage(role="assistant", content=(
            "Thought: Maybe delete the account too.\nAction: delete_account\nAction Input: "
            '{"account": "acct-alice"}')),
        ChatMessage(role="assistant", content="Thought: Done.\nAnswer: Refunded 50 USD."),
    )
    wf = GuardedReActAgent(name="support", description="Support", tools=list(tools.values()),
                           llm=llm, guard=env.guard, streaming=streaming,
                           agent_ids={"support": "support-agent"})
    result, events = await drive(await run_with_identity(wf, REQUEST, env.refund_token()))
    assert backend.executed("create_refund") == [
        {"amount": 50, "currency": "USD", "account": "acct-alice"}]
    assert backend.executed("delete_account") == []
    out = [e for e in events if isinstance(e, ToolCallResult)]
    assert [o.tool_output.is_error for o in out] == [False, True]
    message = decided(env, out[0].tool_id).reasoning.message
    assert message.startswith(f"Thought: {thought}\nAction: create_refund")
    assert "Refunded 50 USD" in str(result.response.content)


async def test_provider_without_call_ids(env: Env, backend: Backend,
                                         tools: dict[str, FunctionTool]) -> None:
    """Some providers give no call id: the requesting message is found by name and arguments."""
    from llama_index.core.base.llms.types import ToolCallBlock

    llm = scripted(ai("Refunding without an id.", ToolCallBlock(
        tool_call_id=None, tool_name="create_refund",
        tool_kwargs={"amount": 5, "currency": "USD", "account": "acct-alice"})))
    await drive(await run_with_identity(agent(env, tools, llm), REQUEST, env.refund_token()))
    assert len(backend.executed("create_refund")) == 1
    event = next(e for e in env.sink.events if e.event_type == "tool_call.decided")
    assert event.reasoning is not None
    assert event.reasoning.message == "Refunding without an id."
    assert event.call_id  # the Guard named the call


async def test_approval_nobody_answers(env: Env, backend: Backend,
                                       tools: dict[str, FunctionTool]) -> None:
    llm = scripted(*APPROVAL)
    wf = agent(env, tools, llm, approval_timeout_s=0.2)
    _, events = await drive(await run_with_identity(wf, REQUEST,
                                                    env.refund_token(max_amount=200)))
    assert any(isinstance(e, ApprovalRequestEvent) for e in events)
    assert backend.calls == []
    assert "Nobody answered" in llm.tool_results(1)["c_big"]
    assert len(env.guard.approvals.pending()) == 1  # still answerable out of band


async def test_approval_answer_must_name_an_approver(env: Env, backend: Backend,
                                                     tools: dict[str, FunctionTool]) -> None:
    llm = scripted(*APPROVAL)
    handler = await run_with_identity(agent(env, tools, llm), REQUEST,
                                      env.refund_token(max_amount=200))
    await drive(handler, approve=True, approver="  ")
    assert backend.calls == []
    assert "not understood" in llm.tool_results(1)["c_big"]
    assert "approval.granted" not in [e.event_type for e in env.sink.events]


class Confirm(InputRequiredEvent):
    question: str


class Confirmed(HumanResponseEvent):
    response: str


async def test_tool_that_waits_for_a_human(env: Env) -> None:
    """A tool that itself waits for an event pauses the step; its first allow is cancelled
    (reservation and call id given back: the tool never finished) and the replay is decided
    afresh with the same call id."""
    ran: list[str] = []

    async def search_kb(ctx: Context, query: str) -> str:
        """Search the knowledge base after a human confirms."""
        answer = await ctx.wait_for_event(Confirmed, waiter_id="confirm",
                                          waiter_event=Confirm(question="search?"))
        ran.append(answer.response)
        return f"results for {query}"

    search_kb.__annotations__["ctx"] = Context
    wf = GuardedFunctionAgent(name="support-agent", description="Support",
                              tools=[FunctionTool.from_defaults(async_fn=search_kb)],
                              llm=scripted(ai("Searching.", call("search_kb", "h1", query="q"))),
                              guard=env.guard)
    handler = await run_with_identity(wf, REQUEST, env.refund_token(capabilities=["kb:search"]))
    async for ev in handler.stream_events():
        if isinstance(ev, Confirm):
            assert handler.ctx is not None
            handler.ctx.send_event(Confirmed(response="yes"))
    await handler
    assert ran == ["yes"]
    assert env.guard.stats["allow"] == 2
    outcomes = [(e.call_id, e.result.outcome) for e in env.sink.events
                if e.event_type == "tool_call.completed" and e.result is not None]
    assert outcomes == [("h1", "cancelled"), ("h1", "success")]
