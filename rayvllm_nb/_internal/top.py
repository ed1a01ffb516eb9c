"""`rayvllm top`: every model's live metrics in a terminal, redrawn each second; q or Ctrl-C quits."""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from typing import TextIO

from rayvllm_nb import api
from rayvllm_nb.errors import RayVllmError
from rayvllm_nb.types import ModelMetrics

_COLUMNS = ("model", "running", "waiting", "KV cache", "tok/s", "TTFT p50", "ITL p50", "tokens in", "tokens out",
            "preempt", "replicas")
_CLEAR = "\x1b[H\x1b[2J"


def render(models: list[ModelMetrics], at: str) -> str:
    """One screen: a header line and a row per model."""
    rows = [_COLUMNS] + [(
        m.name, str(m.requests_running), str(m.requests_waiting), f"{m.kv_cache_usage:.0%}",
        f"{m.generation_tok_s:.0f}", f"{m.ttft_p50_ms:.0f} ms", f"{m.itl_p50_ms:.1f} ms",
        str(m.prompt_tokens_total), str(m.generation_tokens_total), str(m.preemptions_total), str(len(m.replicas)),
    ) for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    if not models:
        lines.append("(no model deployed)")
    return f"rayvllm top  {at}  (q quits)\n\n" + "\n".join(lines) + "\n"


def run_top(interval_s: float = 1.0, keys: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """Redraw every model's metrics each ``interval_s`` until q is pressed (or Ctrl-C)."""
    fd = keys.fileno()
    saved = termios.tcgetattr(fd) if keys.isatty() else None
    if saved is not None:
        tty.setcbreak(fd)
    try:
        while True:
            started = time.monotonic()
            models = []
            for model in api.status().models:
                try:
                    models.append(api.metrics(model.name))
                except RayVllmError:
                    continue  # stopped between the two reads
            out.write(_CLEAR + render(models, time.strftime("%H:%M:%S")))
            out.flush()
            wait = max(interval_s - (time.monotonic() - started), 0.0)
            ready, _, _ = select.select([fd], [], [], wait)
            if ready and os.read(fd, 1) in (b"q", b"Q"):
                return
    except KeyboardInterrupt:
        return
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
