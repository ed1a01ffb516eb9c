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

from rayvllm_nb.benchmark import RAYVLLM, VLLM_ALONE, VLLM_ALONE_PINNED, BenchReport, Load, SideStart
from rayvllm_nb.errors import ConfigError
from tests.conftest import run_cli


@pytest.mark.slow
def test_bench_measures_every_side_over_rounds_with_its_cpu_and_saves_the_comparison(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    result = run_cli(
        "bench", "tiny-cpu", "--starts", "1", "--rounds", "2", "--concurrency", "1,2", "--requests-per-stream", "4",
        "--output-len", "16", "--no-pinned-baseline", "--output", str(output), timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())

    runs = {run["side"]: run for run in report["starts"]}
    assert set(runs) == {VLLM_ALONE, RAYVLLM}, "the pinned baseline is left out (its pinning: test_vllm_alone)"
    assert runs[VLLM_ALONE]["cpu_placement"] == "", "the baseline runs as started by hand"
    assert runs[RAYVLLM]["cpu_placement"].startswith("engine core on "), runs[RAYVLLM]["cpu_placement"]
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
    [ours] = report["comparisons"]
    assert (ours["side"], ours["baseline"]) == (RAYVLLM, VLLM_ALONE)
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


def _side(side: str, start: int, ready_s: float, rows: list[tuple[int, float, float, float]]) -> SideStart:
    """A side's start from (concurrency, tok/s, TTFT p50 ms, serving CPU-s) per load, 1,000 tokens each."""
    loads = [
        Load(index, concurrency, {"output_tok_per_s": tok_s, "ttft_p50_ms": ttft, "output_tokens": 1000, "errors": 0},
             serving_cpu_s=serving, engine_cpu_s=2.0, loadgen_cpu_s=0.1)
        for index, (concurrency, tok_s, ttft, serving) in enumerate(rows)
    ]
    return SideStart(side, start, ready_s, "process" if side == VLLM_ALONE else "relaunch", "", loads)


def test_the_report_takes_medians_per_start_detects_stalls_and_compares_start_by_start() -> None:
    starts = [
        _side(VLLM_ALONE, 0, 30.0, [(1, 300, 120.0, 0.5), (8, 700, 500.0, 0.3), (1, 300, 110.0, 0.5)]),
        _side(RAYVLLM, 0, 31.0, [(1, 350, 12.0, 1.0), (8, 1800, 45.0, 0.6), (1, 340, 14.0, 1.0)]),
        _side(VLLM_ALONE, 1, 29.0, [(1, 380, 11.0, 0.4), (8, 2000, 40.0, 0.2)]),
        _side(RAYVLLM, 1, 33.0, [(1, 360, 13.0, 0.8), (8, 1900, 42.0, 0.4)]),
    ]
    report = BenchReport({"served_model_name": "tiny"}, {"concurrency": [1, 8], "starts": 2, "rounds": 2,
                                                         "requests_per_stream": 16, "input_len": 32, "output_len": 64},
                         starts, "now")
    [first, second] = report.per_start(VLLM_ALONE)
    assert first["c1_ttft_p50_ms"] == 115.0 and first["stalled"] is True and second["stalled"] is False
    assert first["serving_cpu_s_per_1k_tok"] == pytest.approx(1.3 / 3) and first["tok_per_engine_cpu_s"] == 500
    assert report.spread(RAYVLLM, "c8_tok_per_s") == (1850.0, 1800.0, 1900.0)
    assert report.spread(VLLM_ALONE, "c8_tok_per_s", stall_free=True) == (2000.0, 2000.0, 2000.0)
    comparison = report.comparison()
    assert comparison["stalled_starts"] == {RAYVLLM: 0, VLLM_ALONE: 1}
    assert comparison["c8_tok_per_s_ratio"] == (pytest.approx((1800 / 700 + 0.95) / 2), 0.95, pytest.approx(1800 / 700))
    assert comparison["stall_free_c8_tok_per_s_ratio"] == pytest.approx(1850 / 2000)
    assert comparison["stall_free_c1_ttft_p50_delta_ms"] == pytest.approx(13.0 - 11.0)
    assert comparison["relaunch_minus_baseline_ready_s"] == pytest.approx(32.0 - 29.5)
    table = report.table()
    assert "STALL" in table and "stalled starts              1 of 2" in table
    assert [(c["side"], c["baseline"]) for c in report.comparisons()] == [(RAYVLLM, VLLM_ALONE)]
    report.starts += [_side(VLLM_ALONE_PINNED, start, 28.0, [(1, 400, 10.0, 0.4), (8, 2100, 40.0, 0.2)])
                      for start in (0, 1)]
    assert [(c["side"], c["baseline"]) for c in report.comparisons()] == [
        (RAYVLLM, VLLM_ALONE), (VLLM_ALONE_PINNED, VLLM_ALONE), (RAYVLLM, VLLM_ALONE_PINNED)]
    assert report.comparison(RAYVLLM, VLLM_ALONE_PINNED)["c8_tok_per_s_ratio"] == (
        pytest.approx(1850 / 2100), pytest.approx(1800 / 2100), pytest.approx(1900 / 2100))


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
