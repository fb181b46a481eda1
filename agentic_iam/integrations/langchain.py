"""LangChain v1 / LangGraph adapter: every tool call of an agent goes through the Guard.

``pip install "agentic-iam[langchain]"``. The adapter only translates: a LangChain tool call into
a :class:`ToolCall` for :meth:`Guard.mediate` (authorize → approval → run → screen → complete,
exactly once per call id), a refusal into ``ToolMessage(status="error")``, an approval into
LangGraph's ``interrupt()`` (resume with ``Command(resume={"approved": True, "approver":
"bob"})``, ``bob`` being in ``GuardConfig.approvers``), and a ``GraphInterrupt`` raised inside a
tool into a cancelled call (LangGraph replays the task).

- :func:`protect` — ``protect(agent, guard, broker=..., agent_id=...)`` guards an existing
  ``create_agent`` agent or compiled LangGraph graph in place and returns it: every ``ToolNode``
  of the graph (and of its subgraphs) gets the Guard as its innermost tool-call wrapper, so tools
  added to a node later, parallel calls, async tools and streaming all pass through it. The
  run's identity is the run context's token (:class:`IAMContext`, or any context with an
  ``aiam_token``) or the token bound by :func:`agentic_iam.core.binding.bind`. A token of
  another agent (a parent calling this agent from a plain ``@tool``) is never used: with a
  broker a child identity is minted with ``broker.subdelegate_for`` for the run and ended with
  it; without one every call is refused (``identity.agent_mismatch``). A run whose token came
  in its context ends its execution when it finishes (not when it pauses; opt out with
  ``IAMContext(token, end_on_finish=False)``); a token bound with ``bind`` belongs to its block.
- :class:`GuardMiddleware` — the same for ``create_agent(middleware=[...])`` (it ends the run's
  execution in ``after_agent``); :func:`guarded_tool_node` — a guarded ``ToolNode``.
- :func:`guard_tools` — wrapped tools for other executors; :class:`IAMCallbackHandler` —
  observe-only usage charging and reasoning capture; :func:`subagent_tool`,
  :func:`subagent_node`, :func:`delegated_context` — sub-agents run under a narrower identity
  passed explicitly (LangGraph's ``Runtime.merge`` otherwise hands a child the parent's context);
  :class:`ScopedRetriever` — retrieval filtered by the run's memory scopes
  (:meth:`Guard.filter_memory`: a revoked or expired run reads nothing; drops are audited).

No escape. Importing this module registers a LangChain callback (``on_tool_start``, raising)
that refuses, loudly, any tool that starts while an execution token is in scope but not inside
a Guard mediation for that exact tool, call id and arguments: a graph that was never protected,
a tool called by hand under ``bind``, or a middleware placed after :class:`GuardMiddleware`
that rewrote the arguments (5000 under an allow for 50) or swapped the tool. Such a call is
cancelled and refused; the tool body never runs.

What it must never do: run a tool without an ``allow`` decision for that exact call; run it with
other arguments than ``decision.arguments``; let tool output reach the model unscreened; put a
token in model-visible state, a message, a log line or an interrupt payload; let a child agent
run with the parent's identity; turn a refusal into a crash of the run.

Caveats: the run context is not checkpointed — pass ``context=`` again with
``Command(resume=...)``. Provider built-in tools (dicts run server-side) never reach a
``ToolNode`` and cannot be guarded here.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypeVar

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
    from langchain_core.tracers.context import register_configure_hook
    from langgraph.checkpoint.base import BaseCheckpointSaver
    from langgraph.config import get_config
    from langgraph.errors import GraphInterrupt
    from langgraph.prebuilt import ToolNode
    from langgraph.prebuilt.tool_node import ToolRuntime
    from langgraph.pregel import Pregel
    from langgraph.runtime import Runtime
    from langgraph.types import Command, interrupt
    from pydantic import ConfigDict, Field, PrivateAttr
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    _missing = (exc.name or "langchain").split(".")[0]
    raise MissingExtraError("langchain", _missing) from exc

from agentic_iam.core.binding import current_token
from agentic_iam.core.broker import CapabilitiesLike, DelegationBroker
from agentic_iam.core.decision import Decision, Reason, ReasoningContext, ToolCall
from agentic_iam.core.guard import Guard, Screened
from agentic_iam.core.identity import Budget
from agentic_iam.core.mediation import Mediated, current_decision
from agentic_iam.core.tokens import ExecutionToken
from agentic_iam.errors import (
    AgenticIAMError,
    AuthorizationDenied,
    ConfigurationError,
    DelegationError,
    TokenError,
)

__all__ = [
    "GuardMiddleware",
    "GuardedTool",
    "IAMCallbackHandler",
    "IAMContext",
    "ScopedRetriever",
    "delegated_context",
    "find_requesting_message",
    "guard_tools",
    "guarded_tool_node",
    "protect",
    "subagent_node",
    "subagent_tool",
    "token_from_context",
]

log = logging.getLogger("agentic_iam.integrations.langchain")

FRAMEWORK = "langchain"
ApprovalMode = Literal["interrupt", "refuse"]
Token = str | ExecutionToken
ToolResult = ToolMessage | Command[Any]
G = TypeVar("G")


# --- the run's identity ----------------------------------------------------------------------


@dataclass(frozen=True)
class IAMContext:
    """The run context carrying the execution token (``create_agent(context_schema=IAMContext)``).

    LangGraph keeps the context out of the graph state and out of checkpoints: the model never
    sees it. Pass it again when resuming a paused run.
    """

    token: Token = field(repr=False)
    """The execution token (compact JWS or :class:`ExecutionToken`). Kept out of ``repr``."""
    end_on_finish: bool = True
    """End the execution when the agent run finishes. ``False`` keeps the token working for a
    conversation of several runs; end it yourself (``guard.end_execution``) when done."""

    @property
    def aiam_token(self) -> Token:
        """The token under the name every adapter looks for."""
        return self.token

    @property
    def aiam_end_on_finish(self) -> bool:
        """``end_on_finish`` under the name every adapter looks for."""
        return self.end_on_finish


def _attr(context: object, name: str) -> object:
    value = getattr(context, name, None)
    return context.get(name) if value is None and isinstance(context, Mapping) else value


def token_from_context(context: object) -> Token | None:
    """The execution token in a run context (``aiam_token`` attribute or key), or ``None``.

    Only a non-empty string or an :class:`ExecutionToken` counts, never an already-verified
    identity object (anything in-process can construct one).
    """
    value = _attr(context, "aiam_token") if context is not None else None
    return value if isinstance(value, ExecutionToken) or (isinstance(value, str) and value) \
        else None


def _graph_context() -> object:
    """The context of the LangGraph run this code runs in, or ``None``."""
    try:
        runtime = get_config().get("configurable", {}).get("__pregel_runtime")
    except RuntimeError:  # not inside a runnable
        return None
    return getattr(runtime, "context", None)


def _run_token(context: object = None) -> Token | None:
    """The run's token: the framework's run context first, then the one bound by ``bind``."""
    return token_from_context(context) or token_from_context(_graph_context()) or current_token()


def _raw(token: Token) -> str:
    return token.token if isinstance(token, ExecutionToken) else token


# --- reasoning context -----------------------------------------------------------------------


def _messages_of(state: object) -> list[Any]:
    messages = state if isinstance(state, list) else _attr(state, "messages")
    return list(messages) if isinstance(messages, (list, tuple)) else []


def find_requesting_message(state: object, tool_call_id: str | None) -> AIMessage | None:
    """The ``AIMessage`` in ``state["messages"]`` whose ``tool_calls`` hold ``tool_call_id``."""
    for message in reversed(_messages_of(state) if tool_call_id else []):
        if isinstance(message, AIMessage) and any(
                c.get("id") == tool_call_id for c in message.tool_calls):
            return message
    return None


def _reasoning(message: AIMessage | None, *, model: str | None, run_id: object = None,
               parent_run_id: object = None) -> ReasoningContext:
    """The model's text plus its reasoning blocks, model name and ids."""
    if message is None:
        return ReasoningContext(model=model, run_id=str(run_id) if run_id else None)
    if isinstance(message.content, str):  # plain text has no reasoning blocks (and is fast)
        text, blocks = message.content, []
    else:
        try:
            text, blocks = str(message.text), message.content_blocks
        except Exception:  # odd provider content: keep the raw content
            text, blocks = str(message.content), []
    reasoning = [str(b.get("reasoning")) for b in blocks
                 if b.get("type") == "reasoning" and b.get("reasoning")]
    extra = message.additional_kwargs.get("reasoning_content")
    if isinstance(extra, str) and extra and extra not in reasoning:
        reasoning.append(extra)
    parts = [p for p in (text.strip(), *(f"[reasoning] {r.strip()}" for r in reasoning)) if p]
    meta = message.response_metadata
    named = next((meta[k] for k in ("model_name", "model", "model_id")
                  if isinstance(meta.get(k), str) and meta[k]), None)
    response_id = meta.get("id") if isinstance(meta.get("id"), str) else message.id
    return ReasoningContext(message="\n".join(parts) or None, model=named or model,
                            run_id=str(run_id) if run_id else None,
                            parent_run_id=str(parent_run_id) if parent_run_id else None,
                            response_id=response_id or None)


