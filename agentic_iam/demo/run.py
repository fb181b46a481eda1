"""Run the demo stories and render them: timeline, audit verification, delegation tree.

Must never need a network, an API key or a server: scripted models, memory store, JSONL audit.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from agentic_iam.core.audit_export import ExecutionNode, delegation_tree
from agentic_iam.core.provenance import VerifyReport, verify_log
from agentic_iam.core.tokens import ExecutionToken
from agentic_iam.demo.env import DemoEnv, build_env
from agentic_iam.demo.story import StepResult, demo_approver, run_core_story

__all__ = ["FRAMEWORKS", "DemoReport", "available_frameworks", "run_demo"]

Story = Callable[[DemoEnv], tuple[list[StepResult], ExecutionToken]]


def _story(module: str, function: str) -> Story:
    def run(env: DemoEnv) -> tuple[list[StepResult], ExecutionToken]:
        mod = importlib.import_module(module)
        story: Story = getattr(mod, function)
        return story(env)

    return run


#: framework name → (the package that must be installed, the story)
FRAMEWORKS: dict[str, tuple[str | None, Story]] = {
    "core": (None, run_core_story),
    "langchain": ("langchain", _story("agentic_iam.demo.frameworks", "run_langchain_story")),
    "llama_index": ("llama_index.core",
                    _story("agentic_iam.demo.frameworks", "run_llama_index_story")),
    "openai_agents": ("agents", _story("agentic_iam.demo.frameworks",
                                       "run_openai_agents_story")),
}


def available_frameworks() -> list[str]:
    names = []
    for name, (package, _) in FRAMEWORKS.items():
        try:
            if package is None or importlib.util.find_spec(package) is not None:
                names.append(name)
        except (ImportError, ValueError):
            continue
    return names


@dataclass
class DemoReport:
    """What the demo did and found."""

    steps: list[StepResult]
    audit_path: Path
    verify: VerifyReport
    trees: list[ExecutionNode]
    approvals: list[str]
    executed: list[tuple[str, dict[str, Any]]]
    frameworks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verify.ok

    def to_json(self) -> dict[str, Any]:
        return {
            "frameworks": self.frameworks,
            "steps": [s.to_json() for s in self.steps],
            "audit": {"path": str(self.audit_path), "ok": self.verify.ok,
                      "records": self.verify.count, "problem": self.verify.problem},
            "approvals": self.approvals,
            "executed": [{"tool": t, "arguments": a} for t, a in self.executed],
        }


def run_demo(frameworks: Sequence[str] | None = None, *, audit_path: Path | None = None
             ) -> DemoReport:
    """Run the story through each requested framework (default: every installed one)."""
    chosen = list(frameworks or available_frameworks())
    unknown = [f for f in chosen if f not in FRAMEWORKS]
    if unknown:
        raise ValueError(f"unknown framework `{unknown[0]}` (choose from {', '.join(FRAMEWORKS)})")
    approvals: list[str] = []
    env = build_env(audit_path=audit_path, approver=demo_approver(approvals))
    steps: list[StepResult] = []
    roots: list[str] = []
    try:
        for name in chosen:
            story_steps, token = FRAMEWORKS[name][1](env)
            steps += story_steps
            roots.append(token.identity.execution_id)
    finally:
        env.close()
    report = verify_log(env.audit_path, public_keys=env.keys.public_keys())
    events = list(env.memory.events)
    trees = [t for t in (delegation_tree(events, root) for root in roots) if t is not None]
    return DemoReport(steps, env.audit_path, report, trees, approvals,
                      list(env.backend.executed), chosen)


_STYLE = {"allow": "green", "deny": "red", "approval_required": "yellow"}


def _args(arguments: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in arguments.items() if k not in ("body", "subject"))
    return text if len(text) < 60 else text[:57] + "..."


def _tree_node(branch: Tree, node: ExecutionNode) -> None:
    label = Text(f"{node.agent_id} · {node.execution_id}", style="bold")
    sub = branch.add(label)
    if node.capabilities:
        sub.add(Text("grant: " + "; ".join(node.capabilities), style="cyan"))
    for call in node.calls:
        style = _STYLE.get(call.decision or "", "white")
        why = f" ({', '.join(call.reasons)})" if call.reasons else ""
        sub.add(Text(f"{call.tool}: {call.decision}{why}", style=style))
    for child in node.children:
        _tree_node(sub, child)


def render(report: DemoReport, console: Console) -> None:
    console.rule("[bold]agentic-iam demo[/bold]: Alice's refund, one execution identity per run")
    table = Table(title="decision timeline", show_lines=False)
    for column in ("#", "framework", "agent", "call", "decision", "why"):
        table.add_column(column, overflow="fold")
    for index, step in enumerate(report.steps, 1):
        why = step.reason_code + (f" [{', '.join(step.policy_ids)}]" if step.policy_ids else "")
        if step.approval:
            why += f" · approval {step.approval}"
        call = f"{step.tool}({_args(step.arguments)})"
        table.add_row(str(index), step.framework, step.agent, call,
                      Text(step.outcome, style=_STYLE.get(step.outcome, "white")), why)
    console.print(table)
    for line in report.approvals:
        console.print(f"[yellow]•[/yellow] {line}", highlight=False)
    ticket = next((s for s in report.steps if s.tool == "read_ticket" and s.outcome == "allow"),
                  None)
    if ticket is not None:
        console.print("\n[bold]what the model saw of the injected ticket[/bold] "
                      f"(findings: {', '.join(ticket.findings) or 'none'}):")
        console.print(Text(ticket.model_saw or ""))
    never = [s for s in report.steps if s.outcome != "allow"]
    console.print(f"\n{len(never)} calls were refused or held; the back-end ran "
                  f"{len(report.executed)} calls, none of them refused ones.")
    verdict = ("[green]intact[/green]" if report.verify.ok else
               f"[red]BROKEN at record {report.verify.first_bad_index}: "
               f"{report.verify.problem}[/red]")
    console.print(f"\naudit log {report.audit_path}: {report.verify.count} records, "
                  f"hash chain and signed head {verdict}")
    console.print(f"  (check it yourself: aiam audit verify {report.audit_path})")
    for framework, node in zip(report.frameworks, report.trees, strict=False):
        tree = Tree(Text(f"delegation tree ({framework}) — delegated by "
                         f"{node.delegator or 'alice'}", style="bold"))
        _tree_node(tree, node)
        console.print(tree)


def main(frameworks: Sequence[str] | None, audit: Path | None, as_json: bool) -> int:
    report = run_demo(frameworks, audit_path=audit)
    if as_json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=140)
        render(report, console)
    return 0 if report.ok else 1
