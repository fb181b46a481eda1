"""Memory scopes are part of the grant: :func:`scoped` inside a guarded tool keeps the items whose
scope the run's token carries, records what it dropped, reads nothing for a revoked run, and a
sub-agent reads only its narrowed scopes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from agents import Agent, function_tool

from agentic_iam.errors import ConfigurationError
from agentic_iam.integrations.openai_agents import IAMRunContext, protect, scoped
from tests.conftest import Env
from tests.integrations.openai_agents.conftest import (
    REQUEST,
    Backend,
    Scripted,
    call,
    events,
    execute,
    say,
)


@dataclass(frozen=True)
class Doc:
    id: str
    scope: str
    text: str


DOCS = (Doc("d1", "support", "refund policy"), Doc("d2", "kb:public", "faq"),
        Doc("d3", "finance", "ledger secrets"), Doc("d4", "", "no scope"))


def retrieval_tool(backend: Backend, name: str = "search_kb", *, revoke: Any = None) -> Any:
    def search(query: str) -> str:
        if revoke is not None:
            revoke()  # the run is revoked while its tool runs
        found = scoped(DOCS, scope_of=lambda d: d.scope, id_of=lambda d: d.id, query=query)
        backend.record(name, query=query)
        return ", ".join(d.id for d in found.kept) or "nothing"

    search.__name__ = name
    search.__doc__ = "Search the knowledge base."
    return function_tool(search)


def kept_and_dropped(env: Env) -> tuple[list[str], list[str]]:
    (event,) = events(env, "memory.retrieved")
    memory = event.memory
    return list(memory.kept_ids), [d.id for d in memory.dropped]


def test_the_grants_scopes_are_kept_and_the_rest_recorded(env: Env, backend: Backend) -> None:
    model = Scripted([call("search_kb", "m1", query="refund")], [say("done")])
    agent = protect(Agent(name="support-agent", model=model, tools=[retrieval_tool(backend)]),
                    env.guard, broker=env.broker)
    token = env.refund_token(capabilities=["kb:search"])

    execute("run", agent, REQUEST, context=IAMRunContext(token))

    assert model.outputs()["m1"] == "d1, d2"  # support, kb:public (support-agent's scopes)
    kept, dropped = kept_and_dropped(env)
    assert kept == ["d1", "d2"] and dropped == ["d3", "d4"]


def test_a_revoked_run_reads_nothing(env: Env, backend: Backend) -> None:
    token = env.refund_token(capabilities=["kb:search"])
    model = Scripted([call("search_kb", "m2", query="refund")], [say("done")])
    tool = retrieval_tool(backend, revoke=lambda: env.broker.revoke(token))
    agent = protect(Agent(name="support-agent", model=model, tools=[tool]), env.guard,
                    broker=env.broker)

    execute("run", agent, REQUEST, context=IAMRunContext(token))

    assert model.outputs()["m2"] == "nothing"
    kept, _ = kept_and_dropped(env)
    assert kept == []


def test_a_sub_agent_reads_only_its_narrowed_scopes(env: Env, backend: Backend) -> None:
    sub_model = Scripted([call("read_ticket", "s1", query="refund")], [say("found d1")])
    sub = Agent(name="refunds", model=sub_model,
                tools=[retrieval_tool(backend, "read_ticket")])
    parent = protect(Agent(name="triage", model=Scripted([call("refunds", "p1", input="look")],
                                                        [say("done")]),
                           tools=[sub.as_tool("refunds", "Executes refunds.")]),
                     env.guard, broker=env.broker, agent_id="support-agent",
                     agent_ids={"refunds": "refund-bot"})

    execute("run", parent, REQUEST, context=IAMRunContext(env.refund_token()))

    assert sub_model.outputs()["s1"] == "d1"
    kept, dropped = kept_and_dropped(env)
    assert kept == ["d1"] and "d2" in dropped  # refund-bot: support only


def test_scoped_outside_a_guarded_tool_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        scoped(DOCS, scope_of=lambda d: d.scope, id_of=lambda d: d.id)
