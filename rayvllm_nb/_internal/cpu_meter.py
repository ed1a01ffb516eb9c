"""CPU-seconds spent by groups of processes over a window, for the benchmark's cost per token.

A server's processes split in two: vLLM's engine (``VLLM::EngineCore`` and ``VLLM::Worker``,
which do the model's work) and everything else that serves (vLLM's API server, or a Serve
replica, HAProxy, Serve's controller and proxy and Ray's daemons). The second group is what a
serving layer costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psutil

from rayvllm_nb._internal.cpu_placement import ENGINE_CORE, WORKER, title


@dataclass(frozen=True)
class CpuSplit:
    """CPU-seconds over a window: the serving processes and the engine's."""

    serving_s: float
    engine_s: float


class CpuMeter:
    """Measures :class:`CpuSplit` over a window; ``processes`` lists the server's processes each time
    (at the start and the end), so one that starts inside the window counts from zero."""

    def __init__(self, processes: Callable[[], list[psutil.Process]]) -> None:
        self._processes = processes
        self._started: dict[int, tuple[bool, float]] = {}

    def start(self) -> None:
        self._started = _cpu_by_pid(self._processes())

    def stop(self) -> CpuSplit:
        ended = _cpu_by_pid(self._processes())
        totals = {True: 0.0, False: 0.0}
        for pid, (is_engine, seconds) in ended.items():
            totals[is_engine] += seconds - self._started.get(pid, (is_engine, 0.0))[1]
        return CpuSplit(serving_s=totals[False], engine_s=totals[True])


def is_engine(process: psutil.Process) -> bool:
    """Whether a process is vLLM's engine core or one of its workers."""
    return title(process).startswith((ENGINE_CORE, WORKER))


def _cpu_by_pid(processes: list[psutil.Process]) -> dict[int, tuple[bool, float]]:
    found = {}
    for process in processes:
        try:
            times = process.cpu_times()
            found[process.pid] = (is_engine(process), times.user + times.system)
        except psutil.Error:
            continue
    return found
