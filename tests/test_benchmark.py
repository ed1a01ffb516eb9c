"""`rayvllm bench` (``rayvllm_nb.benchmark``): every side measured over starts and rounds, saved as
JSON with the comparisons.

Smoke-sized (one start, two rounds, a few requests at concurrency 1 and 2): it checks what the
report holds and that each side ran where it should, never how fast; performance figures come
from `make bench` (docs/performance.md).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from rayvllm_nb.benchmark import RAYVLLM, VLLM_ALONE, VLLM_ALONE_PINNED
from rayvllm_nb.errors import ConfigError
from tests.conftest import run_cli


@pytest.mark.slow
def test_bench_measures_every_side_over_rounds_with_its_cpu_and_saves_the_comparison(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    result = run_cli(
        "bench", "tiny-cpu", "--starts", "1", "--rounds", "2", "--concurrency", "1,2", "--requests-per-stream", "4",
        "--output-len", "16", "--output", str(output), timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())

    runs = {run["side"]: run for run in report["starts"]}
    assert set(runs) == {VLLM_ALONE, VLLM_ALONE_PINNED, RAYVLLM}
    assert runs[VLLM_ALONE]["cpu_placement"] == "", "the baseline runs as started by hand"
    for side in (VLLM_ALONE_PINNED, RAYVLLM):
        assert runs[side]["cpu_placement"].startswith("engine core on "), runs[side]["cpu_placement"]
    assert runs[RAYVLLM]["ready_kind"] == "relaunch", "the suite's cluster runs: a deployment on it"
    for run in runs.values():
        assert run["ready_s"] > 0
        assert sorted((load["round"], load["concurrency"]) for load in run["loads"]) == [(0, 1), (0, 2), (1, 1), (1, 2)]
        for load in run["loads"]:
            summary = load["summary"]
            assert summary["errors"] == 0 and summary["requests"] == 4 * load["concurrency"]
            assert summary["output_tokens"] == 4 * load["concurrency"] * 16
            assert 0 < summary["ttft_p50_ms"] <= summary["e2e_p50_ms"]
            assert load["serving_cpu_s"] > 0 and load["engine_cpu_s"] > 0 and load["loadgen_cpu_s"] > 0
    for side, rows in report["per_start"].items():
        [row] = rows
        assert row["stalled"] == (row["c1_ttft_p50_ms"] > 50), side
        assert row["tok_per_engine_cpu_s"] > 0 and row["serving_cpu_s_per_1k_tok"] > 0
    [ours, pinned] = report["comparisons"]
    assert (ours["side"], pinned["side"]) == (RAYVLLM, VLLM_ALONE_PINNED)
    assert ours["starts"] == {RAYVLLM: 1, VLLM_ALONE: 1}
    stalled = {side: int(report["per_start"][side][0]["stalled"]) for side in (RAYVLLM, VLLM_ALONE)}
    assert ours["stalled_starts"] == stalled
    ratio = ours["c2_tok_per_s_ratio"][0]
    assert ratio == pytest.approx(report["per_start"][RAYVLLM][0]["c2_tok_per_s"]
                                  / report["per_start"][VLLM_ALONE][0]["c2_tok_per_s"])
    assert report["config"]["hf_token"] is None
    by_hand = shlex.split(report["settings"]["vllm_alone_by_hand"])
    assert "VLLM_CPU_KVCACHE_SPACE=1" in by_hand and "vllm.entrypoints.openai.api_server" in by_hand
    assert not any(part.startswith("RAYVLLM_NB_") for part in by_hand)

    assert "-- every start" in result.stdout and f"-- {RAYVLLM} / {VLLM_ALONE}" in result.stdout
    assert f"saved {output}" in result.stdout


def test_bench_settings_are_checked_before_anything_starts() -> None:
    result = run_cli("bench", "tiny-cpu", "--starts", "0", "--concurrency", "1,-2", timeout=120)
    assert result.returncode != 0
    assert "starts must be at least 1" in result.stderr and "concurrency must be positive" in result.stderr


def test_rayvllm_nb_bench_stays_the_function_once_the_benchmark_module_is_imported() -> None:
    import rayvllm_nb
    import rayvllm_nb.benchmark
    from rayvllm_nb import api

    assert rayvllm_nb.bench is api.bench, "a second rayvllm_nb.bench(...) in a notebook must still work"


def test_vllm_alone_on_a_gpu_config_plans_its_gpus_planned_not_run() -> None:
    """No GPU here: the plan the vLLM-alone side would start with on a machine with 2 GPUs."""
    from rayvllm_nb.benchmark import vllm_alone_server
    from rayvllm_nb.config import load_config

    server = vllm_alone_server(load_config("llama2-7b-tp2-gpu"), {"CPU": 16.0, "GPU": 2.0})
    assert server.engine_args["tensor_parallel_size"] == 2 and server.engine_args["dtype"] == "float16"
    assert server.model_source == "meta-llama/Llama-2-7b-chat-hf"
    assert not any(key.startswith(("VLLM_CPU", "RAYVLLM")) for key in server.env), server.env
    with pytest.raises(ConfigError, match="needs 2 GPUs but the cluster has 1"):
        vllm_alone_server(load_config("llama2-7b-tp2-gpu"), {"CPU": 16.0, "GPU": 1.0})
