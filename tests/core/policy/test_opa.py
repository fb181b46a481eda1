"""The OPA engine: allow only on an explicit allow; everything else is a deny."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest

from agentic_iam.core.policy.opa import OpaEngine

from .conftest import REFUND, RequestFactory

Handler = Callable[[httpx.Request], httpx.Response]


def engine_with(handler: Handler, **kwargs: Any) -> tuple[OpaEngine, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    client = httpx.Client(transport=httpx.MockTransport(record))
    return OpaEngine("http://opa.test:8181/", client=client, **kwargs), seen


def answer(body: Any, status: int = 200) -> Handler:
    return lambda request: httpx.Response(status, json=body)


def test_allow_sends_the_input_and_reads_the_decision(request_for: RequestFactory) -> None:
    engine, seen = engine_with(answer({"result": {"allow": True,
                                                  "reasons": ["refund within policy"]}}))
    result = engine.evaluate(request_for(context={"session": {"labels": ["b", "a"]}}))
    assert result.outcome == "allow"
    assert [(r.code, r.message) for r in result.reasons] == [("policy.permit",
                                                              "refund within policy")]
    (sent,) = seen
    assert sent.method == "POST"
    assert str(sent.url) == "http://opa.test:8181/v1/data/agentic_iam/allow"
    body = json.loads(sent.content)
    data = body["input"]
    assert data["action"] == "refund:create"
    assert data["principal"] == {"type": "Execution", "id": "exec_fixture_support-agent",
                                 "agent": "support-agent", "trust": 2,
                                 "delegator": "alice@example.com"}
    assert data["resource"]["id"] == "create_refund" and data["resource"]["consequential"]
    assert data["context"]["args"] == REFUND
    assert data["context"]["session"]["labels"] == ["a", "b"]
    assert "confidence" not in data["context"]


def test_a_boolean_document_is_accepted(request_for: RequestFactory) -> None:
    engine, _ = engine_with(answer({"result": True}), package_path="/custom/pkg/allow/")
    assert engine.url.endswith("/v1/data/custom/pkg/allow")
    assert engine.evaluate(request_for()).outcome == "allow"
    engine, _ = engine_with(answer({"result": False}))
    result = engine.evaluate(request_for())
    assert result.outcome == "deny" and result.reasons[0].code == "policy.no_permit"


def test_deny_with_reasons(request_for: RequestFactory) -> None:
    engine, _ = engine_with(answer({"result": {"allow": False, "reasons": [
        {"message": "over the limit", "policy_id": "limits.refund"}, "second"]}}))
    result = engine.evaluate(request_for())
    assert result.outcome == "deny"
    assert [(r.code, r.message, r.policy_id) for r in result.reasons] == [
        ("policy.forbid", "over the limit", "limits.refund"), ("policy.forbid", "second", None)]


def test_approval_required_wins_over_allow(request_for: RequestFactory) -> None:
    engine, _ = engine_with(answer({"result": {"allow": True, "approval_required": True,
                                               "reasons": ["needs a human"]}}))
    result = engine.evaluate(request_for())
    assert result.outcome == "approval_required"
    assert result.reasons[0].code == "policy.approval"


@pytest.mark.parametrize(("handler", "text"), [
    (answer({}), "undefined"),
    (answer({"result": {}}), "booleans"),
    (answer({"result": {"allow": "true"}}), "booleans"),
    (answer({"result": {"allow": 1}}), "booleans"),
    (answer({"result": {"allow": True, "approval_required": "no"}}), "booleans"),
    (answer({"result": "allow"}), "boolean or an object"),
    (answer({"result": {"allow": True, "reasons": "x"}}), "list"),
    (answer({"result": {"allow": True, "reasons": [5]}}), "reason"),
    (answer([True]), "JSON object"),
    (answer({"result": True}, status=500), "HTTP 500"),
    (answer({"result": True}, status=404), "HTTP 404"),
    (lambda r: httpx.Response(200, content=b"{not json"), "not JSON"),
    (lambda r: httpx.Response(200, content=b'{"result": true}' + b" " * (1 << 20)), "too large"),
])
def test_anything_but_an_explicit_allow_denies(
        request_for: RequestFactory, handler: Handler, text: str) -> None:
    engine, _ = engine_with(handler)
    result = engine.evaluate(request_for())
    assert result.outcome == "deny"
    assert result.reasons[0].code == "policy.error"
    assert text in result.reasons[0].message


def test_timeout_denies(request_for: RequestFactory) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    engine, _ = engine_with(slow, timeout_s=0.05)
    result = engine.evaluate(request_for())
    assert result.outcome == "deny" and result.reasons[0].code == "policy.error"
    assert "within 0.05s" in result.reasons[0].message


def test_unreachable_and_crashing_transports_deny(request_for: RequestFactory) -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def crash(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("bug")

    for handler, text in ((refused, "unreachable"), (crash, "RuntimeError")):
        engine, _ = engine_with(handler)
        result = engine.evaluate(request_for())
        assert result.outcome == "deny" and text in result.reasons[0].message


def test_a_real_unreachable_server_denies_within_the_timeout(request_for: RequestFactory) -> None:
    engine = OpaEngine("http://127.0.0.1:9", timeout_s=0.2)
    try:
        result = engine.evaluate(request_for())
    finally:
        engine.close()
    assert result.outcome == "deny" and result.reasons[0].code == "policy.error"


@pytest.mark.parametrize("amount", ["500", True, 50.0, None, Decimal("5")])
def test_arguments_are_not_coerced(request_for: RequestFactory, amount: Any) -> None:
    engine, seen = engine_with(answer({"result": True}))
    result = engine.evaluate(request_for(arguments={**REFUND, "amount": amount}))
    assert result.outcome == "deny" and result.reasons[0].code == "policy.error"
    assert "argument `amount`" in result.reasons[0].message
    assert seen == []  # never sent


def test_construction_is_checked() -> None:
    with pytest.raises(ValueError):
        OpaEngine("http://opa", timeout_s=0)
    with pytest.raises(ValueError):
        OpaEngine("http://opa", package_path="a//b")


def test_close_leaves_a_callers_client_open(request_for: RequestFactory) -> None:
    client = httpx.Client(transport=httpx.MockTransport(answer({"result": True})))
    engine = OpaEngine("http://opa", client=client)
    engine.close()
    assert not client.is_closed
    client.close()
    own = OpaEngine("http://opa")
    own.close()
    own.close()  # idempotent
