"""The suite's own cluster and run locks reach notebooks as well as tests: ``tests/_suite.py``,
registered by the root conftest.py. Without it a notebook run on its own (``pytest --nbmake
notebooks``) would start a head on 6379 or use a Ray cluster of the user's there."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_a_notebook_run_on_its_own_gets_the_suites_hooks() -> None:
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         "--nbmake", "--trace-config", "notebooks/01_quickstart.ipynb"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert "notebooks/01_quickstart.ipynb" in collected.stdout
    assert f"PLUGIN registered: <module 'tests._suite' from '{REPO / 'tests' / '_suite.py'}'>" in collected.stdout


def test_notebooks_are_handed_out_before_the_tests_named_before_them() -> None:
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         "--nbmake", "tests/test_layout.py", "notebooks/01_quickstart.ipynb"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert collected.returncode == 0, collected.stdout + collected.stderr
    items = [line for line in collected.stdout.splitlines() if "::" in line]
    assert items[0] == "notebooks/01_quickstart.ipynb::01_quickstart.ipynb", items
    assert items[1].startswith("tests/test_layout.py::"), items
