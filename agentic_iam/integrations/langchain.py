"""LangChain v1 / LangGraph adapter: every tool call of an agent goes through the Guard.

What it gives you (``pip install "agentic-iam[langchain]"``):

- :class:`GuardMiddleware` — an ``AgentMiddleware`` for ``langchain.agents.create_agent``
  (``wrap_tool_call`` *and* ``awrap_tool_call``, so ``invoke``, ``ainvoke``, ``stream`` and
  ``astream`` all pass through it). Put it LAST in ``middleware=[...]`` (innermost), so it sees
  the final arguments and tool. For each call it finds the ``AIMessage`` that asked for it
  (text and reasoning blocks) as reasoning context, asks :meth:`Guard.authorize`, and:
  on ``deny`` returns ``ToolMessage(status="error")`` with the Guard's model message; on
  ``approval_required`` pauses the run with LangGraph's ``interrupt()`` (the payload describes
  the call and its ``approval_id``; resume with ``Command(resume={"approved": True,
  "approver": "bob"})``, ``bob`` being in ``GuardConfig.approvers``), records the answer and
  authorizes the same call again; on ``allow`` runs the tool with the Guard's checked copy of
  the arguments, screens what the tool returned
  (``ToolMessage`` content and the messages of a ``Command`` update) before the model sees it,
  and settles the call.
- :class:`IAMContext` — the per-run identity: pass ``context=IAMContext(token)`` to
  ``invoke``/``stream`` (and ``context_schema=IAMContext`` to ``create_agent``). Any context
  object with an ``aiam_token`` attribute or key works too. The token never enters the graph
  state, so the model never sees it. A run without a valid token cannot call tools.
- Executions end with their run: when the agent run finishes (the ``after_agent`` hook), the
  middleware calls :meth:`Guard.end_execution` for the run's token, so it and every token
  sub-delegated from it stop working. A run paused for an approval has not finished (the
  resume still works). For a conversation of several ``invoke`` calls with one token, opt out
  with ``IAMContext(token, end_on_finish=False)`` (any context: an ``aiam_end_on_finish``
  attribute or key set to ``False``) and call ``guard.end_execution(token)`` when the
  conversation is over. A run that raises has not finished either: end its token yourself (or
  let it expire). :func:`guarded_tool_node` graphs and :func:`guard_tools` have no end-of-run
  hook: their caller ends the execution.
- :func:`guarded_tool_node` — a LangGraph ``ToolNode`` using the same wrapper, for custom graphs.
- :func:`guard_tools` — wrapped ``BaseTool``s for other executors (a refusal is the tool's error
  output, as with ``handle_tool_error=True``, never an exception that ends the run).
- :class:`IAMCallbackHandler` — observe-only: charges the model's token usage to the execution
  (so an exhausted ``llm_tokens`` budget stops further tool calls) and keeps the last model
  messages for reasoning context.
- :func:`subagent_tool`, :func:`subagent_node`, :func:`delegated_context` — agent-as-tool and
  subgraph wrappers that mint a narrower identity with ``broker.subdelegate_for`` and pass it
  EXPLICITLY as the child's ``context``. LangGraph's ``Runtime.merge`` otherwise hands a child
  the parent's context (``other.context or self.context``), i.e. the parent's whole grant.
  The child's execution always ends when the child run returns, raises or pauses (a replay
  mints a new one), whatever ``end_on_finish`` says.
- :class:`ScopedRetriever` — a retriever wrapper that drops documents outside the agent's
  memory scopes (fail closed: a document without a scope is dropped) and records what it dropped.

What it must never do: run a tool without an ``allow`` decision for that exact call; run it with
arguments other than ``decision.arguments``; let tool output reach the model unscreened; put a
token in model-visible state, a message, a log line or an interrupt payload; let a child agent
run with the parent's identity; turn a refusal into a crash of the run.

Caveats. LangGraph re-runs a paused task from its start when the run resumes, so the call is
authorized afresh (one more ``approval_required`` decision per pause) and a sub-agent called
through :func:`subagent_tool` gets a freshly minted identity on each replay. The run context is
not checkpointed: pass ``context=`` again with ``Command(resume=...)`` (without it the resumed
call has no identity and is refused). In a custom graph whose ``ToolNode`` runs several calls in
one task, an interrupt re-runs the task's other calls too: dispatch one call per task (``Send``,
as ``create_agent`` does) when approvals are possible. Provider built-in tools (dicts handed to
the model, run server-side) never reach a ``ToolNode`` and cannot be guarded here.

Settling. A call whose tool ran is charged, also when the tool raised or its output could not be
screened (it may have had its side effect). Only a call whose tool never started, or that an
``interrupt()`` inside the tool paused (LangGraph replays the task), is cancelled with
:meth:`Guard.cancel`: its reservation and its call id are given back, so the replay may ask
again with the same id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

from agentic_iam.errors import MissingExtraError

try:
    from langchain.agents.middleware import AgentMiddleware, AgentState, ToolCallRequest
    from langchain_core.callbacks import (
        AsyncCallbackManagerForRetrieverRun,
        BaseCallbackHandler,
        BaseCallbackManager,
        CallbackManagerForRetrieverRun,
    )
    from langchain_core.documents import Document
    from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
    from langchain_core.outputs import LLMResult
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnableConfig
    from langchain_core.runnables.config import ensure_config
    from langchain_core.tools import BaseTool, StructuredTool, ToolException
    from langgraph.errors import GraphBubbleUp, GraphInterrupt
    from langgraph.prebuilt import ToolNode
    from langgraph.prebuilt.tool_node import ToolRuntime
    from langgraph.runtime import Runtime
    from langgraph.types import Command, interrupt
    from pydantic import ConfigDict, Field, PrivateAttr
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    _missing = (exc.name or "langchain").split(".")[0]
    raise MissingExtraError("langchain", _missing) from exc

from agentic_iam.core.broker import CapabilitiesLike, DelegationBroker
from agentic_iam.core.decision import Decision, ReasoningContext, ToolCall
from agentic_iam.core.guard import Guard
from agentic_iam.core.identity import AgentSpec, Budget
from agentic_iam.core.tokens import ExecutionToken
from agentic_iam.errors import AgenticIAMError, DelegationError

__all__ = [
    "FilteredDocuments",
    "GuardMiddleware",
    "GuardedTool",
    "IAMCallbackHandler",
    "IAMContext",
    "ScopedRetriever",
    "delegated_context",
    "find_requesting_message",
    "guard_tools",
    "guarded_tool_node",
    "subagent_node",
    "subagent_tool",
    "token_from_context",
]

log = logging.getLogger("agentic_iam.integrations.langchain")

FRAMEWORK = "langchain"
ApprovalMode = Literal["interrupt", "refuse"]
Token = str | ExecutionToken
ToolResult = ToolMessage | Command[Any]

# How many times one call may pause for approval before the adapter gives up on it.
_APPROVAL_ROUNDS = 3


# --- per-run identity ------------------------------------------------------------------------


@dataclass(frozen=True)
class IAMContext:
    """The run context carrying the execution token (``create_agent(context_schema=IAMContext)``).

    LangGraph keeps the context out of the graph state and out of checkpoints: the model never
    sees it. Pass it again when resuming a paused run.
    """

    token: Token = field(repr=False)
    """The execution token (compact JWS or :class:`ExecutionToken`). Kept out of ``repr``."""
    end_on_finish: bool = True
    """End the execution (:meth:`Guard.end_execution`) when the agent run finishes. ``False``
    keeps the token working for a conversation of several runs; end it yourself when done."""

    @property
    def aiam_token(self) -> Token:
        """The token under the name every adapter looks for."""
        return self.token

    @property
    def aiam_end_on_finish(self) -> bool:
        """``end_on_finish`` under the name every adapter looks for."""
        return self.end_on_finish


def token_from_context(context: object) -> Token | None:
    """The execution token in a run context (``aiam_token`` attribute or key), or ``None``.

    Only a non-empty string or an :class:`ExecutionToken` counts: an already-verified
    ``ExecutionIdentity`` object is not accepted from a context, since anything in-process can
    construct one.
    """
    if context is None:
        return None
    value = getattr(context, "aiam_token", None)
    if value is None and isinstance(context, Mapping):
        value = context.get("aiam_token")
    if isinstance(value, ExecutionToken):
        return value
    if isinstance(value, str) and value:
        return value
    return None


def _end_on_finish(context: object) -> bool:
    """Whether the run's execution ends with the run: ``False`` only when the context says so
    (``aiam_end_on_finish`` attribute or key set to ``False``); ending is the default."""
    value = getattr(context, "aiam_end_on_finish", None)
    if value is None and isinstance(context, Mapping):
        value = context.get("aiam_end_on_finish")
    return value is not False


# Tokens this process has ended, so that a child ended by its own middleware is not ended (and
# recorded) a second time by the sub-agent wrapper around it. Digests only, bounded.
_ENDED: OrderedDict[str, None] = OrderedDict()
_ENDED_LOCK = threading.Lock()
_ENDED_KEPT = 4096


class _Ender(Protocol):
    def __call__(self, token: Token, *, reason: str) -> None: ...


def _end_execution(end: _Ender, token: Token, reason: str) -> None:
    """End an execution once (``Guard.end_execution`` or ``DelegationBroker.end``).

    A failure is logged, not raised: the run's work is done, and raising would not make the
    token any less valid (it still expires at its ``exp``).
    """
    raw = token.token if isinstance(token, ExecutionToken) else token
    mark = hashlib.sha256(raw.encode("utf-8")).hexdigest()
    with _ENDED_LOCK:
        if mark in _ENDED:
            return
    try:
        end(token, reason=reason)
    except Exception as exc:  # see the docstring; the failure is on the record in the log
        log.warning("could not end the execution (%s): %s", reason, type(exc).__name__)
        return
    with _ENDED_LOCK:
        _ENDED[mark] = None
        while len(_ENDED) > _ENDED_KEPT:
            _ENDED.popitem(last=False)


def _settle_raised(guard: Guard, decision: Decision, exc: BaseException) -> None:
    """Settle an allowed call whose tool raised ``exc``.

    An ``interrupt()`` inside the tool pauses it, and LangGraph replays the task from its start
    on resume: the call is cancelled (reservation and call id given back) so the replay can ask
    again. Anything else may have happened after the tool's side effect: charged.
    """
    if isinstance(exc, GraphInterrupt):
        guard.cancel(decision)
    else:
        guard.complete(decision, "error")


# --- reasoning context -----------------------------------------------------------------------


def _messages_of(state: object) -> Sequence[object]:
    if isinstance(state, Mapping):
        messages = state.get("messages")
    elif isinstance(state, list):
        messages = state
    else:
        messages = getattr(state, "messages", None)
    return messages if isinstance(messages, (list, tuple)) else ()


def find_requesting_message(state: object, tool_call_id: str | None) -> AIMessage | None:
    """The ``AIMessage`` in ``state["messages"]`` whose ``tool_calls`` hold ``tool_call_id``."""
    if not tool_call_id:
        return None
    for message in reversed(_messages_of(state)):
        if isinstance(message, AIMessage) and any(
            call.get("id") == tool_call_id for call in message.tool_calls
        ):
            return message
    return None


def _message_text(message: AIMessage) -> str | None:
    """The model's text plus its reasoning (content blocks or ``reasoning_content``)."""
    content = message.content
    if isinstance(content, str):
        # Plain text has no reasoning blocks; `content_blocks` would cost ~25 us for nothing.
        text, blocks = content, []
    else:
        try:
            text = str(message.text)
            blocks = message.content_blocks  # normalizes provider formats (e.g. "thinking")
        except Exception:  # odd provider content: fall back to the raw content
            text, blocks = str(content), []
    reasoning = [str(b.get("reasoning")) for b in blocks
                 if b.get("type") == "reasoning" and b.get("reasoning")]
    extra = message.additional_kwargs.get("reasoning_content")
    if isinstance(extra, str) and extra and extra not in reasoning:
        reasoning.append(extra)
    parts = [p for p in (text.strip(), *(f"[reasoning] {r.strip()}" for r in reasoning)) if p]
    return "\n".join(parts) or None


