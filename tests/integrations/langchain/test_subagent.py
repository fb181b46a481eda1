"""Sub-agents get a narrower identity, passed explicitly: the child cannot exceed its grant even
though the parent could; a subgraph added as a plain node would inherit the parent's."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
import yaml
from langchain_core.messages import AnyMessage, HumanMessage
from langchain_core.tools import BaseTool
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from typing_extensions import TypedDict

from agentic_iam import (
    AgentRegistry,
    CedarEngine,
    DelegationBroker,
    Guard,
    GuardConfig,
    KeySet,
    MemorySink,
    MemoryStore,
    Recorder,
)
from agentic_iam._resources import default_policies_dir, default_registry_path
from agentic_iam.errors import DelegationError
from agentic_iam.integrations.langchain import (
    GuardMiddleware,
    IAMCallbackHandler,
    IAMContext,
    delegated_context,
    subagent_node,
    subagent_tool,
)
from tests.conftest import ALICE, APPROVERS, AUDIENCE, Env
from tests.integrations.langchain.conftest import (
    REQUEST_TEXT,
    Backend,
    ai,
    build_agent,
    call,
    decided,
    scripted,
    tool_messages,
)

CHILD_CAPS = ["refund:create amount<=20"]
CHILD_BUDGET = {"tool_calls": 5, "cost": 5000, "llm_tokens": 5000}
DELEGATE_TOOL = {"name": "ask_refund_bot", "action": "agent:delegate", "risk": 1,
                 "description": "Hand a refund to the refund bot.",
                 "arguments": {"task": "String"}}


def registry_with_delegation_tool() -> AgentRegistry:
    data = yaml.safe_load(default_registry_path().read_text())
    for agent in data["agents"]:
        if agent["id"] == "support-agent":
            agent["tools"].append(DELEGATE_TOOL)
    return AgentRegistry.from_text(yaml.safe_dump(data), name="registry+delegation")


@pytest.fixture
def env() -> Env:
    """Like the shared ``env``, with a tool for support-agent that delegates to refund-bot."""
    registry = registry_with_delegation_tool()
    keys = KeySet.generate("https://broker.test")
    sink = MemorySink()
    recorder = Recorder([sink])
    store = MemoryStore()
    broker = DelegationBroker(registry, keys, audience=AUDIENCE, store=store, recorder=recorder)
    guard = Guard.from_broker(broker, CedarEngine.from_directory(default_policies_dir(), registry),
                              config=GuardConfig(approvers=APPROVERS))
    return Env(registry, keys, broker, guard, sink, recorder, store)


def parent_token(env: Env, max_amount: int = 100) -> Any:
    return env.broker.delegate(ALICE, "support-agent", "refund T-1042",
                               [f"refund:create amount<={max_amount}", "ticket:read",
                                "agent:delegate"], 900)


def child_agent(env: Env, tools: dict[str, BaseTool], amount: int) -> Any:
    model = scripted(
        ai(f"Refunding {amount} as asked.",
           call("create_refund", "child-refund", amount=amount, currency="USD",
                account="acct-1"),
           usage={"input_tokens": 30, "output_tokens": 10}),
        ai("The refund bot could not do it."),
    )
    return build_agent(env, model, [tools["create_refund"]], name="refund-bot")


def recording_input(backend: Backend) -> Any:
    def build(task: str) -> dict[str, Any]:
        backend.record("ask_refund_bot", task=task)  # the delegation tool's own execution
        return {"messages": [HumanMessage(task)]}
    return build


def test_child_cannot_exceed_its_grant_though_the_parent_can(
        env: Env, backend: Backend, tools: dict[str, BaseTool]) -> None:
    ask = subagent_tool(child_agent(env, tools, 80), name="ask_refund_bot",
                        description="Hand a refund to the refund bot.", broker=env.broker,
                        agent_id="refund-bot", capabilities=CHILD_CAPS, budget=CHILD_BUDGET,
                        build_input=recording_input(backend))
    parent_model = scripted(
        ai("Delegating the refund.", call("ask_refund_bot", "p-ask",
                                          task="Refund 80 USD to acct-1")),
        ai("Doing it myself then.", call("create_refund", "p-refund", amount=80,
                                         currency="USD", account="acct-1")),
        ai("done"),
    )
    token = parent_token(env)
    handler = IAMCallbackHandler(env.guard, token)
    parent = build_agent(env, parent_model, [ask, tools["create_refund"]])
    result = parent.invoke(REQUEST_TEXT, {"callbacks": [handler]},
                           context=IAMContext(token.token))

    child = decided(env, "child-refund")
    assert child.decision.outcome == "deny"
    assert child.decision.reasons[0].code.startswith("capability")
    assert child.agent_id == "refund-bot"
    assert child.execution_id != token.identity.execution_id
    assert [hop.id for hop in child.chain or ()] == ["alice@example.com", "support-agent",
                                                     "refund-bot"]
    assert decided(env, "p-refund").decision.outcome == "allow"
    assert backend.executed("create_refund") == [
        {"amount": 80, "currency": "USD", "account": "acct-1"}]  # the parent's, not the child's
    assert "could not do it" in tool_messages(result)["p-ask"].text
    # The child's model usage was charged to the child's execution (and its ancestors).
    usage = [e for e in env.sink.events if e.event_type == "model.usage"
             and e.agent_id == "refund-bot"]
    assert usage and usage[0].usage == {"input_tokens": 30, "output_tokens": 10}
    # ... once: the parent's handler must not charge the child's model call a second time.
    all_usage = [e for e in env.sink.events if e.event_type == "model.usage"]
    assert [e.agent_id for e in all_usage] == ["refund-bot"]


async def test_child_grant_on_the_async_path(env: Env, backend: Backend,
                                             tools: dict[str, BaseTool]) -> None:
    ask = subagent_tool(child_agent(env, tools, 80), name="ask_refund_bot",
                        description="Hand a refund to the refund bot.", broker=env.broker,
                        agent_id="refund-bot", capabilities=CHILD_CAPS, budget=CHILD_BUDGET,
                        build_input=recording_input(backend))
    parent_model = scripted(ai("Delegating.", call("ask_refund_bot", "p-ask",
                                                   task="Refund 80")), ai("done"))
    token = parent_token(env)
    parent = build_agent(env, parent_model, [ask])
    await parent.ainvoke(REQUEST_TEXT, context=IAMContext(token.token))
    assert decided(env, "child-refund").decision.outcome == "deny"
    assert backend.executed("create_refund") == []


def test_child_within_its_grant_runs(env: Env, backend: Backend,
                                     tools: dict[str, BaseTool]) -> None:
    ask = subagent_tool(child_agent(env, tools, 15), name="ask_refund_bot",
                        description="d", broker=env.broker, agent_id="refund-bot",
                        capabilities=CHILD_CAPS, budget=CHILD_BUDGET,
                        build_input=recording_input(backend))
    parent = build_agent(env, scripted(ai("Delegating.", call("ask_refund_bot", "p-ask",
                                                              task="Refund 15")), ai("done")),
                         [ask])
    parent.invoke(REQUEST_TEXT, context=IAMContext(parent_token(env).token))
    assert backend.executed("create_refund") == [
        {"amount": 15, "currency": "USD", "account": "acct-1"}]
    assert decided(env, "child-refund").agent_id == "refund-bot"


def test_refused_delegation_is_read_by_the_model(env: Env, backend: Backend,
                                                 tools: dict[str, BaseTool]) -> None:
    """support-agent may not delegate to reconcile-agent: nothing runs, the model reads why."""
    ask = subagent_tool(child_agent(env, tools, 10), name="ask_refund_bot", description="d",
                        broker=env.broker, agent_id="reconcile-agent",
                        build_input=recording_input(backend))
    parent = build_agent(env, scripted(ai("Delegating.", call("ask_refund_bot", "p-ask",
                                                              task="x")), ai("done")), [ask])
    result = parent.invoke(REQUEST_TEXT, context=IAMContext(parent_token(env).token))
    message = tool_messages(result)["p-ask"]
    assert message.status == "error" and "Could not delegate" in message.text
    assert backend.calls == []
    # The delegation tool itself was allowed and ran (it failed before the child started).
    assert decided(env, "p-ask").decision.outcome == "allow"
    completed = [e for e in env.sink.events if e.event_type == "tool_call.completed"]
    assert completed[-1].result is not None and completed[-1].result.outcome == "error"
    backend.record("ask_refund_bot", task="x")


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def parent_graph(node: Any) -> Any:
    graph = StateGraph(State, context_schema=IAMContext)
    graph.add_node("child", node)
    graph.add_edge(START, "child")
    return graph.compile()


def test_subgraph_node_gets_the_narrow_identity(env: Env, backend: Backend,
                                                tools: dict[str, BaseTool]) -> None:
    node = subagent_node(child_agent(env, tools, 80), broker=env.broker, agent_id="refund-bot",
                         capabilities=CHILD_CAPS, budget=CHILD_BUDGET)
    parent_graph(node).invoke(REQUEST_TEXT, context=IAMContext(parent_token(env).token))
    assert decided(env, "child-refund").decision.outcome == "deny"
    assert backend.calls == []


def test_pitfall_a_subgraph_added_directly_inherits_the_parent_identity(
        env: Env, backend: Backend, tools: dict[str, BaseTool]) -> None:
    """Why the wrappers exist: LangGraph hands a plain subgraph the parent's context."""
    token = parent_token(env)
    parent_graph(child_agent(env, tools, 80)).invoke(REQUEST_TEXT,
                                                      context=IAMContext(token.token))
    inherited = decided(env, "child-refund")
    assert inherited.decision.outcome == "allow"
    assert inherited.execution_id == token.identity.execution_id
    assert backend.executed("create_refund") == [
        {"amount": 80, "currency": "USD", "account": "acct-1"}]


