"""Without the extra, importing the adapter names the extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCKED = {
    "llama_index.core.agent.workflow": "llama-index-core",
    "llama_index.core.tools": "llama-index-core",
    "workflows.handler": "llama-index-workflows",
    "llama_index_instrumentation": "llama-index-instrumentation",
}


@pytest.mark.parametrize(("module", "package"), sorted(BLOCKED.items()))
def test_missing_framework_names_the_extra(module: str, package: str) -> None:
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('ignore')\n"
        f"sys.modules[{module!r}] = None\n"
        "from agentic_iam.errors import MissingExtraError\n"
        "try:\n"
        "    import agentic_iam.integrations.llama_index\n"
        "except MissingExtraError as exc:\n"
        "    print(exc.extra, exc.missing)\n"
        "    print(exc)\n"
        "    print(isinstance(exc, ImportError))\n"
        "else:\n"
        "    print('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == f"llama-index {package}"
    assert 'pip install "agentic-iam[llama-index]"' in lines[1]
    assert lines[2] == "True"


def test_missing_framework_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentic_iam.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "llama_index.core.agent.workflow", None)
    monkeypatch.delitem(sys.modules, "agentic_iam.integrations.llama_index", raising=False)
    with pytest.raises(MissingExtraError, match=r"agentic-iam\[llama-index\]"):
        import agentic_iam.integrations.llama_index  # noqa: F401
    monkeypatch.delitem(sys.modules, "agentic_iam.integrations.llama_index", raising=False)


def test_core_does_not_import_llama_index() -> None:
    code = ("import sys, agentic_iam, agentic_iam.integrations\n"
            "print(sorted(m for m in sys.modules if m.startswith(('llama_index', 'workflows'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
