"""Memory scopes: a retriever wrapper and a node postprocessor keep only nodes whose
`metadata["scope"]` is one of the agent's memory scopes. Nodes without a scope are dropped (fail
closed), and every drop is recorded (ids and scopes, never content)."""

from __future__ import annotations

import hashlib

import pytest
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from agentic_iam.integrations.llama_index import FilteredNodes, ScopedRetriever, ScopeFilter
from tests.conftest import Env

NODES = [
    ("n-support", {"scope": "support"}, "refund policy: under 100 needs no approval"),
    ("n-kb", {"scope": "kb:public"}, "public faq"),
    ("n-finance", {"scope": "finance"}, "FINANCE-ONLY ledger notes"),
    ("n-none", {}, "UNSCOPED scratch notes"),
    ("n-list", {"scope": ["support"]}, "LIST-SCOPED note"),
    ("n-empty", {"scope": ""}, "EMPTY-SCOPED note"),
    ("n-label", {"tenant": "support"}, "OTHER-KEY note"),
]


class FixedRetriever(BaseRetriever):
    def __init__(self) -> None:
        super().__init__()
        self.queries: list[str] = []

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        self.queries.append(query_bundle.query_str)
        return [NodeWithScore(node=TextNode(id_=i, text=t, metadata=m), score=1.0)
                for i, m, t in NODES]


def test_retriever_keeps_only_the_agents_scopes(env: Env) -> None:
    spec = env.registry.get("support-agent")
    assert spec is not None and set(spec.memory_scopes) == {"support", "kb:public"}
    scoped = ScopedRetriever(FixedRetriever(), spec)
    kept = scoped.retrieve("refunds")
    assert [n.node.node_id for n in kept] == ["n-support", "n-kb"]
    assert scoped.filtered == [FilteredNodes(
        query_digest=hashlib.sha256(b"refunds").hexdigest(), count=5,
        ids=("n-finance", "n-none", "n-list", "n-empty", "n-label"),
        scopes=("<missing>", "finance"))]
    assert scoped.filter.agent_id == "support-agent"


async def test_async_and_custom_key(env: Env) -> None:
    scoped = ScopedRetriever(FixedRetriever(), ["support"], scope_key="tenant",
                             agent_id="x", max_records=1)
    kept = await scoped.aretrieve("q1")
    assert [n.node.node_id for n in kept] == ["n-label"]
    await scoped.aretrieve("q2")
    assert len(scoped.filtered) == 1  # bounded
    assert scoped.filtered[0].query_digest == hashlib.sha256(b"q2").hexdigest()


def test_agent_without_scopes_reads_nothing(env: Env) -> None:
    spec = env.registry.get("refund-bot")
    assert spec is not None and not spec.memory_scopes
    assert ScopedRetriever(FixedRetriever(), spec).retrieve("anything") == []


def test_postprocessor_and_query_engine(env: Env) -> None:
    spec = env.registry.get("support-agent")
    assert spec is not None
    scope_filter = ScopeFilter(spec)
    nodes = FixedRetriever().retrieve("q")
    assert [n.node.node_id for n in scope_filter.postprocess_nodes(nodes, query_str="q")] == [
        "n-support", "n-kb"]
    # the synthesizing LLM (MockLLM echoes its prompt) never sees out-of-scope text
    engine = RetrieverQueryEngine.from_args(ScopedRetriever(FixedRetriever(), spec),
                                            llm=MockLLM())
    answer = str(engine.query("what is the refund policy?"))
    assert "refund policy" in answer
    for marker in ("FINANCE-ONLY", "UNSCOPED", "LIST-SCOPED", "EMPTY-SCOPED", "OTHER-KEY"):
        assert marker not in answer


def test_one_string_is_not_a_scope_list() -> None:
    with pytest.raises(TypeError, match="not one string"):
        ScopeFilter("support")
