"""Shared fixtures: one real local Ray cluster per session; deployments are module-scoped.

A model load costs about a minute here, so each module that needs a running model
deploys it once and stops it at the end (models never run side by side: a 2-core
machine, and the default route prefix "/" is one model's).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import rayvllm_nb
from rayvllm_nb._internal.cluster import ClusterInfo

REPO = Path(__file__).resolve().parent.parent


_NEEDS_A_MACHINE_WITHOUT_RAY = ("tests/test_launch_cluster.py", "notebooks/05_cluster.ipynb")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the cluster launcher's tests and notebook first: they start and stop their own head
    and need a machine where the session's cluster has not started yet."""
    def first(item: pytest.Item) -> int:
        path = Path(str(item.path)).resolve().relative_to(REPO).as_posix()
        return _NEEDS_A_MACHINE_WITHOUT_RAY.index(path) if path in _NEEDS_A_MACHINE_WITHOUT_RAY else 2

    items.sort(key=first)


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterInfo]:
    """The local cluster (started when none runs; stopped at the end if started here)."""
    info = rayvllm_nb.init()
    try:
        yield info
    finally:
        rayvllm_nb.shutdown()


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `rayvllm ARGS` in a new process, as a user in a terminal would."""
    return subprocess.run(
        [sys.executable, "-m", "rayvllm_nb.cli", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def leftovers(app_name: str) -> dict[str, list[str]]:
    """What is still alive of a Serve app: its replica actors and any placement group not REMOVED."""
    from ray.util.state import list_actors, list_placement_groups

    actors = [
        a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        if a.class_name.startswith(f"ServeReplica:{app_name}:")
    ]
    groups = [pg.name for pg in list_placement_groups(limit=1000) if pg.state != "REMOVED"]
    return {"replica_actors": actors, "placement_groups": groups}
