"""``protect()``: one call, same object, idempotent, never mutates the user's tool objects, and
matches the signature ``Project.protect`` dispatches to."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from agents import Agent

from agentic_iam.errors import ConfigurationError
from agentic_iam.integrations import openai_agents
from agentic_iam.integrations.openai_agents import IAMRunContext, protect
from tests.conftest import Env, EnvFactory
from tests.integrations.openai_agents.conftest import (
    REQUEST,
    Backend,
    Scripted,
    call,
    decided,
    execute,
    say,
    support_tools,
)


def test_protect_returns_the_same_agent_and_leaves_the_tools_alone(env: Env,
                                                                    backend: Backend) -> None:
    tools = support_tools(backend)
    before = [(t.on_invoke_tool, t.needs_approval, t.tool_input_guardrails) for t in tools]
    agent: Agent[Any] = Agent(name="support-agent", tools=tools)

    assert protect(agent, env.guard, broker=env.broker) is agent
    assert isinstance(agent, Agent) and type(agent).__name__ == "Agent"
    assert protect(agent, env.guard, broker=env.broker) is agent  # idempotent
    assert [(t.on_invoke_tool, t.needs_approval, t.tool_input_guardrails)
            for t in agent.tools] == before
    assert agent.tools == tools


def test_protect_with_another_guard_is_refused(env: Env, make_env: EnvFactory) -> None:
    agent = protect(Agent(name="support-agent"), env.guard, broker=env.broker)
    with pytest.raises(ConfigurationError, match="different Guard"):
        protect(agent, make_env().guard)


def test_the_signature_is_the_one_project_protect_calls() -> None:
    parameters = inspect.signature(openai_agents.protect).parameters
    assert list(parameters)[:2] == ["agent", "guard"]
    for name in ("broker", "agent_id"):
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_agent_hooks_of_the_user_still_fire(env: Env, backend: Backend) -> None:
    from agents import AgentHooks

    seen: list[str] = []

    class Mine(AgentHooks[Any]):
        async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:
            seen.append(tool.name)

    model = Scripted([call("search_kb", "h1", query="refund")], [say("done")])
    agent = protect(Agent(name="support-agent", model=model, tools=support_tools(backend),
                          hooks=Mine()), env.guard, broker=env.broker)
    clone = agent.clone()
    execute("run", clone, REQUEST, context=IAMRunContext(
        env.refund_token(capabilities=["kb:search"])))
    assert seen == ["search_kb"]
    assert decided(env)["h1"].decision.outcome == "allow"
