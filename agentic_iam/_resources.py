"""Where the bundled demo registry and policies live: in a source checkout or in a wheel.

The wheel carries ``policies/`` and ``examples/registry.yaml`` under ``agentic_iam/_data/`` so
that ``aiam demo`` works from a plain install; a source checkout uses the top-level folders.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_policies_dir", "default_registry_path"]

_PACKAGE = Path(__file__).resolve().parent


def _first(*candidates: Path) -> Path:
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0]


def default_policies_dir() -> Path:
    return _first(_PACKAGE / "_data" / "policies", _PACKAGE.parent / "policies")


def default_registry_path() -> Path:
    return _first(_PACKAGE / "_data" / "registry.yaml",
                  _PACKAGE.parent / "examples" / "registry.yaml")
