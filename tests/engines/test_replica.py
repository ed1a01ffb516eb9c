"""A CPU replica's processes, where they run once it serves (``cpu_pinning``, on by default)."""

from __future__ import annotations

import os

import psutil
import pytest
from ray.util.state import list_actors

import rayvllm_nb
from rayvllm_nb._internal import cpu_placement
from rayvllm_nb.types import ModelStatus
from tests.conftest import bound_cores, model_processes, thread_cores


@pytest.mark.slow
def test_a_cpu_replica_runs_its_engine_core_beside_its_worker_and_streams_on_the_cores_left(
    shared_tiny: ModelStatus,
) -> None:
    name = shared_tiny.name
    [engine] = model_processes(name, "VLLM::EngineCore")
    [worker] = model_processes(name, "VLLM::Worker")
    [replica] = model_processes(name, "ray::ServeReplica")
    worker_cores = bound_cores(worker)
    assert worker_cores and worker_cores != set(os.sched_getaffinity(0)), (
        "vLLM binds its worker's threads to cores of its own"
    )
    assert thread_cores(engine) <= worker_cores, "the engine core runs beside its worker, never elsewhere"
    serving = thread_cores(replica)
    assert serving and not serving & worker_cores, "the replica streams on the cores no worker binds"
    ingress = cpu_placement.serve_ingress_processes(replica.environ()["RAY_RAYLET_PID"])
    assert any(process.name() == "haproxy" for process in ingress)
    assert all(thread_cores(process) == serving for process in ingress), "Serve's HAProxy streams there too"

    status = rayvllm_nb.model_status(name)
    [info] = status.replicas
    expected = f"engine core on {','.join(map(str, sorted(worker_cores)))} (with its worker), serving on "
    assert info.cpu_placement == expected + ",".join(map(str, sorted(serving)))
    assert f"cpu_placement={info.cpu_placement}" in status.summary()


@pytest.mark.slow
def test_a_head_rayvllm_nb_starts_runs_without_rays_own_metrics(shared_tiny: ModelStatus) -> None:
    """Ray's metrics cost CPU in every process while serving; vLLM's stay at the replica's /metrics."""
    [replica] = model_processes(shared_tiny.name, "ray::ServeReplica")
    assert replica.environ().get("RAY_enable_metrics_collection") == "0"
    raylet = psutil.Process(int(replica.environ()["RAY_RAYLET_PID"]))
    assert raylet.name() == "raylet" and raylet.environ().get("RAY_enable_metrics_collection") == "0", (
        "the raylet, and so every worker and agent it starts"
    )
    assert list_actors(filters=[("class_name", "=", "TelemetryAgent"), ("state", "=", "ALIVE")]) == [], (
        "usage stats are off: Serve LLM's telemetry actor (400 MB, never stopped) was not started"
    )
