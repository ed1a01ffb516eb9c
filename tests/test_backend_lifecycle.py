"""Start/stop cycles, conflicts with a running model, replace, and fail-fast on a broken model."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

import rayvllm_nb
from rayvllm_nb import DEMO_PROMPT, TINY_MODEL_REPLY
from rayvllm_nb._internal.shared_endpoint import ROUTER_APP
from rayvllm_nb.errors import ConfigError, DeploymentError
from rayvllm_nb.tiny_model import tiny_model_path
from rayvllm_nb.types import ClusterInfo, ModelStatus
from tests._suite import alone, serve_port
from tests.conftest import leftovers, model_processes, process_name

pytestmark = pytest.mark.slow


def _engine_processes() -> list[str]:
    """The replica and vLLM processes of the model "tiny" (engine core, workers), by their environment."""
    names = [process_name(process) for process in model_processes("tiny", ("VLLM::", "ray::ServeReplica"))]
    return [name for name in names if name is not None]


def _answer(name: str) -> str:
    reply = rayvllm_nb.client(name).chat.completions.create(
        model=name, messages=[{"role": "user", "content": DEMO_PROMPT}], temperature=0, max_tokens=64
    )
    return reply.choices[0].message.content


def test_three_start_stop_cycles_leave_no_groups_actors_or_engines(cluster: ClusterInfo) -> None:
    """The first cycle starts the seed's plain dict (a local model folder, tensor parallelism 1, a
    port, and a name): vLLM's default KV cache (90 % of the node's memory) would not start here, so
    the replica sizes it to its node and status says what it chose. (Replacing a running model is
    tested with a request streaming through it: tests/test_faults.py.)"""
    for cycle in range(3):
        if cycle == 0:
            seed = {"model": str(tiny_model_path()), "tensor_parallel_size": 1, "port": serve_port()}
            status = rayvllm_nb.start({**seed, "served_model_name": "tiny"}, wait_ready=True, timeout=600)
            _sized_its_kv_cache_to_the_node(status)
        else:
            status = rayvllm_nb.start("tiny-cpu", wait_ready=True, timeout=600)
        assert _answer("tiny") == TINY_MODEL_REPLY
        if cycle == 1:
            _refuses_conflicts_with_a_running_model()
        rayvllm_nb.stop("tiny")
        assert leftovers(status.app_name) == {"replica_actors": [], "placement_groups": []}, f"cycle {cycle}"
        assert leftovers(ROUTER_APP) == {"replica_actors": [], "placement_groups": []}, "the router goes with tiny"
        deadline = time.monotonic() + 30
        while _engine_processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _engine_processes() == [], f"cycle {cycle}"


def _sized_its_kv_cache_to_the_node(status: ModelStatus) -> None:
    [replica] = status.replicas
    # The tiny Llama's KV cache: 2 layers x 1 KV head x 64 dims x (K, V) x 2 bytes = 512 B per token.
    assert replica.kv_cache_gib == pytest.approx(512 * 2048 * 256 / 2**30)
    assert replica.kv_cache_choice.startswith("auto: 0.25 GiB per rank (what 256 sequences of 2048 tokens need")
    assert "kv_cache=auto: 0.25 GiB" in str(rayvllm_nb.status())


def _refuses_conflicts_with_a_running_model() -> None:
    with pytest.raises(ConfigError, match="A model named 'tiny' is already running"):
        rayvllm_nb.start("tiny-cpu")
    with pytest.raises(ConfigError, match="route_prefix '/' belongs to the shared endpoint"):
        rayvllm_nb.start("tiny-cpu", ["served_model_name=other", "route_prefix=/"])
    expected = f"Serve already runs on 127.0.0.1:{serve_port()} but this config asks for 127.0.0.1:8123"
    with pytest.raises(ConfigError, match=expected):
        rayvllm_nb.start("tiny-cpu", ["served_model_name=other", "route_prefix=/other", "port=8123"])
    assert [m.name for m in rayvllm_nb.status().models].count("tiny") == 1


def _first_error_time(actor_ids: list[str]) -> float:
    """When vLLM first logged the weights error, from the failed replicas' own logs."""
    from rayvllm_nb._internal.logs import fetch_actor_logs

    stamps = []
    for actor_id in actor_ids:
        for line in fetch_actor_logs(actor_id, 5000):
            match = re.search(r"ERROR (\d\d-\d\d \d\d:\d\d:\d\d) .*SafetensorError", line)
            if match:
                stamp = time.strptime(f"{time.localtime().tm_year}-{match.group(1)}", "%Y-%m-%d %H:%M:%S")
                stamps.append(time.mktime(stamp))
    assert stamps, "the failed replicas' logs should hold vLLM's SafetensorError"
    return min(stamps)


def test_corrupt_weights_fail_fast_with_vllms_error_and_leave_nothing(cluster: ClusterInfo, tmp_path: Path) -> None:
    from ray.util.state import list_actors

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_path(), broken)
    (broken / "model.safetensors").write_bytes(b"\x00\x10" * 2000)
    with alone(), pytest.raises(DeploymentError) as error:  # it times how soon the failure is raised
        rayvllm_nb.start("tiny-cpu", [f"model={broken}"], wait_ready=True, timeout=600)
    raised_at = time.time()
    message = str(error.value)
    assert "SafetensorError" in message and "failed to start and was removed" in message
    assert "Traceback" not in message
    first_failure = _first_error_time(
        [a.actor_id for a in list_actors(filters=[("state", "=", "DEAD")], limit=1000)
         if a.class_name.startswith("ServeReplica:broken-model:VllmServer")]
    )
    assert raised_at - first_failure <= 15.0, f"raised {raised_at - first_failure:.1f} s after the first failure"
    assert "broken-model" not in [m.name for m in rayvllm_nb.status().models]
    assert leftovers("broken-model") == {"replica_actors": [], "placement_groups": []}
