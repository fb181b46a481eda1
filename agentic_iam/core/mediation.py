"""The one mediation path (ARCHITECTURE §8): authorize → approval → run → screen → complete.

Every enforcement point — each framework adapter, the HTTP gateway, the MCP gateway — calls
:meth:`Guard.mediate` (or :meth:`Guard.amediate`) and only translates its framework's call and
result types and its native way of refusing or pausing. What happens here, once:

1. **Authorize** the call (a run without a token is decided and recorded too: refused).
2. **Approval**: the Guard's own approver answers inside ``authorize``; otherwise ``ask`` — the
   framework's way of asking a human (a LangGraph ``interrupt``, a workflow wait) — gets the
   :func:`approval_payload` and returns the answer, which is recorded against the accountable
   approver before the call is authorized again; or it raises the framework's pause exception,
   which propagates (nothing ran, nothing to settle). Without ``ask`` the call is refused with the
   approval message and the request stays pending.
3. **Run** the tool with the Guard's checked copy of the arguments. An exception that means
   "paused, will be replayed" cancels the call (reservation and call id given back); any other
   exception is charged as an error and re-raised: the tool may have had its side effect.
4. **Screen** every piece of text the model will see; output that cannot be screened is withheld.
5. **Complete**: settle the budget and record the result (``error`` when the tool reported one).

Exactly once: a call id that already ran in this execution with the same tool and arguments is
not run again; the earlier outcome is returned (status ``replayed``). Frameworks replay the sibling
calls of a model turn when a paused run resumes, and a refund must not be paid twice. A replay that
arrives while the first mediation of that call is still in flight (an async framework resumes
before a sibling's tool has returned) waits for it, up to :data:`IN_FLIGHT_WAIT` seconds, and then
returns its outcome; if the first one did not finish with a result, the replay is decided afresh
(and refused as ``call.reused`` when the id was spent). All of this is per process: a resume in
another process is decided afresh.

What it must never do: run a tool without an ``allow`` decision for that exact call, run it with
arguments other than the checked copy, hand the model unscreened output, or let an error become
an allow.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from agentic_iam.core.approvals import ApproverLike, call_binding
from agentic_iam.core.decision import Decision, ToolCall
from agentic_iam.core.identity import Human
from agentic_iam.errors import AgenticIAMError

if TYPE_CHECKING:
    from agentic_iam.core.guard import Guard, Screened, TokenLike

__all__ = [
    "ApprovalAnswer",
    "Mediated",
    "approval_payload",
    "current_decision",
    "parse_answer",
]

log = logging.getLogger("agentic_iam.mediation")

T = TypeVar("T")
R = TypeVar("R")

#: How many times one call may be answered and still need approval before it is refused.
APPROVAL_ROUNDS = 3
#: How many completed calls (per process) are remembered so that a replay does not run them.
_REMEMBERED_RESULTS = 4096
#: How long (seconds) a replay waits for the first mediation of the same call to finish.
IN_FLIGHT_WAIT = 60.0

NO_IDENTITY = ("The call to `{tool}` was refused by the access layer and was not run. Reason: "
               "this run carries no execution identity.")
SCREEN_FAILED = "[agentic-iam: tool output blocked: screening failed]"

Status = Literal["ran", "blocked", "refused", "replayed"]


@dataclass(frozen=True)
class ApprovalAnswer:
    """A human's answer to an approval request."""

    approved: bool
    """Whether the call may run."""
    approver: ApproverLike
    """Who answered: a :class:`Human` verified by an IdP, or a configured approver id."""


@dataclass(frozen=True)
class Mediated(Generic[R]):
    """What came of one mediated call."""

    decision: Decision
    """The final decision for the call."""
    status: Status
    """``ran`` (the tool ran, ``value`` is what the model sees), ``blocked`` (the tool ran but
    its output could not be screened and is withheld), ``refused`` (the tool did not run) or
    ``replayed`` (an earlier run of this exact call; the tool did not run again)."""
    value: R | None = None
    """The screened result, for ``ran`` and ``replayed``."""
    refusal: str | None = None
    """The text for the model, for ``refused`` and ``blocked``."""
    tool_failed: bool = False
    """The tool ran and reported a failure (settled as ``error``)."""

    @property
    def ran(self) -> bool:
        """The tool ran in this mediation (its spend is charged)."""
        return self.status in ("ran", "blocked")

    @property
    def refused(self) -> bool:
        return self.status == "refused"


