"""What rayvllm_nb's calls return: the cluster, a model's status, loading progress.

Plain frozen dataclasses: safe to keep, compare and show (no secret is ever in one). ``Status``
and ``ModelStatus`` render as text (``str``) and as HTML tables in a notebook.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from rayvllm_nb._internal.net import address_host

_CELL = "padding:2px 12px 2px 0;white-space:nowrap"
"""A status table cell: room between columns, no wrapping inside a value."""

ClusterMode = Literal["started-local", "existing-local", "remote"]


@dataclass(frozen=True)
class ClusterInfo:
    """The Ray cluster this process is connected to."""

    mode: ClusterMode
    address: str
    nodes: int
    resources: dict[str, float]
    dashboard_url: str | None
    ray_version: str
    reclaimed: tuple[str, ...] = ()
    """What a stopped cluster had left on this machine and connecting ended (e.g. Serve's HAProxy)."""

    def summary(self) -> str:
        """One line: address, mode, nodes, CPUs and GPUs."""
        devices = ", ".join(f"{k} {v:g}" for k, v in sorted(self.resources.items()) if k in ("CPU", "GPU"))
        return f"{self.address} ({self.mode}, {self.nodes} node(s), {devices})"

    @property
    def host(self) -> str:
        """The host part of the address (no scheme, no port)."""
        return address_host(self.address)

    @property
    def is_local(self) -> bool:
        """True when the cluster's head runs on this machine."""
        return self.mode != "remote"


@dataclass(frozen=True)
class Progress:
    """One step of a model's loading, reported while waiting for readiness.

    ``stage`` is one of: creating the deployment, waiting for resources, starting the engine,
    checking the endpoint, ready. ``detail`` says more when known (vLLM's own loading step,
    e.g. "loading weights").
    """

    name: str
    stage: str
    elapsed_s: float
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.stage}: {self.detail}" if self.detail else self.stage


@dataclass(frozen=True)
class ReplicaInfo:
    """One engine replica as its own process reported it when it started."""

    replica_id: str
    state: str
    node_ip: str
    kv_cache_gib: float | None
    kv_cache_choice: str
    cpu_placement: str = ""
    """Where the CPU engine's processes run, e.g. "engine core on 0 (with its worker), serving on 1"."""
    adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapters it was asked to serve: name -> "" when loaded, else why it is not."""


@dataclass(frozen=True)
class ModelStatus:
    """A deployed model as Serve sees it now.

    ``status`` is Serve's application status (RUNNING, DEPLOYING, ...), or ``RESTARTING`` while
    a crashed replica is being replaced, or ``FAILED`` once rayvllm_nb stopped a model that kept
    crashing (``message`` then holds the root cause).
    """

    name: str
    app_name: str
    status: str
    ready: bool
    model: str
    device: str
    tensor_parallel_size: int
    num_replicas: int
    replica_states: dict[str, int]
    base_url: str
    message: str = ""
    replica_actor_ids: tuple[str, ...] = ()
    restarts: int = 0
    """Replicas of this model that crashed (engine or replica process died) and were replaced."""
    last_failure: str = ""
    """The root cause line of the latest crash, when there was one."""
    replicas: tuple[ReplicaInfo, ...] = ()
    vllm_version: str = ""
    adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapters its replicas serve (clients pass the name as ``model``): name -> folder or HF id."""
    autoscaling: str = ""
    """The autoscaler's bounds and target when the model has one, e.g. "1-2 replicas, 2 requests each"."""
    scales_to_zero: bool = False
    """Whether it gives up its last replica when idle (``autoscaling.min_replicas: 0``)."""

    @property
    def scaled_to_zero(self) -> bool:
        """Idle with no replica: the next request waits while one loads."""
        return self.scales_to_zero and not self.replica_states

    def replicas_text(self) -> str:
        """Its replicas by state, and the autoscaler's bounds when it has one."""
        states = ", ".join(f"{state}={count}" for state, count in sorted(self.replica_states.items())) or "-"
        if self.scaled_to_zero:
            states = "none: scaled to zero, the next request waits for a replica to load"
        return f"{states} (autoscaling {self.autoscaling})" if self.autoscaling else states

    def summary(self) -> str:
        """One line: name, status, device, parallelism, replicas, endpoint."""
        line = (
            f"{self.name}: {self.status}{' (ready)' if self.ready else ''} device={self.device} "
            f"tp={self.tensor_parallel_size} replicas[{self.replicas_text()}] {self.base_url}"
        )
        if self.restarts:
            line += f" restarts={self.restarts}"
        kv = sorted({replica.kv_cache_choice for replica in self.replicas if replica.kv_cache_choice})
        if kv:
            line += f" kv_cache={'; '.join(kv)}"
        pinned = sorted({replica.cpu_placement for replica in self.replicas if replica.cpu_placement})
        if pinned:
            line += f" cpu_placement={'; '.join(pinned)}"
        if self.adapters:
            line += f" adapters={','.join(sorted(self.adapters))}"
        return line

    def problem(self) -> str:
        """The line that explains a model that is not serving (empty when it is)."""
        if self.status == "FAILED":
            return self.message
        if self.ready and not self.last_failure:
            return ""
        if self.last_failure:
            return f"last crash: {self.last_failure}"
        return self.message.splitlines()[0] if self.message and not self.ready else ""


