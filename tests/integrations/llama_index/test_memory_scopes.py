"""Memory scopes come from the run's token, not the registry: a retriever wrapper and a node
postprocessor keep only nodes whose `metadata["scope"]` the grant names (Guard.filter_memory).
Inside a protected run they find the current agent's token by themselves (a handoff's narrower
grant reads less); a revoked or expired run reads nothing; every retrieval is on the record
(`memory.retrieved`: kept and dropped ids with scopes, never content)."""

from __future__ import annotations

import hashlib
from typing import Any

from llama_index.core.agent.workflow import AgentWorkflow, FunctionAgent
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from llama_index.core.tools import FunctionTool

from agentic_iam.core.binding import bind
from agentic_iam.integrations.llama_index import (
    ScopedRetriever,
    ScopeFilter,
    protect,
    run_with_identity,
)
from tests.conftest import ALICE, Env
from tests.integrations.llama_index.conftest import (
    FRAMEWORK_WARNINGS,
    REQUEST,
    Backend,
    ai,
    call,
    drive,
    scripted,
)

pytestmark = FRAMEWORK_WARNINGS

NODES = [
    ("n-support", {"scope": "support"}, "refund policy: under 100 needs no approval"),
    ("n-kb", {"scope": "kb:public"}, "public faq"),
    ("n-finance", {"scope": "finance"}, "FINANCE-ONLY ledger notes"),
    ("n-none", {}, "UNSCOPED scratch notes"),
    ("n-list", {"scope": ["support"]}, "LIST-SCOPED note"),
    ("n-empty", {"scope": ""}, "EMPTY-SCOPED note"),
]
OUT_OF_SCOPE = ("FINANCE-ONLY", "UNSCOPED", "LIST-SCOPED", "EMPTY-SCOPED")


class FixedRetriever(BaseRetriever):
    def __init__(self) -> None:
        super().__init__()
        self.queries: list[str] = []

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        self.queries.append(query_bundle.query_str)
        return [NodeWithScore(node=TextNode(id_=i, text=t, metadata=m), score=1.0)
                for i, m, t in NODES]


def retrievals(env: Env) -> list[Any]:
    return [e for e in env.sink.events if e.event_type == "memory.retrieved"]


def ids(nodes: list[NodeWithScore]) -> list[str]:
    return [n.node.node_id for n in nodes]


def test_the_tokens_scopes_decide(env: Env) -> None:
    token = env.refund_token()
    assert token.identity.memory_scopes == {"support", "kb:public"}
    scoped = ScopedRetriever(FixedRetriever(), env.guard, token=token)
    assert ids(scoped.retrieve("refunds")) == ["n-support", "n-kb"]
    event, = retrievals(env)
    assert event.execution_id == token.identity.execution_id
    assert event.framework == "llama_index"
    assert event.memory is not None
    assert list(event.memory.kept_ids) == ["n-support", "n-kb"]
    assert {(d.id, d.scope) for d in event.memory.dropped} == {
        ("n-finance", "finance"), ("n-none", "<missing>"), ("n-list", "<missing>"),
        ("n-empty", "<missing>")}
    assert event.memory.query_digest == hashlib.sha256(b"refunds").hexdigest()
    assert "refund policy" not in repr(event)  # ids and scopes, never content


async def test_narrower_grant_reads_less_and_a_revoked_run_reads_nothing(env: Env) -> None:
    token = env.broker.delegate(ALICE, "support-agent", "refund T-1042", ["ticket:read"], 900,
                                memory_scopes=["kb:public"])
    scoped = ScopedRetriever(FixedRetriever(), env.guard, token=token)
    assert ids(await scoped.aretrieve("q")) == ["n-kb"]
    env.guard.end_execution(token)
    assert await scoped.aretrieve("q") == []
    assert retrievals(env)[-1].memory.reason is not None


def test_without_identity_nothing_is_read(env: Env) -> None:
    assert ScopedRetriever(FixedRetriever(), env.guard).retrieve("q") == []
    event, = retrievals(env)
    assert event.memory is not None and event.memory.kept_count == 0
    assert event.memory.reason is not None


def test_postprocessor_and_query_engine(env: Env) -> None:
    token = env.refund_token()
    scope_filter = ScopeFilter(env.guard, token=token)
    nodes = FixedRetriever().retrieve("q")
    assert ids(scope_filter.postprocess_nodes(nodes, query_str="q")) == ["n-support", "n-kb"]
    # the synthesizing LLM (MockLLM echoes its prompt) never sees out-of-scope text
    with bind(token):  # no token= given: the bound one is used
        engine = RetrieverQueryEngine.from_args(ScopedRetriever(FixedRetriever(), env.guard),
                                                llm=MockLLM())
        answer = str(engine.query("what is the refund policy?"))
    assert "refund policy" in answer
    assert not any(marker in answer for marker in OUT_OF_SCOPE)


async def test_inside_a_run_each_agent_reads_with_its_own_grant(
        env: Env, backend: Backend) -> None:
    """support-agent searches (support + kb:public), hands off to refund-bot, whose narrowed
    grant (support only) reads less through the same retriever, found via the bound token."""
    retriever = ScopedRetriever(FixedRetriever(), env.guard)
    seen: dict[str, list[str]] = {}

    def search_kb(query: str) -> str:
        """Search the knowledge base."""
        backend.record("search_kb", query=query)
        seen["search_kb"] = ids(retriever.retrieve(query))
        return "found"

    async def read_ticket(ticket_id: str) -> str:
        """Read a ticket (and what the knowledge base says about it)."""
        backend.record("read_ticket", ticket_id=ticket_id)
        seen["read_ticket"] = ids(await retriever.aretrieve(ticket_id))
        return "ticket"

    triage = FunctionAgent(name="triage", description="Routes.",
                           tools=[FunctionTool.from_defaults(search_kb)],
                           llm=scripted(ai("Searching.", call("search_kb", "m1", query="q")),
                                        ai("Handing over.", call("handoff", "m2",
                                                                 to_agent="refunds",
                                                                 reason="a refund"))),
                           can_handoff_to=["refunds"])
    refunds = FunctionAgent(name="refunds", description="Refunds.",
                            tools=[FunctionTool.from_defaults(async_fn=read_ticket)],
                            llm=scripted(ai("Reading.", call("read_ticket", "m3",
                                                             ticket_id="T-1042"))))
    workflow = protect(AgentWorkflow(agents=[triage, refunds], root_agent="triage"), env.guard,
                       broker=env.broker, agent_id="support-agent",
                       agent_ids={"refunds": "refund-bot"})
    token = env.refund_token(capabilities=["ticket:read", "kb:search"])
    await drive(await run_with_identity(workflow, REQUEST, token))

    assert seen == {"search_kb": ["n-support", "n-kb"], "read_ticket": ["n-support"]}
    first, second = retrievals(env)
    assert first.agent_id == "support-agent"
    assert second.agent_id == "refund-bot"
    assert second.execution_id != token.identity.execution_id
    assert ("n-kb", "kb:public") in {(d.id, d.scope) for d in second.memory.dropped}
    # the run has ended: its token reads nothing any more
    assert ScopedRetriever(FixedRetriever(), env.guard, token=token).retrieve("q") == []
