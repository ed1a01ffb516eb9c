"""Side-by-side benchmark: the same model and engine arguments served by vLLM's own OpenAI
server alone and through rayvllm_nb on Ray Serve, robust to the stall these machines fall into.

On a few cores a server can fall into a mode where tokens reach clients only when a request
ends (docs/performance.md: the "stall"); which server falls into it varies with each server
start. So the benchmark makes several *starts*: each start launches every side afresh (vLLM
alone as a user starts it by hand, vLLM alone with our CPU placement, and our deployment on the
running cluster) one after the other, in an order that rotates with each start, warms them
all, then loads them in turn, one concurrency after another, ``rounds`` times with the order
rotating, while the others idle. A side *stalls* in a start when its median TTFT p50 at
concurrency 1 is above 50 ms.

The load generator runs in a process of its own; its CPU time is reported. Beside tokens/s and
TTFT, each load measures CPU-seconds: the engine's (vLLM's engine core and workers) and the
serving layer's (everything else the side runs: vLLM's API server; or the Serve replica,
HAProxy, Serve's controller and proxy, Ray's daemons). Each start's figures are the medians of
its rounds; the report gives every start and, per side, the median with min-max over starts.
Streaming completions with ``ignore_eos`` give every request the same number of tokens; every
load uses new prompts, so prefix caching cannot help.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from rayvllm_nb._internal import cluster as _cluster
from rayvllm_nb._internal import processes
from rayvllm_nb._internal.cpu_meter import CpuMeter
from rayvllm_nb._internal.loadgen import run_load_in_subprocess, warm_up
from rayvllm_nb._internal.soak import SoakReport, soak
from rayvllm_nb._internal.vllm_alone import VllmAloneServer
from rayvllm_nb.config import ModelConfig, load_config
from rayvllm_nb.engines import get_engine
from rayvllm_nb.errors import ConfigError
from rayvllm_nb.placement import plan_placement
from rayvllm_nb.tiny_model import model_source

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from rayvllm_nb.backend import RayBackend

VLLM_ALONE = "vllm-alone"
"""vLLM's server started as by hand: the baseline."""
VLLM_ALONE_PINNED = "vllm-alone-pinned"
"""vLLM's server with our CPU placement (``cpu_placement``), to tell the placement's effect from ours."""
RAYVLLM = "rayvllm_nb"
STALL_TTFT_MS = 50.0
"""A side stalls in a start when its median TTFT p50 at concurrency 1 is above this."""


@dataclass
class Load:
    """One load run: one side, one concurrency, one round of one start."""

    round: int
    concurrency: int
    summary: dict[str, float | int | None]
    serving_cpu_s: float
    """CPU-seconds of the side's serving processes during the load."""
    engine_cpu_s: float
    """CPU-seconds of vLLM's engine core and workers during the load."""
    loadgen_cpu_s: float
    """CPU-seconds of the load generator's process during the load."""


