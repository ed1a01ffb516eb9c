"""The suite's own Ray cluster and run locks, for every item: tests and notebooks alike (the root
conftest.py registers this module once, so a notebook run on its own by ``pytest notebooks`` gets
them too).

The head runs on free ports in a session of its own, started once collection found an item that
needs it (before any test runs) and ended (exactly its own processes) when the session ends. ``RAY_ADDRESS`` and
``RAYVLLM_NB_SERVE_PORT`` point every test, CLI process and notebook kernel at it, with Serve on a
free port (8000 when free). A Ray cluster or vLLM server of the user's on this machine is never
touched, and nothing of the suite's is left running afterwards.

Under pytest-xdist (``make test`` runs two workers) each worker has a head of its own, with its own
worker ports and Serve port; tests look only at the processes of their own cluster.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

import rayvllm_nb
from rayvllm_nb._internal.net import free_port
from rayvllm_nb.backend import SERVE_PORT_ENV

_session: dict[str, str] = {}


def _xdist_worker_index() -> int:
    """0, 1, ... for pytest-xdist's workers gw0, gw1, ...; 0 without xdist."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


def session_cluster_address() -> str:
    """The tests' own head (started on first use); its address is also in RAY_ADDRESS."""
    if "address" not in _session:
        worker = _xdist_worker_index()
        lowest_worker_port = 21000 + 3000 * worker
        _session["address"] = start_test_head(
            # One logical CPU more than the cores: the shared model keeps running beside one
            # that spans every core (TP=2 on 2 cores).
            num_cpus=(os.cpu_count() or 1) + 1, min_worker_port=lowest_worker_port,
            max_worker_port=lowest_worker_port + 2999,
        )
        os.environ["RAY_ADDRESS"] = _session["address"]
        os.environ[SERVE_PORT_ENV] = str(free_port("127.0.0.1", 8000 + worker))
    return _session["address"]


def start_test_head(**settings: Any) -> str:
    """A head of the tests' own on free ports (as rayvllm_nb's embedded cluster starts one): its
    address. ``settings`` are ClusterConfig keys; give each head its own worker port range.

    It starts :func:`alone`: then no model loads beside it, and no other head starts with it (``start_head``
    returns once it listens on every port it was given; two heads starting together would both find the
    same ports free)."""
    from rayvllm_nb._internal.cluster import start_head, with_free_ports
    from rayvllm_nb.config import ClusterConfig

    with alone():
        return start_head(with_free_ports(ClusterConfig(num_gpus=0, object_store_memory_gb=1, **settings)))


def serve_port() -> int:
    """The port the tests' Serve listens on."""
    session_cluster_address()
    return int(os.environ[SERVE_PORT_ENV])


_LOCKS = Path(tempfile.gettempdir())
_GATE = _LOCKS / "rayvllm_nb-tests-gate.lock"
_RUN = _LOCKS / "rayvllm_nb-tests-run.lock"
_running: list[IO[str]] = []
"""The run lock this process holds (shared) while one of its tests runs."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """Every test passes the gate (shared) on its way in and holds the run lock (shared) while it runs,
    so that :func:`alone` can keep the other pytest-xdist worker's tests out."""
    with open(_GATE, "w") as gate, open(_RUN, "w") as run:
        fcntl.flock(gate, fcntl.LOCK_SH)
        fcntl.flock(run, fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
        _running.append(run)
        try:
            return (yield)
        finally:
            _running.pop()


_alone: list[bool] = []
"""Set while this process runs an :func:`alone` block (a block inside one is already alone)."""


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Run the block with no other test of this machine's suite running beside it: for what times answers
    (a loaded machine answers slower), leaves what a stopped cluster left (which any rayvllm process
    would reclaim), or starts a Ray head (its raylet dies when its agents start slower than 15 s,
    ray#65983). The other worker finishes the test it runs and waits before its next one; keep the
    block to what needs the machine to itself. Works in a test and outside one (collection)."""
    if _alone:
        yield
        return
    with open(_GATE, "w") as gate, contextlib.ExitStack() as stack:
        # In a test: not running while waiting, so two tests asking at once do not wait on each other.
        run = _running[0] if _running else stack.enter_context(open(_RUN, "w"))
        fcntl.flock(run, fcntl.LOCK_UN)
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(run, fcntl.LOCK_EX)
        _alone.append(True)
        try:
            yield
        finally:
            _alone.pop()
            fcntl.flock(run, fcntl.LOCK_SH if _running else fcntl.LOCK_UN)


def _needs_cluster(item: pytest.Item) -> bool:
    """Slow tests and notebooks run against the tests' own cluster (fast ones never start it)."""
    return item.get_closest_marker("slow") is not None or item.path.suffix == ".ipynb"


def pytest_configure(config: pytest.Config) -> None:
    """Make pytest-xdist hand out files in the order :func:`pytest_collection_modifyitems` gives. By
    default ``--dist loadfile`` reorders them by their number of tests, most first, which put the
    notebooks (one item each, minutes long) at the end of the run."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Big pieces first: the notebooks (minutes, in one piece), then the files that load models,
    then the files of fast tests, each in its own order. pytest-xdist hands out files in this order,
    so the quick ones are left to fill the end, while one worker finishes a long file."""
    loading = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: 0 if item.path.suffix == ".ipynb" else 1 if item.path in loading else 2)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the head before the first test when a collected item needs it, so that no model loads
    beside its start: Ray's raylet dies when its agents take over 15 s to start (ray#65983), and a
    loading model on 2 cores made them that slow."""
    if not session.config.option.collectonly and any(_needs_cluster(item) for item in session.items):
        session_cluster_address()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _needs_cluster(item):
        session_cluster_address()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the models, Serve and the head the tests started, and every process of that head."""
    if "address" not in _session:
        return
    from rayvllm_nb._internal.cluster import stop_started_heads

    try:
        rayvllm_nb.shutdown()
    finally:
        stop_started_heads(_session.pop("address"))
