from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from agentic_iam.core.capabilities import CapabilitySet, parse_capability
from agentic_iam.core.identity import Actor, Budget, ExecutionIdentity
from agentic_iam.core.keys import KeySet, b64url_encode
from agentic_iam.core.tokens import TOKEN_TYPE, identity_to_claims

ISSUER = "https://broker.test"
AUDIENCE = "agentic-iam-test"


def make_identity(**overrides: Any) -> ExecutionIdentity:
    now = int(time.time())
    values: dict[str, Any] = {
        "execution_id": "exec_test", "jti": "jti-0000000001", "issuer": ISSUER,
        "audience": AUDIENCE, "issued_at": now, "not_before": now, "expires_at": now + 900,
        "agent_id": "support-agent", "agent_trust": 2, "delegator_type": "human",
        "delegator_id": "alice@example.com", "delegator_issuer": "local",
        "actors": (Actor("support-agent", "exec_test"),), "purpose": "refund T-1042",
        "capabilities": CapabilitySet((parse_capability("refund:create amount<=100"),
                                       parse_capability("ticket:read"))),
        "budget": Budget(tool_calls=20, cost=10_000), "risk_envelope": 50, "depth": 1,
        "ancestors": (),
    }
    values.update(overrides)
    return ExecutionIdentity(**values)


@pytest.fixture
def keys() -> KeySet:
    return KeySet.generate(ISSUER)


RawSigner = Callable[..., str]


@pytest.fixture
def sign_raw(keys: KeySet) -> RawSigner:
    """Sign arbitrary header/payload bytes with the test key, bypassing every library check."""

    def sign(header: dict[str, Any] | bytes | None = None,
             payload: dict[str, Any] | bytes | None = None,
             *, key: KeySet | None = None) -> str:
        signer = (key or keys).active
        if header is None:
            header = {"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": signer.kid}
        if payload is None:
            payload = identity_to_claims(make_identity())
        h = header if isinstance(header, bytes) else json.dumps(header).encode()
        p = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        signing_input = f"{b64url_encode(h)}.{b64url_encode(p)}"
        assert signer.private_key is not None
        signature = signer.private_key.sign(signing_input.encode())
        return f"{signing_input}.{b64url_encode(signature)}"

    return sign
