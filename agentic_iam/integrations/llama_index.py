"""LlamaIndex adapter: every tool call of a workflow agent goes through the Guard's one mediation
path (:meth:`Guard.amediate`); this module only translates LlamaIndex's types.

``agent = protect(agent, guard, broker=broker, agent_id="support-agent")`` guards an existing
``FunctionAgent``, ``ReActAgent`` or ``AgentWorkflow`` (``pip install "agentic-iam[llama-index]"``,
llama-index-core >= 0.14). It returns the same object, whose class is swapped for a subclass with
the workflow's ``call_tool`` step replaced: that step is where every tool call of every agent of
the run passes (tools added after wiring, tools from a ``tool_retriever``, parallel calls, the
built-in ``handoff`` tool), so nothing about the tool list has to be known in advance.

- The run's token: ``await bind_identity(ctx, token)`` / ``run_with_identity(workflow, msg,
  token)``, else the token bound with :func:`agentic_iam.core.binding.bind` (``with
  project.delegate(...):``) when the run starts. It lives under a private context-store key, never
  in ``state`` (which the prompt renders). A run without one calls no tool (each call is decided,
  recorded and refused).
- Each call: the requesting assistant message (or ReAct thought) becomes the reasoning context,
  then ``amediate`` decides it under the *current agent's* registry id (a token of another agent
  is refused), runs the tool with the checked arguments (the token bound, so a sub-agent started
  by the tool finds it), screens the ``ToolOutput`` before it is streamed or stored, and settles
  it (``is_error`` -> ``error``). A refusal is an error ``ToolOutput`` the model reads.
- Approvals pause the workflow natively: an :class:`ApprovalRequestEvent` (``InputRequiredEvent``)
  on the stream; answer with ``handler.ctx.send_event(event.answer(approved=True,
  approver="bob"))``. ``on_approval="refuse"`` (and every sub-run) refuses instead; the request
  stays pending for ``aiam approvals``.
- Sub-agents never act under the parent's identity: a handoff mints the receiving agent a token
  with ``broker.subdelegate_for`` (``handoff_capabilities`` narrows it further); a guarded agent
  started from a tool, whose bound token belongs to another agent, mints its own child the same
  way (no broker: every call is refused, ``identity.agent_mismatch``), so a plain tool running
  ``await sub_agent.run(user_msg=task)`` is all agent-as-tool needs. Minted identities always
  end with their run; the root one too unless ``end_on_finish=False``.
- Unguarded paths are refused loudly: a ``FunctionTool`` run while an execution token is bound but
  outside a mediation of that tool raises (a stock agent the user forgot to protect, a stock
  sub-agent inside a guarded tool, a direct call), and a guarded agent placed in a stock
  ``AgentWorkflow`` refuses to take a step.
- :class:`ScopedRetriever` / :class:`ScopeFilter` keep only nodes whose ``metadata["scope"]`` is
  among the run's token's memory scopes (:meth:`Guard.filter_memory`); :func:`guard_tools` for
  tools used outside workflows; :func:`install_instrumentation` charges LLM usage (observe only).

What it must never do: run a tool without an ``allow`` for that exact call, or with arguments other
than the checked copy; let output reach the stream, memory or model unscreened; put a token in the
prompt, an event or a log line; let an agent act under another agent's identity.

Caveats: ``call_tool`` is a step of LlamaIndex's workflow agents, not a documented extension
point (tested with llama-index-core 0.14 / llama-index-workflows 2.x). A paused approval is
replayed from the top of the step, so the call is decided again on resume (``approval_required``
twice, then ``allow``). A ``ToolCall`` event no model asked for (none in the scratchpad) is
refused. Non-text output blocks cannot be screened and are withheld.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, TypeVar, cast

from agentic_iam.errors import MissingExtraError

try:
    from llama_index.core.agent.react.types import ActionReasoningStep
    from llama_index.core.agent.workflow import (
        AgentInput,
        AgentOutput,
        AgentSetup,
        AgentWorkflow,
        BaseWorkflowAgent,
        FunctionAgent,
        ReActAgent,
        ToolCallResult,
    )
    from llama_index.core.agent.workflow import ToolCall as ToolCallEvent
    from llama_index.core.agent.workflow.agent_context import AgentContext
    from llama_index.core.agent.workflow.workflow_events import AgentWorkflowStartEvent
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.base.llms.types import (
        ChatMessage,
        MessageRole,
        TextBlock,
        ThinkingBlock,
        ToolCallBlock,
    )
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events import BaseEvent
    from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent
    from llama_index.core.instrumentation.span import active_span_id
    from llama_index.core.memory import BaseMemory
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import NodeWithScore, QueryBundle
    from llama_index.core.tools import AsyncBaseTool, BaseTool, FunctionTool, ToolOutput
    from llama_index.core.workflow import (
        Context,
        HumanResponseEvent,
        InputRequiredEvent,
        StopEvent,
        step,
    )
    from llama_index_instrumentation import get_dispatcher
    from llama_index_instrumentation.dispatcher import (
        DISPATCHER_SPAN_DECORATED_ATTR,
        Dispatcher,
        active_instrument_tags,
    )
    from workflows.handler import WorkflowHandler
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    _missing = (exc.name or "llama_index").split(".")[0]
    raise MissingExtraError("llama-index", {
        "llama_index": "llama-index-core",
        "llama_index_instrumentation": "llama-index-instrumentation",
        "workflows": "llama-index-workflows",
    }.get(_missing, _missing)) from exc

try:  # workflows >= 2.9 pauses a waiting step by raising this, then replays the step
    from workflows.runtime.types.results import WaitingForEvent as _WaitingForEvent

    _CONTROL_FLOW: tuple[type[BaseException], ...] = (_WaitingForEvent,)
except ImportError:  # pragma: no cover - older workflows wait in place
    _CONTROL_FLOW = ()

from agentic_iam.core.binding import bind, current_token
from agentic_iam.core.broker import CapabilitiesLike, DelegationBroker
from agentic_iam.core.decision import ReasoningContext, ToolCall
from agentic_iam.core.guard import Guard, Screened
from agentic_iam.core.identity import ExecutionIdentity
from agentic_iam.core.mediation import Mediated, current_decision
from agentic_iam.core.tokens import ExecutionToken
from agentic_iam.errors import AgenticIAMError, ConfigurationError, TokenError

__all__ = [
    "ApprovalRequestEvent",
    "ApprovalResponseEvent",
    "GuardedAgentWorkflow",
    "GuardedFunctionAgent",
    "GuardedReActAgent",
    "GuardedTool",
    "IAMInstrumentation",
    "ScopeFilter",
    "ScopedRetriever",
    "bind_identity",
    "guard_tools",
    "install_instrumentation",
    "protect",
    "run_with_identity",
    "uninstall_instrumentation",
]

log = logging.getLogger("agentic_iam.integrations.llama_index")

FRAMEWORK = "llama_index"
HANDOFF_TOOL = "handoff"
Token = str | ExecutionToken
W = TypeVar("W", BaseWorkflowAgent, AgentWorkflow)

# The context-store key of the run's identity record. Not "state": `setup_agent` renders that
# into the prompt (llama_index/core/agent/workflow/multi_agent_workflow.py). No dots: the store
# reads dotted keys as paths.
_STORE_KEY = "agentic_iam_identity"
_NO_MESSAGE = ("The call to `{tool}` was refused by the access layer and was not run. Reason: "
               "no model message asked for it.")
_FAILED = "The call to `{tool}` was refused: the access check failed."
_NOT_FOUND = "Tool {tool} not found. Please select a tool that is available."  # stock wording
_POSITIONAL = "a guarded tool takes keyword arguments only"


def _control_flow(exc: BaseException) -> bool:
    return bool(_CONTROL_FLOW) and isinstance(exc, _CONTROL_FLOW)


def _raw(token: Token) -> str:
    if isinstance(token, ExecutionToken):
        return token.token
    if isinstance(token, str) and token:
        return token
    # An already-verified ExecutionIdentity is not accepted: anything in-process can make one.
    raise TypeError("an execution token (compact string or ExecutionToken) is needed")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def _refusal(tool: str, arguments: Mapping[str, Any], text: str) -> ToolOutput:
    return ToolOutput(content=text, tool_name=tool, raw_input=dict(arguments), raw_output=text,
                      is_error=True)


# --- unguarded tool runs are refused -------------------------------------------------------------

# LlamaIndex's own plumbing that it runs as FunctionTools: the `handoff` tool (it switches agents;
# a protected workflow mints the identity first) and the structured-output program's tool (it
# builds a pydantic model from the LLM's answer, llama_index/core/program/function_program.py).
_INTERNAL = frozenset({"llama_index.core.agent.workflow.multi_agent_workflow",
                       "llama_index.core.program.function_program"})
_SENTINEL = threading.Lock()


def _check_mediated(tool: FunctionTool, kwargs: Mapping[str, Any]) -> None:
    """Raise if ``tool`` runs while an execution token is bound but no mediation runs it with
    these arguments (a stock agent started inside a mediated tool inherits its decision)."""
    fn = getattr(tool, "_real_fn", None)
    if current_token() is None or getattr(fn, "__module__", None) in _INTERNAL:
        return
    decision = current_decision()
    arguments = {k: v for k, v in kwargs.items() if k != tool.ctx_param_name}
    if decision and decision.tool == tool.metadata.name and decision.arguments == arguments:
        return
    name = tool.metadata.name
    log.error("tool `%s` ran outside a Guard mediation while an execution identity is bound; "
              "refused", name)
    raise ConfigurationError(
        f"tool `{name}` was called outside a Guard mediation while an execution identity is "
        f"bound, and was refused: guard the agent with protect(...) or the tool with "
        f"guard_tools(...)")


def _install_sentinel() -> None:
    """Make ``FunctionTool.call``/``acall`` refuse unmediated runs (idempotent, process-wide).

    Every stock agent loop, query engine and direct call runs a user function through these two
    methods. They only refuse while a token is bound, so code without agentic-iam is unaffected.
    """
    with _SENTINEL:
        if getattr(FunctionTool.call, "_aiam_sentinel", False):
            return
        call, acall = FunctionTool.call, FunctionTool.acall

        def checked_call(self: FunctionTool, *args: Any, **kwargs: Any) -> ToolOutput:
            _check_mediated(self, kwargs)
            return call(self, *args, **kwargs)

        async def checked_acall(self: FunctionTool, *args: Any, **kwargs: Any) -> ToolOutput:
            _check_mediated(self, kwargs)
            return await acall(self, *args, **kwargs)

        for fn in (checked_call, checked_acall):
            setattr(fn, "_aiam_sentinel", True)  # noqa: B010
            setattr(fn, DISPATCHER_SPAN_DECORATED_ATTR, True)  # one span: the original's
        FunctionTool.call = checked_call  # type: ignore[method-assign]
        FunctionTool.acall = checked_acall  # type: ignore[method-assign]


# --- the run's identity ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """The run's identity record, kept in the context store (plain JSON)."""

    root: str | None = field(default=None, repr=False)
    """The token of the root agent."""
    agents: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Tokens minted for handoffs, by LlamaIndex agent name."""
    minted: tuple[str, ...] = field(default=(), repr=False)
    """Every token minted for this run: they end with it, always."""
    nested: bool = False
    """A sub-run: its input was written by a model and nobody answers its approvals."""
    parent_run_id: str | None = None
    """The run that started this sub-run."""
    end_on_finish: bool = True
    """End the root execution when the run finishes."""
    bound: bool = False
    """The root came from ``bind_identity`` (else from ``current_token()`` at the start)."""

    @classmethod
    def load(cls, value: object) -> _Run:
        if not isinstance(value, Mapping):
            return cls()
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in value.items() if k in known}
        data["minted"] = tuple(data.get("minted") or ())
        return cls(**data)

    def token_for(self, agent_name: str, root_name: str) -> str | None:
        token = self.agents.get(agent_name)
        return self.root if token is None and agent_name == root_name else token


async def _load(ctx: Context) -> _Run:
    return _Run.load(await ctx.store.get(_STORE_KEY, default=None))


async def _update(ctx: Context, change: Callable[[_Run], _Run]) -> None:
    """Read-modify-write the record atomically (parallel ``call_tool`` workers share it)."""
    async with ctx.store.edit_state() as state:
        state[_STORE_KEY] = asdict(change(_Run.load(state.get(_STORE_KEY, None))))


async def bind_identity(ctx: Context, token: Token, *, end_on_finish: bool = True) -> None:
    """Bind ``token`` to the run of ``ctx`` (before ``workflow.run(..., ctx=ctx)``).

    ``end_on_finish=False`` keeps the root execution after the run, for a conversation of several
    runs in one ``Context`` (end it with ``guard.end_execution``); minted identities end anyway.
    """
    await ctx.store.set(_STORE_KEY, asdict(_Run(root=_raw(token), bound=True,
                                                end_on_finish=end_on_finish is not False)))


async def run_with_identity(workflow: BaseWorkflowAgent | AgentWorkflow,
                            user_msg: str | ChatMessage, token: Token, *,
                            ctx: Context | None = None, end_on_finish: bool = True,
                            **run_kwargs: Any) -> WorkflowHandler:
    """Start a protected ``workflow`` for ``user_msg`` with ``token`` bound; returns the handler."""
    if not isinstance(workflow, _Guarded):
        raise TypeError(f"`{type(workflow).__name__}` is not protected; call protect() first")
    ctx = ctx if ctx is not None else Context(workflow)
    await bind_identity(ctx, token, end_on_finish=end_on_finish)
    return workflow.run(user_msg=user_msg, ctx=ctx, **run_kwargs)


# Tokens minted while a tool runs (by the sub-runs it starts): the tool's mediation ends those
# whose run failed before it could end them (a failed run has no StopEvent).
_MINTED: ContextVar[list[str] | None] = ContextVar("aiam_li_minted", default=None)


def _minted(token: str) -> str:
    collected = _MINTED.get()
    if collected is not None:
        collected.append(token)
    return token


def _end(guard: Guard, token: str, reason: str, *, once: bool = False) -> None:
    try:
        key = guard.verifier.verify(token, check_revocation=False).key
        if not (once and guard.store.revoked([key])):
            guard.end_execution(token, reason=reason)
    except Exception as exc:  # the token still expires at its `exp`; the run's work is done
        log.warning("could not end an execution (%s): %s", reason, type(exc).__name__)


async def _finish(guard: Guard, ctx: Context, reason: str) -> None:
    """The run ended: end every minted identity, and the root unless the run opted out."""
    run = await _load(ctx)
    for token in run.minted:
        _end(guard, token, reason)
    keep = run.root is not None and run.root not in run.minted and not run.end_on_finish
    if run.root is not None and run.root not in run.minted and run.end_on_finish:
        _end(guard, run.root, reason)
    # The next run of this Context re-resolves its identity (an opted-out root stays bound).
    await ctx.store.set(_STORE_KEY, asdict(replace(run, agents={}, minted=(),
                                                   root=run.root if keep else None)))


# --- reasoning context ---------------------------------------------------------------------------


def _asks_for(message: object, ev: ToolCallEvent) -> bool:
    if not isinstance(message, ChatMessage) or message.role != MessageRole.ASSISTANT:
        return False
    # By call id; a block without one (some providers give none) by name and arguments.
    return any(b.tool_call_id == ev.tool_id if b.tool_call_id else (
        b.tool_name == ev.tool_name and b.tool_kwargs == ev.tool_kwargs)
        for b in message.blocks if isinstance(b, ToolCallBlock))


def _message_text(message: ChatMessage) -> str:
    """The model's text plus its thinking blocks."""
    text = "\n".join(b.text for b in message.blocks if isinstance(b, TextBlock)).strip()
    thinking = [b.content.strip() for b in message.blocks
                if isinstance(b, ThinkingBlock) and b.content and b.content.strip()]
    return "\n".join(p for p in (text, *(f"[reasoning] {t}" for t in thinking)) if p)