# --- screening what the model sees ----------------------------------------------------------


def _content_text(content: object) -> str:
    """One text for the firewall from message content (a string or a list of blocks)."""
    if isinstance(content, list) and all(
            isinstance(b, str) or (isinstance(b, Mapping) and b.get("type") == "text")
            for b in content):
        return "".join(b if isinstance(b, str) else str(b.get("text", "")) for b in content)
    # Images, files and other blocks cannot be screened for instructions: they are sent on as
    # their text (screened), never as raw blocks.
    return content if isinstance(content, str) else str(content)


def _screen(result: Any, screen_text: Callable[[object], Screened]) -> Any:
    """``result`` with every text the model will see screened (messages, ``Command`` updates)."""
    def message(value: object) -> object:
        if isinstance(value, BaseMessage):
            screened = screen_text(_content_text(value.content))
            update: dict[str, Any] = {"content": screened.text}
            if isinstance(value, ToolMessage) and screened.result.blocked:
                update["status"] = "error"
            return value.model_copy(update=update)
        if isinstance(value, Mapping) and "content" in value:
            return {**value, "content": screen_text(_content_text(value["content"])).text}
        if isinstance(value, tuple) and len(value) == 2:
            return (value[0], screen_text(_content_text(value[1])).text)
        return screen_text(_content_text(value)).text

    def messages(value: object) -> list[object]:
        return [message(m) for m in (value if isinstance(value, (list, tuple)) else [value])]

    if isinstance(result, list):
        return [_screen(item, screen_text) for item in result]
    if not isinstance(result, Command):
        return message(result) if isinstance(result, BaseMessage) else message(str(result))
    update = result.update
    if isinstance(update, Mapping) and "messages" in update:
        update = {**update, "messages": messages(update["messages"])}
    elif isinstance(update, (list, tuple)):
        update = [(k, messages(v)) if k == "messages" else (k, v) for k, v in update]
    # Other state keys never reach the model directly; a prompt that renders them must screen.
    return Command(graph=result.graph, update=update, resume=result.resume, goto=result.goto)


