"""Deploy vLLM on Ray Serve from a notebook, a script or the shell, and chat with it.

Blocking API (works inside a running event loop, e.g. a Jupyter cell)::

    import rayvllm_nb
    rayvllm_nb.start("tiny-cpu", wait_ready=True)
    rayvllm_nb.client().chat.completions.create(model="tiny", messages=[...])
    rayvllm_nb.stop()

Async API: ``await rayvllm_nb.ray_backend.start_model(...)``; both share one state.
"""

from __future__ import annotations

from typing import Any

from rayvllm_nb.api import (
    async_client,
    bench,
    client,
    endpoint,
    init,
    load_adapter,
    logs,
    metrics,
    model_status,
    panel,
    ray_backend,
    shutdown,
    soak,
    start,
    status,
    stop,
    unload_adapter,
    wait_for_ready,
)
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
from rayvllm_nb.tiny_model import DEMO_PROMPT, TINY_ADAPTER_REPLY, TINY_MODEL_REPLY, make_tiny_adapter, make_tiny_model
from rayvllm_nb.types import ClusterInfo, ModelMetrics, ModelStatus, Progress, ReplicaMetrics, ShutdownReport, Status


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext rayvllm_nb``: register ``%rayvllm`` and ``%%chat``."""
    from rayvllm_nb.magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext rayvllm_nb``: remove the magics."""
    from rayvllm_nb.magics import unload

    unload(ipython)


__all__ = [
    "DEMO_PROMPT",
    "TINY_ADAPTER_REPLY",
    "TINY_MODEL_REPLY",
    "ClusterError",
    "ClusterInfo",
    "ConfigError",
    "DeploymentError",
    "ModelConfig",
    "ModelMetrics",
    "ModelStatus",
    "NotDeployedError",
    "Progress",
    "RayBackend",
    "RayVllmError",
    "ReadinessTimeout",
    "ReplicaMetrics",
    "ShutdownReport",
    "Status",
    "async_client",
    "available_configs",
    "bench",
    "client",
    "endpoint",
    "init",
    "load_adapter",
    "load_config",
    "logs",
    "make_tiny_adapter",
    "make_tiny_model",
    "metrics",
    "model_status",
    "panel",
    "ray_backend",
    "shutdown",
    "soak",
    "start",
    "status",
    "stop",
    "unload_adapter",
    "wait_for_ready",
]