async def _requesting_text(ctx: Context, agent: BaseWorkflowAgent | None,
                           ev: ToolCallEvent) -> str | None:
    """What the model said when it asked: the assistant message in the agent's scratchpad, or
    the ReAct reasoning step; ``None`` when no model asked for this call."""
    pad = await ctx.store.get(getattr(agent, "scratchpad_key", "scratchpad"), default=None)
    for message in reversed(pad if isinstance(pad, list) else []):
        if _asks_for(message, ev):
            return _message_text(message)
    steps = await ctx.store.get(getattr(agent, "reasoning_key", "current_reasoning"), default=None)
    for item in reversed(steps if isinstance(steps, list) else []):
        if (isinstance(item, ActionReasoningStep) and item.action == ev.tool_name
                and item.action_input == ev.tool_kwargs):
            return item.get_content()
    return None


def _model_name(agent: BaseWorkflowAgent | None, default: str | None) -> str | None:
    try:
        name = default or (agent.llm.metadata.model_name if agent is not None else None)
    except Exception:  # an LLM without metadata: nothing to record
        return None
    return name if isinstance(name, str) and name not in ("", "unknown") else None


def _run_id() -> str | None:
    value = active_instrument_tags.get().get("llamaindex.run_id")
    return str(value) if value else None


# --- outputs -------------------------------------------------------------------------------------