def _failed(result: object) -> bool:
    """The tool reported a failure (an error ``ToolMessage``, also inside a ``Command``)."""
    if isinstance(result, ToolMessage):
        return result.status == "error"
    if isinstance(result, list):
        return any(_failed(item) for item in result)
    if not isinstance(result, Command) or not isinstance(result.update, Mapping):
        return False
    found = result.update.get("messages")
    return _failed(list(found) if isinstance(found, (list, tuple)) else found)


# --- no escape: a tool that starts outside a mediation is refused ---------------------------


class _Escaped(Exception):
    """The tool never started: what would have run is not what the Guard allowed."""


# (call id, ToolNode runtime, tool names refused at their start) of the ToolNode call being
# mediated in this context. The runtime object identifies that call across wrapper layers.
_WATCH: ContextVar[tuple[str | None, object, list[str]] | None] = ContextVar("aiam_lc_watch",
                                                                              default=None)


class _UnguardedToolRefusal(BaseCallbackHandler):
    """Refuses any tool that starts while a token is in scope but outside a mediation.

    ``on_tool_start`` runs before the tool body (``BaseTool.run`` calls it outside its
    try/except, langchain_core/tools/base.py:1074) and, with ``raise_error``, its exception
    aborts the call; it runs inline so the async path raises too.
    """

    raise_error = True
    run_inline = True

    def on_tool_start(self, serialized: dict[str, Any] | None, input_str: str, *,
                      run_id: Any, inputs: dict[str, Any] | None = None,
                      tool_call_id: str | None = None, **kwargs: Any) -> None:
        if _run_token() is None:
            return  # no identity in scope: nothing to enforce here
        name = str((serialized or {}).get("name") or "")
        decision = current_decision()
        if (decision is not None and decision.tool == name and inputs == dict(decision.arguments)
                and tool_call_id in (None, decision.call_id)):
            return
        watch = _WATCH.get()
        if watch is not None and watch[0] == tool_call_id:
            watch[2].append(name)
        why = (f"tool `{name}` started outside the Guard's mediation (never wired in, or changed "
               "after the Guard allowed it)")
        log.error("refused: %s", why)
        raise AuthorizationDenied(Decision("deny", (Reason("mediation.unguarded", why),),
                                           tool_call_id or "", name))


# A default, not a .set(): new threads start with an empty context and must see it too. The
# handler holds no state, so sharing one instance is safe.
_REFUSAL_HOOK: ContextVar[BaseCallbackHandler | None] = ContextVar(
    "aiam_lc_refusal", default=_UnguardedToolRefusal())  # noqa: B039
register_configure_hook(_REFUSAL_HOOK, True)  # added to every callback manager from now on


# --- mediation of one ToolNode call ----------------------------------------------------------


def _paused(exc: BaseException) -> bool:
    return isinstance(exc, (GraphInterrupt, _Escaped))


def _can_pause() -> bool:
    try:  # interrupt() needs the scratchpad of a running Pregel task
        return bool(get_config().get("configurable", {}).get("__pregel_scratchpad"))
    except RuntimeError:
        return False


def _refusal(call: Mapping[str, Any], text: str) -> ToolMessage:
    return ToolMessage(content=text, tool_call_id=call.get("id") or "", name=call.get("name"),
                       status="error")


