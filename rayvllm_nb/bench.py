"""Side-by-side benchmark: the same model and engine arguments served by vLLM's own OpenAI
server alone, then through rayvllm_nb on Ray Serve, with the ratio of ours to vLLM alone.

Each round starts vLLM alone (time to ready), warms it up, runs the load at every concurrency,
stops it (and, with ``relaunch``, starts it once more for a second time to ready); then the same
through rayvllm_nb: deploy (cold when the benchmark starts the Ray cluster itself), warm up, load,
stop (and relaunch on the running cluster). Several rounds alternate A B A B, since these
machines drift. Streaming completions with ``ignore_eos`` give every request the same number of
tokens; each round uses new prompts so prefix caching cannot help a later side.
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

from rayvllm_nb._internal import cluster as _cluster
from rayvllm_nb._internal import processes
from rayvllm_nb._internal.loadgen import make_prompts, run_load, warm_up
from rayvllm_nb._internal.soak import SoakReport, soak
from rayvllm_nb._internal.vllm_alone import VllmAloneServer
from rayvllm_nb.config import ModelConfig, load_config
from rayvllm_nb.engines import get_engine
from rayvllm_nb.errors import ConfigError
from rayvllm_nb.placement import plan_placement
from rayvllm_nb.tiny_model import TINY_MODEL_REF, tiny_model_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from rayvllm_nb.backend import RayBackend

VLLM_ALONE = "vllm-alone"
RAYVLLM = "rayvllm_nb"
METRICS = ("output_tok_per_s", "req_per_s", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "e2e_p50_ms", "errors")
"""Per concurrency, in the table's order."""


@dataclass
class SideRun:
    """One side of one round: times to ready and a load summary per concurrency."""

    side: str
    round: int
    ready_s: float
    ready_kind: str
    """'cold' (the Ray cluster was started for it), 'warm-cluster', or 'process' (vLLM alone)."""
    relaunch_ready_s: float | None
    loads: dict[int, dict[str, float | int | None]] = field(default_factory=dict)


