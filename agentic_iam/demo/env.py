"""Wiring for the demo, the notebooks and the framework stories: one place, no magic.

Everything is built from the bundled registry and policies: keys, broker, Cedar engine, a
JSONL audit log (hash-chained, signed head) plus an in-memory copy for the timeline, and a Guard.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from agentic_iam._resources import default_policies_dir, default_registry_path
from agentic_iam.core.approvals import Approver
from agentic_iam.core.broker import DelegationBroker
from agentic_iam.core.guard import Guard
from agentic_iam.core.keys import KeySet
from agentic_iam.core.policy.cedar import CedarEngine
from agentic_iam.core.provenance import HeadSigner, JsonlSink, MemorySink, Recorder
from agentic_iam.core.registry import AgentRegistry
from agentic_iam.core.store.base import Store
from agentic_iam.core.store.memory import MemoryStore
from agentic_iam.demo.tools import Backend

__all__ = ["DemoEnv", "build_env"]

ISSUER = "https://broker.demo.agentic-iam"
AUDIENCE = "agentic-iam-demo"


@dataclass
class DemoEnv:
    """Everything a demo story needs."""

    registry: AgentRegistry
    keys: KeySet
    broker: DelegationBroker
    guard: Guard
    memory: MemorySink
    recorder: Recorder
    audit_path: Path
    backend: Backend = field(default_factory=Backend)

    def close(self) -> None:
        self.recorder.close()


def build_env(*, audit_path: Path | None = None, approver: Approver | None = None,
              store: Store | None = None, registry_path: Path | None = None,
              policies_dir: Path | None = None) -> DemoEnv:
    """Build the demo wiring. ``audit_path`` defaults to a fresh temporary file."""
    registry = AgentRegistry.from_yaml(registry_path or default_registry_path())
    keys = KeySet.generate(ISSUER)
    if audit_path is None:
        audit_path = Path(tempfile.mkdtemp(prefix="aiam-demo-")) / "audit.jsonl"
    memory = MemorySink()
    signer = HeadSigner(keys.active.private_key, keys.active.kid)  # type: ignore[arg-type]
    jsonl = JsonlSink(audit_path, durability="flush", signer=signer)
    recorder = Recorder([jsonl, memory])
    backing = store or MemoryStore()
    broker = DelegationBroker(registry, keys, audience=AUDIENCE, store=backing,
                              recorder=recorder)
    engine = CedarEngine.from_directory(policies_dir or default_policies_dir(), registry)
    guard = Guard.from_broker(broker, engine, approver=approver)
    return DemoEnv(registry, keys, broker, guard, memory, recorder, audit_path)
