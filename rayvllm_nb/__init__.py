"""Deploy vLLM on Ray Serve from a notebook, a script or the shell, and chat with it.

Blocking API (works inside a running event loop, e.g. a Jupyter cell)::

    import rayvllm_nb
    rayvllm_nb.start("tiny-cpu", wait_ready=True)
    rayvllm_nb.client().chat.completions.create(model="tiny", messages=[...])
    rayvllm_nb.stop()

Async API: ``await rayvllm_nb.ray_backend.start_model(...)``; both share one state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import openai

from rayvllm_nb._internal.clients import async_openai_client, openai_client
from rayvllm_nb._internal.facade import BRIDGE, blocking
from rayvllm_nb.backend import RayBackend
from rayvllm_nb.config import ModelConfig, available_configs, load_config
from rayvllm_nb.errors import (
    ClusterError,
    ConfigError,
    DeploymentError,
    NotDeployedError,
    RayVllmError,
    ReadinessTimeout,
)
from rayvllm_nb.tiny_model import DEMO_PROMPT, TINY_MODEL_REPLY, make_tiny_model
from rayvllm_nb.types import ClusterInfo, ModelStatus, Progress, Status

if TYPE_CHECKING:
    from rayvllm_nb._internal.soak import SoakReport
    from rayvllm_nb.bench import BenchReport
    from rayvllm_nb.widget import Panel

ray_backend = RayBackend()
"""The process-wide async orchestrator; the blocking functions below call it."""

init = blocking(ray_backend.initialize_ray)
start = blocking(ray_backend.start_model)
wait_for_ready = blocking(ray_backend.wait_for_ready)
status = blocking(ray_backend.get_status)
stop = blocking(ray_backend.stop_model)
logs = blocking(ray_backend.get_logs)
shutdown = blocking(ray_backend.shutdown)
model_status = blocking(ray_backend.model_status)
endpoint = blocking(ray_backend.endpoint)


def bench(
    config: ModelConfig | Mapping[str, Any] | str | os.PathLike[str] = "tiny-cpu",
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    **settings: Any,
) -> BenchReport:
    """vLLM alone and the same model through rayvllm_nb, side by side over several server starts; see
    :func:`rayvllm_nb.bench.benchmark` for ``settings`` (starts, rounds, concurrency, requests_per_stream,
    input_len, output_len, pinned_baseline, output, on_event)."""
    from rayvllm_nb.bench import benchmark

    return BRIDGE.run(benchmark(ray_backend, config, overrides, **settings))


def soak(name: str | None = None, *, minutes: float = 5.0, concurrency: int = 32, output_len: int = 64) -> SoakReport:
    """Keep ``concurrency`` streams busy against the running model ``name`` for ``minutes``; the
    report holds errors and TTFT p50/p99 per minute and the model's memory before and after."""
    from rayvllm_nb.bench import soak_model

    return BRIDGE.run(
        soak_model(ray_backend, name, minutes=minutes, concurrency=concurrency, output_len=output_len)
    )


def panel() -> Panel:
    """The launch-and-chat widget panel (returns at once; connects when you press Launch)."""
    from rayvllm_nb.widget import Panel

    return Panel(ray_backend)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext rayvllm_nb``: register ``%rayvllm`` and ``%%chat``."""
    from rayvllm_nb.magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext rayvllm_nb``: remove the magics."""
    from rayvllm_nb.magics import unload

    unload(ipython)


def client(name: str | None = None, **kwargs: Any) -> openai.OpenAI:
    """An ``openai.OpenAI`` client for the deployed model ``name`` (the only one if None), with
    the endpoint's API key when it has one."""
    return openai_client(endpoint(name), **kwargs)


def async_client(name: str | None = None, **kwargs: Any) -> openai.AsyncOpenAI:
    """An ``openai.AsyncOpenAI`` client for the deployed model ``name`` (the only one if None)."""
    return async_openai_client(endpoint(name), **kwargs)


__all__ = [
    "DEMO_PROMPT",
    "TINY_MODEL_REPLY",
    "ClusterError",
    "ClusterInfo",
    "ConfigError",
    "DeploymentError",
    "ModelConfig",
    "ModelStatus",
    "NotDeployedError",
    "Progress",
    "RayBackend",
    "RayVllmError",
    "ReadinessTimeout",
    "Status",
    "async_client",
    "available_configs",
    "bench",
    "client",
    "endpoint",
    "init",
    "load_config",
    "logs",
    "make_tiny_model",
    "model_status",
    "panel",
    "ray_backend",
    "shutdown",
    "soak",
    "start",
    "status",
    "stop",
    "wait_for_ready",
]