def parse_answer(answer: object) -> ApprovalAnswer | None:
    """An approval answer from what a framework's resume carried, or ``None`` if not one.

    Accepted: :class:`ApprovalAnswer`, ``{"approved": bool, "approver": str | Human}``, or a
    bare ``bool`` (it names nobody: the approver ``human``, which the Guard refuses unless it is
    a configured approver).
    """
    if isinstance(answer, ApprovalAnswer):
        return answer
    if isinstance(answer, bool):
        return ApprovalAnswer(answer, "human")
    if isinstance(answer, Mapping):
        approved = answer.get("approved")
        approver = answer.get("approver", "human")
        if isinstance(approver, str):
            approver = approver.strip()
        if type(approved) is bool and (isinstance(approver, Human) or
                                       (isinstance(approver, str) and approver)):
            return ApprovalAnswer(approved, approver)
    return None


def approval_payload(call: ToolCall, decision: Decision) -> dict[str, Any]:
    """What a human is shown for an approval: the call, its approval id, why. Never a token."""
    try:
        arguments = json.loads(json.dumps(dict(call.arguments), default=str))
    except (TypeError, ValueError):
        arguments = {}
    return {
        "type": "agentic_iam.approval",
        "approval_id": decision.approval_id,
        "tool": call.name,
        "call_id": decision.call_id or call.call_id,
        "arguments": arguments,
        "action": decision.action,
        "execution_id": decision.execution_id,
        "reason": decision.reasons[0].message if decision.reasons else "",
        "policy_ids": list(decision.policy_ids),
        "resume_with": {"approved": "bool", "approver": "str"},
    }


_RUNNING: ContextVar[Decision | None] = ContextVar("agentic_iam_running", default=None)


def current_decision() -> Decision | None:
    """The allowed decision whose tool is running in this context, or ``None``.

    Set around ``run`` by :meth:`Guard.mediate`; a tool wrapper that finds no decision (or one
    for another tool or other arguments) is running outside the mediation path.
    """
    return _RUNNING.get()


@contextmanager
def _running(decision: Decision) -> Iterator[None]:
    reset = _RUNNING.set(decision)
    try:
        yield
    finally:
        _RUNNING.reset(reset)


