"""GuardMiddleware on ``create_agent``: Alice's refund, sync, async, streaming, parallel calls,
approvals through ``interrupt()``, output screening, and identity that never enters state."""

from __future__ import annotations

import json
from typing import Annotated, Any

import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, InjectedToolCallId, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from agentic_iam.core.approvals import arguments_digest
from agentic_iam.integrations.langchain import GuardMiddleware, IAMContext
from tests.conftest import Env
from tests.integrations.langchain.conftest import (
    SECRET,
    Backend,
    ai,
    build_agent,
    call,
    decided,
    make_tools,
    scripted,
    tool_messages,
)

REQUEST = {"messages": [HumanMessage("Please refund Alice's double charge on ticket T-1042")]}


def alice_script() -> list[Any]:
    """Refund 50 (allowed), delete the account (unregistered), refund 500 (over the grant)."""
    return [
        ai("Refunding 50 USD to acct-1 for T-1042.",
           call("create_refund", "c-refund", amount=50, currency="USD", account="acct-1"),
           reasoning="The customer was charged twice; a 50 USD refund fixes it."),
        ai("Closing the account as well.", call("delete_account", "c-delete", account="acct-1")),
        ai("Adding goodwill: another 500.",
           call("create_refund", "c-big", amount=500, currency="USD", account="acct-1")),
        ai("Refunded 50 USD; the other two actions were refused."),
    ]


def check_alice(env: Env, backend: Backend, result: dict[str, Any]) -> None:
    assert backend.executed("create_refund") == [
        {"amount": 50, "currency": "USD", "account": "acct-1"}]
    assert backend.executed("delete_account") == []
    messages = tool_messages(result)
    assert messages["c-refund"].status == "success"
    for refused in ("c-delete", "c-big"):
        assert messages[refused].status == "error"
        assert "refused" in messages[refused].text
        assert messages[refused].name in ("delete_account", "create_refund")
    assert decided(env, "c-refund").decision.outcome == "allow"
    delete = decided(env, "c-delete")
    assert delete.decision.outcome == "deny"
    assert delete.decision.reasons[0].code == "registry.tool_unregistered"
    big = decided(env, "c-big")
    assert big.decision.outcome == "deny"
    assert big.decision.reasons[0].code.startswith("capability")
    # The audit holds the model message (and its reasoning) that asked for each call.
    refund = decided(env, "c-refund").reasoning
    assert "Refunding 50 USD to acct-1" in refund.message
    assert "charged twice" in refund.message
    assert refund.model == "scripted-model"
    assert "Closing the account" in delete.reasoning.message
    assert "goodwill" in big.reasoning.message
    assert all(e.framework == "langchain" for e in env.sink.events
               if e.event_type == "tool_call.decided")


def test_alice_refund_sync(env: Env, backend: Backend, tools: dict[str, BaseTool]) -> None:
    token = env.refund_token(max_amount=100)
    model = scripted(*alice_script())
    agent = build_agent(env, model, list(tools.values()))
    result = agent.invoke(REQUEST, context=IAMContext(token.token))
    check_alice(env, backend, result)
    # The model read the denials as tool results and finished the run.
    assert result["messages"][-1].text.startswith("Refunded 50 USD")
    last_seen = [m for m in model.seen[-1] if isinstance(m, ToolMessage)]
    assert [m.status for m in last_seen] == ["success", "error", "error"]


async def test_alice_refund_async(env: Env, backend: Backend,
                                  tools: dict[str, BaseTool]) -> None:
    token = env.refund_token(max_amount=100)
    agent = build_agent(env, scripted(*alice_script()), list(tools.values()))
    result = await agent.ainvoke(REQUEST, context=IAMContext(token.token))
    check_alice(env, backend, result)


def test_alice_refund_stream(env: Env, backend: Backend, tools: dict[str, BaseTool]) -> None:
    token = env.refund_token(max_amount=100)
    agent = build_agent(env, scripted(*alice_script()), list(tools.values()))
    seen: list[ToolMessage] = []
    for chunk in agent.stream(REQUEST, context=IAMContext(token.token), stream_mode="updates"):
        for update in chunk.values():
            seen.extend(m for m in (update or {}).get("messages", [])
                        if isinstance(m, ToolMessage))
    check_alice(env, backend, {"messages": seen})


