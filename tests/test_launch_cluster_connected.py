"""The cluster launcher's Python API inside a process already connected to Ray (the session's
cluster; kept apart from test_launch_cluster.py, whose module fixture stops every head)."""

from __future__ import annotations

import pytest

import rayvllm_nb
from rayvllm_nb.errors import ConfigError
from rayvllm_nb.types import ClusterInfo


@pytest.mark.slow
def test_status_in_a_connected_process_keeps_its_connection(cluster: ClusterInfo) -> None:
    import ray

    from rayvllm_nb import launch_cluster

    report = launch_cluster.status()
    assert report.address == cluster.address
    assert len([node for node in report.nodes if node.alive]) == cluster.nodes
    with pytest.raises(ConfigError, match=f"connected to Ray at {cluster.address}, not 10.9.9.9:6379"):
        launch_cluster.status("10.9.9.9:6379")
    assert ray.is_initialized() and rayvllm_nb.status().cluster.address == cluster.address
