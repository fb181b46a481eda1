"""The one secret-redaction rule set, shared by the tool firewall and the audit recorder.

What it is for
    :func:`redact_secrets` turns a text into a copy without secrets: every match of
    :data:`SECRET_RULES` becomes ``[REDACTED:<kind>]``. The tool firewall
    (:mod:`agentic_iam.core.firewall`, step 2) and the audit path
    (:mod:`agentic_iam.core.provenance`: reasoning text, arguments, every string of every event)
    both call this module, so a secret the firewall removes from a tool's output is also removed
    from the model message that quoted it in the audit log. There is no second list to forget.

    The rules: PEM private keys; AWS access key ids and secret keys after a label
    (``aws_secret_access_key=``, ``secret key:``); GitHub, Slack, Stripe, OpenAI/Anthropic-style
    and Google API keys; Azure storage account keys (``AccountKey=…==``, whole), SAS signatures
    and Entra client secrets; JWTs; passwords in URLs (``https://user:pass@host``, also with an
    empty user); ``Bearer`` and ``Basic`` credentials; ``password=``/``pwd:`` assignments; values
    after a secret-like label (``api_key``, ``client secret``, ``token``…) and long high-entropy
    key-like strings. :func:`secret_field_kind` names a mapping key whose *value* is a secret
    (``{"password": "…"}``), for structured data where the label and the value are two strings.

What it must never do
    * Put any part of a matched secret back into its output (the label and delimiters stay, the
      value goes whole, including base64 padding and ``/`` or ``+`` inside it).
    * Import anything outside the standard library: the firewall depends on it.
    * Be slow on clean text. Every rule names the lower-case substrings (``markers``) one of
      which each of its matches contains, or a cheap ``gate``; a rule whose markers are absent is
      not run. :func:`may_hold_secret` is the union of the gates and is also sound on the JSON
      encoding of a text (the markers hold no character JSON escapes), so a clean audit event is
      recognised with one look at its serialized form.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "SECRET_RULES",
    "SecretRule",
    "may_hold_secret",
    "redact_secrets",
    "redact_secrets_counted",
    "secret_field_kind",
]


# --- helpers ---------------------------------------------------------------------------------


def _shannon(value: str) -> float:
    counts = Counter(value)
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _printable_ratio(text: str) -> float:
    if not text:
        return 0.0
    return sum(1 for c in text if c.isprintable() or c in "\t\n\r") / len(text)


_LETTER_RUN: Final = re.compile(r"[^\W\d_]{3}")


def readable(text: str) -> bool:
    """Decoded bytes that read like text (not keys, hashes or image data)."""
    return (
        len(text) >= 4
        and _LETTER_RUN.search(text) is not None
        and _printable_ratio(text) >= 0.85
    )


def bytes_to_text(data: bytes) -> str | None:
    """``data`` as UTF-8 text, or ``None``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def _not_redacted(value: str) -> bool:
    return not value.startswith("[REDACTED")


def _context_secret(value: str) -> bool:
    # After "api_key=" / "token:" almost anything long is a secret; the entropy floor only
    # keeps placeholders such as "xxxxxxxxxxxxxxxx" or "your-token-goes-here" readable.
    return _not_redacted(value) and _shannon(value) >= 3.0


def _decodes_to_prose(value: str) -> bool:
    """A base64 run of readable text is content (or an encoded payload), not a key."""
    if len(value) % 4 == 1:
        return False
    alt = b"-_" if ("-" in value or "_" in value) else None
    try:
        data = base64.b64decode(value + "=" * (-len(value) % 4), altchars=alt, validate=True)
    except (binascii.Error, ValueError):
        return False
    text = bytes_to_text(data)
    return text is not None and readable(text) and " " in text


_DIGIT: Final = re.compile(r"\d")


def _mixed(value: str) -> bool:
    """Upper-case, lower-case and digit characters all present (C-speed string tests)."""
    return (
        value.lower() != value
        and value.upper() != value
        and _DIGIT.search(value) is not None
    )


def _standalone_secret(value: str) -> bool:
    # >= 32 chars of [A-Za-z0-9_-] with >= 4.0 bits/char. Upper, lower and digit together keep
    # long identifiers, slugs and hex digests (commit ids, checksums: at most 4.0 bits) out.
    return _shannon(value) >= 4.0 and _mixed(value) and not _decodes_to_prose(value)


