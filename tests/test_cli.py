"""The `rayvllm` console script, each command in a new process against the running cluster (serve,
chat, status and stop of a model across processes: tests/test_endpoint.py)."""

from __future__ import annotations

import pytest

from rayvllm_nb.types import ClusterInfo
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


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


def test_adapter_commands_say_what_is_missing_before_connecting() -> None:
    result = run_cli("adapter", "load", "hello")
    assert result.returncode == 2 and "`adapter load NAME PATH` needs the adapter's PATH" in result.stderr
    assert "Traceback" not in result.stderr
    assert run_cli("adapter", "unload").returncode == 2
    help_text = run_cli("adapter", "--help").stdout
    assert "load hello builtin:tiny-adapter --model tiny" in help_text and "{load,unload,list}" in help_text
