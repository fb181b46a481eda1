"""The wheel carries what `aiam demo` needs: it runs outside the source tree.

Builds the wheel, installs it (without re-downloading dependencies: the new environment reads
this one's site-packages after its own) into a fresh virtual environment, and runs `aiam demo`
from an empty directory. `.ci/run` also installs the wheel with `[all]` into a fully fresh
environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_runs_the_demo_outside_the_source_tree(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheels = list(dist.glob("agentic_iam-*.whl"))
    assert len(wheels) == 1
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # Dependencies come from this environment's site-packages, appended after the new
    # environment's own (a plain path line: this environment's .pth files, including the
    # editable install of the source tree, are not processed).
    probe = "import sysconfig; print(sysconfig.get_path('purelib'))"
    own = subprocess.run([str(python), "-c", probe], check=True, capture_output=True,
                         text=True).stdout.strip()

    Path(own, "zz_outer_site.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheels[0])], check=True, capture_output=True, timeout=600)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AIAM_REGISTRY")}
    where = subprocess.run([str(python), "-c", "import agentic_iam; print(agentic_iam.__file__)"],
                           cwd=workdir, env=environ, check=True, capture_output=True, text=True)
    assert str(env_dir) in where.stdout, "the wheel's copy is the one imported"
    demo = subprocess.run([str(env_dir / "bin" / "aiam"), "demo", "--framework", "core",
                           "--json"], cwd=workdir, env=environ, capture_output=True, text=True,
                          timeout=300)
    assert demo.returncode == 0, demo.stderr
    report = json.loads(demo.stdout)
    assert report["audit"]["ok"] is True
    assert any(step["outcome"] == "deny" for step in report["steps"])