@dataclass(frozen=True)
class Status:
    """The cluster and every model deployed through rayvllm_nb on it."""

    cluster: ClusterInfo
    serve_running: bool
    http_address: str | None
    models: list[ModelStatus] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    """rayvllm_nb, Ray and vLLM versions (vLLM as its replicas reported it)."""

    def __str__(self) -> str:
        lines = [
            f"cluster  {self.cluster.summary()}",
            f"serve    {'http://' + self.http_address if self.http_address else 'not running'}",
            "versions " + ", ".join(f"{name} {version}" for name, version in self.versions.items()),
        ]
        if not self.models:
            lines.append("models   none")
        for model in self.models:
            lines.append(f"model    {model.summary()}")
            if problem := model.problem():
                lines.append(f"         {problem}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        versions = ", ".join(f"{name} {version}" for name, version in self.versions.items())
        head = (
            f"<p><b>Ray</b> {html.escape(self.cluster.summary())} · <b>Serve</b> "
            f"{html.escape('http://' + self.http_address) if self.http_address else 'not running'}"
            f" · <span style='color:#666'>{html.escape(versions)}</span></p>"
        )
        if not self.models:
            return head + "<p>No model deployed.</p>"
        columns = ["model", "status", "device", "TP", "replicas", "restarts", "KV cache", "endpoint"]
        rows = []
        for model in self.models:
            replicas = model.replicas_text()
            color = "#080" if model.ready else "#b00" if model.status == "FAILED" else "#b60"
            kv = "; ".join(sorted({r.kv_cache_choice for r in model.replicas if r.kv_cache_choice})) or "-"
            cells = [
                html.escape(model.name), f"<span style='color:{color}'>{html.escape(model.status)}</span>",
                model.device, str(model.tensor_parallel_size), html.escape(replicas), str(model.restarts),
                html.escape(kv), html.escape(model.base_url),
            ]
            rows.append("<tr>" + "".join(f"<td style='{_CELL}'>{cell}</td>" for cell in cells) + "</tr>")
            if problem := model.problem():
                rows.append(f"<tr><td></td><td colspan='{len(columns) - 1}' style='color:#b00'>"
                            f"{html.escape(problem)}</td></tr>")
        header = "<tr>" + "".join(f"<th style='{_CELL};text-align:left'>{c}</th>" for c in columns) + "</tr>"
        return head + f"<table>{header}{''.join(rows)}</table>"


@dataclass(frozen=True)
class ShutdownReport:
    """What ``shutdown()`` stopped, and what it left running (what this process did not start)."""

    models: tuple[str, ...] = ()
    serve_stopped: bool = False
    cluster: str | None = None
    """The cluster this process was connected to (None: it was not connected)."""
    cluster_stopped: bool = False

    def __str__(self) -> str:
        if self.cluster is None:
            return "Nothing to stop: this process was not connected to Ray."
        done = [f"model {name}" for name in self.models]
        if self.serve_stopped:
            done.append("Serve")
        if self.cluster_stopped:
            done.append(f"the local Ray cluster at {self.cluster}")
        said = f"Stopped {', '.join(done)}." if done else "Stopped nothing of this process's."
        if not self.cluster_stopped:
            said += f" Disconnected from the Ray cluster at {self.cluster}; it keeps running (not started here)."
        return said

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))


