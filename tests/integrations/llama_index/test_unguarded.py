"""Anything that reaches a tool unguarded is refused at run time, loudly: while an execution
token is bound, a FunctionTool run outside a Guard mediation of that very tool raises (a direct
call, a stock agent the user forgot to protect); a guarded agent in a stock AgentWorkflow refuses
to take a step. Without a bound token, LlamaIndex behaves as it always did."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from llama_index.core.agent.workflow import AgentWorkflow, FunctionAgent
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel

from agentic_iam.core.binding import bind
from agentic_iam.core.decision import ToolCall
from agentic_iam.errors import ConfigurationError
from agentic_iam.integrations.llama_index import protect
from tests.conftest import Env
from tests.integrations.llama_index.conftest import (
    FRAMEWORK_WARNINGS,
    REQUEST,
    Backend,
    ai,
    call,
    drive,
    results,
    scripted,
)

pytestmark = FRAMEWORK_WARNINGS

REFUND = {"amount": 50, "currency": "USD", "account": "acct-alice"}


@pytest.fixture(autouse=True)
def _sentinel(env: Env) -> None:
    protect(FunctionAgent(name="x", description="x", llm=scripted()), env.guard)  # installs it


async def test_a_direct_call_under_a_bound_identity_is_refused(
        env: Env, backend: Backend, tools: dict[str, FunctionTool],
        caplog: pytest.LogCaptureFixture) -> None:
    refund = tools["create_refund"]
    with bind(env.refund_token()), caplog.at_level(logging.ERROR):
        with pytest.raises(ConfigurationError, match="outside a Guard mediation"):
            refund.call(**REFUND)
        with pytest.raises(ConfigurationError, match="outside a Guard mediation"):
            await refund.acall(**REFUND)
    assert backend.calls == []
    assert "create_refund` ran outside a Guard mediation" in caplog.text


def test_without_a_bound_identity_tools_behave_as_before(env: Env) -> None:
    ran: list[int] = []

    def count(n: int) -> str:
        """Count."""
        ran.append(n)
        return str(n)

    assert FunctionTool.from_defaults(count).call(n=1).content == "1"
    assert ran == [1]


async def test_a_stock_agent_forgotten_under_a_bound_identity_runs_nothing(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    llm = scripted(ai("Refunding.", call("create_refund", "u1", **REFUND)), ai("Done."))
    agent = FunctionAgent(name="support", description="Support", llm=llm,
                          tools=[tools["create_refund"]])  # never protected
    with bind(env.refund_token()):
        _, events = await drive(agent.run(user_msg=REQUEST))
    assert backend.calls == []
    assert results(events)["u1"].tool_output.is_error
    assert "outside a Guard mediation" in llm.tool_results(1)["u1"]


async def test_a_guarded_agent_in_a_stock_workflow_refuses_to_run(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    agent = protect(FunctionAgent(name="refunds", description="Refunds.", llm=scripted(
        ai("Refund.", call("create_refund", "s1", **REFUND))), tools=[tools["create_refund"]]),
        env.guard, agent_id="support-agent")
    with pytest.raises(ConfigurationError, match="does not guard tool calls"):
        await drive(AgentWorkflow(agents=[agent]).run(user_msg=REQUEST))
    assert backend.calls == []
    assert sum(env.guard.stats.values()) == 0


class Answer(BaseModel):
    """The structured answer."""

    refund_id: str


async def test_the_frameworks_own_tools_are_not_user_tools(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    """LlamaIndex runs structured output (`output_cls`) through a FunctionTool of its own; it
    builds a pydantic model, touches nothing, and is not refused under a bound identity."""
    llm = scripted(ai("Refunding.", call("create_refund", "o1", **REFUND)), ai("Refunded."),
                   ai("", call("Answer", "o2", refund_id="R-1")))
    agent = protect(FunctionAgent(name="support", description="Support", llm=llm,
                                  tools=[tools["create_refund"]], output_cls=Answer),
                    env.guard, agent_id="support-agent")
    with bind(env.refund_token()):
        result = await agent.run(user_msg=REQUEST)
    assert backend.executed("create_refund") == [REFUND]
    assert result.structured_response == {"refund_id": "R-1"}


async def test_a_mediated_call_lends_nothing_to_other_arguments(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    """Inside the mediation of `create_refund(50)`, the same tool with other arguments (say, a
    stock agent started by the tool) is refused: the decision covers one exact call."""
    refund, token = tools["create_refund"], env.refund_token()

    async def run(arguments: dict[str, Any]) -> Any:
        with pytest.raises(ConfigurationError, match="outside a Guard mediation"):
            await refund.acall(amount=5000, currency="USD", account="acct-evil")
        return await refund.acall(**arguments)

    with bind(token):
        done = await env.guard.amediate(token, ToolCall("create_refund", REFUND, "m1"), run)
    assert done.status == "ran"
    assert backend.executed("create_refund") == [REFUND]