@dataclass
class BenchReport:
    """Everything one benchmark run measured, and the ratios of rayvllm_nb to vLLM alone."""

    config: dict[str, Any]
    settings: dict[str, Any]
    runs: list[SideRun]
    started_at: str

    def mean(self, side: str, concurrency: int, metric: str) -> float | None:
        """``metric`` at ``concurrency`` for ``side``, averaged over rounds."""
        values = [run.loads[concurrency][metric] for run in self.runs if run.side == side]
        present = [float(v) for v in values if v is not None]
        return statistics.fmean(present) if present else None

    def ratios(self) -> dict[int, dict[str, float | None]]:
        """Ours / vLLM alone per concurrency and metric (above 1 is better for rates, worse for times)."""
        table: dict[int, dict[str, float | None]] = {}
        for concurrency in self.settings["concurrency"]:
            row: dict[str, float | None] = {}
            for metric in METRICS:
                ours, alone = self.mean(RAYVLLM, concurrency, metric), self.mean(VLLM_ALONE, concurrency, metric)
                row[metric] = ours / alone if ours is not None and alone else None
            table[concurrency] = row
        return table

    def ready_times(self) -> dict[str, dict[str, float | None]]:
        """Mean time to ready per side: first start (cold or not) and relaunch."""
        times: dict[str, dict[str, float | None]] = {}
        for side in (VLLM_ALONE, RAYVLLM):
            runs = [run for run in self.runs if run.side == side]
            cold = [run.ready_s for run in runs if run.ready_kind in ("cold", "process")]
            relaunch = [run.relaunch_ready_s for run in runs if run.relaunch_ready_s is not None]
            times[side] = {
                "first_start_s": statistics.fmean(cold) if cold else None,
                "relaunch_s": statistics.fmean(relaunch) if relaunch else None,
            }
        return times

    def table(self) -> str:
        """The report as text: one block per concurrency, then times to ready."""
        lines = [
            (
                f"{self.config['served_model_name']}: {self.settings['requests']} requests per concurrency, "
                f"{self.settings['input_len']} prompt words, {self.settings['output_len']} output tokens, "
                f"{self.settings['rounds']} round(s) A B"
            ),
            f"{'metric':<18}{'vLLM alone':>14}{'rayvllm_nb':>14}{'ratio':>9}",
        ]
        ratios = self.ratios()
        for concurrency in self.settings["concurrency"]:
            lines.append(f"-- concurrency {concurrency}")
            for metric in METRICS:
                alone, ours = self.mean(VLLM_ALONE, concurrency, metric), self.mean(RAYVLLM, concurrency, metric)
                ratio = ratios[concurrency][metric]
                lines.append(f"{metric:<18}{_num(alone):>14}{_num(ours):>14}{_ratio(ratio):>9}")
        ready = self.ready_times()
        lines.append("-- time to ready (s)")
        kinds = sorted({run.ready_kind for run in self.runs if run.side == RAYVLLM})
        for key, label in (("first_start_s", f"first start ({'/'.join(kinds)})"), ("relaunch_s", "relaunch")):
            alone, ours = ready[VLLM_ALONE][key], ready[RAYVLLM][key]
            delta = f"{ours - alone:+.1f} s" if ours is not None and alone is not None else "-"
            lines.append(f"{label:<30}{_num(alone):>10}{_num(ours):>12}{delta:>10}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Plain data: settings, config, every run, the means' ratios and the times to ready."""
        return {
            "started_at": self.started_at,
            "config": self.config,
            "settings": self.settings,
            "runs": [asdict(run) for run in self.runs],
            "ratios": {str(c): row for c, row in self.ratios().items()},
            "ready_times": self.ready_times(),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path`` (folders created); returns the path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_json(), indent=2))
        return target

    def plot(self) -> Figure:
        """Output tok/s and TTFT p50 per concurrency, both sides side by side."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(10, 3.8))
        throughput, ttft = figure.subplots(1, 2)
        concurrencies = list(self.settings["concurrency"])
        positions = range(len(concurrencies))
        for offset, side in ((-0.2, VLLM_ALONE), (0.2, RAYVLLM)):
            xs = [p + offset for p in positions]
            throughput.bar(xs, [self.mean(side, c, "output_tok_per_s") or 0 for c in concurrencies], 0.4, label=side)
            ttft.bar(xs, [self.mean(side, c, "ttft_p50_ms") or 0 for c in concurrencies], 0.4, label=side)
        for axes, title in ((throughput, "output tokens/s"), (ttft, "TTFT p50 (ms)")):
            axes.set_xticks(list(positions), [f"c={c}" for c in concurrencies])
            axes.set_title(title)
            axes.legend()
        figure.suptitle(f"{self.config['served_model_name']}: vLLM alone vs rayvllm_nb")
        figure.tight_layout()
        return figure

    def _repr_html_(self) -> str:
        return f"<pre>{self.table()}</pre>"


async def benchmark(
    backend: RayBackend,
    config: ModelConfig | Mapping[str, Any] | str | os.PathLike[str] = "tiny-cpu",
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    *,
    concurrency: Sequence[int] = (1, 8, 32),
    requests: int = 256,
    input_len: int = 32,
    output_len: int = 64,
    rounds: int = 1,
    relaunch: bool = True,
    output: str | os.PathLike[str] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure vLLM alone and rayvllm_nb side by side on ``config``; see the module docstring.

    ``requests`` run at each concurrency; ``input_len`` is the prompt length in words (the JSON
    records the tokens the server counted); ``output`` saves the report as JSON.
    """
    model_config = load_config(config, overrides)
    _check_settings(concurrency, requests, input_len, output_len, rounds)
    say = on_event or (lambda message: None)
    settings = {
        "concurrency": list(concurrency), "requests": requests, "input_len": input_len,
        "output_len": output_len, "rounds": rounds, "relaunch": relaunch, "cpu_count": os.cpu_count(),
    }
    report = BenchReport(model_config.public_dict(), settings, [], time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    for round_index in range(rounds):
        seed = 1000 * (round_index + 1)
        report.runs.append(await _vllm_alone_side(model_config, settings, round_index, seed, say))
        report.runs.append(await _rayvllm_side(backend, model_config, settings, round_index, seed + 500, say))
    if output is not None:
        say(f"saved {report.save(output)}")
    return report


def local_resources() -> dict[str, float]:
    """What vLLM alone can use on this machine: its cores, and the GPUs CUDA sees (none without torch's CUDA)."""
    resources = {"CPU": float(os.cpu_count() or 1)}
    try:
        import torch

        resources["GPU"] = float(torch.cuda.device_count())
    except ImportError:
        resources["GPU"] = 0.0
    return resources


def vllm_alone_server(config: ModelConfig, resources: dict[str, float]) -> VllmAloneServer:
    """vLLM's own server for ``config`` on a machine with ``resources`` (not started): the same engine
    arguments and device plan as the deployment (GPU: tensor parallelism over local GPUs)."""
    plan = plan_placement(config, resources, int(resources["CPU"]))
    model_source = str(tiny_model_path()) if config.model == TINY_MODEL_REF else config.model
    env = {**plan.env_vars, **config.env_vars}
    if config.hf_token is not None:
        env["HF_TOKEN"] = config.hf_token.get_secret_value()
    return VllmAloneServer(model_source, config.name, get_engine(config.engine).engine_arguments(config), env)


async def _vllm_alone_side(
    config: ModelConfig, settings: dict[str, Any], round_index: int, seed: int, say: Callable[[str], None]
) -> SideRun:
    server = vllm_alone_server(config, local_resources())
    say(f"round {round_index + 1}: vLLM alone starting on {server.base_url}")
    with server:
        await asyncio.to_thread(server.start)
        assert server.time_to_ready_s is not None
        run = SideRun(VLLM_ALONE, round_index, server.time_to_ready_s, "process", None)
        say(f"round {round_index + 1}: vLLM alone ready in {run.ready_s:.1f} s")
        await _measure(run, server.base_url, config.name, settings, seed, say)
    if settings["relaunch"]:
        with server:
            await asyncio.to_thread(server.start)
            run.relaunch_ready_s = server.time_to_ready_s
        say(f"round {round_index + 1}: vLLM alone relaunched in {run.relaunch_ready_s:.1f} s")
    return run


async def _rayvllm_side(
    backend: RayBackend, config: ModelConfig, settings: dict[str, Any], round_index: int, seed: int,
    say: Callable[[str], None],
) -> SideRun:
    cold = backend.cluster is None and _cluster.local_head_address() is None
    where = "cold: no Ray running" if cold else "on the running cluster"
    say(f"round {round_index + 1}: rayvllm_nb deploying ({where})")
    started = time.perf_counter()
    await backend.initialize_ray()
    status = await backend.start_model(config, wait_ready=True)
    run = SideRun(RAYVLLM, round_index, time.perf_counter() - started, "cold" if cold else "warm-cluster", None)
    say(f"round {round_index + 1}: rayvllm_nb ready in {run.ready_s:.1f} s")
    try:
        await _measure(run, status.base_url.removesuffix("/v1"), status.name, settings, seed, say)
    finally:
        await backend.stop_model(status.name)
    if settings["relaunch"]:
        started = time.perf_counter()
        status = await backend.start_model(config, wait_ready=True)
        run.relaunch_ready_s = time.perf_counter() - started
        await backend.stop_model(status.name)
        say(f"round {round_index + 1}: rayvllm_nb relaunched in {run.relaunch_ready_s:.1f} s")
    if cold:
        await backend.shutdown()
    return run


async def _measure(
    run: SideRun, base_url: str, model: str, settings: dict[str, Any], seed: int, say: Callable[[str], None]
) -> None:
    await warm_up(base_url, model)
    for index, concurrency in enumerate(settings["concurrency"]):
        prompts = make_prompts(settings["requests"], settings["input_len"], seed + index)
        result = await run_load(base_url, model, prompts, concurrency=concurrency, output_len=settings["output_len"])
        run.loads[concurrency] = result.summary()
        summary = run.loads[concurrency]
        say(
            f"  {run.side} c={concurrency}: {summary['output_tok_per_s']:.0f} tok/s, "
            f"TTFT p50 {_num(summary['ttft_p50_ms'])} ms, errors {summary['errors']}"
        )


def _check_settings(concurrency: Sequence[int], requests: int, input_len: int, output_len: int, rounds: int) -> None:
    problems = []
    if not concurrency or any(c < 1 for c in concurrency):
        problems.append(f"concurrency must be positive integers, got {list(concurrency)}")
    for name, value in (("requests", requests), ("input_len", input_len), ("output_len", output_len),
                        ("rounds", rounds)):
        if value < 1:
            problems.append(f"{name} must be at least 1, got {value}")
    if problems:
        raise ConfigError("Invalid benchmark settings: " + "; ".join(problems) + ".")


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}" if isinstance(value, float) else str(value)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


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
