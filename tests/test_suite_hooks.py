"""The suite's own cluster and run locks reach notebooks as well as tests: ``tests/_suite.py``,
registered by the root conftest.py. Without it a notebook run on its own (``pytest --nbmake
notebooks``) would start a head on 6379 or use a Ray cluster of the user's there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from tests._suite import pytest_collection_modifyitems
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
    items = [SimpleNamespace(path=Path(name)) for name in
             ("tests/test_a.py", "notebooks/01.ipynb", "tests/test_b.py", "notebooks/02.ipynb")]
    pytest_collection_modifyitems(items)  # type: ignore[arg-type]
    assert [str(item.path) for item in items] == [
        "notebooks/01.ipynb", "notebooks/02.ipynb", "tests/test_a.py", "tests/test_b.py"]
