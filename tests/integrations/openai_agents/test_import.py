"""Without the extra, importing the adapter names the extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCKED = ["agents", "agents.tool_context", "agents.tracing"]


@pytest.mark.parametrize("module", BLOCKED)
def test_missing_framework_names_the_extra(module: str) -> None:
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"
        "from agentic_iam.errors import MissingExtraError\n"
        "try:\n"
        "    import agentic_iam.integrations.openai_agents\n"
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
    assert lines[0] == "openai-agents openai-agents"
    assert 'pip install "agentic-iam[openai-agents]"' in lines[1]
    assert lines[2] == "True"


def test_missing_framework_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentic_iam.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "agents.tool_context", None)
    monkeypatch.delitem(sys.modules, "agentic_iam.integrations.openai_agents", raising=False)
    with pytest.raises(MissingExtraError, match=r"agentic-iam\[openai-agents\]"):
        import agentic_iam.integrations.openai_agents  # noqa: F401
    monkeypatch.delitem(sys.modules, "agentic_iam.integrations.openai_agents", raising=False)
