"""``aiam demo``: the mission's story end to end, offline, through the Guard and each adapter."""

from __future__ import annotations

from agentic_iam.demo.run import DemoReport, run_demo

__all__ = ["DemoReport", "run_demo"]
