"""guarded_tool_node: the same wrapper in a custom LangGraph graph (sync and async)."""

from __future__ import annotations

from typing import Annotated, Any

from langchain_core.messages import AnyMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import tools_condition
from langgraph.prebuilt.tool_node import ToolCallRequest, ToolRuntime
from typing_extensions import TypedDict

from agentic_iam.integrations.langchain import GuardMiddleware, IAMContext, guarded_tool_node
from tests.conftest import Env
from tests.integrations.langchain.conftest import (
    Backend,
    Scripted,
    ai,
    call,
    decided,
    scripted,
    tool_messages,
)


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def build_graph(model: Scripted, node: Any) -> Any:
    def model_node(state: State) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(State, context_schema=IAMContext)
    graph.add_node("model", model_node)
    graph.add_node("tools", node)
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    return graph.compile()


SCRIPT = [
    ai("Refund and delete.",
       call("create_refund", "n1", amount=40, currency="USD", account="acct-1"),
       call("delete_account", "n2", account="acct-1")),
    ai("done"),
]


def check(env: Env, backend: Backend, result: dict[str, Any]) -> None:
    messages = tool_messages(result)
    assert messages["n1"].status == "success"
    assert messages["n2"].status == "error"
    assert backend.executed("create_refund") == [
        {"amount": 40, "currency": "USD", "account": "acct-1"}]
    assert backend.executed("delete_account") == []
    assert "Refund and delete." in decided(env, "n1").reasoning.message
    assert decided(env, "n2").decision.outcome == "deny"


def test_tool_node_sync(env: Env, backend: Backend, tools: dict[str, BaseTool]) -> None:
    node = guarded_tool_node(list(tools.values()), env.guard)
    graph = build_graph(scripted(*SCRIPT), node)
    result = graph.invoke({"messages": [HumanMessage("go")]},
                          context=IAMContext(env.refund_token().token))
    check(env, backend, result)


async def test_tool_node_async(env: Env, backend: Backend, tools: dict[str, BaseTool]) -> None:
    node = guarded_tool_node(list(tools.values()), env.guard)
    graph = build_graph(scripted(*SCRIPT), node)
    result = await graph.ainvoke({"messages": [HumanMessage("go")]},
                                 context=IAMContext(env.refund_token().token))
    check(env, backend, result)


def test_a_call_without_its_model_message_fails_closed(env: Env, backend: Backend,
                                                       tools: dict[str, BaseTool]) -> None:
    """A request whose state does not hold the requesting AIMessage (a ToolNode fed bare tool
    calls, a state without messages) is refused; with the check off, the Guard decides."""
    tool_call = call("create_refund", "x1", amount=1, currency="USD", account="a")
    context = IAMContext(env.refund_token().token)

    def request(call_id: str) -> ToolCallRequest:
        runtime = ToolRuntime(state={}, context=context, config={}, stream_writer=print,
                              tool_call_id=call_id, store=None)
        return ToolCallRequest(tool_call={**tool_call, "id": call_id},
                               tool=tools["create_refund"], state={}, runtime=runtime)

    def execute(req: ToolCallRequest) -> ToolMessage:
        out = tools["create_refund"].invoke({**req.tool_call, "type": "tool_call"})
        assert isinstance(out, ToolMessage)
        return out

    strict = GuardMiddleware(env.guard)
    out = strict.wrap_tool_call(request("x1"), execute)
    assert isinstance(out, ToolMessage) and out.status == "error"
    assert "model message" in out.text
    assert backend.calls == [] and sum(env.guard.stats.values()) == 0
    lenient = GuardMiddleware(env.guard, require_model_message=False)
    out = lenient.wrap_tool_call(request("x2"), execute)
    assert isinstance(out, ToolMessage) and out.status == "success"
    assert decided(env, "x2").reasoning.message is None