def _screen(output: ToolOutput, screen_text: Callable[[object], Screened]) -> ToolOutput:
    """The ``ToolOutput`` the model may see. Non-text blocks cannot be screened: withheld."""
    text = output.content
    others = sorted({type(b).__name__ for b in output.blocks if not isinstance(b, TextBlock)})
    if others:
        note = f"[agentic-iam: non-text block(s) withheld ({', '.join(others)})]"
        text = f"{text}\n{note}" if text else note
    screened = screen_text(text)
    # raw_output is streamed and becomes AgentOutput.raw on return_direct: screened text only.
    return ToolOutput(content=screened.text, tool_name=output.tool_name,
                      raw_input=output.raw_input, raw_output=screened.text,
                      is_error=output.is_error or screened.result.blocked)


def _failed(output: ToolOutput) -> bool:
    return bool(output.is_error)


def _output(done: Mediated[ToolOutput], tool: str, arguments: Mapping[str, Any]) -> ToolOutput:
    if done.value is not None:
        return done.value
    return _refusal(tool, arguments, done.refusal or _FAILED.format(tool=tool))


# --- approvals -----------------------------------------------------------------------------------


class ApprovalRequestEvent(InputRequiredEvent):
    """On the event stream when a call waits for a human (never carries a token). Answer with
    ``handler.ctx.send_event(event.answer(approved=True, approver="bob"))``."""

    approval_id: str
    """The approval request to resolve."""
    tool: str
    """The tool."""
    call_id: str
    """The model's tool call id."""
    arguments: dict[str, Any]
    """The exact arguments the approval lets through, once."""
    agent: str
    """The LlamaIndex agent asking."""
    agent_id: str | None = None
    """Its registry agent id."""
    action: str | None = None
    """The tool's action."""
    execution_id: str | None = None
    """The execution asking."""
    reason: str = ""
    """Why approval is needed."""
    policy_ids: list[str] = Field(default_factory=list)
    """The approval policies that fired."""

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.arguments.items()))
        return f"{self.agent} wants {self.tool}({args}): {self.reason}"

    def answer(self, *, approved: bool, approver: str) -> ApprovalResponseEvent:
        return ApprovalResponseEvent(approval_id=self.approval_id, approved=approved,
                                     approver=approver)