@dataclass(frozen=True)
class _ToolCalls:
    """Turns a ``ToolCallRequest`` into a mediated call and its result into a tool result."""

    guard: Guard
    agent_id: str | None = None
    model_name: str | None = None
    on_approval: ApprovalMode = "interrupt"
    require_model_message: bool = True

    def __post_init__(self) -> None:
        if self.on_approval not in ("interrupt", "refuse"):
            raise ValueError(f"on_approval must be `interrupt` or `refuse`, got "
                             f"{self.on_approval!r}")

    def prepare(self, request: ToolCallRequest) -> tuple[Token | None, ToolCall] | ToolMessage \
            | None:
        """(token, call) to mediate; a refusal; or ``None`` when an outer layer of ours already
        mediates exactly this call."""
        try:
            return self._prepare(request)
        except Exception as exc:  # fail closed: the tool does not run, the run goes on
            log.warning("access check for `%s` failed: %s", request.tool_call.get("name"),
                        type(exc).__name__)
            return _refusal(request.tool_call, "The call was refused: the access check failed.")

    def _prepare(self, request: ToolCallRequest) -> tuple[Token | None, ToolCall] | ToolMessage \
            | None:
        tool_call, runtime = request.tool_call, request.runtime
        name, call_id = tool_call.get("name") or "", tool_call.get("id")
        outer, watch = current_decision(), _WATCH.get()
        if outer is not None and watch is not None and watch[1] is runtime:
            # An outer layer of ours mediates this very ToolNode call (GuardMiddleware and
            # protect() together): pass through if nothing changed in between, else refuse.
            if outer.tool == name and dict(outer.arguments) == tool_call.get("args"):
                return None
            watch[2].append(name)  # the outer mediation cancels the call
            return _refusal(tool_call, f"The call to `{name}` was refused: it was changed "
                                       f"after the access check.")
        message = find_requesting_message(request.state, call_id)
        if message is None and self.require_model_message:
            return _refusal(tool_call, f"The call to `{name}` was refused by the access layer "
                                       f"and was not run. Reason: the model message that "
                                       f"requested it was not found.")
        config: Mapping[str, Any] = getattr(runtime, "config", None) or {}
        reasoning = _reasoning(
            message, model=self.model_name,
            run_id=getattr(getattr(runtime, "execution_info", None), "run_id", None)
            or config.get("run_id"),
            parent_run_id=getattr(config.get("callbacks"), "parent_run_id", None))
        call = ToolCall(name, tool_call.get("args") or {}, call_id, reasoning, FRAMEWORK)
        return _run_token(getattr(runtime, "context", None)), call

    def _ask(self) -> Callable[[dict[str, Any]], object] | None:
        return interrupt if self.on_approval == "interrupt" and _can_pause() else None

    def _checked(self, request: ToolCallRequest, args: dict[str, Any]) -> ToolCallRequest:
        if request.tool is None:  # registered for the agent, but not a tool of this node
            raise _Escaped(f"Error: `{request.tool_call.get('name')}` is not a valid tool here.")
        return request.override(tool_call={**request.tool_call, "args": args})

    @staticmethod
    @contextmanager
    def _watched(call_id: str | None, runtime: object) -> Iterator[list[str]]:
        refused: list[str] = []
        reset = _WATCH.set((call_id, runtime, refused))
        try:
            yield refused
        except Exception:
            if refused:  # our start check refused it: the tool body never ran
                raise _Escaped(f"The call to `{refused[0]}` was refused: what would have run "
                               "is not what the access check allowed.") from None
            raise
        finally:
            _WATCH.reset(reset)
        if refused:
            raise _Escaped(f"The call to `{refused[0]}` was refused: what would have run is "
                           "not what the access check allowed.")

    @staticmethod
    def result(request: ToolCallRequest, done: Mediated[Any]) -> ToolResult:
        value = done.value
        if done.status not in ("ran", "replayed") or value is None:
            return _refusal(request.tool_call, done.refusal or done.decision.model_message())
        if isinstance(value, (ToolMessage, Command, list)):
            return value  # type: ignore[return-value]  # ToolNode takes lists of results too
        return ToolMessage(content=str(value), tool_call_id=request.tool_call.get("id") or "",
                           name=done.decision.tool)

    def wrap(self, request: ToolCallRequest,
             handler: Callable[[ToolCallRequest], ToolResult]) -> ToolResult:
        prepared = self.prepare(request)
        if prepared is None:
            return handler(request)
        if isinstance(prepared, ToolMessage):
            return prepared

        def run(args: dict[str, Any]) -> ToolResult:
            with self._watched(prepared[1].call_id, request.runtime):
                return handler(self._checked(request, args))
        try:
            done = self.guard.mediate(*prepared, run, screen=_screen, failed=_failed,
                                      ask=self._ask(), paused=_paused, agent_id=self.agent_id)
        except _Escaped as exc:
            return _refusal(request.tool_call, str(exc))
        return self.result(request, done)

    async def awrap(self, request: ToolCallRequest,
                    handler: Callable[[ToolCallRequest], Awaitable[ToolResult]]) -> ToolResult:
        prepared = self.prepare(request)
        if prepared is None:
            return await handler(request)
        if isinstance(prepared, ToolMessage):
            return prepared

        async def run(args: dict[str, Any]) -> ToolResult:
            with self._watched(prepared[1].call_id, request.runtime):
                return await handler(self._checked(request, args))
        try:
            done = await self.guard.amediate(*prepared, run, screen=_screen, failed=_failed,
                                             ask=self._ask(), paused=_paused,
                                             agent_id=self.agent_id)
        except _Escaped as exc:
            return _refusal(request.tool_call, str(exc))
        return self.result(request, done)


# --- create_agent middleware and ToolNode ----------------------------------------------------


class GuardMiddleware(AgentMiddleware[AgentState[Any], Any, Any]):
    """Mediates every tool call of a ``create_agent`` agent; ends the run's execution.

    Put it LAST in ``middleware=[...]`` (innermost). If a middleware after it changes a call's
    arguments or tool, the tool refuses to start and the call is refused (see the module
    docstring); :func:`protect` places the Guard innermost by construction.
    """

    def __init__(self, guard: Guard, *, model_name: str | None = None,
                 on_approval: ApprovalMode = "interrupt", require_model_message: bool = True,
                 agent_id: str | None = None) -> None:
        """``on_approval``: ``interrupt`` pauses the run (resuming needs a checkpointer);
        ``refuse`` returns the approval message and leaves the request pending.
        ``require_model_message``: refuse calls whose requesting ``AIMessage`` is not in the
        state. ``agent_id``: the registry agent this is; a token of another agent is refused.
        """
        super().__init__()
        self.guard = guard
        self._calls = _ToolCalls(guard, agent_id, model_name, on_approval, require_model_message)

    def wrap_tool_call(self, request: ToolCallRequest,
                       handler: Callable[[ToolCallRequest], ToolResult]) -> ToolResult:
        return self._calls.wrap(request, handler)

    async def awrap_tool_call(
            self, request: ToolCallRequest,
            handler: Callable[[ToolCallRequest], Awaitable[ToolResult]]) -> ToolResult:
        return await self._calls.awrap(request, handler)

    def after_agent(self, state: AgentState[Any], runtime: Runtime[Any]) -> dict[str, Any] | None:
        """The run finished (not paused): its execution ends unless the context opted out."""
        context = getattr(runtime, "context", None)
        token = token_from_context(context)
        if token is not None and _attr(context, "aiam_end_on_finish") is not False:
            _end(self.guard.end_execution, token, "completed")
        return None

    async def aafter_agent(self, state: AgentState[Any],
                           runtime: Runtime[Any]) -> dict[str, Any] | None:
        """The run finished (not paused): its execution ends unless the context opted out."""
        return self.after_agent(state, runtime)


