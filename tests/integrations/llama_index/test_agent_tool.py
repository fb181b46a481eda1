"""Agent-as-tool: a plain tool runs a protected sub-agent. The sub-agent finds the parent's token
(bound for the tool call), never acts under it, and mints its own narrower identity with the
broker, so it cannot exceed its grant though the parent could; without a broker it refuses every
call; a stock sub-agent inside a guarded tool runs nothing."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.tools import FunctionTool

from agentic_iam import (
    AgentRegistry,
    CedarEngine,
    DelegationBroker,
    Guard,
    KeySet,
    MemorySink,
    MemoryStore,
    Recorder,
)
from agentic_iam._resources import default_policies_dir, default_registry_path
from agentic_iam.integrations.llama_index import (
    protect,
    run_with_identity,
)
from tests.conftest import ALICE, AUDIENCE, Env
from tests.integrations.llama_index.conftest import (
    FRAMEWORK_WARNINGS,
    REQUEST,
    Backend,
    ai,
    call,
    chain_ids,
    decided,
    drive,
    scripted,
)

pytestmark = FRAMEWORK_WARNINGS

DELEGATE_TOOL = {"name": "ask_refund_bot", "action": "agent:delegate", "risk": 1,
                 "description": "Hand a refund to the refund bot.",
                 "arguments": {"task": "String"}}


@pytest.fixture
def env() -> Env:
    """The shared registry plus a support-agent tool that delegates to refund-bot."""
    data = yaml.safe_load(default_registry_path().read_text())
    for agent in data["agents"]:
        if agent["id"] == "support-agent":
            agent["tools"].append(DELEGATE_TOOL)
    registry = AgentRegistry.from_text(yaml.safe_dump(data), name="registry+delegation")
    keys = KeySet.generate("https://broker.test")
    sink = MemorySink()
    recorder = Recorder([sink])
    store = MemoryStore()
    broker = DelegationBroker(registry, keys, audience=AUDIENCE, store=store, recorder=recorder)
    guard = Guard.from_broker(broker, CedarEngine.from_directory(default_policies_dir(), registry))
    return Env(registry, keys, broker, guard, sink, recorder, store)


def parent_token(env: Env) -> Any:
    return env.broker.delegate(ALICE, "support-agent", "refund T-1042",
                               ["refund:create amount<=100", "ticket:read", "agent:delegate"],
                               900)


def ask_tool(sub_agent: Any, backend: Backend) -> FunctionTool:
    """A plain tool that runs a sub-agent: nothing in it mentions identities."""

    async def ask_refund_bot(task: str) -> str:
        """Hand a refund to the refund bot."""
        backend.record("ask_refund_bot", task=task)
        result = await sub_agent.run(user_msg=task)
        return str(result.response.content)

    return FunctionTool.from_defaults(async_fn=ask_refund_bot)


async def test_a_protected_agent_called_from_a_plain_tool_mints_its_own_identity(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    refund_bot = protect(FunctionAgent(
        name="refund-bot", description="Refunds.", tools=[tools["create_refund"]],
        llm=scripted(ai("Refunding 80.", call("create_refund", "s80", amount=80, currency="USD",
                                              account="acct-alice")),
                     ai("Refunding 20.", call("create_refund", "s20", amount=20, currency="USD",
                                              account="acct-alice")),
                     ai("Refunded."))),
        env.guard, broker=env.broker, agent_id="refund-bot")
    support = protect(FunctionAgent(
        name="support", description="Support", tools=[ask_tool(refund_bot, backend)],
        llm=scripted(ai("Delegating.", call("ask_refund_bot", "p1", task="refund 80, 20")),
                     ai("Done."))),
        env.guard, broker=env.broker, agent_id="support-agent")
    token = env.broker.delegate(ALICE, "support-agent", "refund T-1042",
                                ["refund:create amount<=50", "agent:delegate"], 900)
    await drive(await run_with_identity(support, REQUEST, token))

    assert backend.executed("create_refund") == [
        {"amount": 20, "currency": "USD", "account": "acct-alice"}]
    assert decided(env, "s80").decision.outcome == "deny"
    child = decided(env, "s20")
    # never the parent's identity: its own, minted by the broker, narrowed and linked
    assert child.agent_id == "refund-bot"
    assert child.execution_id != token.identity.execution_id
    assert chain_ids(child) == ["alice@example.com", "support-agent", "refund-bot"]
    assert child.reasoning.parent_run_id is not None
    minted = [e for e in env.sink.events if e.event_type == "delegation.subdelegated"]
    assert [e.agent_id for e in minted] == ["refund-bot"]
    # the child ended when its run did, and the parent with its own
    ended = [e.agent_id for e in env.sink.events if e.event_type == "execution.ended"]
    assert ended == ["refund-bot", "support-agent"]


async def test_without_a_broker_the_sub_agent_refuses_the_parents_identity(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    sub_llm = scripted(ai("Refunding 20.", call("create_refund", "s20", amount=20,
                                                currency="USD", account="acct-alice")),
                       ai("I could not."))
    refund_bot = protect(FunctionAgent(name="refund-bot", description="Refunds.",
                                       tools=[tools["create_refund"]], llm=sub_llm),
                         env.guard, agent_id="refund-bot")  # no broker
    support = protect(FunctionAgent(
        name="support", description="Support", tools=[ask_tool(refund_bot, backend)],
        llm=scripted(ai("Delegating.", call("ask_refund_bot", "p1", task="refund 20")),
                     ai("Done."))),
        env.guard, broker=env.broker, agent_id="support-agent")
    await drive(await run_with_identity(support, REQUEST, parent_token(env)))
    assert backend.executed("create_refund") == []
    event = decided(env, "s20")
    assert event.decision.reasons[0].code == "identity.agent_mismatch"
    assert "belongs to agent `support-agent`" in sub_llm.tool_results(1)["s20"]


async def test_a_stock_sub_agent_inside_a_guarded_tool_is_refused(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    sub_llm = scripted(ai("Refunding 20.", call("create_refund", "s20", amount=20,
                                                currency="USD", account="acct-alice")),
                       ai("I could not."))
    stock = FunctionAgent(name="refund-bot", description="Refunds.",
                          tools=[tools["create_refund"]], llm=sub_llm)  # never protected
    support = protect(FunctionAgent(
        name="support", description="Support", tools=[ask_tool(stock, backend)],
        llm=scripted(ai("Delegating.", call("ask_refund_bot", "p1", task="refund 20")),
                     ai("Done."))),
        env.guard, broker=env.broker, agent_id="support-agent")
    await drive(await run_with_identity(support, REQUEST, parent_token(env)))
    assert backend.executed("create_refund") == []
    assert "outside a Guard mediation" in sub_llm.tool_results(1)["s20"]


async def test_a_sub_run_under_the_callers_own_identity_does_not_end_it(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    """A helper of the same registry agent runs under the caller's token (nothing to narrow);
    its end is not the caller's: the caller's later calls still run."""
    helper = protect(FunctionAgent(
        name="helper", description="Refunds.", tools=[tools["create_refund"]],
        llm=scripted(ai("Refunding 20.", call("create_refund", "h20", amount=20, currency="USD",
                                              account="acct-alice")), ai("Refunded."))),
        env.guard, broker=env.broker, agent_id="support-agent")
    llm = scripted(ai("Delegating.", call("ask_refund_bot", "p1", task="refund 20")),
                   ai("And 10 myself.", call("create_refund", "p10", amount=10, currency="USD",
                                             account="acct-alice")), ai("Done."))
    support = protect(FunctionAgent(name="support", description="Support", llm=llm,
                                    tools=[ask_tool(helper, backend), tools["create_refund"]]),
                      env.guard, broker=env.broker, agent_id="support-agent")
    token = parent_token(env)
    await drive(await run_with_identity(support, REQUEST, token))
    assert [c["amount"] for c in backend.executed("create_refund")] == [20, 10]
    assert decided(env, "h20").execution_id == token.identity.execution_id
    assert not [e for e in env.sink.events if e.event_type == "delegation.subdelegated"]
    ended = [e.agent_id for e in env.sink.events if e.event_type == "execution.ended"]
    assert ended == ["support-agent"]  # once, when the caller's run finished