async def test_alice_refund_astream(env: Env, backend: Backend,
                                    tools: dict[str, BaseTool]) -> None:
    token = env.refund_token(max_amount=100)
    agent = build_agent(env, scripted(*alice_script()), list(tools.values()))
    final: dict[str, Any] = {}
    async for state in agent.astream(REQUEST, context=IAMContext(token.token),
                                     stream_mode="values"):
        final = state
    check_alice(env, backend, final)


# --- parallel tool calls ---------------------------------------------------------------------

PARALLEL = [
    ai("Refunding, checking the KB and closing the account at once.",
       call("create_refund", "p-refund", amount=30, currency="USD", account="acct-1"),
       call("search_kb", "p-kb", query="double charge"),
       call("delete_account", "p-delete", account="acct-1")),
    ai("done"),
]


def check_parallel(env: Env, backend: Backend, result: dict[str, Any]) -> None:
    messages = tool_messages(result)
    assert {k: m.status for k, m in messages.items()} == {
        "p-refund": "success", "p-kb": "success", "p-delete": "error"}
    assert sorted(name for name, _ in backend.calls) == ["create_refund", "search_kb"]
    for call_id in ("p-refund", "p-kb", "p-delete"):
        assert "at once" in decided(env, call_id).reasoning.message


def parallel_token(env: Env) -> Any:
    return env.refund_token(capabilities=["refund:create amount<=100", "ticket:read",
                                          "kb:search"])


def test_parallel_calls_sync(env: Env, backend: Backend, tools: dict[str, BaseTool]) -> None:
    agent = build_agent(env, scripted(*PARALLEL), list(tools.values()))
    result = agent.invoke(REQUEST, context=IAMContext(parallel_token(env).token))
    check_parallel(env, backend, result)


async def test_parallel_calls_async(env: Env, backend: Backend,
                                    tools: dict[str, BaseTool]) -> None:
    agent = build_agent(env, scripted(*PARALLEL), list(tools.values()))
    result = await agent.ainvoke(REQUEST, context=IAMContext(parallel_token(env).token))
    check_parallel(env, backend, result)


def test_parallel_calls_stream(env: Env, backend: Backend, tools: dict[str, BaseTool]) -> None:
    agent = build_agent(env, scripted(*PARALLEL), list(tools.values()))
    final: dict[str, Any] = {}
    for state in agent.stream(REQUEST, context=IAMContext(parallel_token(env).token),
                              stream_mode="values"):
        final = state
    check_parallel(env, backend, final)


# --- approvals -------------------------------------------------------------------------------

APPROVAL = [
    ai("This refund is above 100, asking for it anyway.",
       call("create_refund", "a-refund", amount=150, currency="USD", account="acct-1")),
    ai("done"),
]


def approval_interrupt(result: dict[str, Any], token: str) -> dict[str, Any]:
    interrupts = result["__interrupt__"]
    assert len(interrupts) == 1
    payload = interrupts[0].value
    assert payload["type"] == "agentic_iam.approval"
    assert payload["tool"] == "create_refund"
    assert payload["call_id"] == "a-refund"
    assert payload["arguments"] == {"amount": 150, "currency": "USD", "account": "acct-1"}
    assert payload["approval_id"].startswith("apr_")
    assert token not in json.dumps(payload)
    return dict(payload)