def guarded_tool_node(tools: Iterable[BaseTool | Callable[..., Any]], guard: Guard, *,
                      name: str = "tools", model_name: str | None = None,
                      on_approval: ApprovalMode = "interrupt", require_model_message: bool = True,
                      agent_id: str | None = None, **tool_node_kwargs: Any) -> ToolNode:
    """A LangGraph ``ToolNode`` whose every call is mediated (the caller ends the execution)."""
    calls = _ToolCalls(guard, agent_id, model_name, on_approval, require_model_message)
    return ToolNode(list(tools), name=name, wrap_tool_call=calls.wrap,
                    awrap_tool_call=calls.awrap, **tool_node_kwargs)


# --- protect(): guard an existing agent in one call ------------------------------------------


def _end(end: Callable[..., None], token: Token, reason: str) -> None:
    """End an execution; a failure is logged (the work is done, the token still expires)."""
    try:
        end(token, reason=reason)
    except Exception as exc:
        log.warning("could not end the execution (%s): %s", reason, type(exc).__name__)


def _tool_nodes(graph: Pregel[Any, Any, Any, Any], seen: set[int]) -> Iterator[ToolNode]:
    if id(graph) in seen:
        return
    seen.add(id(graph))
    for node in graph.nodes.values():
        bound = getattr(node, "bound", None)
        if isinstance(bound, ToolNode):
            yield bound
        elif isinstance(bound, Pregel):
            yield from _tool_nodes(bound, seen)


def _guard_node(node: ToolNode, calls: _ToolCalls) -> None:
    """Make ``calls`` the innermost wrapper of ``node``: it sees the final arguments and tool,
    for every call the node runs, whatever tools it holds now or later."""
    outer, aouter = node._wrap_tool_call, node._awrap_tool_call

    def wrap(request: ToolCallRequest, execute: Callable[..., Any]) -> Any:
        inner: Callable[[ToolCallRequest], Any] = lambda req: calls.wrap(req, execute)  # noqa: E731
        return outer(request, inner) if outer is not None else inner(request)

    async def awrap(request: ToolCallRequest, execute: Callable[..., Any]) -> Any:
        inner: Callable[[ToolCallRequest], Any] = lambda req: calls.awrap(req, execute)  # noqa: E731
        return await (aouter(request, inner) if aouter is not None else inner(request))

    node._wrap_tool_call = wrap
    # A sync-only chain stays sync: ToolNode then runs it with a sync executor on async runs.
    node._awrap_tool_call = awrap if aouter is not None or outer is None else None


@dataclass
class _Run:
    """One run of a protected graph: the context it runs with and what to end after it."""

    context: object
    ends: Token | None = None
    always: bool = False
    paused: bool = False

    def close(self, end: Callable[..., None], failed: bool) -> None:
        if self.ends is not None and (self.always or not (self.paused or failed)):
            reason = "failed" if failed else ("interrupted" if self.paused else "completed")
            _end(end, self.ends, reason)

    def asks(self, checkpointer: object, config: object) -> bool:
        """Whether to ask the checkpoint if a run that showed no interrupt paused."""
        return (self.ends is not None and not self.always and not self.paused and bool(config)
                and isinstance(checkpointer, BaseCheckpointSaver))

    def saw(self, chunk: object) -> object:
        part = chunk[-1] if isinstance(chunk, tuple) and chunk else chunk
        self.paused = self.paused or (isinstance(part, Mapping) and "__interrupt__" in part)
        return chunk


def _begin(guard: Guard, broker: DelegationBroker | None, agent_id: str | None,
           context: object) -> _Run:
    token = _run_token(context)
    own = token_from_context(context) is not None
    if token is None or agent_id is None or broker is None:
        return _Run(context, token if own and _attr(context, "aiam_end_on_finish") is not False
                    else None)
    try:
        agent = guard.verifier.verify(_raw(token), check_revocation=False).agent_id
    except TokenError:
        agent = agent_id  # unusable: the Guard refuses (and records) every call
    if agent == agent_id:
        ends = own and _attr(context, "aiam_end_on_finish") is not False
        return _Run(context, token if ends else None)
    # A parent's token (this agent was called from a plain tool or a handoff): never run
    # under it. The child identity lives exactly as long as this run.
    try:
        child = broker.subdelegate_for(token, agent_id)
    except AgenticIAMError as exc:  # the broker refused: every call is refused (and recorded)
        log.warning("no identity for `%s` from its caller's: %s", agent_id, exc)
        return _Run(context)
    return _Run(IAMContext(child), child, always=True)


