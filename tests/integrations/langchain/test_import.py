"""Without the extra, importing the adapter names the extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCKED = ["langchain.agents.middleware", "langchain_core.tools", "langgraph.prebuilt",
           "langgraph.types"]


@pytest.mark.parametrize("module", BLOCKED)
def test_missing_framework_names_the_extra(module: str) -> None:
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"
        "from agentic_iam.errors import MissingExtraError\n"
        "try:\n"
        "    import agentic_iam.integrations.langchain\n"
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
    assert lines[0] == f"langchain {module.split('.')[0]}"
    assert 'pip install "agentic-iam[langchain]"' in lines[1]
    assert lines[2] == "True"


def test_missing_framework_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentic_iam.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "langchain.agents.middleware", None)
    monkeypatch.delitem(sys.modules, "agentic_iam.integrations.langchain", raising=False)
    with pytest.raises(MissingExtraError, match=r"agentic-iam\[langchain\]"):
        import agentic_iam.integrations.langchain  # noqa: F401
    # monkeypatch restores the blocked module; drop the half-imported adapter as well
    monkeypatch.delitem(sys.modules, "agentic_iam.integrations.langchain", raising=False)
