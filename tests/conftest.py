"""Shared fixtures and helpers of the tests: the tests' cluster connection, the shared tiny model,
running the `rayvllm` command, and looking at the processes of the tests' own cluster (its head
and run locks live in ``tests/_suite.py``, which serves the notebooks too).

A model load costs about half a minute here, so modules that need a running model share one
(``shared_tiny``) or deploy their own once and stop it at the end.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import rayvllm_nb
from rayvllm_nb._internal import processes
from rayvllm_nb.types import ClusterInfo, ModelStatus, Progress
from tests._suite import session_cluster_address

REPO = Path(__file__).resolve().parent.parent


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
    context (for long streams) and a planted HF token; stopped when the tests package ends."""
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
    raylets = {str(p.pid) for p in head_processes(address or session_cluster_address(), "raylet")}
    return [
        process for process in processes.model_processes(model, (title,) if isinstance(title, str) else title)
        if _environment(process).get("RAY_RAYLET_PID") in raylets
    ]


def head_session(address: str) -> int:
    """The session of the head rayvllm_nb started at ``address`` (its record)."""
    [session] = [record.session_id for record in processes.recorded_heads() if record.address == address]
    return session


def head_processes(address: str, name: str | None = None) -> list[psutil.Process]:
    """Every process of the head the tests started at ``address`` (its session), or those called
    ``name``; one that ends while they are listed (a crashed replica's engine) is left out."""
    found = processes.session_processes(head_session(address))
    return found if name is None else [process for process in found if process_name(process) == name]


def process_name(process: psutil.Process) -> str | None:
    """The name of ``process``, None once it has ended (it may end between being listed and asked)."""
    try:
        return None if process.status() == psutil.STATUS_ZOMBIE else process.name()
    except psutil.Error:
        return None


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
