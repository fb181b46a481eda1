"""Observe-only instrumentation: each LLM response's token usage is charged to the token of
the agent whose step made the call (so it counts against that grant and its ancestors), with
a `model.usage` audit event; an exhausted `llm_tokens` budget stops the next tool call."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from llama_index.core.tools import FunctionTool
from llama_index_instrumentation import get_dispatcher

from agentic_iam.integrations.llama_index import (
    IAMInstrumentation,
    install_instrumentation,
    run_with_identity,
    uninstall_instrumentation,
)
from tests.conftest import Env
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
from tests.integrations.llama_index.test_workflow import (
    build,
    refunds_script,
    root_token,
    triage_script,
)

pytestmark = FRAMEWORK_WARNINGS

USAGE = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}


@pytest.fixture
def instrumentation(env: Env) -> Iterator[IAMInstrumentation]:
    handler = install_instrumentation(env.guard)
    yield handler
    uninstall_instrumentation(handler)
    assert handler not in get_dispatcher().event_handlers


def usage_events(env: Env) -> list[tuple[str | None, int]]:
    return [(e.agent_id, (e.usage or {}).get("input_tokens", 0)
             + (e.usage or {}).get("output_tokens", 0))
            for e in env.sink.events if e.event_type == "model.usage"]


async def test_usage_is_charged_to_the_agent_that_spoke(
        env: Env, backend: Backend, tools: dict[str, FunctionTool],
        instrumentation: IAMInstrumentation) -> None:
    assert install_instrumentation(env.guard) is instrumentation  # idempotent
    wf = build(env, tools, scripted(*triage_script(), usage=USAGE),
               scripted(*refunds_script(), usage=USAGE))
    root = root_token(env)
    await drive(await run_with_identity(wf, REQUEST, root))
    charged = usage_events(env)
    # triage spoke twice (search, handoff); refunds three times (calls, ticket, answer)
    assert charged == [("support-agent", 120)] * 2 + [("refund-bot", 120)] * 3
    assert instrumentation.charged == 5
    usage = next(e for e in env.sink.events if e.event_type == "model.usage")
    assert usage.reasoning is not None and usage.reasoning.model == "scripted-model"
    assert usage.framework == "llama_index"
    # the child's spend counts against its ancestor too
    left = env.store.remaining(root.identity.key, root.identity.budget.as_dict())
    assert left["llm_tokens"] == root.identity.budget.llm_tokens - 5 * 120


async def test_exhausted_llm_budget_stops_tool_calls(
        env: Env, backend: Backend, tools: dict[str, FunctionTool],
        instrumentation: IAMInstrumentation) -> None:
    token = env.refund_token(budget={"tool_calls": 10, "cost": 10000, "llm_tokens": 100})
    from agentic_iam.integrations.llama_index import GuardedFunctionAgent

    llm = scripted(ai("Refund.", call("create_refund", "u1", amount=5, currency="USD",
                                      account="acct-alice")), usage=USAGE)
    wf = GuardedFunctionAgent(name="support-agent", description="Support",
                              tools=list(tools.values()), llm=llm, guard=env.guard)
    await drive(await run_with_identity(wf, REQUEST, token))
    assert backend.calls == []
    assert decided(env, "u1").decision.reasons[0].code == "budget.exhausted"


async def test_calls_outside_guarded_workflows(env: Env, backend: Backend) -> None:
    llm = scripted(ai("hello"), ai("again"), usage=USAGE)
    handler = install_instrumentation(env.guard)
    try:
        await llm.achat([])
        assert handler.unattributed == 1 and handler.charged == 0
    finally:
        uninstall_instrumentation(handler)
    # a default token for LLM calls made outside guarded workflows
    bound = install_instrumentation(env.guard, token=env.refund_token(), model_name="m")
    try:
        assert bound is not handler
        await llm.achat([])
        assert bound.charged == 1
        assert usage_events(env) == [("support-agent", 120)]
    finally:
        uninstall_instrumentation(bound)
