"""Alice's refund in a two-agent AgentWorkflow: triage (support-agent) hands off to refunds
(refund-bot). The handoff sub-delegates a narrower identity; the receiving agent's calls are
decided under it; a handoff the registry does not allow is refused and the sender stays in
charge; a child created narrower than its parent cannot do what the parent could."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.agent.workflow import FunctionAgent, ReActAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import Context

from agentic_iam.integrations.llama_index import (
    ApprovalRequestEvent,
    GuardedAgentWorkflow,
    bind_identity,
    run_with_identity,
)
from tests.conftest import Env
from tests.integrations.llama_index.conftest import (
    FRAMEWORK_WARNINGS,
    REQUEST,
    SECRET,
    Backend,
    Scripted,
    ai,
    call,
    chain_ids,
    decided,
    drive,
    results,
    scripted,
)

pytestmark = FRAMEWORK_WARNINGS

AGENT_IDS = {"triage": "support-agent", "refunds": "refund-bot", "ledger": "reconcile-agent"}
HANDOFF_TEXT = "This is a refund; handing it to the refunds agent."
REFUND_TEXT = "Refunding the duplicate charge; the full amount and a deletion too."


def root_token(env: Env, max_amount: int = 100) -> Any:
    """Alice -> support-agent: refunds up to ``max_amount``, tickets, the knowledge base."""
    return env.refund_token(capabilities=[f"refund:create amount<={max_amount}", "ticket:read",
                                          "kb:search"])


def triage_script() -> list[ChatMessage]:
    return [
        ai("Checking the refund policy first.", call("search_kb", "t_kb", query="double charge")),
        ai(HANDOFF_TEXT, call("handoff", "t_handoff", to_agent="refunds",
                              reason="needs a refund")),
    ]


def refunds_script(amount: int = 50) -> list[ChatMessage]:
    return [
        ai(REFUND_TEXT,
           call("create_refund", "r_ok", amount=amount, currency="USD", account="acct-alice"),
           call("create_refund", "r_over", amount=500, currency="USD", account="acct-alice"),
           call("delete_account", "r_unreg", account="acct-alice")),
        ai("Reading the ticket for the record.", call("read_ticket", "r_read",
                                                      ticket_id="T-1042")),
        ai("Refunded the duplicate charge."),
    ]


def build(env: Env, tools: dict[str, FunctionTool], triage_llm: Scripted,
          refunds_llm: Scripted, *, extra: Sequence[Any] = (), refunds_cls: Any = FunctionAgent,
          refunds_handoff: list[str] | None = None, **kwargs: Any) -> GuardedAgentWorkflow:
    triage = FunctionAgent(name="triage", description="Front-line support: reads tickets.",
                           tools=[tools["search_kb"], tools["read_ticket"]], llm=triage_llm,
                           can_handoff_to=["refunds", *[a.name for a in extra]])
    refunds = refunds_cls(name="refunds", description="Executes refunds.",
                          tools=[tools["create_refund"], tools["read_ticket"],
                                 tools["delete_account"]],
                          llm=refunds_llm, can_handoff_to=refunds_handoff or [])
    return GuardedAgentWorkflow(agents=[triage, refunds, *extra], root_agent="triage",
                                guard=env.guard, broker=env.broker, agent_ids=AGENT_IDS,
                                **kwargs)


async def test_alice_refund_with_handoff(env: Env, backend: Backend,
                                         tools: dict[str, FunctionTool]) -> None:
    triage_llm, refunds_llm = scripted(*triage_script()), scripted(*refunds_script())
    wf = build(env, tools, triage_llm, refunds_llm)
    root = root_token(env)
    ctx = Context(wf)
    await bind_identity(ctx, root)
    handler = wf.run(user_msg=REQUEST, ctx=ctx)
    events: list[Any] = []
    child = None
    async for ev in handler.stream_events():
        events.append(ev)
        if isinstance(ev, ToolCallResult) and ev.tool_id == "r_ok":
            child = await wf.current_identity(ctx, "refunds")  # while the run goes on
    result = await handler

    assert result.current_agent_name == "refunds"
    assert backend.executed("search_kb") == [{"query": "double charge"}]
    assert backend.executed("create_refund") == [
        {"amount": 50, "currency": "USD", "account": "acct-alice"}]
    assert backend.executed("delete_account") == []
    assert backend.executed("read_ticket") == [{"ticket_id": "T-1042"}]

    out = results(events)
    assert not out["t_handoff"].tool_output.is_error
    assert [out[c].tool_output.is_error for c in ("r_ok", "r_over", "r_unreg")] == [
        False, True, True]
    shown = refunds_llm.tool_results(1)
    assert "refused by the access layer" in shown["r_over"]
    assert "not registered for agent `refund-bot`" in shown["r_unreg"]
    assert SECRET not in refunds_llm.tool_results(2)["r_read"]

    # the handoff narrowed the identity: child capabilities within the parent's, child agent
    # refund-bot, both hops in the act chain
    parent = root.identity
    assert child is not None and child.agent_id == "refund-bot"
    assert child.capabilities.widening(parent.capabilities) is None
    assert {c.action for c in child.capabilities} == {"refund:create", "ticket:read"}
    assert [a.agent_id for a in child.actors] == ["refund-bot", "support-agent"]
    assert child.ancestors == (parent.jti,)
    minted = [e for e in env.sink.events if e.event_type == "delegation.subdelegated"]
    assert len(minted) == 1 and minted[0].agent_id == "refund-bot"
    assert minted[0].parent_execution_id == parent.execution_id
    # the run finished: the handoff's identity and the root's ended (issue 13 item 12)
    assert await wf.current_identity(ctx, "refunds") is None
    assert await wf.current_identity(ctx, "triage") is None
    ended = [e.execution_id for e in env.sink.events if e.event_type == "execution.ended"]
    assert sorted(ended) == sorted([parent.execution_id, child.execution_id])

    # every call on the record, each under the identity of the agent that made it, with the
    # assistant message that asked for it
    kb = decided(env, "t_kb")
    assert kb.agent_id == "support-agent" and kb.execution_id == parent.execution_id
    assert kb.reasoning.message == "Checking the refund policy first."
    for call_id in ("r_ok", "r_over", "r_unreg"):
        event = decided(env, call_id)
        assert event.agent_id == "refund-bot" and event.execution_id == child.execution_id
        assert chain_ids(event) == ["alice@example.com", "support-agent", "refund-bot"]
        assert event.reasoning.message == REFUND_TEXT
    assert decided(env, "r_read").reasoning.message == "Reading the ticket for the record."
    assert env.guard.stats == {"allow": 3, "deny": 2, "approval_required": 0}
    # the handoff is a delegation, not a tool of the user's: no Guard decision of its own
    assert not [e for e in env.sink.events if e.call_id == "t_handoff"]


async def test_child_cannot_exceed_its_grant(env: Env, backend: Backend,
                                             tools: dict[str, FunctionTool]) -> None:
    refunds_llm = scripted(ai("Refunding 80.", call("create_refund", "r80", amount=80,
                                                    currency="USD", account="acct-alice")),
                           ai("Refunding 20.", call("create_refund", "r20", amount=20,
                                                    currency="USD", account="acct-alice")))
    wf = build(env, tools, scripted(*triage_script()), refunds_llm,
               handoff_capabilities={"refunds": ["refund:create amount<=20"]})
    root = root_token(env, 100)
    _, events = await drive(await run_with_identity(wf, REQUEST, root))
    # the parent's grant admits 80; the child's does not
    assert root.identity.capabilities.check("refund:create", {
        "amount": 80, "currency": "USD", "account": "acct-alice"}).ok
    assert results(events)["r80"].tool_output.is_error
    assert decided(env, "r80").decision.reasons[0].code.startswith("capability")
    assert backend.executed("create_refund") == [
        {"amount": 20, "currency": "USD", "account": "acct-alice"}]


async def test_handoff_the_registry_does_not_allow_is_refused(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    ledger = FunctionAgent(name="ledger", description="Posts ledger adjustments.", tools=[],
                           llm=scripted(ai("ledger here")))
    triage_llm = scripted(
        ai("Handing to the ledger.", call("handoff", "h1", to_agent="ledger",
                                          reason="adjust the ledger")),
        ai("I could not hand this to the ledger agent."),
    )
    wf = build(env, tools, triage_llm, scripted(), extra=[ledger])
    result, events = await drive(await run_with_identity(wf, REQUEST, root_token(env)))
    out = results(events)["h1"].tool_output
    assert out.is_error
    assert "handoff to `ledger` was refused" in out.content
    # the broker refuses it (nothing of the grant applies to the ledger agent, which the
    # registry's may_delegate_to does not name either)
    assert "`reconcile-agent`" in out.content
    assert result.current_agent_name == "triage"  # the sender stays in charge
    assert str(result.response.content) == "I could not hand this to the ledger agent."
    assert not [e for e in env.sink.events if e.event_type == "delegation.subdelegated"]


async def test_handoff_without_identity_is_refused(env: Env, backend: Backend,
                                                   tools: dict[str, FunctionTool]) -> None:
    triage_llm = scripted(ai(HANDOFF_TEXT, call("handoff", "h1", to_agent="refunds",
                                                reason="refund")), ai("Could not."))
    wf = build(env, tools, triage_llm, scripted(*refunds_script()))
    result, events = await drive(wf.run(user_msg=REQUEST))
    assert results(events)["h1"].tool_output.is_error
    assert result.current_agent_name == "triage"
    assert backend.calls == []


async def test_hand_back_restores_the_ancestor_identity(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    refunds_llm = scripted(ai("Back to triage.", call("handoff", "h_back", to_agent="triage",
                                                      reason="done with refunds")))
    triage_llm = scripted(*triage_script(),
                          ai("Searching again.", call("search_kb", "t_kb2", query="follow-up")),
                          ai("All done."))
    wf = build(env, tools, triage_llm, refunds_llm, refunds_handoff=["triage"])
    root = root_token(env)
    result, events = await drive(await run_with_identity(wf, REQUEST, root))
    assert not results(events)["h_back"].tool_output.is_error
    assert result.current_agent_name == "triage"
    assert decided(env, "t_kb2").execution_id == root.identity.execution_id
    assert len([e for e in env.sink.events if e.event_type == "delegation.subdelegated"]) == 1


async def test_approval_in_the_receiving_agent(env: Env, backend: Backend,
                                               tools: dict[str, FunctionTool]) -> None:
    refunds_llm = scripted(ai("150 needs a human.", call("create_refund", "r150", amount=150,
                                                         currency="USD",
                                                         account="acct-alice")),
                           ai("Refunded 150 after approval."))
    wf = build(env, tools, scripted(*triage_script()), refunds_llm)
    handler = await run_with_identity(wf, REQUEST, root_token(env, 200))
    _, events = await drive(handler, approve=True)
    request = next(e for e in events if isinstance(e, ApprovalRequestEvent))
    assert request.agent == "refunds" and request.agent_id == "refund-bot"
    assert backend.executed("create_refund") == [
        {"amount": 150, "currency": "USD", "account": "acct-alice"}]
    event = decided(env, "r150")
    assert event.decision.outcome == "allow" and event.agent_id == "refund-bot"


async def test_react_agent_receives_a_handoff(env: Env, backend: Backend,
                                              tools: dict[str, FunctionTool]) -> None:
    refunds_llm = scripted(
        ChatMessage(role="assistant", content=(
            "Thought: Refund the duplicate.\nAction: create_refund\nAction Input: "
            '{"amount": 30, "currency": "USD", "account": "acct-alice"}')),
        ChatMessage(role="assistant", content="Thought: Done.\nAnswer: Refunded 30."),
    )
    wf = build(env, tools, scripted(*triage_script()), refunds_llm, refunds_cls=ReActAgent)
    _, events = await drive(await run_with_identity(wf, REQUEST, root_token(env)))
    refund = next(e for e in events if isinstance(e, ToolCallResult)
                  and e.tool_name == "create_refund")
    event = decided(env, refund.tool_id)
    assert event.agent_id == "refund-bot"
    assert event.reasoning.message.startswith("Thought: Refund the duplicate.")
    assert backend.executed("create_refund") == [
        {"amount": 30, "currency": "USD", "account": "acct-alice"}]
