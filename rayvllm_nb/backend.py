"""The orchestrator: one async ``RayBackend`` that owns the cluster connection and deployments.

Serve is the source of truth for what runs; the cluster's internal KV store keeps
each deployment's public config (never its secrets) so that any process, a CLI
call or a second notebook, sees the same models. Every Ray call blocks, so each
runs in a worker thread: awaiting these methods never blocks the caller's loop.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from rayvllm_nb._internal import cluster as _cluster
from rayvllm_nb._internal import logs as _logs
from rayvllm_nb._internal.cluster import ClusterInfo
from rayvllm_nb._internal.net import bind_error
from rayvllm_nb._internal.placement import PlacementPlan, plan_placement
from rayvllm_nb.config import ModelConfig, _looks_like_path, load_config
from rayvllm_nb.engines import get_engine
from rayvllm_nb.errors import ConfigError, DeploymentError, NotDeployedError, ReadinessTimeout
from rayvllm_nb.tiny_model import TINY_MODEL_REF

_KV_NAMESPACE = "rayvllm_nb"
_KV_PREFIX = "model:"
_POLL_SECONDS = 0.5
_LOG_POLL_SECONDS = 1.0
_STARTING = "starting the engine"


@dataclass(frozen=True)
class Progress:
    """One step of a model's loading, reported while waiting for readiness."""

    name: str
    stage: str
    elapsed_s: float
    detail: str = ""


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class ModelStatus:
    """A deployed model as Serve sees it now."""

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


@dataclass(frozen=True)
class Status:
    """The cluster and every model deployed through rayvllm_nb on it."""

    cluster: ClusterInfo
    serve_running: bool
    http_address: str | None
    models: list[ModelStatus] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"cluster  {self.cluster.summary()}",
            f"serve    {'http://' + self.http_address if self.http_address else 'not running'}",
        ]
        if not self.models:
            lines.append("models   none")
        for model in self.models:
            replicas = ", ".join(f"{state}={count}" for state, count in sorted(model.replica_states.items())) or "-"
            lines.append(
                f"model    {model.name}: {model.status}{' (ready)' if model.ready else ''} "
                f"device={model.device} tp={model.tensor_parallel_size} replicas[{replicas}] {model.base_url}"
            )
            if model.message and not model.ready:
                lines.append(f"         {model.message.splitlines()[0]}")
        return "\n".join(lines)


    def _repr_html_(self) -> str:
        head = (
            f"<p><b>Ray</b> {html.escape(self.cluster.summary())} · <b>Serve</b> "
            f"{html.escape('http://' + self.http_address) if self.http_address else 'not running'}</p>"
        )
        if not self.models:
            return head + "<p>No model deployed.</p>"
        columns = ["model", "status", "device", "TP", "replicas", "endpoint"]
        rows = []
        for model in self.models:
            replicas = ", ".join(f"{state} {count}" for state, count in sorted(model.replica_states.items())) or "-"
            color = "#080" if model.ready else "#b60"
            cells = [
                model.name, f"<span style='color:{color}'>{html.escape(model.status)}</span>", model.device,
                str(model.tensor_parallel_size), replicas, model.base_url,
            ]
            rows.append("<tr>" + "".join(
                f"<td>{cell if i == 1 else html.escape(cell)}</td>" for i, cell in enumerate(cells)
            ) + "</tr>")
        header = "<tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>"
        return head + f"<table>{header}{''.join(rows)}</table>"


