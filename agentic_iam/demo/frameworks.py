"""The demo's story replayed through each framework adapter, with scripted models.

Each story drives a real agent of its framework (LangChain ``create_agent``, a LlamaIndex
``FunctionAgent``, an OpenAI Agents SDK ``Agent``) whose model is a script: it asks for the
calls of :data:`agentic_iam.demo.story.SCRIPT`, in order, one per turn. The adapter in between
is the one users install; what each call came to is read back from the audit events.
Nothing here needs a network or an API key.

Alice's task spans two runs: the support agent's, then the refund bot's under a narrower grant
sub-delegated from it. The support agent's run therefore keeps its execution when it finishes
(``end_on_finish=False``); the refund bot's run ends its own, and the story then ends Alice's
execution (and with it anything still delegated from it) with :meth:`Guard.end_execution`.
"""

from __future__ import annotations

from typing import Any

from agentic_iam.core.identity import Budget
from agentic_iam.core.tokens import ExecutionToken
from agentic_iam.demo.env import DemoEnv
from agentic_iam.demo.story import (
    SCRIPT,
    ScriptedCall,
    StepResult,
    delegate_for_alice,
    subagent_script,
)

__all__ = ["run_langchain_story", "run_llama_index_story", "run_openai_agents_story"]

REFUND_BOT_GRANT = ["refund:create amount<=20 currency=USD"]


def _child(env: DemoEnv, token: ExecutionToken) -> ExecutionToken:
    return env.broker.subdelegate(token, "refund-bot", REFUND_BOT_GRANT, ttl=300,
                                  budget=Budget(tool_calls=3, cost=100, llm_tokens=5_000))


def steps_from_audit(env: DemoEnv, framework: str, agent: str, token: ExecutionToken,
                     calls: tuple[ScriptedCall, ...], call_ids: list[str],
                     model_saw: dict[str, str]) -> list[StepResult]:
    """One :class:`StepResult` per scripted call, from the decision events of ``token``."""
    decided: dict[str, Any] = {}
    completed: dict[str, Any] = {}
    for event in env.memory.events:
        if event.execution_id != token.identity.execution_id or event.call_id is None:
            continue
        if event.event_type == "tool_call.decided":
            decided[event.call_id] = event
        elif event.event_type == "tool_call.completed":
            completed[event.call_id] = event
    results = []
    for call, call_id in zip(calls, call_ids, strict=True):
        found = decided.get(call_id)
        if found is None or found.decision is None:
            results.append(StepResult(framework, agent, call.tool, dict(call.arguments),
                                      "not decided", "adapter.missing", "no decision recorded"))
            continue
        event = found
        reasons = event.decision.reasons or ()
        main = reasons[0] if reasons else None
        codes = [r.code for r in reasons]
        approval = None
        if "approval.granted" in codes:
            approval = "approved"
        elif "approval.denied" in codes:
            approval = "denied"
        finished = completed.get(call_id)
        labels = tuple(finished.result.output_labels or ()) if finished and finished.result else ()
        results.append(StepResult(
            framework, agent, call.tool, dict(call.arguments), event.decision.outcome,
            main.code if main else "", main.message if main else "",
            tuple(event.decision.policy_ids or ()), approval, model_saw.get(call_id), labels))
    return results


# --- LangChain ------------------------------------------------------------------------------


