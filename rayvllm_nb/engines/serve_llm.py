"""Engine built on Ray Serve LLM, which runs vLLM's own OpenAI serving code in replicas."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from rayvllm_nb._internal import registry
from rayvllm_nb._internal.quiet_imports import quiet_driver_imports
from rayvllm_nb._internal.replica_env import LORA_ENV, MODEL_ENV, SECRET_ENV_NAMES, SECRET_REF_ENV
from rayvllm_nb._internal.serve_haproxy import RETRY_AFTER_S
from rayvllm_nb.config import ModelConfig, did_you_mean
from rayvllm_nb.engines.base import Engine
from rayvllm_nb.errors import ConfigError
from rayvllm_nb.placement import PlacementPlan

if TYPE_CHECKING:
    from ray.serve.deployment import Application

_ENGINE_DEPLOYMENT_PREFIX = "VllmServer"


class ServeLLMEngine(Engine):
    """vLLM's own OpenAI server in each Serve replica, which is its model's HTTP ingress.

    Serve LLM's ``LLMServer`` (our subclass) runs the engine and builds vLLM's FastAPI app
    around it; ``serve.ingress()`` makes that app the deployment's ingress. With Serve's
    HAProxy mode (heads we start) requests stream from the replica's own HTTP server through
    HAProxy, with no Ray actor call per token; elsewhere Serve's proxy forwards in one hop.
    The replica asks for no CPU itself: its placement group is exactly the plan.
    """

    name = "serve-llm"

    def build_application(self, config: ModelConfig, model_source: str, plan: PlacementPlan) -> Application:
        with quiet_driver_imports():
            from ray import serve
            from ray.serve.llm import LLMConfig, build_llm_deployment

            from rayvllm_nb.engines import _replica

        llm_config = LLMConfig(
            model_loading_config={"model_id": config.name, "model_source": model_source},
            engine_kwargs=self.engine_arguments(config),
            placement_group_config={"bundles": plan.bundles, "strategy": plan.strategy},
            runtime_env=self._runtime_env(config, plan),
            deployment_config={
                **_replica_settings(config),
                # The replica actor asks for nothing itself, so the placement group is
                # exactly the plan (Serve LLM would otherwise add a CPU to the first bundle).
                "ray_actor_options": {"num_cpus": 0},
                # A dead engine is noticed in seconds (Serve's default: 3 checks 10 s apart).
                "health_check_period_s": _HEALTH_CHECK_PERIOD_S,
                "health_check_timeout_s": _HEALTH_CHECK_TIMEOUT_S,
                # Stop, replace and scale-down let running requests finish, up to this long.
                "graceful_shutdown_timeout_s": config.drain_timeout_s,
            },
            # vLLM's own Prometheus logger (not Ray's wrapper of it, which writes to Ray's metrics
            # agent, off on our heads): exact counts, read per replica by rayvllm_nb.metrics().
            log_engine_metrics=False,
            server_cls=_replica.VllmServer,
            callback_config={"callback_class": _replica.ReplicaCallback},
        )
        return build_llm_deployment(
            llm_config,
            override_serve_options={"name": self.engine_deployment(config)},
            deployment_cls=serve.ingress()(_replica.VllmServer),
        )

    def engine_arguments(self, config: ModelConfig) -> dict[str, Any]:
        """vLLM engine arguments for ``config``: its named keys (unset ones left to vLLM), then ``engine_kwargs``."""
        arguments = {key: getattr(config, key) for key in _NAMED_KEYS if getattr(config, key) is not None}
        if config.lora_enabled:
            arguments["enable_lora"] = True
        arguments.update(config.engine_kwargs)
        return arguments

    def validate(self, config: ModelConfig) -> None:
        check_engine_kwargs(config.engine_kwargs)

    def engine_deployment(self, config: ModelConfig) -> str:
        return f"{_ENGINE_DEPLOYMENT_PREFIX}:{config.name.replace('/', '--')}"

    def release(self, config_name: str) -> None:
        registry.forget_model_secrets(config_name)

    @staticmethod
    def _runtime_env(config: ModelConfig, plan: PlacementPlan) -> dict[str, Any]:
        """The replicas' environment; secrets go to the cluster KV store, only their key goes here."""
        env_vars = {**_REPLICA_ENV, **plan.env_vars, **config.env_vars, MODEL_ENV: config.name}
        if config.lora_enabled:
            env_vars[LORA_ENV] = "1"
        if config.hf_token is not None:
            token = config.hf_token.get_secret_value()
            env_vars[SECRET_REF_ENV] = registry.put_model_secrets(config.name, dict.fromkeys(SECRET_ENV_NAMES, token))
        return {"env_vars": env_vars}


