"""The suite's own cluster and run locks reach notebooks as well as tests: ``tests/_suite.py``,
registered by the root conftest.py. Without it a notebook run on its own (``pytest --nbmake
notebooks``) would start a head on 6379 or use a Ray cluster of the user's there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from xdist.scheduler import LoadFileScheduling

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


def _items(*names: str, slow: tuple[str, ...] = ()) -> list[SimpleNamespace]:
    """Stand-ins for collected items: a path, and the slow marker on the names in ``slow``."""
    return [SimpleNamespace(path=Path(name.split("::")[0]), nodeid=name,
                            get_closest_marker=lambda marker, slow_test=name in slow: marker if slow_test else None)
            for name in names]


def test_notebooks_come_first_then_files_that_load_models_then_fast_files() -> None:
    items = _items("tests/test_a.py::fast", "notebooks/01.ipynb::01", "tests/test_b.py::fast",
                   "tests/test_b.py::loads", "notebooks/02.ipynb::02", "tests/test_c.py::loads",
                   slow=("tests/test_b.py::loads", "tests/test_c.py::loads"))
    pytest_collection_modifyitems(items)  # type: ignore[arg-type]
    assert [item.nodeid for item in items] == [
        "notebooks/01.ipynb::01", "notebooks/02.ipynb::02", "tests/test_b.py::fast", "tests/test_b.py::loads",
        "tests/test_c.py::loads", "tests/test_a.py::fast"]


class _Worker:
    """What pytest-xdist's scheduler sees of a worker: the tests it was sent."""

    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name)
        self.shutting_down = False
        self.sent: list[int] = []

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sent.extend(indices)

    def shutdown(self) -> None:
        self.shutting_down = True


def test_xdist_hands_out_files_in_the_suites_order(request: pytest.FixtureRequest) -> None:
    """pytest-xdist's own `--dist loadfile` scheduler, configured as this session is (the suite's
    pytest_configure ran): the first files each worker gets are the notebooks, though a file of
    fast tests holds more tests (by default xdist hands out files with the most tests first)."""
    items = _items("tests/test_fast.py::a", "tests/test_fast.py::b", "tests/test_fast.py::c",
                   "notebooks/01.ipynb::01", "notebooks/02.ipynb::02")
    pytest_collection_modifyitems(items)  # type: ignore[arg-type]
    collection = [item.nodeid for item in items]
    config = SimpleNamespace(option=request.config.option,
                             getvalue=lambda name: ["2*popen"] if name == "tx" else request.config.getvalue(name))
    scheduler = LoadFileScheduling(config)
    workers = [_Worker("gw0"), _Worker("gw1")]
    for worker in workers:
        scheduler.add_node(worker)
    for worker in workers:
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()
    assert [collection[worker.sent[0]] for worker in workers] == ["notebooks/01.ipynb::01", "notebooks/02.ipynb::02"]
