"""OpenAI Agents SDK adapter: every local tool call of a protected agent goes through the Guard.

What it gives you (``pip install "agentic-iam[openai-agents]"``, openai-agents >= 0.24):

- :func:`protect` — attaches the Guard to an ``Agent`` and, recursively, to every agent it can
  reach (handoff targets, agents used ``as_tool``, cycles handled, idempotent). For every
  ``FunctionTool`` it installs:

  * a ``needs_approval`` callable that asks :meth:`Guard.authorize` (the first point the SDK
    offers, before any guardrail) and answers ``True`` only for ``approval_required``, so the
    SDK's own pause/resume runs (``result.interruptions``, ``state.approve(item)``,
    ``Runner.run(agent, state)``). On resume the adapter records the human's answer with
    :meth:`Guard.resolve_approval` and authorizes the same call again (allowed once);
  * a tool input guardrail (last in the list) that turns the decision into the SDK's native
    outcome: ``allow``, or ``ToolGuardrailFunctionOutput.reject_content(decision.model_message())``
    — a tool result the model reads on its next turn; the run goes on;
  * an ``on_invoke_tool`` wrapper that runs the tool with ``decision.arguments`` (the Guard's
    checked copy, serialized back to JSON) and never runs it without an ``allow`` decision;
  * a tool output guardrail (first in the list) that screens the output with
    :meth:`Guard.screen` and settles the call with :meth:`Guard.complete`. It replaces the output
    with the screened text (``reject_content``, the SDK's only way for a guardrail to replace an
    output) unless the output was a string the screen left unchanged. Output guardrails that
    were on the tool before run inside it, on the screened text (the SDK runs output guardrails
    on the *raw* output and stops at the first rejection, so leaving them in front would let
    unscreened text through).

  MCP servers (``agent.mcp_servers``) get the same input and output guardrails through the
  SDK's ``MCPServer.tool_input_guardrails`` / ``tool_output_guardrails`` attributes, which
  ``MCPUtil.to_function_tool`` copies onto the tools it builds on every turn.
  Handoffs (``Handoff.on_invoke_handoff``) and ``as_tool`` invocations mint a narrower identity
  with :meth:`DelegationBroker.subdelegate_for` for the receiving agent; handoffs and agent tools
  the grant or the registry (``may_delegate_to``) does not allow are hidden with ``is_enabled``.
- :class:`IAMRunContext` — the per-run identity: ``Runner.run(agent, input,
  context=IAMRunContext(token))``. Any context object with an ``aiam_token`` attribute works too.
  A run without a valid token cannot call tools (the Guard denies every call).
- Executions end with their run: when the run produces its final output (the SDK calls the
  agent hooks :func:`protect` installs, ``on_end``; an approval interruption is not the end),
  the run's execution ends (:meth:`Guard.end_execution`: it and every token sub-delegated from
  it stop working). For a conversation of several runs with one context, pass
  ``IAMRunContext(token, end_on_finish=False)`` (any context: an ``aiam_end_on_finish``
  attribute set to ``False``) and end the token yourself. Identities minted for handoffs and
  ``as_tool`` sub-runs always end with their run (an ``as_tool`` sub-run that fails ends its
  identity too; one paused for a human keeps it until it resumes); after a run with handoffs, an
  opted-out context holds the root token again. A run that raises has not finished: end its
  token yourself or let it expire.
- :class:`IAMRunHooks` — ``RunHooks`` capturing the reasoning context in ``on_llm_end`` (message
  text, reasoning summaries, response id, keyed by call id), charging LLM usage to the token's
  budget and recording the user's request for argument provenance. :func:`protect` also installs
  the same capture as ``AgentHooks`` on every agent, because the SDK does not pass run hooks to
  the nested run of an ``as_tool`` agent; captures are de-duplicated per model response.
- :func:`iam_run_config` — a ``RunConfig`` whose ``tool_not_found_behavior`` turns a call to a
  hidden (refused) handoff into a model-readable refusal instead of ``ModelBehaviorError``.
- :class:`IAMTracingProcessor` / :func:`install_tracing` — a ``TracingProcessor`` (added with
  ``add_trace_processor``, never ``set_trace_processors``) indexing the SDK's traces and spans
  and linking each Guard decision to the function span it was made in. When tracing is on,
  every audit event of a call carries ``trace.trace_id`` / ``trace.span_id`` (passed through
  ``ReasoningContext``) and a refused call's function span gets an error.
- :func:`approve` / :func:`reject` (also ``IAMRunContext.approve`` / ``.reject``) — answer a
  paused call as a named, configured approver (``GuardConfig.approvers``). Plain
  ``state.approve(item)`` names nobody: it counts only with ``IAMRunContext(approver=...)``
  naming a configured approver; otherwise the Guard refuses it (recorded) and the call is not
  run.

Handoffs and ``as_tool`` calls are delegations, authorized by the broker (registry
``may_delegate_to``, a grant that narrows) rather than Guard tool calls, so ``transfer_to_*`` and
agent-tool names need no registry entry; the receiving agent's own tool calls are guarded. The
Guard is synchronous and is called on the event loop.

What it must never do: run a tool of a protected agent without an ``allow`` decision for that
exact call, or with arguments other than the checked copy; let tool output reach the model
unscreened; let a sub-agent run with its parent's identity or a wider one; put a token in a
message, a span, a log line or an approval item; turn a refusal into a crash of the run.

Known limits (each is a property of the SDK, verified against openai-agents 0.24.0):

- MCP tools are rebuilt by the SDK on every turn, so the adapter cannot wrap their
  ``on_invoke_tool`` or ``needs_approval``. They are authorized in the input guardrail; they run
  with ``tool_call.arguments``, the very (immutable) string whose ``json.loads`` the guardrail
  checked — ``MCPUtil.invoke_mcp_tool`` parses it with the same ``json.loads``, so the checked
  copy equals what runs. An ``approval_required`` MCP call is refused with the approval message
  (the server-level ``require_approval`` policy receives neither arguments nor call id, so it
  cannot decide per call); approve it out of band (``aiam approvals approve``) and the model's
  retry of the same call is allowed once.
- A decorated tool whose ``needs_approval`` is a callable normally gets the SDK's conservative
  check (a manual approval whenever validation would change the arguments). Behind the
  adapter's wrappers the tool's own ``needs_approval`` is asked after the Guard, with the parsed
  arguments; the tool then runs with the Guard's checked copy.
- A hidden handoff or agent tool that the model calls anyway is a "tool not found" for the SDK:
  without :func:`iam_run_config` the run ends with ``ModelBehaviorError`` (nothing was
  transferred); with it the model reads the refusal. A handoff refused only when invoked (the
  grant changed after it was offered) cannot be refused with a tool result in the SDK: the
  current agent stays in charge and the transfer message carries the refusal.
- Hosted tools (web/file search, code interpreter, hosted MCP, ...) run on OpenAI's side and
  local computer/shell/patch tools are not ``FunctionTool``s: :func:`protect` refuses agents
  carrying them unless ``allow_unguarded_tools=True``.
- A tool whose exception is turned into a message by ``failure_error_function`` (the SDK
  default) looks like a successful call to the adapter: its message is screened and the call is
  settled as ``success``. A tool that raises through the wrapper is charged (``error``); an
  allowed call whose tool never started (refused by the wrapper, or left behind when the turn
  ends before our input guardrail ran) is cancelled (:meth:`Guard.cancel`).
- ``as_tool`` outputs are the sub-agent's final text (model output built from screened tool
  results) and are not screened again; the sub-agent's own tool calls are.
- State lives in the context object: resuming a run works in-process (``result.to_state()``),
  not from a serialized ``RunState``.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import secrets
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NoReturn

from agentic_iam.errors import MissingExtraError

try:
    from agents.agent import Agent
    from agents.handoffs import Handoff, handoff
    from agents.items import ModelResponse, ToolApprovalItem, TResponseInputItem
    from agents.lifecycle import AgentHooks, AgentHooksBase, RunHooks
    from agents.run_config import RunConfig, ToolErrorFormatterArgs
    from agents.run_context import RunContextWrapper
    from agents.run_state import RunState
    from agents.tool import FunctionTool
    from agents.tool_context import ToolContext
    from agents.tool_guardrails import (
        ToolGuardrailFunctionOutput,
        ToolInputGuardrail,
        ToolInputGuardrailData,
        ToolOutputGuardrail,
        ToolOutputGuardrailData,
    )
    from agents.tracing import (
        TracingProcessor,
        add_trace_processor,
        get_current_span,
        get_current_trace,
    )
    from agents.tracing.spans import NoOpSpan, Span, SpanError
    from agents.tracing.traces import NoOpTrace, Trace
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    _missing = (exc.name or "agents").split(".")[0]
    raise MissingExtraError("openai-agents",
                            "openai-agents" if _missing == "agents" else _missing) from exc

from agentic_iam.core.broker import CapabilitiesLike, DelegationBroker
from agentic_iam.core.decision import Decision, Reason, ReasoningContext, ToolCall
from agentic_iam.core.guard import Guard
from agentic_iam.core.identity import ExecutionIdentity
from agentic_iam.core.tokens import ExecutionToken
from agentic_iam.errors import ConfigurationError, DelegationError

__all__ = [
    "DEFAULT_APPROVER",
    "DecisionLink",
    "IAMRunContext",
    "IAMRunHooks",
    "IAMTracingProcessor",
    "Narrowing",
    "SpanRecord",
    "TraceRecord",
    "approve",
    "iam_run_config",
    "install_tracing",
    "protect",
    "reject",
]

log = logging.getLogger("agentic_iam.integrations.openai_agents")

FRAMEWORK = "openai_agents"
DEFAULT_APPROVER = "openai-agents:RunState.approve"
"""The approver claimed when a run resumes after ``state.approve(item)`` without :func:`approve`
and without ``IAMRunContext(approver=...)``. The SDK does not say who approved, so this is not an
accountable approver: the Guard refuses it (unless someone configured it)."""

_INPUT_NAME = "agentic_iam.authorize"
_OUTPUT_NAME = "agentic_iam.screen"
_MARK = "_aiam_protection"
_STATE_ATTR = "_aiam_state"
_NO_OP = "no-op"
_RESPONSES_KEPT = 64

TokenLike = ExecutionToken | str
Narrowing = Callable[[ExecutionIdentity, str], CapabilitiesLike | None]
"""``narrow(parent_identity, child_registry_id)`` → the child's capabilities (``None``: the
default, the parent's grant intersected with the child's registry tools)."""

_HANDOFF_REFUSAL: ContextVar[str | None] = ContextVar("aiam_handoff_refusal", default=None)


# --- per-run state -------------------------------------------------------------------------


@dataclass(eq=False)
class _Shared:
    """State shared by a run and the nested runs of its ``as_tool`` agents."""

    approvers: dict[str, str] = field(default_factory=dict)
    """call id → who approved it (set by :func:`approve`)."""
    approval_ids: dict[str, str] = field(default_factory=dict)
    """call id → the Guard's approval request."""
    guard: Guard | None = None
    """The Guard that decided calls of this run (for :func:`reject`)."""


