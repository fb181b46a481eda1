"""Strict token verification: one test per rejection row of issue 2, plus the round trip."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentic_iam.core.capabilities import CapabilitySet, parse_capability
from agentic_iam.core.identity import Budget
from agentic_iam.core.keys import KeySet, b64url_encode
from agentic_iam.core.tokens import TOKEN_TYPE, TokenVerifier, identity_to_claims, mint_token
from agentic_iam.errors import (
    AlgorithmNotAllowedError,
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
    TokenError,
    TokenTooLargeError,
    UnknownKeyError,
)

from .conftest import AUDIENCE, ISSUER, RawSigner, make_identity


def verifier(keys: KeySet, **kw: Any) -> TokenVerifier:
    return TokenVerifier(keys, audience=AUDIENCE, max_lifetime_s=3600, leeway_s=0, **kw)


def claims(**overrides: Any) -> dict[str, Any]:
    payload = identity_to_claims(make_identity())
    payload.update(overrides)
    return payload


def header(keys: KeySet, **overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": keys.active.kid}
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not None}


def test_valid_token_verifies(keys: KeySet) -> None:
    token = mint_token(make_identity(), keys)
    identity = verifier(keys).verify(token.token)
    assert identity == token.identity


def test_missing_typ(keys: KeySet, sign_raw: RawSigner) -> None:
    h = header(keys)
    del h["typ"]
    with pytest.raises(InvalidTypeError):
        verifier(keys).verify(sign_raw(h))


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "txntoken+jwt", "AIAM-EXEC+JWT", ""])
def test_wrong_typ(keys: KeySet, sign_raw: RawSigner, typ: str) -> None:
    with pytest.raises(InvalidTypeError):
        verifier(keys).verify(sign_raw(header(keys, typ=typ)))


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_any_case(keys: KeySet, alg: str) -> None:
    h = b64url_encode(json.dumps(header(keys, alg=alg)).encode())
    p = b64url_encode(json.dumps(claims()).encode())
    for token in (f"{h}.{p}.", f"{h}.{p}.AAAA"):
        with pytest.raises((AlgorithmNotAllowedError, MalformedTokenError)):
            verifier(keys).verify(token)
    with pytest.raises(AlgorithmNotAllowedError):
        verifier(keys).verify(f"{h}.{p}.AAAA")


@pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256", "EdDSA256", "eddsa"])
def test_algorithm_not_configured(keys: KeySet, sign_raw: RawSigner, alg: str) -> None:
    with pytest.raises(AlgorithmNotAllowedError):
        verifier(keys).verify(sign_raw(header(keys, alg=alg)))


def test_algorithms_as_string_is_refused(keys: KeySet) -> None:
    with pytest.raises(TypeError):
        TokenVerifier(keys, audience=AUDIENCE, algorithms="EdDSA")


@pytest.mark.parametrize("member", ["jwk", "jku", "x5u", "x5c", "crit", "cty"])
def test_header_member_not_allowed(keys: KeySet, sign_raw: RawSigner, member: str) -> None:
    with pytest.raises(InvalidHeaderError):
        verifier(keys).verify(sign_raw(header(keys, **{member: "x"})))


def test_foreign_key_same_kid(keys: KeySet, sign_raw: RawSigner) -> None:
    foreign = KeySet.generate(ISSUER)
    # Same kid as the trusted key, signed by another private key.
    token = sign_raw(header(keys), key=foreign)
    with pytest.raises(InvalidSignatureError):
        verifier(keys).verify(token)


def test_foreign_key_own_kid(keys: KeySet) -> None:
    foreign = KeySet.generate(ISSUER)
    token = mint_token(make_identity(), foreign)
    with pytest.raises(UnknownKeyError):
        verifier(keys).verify(token.token)


def test_unknown_kid(keys: KeySet, sign_raw: RawSigner) -> None:
    with pytest.raises(UnknownKeyError):
        verifier(keys).verify(sign_raw(header(keys, kid="no-such-kid")))


def test_key_bound_to_other_issuer(keys: KeySet, sign_raw: RawSigner) -> None:
    other = KeySet.generate("https://other.test")
    token = mint_token(make_identity(issuer="https://other.test"), other)
    v = TokenVerifier([keys, KeySet.from_jwks("https://other.test", other.to_jwks())],
                      audience=AUDIENCE)
    assert v.verify(token.token).issuer == "https://other.test"
    # The other issuer's key cannot vouch for a token claiming our issuer.
    forged = sign_raw(header(keys, kid=other.active.kid), key=other)
    with pytest.raises(UnknownKeyError):
        v.verify(forged)


def test_expired(keys: KeySet, sign_raw: RawSigner) -> None:
    now = int(time.time())
    token = sign_raw(payload=claims(iat=now - 1000, nbf=now - 1000, exp=now - 10))
    with pytest.raises(ExpiredTokenError):
        verifier(keys).verify(token)


def test_not_yet_valid(keys: KeySet, sign_raw: RawSigner) -> None:
    now = int(time.time())
    token = sign_raw(payload=claims(iat=now, nbf=now + 600, exp=now + 900))
    with pytest.raises(NotYetValidError):
        verifier(keys).verify(token)


def test_iat_in_future(keys: KeySet, sign_raw: RawSigner) -> None:
    now = int(time.time())
    token = sign_raw(payload=claims(iat=now + 600, nbf=now + 600, exp=now + 900))
    with pytest.raises(NotYetValidError):
        verifier(keys).verify(token)


def test_lifetime_over_maximum(keys: KeySet, sign_raw: RawSigner) -> None:
    now = int(time.time())
    token = sign_raw(payload=claims(iat=now, nbf=now, exp=now + 10 * 3600))
    with pytest.raises(LifetimeTooLongError):
        verifier(keys).verify(token)


def test_inverted_window(keys: KeySet, sign_raw: RawSigner) -> None:
    now = int(time.time())
    token = sign_raw(payload=claims(iat=now, nbf=now + 100, exp=now + 50))
    with pytest.raises(InvalidClaimError):
        verifier(keys).verify(token)


@pytest.mark.parametrize("aud", ["other-audience", "agentic-iam-tes", AUDIENCE.upper()])
def test_wrong_audience(keys: KeySet, sign_raw: RawSigner, aud: str) -> None:
    with pytest.raises(InvalidAudienceError):
        verifier(keys).verify(sign_raw(payload=claims(aud=aud)))


def test_multiple_audiences(keys: KeySet, sign_raw: RawSigner) -> None:
    for aud in ([AUDIENCE, "other"], [AUDIENCE]):
        with pytest.raises(InvalidAudienceError):
            verifier(keys).verify(sign_raw(payload=claims(aud=aud)))


def test_wrong_issuer(keys: KeySet, sign_raw: RawSigner) -> None:
    for iss in ("https://evil.test", "https://broker.test/", 7):
        with pytest.raises(InvalidIssuerError):
            verifier(keys).verify(sign_raw(payload=claims(iss=iss)))


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "iat", "nbf", "exp", "jti", "agent",
                                   "delegator", "act", "purpose", "cap", "budget", "risk",
                                   "depth", "ancestors", "ancestor_budgets"])
def test_missing_required_claim(keys: KeySet, sign_raw: RawSigner, claim: str) -> None:
    payload = claims()
    del payload[claim]
    with pytest.raises(MissingClaimError) as info:
        verifier(keys).verify(sign_raw(payload=payload))
    assert info.value.claim == claim


@pytest.mark.parametrize("value", ["9999999999", 9999999999.0, 1e300, True, None])
def test_exp_not_an_integer(keys: KeySet, sign_raw: RawSigner, value: object) -> None:
    with pytest.raises(InvalidClaimError) as info:
        verifier(keys).verify(sign_raw(payload=claims(exp=value)))
    assert info.value.claim == "exp"


def test_tampered_payload(keys: KeySet) -> None:
    token = mint_token(make_identity(), keys).token
    h, _, s = token.split(".")
    forged = claims(cap=[{"action": "account:delete", "constraints": {}}])
    tampered = f"{h}.{b64url_encode(json.dumps(forged).encode())}.{s}"
    with pytest.raises(InvalidSignatureError):
        verifier(keys).verify(tampered)


def test_padded_signature_is_not_another_spelling(keys: KeySet) -> None:
    token = mint_token(make_identity(), keys).token
    with pytest.raises(MalformedTokenError):
        verifier(keys).verify(token + "=")


def test_duplicate_member_names(keys: KeySet, sign_raw: RawSigner) -> None:
    body = json.dumps(claims())[:-1] + ', "aud": "other-audience"}'
    with pytest.raises(InvalidJSONError):
        verifier(keys).verify(sign_raw(payload=body.encode()))
    dup_header = (f'{{"alg":"EdDSA","typ":"{TOKEN_TYPE}","kid":"{keys.active.kid}",'
                  f'"typ":"JWT"}}').encode()
    with pytest.raises(InvalidJSONError):
        verifier(keys).verify(sign_raw(dup_header))


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_json(keys: KeySet, sign_raw: RawSigner, encoding: str) -> None:
    payload = json.dumps(claims()).encode(encoding)
    with pytest.raises(InvalidJSONError):
        verifier(keys).verify(sign_raw(payload=payload))


def test_bom_json(keys: KeySet, sign_raw: RawSigner) -> None:
    payload = b"\xef\xbb\xbf" + json.dumps(claims()).encode()
    with pytest.raises(InvalidJSONError):
        verifier(keys).verify(sign_raw(payload=payload))


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_in_claim(keys: KeySet, sign_raw: RawSigner, constant: str) -> None:
    body = json.dumps(claims())[:-1] + f', "x_score": {constant}}}'
    with pytest.raises(InvalidJSONError):
        verifier(keys).verify(sign_raw(payload=body.encode()))


def test_lone_surrogate(keys: KeySet, sign_raw: RawSigner) -> None:
    body = json.dumps(claims())[:-1] + ', "x": "\\ud800"}'
    with pytest.raises(InvalidJSONError):
        verifier(keys).verify(sign_raw(payload=body.encode()))


def test_deep_nesting(keys: KeySet, sign_raw: RawSigner) -> None:
    body = json.dumps(claims())[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises((InvalidJSONError, TokenTooLargeError)):
        TokenVerifier(keys, audience=AUDIENCE, max_token_bytes=1 << 20).verify(
            sign_raw(payload=body.encode()))


def test_oversized_token(keys: KeySet, sign_raw: RawSigner) -> None:
    token = sign_raw(payload=claims(purpose="x" * 20_000))
    with pytest.raises(TokenTooLargeError):
        verifier(keys).verify(token)


def test_unknown_claim_is_refused(keys: KeySet, sign_raw: RawSigner) -> None:
    with pytest.raises(InvalidClaimError):
        verifier(keys).verify(sign_raw(payload=claims(admin=True)))


def test_float_in_capability_constraint(keys: KeySet, sign_raw: RawSigner) -> None:
    cap = [{"action": "refund:create", "constraints": {"amount": {"max": 100.5}}}]
    with pytest.raises(InvalidClaimError):
        verifier(keys).verify(sign_raw(payload=claims(cap=cap)))


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c.d", "a..c", "%%%.b.c", "é.b.c"])
def test_malformed(keys: KeySet, token: str) -> None:
    with pytest.raises(MalformedTokenError):
        verifier(keys).verify(token)


def test_non_string_token(keys: KeySet) -> None:
    with pytest.raises(MalformedTokenError):
        verifier(keys).verify(b"abc")  # type: ignore[arg-type]


def test_revoked_jti(keys: KeySet) -> None:
    token = mint_token(make_identity(), keys)
    revoked = {f"{ISSUER}|{token.identity.jti}"}
    v = verifier(keys, revoked=lambda ks: frozenset(k for k in ks if k in revoked))
    with pytest.raises(RevokedTokenError) as info:
        v.verify(token.token)
    assert info.value.jti == token.identity.jti


def test_revoked_ancestor(keys: KeySet) -> None:
    token = mint_token(make_identity(ancestors=("root-jti-000001",),
                                     ancestor_budgets=(Budget(cost=1),)), keys)
    revoked = {f"{ISSUER}|root-jti-000001"}
    v = verifier(keys, revoked=lambda ks: frozenset(k for k in ks if k in revoked))
    with pytest.raises(RevokedTokenError) as info:
        v.verify(token.token)
    assert info.value.jti == "root-jti-000001"


def test_revocation_is_keyed_by_jti_not_token_string(keys: KeySet) -> None:
    token = mint_token(make_identity(), keys)
    revoked = {f"{ISSUER}|{token.identity.jti}"}
    v = verifier(keys, revoked=lambda ks: frozenset(k for k in ks if k in revoked))
    # A re-encoded spelling of the same token is still the same jti; it is refused either way.
    for spelling in (token.token, token.token + "="):
        with pytest.raises(TokenError):
            v.verify(spelling)


def test_retired_key_stops_verifying_even_when_cached(keys: KeySet) -> None:
    token = mint_token(make_identity(), keys)
    v = verifier(keys)
    v.verify(token.token)
    old = keys.active.kid
    keys.rotate()
    v.verify(token.token)  # rotation alone keeps old keys trusted
    keys.retire(old)
    with pytest.raises(UnknownKeyError):
        v.verify(token.token)


def test_cached_token_still_expires(keys: KeySet) -> None:
    now = [time.time()]
    token = mint_token(make_identity(), keys)
    v = TokenVerifier(keys, audience=AUDIENCE, leeway_s=0, clock=lambda: now[0])
    v.verify(token.token)
    now[0] += 901
    with pytest.raises(ExpiredTokenError):
        v.verify(token.token)


def test_jwks_round_trip_verifies(keys: KeySet) -> None:
    token = mint_token(make_identity(), keys)
    public_only = KeySet.from_jwks(ISSUER, keys.to_jwks())
    assert all("d" not in jwk for jwk in keys.to_jwks()["keys"])
    assert TokenVerifier(public_only, audience=AUDIENCE).verify(token.token) == token.identity


_scalars = st.one_of(st.integers(-10**6, 10**6), st.text(max_size=8), st.booleans())


@settings(max_examples=60, deadline=None)
@given(
    purpose=st.text(max_size=60),
    max_amount=st.integers(0, 10**9),
    currencies=st.frozensets(st.sampled_from(["USD", "EUR", "GBP"]), min_size=1),
    tool_calls=st.one_of(st.none(), st.integers(0, 1000)),
    depth=st.integers(0, 3),
    ancestors=st.lists(st.text(alphabet="abcdef0123456789", min_size=8, max_size=12),
                       max_size=3),
)
def test_mint_verify_round_trips_every_claim(purpose: str, max_amount: int,
                                             currencies: frozenset[str], tool_calls: int | None,
                                             depth: int, ancestors: list[str]) -> None:
    keys = KeySet.generate(ISSUER)
    caps = CapabilitySet((parse_capability(f"refund:create amount<={max_amount}"),))
    caps = CapabilitySet((*caps.capabilities, parse_capability(
        "payout:send currency=" + "|".join(sorted(currencies)))))
    identity = make_identity(
        purpose=purpose, capabilities=caps, budget=Budget(tool_calls=tool_calls),
        depth=depth, ancestors=tuple(ancestors),
        ancestor_budgets=tuple(Budget(cost=i) for i in range(len(ancestors))),
    )
    token = mint_token(identity, keys)
    assert TokenVerifier(keys, audience=AUDIENCE).verify(token.token) == identity
