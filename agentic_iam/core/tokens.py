"""Mint and verify execution tokens (``typ: aiam-exec+jwt``, EdDSA).

Verification is strict, following RFC 8725: explicit ``typ``; an allow-listed header (``alg``,
``typ``, ``kid`` and nothing else); the algorithm comes from configuration, never from the token;
the key is chosen by ``(iss, kid)``; every registered claim is required; times are integers;
the lifetime is bounded; exactly one audience; strict UTF-8 JSON without a BOM, duplicate member
names, NaN/Infinity or lone surrogates; a size cap. Every failure raises a specific
:class:`~agentic_iam.errors.TokenError` subclass, never a bare exception from a library below.

The token string is not an identifier (PyJWT accepts a padded signature again, see
security-findings §3): revocation is keyed by ``(iss, jti)``, and the verified-token cache by a
hash of the whole token, so that a forged token with a known ``jti`` never rides on a cached
verification. This module must never trust a claim before the signature over it verified.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import jwt
from cryptography.exceptions import InvalidSignature
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentic_iam.core.capabilities import CapabilitySet
from agentic_iam.core.identity import Actor, Budget, ExecutionIdentity
from agentic_iam.core.keys import KeySet, b64url_decode
from agentic_iam.errors import (
    AlgorithmNotAllowedError,
    CapabilityError,
    ExpiredTokenError,
    InvalidAudienceError,
    InvalidClaimError,
    InvalidHeaderError,
    InvalidIssuerError,
    InvalidJSONError,
    InvalidSignatureError,
    InvalidTypeError,
    LifetimeTooLongError,
    MalformedTokenError,
    MissingClaimError,
    NotYetValidError,
    RevokedTokenError,
    TokenTooLargeError,
    UnknownKeyError,
)

__all__ = [
    "REQUIRED_CLAIMS",
    "TOKEN_TYPE",
    "ExecutionToken",
    "TokenVerifier",
    "identity_to_claims",
    "mint_token",
]

TOKEN_TYPE = "aiam-exec+jwt"
ALLOWED_HEADER = frozenset({"alg", "typ", "kid"})
REGISTERED_CLAIMS = ("iss", "sub", "aud", "iat", "nbf", "exp", "jti")
REQUIRED_CLAIMS = (
    *REGISTERED_CLAIMS, "agent", "delegator", "act", "purpose", "cap", "budget", "risk", "depth",
    "ancestors", "ancestor_budgets",
)
_MAX_TIME = 2**53
_MAX_DEPTH = 32


@dataclass(frozen=True)
class ExecutionToken:
    """A minted token: the compact JWS and the identity it carries."""

    token: str = field(repr=False)
    """The compact JWS. Kept out of ``repr`` so it does not end up in logs."""
    identity: ExecutionIdentity
    """What the token says, as verified values."""

    def __str__(self) -> str:
        return self.token


# --- claims (the JSON boundary) --------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _AgentClaim(_Strict):
    id: str = Field(min_length=1, max_length=128)
    trust: int = Field(ge=0, le=3)


class _DelegatorClaim(_Strict):
    type: Literal["human", "workload"]
    iss: str = Field(min_length=1, max_length=512)
    sub: str = Field(min_length=1, max_length=512)


class _ActClaim(_Strict):
    sub: str = Field(min_length=1, max_length=128)
    exec: str = Field(min_length=1, max_length=128)
    act: _ActClaim | None = None


class _BudgetClaim(_Strict):
    tool_calls: int | None = Field(default=None, ge=0)
    cost: int | None = Field(default=None, ge=0)
    llm_tokens: int | None = Field(default=None, ge=0)


class _RiskClaim(_Strict):
    max: int = Field(ge=0)


class _Claims(_Strict):
    iss: str = Field(min_length=1, max_length=512)
    sub: str = Field(min_length=1, max_length=128)
    aud: str = Field(min_length=1, max_length=512)
    iat: int
    nbf: int
    exp: int
    jti: str = Field(min_length=8, max_length=128)
    agent: _AgentClaim
    delegator: _DelegatorClaim
    act: _ActClaim
    purpose: str = Field(max_length=1024)
    cap: list[dict[str, Any]] = Field(max_length=256)
    budget: _BudgetClaim
    risk: _RiskClaim
    depth: int = Field(ge=0, le=16)
    ancestors: list[str] = Field(max_length=16)
    ancestor_budgets: list[_BudgetClaim] = Field(max_length=16)
    sub_purpose: str | None = Field(default=None, min_length=1, max_length=1024)
    mem: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=256)


def identity_to_claims(identity: ExecutionIdentity) -> dict[str, Any]:
    """The JWT claims of an identity (the inverse of verification)."""
    act: dict[str, Any] | None = None
    for actor in reversed(identity.actors):
        hop: dict[str, Any] = {"sub": actor.agent_id, "exec": actor.execution_id}
        if act is not None:
            hop["act"] = act
        act = hop
    return {
        "iss": identity.issuer,
        "sub": identity.execution_id,
        "aud": identity.audience,
        "iat": identity.issued_at,
        "nbf": identity.not_before,
        "exp": identity.expires_at,
        "jti": identity.jti,
        "agent": {"id": identity.agent_id, "trust": identity.agent_trust},
        "delegator": {
            "type": identity.delegator_type,
            "iss": identity.delegator_issuer,
            "sub": identity.delegator_id,
        },
        "act": act,
        "purpose": identity.purpose,
        "cap": identity.capabilities.to_json(),
        "budget": {k: v for k, v in identity.budget.as_dict().items() if v is not None},
        "risk": {"max": identity.risk_envelope},
        "depth": identity.depth,
        "ancestors": list(identity.ancestors),
        "ancestor_budgets": [
            {k: v for k, v in b.as_dict().items() if v is not None}
            for b in identity.ancestor_budgets
        ],
        **({"sub_purpose": identity.sub_purpose} if identity.sub_purpose is not None else {}),
        **({"mem": sorted(identity.memory_scopes)} if identity.memory_scopes else {}),
    }


def mint_token(identity: ExecutionIdentity, keys: KeySet) -> ExecutionToken:
    """Sign ``identity`` with the key set's active key."""
    if identity.issuer != keys.issuer:
        raise InvalidIssuerError(
            f"identity issuer `{identity.issuer}` does not match the key set's `{keys.issuer}`"
        )
    signing = keys.active
    token = jwt.encode(
        identity_to_claims(identity),
        signing.private_key,  # type: ignore[arg-type]
        algorithm="EdDSA",
        headers={"typ": TOKEN_TYPE, "kid": signing.kid},
    )
    return ExecutionToken(token, identity)