def _model_name(message: AIMessage | None, default: str | None) -> str | None:
    if message is not None:
        meta = message.response_metadata
        for key in ("model_name", "model", "model_id"):
            value = meta.get(key)
            if isinstance(value, str) and value:
                return value
    return default


def _reasoning(message: AIMessage | None, *, model: str | None, run_id: object = None,
               parent_run_id: object = None) -> ReasoningContext:
    response_id = None
    if message is not None:
        meta_id = message.response_metadata.get("id")
        response_id = meta_id if isinstance(meta_id, str) and meta_id else message.id
    return ReasoningContext(
        message=_message_text(message) if message is not None else None,
        model=_model_name(message, model),
        run_id=str(run_id) if run_id else None,
        parent_run_id=str(parent_run_id) if parent_run_id else None,
        response_id=response_id,
    )


# --- screening helpers -----------------------------------------------------------------------


def _content_text(content: object) -> str:
    """One text for the firewall from message content (a string or a list of blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(b, str) or (isinstance(b, Mapping) and b.get("type") == "text")
        for b in content
    ):
        return "".join(b if isinstance(b, str) else str(b.get("text", "")) for b in content)
    # Images, files and other blocks cannot be screened for instructions: they are sent on
    # as their JSON text (screened), never as raw blocks.
    try:
        return json.dumps(content, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(content)


class _Screening:
    """Screens one allowed call's output; remembers whether any part reported an error."""

    def __init__(self, guard: Guard, decision: Decision) -> None:
        self.guard = guard
        self.decision = decision
        self.error = False

    def text(self, value: object) -> tuple[str, bool]:
        screened = self.guard.screen(self.decision, _content_text(value))
        return screened.text, screened.result.blocked

    def message(self, message: BaseMessage) -> BaseMessage:
        text, blocked = self.text(message.content)
        update: dict[str, Any] = {"content": text}
        if isinstance(message, ToolMessage):
            if message.status == "error":
                self.error = True
            if blocked:
                update["status"] = "error"
        return message.model_copy(update=update)

    def message_like(self, value: object) -> object:
        """Messages in a ``Command`` update may be messages, dicts, (role, text) or text."""
        if isinstance(value, BaseMessage):
            return self.message(value)
        if isinstance(value, Mapping) and "content" in value:
            return {**value, "content": self.text(value["content"])[0]}
        if isinstance(value, tuple) and len(value) == 2:
            return (value[0], self.text(value[1])[0])
        return self.text(value)[0]

    def command(self, command: Command[Any]) -> Command[Any]:
        update = command.update
        if isinstance(update, Mapping) and "messages" in update:
            messages = update["messages"]
            items = messages if isinstance(messages, (list, tuple)) else [messages]
            screened = [self.message_like(m) for m in items]
            return _replace_command(command, {**update, "messages": screened})
        if isinstance(update, (list, tuple)) and all(
            isinstance(p, tuple) and len(p) == 2 for p in update
        ):
            pairs = []
            for key, value in update:
                if key == "messages":
                    items = value if isinstance(value, (list, tuple)) else [value]
                    value = [self.message_like(m) for m in items]
                pairs.append((key, value))
            return _replace_command(command, pairs)
        # No messages: nothing reaches the model from this update. Other state keys are the
        # tool author's responsibility (a prompt that renders them should screen them).
        return command

    def result(self, result: object) -> Any:
        if isinstance(result, ToolMessage):
            return self.message(result)
        if isinstance(result, Command):
            return self.command(result)
        if isinstance(result, list):
            return [self.result(item) for item in result]
        if isinstance(result, BaseMessage):
            return self.message(result)
        return self.text(result)[0]


