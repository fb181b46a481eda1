"""Recipient lists: one argument, many addresses, parsed before any policy reads them.

A mail tool's ``to`` is often a list in one string: ``"ops@evil.example,boss@example.com"``,
``"Boss <boss@example.com>; ops@evil.example"``. A policy that matches the whole string
(``like "*@example.com"``) is fooled by the last entry. The Guard parses every recipient
argument into a set of addresses and their domains, and policies ask about the set
(``context.recipient_domains``): every recipient must satisfy a rule, not the string.

Parsing is strict and fails closed: a part that is not one plain address (with an optional
display name) makes the argument *unparseable*, reported as the domain ``INVALID_DOMAIN``, which
no allow-list contains. It never uses :func:`email.utils.getaddresses`, whose lenient parsing
of malformed input has disagreed with mail servers (CPython gh-102988).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "DEFAULT_RECIPIENT_ARGUMENTS",
    "INVALID_DOMAIN",
    "Recipients",
    "parse_recipients",
    "recipient_argument_names",
    "recipients_context",
]

#: Argument names read as recipient lists when a tool does not declare its own.
DEFAULT_RECIPIENT_ARGUMENTS: frozenset[str] = frozenset(
    {"to", "cc", "bcc", "recipient", "recipients", "reply_to"})

#: The domain reported for a recipient argument that does not parse: no allow-list names it.
INVALID_DOMAIN = "invalid.recipient"

_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
_ADDRESS = re.compile(rf"({_LOCAL})@({_DOMAIN})")
# An optional display name (a quoted string or plain words without address syntax), then the
# address in angle brackets.
_NAMED = re.compile(r'(?:"(?:[^"\\]|\\.)*"|[^"<>@,;:]*)\s*<([^<>]*)>')
_MAX_RECIPIENTS = 100


@dataclass(frozen=True)
class Recipients:
    """The addresses named by a tool call's recipient arguments."""

    addresses: frozenset[str]
    """Every address, case folded (``boss@example.com``)."""
    domains: frozenset[str]
    """Their domains; ``INVALID_DOMAIN`` when an argument did not parse."""


def _split(value: str) -> list[str] | None:
    """Split on ``,`` and ``;`` outside quotes and angle brackets; None if unbalanced."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    depth = 0
    for ch in value:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth -= 1
            if depth < 0:
                return None
        elif not quoted and depth == 0 and ch in ",;":
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quoted or depth:
        return None
    parts.append("".join(current))
    return parts


def _address(part: str) -> str | None:
    part = part.strip()
    named = _NAMED.fullmatch(part)
    candidate = named.group(1).strip() if named else part
    match = _ADDRESS.fullmatch(candidate)
    if match is None:
        return None
    return f"{match.group(1)}@{match.group(2)}".casefold()


def _addresses_of(value: object) -> list[str] | None:
    """The addresses of one argument value (a string or a list of strings), or None."""
    if isinstance(value, str):
        parts = _split(value)
        if parts is None:
            return None
        out: list[str] = []
        for part in parts:
            if not part.strip():
                continue  # "a@x.com, " has an empty tail, as mail clients write it
            address = _address(part)
            if address is None:
                return None
            out.append(address)
        return out or None
    if isinstance(value, (list, tuple)) and value:
        out = []
        for item in value:
            found = _addresses_of(item) if isinstance(item, str) else None
            if found is None:
                return None
            out.extend(found)
        return out
    return None


def parse_recipients(arguments: Mapping[str, object], names: Iterable[str]) -> Recipients:
    """The recipients named by ``arguments[name]`` for each ``name`` present.

    An argument that is not a parseable address list (or names more than 100 addresses)
    contributes ``INVALID_DOMAIN``.
    """
    addresses: set[str] = set()
    domains: set[str] = set()
    for name in names:
        if name not in arguments:
            continue
        found = _addresses_of(arguments[name])
        if found is None or len(found) > _MAX_RECIPIENTS:
            domains.add(INVALID_DOMAIN)
            continue
        for address in found:
            addresses.add(address)
            domains.add(address.rpartition("@")[2])
    return Recipients(frozenset(addresses), frozenset(domains))


def recipient_argument_names(declared: Iterable[str] | None,
                             arguments: Mapping[str, object]) -> frozenset[str]:
    """The recipient arguments present in a call: the tool's declared ones, else the usual."""
    names = DEFAULT_RECIPIENT_ARGUMENTS if declared is None else declared
    return frozenset(n for n in names if n in arguments)


def recipients_context(declared: Iterable[str] | None,
                       arguments: Mapping[str, object]) -> dict[str, frozenset[str]]:
    """``recipients`` and ``recipient_domains`` of the policy context for one call."""
    names = recipient_argument_names(declared, arguments)
    if not names:
        return {"recipients": frozenset(), "recipient_domains": frozenset()}
    parsed = parse_recipients(arguments, sorted(names))
    return {"recipients": parsed.addresses, "recipient_domains": parsed.domains}
