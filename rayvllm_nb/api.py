"""The blocking and async entry points every surface uses (re-exported by the package).

``ray_backend`` is the process-wide async orchestrator; each blocking function runs one of its
coroutines on the bridge loop (works inside a running event loop, e.g. a Jupyter cell). The
CLI, the magics and the panel call these, never the package ``__init__``, so that importing the
package for its IPython extension hook creates no import cycle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import openai

from rayvllm_nb._internal.clients import async_openai_client, openai_client
from rayvllm_nb._internal.facade import BRIDGE, blocking
from rayvllm_nb.backend import RayBackend
from rayvllm_nb.config import ModelConfig

if TYPE_CHECKING:
    from rayvllm_nb._internal.soak import SoakReport
    from rayvllm_nb.benchmark import BenchReport
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
metrics = blocking(ray_backend.get_metrics)
load_adapter = blocking(ray_backend.load_adapter)
unload_adapter = blocking(ray_backend.unload_adapter)


def bench(
    config: ModelConfig | Mapping[str, Any] | str | os.PathLike[str] = "tiny-cpu",
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    **settings: Any,
) -> BenchReport:
    """vLLM alone and the same model through rayvllm_nb, side by side over several server starts; see
    :func:`rayvllm_nb.benchmark.benchmark` for ``settings`` (starts, rounds, concurrency, requests_per_stream,
    input_len, output_len, pinned_baseline, output, on_event)."""
    from rayvllm_nb.benchmark import benchmark

    return BRIDGE.run(benchmark(ray_backend, config, overrides, **settings))


def soak(name: str | None = None, *, minutes: float = 5.0, concurrency: int = 32, output_len: int = 64) -> SoakReport:
    """Keep ``concurrency`` streams busy against the running model ``name`` for ``minutes``; the
    report holds errors and TTFT p50/p99 per minute and the model's memory before and after."""
    from rayvllm_nb.benchmark import soak_model

    return BRIDGE.run(
        soak_model(ray_backend, name, minutes=minutes, concurrency=concurrency, output_len=output_len)
    )


def panel() -> Panel:
    """The launch-and-chat widget panel (returns at once; connects when you press Launch)."""
    from rayvllm_nb.widget import Panel

    return Panel(ray_backend)


def client(name: str | None = None, **kwargs: Any) -> openai.OpenAI:
    """An ``openai.OpenAI`` client for the deployed model ``name`` (the only one if None), with
    the endpoint's API key when it has one."""
    return openai_client(endpoint(name), **kwargs)


def async_client(name: str | None = None, **kwargs: Any) -> openai.AsyncOpenAI:
    """An ``openai.AsyncOpenAI`` client for the deployed model ``name`` (the only one if None)."""
    return async_openai_client(endpoint(name), **kwargs)