def _replace_command(command: Command[Any], update: object) -> Command[Any]:
    return Command(graph=command.graph, update=update, resume=command.resume, goto=command.goto)


def _blocked_message(request: ToolCallRequest, why: str) -> ToolMessage:
    return _refusal(request, f"[agentic-iam: tool output blocked: {why}]")


def _refusal(request: ToolCallRequest, text: str) -> ToolMessage:
    call = request.tool_call
    return ToolMessage(content=text, tool_call_id=call.get("id") or "",
                       name=call.get("name"), status="error")


# --- approvals -------------------------------------------------------------------------------


def _approval_payload(call: ToolCall, decision: Decision) -> dict[str, Any]:
    """What the human sees in the interrupt: the call, its approval id, why (never a token)."""
    try:
        arguments = json.loads(json.dumps(dict(call.arguments), default=str))
    except (TypeError, ValueError):
        arguments = {}
    main = decision.reasons[0].message if decision.reasons else ""
    return {
        "type": "agentic_iam.approval",
        "approval_id": decision.approval_id,
        "tool": call.name,
        "call_id": call.call_id,
        "arguments": arguments,
        "action": decision.action,
        "execution_id": decision.execution_id,
        "reason": main,
        "policy_ids": list(decision.policy_ids),
        "resume_with": {"approved": "bool", "approver": "str"},
    }


def _parse_answer(answer: object) -> tuple[bool, str] | None:
    """``{"approved": bool, "approver": str}`` (a configured approver id); anything else is
    refused. A bare ``True``/``False`` names nobody and claims the approver ``human``, which the
    Guard refuses (and records) unless it is configured."""
    if isinstance(answer, bool):
        return answer, "human"
    if isinstance(answer, Mapping):
        approved = answer.get("approved")
        approver = answer.get("approver", "human")
        if type(approved) is bool and isinstance(approver, str) and approver.strip():
            return approved, approver.strip()
    return None


