"""LlamaIndex adapter: every tool call of a workflow agent goes through the Guard.

What it gives you (``pip install "agentic-iam[llama-index]"``, llama-index-core >= 0.14):

- :class:`GuardedFunctionAgent`, :class:`GuardedReActAgent` and :class:`GuardedAgentWorkflow` —
  the stock classes with the workflow's ``call_tool`` step replaced (one shared mixin). That step
  is where every tool call of every agent really passes, including the built-in ``handoff``
  tool. For each call it finds the assistant message that asked for it (text and thinking
  blocks, or the ReAct thought) as reasoning context, asks :meth:`Guard.authorize`, and: on
  ``deny`` returns ``ToolOutput(is_error=True)`` with the Guard's model message (the model reads
  it on its next turn; the run goes on); on ``approval_required`` pauses the workflow with
  ``ctx.wait_for_event`` — an :class:`ApprovalRequestEvent` (an ``InputRequiredEvent``) on the
  event stream carries the approval id and the call; answer with
  ``handler.ctx.send_event(event.answer(approved=True, approver="bob"))`` — then records the
  answer with :meth:`Guard.resolve_approval` and authorizes the same call again; on ``allow``
  runs the tool with ``decision.arguments`` (the checked copy) and screens its output with
  :meth:`Guard.screen` *before* the ``ToolCallResult`` is streamed or stored in memory.
- Per-run identity: ``await bind_identity(ctx, token)`` then ``workflow.run(user_msg=...,
  ctx=ctx)``, or ``handler = await run_with_identity(workflow, user_msg, token)``. The token
  lives under a private key of the workflow's context store, never in ``initial_state`` /
  ``state`` (which ``setup_agent`` renders into the prompt). A run without a valid token cannot
  call tools: every call is denied (and on the record).
- Executions end with their run: when the workflow finishes (a ``StopEvent`` from
  ``parse_agent_output`` or, for a ``return_direct`` tool, ``aggregate_tool_results``), the
  run's execution ends (:meth:`Guard.end_execution`: it and every token sub-delegated from it
  stop working). A pause for an approval is not the end. For a conversation of several runs in
  one ``Context``, pass ``end_on_finish=False`` to :func:`bind_identity` /
  :func:`run_with_identity` and end the token yourself. Identities minted for handoffs and for
  :func:`agent_tool` sub-runs always end with the run (after a run with handoffs, the next run
  of an opted-out ``Context`` starts with the root agent again). A run that raises or times out
  has not finished: end its token yourself or let it expire.
- Handoffs: in a :class:`GuardedAgentWorkflow` the ``handoff`` tool mints the receiving agent a
  narrower identity with :meth:`DelegationBroker.subdelegate_for` (the current agent's grant
  intersected with the receiving agent's registry tools, or ``handoff_capabilities[name]``);
  the receiving agent's calls are authorized under that child token. ``agent_ids`` maps
  LlamaIndex agent names to registry agent ids (default: the name). A handoff the registry
  (``may_delegate_to``) or the grant does not allow comes back to the model as an error and
  the current agent stays in charge. Handing back to an agent whose identity is an ancestor of
  the current one restores that identity (it is the one the delegator granted; nothing widens).
  A handoff is a delegation, decided by the broker and recorded as ``delegation.subdelegated``;
  it has no ``tool_call.decided`` event of its own (``handoff`` is not a registry tool).
  ``await workflow.current_identity(ctx, agent_name)`` returns the verified identity an agent
  of the run acts under.
- :func:`agent_tool` — agent-as-tool: a ``FunctionTool(task)`` that runs a guarded workflow in a
  fresh ``Context`` with an identity sub-delegated from the calling agent's.
- :func:`guard_tools` — wrapped ``FunctionTool``/``BaseTool`` for use outside guarded workflows
  (``call`` and ``acall``): a refusal is an error ``ToolOutput``, never an exception.
- :class:`IAMInstrumentation` / :func:`install_instrumentation` — an observe-only
  ``llama_index.core.instrumentation`` event handler charging each LLM response's token usage
  to the token of the agent whose step made the call (``Guard.charge_usage``, which records a
  ``model.usage`` audit event), so an exhausted ``llm_tokens`` budget stops further tool calls.
- :class:`ScopedRetriever` / :class:`ScopeFilter` — a retriever wrapper and a node
  postprocessor that keep only nodes whose ``metadata["scope"]`` is one of the agent's memory
  scopes (fail closed: nodes without a scope are dropped) and record what they dropped.

What it must never do: run a tool without an ``allow`` decision for that exact call; run it with
arguments other than ``decision.arguments``; let tool output reach the stream, the memory or the
model unscreened; put a token in the prompt, a message, an event, a span or a log line; let a
receiving agent run with the sender's identity or a wider one; turn a refusal into a crash of
the run.

Caveats: ``call_tool`` is a step of LlamaIndex's workflow agents, not a documented extension
point; this module is tested against llama-index-core 0.14 / llama-index-workflows 2.x. Guarded
agents placed in a *stock* ``AgentWorkflow`` would be bypassed (that workflow runs its own
``call_tool``), so they refuse to take a step there: use :class:`GuardedAgentWorkflow`. Do not
combine :func:`guard_tools` with a guarded workflow (each call would be decided twice). A paused
approval survives in-process; the workflow replays the step on resume, so the approval's
bookkeeping lives in the context store; a paused call is decided twice (``approval_required``,
then ``allow``). A tool that itself waits for an event is decided again on replay: the first
allow is cancelled (:meth:`Guard.cancel`: reservation and call id given back, as the tool never
finished); a tool that ran and failed, or whose output could not be screened, is charged.
Providers that return no call ids are matched by tool name and
arguments. Non-text output blocks (images, audio) cannot be screened and are withheld.
``ToolOutput.raw_output`` is replaced by the screened text.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

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
    from llama_index.core.instrumentation.events.llm import (
        LLMChatEndEvent,
        LLMCompletionEndEvent,
    )
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

from agentic_iam.core.broker import CapabilitiesLike, DelegationBroker
from agentic_iam.core.decision import Decision, ReasoningContext, ToolCall
from agentic_iam.core.guard import Guard
from agentic_iam.core.identity import AgentSpec, Budget, ExecutionIdentity
from agentic_iam.core.tokens import ExecutionToken
from agentic_iam.errors import (
    AgenticIAMError,
    ConfigurationError,
    DelegationError,
    TokenError,
)

__all__ = [
    "ApprovalRequestEvent",
    "ApprovalResponseEvent",
    "FilteredNodes",
    "GuardedAgentWorkflow",
    "GuardedFunctionAgent",
    "GuardedReActAgent",
    "GuardedTool",
    "GuardedWorkflow",
    "IAMInstrumentation",
    "ScopeFilter",
    "ScopedRetriever",
    "agent_tool",
    "bind_identity",
    "find_requesting_message",
    "guard_tools",
    "install_instrumentation",
    "run_with_identity",
    "uninstall_instrumentation",
]

log = logging.getLogger("agentic_iam.integrations.llama_index")

FRAMEWORK = "llama_index"
HANDOFF_TOOL = "handoff"
ApprovalMode = Literal["wait", "refuse"]
Token = str | ExecutionToken

# The context-store key of the run's identity record. Not "state": that one is formatted into
# the prompt by `setup_agent` (llama_index/core/agent/workflow/multi_agent_workflow.py). No dots:
# the store reads dotted keys as paths.
_STORE_KEY = "agentic_iam_identity"
# How many approval rounds one call may go through before the adapter gives up on it.
_APPROVAL_ROUNDS = 3

_NO_TOKEN = ("The call to `{tool}` was refused by the access layer and was not run. Reason: "
             "this run carries no execution identity.")
_NO_MESSAGE = ("The call to `{tool}` was refused by the access layer and was not run. Reason: "
               "the model message that requested it was not found.")
_FAILED = "The call to `{tool}` was refused: the access check failed."


def _control_flow(exc: BaseException) -> bool:
    return bool(_CONTROL_FLOW) and isinstance(exc, _CONTROL_FLOW)


def _settle_raised(guard: Guard, decision: Decision, exc: BaseException) -> None:
    """Settle an allowed call whose tool raised ``exc`` instead of returning.

    A tool waiting for an event (``ctx.wait_for_event``) pauses its step, which the workflow
    replays from the top when the event arrives: the call is cancelled (reservation and call id
    given back) so the replay can ask again. Anything else (a cancellation, an interrupt) may
    have come after the tool's side effect: charged.
    """
    if _control_flow(exc):
        guard.cancel(decision)
    else:
        guard.complete(decision, "error")


def _raw(token: Token) -> str:
    return token.token if isinstance(token, ExecutionToken) else token


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


# --- per-run identity --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """The run's identity record, as kept in the context store (plain JSON: strings and lists)."""

    root: str | None = field(default=None, repr=False)
    """The token bound to the root agent."""
    agents: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Tokens minted during the run, by LlamaIndex agent name (handoffs)."""
    nested: bool = False
    """A sub-run (agent-as-tool): its input is model-written, and nobody answers its approvals."""
    parent_run_id: str | None = None
    """The run that started this sub-run."""
    observed: tuple[str, ...] = ()
    """Digests of (token, user request) pairs already recorded for argument provenance."""
    end_on_finish: bool = True
    """End the root execution when the run finishes (a nested run's always ends)."""
    minted: tuple[str, ...] = field(default=(), repr=False)
    """Every token minted for a handoff during the run (they end with the run, always)."""
    ended: bool = False
    """The root execution was ended."""

    @classmethod
    def load(cls, value: object) -> _Record:
        if not isinstance(value, Mapping):
            return cls()
        root = value.get("root")
        agents = value.get("agents")
        observed = value.get("observed")
        parent = value.get("parent_run_id")
        minted = value.get("minted")
        return cls(
            root=root if isinstance(root, str) and root else None,
            agents={k: v for k, v in agents.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(agents, Mapping) else {},
            nested=value.get("nested") is True,
            parent_run_id=parent if isinstance(parent, str) else None,
            observed=tuple(o for o in observed if isinstance(o, str))
            if isinstance(observed, list) else (),
            # Only an explicit False opts out: ending is the default.
            end_on_finish=value.get("end_on_finish") is not False,
            minted=tuple(m for m in minted if isinstance(m, str))
            if isinstance(minted, list) else (),
            ended=value.get("ended") is True,
        )

    def dump(self) -> dict[str, Any]:
        return {"root": self.root, "agents": dict(self.agents), "nested": self.nested,
                "parent_run_id": self.parent_run_id, "observed": list(self.observed),
                "end_on_finish": self.end_on_finish, "minted": list(self.minted),
                "ended": self.ended}

    def token_for(self, agent_name: str, root_name: str) -> str | None:
        token = self.agents.get(agent_name)
        if token is None and agent_name == root_name:
            token = self.root
        return token


async def _load_record(ctx: Context) -> _Record:
    return _Record.load(await ctx.store.get(_STORE_KEY, default=None))


async def _update_record(ctx: Context, change: Callable[[_Record], _Record]) -> None:
    """Read-modify-write the record atomically (up to four ``call_tool`` workers share it)."""
    async with ctx.store.edit_state() as state:
        current = _Record.load(state.get(_STORE_KEY, None))
        state[_STORE_KEY] = change(current).dump()


async def bind_identity(ctx: Context, token: Token, *, nested: bool = False,
                        parent_run_id: str | None = None, end_on_finish: bool = True) -> None:
    """Bind the execution token to a run, before ``workflow.run(..., ctx=ctx)``.

    The token is the root agent's identity; agents reached by handoff get narrower ones. It is
    kept under a private context-store key (never in ``state``, which the prompt renders).
    ``nested`` marks a sub-run whose input the model wrote (agent-as-tool): its input is not
    recorded as the user's request, its approvals are refused rather than awaited, and its
    execution always ends with it. ``end_on_finish=False`` keeps the root execution working
    after the run finishes, for a conversation of several runs in one ``Context`` (end it
    yourself with ``guard.end_execution(token)``); identities minted for handoffs end anyway.
    """
    if isinstance(token, ExecutionToken):
        raw = token.token
    elif isinstance(token, str) and token:
        raw = token
    else:
        # An already-verified ExecutionIdentity is not accepted: anything in-process can make one.
        raise TypeError("bind_identity needs a compact token string or an ExecutionToken")
    record = _Record(root=raw, nested=nested, parent_run_id=parent_run_id,
                     end_on_finish=end_on_finish is not False)
    await ctx.store.set(_STORE_KEY, record.dump())


async def run_with_identity(workflow: GuardedWorkflow, user_msg: str | ChatMessage, token: Token,
                            *, ctx: Context | None = None, end_on_finish: bool = True,
                            **run_kwargs: Any) -> WorkflowHandler:
    """Start ``workflow`` for ``user_msg`` with ``token`` bound; returns the handler.

    ``handler = await run_with_identity(wf, "refund T-1042", token)``, then stream its events
    and ``await handler``. Only guarded workflows are accepted (a stock one would not enforce).
    The execution ends when the run finishes, unless ``end_on_finish=False`` (see
    :func:`bind_identity`).
    """
    if not isinstance(workflow, _GuardedSteps):
        raise TypeError(f"`{type(workflow).__name__}` is not a guarded workflow; use "
                        f"GuardedFunctionAgent, GuardedReActAgent or GuardedAgentWorkflow")
    ctx = ctx if ctx is not None else Context(workflow)
    await bind_identity(ctx, token, end_on_finish=end_on_finish)
    return workflow.run(user_msg=user_msg, ctx=ctx, **run_kwargs)


# --- reasoning context -------------------------------------------------------------------------


def _call_ids(message: ChatMessage) -> Iterable[str | None]:
    for block in message.blocks:
        if isinstance(block, ToolCallBlock):
            yield block.tool_call_id
    extra = message.additional_kwargs.get("tool_calls")
    if isinstance(extra, list):
        for item in extra:
            if isinstance(item, Mapping):
                yield item.get("id") or item.get("tool_id")
            else:
                yield getattr(item, "id", None) or getattr(item, "tool_id", None)


def find_requesting_message(messages: Sequence[object], tool_id: str) -> ChatMessage | None:
    """The assistant ``ChatMessage`` whose tool calls hold ``tool_id`` (latest first)."""
    if not tool_id:
        return None
    for message in reversed(messages):
        if (isinstance(message, ChatMessage) and message.role == MessageRole.ASSISTANT
                and tool_id in _call_ids(message)):
            return message
    return None


def _message_text(message: ChatMessage) -> str | None:
    """The model's text plus its thinking blocks."""
    text = "\n".join(b.text for b in message.blocks if isinstance(b, TextBlock)).strip()
    thinking = [b.content.strip() for b in message.blocks
                if isinstance(b, ThinkingBlock) and b.content and b.content.strip()]
    for key in ("reasoning_content", "thinking"):
        extra = message.additional_kwargs.get(key)
        if isinstance(extra, str) and extra.strip() and extra.strip() not in thinking:
            thinking.append(extra.strip())
    parts = [p for p in (text, *(f"[reasoning] {t}" for t in thinking)) if p]
    return "\n".join(parts) or None


def _react_step(steps: Sequence[object], tool_name: str,
                arguments: Mapping[str, Any]) -> ActionReasoningStep | None:
    for item in reversed(steps):
        if (isinstance(item, ActionReasoningStep) and item.action == tool_name
                and item.action_input == dict(arguments)):
            return item
    return None


def _calling_message(messages: Sequence[object], tool_name: str,
                     arguments: Mapping[str, Any]) -> ChatMessage | None:
    """The latest assistant message calling ``tool_name`` with exactly ``arguments``."""
    wanted = dict(arguments)
    for message in reversed(messages):
        if (isinstance(message, ChatMessage) and message.role == MessageRole.ASSISTANT
                and any(isinstance(b, ToolCallBlock) and b.tool_name == tool_name
                        and b.tool_kwargs == wanted for b in message.blocks)):
            return message
    return None


async def _requesting_text(ctx: Context, agent: BaseWorkflowAgent | None, tool_name: str,
                           tool_id: str | None, arguments: Mapping[str, Any]) -> str | None:
    """What the model said when it asked for the call: the assistant message in the agent's
    scratchpad (by call id; by tool name and arguments when the provider gives no id), or the
    ReAct reasoning step."""
    scratchpad_key = getattr(agent, "scratchpad_key", None) or "scratchpad"
    pad = await ctx.store.get(scratchpad_key, default=None)
    if isinstance(pad, list):
        message = (find_requesting_message(pad, tool_id) if tool_id else None) or (
            _calling_message(pad, tool_name, arguments))
        if message is not None:
            return _message_text(message) or ""
    reasoning_key = getattr(agent, "reasoning_key", None) or "current_reasoning"
    steps = await ctx.store.get(reasoning_key, default=None)
    if isinstance(steps, list):
        found = _react_step(steps, tool_name, arguments)
        if found is not None:
            return found.get_content()
    return None


def _model_name(agent: BaseWorkflowAgent | None, default: str | None) -> str | None:
    if default:
        return default
    try:
        name = agent.llm.metadata.model_name if agent is not None else None
    except Exception:  # an LLM without metadata: nothing to record
        return None
    return name if isinstance(name, str) and name and name != "unknown" else None


def _run_id() -> str | None:
    value = active_instrument_tags.get().get("llamaindex.run_id")
    return str(value) if value else None


# --- outputs -------------------------------------------------------------------------------------


def _output_text(output: ToolOutput) -> str:
    """One text for the firewall. Non-text blocks cannot be screened: they are withheld."""
    text = output.content
    others = [b for b in output.blocks if not isinstance(b, TextBlock)]
    if others:
        kinds = ", ".join(sorted({type(b).__name__ for b in others}))
        note = f"[agentic-iam: {len(others)} non-text block(s) withheld ({kinds})]"
        text = f"{text}\n{note}" if text else note
    return text


def _refusal(tool_name: str, arguments: Mapping[str, Any], text: str) -> ToolOutput:
    return ToolOutput(content=text, tool_name=tool_name, raw_input=dict(arguments),
                      raw_output=text, is_error=True)


def _screened(guard: Guard, decision: Decision, output: ToolOutput,
              arguments: Mapping[str, Any]) -> ToolOutput:
    """The output the model may see, and settle the call."""
    try:
        screened = guard.screen(decision, _output_text(output))
    except Exception as exc:  # screen never raises by contract; withhold if it does
        log.warning("screening `%s` failed: %s", decision.tool, type(exc).__name__)
        guard.complete(decision, "error")
        return _refusal(decision.tool, arguments,
                        "[agentic-iam: tool output blocked: screening failed]")
    guard.complete(decision, "error" if output.is_error else "success")
    # raw_output is streamed with the ToolCallResult and becomes AgentOutput.raw on
    # return_direct: it gets the screened text, never the tool's raw object.
    return ToolOutput(content=screened.text, tool_name=decision.tool, raw_input=dict(arguments),
                      raw_output=screened.text,
                      is_error=output.is_error or screened.result.blocked)


def _json_safe(arguments: Mapping[str, Any]) -> dict[str, Any]:
    try:
        value = json.loads(json.dumps(dict(arguments), default=str))
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# --- approvals -----------------------------------------------------------------------------------


class ApprovalRequestEvent(InputRequiredEvent):
    """On the event stream when a call waits for a human (never carries a token).

    Answer with ``handler.ctx.send_event(event.answer(approved=True, approver="bob"))``.
    """

    approval_id: str
    """The approval request to resolve."""
    tool: str
    """The tool."""
    call_id: str
    """The model's tool call id."""
    arguments: dict[str, Any]
    """The exact arguments the approval would let through (once)."""
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
    """Who answered (recorded): a configured approver id (``GuardConfig.approvers``). The
    default names nobody, and the Guard refuses it unless it is configured."""


def _approval_key(ev: ToolCallEvent) -> str:
    """The context-store key marking a call paused for approval (name and arguments too: some
    providers give no call ids)."""
    return "aiam_approval_" + _digest(ev.tool_id, ev.tool_name,
                                      json.dumps(ev.tool_kwargs, sort_keys=True, default=str))


# --- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    guard: Guard
    broker: DelegationBroker | None
    agent_ids: Mapping[str, str]
    handoff_capabilities: Mapping[str, CapabilitiesLike]
    model_name: str | None
    on_approval: ApprovalMode
    approval_timeout_s: float | None
    require_model_message: bool

    def registry_id(self, agent_name: str) -> str:
        return self.agent_ids.get(agent_name, agent_name)


def _settings(guard: Guard, broker: DelegationBroker | None,
              agent_ids: Mapping[str, str] | None,
              handoff_capabilities: Mapping[str, CapabilitiesLike] | None,
              model_name: str | None, on_approval: ApprovalMode,
              approval_timeout_s: float | None, require_model_message: bool) -> _Settings:
    if not isinstance(guard, Guard):
        raise TypeError("a guarded workflow needs `guard=` (an agentic_iam Guard)")
    if on_approval not in ("wait", "refuse"):
        raise ValueError(f"on_approval must be `wait` or `refuse`, got {on_approval!r}")
    return _Settings(guard, broker, dict(agent_ids or {}), dict(handoff_capabilities or {}),
                     model_name, on_approval, approval_timeout_s, require_model_message)


@dataclass(frozen=True)
class _StepScope:
    """Which identity the LLM calls of the running step are charged to."""

    guard: Guard
    token: str | None = field(repr=False)
    agent: str
    model: str | None


@dataclass(frozen=True)
class _Caller:
    """The identity a tool is running under (read by agent-as-tool)."""

    guard: Guard
    token: str = field(repr=False)
    agent: str
    run_id: str | None


_STEP_SCOPE: ContextVar[_StepScope | None] = ContextVar("aiam_li_step", default=None)
_CALLER: ContextVar[_Caller | None] = ContextVar("aiam_li_caller", default=None)


# --- the guarded steps ---------------------------------------------------------------------------


class _GuardedSteps:
    """The steps every guarded workflow class shares. Hooks are filled in by the classes."""

    # -- hooks

    def _aiam_settings(self) -> _Settings:
        raise NotImplementedError

    def _aiam_root(self) -> str:
        raise NotImplementedError

    def _aiam_agent(self, name: str) -> BaseWorkflowAgent | None:
        raise NotImplementedError

    async def _aiam_current(self, ctx: Context) -> str:
        raise NotImplementedError

    async def _aiam_tools(self, ctx: Context, agent_name: str,
                          tool_name: str) -> Sequence[AsyncBaseTool]:
        raise NotImplementedError

    async def _aiam_run_tool(self, ctx: Context, tool: AsyncBaseTool,
                             tool_input: dict[str, Any]) -> ToolOutput:
        raise NotImplementedError

    def _aiam_has_handoffs(self) -> bool:
        return False

    def _aiam_can_handoff(self, current: str, target: str) -> bool:
        return False

    # -- public helpers

    async def current_identity(self, ctx: Context,
                               agent_name: str | None = None) -> ExecutionIdentity | None:
        """The verified identity an agent of this run acts under (default: the current one)."""
        name = agent_name if agent_name is not None else await self._aiam_current(ctx)
        token = (await _load_record(ctx)).token_for(name, self._aiam_root())
        if token is None:
            return None
        try:
            return self._aiam_settings().guard.verifier.verify(token)
        except TokenError:
            return None

    # -- steps

    @step
    async def call_tool(self, ctx: Context, ev: ToolCallEvent) -> ToolCallResult:
        """Authorize, run (checked arguments only), screen and settle one tool call."""
        mediation = _Mediation(self, ctx, ev)
        try:
            output, return_direct = await mediation.run()
        except BaseException as exc:
            if _control_flow(exc) or not isinstance(exc, Exception):
                raise  # an approval pause (the step replays) or a cancellation
            # Raising here would fail the whole workflow: refuse the call instead.
            log.warning("access check for `%s` failed: %s", ev.tool_name, type(exc).__name__)
            output, return_direct = _refusal(ev.tool_name, ev.tool_kwargs,
                                             _FAILED.format(tool=ev.tool_name)), False
        result = ToolCallResult(tool_name=ev.tool_name, tool_kwargs=mediation.ran_with,
                                tool_id=ev.tool_id, tool_output=output,
                                return_direct=return_direct)
        ctx.write_event_to_stream(result)
        return result

    @step
    async def run_agent_step(self, ctx: Context, ev: AgentSetup) -> AgentOutput:
        """The stock step, with the agent's LLM usage charged to the agent's identity."""
        token = _STEP_SCOPE.set(await self._aiam_scope(ctx, ev.current_agent_name))
        try:
            return cast(AgentOutput,
                        await super().run_agent_step(ctx, ev))  # type: ignore[misc]
        finally:
            _STEP_SCOPE.reset(token)

    @step
    async def parse_agent_output(
        self, ctx: Context, ev: AgentOutput
    ) -> StopEvent | AgentInput | ToolCallEvent | None:
        """The stock step (early-stopping and structured-output LLM calls are charged too);
        when it ends the run, the run's executions end."""
        token = _STEP_SCOPE.set(await self._aiam_scope(ctx, ev.current_agent_name))
        try:
            result = cast(StopEvent | AgentInput | ToolCallEvent | None,
                          await super().parse_agent_output(ctx, ev))  # type: ignore[misc]
        finally:
            _STEP_SCOPE.reset(token)
        if isinstance(result, StopEvent):
            await self._aiam_finish(ctx)
        return result

    @step
    async def aggregate_tool_results(self, ctx: Context,
                                     ev: ToolCallResult) -> AgentInput | StopEvent | None:
        """The stock step; when a ``return_direct`` tool ends the run, its executions end."""
        result = cast(AgentInput | StopEvent | None,
                      await super().aggregate_tool_results(ctx, ev))  # type: ignore[misc]
        if isinstance(result, StopEvent):
            await self._aiam_finish(ctx)
        return result

    async def _aiam_finish(self, ctx: Context) -> None:
        """The run finished (a ``StopEvent``; a pause for an approval is not one)."""
        ended_root = await _finish_run(self._aiam_settings().guard, ctx, "completed")
        if not ended_root and self._aiam_has_handoffs():
            # The root identity outlives the run (end_on_finish=False) but the handoff ones
            # ended: the next run of this Context starts with the root agent again.
            await ctx.store.set("current_agent_name", self._aiam_root())

    async def _aiam_scope(self, ctx: Context, agent_name: str) -> _StepScope:
        settings = self._aiam_settings()
        record = await _load_record(ctx)
        return _StepScope(settings.guard, record.token_for(agent_name, self._aiam_root()),
                          agent_name,
                          _model_name(self._aiam_agent(agent_name), settings.model_name))


def _end(guard: Guard, token: str, reason: str) -> bool:
    """End one execution; False (logged) when it could not be ended: the run's work is done,
    and raising would not make the token any less valid (it still expires at its ``exp``)."""
    try:
        guard.end_execution(token, reason=reason)
    except Exception as exc:  # see the docstring
        log.warning("could not end an execution (%s): %s", reason, type(exc).__name__)
        return False
    return True


async def _finish_run(guard: Guard, ctx: Context, reason: str) -> bool:
    """End the executions of a finished run: every identity minted for a handoff, always; the
    root one unless the run opted out (a nested run never does). True if the root ended."""
    record = await _load_record(ctx)
    left = tuple(t for t in record.minted
                 if t != record.root and not _end(guard, t, reason))
    end_root = (record.root is not None and not record.ended
                and (record.nested or record.end_on_finish))
    ended = end_root and record.root is not None and _end(guard, record.root, reason)
    await _update_record(ctx, lambda r: replace(
        r, agents={k: v for k, v in r.agents.items() if v in left}, minted=left,
        ended=r.ended or ended))
    return record.ended or ended


class _Mediation:
    """One ``call_tool`` step: everything between the model's request and the tool's result."""

    def __init__(self, host: _GuardedSteps, ctx: Context, ev: ToolCallEvent) -> None:
        self.host = host
        self.ctx = ctx
        self.ev = ev
        self.settings = host._aiam_settings()
        self.guard = self.settings.guard
        self.ran_with: dict[str, Any] = dict(ev.tool_kwargs)

    def refuse(self, text: str) -> tuple[ToolOutput, bool]:
        return _refusal(self.ev.tool_name, self.ev.tool_kwargs, text), False

    async def run(self) -> tuple[ToolOutput, bool]:
        ev, ctx = self.ev, self.ctx
        pending = await ctx.store.get(_approval_key(ev), default=None)
        if pending is None:
            # Not a replay after an approval pause: announce the call as the stock step does.
            ctx.write_event_to_stream(ToolCallEvent(tool_name=ev.tool_name,
                                                    tool_kwargs=ev.tool_kwargs,
                                                    tool_id=ev.tool_id))
        agent_name = await self.host._aiam_current(ctx)
        agent = self.host._aiam_agent(agent_name)
        record = await _load_record(ctx)
        token = record.token_for(agent_name, self.host._aiam_root())
        if ev.tool_name == HANDOFF_TOOL and self.host._aiam_has_handoffs():
            return await self.handoff(record, agent_name, token)
        mismatch = self.identity_mismatch(token, agent_name)
        if mismatch is not None:
            return self.refuse(mismatch)
        text = await _requesting_text(ctx, agent, ev.tool_name, ev.tool_id, ev.tool_kwargs)
        if text is None and self.settings.require_model_message:
            log.warning("no requesting model message for tool call `%s` (%s); refused",
                        ev.tool_name, ev.tool_id)
            return self.refuse(_NO_MESSAGE.format(tool=ev.tool_name))
        call = ToolCall(
            name=ev.tool_name, arguments=ev.tool_kwargs, call_id=ev.tool_id,
            reasoning=ReasoningContext(
                message=text or None, model=_model_name(agent, self.settings.model_name),
                run_id=_run_id(), parent_run_id=record.parent_run_id,
                span_id=active_span_id.get()),
            framework=FRAMEWORK,
        )
        if token is not None:
            await self.observe_request(record, token)
        if isinstance(pending, Mapping):
            decision: Decision | str = await self.await_answer(token, call, agent_name, pending)
        else:
            # A run without a token is still put to the Guard, so the attempt is on the record.
            decision = self.guard.authorize(token or "", call)
            if decision.outcome == "approval_required":
                decision = await self.approval(token, call, agent_name, decision, record)
        if isinstance(decision, str):
            return self.refuse(decision)
        if not decision.allowed:
            return self.refuse(_NO_TOKEN.format(tool=ev.tool_name) if token is None
                               else decision.model_message())
        assert token is not None  # an allow needs a verified token
        return await self.execute(decision, token, agent_name)

    def identity_mismatch(self, token: str | None, agent_name: str) -> str | None:
        """A token for another registry agent than the running one would lend it that agent's
        tools: refuse. (A token that does not verify is left to the Guard to deny.)"""
        if token is None:
            return None
        try:
            identity = self.guard.verifier.verify(token, check_revocation=False)
        except TokenError:
            return None
        expected = self.settings.registry_id(agent_name)
        if identity.agent_id == expected:
            return None
        log.warning("run identity is for agent `%s`, but `%s` maps to `%s`; refused",
                    identity.agent_id, agent_name, expected)
        return (f"The call to `{self.ev.tool_name}` was refused by the access layer and was "
                f"not run. Reason: this run's identity is for agent `{identity.agent_id}`, not "
                f"`{expected}`.")

    async def observe_request(self, record: _Record, token: str) -> None:
        """Record the user's request for argument provenance, once per identity and request."""
        if record.nested:
            return  # a sub-run's input was written by a model
        request = await self.ctx.store.get("user_msg_str", default=None)
        if not isinstance(request, str) or not request:
            return
        mark = _digest(token, request)
        if mark in record.observed:
            return
        try:
            self.guard.observe(token, [request], "request")
        except Exception as exc:  # provenance only: unknown values stay "unknown"
            log.warning("could not record the user's request: %s", type(exc).__name__)
            return
        await _update_record(self.ctx, lambda r: replace(
            r, observed=(*r.observed, mark)[-64:]))

    # -- approvals

    async def approval(self, token: str | None, call: ToolCall, agent_name: str,
                       decision: Decision, record: _Record, rounds: int = 0) -> Decision | str:
        """Pause for a human (the step raises and replays); a string is the refusal."""
        if (self.settings.on_approval == "refuse" or record.nested or token is None
                or not decision.approval_id):
            return decision.model_message()
        if rounds >= _APPROVAL_ROUNDS:
            return (f"The call to `{call.name}` still needs approval after {rounds} answers "
                    f"and was not run.")
        main = decision.reasons[0].message if decision.reasons else ""
        pending: dict[str, Any] = {
            "approval_id": decision.approval_id, "tool": call.name, "call_id": self.ev.tool_id,
            "arguments": _json_safe(call.arguments), "agent": agent_name,
            "agent_id": self.settings.registry_id(agent_name), "action": decision.action,
            "execution_id": decision.execution_id, "reason": main,
            "policy_ids": list(decision.policy_ids), "rounds": rounds,
        }
        # The step is replayed from the top when the answer arrives: the marker tells the
        # replay to wait for this answer instead of asking the Guard again.
        await self.ctx.store.set(_approval_key(self.ev), pending)
        return await self.await_answer(token, call, agent_name, pending)

    async def await_answer(self, token: str | None, call: ToolCall, agent_name: str,
                           pending: Mapping[str, Any]) -> Decision | str:
        approval_id = str(pending.get("approval_id"))
        rounds = pending.get("rounds")
        rounds = rounds if isinstance(rounds, int) else _APPROVAL_ROUNDS
        fields = {k: v for k, v in pending.items() if k in ApprovalRequestEvent.model_fields}
        key = _approval_key(self.ev)
        try:
            answer = await self.ctx.wait_for_event(
                ApprovalResponseEvent,
                waiter_event=ApprovalRequestEvent(**fields),
                waiter_id=f"aiam-approval-{approval_id}",
                requirements={"approval_id": approval_id},
                timeout=self.settings.approval_timeout_s,
            )
        except asyncio.TimeoutError:
            await self.ctx.store.set(key, None)
            return (f"Nobody answered the approval request for `{call.name}` in time, so the "
                    f"call was not run.")
        await self.ctx.store.set(key, None)
        approver = answer.approver.strip() if isinstance(answer.approver, str) else ""
        if type(answer.approved) is not bool or not approver:
            return (f"The approval answer for `{call.name}` was not understood, so the call "
                    f"was not run.")
        try:
            self.guard.resolve_approval(approval_id, approved=answer.approved, approver=approver)
        except AgenticIAMError as exc:
            log.warning("approval %s could not be recorded: %s", approval_id, exc)
            return (f"The approval for `{call.name}` could not be recorded, so the call was "
                    f"not run.")
        if not answer.approved:
            return (f"A human declined the call to `{call.name}`; it was not run. Do not "
                    f"retry the same call.")
        if token is None:
            return _NO_TOKEN.format(tool=call.name)
        # The approval lifts the approval policies for this exact call, once.
        decision = self.guard.authorize(token, call)
        if decision.outcome != "approval_required":
            return decision
        return await self.approval(token, call, agent_name, decision,
                                   await _load_record(self.ctx), rounds + 1)

    # -- execution

    async def execute(self, decision: Decision, token: str,
                      agent_name: str) -> tuple[ToolOutput, bool]:
        ev = self.ev
        try:
            tools = await self.host._aiam_tools(self.ctx, agent_name, ev.tool_name)
            tool = next((t for t in tools if t.metadata.name == ev.tool_name), None)
        except Exception:
            self.guard.cancel(decision)  # the tool never started
            raise
        if tool is None:
            # Registered for the agent but not given to it: nothing to run (stock wording).
            self.guard.cancel(decision)
            return self.refuse(f"Tool {ev.tool_name} not found. Please select a tool that is "
                               f"available.")
        arguments = dict(decision.arguments)
        self.ran_with = arguments
        caller = _CALLER.set(_Caller(self.guard, token, agent_name, _run_id()))
        try:
            output = await self.host._aiam_run_tool(self.ctx, tool, dict(arguments))
        except BaseException as exc:
            _settle_raised(self.guard, decision, exc)
            raise
        finally:
            _CALLER.reset(caller)
        screened = _screened(self.guard, decision, output, arguments)
        return screened, bool(tool.metadata.return_direct) and not screened.is_error

    # -- handoffs

    async def handoff(self, record: _Record, current: str,
                      token: str | None) -> tuple[ToolOutput, bool]:
        ev = self.ev
        target = ev.tool_kwargs.get("to_agent")
        if isinstance(target, str) and self.host._aiam_can_handoff(current, target):
            try:
                child = self.delegate(record, current, target, token)
            except Exception as exc:
                if _control_flow(exc):
                    raise
                why = str(exc) if isinstance(exc, AgenticIAMError) else type(exc).__name__
                log.info("handoff %s -> %s refused: %s", current, target, why)
                return self.refuse(
                    f"The handoff to `{target}` was refused by the access layer: {why}. "
                    f"Continue as `{current}` or tell the user what you could not do.")
            await _update_record(self.ctx, lambda r: replace(
                r, agents={**r.agents, target: child},
                minted=r.minted if child in (r.root, *r.minted) else (*r.minted, child)))
            if child != token:
                await self.observe_request(await _load_record(self.ctx), child)
        # The stock handoff tool validates the target (and explains a bad one to the model) and
        # switches agents; no tool of the user's runs here.
        tools = await self.host._aiam_tools(self.ctx, current, HANDOFF_TOOL)
        tool = next((t for t in tools if t.metadata.name == HANDOFF_TOOL), None)
        if tool is None:
            return self.refuse(f"Tool {HANDOFF_TOOL} not found. Please select a tool that is "
                               f"available.")
        output = await self.host._aiam_run_tool(self.ctx, tool, dict(ev.tool_kwargs))
        return output, bool(tool.metadata.return_direct)

    def delegate(self, record: _Record, current: str, target: str, token: str | None) -> str:
        """The token ``target`` will act under (raises when the handoff is not allowed)."""
        if token is None:
            raise ConfigurationError("this run carries no execution identity")
        guard, broker = self.guard, self.settings.broker
        parent = guard.verifier.verify(token)
        target_id = self.settings.registry_id(target)
        existing = record.token_for(target, self.host._aiam_root())
        if existing is not None:
            try:
                held = guard.verifier.verify(existing)
            except TokenError:
                held = None
            if (held is not None and held.jti in parent.ancestors
                    and held.agent_id == target_id):
                return existing  # handing back to an ancestor: its own grant, nothing wider
        if parent.agent_id == target_id and target not in self.settings.handoff_capabilities:
            return token  # the same registry agent under another name: the same identity
        spec = guard.registry.get(parent.agent_id)
        if spec is None or target_id not in spec.may_delegate_to:
            raise DelegationError(f"agent `{parent.agent_id}` may not delegate to `{target_id}`")
        if broker is None:
            raise ConfigurationError("handoffs need a DelegationBroker (broker=...)")
        capabilities = self.settings.handoff_capabilities.get(target)
        # Budget and window default to the parent's remainder capped by the agent's maxima.
        return broker.subdelegate_for(token, target_id, capabilities=capabilities).token


class _GuardedAgentSteps(_GuardedSteps):
    """Hooks for a single agent running as its own workflow."""

    def _agent_self(self) -> BaseWorkflowAgent:
        return cast(BaseWorkflowAgent, self)

    def _aiam_root(self) -> str:
        return self._agent_self().name

    def _aiam_agent(self, name: str) -> BaseWorkflowAgent | None:
        agent = self._agent_self()
        return agent if name == agent.name else None

    async def _aiam_current(self, ctx: Context) -> str:
        return self._agent_self().name

    async def _aiam_tools(self, ctx: Context, agent_name: str,
                          tool_name: str) -> Sequence[AsyncBaseTool]:
        return await self._agent_self().get_tools(tool_name)

    async def _aiam_run_tool(self, ctx: Context, tool: AsyncBaseTool,
                             tool_input: dict[str, Any]) -> ToolOutput:
        return await self._agent_self()._call_tool(ctx, tool, tool_input)

    async def take_step(self, ctx: AgentContext, llm_input: list[ChatMessage],
                        tools: Sequence[AsyncBaseTool], memory: BaseMemory) -> AgentOutput:
        """Refuses to run outside a guarded workflow: a stock ``AgentWorkflow`` runs its own
        ``call_tool``, and this agent's tool calls would not be decided."""
        if _STEP_SCOPE.get() is None:
            raise ConfigurationError(
                f"guarded agent `{self._agent_self().name}` is running in a workflow that does "
                f"not guard tool calls; put it in a GuardedAgentWorkflow")
        return cast(AgentOutput, await super().take_step(  # type: ignore[misc]
            ctx, llm_input, tools, memory))


_GUARD_OPTIONS = """
    ``guard``: the Guard deciding every call. ``broker``: mints handoff identities.
    ``agent_ids``: LlamaIndex agent name -> registry agent id (default: the name).
    ``handoff_capabilities``: receiving agent name -> capabilities of its child token (default:
    the sender's grant intersected with the receiver's registry tools). ``model_name``:
    recorded when the LLM does not name itself. ``on_approval``: ``wait`` pauses the run for an
    :class:`ApprovalResponseEvent`; ``refuse`` returns the approval message to the model (the
    request stays pending; once approved out of band the same call is allowed once).
    ``approval_timeout_s``: how long a paused call waits. ``require_model_message``: refuse
    calls whose requesting message is not in the context store.
"""


class GuardedFunctionAgent(_GuardedAgentSteps, FunctionAgent):
    """A ``FunctionAgent`` whose every tool call is decided by the Guard."""

    _aiam: _Settings | None = PrivateAttr(default=None)

    def __init__(self, *, guard: Guard, broker: DelegationBroker | None = None,
                 agent_ids: Mapping[str, str] | None = None,
                 handoff_capabilities: Mapping[str, CapabilitiesLike] | None = None,
                 model_name: str | None = None, on_approval: ApprovalMode = "wait",
                 approval_timeout_s: float | None = 900.0,
                 require_model_message: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._aiam = _settings(guard, broker, agent_ids, handoff_capabilities, model_name,
                               on_approval, approval_timeout_s, require_model_message)

    __init__.__doc__ = _GUARD_OPTIONS

    def _aiam_settings(self) -> _Settings:
        assert self._aiam is not None
        return self._aiam


class GuardedReActAgent(_GuardedAgentSteps, ReActAgent):
    """A ``ReActAgent`` whose every tool call is decided by the Guard (reasoning: the thought)."""

    _aiam: _Settings | None = PrivateAttr(default=None)

    def __init__(self, *, guard: Guard, broker: DelegationBroker | None = None,
                 agent_ids: Mapping[str, str] | None = None,
                 handoff_capabilities: Mapping[str, CapabilitiesLike] | None = None,
                 model_name: str | None = None, on_approval: ApprovalMode = "wait",
                 approval_timeout_s: float | None = 900.0,
                 require_model_message: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._aiam = _settings(guard, broker, agent_ids, handoff_capabilities, model_name,
                               on_approval, approval_timeout_s, require_model_message)

    __init__.__doc__ = _GUARD_OPTIONS

    def _aiam_settings(self) -> _Settings:
        assert self._aiam is not None
        return self._aiam


class GuardedAgentWorkflow(_GuardedSteps, AgentWorkflow):
    """An ``AgentWorkflow`` whose every tool call, by any of its agents, is decided by the
    Guard; handoffs sub-delegate a narrower identity to the receiving agent.

    The agents may be stock ``FunctionAgent``/``ReActAgent`` instances: this workflow's steps
    are the ones that run.
    """

    def __init__(self, agents: list[BaseWorkflowAgent], *, guard: Guard,
                 broker: DelegationBroker | None = None,
                 agent_ids: Mapping[str, str] | None = None,
                 handoff_capabilities: Mapping[str, CapabilitiesLike] | None = None,
                 model_name: str | None = None, on_approval: ApprovalMode = "wait",
                 approval_timeout_s: float | None = 900.0,
                 require_model_message: bool = True, **kwargs: Any) -> None:
        self._aiam = _settings(guard, broker, agent_ids, handoff_capabilities, model_name,
                               on_approval, approval_timeout_s, require_model_message)
        super().__init__(agents=agents, **kwargs)

    __init__.__doc__ = _GUARD_OPTIONS

    def _aiam_settings(self) -> _Settings:
        return self._aiam

    def _aiam_root(self) -> str:
        return str(self.root_agent)

    def _aiam_agent(self, name: str) -> BaseWorkflowAgent | None:
        return self.agents.get(name)

    async def _aiam_current(self, ctx: Context) -> str:
        name = await ctx.store.get("current_agent_name", default=None)
        return name if isinstance(name, str) else str(self.root_agent)

    async def _aiam_tools(self, ctx: Context, agent_name: str,
                          tool_name: str) -> Sequence[AsyncBaseTool]:
        return await self.get_tools(agent_name, tool_name)

    async def _aiam_run_tool(self, ctx: Context, tool: AsyncBaseTool,
                             tool_input: dict[str, Any]) -> ToolOutput:
        return await self._call_tool(ctx, tool, tool_input)

    def _aiam_has_handoffs(self) -> bool:
        return len(self.agents) > 1

    def _aiam_can_handoff(self, current: str, target: str) -> bool:
        """Whether the stock ``handoff`` tool would switch from ``current`` to ``target``."""
        if current not in self.agents or target not in self.agents or target == current:
            return False
        allowed = self.agents[current].can_handoff_to
        return allowed is None or target in allowed


GuardedWorkflow = GuardedFunctionAgent | GuardedReActAgent | GuardedAgentWorkflow
"""Any of the guarded workflow classes."""


# --- agent-as-tool -------------------------------------------------------------------------------


def agent_tool(
    workflow: GuardedWorkflow,
    *,
    name: str,
    description: str,
    broker: DelegationBroker,
    agent_id: str | None = None,
    capabilities: CapabilitiesLike | None = None,
    budget: Budget | Mapping[str, int | None] | None = None,
) -> FunctionTool:
    """Agent-as-tool: ``name(task: str)`` runs ``workflow`` with a narrower identity.

    The calling agent's Guard decides the call to this tool like any other (register ``name``
    for the calling agent). The identity is sub-delegated from the caller's with
    ``broker.subdelegate_for`` (default: the caller's grant intersected with ``agent_id``'s
    registry tools) and bound to a fresh ``Context``: the sub-run inherits nothing else. Its
    approvals are refused (nobody listens to its event stream) and stay pending.
    """
    if not isinstance(workflow, _GuardedSteps):
        raise TypeError("agent_tool needs a guarded workflow (its tool calls must be decided)")
    target = agent_id or workflow._aiam_settings().registry_id(workflow._aiam_root())

    async def run_agent(ctx: Context, task: str) -> str:
        caller = _CALLER.get()
        if caller is None:
            raise ConfigurationError(f"`{name}` must be called from a guarded workflow")
        child = broker.subdelegate_for(caller.token, target, capabilities=capabilities,
                                       budget=budget)
        sub_ctx = Context(workflow)
        await bind_identity(sub_ctx, child, nested=True, parent_run_id=caller.run_id)
        reason = "failed"
        try:
            result = await workflow.run(user_msg=task, ctx=sub_ctx)
            reason = "completed"
        finally:
            # The identity minted here ends with the sub-run, however it ended (a no-op when
            # the sub-run's own end already did it).
            await _finish_run(workflow._aiam_settings().guard, sub_ctx, reason)
        response = getattr(result, "response", None)
        content = getattr(response, "content", None)
        return str(content) if content is not None else str(result)

    # FunctionTool finds the Context parameter with `annotation == Context`; under PEP 563 the
    # annotation is the string "Context", and ctx would silently not be injected.
    run_agent.__annotations__ = {"ctx": Context, "task": str, "return": str}
    return FunctionTool.from_defaults(async_fn=run_agent, name=name, description=description)


# --- plain tools ---------------------------------------------------------------------------------

_GUARDED_CTX = "_aiam_ctx"


class GuardedTool(FunctionTool):
    """A tool whose every ``call``/``acall`` is authorized, screened and settled with a fixed
    token. A refusal is ``ToolOutput(is_error=True)`` with the Guard's model message.

    Inside a stock workflow agent the tool asks for the workflow ``Context`` (so the agent
    injects it) and uses it to find the requesting message (by tool name and arguments: the
    call id is not passed to tools). Approvals are refused; the request stays pending.
    """

    def __init__(self, inner: BaseTool, guard: Guard, token: Token, *,
                 model_name: str | None = None) -> None:
        self._inner = inner
        self._guard = guard
        self._token = _raw(token)
        self._model_name = model_name
        real = inner.real_fn if isinstance(inner, FunctionTool) else inner.__call__
        super().__init__(fn=cast(Any, real), metadata=inner.metadata)
        self._inner_ctx = (inner.ctx_param_name if isinstance(inner, FunctionTool)
                           and inner.requires_context else None)
        # Always ask for the workflow Context: a stock agent then injects it, and it is where
        # the requesting message is found. Outside a workflow it is simply absent.
        self._ctx_name: str = self._inner_ctx or _GUARDED_CTX
        self.requires_context = True
        self.ctx_param_name = self._ctx_name
        self.partial_params = {}

    @property
    def inner(self) -> BaseTool:
        return self._inner

    def _split(self, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        if args:
            if len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:
                kwargs = dict(args[0])
            else:
                raise TypeError("a guarded tool takes keyword arguments only")
        ctx = kwargs.pop(self._ctx_name, None)
        return kwargs, ctx

    async def _reasoning(self, ctx: Any, arguments: Mapping[str, Any]) -> ReasoningContext:
        text = None
        if isinstance(ctx, Context):
            try:
                text = await _requesting_text(ctx, None, self.metadata.get_name(),
                                              None, arguments)
            except Exception:  # reasoning is context for the record; never a reason to fail
                text = None
        return ReasoningContext(message=text, model=self._model_name, run_id=_run_id(),
                                span_id=active_span_id.get())

    def _decide(self, arguments: dict[str, Any], reasoning: ReasoningContext) -> Decision | str:
        name = self.metadata.get_name()
        try:
            decision = self._guard.authorize(self._token, ToolCall(
                name, arguments, None, reasoning, FRAMEWORK))
        except Exception as exc:  # authorize never raises by contract; fail closed anyway
            log.warning("access check for `%s` failed: %s", name, type(exc).__name__)
            return _FAILED.format(tool=name)
        if not decision.allowed:
            return decision.model_message()
        return decision

    def _inputs(self, decision: Decision, ctx: Any) -> dict[str, Any]:
        checked = dict(decision.arguments)
        if isinstance(ctx, Context) and self._inner_ctx is not None:
            checked[self._inner_ctx] = ctx  # only the workflow's own Context, never a model value
        return checked

    # DispatcherSpanMixin would wrap these overrides in a second span around the inner tool's
    # own (llama_index_instrumentation/__init__.py); the marker is the decorator's documented
    # idempotency flag. One span per tool call, and the arguments are bound only once.
    def call(self, *args: Any, **kwargs: Any) -> ToolOutput:
        try:
            arguments, ctx = self._split(args, kwargs)
        except TypeError as exc:
            return _refusal(self.metadata.get_name(), kwargs, str(exc))
        decided = self._decide(arguments, ReasoningContext(model=self._model_name,
                                                           run_id=_run_id()))
        if isinstance(decided, str):
            return _refusal(self.metadata.get_name(), arguments, decided)
        try:
            output = _as_output(_call_sync(self._inner, self._inputs(decided, ctx)), decided)
        except Exception as exc:
            output = _error_output(decided, exc)
        except BaseException as exc:
            _settle_raised(self._guard, decided, exc)
            raise
        return _screened(self._guard, decided, output, decided.arguments)

    async def acall(self, *args: Any, **kwargs: Any) -> ToolOutput:
        try:
            arguments, ctx = self._split(args, kwargs)
        except TypeError as exc:
            return _refusal(self.metadata.get_name(), kwargs, str(exc))
        decided = self._decide(arguments, await self._reasoning(ctx, arguments))
        if isinstance(decided, str):
            return _refusal(self.metadata.get_name(), arguments, decided)
        try:
            inner = self._inner
            raw: object
            if isinstance(inner, AsyncBaseTool):
                raw = await inner.acall(**self._inputs(decided, ctx))
            else:
                raw = await asyncio.to_thread(_call_sync, inner, self._inputs(decided, ctx))
            output = _as_output(raw, decided)
        except Exception as exc:
            if _control_flow(exc):
                _settle_raised(self._guard, decided, exc)
                raise
            output = _error_output(decided, exc)
        except BaseException as exc:
            _settle_raised(self._guard, decided, exc)
            raise
        return _screened(self._guard, decided, output, decided.arguments)

    setattr(call, DISPATCHER_SPAN_DECORATED_ATTR, True)
    setattr(acall, DISPATCHER_SPAN_DECORATED_ATTR, True)


def _call_sync(tool: BaseTool, arguments: dict[str, Any]) -> object:
    if isinstance(tool, AsyncBaseTool):
        return tool.call(**arguments)
    return cast(Any, tool)(**arguments)  # BaseTool.__call__ is typed with one positional


def _as_output(output: object, decision: Decision) -> ToolOutput:
    if isinstance(output, ToolOutput):
        return output
    return ToolOutput(content=str(output), tool_name=decision.tool,
                      raw_input=dict(decision.arguments), raw_output=output)


def _error_output(decision: Decision, exc: Exception) -> ToolOutput:
    """A tool's exception as the error output the model reads (screened like any output)."""
    return ToolOutput(content=str(exc) or type(exc).__name__, tool_name=decision.tool,
                      raw_input=dict(decision.arguments), raw_output=None, is_error=True,
                      exception=exc)


def guard_tools(tools: Iterable[BaseTool | Any], guard: Guard, token: Token, *,
                model_name: str | None = None) -> list[GuardedTool]:
    """Wrap tools (``BaseTool`` or plain callables) so that every ``call``/``acall`` is
    authorized with ``token``, run with the checked arguments, screened and settled.

    For code that runs tools outside a guarded workflow (``llm.predict_and_call``, your own
    loop, a stock agent). Do not hand them to a guarded workflow too: each call would be
    decided twice.
    """
    wrapped: list[GuardedTool] = []
    for item in tools:
        if isinstance(item, GuardedTool):
            raise ValueError(f"tool `{item.metadata.get_name()}` is already guarded")
        base = item if isinstance(item, BaseTool) else FunctionTool.from_defaults(item)
        wrapped.append(GuardedTool(base, guard, token, model_name=model_name))
    return wrapped


# --- instrumentation (observe only) ---------------------------------------------------------------


def _int(value: object) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _field(source: object, key: str) -> object:
    if isinstance(source, Mapping):
        return source.get(key)
    return getattr(source, key, None)


def _usage(response: object) -> tuple[int, int] | None:
    """(input, output) tokens from a Chat/CompletionResponse (OpenAI- and Anthropic-style)."""
    raw = getattr(response, "raw", None)
    sources = [getattr(response, "additional_kwargs", None), _field(raw, "usage"),
               _field(raw, "usage_metadata")]
    for source in sources:
        if source is None:
            continue
        prompt = _int(_field(source, "prompt_tokens"))
        if prompt is None:
            prompt = _int(_field(source, "input_tokens"))
        completion = _int(_field(source, "completion_tokens"))
        if completion is None:
            completion = _int(_field(source, "output_tokens"))
        if prompt is not None or completion is not None:
            return prompt or 0, completion or 0
    return None


class IAMInstrumentation(BaseEventHandler):
    """Observe-only: charges each LLM response's token usage to the running agent's token.

    The token is the one of the guarded workflow step that made the LLM call (or ``token``
    for calls outside guarded workflows). LlamaIndex swallows handler exceptions, so this can
    never block a call; the Guard enforces the ``llm_tokens`` budget on the next tool call.
    """

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
        self._guard = guard
        self._token = _raw(token) if token is not None else None
        self._model = model_name

    @classmethod
    def class_name(cls) -> str:
        return "AgenticIAMInstrumentation"

    @property
    def guard(self) -> Guard | None:
        return self._guard

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if not isinstance(event, (LLMChatEndEvent, LLMCompletionEndEvent)):
            return
        response = event.response
        usage = _usage(response) if response is not None else None
        if usage is None or self._guard is None:
            return
        scope = _STEP_SCOPE.get()
        guard = scope.guard if scope is not None else self._guard
        if guard is not self._guard:
            return  # another guard's handler charges it
        token = scope.token if scope is not None else self._token
        if token is None:
            with self._lock:
                self.unattributed += 1
            return
        model = (scope.model if scope is not None else None) or self._model
        try:
            guard.charge_usage(token, input_tokens=usage[0], output_tokens=usage[1],
                               model=model, framework=FRAMEWORK)
        except Exception as exc:  # observe-only; the Guard denies on a bad token anyway
            log.warning("could not charge LLM usage: %s", type(exc).__name__)
            return
        with self._lock:
            self.charged += 1


def install_instrumentation(guard: Guard, *, token: Token | None = None,
                            model_name: str | None = None,
                            dispatcher: Dispatcher | None = None) -> IAMInstrumentation:
    """Attach an :class:`IAMInstrumentation` for ``guard`` to the (root) dispatcher, once.

    Idempotent per guard: a second call returns the handler already attached.
    """
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


@dataclass(frozen=True)
class FilteredNodes:
    """Nodes a :class:`ScopeFilter` dropped for one query."""

    query_digest: str
    """SHA-256 of the query (the query itself may be sensitive)."""
    count: int
    """How many nodes were dropped."""
    ids: tuple[str, ...]
    """Their node ids."""
    scopes: tuple[str, ...]
    """The out-of-scope scope values found (``<missing>`` for nodes without one)."""


def _scopes_of(
    agent_spec_or_scopes: AgentSpec | Iterable[str],
) -> tuple[frozenset[str], str | None]:
    if isinstance(agent_spec_or_scopes, AgentSpec):
        return frozenset(agent_spec_or_scopes.memory_scopes), agent_spec_or_scopes.id
    if isinstance(agent_spec_or_scopes, str):
        raise TypeError("pass an AgentSpec or a collection of scopes, not one string")
    return frozenset(agent_spec_or_scopes), None


class ScopeFilter(BaseNodePostprocessor):
    """Keeps only nodes whose ``metadata[scope_key]`` is one of the agent's memory scopes.

    Fail closed: a node without a scope, or whose scope is not a non-empty string, is dropped.
    Scopes match exactly. Every drop is recorded in :attr:`filtered` (bounded, newest last) and
    logged with node ids (never content). As a query engine's postprocessor, put it FIRST, so
    no other postprocessor (a reranker calling an LLM) sees out-of-scope text.
    """

    scopes: frozenset[str] = Field(default_factory=frozenset)
    """The memory scopes the agent may read."""
    scope_key: str = "scope"
    """The metadata key holding a node's scope."""
    agent_id: str | None = None
    """For log lines."""
    max_records: int = 1000
    """How many :class:`FilteredNodes` records :attr:`filtered` keeps."""
    filtered: list[FilteredNodes] = Field(default_factory=list, exclude=True)
    """What was dropped, one record per query that dropped anything."""

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, agent_spec_or_scopes: AgentSpec | Iterable[str], *,
                 scope_key: str = "scope", agent_id: str | None = None,
                 max_records: int = 1000) -> None:
        scopes, spec_id = _scopes_of(agent_spec_or_scopes)
        fields: dict[str, Any] = {"scopes": scopes, "scope_key": scope_key,
                                  "agent_id": agent_id or spec_id, "max_records": max_records}
        super().__init__(**fields)

    @classmethod
    def class_name(cls) -> str:
        return "AgenticIAMScopeFilter"

    def keep(self, nodes: Sequence[NodeWithScore], query: str = "") -> list[NodeWithScore]:
        """The nodes the agent may read; records the others."""
        kept: list[NodeWithScore] = []
        dropped: list[NodeWithScore] = []
        seen: set[str] = set()
        for item in nodes:
            scope = item.node.metadata.get(self.scope_key)
            if isinstance(scope, str) and scope and scope in self.scopes:
                kept.append(item)
            else:
                dropped.append(item)
                seen.add(scope if isinstance(scope, str) and scope else "<missing>")
        if dropped:
            record = FilteredNodes(
                query_digest=hashlib.sha256(query.encode()).hexdigest(),
                count=len(dropped), ids=tuple(str(d.node.node_id) for d in dropped),
                scopes=tuple(sorted(seen)))
            with self._lock:
                self.filtered.append(record)
                del self.filtered[:-self.max_records]
            log.info("memory scopes: dropped %d node(s) for agent `%s` (scopes %s): %s",
                     record.count, self.agent_id or "-", ", ".join(record.scopes),
                     ", ".join(record.ids))
        return kept

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        return self.keep(nodes, query_bundle.query_str if query_bundle is not None else "")

    async def _apostprocess_nodes(self, nodes: list[NodeWithScore],
                                  query_bundle: QueryBundle | None = None
                                  ) -> list[NodeWithScore]:
        return self._postprocess_nodes(nodes, query_bundle)


class ScopedRetriever(BaseRetriever):
    """A retriever that returns only the nodes the agent's memory scopes allow.

    Use it wherever a retriever goes (``RetrieverQueryEngine(ScopedRetriever(...))``,
    ``QueryEngineTool``): filtering happens before anything downstream sees a node.
    """

    def __init__(self, retriever: BaseRetriever,
                 agent_spec_or_scopes: AgentSpec | Iterable[str], *,
                 scope_key: str = "scope", agent_id: str | None = None,
                 max_records: int = 1000) -> None:
        super().__init__(callback_manager=retriever.callback_manager)
        self.retriever = retriever
        self.filter = ScopeFilter(agent_spec_or_scopes, scope_key=scope_key,
                                  agent_id=agent_id, max_records=max_records)

    @property
    def filtered(self) -> list[FilteredNodes]:
        """What was dropped (see :class:`ScopeFilter`)."""
        return self.filter.filtered

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self.filter.keep(self.retriever.retrieve(query_bundle), query_bundle.query_str)

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        nodes = await self.retriever.aretrieve(query_bundle)
        return self.filter.keep(nodes, query_bundle.query_str)
