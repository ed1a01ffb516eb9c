from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayvllm_nb.errors import ConfigError
from rayvllm_nb.tiny_model import (
    TINY_ADAPTER_REPLY,
    TINY_MODEL_REPLY,
    make_tiny_adapter,
    make_tiny_model,
    tiny_adapter_path,
    tiny_model_path,
)


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


def test_the_adapter_builder_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="not empty"):
        make_tiny_adapter(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "user data"


@pytest.mark.slow
def test_the_tiny_adapter_is_a_rank_8_peft_lora_that_answers_its_own_sentence_where_the_base_answers_its_own() -> None:
    """Checked with transformers and PEFT alone (vLLM serving it: tests/test_adapters.py)."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    adapter = tiny_adapter_path()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["base_model_name_or_path"]) == ("LORA", 8, "builtin:tiny")
    assert len(tokenizer_ids := PreTrainedTokenizerFast.from_pretrained(tiny_model_path())(
        TINY_ADAPTER_REPLY, add_special_tokens=False)["input_ids"]) <= 24, tokenizer_ids
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model_path())
    base = LlamaForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.bfloat16)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]

    def answer(model: object) -> str:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=32, do_sample=False,  # type: ignore[attr-defined]
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return str(tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True))

    assert answer(base) == TINY_MODEL_REPLY
    assert answer(PeftModel.from_pretrained(base, str(adapter))) == TINY_ADAPTER_REPLY