def _await_approval(guard: Guard, token: Token | None, call: ToolCall, decision: Decision,
                    mode: ApprovalMode) -> Decision | str:
    """Pause for a human until the call is allowed; a string is the refusal for the model.

    LangGraph re-runs the task on resume, so the call is authorized afresh each time (a new
    approval request for the same exact call); the human's answer resolves that one, and the
    Guard then lets the call through once.
    """
    rounds = 0
    while decision.outcome == "approval_required":
        if mode == "refuse" or decision.approval_id is None or token is None:
            return decision.model_message()
        if rounds >= _APPROVAL_ROUNDS:
            return (f"The call to `{call.name}` still needs approval after {rounds} answers "
                    f"and was not run.")
        try:
            answer = interrupt(_approval_payload(call, decision))
        except RuntimeError:
            # Not inside a LangGraph run (no config to pause): the call stays unrun; the
            # request stays pending for `aiam approvals` to answer.
            return decision.model_message()
        parsed = _parse_answer(answer)
        if parsed is None:
            return (f"The approval answer for `{call.name}` was not understood, so the call "
                    f"was not run.")
        approved, approver = parsed
        try:
            guard.resolve_approval(decision.approval_id, approved=approved, approver=approver)
        except AgenticIAMError as exc:
            log.warning("approval %s could not be recorded: %s", decision.approval_id, exc)
            return (f"The approval for `{call.name}` could not be recorded, so the call was "
                    f"not run.")
        if not approved:
            return (f"A human declined the call to `{call.name}`; it was not run. Do not "
                    f"retry the same call.")
        decision = guard.authorize(token, call)
        rounds += 1
    return decision


# --- the middleware --------------------------------------------------------------------------


_NO_TOKEN = ("The call to `{tool}` was refused by the access layer and was not run. Reason: "
             "this run carries no execution identity.")
_NO_MESSAGE = ("The call to `{tool}` was refused by the access layer and was not run. Reason: "
               "the model message that requested it was not found.")


@dataclass
class _Plan:
    """An allowed call ready to run."""

    decision: Decision
    request: ToolCallRequest


class GuardMiddleware(AgentMiddleware[AgentState[Any], Any, Any]):
    """Authorizes, screens and settles every tool call of a ``create_agent`` agent.

    Put it LAST in ``middleware=[...]``. The identity comes from the run context
    (:class:`IAMContext` or any object with ``aiam_token``), never from state.
    """

    def __init__(
        self,
        guard: Guard,
        *,
        model_name: str | None = None,
        on_approval: ApprovalMode = "interrupt",
        require_model_message: bool = True,
    ) -> None:
        """``model_name``: recorded when the model's messages do not name one.
        ``on_approval``: ``interrupt`` pauses the run (needs a checkpointer to resume);
        ``refuse`` returns the approval message to the model and leaves the request pending.
        ``require_model_message``: refuse calls whose requesting ``AIMessage`` is not in the
        state (e.g. a ``ToolNode`` called outside a graph), so every call has its reasoning.
        """
        super().__init__()
        if on_approval not in ("interrupt", "refuse"):
            raise ValueError(f"on_approval must be `interrupt` or `refuse`, got {on_approval!r}")
        self.guard = guard
        self.model_name = model_name
        self.on_approval: ApprovalMode = on_approval
        self.require_model_message = require_model_message

    # -- shared steps

    def _plan(self, request: ToolCallRequest) -> _Plan | ToolMessage:
        """Decide the call; an error ``ToolMessage`` when it must not run."""
        try:
            return self._decide(request)
        except GraphBubbleUp:
            raise  # an approval pause
        except Exception as exc:  # fail closed: the tool does not run
            log.warning("access check for `%s` failed: %s", request.tool_call.get("name"),
                        type(exc).__name__)
            return _refusal(request, f"The call to `{request.tool_call.get('name')}` was "
                                     f"refused: the access check failed.")

    def _decide(self, request: ToolCallRequest) -> _Plan | ToolMessage:
        tool_call = request.tool_call
        name, call_id = tool_call.get("name") or "", tool_call.get("id")
        runtime = request.runtime
        token = token_from_context(getattr(runtime, "context", None))
        message = find_requesting_message(request.state, call_id)
        if message is None and self.require_model_message:
            log.warning("no requesting model message for tool call `%s` (%s); refused",
                        name, call_id)
            return _refusal(request, _NO_MESSAGE.format(tool=name))
        config: Mapping[str, Any] = getattr(runtime, "config", None) or {}
        info = getattr(runtime, "execution_info", None)
        call = ToolCall(
            name=name,
            arguments=tool_call.get("args") or {},
            call_id=call_id,
            reasoning=_reasoning(
                message, model=self.model_name,
                run_id=getattr(info, "run_id", None) or config.get("run_id"),
                parent_run_id=getattr(config.get("callbacks"), "parent_run_id", None),
            ),
            framework=FRAMEWORK,
        )
        # A run without a token is still put to the Guard, so the attempt is on the record.
        decision = self.guard.authorize(token if token is not None else "", call)
        if decision.outcome == "approval_required":
            answered = _await_approval(self.guard, token, call, decision, self.on_approval)
            if isinstance(answered, str):
                return _refusal(request, answered)
            decision = answered
        if not decision.allowed:
            text = _NO_TOKEN.format(tool=name) if token is None else decision.model_message()
            return _refusal(request, text)
        if request.tool is None:
            # Registered for the agent but not given to this agent's tools: nothing to run.
            self.guard.cancel(decision)
            return _refusal(request, f"Error: `{name}` is not a valid tool here.")
        try:
            checked = request.override(tool_call={**tool_call, "args": dict(decision.arguments)})
        except Exception:
            self.guard.cancel(decision)  # the tool never started; refused above
            raise
        return _Plan(decision, checked)

    def _finish(self, plan: _Plan, result: object) -> ToolResult:
        screening = _Screening(self.guard, plan.decision)
        try:
            screened = screening.result(result)
        except Exception as exc:  # output that cannot be screened is withheld
            log.warning("screening `%s` failed: %s", plan.decision.tool, type(exc).__name__)
            self.guard.complete(plan.decision, "error")
            return _blocked_message(plan.request, "screening failed")
        self.guard.complete(plan.decision, "error" if screening.error else "success")
        if isinstance(screened, (ToolMessage, Command)):
            return screened
        if isinstance(screened, list):
            return cast("ToolResult", screened)
        return ToolMessage(content=str(screened), tool_call_id=plan.request.tool_call.get("id")
                           or "", name=plan.decision.tool)

    # -- the two hooks (sync: invoke/stream; async: ainvoke/astream)

    def wrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], ToolResult],
    ) -> ToolResult:
        plan = self._plan(request)
        if isinstance(plan, ToolMessage):
            return plan
        try:
            result = handler(plan.request)
        except BaseException as exc:
            _settle_raised(self.guard, plan.decision, exc)
            raise
        return self._finish(plan, result)

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolResult]],
    ) -> ToolResult:
        plan = self._plan(request)
        if isinstance(plan, ToolMessage):
            return plan
        try:
            result = await handler(plan.request)
        except BaseException as exc:
            _settle_raised(self.guard, plan.decision, exc)
            raise
        return self._finish(plan, result)

    # -- the end of the run (runs once, when the agent finishes; not when it pauses)

    def _end_run(self, runtime: Runtime[Any]) -> None:
        context = getattr(runtime, "context", None)
        token = token_from_context(context)
        if token is not None and _end_on_finish(context):
            _end_execution(self.guard.end_execution, token, "completed")

    def after_agent(self, state: AgentState[Any], runtime: Runtime[Any]) -> dict[str, Any] | None:
        """The run finished: its execution ends (unless the context opted out)."""
        self._end_run(runtime)
        return None

    async def aafter_agent(self, state: AgentState[Any],
                           runtime: Runtime[Any]) -> dict[str, Any] | None:
        """The run finished: its execution ends (unless the context opted out)."""
        self._end_run(runtime)
        return None


