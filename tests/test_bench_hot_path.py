"""The issue-15 benchmark runs and measures every row (a smoke run: tiny sample counts; speed is
reported by ``python -m benchmarks``, never asserted here)."""

from __future__ import annotations

from benchmarks import bench_hot_path
from benchmarks.__main__ import _targets


def test_the_hot_path_benchmark_measures_every_target_row() -> None:
    rows = dict(bench_hot_path.run(n=30, throughput_calls=6))
    for label in ("full call, refund, memory, 200-char output",
                  "full call, kb search repeated (decision cache)",
                  "full call, refund + JSONL buffered, signed head",
                  "firewall per output char (100 KB - 200 B)",
                  "ratio redis / memory, full call",
                  "ratio 1000 / 10 policies on the action,"):
        assert rows[f"{label} p50"] > 0 and rows[f"{label} p99"] > 0, label
    assert rows["redis round trips per guarded call"] >= 1
    assert rows["decisions per s, 1 process, redis"] > 0
    assert rows["decisions per s, 2 processes, redis"] > 0
    measures = [row[0] for row in _targets(rows, {})]
    assert len(measures) == 8  # every row of the hot-path module is in the targets table