class ApprovalResponseEvent(HumanResponseEvent):
    """A human's answer to an :class:`ApprovalRequestEvent`."""

    approval_id: str
    """The request answered."""
    approved: bool
    """The answer."""
    approver: str = "human"
    """Who answered (recorded): a configured approver id; the default names nobody."""


# --- the guarded steps ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    guard: Guard
    broker: DelegationBroker | None = None
    agent_id: str | None = None
    """The root agent's registry id (default: its name)."""
    agent_ids: Mapping[str, str] = field(default_factory=dict)
    """LlamaIndex agent name -> registry agent id (default: the name)."""
    handoff_capabilities: Mapping[str, CapabilitiesLike] = field(default_factory=dict)
    """Receiving agent name -> capabilities of its child token."""
    model_name: str | None = None
    """Recorded when the LLM does not name itself."""
    on_approval: Literal["wait", "refuse"] = "wait"
    """``wait``: pause the run for an answer; ``refuse``: refuse, the request stays pending."""
    approval_timeout_s: float | None = 900.0
    """How long a paused call waits."""
    end_on_finish: bool = True
    """End a token found with ``current_token()`` when the run finishes."""


_OPTIONS = frozenset(f.name for f in fields(_Settings)) - {"guard", "broker", "agent_id"}


@dataclass(frozen=True)
class _StepScope:
    """Which identity the LLM calls of the running step are charged to."""

    guard: Guard
    token: str | None = field(repr=False)
    model: str | None


_STEP_SCOPE: ContextVar[_StepScope | None] = ContextVar("aiam_li_step", default=None)