def protect(agent: G, guard: Guard, *, broker: DelegationBroker | None = None,
            agent_id: str | None = None, model_name: str | None = None,
            on_approval: ApprovalMode = "interrupt", require_model_message: bool = True) -> G:
    """Guard an existing ``create_agent`` agent or compiled LangGraph graph; returns it.

    Mutates ``agent`` in place (idempotent): its ``ToolNode``\\ s mediate every call and its
    runs carry the right identity (see the module docstring). ``agent_id`` is the registry id
    this agent runs as; ``broker`` lets it mint a child identity from a parent's token.
    """
    if not isinstance(agent, Pregel):
        raise ConfigurationError(f"protect() takes a create_agent agent or a compiled LangGraph "
                                 f"graph, not `{type(agent).__name__}`")
    if getattr(agent, "_aiam_protected", False):
        return agent
    nodes = list(_tool_nodes(agent, set()))
    if not nodes:
        raise ConfigurationError(f"`{agent.get_name()}` has no ToolNode: nothing to guard")
    if any(name.startswith("GuardMiddleware.") for name in agent.nodes):
        warnings.warn("this agent already has GuardMiddleware; protect() guards every tool "
                      "call on its own (remove the middleware)", UserWarning, stacklevel=2)
    calls = _ToolCalls(guard, agent_id, model_name, on_approval, require_model_message)
    for node in nodes:
        _guard_node(node, calls)
    stream, astream = agent.stream, agent.astream

    def guarded_stream(input: Any, config: RunnableConfig | None = None, *,
                       context: Any = None, **kwargs: Any) -> Iterator[Any]:
        run = _begin(guard, broker, agent_id, context)
        failed = True
        try:
            for chunk in stream(input, config, context=run.context, **kwargs):
                yield run.saw(chunk)
            # A stream mode that shows no interrupts: ask the checkpoint whether the run paused.
            if run.asks(agent.checkpointer, config):
                run.paused = bool(agent.get_state(config or {}).interrupts)
            failed = False
        finally:
            run.close(guard.end_execution, failed)

    async def guarded_astream(input: Any, config: RunnableConfig | None = None, *,
                              context: Any = None, **kwargs: Any) -> AsyncIterator[Any]:
        run = _begin(guard, broker, agent_id, context)
        failed = True
        try:
            async for chunk in astream(input, config, context=run.context, **kwargs):
                yield run.saw(chunk)
            if run.asks(agent.checkpointer, config):
                run.paused = bool((await agent.aget_state(config or {})).interrupts)
            failed = False
        finally:
            run.close(guard.end_execution, failed)

    # Pregel.invoke/ainvoke run through self.stream/self.astream (langgraph/pregel/main.py).
    object.__setattr__(agent, "stream", guarded_stream)
    object.__setattr__(agent, "astream", guarded_astream)
    object.__setattr__(agent, "_aiam_protected", True)
    return agent


# --- callback handler (observe only) ----------------------------------------------------------


def _usage(response: LLMResult) -> tuple[int, int, list[AIMessage]]:
    """Input/output tokens and the AI messages of one LLM result."""
    found = (getattr(g, "message", None) for gens in response.generations for g in gens)
    messages = [m for m in found if isinstance(m, AIMessage)]
    usages = [m.usage_metadata for m in messages if m.usage_metadata]
    if usages:
        return (sum(int(u.get("input_tokens") or 0) for u in usages),
                sum(int(u.get("output_tokens") or 0) for u in usages), messages)
    counts = (response.llm_output or {}).get("token_usage") or {}
    if not isinstance(counts, Mapping):
        return 0, 0, messages
    return (int(counts.get("prompt_tokens") or counts.get("input_tokens") or 0),
            int(counts.get("completion_tokens") or counts.get("output_tokens") or 0), messages)


class IAMCallbackHandler(BaseCallbackHandler):
    """Charges LLM usage to the execution and keeps the model's last messages. Observe only.

    LangChain swallows this handler's exceptions: the Guard enforces (a charged-out
    ``llm_tokens`` budget denies the next tool call). Attach it per run:
    ``config={"callbacks": [IAMCallbackHandler(guard, token)]}``.
    """

    raise_error = False
    run_inline = True  # charge before the tool node runs, also on the async path

    def __init__(self, guard: Guard, token: Token, *, model_name: str | None = None,
                 keep: int = 16) -> None:
        super().__init__()
        self.guard, self._token, self.model_name, self.keep = guard, token, model_name, keep
        self._lock = threading.Lock()
        self._messages: deque[AIMessage] = deque(maxlen=keep)
        self._by_call: OrderedDict[str, ReasoningContext] = OrderedDict()
        #: Usage charged so far (input and output tokens), and charges that failed.
        self.charged: dict[str, int] = {"input_tokens": 0, "output_tokens": 0}
        self.failures = 0
        # LangChain hands a nested run the parent's callbacks, so this handler also sees a
        # sub-agent's model calls, which the sub-agent's own handler charges (to every
        # ancestor): run lineage lets it skip them.
        self._parent_of: OrderedDict[Any, Any] = OrderedDict()
        self._delegated: set[Any] = set()

    def exclude_descendants_of(self, run_id: Any) -> None:
        """Leave model calls under ``run_id`` (a sub-agent's run) to the sub-agent's handler."""
        if run_id is not None:
            with self._lock:
                self._delegated.add(run_id)

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: Any,
                       parent_run_id: Any = None, **kwargs: Any) -> None:
        with self._lock:
            self._parent_of[run_id] = parent_run_id
            while len(self._parent_of) > 4096:
                self._parent_of.popitem(last=False)

    on_tool_start = on_chain_start  # type: ignore[assignment]

    def _under_subagent(self, parent_run_id: Any) -> bool:
        with self._lock:
            current, steps = parent_run_id, 0
            while self._delegated and current is not None and steps < 256:
                if current in self._delegated:
                    return True
                current, steps = self._parent_of.get(current), steps + 1
            return False

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
        with self._lock:
            return self._by_call.get(tool_call_id) if tool_call_id else None

    def on_llm_end(self, response: LLMResult, *, run_id: Any,
                   parent_run_id: Any = None, **kwargs: Any) -> None:
        if self._under_subagent(parent_run_id):
            return
        input_tokens, output_tokens, messages = _usage(response)
        contexts = [_reasoning(m, model=None, run_id=run_id, parent_run_id=parent_run_id)
                    for m in messages]
        named = (response.llm_output or {}).get("model_name")
        model = next((c.model for c in contexts if c.model), None) or (
            named if isinstance(named, str) and named else self.model_name)
        with self._lock:
            for message, context in zip(messages, contexts, strict=True):
                self._messages.append(message)
                context = replace(context, model=context.model or model)
                self._by_call.update((str(c["id"]), context) for c in message.tool_calls
                                     if c.get("id"))
                while len(self._by_call) > 4 * self.keep:
                    self._by_call.popitem(last=False)
        if input_tokens + output_tokens <= 0:
            return
        try:
            self.guard.charge_usage(self._token, input_tokens=input_tokens,
                                    output_tokens=output_tokens, model=model,
                                    framework=FRAMEWORK)
        except Exception as exc:  # observe-only; the failure is counted and logged
            self.failures += 1
            log.warning("could not charge %d LLM tokens: %s", input_tokens + output_tokens,
                        type(exc).__name__)
            return
        with self._lock:
            self.charged["input_tokens"] += input_tokens
            self.charged["output_tokens"] += output_tokens


