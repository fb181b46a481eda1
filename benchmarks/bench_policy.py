"""Policy overhead: median microseconds of one ``CedarEngine.evaluate``, and what slicing saves.

Run ``python -m benchmarks.bench_policy``. The request is the demo's allowed refund (support-agent,
``create_refund`` of 50 USD, a full Guard-shaped context). Rows:

* the bundled policies (baseline + support + finance; the refund slice holds baseline + support);
* the same plus 990 unrelated actions in the registry/schema and one forbid per action (1000+
  policies): the refund slice is unchanged, so the time should be too;
* for contrast, the same request against *one* unsliced policy set of all those policies;
* the bundled policies with Cedar re-validating each request against the schema;
* the pieces: context encoding alone, and the raw Cedar call alone.

The machine is shared and noisy: read the ratios between rows (and ``reference/perf-anchors.md``:
Cedar with handles and dict uids ~45-70 us for 10 policies, ~1250 us for 1000 unsliced), not the
absolute numbers. This module only reads the bundled policies and writes nothing.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import cedarpy

from agentic_iam._resources import default_policies_dir, default_registry_path
from agentic_iam.core.identity import ToolSpec
from agentic_iam.core.policy.base import PolicyRequest
from agentic_iam.core.policy.cedar import CedarEngine
from agentic_iam.core.policy.fixtures import Fixture, build_request
from agentic_iam.core.registry import AgentRegistry

__all__ = ["run"]

UNRELATED = 990


def _median_us(call: Callable[[], Any], iterations: int, warmup: int) -> float:
    samples: list[float] = []
    for i in range(warmup + iterations):
        started = time.perf_counter_ns()
        call()
        elapsed = time.perf_counter_ns() - started
        if i >= warmup:
            samples.append(elapsed / 1000)
    return statistics.median(samples)


def _sources(root: Path) -> dict[str, str]:
    return {f"{f.parent.name}/{f.name}": f.read_text(encoding="utf-8")
            for f in sorted(root.glob("*/*.cedar"))}


def _big(registry: AgentRegistry, sources: dict[str, str]) -> tuple[AgentRegistry, dict[str, str]]:
    """``registry`` plus one agent with ``UNRELATED`` tools, and one forbid per new action."""
    support = registry.get("support-agent")
    assert support is not None
    tools = {f"noise_{i}": ToolSpec(f"noise_{i}", action=f"noise:a{i}",
                                    arguments={"n": "Long", "label": "String"})
             for i in range(UNRELATED)}
    noisy = replace(support, id="noise-agent", name="noise", tools=tools,
                    may_delegate_to=frozenset())
    noise = "".join(
        f'@id("noise.{i}")\nforbid (principal, action == Action::"noise:a{i}", resource)\n'
        f'when {{ context.args.n > {i} && context.args.label == "x{i}" }};\n'
        for i in range(UNRELATED))
    return AgentRegistry([*registry, noisy]), {**sources, "baseline/noise.cedar": noise}


def _refund(registry: AgentRegistry) -> PolicyRequest:
    fixture = Fixture(
        path=Path("<bench>"), policy_set="support", folder="ALLOW", description="bench",
        agent="support-agent", tool="create_refund",
        arguments={"amount": 50, "currency": "USD", "account": "ACC-1001"},
        context={"session": {"call_count": 2, "action_count": 1,
                             "prior_actions": ["kb:search", "refund:create"]},
                 "risk": {"score": 6}},
        identity={}, expect="allow")
    return build_request(registry, fixture)


def _check(engine: CedarEngine, request: PolicyRequest) -> None:
    result = engine.evaluate(request)
    if result.outcome != "allow":
        raise RuntimeError(f"benchmark request was not allowed: {result}")


def run(iterations: int = 3000, warmup: int = 300) -> list[tuple[str, float]]:
    """``(label, median us)`` per row (see the module docstring)."""
    registry = AgentRegistry.from_yaml(default_registry_path())
    sources = _sources(default_policies_dir())
    small = CedarEngine.from_sources(sources, registry)
    big_registry, big_sources = _big(registry, sources)
    big = CedarEngine.from_sources(big_sources, big_registry)
    request = _refund(registry)
    big_request = _refund(big_registry)
    _check(small, request)
    _check(big, big_request)

    rows: list[tuple[str, float]] = []
    in_slice = len(small.slice_ids("support", "refund:create"))
    rows.append((f"evaluate, {small.policy_count} policies ({in_slice} in the slice)",
                 _median_us(lambda: small.evaluate(request), iterations, warmup)))
    big_slice = len(big.slice_ids("support", "refund:create"))
    rows.append((f"evaluate, {big.policy_count} policies ({big_slice} in the slice)",
                 _median_us(lambda: big.evaluate(big_request), iterations, warmup)))

    # The same decision without slicing: every policy in one handle (what slicing avoids).
    everything = cedarpy.PolicySet.from_json_str(json.dumps({
        "staticPolicies": {p.id: p.est for p in big.policies if p.policy_set != "finance"},
        "templates": {}, "templateLinks": []}))
    plan = big._plans["refund:create"]
    full = plan.encoder(True)  # unsliced: every attribute may be read
    entities = big._entities_of(big_request.identity, big_request.agent)
    uid = {"type": "Execution", "id": big_request.identity.execution_id}
    resource = {"type": "Tool", "id": "create_refund"}

    def unsliced() -> Any:
        context = {**big_request.context, "args": big_request.arguments}
        encoded = json.dumps(full(context), separators=(",", ":"))
        return big._backend.authorize({"principal": uid, "action": plan.action_uid,
                                       "resource": resource, "context": encoded},
                                      everything, entities, None)

    if unsliced().get("decision") != "Allow":
        raise RuntimeError("the unsliced benchmark request was not allowed")
    rows.append((f"same request, unsliced ({len(everything)} policies in one set)",
                 _median_us(unsliced, max(iterations // 10, 100), max(warmup // 10, 10))))

    strict = CedarEngine.from_sources(sources, registry, validate_requests=True)
    _check(strict, request)
    rows.append((f"evaluate, {strict.policy_count} policies, validate_requests=True",
                 _median_us(lambda: strict.evaluate(request), iterations, warmup)))

    small_plan = small._plans["refund:create"]
    chosen = small._slice("support", "refund:create")

    def encode() -> str:
        context = {**request.context, "args": request.arguments}
        return json.dumps(chosen.encode(context), separators=(",", ":"))

    rows.append(("piece: context check + pruned encoding + json.dumps",
                 _median_us(encode, iterations, warmup)))
    encoded = encode()
    small_entities = small._entities_of(request.identity, request.agent)
    raw_request = {"principal": {"type": "Execution", "id": request.identity.execution_id},
                   "action": small_plan.action_uid, "resource": resource, "context": encoded}
    rows.append(("piece: the Cedar call alone (handles, dict uids)",
                 _median_us(lambda: small._backend.authorize(raw_request, chosen.policies,
                                                             small_entities, None),
                            iterations, warmup)))
    return rows


def main() -> None:
    rows = run()
    base = rows[0][1]
    print(f"{'operation':<62} {'median us':>10} {'x first':>8}")
    for label, median in rows:
        print(f"{label:<62} {median:>10.1f} {median / base:>8.2f}")


if __name__ == "__main__":
    main()
