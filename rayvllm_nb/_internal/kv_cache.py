"""The KV cache of a CPU engine when the user sized none: decided on the node the replica runs on.

vLLM on CPU reads ``gpu_memory_utilization`` (0.92 by default) as the share of the NUMA node's
memory it may take, and refuses to start when that much is not free: on a laptop or a shared
node the default fails. When neither ``gpu_memory_utilization`` nor a KV cache size is set,
the replica sizes the cache itself (``kv_cache_memory_bytes``): what the engine can use at most
(every sequence at full length), but never more than half of the memory still free on its node
after the weights, split between tensor-parallel ranks; at least one full-length sequence.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

_GIB = 2**30
_DTYPE_BYTES = {
    "float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
}
_FREE_SHARE = 0.5
_MAX_SEQS_PER_RANK = 256
"""vLLM's CPU default of concurrent sequences (OpenAI server 128, offline 256), per rank."""


def bytes_per_token(model_config: dict[str, Any], dtype: str) -> int | None:
    """KV cache bytes one token takes on all layers (keys and values), from a HF ``config.json``."""
    text = model_config.get("text_config") or model_config
    try:
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if dtype in ("auto", ""):
        dtype = str(text.get("torch_dtype") or model_config.get("torch_dtype") or "bfloat16")
    return 2 * layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype.removeprefix("torch."), 2)


def choose(
    model_dir: Path | None, engine_kwargs: dict[str, Any], tensor_parallel_size: int, available_bytes: int
) -> tuple[int, str]:
    """KV cache bytes per rank for a CPU engine, and a line saying how they were chosen."""
    config = _read_json(model_dir / "config.json") if model_dir is not None else None
    weights = _weights_bytes(model_dir) if model_dir is not None else 0
    budget = max(available_bytes - weights, 0) * _FREE_SHARE / tensor_parallel_size
    where = f"half of the {(available_bytes - weights) / _GIB:.1f} GiB free on this node after the weights"
    dtype = str(engine_kwargs.get("kv_cache_dtype") or engine_kwargs.get("dtype") or "auto")
    per_token = bytes_per_token(config, dtype) if config else None
    max_len = engine_kwargs.get("max_model_len") or (config or {}).get("max_position_embeddings")
    if per_token is None or not max_len:
        return int(budget), f"{budget / _GIB:.2f} GiB per rank ({where})"
    max_seqs = int(engine_kwargs.get("max_num_seqs") or _MAX_SEQS_PER_RANK * tensor_parallel_size)
    needed = per_token * int(max_len) * max_seqs / tensor_parallel_size
    one_sequence = per_token * int(max_len) / tensor_parallel_size
    chosen = max(min(needed, budget), min(one_sequence, available_bytes))
    reason = (
        f"what {max_seqs} sequences of {max_len} tokens need" if chosen == needed
        else f"{where}" if chosen == budget else f"one sequence of {max_len} tokens"
    )
    return math.ceil(chosen), f"{chosen / _GIB:.2f} GiB per rank ({reason})"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _weights_bytes(model_dir: Path) -> int:
    files = (path for pattern in ("*.safetensors", "*.bin", "*.pt") for path in model_dir.glob(pattern))
    return sum(path.stat().st_size for path in files)