@dataclass
class SideStart:
    """One side in one start: its time to ready, its CPU placement and its loads."""

    side: str
    start: int
    ready_s: float
    ready_kind: str
    """'process' (vLLM alone), 'cold' (our deployment on a Ray cluster started for it), 'relaunch'
    (our deployment on the running cluster)."""
    cpu_placement: str
    loads: list[Load] = field(default_factory=list)

    def median(self, concurrency: int, metric: str) -> float | None:
        """The median over rounds of a load summary's ``metric`` at ``concurrency``."""
        values = [load.summary[metric] for load in self.loads if load.concurrency == concurrency]
        present = [float(value) for value in values if value is not None]
        return statistics.median(present) if present else None

    def per_1k_tokens(self, attribute: str) -> float | None:
        """CPU-seconds (``serving_cpu_s``, ``engine_cpu_s`` or ``loadgen_cpu_s``) per 1,000 output tokens, all loads."""
        tokens = sum(int(load.summary["output_tokens"] or 0) for load in self.loads)
        return 1000 * sum(getattr(load, attribute) for load in self.loads) / tokens if tokens else None

    def stalled(self) -> bool | None:
        """TTFT p50 at concurrency 1 above :data:`STALL_TTFT_MS` (None without a concurrency-1 load)."""
        ttft = self.median(1, "ttft_p50_ms")
        return None if ttft is None else ttft > STALL_TTFT_MS

    def figures(self, top: int) -> dict[str, Any]:
        """This start's figures, as the report's per-start table shows them (``top``: the highest concurrency)."""
        engine = self.per_1k_tokens("engine_cpu_s")
        return {
            "ready_s": self.ready_s,
            f"c{top}_tok_per_s": self.median(top, "output_tok_per_s"),
            "c1_ttft_p50_ms": self.median(1, "ttft_p50_ms"),
            f"c{top}_ttft_p50_ms": self.median(top, "ttft_p50_ms"),
            "serving_cpu_s_per_1k_tok": self.per_1k_tokens("serving_cpu_s"),
            "tok_per_engine_cpu_s": 1000 / engine if engine else None,
            "loadgen_cpu_s_per_1k_tok": self.per_1k_tokens("loadgen_cpu_s"),
            "errors": sum(int(load.summary["errors"] or 0) for load in self.loads),
            "stalled": self.stalled(),
        }