def _replica_settings(config: ModelConfig) -> dict[str, Any]:
    """Serve's replica settings: a fixed count or its autoscaler, and the per-replica request bounds
    (a rejected request is Serve's 503, which our HAProxy makes OpenAI-shaped; see serve_haproxy). A model
    scaling to zero keeps Serve's holding fallback in HAProxy (see serve_haproxy), which wakes it."""
    settings: dict[str, Any] = {"num_replicas": config.num_replicas}
    if config.autoscaling is not None:
        autoscaling = config.autoscaling.model_dump(exclude_none=True)
        if config.autoscaling.scales_to_zero:
            autoscaling["initial_replicas"] = 1  # load once at start: a broken config fails then, not at first use
        settings = {"autoscaling_config": autoscaling}
    if config.max_ongoing_requests is not None:
        settings["max_ongoing_requests"] = config.max_ongoing_requests
    if config.max_queued_requests is not None:
        settings["max_queued_requests"] = config.max_queued_requests
        settings["backpressure_config"] = {"status_code": 503, "retry_after_s": RETRY_AFTER_S}
    return settings


_HEALTH_CHECK_PERIOD_S = 2.0
_HEALTH_CHECK_TIMEOUT_S = 10.0
_REPLICA_ENV = {
    # vLLM's app, its engine client and the replica's HTTP server share one event loop, as in
    # `vllm serve`: no thread hop per streamed chunk (docs/performance.md, variant v2).
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}


def check_engine_kwargs(engine_kwargs: dict[str, Any]) -> None:
    """Check names and value types against vLLM's ``AsyncEngineArgs`` before deploying."""
    if not engine_kwargs:
        return
    known = _engine_arg_types()
    problems = []
    for key, value in engine_kwargs.items():
        if key in _NAMED_KEYS:
            problems.append(f"{key!r} is a config key of its own: set `{key}: ...` instead of engine_kwargs.{key}")
        elif key in ("model", "served_model_name"):
            problems.append(f"{key!r} is set by the config's `model` / `served_model_name` keys")
        elif key in ("enable_lora", "lora_modules"):
            problems.append(f"{key!r} is set by the config's `enable_lora` / `lora_adapters` keys")
        elif key not in known:
            problems.append(f"unknown vLLM engine argument {key!r}{did_you_mean(key, known)}")
        elif (adapter := known[key]) is not None:
            try:
                adapter.validate_python(value)
            except ValidationError as error:
                problems.append(f"engine_kwargs.{key}={value!r}: {error.errors()[0]['msg']}")
    if problems:
        raise ConfigError(
            "Invalid engine_kwargs: " + "; ".join(problems) + ". See vLLM's engine arguments "
            "(AsyncEngineArgs) for names and types."
        )


_NAMED_KEYS = (
    "tensor_parallel_size", "dtype", "gpu_memory_utilization", "enforce_eager", "trust_remote_code",
    "load_format", "max_model_len", "download_dir", "enable_prefix_caching", "chat_template", "max_loras",
    "max_lora_rank",
)


@functools.cache
def _engine_arg_types() -> dict[str, TypeAdapter[Any] | None]:
    """vLLM's engine argument names, each with a validator for its type (None if unknown)."""
    with quiet_driver_imports():
        import vllm.engine.arg_utils as arg_utils

    types: dict[str, TypeAdapter[Any] | None] = {}
    for field in dataclasses.fields(arg_utils.AsyncEngineArgs):
        try:
            hint = eval(field.type, vars(arg_utils)) if isinstance(field.type, str) else field.type  # noqa: S307
            types[field.name] = TypeAdapter(hint)
        except Exception:  # noqa: BLE001 - a type pydantic cannot check is left to vLLM
            types[field.name] = None
    return types
