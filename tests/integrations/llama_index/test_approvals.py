"""Approvals resume exactly once. One model turn asks for three calls in parallel: an allowed
refund, one that needs a human, and a denied one. The workflow pauses for the human; after the
answer only the approved call runs (the allowed sibling ran once, before, and is not run again);
a rejected call never runs; a call refused while nobody listens stays pending and, approved out
of band, is allowed once. Tools that raise are charged and recorded as errors."""

from __future__ import annotations

from typing import Any

import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.tools import FunctionTool

from agentic_iam.integrations.llama_index import (
    ApprovalRequestEvent,
    protect,
    run_with_identity,
)
from tests.conftest import Env
from tests.integrations.llama_index.conftest import (
    FRAMEWORK_WARNINGS,
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

SMALL = {"amount": 50, "currency": "USD", "account": "acct-alice"}
BIG = {"amount": 150, "currency": "USD", "account": "acct-alice"}


def turn() -> list[Any]:
    return [ai("Three refunds at once.", call("create_refund", "a_small", **SMALL),
               call("create_refund", "a_big", **BIG),
               call("create_refund", "a_over", amount=900, currency="USD",
                    account="acct-alice")),
            ai("Done.")]


def agent(env: Env, tools: dict[str, FunctionTool], llm: Any, **options: Any) -> Any:
    return protect(FunctionAgent(name="support", description="Support", llm=llm,
                                 tools=[tools["create_refund"]]),
                   env.guard, agent_id="support-agent", **options)


def completed(env: Env) -> list[str]:
    return sorted(e.call_id or "" for e in env.sink.events
                  if e.event_type == "tool_call.completed")


@pytest.mark.parametrize("approve", [True, False], ids=["approved", "rejected"])
async def test_siblings_keep_their_outcome_and_the_approved_call_runs_once(
        env: Env, backend: Backend, tools: dict[str, FunctionTool], approve: bool) -> None:
    llm = scripted(*turn())
    handler = await run_with_identity(agent(env, tools, llm), REQUEST,
                                      env.refund_token(max_amount=200))
    executed_at_pause: list[list[dict[str, Any]]] = []
    async for ev in handler.stream_events():
        if isinstance(ev, ApprovalRequestEvent):
            executed_at_pause.append(backend.executed("create_refund"))
            assert handler.ctx is not None
            handler.ctx.send_event(ev.answer(approved=approve, approver="bob"))
    await handler

    # paused once, with the big refund not run; the allowed sibling runs once in all (the
    # parallel steps finish in any order: before or after the pause)
    assert len(executed_at_pause) == 1 and BIG not in executed_at_pause[0]
    assert backend.executed("create_refund") == ([SMALL, BIG] if approve else [SMALL])
    assert completed(env) == (["a_big", "a_small"] if approve else ["a_small"])
    shown = llm.tool_results(1)
    assert shown["a_small"] == "refund of 50 USD to acct-alice created"
    assert "refused by the access layer" in shown["a_over"]
    if approve:
        assert shown["a_big"] == "refund of 150 USD to acct-alice created"
    else:
        assert "A human declined" in shown["a_big"]
        assert decided(env, "a_big").decision.outcome == "approval_required"


async def test_refused_while_nobody_listens_then_approved_out_of_band(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    token = env.refund_token(max_amount=200)
    llm = scripted(ai("150.", call("create_refund", "r1", **BIG)), ai("Waiting for a human."),
                   ai("Again.", call("create_refund", "r2", **BIG)), ai("Done."))
    support = agent(env, tools, llm, on_approval="refuse", end_on_finish=False)
    _, events = await drive(await run_with_identity(support, REQUEST, token,
                                                    end_on_finish=False))
    assert not any(isinstance(e, ApprovalRequestEvent) for e in events)
    assert backend.calls == []
    pending, = env.guard.approvals.pending()
    env.guard.resolve_approval(str(pending["request_id"]), approved=True, approver="bob")
    await drive(await run_with_identity(support, "the same refund, approved", token))
    assert backend.executed("create_refund") == [BIG]  # once: the approval is consumed
    assert decided(env, "r2").decision.outcome == "allow"


async def test_a_tool_that_raises_is_charged_and_recorded_as_an_error(
        env: Env, backend: Backend) -> None:
    def create_refund(amount: int, currency: str, account: str) -> str:
        """Refund an amount to an account."""
        backend.record("create_refund", amount=amount, currency=currency, account=account)
        raise TimeoutError(f"payment gateway timed out (key={SECRET})")

    llm = scripted(ai("Refund.", call("create_refund", "e1", **SMALL)), ai("It failed."))
    support = protect(FunctionAgent(name="support", description="Support", llm=llm,
                                    tools=[FunctionTool.from_defaults(create_refund)]),
                      env.guard, agent_id="support-agent")
    token = env.refund_token()
    _, events = await drive(await run_with_identity(support, REQUEST, token))
    out = results(events)["e1"].tool_output
    assert out.is_error and "timed out" in out.content and SECRET not in out.content
    assert SECRET not in llm.tool_results(1)["e1"]
    done = next(e for e in env.sink.events if e.event_type == "tool_call.completed")
    assert done.result is not None and done.result.outcome == "error"
    # charged: the side effect may have happened before the failure
    assert done.result.budget_settled["tool_calls"] == 1
    assert done.result.budget_settled["cost"] == 50
