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
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

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


class OpaEngine:
    """Decide tool calls by asking an OPA server.

    ``client`` may be an ``httpx.Client`` you own (for instance with an
    ``httpx.MockTransport`` in tests); otherwise the engine makes one and closes it in
    :meth:`close`.
    """

    def __init__(self, url: str, *, package_path: str = "agentic_iam/allow",
                 timeout_s: float = 0.5, client: httpx.Client | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        path = package_path.strip("/")
        if not path or any(not part for part in path.split("/")):
            raise ValueError(f"package path `{package_path}` is not a path like `pkg/rule`")
        self.url = url.rstrip("/") + "/v1/data/" + path
        self.timeout_s = timeout_s
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=timeout_s)

    def evaluate(self, request: PolicyRequest) -> PolicyResult:
        """Decide one call. Never raises: any failure is a ``deny`` with ``policy.error``."""
        try:
            payload = {"input": build_input(request)}
            response = self._client.post(self.url, json=payload, timeout=self.timeout_s)
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

    def close(self) -> None:
        if self._owns_client:
            self._client.close()
