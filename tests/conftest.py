"""Shared fixtures: the tests' own Ray cluster, started when the first test needs it and ended
(exactly its own processes) when the session ends.

The head runs on free ports in a session of its own; ``RAY_ADDRESS`` and
``RAYVLLM_NB_SERVE_PORT`` point every test, CLI process and notebook kernel at it, with Serve on
a free port (8000 when free). A Ray cluster or vLLM server of the user's on this machine is never
touched, and nothing of the tests' is left running afterwards.

Under pytest-xdist (``make test`` runs two workers) each worker has a head of its own, with its own
worker ports and Serve port; tests look only at the processes of their own cluster.

A model load costs about half a minute here, so modules that need a running model share one
(``tiny``) or deploy their own once and stop it at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import psutil
import pytest

import rayvllm_nb
from rayvllm_nb._internal import processes
from rayvllm_nb._internal.net import free_port
from rayvllm_nb.types import ClusterInfo, ModelStatus, Progress

REPO = Path(__file__).resolve().parent.parent
SERVE_PORT_ENV = "RAYVLLM_NB_SERVE_PORT"
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

    One head starts at a time on this machine (``start_head`` returns once it listens on every port it
    was given): two heads starting together would both find the same ports free."""
    from rayvllm_nb._internal.cluster import start_head, with_free_ports
    from rayvllm_nb.config import ClusterConfig

    with open(Path(tempfile.gettempdir()) / "rayvllm_nb-test-heads.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
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


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Run the block with no other test of this machine's suite running beside it: for what times answers
    (a loaded machine answers slower), or leaves what a stopped cluster left (which any rayvllm process
    would reclaim). The other worker finishes the test it runs and waits before its next one; keep the
    block to what needs the machine to itself."""
    [run] = _running
    with open(_GATE, "w") as gate:
        # Not running while waiting: two tests asking at once must not wait on each other.
        fcntl.flock(run, fcntl.LOCK_UN)
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(run, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(run, fcntl.LOCK_SH)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Slow tests and notebooks run against the tests' own cluster (fast ones never start it)."""
    if item.get_closest_marker("slow") is not None or item.path.suffix == ".ipynb":
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


@pytest.fixture(scope="session")
def cluster() -> ClusterInfo:
    """This process connected to the tests' own cluster."""
    session_cluster_address()
    return rayvllm_nb.init()


PLANTED_TOKEN = "hf_plantedSecretToken0123456789"
"""The shared model's HF token: the secret tests look for everywhere it must not be."""
SHARED_STEPS: list[Progress] = []
"""The loading steps the shared model reported."""


@pytest.fixture(scope="package")
def shared_tiny(cluster: ClusterInfo) -> Iterator[ModelStatus]:
    """One tiny model for every test that only needs a running model (and does not stop it): a long
    context (for long streams) and a planted HF token; stopped when the tests package ends, before
    the notebooks run."""
    status = rayvllm_nb.start(
        "tiny-cpu", ["served_model_name=shared-tiny", "route_prefix=/shared", "max_model_len=2048",
                     f"hf_token={PLANTED_TOKEN}"],
        wait_ready=True, timeout=600, on_progress=SHARED_STEPS.append,
    )
    try:
        yield status
    finally:
        if status.name in [m.name for m in rayvllm_nb.status().models]:
            rayvllm_nb.stop(status.name)


@contextlib.contextmanager
def tiny_running(overrides: list[str]) -> Iterator[ModelStatus]:
    """The tiny model started with ``overrides``, ready; stopped afterwards when it still runs."""
    status = rayvllm_nb.start("tiny-cpu", overrides, wait_ready=True, timeout=600)
    try:
        yield status
    finally:
        if status.name in [model.name for model in rayvllm_nb.status().models]:
            rayvllm_nb.stop(status.name)


def until_model(name: str, check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait, checking every second, until ``check()`` holds; else fail saying ``what`` did not happen in
    time, with the status of the model ``name``."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s: {rayvllm_nb.model_status(name)}"
        time.sleep(1)


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `rayvllm ARGS` in a new process, as a user in a terminal would."""
    return subprocess.run(**_cli_process(args, env), capture_output=True, timeout=timeout)


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start `rayvllm ARGS` as :func:`run_cli` runs it, its output read as it comes (``stdout``, ``stderr``)."""
    return subprocess.Popen(**_cli_process(args, env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _cli_process(args: tuple[str, ...], env: dict[str, str] | None) -> dict[str, Any]:
    return {"args": [sys.executable, "-m", "rayvllm_nb.cli", *args], "text": True, "stdin": subprocess.DEVNULL,
            "cwd": REPO, "env": {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}}


def thread_cores(process: psutil.Process) -> set[int]:
    """The cores any thread of ``process`` may run on."""
    return {core for thread in process.threads() for core in os.sched_getaffinity(thread.id)}


def bound_cores(process: psutil.Process) -> set[int]:
    """The cores the threads of ``process`` that are bound to fewer than all cores run on (a vLLM CPU
    worker's OpenMP threads)."""
    everything = set(os.sched_getaffinity(0))
    return {core for thread in process.threads() if (cores := os.sched_getaffinity(thread.id)) != everything
            for core in cores}


def model_processes(
    model: str, title: str | tuple[str, ...] = "VLLM::", address: str | None = None,
) -> list[psutil.Process]:
    """The vLLM processes of one of our models (engine core, workers), or those with ``title``, on the
    head at ``address`` (default: the tests' own): another worker's model of the same name is not ours."""
    raylets = {str(p.pid) for p in head_processes(address or session_cluster_address()) if p.name() == "raylet"}
    return [
        process for process in processes.model_processes(model, (title,) if isinstance(title, str) else title)
        if _environment(process).get("RAY_RAYLET_PID") in raylets
    ]


def head_session(address: str) -> int:
    """The session of the head rayvllm_nb started at ``address`` (its record)."""
    [session] = [record.session_id for record in processes.recorded_heads() if record.address == address]
    return session


def head_processes(address: str) -> list[psutil.Process]:
    """Every process of the head the tests started at ``address`` (its session)."""
    return processes.session_processes(head_session(address))


def _environment(process: psutil.Process) -> dict[str, str]:
    try:
        return process.environ()
    except psutil.Error:
        return {}


def leftovers(app_name: str) -> dict[str, list[str]]:
    """What is still alive of a Serve app: its replica actors and any placement group not REMOVED."""
    from ray.util.state import list_actors, list_placement_groups

    actors = [
        a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        if a.class_name.startswith(f"ServeReplica:{app_name}:")
    ]
    groups = [
        pg.name for pg in list_placement_groups(limit=1000, detail=True)
        if pg.state != "REMOVED" and (pg.name or "").startswith(f"SERVE_REPLICA::{app_name}#")
    ]
    return {"replica_actors": actors, "placement_groups": groups}
