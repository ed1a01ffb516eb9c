"""`rayvllm soak`: many concurrent streams for a while against a running model, reported per minute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayvllm_nb import ModelStatus
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_thirty_seconds_of_32_streams_have_no_error_and_the_memory_is_reported(
    shared_tiny: ModelStatus, tmp_path: Path
) -> None:
    output = tmp_path / "soak.json"
    result = run_cli("soak", shared_tiny.name, "--minutes", "0.5", "--concurrency", "32", "--output-len", "32",
                     "--output", str(output))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(output.read_text())
    [minute] = report["minutes"]
    assert minute["errors"] == 0 and minute["requests"] >= 32, minute
    assert minute["output_tokens"] == 32 * minute["requests"]
    assert 0 < minute["ttft_p50_ms"] <= minute["ttft_p99_ms"]
    # The replica and its vLLM engine processes hold gigabytes: a reading of 0 would mean none was found.
    assert report["rss_start_mb"] > 500 and report["rss_end_mb"] > 500
    assert "32 concurrent streams for 30 s" in result.stdout and "memory of the model's processes" in result.stdout
