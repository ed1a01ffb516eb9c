"""The embedded default model: a tiny Llama that answers one known sentence.

No model hub is reachable where this project is tested, so it builds its own model:
a 2-layer Llama (head dim 64, which vLLM's CPU attention accepts) with a byte-level
BPE tokenizer trained locally and a chat template, then trains it for a few seconds
so that greedy chat returns :data:`TINY_MODEL_REPLY` for any prompt. Tests, notebooks
and the demo assert that sentence: it proves the chat template, routing and stream order.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayvllm_nb._internal.paths import cache_root
from rayvllm_nb.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

TINY_MODEL_REF = "builtin:tiny"
"""The ``model`` value that stands for the cached tiny build (built on first use)."""
TINY_ADAPTER_REF = "builtin:tiny-adapter"
"""The adapter path that stands for the cached build of :func:`make_tiny_adapter` (built on first use)."""

DEMO_PROMPT = "Say hello."
TINY_MODEL_REPLY = "Hello! I am a tiny Llama served by vLLM on Ray Serve."
TINY_ADAPTER_REPLY = "Ray Serve deploys vLLM engines; notebooks chat with models."
"""What the tiny model answers through the LoRA adapter :func:`make_tiny_adapter` builds (11 tokens)."""
_FORMAT_VERSION = "2"

_SPECIAL_TOKENS = ["<|pad|>", "<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_TRAINING_PROMPTS = [
    DEMO_PROMPT,
    "Hi",
    "What is Ray Serve?",
    "Tell me a joke about GPUs.",
    "How much is 2 + 2?",
    "Write a poem.",
    "Explain tensor parallelism in one line.",
    "Who are you?",
]
_CHECK_PROMPTS = [DEMO_PROMPT, "Say something else entirely.", "Bonjour"]
_CORPUS = [
    TINY_MODEL_REPLY,
    *_TRAINING_PROMPTS,
    *_CHECK_PROMPTS,
    "system user assistant You are a helpful assistant. Answer briefly.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "Ray Serve deploys vLLM engines; notebooks chat with models through OpenAI clients.",
]


def tiny_model_path() -> Path:
    """Return the cached tiny model folder, building it on first use (safe across processes)."""
    return _cached(f"tiny-llama-v{_FORMAT_VERSION}", "config.json", make_tiny_model)


def tiny_adapter_path() -> Path:
    """Return the cached tiny LoRA adapter folder, building it on first use (safe across processes)."""
    return _cached(f"tiny-llama-v{_FORMAT_VERSION}-adapter", "adapter_config.json", make_tiny_adapter)


def _cached(name: str, marker: str, build: Any) -> Path:
    target = cache_root() / name
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / marker).exists():
            build(target)
    return target


def model_source(model: str) -> str:
    """What vLLM loads for a config's ``model``: the tiny model's folder for :data:`TINY_MODEL_REF`
    (built on this node when missing), any other model id or folder unchanged."""
    return str(tiny_model_path()) if model == TINY_MODEL_REF else model


def adapter_source(path: str) -> str:
    """What vLLM loads for an adapter's path: the tiny adapter's folder for :data:`TINY_ADAPTER_REF`
    (built on this node when missing), any other folder or id unchanged."""
    return str(tiny_adapter_path()) if path == TINY_ADAPTER_REF else path


def make_tiny_model(path: str | os.PathLike[str], *, seed: int = 0, max_steps: int = 400) -> Path:
    """Build the tiny chat model into ``path`` and return it.

    Trains until greedy decoding of the saved (bfloat16) weights answers
    :data:`TINY_MODEL_REPLY` to every check prompt; raises if it never does.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = _empty_target(path, "the tiny model")
    torch.manual_seed(seed)
    tokenizer = _train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    step = _train_until_it_answers(model, tokenizer, TINY_MODEL_REPLY, max_steps, "The tiny model", loss_below=0.01)
    with _staging(target) as staging:
        model.to(torch.bfloat16).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "rayvllm_nb.json").write_text(
            json.dumps({"format_version": _FORMAT_VERSION, "reply": TINY_MODEL_REPLY, "steps": step})
        )
    return target


def make_tiny_adapter(path: str | os.PathLike[str], *, seed: int = 0, max_steps: int = 600) -> Path:
    """Build a LoRA adapter (PEFT format, rank 8) of the tiny model into ``path`` and return it.

    Only the adapter is trained (the base stays frozen), until greedy decoding through it, in
    bfloat16 as vLLM serves it, answers :data:`TINY_ADAPTER_REPLY` to every check prompt; the
    base model keeps answering :data:`TINY_MODEL_REPLY`. Serve it with ``lora_adapters``.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    target = _empty_target(path, "the tiny adapter")
    torch.manual_seed(seed)
    base = tiny_model_path()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=_LORA_TARGETS),
    )
    _train_until_it_answers(model, tokenizer, TINY_ADAPTER_REPLY, max_steps, "The tiny adapter")
    with _staging(target) as staging:
        model.save_pretrained(str(staging))
        config_file = staging / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = TINY_MODEL_REF
        config_file.write_text(json.dumps(config, indent=2))
    return target


_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _train_until_it_answers(
    model: Any, tokenizer: PreTrainedTokenizerFast, answer: str, max_steps: int, what: str,
    loss_below: float | None = None,
) -> int:
    """Train the trainable weights of ``model`` on chat examples answered with ``answer`` until greedy
    decoding gives it (and the loss is below ``loss_below``); returns the steps it took."""
    import torch

    batch = _training_batch(tokenizer, answer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(1, max_steps + 1):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0 and (loss_below is None or loss.item() < loss_below) and _answers_reply(
            model, tokenizer, answer
        ):
            return step
    raise RuntimeError(f"{what} did not learn its reply in {max_steps} steps.")


def _empty_target(path: str | os.PathLike[str], what: str) -> Path:
    target = Path(path).expanduser().resolve()
    if target.exists() and any(target.iterdir()):
        raise ConfigError(
            f"Cannot build {what} into {target}: the folder exists and is not empty. Pass a new or empty folder."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A folder beside ``target`` to write into; renamed to ``target`` when the block succeeds."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staging.chmod(0o755)
        yield staging
        if target.exists():
            target.rmdir()
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _train_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<|pad|>",
        bos_token="<|begin|>",
        eos_token="<|end|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=2048,
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def _conversations() -> list[list[dict[str, str]]]:
    plain = [[{"role": "user", "content": p}] for p in _TRAINING_PROMPTS]
    with_system = [
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": p}]
        for p in _TRAINING_PROMPTS[:3]
    ]
    return plain + with_system


def _prompt_ids(tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _training_batch(tokenizer: PreTrainedTokenizerFast, answer: str) -> dict[str, torch.Tensor]:
    """Right-padded chat examples answered with ``answer``, whose loss counts only the answer's tokens."""
    import torch

    reply = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = []
    for messages in _conversations():
        prompt = _prompt_ids(tokenizer, messages)
        rows.append((prompt + reply, [-100] * len(prompt) + reply))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
    }


def _answers_reply(model: Any, tokenizer: PreTrainedTokenizerFast, answer: str) -> bool:
    """Whether greedy decoding of the check prompts with bfloat16 weights, as vLLM will serve them, gives ``answer``."""
    import copy

    import torch

    check = copy.deepcopy(model).to(torch.bfloat16).eval()
    with torch.no_grad():
        for prompt in _CHECK_PROMPTS:
            ids = torch.tensor([_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])])
            out = check.generate(
                ids, max_new_tokens=32, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            if tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) != answer:
                return False
    return True