@dataclass(frozen=True)
class _Asked:
    """What the model said when it asked for a call."""

    message: str | None
    model: str | None
    response_id: str | None


@dataclass(eq=False)
class _RunState:
    """The adapter's bookkeeping for one run context (never shown to the model)."""

    shared: _Shared
    run_id: str
    parent_run_id: str | None = None
    nested: bool = False
    """True for the context of an ``as_tool`` sub-agent: its input was written by a model."""
    reasoning: dict[str, _Asked] = field(default_factory=dict)
    decided: dict[str, Decision] = field(default_factory=dict)
    """Decisions taken in ``needs_approval``, waiting for the input guardrail."""
    authorized: dict[str, Decision] = field(default_factory=dict)
    """Allowed calls between the input guardrail and the output guardrail."""
    failed: set[str] = field(default_factory=set)
    children: dict[str, Any] = field(default_factory=dict)
    """call id → the context minted for an ``as_tool`` sub-agent (reused on resume)."""
    responses: OrderedDict[int, ModelResponse] = field(default_factory=OrderedDict)
    observed_request: bool = False
    current_agent: Agent[Any] | None = None
    refused: dict[str, str] = field(default_factory=dict)
    """tool name → why a handoff/agent tool is hidden (for :func:`iam_run_config`)."""
    root: TokenLike | None = field(default=None, repr=False)
    """The token the run started with (the user's, or the one minted for an ``as_tool``)."""
    minted: list[TokenLike] = field(default_factory=list, repr=False)
    """Tokens minted for handoffs during the run: they end with the run, always."""
    awaiting: set[str] = field(default_factory=set)
    """Calls the run paused on for a human (until the model is asked again)."""
    ended: bool = False
    """The run finished and its root execution was ended."""


def _new_state(shared: _Shared | None = None, parent: _RunState | None = None) -> _RunState:
    return _RunState(shared=shared or _Shared(), run_id="oa_run_" + secrets.token_hex(8),
                     parent_run_id=parent.run_id if parent else None, nested=parent is not None)