class _Guarded:
    """The steps of every protected workflow; :func:`protect` fills in ``_aiam``."""

    def _aiam(self) -> _Settings:
        raise NotImplementedError

    def _aiam_agents(self) -> Mapping[str, BaseWorkflowAgent]:
        """The run's agents by name: an ``AgentWorkflow``'s, or the single agent itself."""
        if isinstance(self, AgentWorkflow):
            return self.agents
        return {cast(BaseWorkflowAgent, self).name: cast(BaseWorkflowAgent, self)}

    def _aiam_root(self) -> str:
        return str(self.root_agent if isinstance(self, AgentWorkflow) else next(
            iter(self._aiam_agents())))

    async def _aiam_current(self, ctx: Context) -> str:
        name = await ctx.store.get("current_agent_name", default=None) if isinstance(
            self, AgentWorkflow) else None
        return name if isinstance(name, str) else self._aiam_root()

    async def _aiam_tools(self, agent_name: str, tool_name: str) -> Sequence[AsyncBaseTool]:
        if isinstance(self, AgentWorkflow):
            return await self.get_tools(agent_name, tool_name)
        return await cast(BaseWorkflowAgent, self).get_tools(tool_name)

    def _aiam_can_handoff(self, current: str, target: str) -> bool:
        """Whether the stock ``handoff`` tool would switch (``*``: is it a handoff workflow)."""
        agents = self._aiam_agents()
        if target == "*" or current not in agents or target not in agents:
            return target == "*" and len(agents) > 1
        allowed = agents[current].can_handoff_to
        return target != current and (allowed is None or target in allowed)

    def _aiam_id(self, name: str) -> str:
        s = self._aiam()
        return s.agent_ids.get(name) or (s.agent_id if name == self._aiam_root() else None) or name

    async def current_identity(self, ctx: Context,
                               agent_name: str | None = None) -> ExecutionIdentity | None:
        """The verified identity an agent of this run acts under (default: the current one)."""
        name = agent_name if agent_name is not None else await self._aiam_current(ctx)
        token = (await _load(ctx)).token_for(name, self._aiam_root())
        try:
            return self._aiam().guard.verifier.verify(token) if token else None
        except TokenError:
            return None

    @step
    async def init_run(self, ctx: Context, ev: AgentWorkflowStartEvent) -> AgentInput:
        """The stock step; then the run's identity is settled (see :meth:`_aiam_start`)."""
        result = cast(AgentInput, await cast(Any, super()).init_run(ctx, ev))
        await self._aiam_start(ctx)
        return result

    async def _aiam_start(self, ctx: Context) -> None:
        """Take the token bound to the Context, else the one bound to the caller; if it is
        another agent's (a parent calling this agent from a tool), mint this agent its own."""
        s, run = self._aiam(), await _load(ctx)
        found = run.root if run.bound else current_token()
        if found is None:
            return
        token, want = _raw(found), self._aiam_id(self._aiam_root())
        # Started by a tool of a protected run: its input was written by a model, nobody answers
        # its approvals, and the token it found is the caller's to end.
        inside = _MINTED.get() is not None
        run = replace(run, root=token) if run.bound else _Run(
            root=token, nested=inside, end_on_finish=s.end_on_finish and not inside)
        try:
            owner = s.guard.verifier.verify(token, check_revocation=False).agent_id
        except TokenError:
            owner = want  # the Guard refuses it at each call, with the reason
        if owner != want and s.broker is not None:
            try:
                child = _minted(s.broker.subdelegate_for(token, want).token)
                run = replace(run, root=child, minted=(child,), nested=True,
                              parent_run_id=_run_id())
            except AgenticIAMError as exc:  # each call is refused: identity.agent_mismatch
                log.warning("could not mint `%s` an identity from `%s`'s: %s", want, owner, exc)
        await ctx.store.set(_STORE_KEY, asdict(run))
        request = await ctx.store.get("user_msg_str", default=None)
        if not run.nested and isinstance(request, str) and request and run.root is not None:
            try:  # argument provenance: what the user named is told apart from tool output
                s.guard.observe(run.root, [request], "request")
            except Exception as exc:  # provenance only: unknown values stay "unknown"
                log.warning("could not record the user's request: %s", type(exc).__name__)

    @step
    async def call_tool(self, ctx: Context, ev: ToolCallEvent) -> ToolCallResult:
        """Mediate one tool call; a refusal is an error ``ToolOutput`` (the run goes on)."""
        paused_key = "aiam_paused_" + _digest(ev.tool_id, ev.tool_name,
                                              json.dumps(ev.tool_kwargs, sort_keys=True,
                                                         default=str))
        replay = await ctx.store.get(paused_key, default=None)
        if not replay:  # a step replayed after an approval pause was announced already
            ctx.write_event_to_stream(ToolCallEvent(tool_name=ev.tool_name,
                                                    tool_kwargs=ev.tool_kwargs,
                                                    tool_id=ev.tool_id))
        arguments: Mapping[str, Any] = ev.tool_kwargs
        try:
            name = await self._aiam_current(ctx)
            run = await _load(ctx)
            token = run.token_for(name, self._aiam_root())
            if ev.tool_name == HANDOFF_TOOL and self._aiam_can_handoff(name, "*"):
                output, direct = await self._aiam_handoff(ctx, run, name, token, ev)
            else:
                output, direct, arguments = await self._aiam_mediate(ctx, run, name, token, ev,
                                                                     paused_key)
        except asyncio.TimeoutError:
            output, direct = _refusal(ev.tool_name, ev.tool_kwargs, (
                f"Nobody answered the approval request for `{ev.tool_name}` in time, so the "
                f"call was not run.")), False
        except Exception as exc:
            if _control_flow(exc):
                raise  # an approval pause: the step replays when the answer arrives
            log.warning("access check for `%s` failed: %s", ev.tool_name, type(exc).__name__)
            output, direct = _refusal(ev.tool_name, ev.tool_kwargs,
                                      _FAILED.format(tool=ev.tool_name)), False
        if replay:
            await ctx.store.set(paused_key, None)
        result = ToolCallResult(tool_name=ev.tool_name, tool_kwargs=dict(arguments),
                                tool_id=ev.tool_id, tool_output=output, return_direct=direct)
        ctx.write_event_to_stream(result)
        return result

    async def _aiam_mediate(self, ctx: Context, run: _Run, name: str, token: str | None,
                            ev: ToolCallEvent, paused_key: str
                            ) -> tuple[ToolOutput, bool, Mapping[str, Any]]:
        s, agent = self._aiam(), self._aiam_agents().get(name)
        text = await _requesting_text(ctx, agent, ev)
        if text is None:  # a ToolCall event sent into the workflow, not asked for by a model
            log.warning("no model message asked for tool call `%s` (%s); refused",
                        ev.tool_name, ev.tool_id)
            return _refusal(ev.tool_name, ev.tool_kwargs,
                            _NO_MESSAGE.format(tool=ev.tool_name)), False, ev.tool_kwargs
        tool = next((t for t in await self._aiam_tools(name, ev.tool_name)
                     if t.metadata.name == ev.tool_name), None)
        if tool is None:  # nothing to run: the stock answer, no decision needed
            return _refusal(ev.tool_name, ev.tool_kwargs,
                            _NOT_FOUND.format(tool=ev.tool_name)), False, ev.tool_kwargs
        call = ToolCall(ev.tool_name, ev.tool_kwargs, ev.tool_id, ReasoningContext(
            message=text or None, model=_model_name(agent, s.model_name), run_id=_run_id(),
            parent_run_id=run.parent_run_id, span_id=active_span_id.get()), FRAMEWORK)

        async def run_tool(arguments: dict[str, Any]) -> ToolOutput:
            assert token is not None  # an allow needs a verified token
            minted: list[str] = []
            reset = _MINTED.set(minted)
            try:
                with bind(token):  # a sub-agent started by the tool finds (and narrows) it
                    return cast(ToolOutput, await cast(Any, self)._call_tool(ctx, tool,
                                                                             arguments))
            finally:
                _MINTED.reset(reset)
                for child in minted:  # a sub-run that finished has ended them already
                    _end(s.guard, child, "failed", once=True)

        async def ask(payload: dict[str, Any]) -> object:
            await ctx.store.set(paused_key, True)
            fields_ = {k: v for k, v in payload.items() if k in ApprovalRequestEvent.model_fields}
            answer = await ctx.wait_for_event(
                ApprovalResponseEvent, waiter_id=f"aiam-approval-{payload['approval_id']}",
                waiter_event=ApprovalRequestEvent(agent=name, agent_id=self._aiam_id(name),
                                                  **fields_),
                requirements={"approval_id": payload["approval_id"]},
                timeout=s.approval_timeout_s)
            return {"approved": answer.approved, "approver": answer.approver}

        done = await s.guard.amediate(
            token, call, run_tool, screen=_screen, failed=_failed, paused=_control_flow,
            ask=None if s.on_approval == "refuse" or run.nested else ask,
            agent_id=self._aiam_id(name))
        output = _output(done, ev.tool_name, ev.tool_kwargs)
        direct = bool(tool.metadata.return_direct) and done.value is not None and (
            not output.is_error)
        return output, direct, done.decision.arguments if done.value is not None else (
            ev.tool_kwargs)

    async def _aiam_handoff(self, ctx: Context, run: _Run, current: str, token: str | None,
                            ev: ToolCallEvent) -> tuple[ToolOutput, bool]:
        """A handoff is a delegation: the receiving agent gets its own, narrower token."""
        target = ev.tool_kwargs.get("to_agent")
        if isinstance(target, str) and self._aiam_can_handoff(current, target):
            try:
                child = self._aiam_delegate(run, target, token)
            except Exception as exc:
                why = str(exc) if isinstance(exc, AgenticIAMError) else type(exc).__name__
                log.info("handoff %s -> %s refused: %s", current, target, why)
                return _refusal(ev.tool_name, ev.tool_kwargs, (
                    f"The handoff to `{target}` was refused by the access layer: {why}. "
                    f"Continue as `{current}` or tell the user what you could not do.")), False
            await _update(ctx, lambda r: replace(
                r, agents={**r.agents, target: child},
                minted=r.minted if child in (r.root, *r.minted) else (*r.minted, child)))
        # The stock tool validates the target (and explains a bad one) and switches agents.
        tool = next((t for t in await self._aiam_tools(current, HANDOFF_TOOL)
                     if t.metadata.name == HANDOFF_TOOL), None)
        if tool is None:
            return _refusal(ev.tool_name, ev.tool_kwargs,
                            _NOT_FOUND.format(tool=HANDOFF_TOOL)), False
        output = await cast(Any, self)._call_tool(ctx, tool, dict(ev.tool_kwargs))
        return cast(ToolOutput, output), bool(tool.metadata.return_direct)

    def _aiam_delegate(self, run: _Run, target: str, token: str | None) -> str:
        s = self._aiam()
        if token is None:
            raise ConfigurationError("this run carries no execution identity")
        if s.broker is None:
            raise ConfigurationError("handoffs need a DelegationBroker (broker=...)")
        parent, target_id = s.guard.verifier.verify(token), self._aiam_id(target)
        held = run.token_for(target, self._aiam_root())
        if held is not None:  # handing back to an ancestor: its own grant, nothing wider
            try:
                back = s.guard.verifier.verify(held)
                if back.jti in parent.ancestors and back.agent_id == target_id:
                    return held
            except TokenError:
                pass
        if parent.agent_id == target_id and target not in s.handoff_capabilities:
            return token  # the same registry agent under another name: the same identity
        # The broker decides (registry `may_delegate_to`, narrowing) and records it.
        return _minted(s.broker.subdelegate_for(
            token, target_id, capabilities=s.handoff_capabilities.get(target)).token)

    @step
    async def run_agent_step(self, ctx: Context, ev: AgentSetup) -> AgentOutput:
        """The stock step, with the agent's LLM usage charged to the agent's identity."""
        scope = _STEP_SCOPE.set(await self._aiam_scope(ctx, ev.current_agent_name))
        try:
            return cast(AgentOutput, await cast(Any, super()).run_agent_step(ctx, ev))
        finally:
            _STEP_SCOPE.reset(scope)

    @step
    async def parse_agent_output(
        self, ctx: Context, ev: AgentOutput
    ) -> StopEvent | AgentInput | ToolCallEvent | None:
        """The stock step; when it ends the run, the run's executions end."""
        scope = _STEP_SCOPE.set(await self._aiam_scope(ctx, ev.current_agent_name))
        try:
            result = await cast(Any, super()).parse_agent_output(ctx, ev)
        finally:
            _STEP_SCOPE.reset(scope)
        if isinstance(result, StopEvent):
            await self._aiam_finish(ctx)
        return cast(StopEvent | AgentInput | ToolCallEvent | None, result)

    @step
    async def aggregate_tool_results(self, ctx: Context,
                                     ev: ToolCallResult) -> AgentInput | StopEvent | None:
        """The stock step; when a ``return_direct`` tool ends the run, its executions end."""
        result = await cast(Any, super()).aggregate_tool_results(ctx, ev)
        if isinstance(result, StopEvent):
            await self._aiam_finish(ctx)
        return cast(AgentInput | StopEvent | None, result)

    async def _aiam_finish(self, ctx: Context) -> None:
        await _finish(self._aiam().guard, ctx, "completed")
        if isinstance(self, AgentWorkflow):  # the next run starts with the root agent again
            await ctx.store.set("current_agent_name", self._aiam_root())

    async def _aiam_scope(self, ctx: Context, agent_name: str) -> _StepScope:
        s, run = self._aiam(), await _load(ctx)
        return _StepScope(s.guard, run.token_for(agent_name, self._aiam_root()),
                          _model_name(self._aiam_agents().get(agent_name), s.model_name))


