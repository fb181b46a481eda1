"""IAMCallbackHandler: LLM usage is charged to the execution (an exhausted llm_tokens budget
stops further tool calls), the last model messages are kept; it never raises into the run."""

from __future__ import annotations

from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.tools import BaseTool

from agentic_iam.integrations.langchain import IAMCallbackHandler, IAMContext
from tests.conftest import Env
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

BUDGET = {"tool_calls": 10, "cost": 50000, "llm_tokens": 100}


def hungry_script() -> list[AIMessage]:
    return [
        ai("Refunding 10.", call("create_refund", "u1", amount=10, currency="USD",
                                 account="acct-1"),
           usage={"input_tokens": 80, "output_tokens": 40}),
        ai("done", usage={"input_tokens": 1, "output_tokens": 1}),
    ]


def test_exhausted_llm_budget_stops_tool_calls(env: Env, backend: Backend,
                                               tools: dict[str, BaseTool]) -> None:
    token = env.refund_token(budget=BUDGET)
    handler = IAMCallbackHandler(env.guard, token)
    agent = build_agent(env, scripted(*hungry_script()), list(tools.values()))
    result = agent.invoke(REQUEST_TEXT, {"callbacks": [handler]},
                          context=IAMContext(token.token))
    assert handler.charged == {"input_tokens": 81, "output_tokens": 41}
    assert handler.failures == 0
    message = tool_messages(result)["u1"]
    assert message.status == "error"
    assert decided(env, "u1").decision.reasons[0].code == "budget.exhausted"
    assert backend.calls == []
    usage = [e for e in env.sink.events if e.event_type == "model.usage"]
    assert usage and usage[0].usage == {"input_tokens": 80, "output_tokens": 40}
    assert usage[0].reasoning is not None and usage[0].reasoning.model == "scripted-model"


def test_same_run_without_the_handler_is_allowed(env: Env, backend: Backend,
                                                 tools: dict[str, BaseTool]) -> None:
    """Control: the denial above comes from the charged usage."""
    token = env.refund_token(budget=BUDGET)
    agent = build_agent(env, scripted(*hungry_script()), list(tools.values()))
    result = agent.invoke(REQUEST_TEXT, context=IAMContext(token.token))
    assert tool_messages(result)["u1"].status == "success"
    assert len(backend.calls) == 1


async def test_handler_on_the_async_path(env: Env, backend: Backend,
                                         tools: dict[str, BaseTool]) -> None:
    token = env.refund_token(budget=BUDGET)
    handler = IAMCallbackHandler(env.guard, token)
    agent = build_agent(env, scripted(*hungry_script()), list(tools.values()))
    result = await agent.ainvoke(REQUEST_TEXT, {"callbacks": [handler]},
                                 context=IAMContext(token.token))
    assert tool_messages(result)["u1"].status == "error"
    assert backend.calls == []


def test_keeps_last_messages_and_reasoning(env: Env) -> None:
    token = env.refund_token()
    handler = IAMCallbackHandler(env.guard, token, keep=2)
    for i in range(3):
        message = ai(f"turn {i}", call("search_kb", f"k{i}", query="x"))
        handler.on_llm_end(LLMResult(generations=[[ChatGeneration(message=message)]]),
                           run_id=f"run-{i}")
    assert [m.text for m in handler.last_messages] == ["turn 1", "turn 2"]
    reasoning = handler.reasoning_for("k2")
    assert reasoning is not None and reasoning.message == "turn 2"
    assert reasoning.run_id == "run-2" and reasoning.model == "scripted-model"
    assert handler.reasoning_for("nope") is None
    assert token.token not in repr(handler)


def test_llm_output_token_usage_fallback(env: Env) -> None:
    token = env.refund_token()
    handler = IAMCallbackHandler(env.guard, token)
    result = LLMResult(generations=[[ChatGeneration(message=AIMessage("hi"))]],
                       llm_output={"token_usage": {"prompt_tokens": 5, "completion_tokens": 7},
                                   "model_name": "gpt-test"})
    handler.on_llm_end(result, run_id="r")
    assert handler.charged == {"input_tokens": 5, "output_tokens": 7}
    event = [e for e in env.sink.events if e.event_type == "model.usage"][-1]
    assert event.reasoning is not None and event.reasoning.model == "gpt-test"


def test_a_failing_charge_is_observed_not_raised(env: Env) -> None:
    handler = IAMCallbackHandler(env.guard, "not-a-token")
    message = ai("x", usage={"input_tokens": 3, "output_tokens": 4})
    handler.on_llm_end(LLMResult(generations=[[ChatGeneration(message=message)]]), run_id="r")
    assert handler.failures == 1
    assert handler.charged == {"input_tokens": 0, "output_tokens": 0}
