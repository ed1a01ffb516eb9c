from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayvllm_nb.errors import ConfigError
from rayvllm_nb.tiny_model import TINY_MODEL_REPLY, make_tiny_model


def test_builds_a_llama_with_head_dim_64_and_a_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = make_tiny_model(tmp_path / "tiny")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["torch_dtype" if "torch_dtype" in config else "dtype"] == "bfloat16"
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|begin|><|user|>Say hello.<|end|><|assistant|>"
    assert tokenizer.decode(tokenizer(TINY_MODEL_REPLY)["input_ids"]) == TINY_MODEL_REPLY
    assert json.loads((path / "rayvllm_nb.json").read_text())["reply"] == TINY_MODEL_REPLY


def test_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="not empty"):
        make_tiny_model(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "user data"
