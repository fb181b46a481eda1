"""The one mediation path (Guard.mediate / amediate): every adapter and gateway relies on it."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from agentic_iam.core.decision import ToolCall
from agentic_iam.core.mediation import (
    ApprovalAnswer,
    approval_payload,
    current_decision,
    parse_answer,
)
from tests.conftest import Env


class Pause(Exception):
    """Stands in for a framework's pause exception (LangGraph's GraphInterrupt)."""


def refund(amount: int, call_id: str = "call-1") -> ToolCall:
    return ToolCall("create_refund", {"amount": amount, "currency": "USD", "account": "ACC-1001"},
                    call_id=call_id)


def outcomes(env: Env, event_type: str = "tool_call.decided") -> list[tuple[str, str]]:
    out = []
    for event in env.sink.events:
        if event.event_type == event_type:
            if event.decision is not None:
                out.append((event.call_id or "", event.decision.outcome))
            elif event.result is not None:
                out.append((event.call_id or "", event.result.outcome))
    return out


class Tool:
    def __init__(self, result: object = "refunded") -> None:
        self.calls: list[dict[str, Any]] = []
        self.result = result

    def __call__(self, arguments: dict[str, Any]) -> object:
        self.calls.append(arguments)
        assert current_decision() is not None and current_decision().arguments == arguments
        return self.result


def test_allowed_call_runs_once_with_checked_arguments_and_is_recorded(env: Env) -> None:
    token = env.refund_token()
    tool = Tool()
    done = env.guard.mediate(token, refund(50), tool)
    assert done.status == "ran" and done.value == "refunded" and done.refusal is None
    assert tool.calls == [{"amount": 50, "currency": "USD", "account": "ACC-1001"}]
    assert outcomes(env) == [("call-1", "allow")]
    assert outcomes(env, "tool_call.completed") == [("call-1", "success")]
    assert current_decision() is None


def test_denied_call_never_runs_and_the_model_gets_the_reason(env: Env) -> None:
    tool = Tool()
    done = env.guard.mediate(env.refund_token(), refund(500), tool)
    assert done.status == "refused" and tool.calls == []
    assert done.refusal is not None and "must be <= 100" in done.refusal
    assert outcomes(env) == [("call-1", "deny")]


def test_a_run_without_identity_is_decided_and_recorded(env: Env) -> None:
    tool = Tool()
    done = env.guard.mediate(None, refund(5), tool)
    assert done.status == "refused" and tool.calls == []
    assert done.refusal is not None and "carries no execution identity" in done.refusal
    assert outcomes(env) == [("call-1", "deny")]


def test_a_token_of_another_agent_is_refused(env: Env) -> None:
    tool = Tool()
    done = env.guard.mediate(env.refund_token(), refund(5), tool, agent_id="billing-agent")
    assert done.status == "refused" and tool.calls == []
    assert done.decision.reasons[0].code == "identity.agent_mismatch"
    assert outcomes(env) == [("call-1", "deny")]


def test_a_tool_that_raises_is_charged_as_an_error(env: Env) -> None:
    token = env.refund_token()
    before = env.store.remaining(token.identity.key, token.identity.budget.as_dict())

    def boom(arguments: dict[str, Any]) -> object:
        raise TimeoutError("gateway timeout after the payment was sent")

    with pytest.raises(TimeoutError):
        env.guard.mediate(token, refund(50), boom)
    after = env.store.remaining(token.identity.key, token.identity.budget.as_dict())
    assert after["tool_calls"] == before["tool_calls"] - 1
    assert outcomes(env, "tool_call.completed") == [("call-1", "error")]


def test_a_paused_tool_gives_its_call_back_for_the_replay(env: Env) -> None:
    token = env.refund_token()

    def pausing(arguments: dict[str, Any]) -> object:
        raise Pause

    with pytest.raises(Pause):
        env.guard.mediate(token, refund(50), pausing, paused=lambda e: isinstance(e, Pause))
    assert outcomes(env, "tool_call.completed") == [("call-1", "cancelled")]
    tool = Tool()
    assert env.guard.mediate(token, refund(50), tool).status == "ran"
    assert len(tool.calls) == 1


def test_a_replayed_call_returns_its_earlier_result_without_running(env: Env) -> None:
    token = env.refund_token()
    tool = Tool()
    first = env.guard.mediate(token, refund(50), tool)
    again = env.guard.mediate(token, refund(50), tool)
    assert again.status == "replayed" and again.value == first.value and not again.ran
    assert len(tool.calls) == 1
    assert outcomes(env) == [("call-1", "allow")]  # nothing new decided
    # The same id for another call is not a replay: it is refused.
    other = env.guard.mediate(token, refund(60), tool)
    assert other.status == "refused"
    assert other.decision.reasons[0].code == "call.reused"
    assert len(tool.calls) == 1


def test_approval_asked_natively_runs_the_approved_call_once(env: Env) -> None:
    token = env.refund_token(max_amount=500)
    asked: list[dict[str, Any]] = []
    tool = Tool()

    def ask(payload: dict[str, Any]) -> object:
        asked.append(payload)
        return {"approved": True, "approver": "bob"}

    done = env.guard.mediate(token, refund(200), tool, ask=ask)
    assert done.status == "ran" and len(tool.calls) == 1
    assert len(asked) == 1 and asked[0]["type"] == "agentic_iam.approval"
    assert asked[0]["arguments"]["amount"] == 200 and "token" not in str(asked[0]).lower()
    assert [o for _, o in outcomes(env)] == ["approval_required", "allow"]
    kinds = [e.event_type for e in env.sink.events]
    assert "approval.granted" in kinds


def test_a_declined_approval_does_not_run(env: Env) -> None:
    tool = Tool()
    done = env.guard.mediate(env.refund_token(max_amount=500), refund(200), tool,
                             ask=lambda p: ApprovalAnswer(False, "bob"))
    assert done.status == "refused" and tool.calls == []
    assert done.refusal is not None and "declined" in done.refusal


@pytest.mark.parametrize("answer", [None, "yes", {"approved": "true", "approver": "bob"},
                                    {"approved": True, "approver": ""}])
def test_an_answer_that_is_not_one_does_not_run(env: Env, answer: object) -> None:
    tool = Tool()
    done = env.guard.mediate(env.refund_token(max_amount=500), refund(200), tool,
                             ask=lambda p: answer)
    assert done.status == "refused" and tool.calls == []


def test_the_requesting_agent_cannot_approve_itself(env: Env) -> None:
    tool = Tool()
    done = env.guard.mediate(env.refund_token(max_amount=500), refund(200), tool,
                             ask=lambda p: {"approved": True, "approver": "support-agent"})
    assert done.status == "refused" and tool.calls == []
    assert done.refusal is not None and "could not be recorded" in done.refusal


def test_a_pausing_ask_propagates_and_nothing_runs(env: Env) -> None:
    tool = Tool()

    def ask(payload: dict[str, Any]) -> object:
        raise Pause

    with pytest.raises(Pause):
        env.guard.mediate(env.refund_token(max_amount=500), refund(200), tool, ask=ask)
    assert tool.calls == []
    assert outcomes(env, "tool_call.completed") == []


def test_without_ask_an_approval_is_refused_and_stays_pending(env: Env) -> None:
    tool = Tool()
    done = env.guard.mediate(env.refund_token(max_amount=500), refund(200), tool)
    assert done.status == "refused" and tool.calls == []
    assert done.decision.outcome == "approval_required"
    assert env.guard.approvals.get(done.decision.approval_id or "")["status"] == "pending"


def test_output_that_cannot_be_screened_is_withheld_and_charged(env: Env) -> None:
    def screen(output: object, screen_text: Any) -> object:
        raise ValueError("unreadable")

    done = env.guard.mediate(env.refund_token(), refund(50), Tool(), screen=screen)
    assert done.status == "blocked" and done.value is None and done.ran
    assert done.refusal is not None and "blocked" in done.refusal
    assert outcomes(env, "tool_call.completed") == [("call-1", "error")]


def test_structured_output_is_screened_piece_by_piece(env: Env) -> None:
    secret = "sk-" + "a" * 40
    output = {"messages": ["ok", f"key {secret}"]}

    def screen(out: dict[str, list[str]], screen_text: Any) -> dict[str, list[str]]:
        return {"messages": [screen_text(m).text for m in out["messages"]]}

    done = env.guard.mediate(env.refund_token(), refund(50), Tool(output), screen=screen)
    assert done.status == "ran" and done.value is not None
    assert secret not in str(done.value)


def test_a_tool_reporting_failure_is_settled_as_error(env: Env) -> None:
    done = env.guard.mediate(env.refund_token(), refund(50), Tool("Error: declined"),
                             failed=lambda out: str(out).startswith("Error"))
    assert done.status == "ran" and done.tool_failed
    assert outcomes(env, "tool_call.completed") == [("call-1", "error")]


def test_amediate_runs_async_tools_and_async_asks(env: Env) -> None:
    token = env.refund_token(max_amount=500)
    ran: list[dict[str, Any]] = []

    async def tool(arguments: dict[str, Any]) -> str:
        assert current_decision() is not None
        ran.append(arguments)
        return "refunded"

    async def ask(payload: dict[str, Any]) -> object:
        return {"approved": True, "approver": "bob"}

    done = asyncio.run(env.guard.amediate(token, refund(200), tool, ask=ask))
    assert done.status == "ran" and done.value == "refunded" and len(ran) == 1
    again = asyncio.run(env.guard.amediate(token, refund(200), tool, ask=ask))
    assert again.status == "replayed" and len(ran) == 1


def test_parse_answer_and_payload_shapes(env: Env) -> None:
    assert parse_answer(True) == ApprovalAnswer(True, "human")
    assert parse_answer({"approved": False, "approver": " bob "}) == ApprovalAnswer(False, "bob")
    assert parse_answer({"approved": 1, "approver": "bob"}) is None
    decision = env.guard.authorize(env.refund_token(max_amount=500), refund(200))
    payload = approval_payload(refund(200), decision)
    assert payload["approval_id"] == decision.approval_id
    assert payload["policy_ids"] == list(decision.policy_ids)


def test_a_replay_while_the_first_run_is_in_flight_waits_for_it_async(env: Env) -> None:
    """An async framework resumes before a sibling's tool returned: the replay waits for the
    first run and returns its result; the tool runs once, one allow is recorded."""
    token = env.refund_token()
    ran: list[dict[str, Any]] = []

    async def slow(arguments: dict[str, Any]) -> str:
        ran.append(arguments)
        await asyncio.sleep(0.05)
        return "refunded"

    async def both() -> list[Any]:
        return list(await asyncio.gather(env.guard.amediate(token, refund(50), slow),
                                         env.guard.amediate(token, refund(50), slow)))

    first, second = asyncio.run(both())
    assert len(ran) == 1
    assert sorted([first.status, second.status]) == ["ran", "replayed"]
    assert first.value == second.value == "refunded"
    assert outcomes(env) == [("call-1", "allow")]


def test_a_replay_while_the_first_run_is_in_flight_waits_for_it_in_threads(env: Env) -> None:
    token = env.refund_token()
    started, release = threading.Event(), threading.Event()
    ran: list[dict[str, Any]] = []

    def slow(arguments: dict[str, Any]) -> str:
        ran.append(arguments)
        started.set()
        release.wait(5)
        return "refunded"

    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(
        env.guard.mediate(token, refund(50), slow)))
    first.start()
    assert started.wait(5)
    second = threading.Thread(target=lambda: results.append(
        env.guard.mediate(token, refund(50), slow)))
    second.start()
    second.join(0.1)
    assert second.is_alive()  # waiting for the first run, not refused as `call.reused`
    release.set()
    first.join(5)
    second.join(5)
    assert len(ran) == 1
    assert [r.status for r in results] == ["ran", "replayed"]
    assert outcomes(env) == [("call-1", "allow")]


def test_a_replay_of_a_first_run_that_raised_is_decided_afresh_and_refused(env: Env) -> None:
    token = env.refund_token()

    def boom(arguments: dict[str, Any]) -> str:
        raise RuntimeError("backend down")

    with pytest.raises(RuntimeError):
        env.guard.mediate(token, refund(50), boom)
    tool = Tool()
    done = env.guard.mediate(token, refund(50), tool)
    assert done.status == "refused" and tool.calls == []
    assert done.decision.reasons[0].code == "call.reused"
