"""Engine built on Ray Serve LLM, which runs vLLM's own OpenAI serving code in replicas."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rayvllm_nb._internal.placement import PlacementPlan
from rayvllm_nb.config import ModelConfig
from rayvllm_nb.engines.base import Engine

if TYPE_CHECKING:
    from ray.serve.deployment import Application


class ServeLLMEngine(Engine):
    """``ray.serve.llm``'s LLMServer for the engine, its OpenAI ingress in front (0 CPUs)."""

    name = "serve-llm"

    def build_application(self, config: ModelConfig, model_source: str, plan: PlacementPlan) -> Application:
        with _root_logger_preserved():
            from ray.serve.llm import LLMConfig, build_openai_app

        llm_config = LLMConfig(
            model_loading_config={"model_id": config.name, "model_source": model_source},
            engine_kwargs=engine_arguments(config),
            placement_group_config={"bundles": plan.bundles, "strategy": plan.strategy},
            runtime_env={"env_vars": {**plan.env_vars, **config.env_vars, **_secret_env(config)}},
            # The replica actor asks for nothing itself, so the placement group is
            # exactly the plan (Serve LLM would otherwise add a CPU to the first bundle).
            deployment_config={"num_replicas": config.num_replicas, "ray_actor_options": {"num_cpus": 0}},
        )
        # The ingress only forwards requests: with 0 CPUs it schedules even when the
        # engine's bundles take every CPU of a small machine.
        return build_openai_app(
            {"llm_configs": [llm_config], "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}}}
        )

    def engine_deployment(self, config: ModelConfig) -> str:
        return f"LLMServer:{config.name}"


def engine_arguments(config: ModelConfig) -> dict[str, Any]:
    """vLLM engine arguments for ``config``: its named keys, then its ``engine_kwargs``."""
    arguments: dict[str, Any] = {
        "tensor_parallel_size": config.tensor_parallel_size,
        "dtype": config.dtype,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "enforce_eager": config.enforce_eager,
        "trust_remote_code": config.trust_remote_code,
        "load_format": config.load_format,
    }
    optional = {
        "max_model_len": config.max_model_len,
        "download_dir": config.download_dir,
        "enable_prefix_caching": config.enable_prefix_caching,
        "chat_template": config.chat_template,
    }
    arguments.update({key: value for key, value in optional.items() if value is not None})
    arguments.update(config.engine_kwargs)
    return arguments


def _secret_env(config: ModelConfig) -> dict[str, str]:
    return {"HF_TOKEN": config.hf_token.get_secret_value()} if config.hf_token else {}


@contextmanager
def _root_logger_preserved() -> Iterator[None]:
    """Importing ``ray.serve.llm`` replaces the root logger's handlers and level; undo that."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers, root.level = handlers, level
