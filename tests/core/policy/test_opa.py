"""The OPA engine: allow only on an explicit allow; everything else is a deny."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
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


# --- the total deadline (issue 13 item 13): a real, misbehaving server on 127.0.0.1 -----------

_ALLOW_BODY = b'{"result": true}'
_ALLOW_REPLY = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(_ALLOW_BODY)).encode() + b"\r\n\r\n" + _ALLOW_BODY)


class Server:
    """A one-thread HTTP/1.1 server on 127.0.0.1 that answers every request with ``reply``.

    ``split`` sends the headers at once and drips only what follows them; ``drip_s`` is the pause
    between single bytes (0 sends everything at once). The server stops when the client hangs up.
    """

    def __init__(self, reply: bytes = _ALLOW_REPLY, *, drip_s: float = 0.0,
                 split: int = 0) -> None:
        self.reply, self.drip_s, self.split = reply, drip_s, split
        self.requests = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        buffered = b""
        while not self._stop.is_set():  # keep-alive: answer each request on this connection
            while b"\r\n\r\n" not in buffered:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffered += chunk
            head, _, rest = buffered.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(rest) < length:
                rest += conn.recv(65536)
            buffered = rest[length:]
            self.requests += 1
            try:
                conn.sendall(self.reply[:self.split])
                for i in range(self.split, len(self.reply)):
                    if self._stop.is_set():
                        return
                    conn.sendall(self.reply[i:i + 1] if self.drip_s else self.reply[i:])
                    if not self.drip_s:
                        break
                    time.sleep(self.drip_s)
            except OSError:  # the client gave up
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(*args: Any, **kwargs: Any) -> Server:
        servers.append(Server(*args, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _timed(engine: OpaEngine, request: Any) -> tuple[Any, float]:
    started = time.monotonic()
    try:
        result = engine.evaluate(request)
    finally:
        elapsed = time.monotonic() - started
    return result, elapsed


@pytest.mark.parametrize("split", [0, len(_ALLOW_REPLY) - len(_ALLOW_BODY)],
                         ids=["dripped-headers", "dripped-body"])
def test_a_dripping_reply_denies_within_the_deadline(
        request_for: RequestFactory, serve: Callable[..., Server], split: int) -> None:
    # One byte every 0.2 s: each read returns well within a 0.5 s per-read timeout, so only a
    # total deadline stops it (the old engine waited ~7-16 s here and then allowed the call).
    server = serve(drip_s=0.2, split=split)
    engine = OpaEngine(server.url, timeout_s=0.5)
    try:
        result, elapsed = _timed(engine, request_for())
    finally:
        engine.close()
    assert result.outcome == "deny" and result.reasons[0].code == "policy.error"
    assert "did not answer within 0.5s" in result.reasons[0].message
    assert elapsed < 0.5 + 1.0  # a correctness bound, not a benchmark


def test_a_server_that_never_answers_denies_within_the_deadline(
        request_for: RequestFactory, serve: Callable[..., Server]) -> None:
    server = serve(reply=b"HTTP/1.1 200 OK\r\n", drip_s=10.0, split=len(b"HTTP/1.1 200 OK\r\n"))
    engine = OpaEngine(server.url, timeout_s=0.3)
    try:
        result, elapsed = _timed(engine, request_for())
    finally:
        engine.close()
    assert result.outcome == "deny" and "within 0.3s" in result.reasons[0].message
    assert elapsed < 0.3 + 1.0


def test_a_prompt_server_is_asked_over_one_kept_alive_connection(
        request_for: RequestFactory, serve: Callable[..., Server]) -> None:
    server = serve()
    engine = OpaEngine(server.url, timeout_s=2.0)
    try:
        outcomes = [engine.evaluate(request_for()).outcome for _ in range(3)]
    finally:
        engine.close()
    assert outcomes == ["allow", "allow", "allow"]
    assert server.requests == 3


def test_the_deadline_is_per_evaluation_not_per_connection(
        request_for: RequestFactory, serve: Callable[..., Server]) -> None:
    # A slow answer (0.6 s in all) fits a 1.5 s deadline each time, on a reused connection: the
    # deadline restarts with every evaluation.
    body = b'{"result": true}'
    server = serve(drip_s=0.03, split=len(_ALLOW_REPLY) - len(body))
    engine = OpaEngine(server.url, timeout_s=1.5)
    try:
        outcomes = [engine.evaluate(request_for()).outcome for _ in range(2)]
    finally:
        engine.close()
    assert outcomes == ["allow", "allow"]


def test_an_oversized_reply_is_cut_off_while_reading(
        request_for: RequestFactory, serve: Callable[..., Server]) -> None:
    body = b'{"result": true}' + b" " * (2 << 20)
    reply = (b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
             + body)
    server = serve(reply=reply)
    engine = OpaEngine(server.url, timeout_s=2.0)
    try:
        result = engine.evaluate(request_for())
    finally:
        engine.close()
    assert result.outcome == "deny" and "too large" in result.reasons[0].message


def test_a_late_answer_through_a_callers_client_denies(request_for: RequestFactory) -> None:
    # A client you pass brings its own transport, which the engine cannot interrupt; an answer
    # that arrives after the deadline is still a deny, never an allow.
    def late(request: httpx.Request) -> httpx.Response:
        time.sleep(0.15)
        return httpx.Response(200, json={"result": True})

    engine, _ = engine_with(late, timeout_s=0.05)
    result = engine.evaluate(request_for())
    assert result.outcome == "deny" and "within 0.05s" in result.reasons[0].message
