"""Recipient lists are parsed into sets before any policy reads them (issue 13 item 10)."""

from __future__ import annotations

import pytest

from agentic_iam.core.recipients import INVALID_DOMAIN, parse_recipients, recipients_context


@pytest.mark.parametrize(("value", "addresses"), [
    ("boss@example.com", {"boss@example.com"}),
    ("ops@evil.example,boss@example.com", {"ops@evil.example", "boss@example.com"}),
    ("boss@example.com; ops@evil.example", {"ops@evil.example", "boss@example.com"}),
    ("Boss <Boss@Example.com>", {"boss@example.com"}),
    ('"boss@example.com" <ops@evil.example>', {"ops@evil.example"}),
    ('"Ops, Team; Night" <ops@example.com>, b@example.com', {"ops@example.com", "b@example.com"}),
    ("a@example.com, ", {"a@example.com"}),
    (["a@example.com", "B <b@evil.example>"], {"a@example.com", "b@evil.example"}),
])
def test_lists_parse_into_every_address(value: object, addresses: set[str]) -> None:
    parsed = parse_recipients({"to": value}, ["to"])
    assert parsed.addresses == addresses
    assert parsed.domains == {a.rpartition("@")[2] for a in addresses}


@pytest.mark.parametrize("value", [
    "", "   ", "not an address", "boss@example.com <ops@evil.example",
    "boss@example.com>", '"unterminated <a@example.com>', "a@b@example.com",
    "Boss <a@example.com> <b@evil.example>", "boss@example.com ops@evil.example",
    "ops@evil.example\n,boss@example.com<", 42, None, [], ["a@example.com", 5],
    ",".join(f"u{n}@example.com" for n in range(101)),
])
def test_anything_else_is_invalid_and_never_internal(value: object) -> None:
    parsed = parse_recipients({"to": value}, ["to"])
    assert INVALID_DOMAIN in parsed.domains


def test_context_uses_declared_or_usual_names() -> None:
    arguments = {"to": "a@example.com", "cc": "c@evil.example", "subject": "x@y.example"}
    usual = recipients_context(None, arguments)
    assert usual["recipient_domains"] == {"example.com", "evil.example"}
    declared = recipients_context(["to"], arguments)
    assert declared["recipients"] == {"a@example.com"}
    assert recipients_context([], arguments)["recipients"] == frozenset()
