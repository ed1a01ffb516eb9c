"""vLLM's own OpenAI server beside our deployments: its flags, start, load, fail-fast and stop.

Server tests start real vLLM on CPU (about 30 s each). Order matters: the failing starts come
first (the module's shared server starts at its first use, and one vLLM runs here at a time),
and the stop test, which ends the shared server, comes last.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from rayvllm_nb._internal.loadgen import make_prompts, run_load, warm_up
from rayvllm_nb._internal.vllm_alone import VllmAloneServer, engine_cli_args
from rayvllm_nb.errors import ConfigError, DeploymentError
from rayvllm_nb.tiny_model import tiny_model_path
from tests._internal.conftest import ENGINE_ARGS, living_group_members, port_is_free, tiny_server
from tests.conftest import bound_cores, thread_cores


def _server_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def test_engine_flags_parse_back_to_the_same_values_in_vllms_server_parser() -> None:
    engine_args = {
        "dtype": "bfloat16", "max_model_len": 256, "enforce_eager": True, "tensor_parallel_size": 1,
        "enable_prefix_caching": False, "load_format": "auto", "gpu_memory_utilization": 0.9,
        "hf_overrides": {"rope_theta": 10000.0}, "ignore_patterns": ["*.pt", "original/**"],
        "disable_log_stats": True, "max_num_seqs": 8,
    }
    flags = engine_cli_args(engine_args)
    assert flags[:7] == [
        "--dtype=bfloat16", "--max-model-len=256", "--enforce-eager", "--tensor-parallel-size=1",
        "--no-enable-prefix-caching", "--load-format=auto", "--gpu-memory-utilization=0.9",
    ]
    parsed = _server_parser().parse_args(["--model", "m", *flags])
    assert {key: getattr(parsed, key) for key in engine_args} == engine_args
    assert parsed.enable_prefix_caching is False and parsed.enforce_eager is True


def test_none_is_left_to_vllm_and_dicts_become_json() -> None:
    overrides = {"architectures": ["LlamaForCausalLM"], "rope_theta": 10000.0}
    flags = engine_cli_args({"download_dir": None, "hf_overrides": overrides})
    assert flags == ['--hf-overrides={"architectures": ["LlamaForCausalLM"], "rope_theta": 10000.0}']
    assert _server_parser().parse_args(["--model", "m", *flags]).hf_overrides == overrides


@pytest.mark.parametrize(
    ("engine_args", "message"),
    [
        ({"max_model_length": 256}, "'max_model_length' is not a vLLM engine argument"),
        ({"enforce_eager": "false"}, "is a boolean flag"),
        ({"hf_token": "hf_x"}, "HF_TOKEN"),
    ],
)
def test_bad_engine_arguments_are_config_errors(engine_args: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        engine_cli_args(engine_args)


@pytest.mark.slow
def test_a_bad_engine_argument_fails_fast_with_vllms_error_and_leaves_nothing(tmp_path: Path) -> None:
    server = tiny_server(tmp_path, engine_args={**ENGINE_ARGS, "max_model_len": 4096})
    started = time.perf_counter()
    with pytest.raises(DeploymentError) as failure:
        server.start(timeout_s=300)
    assert time.perf_counter() - started < 90
    message = str(failure.value)
    assert "exited with code 1 before it was ready: " in message
    assert "User-specified max_model_len (4096) is greater than the derived max_model_len" in message
    assert "OSError" not in message.splitlines()[0], "the ulimit warning is not the cause"
    assert server.pid is not None and not living_group_members(server.pid)
    assert port_is_free(server.port)


@pytest.mark.slow
def test_an_engine_core_failure_fails_fast_and_ends_its_children(tmp_path: Path) -> None:
    model = tmp_path / "broken-model"
    model.mkdir()
    for item in tiny_model_path().iterdir():
        (model / item.name).write_bytes(item.read_bytes() if item.suffix != ".safetensors" else b"\xff" * 64)
    server = tiny_server(tmp_path, model_source=str(model))
    started = time.perf_counter()
    with pytest.raises(DeploymentError, match=r"before it was ready: .*SafetensorError") as failure:
        server.start(timeout_s=300)
    assert time.perf_counter() - started < 120
    assert "Check the model and engine arguments" in str(failure.value)
    assert 'File "' not in str(failure.value), "traceback frames are left out"
    assert server.pid is not None and not living_group_members(server.pid)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmAloneServer]:
    """One running server, pinned as the benchmark's "vLLM alone pinned" side is."""
    with tiny_server(tmp_path_factory.mktemp("vllm-alone"), pin_cpu=True) as running:
        running.start(timeout_s=300)
        yield running