class RayBackend:
    """Start, watch and stop vLLM models on Ray Serve; one per process, shared by all facades."""

    def __init__(self) -> None:
        self._cluster: ClusterInfo | None = None
        self._serve_started_here = False
        self._started_here: set[str] = set()
        self._connect_lock = threading.Lock()

    @property
    def cluster(self) -> ClusterInfo | None:
        """The cluster this backend is connected to, if any."""
        return self._cluster

    async def initialize_ray(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        start_local: bool = True,
    ) -> ClusterInfo:
        """Connect to Ray once: this process's connection, ``address``/``RAY_ADDRESS``,
        a running local cluster, or a new detached local cluster (``num_cpus``/``num_gpus``
        only apply to the latter; ``start_local=False`` raises ClusterError instead)."""
        return await asyncio.to_thread(self._connect, address, num_cpus, num_gpus, start_local)

    def _connect(
        self, address: str | None, num_cpus: int | None, num_gpus: int | None, start_local: bool
    ) -> ClusterInfo:
        import ray

        with self._connect_lock:
            if self._cluster is not None and ray.is_initialized():
                return self._cluster
            if ray.is_initialized():
                self._cluster = _cluster._describe("existing-local", ray.get_runtime_context().gcs_address, None)
            else:
                self._cluster = _cluster.connect(address, num_cpus, num_gpus, start_local)
            return self._cluster

    async def start_model(
        self,
        config: ModelConfig | Mapping[str, Any] | str | Path,
        overrides: Mapping[str, Any] | Iterable[str] | None = None,
        *,
        replace: bool = False,
        wait_ready: bool = False,
        timeout: float = 900.0,
        on_progress: ProgressCallback | None = None,
    ) -> ModelStatus:
        """Validate ``config``, deploy it on Serve and return its status (ready if ``wait_ready``).

        Everything that can be checked before deploying is: the config, the engine
        arguments, the cluster's devices, Serve's address and the names and URL prefixes
        already in use. ``replace=True`` stops a running model of the same name first.
        """
        model_config = load_config(config, overrides)
        cluster = await self.initialize_ray()
        model_source = _resolve_model_source(model_config.model, cluster.is_local)
        await asyncio.to_thread(self._deploy, model_config, model_source, replace)
        if wait_ready:
            return await self.wait_for_ready(model_config.name, timeout=timeout, on_progress=on_progress)
        return await self.model_status(model_config.name)

    def _deploy(self, config: ModelConfig, model_source: str, replace: bool) -> None:
        from ray import serve

        resources, node_cpus = _cluster.cluster_resources()
        plan = plan_placement(config, resources, node_cpus)
        engine = get_engine(config.engine)
        engine.validate(config)
        running = {record.name: record for record in _kv_records()}
        if config.name in running and not replace:
            raise ConfigError(
                f"A model named {config.name!r} is already running. Stop it first, pass replace=True "
                "(`--replace` on the command line), or choose another served_model_name."
            )
        holder = next(
            (r for r in running.values() if r.config["route_prefix"] == config.route_prefix and r.name != config.name),
            None,
        )
        if holder is not None:
            raise ConfigError(
                f"Route prefix {config.route_prefix!r} is already used by model {holder.name!r}. Give this model "
                f"its own, e.g. route_prefix=/{_app_name(config.name)}, or stop that one."
            )
        self._ensure_serve(config)
        if config.name in running:
            self._delete(running[config.name])
        record = _DeploymentRecord.create(config, plan, engine.engine_deployment(config), self._cluster)
        application = engine.build_application(config, model_source, plan)
        try:
            serve._run(application, _blocking=False, name=record.app_name, route_prefix=config.route_prefix)
        except Exception:
            engine.release(config.name)
            raise
        _kv_put(record)
        self._started_here.add(config.name)

    def _ensure_serve(self, config: ModelConfig) -> None:
        """Start Serve on the config's host/port, or check that the running Serve uses them."""
        from ray import serve

        details = _serve_details()
        if details is not None:
            http = details.get("http_options") or {}
            running, asked = f"{http.get('host')}:{http.get('port')}", f"{config.host}:{config.port}"
            if running != asked:
                raise ConfigError(
                    f"Serve already runs on {running} but this config asks for {asked}. Serve's HTTP address "
                    f"is fixed when it first starts: use host={http.get('host')!r} and port={http.get('port')}, "
                    "or stop every model and Serve (`rayvllm stop --all`, then serve.shutdown()) first."
                )
            return
        if self._cluster is not None and self._cluster.is_local:
            _check_port_free(config.host, config.port)
        # One proxy, on the head: the notebook's endpoint is one address (and nodes sharing a
        # machine, as in tests, would fight over the port).
        serve.start(http_options={"host": config.host, "port": config.port}, proxy_location="HeadOnly")
        self._serve_started_here = True

    async def wait_for_ready(
        self, name: str | None = None, *, timeout: float = 900.0, on_progress: ProgressCallback | None = None
    ) -> ModelStatus:
        """Wait until ``name`` answers on its OpenAI endpoint.

        Raises :class:`DeploymentError` (after deleting the app) as soon as a replica
        fails, and :class:`ReadinessTimeout` if it is still loading after ``timeout`` s.
        """
        record = await self._record(name)
        started = time.monotonic()
        last_stage, log_stage, logs_checked = "", None, 0.0
        async with httpx.AsyncClient(timeout=5.0) as http:
            while True:
                status = await self.model_status(record.name)
                stage = _stage(status)
                failure = None
                if status.status in ("DEPLOY_FAILED", "UNHEALTHY") or "failed to start" in status.message:
                    failure = await asyncio.to_thread(_failure_reason, status.message)
                elif stage == _STARTING and time.monotonic() - logs_checked > _LOG_POLL_SECONDS:
                    # vLLM's own fatal lines come seconds before Serve notices the replica failed.
                    logs_checked = time.monotonic()
                    lines = await asyncio.to_thread(_replica_logs, status.replica_actor_ids, 400)
                    log_stage = _logs.loading_stage(lines) or log_stage
                    if _logs.engine_failed(lines):
                        failure = _logs.root_cause(lines) or "the vLLM engine failed to start (see its logs)"
                if failure is not None:
                    await asyncio.to_thread(self._delete, record)
                    raise DeploymentError(
                        f"Model {record.name!r} failed to start and was removed (nothing of it is left running). "
                        f"vLLM/Serve reported: {failure}. Fix the config or the model files and start again."
                    )
                if stage == _STARTING and log_stage:
                    stage = f"{_STARTING}: {log_stage}"
                if stage != last_stage and on_progress is not None:
                    on_progress(Progress(record.name, stage, time.monotonic() - started))
                last_stage = stage
                if status.status == "RUNNING" and await _serves(http, status.base_url, record.name):
                    ready = await self.model_status(record.name)
                    if on_progress is not None:
                        on_progress(Progress(record.name, "ready", time.monotonic() - started))
                    return ready
                if time.monotonic() - started > timeout:
                    raise ReadinessTimeout(
                        f"Model {record.name!r} was not ready after {timeout:.0f} s (stage: {stage}). It is still "
                        "deploying: call wait_for_ready() again, look at status() and logs, or stop_model() it."
                    )
                await asyncio.sleep(_POLL_SECONDS)

    async def get_logs(self, name: str | None = None, tail: int = 100) -> list[str]:
        """The last ``tail`` lines of the model's engine replicas (vLLM's and Serve's), newest last."""
        status = await self.model_status(name)
        return await asyncio.to_thread(_replica_logs, status.replica_actor_ids, tail)

    async def get_status(self) -> Status:
        """The cluster, Serve's HTTP address and every model deployed through rayvllm_nb."""
        cluster = await self.initialize_ray()
        return await asyncio.to_thread(self._status, cluster)

    def _status(self, cluster: ClusterInfo) -> Status:
        details = _serve_details()
        http = details.get("http_options", {}) if details else {}
        models = [_status_of(record, details) for record in _kv_records()]
        return Status(
            cluster=cluster,
            serve_running=details is not None,
            http_address=f"{http.get('host')}:{http.get('port')}" if http else None,
            models=models,
        )

    async def stop_model(self, name: str | None = None) -> str:
        """Delete the model's Serve app (its replicas and placement groups); returns its name."""
        record = await self._record(name)
        await asyncio.to_thread(self._delete, record)
        return record.name

    def _delete(self, record: _DeploymentRecord) -> None:
        from ray import serve

        serve.delete(record.app_name, _blocking=True)
        get_engine(record.config["engine"]).release(record.name)
        _kv_delete(record.name)
        self._started_here.discard(record.name)

    async def shutdown(self) -> None:
        """Stop what this process started: its models, Serve, and the local cluster if it started it."""
        if self._cluster is None:
            return
        for name in sorted(self._started_here):
            try:
                await self.stop_model(name)
            except NotDeployedError:
                self._started_here.discard(name)
        await asyncio.to_thread(self._disconnect)

    def _disconnect(self) -> None:
        import ray
        from ray import serve

        with self._connect_lock:
            cluster, self._cluster = self._cluster, None
            try:
                if self._serve_started_here and not _kv_records():
                    serve.shutdown()
                self._serve_started_here = False
                ray.shutdown()
            finally:
                # The cluster this process started goes, whatever happened above.
                if cluster is not None and cluster.mode == "started-local":
                    _cluster.stop_local_cluster()

    async def model_status(self, name: str | None = None) -> ModelStatus:
        """Status of the model ``name`` (the only deployed one when None)."""
        record = await self._record(name)
        return await asyncio.to_thread(lambda: _status_of(record, _serve_details()))

    async def _record(self, name: str | None) -> _DeploymentRecord:
        await self.initialize_ray()
        records = await asyncio.to_thread(_kv_records)
        if name is None:
            if len(records) == 1:
                return records[0]
            if not records:
                raise NotDeployedError(
                    "No model is deployed. Start one with start_model(config) or `rayvllm serve CONFIG`."
                )
            raise ConfigError(
                f"Several models are deployed ({', '.join(r.name for r in records)}): name the one you mean."
            )
        for record in records:
            if record.name == name:
                return record
        running = ", ".join(r.name for r in records) or "none"
        raise NotDeployedError(f"No model named {name!r} is deployed (running: {running}).")