# --- strict decoding --------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise InvalidJSONError(f"JSON constant `{name}` is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidJSONError(f"duplicate JSON member `{key}`")
        out[key] = value
    return out


def _check_strings(value: Any, depth: int = 0) -> None:
    if depth > _MAX_DEPTH:
        raise InvalidJSONError("JSON nesting is too deep")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidJSONError("JSON string holds a lone surrogate") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, depth + 1)
            _check_strings(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item, depth + 1)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**63:
        raise InvalidJSONError("JSON integer is out of range")


def _strict_json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = b64url_decode(segment)
    except ValueError:
        raise MalformedTokenError(f"{what} is not canonical base64url") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raise InvalidJSONError(f"{what} JSON starts with a byte order mark")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidJSONError(f"{what} is not UTF-8 JSON") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except InvalidJSONError as exc:
        raise InvalidJSONError(f"{what}: {exc}") from None
    except (ValueError, RecursionError):
        raise InvalidJSONError(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidJSONError(f"{what} is not a JSON object")
    _check_strings(value)
    return value


class TokenVerifier:
    """Verifies execution tokens for one audience against trusted issuers' key sets.

    ``revoked`` is a callable ``(keys) -> set of revoked keys`` (a store's ``revoked``);
    without it, revocation is not checked here (the Guard checks it in the store's admit step).
    """

    def __init__(
        self,
        keysets: KeySet | Iterable[KeySet],
        *,
        audience: str,
        algorithms: Sequence[str] = ("EdDSA",),
        max_lifetime_s: int = 24 * 3600,
        leeway_s: int = 30,
        max_token_bytes: int = 8192,
        revoked: Callable[[Sequence[str]], frozenset[str]] | None = None,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(algorithms, str):
            # PyJWT's substring pitfall (security-findings §0.2): a string is not a list.
            raise TypeError("algorithms must be a sequence of names, not a string")
        unsupported = set(algorithms) - {"EdDSA"}
        if unsupported:
            raise ValueError(f"unsupported algorithm(s): {sorted(unsupported)}; only EdDSA")
        sets = [keysets] if isinstance(keysets, KeySet) else list(keysets)
        self._keysets = {ks.issuer: ks for ks in sets}
        self.audience = audience
        self.algorithms = frozenset(algorithms)
        self.max_lifetime_s = max_lifetime_s
        self.leeway_s = leeway_s
        self.max_token_bytes = max_token_bytes
        self._revoked = revoked
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[ExecutionIdentity, str]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def add_keyset(self, keyset: KeySet) -> None:
        self._keysets[keyset.issuer] = keyset
        self.clear_cache()

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def verify(self, token: str, *, check_revocation: bool = True) -> ExecutionIdentity:
        """Verify ``token`` and return its identity, or raise a :class:`TokenError` subclass."""
        if not isinstance(token, str):
            raise MalformedTokenError("a token must be a string")
        if len(token) > self.max_token_bytes:
            raise TokenTooLargeError(f"token is larger than {self.max_token_bytes} bytes")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            cached = self._cache.get(digest)
            if cached is not None:
                self._cache.move_to_end(digest)
        if cached is None:
            identity, kid = self._verify_uncached(token)
            with self._lock:
                self._cache[digest] = (identity, kid)
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        else:
            # The signature and claims were checked already; the clock moved on since, and
            # the key may have been retired or its issuer dropped.
            identity, kid = cached
            keyset = self._keysets.get(identity.issuer)
            if keyset is None:
                raise InvalidIssuerError("issuer is not trusted")
            if keyset.public_key(kid) is None:
                raise UnknownKeyError(f"no key `{kid}` for issuer `{identity.issuer}`")
            self._check_window(identity.not_before, identity.issued_at, identity.expires_at)
        if check_revocation and self._revoked is not None:
            self.check_revocation(identity)
        return identity

    def check_revocation(self, identity: ExecutionIdentity) -> None:
        if self._revoked is None:
            return
        keys = (identity.key, *identity.ancestor_keys)
        revoked = self._revoked(keys)
        if identity.key in revoked:
            raise RevokedTokenError(f"token `{identity.jti}` was revoked", jti=identity.jti)
        for key in identity.ancestor_keys:
            if key in revoked:
                jti = key.split("|", 1)[1]
                raise RevokedTokenError(f"ancestor token `{jti}` was revoked", jti=jti)

    # --- the strict path ----------------------------------------------------------------

    def _verify_uncached(self, token: str) -> tuple[ExecutionIdentity, str]:
        parts = token.split(".")
        if len(parts) != 3 or not all(parts):
            raise MalformedTokenError("a token has three non-empty dot-separated segments")
        header = _strict_json(parts[0], "header")
        payload = _strict_json(parts[1], "payload")
        extra = set(header) - ALLOWED_HEADER
        if extra:
            raise InvalidHeaderError(f"header member `{sorted(extra)[0]}` is not allowed")
        if header.get("typ") != TOKEN_TYPE:
            raise InvalidTypeError(f"token type must be `{TOKEN_TYPE}`")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AlgorithmNotAllowedError(f"algorithm `{alg}` is not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise UnknownKeyError("the header has no `kid`")
        issuer = payload.get("iss")
        if "iss" not in payload:
            raise MissingClaimError("iss")
        if not isinstance(issuer, str) or issuer not in self._keysets:
            raise InvalidIssuerError("issuer is not trusted")
        public_key = self._keysets[issuer].public_key(kid)
        if public_key is None:
            raise UnknownKeyError(f"no key `{kid}` for issuer `{issuer}`")
        try:
            signature = b64url_decode(parts[2])
        except ValueError:
            raise MalformedTokenError("signature is not canonical base64url") from None
        if len(signature) != 64:
            raise InvalidSignatureError("signature does not verify")
        try:
            public_key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"))
        except InvalidSignature:
            raise InvalidSignatureError("signature does not verify") from None
        except (ValueError, UnicodeEncodeError):
            raise MalformedTokenError("token is not ASCII") from None
        return self._claims(payload), kid

    def _claims(self, payload: dict[str, Any]) -> ExecutionIdentity:
        for claim in REQUIRED_CLAIMS:
            if claim not in payload:
                raise MissingClaimError(claim)
        for claim in ("iat", "nbf", "exp"):
            value = payload[claim]
            if type(value) is not int:
                raise InvalidClaimError(
                    f"claim `{claim}` must be an integer number of seconds", claim=claim
                )
            if not 0 < value < _MAX_TIME:
                raise InvalidClaimError(f"claim `{claim}` is out of range", claim=claim)
        aud = payload["aud"]
        if not isinstance(aud, str):
            raise InvalidAudienceError("the token must name exactly one audience")
        if aud != self.audience:
            raise InvalidAudienceError("the token is not for this audience")
        iat, nbf, exp = payload["iat"], payload["nbf"], payload["exp"]
        if exp <= nbf or nbf < iat:
            raise InvalidClaimError("validity window is inverted", claim="exp")
        if exp - iat > self.max_lifetime_s:
            raise LifetimeTooLongError(
                f"lifetime {exp - iat}s exceeds the maximum of {self.max_lifetime_s}s"
            )
        self._check_window(nbf, iat, exp)
        try:
            claims = _Claims.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise InvalidClaimError(
                f"claim `{where}` is invalid: {first.get('msg')}", claim=where.split(".")[0]
            ) from None
        try:
            capabilities = CapabilitySet.from_json(claims.cap)
        except CapabilityError as exc:
            raise InvalidClaimError(f"claim `cap` is invalid: {exc}", claim="cap") from None
        actors: list[Actor] = []
        hop: _ActClaim | None = claims.act
        while hop is not None:
            actors.append(Actor(hop.sub, hop.exec))
            hop = hop.act
        if len(claims.ancestor_budgets) != len(claims.ancestors):
            raise InvalidClaimError("`ancestor_budgets` must align with `ancestors`",
                                    claim="ancestor_budgets")
        if actors[0].agent_id != claims.agent.id or actors[0].execution_id != claims.sub:
            raise InvalidClaimError("the outermost `act` must be this agent and execution",
                                    claim="act")
        return ExecutionIdentity(
            execution_id=claims.sub,
            jti=claims.jti,
            issuer=claims.iss,
            audience=claims.aud,
            issued_at=iat,
            not_before=nbf,
            expires_at=exp,
            agent_id=claims.agent.id,
            agent_trust=claims.agent.trust,
            delegator_type=claims.delegator.type,
            delegator_id=claims.delegator.sub,
            delegator_issuer=claims.delegator.iss,
            actors=tuple(actors),
            purpose=claims.purpose,
            capabilities=capabilities,
            budget=Budget(**claims.budget.model_dump()),
            risk_envelope=claims.risk.max,
            depth=claims.depth,
            ancestors=tuple(claims.ancestors),
            ancestor_budgets=tuple(Budget(**b.model_dump()) for b in claims.ancestor_budgets),
            sub_purpose=claims.sub_purpose,
            memory_scopes=frozenset(claims.mem),
        )

    def _check_window(self, nbf: int, iat: int, exp: int) -> None:
        now = self._clock()
        if exp <= now - self.leeway_s:
            raise ExpiredTokenError("token has expired")
        if nbf > now + self.leeway_s or iat > now + self.leeway_s:
            raise NotYetValidError("token is not valid yet")