class _GuardedAgent(_Guarded):
    """A single workflow agent (``FunctionAgent``, ``ReActAgent``...) running as its workflow."""

    async def take_step(self, ctx: AgentContext, llm_input: list[ChatMessage],
                        tools: Sequence[AsyncBaseTool], memory: BaseMemory) -> AgentOutput:
        """Refuses to run in a workflow that does not guard tool calls (a stock
        ``AgentWorkflow`` runs its own ``call_tool``: this agent's calls would not be decided)."""
        if _STEP_SCOPE.get() is None:
            raise ConfigurationError(
                f"guarded agent `{self._aiam_root()}` is running in a workflow that does not "
                f"guard tool calls; protect the AgentWorkflow instead")
        return cast(AgentOutput, await cast(Any, super()).take_step(ctx, llm_input, tools,
                                                                    memory))


def protect(agent: W, guard: Guard, *, broker: DelegationBroker | None = None,
            agent_id: str | None = None, **options: Any) -> W:
    """Guard an existing ``FunctionAgent`` / ``ReActAgent`` / ``AgentWorkflow``; returns it.

    The same object comes back, its class swapped for a subclass whose ``call_tool`` step
    mediates every tool call (references held elsewhere are guarded too). ``agent_id``: the
    registry id of the agent (of the root agent of a workflow; default: its name). ``broker``
    mints handoff and sub-agent identities. ``options``: ``agent_ids`` (agent name -> registry
    id), ``handoff_capabilities``, ``model_name``, ``on_approval`` (``wait``/``refuse``),
    ``approval_timeout_s``, ``end_on_finish`` (for a token bound with ``bind``).
    """
    if not isinstance(guard, Guard):
        raise TypeError("protect() needs a Guard")
    if isinstance(agent, _Guarded):
        raise ValueError(f"`{type(agent).__name__}` is already protected")
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise TypeError(f"protect() got unknown options: {', '.join(unknown)}")
    if options.get("on_approval", "wait") not in ("wait", "refuse"):
        raise ValueError(f"on_approval must be `wait` or `refuse`, got {options['on_approval']!r}")
    settings = _Settings(guard, broker, agent_id, **options)
    if isinstance(agent, BaseWorkflowAgent):
        mixin: type[_Guarded] = _GuardedAgent
    elif isinstance(agent, AgentWorkflow):
        mixin = _Guarded
    else:
        raise TypeError(f"protect() takes a LlamaIndex workflow agent or AgentWorkflow, not "
                        f"`{type(agent).__name__}`")
    base = type(agent)
    guarded = type(f"Guarded{base.__name__}", (mixin, base), {
        "__module__": __name__, "_aiam": lambda self: settings})
    object.__setattr__(agent, "__class__", guarded)  # pydantic's __setattr__ knows no __class__
    _install_sentinel()
    return agent