_LONG_RUN: Final = re.compile(r"[A-Za-z0-9_-]{32,}")
# Run characters become "a", everything else (other bytes of UTF-8 too) a space: a run of 32
# "a" is then found by a plain substring search, several times faster than a regex scan.
_RUN_BYTES: Final = bytes(
    0x61 if chr(b).isascii() and (chr(b).isalnum() or chr(b) in "_-") else 0x20
    for b in range(256)
)
_RUN_32: Final = b"a" * 32


def _long_mixed_run(text: str, lowered: str) -> bool:
    """The gate of the standalone rule: a 32+ run holding upper, lower and digit characters."""
    runs = text.encode("utf-8", "surrogatepass").translate(_RUN_BYTES)
    start = runs.find(_RUN_32)
    if start < 0:
        return False
    if not text.isascii():  # byte offsets are not character offsets
        return any(_mixed(match.group()) for match in _LONG_RUN.finditer(text))
    while start >= 0:
        end = runs.find(b" ", start)
        end = len(runs) if end < 0 else end
        if _mixed(text[start:end]):
            return True
        start = runs.find(_RUN_32, end)
    return False


# --- the rules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretRule:
    """One redaction rule: the named group ``secret`` (else the whole match) is replaced."""

    kind: str
    """What the secret is; the replacement is ``[REDACTED:<kind>]``."""
    pattern: re.Pattern[str]
    """Where the secret is."""
    accept: Callable[[str], bool] | None = None
    """A last check on the value (entropy, not already redacted); ``None`` accepts."""
    markers: tuple[str, ...] = ()
    """Lower-case substrings, one of which every match contains; ``()`` when there are none."""
    gate: Callable[[str, str], bool] | None = None
    """A finer test, run when a marker is present (or alone): ``gate(text, lowered)`` is False
    when the rule cannot match."""

    def may_match(self, text: str, lowered: str) -> bool:
        """Whether the rule can match ``text`` (``lowered`` is ``text.lower()``)."""
        if self.markers and not any(marker in lowered for marker in self.markers):
            return False
        return self.gate is None or self.gate(text, lowered)


# A label, a separator, an optional quote. "secret key: …", "client_secret=…", "API-Key: …".
_SEP: Final = r"[\"']?\s*[:=]\s*[\"']?"
_KEYWORD_SECRET: Final = (
    r"(?i:api[\s_-]?key|apikey|access[\s_-]?key|secret[\s_-]?key|client[\s_-]?secret|secret|"
    r"auth[\s_-]?token|access[\s_-]?token|refresh[\s_-]?token|token|private[\s_-]?key|"
    r"signing[\s_-]?key|encryption[\s_-]?key|master[\s_-]?key|credentials?)"
)
_LABEL_WORDS: Final = ("key", "secret", "token", "credential")
# Every match of a labelled rule has a label word, then ":" or "=" after an optional quote and
# spaces. The gates also accept the JSON-escaped forms (\", \n), so they are sound on JSON too;
# one regex per word keeps a literal prefix, which the regex engine finds fast.
_LABEL_GATES: Final = tuple(
    (word, re.compile(word + ("s?" if word == "credential" else "")
                      + r"(?:\\?[\"'])?(?:\s|\\[nrt])*[:=]"))
    for word in _LABEL_WORDS
)


def _keyword_gate(text: str, lowered: str) -> bool:
    return any(word in lowered and gate.search(lowered) is not None
               for word, gate in _LABEL_GATES)
# A password label may follow "_" ("DB_PASSWORD=…"), never a letter or digit ("passwordless").
_PASSWORD_LABEL: Final = r"(?<![A-Za-z0-9])(?i:password|passwd|passphrase|pwd)"
_AWS_PREFIXES: Final = ("AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AIPA", "ANPA", "ANVA",
                        "APKA", "AROA")

