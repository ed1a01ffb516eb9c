"""Engine built on Ray Serve LLM, which runs vLLM's own OpenAI serving code in replicas."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from rayvllm_nb._internal.placement import PlacementPlan
from rayvllm_nb.config import ModelConfig
from rayvllm_nb.engines.base import Engine
from rayvllm_nb.errors import ConfigError

if TYPE_CHECKING:
    from ray.serve.deployment import Application

_ENGINE_DEPLOYMENT_PREFIX = "VllmServer"
SECRET_REF_ENV = "RAYVLLM_NB_SECRET_REF"
"""Names the cluster-KV entry holding a model's secrets; the only trace of them in a runtime env."""
SECRET_NAMESPACE = "rayvllm_nb_secrets"
SECRET_ENV_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


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
        with _quiet_driver_imports():
            from ray import serve
            from ray.serve.llm import LLMConfig, build_llm_deployment

            from rayvllm_nb.engines import _replica

        llm_config = LLMConfig(
            model_loading_config={"model_id": config.name, "model_source": model_source},
            engine_kwargs=engine_arguments(config),
            placement_group_config={"bundles": plan.bundles, "strategy": plan.strategy},
            runtime_env=self._runtime_env(config, plan),
            # The replica actor asks for nothing itself, so the placement group is
            # exactly the plan (Serve LLM would otherwise add a CPU to the first bundle).
            deployment_config={"num_replicas": config.num_replicas, "ray_actor_options": {"num_cpus": 0}},
            server_cls=_replica.VllmServer,
            callback_config={"callback_class": _replica.ReplicaCallback},
        )
        return build_llm_deployment(
            llm_config,
            override_serve_options={"name": self.engine_deployment(config)},
            deployment_cls=serve.ingress()(_replica.VllmServer),
        )

    def validate(self, config: ModelConfig) -> None:
        check_engine_kwargs(config.engine_kwargs)

    def engine_deployment(self, config: ModelConfig) -> str:
        return f"{_ENGINE_DEPLOYMENT_PREFIX}:{config.name.replace('/', '--')}"

    def release(self, config_name: str) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(_secret_ref(config_name), namespace=SECRET_NAMESPACE)

    @staticmethod
    def _runtime_env(config: ModelConfig, plan: PlacementPlan) -> dict[str, Any]:
        """The replicas' environment; secrets go to the cluster KV store, only their key goes here."""
        env_vars = {**_REPLICA_ENV, **plan.env_vars, **config.env_vars}
        if config.hf_token is None:
            return {"env_vars": env_vars}
        from ray.experimental.internal_kv import _internal_kv_put

        token = config.hf_token.get_secret_value()
        secrets = json.dumps(dict.fromkeys(SECRET_ENV_NAMES, token))
        _internal_kv_put(_secret_ref(config.name), secrets, overwrite=True, namespace=SECRET_NAMESPACE)
        return {"env_vars": {**env_vars, SECRET_REF_ENV: _secret_ref(config.name)}}


_REPLICA_ENV = {
    # vLLM's app, its engine client and the replica's HTTP server share one event loop, as in
    # `vllm serve`: no thread hop per streamed chunk (docs/performance.md, variant v2).
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}


def _secret_ref(name: str) -> str:
    return f"model:{name}"


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
        elif key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            problems.append(f"unknown vLLM engine argument {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        elif known[key] is not None:
            try:
                known[key].validate_python(value)
            except ValidationError as error:
                problems.append(f"engine_kwargs.{key}={value!r}: {error.errors()[0]['msg']}")
    if problems:
        raise ConfigError(
            "Invalid engine_kwargs: " + "; ".join(problems) + ". See vLLM's engine arguments "
            "(AsyncEngineArgs) for names and types."
        )


_NAMED_KEYS = (
    "tensor_parallel_size", "dtype", "gpu_memory_utilization", "enforce_eager", "trust_remote_code",
    "load_format", "max_model_len", "download_dir", "enable_prefix_caching", "chat_template",
)


@functools.cache
def _engine_arg_types() -> dict[str, TypeAdapter[Any] | None]:
    """vLLM's engine argument names, each with a validator for its type (None if unknown)."""
    with _quiet_driver_imports():
        import vllm.engine.arg_utils as arg_utils

    types: dict[str, TypeAdapter[Any] | None] = {}
    for field in dataclasses.fields(arg_utils.AsyncEngineArgs):
        try:
            hint = eval(field.type, vars(arg_utils)) if isinstance(field.type, str) else field.type  # noqa: S307
            types[field.name] = TypeAdapter(hint)
        except Exception:  # noqa: BLE001 - a type pydantic cannot check is left to vLLM
            types[field.name] = None
    return types


def engine_arguments(config: ModelConfig) -> dict[str, Any]:
    """vLLM engine arguments for ``config``: its named keys (unset ones left to vLLM), then ``engine_kwargs``."""
    arguments = {key: getattr(config, key) for key in _NAMED_KEYS if getattr(config, key) is not None}
    arguments.update(config.engine_kwargs)
    return arguments


@contextmanager
def _quiet_driver_imports() -> Iterator[None]:
    """Import vLLM and Serve LLM in the caller's process without side effects on it.

    Importing ``ray.serve.llm`` replaces the root logger's handlers and level (undone
    here), and vLLM prints import-time warnings to stdout unless its log level, read once
    at import, is raised (a user's own VLLM_LOGGING_LEVEL wins).
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    explicit_level = os.environ.get(_VLLM_LOG_LEVEL)
    os.environ[_VLLM_LOG_LEVEL] = explicit_level or "ERROR"
    try:
        yield
    finally:
        root.handlers, root.level = handlers, level
        if explicit_level is None:
            os.environ.pop(_VLLM_LOG_LEVEL, None)


_VLLM_LOG_LEVEL = "VLLM_LOGGING_LEVEL"
