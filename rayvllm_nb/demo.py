"""The main job of `make demo`: build the tiny model, deploy it on CPU, chat, stop everything."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from rayvllm_nb import api
from rayvllm_nb._internal.chat import stream_chat_blocking
from rayvllm_nb.tiny_model import DEMO_PROMPT, TINY_MODEL_REPLY, tiny_model_path
from rayvllm_nb.types import Progress


def run_demo(config: str = "tiny-cpu", out: Callable[[str], None] = print) -> bool:
    """Run the demo end to end; True when the model answered the known sentence."""
    timings: dict[str, float] = {}

    def timed(label: str, started: float) -> None:
        timings[label] = time.perf_counter() - started
        out(f"  {label}: {timings[label]:.1f} s")

    started = time.perf_counter()
    out("1/5 tiny model")
    out(f"  {tiny_model_path()}")
    timed("model build or cache", started)

    step = time.perf_counter()
    out("2/5 Ray cluster")
    cluster = api.init()
    out(f"  {cluster.address} ({cluster.mode}), resources {cluster.resources}")
    timed("cluster", step)
    try:
        step = time.perf_counter()
        out(f"3/5 deploy {config!r} on Ray Serve")
        status = api.start(config, wait_ready=True, on_progress=lambda p: out(_progress_line(p)))
        timed("deploy to ready", step)

        out(f"4/5 chat: {DEMO_PROMPT!r}")
        result = stream_chat_blocking(
            api.endpoint(status.name), status.name, [{"role": "user", "content": DEMO_PROMPT}],
            on_text=_write,
        )
        out("")
        out(f"  {result.summary()}")

        out("5/5 status")
        out(str(api.status()))
    finally:
        step = time.perf_counter()
        api.shutdown()
        timed("stop and clean up", step)
    ok = result.text == TINY_MODEL_REPLY
    out(f"total {time.perf_counter() - started:.1f} s; answer {'matches' if ok else 'DIFFERS from'} the known sentence")
    return ok


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _progress_line(progress: Progress) -> str:
    return f"  [{progress.elapsed_s:5.1f} s] {progress}"
