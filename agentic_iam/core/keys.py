"""Ed25519 signing keys with key ids, JWKS export/import and rotation.

A :class:`KeySet` belongs to one issuer. It signs with its *active* key and verifies with every
key it still holds; retiring a key makes tokens signed with it stop verifying. Only public keys
ever leave through :meth:`KeySet.to_jwks`. This module must never select a key or an algorithm
from anything a token says about itself, other than looking up a ``kid`` it already holds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agentic_iam.errors import KeySetError

__all__ = ["KeySet", "SigningKey", "b64url_decode", "b64url_encode", "public_key_from_jwk"]


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict, canonical base64url without padding (raises ``ValueError`` otherwise)."""
    if any(ch not in _B64URL for ch in text) or len(text) % 4 == 1:
        raise ValueError("not canonical base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # Non-zero unused bits give several spellings of one value; only the canonical one passes.
    if b64url_encode(data) != text:
        raise ValueError("not canonical base64url")
    return data


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _thumbprint(key: Ed25519PublicKey) -> str:
    # RFC 7638 thumbprint of the OKP JWK: members in lexicographic order, no whitespace.
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(_raw_public(key))},
        separators=(",", ":"), sort_keys=True,
    )
    return b64url_encode(hashlib.sha256(canonical.encode()).digest())[:16]


def public_key_from_jwk(jwk: Mapping[str, Any]) -> tuple[str, Ed25519PublicKey]:
    """(kid, key) from an OKP/Ed25519 public JWK; anything else raises :class:`KeySetError`."""
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise KeySetError("only OKP/Ed25519 keys are supported")
    kid, x = jwk.get("kid"), jwk.get("x")
    if type(kid) is not str or not kid or type(x) is not str:
        raise KeySetError("a JWK needs string `kid` and `x` members")
    try:
        raw = b64url_decode(x)
        return kid, Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise KeySetError(f"key `{kid}`: `x` is not a valid Ed25519 public key") from None


@dataclass(frozen=True)
class SigningKey:
    """One Ed25519 key pair of a key set."""

    kid: str
    """Key id (an RFC 7638 thumbprint prefix)."""
    private_key: Ed25519PrivateKey | None
    """The private half; ``None`` in a verify-only set imported from a JWKS."""
    public_key: Ed25519PublicKey
    """The public half."""
    created_at: int
    """Unix seconds."""


class KeySet:
    """The keys of one issuer: one active signing key plus older keys still trusted to verify."""

    def __init__(self, issuer: str, keys: list[SigningKey] | None = None,
                 active: str | None = None) -> None:
        if not issuer:
            raise KeySetError("a key set needs an issuer")
        self.issuer = issuer
        self._keys: dict[str, SigningKey] = {k.kid: k for k in keys or []}
        self._active = active
        if active is not None and active not in self._keys:
            raise KeySetError(f"active key `{active}` is not in the set")

    @classmethod
    def generate(cls, issuer: str) -> KeySet:
        keyset = cls(issuer)
        keyset.rotate()
        return keyset

    def rotate(self) -> SigningKey:
        """Add a fresh key and make it the active signing key; older keys keep verifying."""
        private = Ed25519PrivateKey.generate()
        public = private.public_key()
        key = SigningKey(_thumbprint(public), private, public, int(time.time()))
        self._keys[key.kid] = key
        self._active = key.kid
        return key

    def retire(self, kid: str) -> None:
        """Forget a key: tokens signed with it no longer verify."""
        if kid not in self._keys:
            raise KeySetError(f"unknown key `{kid}`")
        del self._keys[kid]
        if self._active == kid:
            self._active = None

    @property
    def active(self) -> SigningKey:
        key = self._keys.get(self._active or "")
        if key is None or key.private_key is None:
            raise KeySetError(f"key set of `{self.issuer}` has no active signing key")
        return key

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def public_key(self, kid: str) -> Ed25519PublicKey | None:
        key = self._keys.get(kid)
        return key.public_key if key is not None else None

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        return {kid: key.public_key for kid, key in self._keys.items()}

    # --- JWKS ---------------------------------------------------------------------------

    def to_jwks(self) -> dict[str, Any]:
        """Public keys only, as a standard JWKS document."""
        return {
            "keys": [
                {"kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": kid,
                 "x": b64url_encode(_raw_public(key.public_key))}
                for kid, key in self._keys.items()
            ]
        }

    @classmethod
    def from_jwks(cls, issuer: str, jwks: Mapping[str, Any]) -> KeySet:
        """A verify-only key set from a JWKS document."""
        keys = jwks.get("keys")
        if not isinstance(keys, list):
            raise KeySetError("a JWKS document needs a `keys` list")
        imported = []
        for jwk in keys:
            if not isinstance(jwk, Mapping):
                raise KeySetError("every JWKS entry must be an object")
            kid, public = public_key_from_jwk(jwk)
            imported.append(SigningKey(kid, None, public, 0))
        return cls(issuer, imported)

    # --- private key files (for the CLI) ------------------------------------------------

    def to_private_json(self) -> dict[str, Any]:
        keys = []
        for kid, key in self._keys.items():
            if key.private_key is None:
                continue
            raw = key.private_key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            keys.append({"kty": "OKP", "crv": "Ed25519", "kid": kid, "d": b64url_encode(raw),
                         "x": b64url_encode(_raw_public(key.public_key)),
                         "created_at": key.created_at})
        return {"issuer": self.issuer, "active": self._active, "keys": keys}

    @classmethod
    def from_private_json(cls, data: Mapping[str, Any]) -> KeySet:
        issuer = data.get("issuer")
        entries = data.get("keys")
        if type(issuer) is not str or not isinstance(entries, list):
            raise KeySetError("a key file needs `issuer` and `keys`")
        keys = []
        for entry in entries:
            try:
                private = Ed25519PrivateKey.from_private_bytes(b64url_decode(entry["d"]))
            except (KeyError, TypeError, ValueError):
                raise KeySetError("a key file entry needs a valid Ed25519 `d`") from None
            public = private.public_key()
            kid = entry.get("kid") or _thumbprint(public)
            keys.append(SigningKey(kid, private, public, int(entry.get("created_at", 0))))
        active = data.get("active")
        return cls(issuer, keys, active if isinstance(active, str) else None)

    def save(self, path: str | Path) -> None:
        """Write the private key file with mode 0600."""
        target = Path(path)
        text = json.dumps(self.to_private_json(), indent=2)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)

    @classmethod
    def load(cls, path: str | Path) -> KeySet:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise KeySetError(f"cannot read key file `{path}`: {exc}") from None
        if not isinstance(data, Mapping):
            raise KeySetError(f"key file `{path}` is not a JSON object")
        return cls.from_private_json(data)
