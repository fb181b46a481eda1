"""Issue 13 item 12 through the LlamaIndex adapter: an execution ends when its workflow finishes
(a ``StopEvent``; a pause for an approval is not one), identities minted for handoffs and for
sub-agents started from a tool always end with their run (a failed one too), and
``end_on_finish=False`` keeps the root execution for a conversation of several runs in one
``Context``."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import Context

from agentic_iam import (
    AgentRegistry,
    CedarEngine,
    DelegationBroker,
    ExecutionToken,
    Guard,
    KeySet,
    MemorySink,
    MemoryStore,
    Recorder,
)
from agentic_iam._resources import default_policies_dir, default_registry_path
from agentic_iam.errors import RevokedTokenError
from agentic_iam.integrations.llama_index import (
    ApprovalRequestEvent,
    GuardedAgentWorkflow,
    GuardedFunctionAgent,
    bind_identity,
    protect,
    run_with_identity,
)
from tests.conftest import ALICE, AUDIENCE, Env, EnvFactory
from tests.integrations.llama_index.conftest import (
    FRAMEWORK_WARNINGS,
    REQUEST,
    Backend,
    ai,
    call,
    decided,
    drive,
    scripted,
)

pytestmark = FRAMEWORK_WARNINGS

DELEGATE_TOOL = {"name": "ask_refund_bot", "action": "agent:delegate", "risk": 1,
                 "description": "Hand a refund to the refund bot.",
                 "arguments": {"task": "String"}}
REFUND_20 = {"amount": 20, "currency": "USD", "account": "acct-alice"}


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


def alice_token(env: Env) -> ExecutionToken:
    return env.broker.delegate(ALICE, "support-agent", "refund T-1042 to acct-alice",
                               ["refund:create amount<=200", "kb:search", "agent:delegate"], 900)


def alive(env: Env, token: ExecutionToken) -> bool:
    try:
        env.guard.verifier.verify(token.token)
    except RevokedTokenError:
        return False
    return True


def ended(env: Env) -> list[tuple[str | None, str | None]]:
    return [(e.agent_id, (e.extra or {}).get("reason")) for e in env.sink.events
            if e.event_type == "execution.ended"]


def minted(env: Env) -> list[str]:
    return [f"{e.issuer}|{e.jti}" for e in env.sink.events
            if e.event_type == "delegation.subdelegated"]


def revoked(env: Env, keys: list[str]) -> bool:
    return bool(keys) and set(env.store.revoked(keys)) == set(keys)


def searcher(env: Env, tools: dict[str, FunctionTool], call_id: str) -> GuardedFunctionAgent:
    return GuardedFunctionAgent(
        name="support-agent", description="Support", tools=[tools["search_kb"]],
        llm=scripted(ai("Searching.", call("search_kb", call_id, query="refunds"))),
        guard=env.guard)


async def test_the_execution_ends_when_the_workflow_finishes(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    token = alice_token(env)
    await drive(await run_with_identity(searcher(env, tools, "k1"), REQUEST, token))
    assert not alive(env, token)
    assert ended(env) == [("support-agent", "completed")]

    # a second run with the same token: refused
    await drive(await run_with_identity(searcher(env, tools, "k2"), REQUEST, token))
    assert decided(env, "k2").decision.reasons[0].code == "token.revoked"
    assert backend.executed("search_kb") == [{"query": "refunds"}]


# A second run in the same Context makes the workflow library warn that it cannot serialize the
# chat memory (workflows/context/state_store.py); expected there, and not this adapter's doing.
@pytest.mark.filterwarnings(
    "ignore:Skipping serialization of known unserializable key")
async def test_opting_out_keeps_it_for_the_next_run_in_the_context(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    token = alice_token(env)
    llm = scripted(ai("Searching.", call("search_kb", "k1", query="refunds")), ai("Done."),
                   ai("Again.", call("search_kb", "k2", query="fees")), ai("Done again."))
    agent = GuardedFunctionAgent(name="support-agent", description="Support",
                                 tools=[tools["search_kb"]], llm=llm, guard=env.guard)
    ctx = Context(agent)
    await bind_identity(ctx, token, end_on_finish=False)
    await drive(agent.run(user_msg=REQUEST, ctx=ctx))
    assert alive(env, token)
    await drive(agent.run(user_msg="And the fees?", ctx=ctx))
    assert alive(env, token)
    assert [c["query"] for c in backend.executed("search_kb")] == ["refunds", "fees"]
    assert ended(env) == []
    env.guard.end_execution(token)
    assert not alive(env, token)


async def test_an_approval_pause_is_not_the_end(make_env: EnvFactory, backend: Backend,
                                                tools: dict[str, FunctionTool]) -> None:
    env = make_env()  # the shared test Guard, whose configured approvers include "bob"
    token = env.refund_token(max_amount=200)
    agent = GuardedFunctionAgent(
        name="support-agent", description="Support", tools=[tools["create_refund"]],
        llm=scripted(ai("Refunding 150.", call("create_refund", "a1", amount=150,
                                               currency="USD", account="acct-alice"))),
        guard=env.guard)
    handler = await run_with_identity(agent, REQUEST, token)
    paused_alive = None
    async for event in handler.stream_events():
        if isinstance(event, ApprovalRequestEvent):
            paused_alive = alive(env, token)
            assert handler.ctx is not None
            handler.ctx.send_event(event.answer(approved=True, approver="bob"))
    await handler
    assert paused_alive is True
    assert backend.executed("create_refund") == [
        {"amount": 150, "currency": "USD", "account": "acct-alice"}]
    assert not alive(env, token)


async def test_a_return_direct_tool_that_ends_the_run_ends_the_execution(
        env: Env, backend: Backend) -> None:
    def search_kb(query: str) -> str:
        """Search the knowledge base (answers the user directly)."""
        backend.record("search_kb", query=query)
        return "the policy"

    agent = GuardedFunctionAgent(
        name="support-agent", description="Support",
        tools=[FunctionTool.from_defaults(search_kb, return_direct=True)],
        llm=scripted(ai("Searching.", call("search_kb", "k1", query="policy"))), guard=env.guard)
    token = alice_token(env)
    result, _ = await drive(await run_with_identity(agent, REQUEST, token))
    assert str(result.response.content) == "the policy"
    assert not alive(env, token)


@pytest.mark.parametrize("root_ends", [True, False], ids=["root-ends", "root-opts-out"])
async def test_a_handoff_identity_ends_with_the_run(
        env: Env, backend: Backend, tools: dict[str, FunctionTool], root_ends: bool) -> None:
    from llama_index.core.agent.workflow import FunctionAgent

    triage = FunctionAgent(name="triage", description="Routes.", tools=[tools["search_kb"]],
                           llm=scripted(ai("Handing over.", call("handoff", "h1",
                                                                 to_agent="refunds",
                                                                 reason="a refund"))),
                           can_handoff_to=["refunds"])
    refunds = FunctionAgent(name="refunds", description="Refunds.",
                            tools=[tools["create_refund"]],
                            llm=scripted(ai("Refunding 20.", call("create_refund", "r1",
                                                                  **REFUND_20))),
                            can_handoff_to=[])
    wf = GuardedAgentWorkflow(agents=[triage, refunds], root_agent="triage", guard=env.guard,
                              broker=env.broker,
                              agent_ids={"triage": "support-agent", "refunds": "refund-bot"})
    token = alice_token(env)
    ctx = Context(wf)
    await bind_identity(ctx, token, end_on_finish=root_ends)
    result, _ = await drive(wf.run(user_msg=REQUEST, ctx=ctx))

    assert result.current_agent_name == "refunds"
    assert backend.executed("create_refund") == [REFUND_20]
    child = minted(env)
    assert len(child) == 1 and revoked(env, child)  # always
    assert await wf.current_identity(ctx, "refunds") is None
    assert alive(env, token) is not root_ends
    if not root_ends:
        # the next run of this Context starts again with the root agent, under the root identity
        assert await ctx.store.get("current_agent_name") == "triage"
        identity = await wf.current_identity(ctx)
        assert identity is not None and identity.execution_id == token.identity.execution_id


def ask_tool(sub_agent: Any, backend: Backend) -> FunctionTool:
    """A plain tool running a protected sub-agent (which mints its own identity)."""

    async def ask_refund_bot(task: str) -> str:
        """Hand a refund to the refund bot."""
        backend.record("ask_refund_bot", task=task)
        return str((await sub_agent.run(user_msg=task)).response.content)

    return FunctionTool.from_defaults(async_fn=ask_refund_bot)


@pytest.mark.parametrize("root_ends", [True, False], ids=["root-ends", "root-opts-out"])
async def test_a_sub_agent_identity_ends_with_the_sub_run(
        env: Env, backend: Backend, tools: dict[str, FunctionTool], root_ends: bool) -> None:
    refund_bot = protect(FunctionAgent(
        name="refund-bot", description="Refunds.", tools=[tools["create_refund"]],
        llm=scripted(ai("Refunding 20.", call("create_refund", "s1", **REFUND_20)))),
        env.guard, broker=env.broker)
    support = GuardedFunctionAgent(
        name="support-agent", description="Support", tools=[ask_tool(refund_bot, backend)],
        llm=scripted(ai("Delegating.", call("ask_refund_bot", "p1", task="refund 20"))),
        guard=env.guard)
    token = alice_token(env)
    await drive(await run_with_identity(support, REQUEST, token, end_on_finish=root_ends))

    assert backend.executed("create_refund") == [REFUND_20]
    child = minted(env)
    assert len(child) == 1 and revoked(env, child)
    assert ended(env)[0] == ("refund-bot", "completed")  # once, when the sub-run finished
    assert ended(env).count(("refund-bot", "completed")) == 1
    assert alive(env, token) is not root_ends


async def test_a_failed_sub_run_ends_its_identity(
        env: Env, backend: Backend, tools: dict[str, FunctionTool]) -> None:
    class Broken(type(scripted())):  # type: ignore[misc]
        async def astream_chat(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the sub-agent's model is down")

        async def achat(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the sub-agent's model is down")

    refund_bot = protect(FunctionAgent(name="refund-bot", description="Refunds.",
                                       tools=[tools["create_refund"]], llm=Broken()),
                         env.guard, broker=env.broker)
    llm = scripted(ai("Delegating.", call("ask_refund_bot", "p1", task="refund 20")))
    support = GuardedFunctionAgent(name="support-agent", description="Support", llm=llm,
                                   tools=[ask_tool(refund_bot, backend)], guard=env.guard)
    token = alice_token(env)
    await drive(await run_with_identity(support, REQUEST, token, end_on_finish=False))

    child = minted(env)
    assert len(child) == 1 and revoked(env, child)
    assert ended(env) == [("refund-bot", "failed")]
    assert "model is down" in llm.tool_results(1)["p1"]
    assert alive(env, token)
