"""Complete mediation: over every path the adapter offers (invoke, ainvoke, stream, astream,
parallel calls, approval pause/resume, ToolNode sync/async, wrapped tools, sub-agents), every
real tool execution has an allow decision of its own, and nothing runs on deny or approval."""

from __future__ import annotations

from collections import Counter

from langchain_core.messages import HumanMessage
from langchain_core.tools import BaseTool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from agentic_iam.integrations.langchain import (
    IAMContext,
    guard_tools,
    guarded_tool_node,
    subagent_node,
)
from tests.conftest import Env
from tests.integrations.langchain.conftest import (
    REQUEST_TEXT,
    Backend,
    ai,
    build_agent,
    call,
    scripted,
)
from tests.integrations.langchain.test_middleware import APPROVAL, PARALLEL, alice_script
from tests.integrations.langchain.test_subagent import parent_graph
from tests.integrations.langchain.test_toolnode import SCRIPT, build_graph


def allowed_calls(env: Env) -> list[tuple[str, str]]:
    return [(e.call_id or "", e.tool or "") for e in env.sink.events
            if e.event_type == "tool_call.decided" and e.decision is not None
            and e.decision.outcome == "allow"]


async def test_every_execution_has_its_own_allow_decision(
        env: Env, backend: Backend, tools: dict[str, BaseTool]) -> None:
    every = list(tools.values())
    caps = ["refund:create amount<=100", "ticket:read", "kb:search"]

    def ctx(max_amount: int = 100) -> IAMContext:
        return IAMContext(env.refund_token(max_amount=max_amount).token)

    # create_agent: invoke, ainvoke, stream, astream
    build_agent(env, scripted(*alice_script()), every).invoke(REQUEST_TEXT, context=ctx())
    await build_agent(env, scripted(*alice_script()), every).ainvoke(REQUEST_TEXT,
                                                                     context=ctx())
    for _ in build_agent(env, scripted(*alice_script()), every).stream(REQUEST_TEXT,
                                                                       context=ctx()):
        pass
    async for _ in build_agent(env, scripted(*alice_script()), every).astream(
            REQUEST_TEXT, context=ctx()):
        pass
    # parallel calls in one turn
    build_agent(env, scripted(*PARALLEL), every).invoke(
        REQUEST_TEXT, context=IAMContext(env.refund_token(capabilities=caps).token))
    # approval: pause, resume approved
    agent = build_agent(env, scripted(*APPROVAL), every, checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "mediation"}}
    context = ctx(200)
    agent.invoke(REQUEST_TEXT, config, context=context)
    agent.invoke(Command(resume={"approved": True, "approver": "bob"}), config, context=context)
    # no identity
    build_agent(env, scripted(ai("x", call("create_refund", "nt", amount=1, currency="USD",
                                           account="a")), ai("done")), every).invoke(
        REQUEST_TEXT)
    # custom graph ToolNode, sync and async
    build_graph(scripted(*SCRIPT), guarded_tool_node(every, env.guard)).invoke(
        {"messages": [HumanMessage("go")]}, context=ctx())
    await build_graph(scripted(*SCRIPT), guarded_tool_node(every, env.guard)).ainvoke(
        {"messages": [HumanMessage("go")]}, context=ctx())
    # wrapped tools
    refund, = guard_tools([tools["create_refund"]], env.guard, env.refund_token())
    refund.invoke(call("create_refund", "w1", amount=5, currency="USD", account="a"))
    refund.invoke(call("create_refund", "w2", amount=500, currency="USD", account="a"))
    await refund.ainvoke(call("create_refund", "w3", amount=6, currency="USD", account="a"))
    await refund.ainvoke(call("create_refund", "w4", amount=600, currency="USD", account="a"))
    # a sub-agent with a narrower grant: 80 refused, 15 allowed
    for amount, call_id in ((80, "s1"), (15, "s2")):
        child = build_agent(env, scripted(
            ai("child", call("create_refund", call_id, amount=amount, currency="USD",
                             account="a")), ai("done")), [tools["create_refund"]])
        node = subagent_node(child, broker=env.broker, agent_id="refund-bot",
                             capabilities=["refund:create amount<=20"],
                             budget={"tool_calls": 5, "cost": 5000, "llm_tokens": 5000})
        parent_graph(node).invoke(REQUEST_TEXT, context=ctx())

    assert env.guard.stats == {"allow": 12, "deny": 15, "approval_required": 2}
    assert len(backend.calls) == env.guard.stats["allow"]
    # Each execution matches one allow decision for the same tool (one to one, by tool).
    executed = Counter(name for name, _ in backend.calls)
    allowed = Counter(tool for _, tool in allowed_calls(env))
    assert executed == allowed
    assert backend.executed("delete_account") == []
    assert all(args["amount"] <= 100 for args in backend.executed("create_refund")
               if args["amount"] != 150)  # 150 ran only after a human approved it

