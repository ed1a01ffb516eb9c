"""Bad input is refused before anything deploys, with one actionable ConfigError."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import rayvllm_nb
from rayvllm_nb._internal.cluster import cluster_resources
from rayvllm_nb.errors import ConfigError
from rayvllm_nb.types import ClusterInfo

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