@dataclass
class BenchReport:
    """Everything one benchmark run measured: every side of every start, and summaries over starts."""

    config: dict[str, Any]
    settings: dict[str, Any]
    starts: list[SideStart]
    started_at: str

    @property
    def sides(self) -> list[str]:
        return list(dict.fromkeys(run.side for run in self.starts))

    @property
    def top(self) -> int:
        return max(self.settings["concurrency"])

    def per_start(self, side: str) -> list[dict[str, Any]]:
        """Each start's figures for ``side``, in start order."""
        return [run.figures(self.top) for run in self.starts if run.side == side]

    def spread(self, side: str, metric: str, *, stall_free: bool = False) -> tuple[float, float, float] | None:
        """Median, min and max over starts of ``metric`` for ``side`` (with ``stall_free``: its stall-free starts)."""
        values = [
            float(row[metric]) for row in self.per_start(side)
            if row[metric] is not None and not (stall_free and row["stalled"])
        ]
        return (statistics.median(values), min(values), max(values)) if values else None

    def comparison(self, side: str = RAYVLLM, baseline: str = VLLM_ALONE) -> dict[str, Any]:
        """``side`` against ``baseline``: stalled starts of each; per-start ratios (median, min, max) of
        top-concurrency tok/s and serving CPU per 1k tokens; among stall-free starts, the ratio of the
        median tok/s and the difference of the median c=1 TTFT; relaunch time to ready minus the baseline's."""
        ours, theirs = self.per_start(side), self.per_start(baseline)
        throughput, serving = f"c{self.top}_tok_per_s", "serving_cpu_s_per_1k_tok"

        def ratios(metric: str) -> tuple[float, float, float] | None:
            values = [
                float(a[metric]) / float(b[metric]) for a, b in zip(ours, theirs, strict=False)
                if a[metric] is not None and b[metric]
            ]
            return (statistics.median(values), min(values), max(values)) if values else None

        clean_ours, clean_theirs = (self.spread(side, throughput, stall_free=True),
                                    self.spread(baseline, throughput, stall_free=True))
        ttft_ours, ttft_theirs = (self.spread(side, "c1_ttft_p50_ms", stall_free=True),
                                  self.spread(baseline, "c1_ttft_p50_ms", stall_free=True))
        relaunch = [run.ready_s for run in self.starts if run.side == side and run.ready_kind == "relaunch"]
        alone_ready = [run.ready_s for run in self.starts if run.side == baseline]
        return {
            "side": side,
            "baseline": baseline,
            "stalled_starts": {name: sum(bool(row["stalled"]) for row in rows)
                               for name, rows in ((side, ours), (baseline, theirs))},
            "starts": {side: len(ours), baseline: len(theirs)},
            f"{throughput}_ratio": ratios(throughput),
            f"{serving}_ratio": ratios(serving),
            f"stall_free_{throughput}_ratio": (
                clean_ours[0] / clean_theirs[0] if clean_ours and clean_theirs else None
            ),
            "stall_free_c1_ttft_p50_delta_ms": ttft_ours[0] - ttft_theirs[0] if ttft_ours and ttft_theirs else None,
            "relaunch_minus_baseline_ready_s": (
                statistics.median(relaunch) - statistics.median(alone_ready) if relaunch and alone_ready else None
            ),
        }

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        """The report as text: every start of every side, then medians (min-max) and the comparisons."""
        metrics = list(self.per_start(self.sides[0])[0]) if self.starts else []
        lines = [
            (
                f"{self.config['served_model_name']}: {self.settings['starts']} start(s) x {self.settings['rounds']} "
                f"round(s); {self.settings['requests_per_stream']} requests per stream at concurrency "
                f"{','.join(map(str, self.settings['concurrency']))}; {self.settings['input_len']} prompt words, "
                f"{self.settings['output_len']} output tokens; stall = c=1 TTFT p50 > {STALL_TTFT_MS:.0f} ms"
            ),
            "-- every start (medians of its rounds)",
            f"{'side':<19}{'start':>6}" + "".join(f"{_short(m):>13}" for m in metrics),
        ]
        for run in self.starts:
            row = run.figures(self.top)
            lines.append(f"{run.side:<19}{run.start + 1:>6}" + "".join(f"{_cell(row[m]):>13}" for m in metrics))
        lines.append("-- over starts: median (min-max)")
        for side in self.sides:
            placements = sorted({run.cpu_placement for run in self.starts if run.side == side and run.cpu_placement})
            lines.append(f"{side}" + (f" [{'; '.join(placements)}]" if placements else ""))
            for metric in metrics:
                if metric in ("stalled", "errors"):
                    continue
                spread = self.spread(side, metric)
                lines.append(f"  {metric:<28}{_spread(spread)}")
            stalled = sum(bool(row["stalled"]) for row in self.per_start(side))
            lines.append(f"  {'stalled starts':<28}{stalled} of {len(self.per_start(side))}")
        for comparison in self.comparisons():
            lines.append(f"-- {comparison['side']} / {comparison['baseline']}")
            for key, value in comparison.items():
                if key not in ("side", "baseline"):
                    lines.append(f"  {key:<44}{_value(value)}")
        return "\n".join(lines)

    def comparisons(self) -> list[dict[str, Any]]:
        """Ours and the pinned baseline against vLLM alone as by hand, and ours against the pinned
        baseline (the same placement: what the serving layer itself costs), for the sides present."""
        pairs = ((RAYVLLM, VLLM_ALONE), (VLLM_ALONE_PINNED, VLLM_ALONE), (RAYVLLM, VLLM_ALONE_PINNED))
        return [self.comparison(side, baseline) for side, baseline in pairs
                if side in self.sides and baseline in self.sides]

    def to_json(self) -> dict[str, Any]:
        """Plain data: settings, config, every load of every start, per-start figures and comparisons."""
        return {
            "started_at": self.started_at,
            "config": self.config,
            "settings": self.settings,
            "starts": [asdict(run) for run in self.starts],
            "per_start": {side: self.per_start(side) for side in self.sides},
            "comparisons": self.comparisons(),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path`` (folders created); returns the path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_json(), indent=2))
        return target

    def plot(self) -> Figure:
        """One point per start and side (stalled starts hollow) for top-concurrency tok/s, c=1 TTFT p50
        and serving CPU per 1k tokens; a bar marks each side's median."""
        from matplotlib.figure import Figure

        metrics = (f"c{self.top}_tok_per_s", "c1_ttft_p50_ms", "serving_cpu_s_per_1k_tok")
        titles = (f"output tok/s at c={self.top}", "TTFT p50 at c=1 (ms)", "serving CPU-s per 1k tokens")
        figure = Figure(figsize=(12, 3.8))
        for axes, metric, title in zip(figure.subplots(1, len(metrics)), metrics, titles, strict=True):
            for position, side in enumerate(self.sides):
                rows = [row for row in self.per_start(side) if row[metric] is not None]
                for index, row in enumerate(rows):
                    x = position + (index - (len(rows) - 1) / 2) * 0.06
                    axes.scatter([x], [row[metric]], color=f"C{position}",
                                 facecolors="none" if row["stalled"] else f"C{position}")
                spread = self.spread(side, metric)
                if spread:
                    axes.hlines(spread[0], position - 0.3, position + 0.3, color=f"C{position}")
            axes.set_xticks(range(len(self.sides)), self.sides, fontsize=8)
            axes.set_title(title)
        figure.suptitle(f"{self.config['served_model_name']}: one point per server start (hollow: stalled)")
        figure.tight_layout()
        return figure

    def _repr_html_(self) -> str:
        return f"<pre>{self.table()}</pre>"