@pytest.mark.parametrize("mode", ["invoke", "stream"])
def test_approval_interrupts_and_resumes(env: Env, backend: Backend,
                                         tools: dict[str, BaseTool], mode: str) -> None:
    token = env.refund_token(max_amount=200)
    context = IAMContext(token.token)
    agent = build_agent(env, scripted(*APPROVAL), list(tools.values()),
                        checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": f"approval-{mode}"}}

    def run(payload: Any) -> dict[str, Any]:
        if mode == "invoke":
            return dict(agent.invoke(payload, config, context=context))
        out: dict[str, Any] = {}
        for chunk in agent.stream(payload, config, context=context, stream_mode="updates"):
            if "__interrupt__" in chunk:
                out["__interrupt__"] = chunk["__interrupt__"]
        if "__interrupt__" not in out:
            out.update(agent.get_state(config).values)
        return out

    paused = run(REQUEST)
    approval_interrupt(paused, token.token)
    assert backend.calls == []  # paused before the tool ran
    assert env.guard.stats == {"allow": 0, "deny": 0, "approval_required": 1}

    resumed = run(Command(resume={"approved": True, "approver": "bob"}))
    assert backend.executed("create_refund") == [
        {"amount": 150, "currency": "USD", "account": "acct-1"}]
    assert tool_messages(resumed)["a-refund"].status == "success"
    granted = [e for e in env.sink.events if e.event_type == "approval.granted"]
    assert len(granted) == 1 and granted[0].extra is not None
    assert granted[0].extra["approver"] == "bob"
    allow = decided(env, "a-refund")
    assert allow.decision.outcome == "allow"
    assert "asking for it anyway" in allow.reasoning.message


async def test_approval_async(env: Env, backend: Backend, tools: dict[str, BaseTool]) -> None:
    token = env.refund_token(max_amount=200)
    context = IAMContext(token.token)
    agent = build_agent(env, scripted(*APPROVAL), list(tools.values()),
                        checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "approval-async"}}
    paused = await agent.ainvoke(REQUEST, config, context=context)
    approval_interrupt(paused, token.token)
    assert backend.calls == []
    resumed = await agent.ainvoke(Command(resume={"approved": True, "approver": "bob"}),
                                  config, context=context)
    assert len(backend.executed("create_refund")) == 1
    assert tool_messages(resumed)["a-refund"].status == "success"


def test_approval_declined(env: Env, backend: Backend, tools: dict[str, BaseTool]) -> None:
    token = env.refund_token(max_amount=200)
    context = IAMContext(token.token)
    agent = build_agent(env, scripted(*APPROVAL), list(tools.values()),
                        checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "declined"}}
    approval_interrupt(agent.invoke(REQUEST, config, context=context), token.token)
    result = agent.invoke(Command(resume={"approved": False, "approver": "bob"}), config,
                          context=context)
    message = tool_messages(result)["a-refund"]
    assert message.status == "error" and "declined" in message.text
    assert backend.calls == []
    assert [e.event_type for e in env.sink.events].count("approval.denied") == 1


def test_approval_answer_must_be_understood(env: Env, backend: Backend,
                                            tools: dict[str, BaseTool]) -> None:
    token = env.refund_token(max_amount=200)
    context = IAMContext(token.token)
    agent = build_agent(env, scripted(*APPROVAL), list(tools.values()),
                        checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "garbled"}}
    agent.invoke(REQUEST, config, context=context)
    result = agent.invoke(Command(resume={"approved": "yes"}), config, context=context)
    assert tool_messages(result)["a-refund"].status == "error"
    assert backend.calls == []


def test_resume_without_context_is_denied(env: Env, backend: Backend,
                                          tools: dict[str, BaseTool]) -> None:
    """The context is not checkpointed: a resume without it has no identity."""
    token = env.refund_token(max_amount=200)
    agent = build_agent(env, scripted(*APPROVAL), list(tools.values()),
                        checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "no-context"}}
    agent.invoke(REQUEST, config, context=IAMContext(token.token))
    result = agent.invoke(Command(resume={"approved": True, "approver": "bob"}), config)
    assert tool_messages(result)["a-refund"].status == "error"
    assert backend.calls == []


def test_refuse_mode_returns_the_approval_message(env: Env, backend: Backend,
                                                  tools: dict[str, BaseTool]) -> None:
    from langchain.agents import create_agent

    token = env.refund_token(max_amount=200)
    agent = create_agent(scripted(*APPROVAL), tools=list(tools.values()),
                         middleware=[GuardMiddleware(env.guard, on_approval="refuse")],
                         context_schema=IAMContext)
    result = agent.invoke(REQUEST, context=IAMContext(token.token))
    message = tool_messages(result)["a-refund"]
    assert message.status == "error" and "approval" in message.text
    assert backend.calls == []
    assert env.guard.approvals.pending()  # left for `aiam approvals` to answer