# Order matters: specific shapes first, so the kind is the most precise one, and each
# replacement "[REDACTED:kind]" can never be matched by a later rule.
SECRET_RULES: Final[tuple[SecretRule, ...]] = (
    SecretRule("private_key", re.compile(
        r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
        r"(?:-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----|\Z)"),
        markers=("private key",)),
    SecretRule("aws_access_key", re.compile(
        r"(?<![A-Za-z0-9])(?:" + "|".join(_AWS_PREFIXES) + r")[A-Z0-9]{16}(?![A-Za-z0-9])"),
        markers=tuple(prefix.lower() for prefix in _AWS_PREFIXES)),
    # The label may be written with spaces, "_" or "-", or run together ("SecretAccessKey"),
    # and the value follow ":", "=", "-", "is" or nothing: the 40-character value is the shape.
    SecretRule("aws_secret_key", re.compile(
        r"(?i:(?:aws[\s_-]?)?secret[\s_-]?(?:access[\s_-]?)?key|aws[\s_-]?secret)"
        r"[\"']?\s*(?:[:=]|=>|->|-|\u2013|\bis\b)?\s*[\"']?"
        r"(?P<secret>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"),
        markers=("secret",)),
    SecretRule("github_token", re.compile(
        r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{30,255}|github_pat_[A-Za-z0-9_]{22,255})"
        r"(?![A-Za-z0-9_])"),
        markers=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    SecretRule("slack_webhook", re.compile(
        r"https://hooks\.slack\.com/services/[A-Za-z0-9_/]{20,200}"),
        markers=("hooks.slack.com",)),
    SecretRule("slack_token", re.compile(r"(?<![A-Za-z0-9-])xox[abposr]-[A-Za-z0-9-]{10,250}"),
               markers=("xox",)),
    SecretRule("stripe_key", re.compile(
        r"(?<![A-Za-z0-9])(?:(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10,247}|whsec_[A-Za-z0-9]{24,247})"
        r"(?![A-Za-z0-9])"),
        markers=("_live_", "_test_", "whsec_")),
    SecretRule("llm_api_key", re.compile(
        r"(?<![A-Za-z0-9_-])sk-(?:proj-|ant-[a-z0-9]{2,10}-|svcacct-|admin-)?"
        r"[A-Za-z0-9_-]{20,300}(?![A-Za-z0-9_-])"),
        markers=("sk-",)),
    SecretRule("google_api_key", re.compile(
        r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])"),
        markers=("aiza",)),
    # Azure storage: the account key is base64 with "/", "+" and "==": redacted whole, up to
    # the ";" of the connection string.
    SecretRule("azure_storage_key", re.compile(
        r"(?i:account[\s_-]?key|shared[\s_-]?access[\s_-]?key|"
        r"(?:primary|secondary)[\s_-]?(?:access[\s_-]?|master[\s_-]?)?key)" + _SEP +
        r"(?P<secret>[A-Za-z0-9+/]{20,}={0,2})"),
        markers=("key",), gate=_keyword_gate),
    SecretRule("azure_sas_signature", re.compile(
        r"(?i:[?&;]sig=)(?P<secret>[A-Za-z0-9%+/=_-]{16,})"),
        markers=("sig=",)),
    SecretRule("azure_client_secret", re.compile(
        r"(?<![A-Za-z0-9_~.-])[A-Za-z0-9_~.-]{3}\dQ~[A-Za-z0-9_~.-]{31,34}(?![A-Za-z0-9_~.-])"),
        markers=("q~",)),
    SecretRule("jwt", re.compile(
        r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
        r"(?:\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*)?"),
        markers=("eyj",)),
    # scheme://user:password@host: keep scheme, user and host. The password runs to the last
    # "@" before the path, so a password holding "@" is redacted whole; the user may be empty
    # ("redis://:password@host").
    SecretRule("url_password", re.compile(
        r"\b[A-Za-z][A-Za-z0-9+.-]{1,20}://[^\s:/?#@\[\]]{0,256}:"
        r"(?P<secret>[^\s/?#\[\]]{1,256})@"), _not_redacted,
        markers=("://",)),
    # A bearer value of 8+ characters, or a shorter one holding a digit or a symbol: "the bearer
    # of bad news" keeps its words, "Bearer abc123" does not keep its token.
    SecretRule("bearer_token", re.compile(
        r"\b(?i:bearer)[ \t]+(?P<secret>[A-Za-z0-9._~+/-]{8,}=*"
        r"|(?=[A-Za-z0-9._~+/-]*[0-9._~+/-])[A-Za-z0-9._~+/-]+=*)"),
        markers=("bearer",)),
    SecretRule("basic_auth", re.compile(
        r"(?i:authorization)[\"']?\s*[:=]\s*[\"']?(?i:basic)[ \t]+"
        r"(?P<secret>[A-Za-z0-9+/]{8,}={0,2})"),
        markers=("basic",)),
    SecretRule("password", re.compile(
        _PASSWORD_LABEL + r"[\"']?\s*[:=]\s*(?P<q>[\"'])(?P<secret>[^\"'\n]{1,256})(?P=q)"),
        _not_redacted, markers=("pass", "pwd")),
    SecretRule("password", re.compile(
        _PASSWORD_LABEL + r"[\"']?\s*[:=]\s*(?P<secret>[^\s\"',;&\[\]{}<>]{1,256})"),
        _not_redacted, markers=("pass", "pwd")),
    SecretRule("api_key", re.compile(
        _KEYWORD_SECRET + _SEP + r"(?P<secret>[A-Za-z0-9_\-+/=.~]{16,512})"),
        _context_secret, markers=_LABEL_WORDS, gate=_keyword_gate),
    SecretRule("api_key", re.compile(
        r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{32,1024}(?![A-Za-z0-9_-])"),
        _standalone_secret, gate=_long_mixed_run),
)
"""The rules, in the order they run."""

