"""Bad input is refused before anything deploys, with one actionable ConfigError."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import rayvllm_nb
from rayvllm_nb._internal.cluster import cannot_grow, cluster_resources
from rayvllm_nb.errors import ConfigError
from rayvllm_nb.types import ClusterInfo, ModelStatus

pytestmark = pytest.mark.slow


@pytest.fixture
def nothing_deployed(cluster: ClusterInfo) -> Iterator[None]:
    before = [model.name for model in rayvllm_nb.status().models]
    yield
    assert [model.name for model in rayvllm_nb.status().models] == before, "a refused config must deploy nothing"


def test_tensor_parallelism_beyond_the_cpus_of_a_node_is_refused(nothing_deployed: None) -> None:
    _, node_cpus = cluster_resources()
    with pytest.raises(ConfigError, match=f"tensor_parallel_size={node_cpus + 1} in CPU mode needs"):
        rayvllm_nb.start("tiny-cpu", [f"tensor_parallel_size={node_cpus + 1}"])


def test_gpu_device_without_gpus_is_refused(nothing_deployed: None) -> None:
    with pytest.raises(ConfigError, match="the cluster has no GPUs"):
        rayvllm_nb.start("qwen2.5-0.5b-gpu")


def test_missing_local_model_folder_is_refused(nothing_deployed: None, tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        rayvllm_nb.start("tiny-cpu", [f"model={tmp_path / 'no-such-model'}"])


def test_unknown_engine_kwargs_are_refused(nothing_deployed: None) -> None:
    with pytest.raises(ConfigError, match="did you mean 'max_num_seqs'"):
        rayvllm_nb.start("tiny-cpu", ["engine_kwargs.max_num_seq=4"])


def test_a_model_that_does_not_fit_in_what_the_running_ones_leave_is_refused_before_deploying(
    shared_tiny: ModelStatus, nothing_deployed: None
) -> None:
    """The suite's head is one rayvllm_nb started, so nothing grows it: a model needing every CPU
    while the shared one holds one would wait for resources forever (it did, for 600 s)."""
    cluster = rayvllm_nb.init()
    assert cannot_grow(cluster.address) and not cannot_grow("203.0.113.9:6379")
    _, node_cpus = cluster_resources()
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"needs {node_cpus} CPU to start .*running models: [^;]*shared-tiny"):
        rayvllm_nb.start("tiny-cpu", [f"tensor_parallel_size={node_cpus}", "served_model_name=too-wide"])
    assert time.monotonic() - started < 60, "refused at once, not after a start that times out"