# --- identity --------------------------------------------------------------------------------

ONE_REFUND = [ai("Refunding 10.", call("create_refund", "r1", amount=10, currency="USD",
                                       account="acct-1")), ai("done")]


@pytest.mark.parametrize("context", [None, IAMContext(""), IAMContext("not.a.token"),
                                     {"user": "alice"}, {"aiam_token": 42}])
def test_run_without_a_valid_token_cannot_call_tools(env: Env, backend: Backend,
                                                     tools: dict[str, BaseTool],
                                                     context: Any) -> None:
    from langchain.agents import create_agent

    # A dict context cannot go through `context_schema=IAMContext` (LangGraph coerces it).
    agent = create_agent(scripted(*ONE_REFUND), tools=list(tools.values()),
                         middleware=[GuardMiddleware(env.guard)])
    kwargs = {} if context is None else {"context": context}
    result = agent.invoke(REQUEST, **kwargs)
    message = tool_messages(result)["r1"]
    assert message.status == "error" and "refused" in message.text
    assert backend.calls == []
    assert decided(env, "r1").decision.outcome == "deny"


def test_any_context_with_aiam_token_works(env: Env, backend: Backend,
                                           tools: dict[str, BaseTool]) -> None:
    from langchain.agents import create_agent

    token = env.refund_token()
    agent = create_agent(scripted(*ONE_REFUND), tools=list(tools.values()),
                         middleware=[GuardMiddleware(env.guard)])
    result = agent.invoke(REQUEST, context={"aiam_token": token})  # an ExecutionToken
    assert tool_messages(result)["r1"].status == "success"
    assert len(backend.calls) == 1


def test_token_never_enters_state_or_checkpoints(env: Env, backend: Backend,
                                                 tools: dict[str, BaseTool]) -> None:
    token = env.refund_token(max_amount=200)
    saver = InMemorySaver()
    agent = build_agent(env, scripted(*APPROVAL), list(tools.values()), checkpointer=saver)
    config = {"configurable": {"thread_id": "secret"}}
    context = IAMContext(token.token)
    agent.invoke(REQUEST, config, context=context)
    agent.invoke(Command(resume={"approved": True, "approver": "bob"}), config, context=context)
    assert token.token not in repr(context)
    assert token.token not in repr(agent.get_state(config))
    for snapshot in agent.get_state_history(config):
        assert token.token not in repr(snapshot)
    dumped = repr(saver.storage) + repr(saver.writes)
    assert token.token not in dumped
    assert all(token.token not in m.text for m in agent.get_state(config).values["messages"])


# --- output screening ------------------------------------------------------------------------


def test_output_is_screened_before_the_model_sees_it(env: Env, backend: Backend,
                                                     tools: dict[str, BaseTool]) -> None:
    token = env.refund_token()
    model = scripted(ai("Reading the ticket.", call("read_ticket", "t1", ticket_id="T-1042")),
                     ai("done"))
    agent = build_agent(env, model, list(tools.values()))
    result = agent.invoke(REQUEST, context=IAMContext(token.token))
    message = tool_messages(result)["t1"]
    assert message.status == "success"
    assert SECRET not in message.text and "REDACTED" in message.text
    shown = [m for m in model.seen[-1] if isinstance(m, ToolMessage)]
    assert shown and all(SECRET not in m.text for m in shown)
    completed = [e for e in env.sink.events if e.event_type == "tool_call.completed"]
    assert completed and completed[-1].call_id == "t1"


