"""A policy engine that asks an Open Policy Agent server over HTTP.

What it is for
    :class:`OpaEngine` POSTs ``{"input": …}`` to ``<url>/v1/data/<package_path>`` (OPA's Data
    API) and reads the decision document. The document may be a boolean (``true`` = allow) or an
    object ``{"allow": bool, "approval_required": bool, "reasons": [...]}``, where a reason is a
    string or ``{"code"?, "message", "policy_id"?}``. The input carries the principal, agent,
    action, resource and the same context the Cedar engine sees (``policies/README.md``), as
    plain JSON: sets become sorted lists and decimals become strings.

What it must never do
    Allow on anything but an explicit ``allow: true``: an undefined document (no ``result``), a
    status other than 200, a body that is not the expected JSON, a timeout or any other
    exception is a ``deny`` with code ``policy.error``. ``approval_required: true`` wins over
    ``allow: true``. Arguments are type-checked against the tool's declared types exactly as for
    Cedar (never coerced).

    Wait longer than ``timeout_s`` in all. The timeout is a *total* deadline for one evaluation
    (pool, connect, TLS, send, every read), not httpx's per-operation timeout: a server that
    drips one byte every 0.2 s never trips a 0.5 s read timeout and would hold the call for as
    long as it likes. The engine's own transport gives every socket operation only the time left
    until the deadline (:class:`_DeadlineBackend`), and reads at most 1 MiB. Name resolution is
    the one step it cannot interrupt (``getaddrinfo`` blocks): point ``url`` at an IP address or
    a name in ``/etc/hosts`` where DNS could stall. With a ``client=`` of yours, the engine cannot
    interrupt your transport; an answer that arrives after the deadline is still a deny.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from decimal import Decimal
from typing import Any

import httpcore
import httpx

from agentic_iam.core.decision import Reason
from agentic_iam.core.policy.base import PolicyRequest, PolicyResult, policy_error

__all__ = ["OpaEngine"]

log = logging.getLogger("agentic_iam.policy.opa")

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_MAX_RESPONSE_BYTES = 1 << 20


class _Refused(Exception):
    """A request or a response the engine will not act on (message is safe to show)."""


def _argument(name: str, declared: str, value: Any) -> Any:
    base = declared.removesuffix("?")
    ok = {
        "Long": type(value) is int and _I64_MIN <= value <= _I64_MAX,
        "String": type(value) is str,
        "Bool": type(value) is bool,
        "Decimal": type(value) is Decimal and value.is_finite(),
    }.get(base, False)
    if not ok:
        raise _Refused(f"argument `{name}` must be a {base}, got `{type(value).__name__}`")
    return str(value) if base == "Decimal" else value


def _plain(value: Any) -> Any:
    """Context values as JSON: sets as sorted lists, mappings as objects."""
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, Decimal):
        return str(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    raise _Refused(f"context value of type `{type(value).__name__}` cannot be sent to OPA")


def build_input(request: PolicyRequest) -> dict[str, Any]:
    """The ``input`` document for one request."""
    identity, agent, tool = request.identity, request.agent, request.tool
    args: dict[str, Any] = {}
    for name, declared in tool.arguments.items():
        value = request.arguments.get(name)
        if value is None:
            if declared.endswith("?"):
                continue
            raise _Refused(f"argument `{name}` is missing")
        args[name] = _argument(name, declared, value)
    context = {k: _plain(v) for k, v in request.context.items() if v is not None}
    context["args"] = args
    return {
        "principal": {"type": "Execution", "id": identity.execution_id,
                      "agent": identity.agent_id, "trust": identity.agent_trust,
                      "delegator": identity.delegator_id},
        "agent": {"id": agent.id, "trust_level": agent.trust_level, "owner": agent.owner,
                  "policy_set": agent.policy_set},
        "action": tool.action,
        "resource": {"type": "Tool", "id": tool.name, "consequential": tool.consequential,
                     "risk": tool.risk, "output_trust": tool.output_trust},
        "context": context,
    }


def _reasons(raw: object, code: str) -> tuple[Reason, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _Refused("`reasons` must be a list")
    out: list[Reason] = []
    for item in raw:
        if isinstance(item, str):
            out.append(Reason(code, item))
        elif isinstance(item, Mapping) and isinstance(item.get("message"), str):
            policy_id = item.get("policy_id")
            out.append(Reason(code, item["message"],
                              policy_id if isinstance(policy_id, str) else None))
        else:
            raise _Refused("a reason must be a string or an object with a `message`")
    return tuple(out)


def interpret(body: object) -> PolicyResult:
    """The decision in an OPA Data API response body (already parsed JSON)."""
    if not isinstance(body, Mapping):
        raise _Refused("the response is not a JSON object")
    if "result" not in body:
        raise _Refused("the decision is undefined (no `result`): is the package path right?")
    result = body["result"]
    if isinstance(result, bool):
        document: Mapping[str, Any] = {"allow": result}
    elif isinstance(result, Mapping):
        document = result
    else:
        raise _Refused("the decision must be a boolean or an object")
    allow = document.get("allow")
    approval = document.get("approval_required", False)
    if type(allow) is not bool or type(approval) is not bool:
        raise _Refused("`allow` (and `approval_required`) must be booleans")
    if approval:
        reasons = _reasons(document.get("reasons"), "policy.approval")
        return PolicyResult("approval_required",
                            reasons or (Reason("policy.approval", "the policy asks for a human"),))
    if allow:
        reasons = _reasons(document.get("reasons"), "policy.permit")
        return PolicyResult("allow", reasons or (Reason("policy.permit", "allowed by OPA"),))
    reasons = _reasons(document.get("reasons"), "policy.forbid")
    return PolicyResult("deny", reasons or (Reason("policy.no_permit",
                                                   "OPA did not allow this call"),))


# --- the total deadline ------------------------------------------------------------------------

_DEADLINE: ContextVar[float | None] = ContextVar("aiam_opa_deadline", default=None)
"""``time.monotonic()`` by which the current evaluation must be over (set around each request)."""

_WRITE_CHUNK = 1 << 16


def _time_left(timeout: type[httpcore.TimeoutException]) -> float:
    """Seconds left until the deadline; raise ``timeout`` when none are."""
    deadline = _DEADLINE.get()
    if deadline is None:  # only ever used inside _DeadlineTransport, which sets it
        raise timeout("no deadline is set for this request")
    left = deadline - time.monotonic()
    if left <= 0:
        raise timeout("the deadline passed")
    return left


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every operation may take only the time left until the deadline.

    httpcore hands each ``read``/``write`` the configured per-operation timeout; here it is
    replaced by the time left, so the sum of all operations cannot exceed the deadline. (CPython
    applies a socket timeout to a whole TLS handshake and to each single ``recv``/``send``.)
    """

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _time_left(httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # Chunked so that a peer that accepts our bytes slowly meets the deadline too (the
        # inner write loops over partial sends with one timeout).
        for start in range(0, len(buffer), _WRITE_CHUNK):
            self._inner.write(buffer[start:start + _WRITE_CHUNK],
                              _time_left(httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(
            ssl_context, server_hostname, _time_left(httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's synchronous sockets, bounded by the deadline of the current request."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, _time_left(httpcore.ConnectTimeout),
                                         local_address, socket_options)
        return _DeadlineStream(stream)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None,
                            ) -> httpcore.NetworkStream:
        stream = self._inner.connect_unix_socket(path, _time_left(httpcore.ConnectTimeout),
                                                 socket_options)
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(min(seconds, _time_left(httpcore.PoolTimeout)))


# httpcore's exceptions as httpx's (most specific first), as httpx's own transport maps them.
_MAPPED: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


class _DeadlineTransport(httpx.BaseTransport):
    """An httpx transport that finishes each request, body included, by a total deadline.

    The deadline is the one :class:`OpaEngine` set for the evaluation (or ``total_s`` from now).
    The body is read here, at most ``max_body + 1`` bytes (the engine refuses anything longer),
    so nothing is left to read after the deadline.
    """

    def __init__(self, total_s: float, max_body: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._total_s = total_s
        self._max_body = max_body
        self._pool = httpcore.ConnectionPool(ssl_context=ssl_context,
                                             network_backend=_DeadlineBackend())

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        token = None
        if _DEADLINE.get() is None:
            token = _DEADLINE.set(time.monotonic() + self._total_s)
        try:
            left = _time_left(httpcore.PoolTimeout)
            core = httpcore.Request(
                method=request.method,
                url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                                 port=request.url.port, target=request.url.raw_path),
                headers=request.headers.raw, content=request.read(),
                extensions={"timeout": {"connect": left, "read": left, "write": left,
                                        "pool": left}},
            )
            chunks: list[bytes] = []
            size = 0
            response = self._pool.handle_request(core)
            try:
                for chunk in response.iter_stream():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > self._max_body:
                        break  # closing the unfinished response drops the connection
            finally:
                response.close()
            return httpx.Response(response.status, headers=response.headers,
                                  content=b"".join(chunks), request=request)
        except Exception as exc:
            for core_type, httpx_type in _MAPPED:
                if isinstance(exc, core_type):
                    raise httpx_type(str(exc) or type(exc).__name__, request=request) from exc
            raise
        finally:
            if token is not None:
                _DEADLINE.reset(token)

    def close(self) -> None:
        self._pool.close()


class OpaEngine:
    """Decide tool calls by asking an OPA server.

    ``timeout_s`` is the total deadline of one evaluation (connect, send, read all); past it
    the call is denied. ``client`` may be an ``httpx.Client`` you own (for instance with an
    ``httpx.MockTransport`` in tests): the engine cannot interrupt its transport, but still
    denies an answer that comes after the deadline. Otherwise the engine makes its own client,
    bounded by the deadline (``ssl_context`` for a private CA), and closes it in :meth:`close`.
    """

    def __init__(self, url: str, *, package_path: str = "agentic_iam/allow",
                 timeout_s: float = 0.5, client: httpx.Client | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        path = package_path.strip("/")
        if not path or any(not part for part in path.split("/")):
            raise ValueError(f"package path `{package_path}` is not a path like `pkg/rule`")
        self.url = url.rstrip("/") + "/v1/data/" + path
        self.timeout_s = timeout_s
        self._owns_client = client is None
        if client is None:
            # identity: OPA need not compress, and a compressed body could expand past the cap.
            client = httpx.Client(
                transport=_DeadlineTransport(timeout_s, _MAX_RESPONSE_BYTES, ssl_context),
                timeout=timeout_s, headers={"Accept-Encoding": "identity"},
                # Proxy variables would mount a transport without the deadline in front of ours.
                trust_env=False)
        self._client = client

    def evaluate(self, request: PolicyRequest) -> PolicyResult:
        """Decide one call. Never raises: any failure is a ``deny`` with ``policy.error``."""
        deadline = time.monotonic() + self.timeout_s
        token = _DEADLINE.set(deadline)
        try:
            payload = {"input": build_input(request)}
            response = self._client.post(self.url, json=payload, timeout=self.timeout_s)
            if time.monotonic() > deadline:
                return policy_error(f"OPA did not answer within {self.timeout_s}s")
            if response.status_code != 200:
                return policy_error(f"OPA answered HTTP {response.status_code}")
            if len(response.content) > _MAX_RESPONSE_BYTES:
                return policy_error("OPA's answer is too large")
            try:
                body = response.json()
            except ValueError:
                return policy_error("OPA's answer is not JSON")
            return interpret(body)
        except _Refused as exc:
            return policy_error(str(exc))
        except httpx.TimeoutException:
            return policy_error(f"OPA did not answer within {self.timeout_s}s")
        except httpx.HTTPError as exc:
            return policy_error(f"OPA is unreachable ({type(exc).__name__})")
        except Exception as exc:
            log.exception("OPA evaluation failed")
            return policy_error(f"the OPA engine failed ({type(exc).__name__})")
        finally:
            _DEADLINE.reset(token)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()