async def benchmark(
    backend: RayBackend,
    config: ModelConfig | Mapping[str, Any] | str | os.PathLike[str] = "tiny-cpu",
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    *,
    starts: int = 5,
    rounds: int = 3,
    concurrency: Sequence[int] = (1, 8),
    requests_per_stream: int = 16,
    input_len: int = 32,
    output_len: int = 64,
    pinned_baseline: bool = True,
    output: str | os.PathLike[str] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure vLLM alone and rayvllm_nb side by side on ``config``; see the module docstring.

    Each load sends ``requests_per_stream`` x concurrency requests; ``input_len`` is the prompt
    length in words; ``pinned_baseline`` adds vLLM alone with our CPU placement as a third side
    (CPU configs); ``output`` saves the report as JSON. Use ``starts=1`` or 2 to screen variants;
    report figures from 5 or more.
    """
    model_config = load_config(config, overrides)
    _check_settings(starts, rounds, concurrency, requests_per_stream, input_len, output_len)
    say = on_event or (lambda message: None)
    resources = local_resources()
    pinned = pinned_baseline and plan_placement(model_config, resources, int(resources["CPU"])).device == "cpu"
    settings = {
        "vllm_alone_by_hand": vllm_alone_server(model_config, resources).by_hand(),
        "starts": starts, "rounds": rounds, "concurrency": sorted(set(concurrency)),
        "requests_per_stream": requests_per_stream, "input_len": input_len, "output_len": output_len,
        "cpu_count": os.cpu_count(), "pinned_baseline": pinned,
    }
    report = BenchReport(model_config.public_dict(), settings, [], time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    cold = backend.cluster is None and _cluster.local_head_address() is None
    try:
        for start in range(starts):
            report.starts += await _one_start(backend, model_config, settings, start, cold and start == 0, pinned, say)
    finally:
        if cold:
            await backend.shutdown()
    if output is not None:
        say(f"saved {report.save(output)}")
    return report


async def _one_start(
    backend: RayBackend, config: ModelConfig, settings: dict[str, Any], start: int, cold: bool, pinned: bool,
    say: Callable[[str], None],
) -> list[SideStart]:
    """Start every side, warm them, load them in turn for every round, stop them."""
    label = f"start {start + 1}/{settings['starts']}"
    servers = {VLLM_ALONE: vllm_alone_server(config, local_resources())}
    if pinned:
        servers[VLLM_ALONE_PINNED] = vllm_alone_server(config, local_resources(), pin_cpu=True)
    runs: dict[str, SideStart] = {}
    targets: dict[str, tuple[str, str, CpuMeter]] = {}

    async def start_alone(side: str) -> None:
        server = servers[side]
        await asyncio.to_thread(server.start)
        assert server.time_to_ready_s is not None
        runs[side] = SideStart(side, start, server.time_to_ready_s, "process", server.cpu_placement)
        targets[side] = (server.base_url, config.name, CpuMeter(server.processes))
        say(f"{label}: {side} ready in {server.time_to_ready_s:.1f} s {server.cpu_placement}".rstrip())

    async def start_ours(side: str) -> None:
        started = time.perf_counter()
        await backend.initialize_ray()
        status = await backend.start_model(config, wait_ready=True)
        placement = "; ".join(sorted({r.cpu_placement for r in status.replicas if r.cpu_placement}))
        runs[side] = SideStart(side, start, time.perf_counter() - started, "cold" if cold else "relaunch", placement)
        targets[side] = (status.base_url.removesuffix("/v1"), status.name, CpuMeter(_cluster_processes(backend)))
        say(f"{label}: {side} ready in {runs[side].ready_s:.1f} s ({runs[side].ready_kind}) {placement}")

    starters = {**dict.fromkeys(servers, start_alone), RAYVLLM: start_ours}
    sides = list(starters)
    try:
        # Each side starts while the ones started before it idle: the order rotates with the start.
        for side in _rotated(sides, start):
            await starters[side](side)
        for base_url, model, _ in targets.values():
            await warm_up(base_url, model)
        for round_index in range(settings["rounds"]):
            for side in _rotated(sides, start + round_index):
                base_url, model, meter = targets[side]
                for concurrency in settings["concurrency"]:
                    load = await _load(base_url, model, meter, settings, start, round_index, concurrency)
                    runs[side].loads.append(load)
                    say(
                        f"{label} round {round_index + 1} {side} c={concurrency}: "
                        f"{load.summary['output_tok_per_s']:.0f} tok/s, TTFT p50 {_cell(load.summary['ttft_p50_ms'])} "
                        f"ms, errors {load.summary['errors']}"
                    )
    finally:
        if RAYVLLM in runs:
            await backend.stop_model(config.name)
        for server in servers.values():
            await asyncio.to_thread(server.stop)
    return [runs[side] for side in sides]


def _rotated(items: list[str], shift: int) -> list[str]:
    shift %= len(items)
    return items[shift:] + items[:shift]


async def _load(
    base_url: str, model: str, meter: CpuMeter, settings: dict[str, Any], start: int, round_index: int,
    concurrency: int,
) -> Load:
    # A new seed per load: no prompt is ever sent twice, so prefix caching helps no side.
    seed = 1_000_000 * (start + 1) + 1000 * (round_index + 1) + concurrency
    meter.start()
    summary, loadgen_cpu_s = await asyncio.to_thread(
        run_load_in_subprocess, base_url, model, count=settings["requests_per_stream"] * concurrency,
        input_words=settings["input_len"], seed=seed, concurrency=concurrency, output_len=settings["output_len"],
    )
    cpu = meter.stop()
    return Load(round_index, concurrency, summary, cpu.serving_s, cpu.engine_s, loadgen_cpu_s)


def _cluster_processes(backend: RayBackend) -> Callable[[], list[psutil.Process]]:
    """The processes of the cluster ``backend`` is connected to, when rayvllm_nb started its head on this
    machine (its session); otherwise every process of the Ray clusters on this machine."""
    address = backend.cluster.address if backend.cluster else ""
    head = next((record for record in processes.recorded_heads() if record.address == address), None)
    if head is not None:
        return lambda: processes.session_processes(head.session_id)
    return processes.local_cluster_processes


def local_resources() -> dict[str, float]:
    """What vLLM alone can use on this machine: its cores, and the GPUs CUDA sees (none without torch's CUDA)."""
    resources = {"CPU": float(os.cpu_count() or 1)}
    try:
        import torch

        resources["GPU"] = float(torch.cuda.device_count())
    except ImportError:
        resources["GPU"] = 0.0
    return resources


def vllm_alone_server(config: ModelConfig, resources: dict[str, float], *, pin_cpu: bool = False) -> VllmAloneServer:
    """vLLM's own server for ``config`` on a machine with ``resources`` (not started): the same engine
    arguments, vLLM environment variables and device plan as the deployment (GPU: tensor parallelism
    over local GPUs), and our CPU placement only with ``pin_cpu``."""
    plan = plan_placement(config, resources, int(resources["CPU"]))
    env = {name: value for name, value in {**plan.env_vars, **config.env_vars}.items()
           if not name.startswith("RAYVLLM_NB_")}
    if config.hf_token is not None:
        env["HF_TOKEN"] = config.hf_token.get_secret_value()
    engine_args = get_engine(config.engine).engine_arguments(config)
    return VllmAloneServer(model_source(config.model), config.name, engine_args, env, pin_cpu=pin_cpu)


def _check_settings(starts: int, rounds: int, concurrency: Sequence[int], requests_per_stream: int, input_len: int,
                    output_len: int) -> None:
    problems = []
    if not concurrency or any(c < 1 for c in concurrency):
        problems.append(f"concurrency must be positive integers, got {list(concurrency)}")
    for name, value in (("starts", starts), ("rounds", rounds), ("requests_per_stream", requests_per_stream),
                        ("input_len", input_len), ("output_len", output_len)):
        if value < 1:
            problems.append(f"{name} must be at least 1, got {value}")
    if problems:
        raise ConfigError("Invalid benchmark settings: " + "; ".join(problems) + ".")


_SHORT = {"ready_s": "ready s", "c1_ttft_p50_ms": "c1 TTFT ms", "serving_cpu_s_per_1k_tok": "serve CPU/1k",
          "tok_per_engine_cpu_s": "tok/eng-CPU", "loadgen_cpu_s_per_1k_tok": "gen CPU/1k"}


def _short(metric: str) -> str:
    """A column title for the per-start table."""
    if metric in _SHORT:
        return _SHORT[metric]
    return metric.replace("_tok_per_s", " tok/s").replace("_ttft_p50_ms", " TTFT ms")


def _cell(value: float | bool | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "STALL" if value else "ok"
    if isinstance(value, int):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def _value(value: tuple[float, float, float] | dict[str, int] | float | None) -> str:
    if isinstance(value, tuple):
        return _spread(value)
    if isinstance(value, dict):
        return ", ".join(f"{name} {count}" for name, count in value.items())
    return _cell(value)


def _spread(spread: tuple[float, float, float] | None) -> str:
    if spread is None:
        return "-"
    median, low, high = spread
    return f"{_cell(median)} ({_cell(low)}-{_cell(high)})"


async def soak_model(
    backend: RayBackend, name: str | None = None, *, minutes: float = 5.0, concurrency: int = 32, output_len: int = 64
) -> SoakReport:
    """``concurrency`` streams against the running model ``name`` for ``minutes``: errors and TTFT
    p50/p99 per minute, and the memory of the model's processes on this machine before and after."""
    if minutes <= 0 or concurrency < 1 or output_len < 1:
        raise ConfigError(
            f"A soak needs minutes > 0, concurrency >= 1 and output_len >= 1 (got {minutes}, {concurrency}, "
            f"{output_len})."
        )
    status = await backend.model_status(name)
    endpoint = await backend.endpoint(status.name)

    def memory_mb() -> float:
        return sum(process.memory_info().rss for process in processes.model_processes(status.name)) / 1e6

    return await soak(
        endpoint, status.name, duration_s=minutes * 60, concurrency=concurrency, output_len=output_len,
        memory_mb=memory_mb,
    )