# --- wrapped tools for other executors ------------------------------------------------------


class GuardedTool(BaseTool):
    """A tool mediated by the Guard on every run (see :func:`guard_tools`).

    ``run``/``arun`` (and so ``invoke``/``ainvoke``) mediate the model's arguments and run the
    wrapped tool with the checked copy (injected arguments such as ``ToolRuntime`` pass through
    untouched). A refusal is the tool's error output, as with ``handle_tool_error=True``.
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
        super().__init__(name=inner.name, description=inner.description,
                         args_schema=inner.args_schema, return_direct=inner.return_direct,
                         response_format=inner.response_format, tags=inner.tags,
                         metadata=inner.metadata, extras=inner.extras)
        self._inner, self._guard, self._token = inner, guard, token
        self._observer, self._on_approval = observer, on_approval
        try:  # the argument names the model supplies (injected ones excluded)
            schema = inner.tool_call_schema
            fields = schema.get("properties") if isinstance(schema, Mapping) \
                else getattr(schema, "model_fields", None)
            self._visible = frozenset(fields) if isinstance(fields, Mapping) else None
        except Exception:
            self._visible = None

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

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("GuardedTool runs through run()/arun()")

    def _call(self, tool_input: str | dict[str, Any],
              tool_call_id: str | None) -> tuple[ToolCall, dict[str, Any]]:
        """The call as the model made it, and the injected values the framework added."""
        visible = self._visible
        if isinstance(tool_input, str) and visible is not None and len(visible) == 1:
            model, injected = {next(iter(visible)): tool_input}, {}
        elif isinstance(tool_input, Mapping):
            model = {k: v for k, v in tool_input.items() if visible is None or k in visible}
            injected = {k: v for k, v in tool_input.items() if k not in model}
        else:  # not an argument object: the Guard refuses it (arguments.invalid)
            model, injected = tool_input, {}  # type: ignore[assignment]
        reasoning = self._observer.reasoning_for(tool_call_id) if self._observer else None
        return ToolCall(self.name, model, tool_call_id, reasoning or ReasoningContext(),
                        FRAMEWORK), injected

    def _result(self, done: Mediated[Any], tool_call_id: str | None) -> Any:
        if done.status in ("ran", "replayed"):
            return done.value
        text = done.refusal or done.decision.model_message()
        return text if tool_call_id is None else _refusal(
            {"id": tool_call_id, "name": self.name}, text)

    def _ask(self) -> Callable[[dict[str, Any]], object] | None:
        return interrupt if self._on_approval == "interrupt" and _can_pause() else None

    def run(self, tool_input: str | dict[str, Any], verbose: bool | None = None,
            start_color: str | None = "green", color: str | None = "green",
            callbacks: Any = None, *, tool_call_id: str | None = None, **kwargs: Any) -> Any:
        call, injected = self._call(tool_input, tool_call_id)
        done = self._guard.mediate(
            self._token, call, lambda args: self._inner.run(
                {**injected, **args}, verbose, start_color, color, callbacks,
                tool_call_id=tool_call_id, **kwargs),
            screen=_screen, failed=_failed, ask=self._ask(), paused=_paused)
        return self._result(done, tool_call_id)

    async def arun(self, tool_input: str | dict[str, Any], verbose: bool | None = None,
                   start_color: str | None = "green", color: str | None = "green",
                   callbacks: Any = None, *, tool_call_id: str | None = None,
                   **kwargs: Any) -> Any:
        call, injected = self._call(tool_input, tool_call_id)
        done = await self._guard.amediate(
            self._token, call, lambda args: self._inner.arun(
                {**injected, **args}, verbose, start_color, color, callbacks,
                tool_call_id=tool_call_id, **kwargs),
            screen=_screen, failed=_failed, ask=self._ask(), paused=_paused)
        return self._result(done, tool_call_id)


def guard_tools(tools: Iterable[BaseTool | Callable[..., Any]], guard: Guard, token: Token, *,
                observer: IAMCallbackHandler | None = None,
                on_approval: ApprovalMode = "refuse") -> list[BaseTool]:
    """Wrap tools so that every run is mediated with ``token``, for executors other than
    ``create_agent``/``ToolNode`` (use :func:`protect` there; do not combine both).
    ``observer`` supplies reasoning context by tool call id; ``on_approval="interrupt"`` pauses
    a LangGraph run for approval (elsewhere the call is refused and the request stays pending).
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


def delegated_context(parent: object, broker: DelegationBroker, agent_id: str, *,
                      capabilities: CapabilitiesLike | None = None, ttl: int | None = None,
                      budget: Budget | Mapping[str, int | None] | None = None,
                      purpose: str | None = None,
                      context_factory: ContextFactory = IAMContext) -> object:
    """A child run context with a narrower identity minted from the parent's.

    ``parent`` is the parent's run context or token (``None``: the token bound by ``bind``).
    Raises :class:`DelegationError` when the broker refuses. The context is always truthy:
    LangGraph falls back to the parent's context for a falsy one.
    """
    token = parent if isinstance(parent, (str, ExecutionToken)) else _run_token(parent)
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
    callbacks = ensure_config().get("callbacks")
    token = token_from_context(context)
    ours = [h for h in getattr(callbacks, "handlers", []) if isinstance(h, IAMCallbackHandler)]
    if not isinstance(callbacks, BaseCallbackManager) or token is None or not ours:
        return {}
    manager = callbacks.copy()
    for handler in ours:
        handler.exclude_descendants_of(callbacks.parent_run_id)
        manager.remove_handler(handler)
        manager.add_handler(handler.for_token(token), inherit=True)
    return {"callbacks": manager}