def run_langchain_story(env: DemoEnv) -> tuple[list[StepResult], ExecutionToken]:
    from langchain.agents import create_agent
    from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
    from langchain_core.tools import StructuredTool

    from agentic_iam.demo.tools import ALICE_REQUEST
    from agentic_iam.integrations.langchain import GuardMiddleware, IAMContext

    class ScriptedModel(FakeMessagesListChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
            return self

    tools = [StructuredTool.from_function(fn) for fn in env.backend.functions().values()]

    def run(agent_name: str, token: ExecutionToken, calls: tuple[ScriptedCall, ...],
            end_on_finish: bool = True) -> list[StepResult]:
        ids = [f"lc-{agent_name}-{i}" for i in range(len(calls))]
        script: list[BaseMessage] = [AIMessage(content=c.says, tool_calls=[
            {"name": c.tool, "args": c.arguments, "id": i, "type": "tool_call"}],
            response_metadata={"model_name": "scripted"}) for c, i in zip(calls, ids, strict=True)]
        script.append(AIMessage(content="Done.", response_metadata={"model_name": "scripted"}))
        agent = create_agent(ScriptedModel(responses=script), tools=tools,
                             middleware=[GuardMiddleware(env.guard)], context_schema=IAMContext,
                             name=agent_name)
        state = agent.invoke({"messages": [HumanMessage(ALICE_REQUEST)]},
                             context=IAMContext(token.token, end_on_finish=end_on_finish))
        saw = {m.tool_call_id: str(m.content) for m in state["messages"]
               if isinstance(m, ToolMessage)}
        return steps_from_audit(env, "langchain", agent_name, token, calls, ids, saw)

    token = delegate_for_alice(env)
    results = run("support-agent", token, SCRIPT, end_on_finish=False)
    results += run("refund-bot", _child(env, token), subagent_script())
    env.guard.end_execution(token)  # Alice's task is done
    return results, token


# --- LlamaIndex ------------------------------------------------------------------------------


def run_llama_index_story(env: DemoEnv) -> tuple[list[StepResult], ExecutionToken]:
    import asyncio
    from collections.abc import Sequence

    from llama_index.core.agent.workflow import ToolCallResult
    from llama_index.core.base.llms.types import ChatMessage, TextBlock, ToolCallBlock
    from llama_index.core.llms import MockFunctionCallingLLM
    from llama_index.core.tools import FunctionTool

    from agentic_iam.demo.tools import ALICE_REQUEST
    from agentic_iam.integrations.llama_index import GuardedFunctionAgent, run_with_identity

    def scripted_llm(script: list[ChatMessage]) -> MockFunctionCallingLLM:
        """Replays the script, one assistant message per turn, then says it is done."""

        def answer(messages: Sequence[ChatMessage], **kwargs: Any) -> ChatMessage:
            return script.pop(0) if script else ChatMessage(role="assistant", content="Done.")

        return MockFunctionCallingLLM(is_chat_model=True, response_generator=answer)

    tools = [FunctionTool.from_defaults(fn) for fn in env.backend.functions().values()]

    async def run(agent_name: str, token: ExecutionToken, calls: tuple[ScriptedCall, ...],
                  end_on_finish: bool = True) -> list[StepResult]:
        ids = [f"li-{agent_name}-{i}" for i in range(len(calls))]
        script = [ChatMessage(role="assistant", blocks=[
            TextBlock(text=c.says),
            ToolCallBlock(tool_call_id=i, tool_name=c.tool, tool_kwargs=dict(c.arguments))])
            for c, i in zip(calls, ids, strict=True)]
        agent = GuardedFunctionAgent(name=agent_name, description=f"{agent_name} (demo)",
                                     tools=tools, llm=scripted_llm(script),
                                     guard=env.guard)
        handler = await run_with_identity(agent, ALICE_REQUEST, token,
                                          end_on_finish=end_on_finish)
        saw: dict[str, str] = {}
        async for event in handler.stream_events():
            if isinstance(event, ToolCallResult):
                saw[event.tool_id] = str(event.tool_output.content)
        await handler
        return steps_from_audit(env, "llama_index", agent_name, token, calls, ids, saw)

    async def story() -> tuple[list[StepResult], ExecutionToken]:
        token = delegate_for_alice(env)
        results = await run("support-agent", token, SCRIPT, end_on_finish=False)
        results += await run("refund-bot", _child(env, token), subagent_script())
        env.guard.end_execution(token)  # Alice's task is done
        return results, token

    return asyncio.run(story())


# --- OpenAI Agents SDK ---------------------------------------------------------------------


def run_openai_agents_story(env: DemoEnv) -> tuple[list[StepResult], ExecutionToken]:
    import asyncio
    import itertools
    import json
    from collections.abc import AsyncIterator

    from agents import Agent, ModelResponse, Runner, Usage, function_tool
    from agents.models.interface import Model
    from agents.tracing import set_tracing_disabled
    from openai.types.responses import (
        ResponseFunctionToolCall,
        ResponseOutputMessage,
        ResponseOutputText,
    )

    from agentic_iam.demo.tools import ALICE_REQUEST
    from agentic_iam.integrations.openai_agents import IAMRunContext, IAMRunHooks, protect

    set_tracing_disabled(True)  # the demo is offline: never export traces to OpenAI
    counter = itertools.count()

    class ScriptedModel(Model):
        """Answers each turn with the next scripted message and tool call."""

        def __init__(self, turns: list[list[Any]]) -> None:
            self.turns = turns
            self.inputs: list[Any] = []

        async def get_response(self, system_instructions: Any, input: Any, model_settings: Any,
                               tools: Any, output_schema: Any, handoffs: Any, tracing: Any,
                               **kwargs: Any) -> ModelResponse:
            self.inputs.append(input)
            turn = self.turns[min(len(self.inputs) - 1, len(self.turns) - 1)]
            return ModelResponse(output=turn, usage=Usage(requests=1, input_tokens=100,
                                                          output_tokens=20, total_tokens=120),
                                 response_id=f"resp_demo_{next(counter)}")

        def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            raise RuntimeError("the demo's scripted model only answers Runner.run")

    def say(text: str) -> ResponseOutputMessage:
        return ResponseOutputMessage(
            id=f"msg_demo_{next(counter)}", type="message", role="assistant",
            status="completed",
            content=[ResponseOutputText(type="output_text", annotations=[], text=text)])

    tools = [function_tool(fn) for fn in env.backend.functions().values()]

    def run(agent_name: str, token: ExecutionToken, calls: tuple[ScriptedCall, ...],
            end_on_finish: bool = True) -> list[StepResult]:
        ids = [f"oa-{agent_name}-{i}" for i in range(len(calls))]
        turns: list[list[Any]] = [
            [say(c.says), ResponseFunctionToolCall(id=f"fc_{i}", call_id=i,
                                                   type="function_call", name=c.tool,
                                                   arguments=json.dumps(c.arguments))]
            for c, i in zip(calls, ids, strict=True)]
        turns.append([say("Done.")])
        model = ScriptedModel(turns)
        agent: Agent[Any] = protect(Agent(name=agent_name, model=model, tools=list(tools)),
                                    env.guard, broker=env.broker)
        context = IAMRunContext(token.token, end_on_finish=end_on_finish)
        asyncio.run(Runner.run(agent, ALICE_REQUEST, context=context,
                               hooks=IAMRunHooks(env.guard), max_turns=len(turns) + 2))
        saw: dict[str, str] = {}
        for items in model.inputs:
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and item.get("type") == "function_call_output":
                    saw[str(item["call_id"])] = str(item["output"])
        return steps_from_audit(env, "openai_agents", agent_name, token, calls, ids, saw)

    token = delegate_for_alice(env)
    results = run("support-agent", token, SCRIPT, end_on_finish=False)
    results += run("refund-bot", _child(env, token), subagent_script())
    env.guard.end_execution(token)  # Alice's task is done
    return results, token
