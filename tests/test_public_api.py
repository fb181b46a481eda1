"""House rules 1 and 2: one public import path, and a framework-free core."""

from __future__ import annotations

import inspect
import subprocess
import sys

import agentic_iam
from agentic_iam import errors


def test_every_exception_is_exported_at_the_top() -> None:
    classes = {name for name, obj in vars(errors).items()
               if inspect.isclass(obj) and issubclass(obj, errors.AgenticIAMError)}
    assert classes, "the error module defines the tree"
    missing = classes - set(agentic_iam.__all__)
    assert not missing, f"not exported from agentic_iam: {sorted(missing)}"
    for name in classes:
        assert getattr(agentic_iam, name) is getattr(errors, name)


def test_every_error_derives_from_the_one_base() -> None:
    for name in errors.__all__:
        obj = getattr(errors, name)
        assert issubclass(obj, errors.AgenticIAMError), name


def test_all_names_resolve() -> None:
    for name in agentic_iam.__all__:
        assert hasattr(agentic_iam, name), name


def test_the_two_line_start_and_the_core_api_are_public() -> None:
    from agentic_iam.core import binding, mediation, memory
    from agentic_iam.project import Delegation, Project, init_project, load

    expected = {"load": load, "Project": Project, "Delegation": Delegation,
                "init_project": init_project, "bind": binding.bind,
                "current_token": binding.current_token, "Mediated": mediation.Mediated,
                "ApprovalAnswer": mediation.ApprovalAnswer,
                "current_decision": mediation.current_decision,
                "MemoryFiltered": memory.MemoryFiltered, "DroppedItem": memory.DroppedItem}
    for name, obj in expected.items():
        assert name in agentic_iam.__all__, name
        assert getattr(agentic_iam, name) is obj, name
    assert list(agentic_iam.__all__) == sorted(set(agentic_iam.__all__), key=lambda n: (
        0 if n[0].isupper() else 1 if n.startswith("__") else 2, n)), "sorted, no duplicates"


FRAMEWORKS = ("langchain", "langchain_core", "langgraph", "llama_index", "agents", "openai",
              "redis", "opentelemetry")


def test_core_imports_no_agent_framework() -> None:
    code = (
        "import sys, agentic_iam, agentic_iam.cli\n"
        "import agentic_iam.core.guard, agentic_iam.core.broker, agentic_iam.core.provenance\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"the core imported: {out.stdout.strip()}"


def test_core_sources_never_import_a_framework() -> None:
    import ast
    import pathlib

    root = pathlib.Path(agentic_iam.__file__).parent / "core"
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FRAMEWORKS[:5], f"{path} imports {name}"
