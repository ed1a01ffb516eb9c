"""The `rayvllm` console script, each command in a new process against the running cluster."""

from __future__ import annotations

import pytest

from rayvllm_nb import TINY_MODEL_REPLY
from rayvllm_nb.types import ClusterInfo
from tests.conftest import run_cli, serve_port

pytestmark = pytest.mark.slow


def test_serve_chat_status_stop_across_processes(cluster: ClusterInfo) -> None:
    served = run_cli("serve", "tiny-cpu", "--set", "served_model_name=cli-tiny")
    assert served.returncode == 0, served.stderr
    assert f"cli-tiny ready at http://127.0.0.1:{serve_port()}/v1" in served.stdout
    assert "starting the engine" in served.stdout
    try:
        chat = run_cli("chat", "Say hello.", "--model", "cli-tiny")
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.strip() == TINY_MODEL_REPLY
        assert "TTFT" in chat.stderr

        status = run_cli("status")
        assert status.returncode == 0, status.stderr
        assert "cli-tiny: RUNNING (ready)" in status.stdout
    finally:
        stopped = run_cli("stop", "cli-tiny")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == "stopped cli-tiny"
    assert "cli-tiny" not in run_cli("status").stdout


def test_bad_config_fails_before_anything_is_deployed(cluster: ClusterInfo) -> None:
    result = run_cli("serve", "tiny-cpu", "--set", "tensor_paralel_size=2")
    assert result.returncode == 2
    assert "did you mean 'tensor_parallel_size'" in result.stderr
    assert "Traceback" not in result.stderr


def test_stop_of_a_model_that_is_not_deployed_says_so(cluster: ClusterInfo) -> None:
    result = run_cli("stop", "no-such-model")
    assert result.returncode == 1
    assert "No model named 'no-such-model' is deployed" in result.stderr


def test_make_tiny_model_builds_into_the_given_path(tmp_path) -> None:
    result = run_cli("make-tiny-model", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m" / "config.json").exists()