@dataclass(frozen=True)
class EngineFigures:
    """What an engine is doing, read from vLLM's own counters at one moment."""

    requests_running: int
    requests_waiting: int
    kv_cache_usage: float
    """The share of the KV cache in use, 0 to 1."""
    prompt_tokens_total: int
    generation_tokens_total: int
    generation_tok_s: float
    """Generated tokens per second over the last few seconds (up to 10)."""
    ttft_p50_ms: float
    """Median time to first token over every request served."""
    itl_p50_ms: float
    """Median time between output tokens over every request served."""
    preemptions_total: int


_METRIC_COLUMNS = tuple(figure.name for figure in fields(EngineFigures))


@dataclass(frozen=True)
class ReplicaMetrics(EngineFigures):
    """One engine replica's figures."""

    replica_id: str


@dataclass(frozen=True)
class ModelMetrics(EngineFigures):
    """A model's live metrics: totals over its replicas (``kv_cache_usage`` is their mean, the
    latency medians the replicas' mean), and ``replicas``, each one's own."""

    name: str
    replicas: tuple[ReplicaMetrics, ...]

    @classmethod
    def of(cls, name: str, replicas: list[ReplicaMetrics]) -> ModelMetrics:
        """Totals of ``replicas`` (zeros when there are none yet)."""
        count = max(len(replicas), 1)

        def total(field_name: str) -> Any:
            return sum(getattr(replica, field_name) for replica in replicas)

        return cls(
            name=name, requests_running=total("requests_running"), requests_waiting=total("requests_waiting"),
            kv_cache_usage=total("kv_cache_usage") / count, prompt_tokens_total=total("prompt_tokens_total"),
            generation_tokens_total=total("generation_tokens_total"), generation_tok_s=total("generation_tok_s"),
            ttft_p50_ms=total("ttft_p50_ms") / count, itl_p50_ms=total("itl_p50_ms") / count,
            preemptions_total=total("preemptions_total"), replicas=tuple(replicas),
        )

    def to_frame(self) -> Any:
        """One row per replica and a ``total`` row, as a pandas DataFrame."""
        import pandas as pd

        rows = {replica.replica_id: {c: getattr(replica, c) for c in _METRIC_COLUMNS} for replica in self.replicas}
        rows["total"] = {c: getattr(self, c) for c in _METRIC_COLUMNS}
        return pd.DataFrame.from_dict(rows, orient="index")

    def __str__(self) -> str:
        return (f"{self.name}: {self.requests_running} running, {self.requests_waiting} waiting, KV cache "
                f"{self.kv_cache_usage:.0%}, {self.generation_tok_s:.0f} tok/s, TTFT p50 {self.ttft_p50_ms:.0f} ms, "
                f"ITL p50 {self.itl_p50_ms:.1f} ms, tokens {self.prompt_tokens_total} in / "
                f"{self.generation_tokens_total} out, {self.preemptions_total} preemptions, "
                f"{len(self.replicas)} replica(s)")

    def _repr_html_(self) -> str:
        header = "".join(f"<th style='{_CELL};text-align:left'>{c}</th>" for c in ("replica", *_METRIC_COLUMNS))
        rows = []
        for label, source in [*((r.replica_id, r) for r in self.replicas), ("total", self)]:
            cells = [html.escape(label), *(_shown(getattr(source, c)) for c in _METRIC_COLUMNS)]
            rows.append("<tr>" + "".join(f"<td style='{_CELL}'>{cell}</td>" for cell in cells) + "</tr>")
        return f"<p><b>{html.escape(self.name)}</b></p><table><tr>{header}</tr>{''.join(rows)}</table>"


def _shown(value: float) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)