def test_delegated_context_needs_a_parent_token(env: Env) -> None:
    with pytest.raises(DelegationError, match="no execution token"):
        delegated_context(None, env.broker, "refund-bot")
    with pytest.raises(DelegationError, match="truthy"):
        delegated_context(parent_token(env), env.broker, "refund-bot",
                          capabilities=CHILD_CAPS, budget=CHILD_BUDGET,
                          context_factory=lambda token: {})
    context = delegated_context(parent_token(env), env.broker, "refund-bot",
                                capabilities=CHILD_CAPS, budget=CHILD_BUDGET)
    assert isinstance(context, IAMContext)


def test_middleware_options_are_checked(env: Env) -> None:
    assert GuardMiddleware(env.guard).name == "GuardMiddleware"
    with pytest.raises(ValueError):
        GuardMiddleware(env.guard, on_approval="ask")  # type: ignore[arg-type]


def test_child_approval_pauses_and_resumes_the_parent_run(
        env: Env, backend: Backend, tools: dict[str, BaseTool]) -> None:
    """An approval inside the child pauses the whole run; the answer reaches the child."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    ask = subagent_tool(child_agent(env, tools, 150), name="ask_refund_bot", description="d",
                        broker=env.broker, agent_id="refund-bot",
                        capabilities=["refund:create amount<=200"], budget=CHILD_BUDGET,
                        build_input=recording_input(backend))
    parent = build_agent(env, scripted(ai("Delegating.", call("ask_refund_bot", "p-ask",
                                                              task="Refund 150")),
                                       ai("done")), [ask], checkpointer=InMemorySaver())
    token = parent_token(env, max_amount=200)
    config = {"configurable": {"thread_id": "nested-approval"}}
    paused = parent.invoke(REQUEST_TEXT, config, context=IAMContext(token.token))
    payload = paused["__interrupt__"][0].value
    assert payload["tool"] == "create_refund" and payload["arguments"]["amount"] == 150
    assert backend.executed("create_refund") == []
    parent.invoke(Command(resume={"approved": True, "approver": "bob"}), config,
                  context=IAMContext(token.token))
    assert backend.executed("create_refund") == [
        {"amount": 150, "currency": "USD", "account": "acct-1"}]
    assert decided(env, "child-refund").agent_id == "refund-bot"
    # The delegation tool ran twice (paused once, then resumed): two decisions, two runs.
    assert len(backend.executed("ask_refund_bot")) == 2


def test_default_budget_is_the_parents_remainder_capped_by_the_agent(env: Env) -> None:
    context = delegated_context(parent_token(env), env.broker, "refund-bot",
                                capabilities=CHILD_CAPS)
    token = context.aiam_token if isinstance(context, IAMContext) else None
    assert token is not None and not isinstance(token, str)
    assert token.identity.budget.tool_calls == 10  # refund-bot's maximum, below the parent's 50
