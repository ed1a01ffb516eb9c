"""The environment variables through which the driver tells a model's replicas what they need.

Set in each replica's runtime env (so also in its vLLM engine processes); never a secret.
"""

from __future__ import annotations

MODEL_ENV = "RAYVLLM_NB_MODEL"
"""The served model name: the replica finds its record in the registry, and a vLLM process of
ours is recognised by it (see ``processes.orphans``)."""

AUTO_KV_CACHE_ENV = "RAYVLLM_NB_AUTO_KV_CACHE"
"""Set when the user sized no KV cache (CPU): the replica sizes it on its own node."""

CPU_PINNING_ENV = "RAYVLLM_NB_CPU_PINNING"
"""Set on CPU when the config's ``cpu_pinning`` is on: the replica pins its engine's processes
once they run (``cpu_placement``)."""

LORA_ENV = "RAYVLLM_NB_LORA"
"""Set when the model runs with LoRA: the replica keeps its adapters equal to the registry's."""

SECRET_REF_ENV = "RAYVLLM_NB_SECRET_REF"
"""Names the registry entry holding the model's secrets; the only trace of them in a runtime env."""

SECRET_ENV_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
"""The environment variables a model's HF token is given to vLLM as."""
