"""`rayvllm bench`: both sides measured in one run, saved as JSON with the ratios.

Smoke-sized (16 requests at concurrency 1 and 2): it checks what the report holds, never
how fast either side is; performance figures come from `make bench` (docs/performance.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayvllm_nb.bench import RAYVLLM, VLLM_ALONE
from rayvllm_nb.errors import ConfigError
from tests.conftest import run_cli


@pytest.mark.slow
def test_bench_measures_both_sides_and_saves_the_ratios(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    result = run_cli(
        "bench", "tiny-cpu", "--requests", "16", "--concurrency", "1,2", "--output-len", "16", "--no-relaunch",
        "--output", str(output), timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())

    assert [run["side"] for run in report["runs"]] == [VLLM_ALONE, RAYVLLM]
    for run in report["runs"]:
        assert run["ready_s"] > 0 and run["relaunch_ready_s"] is None
        for concurrency in ("1", "2"):
            load = run["loads"][concurrency]
            assert load["requests"] == 16 and load["errors"] == 0
            assert load["output_tokens"] == 16 * 16
            assert load["output_tok_per_s"] > 0 and 0 < load["ttft_p50_ms"] <= load["e2e_p50_ms"]
    for concurrency in ("1", "2"):
        ratios = report["ratios"][concurrency]
        ours, alone = (run["loads"][concurrency]["output_tok_per_s"] for run in report["runs"][::-1])
        assert ratios["output_tok_per_s"] == pytest.approx(ours / alone)
        assert ratios["ttft_p50_ms"] > 0
    assert report["settings"]["concurrency"] == [1, 2]
    assert report["config"]["hf_token"] is None

    assert "-- concurrency 2" in result.stdout and "output_tok_per_s" in result.stdout
    assert f"saved {output}" in result.stdout


def test_vllm_alone_on_a_gpu_config_plans_its_gpus_planned_not_run() -> None:
    """No GPU here: the plan the vLLM-alone side would start with on a machine with 2 GPUs."""
    from rayvllm_nb.bench import vllm_alone_server
    from rayvllm_nb.config import load_config

    server = vllm_alone_server(load_config("llama2-7b-tp2-gpu"), {"CPU": 16.0, "GPU": 2.0})
    assert server.engine_args["tensor_parallel_size"] == 2 and server.engine_args["dtype"] == "float16"
    assert server.model_source == "meta-llama/Llama-2-7b-chat-hf"
    assert not any(key.startswith(("VLLM_CPU", "RAYVLLM")) for key in server.env), server.env
    with pytest.raises(ConfigError, match="needs 2 GPUs but the cluster has 1"):
        vllm_alone_server(load_config("llama2-7b-tp2-gpu"), {"CPU": 16.0, "GPU": 1.0})
