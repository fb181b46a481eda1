"""Policy engines: the protocol the Guard calls, Cedar (default) and OPA, and request fixtures.

``base`` holds the protocol and values, ``cedar`` the schema-validated, action-sliced Cedar
engine and :func:`generate_schema`, ``opa`` an HTTP client for an Open Policy Agent server, and
``fixtures`` the ALLOW/DENY request fixtures that test policies as data. Nothing here may turn an
error into an allow.
"""

from __future__ import annotations

from agentic_iam.core.policy.base import (
    PolicyEngine,
    PolicyRequest,
    PolicyResult,
    StaticEngine,
)
from agentic_iam.core.policy.cedar import CedarEngine, PolicyInfo, generate_schema
from agentic_iam.core.policy.opa import OpaEngine

__all__ = [
    "CedarEngine",
    "OpaEngine",
    "PolicyEngine",
    "PolicyInfo",
    "PolicyRequest",
    "PolicyResult",
    "StaticEngine",
    "generate_schema",
]