# Mapping keys whose value is a secret end with one of these words (see secret_field_kind).
_FIELD_ENDINGS: Final = ("password", "passwd", "passphrase", "pwd", "secret", "key", "token",
                         "bearer", "credential", "credentials", "authorization", "cookie")
# In JSON a member name ends with its closing quote and ":".
_FIELD_GATES: Final = tuple(
    (word, re.compile(re.escape(word) + r"\"\s*:")) for word in _FIELD_ENDINGS
)


def _minimal(words: set[str]) -> set[str]:
    """The words no other word is contained in: ``key`` stands for ``private key``."""
    return {w for w in words if not any(o != w and o in w for o in words)}


def _marker_scan(words: set[str]) -> re.Pattern[str]:
    """One regex finding any of ``words``, shaped as a trie on the first character.

    A plain alternation of 20 words tries each at every position; grouped by first character,
    a position whose character starts no word costs one test. No kept word is a prefix of
    another, so at most one word starts at a position.
    """
    by_first: dict[str, list[str]] = {}
    for word in sorted(words):
        by_first.setdefault(word[0], []).append(re.escape(word[1:]))
    return re.compile("|".join(
        f"{re.escape(first)}(?:{'|'.join(sorted(rests, key=len, reverse=True))})"
        for first, rests in sorted(by_first.items())
    ))


# Every marker of every rule and every field ending, reduced to the words the others contain.
_WORDS: Final = _minimal({m for rule in SECRET_RULES for m in rule.markers} | set(_FIELD_ENDINGS))
_MARKER_SCAN: Final = _marker_scan(_WORDS)
# For each scan word, the rules and field endings one of whose markers contains it: only they
# can match when that word is present.
_RULES_BY_WORD: Final[Mapping[str, frozenset[int]]] = {
    word: frozenset(i for i, rule in enumerate(SECRET_RULES)
                    if any(word in marker for marker in rule.markers))
    for word in _WORDS
}
_FIELDS_BY_WORD: Final[Mapping[str, tuple[tuple[str, re.Pattern[str]], ...]]] = {
    word: tuple((ending, gate) for ending, gate in _FIELD_GATES if word in ending)
    for word in _WORDS
}
_MARKERLESS: Final = frozenset(i for i, rule in enumerate(SECRET_RULES) if not rule.markers)


def _found_words(lowered: str) -> set[str]:
    """Every scan word in ``lowered``, overlapping ones included (each search restarts one
    character after the last hit, so "secretoken" yields both words)."""
    found: set[str] = set()
    match = _MARKER_SCAN.search(lowered)
    while match is not None:
        found.add(match.group())
        match = _MARKER_SCAN.search(lowered, match.start() + 1)
    return found