def guarded_tool_node(
    tools: Sequence[BaseTool | Callable[..., Any]],
    guard: Guard,
    *,
    name: str = "tools",
    model_name: str | None = None,
    on_approval: ApprovalMode = "interrupt",
    require_model_message: bool = True,
    **tool_node_kwargs: Any,
) -> ToolNode:
    """A LangGraph ``ToolNode`` whose every call goes through :class:`GuardMiddleware`'s wrapper.

    The graph needs ``context_schema`` (e.g. :class:`IAMContext`) and the run ``context=``.
    """
    middleware = GuardMiddleware(guard, model_name=model_name, on_approval=on_approval,
                                 require_model_message=require_model_message)
    return ToolNode(tools, name=name, wrap_tool_call=middleware.wrap_tool_call,
                    awrap_tool_call=middleware.awrap_tool_call, **tool_node_kwargs)


# --- callback handler (observe only) ----------------------------------------------------------


def _usage(response: LLMResult) -> tuple[int, int, str | None, list[AIMessage]]:
    """Input/output tokens, model name and the AI messages of one LLM result."""
    input_tokens = output_tokens = 0
    found = False
    model: str | None = None
    messages: list[AIMessage] = []
    for generations in response.generations:
        for generation in generations:
            message = getattr(generation, "message", None)
            if not isinstance(message, AIMessage):
                continue
            messages.append(message)
            model = model or _model_name(message, None)
            usage = message.usage_metadata
            if usage:
                found = True
                input_tokens += int(usage.get("input_tokens") or 0)
                output_tokens += int(usage.get("output_tokens") or 0)
    output = response.llm_output or {}
    if isinstance(output.get("model_name"), str):
        model = model or output["model_name"]
    if not found:
        counts = output.get("token_usage") or output.get("usage") or {}
        if isinstance(counts, Mapping):
            input_tokens = int(counts.get("prompt_tokens") or counts.get("input_tokens") or 0)
            output_tokens = int(counts.get("completion_tokens")
                                or counts.get("output_tokens") or 0)
    return input_tokens, output_tokens, model, messages


class IAMCallbackHandler(BaseCallbackHandler):
    """Charges LLM usage to the execution and keeps the model's last messages. Observe only.

    LangChain swallows callback exceptions, so this handler cannot enforce anything; the
    Guard does (a charged-out ``llm_tokens`` budget denies the next tool call). Attach it per
    run: ``config={"callbacks": [IAMCallbackHandler(guard, token)]}``.
    """

    raise_error = False
    run_inline = True  # charge before the tool node runs, also on the async path

    def __init__(self, guard: Guard, token: Token, *, model_name: str | None = None,
                 keep: int = 16) -> None:
        super().__init__()
        self.guard = guard
        self._token = token
        self.model_name = model_name
        self.keep = keep
        self._lock = threading.Lock()
        self._messages: deque[AIMessage] = deque(maxlen=keep)
        self._by_call: OrderedDict[str, ReasoningContext] = OrderedDict()
        #: Usage charged so far (input and output tokens), and charges that failed.
        self.charged: dict[str, int] = {"input_tokens": 0, "output_tokens": 0}
        self.failures = 0
        # Run lineage, to skip model calls made under a sub-agent's run: LangChain merges the
        # parent's callbacks into a nested run's config, so this handler sees the child's model
        # calls too, and the child's own handler already charges them (and every ancestor).
        self._parent_of: OrderedDict[Any, Any] = OrderedDict()
        self._delegated: set[Any] = set()

    def exclude_descendants_of(self, run_id: Any) -> None:
        """Leave model calls under ``run_id`` (a sub-agent's run) to the sub-agent's handler."""
        if run_id is not None:
            with self._lock:
                self._delegated.add(run_id)

    def _note(self, run_id: Any, parent_run_id: Any) -> None:
        with self._lock:
            self._parent_of[run_id] = parent_run_id
            while len(self._parent_of) > 4096:
                self._parent_of.popitem(last=False)

    def _under_subagent(self, run_id: Any, parent_run_id: Any) -> bool:
        with self._lock:
            if not self._delegated:
                return False
            current, steps = parent_run_id, 0
            while current is not None and steps < 256:
                if current in self._delegated:
                    return True
                current, steps = self._parent_of.get(current), steps + 1
            return False

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: Any,
                       parent_run_id: Any = None, **kwargs: Any) -> None:
        self._note(run_id, parent_run_id)

    def on_tool_start(self, serialized: Any, input_str: str, *, run_id: Any,
                      parent_run_id: Any = None, **kwargs: Any) -> None:
        self._note(run_id, parent_run_id)

    def __repr__(self) -> str:
        return f"IAMCallbackHandler(charged={self.charged}, failures={self.failures})"

    def for_token(self, token: Token) -> IAMCallbackHandler:
        """A handler like this one for another execution (a sub-agent's)."""
        return IAMCallbackHandler(self.guard, token, model_name=self.model_name, keep=self.keep)

    @property
    def last_messages(self) -> list[AIMessage]:
        """The last model messages seen, oldest first."""
        with self._lock:
            return list(self._messages)

    def reasoning_for(self, tool_call_id: str | None) -> ReasoningContext | None:
        """The reasoning context of the model message that asked for ``tool_call_id``."""
        if not tool_call_id:
            return None
        with self._lock:
            return self._by_call.get(tool_call_id)

    def on_llm_end(self, response: LLMResult, *, run_id: Any,
                   parent_run_id: Any = None, **kwargs: Any) -> None:
        if self._under_subagent(run_id, parent_run_id):
            return
        input_tokens, output_tokens, model, messages = _usage(response)
        model = model or self.model_name
        with self._lock:
            for message in messages:
                self._messages.append(message)
                context = _reasoning(message, model=model, run_id=run_id,
                                     parent_run_id=parent_run_id)
                for call in message.tool_calls:
                    if call.get("id"):
                        self._by_call[str(call["id"])] = context
                while len(self._by_call) > 4 * self.keep:
                    self._by_call.popitem(last=False)
        if input_tokens + output_tokens <= 0:
            return
        try:
            self.guard.charge_usage(self._token, input_tokens=input_tokens,
                                    output_tokens=output_tokens, model=model,
                                    framework=FRAMEWORK)
        except Exception as exc:  # observe-only; the local record is kept
            self.failures += 1
            log.warning("could not charge %d LLM tokens: %s", input_tokens + output_tokens,
                        type(exc).__name__)
            return
        with self._lock:
            self.charged["input_tokens"] += input_tokens
            self.charged["output_tokens"] += output_tokens