@pytest.mark.slow
def test_pin_cpu_puts_the_engine_core_beside_its_worker_and_the_api_server_on_the_cores_left(
    server: VllmAloneServer,
) -> None:
    assert server.pid is not None
    api_server = psutil.Process(server.pid)
    children = {" ".join(child.cmdline()).split(" ")[0]: child for child in api_server.children(recursive=True)}
    engine, worker = children["VLLM::EngineCore"], children["VLLM::Worker"]
    worker_cores = bound_cores(worker)
    assert worker_cores and thread_cores(engine) <= worker_cores
    assert thread_cores(api_server) == set(os.sched_getaffinity(0)) - worker_cores
    assert server.cpu_placement.startswith(f"engine core on {','.join(map(str, sorted(worker_cores)))} ")


@pytest.mark.slow
def test_serves_the_model_under_its_served_name(server: VllmAloneServer) -> None:
    assert server.time_to_ready_s is not None and 0 < server.time_to_ready_s < 300
    models = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()
    assert [model["id"] for model in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == 256


@pytest.mark.slow
def test_load_run_gets_every_token_with_consistent_numbers(server: VllmAloneServer) -> None:
    asyncio.run(warm_up(server.base_url, "tiny"))
    result = asyncio.run(
        run_load(server.base_url, "tiny", make_prompts(6, 20, seed=1), concurrency=2, output_len=16)
    )
    assert len(result.records) == 6 and result.concurrency == 2
    for record in result.records:
        assert record.error is None
        assert record.output_tokens == 16
        assert record.prompt_tokens is not None and record.prompt_tokens > 20
        assert record.ttft_s is not None and 0 < record.ttft_s < record.e2e_s
        assert record.start_s + record.e2e_s <= result.wall_s
    summary = result.summary()
    assert summary["requests"] == 6 and summary["errors"] == 0
    assert summary["output_tokens"] == 96
    assert summary["duration_s"] == result.wall_s > 0
    assert summary["output_tok_per_s"] == pytest.approx(96 / result.wall_s)
    assert summary["req_per_s"] == pytest.approx(6 / result.wall_s)
    ttft_p50, ttft_p90, tpot, e2e = (summary[k] for k in ("ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "e2e_p50_ms"))
    assert isinstance(ttft_p50, float) and isinstance(ttft_p90, float) and isinstance(tpot, float)
    assert isinstance(e2e, float)
    assert 0 < ttft_p50 <= ttft_p90 < result.wall_s * 1000
    assert 0 < tpot < e2e and ttft_p50 < e2e
    assert summary["mean_prompt_tokens"] == pytest.approx(sum(r.prompt_tokens or 0 for r in result.records) / 6)


@pytest.mark.slow
def test_stop_ends_every_process_and_frees_the_port(server: VllmAloneServer) -> None:
    assert server.pid is not None
    leader = psutil.Process(server.pid)
    tree = [leader, *leader.children(recursive=True)]
    assert any("VLLM::EngineCore" in " ".join(process.cmdline()) for process in tree)
    server.stop()
    assert not living_group_members(server.pid)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert port_is_free(server.port)
    server.stop()
