"""ScopedRetriever: the run's token decides what it reads (Guard.filter_memory). Documents outside
the grant's memory scopes are dropped (fail closed without a scope), a revoked or ended run reads
nothing, a sub-agent reads only its narrowed scopes, and every retrieval is in the audit log."""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.tools import tool

from agentic_iam.core.binding import bind
from agentic_iam.integrations.langchain import IAMContext, ScopedRetriever, protect
from tests.conftest import Env
from tests.integrations.langchain.conftest import (
    REQUEST_TEXT,
    Backend,
    ai,
    call,
    scripted,
    tool_messages,
)


class ListRetriever(BaseRetriever):
    documents: list[Document]

    def _get_relevant_documents(self, query: str, *,
                                run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return list(self.documents)


DOCS = [
    Document("refund policy", id="d1", metadata={"scope": "support"}),
    Document("public faq", id="d2", metadata={"scope": "kb:public"}),
    Document("salary table", id="d3", metadata={"scope": "hr"}),
    Document("orphan note", id="d4", metadata={}),
    Document("odd scope", metadata={"scope": ["support"], "id": "d5"}),
    Document("ledger", id="d6", metadata={"area": "finance"}),
]


def retrieved(env: Env) -> list[Any]:
    return [e for e in env.sink.events if e.event_type == "memory.retrieved"]


def test_keeps_only_the_grants_scopes_and_records_the_drops(env: Env) -> None:
    token = env.refund_token()  # support-agent: support, kb:public
    retriever = ScopedRetriever(ListRetriever(documents=DOCS), env.guard, token=token)
    assert [d.id for d in retriever.invoke("refund")] == ["d1", "d2"]
    [event] = retrieved(env)
    assert event.execution_id == token.identity.execution_id and event.memory is not None
    assert event.memory.kept_ids == ("d1", "d2")
    assert {(d.id, d.scope) for d in event.memory.dropped} == {
        ("d3", "hr"), ("d4", "<missing>"), ("d5", "<missing>"), ("d6", "<missing>")}
    assert event.framework == "langchain"
    assert "salary table" not in json.dumps(event.to_json_dict())  # ids, never content


def test_a_custom_scope_key_and_the_async_path(env: Env) -> None:
    docs = [Document("a", id="1", metadata={"area": "support"}),
            Document("b", id="2", metadata={"scope": "support"})]
    retriever = ScopedRetriever(ListRetriever(documents=docs), env.guard,
                                token=env.refund_token(), scope_key="area")
    assert [d.id for d in retriever.invoke("q")] == ["1"]


async def test_async_path(env: Env) -> None:
    retriever = ScopedRetriever(ListRetriever(documents=DOCS), env.guard,
                                token=env.refund_token(memory_scopes=["kb:public"]))
    assert [d.id for d in await retriever.ainvoke("q")] == ["d2"]


def test_a_revoked_or_ended_run_reads_nothing(env: Env) -> None:
    token = env.refund_token()
    retriever = ScopedRetriever(ListRetriever(documents=DOCS), env.guard, token=token)
    assert len(retriever.invoke("q")) == 2
    env.guard.end_execution(token)
    assert retriever.invoke("q") == []
    assert retrieved(env)[-1].memory.reason  # type: ignore[union-attr]


def test_no_token_in_scope_reads_nothing(env: Env) -> None:
    retriever = ScopedRetriever(ListRetriever(documents=DOCS), env.guard)
    assert retriever.invoke("q") == []


def test_the_bound_token_is_the_runs(env: Env) -> None:
    retriever = ScopedRetriever(ListRetriever(documents=DOCS), env.guard)
    child = env.broker.subdelegate_for(env.refund_token(), "refund-bot")
    with bind(child):  # a sub-agent's run: parent's scopes ∩ refund-bot's = {support}
        assert [d.id for d in retriever.invoke("q")] == ["d1"]
    assert retrieved(env)[-1].agent_id == "refund-bot"


def test_a_list_of_scopes_is_not_a_grant(env: Env) -> None:
    """The old constructor took the registry's scopes: a revoked run would still read."""
    spec = env.registry.get("support-agent")
    for wrong in (spec, ["support"], "support"):
        with pytest.raises(TypeError):
            ScopedRetriever(ListRetriever(documents=DOCS), wrong)  # type: ignore[arg-type]


def test_inside_a_protected_agent_the_run_context_decides(env: Env, backend: Backend) -> None:
    """A tool that searches memory reads with the run's own token (from its context)."""
    retriever = ScopedRetriever(ListRetriever(documents=DOCS), env.guard)

    @tool
    def search_kb(query: str) -> str:
        """Search the knowledge base."""
        backend.record("search_kb", query=query)
        return " | ".join(d.page_content for d in retriever.invoke(query))

    from langchain.agents import create_agent
    model = scripted(ai("Searching.", call("search_kb", "m1", query="refunds")), ai("done"))
    agent = protect(create_agent(model, tools=[search_kb], context_schema=IAMContext),
                    env.guard, agent_id="support-agent")
    token = env.refund_token(capabilities=["kb:search"], memory_scopes=["support"])
    result = agent.invoke(REQUEST_TEXT, context=IAMContext(token.token))
    assert tool_messages(result)["m1"].text == "refund policy"
    event = retrieved(env)[-1]
    assert event.execution_id == token.identity.execution_id
    assert event.memory is not None and event.memory.dropped_count == 5