@dataclass(frozen=True)
class _DeploymentRecord:
    """What the KV store keeps per model: public config and where it serves."""

    name: str
    app_name: str
    engine_deployment: str
    base_url: str
    device: str
    bundles: list[dict[str, float]]
    config: dict[str, Any]
    started_at: float

    @classmethod
    def create(
        cls, config: ModelConfig, plan: PlacementPlan, engine_deployment: str, cluster: ClusterInfo | None
    ) -> _DeploymentRecord:
        details = _serve_details() or {}
        http = details.get("http_options") or {"host": config.host, "port": config.port}
        host = config.endpoint_host or http["host"]
        if host in ("0.0.0.0", "::", "localhost"):
            host = cluster.host if cluster is not None and not cluster.is_local else "127.0.0.1"
        prefix = "" if config.route_prefix == "/" else config.route_prefix
        return cls(
            name=config.name,
            app_name=_app_name(config.name),
            engine_deployment=engine_deployment,
            base_url=f"http://{host}:{http['port']}{prefix}/v1",
            device=plan.device,
            bundles=plan.bundles,
            config=config.public_dict(),
            started_at=time.time(),
        )


def _app_name(name: str) -> str:
    """A Serve application name (and URL segment) for the served model ``name``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def _resolve_model_source(model: str, cluster_is_local: bool) -> str:
    """What the replicas load; local folders are checked here when the replicas share this machine.

    ``builtin:tiny`` stays a reference: each replica builds (or finds cached) the tiny model
    on its own node.
    """
    if model == TINY_MODEL_REF or not cluster_is_local:
        return model
    if _looks_like_path(model):
        path = Path(model).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(
                f"Model folder {str(path)!r} does not exist. Pass an existing local folder, "
                f"a Hugging Face model id, or {TINY_MODEL_REF!r}."
            )
        return str(path)
    return model


def _check_port_free(host: str, port: int) -> None:
    if problem := bind_error(host, port):
        raise ConfigError(
            f"Port {port} on {host} is already used by another program ({problem}), so Serve cannot "
            f"listen there. Stop that program or set another port (e.g. `--set port={port + 1}`)."
        )


def _serve_details() -> dict[str, Any] | None:
    """Serve's own view of its apps, deployments and replicas, as plain JSON data."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    return json.loads(json.dumps(client.get_serve_details(), default=lambda value: getattr(value, "value", str(value))))