def _candidates(text: str, lowered: str) -> list[SecretRule]:
    """The rules that can match ``text``, in order (the markerless ones after their gate)."""
    found = _found_words(lowered)
    indices = set(_MARKERLESS)
    for word in found:
        indices |= _RULES_BY_WORD[word]
    return [SECRET_RULES[i] for i in sorted(indices)
            if SECRET_RULES[i].may_match(text, lowered)]


# --- applying them ---------------------------------------------------------------------------


def redact_secrets_counted(
    text: str, digests: dict[str, None] | None = None
) -> tuple[str, Counter[str]]:
    """``text`` with every secret replaced, and how many of each kind were replaced.

    ``digests`` (when given) receives the sha256 (hex) of every redacted value, so that an
    audit can prove what was removed without storing it.
    """
    counts: Counter[str] = Counter()
    rules = _candidates(text, text.lower())
    if not rules:
        return text, counts  # the common case: one scan, no rule runs
    for rule in rules:
        def replace(match: re.Match[str], rule: SecretRule = rule) -> str:
            group = "secret" if "secret" in match.re.groupindex else 0
            value = match.group(group)
            if rule.accept is not None and not rule.accept(value):
                return match.group(0)
            counts[rule.kind] += 1
            if digests is not None:
                digests[_sha256(value)] = None
            start, end = match.span(group)
            whole = match.group(0)
            offset = match.start(0)
            return whole[: start - offset] + f"[REDACTED:{rule.kind}]" + whole[end - offset:]

        # A rule chosen on the original text may find nothing once an earlier rule replaced
        # its match; a rule not chosen cannot match a "[REDACTED:…]" marker either.
        text = rule.pattern.sub(replace, text)
    return text, counts


def redact_secrets(text: str) -> str:
    """``text`` with every match of :data:`SECRET_RULES` replaced by ``[REDACTED:<kind>]``."""
    return redact_secrets_counted(text)[0]


def may_hold_secret(text: str) -> bool:
    """False only when no rule can match ``text``, nor any string JSON-encoded inside it, and
    no JSON member named like a secret (:func:`secret_field_kind`) is in it.

    A cheap test (one scan for marker words, one for long runs) that lets clean text skip the
    rules. The markers hold no character that JSON escapes and the label gates accept escaped
    quotes, so a serialized event that fails this test holds no string or member that needs
    redaction.
    """
    lowered = text.lower()
    found = _found_words(lowered)
    for word in found:
        if any(gate.search(lowered) is not None for _ending, gate in _FIELDS_BY_WORD[word]):
            return True
    indices = set(_MARKERLESS)
    for word in found:
        indices |= _RULES_BY_WORD[word]
    return any(SECRET_RULES[i].may_match(text, lowered) for i in indices)


# Mapping keys whose value is a secret whatever it looks like: "password", "db_password",
# "X-Api-Key", "client_secret", "refresh-token", "Authorization", "cookie".
_SECRET_FIELD: Final = re.compile(
    r"(?:.*[_.\s-])?(?P<kind>password|passwd|passphrase|pwd|secret|client[_\s-]?secret|"
    r"secret[_\s-]?(?:access[_\s-]?)?key|api[_\s-]?key|apikey|access[_\s-]?key|private[_\s-]?key|"
    r"account[_\s-]?key|token|auth[_\s-]?token|access[_\s-]?token|refresh[_\s-]?token|"
    r"id[_\s-]?token|bearer|credentials?|authorization|cookie|set[_\s-]?cookie)",
    re.IGNORECASE,
)
_FIELD_KINDS: Final[Mapping[str, str]] = {
    "password": "password", "passwd": "password", "passphrase": "password", "pwd": "password",
    "authorization": "credential", "cookie": "credential", "bearer": "bearer_token",
}


def secret_field_kind(name: str) -> str | None:
    """The kind of secret a mapping key names (``"db_password"`` → ``password``), or ``None``.

    Used where a label and its value are separate strings (tool arguments, headers), which the
    text rules cannot see together.
    """
    match = _SECRET_FIELD.fullmatch(name.strip())
    if match is None:
        return None
    kind = re.sub(r"[_\s-]", "", match.group("kind").lower())
    if kind.startswith("set"):
        kind = "cookie"
    return _FIELD_KINDS.get(kind, "password" if "pass" in kind else "api_key")
