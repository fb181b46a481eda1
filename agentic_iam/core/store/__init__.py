"""Stores: where budgets, rate limits, revocations, session state and approvals live.

One protocol (:class:`Store`) and three implementations: :class:`MemoryStore` (one process, the
default and the test double), :class:`SqliteStore` (one host, many processes) and
:class:`RedisStore` (many hosts; needs ``pip install "agentic-iam[redis]"``). Every check and the
change that depends on it is one atomic step in each. Importing this package must never import
``redis``: :class:`RedisStore` imports it when it is constructed.
"""

from __future__ import annotations

from agentic_iam.core.store.base import (
    AdmitRequest,
    AdmitResult,
    ApprovalStatus,
    Charge,
    Dimension,
    FinishRequest,
    Outcome,
    RateLimit,
    SessionState,
    Store,
)
from agentic_iam.core.store.memory import MemoryStore
from agentic_iam.core.store.redis import RedisStore
from agentic_iam.core.store.sqlite import SqliteStore

__all__ = [
    "AdmitRequest",
    "AdmitResult",
    "ApprovalStatus",
    "Charge",
    "Dimension",
    "FinishRequest",
    "MemoryStore",
    "Outcome",
    "RateLimit",
    "RedisStore",
    "SessionState",
    "SqliteStore",
    "Store",
]
