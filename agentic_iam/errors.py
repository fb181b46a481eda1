"""The one exception tree of agentic-iam.

Every error the library raises on purpose is an :class:`AgenticIAMError`. Errors say what is
wrong and where (file, line, field, tool), carry structured attributes for programs, and never
echo a token or a secret.

::

    AgenticIAMError
    ├── ConfigurationError            bad configuration handed to the library
    │   ├── RegistryError             agents-as-code YAML (file, agent, field)
    │   ├── PolicyLoadError           Cedar policy/schema files (file, line)
    │   ├── KeySetError               signing keys, JWKS import/export
    │   └── MissingExtraError         an optional framework is not installed (names the extra)
    ├── CapabilityError               capability syntax or argument-constraint definitions
    ├── DelegationError               the broker refused to mint
    │   ├── UnknownAgentError
    │   ├── AgentSuspendedError
    │   ├── CapabilityNotPermittedError   outside the agent's registry tools or the IdP scopes
    │   ├── LimitExceededError            TTL, budget or risk above what is allowed
    │   ├── WideningError                 a sub-delegation that would widen its parent
    │   └── SubjectTokenError             an external IdP token that does not verify
    ├── TokenError                    an execution token that must not be trusted
    │   ├── MalformedTokenError       segments, base64url, size
    │   │   ├── TokenTooLargeError
    │   │   └── InvalidJSONError      non-UTF-8, BOM, duplicate members, NaN/Infinity, nesting
    │   ├── InvalidHeaderError        header members outside the allow-list
    │   │   ├── InvalidTypeError      missing or wrong ``typ``
    │   │   └── AlgorithmNotAllowedError
    │   ├── UnknownKeyError           no key for (iss, kid)
    │   ├── InvalidSignatureError
    │   ├── MissingClaimError
    │   ├── InvalidClaimError         a claim of the wrong type or shape
    │   ├── InvalidIssuerError
    │   ├── InvalidAudienceError
    │   ├── ExpiredTokenError
    │   ├── NotYetValidError
    │   ├── LifetimeTooLongError
    │   └── RevokedTokenError         the token or one of its ancestors was revoked
    ├── AuthorizationDenied           raised by ``enforce``; carries the Decision
    ├── ApprovalError                 approval requests that are unknown, stale or already used
    │   └── ApproverRefusedError      an answer from someone who may not answer (unknown approver,
    │                                 or the requesting agent, its execution or its chain)
    ├── StoreError                    a store operation failed
    │   ├── StoreUnavailableError     down or slower than its timeout
    │   └── StoreStateLostError       the store lost its state (no epoch): deny until re-initialised
    ├── AuditError                    a durable audit sink failed to record
    │   └── AuditIntegrityError       a log that does not verify
    └── FirewallError                 a screening step failed (its output is blocked)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentic_iam.core.decision import Decision

__all__ = [
    "AgentSuspendedError",
    "AgenticIAMError",
    "AlgorithmNotAllowedError",
    "ApprovalError",
    "ApproverRefusedError",
    "AuditError",
    "AuditIntegrityError",
    "AuthorizationDenied",
    "CapabilityError",
    "CapabilityNotPermittedError",
    "ConfigurationError",
    "DelegationError",
    "ExpiredTokenError",
    "FirewallError",
    "InvalidAudienceError",
    "InvalidClaimError",
    "InvalidHeaderError",
    "InvalidIssuerError",
    "InvalidJSONError",
    "InvalidSignatureError",
    "InvalidTypeError",
    "KeySetError",
    "LifetimeTooLongError",
    "LimitExceededError",
    "MalformedTokenError",
    "MissingClaimError",
    "MissingExtraError",
    "NotYetValidError",
    "PolicyLoadError",
    "RegistryError",
    "RevokedTokenError",
    "StoreError",
    "StoreStateLostError",
    "StoreUnavailableError",
    "SubjectTokenError",
    "TokenError",
    "TokenTooLargeError",
    "UnknownAgentError",
    "UnknownKeyError",
    "WideningError",
]


class AgenticIAMError(Exception):
    """Base class of every error agentic-iam raises on purpose."""


# --- configuration -------------------------------------------------------------------------


class ConfigurationError(AgenticIAMError):
    """Configuration handed to the library is unusable."""


class RegistryError(ConfigurationError):
    """An agent registry file is invalid. Names the file, the agent and the field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        agent: str | None = None,
        field: str | None = None,
    ) -> None:
        self.file = file
        self.agent = agent
        self.field = field
        where = ", ".join(
            part
            for part in (
                f"file `{file}`" if file else "",
                f"agent `{agent}`" if agent else "",
                f"field `{field}`" if field else "",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)


class PolicyLoadError(ConfigurationError):
    """A policy or schema file does not parse or does not validate. Names file and line."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None) -> None:
        self.file = file
        self.line = line
        self.detail = message
        where = file or "<policies>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {message}")


class KeySetError(ConfigurationError):
    """Signing keys or a JWKS document are invalid."""


class MissingExtraError(ConfigurationError, ImportError):
    """An optional framework integration is used without its extra installed."""

    def __init__(self, extra: str, missing: str) -> None:
        self.extra = extra
        self.missing = missing
        super().__init__(
            f"the `{extra}` integration needs `{missing}`, which is not installed: "
            f'pip install "agentic-iam[{extra}]"'
        )


# --- capabilities and delegation -----------------------------------------------------------


class CapabilityError(AgenticIAMError):
    """A capability or argument constraint is malformed."""


class DelegationError(AgenticIAMError):
    """The broker refused to mint an execution token."""


class UnknownAgentError(DelegationError):
    """The agent is not in the registry."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        super().__init__(f"unknown agent `{agent_id}`: it is not in the registry")


class AgentSuspendedError(DelegationError):
    """The agent exists but is suspended."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        super().__init__(f"agent `{agent_id}` is suspended in the registry")


class CapabilityNotPermittedError(DelegationError):
    """A requested capability lies outside what the agent (or the delegator) may do."""

    def __init__(self, message: str, *, capability: str, rule: str) -> None:
        self.capability = capability
        self.rule = rule
        super().__init__(message)


class LimitExceededError(DelegationError):
    """A requested TTL, budget or risk envelope exceeds what is allowed."""

    def __init__(self, message: str, *, limit: str) -> None:
        self.limit = limit
        super().__init__(message)


class WideningError(DelegationError):
    """A sub-delegation would widen its parent. ``widened`` names what."""

    def __init__(self, message: str, *, widened: str) -> None:
        self.widened = widened
        super().__init__(message)


class SubjectTokenError(DelegationError):
    """An external IdP token offered as the delegator does not verify."""


# --- tokens --------------------------------------------------------------------------------


class TokenError(AgenticIAMError):
    """An execution token must not be trusted. Subclasses say why."""


class MalformedTokenError(TokenError):
    """The token is not three canonical base64url segments."""


class TokenTooLargeError(MalformedTokenError):
    """The token exceeds the configured size cap."""


class InvalidJSONError(MalformedTokenError):
    """Header or payload is not strict UTF-8 JSON (BOM, UTF-16, duplicates, NaN, nesting)."""


class InvalidHeaderError(TokenError):
    """The header carries a member outside the allow-list."""


class InvalidTypeError(InvalidHeaderError):
    """The ``typ`` header is missing or is not ``aiam-exec+jwt``."""


class AlgorithmNotAllowedError(InvalidHeaderError):
    """The ``alg`` header names an algorithm that is not configured."""


class UnknownKeyError(TokenError):
    """No verification key for the token's (iss, kid)."""


class InvalidSignatureError(TokenError):
    """The signature does not verify."""


class MissingClaimError(TokenError):
    """A required claim is absent."""

    def __init__(self, claim: str) -> None:
        self.claim = claim
        super().__init__(f"required claim `{claim}` is missing")


class InvalidClaimError(TokenError):
    """A claim has the wrong type or shape."""

    def __init__(self, message: str, *, claim: str | None = None) -> None:
        self.claim = claim
        super().__init__(message)


class InvalidIssuerError(TokenError):
    """The issuer is not trusted."""


class InvalidAudienceError(TokenError):
    """The audience is missing, wrong or not exactly one."""


class ExpiredTokenError(TokenError):
    """The token's ``exp`` has passed."""


class NotYetValidError(TokenError):
    """The token's ``nbf`` (or ``iat``) lies in the future."""


class LifetimeTooLongError(TokenError):
    """``exp - iat`` exceeds the configured maximum lifetime."""


class RevokedTokenError(TokenError):
    """The token or one of its ancestors was revoked."""

    def __init__(self, message: str, *, jti: str) -> None:
        self.jti = jti
        super().__init__(message)


# --- authorization, stores, audit, firewall -------------------------------------------------


class AuthorizationDenied(AgenticIAMError):
    """Raised by ``Guard.enforce`` when a call is not allowed. Carries the Decision."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        super().__init__(decision.summary())


class ApprovalError(AgenticIAMError):
    """An approval request is unknown, stale, or was already used."""


class ApproverRefusedError(ApprovalError):
    """An answer to an approval request from someone who may not give it; nothing was changed.

    ``code`` is ``approval.approver_unknown`` (not an authenticated or configured approver),
    ``approval.separation_of_duties`` (the requesting agent, its execution or an agent in its
    delegation chain) or ``approval.unattributed`` (the request does not record who asked).
    """

    def __init__(self, message: str, *, code: str, approver: str,
                 request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        """Reason code, as recorded on the ``approval.denied`` event."""
        self.approver = approver
        """The approver id that was refused."""
        self.request_id = request_id
        """The approval request it tried to answer."""


class StoreError(AgenticIAMError):
    """A store operation failed."""


class StoreUnavailableError(StoreError):
    """The store is down or slower than its timeout."""


class StoreStateLostError(StoreError):
    """The store no longer holds the state this client saw: deny until an operator acts.

    Raised when the store's epoch is missing (Redis restarted without persistence, the SQLite
    file was deleted or replaced, or the store was never initialised). ``store`` names the
    store (path or URL without credentials).
    """

    def __init__(self, message: str, *, store: str) -> None:
        self.store = store
        super().__init__(message)


class AuditError(AgenticIAMError):
    """A durable audit sink failed to record an event."""


class AuditIntegrityError(AuditError):
    """An audit log does not verify. ``index`` is the first bad record (0-based)."""

    def __init__(self, message: str, *, index: int | None = None) -> None:
        self.index = index
        super().__init__(message)


class FirewallError(AgenticIAMError):
    """A screening step failed; the output it was screening is blocked."""


def _structured(error: AgenticIAMError) -> dict[str, Any]:
    """Structured attributes of an error, for audit records and ``--json`` output."""
    attrs = {k: v for k, v in vars(error).items() if not k.startswith("_") and k != "decision"}
    return {"type": type(error).__name__, "message": str(error), **attrs}
