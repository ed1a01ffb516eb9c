from __future__ import annotations

from rayvllm_nb._internal.logs import engine_failed, loading_stage, merge_by_time, root_cause

VLLM_OUT = [
    ":job_id:01000000",
    "INFO 11-27 05:06:20 [model.py:684] Resolved architecture: LlamaForCausalLM",
    "(Worker pid=15278) INFO 11-27 05:06:36 [cpu_model_runner.py:131] Starting to load model /m/tiny...",
    "(Worker pid=15278) INFO 11-27 05:06:36 [default_loader.py:430] Loading weights took 0.01 seconds",
]
SERVE_ERR = [
    ":actor_name:ServeReplica:tiny:VllmServer:tiny",
    "INFO 2026-11-27 05:06:12,029 tiny_VllmServer:tiny dz -- Running tasks to download model files",
    "(Worker pid=15278) Loading safetensors checkpoint shards: 100% Completed",
    "INFO 2026-11-27 05:06:40,332 tiny_VllmServer:tiny dz -- Started vLLM engine.",
    "INFO 2026-11-27 05:06:44,743 tiny_VllmServer:tiny dz req-1 -- POST /v1/chat/completions 200 3.2ms",
]


def test_merges_vllm_and_serve_lines_in_time_order_without_ray_markers() -> None:
    merged = merge_by_time([VLLM_OUT, SERVE_ERR])
    # An untimed line (a progress bar) keeps its place after the timed line before it.
    assert [line.split(" -- ")[-1][:20] for line in merged] == [
        "Running tasks to dow",
        "(Worker pid=15278) L",
        "INFO 11-27 05:06:20 ",
        "(Worker pid=15278) I",
        "(Worker pid=15278) I",
        "Started vLLM engine.",
        "POST /v1/chat/comple",
    ]


def test_loading_stage_is_the_latest_marker_reached() -> None:
    assert loading_stage(VLLM_OUT[:2]) == "reading the model config"
    assert loading_stage(merge_by_time([VLLM_OUT, SERVE_ERR])) == "engine started"
    assert loading_stage(["nothing to see"]) is None


def test_root_cause_skips_wrappers_and_strips_log_prefixes() -> None:
    lines = [
        "(Worker pid=1) ERROR 11-27 05:09:42 [multiproc_executor.py:944] Traceback (most recent call last):",
        "(Worker pid=1) ERROR 11-27 05:09:42 [multiproc_executor.py:944] safetensors._safetensors_rust."
        "SafetensorError: Error while deserializing header: header too large",
        "(EngineCore pid=2) ERROR 11-27 05:09:44 [core.py:1374] Exception: WorkerProc initialization failed due "
        "to an exception in a background process.",
    ]
    assert root_cause(lines) == (
        "safetensors._safetensors_rust.SafetensorError: Error while deserializing header: header too large"
    )
    assert root_cause(lines[2:]) is None


def test_root_cause_ignores_errors_quoted_as_advice_in_info_and_warning_lines() -> None:
    advice = (
        "(EngineCore pid=2) WARNING 11-27 05:09:40 [utils.py:1] Found ulimit of 1024 and failed to raise it; "
        "this can cause fd limit errors like `OSError: [Errno 24] Too many open files`."
    )
    fatal = "ERROR 11-27 05:09:44 [core.py:1] ValueError: max_model_len (4096) is greater than the model's 2048"
    assert root_cause([advice, fatal]) == "ValueError: max_model_len (4096) is greater than the model's 2048"
    assert root_cause([advice]) is None


def test_engine_failure_is_read_from_vllms_fatal_lines() -> None:
    assert engine_failed(["(EngineCore pid=2) ERROR 11-27 05:09:44 [core.py:1] RuntimeError: Engine core "
                          "initialization failed. See root cause above."])
    assert not engine_failed(VLLM_OUT + SERVE_ERR)


def test_a_pydantic_error_of_vllm_is_quoted_with_its_field_and_reason() -> None:
    lines = [
        "(EngineCore pid=7) ERROR 11-27 10:00:00 [core.py:1] EngineCore failed to start.",
        "(EngineCore pid=7) RuntimeError: Failed to create vLLM engine config: 1 validation error for ModelConfig",
        "(EngineCore pid=7)   Value error, User-specified max_model_len (100000) is greater than the derived "
        "max_model_len (max_position_embeddings=2048 in model's config.json). [type=value_error, input_value=...]",
        "(EngineCore pid=7)     For further information visit https://errors.pydantic.dev/2.12/v/value_error",
        "(EngineCore pid=7) Traceback (most recent call last):",
    ]
    assert root_cause(lines) == (
        "RuntimeError: Failed to create vLLM engine config: 1 validation error for ModelConfig: Value error, "
        "User-specified max_model_len (100000) is greater than the derived max_model_len "
        "(max_position_embeddings=2048 in model's config.json)."
    )