class Mediator:
    """The mediation path for one Guard (the Guard's ``mediate`` and ``amediate``)."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self._results: OrderedDict[tuple[str, str], tuple[str, Mediated[Any]]] = OrderedDict()
        self._in_flight: dict[tuple[str, str], tuple[object, threading.Event]] = {}
        self._lock = threading.Lock()

    # --- exactly once ---------------------------------------------------------------------

    def _replay_key(self, token: TokenLike | None, call: ToolCall) -> tuple[str, str, str] | None:
        """(execution, call id, call binding) of a call with a framework call id, or None."""
        if token is None or not call.call_id:
            return None
        try:
            identity = self.guard._identity(token)
            binding = call_binding(identity.execution_id, call.name, call.arguments)
        except Exception:  # authorize decides (and records) what is wrong with it
            return None
        return identity.key, call.call_id, binding

    def _replayed(self, key: tuple[str, str, str] | None) -> Mediated[Any] | None:
        if key is None or not self._results:
            return None
        with self._lock:
            found = self._results.get(key[:2])
        if found is None or found[0] != key[2]:
            return None  # a reused id for another call: authorize refuses it (`call.reused`)
        earlier = found[1]
        log.info("call %s already ran in this execution; its earlier result is returned",
                 key[1])
        return Mediated(earlier.decision, "replayed", earlier.value, earlier.refusal,
                        earlier.tool_failed)

    @staticmethod
    def _owner() -> object:
        """Who runs a mediation: the asyncio task, else the thread (a nested mediation of the
        same call by its own owner must not wait for itself)."""
        try:
            task = asyncio.current_task()
        except RuntimeError:
            task = None
        return task if task is not None else threading.get_ident()

    def _claim(self, key: tuple[str, str, str] | None) -> threading.Event | None:
        """Mark this call in flight. ``None``: claimed (or nothing to claim); an event: another
        owner's mediation of the same call id is in flight; wait for it."""
        if key is None:
            return None
        owner = self._owner()
        with self._lock:
            held = self._in_flight.get(key[:2])
            if held is None:
                self._in_flight[key[:2]] = (owner, threading.Event())
                return None
        return None if held[0] == owner else held[1]

    def _release(self, key: tuple[str, str, str] | None) -> None:
        if key is None:
            return
        owner = self._owner()
        with self._lock:
            held = self._in_flight.get(key[:2])
            if held is None or held[0] != owner:
                return
            del self._in_flight[key[:2]]
        held[1].set()

    def _look(self, key: tuple[str, str, str] | None) -> Mediated[Any] | threading.Event | None:
        """The earlier outcome of this call; else the event of another owner's mediation of
        it that is in flight (wait, then look again); else ``None``: claimed, decide it."""
        replayed = self._replayed(key)
        return replayed if replayed is not None else self._claim(key)

    def _begin(self, key: tuple[str, str, str] | None) -> tuple[Mediated[Any] | None, bool]:
        """(earlier outcome, claimed) for a sync mediation."""
        found = self._look(key)
        if not isinstance(found, threading.Event):
            return found, found is None
        if not found.wait(IN_FLIGHT_WAIT):
            log.warning("call %s is still in flight after %.0f s; deciding it afresh",
                        key[1] if key else "", IN_FLIGHT_WAIT)
        return self._replayed(key), False

    async def _abegin(self, key: tuple[str, str, str] | None) -> tuple[Mediated[Any] | None,
                                                                     bool]:
        """(earlier outcome, claimed) for an async mediation (waits without blocking the
        loop: the call in flight may run on this very loop)."""
        found = self._look(key)
        if not isinstance(found, threading.Event):
            return found, found is None
        deadline = time.monotonic() + IN_FLIGHT_WAIT
        delay = 0.001
        while not found.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self._replayed(key), False

    def _remember(self, key: tuple[str, str, str] | None, done: Mediated[Any]) -> None:
        if key is None:
            return
        with self._lock:
            self._results[key[:2]] = (key[2], done)
            while len(self._results) > _REMEMBERED_RESULTS:
                self._results.popitem(last=False)

    # --- decide (with the approval loop) ------------------------------------------------

    def _decide_first(self, token: TokenLike | None, call: ToolCall,
                      agent_id: str | None) -> Decision:
        return self.guard.authorize(token if token is not None else "", call, agent_id=agent_id)

    def _after_answer(self, token: TokenLike | None, call: ToolCall, decision: Decision,
                      answer: object, agent_id: str | None) -> Decision | str:
        parsed = parse_answer(answer)
        if parsed is None:
            return (f"The approval answer for `{call.name}` was not understood, so the call "
                    f"was not run.")
        try:
            self.guard.resolve_approval(decision.approval_id or "", approved=parsed.approved,
                                        approver=parsed.approver)
        except AgenticIAMError as exc:
            log.warning("approval %s could not be recorded: %s", decision.approval_id, exc)
            return (f"The approval for `{call.name}` could not be recorded ({exc}), so the "
                    f"call was not run.")
        if not parsed.approved:
            return (f"A human declined the call to `{call.name}`; it was not run. Do not retry "
                    f"the same call.")
        return self._decide_first(token, call, agent_id)

    @staticmethod
    def _refusal(token: TokenLike | None, decision: Decision) -> Mediated[Any]:
        text = NO_IDENTITY.format(tool=decision.tool) if token is None \
            else decision.model_message()
        return Mediated(decision, "refused", refusal=text)

    def _needs_asking(self, token: TokenLike | None, decision: Decision, rounds: int,
                      has_ask: bool) -> Mediated[Any] | None:
        """None when ``ask`` should be called for this decision, else the refusal."""
        if not has_ask or decision.approval_id is None or token is None:
            return self._refusal(token, decision)
        if rounds >= APPROVAL_ROUNDS:
            return Mediated(decision, "refused",
                            refusal=f"The call to `{decision.tool}` still needs approval after "
                                    f"{rounds} answers and was not run.")
        return None

    # --- after the run ------------------------------------------------------------------

    def _finish(self, decision: Decision, output: Any,
                screen: Callable[[Any, Callable[[object], Screened]], Any] | None,
                failed: Callable[[Any], bool] | None) -> Mediated[Any]:
        guard = self.guard
        tool_failed = False
        try:
            tool_failed = bool(failed(output)) if failed is not None else False
            if screen is None:
                value: Any = guard.screen(decision, output).text
            else:
                value = screen(output, lambda part: guard.screen(decision, part))
        except Exception as exc:  # output that cannot be screened is withheld
            log.warning("screening `%s` failed: %s", decision.tool, type(exc).__name__)
            guard.complete(decision, "error")
            return Mediated(decision, "blocked", refusal=SCREEN_FAILED, tool_failed=tool_failed)
        guard.complete(decision, "error" if tool_failed else "success")
        return Mediated(decision, "ran", value=value, tool_failed=tool_failed)

    def _raised(self, decision: Decision, exc: BaseException,
                paused: Callable[[BaseException], bool] | None) -> None:
        try:
            is_pause = paused is not None and paused(exc)
        except Exception:  # cannot tell: the tool may have had its effect; charge it
            is_pause = False
        if is_pause:
            self.guard.cancel(decision)
        else:
            self.guard.complete(decision, "error")

    # --- the two paths ------------------------------------------------------------------

    def mediate(self, token: TokenLike | None, call: ToolCall,
                run: Callable[[dict[str, Any]], T], *,
                screen: Callable[[T, Callable[[object], Screened]], R] | None = None,
                failed: Callable[[T], bool] | None = None,
                ask: Callable[[dict[str, Any]], object] | None = None,
                paused: Callable[[BaseException], bool] | None = None,
                agent_id: str | None = None) -> Mediated[R]:
        key = self._replay_key(token, call)
        earlier, claimed = self._begin(key)
        if earlier is not None:
            return earlier
        try:
            return self._mediate(token, call, key, run, screen=screen, failed=failed, ask=ask,
                                 paused=paused, agent_id=agent_id)
        finally:
            if claimed:
                self._release(key)

    def _mediate(self, token: TokenLike | None, call: ToolCall,
                 key: tuple[str, str, str] | None, run: Callable[[dict[str, Any]], T], *,
                 screen: Callable[[T, Callable[[object], Screened]], R] | None,
                 failed: Callable[[T], bool] | None,
                 ask: Callable[[dict[str, Any]], object] | None,
                 paused: Callable[[BaseException], bool] | None,
                 agent_id: str | None) -> Mediated[R]:
        decision = self._decide_first(token, call, agent_id)
        rounds = 0
        while decision.outcome == "approval_required":
            refused = self._needs_asking(token, decision, rounds, ask is not None)
            if refused is not None:
                return refused
            assert ask is not None
            answer = ask(approval_payload(call, decision))
            after = self._after_answer(token, call, decision, answer, agent_id)
            if isinstance(after, str):
                return Mediated(decision, "refused", refusal=after)
            decision, rounds = after, rounds + 1
        if not decision.allowed:
            return self._refusal(token, decision)
        try:
            with _running(decision):
                output = run(dict(decision.arguments))
        except BaseException as exc:
            self._raised(decision, exc, paused)
            raise
        done: Mediated[R] = self._finish(decision, output, screen, failed)
        self._remember(key, done)
        return done

    async def amediate(self, token: TokenLike | None, call: ToolCall,
                       run: Callable[[dict[str, Any]], Awaitable[T]], *,
                       screen: Callable[[T, Callable[[object], Screened]], R] | None = None,
                       failed: Callable[[T], bool] | None = None,
                       ask: Callable[[dict[str, Any]], object] | None = None,
                       paused: Callable[[BaseException], bool] | None = None,
                       agent_id: str | None = None) -> Mediated[R]:
        key = self._replay_key(token, call)
        earlier, claimed = await self._abegin(key)
        if earlier is not None:
            return earlier
        try:
            return await self._amediate(token, call, key, run, screen=screen, failed=failed,
                                        ask=ask, paused=paused, agent_id=agent_id)
        finally:
            if claimed:
                self._release(key)

    async def _amediate(self, token: TokenLike | None, call: ToolCall,
                        key: tuple[str, str, str] | None,
                        run: Callable[[dict[str, Any]], Awaitable[T]], *,
                        screen: Callable[[T, Callable[[object], Screened]], R] | None,
                        failed: Callable[[T], bool] | None,
                        ask: Callable[[dict[str, Any]], object] | None,
                        paused: Callable[[BaseException], bool] | None,
                        agent_id: str | None) -> Mediated[R]:
        decision = self._decide_first(token, call, agent_id)
        rounds = 0
        while decision.outcome == "approval_required":
            refused = self._needs_asking(token, decision, rounds, ask is not None)
            if refused is not None:
                return refused
            assert ask is not None
            answer = ask(approval_payload(call, decision))
            if inspect.isawaitable(answer):
                answer = await answer
            after = self._after_answer(token, call, decision, answer, agent_id)
            if isinstance(after, str):
                return Mediated(decision, "refused", refusal=after)
            decision, rounds = after, rounds + 1
        if not decision.allowed:
            return self._refusal(token, decision)
        try:
            with _running(decision):
                output = await run(dict(decision.arguments))
        except BaseException as exc:
            self._raised(decision, exc, paused)
            raise
        done: Mediated[R] = self._finish(decision, output, screen, failed)
        self._remember(key, done)
        return done