@dataclass(eq=False)
class IAMRunContext:
    """The identity of one run: ``Runner.run(agent, input, context=IAMRunContext(token))``.

    Tools that need the application's own context read ``ctx.context.user_context``. After a
    handoff, ``token`` is the narrower token minted for the receiving agent. It also carries the
    adapter's bookkeeping for the run (decisions between hooks, reasoning by call id), so use
    one per run; resuming with ``Runner.run(agent, state)`` keeps the same object. When the run
    finishes (final output), its execution ends unless ``end_on_finish=False``.
    """

    token: TokenLike | None
    """The execution token of the agent currently running (``None``: no tool may run)."""
    user_context: Any = None
    """The application's own context object, for its tools."""
    approver: str = DEFAULT_APPROVER
    """Who approved when the SDK resumes a call approved with plain ``state.approve(item)``
    (without :meth:`approve`): a configured approver id (``GuardConfig.approvers``). The
    default is refused by the Guard."""
    end_on_finish: bool = True
    """End the execution (:meth:`Guard.end_execution`) when the run produces its final output.
    ``False`` keeps it for a conversation of several runs with this context (end it yourself
    with ``guard.end_execution(token)``); identities minted for handoffs end with each run."""
    _state: _RunState = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._state = _new_state()
        self._state.root = self.token

    @property
    def aiam_end_on_finish(self) -> bool:
        """``end_on_finish`` under the name every adapter looks for."""
        return self.end_on_finish

    @property
    def run_id(self) -> str:
        """The id recorded as ``reasoning.run_id`` on this run's audit events."""
        return self._state.run_id

    def approve(self, state: RunState[Any], item: ToolApprovalItem, *, approver: str,
                always_approve: bool = False) -> None:
        """Approve a paused call as ``approver``; then resume with ``Runner.run(agent, state)``."""
        approve(self, state, item, approver=approver, always_approve=always_approve)

    def reject(self, state: RunState[Any], item: ToolApprovalItem, *, approver: str,
               message: str | None = None) -> None:
        """Reject a paused call as ``approver``; then resume with ``Runner.run(agent, state)``."""
        reject(self, state, item, approver=approver, message=message)


def _token_of(context: object) -> TokenLike | None:
    if isinstance(context, IAMRunContext):
        return context.token
    token = getattr(context, "aiam_token", None)
    return token if isinstance(token, (str, ExecutionToken)) else None


def _end_on_finish(context: object) -> bool:
    """False only when the context opts out (``aiam_end_on_finish`` is ``False``)."""
    return getattr(context, "aiam_end_on_finish", None) is not False


def _set_token(context: object, token: TokenLike) -> None:
    if isinstance(context, IAMRunContext):
        context.token = token
    else:
        setattr(context, "aiam_token", token)  # noqa: B010 - the documented attribute


def _state_of(context: object) -> _RunState | None:
    """The adapter's state for a run context, created on first use (``None``: cannot carry it)."""
    if isinstance(context, IAMRunContext):
        return context._state
    if context is None:
        return None
    state = getattr(context, _STATE_ATTR, None)
    if isinstance(state, _RunState):
        return state
    state = _new_state()
    state.root = _token_of(context)
    try:
        setattr(context, _STATE_ATTR, state)
    except (AttributeError, TypeError):
        return None
    return state


def _end(guard: Guard, token: TokenLike, reason: str) -> bool:
    """End one execution; False (logged) when it could not be: the run's work is done, and
    raising would not make the token any less valid (it still expires at its ``exp``)."""
    try:
        guard.end_execution(_raw(token), reason=reason)
    except Exception as exc:  # see the docstring
        log.warning("could not end an execution (%s): %s", reason, type(exc).__name__)
        return False
    return True


def _finish_run(guard: Guard, context: object, reason: str) -> None:
    """The run of ``context`` is over: end the identities minted for its handoffs, always, and
    its root one unless the context opted out (an ``as_tool`` sub-run never does)."""
    state = _state_of(context)
    if state is None or state.ended:
        return
    current = _token_of(context)
    root = state.root if state.root is not None else current
    left: list[TokenLike] = []
    for token in state.minted:
        if (root is None or _raw(token) != _raw(root)) and not _end(guard, token, reason):
            left.append(token)  # tried again when the run ends next time
    state.minted = left
    if root is None:
        return
    if state.nested or _end_on_finish(context):
        state.ended = _end(guard, root, reason)
    elif current is not None and _raw(current) != _raw(root):
        # The root identity outlives the run; the handoff ones ended: the next run with this
        # context starts again under the root identity.
        _set_token(context, root)


def _raw(token: TokenLike) -> str:
    return token.token if isinstance(token, ExecutionToken) else token


def _call_id_of(item: ToolApprovalItem) -> str | None:
    raw = item.raw_item
    call_id = raw.get("call_id") if isinstance(raw, Mapping) else getattr(raw, "call_id", None)
    return call_id if isinstance(call_id, str) else None


def approve(context: object, state: RunState[Any], item: ToolApprovalItem, *, approver: str,
            always_approve: bool = False) -> None:
    """Approve a paused call (``result.interruptions``) as ``approver``.

    ``context`` is the object passed as ``Runner.run(context=...)``. The Guard's approval request
    is resolved when the run resumes and the same call is authorized again (allowed once).
    """
    run_state = _state_of(context)
    call_id = _call_id_of(item)
    if run_state is not None and call_id is not None:
        run_state.shared.approvers[call_id] = approver
    state.approve(item, always_approve=always_approve)


def reject(context: object, state: RunState[Any], item: ToolApprovalItem, *, approver: str,
           message: str | None = None) -> None:
    """Reject a paused call as ``approver``: the Guard's approval request is denied now."""
    run_state = _state_of(context)
    call_id = _call_id_of(item)
    if run_state is not None and call_id is not None:
        approval_id = run_state.shared.approval_ids.pop(call_id, None)
        guard = run_state.shared.guard
        if approval_id is not None and guard is not None:
            try:
                guard.resolve_approval(approval_id, approved=False, approver=approver)
            except Exception as exc:  # the call stays refused either way
                log.warning("could not record the rejection of %s: %s", approval_id,
                            type(exc).__name__)
    state.reject(item, rejection_message=message)


# --- reasoning capture, usage, request provenance -------------------------------------------


def _model_name(agent: Agent[Any]) -> str | None:
    model = agent.model
    if isinstance(model, str):
        return model
    if model is None:
        return None
    name = getattr(model, "model", None)
    return name if isinstance(name, str) else type(model).__name__


def _capture(guard: Guard | None, context: RunContextWrapper[Any], agent: Agent[Any],
             response: ModelResponse) -> None:
    """Key the model's message, reasoning summaries and response id by the calls it asked for."""
    state = _state_of(context.context)
    if state is None:
        return
    key = id(response)
    if state.responses.get(key) is response:
        return  # RunHooks and AgentHooks both saw this response
    state.responses[key] = response
    while len(state.responses) > _RESPONSES_KEPT:
        state.responses.popitem(last=False)
    texts: list[str] = []
    summaries: list[str] = []
    call_ids: list[str] = []
    for item in response.output:
        kind = getattr(item, "type", None)
        if kind == "message":
            for part in getattr(item, "content", None) or ():
                text = getattr(part, "text", None) or getattr(part, "refusal", None)
                if isinstance(text, str) and text:
                    texts.append(text)
        elif kind == "reasoning":
            for summary in getattr(item, "summary", None) or ():
                text = getattr(summary, "text", None)
                if isinstance(text, str) and text:
                    summaries.append(text)
        call_id = getattr(item, "call_id", None)
        if isinstance(call_id, str) and call_id:
            call_ids.append(call_id)
    parts = [*texts, *(f"(reasoning) {s}" for s in summaries)]
    asked = _Asked("\n".join(parts) or None, _model_name(agent), response.response_id)
    for call_id in call_ids:
        state.reasoning[call_id] = asked
    token = _token_of(context.context)
    usage = response.usage
    if guard is None or token is None or not (usage.input_tokens or usage.output_tokens):
        return
    try:
        guard.charge_usage(token, input_tokens=usage.input_tokens,
                           output_tokens=usage.output_tokens, model=asked.model,
                           framework=FRAMEWORK)
    except Exception as exc:  # accounting; the next tool call is checked anyway
        log.warning("could not charge LLM usage: %s", type(exc).__name__)


