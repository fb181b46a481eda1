"""Decisions are linked to the SDK's traces and spans; the user's processors are kept."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from agents import Agent
from agents.tracing import TracingProcessor, set_trace_processors, set_tracing_disabled
from agents.tracing.setup import get_trace_provider

from agentic_iam.integrations.openai_agents import (
    IAMRunContext,
    IAMTracingProcessor,
    iam_run_config,
    install_tracing,
    protect,
)
from tests.conftest import Env
from tests.integrations.openai_agents.conftest import (
    REQUEST,
    Backend,
    Scripted,
    call,
    execute,
    say,
    support_tools,
)


class UserProcessor(TracingProcessor):
    """Stands in for whatever processors the application registered."""

    def __init__(self) -> None:
        self.spans: list[str] = []

    def on_trace_start(self, trace: Any) -> None:
        return None

    def on_trace_end(self, trace: Any) -> None:
        return None

    def on_span_start(self, span: Any) -> None:
        return None

    def on_span_end(self, span: Any) -> None:
        self.spans.append(span.span_data.type)

    def shutdown(self) -> None:
        return None

    def force_flush(self) -> None:
        return None


@pytest.fixture
def local_tracing() -> Iterator[UserProcessor]:
    """Tracing on, with local processors only (no export to OpenAI); restored afterwards."""
    provider: Any = get_trace_provider()
    previous = list(provider._multi_processor._processors)
    user = UserProcessor()
    set_trace_processors([user])  # the test's stand-in for the application's own setup
    set_tracing_disabled(False)
    try:
        yield user
    finally:
        set_tracing_disabled(True)
        set_trace_processors(previous)


@pytest.mark.parametrize("mode", ["run", "streamed"])
def test_audit_events_carry_trace_and_span_ids(env: Env, local_tracing: UserProcessor,
                                              mode: Any) -> None:
    processor = install_tracing(IAMTracingProcessor())
    assert install_tracing(processor) is processor  # idempotent
    backend = Backend()
    model = Scripted([say("Refunding."),
                      call("create_refund", "c1", amount=50, currency="USD", account="acct-42"),
                      call("create_refund", "c2", amount=500, currency="USD",
                           account="acct-42")],
                     [say("done")])
    agent = protect(Agent(name="support-agent", model=model, tools=support_tools(backend)),
                    env.guard)
    execute(mode, agent, REQUEST, context=IAMRunContext(env.refund_token()),
            run_config=iam_run_config(workflow_name="refund-flow", group_id="sess-42"))

    assert "function" in local_tracing.spans  # the user's processor still gets everything
    decided = [e for e in env.sink.events if e.event_type == "tool_call.decided"]
    assert len(decided) == 2
    for event in decided:
        assert event.trace is not None and event.trace.trace_id and event.trace.span_id
        span = processor.span(event.trace.span_id)
        assert span is not None and span.kind == "function" and span.name == event.tool
        assert span.trace_id == event.trace.trace_id
        assert processor.agent_of(span.span_id) == "support-agent"
        assert [r.kind for r in processor.lineage(span.span_id)] == [
            "function", "turn", "agent", "task"]
        trace = processor.trace(event.trace.trace_id)
        assert trace is not None and trace.name == "refund-flow"
        assert trace.group_id == "sess-42"
        (link,) = processor.links(call_id=event.call_id)
        assert link.outcome == event.decision.outcome
        assert (link.trace_id, link.span_id) == (event.trace.trace_id, event.trace.span_id)
    denied = next(e for e in decided if e.call_id == "c2")
    assert processor.span(denied.trace.span_id).error == "agentic-iam refused the call"  # type: ignore[union-attr]
    allowed = next(e for e in decided if e.call_id == "c1")
    assert processor.span(allowed.trace.span_id).error is None  # type: ignore[union-attr]


def test_without_tracing_no_ids(env: Env) -> None:
    backend = Backend()
    model = Scripted([call("search_kb", "k1", query="x")], [say("done")])
    agent = protect(Agent(name="support-agent", model=model, tools=support_tools(backend)),
                    env.guard)
    execute("run", agent, REQUEST, context=IAMRunContext(env.refund_token()))
    (event,) = [e for e in env.sink.events if e.event_type == "tool_call.decided"]
    assert event.trace is None
