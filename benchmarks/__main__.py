"""``python -m benchmarks``: every benchmark in one run, one table, with the machine it ran on.

Each ``benchmarks/bench_*.py`` exposes ``run() -> list[(label, value)]``: values are medians in
microseconds, or ratios when the label starts with ``ratio`` (or ends with ``x``). Ratios are
measured within one run, so they compare like with like on a noisy machine.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
import time
from datetime import datetime, timezone

MODULES = ("bench_guard", "bench_policy", "bench_store", "bench_audit", "bench_langchain",
           "bench_llama_index", "bench_openai_agents")


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), "
            f"Python {platform.python_version()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


def main() -> None:
    print(f"agentic-iam benchmarks — {_machine()}")
    print(f"{'benchmark':<18} {'measurement':<62} {'value':>12}")
    print("-" * 94)
    for name in MODULES:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ImportError as exc:  # an adapter whose extra is not installed
            print(f"{name:<18} skipped: {exc}")
            continue
        started = time.perf_counter()
        try:
            rows = module.run()
        except Exception as exc:
            print(f"{name:<18} FAILED: {type(exc).__name__}: {exc}")
            continue
        for label, value in rows:
            ratio = label.startswith("ratio") or label.endswith(" x")
            shown = f"{value:.2f} x" if ratio else f"{value:.1f} us"
            print(f"{name:<18} {label:<62} {shown:>12}")
        print(f"{'':<18} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
