"""Plain tools: `guard_tools` wraps FunctionTool/BaseTool for use outside guarded workflows.
Sync `call` and async `acall` are authorized, run with the checked arguments, screened and
settled; a refusal is an error ToolOutput, never an exception."""

from __future__ import annotations

from typing import Any

import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.tools import FunctionTool, ToolMetadata, ToolOutput
from llama_index.core.tools.types import BaseTool

from agentic_iam.integrations.llama_index import GuardedTool, guard_tools
from tests.conftest import ALICE, Env
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

REFUND = {"amount": 40, "currency": "USD", "account": "acct-alice"}


def test_sync_call(env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    refund, kb, unregistered = guard_tools(
        [tools["create_refund"], tools["search_kb"], tools["delete_account"]], env.guard,
        env.refund_token(capabilities=["refund:create amount<=100", "kb:search"]))
    assert isinstance(refund, GuardedTool) and refund.metadata.name == "create_refund"
    assert refund.metadata.fn_schema is tools["create_refund"].metadata.fn_schema

    ok = refund.call(**REFUND)
    assert not ok.is_error and ok.content == "refund of 40 USD to acct-alice created"
    over = refund.call(amount=400, currency="USD", account="acct-alice")
    assert over.is_error and "refused by the access layer" in over.content
    found = kb.call(query="double charge")
    assert not found.is_error and found.raw_output == found.content  # never the raw object
    denied = unregistered.call(account="acct-alice")
    assert denied.is_error and "not registered" in denied.content
    assert backend.executed("create_refund") == [REFUND]
    assert backend.executed("delete_account") == []
    assert env.guard.stats == {"allow": 2, "deny": 2, "approval_required": 0}


async def test_async_acall(env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    # The delegator's request names the account: after the ticket (untrusted, with a secret)
    # the refund target is traced to the request, so only the approval policies apply. (With
    # a purpose that does not name it, `acct-alice` is an unverified target in a session that
    # saw a secret, and baseline.no-secret-egress denies the refund outright.)
    token = env.broker.delegate(ALICE, "support-agent", "refund T-1042 to acct-alice",
                                ["refund:create amount<=200", "ticket:read"], 900)
    refund, ticket = guard_tools([tools["create_refund"], tools["read_ticket"]], env.guard,
                                 token.token)
    ok = await refund.acall(**REFUND)
    assert not ok.is_error
    read = await ticket.acall(ticket_id="T-1042")
    assert not read.is_error and "charged twice" in read.content
    assert SECRET not in read.content and SECRET not in str(read.raw_output)
    # approval_required is refused (no pause outside a workflow); the request stays pending
    big = await refund.acall(amount=150, currency="USD", account="acct-alice")
    assert big.is_error and "needs a human's approval" in big.content
    assert len(env.guard.approvals.pending()) == 1
    assert len(backend.executed("create_refund")) == 1


def test_no_positional_arguments(env: Env, backend: Backend,
                                 tools: dict[str, FunctionTool]) -> None:
    refund, = guard_tools([tools["create_refund"]], env.guard, env.refund_token())
    out = refund.call(40, "USD", "acct-alice")
    assert out.is_error and "keyword arguments" in out.content
    assert refund.call(REFUND).is_error  # not even one dict: only named arguments are checked
    assert backend.calls == [] and sum(env.guard.stats.values()) == 0


def test_callables_and_errors(env: Env, backend: Backend) -> None:
    def search_kb(query: str) -> str:
        """Search the knowledge base."""
        backend.record("search_kb", query=query)
        raise ValueError(f"index offline ({SECRET})")

    tool, = guard_tools([search_kb], env.guard, env.refund_token(capabilities=["kb:search"]))
    out = tool.call(query="refunds")
    assert out.is_error and "index offline" in out.content and SECRET not in out.content
    completed = next(e for e in env.sink.events if e.event_type == "tool_call.completed")
    assert completed.result is not None and completed.result.outcome == "error"
    with pytest.raises(ValueError, match="already guarded"):
        guard_tools([tool], env.guard, env.refund_token())


class _Echo(BaseTool):
    """A BaseTool that is not a FunctionTool (one positional `input`)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @property
    def metadata(self) -> ToolMetadata:
        return ToolMetadata(name="search_kb", description="Search the knowledge base.")

    def __call__(self, input: Any = None, **kwargs: Any) -> ToolOutput:
        self.backend.record("search_kb", **kwargs)
        return ToolOutput(content=f"results for {kwargs}", tool_name="search_kb",
                          raw_input=kwargs, raw_output=kwargs)


async def test_plain_base_tool(env: Env, backend: Backend) -> None:
    tool, = guard_tools([_Echo(backend)], env.guard,
                        env.refund_token(capabilities=["kb:search"]))
    assert not tool.call(query="a").is_error
    assert not (await tool.acall(query="b")).is_error
    assert backend.executed("search_kb") == [{"query": "a"}, {"query": "b"}]


async def test_in_a_stock_agent(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    wrapped = guard_tools(list(tools.values()), env.guard, env.refund_token())
    llm = scripted(ai("Refund and delete.",
                      call("create_refund", "g1", **REFUND),
                      call("delete_account", "g2", account="acct-alice")))
    agent = FunctionAgent(name="support", description="Support", tools=list(wrapped), llm=llm)
    _, events = await drive(agent.run(user_msg=REQUEST))
    out = results(events)
    assert not out["g1"].tool_output.is_error and out["g2"].tool_output.is_error
    assert backend.executed("create_refund") == [REFUND]
    # no call id reaches a tool: the Guard names the call (protect() the agent to get the
    # model's call ids and the requesting message on the record)
    refunds = [e for e in env.sink.events
               if e.event_type == "tool_call.decided" and e.tool == "create_refund"]
    assert len(refunds) == 1 and refunds[0].decision is not None
    assert refunds[0].decision.outcome == "allow" and refunds[0].framework == "llama_index"
    with pytest.raises(AssertionError):
        decided(env, "g1")
