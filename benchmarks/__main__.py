"""``python -m benchmarks``: every benchmark in one run, one table, with the machine it ran on.

Each ``benchmarks/bench_*.py`` exposes ``run() -> list[(label, value)]``: values are medians in
microseconds, or ratios when the label starts with ``ratio`` (or ends with ``x``). Ratios are
measured within one run, so they compare like with like on a noisy machine.

After the full table comes the table of issue 15's targets (p50, p99, target), computed from the
same run. ``python -m benchmarks --markdown`` prints that table as Markdown too: the README's
performance table is pasted from it.
"""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

MODULES = ("bench_hot_path", "bench_guard", "bench_policy", "bench_store", "bench_audit",
           "bench_langchain", "bench_llama_index", "bench_openai_agents")


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


def _unit(label: str, value: float) -> str:
    if label.startswith("ratio") or label.endswith(" x"):
        return f"{value:.2f} x"
    if "per s" in label:
        return f"{value:,.0f} /s"
    if "round trips" in label:
        return f"{value:.0f}"
    if "per output char" in label:
        return f"{value:.3f} us"
    return f"{value:.1f} us"


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


Row = tuple[str, str, str, str]


def _targets(values: dict[str, float], samples: dict[str, dict[str, list[float]]]) -> list[Row]:
    """(measure, p50, p99, target) for each target of issue 15 that this run measured."""
    rows: list[Row] = []

    def pair(measure: str, label: str, target: str, fmt: str = "{:.0f} µs") -> None:
        if f"{label} p50" in values:
            rows.append((measure, fmt.format(values[f"{label} p50"]),
                         fmt.format(values[f"{label} p99"]), target))

    pair("authorize + screen + complete, memory store, 200-char output (refund)",
         "full call, refund, memory, 200-char output", "p50 ≤ 50 µs")
    pair("the same, a repeated read (Cedar decision cache hit)",
         "full call, kb search repeated (decision cache)", "—")
    pair("the refund with buffered JSONL audit (signed head on flush)",
         "full call, refund + JSONL buffered, signed head", "p50 ≤ 90 µs")
    pair("firewall cost per output character (100 KB output)",
         "firewall per output char (100 KB - 200 B)", "≤ 0.05 µs", "{:.3f} µs")
    pair("Redis store / memory store, full call", "ratio redis / memory, full call",
         "≤ 1.5×", "{:.2f}×")
    if "redis round trips per guarded call" in values:
        trips = f"{values['redis round trips per guarded call']:.0f}"
        rows.append(("Redis round trips per guarded call", trips, trips, "≤ 2"))
    lang = samples.get("bench_langchain", {})
    bare, guarded = "bare tool.invoke(ToolCall)", "GuardMiddleware.wrap_tool_call -> tool.invoke"
    if bare in lang and guarded in lang:
        rows.append(("LangChain `tool.invoke` guarded / bare",
                     f"{statistics.median(lang[guarded]) / statistics.median(lang[bare]):.2f}×",
                     f"{_p99(lang[guarded]) / _p99(lang[bare]):.2f}×", "≤ 1.25×"))
    for module, framework, bare, guarded in (
            ("bench_llama_index", "LlamaIndex", "bare FunctionTool.call",
             "guard_tools(...) FunctionTool.call"),
            ("bench_openai_agents", "Agents SDK", "bare FunctionTool.on_invoke_tool",
             "guarded (needs_approval + on_invoke_tool)")):
        found = samples.get(module, {})
        if bare in found and guarded in found:
            median = statistics.median(found[guarded]) - statistics.median(found[bare])
            rows.append((f"{framework}: added overhead per call (guarded − bare)",
                         f"{median:.0f} µs", f"{_p99(found[guarded]) - _p99(found[bare]):.0f} µs",
                         "≤ 60 µs"))
    pair("1000 policies on the same action / 10 (every call a cache miss)",
         "ratio 1000 / 10 policies on the action,", "≤ 1.5×", "{:.2f}×")
    one, two = "decisions per s, 1 process, redis", "decisions per s, 2 processes, redis"
    if one in values and two in values:
        rows.append(("full guarded calls per second, 1 / 2 processes, Redis",
                     f"{values[one]:,.0f} / {values[two]:,.0f}", "—", "≥ 20k per core"))
    return rows


def main() -> None:
    markdown = "--markdown" in sys.argv[1:]
    print(f"agentic-iam benchmarks — {_machine()}")
    print(f"{'benchmark':<18} {'measurement':<62} {'value':>12}")
    print("-" * 94)
    values: dict[str, float] = {}
    samples: dict[str, dict[str, list[float]]] = {}
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
            values[label] = value
            print(f"{name:<18} {label:<62} {_unit(label, value):>12}")
        samples[name] = {k: list(v) for k, v in getattr(module, "SAMPLES", {}).items()}
        print(f"{'':<18} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    targets = _targets(values, samples)
    print()
    print("Issue 15 targets, from this run")
    print(f"{'measure':<72} {'p50':>14} {'p99':>14}  target")
    for measure, p50, p99, target in targets:
        print(f"{measure:<72} {p50:>14} {p99:>14}  {target}")
    if markdown:
        print()
        print("| measure | p50 | p99 | target |")
        print("|---|---|---|---|")
        for measure, p50, p99, target in targets:
            print(f"| {measure} | {p50} | {p99} | {target} |")


if __name__ == "__main__":
    main()
