from __future__ import annotations

import re

import pytest

from rayvllm_nb.config import load_config
from rayvllm_nb.engines import get_engine
from rayvllm_nb.engines.serve_llm import ServeLLMEngine, check_engine_kwargs
from rayvllm_nb.errors import ConfigError


def test_known_engine_kwargs_with_right_types_pass() -> None:
    check_engine_kwargs({"max_num_seqs": 8, "enable_chunked_prefill": True, "kv_cache_dtype": "auto"})


def test_unknown_engine_kwarg_gets_a_suggestion() -> None:
    expected = "unknown vLLM engine argument 'max_num_seq' \\(did you mean 'max_num_seqs'\\?\\)"
    with pytest.raises(ConfigError, match=expected):
        check_engine_kwargs({"max_num_seq": 8})


def test_wrong_engine_kwarg_type_names_key_and_value() -> None:
    with pytest.raises(ConfigError, match=re.escape("engine_kwargs.max_num_seqs='many'")):
        check_engine_kwargs({"max_num_seqs": "many"})


def test_engine_kwargs_may_not_shadow_config_keys() -> None:
    with pytest.raises(ConfigError, match=re.escape("set `tensor_parallel_size: ...` instead")):
        check_engine_kwargs({"tensor_parallel_size": 2})
    with pytest.raises(ConfigError, match="'model' is set by the config"):
        check_engine_kwargs({"model": "x"})


def test_engine_arguments_leave_unset_keys_to_vllm() -> None:
    arguments = ServeLLMEngine().engine_arguments(load_config("tiny-cpu", ["engine_kwargs.max_num_seqs=4"]))
    assert arguments["max_model_len"] == 256 and arguments["max_num_seqs"] == 4
    assert "download_dir" not in arguments and "chat_template" not in arguments


def test_unknown_engine_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="did you mean 'serve-llm'"):
        get_engine("serve-lm")
