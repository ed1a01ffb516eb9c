"""Where the processes of a CPU deployment run: the engine beside its worker, the streaming elsewhere.

vLLM's CPU worker (``VLLM::Worker``) binds its OpenMP threads to cores of its own (one per
tensor-parallel rank, ``VLLM_CPU_OMP_THREADS_BIND``; vLLM keeps one core free by default). Its
engine core (``VLLM::EngineCore``, the scheduler) is bound to nothing: while the worker computes,
the engine core spins on the free core waiting for its answer, and the process that streams
tokens to clients (vLLM's API server, or our Serve replica, and Serve's HAProxy) must share that
core with it. When the scheduler keeps the core, tokens reach clients only when a request ends:
time to first token becomes the whole request's time (the "stall"; docs/performance.md).

The placement here moves every thread of the engine core onto its rank-0 worker's cores, and the
streaming processes onto the cores no worker binds. It changes where processes run, not what
they ask of Ray. When workers bind every core (TP=2 on 2 cores), only the engine core moves.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ENGINE_CORE = "VLLM::EngineCore"
WORKER = "VLLM::Worker"


@dataclass(frozen=True)
class Placement:
    """What was pinned where: cores per role, for status and the benchmark's report."""

    worker_cores: tuple[int, ...]
    engine_cores: tuple[int, ...]
    serving_cores: tuple[int, ...]
    moved: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Process description -> the cores it now runs on."""

    def summary(self) -> str:
        """One line, e.g. "engine core on 0 (with its worker), serving on 1"."""
        engine = f"engine core on {_cores(self.engine_cores)} (with its worker)"
        serving = f"serving on {_cores(self.serving_cores)}" if self.serving_cores else "no core left for serving"
        return f"{engine}, {serving}"


def place(server: psutil.Process, extra_serving: Sequence[psutil.Process] = ()) -> Placement | None:
    """Pin ``server``'s vLLM engine core onto its rank-0 worker's cores and ``server`` itself (with
    ``extra_serving``, e.g. Serve's HAProxy) onto the cores no worker binds. ``server`` is the process
    that started the engine (a Serve replica, or vLLM's API server). None when there is no CPU
    engine under it (a GPU deployment, or the engine is not up)."""
    engines = [p for p in _descendants(server) if title(p).startswith(ENGINE_CORE)]
    if not engines:
        return None
    workers = sorted((p for p in _descendants(engines[0]) if title(p).startswith(WORKER)), key=title)
    if not workers:
        return None
    bound = [_bound_cores(worker) for worker in workers]
    worker_cores = set().union(*bound)
    serving = tuple(sorted(set(os.sched_getaffinity(server.pid)) - worker_cores))
    rank0 = tuple(sorted(bound[0]))
    moved = {_describe(engine): _pin(engine, rank0) for engine in engines}
    if serving:
        for process in [server, *extra_serving]:
            moved[_describe(process)] = _pin(process, serving)
    return Placement(tuple(sorted(worker_cores)), rank0, serving, moved)


def serve_ingress_processes(raylet_pid: str) -> list[psutil.Process]:
    """Serve's HAProxy of a node (its raylet's pid) and the actor that starts it (whose later
    HAProxy processes, after a reload, inherit its cores)."""
    found = []
    for process in psutil.process_iter(["name"]):
        try:
            name = process.info["name"] or ""
            if (name == "haproxy" or name.startswith("ray::HAProxyMan")) and (
                process.environ().get("RAY_RAYLET_PID") == raylet_pid
            ):
                found.append(process)
        except psutil.Error:
            continue
    return found


def _bound_cores(worker: psutil.Process) -> set[int]:
    """The cores a worker's OpenMP threads are bound to (the intersection-free union over its threads
    that are bound to fewer than all cores; its main thread's affinity otherwise)."""
    everything = set(os.sched_getaffinity(0))
    bound: set[int] = set()
    for thread in _threads(worker.pid):
        with contextlib.suppress(OSError):
            cores = set(os.sched_getaffinity(thread))
            if cores != everything:
                bound |= cores
    return bound or set(os.sched_getaffinity(worker.pid))


def _pin(process: psutil.Process, cores: tuple[int, ...]) -> tuple[int, ...]:
    """Every thread of ``process`` onto ``cores`` (threads it starts later inherit it)."""
    for thread in _threads(process.pid):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(thread, cores)
    return cores


def _threads(pid: int) -> list[int]:
    try:
        return [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return []


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def title(process: psutil.Process) -> str:
    """A process's title as vLLM sets it (``VLLM::EngineCore``...): its command line, else its name."""
    try:
        return " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return ""


def _describe(process: psutil.Process) -> str:
    return f"{title(process).split(' ')[0]} (pid {process.pid})"


def _cores(cores: tuple[int, ...]) -> str:
    return ",".join(map(str, cores)) or "-"