def _status_of(record: _DeploymentRecord, details: dict[str, Any] | None) -> ModelStatus:
    app = ((details or {}).get("applications") or {}).get(record.app_name)
    replica_states: dict[str, int] = {}
    actor_ids: list[str] = []
    messages = []
    deployment_statuses = []
    if app:
        messages.append(app.get("message") or "")
        for deployment in app.get("deployments", {}).values():
            deployment_statuses.append(deployment.get("status"))
            messages.append(deployment.get("message") or "")
            if deployment["name"] == record.engine_deployment:
                for replica in deployment.get("replicas", []):
                    replica_states[replica["state"]] = replica_states.get(replica["state"], 0) + 1
                    if replica.get("actor_id"):
                        actor_ids.append(replica["actor_id"])
    status = app["status"] if app else "NOT_RUNNING"
    if "UNHEALTHY" in deployment_statuses and status != "RUNNING":
        status = "UNHEALTHY"
    return ModelStatus(
        name=record.name,
        app_name=record.app_name,
        status=status,
        ready=status == "RUNNING",
        model=record.config["model"],
        device=record.device,
        tensor_parallel_size=record.config["tensor_parallel_size"],
        num_replicas=record.config["num_replicas"],
        replica_states=replica_states,
        base_url=record.base_url,
        message="\n".join(m for m in messages if m),
        replica_actor_ids=tuple(actor_ids),
    )


