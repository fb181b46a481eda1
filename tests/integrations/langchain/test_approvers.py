"""LangChain resume path (issue 13 item 9): only an accountable approver lifts an approval.

A ``Command(resume=...)`` answer naming the requesting agent, an unconfigured name or nobody is
refused by the Guard, recorded naming who claimed it, and the tool does not run.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import BaseTool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from agentic_iam.integrations.langchain import IAMContext
from tests.conftest import Env
from tests.integrations.langchain.conftest import (
    Backend,
    ai,
    build_agent,
    call,
    scripted,
    tool_messages,
)

REQUEST = {"messages": [HumanMessage("Please refund Alice's double charge on ticket T-1042")]}
APPROVAL = [
    ai("This refund is above 100, asking for it anyway.",
       call("create_refund", "a-refund", amount=150, currency="USD", account="acct-1")),
    ai("done"),
]


@pytest.mark.parametrize(("answer", "claimed", "code"), [
    ({"approved": True, "approver": "support-agent"}, "support-agent",
     "approval.separation_of_duties"),
    ({"approved": True, "approver": "mallory"}, "mallory", "approval.approver_unknown"),
    (True, "human", "approval.approver_unknown"),
])
def test_an_unaccountable_resume_is_refused_and_recorded(
        env: Env, backend: Backend, tools: dict[str, BaseTool], answer: Any, claimed: str,
        code: str) -> None:
    token = env.refund_token(max_amount=200)
    context = IAMContext(token.token)
    agent = build_agent(env, scripted(*APPROVAL), list(tools.values()),
                        checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": f"refused-{claimed}"}}
    paused = agent.invoke(REQUEST, config, context=context)
    assert paused["__interrupt__"]
    result = agent.invoke(Command(resume=answer), config, context=context)

    assert backend.calls == []
    message = tool_messages(result)["a-refund"]
    assert message.status == "error" and "not run" in message.text
    assert [e for e in env.sink.events if e.event_type == "approval.granted"] == []
    (refused,) = [e for e in env.sink.events if e.event_type == "approval.denied"]
    assert refused.extra is not None
    assert refused.extra["approver"] == claimed and refused.extra["refused"] == "approve"
    assert refused.decision is not None and refused.decision.reasons[0].code == code
    assert refused.agent_id == "support-agent"
    assert env.store.list_approvals("pending")  # still waiting for an accountable answer
