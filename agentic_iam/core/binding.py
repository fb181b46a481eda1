"""The execution token of the run in progress, for enforcement points that cannot be handed one.

``with bind(token):`` makes ``token`` the current execution token for the block (a contextvar, so
it follows ``asyncio`` tasks and threads started with ``contextvars.copy_context``). Adapters look
for a token in their framework's run context first and fall back to :func:`current_token`.

What it must never do: hold an already-verified :class:`ExecutionIdentity` (anything in-process
can construct one; only a signed token the Guard verifies counts), or leak a token past its block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from agentic_iam.core.tokens import ExecutionToken

__all__ = ["bind", "current_token"]

_CURRENT: ContextVar[str | ExecutionToken | None] = ContextVar("agentic_iam_token", default=None)


@contextmanager
def bind(token: str | ExecutionToken) -> Iterator[str | ExecutionToken]:
    """Make ``token`` the current execution token inside the block; the previous one after it."""
    if isinstance(token, ExecutionToken):
        bound: str | ExecutionToken = token
    elif isinstance(token, str) and token:
        bound = token
    else:
        raise TypeError(f"bind() takes an execution token (str or ExecutionToken), "
                        f"got {type(token).__name__}")
    reset = _CURRENT.set(bound)
    try:
        yield bound
    finally:
        _CURRENT.reset(reset)


def current_token() -> str | ExecutionToken | None:
    """The execution token bound by the innermost :func:`bind` block, or ``None``."""
    return _CURRENT.get()