def _shorthand(base: type[Any]) -> Callable[..., Any]:
    def make(*, guard: Guard, broker: DelegationBroker | None = None,
             agent_id: str | None = None, **kwargs: Any) -> Any:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTIONS}
        return protect(base(**kwargs), guard, broker=broker, agent_id=agent_id, **options)

    make.__doc__ = f"``protect({base.__name__}(**kwargs), guard, ...)`` in one call."
    return make


GuardedFunctionAgent = _shorthand(FunctionAgent)
GuardedReActAgent = _shorthand(ReActAgent)
GuardedAgentWorkflow = _shorthand(AgentWorkflow)


# --- plain tools ---------------------------------------------------------------------------------


class GuardedTool(FunctionTool):
    """A tool whose every ``call``/``acall`` is mediated with a fixed token (keyword arguments
    only; approvals refused, the request stays pending). A refusal or an exception of the tool is
    ``ToolOutput(is_error=True)``. For tools run outside protected workflows."""

    def __init__(self, inner: BaseTool, guard: Guard, token: Token, *,
                 model_name: str | None = None) -> None:
        self._inner, self._guard, self._token = inner, guard, _raw(token)
        self._model_name = model_name
        real = inner.real_fn if isinstance(inner, FunctionTool) else inner.__call__
        super().__init__(fn=cast(Any, real), metadata=inner.metadata)
        self.requires_context, self.ctx_param_name, self.partial_params = False, None, {}

    def _call(self, kwargs: dict[str, Any]) -> ToolCall:
        return ToolCall(self.metadata.get_name(), kwargs, None, ReasoningContext(
            model=self._model_name, run_id=_run_id(), span_id=active_span_id.get()), FRAMEWORK)

    def _output(self, run: Callable[[], object], arguments: Mapping[str, Any]) -> ToolOutput:
        name = self.metadata.get_name()
        try:
            raw = run()
        except Exception as exc:  # what the tool raised is the error output the model reads
            if _control_flow(exc):
                raise
            raw = ToolOutput(content=str(exc) or type(exc).__name__, tool_name=name,
                             raw_input=dict(arguments), raw_output=None, is_error=True)
        return raw if isinstance(raw, ToolOutput) else ToolOutput(
            content=str(raw), tool_name=name, raw_input=dict(arguments), raw_output=raw)

    # DispatcherSpanMixin would add a second span around the inner tool's own
    # (llama_index_instrumentation/__init__.py); the marker is its idempotency flag.
    def call(self, *args: Any, **kwargs: Any) -> ToolOutput:
        call, inner = self._call(kwargs), cast(Any, self._inner)
        if args:  # the Guard checks named arguments; positional ones would go unchecked
            return _refusal(call.name, kwargs, _POSITIONAL)
        run = inner.call if isinstance(inner, AsyncBaseTool) else inner
        done = self._guard.mediate(self._token, call, lambda a: self._output(
            lambda: run(**a), a), screen=_screen, failed=_failed)
        return _output(done, call.name, call.arguments)

    async def acall(self, *args: Any, **kwargs: Any) -> ToolOutput:
        call, inner = self._call(kwargs), cast(Any, self._inner)
        if args:
            return _refusal(call.name, kwargs, _POSITIONAL)

        async def run(a: dict[str, Any]) -> ToolOutput:
            if isinstance(inner, AsyncBaseTool):
                raw = await inner.acall(**a)
                return self._output(lambda: raw, a)
            return await asyncio.to_thread(self._output, lambda: inner(**a), a)

        done = await self._guard.amediate(self._token, call, run, screen=_screen,
                                          failed=_failed, paused=_control_flow)
        return _output(done, call.name, call.arguments)

    setattr(call, DISPATCHER_SPAN_DECORATED_ATTR, True)
    setattr(acall, DISPATCHER_SPAN_DECORATED_ATTR, True)


def guard_tools(tools: Iterable[BaseTool | Callable[..., Any]], guard: Guard, token: Token, *,
                model_name: str | None = None) -> list[GuardedTool]:
    """Wrap tools (``BaseTool`` or plain callables) so that each call is mediated with ``token``.
    Not for a protected workflow (each call would be decided twice)."""
    listed = list(tools)
    if any(isinstance(t, GuardedTool) for t in listed):
        raise ValueError("a tool is already guarded")
    _install_sentinel()
    return [GuardedTool(t if isinstance(t, BaseTool) else FunctionTool.from_defaults(t), guard,
                        token, model_name=model_name) for t in listed]