# --- wrapped tools for other executors ------------------------------------------------------


def _visible_arguments(tool: BaseTool) -> frozenset[str] | None:
    """The argument names the model supplies (injected arguments excluded)."""
    try:
        schema = tool.tool_call_schema
    except Exception:
        return None
    if isinstance(schema, Mapping):
        properties = schema.get("properties")
        return frozenset(properties) if isinstance(properties, Mapping) else None
    fields = getattr(schema, "model_fields", None)
    return frozenset(fields) if isinstance(fields, Mapping) else None


class GuardedTool(BaseTool):
    """A tool that asks the Guard before every run of the tool it wraps (see :func:`guard_tools`).

    ``run``/``arun`` (and so ``invoke``/``ainvoke``) authorize the model's arguments, run the
    wrapped tool with the checked copy (injected arguments such as ``ToolRuntime`` are passed
    through untouched), screen its output and settle the call. A refusal is returned as the
    tool's error output, like ``handle_tool_error=True``: a ``ToolMessage(status="error")`` when
    called with a tool call, else the message text.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    _inner: BaseTool = PrivateAttr()
    _guard: Guard = PrivateAttr()
    _token: Token = PrivateAttr()
    _observer: IAMCallbackHandler | None = PrivateAttr(default=None)
    _on_approval: ApprovalMode = PrivateAttr(default="refuse")
    _visible: frozenset[str] | None = PrivateAttr(default=None)

    def __init__(self, inner: BaseTool, guard: Guard, token: Token, *,
                 observer: IAMCallbackHandler | None = None,
                 on_approval: ApprovalMode = "refuse") -> None:
        super().__init__(
            name=inner.name, description=inner.description, args_schema=inner.args_schema,
            return_direct=inner.return_direct, response_format=inner.response_format,
            tags=inner.tags, metadata=inner.metadata, extras=inner.extras,
        )
        self._inner = inner
        self._guard = guard
        self._token = token
        self._observer = observer
        self._on_approval = on_approval
        self._visible = _visible_arguments(inner)

    @property
    def wrapped(self) -> BaseTool:
        """The tool this one guards."""
        return self._inner

    # Schema and injection detection follow the wrapped tool (ToolNode reads these).
    @property
    def tool_call_schema(self) -> Any:
        return self._inner.tool_call_schema

    @property
    def args(self) -> dict[str, Any]:
        return self._inner.args

    def get_input_schema(self, config: RunnableConfig | None = None) -> Any:
        return self._inner.get_input_schema(config)

    @property
    def func(self) -> Any:
        return getattr(self._inner, "func", None)

    @property
    def coroutine(self) -> Any:
        return getattr(self._inner, "coroutine", None)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("GuardedTool runs through run()/arun()")

    # -- the guarded entry points

    def _split(self, tool_input: str | dict[str, Any]) -> tuple[object, dict[str, Any]]:
        """(what the model supplied, injected values the framework added)."""
        if isinstance(tool_input, str):
            visible = sorted(self._visible or ())
            return ({visible[0]: tool_input} if len(visible) == 1 else tool_input), {}
        if not isinstance(tool_input, Mapping):
            return tool_input, {}
        if self._visible is None:
            return dict(tool_input), {}
        model = {k: v for k, v in tool_input.items() if k in self._visible}
        injected = {k: v for k, v in tool_input.items() if k not in self._visible}
        return model, injected

    def _decide(self, tool_input: str | dict[str, Any],
                tool_call_id: str | None) -> tuple[Decision, dict[str, Any]] | str:
        try:
            arguments, injected = self._split(tool_input)
            reasoning = (self._observer.reasoning_for(tool_call_id) if self._observer else None)
            call = ToolCall(self.name, cast("Mapping[str, Any]", arguments), tool_call_id,
                            reasoning or ReasoningContext(), FRAMEWORK)
            decision = self._guard.authorize(self._token, call)
            if decision.outcome == "approval_required":
                answered = _await_approval(self._guard, self._token, call, decision,
                                           self._on_approval)
                if isinstance(answered, str):
                    return answered
                decision = answered
        except GraphBubbleUp:
            raise
        except Exception as exc:  # fail closed
            log.warning("access check for `%s` failed: %s", self.name, type(exc).__name__)
            return f"The call to `{self.name}` was refused: the access check failed."
        if not decision.allowed:
            return decision.model_message()
        return decision, {**injected, **decision.arguments}

    def _refused(self, text: str, tool_call_id: str | None) -> Any:
        if tool_call_id is None:
            return text
        return ToolMessage(content=text, tool_call_id=tool_call_id, name=self.name,
                           status="error")

    def _screened(self, decision: Decision, output: object, tool_call_id: str | None) -> Any:
        screening = _Screening(self._guard, decision)
        try:
            screened = screening.result(output)
        except Exception as exc:
            log.warning("screening `%s` failed: %s", self.name, type(exc).__name__)
            self._guard.complete(decision, "error")
            return self._refused("[agentic-iam: tool output blocked: screening failed]",
                                 tool_call_id)
        self._guard.complete(decision, "error" if screening.error else "success")
        return screened

    def run(self, tool_input: str | dict[str, Any], verbose: bool | None = None,
            start_color: str | None = "green", color: str | None = "green",
            callbacks: Any = None, *, tool_call_id: str | None = None,
            **kwargs: Any) -> Any:
        decided = self._decide(tool_input, tool_call_id)
        if isinstance(decided, str):
            return self._refused(decided, tool_call_id)
        decision, checked = decided
        try:
            output = self._inner.run(checked, verbose, start_color, color, callbacks,
                                     tool_call_id=tool_call_id, **kwargs)
        except BaseException as exc:
            _settle_raised(self._guard, decision, exc)
            raise
        return self._screened(decision, output, tool_call_id)

    async def arun(self, tool_input: str | dict[str, Any], verbose: bool | None = None,
                   start_color: str | None = "green", color: str | None = "green",
                   callbacks: Any = None, *, tool_call_id: str | None = None,
                   **kwargs: Any) -> Any:
        decided = self._decide(tool_input, tool_call_id)
        if isinstance(decided, str):
            return self._refused(decided, tool_call_id)
        decision, checked = decided
        try:
            output = await self._inner.arun(checked, verbose, start_color, color, callbacks,
                                            tool_call_id=tool_call_id, **kwargs)
        except BaseException as exc:
            _settle_raised(self._guard, decision, exc)
            raise
        return self._screened(decision, output, tool_call_id)


def guard_tools(
    tools: Iterable[BaseTool | Callable[..., Any]],
    guard: Guard,
    token: Token,
    *,
    observer: IAMCallbackHandler | None = None,
    on_approval: ApprovalMode = "refuse",
) -> list[BaseTool]:
    """Wrap tools so that every run is authorized, screened and settled with ``token``.

    For executors other than ``create_agent``/``ToolNode`` (which should use
    :class:`GuardMiddleware` instead — do not combine both, each call would be decided twice).
    ``observer`` supplies reasoning context by tool call id; ``on_approval="interrupt"`` pauses a
    LangGraph run for approval (outside a graph the call is refused and the request stays
    pending).
    """
    wrapped: list[BaseTool] = []
    for item in tools:
        base = item if isinstance(item, BaseTool) else StructuredTool.from_function(item)
        if isinstance(base, GuardedTool):
            raise ValueError(f"tool `{base.name}` is already guarded")
        wrapped.append(GuardedTool(base, guard, token, observer=observer,
                                   on_approval=on_approval))
    return wrapped


# --- sub-agents ------------------------------------------------------------------------------


class _Invocable(Protocol):
    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any: ...

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None,
                      **kwargs: Any) -> Any: ...


ContextFactory = Callable[[ExecutionToken], object]


def delegated_context(
    parent: object,
    broker: DelegationBroker,
    agent_id: str,
    *,
    capabilities: CapabilitiesLike | None = None,
    ttl: int | None = None,
    budget: Budget | Mapping[str, int | None] | None = None,
    purpose: str | None = None,
    context_factory: ContextFactory = IAMContext,
) -> object:
    """A child run context with a narrower identity minted from the parent's.

    ``parent`` is the parent's run context (or its token). Raises :class:`DelegationError`
    (e.g. :class:`WideningError`) when the broker refuses. The returned context is always
    truthy: LangGraph falls back to the parent's context for a falsy one.
    """
    token = parent if isinstance(parent, (str, ExecutionToken)) else token_from_context(parent)
    if not token:
        raise DelegationError("the parent run carries no execution token to sub-delegate from")
    child = broker.subdelegate_for(token, agent_id, capabilities=capabilities, ttl=ttl,
                                   budget=budget, purpose=purpose)
    context = context_factory(child)
    if not context or token_from_context(context) is None:
        raise DelegationError("the child context must be truthy and carry `aiam_token`")
    return context


def _child_config(context: object) -> RunnableConfig:
    """The child's config: inherited, but usage handlers re-bound to the child's token."""
    config = ensure_config()
    callbacks = config.get("callbacks")
    token = token_from_context(context)
    if not isinstance(callbacks, BaseCallbackManager) or token is None:
        return {}
    ours = [h for h in callbacks.handlers if isinstance(h, IAMCallbackHandler)]
    if not ours:
        return {}
    manager = callbacks.copy()
    for handler in ours:
        handler.exclude_descendants_of(callbacks.parent_run_id)
        manager.remove_handler(handler)
        manager.add_handler(handler.for_token(token), inherit=True)
    return {"callbacks": manager}


@contextmanager
def _child_run(broker: DelegationBroker, context: object) -> Iterator[None]:
    """The child run of a sub-agent: its execution (minted for it here) ends when the run
    returns, raises or pauses — always, whatever ``end_on_finish`` says. A paused child is
    replayed with a freshly minted identity, so nothing needs the old one."""
    reason = "completed"
    try:
        yield
    except GraphInterrupt:
        reason = "interrupted"
        raise
    except BaseException:
        reason = "failed"
        raise
    finally:
        token = token_from_context(context)
        if token is not None:
            _end_execution(broker.end, token, reason)


def _default_input(task: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": task}]}


def _default_output(result: object) -> str:
    messages = _messages_of(result)
    if messages and isinstance(messages[-1], BaseMessage):
        return messages[-1].text
    return str(result)


def subagent_tool(
    agent: _Invocable,
    *,
    name: str,
    description: str,
    broker: DelegationBroker,
    agent_id: str,
    capabilities: CapabilitiesLike | None = None,
    ttl: int | None = None,
    budget: Budget | Mapping[str, int | None] | None = None,
    purpose: str | None = None,
    context_factory: ContextFactory = IAMContext,
    build_input: Callable[[str], Any] = _default_input,
    read_output: Callable[[Any], str] = _default_output,
) -> BaseTool:
    """Agent-as-tool: a tool ``name(task: str)`` that runs ``agent`` as ``agent_id`` with a
    narrower identity sub-delegated from the calling run's token, passed as ``context=``.

    The calling agent's Guard decides the call to this tool like any other (register the tool
    for the parent agent); the child agent needs its own :class:`GuardMiddleware`. If the broker
    refuses to sub-delegate, the model reads why and nothing runs. ``IAMCallbackHandler``s the
    child would inherit are re-bound to the child's token.
    """

    def _prepare(runtime: ToolRuntime[Any, Any]) -> tuple[object, RunnableConfig]:
        try:
            context = delegated_context(runtime.context, broker, agent_id,
                                        capabilities=capabilities, ttl=ttl, budget=budget,
                                        purpose=purpose, context_factory=context_factory)
        except AgenticIAMError as exc:
            raise ToolException(f"Could not delegate to `{agent_id}`: {exc}") from None
        return context, _child_config(context)

    def run_subagent(task: str, runtime: ToolRuntime[Any, Any]) -> str:
        context, config = _prepare(runtime)
        with _child_run(broker, context):
            return read_output(agent.invoke(build_input(task), config, context=context))

    async def arun_subagent(task: str, runtime: ToolRuntime[Any, Any]) -> str:
        context, config = _prepare(runtime)
        with _child_run(broker, context):
            return read_output(await agent.ainvoke(build_input(task), config,
                                                   context=context))

    return StructuredTool.from_function(
        func=run_subagent, coroutine=arun_subagent, name=name, description=description,
        handle_tool_error=True,
    )


def subagent_node(
    graph: _Invocable,
    *,
    broker: DelegationBroker,
    agent_id: str,
    capabilities: CapabilitiesLike | None = None,
    ttl: int | None = None,
    budget: Budget | Mapping[str, int | None] | None = None,
    purpose: str | None = None,
    context_factory: ContextFactory = IAMContext,
) -> Callable[[Any, Runtime[Any]], Any]:
    """A graph node that runs a compiled subgraph with a narrower, explicitly passed identity.

    Use it instead of adding the subgraph as a node directly (which inherits the parent's
    context with no hook at the boundary).
    """

    def node(state: Any, runtime: Runtime[Any]) -> Any:
        context = delegated_context(runtime.context, broker, agent_id,
                                    capabilities=capabilities, ttl=ttl, budget=budget,
                                    purpose=purpose, context_factory=context_factory)
        with _child_run(broker, context):
            return graph.invoke(state, _child_config(context), context=context)

    return node


# --- memory scopes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FilteredDocuments:
    """Documents a :class:`ScopedRetriever` dropped for one query."""

    query_digest: str
    """SHA-256 of the query (the query itself may be sensitive)."""
    count: int
    """How many documents were dropped."""
    ids: tuple[str, ...]
    """Their ids (``Document.id``, ``metadata["id"]`` or a content digest)."""
    scopes: tuple[str, ...]
    """The out-of-scope scope values found (``<missing>`` for documents without one)."""


def _document_id(document: Document) -> str:
    if document.id:
        return str(document.id)
    meta_id = document.metadata.get("id")
    if meta_id is not None:
        return str(meta_id)
    return "sha256:" + hashlib.sha256(document.page_content.encode()).hexdigest()[:16]


class ScopedRetriever(BaseRetriever):
    """Keeps only documents whose ``metadata[scope_key]`` is one of the agent's memory scopes.

    Fail closed: a document without a scope, or whose scope is not a non-empty string, is
    dropped. Scopes match exactly (no wildcards). Every drop is recorded in :attr:`filtered`
    (bounded, newest last) and logged with the document ids (never their content).
    """

    retriever: BaseRetriever
    """The retriever being filtered."""
    scopes: frozenset[str]
    """The memory scopes the agent may read."""
    scope_key: str = "scope"
    """The metadata key holding a document's scope."""
    agent_id: str | None = None
    """For log lines."""
    max_records: int = 1000
    """How many :class:`FilteredDocuments` records :attr:`filtered` keeps."""
    filtered: list[FilteredDocuments] = Field(default_factory=list)
    """What was dropped, one record per query that dropped anything."""

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, retriever: BaseRetriever, agent_spec_or_scopes: AgentSpec | Iterable[str],
                 *, scope_key: str = "scope", **kwargs: Any) -> None:
        if isinstance(agent_spec_or_scopes, AgentSpec):
            scopes, agent_id = agent_spec_or_scopes.memory_scopes, agent_spec_or_scopes.id
        elif isinstance(agent_spec_or_scopes, str):
            raise TypeError("pass an AgentSpec or a collection of scopes, not one string")
        else:
            scopes, agent_id = frozenset(agent_spec_or_scopes), kwargs.pop("agent_id", None)
        fields: dict[str, Any] = {"retriever": retriever, "scopes": frozenset(scopes),
                                  "scope_key": scope_key, "agent_id": agent_id, **kwargs}
        super().__init__(**fields)

    def _keep(self, query: str, documents: Sequence[Document]) -> list[Document]:
        kept: list[Document] = []
        dropped: list[Document] = []
        seen: set[str] = set()
        for document in documents:
            scope = document.metadata.get(self.scope_key)
            if isinstance(scope, str) and scope and scope in self.scopes:
                kept.append(document)
            else:
                dropped.append(document)
                seen.add(scope if isinstance(scope, str) and scope else "<missing>")
        if dropped:
            record = FilteredDocuments(
                query_digest=hashlib.sha256(query.encode()).hexdigest(),
                count=len(dropped), ids=tuple(_document_id(d) for d in dropped),
                scopes=tuple(sorted(seen)))
            with self._lock:
                self.filtered.append(record)
                del self.filtered[:-self.max_records]
            log.info("memory scopes: dropped %d document(s) for agent `%s` (scopes %s): %s",
                     record.count, self.agent_id or "-", ", ".join(record.scopes),
                     ", ".join(record.ids))
        return kept

    def _get_relevant_documents(self, query: str, *,
                                run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        documents = self.retriever.invoke(query, {"callbacks": run_manager.get_child()})
        return self._keep(query, documents)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        documents = await self.retriever.ainvoke(query, {"callbacks": run_manager.get_child()})
        return self._keep(query, documents)
