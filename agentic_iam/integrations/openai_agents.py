"""OpenAI Agents SDK adapter: every local tool call of a protected agent goes through the Guard.

``protect(agent, guard, broker=..., agent_id="support-agent")`` (``pip install
"agentic-iam[openai-agents]"``, openai-agents >= 0.24) changes the class of ``agent`` to a guarded
subclass of its own class and returns the same object. The SDK asks ``agent.get_all_tools(ctx)``
on every turn, on resume and for every clone (``agent.clone(...)`` keeps the class), so the
guarded class wraps **every** tool the run can call — tools appended after ``protect()``, MCP
tools (rebuilt by the SDK each turn), the tools of ``as_tool`` sub-agents and handoff targets
(both are protected when their parent lists them) — and each call goes through
:meth:`Guard.amediate`: authorize → (approval) → run with the checked arguments → screen →
complete. A tool the adapter cannot guard (hosted, computer, shell tools) stops the run with
:class:`ConfigurationError` unless ``allow_unguarded_tools=True``.

The identity of a run is its context's token (:class:`IAMRunContext`, or any context with an
``aiam_token`` attribute), else the token bound with :func:`agentic_iam.bind` (what
``project.delegate(...)`` does). No token: the call is still decided and recorded, and refused.
Sub-agents never run under their parent's token: a handoff target or an agent started from
inside a tool gets ``broker.subdelegate_for(parent, its_id)`` at its first model or tool call
(one per run, ended when that run produces its final output); an ``as_tool`` agent gets its own
child for each invocation (ended with it). Without a broker their calls are refused
(``identity.agent_mismatch``).

Approvals use the SDK's own pause: a guarded tool's ``needs_approval`` starts the mediation, and
when the Guard says ``approval_required`` the run stops with ``result.interruptions``. Answer with
:func:`approve` / :func:`reject` (naming a configured approver; a plain ``state.approve(item)``
counts as ``protect(..., approver=...)`` or the unaccountable ``human``), then resume with
``Runner.run(agent, state)``: only the approved call runs, once. An SDK approval counts only for
the exact call the run paused on (``always_approve=True`` does not approve later calls: those are
refused with the approval message and stay pending for ``aiam approvals approve``).

Inside a tool, :func:`scoped` filters retrieved memory items by the run's grant
(:meth:`Guard.filter_memory`).

What it must never do: run a tool without an ``allow`` decision for that exact call or with
arguments other than the checked copy; hand the model unscreened output; let a sub-agent run
with its parent's identity; put a token in a message or a log line; turn a refusal into a crash.

No escape for agents nobody protected: importing this module makes ``Agent.get_all_tools``
(which the SDK calls before every turn and on resume) refuse, with :class:`ConfigurationError`,
an unprotected agent while an execution identity is in scope (a token bound with ``bind`` /
``project.delegate``, the token bound around a guarded tool's body, or a token in the run
context): ``Runner.run(other_agent)`` inside a guarded tool stops at its first turn instead of
calling tools unchecked. Runs with no identity in scope are left alone.

Known limits: an agent subclass whose ``get_all_tools`` does not call the SDK's own is not
covered by that check. Which call a run paused
on, and who answered it, is kept in this process: a ``RunState`` resumed in another process gets
the approval message for that call, whose request stays pending (``aiam approvals approve``, then
the model's retry runs). An allowed call waits at most 120 s between ``needs_approval``
and ``on_invoke_tool`` (the SDK's input guardrails and hooks run in between), then is cancelled.

Private SDK names used (openai-agents 0.24, each checked by the tests): the tool invoker
``_FailureHandlingFunctionToolInvoker`` (the guard runs *inside* the SDK's failure handler, so a
tool that raises is settled as ``error``), ``ToolContext._function_tool_arguments`` (arguments
the SDK prepared from the model's string; the tool runs with the checked copy instead) and
``RunContextWrapper._approvals`` (the one object a run shares with its tool contexts and hooks).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import logging
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar, cast

from agentic_iam.errors import MissingExtraError

try:
    from agents.agent import Agent
    from agents.handoffs import Handoff
    from agents.items import ModelResponse, ToolApprovalItem
    from agents.lifecycle import AgentHooks, RunHooks
    from agents.run_context import RunContextWrapper
    from agents.run_state import RunState
    from agents.tool import FunctionTool, _FailureHandlingFunctionToolInvoker
    from agents.tool_context import ToolContext
    from agents.tracing import get_current_span, get_current_trace
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    _missing = (exc.name or "agents").split(".")[0]
    raise MissingExtraError("openai-agents",
                            "openai-agents" if _missing == "agents" else _missing) from exc

from agentic_iam.core.binding import bind, current_token
from agentic_iam.core.broker import DelegationBroker
from agentic_iam.core.decision import ReasoningContext, ToolCall
from agentic_iam.core.guard import Guard
from agentic_iam.core.mediation import ApprovalAnswer, Mediated
from agentic_iam.core.memory import MemoryFiltered
from agentic_iam.core.tokens import ExecutionToken
from agentic_iam.errors import ConfigurationError

__all__ = ["IAMRunContext", "IAMRunHooks", "approve", "protect", "reject", "scoped"]

log = logging.getLogger("agentic_iam.integrations.openai_agents")

FRAMEWORK = "openai_agents"
TokenLike = ExecutionToken | str
T = TypeVar("T")
_STARTS_WITHIN_S = 120.0
"""How long an allowed call may wait between ``needs_approval`` and ``on_invoke_tool`` (the
SDK's input guardrails and hooks run in between); then it is cancelled, never run unchecked."""
_KEPT = 4096
_SCOPE: ContextVar[tuple[Guard, TokenLike | None] | None] = ContextVar("aiam_oa_scope",
                                                                        default=None)
_SUBRUN: ContextVar[list[bool] | None] = ContextVar("aiam_oa_subrun", default=None)
"""Set by an ``as_tool`` invocation: the sub-run appends to it when it reaches its final output."""
_PAUSED: OrderedDict[str, tuple[Guard, str | None]] = OrderedDict()
"""call id → (Guard, approval id) of the calls a run paused on (for :func:`reject`)."""
_ANSWERS: OrderedDict[str, ApprovalAnswer] = OrderedDict()
"""call id → the answer given with :func:`approve`."""


@dataclass(eq=False)
class IAMRunContext:
    """The identity of one run: ``Runner.run(agent, input, context=IAMRunContext(token))``."""

    token: TokenLike | None
    """The execution token of the run (``None``: every call is refused, and recorded)."""
    user_context: Any = None
    """The application's own context object, for its tools."""
    end_on_finish: bool = True
    """End the execution when the run produces its final output (``False``: a conversation of
    several runs; end it yourself)."""


class IAMRunHooks(RunHooks[Any]):
    """Deprecated: code written for the previous adapter passed ``hooks=IAMRunHooks(guard)``.
    The guarded agents' own hooks now capture reasoning, LLM usage and the user's request in
    every run (``as_tool`` sub-runs too), so these add nothing; subclass ``RunHooks`` instead."""

    def __init__(self, guard: Guard | None = None) -> None:
        self.guard = guard


def _context_token(context: object) -> TokenLike | None:
    token = context.token if isinstance(context, IAMRunContext) \
        else getattr(context, "aiam_token", None)
    return token if isinstance(token, (str, ExecutionToken)) and token else None


def _with_token(context: object, token: TokenLike) -> object:
    """A copy of ``context`` carrying ``token`` (contexts without a token slot stay as they are:
    the token is bound with :func:`bind` instead)."""
    if isinstance(context, IAMRunContext):
        return IAMRunContext(token, context.user_context, end_on_finish=True)
    if _context_token(context) is None:
        return context
    child = copy.copy(context)
    setattr(child, "aiam_token", token)  # noqa: B010 - the documented attribute
    return child


def _install_sentinel() -> None:
    """Make ``Agent.get_all_tools`` refuse an unprotected agent while an execution identity is in
    scope (idempotent, process-wide).

    The SDK asks every agent for its tools before each turn and on resume, so an agent nobody
    protected (run by hand inside a guarded tool, or inside a ``delegate`` block) stops at its
    first turn instead of calling tools unchecked. Runs without a token are unaffected.
    """
    original = Agent.get_all_tools
    if getattr(original, "_aiam_sentinel", False):
        return

    async def get_all_tools(self: Agent[Any], run_context: RunContextWrapper[Any]) -> list[Any]:
        if getattr(type(self), "_aiam_protection", None) is None and (
                current_token() is not None
                or _context_token(getattr(run_context, "context", None)) is not None):
            raise ConfigurationError(
                f"agent `{self.name}` runs under an execution identity but was never "
                f"protected, so its tools would run unchecked: guard it with protect(...)")
        return await original(self, run_context)

    setattr(get_all_tools, "_aiam_sentinel", True)  # noqa: B010
    Agent.get_all_tools = get_all_tools  # type: ignore[method-assign,assignment]


def _raw(token: TokenLike) -> str:
    return token.token if isinstance(token, ExecutionToken) else token


def _keep(table: OrderedDict[str, Any], key: str, value: Any) -> None:
    table[key] = value
    while len(table) > _KEPT:
        table.popitem(last=False)


def _arguments(raw: str | None) -> Mapping[str, Any]:
    """The model's arguments. Anything but a JSON object goes to the Guard as it is, which
    refuses it (``arguments.invalid``); duplicate keys or NaN need no check here because the tool
    runs with the Guard's re-serialized checked copy, never with this string."""
    try:
        return cast(Mapping[str, Any], json.loads(raw or "{}"))
    except ValueError:
        return cast(Mapping[str, Any], raw)


class _Pause(Exception):
    """Raised by ``ask`` when a human must answer first (``args[0]``: the approval id)."""


class _NotStarted(Exception):
    """An allowed call whose tool the SDK never started (the mediation cancels it)."""


@dataclass(eq=False)
class _Parked:
    """A mediation started in ``needs_approval``, waiting for ``on_invoke_tool`` to run it."""

    task: asyncio.Future[Mediated[Any] | None]
    gate: asyncio.Future[dict[str, Any]]
    output: asyncio.Future[Any]
    token: TokenLike | None
    started: list[bool]
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Run:
    """What the adapter keeps for one SDK run (never shown to the model)."""

    children: dict[tuple[str, str], TokenLike | None] = field(default_factory=dict)
    asked: dict[str, ReasoningContext] = field(default_factory=dict)
    parked: dict[tuple[str, str], _Parked | Mediated[Any]] = field(default_factory=dict)
    """(tool, call id) → a call decided in ``needs_approval``, for its ``on_invoke_tool``."""
    observed: bool = False


def _traced(found: object, attribute: str) -> str | None:
    value = getattr(found, attribute, None)
    return value if isinstance(value, str) and value != "no-op" else None


def _input_texts(items: Iterable[Any]) -> list[str]:
    texts: list[str] = []
    for item in items:
        content = item.get("content") if isinstance(item, Mapping) and \
            item.get("role") == "user" else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content
                         if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return texts


def _asked(agent: Agent[Any], response: ModelResponse) -> ReasoningContext:
    parts: list[str] = []
    for item in response.output:
        kind = getattr(item, "type", None)
        if kind == "message":
            parts += [p.text for p in getattr(item, "content", ()) or ()
                      if isinstance(getattr(p, "text", None), str) and p.text]
        elif kind == "reasoning":
            parts += [f"(reasoning) {s.text}" for s in getattr(item, "summary", ()) or ()]
    model = agent.model if isinstance(agent.model, str) else getattr(agent.model, "model", None)
    return ReasoningContext(message="\n".join(parts) or None,
                            model=model if isinstance(model, str) else None,
                            response_id=response.response_id)


class _Hooks(AgentHooks[Any]):
    """The agent's own hooks, plus the adapter's (they fire in every run the agent takes part
    in, ``as_tool`` sub-runs included, unlike run hooks)."""

    def __init__(self, protection: _Protection, inner: Any) -> None:
        self.protection = protection
        self.inner = inner

    async def _forward(self, name: str, *args: Any, **kwargs: Any) -> None:
        if self.inner is not None:
            await getattr(self.inner, name)(*args, **kwargs)

    async def on_end(self, context: Any, agent: Any, output: Any) -> None:
        self.protection.finished(context)
        await self._forward("on_end", context, agent, output)

    async def on_llm_start(self, context: Any, agent: Any, system_prompt: Any,
                           input_items: Any) -> None:
        self.protection.observe_request(context, agent, input_items)
        await self._forward("on_llm_start", context, agent, system_prompt, input_items)

    async def on_llm_end(self, context: Any, agent: Any, response: ModelResponse) -> None:
        self.protection.record_response(context, agent, response)
        await self._forward("on_llm_end", context, agent, response)


def _forwarder(name: str) -> Callable[..., Awaitable[None]]:
    async def forward(self: _Hooks, *args: Any, **kwargs: Any) -> None:
        await self._forward(name, *args, **kwargs)

    return forward


for _name in ("on_start", "on_handoff", "on_tool_start", "on_tool_end"):
    setattr(_Hooks, _name, _forwarder(_name))


def _hooks_property() -> property:
    def get(agent: Agent[Any]) -> _Hooks:
        return _Hooks(type(agent)._aiam_protection, agent.__dict__.get("hooks"))  # type: ignore[attr-defined]

    def set_(agent: Agent[Any], value: Any) -> None:
        agent.__dict__["hooks"] = value.inner if isinstance(value, _Hooks) else value

    return property(get, set_)


@dataclass(eq=False)
class _Protection:
    guard: Guard
    broker: DelegationBroker | None
    agent_ids: dict[str, str]
    approver: str | None
    allow_unguarded_tools: bool
    _classes: dict[type, type] = field(default_factory=dict)
    _tools: dict[tuple[int, str], tuple[weakref.ref[FunctionTool], FunctionTool]] = \
        field(default_factory=dict)
    _runs: OrderedDict[int, tuple[object, _Run]] = field(default_factory=OrderedDict)
    _paused_children: OrderedDict[str, TokenLike] = field(default_factory=OrderedDict)

    # -- agents --

    def registry_id(self, agent: Agent[Any]) -> str:
        return self.agent_ids.get(agent.name, agent.name)

    def protect_agent(self, agent: Agent[Any]) -> None:
        theirs = getattr(type(agent), "_aiam_protection", None)
        if theirs is not None:
            if theirs.guard is not self.guard or theirs.broker is not self.broker:
                raise ConfigurationError(f"agent `{agent.name}` is already protected with a "
                                         f"different Guard or broker")
            return
        base = type(agent)
        guarded = self._classes.get(base)
        if guarded is None:
            async def get_all_tools(agent: Agent[Any], run_context: Any) -> list[Any]:
                return self.guard_tools(agent, await base.get_all_tools(agent, run_context))

            guarded = type(base.__name__, (base,), {
                "get_all_tools": get_all_tools, "hooks": _hooks_property(),
                "_aiam_protection": self, "__module__": base.__module__,
                "__qualname__": base.__qualname__})
            self._classes[base] = guarded
        agent.__class__ = guarded

    def guard_tools(self, agent: Agent[Any], tools: list[Any]) -> list[Any]:
        for item in agent.handoffs:  # targets are guarded before the model can hand off
            if isinstance(item, Agent):
                self.protect_agent(item)
            elif isinstance(item, Handoff):
                self.guard_handoff(item)
        agent_id = self.registry_id(agent)
        guarded: list[Any] = []
        for tool in tools:
            if isinstance(tool, FunctionTool):
                guarded.append(self.guard_tool(tool, agent_id))
            elif self.allow_unguarded_tools:
                guarded.append(tool)
            else:
                raise ConfigurationError(
                    f"tool `{getattr(tool, 'name', type(tool).__name__)}` of agent "
                    f"`{agent.name}` is a {type(tool).__name__}, which agentic-iam cannot guard; "
                    f"remove it or protect(..., allow_unguarded_tools=True)")
        return guarded

    def guard_handoff(self, item: Handoff[Any, Any]) -> None:
        ref = getattr(item, "_agent_ref", None)
        target = ref() if callable(ref) else None
        if isinstance(target, Agent):
            self.protect_agent(target)
        if getattr(item, "_aiam_guarded", False):
            return
        original = item.on_invoke_handoff

        async def on_invoke_handoff(ctx: RunContextWrapper[Any], input_json: str) -> Any:
            agent = await original(ctx, input_json)
            self.protect_agent(agent)  # a custom handoff may return any agent
            return agent

        item.on_invoke_handoff = on_invoke_handoff
        setattr(item, "_aiam_guarded", True)  # noqa: B010

    # -- tools --

    def guard_tool(self, tool: FunctionTool, agent_id: str) -> FunctionTool:
        if getattr(tool, "_aiam_guarded", None) == (id(self.guard), agent_id):
            return tool
        key = (id(tool), agent_id)
        hit = self._tools.get(key)
        if hit is not None and hit[0]() is tool:
            return hit[1]
        guarded = copy.copy(tool)  # the user's tool object stays as it was
        inner = tool.on_invoke_tool
        handled = isinstance(inner, _FailureHandlingFunctionToolInvoker)
        run = inner._invoke_tool_impl if handled else inner  # type: ignore[attr-defined]
        sub = tool._agent_instance
        if isinstance(sub, Agent):
            self.protect_agent(sub)
            impl = self.agent_tool(run, sub)
        else:
            impl = self.invoker(tool.name, agent_id, run)
            guarded.needs_approval = self.needs_approval(tool, agent_id)
        if handled:
            # Inside the SDK's failure handler: the Guard sees the raise (settled as error),
            # the model still gets the tool's configured error message.
            wrapped = _FailureHandlingFunctionToolInvoker(
                impl, inner._on_handled_error)  # type: ignore[attr-defined]
            guarded.on_invoke_tool = wrapped.__agents_bind_function_tool__(guarded)
        else:
            guarded.on_invoke_tool = impl
        setattr(guarded, "_aiam_guarded", (id(self.guard), agent_id))  # noqa: B010
        self._tools[key] = (weakref.ref(tool, lambda _: self._tools.pop(key, None)), guarded)
        return guarded

    def needs_approval(self, tool: FunctionTool, agent_id: str) -> Any:
        own = tool.needs_approval

        async def needs_approval(ctx: RunContextWrapper[Any], params: dict[str, Any],
                                 call_id: str) -> bool:
            flag = own(ctx, params, call_id) if callable(own) else own
            if await flag if inspect.isawaitable(flag) else flag:
                # The tool's own rule pauses the run: a human sees this call (its answer also
                # counts for the Guard's approval); the Guard decides when it runs.
                _keep(_PAUSED, call_id, (self.guard, None))
                return True
            return await self.begin(ctx, tool.name, call_id, params, agent_id)

        return needs_approval

    async def begin(self, ctx: RunContextWrapper[Any], name: str, call_id: str,
                    params: dict[str, Any], agent_id: str) -> bool:
        """Decide now (the SDK can pause only here); run later, in ``on_invoke_tool``."""
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[dict[str, Any]] = loop.create_future()
        output: asyncio.Future[Any] = loop.create_future()

        started: list[bool] = []

        async def run(args: dict[str, Any]) -> Any:
            gate.set_result(args)
            try:
                return await output
            except asyncio.CancelledError:  # the run was torn down (a hook or tripwire raised)
                if started:
                    raise  # the tool may have had its effect: charged
                raise _NotStarted() from None

        async def mediate() -> Mediated[Any] | None:
            try:
                return await self.mediate(ctx, token, name, call_id, params, agent_id, run, ask)
            except _NotStarted:
                return None  # cancelled by the Guard; nobody waits for this result

        def ask(payload: dict[str, Any]) -> NoReturn:
            raise _Pause(payload.get("approval_id"))

        token, key = self.token_for(ctx, agent_id), (name, call_id)
        task = asyncio.ensure_future(mediate())
        waiting: set[asyncio.Future[Any]] = {task, gate}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        state = self.run_of(ctx)
        if gate.done():
            parked = _Parked(task, gate, output, token, started)
            parked.timer = loop.call_later(_STARTS_WITHIN_S, self.expire, state, key, parked)
            state.parked[key] = parked
            return False
        error = task.exception()
        if isinstance(error, _Pause):  # the SDK pauses the run (result.interruptions)
            if error.args[0] is not None:
                _keep(_PAUSED, call_id, (self.guard, error.args[0]))
            return True
        if error is not None:
            raise error
        done = task.result()
        if done is not None:
            state.parked[key] = done
        return False

    @staticmethod
    def expire(state: _Run, key: tuple[str, str], parked: _Parked) -> None:
        if state.parked.get(key) is parked:
            del state.parked[key]
        if parked.timer is not None:
            parked.timer.cancel()
        if not parked.output.done():
            parked.output.set_exception(_NotStarted())

    def expire_all(self, ctx: RunContextWrapper[Any]) -> None:
        """The turn is over: a call decided but never started (a guardrail in front of ours
        refused it, the run stopped) is cancelled: reservation and call id are given back."""
        state = self.run_of(ctx)
        for key, parked in list(state.parked.items()):
            if isinstance(parked, _Parked):
                self.expire(state, key, parked)
            else:
                del state.parked[key]

    def invoker(self, name: str, agent_id: str,
                run: Callable[[ToolContext[Any], str], Awaitable[Any]]
                ) -> Callable[[ToolContext[Any], str], Awaitable[Any]]:
        async def invoke(ctx: ToolContext[Any], input_json: str) -> Any:
            call_id = ctx.tool_call_id
            found = self.run_of(ctx).parked.pop((name, call_id), None)
            done: Mediated[Any] | None
            if isinstance(found, _Parked):
                if found.timer is not None:
                    found.timer.cancel()
                found.started.append(True)
                try:
                    found.output.set_result(
                        await self.run_tool(run, ctx, found.gate.result(), found.token))
                except BaseException as exc:
                    found.output.set_exception(exc)
                done = await found.task
            elif found is not None:
                done = found
            else:  # resumed after a pause, or the SDK did not ask needs_approval
                token = self.token_for(ctx, agent_id)
                try:
                    done = await self.mediate(
                        ctx, token, name, call_id, _arguments(input_json), agent_id,
                        lambda args: self.run_tool(run, ctx, args, token), self.answer(call_id))
                except _Pause as pause:  # no SDK pause is possible here; it stays pending
                    return (f"The call to `{name}` needs a human's approval for this exact call "
                            f"(request `{pause.args[0]}`, pending) and was not run.")
            if done is None:  # cancelled before it started (cannot happen once started)
                return f"The call to `{name}` was not run."
            return done.value if done.status in ("ran", "replayed") else done.refusal

        return invoke

    def answer(self, call_id: str) -> Callable[[dict[str, Any]], ApprovalAnswer]:
        def ask(payload: dict[str, Any]) -> ApprovalAnswer:
            paused = _PAUSED.get(call_id)
            if paused is None or paused[1] not in (None, payload.get("approval_id")):
                raise _Pause(payload.get("approval_id"))  # no human saw this exact call
            del _PAUSED[call_id]
            return _ANSWERS.pop(call_id, None) or ApprovalAnswer(True, self.approver or "human")

        return ask

    async def run_tool(self, run: Callable[[ToolContext[Any], str], Awaitable[Any]],
                       ctx: ToolContext[Any], args: dict[str, Any],
                       token: TokenLike | None) -> Any:
        ctx._function_tool_arguments = None  # prepared from the model's string, not ours
        reset, unmarked = _SCOPE.set((self.guard, token)), _SUBRUN.set(None)
        try:
            with bind(token) if token is not None else nullcontext():
                return await run(ctx, json.dumps(args, ensure_ascii=False))
        finally:
            _SUBRUN.reset(unmarked)
            _SCOPE.reset(reset)

    async def mediate(self, ctx: RunContextWrapper[Any], token: TokenLike | None, name: str,
                      call_id: str, args: Mapping[str, Any], agent_id: str,
                      run: Callable[[dict[str, Any]], Awaitable[Any]],
                      ask: Callable[[dict[str, Any]], object]) -> Mediated[Any]:
        asked = self.run_of(ctx).asked.get(call_id, ReasoningContext())
        reasoning = ReasoningContext(
            asked.message, asked.model, response_id=asked.response_id,
            trace_id=_traced(get_current_trace(), "trace_id"),
            span_id=_traced(get_current_span(), "span_id"))
        call = ToolCall(name, args, call_id=call_id, reasoning=reasoning, framework=FRAMEWORK)
        return await self.guard.amediate(token, call, run, ask=ask, agent_id=agent_id,
                                         paused=lambda exc: isinstance(exc, _NotStarted))

    def agent_tool(self, original: Callable[[ToolContext[Any], str], Awaitable[Any]],
                   sub: Agent[Any]) -> Callable[[ToolContext[Any], str], Awaitable[Any]]:
        """``agent.as_tool(...)``: the nested run gets its own child identity."""
        async def invoke(ctx: ToolContext[Any], input_json: str) -> Any:
            target = self.registry_id(sub)
            parent = _context_token(ctx.context) or current_token()
            key = f"{_raw(parent) if parent else ''}:{ctx.tool_call_id}"
            try:  # a sub-run that paused for a human resumes under the same child
                child = self._paused_children.pop(key, None) or self.child(parent, target)
            except Exception as exc:  # refused: the model reads why
                return (f"The delegation to `{target}` was refused by the access layer and did "
                        f"not happen. Reason: {str(exc).rstrip('.')}.")
            nested = copy.copy(ctx)
            nested.context = _with_token(ctx.context, child)
            finished: list[bool] = []
            reset = _SUBRUN.set(finished)
            try:
                with bind(child):
                    return await original(nested, input_json)
            except BaseException:
                finished.append(True)  # a failed sub-run is over too
                raise
            finally:
                _SUBRUN.reset(reset)
                if child is not parent and finished:
                    self.end(child)
                elif child is not parent:
                    _keep(self._paused_children, key, child)

        return invoke

    # -- identities --

    def run_of(self, ctx: RunContextWrapper[Any]) -> _Run:
        shared = ctx._approvals  # shared by a run's wrapper, its tool contexts and hooks
        found = self._runs.get(id(shared))
        if found is None or found[0] is not shared:
            found = (shared, _Run())
            self._runs[id(shared)] = found
            while len(self._runs) > _KEPT:
                self._runs.popitem(last=False)
        return found[1]

    def owner(self, token: TokenLike) -> str | None:
        try:
            return self.guard.verifier.verify(_raw(token), check_revocation=False).agent_id
        except Exception:  # the Guard refuses it, and records why
            return None

    def child(self, parent: TokenLike | None, agent_id: str) -> TokenLike:
        """``parent`` itself when it is ``agent_id``'s, else a child minted by the broker."""
        if parent is None:
            raise ConfigurationError("this run carries no execution identity")
        if self.owner(parent) in (agent_id, None):
            return parent
        if self.broker is None:
            raise ConfigurationError("a sub-agent needs its own identity: protect(..., broker=)")
        return self.broker.subdelegate_for(parent, agent_id)

    def token_for(self, ctx: RunContextWrapper[Any], agent_id: str) -> TokenLike | None:
        found = _context_token(ctx.context) or current_token()
        if found is None or self.owner(found) in (agent_id, None):
            return found
        children = self.run_of(ctx).children
        key = (_raw(found), agent_id)
        if key not in children:
            try:
                children[key] = self.child(found, agent_id)
            except Exception as exc:  # the Guard refuses the parent's token (agent_mismatch)
                log.warning("no identity for sub-agent `%s`: %s", agent_id, type(exc).__name__)
                children[key] = None
        return children[key] or found

    def end(self, token: TokenLike) -> None:
        try:
            self.guard.end_execution(token)
        except Exception as exc:  # it still expires; the run's work is done
            log.warning("could not end an execution: %s", type(exc).__name__)

    def finished(self, ctx: RunContextWrapper[Any]) -> None:
        """The run produced its final output: its sub-agent identities end (and its own, for an
        :class:`IAMRunContext` that did not opt out)."""
        self.expire_all(ctx)
        marker = _SUBRUN.get()
        if marker is not None:
            marker.append(True)
        state = self.run_of(ctx)
        for child in [c for c in state.children.values() if c is not None]:
            self.end(child)
        state.children.clear()
        # An agent started from inside a guarded tool may share its parent's context: only a
        # run that is not inside a tool ends the context's own token.
        if isinstance(ctx.context, IAMRunContext) and ctx.context.end_on_finish \
                and ctx.context.token is not None and _SCOPE.get() is None:
            self.end(ctx.context.token)

    def observe_request(self, ctx: RunContextWrapper[Any], agent: Agent[Any],
                        items: Iterable[Any]) -> None:
        """The user's request, for argument provenance (the Guard ignores it for a child)."""
        self.expire_all(ctx)
        state = self.run_of(ctx)
        if state.observed or isinstance(ctx, ToolContext) or _SCOPE.get() is not None:
            return  # once per run; a sub-run's input (as_tool, inside a tool) is model-written
        state.observed = True
        token = self.token_for(ctx, self.registry_id(agent))
        if token is None:
            return
        try:
            self.guard.observe(token, _input_texts(items), "request")
        except Exception as exc:  # provenance only: unknown targets stay unknown
            log.warning("could not record the user's request: %s", type(exc).__name__)

    def record_response(self, ctx: RunContextWrapper[Any], agent: Agent[Any],
                        response: ModelResponse) -> None:
        asked = _asked(agent, response)
        state = self.run_of(ctx)
        for item in response.output:
            call_id = getattr(item, "call_id", None)
            if isinstance(call_id, str):
                state.asked[call_id] = asked
        token = self.token_for(ctx, self.registry_id(agent))
        usage = response.usage
        if token is not None and (usage.input_tokens or usage.output_tokens):
            try:
                self.guard.charge_usage(token, input_tokens=usage.input_tokens,
                                        output_tokens=usage.output_tokens, model=asked.model,
                                        framework=FRAMEWORK)
            except Exception as exc:  # accounting; the next tool call is checked anyway
                log.warning("could not charge LLM usage: %s", type(exc).__name__)


def protect(agent: Agent[Any], guard: Guard, *, broker: DelegationBroker | None = None,
            agent_id: str | None = None, agent_ids: Mapping[str, str] | None = None,
            approver: str | None = None, allow_unguarded_tools: bool = False) -> Agent[Any]:
    """Guard ``agent`` (and every agent it reaches at run time); returns ``agent`` itself.

    ``agent_id`` is the registry id ``agent`` runs as (default: its name); ``agent_ids`` maps
    other SDK agent names (handoff targets, ``as_tool`` agents) to registry ids. ``broker`` mints
    the sub-agents' identities (without it their calls are refused). ``approver``: the configured
    approver a plain ``state.approve(item)`` counts as. Protecting again with the same Guard and
    broker does nothing; with another one raises :class:`ConfigurationError`.
    """
    ids = dict(agent_ids or {})
    if agent_id is not None:
        ids[agent.name] = agent_id
    _Protection(guard, broker, ids, approver, allow_unguarded_tools).protect_agent(agent)
    return agent


def _call_id(item: ToolApprovalItem) -> str:
    raw = item.raw_item
    call_id = raw.get("call_id") if isinstance(raw, Mapping) else getattr(raw, "call_id", None)
    if not isinstance(call_id, str):
        raise ConfigurationError("this approval item has no call id")
    return call_id


def approve(state: RunState[Any], item: ToolApprovalItem, *, approver: str) -> None:
    """Approve the paused call ``item`` as ``approver`` (a configured approver id); resume with
    ``Runner.run(agent, state)``. The Guard records the approval when the call runs."""
    _keep(_ANSWERS, _call_id(item), ApprovalAnswer(True, approver))
    state.approve(item)


def reject(state: RunState[Any], item: ToolApprovalItem, *, approver: str,
           message: str | None = None) -> None:
    """Reject the paused call ``item`` as ``approver``: recorded by the Guard now."""
    paused = _PAUSED.pop(_call_id(item), None)
    if paused is not None and paused[1] is not None:
        try:
            paused[0].resolve_approval(paused[1], approved=False, approver=approver)
        except Exception as exc:  # the call stays refused either way
            log.warning("could not record the rejection: %s", type(exc).__name__)
    state.reject(item, rejection_message=message)


def scoped(items: Iterable[T], *, scope_of: Callable[[T], object],
           id_of: Callable[[T], object], query: str | None = None) -> MemoryFiltered[T]:
    """Inside a guarded tool: the retrieved ``items`` the run's grant may read (by memory scope);
    a revoked or expired run reads nothing. Records ``memory.retrieved``."""
    found = _SCOPE.get()
    if found is None:
        raise ConfigurationError("scoped() works inside a tool of a protected agent")
    guard, token = found
    return guard.filter_memory(token, items, scope_of=scope_of, id_of=id_of, query=query,
                               framework=FRAMEWORK)


_install_sentinel()