def test_command_results_are_screened(env: Env, backend: Backend) -> None:
    @tool
    def read_ticket(ticket_id: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> Any:
        """Read a ticket (returns a Command)."""
        backend.record("read_ticket", ticket_id=ticket_id)
        return Command(update={"messages": [
            ToolMessage(f"ticket says key={SECRET}", tool_call_id=tool_call_id),
            HumanMessage(f"also {SECRET}"),
        ]})

    token = env.refund_token()
    model = scripted(ai("Reading.", call("read_ticket", "t-cmd", ticket_id="T-1")), ai("done"))
    agent = build_agent(env, model, [read_ticket])
    result = agent.invoke(REQUEST, context=IAMContext(token.token))
    assert all(SECRET not in m.text for m in result["messages"])
    assert tool_messages(result)["t-cmd"].status == "success"


def test_tool_runs_with_the_checked_arguments(env: Env, backend: Backend,
                                              tools: dict[str, BaseTool]) -> None:
    """An extra model-supplied key the Guard saw is what the tool gets; nothing else."""
    token = env.refund_token()
    model = scripted(ai("Refund.", call("create_refund", "ck", amount=20, currency="USD",
                                        account="acct-9")), ai("done"))
    agent = build_agent(env, model, list(tools.values()))
    agent.invoke(REQUEST, context=IAMContext(token.token))
    checked = {"amount": 20, "currency": "USD", "account": "acct-9"}
    assert decided(env, "ck").arguments_digest == arguments_digest(checked)
    assert backend.executed("create_refund") == [checked]


def test_tool_errors_settle_the_call_and_surface(env: Env, backend: Backend) -> None:
    from langchain_core.tools import ToolException

    @tool
    def create_refund(amount: int, currency: str, account: str) -> str:
        """Refund."""
        backend.record("create_refund", amount=amount, currency=currency, account=account)
        raise ToolException("payment provider down")

    create_refund.handle_tool_error = True

    token = env.refund_token()
    model = scripted(ai("Refund.", call("create_refund", "e1", amount=20, currency="USD",
                                        account="acct-1")), ai("done"))
    result = build_agent(env, model, [create_refund]).invoke(
        REQUEST, context=IAMContext(token.token))
    message = tool_messages(result)["e1"]
    assert message.status == "error" and "provider down" in message.text
    completed = [e for e in env.sink.events if e.event_type == "tool_call.completed"]
    assert completed[-1].result is not None and completed[-1].result.outcome == "error"


def test_the_approval_the_human_saw_is_the_one_resolved(env: Env, backend: Backend,
                                                        tools: dict[str, BaseTool]) -> None:
    token = env.refund_token(max_amount=200)
    context = IAMContext(token.token)
    agent = build_agent(env, scripted(*APPROVAL), list(tools.values()),
                        checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "same-approval"}}
    shown = approval_interrupt(agent.invoke(REQUEST, config, context=context), token.token)
    agent.invoke(Command(resume={"approved": True, "approver": "bob"}), config, context=context)
    granted = [e.extra["approval_id"] for e in env.sink.events
               if e.event_type == "approval.granted" and e.extra]
    assert granted == [shown["approval_id"]]
    assert env.guard.approvals.pending() == []


def test_tools_the_agent_was_not_given_never_run(env: Env) -> None:
    """A hallucinated tool is denied by the registry; a registered tool that is not in this
    agent's tool list is decided (and recorded) but there is nothing to run. (Own backend: this
    is the one case of an allow without an execution.)"""
    backend = Backend()
    tools = make_tools(backend)
    token = env.refund_token(capabilities=["refund:create amount<=100", "kb:search"])
    model = scripted(ai("Trying tools I do not have.", call("drop_database", "h1", database="prod"),
                        call("search_kb", "h2", query="x")), ai("done"))
    agent = build_agent(env, model, [tools["create_refund"]])
    result = agent.invoke(REQUEST, context=IAMContext(token.token))
    messages = tool_messages(result)
    assert messages["h1"].status == "error" and messages["h2"].status == "error"
    assert decided(env, "h1").decision.reasons[0].code == "registry.tool_unregistered"
    assert "not a valid tool" in messages["h2"].text
    completed = [e for e in env.sink.events if e.event_type == "tool_call.completed"]
    # Issue 13 item 7: nothing ran, so the call is cancelled (not charged), never an "error".
    assert [(e.call_id, e.result.outcome if e.result else None) for e in completed] == [
        ("h2", "cancelled")]
    assert completed[0].result is not None and completed[0].result.budget_settled == {}
    assert backend.calls == []