@contextmanager
def _child_run(broker: DelegationBroker, context: object) -> Iterator[None]:
    """The child's execution ends when its run returns, raises or pauses (a replay mints a new
    one), whatever ``end_on_finish`` says; once, even if the child's own guard ended it."""
    reason = "failed"
    try:
        yield
        reason = "completed"
    except GraphInterrupt:
        reason = "interrupted"
        raise
    finally:
        token = token_from_context(context)
        if token is not None:
            key = broker.verifier.verify(_raw(token), check_revocation=False).key
            if key not in broker.store.revoked([key]):
                _end(broker.end, token, reason)


def _default_input(task: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": task}]}


def _default_output(result: object) -> str:
    messages = _messages_of(result)
    return messages[-1].text if messages and isinstance(messages[-1], BaseMessage) \
        else str(result)


def subagent_tool(agent: _Invocable, *, name: str, description: str,
                  broker: DelegationBroker, agent_id: str,
                  capabilities: CapabilitiesLike | None = None, ttl: int | None = None,
                  budget: Budget | Mapping[str, int | None] | None = None,
                  purpose: str | None = None, context_factory: ContextFactory = IAMContext,
                  build_input: Callable[[str], Any] = _default_input,
                  read_output: Callable[[Any], str] = _default_output) -> BaseTool:
    """Agent-as-tool: a tool ``name(task: str)`` that runs ``agent`` as ``agent_id`` with a
    narrower identity sub-delegated from the calling run's token, passed as ``context=``.

    The parent's Guard decides the call to this tool (register it for the parent agent); the
    child needs its own guard (:func:`protect`). If the broker refuses, the model reads why.
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
            return read_output(await agent.ainvoke(build_input(task), config, context=context))

    return StructuredTool.from_function(func=run_subagent, coroutine=arun_subagent, name=name,
                                        description=description, handle_tool_error=True)


def subagent_node(graph: _Invocable, *, broker: DelegationBroker, agent_id: str,
                  capabilities: CapabilitiesLike | None = None, ttl: int | None = None,
                  budget: Budget | Mapping[str, int | None] | None = None,
                  purpose: str | None = None,
                  context_factory: ContextFactory = IAMContext) -> Callable[..., Any]:
    """A graph node running a compiled subgraph with a narrower, explicitly passed identity
    (a subgraph added as a node directly inherits the parent's context, with no hook)."""

    def node(state: Any, runtime: Runtime[Any]) -> Any:
        context = delegated_context(runtime.context, broker, agent_id,
                                    capabilities=capabilities, ttl=ttl, budget=budget,
                                    purpose=purpose, context_factory=context_factory)
        with _child_run(broker, context):
            return graph.invoke(state, _child_config(context), context=context)

    return node


# --- memory scopes ---------------------------------------------------------------------------


def _document_id(document: Document) -> str:
    meta_id = document.metadata.get("id")
    return str(document.id) if document.id else str(meta_id) if meta_id is not None else (
        "sha256:" + hashlib.sha256(document.page_content.encode()).hexdigest()[:16])


class ScopedRetriever(BaseRetriever):
    """Keeps only documents the run's grant may read (:meth:`Guard.filter_memory`).

    A document is kept when ``metadata[scope_key]`` is one of the token's memory scopes (exact
    match; a document without a scope is dropped). The token is checked on every query — a
    revoked, ended or expired run reads nothing — and every retrieval is in the audit log
    (``memory.retrieved``: kept and dropped ids with their scopes, never the content). The token
    is ``token`` if given, else the run's (its context, or the one bound by ``bind``).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: BaseRetriever
    """The retriever being filtered."""
    guard: Guard
    """The Guard that checks the token and records the retrieval."""
    token: Token | None = Field(default=None, repr=False)
    """A fixed execution token; ``None``: the token of the run the query runs in."""
    scope_key: str = "scope"
    """The metadata key holding a document's scope."""

    def __init__(self, retriever: BaseRetriever, guard: Guard, *, token: Token | None = None,
                 scope_key: str = "scope", **kwargs: Any) -> None:
        if not isinstance(guard, Guard):
            raise TypeError("ScopedRetriever(retriever, guard): memory scopes come from the "
                            "run's token, checked by the Guard, not from a list of scopes")
        fields: dict[str, Any] = {"retriever": retriever, "guard": guard, "token": token,
                                  "scope_key": scope_key, **kwargs}
        super().__init__(**fields)

    def _keep(self, query: str, documents: list[Document]) -> list[Document]:
        filtered = self.guard.filter_memory(
            self.token or _run_token(), documents, id_of=_document_id, query=query,
            scope_of=lambda d: d.metadata.get(self.scope_key), framework=FRAMEWORK)
        return list(filtered.kept)

    def _get_relevant_documents(self, query: str, *,
                                run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return self._keep(query, self.retriever.invoke(
            query, {"callbacks": run_manager.get_child()}))

    async def _aget_relevant_documents(
            self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        return self._keep(query, await self.retriever.ainvoke(
            query, {"callbacks": run_manager.get_child()}))