# --- instrumentation (observe only) ---------------------------------------------------------------


def _usage(response: object) -> tuple[int, int] | None:
    """(input, output) tokens of a Chat/CompletionResponse (OpenAI- and Anthropic-style)."""
    raw = getattr(response, "raw", None)
    for source in (getattr(response, "additional_kwargs", None), _field(raw, "usage"),
                   _field(raw, "usage_metadata")):
        counts = [next((v for v in (_field(source, k) for k in keys)
                        if type(v) is int and v >= 0), None)
                  for keys in (("prompt_tokens", "input_tokens"),
                               ("completion_tokens", "output_tokens"))]
        if source is not None and counts != [None, None]:
            return counts[0] or 0, counts[1] or 0
    return None


def _field(source: object, key: str) -> object:
    return source.get(key) if isinstance(source, Mapping) else getattr(source, key, None)


class IAMInstrumentation(BaseEventHandler):
    """Observe-only: charges each LLM response's token usage to the token of the protected step
    that made the call (or ``token`` outside protected workflows). LlamaIndex swallows handler
    exceptions: this never blocks; the Guard enforces ``llm_tokens`` on the next tool call."""

    charged: int = 0
    """LLM responses charged."""
    unattributed: int = 0
    """LLM responses with usage but no identity to charge."""

    _guard: Guard | None = PrivateAttr(default=None)
    _token: str | None = PrivateAttr(default=None)
    _model: str | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, guard: Guard, *, token: Token | None = None,
                 model_name: str | None = None) -> None:
        super().__init__()
        self._guard, self._model = guard, model_name
        self._token = _raw(token) if token is not None else None

    @classmethod
    def class_name(cls) -> str:
        return "AgenticIAMInstrumentation"

    @property
    def guard(self) -> Guard | None:
        return self._guard

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if not isinstance(event, (LLMChatEndEvent, LLMCompletionEndEvent)):
            return
        usage = _usage(event.response) if event.response is not None else None
        scope = _STEP_SCOPE.get()
        if usage is None or self._guard is None or (scope and scope.guard is not self._guard):
            return  # nothing to charge, or another guard's handler charges it
        token = scope.token if scope is not None else self._token
        with self._lock:
            if token is None:
                self.unattributed += 1
                return
        try:
            self._guard.charge_usage(token, input_tokens=usage[0], output_tokens=usage[1],
                                     model=(scope.model if scope else None) or self._model,
                                     framework=FRAMEWORK)
        except Exception as exc:  # observe-only; the Guard denies on a bad token anyway
            log.warning("could not charge LLM usage: %s", type(exc).__name__)
            return
        with self._lock:
            self.charged += 1


def install_instrumentation(guard: Guard, *, token: Token | None = None,
                            model_name: str | None = None,
                            dispatcher: Dispatcher | None = None) -> IAMInstrumentation:
    """Attach an :class:`IAMInstrumentation` for ``guard`` to the (root) dispatcher, once."""
    target = dispatcher or get_dispatcher()
    for handler in target.event_handlers:
        if isinstance(handler, IAMInstrumentation) and handler.guard is guard:
            return handler
    handler = IAMInstrumentation(guard, token=token, model_name=model_name)
    target.add_event_handler(handler)
    return handler


def uninstall_instrumentation(handler: IAMInstrumentation,
                              dispatcher: Dispatcher | None = None) -> None:
    """Detach a handler attached by :func:`install_instrumentation`."""
    target = dispatcher or get_dispatcher()
    target.event_handlers = [h for h in target.event_handlers if h is not handler]


# --- memory scopes -------------------------------------------------------------------------------


class ScopeFilter(BaseNodePostprocessor):
    """Keeps only nodes whose ``metadata[scope_key]`` is one of the run token's memory scopes
    (:meth:`Guard.filter_memory`: revoked or expired tokens keep nothing; drops are recorded as
    ``memory.retrieved``). The token: ``token=``, else the one bound for the running tool call.
    As a query engine's postprocessor, put it first (no reranker sees out-of-scope text)."""

    scope_key: str = "scope"
    """The metadata key holding a node's scope."""

    _guard: Guard | None = PrivateAttr(default=None)
    _token: Token | None = PrivateAttr(default=None)

    def __init__(self, guard: Guard, *, token: Token | None = None,
                 scope_key: str = "scope") -> None:
        fields_: dict[str, Any] = {"scope_key": scope_key}
        super().__init__(**fields_)
        self._guard, self._token = guard, token

    @classmethod
    def class_name(cls) -> str:
        return "AgenticIAMScopeFilter"

    def keep(self, nodes: Sequence[NodeWithScore], query: str | None = None
             ) -> list[NodeWithScore]:
        assert self._guard is not None
        # No token reads nothing (and the attempt is recorded): filter_memory never raises.
        token = self._token if self._token is not None else current_token()
        filtered = self._guard.filter_memory(
            token, nodes, scope_of=lambda n: n.node.metadata.get(self.scope_key),
            id_of=lambda n: str(n.node.node_id), query=query, framework=FRAMEWORK)
        return list(filtered.kept)

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        return self.keep(nodes, query_bundle.query_str if query_bundle is not None else None)


class ScopedRetriever(BaseRetriever):
    """A retriever returning only the nodes the run's memory scopes allow (see
    :class:`ScopeFilter`); filtering happens before anything downstream sees a node."""

    def __init__(self, retriever: BaseRetriever, guard: Guard, *, token: Token | None = None,
                 scope_key: str = "scope") -> None:
        super().__init__(callback_manager=retriever.callback_manager)
        self.retriever = retriever
        self.filter = ScopeFilter(guard, token=token, scope_key=scope_key)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self.filter.keep(self.retriever.retrieve(query_bundle), query_bundle.query_str)

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        nodes = await self.retriever.aretrieve(query_bundle)
        return self.filter.keep(nodes, query_bundle.query_str)