def _replica_logs(actor_ids: Iterable[str], tail: int) -> list[str]:
    ids = list(actor_ids)
    if len(ids) == 1:
        return _logs.fetch_actor_logs(ids[0], tail)
    tagged = [[f"[replica {i}] {line}" for line in _logs.fetch_actor_logs(actor, tail)] for i, actor in enumerate(ids)]
    return [line for stream in tagged for line in stream][-tail:]


def _failure_reason(message: str) -> str:
    """vLLM's own error for a replica that failed to start, from its logs; else Serve's last error line."""
    actor = re.search(r"actor_id=([0-9a-f]+)", message)
    lines = _logs.fetch_actor_logs(actor.group(1), 2000) if actor else []
    cause = _logs.root_cause(lines) or _logs.root_cause(message.splitlines())
    return cause or (message.strip().splitlines() or ["no reason given"])[-1]


def _stage(status: ModelStatus) -> str:
    if status.status == "RUNNING":
        return "checking the endpoint"
    states = status.replica_states
    if not states:
        return "creating the deployment"
    if states.get("PENDING_ALLOCATION") or states.get("PENDING_MIGRATION"):
        return "waiting for resources"
    if states.get("STARTING"):
        return _STARTING
    return "deploying (" + ", ".join(sorted(states)) + ")"


async def _serves(http: httpx.AsyncClient, base_url: str, name: str) -> bool:
    try:
        response = await http.get(f"{base_url}/models")
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and any(m.get("id") == name for m in response.json().get("data", []))


def _kv_put(record: _DeploymentRecord) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_KV_PREFIX + record.name, json.dumps(record.__dict__), overwrite=True, namespace=_KV_NAMESPACE)


def _kv_delete(name: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(_KV_PREFIX + name, namespace=_KV_NAMESPACE)


def _kv_records() -> list[_DeploymentRecord]:
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    records = []
    for key in sorted(_internal_kv_list(_KV_PREFIX, namespace=_KV_NAMESPACE)):
        raw = _internal_kv_get(key, namespace=_KV_NAMESPACE)
        if raw:
            records.append(_DeploymentRecord(**json.loads(raw)))
    return records