def _input_texts(items: Iterable[TResponseInputItem]) -> list[str]:
    texts: list[str] = []
    for item in items:
        if not isinstance(item, Mapping) or item.get("role") != "user":
            continue
        content = item.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(part["text"] for part in content
                         if isinstance(part, Mapping) and isinstance(part.get("text"), str))
    return texts


def _before_llm(guard: Guard | None, context: RunContextWrapper[Any], agent: Agent[Any],
                input_items: list[TResponseInputItem]) -> None:
    state = _state_of(context.context)
    if state is None:
        return
    state.current_agent = agent
    if state.root is None:
        state.root = _token_of(context.context)
    state.awaiting.clear()  # the model is asked again: no pause is pending any more
    # Allowed decisions nobody consumed: the turn is over. One still waiting for the input
    # guardrail never ran (a guardrail in front of ours rejected the call): cancelled. One
    # past our guardrail may have started (the run was cancelled mid-call): charged.
    for started, table in ((False, state.decided), (True, state.authorized)):
        for call_id, decision in list(table.items()):
            if decision.outcome == "approval_required":
                continue
            del table[call_id]
            if not decision.allowed or guard is None:
                continue
            if started:
                guard.complete(decision, "error")
            else:
                guard.cancel(decision)
    # What the user asked for, for argument provenance: only the input of the first model call
    # of a top-level run (later inputs hold tool output; a sub-agent's input is model-written).
    if state.observed_request or state.nested:
        return
    state.observed_request = True
    token = _token_of(context.context)
    texts = _input_texts(input_items)
    if guard is None or token is None or not texts:
        return
    try:
        guard.observe(token, texts, "request")
    except Exception as exc:  # provenance only; unknown values stay "unknown"
        log.warning("could not record the user's request: %s", type(exc).__name__)


class IAMRunHooks(RunHooks[Any]):
    """``RunHooks`` for protected runs: reasoning capture, LLM usage, request provenance.

    Pass ``hooks=IAMRunHooks(guard)`` to ``Runner.run``; subclass it (and call ``super()``) to
    add your own hooks. Capture is observe-only and never raises into the run.
    """

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def on_llm_start(self, context: RunContextWrapper[Any], agent: Agent[Any],
                           system_prompt: str | None,
                           input_items: list[TResponseInputItem]) -> None:
        _safely(_before_llm, self.guard, context, agent, input_items)

    async def on_llm_end(self, context: RunContextWrapper[Any], agent: Agent[Any],
                         response: ModelResponse) -> None:
        _safely(_capture, self.guard, context, agent, response)


