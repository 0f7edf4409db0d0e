"""pyproject.toml is the one dependency source; environment.yml must list the same packages."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_packages() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])


def _conda_pip_packages() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {p for p in pip if not p.startswith("-e")}


def test_environment_yml_matches_pyproject():
    ours, conda = _pyproject_packages(), _conda_pip_packages()
    assert conda == ours, (
        f"only in pyproject: {ours - conda}; only in environment.yml: {conda - ours}"
    )


def test_torch_is_capped_at_the_version_this_environment_provides():
    torch_req = next(
        p for p in _pyproject_packages() if p.startswith("torch>") or p.startswith("torch<")
    )
    assert "<=2.14.1" in torch_req
