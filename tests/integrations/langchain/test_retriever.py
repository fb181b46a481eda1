"""ScopedRetriever: documents outside the agent's memory scopes are dropped (fail closed for
documents without a scope) and recorded."""

from __future__ import annotations

import logging

import pytest
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

from agentic_iam.integrations.langchain import ScopedRetriever
from tests.conftest import Env


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


def test_keeps_only_the_agents_scopes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    spec = env.registry.get("support-agent")
    assert spec is not None
    retriever = ScopedRetriever(ListRetriever(documents=DOCS), spec)
    with caplog.at_level(logging.INFO, logger="agentic_iam.integrations.langchain"):
        kept = retriever.invoke("refund")
    assert [d.id for d in kept] == ["d1", "d2"]
    record = retriever.filtered[-1]
    assert record.count == 4 and record.ids == ("d3", "d4", "d5", "d6")
    assert record.scopes == ("<missing>", "hr")
    assert "dropped 4 document(s)" in caplog.text and "support-agent" in caplog.text
    assert "salary table" not in caplog.text  # ids, never content


def test_plain_scopes_and_a_custom_key() -> None:
    docs = [Document("a", id="1", metadata={"area": "finance"}),
            Document("b", id="2", metadata={"scope": "finance"})]
    retriever = ScopedRetriever(ListRetriever(documents=docs), ["finance"], scope_key="area")
    assert [d.id for d in retriever.invoke("q")] == ["1"]
    assert retriever.filtered[-1].ids == ("2",)


async def test_async_path() -> None:
    retriever = ScopedRetriever(ListRetriever(documents=DOCS), {"hr"})
    kept = await retriever.ainvoke("q")
    assert [d.id for d in kept] == ["d3"]
    assert retriever.filtered[-1].count == 5


def test_nothing_filtered_records_nothing() -> None:
    retriever = ScopedRetriever(ListRetriever(documents=DOCS[:1]), {"support"})
    assert len(retriever.invoke("q")) == 1
    assert retriever.filtered == []


def test_an_agent_without_scopes_sees_nothing() -> None:
    retriever = ScopedRetriever(ListRetriever(documents=DOCS), [])
    assert retriever.invoke("q") == []


def test_one_string_is_not_a_scope_list() -> None:
    with pytest.raises(TypeError):
        ScopedRetriever(ListRetriever(documents=DOCS), "support")