def _safely(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:  # a hook exception would abort the whole run
        log.warning("agentic-iam hook failed: %s", type(exc).__name__)


class _IAMAgentHooks(AgentHooks[Any]):
    """Per-agent hooks installed by :func:`protect`, forwarding to the agent's own hooks.

    They exist because the SDK does not hand run hooks to the nested run of an ``as_tool``
    agent, while an agent's own hooks fire in every run it takes part in.
    """

    def __init__(self, guard: Guard, inner: AgentHooksBase[Any, Any] | None) -> None:
        self.guard = guard
        self.inner = inner

    async def on_start(self, context: Any, agent: Any) -> None:
        if self.inner is not None:
            await self.inner.on_start(context, agent)

    async def on_end(self, context: Any, agent: Any, output: Any) -> None:
        # The SDK calls this when the run (or an ``as_tool`` sub-run) produces its final output
        # (run_internal/turn_resolution.py run_final_output_hooks); not when it pauses for an
        # approval. The run's executions end here.
        _safely(_finish_run, self.guard, getattr(context, "context", None), "completed")
        if self.inner is not None:
            await self.inner.on_end(context, agent, output)

    async def on_handoff(self, context: Any, agent: Any, source: Any) -> None:
        if self.inner is not None:
            await self.inner.on_handoff(context, agent, source)

    async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
        if self.inner is not None:
            await self.inner.on_tool_start(context, agent, tool)

    async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:
        if self.inner is not None:
            await self.inner.on_tool_end(context, agent, tool, result)

    async def on_llm_start(self, context: Any, agent: Any, system_prompt: str | None,
                           input_items: list[TResponseInputItem]) -> None:
        _safely(_before_llm, self.guard, context, agent, input_items)
        if self.inner is not None:
            await self.inner.on_llm_start(context, agent, system_prompt, input_items)

    async def on_llm_end(self, context: Any, agent: Any, response: ModelResponse) -> None:
        _safely(_capture, self.guard, context, agent, response)
        if self.inner is not None:
            await self.inner.on_llm_end(context, agent, response)


# --- tracing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceRecord:
    """An SDK trace as the processor saw it start."""

    trace_id: str
    """The SDK's trace id."""
    name: str
    """The workflow name."""
    group_id: str | None
    """``RunConfig.group_id`` (a session or thread id)."""
    metadata: Mapping[str, Any] | None
    """``RunConfig.trace_metadata``."""


@dataclass(frozen=True)
class SpanRecord:
    """An SDK span (no input or output is kept)."""

    span_id: str
    """The SDK's span id."""
    trace_id: str
    """Its trace."""
    parent_id: str | None
    """The enclosing span."""
    kind: str
    """``agent``, ``function``, ``handoff``, ``generation``, ``response``, ``custom`` ..."""
    name: str | None
    """Agent or tool name, when the span has one."""
    error: str | None = None
    """The span's error message once ended, if any."""


@dataclass(frozen=True)
class DecisionLink:
    """A Guard decision and the SDK span it was made in."""

    trace_id: str | None
    """The trace the decision was made in."""
    span_id: str | None
    """The function span of the call."""
    call_id: str
    """The tool call id (as on the audit event)."""
    tool: str
    """Tool name."""
    outcome: str
    """``allow``, ``deny`` or ``approval_required``."""
    execution_id: str | None
    """The execution that asked."""
    codes: tuple[str, ...]
    """Reason codes."""


_PROCESSORS: weakref.WeakSet[IAMTracingProcessor] = weakref.WeakSet()
_INSTALLED: weakref.WeakSet[IAMTracingProcessor] = weakref.WeakSet()


class IAMTracingProcessor(TracingProcessor):
    """Indexes the SDK's traces and spans and links them to the Guard's decisions.

    Observe-only (the SDK gives tracing processors no way to block). Every decision made while a
    processor exists is linked to its trace and function span (:meth:`links`), and
    :meth:`lineage` walks a span up to its turn, agent and task spans — the join between an
    audit event's ``trace.span_id`` and the agent run that made it. Bounded: the oldest entries
    are dropped beyond ``max_entries``. Keeps no span input or output.
    """

    def __init__(self, *, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._traces: OrderedDict[str, TraceRecord] = OrderedDict()
        self._spans: OrderedDict[str, SpanRecord] = OrderedDict()
        self._links: deque[DecisionLink] = deque(maxlen=max_entries)
        _PROCESSORS.add(self)

    @staticmethod
    def _trim(table: OrderedDict[Any, Any], limit: int) -> None:
        while len(table) > limit:
            table.popitem(last=False)

    def on_trace_start(self, trace: Trace) -> None:
        metadata = getattr(trace, "metadata", None)
        record = TraceRecord(trace.trace_id, trace.name, getattr(trace, "group_id", None),
                             dict(metadata) if isinstance(metadata, Mapping) else None)
        with self._lock:
            self._traces[trace.trace_id] = record
            self._trim(self._traces, self.max_entries)

    def on_trace_end(self, trace: Trace) -> None:
        return None

    @staticmethod
    def _record(span: Span[Any]) -> SpanRecord:
        data = span.span_data
        name = getattr(data, "name", None) or getattr(data, "to_agent", None)
        error = span.error
        return SpanRecord(span.span_id, span.trace_id, span.parent_id, data.type,
                          name if isinstance(name, str) else None,
                          error.get("message") if error else None)

    def on_span_start(self, span: Span[Any]) -> None:
        record = self._record(span)
        with self._lock:
            self._spans[span.span_id] = record
            self._trim(self._spans, self.max_entries)

    def on_span_end(self, span: Span[Any]) -> None:
        self.on_span_start(span)

    def shutdown(self) -> None:
        return None

    def force_flush(self) -> None:
        return None

    def _link(self, link: DecisionLink) -> None:
        with self._lock:
            self._links.append(link)

    def trace(self, trace_id: str) -> TraceRecord | None:
        """The trace with this id, if seen."""
        with self._lock:
            return self._traces.get(trace_id)

    def span(self, span_id: str) -> SpanRecord | None:
        """The span with this id, if seen."""
        with self._lock:
            return self._spans.get(span_id)

    def lineage(self, span_id: str) -> tuple[SpanRecord, ...]:
        """The span and its ancestors, innermost first (function → turn → agent → task)."""
        chain: list[SpanRecord] = []
        seen: set[str] = set()
        with self._lock:
            current: str | None = span_id
            while current is not None and current not in seen:
                seen.add(current)
                record = self._spans.get(current)
                if record is None:
                    break
                chain.append(record)
                current = record.parent_id
        return tuple(chain)

    def agent_of(self, span_id: str) -> str | None:
        """The name of the agent whose span encloses ``span_id``."""
        return next((r.name for r in self.lineage(span_id) if r.kind == "agent"), None)

    def links(self, *, trace_id: str | None = None,
              call_id: str | None = None) -> list[DecisionLink]:
        """Decisions linked to SDK spans, oldest first, optionally for one trace or call."""
        with self._lock:
            links = list(self._links)
        return [link for link in links
                if (trace_id is None or link.trace_id == trace_id)
                and (call_id is None or link.call_id == call_id)]


def install_tracing(processor: IAMTracingProcessor | None = None) -> IAMTracingProcessor:
    """Add an :class:`IAMTracingProcessor` next to the user's processors (idempotent)."""
    processor = processor or IAMTracingProcessor()
    if processor not in _INSTALLED:
        add_trace_processor(processor)  # never set_trace_processors: it drops the user's
        _INSTALLED.add(processor)
    return processor


def _trace_ids() -> tuple[str | None, str | None]:
    trace = get_current_trace()
    span = get_current_span()
    trace_id = (trace.trace_id if trace is not None and not isinstance(trace, NoOpTrace)
                and trace.trace_id != _NO_OP else None)
    span_id = (span.span_id if span is not None and not isinstance(span, NoOpSpan)
               and span.span_id != _NO_OP else None)
    return trace_id, span_id


def _link(decision: Decision, trace_id: str | None, span_id: str | None) -> None:
    link = DecisionLink(trace_id, span_id, decision.call_id, decision.tool, decision.outcome,
                        decision.execution_id, tuple(r.code for r in decision.reasons))
    for processor in list(_PROCESSORS):
        processor._link(link)
    if decision.outcome != "deny" or span_id is None:
        return
    span = get_current_span()
    if span is not None and span.span_id == span_id and span.span_data.type == "function":
        main = decision.reasons[0] if decision.reasons else Reason("unknown", "")
        span.set_error(SpanError(message="agentic-iam refused the call",
                                 data={"code": main.code, "call_id": decision.call_id}))


# --- arguments -----------------------------------------------------------------------------


def _reject_constant(value: str) -> NoReturn:
    raise ValueError(f"`{value}` is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate argument `{key}`")
        out[key] = value
    return out


def _parse_arguments(raw: str | None) -> dict[str, Any] | None:
    """The model's arguments as a JSON object (no NaN, no duplicate keys), or ``None``."""
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def _flag(setting: Any, *args: Any) -> bool:
    if isinstance(setting, bool):
        return setting
    result = setting(*args)
    if inspect.isawaitable(result):
        result = await result
    return bool(result)


def _withheld(tool: str) -> str:
    return (f"The call to `{tool}` was not authorized by the access layer, so no output is "
            f"available. Do not retry the same call.")


# --- the protection --------------------------------------------------------------------------


def _is_ours(guardrail: object, kind: type[_Authorize] | type[_Screen]) -> bool:
    return isinstance(getattr(guardrail, "guardrail_function", None), kind)


class _Authorize:
    """The tool input guardrail: turns the Guard's decision into the SDK's native outcome."""

    def __init__(self, protection: _Protection) -> None:
        self.protection = protection

    async def __call__(self, data: ToolInputGuardrailData) -> ToolGuardrailFunctionOutput:
        p = self.protection
        ctx = data.context
        state = _state_of(ctx.context)
        name, call_id = ctx.tool_name, ctx.tool_call_id
        if state is None:
            return ToolGuardrailFunctionOutput.reject_content(
                f"The call to `{name}` was refused by the access layer and was not run. Reason: "
                f"this run carries no agentic-iam identity context.")
        decision = state.decided.pop(call_id, None)
        if decision is not None and decision.tool != name:
            p.release(decision)
            decision = None
        if decision is not None and decision.outcome == "approval_required":
            if ctx.is_tool_approved(name, call_id) is not True:
                # RunConfig(tool_execution=...pre_approval_tool_input_guardrails=True) runs
                # guardrails before the pause: let the SDK pause; nothing can run unapproved
                # (the invoke wrapper needs an allow decision).
                state.decided[call_id] = decision
                return ToolGuardrailFunctionOutput.allow(
                    output_info={"agentic_iam": "approval_required"})
            p.record_approval(ctx.context, state, call_id, decision)
            decision = None
        if decision is None:
            arguments = _parse_arguments(ctx.tool_arguments)
            if arguments is None:
                return ToolGuardrailFunctionOutput.reject_content(
                    f"The call to `{name}` was refused by the access layer and was not run. "
                    f"Reason: its arguments are not a JSON object (without duplicate keys).")
            decision = p.authorize(ctx.context, state, name, arguments, call_id)
        info = _info(decision)
        if decision.allowed:
            mismatch = p.agent_mismatch(ctx.context, data.agent)
            if mismatch is not None:
                p.release(decision)
                return ToolGuardrailFunctionOutput.reject_content(
                    f"The call to `{name}` was refused by the access layer and was not run. "
                    f"Reason: {mismatch}.", output_info=info)
            state.authorized[call_id] = decision
            return ToolGuardrailFunctionOutput.allow(output_info=info)
        return ToolGuardrailFunctionOutput.reject_content(decision.model_message(),
                                                          output_info=info)


def _info(decision: Decision) -> dict[str, Any]:
    return {"agentic_iam": {"outcome": decision.outcome, "call_id": decision.call_id,
                            "execution_id": decision.execution_id,
                            "reasons": [r.code for r in decision.reasons],
                            "approval_id": decision.approval_id}}


class _Screen:
    """The tool output guardrail: screen, settle, then the tool's own output guardrails."""

    def __init__(self, protection: _Protection,
                 inner: list[ToolOutputGuardrail[Any]]) -> None:
        self.protection = protection
        self.inner = inner

    async def __call__(self, data: ToolOutputGuardrailData) -> ToolGuardrailFunctionOutput:
        guard = self.protection.guard
        ctx = data.context
        state = _state_of(ctx.context)
        name, call_id = ctx.tool_name, ctx.tool_call_id
        decision = state.authorized.pop(call_id, None) if state is not None else None
        if state is not None and call_id in state.failed:
            state.failed.discard(call_id)
            return ToolGuardrailFunctionOutput.reject_content(
                f"The call to `{name}` failed and produced no output.")
        if decision is None or decision.tool != name:
            return ToolGuardrailFunctionOutput.reject_content(_withheld(name))
        screened = guard.screen(decision, data.output)
        guard.complete(decision, "success")
        text = screened.text
        info = {"agentic_iam": {"call_id": call_id, "blocked": screened.result.blocked,
                                "labels": sorted(screened.result.labels)}}
        for guardrail in self.inner:
            out = await guardrail.run(ToolOutputGuardrailData(context=ctx, agent=data.agent,
                                                              output=text))
            if out.behavior["type"] != "allow":
                return out
        if isinstance(data.output, str) and text == data.output:
            return ToolGuardrailFunctionOutput.allow(output_info=info)
        return ToolGuardrailFunctionOutput.reject_content(text, output_info=info)


class _NeedsApproval:
    """``FunctionTool.needs_approval``: the decision point that can still pause the run."""

    def __init__(self, protection: _Protection, tool: str, original: Any) -> None:
        self.protection = protection
        self.tool = tool
        self.original = original

    async def __call__(self, run_context: RunContextWrapper[Any], params: dict[str, Any],
                       call_id: str) -> bool:
        state = _state_of(run_context.context)
        if state is None:
            return False  # the input guardrail refuses the call
        decision = state.decided.get(call_id)
        if decision is not None and decision.tool != self.tool:
            self.protection.release(decision)
            decision = None
        if decision is None:
            decision = self.protection.authorize(run_context.context, state, self.tool, params,
                                                 call_id)
            state.decided[call_id] = decision
        if decision.outcome == "deny":
            return False  # refused anyway: do not ask a human
        if decision.outcome == "approval_required" or await _flag(
                self.original, run_context, params, call_id):
            state.awaiting.add(call_id)  # the SDK pauses the run for this call
            return True
        return False


@dataclass(eq=False)
class _Protection:
    guard: Guard
    broker: DelegationBroker | None
    agent_ids: Mapping[str, str]
    narrow: Narrowing | None
    allow_unguarded_tools: bool

    def __post_init__(self) -> None:
        self.authorize_guardrail: ToolInputGuardrail[Any] = ToolInputGuardrail(
            _Authorize(self), name=_INPUT_NAME)

    # -- identities --

    def registry_id(self, agent_name: str) -> str:
        return self.agent_ids.get(agent_name, agent_name)

    def compatible(self, other: _Protection) -> bool:
        return (other is self or (other.guard is self.guard and other.broker is self.broker
                                  and dict(other.agent_ids) == dict(self.agent_ids)
                                  and other.narrow is self.narrow))

    def _identity(self, context: object, *, revocation: bool) -> ExecutionIdentity | None:
        token = _token_of(context)
        if token is None:
            return None
        try:
            return self.guard.verifier.verify(_raw(token), check_revocation=revocation)
        except Exception:  # an unusable token allows nothing
            return None

    def agent_mismatch(self, context: object, agent: Agent[Any]) -> str | None:
        identity = self._identity(context, revocation=False)
        expected = self.registry_id(agent.name)
        if identity is None or identity.agent_id == expected:
            return None
        return (f"the run's identity belongs to agent `{identity.agent_id}`, but the call came "
                f"from agent `{expected}`")

    # -- decisions --

    def authorize(self, context: object, state: _RunState, tool: str,
                  arguments: Mapping[str, Any], call_id: str) -> Decision:
        token = _token_of(context)
        asked = state.reasoning.get(call_id)
        trace_id, span_id = _trace_ids()
        call = ToolCall(tool, arguments, call_id=call_id, reasoning=ReasoningContext(
            message=asked.message if asked else None, model=asked.model if asked else None,
            run_id=state.run_id, parent_run_id=state.parent_run_id,
            response_id=asked.response_id if asked else None,
            trace_id=trace_id, span_id=span_id), framework=FRAMEWORK)
        # No token: the Guard still decides (a deny, audited and counted), from an empty token.
        decision = self.guard.authorize(token if token is not None else "", call)
        state.shared.guard = self.guard
        if decision.approval_id is not None:
            state.shared.approval_ids[call_id] = decision.approval_id
        _link(decision, trace_id, span_id)
        return decision

    def release(self, decision: Decision) -> None:
        """An allowed decision whose tool will not run: give its reservation back."""
        if decision.allowed:
            self.guard.cancel(decision)

    def record_approval(self, context: object, state: _RunState, call_id: str,
                        decision: Decision) -> None:
        fallback = context.approver if isinstance(context, IAMRunContext) else DEFAULT_APPROVER
        approver = state.shared.approvers.pop(call_id, fallback)
        state.shared.approval_ids.pop(call_id, None)
        if decision.approval_id is None:
            return
        try:
            self.guard.resolve_approval(decision.approval_id, approved=True, approver=approver)
        except Exception as exc:  # re-authorization decides either way
            log.warning("could not record approval %s: %s", decision.approval_id,
                        type(exc).__name__)

    # -- delegation --

    def may_delegate(self, context: object, target: str) -> tuple[bool, str]:
        identity = self._identity(context, revocation=True)
        if identity is None:
            return False, "no valid execution token is bound to this run"
        if identity.agent_id == target:
            return True, ""
        if self.broker is None:
            return False, "sub-delegation needs a DelegationBroker (protect(..., broker=...))"
        spec = self.guard.registry.get(identity.agent_id)
        child = self.guard.registry.get(target)
        if spec is None or target not in spec.may_delegate_to:
            return False, (f"agent `{identity.agent_id}` may not delegate to `{target}` "
                           f"(registry `may_delegate_to`)")
        if child is None or child.status != "active":
            return False, f"agent `{target}` is not an active agent in the registry"
        if identity.depth < 1:
            return False, "the grant may not be sub-delegated (depth 0)"
        if self.narrow is None and not len(self.broker.narrowed_capabilities(identity, target)):
            return False, f"nothing in the grant applies to agent `{target}`"
        return True, ""

    def delegate(self, context: object, target: str) -> TokenLike:
        """The token the receiving agent runs with (raises when refused)."""
        token = _token_of(context)
        identity = self._identity(context, revocation=True)
        if token is None or identity is None:
            raise DelegationError("no valid execution token is bound to this run")
        if identity.agent_id == target:
            return token
        allowed, why = self.may_delegate(context, target)
        if not allowed or self.broker is None:
            raise DelegationError(why)
        capabilities = self.narrow(identity, target) if self.narrow is not None else None
        return self.broker.subdelegate_for(_raw(token), target, capabilities=capabilities)

    def child_context(self, context: object, state: _RunState, token: TokenLike) -> object:
        child_state = _new_state(state.shared, state)
        child_state.root = token  # minted here: it ends with the sub-run, always
        if isinstance(context, IAMRunContext):
            scoped = IAMRunContext(token, user_context=context.user_context,
                                   approver=context.approver)
            scoped._state = child_state
            return scoped
        # Any other context object: a shallow copy carrying the child token and fresh state.
        child = copy.copy(context)
        _set_token(child, token)
        setattr(child, _STATE_ATTR, child_state)
        return child

    # -- attaching --

    def _claim(self, obj: object, what: str) -> bool:
        """Mark ``obj`` as protected by us; False when it already was (idempotent)."""
        existing = getattr(obj, _MARK, None)
        if isinstance(existing, _Protection):
            if not self.compatible(existing):
                raise ConfigurationError(
                    f"{what} is already protected with a different Guard, broker, agent id "
                    f"mapping or narrowing hook")
            return False
        setattr(obj, _MARK, self)
        return True

    def protect_agent(self, agent: Agent[Any], seen: set[int]) -> None:
        if id(agent) in seen:
            return
        seen.add(id(agent))
        if self._claim(agent, f"agent `{agent.name}`") and not isinstance(agent.hooks,
                                                                          _IAMAgentHooks):
            agent.hooks = _IAMAgentHooks(self.guard, agent.hooks)
        for tool in agent.tools:
            if not isinstance(tool, FunctionTool):
                if not self.allow_unguarded_tools:
                    raise ConfigurationError(
                        f"tool `{getattr(tool, 'name', type(tool).__name__)}` of agent "
                        f"`{agent.name}` is a {type(tool).__name__}, which the adapter cannot "
                        f"guard (it is not a FunctionTool); remove it or pass "
                        f"allow_unguarded_tools=True")
                continue
            sub_agent = getattr(tool, "_agent_instance", None)
            if isinstance(sub_agent, Agent):
                self.protect_agent_tool(tool, sub_agent)
                self.protect_agent(sub_agent, seen)
            else:
                self.protect_tool(tool)
        for index, item in enumerate(agent.handoffs):
            target: Agent[Any] | None = None
            if isinstance(item, Agent):
                target = item
                item = handoff(item)
                agent.handoffs[index] = item
            elif isinstance(item, Handoff):
                ref = getattr(item, "_agent_ref", None)
                found = ref() if callable(ref) else None
                target = found if isinstance(found, Agent) else None
            if isinstance(item, Handoff):
                self.protect_handoff(item)
            if target is not None:
                self.protect_agent(target, seen)
        for server in agent.mcp_servers:
            self.protect_server(server)

    def protect_tool(self, tool: FunctionTool) -> None:
        if not self._claim(tool, f"tool `{tool.name}`"):
            return
        inputs = [g for g in tool.tool_input_guardrails or () if not _is_ours(g, _Authorize)]
        tool.tool_input_guardrails = [*inputs, self.authorize_guardrail]
        tool.tool_output_guardrails = [self._screen_guardrail(tool.tool_output_guardrails)]
        tool.needs_approval = _NeedsApproval(self, tool.name, tool.needs_approval)
        tool.on_invoke_tool = self._guarded_invoke(tool.name, tool.on_invoke_tool)

    def _screen_guardrail(
            self, existing: list[ToolOutputGuardrail[Any]] | None) -> ToolOutputGuardrail[Any]:
        inner = [g for g in existing or () if not _is_ours(g, _Screen)]
        return ToolOutputGuardrail(_Screen(self, inner), name=_OUTPUT_NAME)

    def _guarded_invoke(self, tool_name: str, original: Callable[[ToolContext[Any], str],
                                                                 Awaitable[Any]]
                        ) -> Callable[[ToolContext[Any], str], Awaitable[Any]]:
        guard = self.guard

        async def invoke(ctx: ToolContext[Any], input_json: str) -> Any:
            state = _state_of(ctx.context)
            call_id = ctx.tool_call_id
            decision = state.authorized.get(call_id) if state is not None else None
            if state is None or decision is None or not decision.allowed \
                    or decision.tool != tool_name:
                return _withheld(tool_name)  # never runs the tool
            # Run with the Guard's checked copy, not with the model's string.
            checked = json.dumps(dict(decision.arguments), ensure_ascii=False)
            try:
                return await original(ctx, checked)
            except BaseException:
                state.authorized.pop(call_id, None)
                state.failed.add(call_id)
                guard.complete(decision, "error")
                raise

        return invoke

    def protect_agent_tool(self, tool: FunctionTool, sub_agent: Agent[Any]) -> None:
        """``agent.as_tool(...)``: the nested run gets a narrower identity (a delegation)."""
        if not self._claim(tool, f"agent tool `{tool.name}`"):
            return
        target = self.registry_id(sub_agent.name)
        tool.is_enabled = self._delegation_enabled(tool.name, target, tool.is_enabled)
        original = tool.on_invoke_tool

        async def invoke(ctx: ToolContext[Any], input_json: str) -> Any:
            state = _state_of(ctx.context)
            if state is None:
                return _refusal(tool.name, target, "this run carries no identity context")
            child = state.children.get(ctx.tool_call_id)
            if child is None:
                try:
                    token = self.delegate(ctx.context, target)
                    child = self.child_context(ctx.context, state, token)
                except Exception as exc:  # refused: tell the model, run on
                    return _refusal(tool.name, target, _why(exc))
                state.children[ctx.tool_call_id] = child
            nested = copy.copy(ctx)  # keeps approvals, usage and nested-run bookkeeping
            nested.context = child  # the nested Runner.run uses ctx.context as its context
            try:
                output = await original(nested, input_json)
            except BaseException:
                state.children.pop(ctx.tool_call_id, None)
                _safely(_finish_run, self.guard, child, "failed")
                raise
            child_state = _state_of(child)
            if child_state is None or not child_state.awaiting:
                # The sub-run is over. Its final output ended its identity already; if it had
                # none (the SDK turned a failure into this tool's output), it ends now. A
                # sub-run paused for a human keeps it: the SDK resumes it with this context.
                state.children.pop(ctx.tool_call_id, None)
                _safely(_finish_run, self.guard, child, "failed")
            return output

        tool.on_invoke_tool = invoke

    def _delegation_enabled(self, tool_name: str, target: str, original: Any) -> Any:
        async def is_enabled(ctx: RunContextWrapper[Any], agent: Any) -> bool:
            state = _state_of(ctx.context)
            if state is not None and isinstance(agent, Agent):
                state.current_agent = agent
            if not await _flag(original, ctx, agent):
                return False
            allowed, why = self.may_delegate(ctx.context, target)
            if not allowed and state is not None:
                state.refused[tool_name] = why
            return allowed

        return is_enabled

    def protect_handoff(self, item: Handoff[Any, Any]) -> None:
        if not self._claim(item, f"handoff `{item.tool_name}`"):
            return
        target = self.registry_id(item.agent_name)
        item.is_enabled = self._delegation_enabled(item.tool_name, target, item.is_enabled)
        original_invoke = item.on_invoke_handoff
        original_message = item.get_transfer_message

        async def on_invoke_handoff(ctx: RunContextWrapper[Any], input_json: str) -> Agent[Any]:
            state = _state_of(ctx.context)
            try:
                token = self.delegate(ctx.context, target)
            except Exception as exc:  # refused below, or re-raised (fail closed)
                current = state.current_agent if state is not None else None
                if current is None:
                    raise
                # The SDK has no "refuse a handoff with a tool result": stay with the current
                # agent and make the transfer message the refusal the model reads.
                _HANDOFF_REFUSAL.set(_refusal(item.tool_name, target, _why(exc)))
                return current
            if state is not None and token is not _token_of(ctx.context):
                state.minted.append(token)  # ends with the run, even if the handoff fails
            agent: Agent[Any] = await original_invoke(ctx, input_json)
            if self.registry_id(agent.name) != target:
                raise ConfigurationError(
                    f"handoff `{item.tool_name}` returned agent `{agent.name}`, expected one "
                    f"mapped to `{target}`")
            self.protect_agent(agent, set())
            _set_token(ctx.context, token)  # the SAME context continues into the new agent
            return agent

        def get_transfer_message(agent: Any) -> str:
            refusal = _HANDOFF_REFUSAL.get()
            if refusal is not None:
                _HANDOFF_REFUSAL.set(None)
                return refusal
            return original_message(agent)

        item.on_invoke_handoff = on_invoke_handoff
        setattr(item, "get_transfer_message", get_transfer_message)  # noqa: B010

    def protect_server(self, server: Any) -> None:
        if not hasattr(server, "tool_input_guardrails"):
            raise ConfigurationError(
                f"MCP server `{getattr(server, 'name', server)!s}` has no tool guardrails "
                f"(openai-agents >= 0.24 is needed)")
        if not self._claim(server, f"MCP server `{getattr(server, 'name', '?')}`"):
            return
        inputs = [g for g in server.tool_input_guardrails or () if not _is_ours(g, _Authorize)]
        server.tool_input_guardrails = [*inputs, self.authorize_guardrail]
        server.tool_output_guardrails = [self._screen_guardrail(server.tool_output_guardrails)]


def _why(exc: BaseException) -> str:
    message = str(exc) or type(exc).__name__
    return message.rstrip(".")


def _refusal(tool: str, target: str, why: str) -> str:
    return (f"The delegation `{tool}` to `{target}` was refused by the access layer and did not "
            f"happen. Reason: {why}. Continue without it or tell the user what you could not do.")


def protect(agent: Agent[Any], guard: Guard, *, broker: DelegationBroker | None = None,
            agent_ids: Mapping[str, str] | None = None, narrow: Narrowing | None = None,
            allow_unguarded_tools: bool = False) -> Agent[Any]:
    """Put ``agent`` and every agent it can reach under ``guard``; returns ``agent``.

    ``agent_ids`` maps SDK agent names to registry ids (default: the agent's name). ``broker``
    mints the narrower identities of handoff targets and ``as_tool`` agents; without it those
    delegations are refused. ``narrow(parent_identity, child_id)`` may choose the child's
    capabilities (they must narrow the parent's). Mutates the agents, tools, handoffs and MCP
    servers in place, once: protecting again with the same settings does nothing, with other
    settings raises :class:`ConfigurationError`. Agents added later (a custom handoff's target)
    are protected when the handoff happens.
    """
    protection = _Protection(guard, broker, dict(agent_ids or {}), narrow, allow_unguarded_tools)
    protection.protect_agent(agent, set())
    return agent


def iam_run_config(*, tool_error_formatter: Callable[[ToolErrorFormatterArgs[Any]], Any]
                   | None = None, **kwargs: Any) -> RunConfig:
    """A ``RunConfig`` in which a call to a hidden (refused) handoff or agent tool is answered
    with a model-readable refusal instead of aborting the run (``ModelBehaviorError``).

    Other ``RunConfig`` fields pass through ``kwargs``; ``tool_error_formatter`` is consulted for
    everything else.
    """

    async def formatter(args: ToolErrorFormatterArgs[Any]) -> str | None:
        if args.kind == "tool_not_found":
            state = _state_of(args.run_context.context)
            why = state.refused.get(args.tool_name) if state is not None else None
            if why is not None:
                return (f"The call to `{args.tool_name}` was refused by the access layer and "
                        f"did not happen. Reason: {why}. Continue without it or tell the user "
                        f"what you could not do.")
        if tool_error_formatter is None:
            return None
        result = tool_error_formatter(args)
        if inspect.isawaitable(result):
            result = await result
        return result if isinstance(result, str) or result is None else str(result)

    kwargs.setdefault("tool_not_found_behavior", "return_error_to_model")
    return RunConfig(tool_error_formatter=formatter, **kwargs)

