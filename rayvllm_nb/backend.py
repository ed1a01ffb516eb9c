"""The orchestrator: one async ``RayBackend`` that owns the cluster connection and the deployments.

Serve is the source of truth for what runs; the registry (``_internal/registry``) keeps what
Serve does not (each model's public config, what its replicas reported, how they ended), in the
cluster's KV store, so that any process, a CLI call or a second notebook, sees the same models.
Every Ray call blocks, so each runs in a worker thread: awaiting these methods never blocks the
caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib.metadata
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from rayvllm_nb._internal import cluster as _cluster
from rayvllm_nb._internal import logs as _logs
from rayvllm_nb._internal import processes, ray_api, registry, shared_endpoint
from rayvllm_nb._internal.clients import Endpoint
from rayvllm_nb._internal.metrics import MetricsReader
from rayvllm_nb._internal.net import bind_error
from rayvllm_nb._internal.readiness import ReadinessWatcher
from rayvllm_nb.config import ModelConfig, _looks_like_path, check_adapter_name, load_config
from rayvllm_nb.engines import get_engine
from rayvllm_nb.engines._router import build_router_application
from rayvllm_nb.errors import ClusterError, ConfigError, DeploymentError, NotDeployedError, ReadinessTimeout
from rayvllm_nb.placement import PlacementPlan, check_room_to_start, plan_placement
from rayvllm_nb.tiny_model import TINY_ADAPTER_REF, TINY_MODEL_REF
from rayvllm_nb.types import ClusterInfo, ModelMetrics, ModelStatus, Progress, ReplicaInfo, ShutdownReport, Status

_POLL_SECONDS = 0.2
_FREED_WITHIN_S = 10.0
"""How long a stopped model's placement groups may take to show as free in the cluster's resources."""
SERVE_PORT_ENV = "RAYVLLM_NB_SERVE_PORT"
"""Serve's port when a config sets none and Serve is not running yet (default 8000)."""
_DEFAULT_HOST, _DEFAULT_PORT = "127.0.0.1", 8000

ProgressCallback = Callable[[Progress], None]


class RayBackend:
    """Start, watch and stop vLLM models on Ray Serve; one per process, shared by all facades."""

    def __init__(self) -> None:
        self._cluster: ClusterInfo | None = None
        self._serve_started_here = False
        self._metrics = MetricsReader()
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
        only apply to the latter; ``start_local=False`` raises ClusterError instead).

        What a stopped cluster left on this machine (Serve's HAProxy, vLLM engines) is ended
        first; ``ClusterInfo.reclaimed`` says what.
        """
        return await asyncio.to_thread(self._connect, address, num_cpus, num_gpus, start_local)

    @contextlib.contextmanager
    def connected_only(self) -> Iterator[None]:
        """Calls made inside (in this task or thread) use this process's connection and never make
        one: a background watcher must not reconnect a cluster the user just shut down (they raise
        ClusterError while not connected)."""
        token = _CONNECTED_ONLY.set(True)
        try:
            yield
        finally:
            _CONNECTED_ONLY.reset(token)

    def _connect(
        self, address: str | None, num_cpus: int | None, num_gpus: int | None, start_local: bool
    ) -> ClusterInfo:
        import ray

        with self._connect_lock:
            if self._cluster is not None and ray.is_initialized():
                return self._cluster
            if _CONNECTED_ONLY.get():
                raise ClusterError("Not connected to Ray (shut down).")
            if ray.is_initialized():
                self._cluster = _cluster.describe("existing-local", ray.get_runtime_context().gcs_address, None)
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
        arguments, the cluster's devices, Serve's address and API key, and the names and URL
        prefixes already in use. ``replace=True`` stops a running model of the same name first.
        Cancelled half-way (Ctrl-C, the panel's Stop), it leaves nothing of the model running.
        """
        model_config = load_config(config, overrides)
        cluster = await self.initialize_ray()
        model_source = _resolve_model_source(model_config.model, cluster.is_local)
        adapters = {name: _resolve_adapter_source(name, path, cluster.is_local)
                    for name, path in model_config.lora_adapters.items()}
        if adapters != model_config.lora_adapters:  # local folders as absolute paths: the replicas' cwd differs
            model_config = model_config.model_copy(update={"lora_adapters": adapters})
        deploying = asyncio.ensure_future(asyncio.to_thread(self._deploy, model_config, model_source, replace))
        try:
            await asyncio.shield(deploying)
            if wait_ready:
                return await self.wait_for_ready(model_config.name, timeout=timeout, on_progress=on_progress)
        except asyncio.CancelledError:
            await self._withdraw(model_config.name, deploying)
            raise
        return await self.model_status(model_config.name)

    async def _withdraw(self, name: str, deploying: asyncio.Future[None]) -> None:
        """Undo a cancelled start: let the deploy call (a thread) finish, then stop what it deployed."""
        with contextlib.suppress(Exception):
            await deploying
        with contextlib.suppress(NotDeployedError):
            await self.stop_model(name)

    def _deploy(self, config: ModelConfig, model_source: str, replace: bool) -> None:
        resources, node_cpus = _cluster.cluster_resources()
        plan = plan_placement(config, resources, node_cpus)
        engine = get_engine(config.engine)
        engine.validate(config)
        running = {record.name: record for record in registry.models()}
        if config.name in running and not replace:
            raise ConfigError(
                f"A model named {config.name!r} is already running. Stop it first, pass replace=True "
                "(`--replace` on the command line), or choose another served_model_name."
            )
        prefix = _serve_prefix(config)
        holder = next((r for r in running.values() if r.route_prefix == prefix and r.name != config.name), None)
        if holder is not None:
            raise ConfigError(
                f"Route prefix {prefix!r} is already used by model {holder.name!r}. Give this model "
                f"its own, e.g. route_prefix=/{_app_name(config.name)}, leave it unset (the shared endpoint), "
                "or stop that one."
            )
        if config.name not in running and self._cluster is not None and _cluster.cannot_grow(self._cluster.address):
            self._wait_for_room(config, plan, sorted(running))
        http = self._ensure_serve(config)
        if config.name in running:
            self._delete(running[config.name], keep_router=True)
        record = _new_record(config, plan, engine.engine_deployment(config), http, self._cluster)
        registry.put_model(record)
        for adapter, path in config.lora_adapters.items():
            registry.put_adapter(config.name, adapter, path)
        try:
            application = engine.build_application(config, model_source, plan)
            ray_api.deploy_without_waiting(application, record.app_name, prefix)
            if shared_endpoint.needs_router(record):
                _ensure_router()
        except Exception:
            engine.release(config.name)
            registry.forget_model(config.name)
            _delete_router_when_unneeded()
            raise
        self._started_here.add(config.name)

    @staticmethod
    def _wait_for_room(config: ModelConfig, plan: PlacementPlan, running: list[str]) -> None:
        """Refuse a model whose first replicas do not fit in what is free now, after giving a model
        stopped a moment ago the time to hand its resources back."""
        deadline = time.monotonic() + _FREED_WITHIN_S
        while True:
            try:
                check_room_to_start(config, plan, _cluster.free_resources(), running)
                return
            except ConfigError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(1.0)

    def _ensure_serve(self, config: ModelConfig) -> tuple[str, int]:
        """Start Serve on the config's host/port (or the defaults), or check that the running Serve
        matches what the config asks for (address and API key); returns Serve's host and port."""
        from ray import serve

        details = ray_api.serve_details()
        key = config.api_key.get_secret_value() if config.api_key else None
        if details is not None:
            http = details.get("http_options") or {}
            host, port = str(http.get("host")), int(http.get("port") or 0)
            if serve_address(config, (host, port)) != (host, port):
                raise ConfigError(
                    f"Serve already runs on {host}:{port} but this config asks for {config.host or host}:"
                    f"{config.port or port}. Serve's HTTP address is fixed when it first starts: leave host and "
                    "port unset (or use the running ones), or stop every model and Serve first "
                    "(`rayvllm stop --all`, then rayvllm_nb.shutdown())."
                )
            if key is not None and registry.api_key() != key:
                raise ConfigError(
                    f"Serve already runs on {host}:{port} "
                    + ("with another API key" if registry.api_key() else "without an API key")
                    + ": the key belongs to the endpoint and is set when Serve first starts. Leave api_key unset to "
                    "use the endpoint's, or stop every model and Serve first."
                )
            return host, port
        host, port = serve_address(config, None)
        if self._cluster is not None and self._cluster.is_local:
            _check_port_free(host, port)
        # One proxy, on the head: the notebook's endpoint is one address (and nodes sharing a
        # machine, as in tests, would fight over the port).
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        registry.put_endpoint(registry.EndpointRecord(host, port, key is not None), key)
        self._serve_started_here = True
        return host, port

    async def wait_for_ready(
        self, name: str | None = None, *, timeout: float = 900.0, on_progress: ProgressCallback | None = None
    ) -> ModelStatus:
        """Wait until ``name`` answers on its OpenAI endpoint.

        Raises :class:`DeploymentError` (after deleting the app) as soon as a replica
        fails, and :class:`ReadinessTimeout` if it is still loading after ``timeout`` s.
        """
        record = await self._record(name)
        endpoint = await self.endpoint(record.name)
        watcher = ReadinessWatcher(record.name, time.monotonic())
        stage = ""
        async with httpx.AsyncClient(timeout=5.0, headers=endpoint.headers) as http:
            while True:
                status = await self.model_status(record.name)
                now = time.monotonic()
                lines = None
                if watcher.wants_logs(status, now):
                    lines = await asyncio.to_thread(self._replica_logs, status.replica_actor_ids, 400)
                verdict = watcher.observe(status, lines, now)
                failure = None
                if status.status == "FAILED":
                    failure = status.message
                elif verdict.serve_failure is not None:
                    failure = await asyncio.to_thread(self._failure_reason, verdict.serve_failure)
                elif verdict.engine_failure is not None:
                    failure = verdict.engine_failure
                if failure is not None:
                    await asyncio.to_thread(self._delete, record)
                    raise DeploymentError(
                        f"Model {record.name!r} failed to start and was removed (nothing of it is left running). "
                        f"vLLM/Serve reported: {failure}. Fix the config or the model files and start again."
                    )
                if verdict.progress is not None:
                    stage = str(verdict.progress)
                    if on_progress is not None:
                        on_progress(verdict.progress)
                if verdict.serve_running and await _serves(http, status.base_url, record.name):
                    ready = await self.model_status(record.name)
                    refused = {name: why for r in ready.replicas for name, why in r.adapters.items() if why}
                    if refused:
                        await asyncio.to_thread(self._delete, record)
                        name, why = next(iter(refused.items()))
                        raise DeploymentError(
                            f"Model {record.name!r} started but its adapter {name!r} "
                            f"({ready.adapters.get(name, '')}) could not be loaded, so the model was removed; vLLM "
                            f"said: {why}. Fix lora_adapters (PEFT adapter folders of this base model) and retry."
                        )
                    if on_progress is not None:
                        on_progress(watcher.ready(time.monotonic()))
                    return ready
                if now - watcher.started_at > timeout:
                    raise ReadinessTimeout(
                        f"Model {record.name!r} was not ready after {timeout:.0f} s (stage: {stage}). It is still "
                        "deploying: call wait_for_ready() again, look at status() and logs, or stop_model() it."
                    )
                await asyncio.sleep(_POLL_SECONDS)

    async def get_logs(self, name: str | None = None, tail: int = 100) -> list[str]:
        """The last ``tail`` lines of the model's engine replicas (vLLM's and Serve's), newest last."""
        status = await self.model_status(name)
        return await asyncio.to_thread(self._replica_logs, status.replica_actor_ids, tail)

    async def get_status(self) -> Status:
        """The cluster, Serve's HTTP address, the versions running and every model deployed through rayvllm_nb.
        Connects to a running cluster; never starts one (only deploying does)."""
        cluster = await self.initialize_ray(start_local=False)
        return await asyncio.to_thread(_status, cluster)

    async def model_status(self, name: str | None = None) -> ModelStatus:
        """Status of the model ``name`` (the only deployed one when None)."""
        record = await self._record(name)
        return await asyncio.to_thread(lambda: _status_of(record, ray_api.serve_details()))

    async def get_metrics(self, name: str | None = None) -> ModelMetrics:
        """What the model ``name`` (the only one when None) is doing now: requests running and
        waiting, KV cache use, tokens, tok/s, TTFT and ITL medians, preemptions; totals and per
        replica, from vLLM's own counters (exact at the moment of reading; see ``_internal/metrics``)."""
        record = await self._record(name)
        return await asyncio.to_thread(self._metrics.read, record.name)

    async def endpoint(self, name: str | None = None) -> Endpoint:
        """Where ``name`` answers and the API key it requires: what OpenAI clients need. With no
        name: the shared endpoint when models serve there (the only model's own otherwise)."""
        if name is None:
            await self.initialize_ray(start_local=False)
            shared = [r for r in await asyncio.to_thread(registry.models) if shared_endpoint.is_shared(r)]
            if shared:
                return Endpoint(shared[0].base_url, await asyncio.to_thread(registry.api_key))
        record = await self._record(name)
        return Endpoint(record.base_url, await asyncio.to_thread(registry.api_key))

    async def load_adapter(self, name: str, path: str, model: str | None = None, *, timeout: float = 300.0) -> str:
        """Serve the LoRA adapter ``name`` (a local PEFT folder or a HF id) with ``model`` (the only
        model with LoRA on when None), on every replica, those started later included; returns
        once each running replica serves it. A folder that is missing or does not fit the model is
        refused with vLLM's reason, and nothing of it stays registered."""
        record = await self._lora_model(model)
        cluster = await self.initialize_ray(start_local=False)
        source = _resolve_adapter_source(name, path, cluster.is_local)
        owners = await asyncio.to_thread(registry.all_adapters)
        taken = {r.name for r in await asyncio.to_thread(registry.models)} | {
            adapter for adapter, owner in owners.items() if owner != record.name
        }
        if name in taken:
            raise ConfigError(
                f"{name!r} already names a model or another model's adapter on this cluster: choose another "
                "adapter name (clients pass it as `model`)."
            )
        await asyncio.to_thread(registry.put_adapter, record.name, name, source)
        try:
            await self._until_replicas(record.name, name, loaded=True, timeout=timeout)
        except BaseException:
            await asyncio.to_thread(registry.forget_adapter, record.name, name)
            raise
        return name

    async def unload_adapter(self, name: str, model: str | None = None, *, timeout: float = 120.0) -> str:
        """Stop serving the LoRA adapter ``name`` (of ``model``, else of whichever model serves it);
        returns once no running replica serves it."""
        owner = model or (await asyncio.to_thread(registry.all_adapters)).get(name)
        if owner is None or name not in await asyncio.to_thread(registry.adapters, owner):
            served = await asyncio.to_thread(registry.all_adapters)
            raise NotDeployedError(
                f"No adapter named {name!r} is loaded{f' in model {model!r}' if model else ''} "
                f"(loaded: {', '.join(sorted(served)) or 'none'})."
            )
        await asyncio.to_thread(registry.forget_adapter, owner, name)
        await self._until_replicas(owner, name, loaded=False, timeout=timeout)
        return name

    async def _lora_model(self, name: str | None) -> registry.DeploymentRecord:
        """The model ``name`` (else the only one with LoRA on), refused when it runs without LoRA."""
        if name is None:
            await self.initialize_ray(start_local=False)
            with_lora = [r for r in await asyncio.to_thread(registry.models) if _lora_enabled(r)]
            if len(with_lora) == 1:
                return with_lora[0]
            if len(with_lora) > 1:
                raise ConfigError(
                    f"Several models run with LoRA ({', '.join(r.name for r in with_lora)}): name the one you mean."
                )
        record = await self._record(name)
        if not _lora_enabled(record):
            raise ConfigError(
                f"Model {record.name!r} runs without LoRA, so it cannot load adapters. Start it with "
                "`enable_lora: true` (or `lora_adapters: {NAME: PATH}`), e.g. `--set enable_lora=true --replace`; "
                "LoRA is off by default because it costs the engine memory and speed."
            )
        return record

    async def _until_replicas(self, model: str, adapter: str, *, loaded: bool, timeout: float) -> None:
        """Wait until every running replica of ``model`` serves ``adapter`` (or none does when not
        ``loaded``); a replica's load error ends the wait with vLLM's words."""
        deadline = time.monotonic() + timeout
        while True:
            status = await self.model_status(model)
            running = [r for r in status.replicas if r.state == "RUNNING"]
            failures = [r.adapters[adapter] for r in running if r.adapters.get(adapter)]
            if loaded and failures:
                path = (await asyncio.to_thread(registry.adapters, model)).get(adapter, "")
                raise DeploymentError(
                    f"Adapter {adapter!r} ({path}) could not be loaded into model {model!r}; vLLM said: "
                    f"{failures[0]}. Check that the folder holds a PEFT LoRA adapter (adapter_config.json and "
                    "adapter_model.safetensors) trained for this base model, with a rank within max_lora_rank."
                )
            if all((r.adapters.get(adapter) == "") is loaded for r in running):
                return
            if time.monotonic() > deadline:
                raise ReadinessTimeout(
                    f"Adapter {adapter!r} was not {'loaded into' if loaded else 'unloaded from'} every replica of "
                    f"{model!r} within {timeout:.0f} s; status() shows each replica's adapters."
                )
            await asyncio.sleep(_POLL_SECONDS)

    async def stop_model(self, name: str | None = None) -> str:
        """Delete the model's Serve app (its replicas and placement groups; running requests
        get ``drain_timeout_s`` to finish); returns its name."""
        record = await self._record(name)
        await asyncio.to_thread(self._delete, record)
        return record.name

    def _delete(self, record: registry.DeploymentRecord, *, keep_router: bool = False) -> None:
        """Delete the model's app; the shared endpoint's router goes with the last model that needs it."""
        from ray import serve

        serve.delete(record.app_name, _blocking=True)
        get_engine(record.config["engine"]).release(record.name)
        registry.forget_model(record.name)
        self._started_here.discard(record.name)
        if not keep_router:
            _delete_router_when_unneeded()

    async def shutdown(self) -> ShutdownReport:
        """Stop what this process started: its models, Serve, and the local cluster if it started it;
        then disconnect. The report says what went and what was left running."""
        if self._cluster is None:
            return ShutdownReport()
        stopped = []
        for name in sorted(self._started_here):
            try:
                stopped.append(await self.stop_model(name))
            except NotDeployedError:
                self._started_here.discard(name)
        return await asyncio.to_thread(self._disconnect, tuple(stopped))

    def _disconnect(self, stopped: tuple[str, ...]) -> ShutdownReport:
        import ray
        from ray import serve

        with self._connect_lock:
            cluster, self._cluster = self._cluster, None
            serve_stopped = False
            try:
                if self._serve_started_here and not registry.models():
                    serve.shutdown()
                    registry.forget_endpoint()
                    serve_stopped = True
                self._serve_started_here = False
                ray.shutdown()
            finally:
                # The cluster this process started goes, whatever happened above.
                started_here = cluster is not None and cluster.mode == "started-local"
                if cluster is not None and started_here:
                    _cluster.stop_started_heads(cluster.address)
        return ShutdownReport(stopped, serve_stopped, cluster.address if cluster else None, started_here)

    def _replica_logs(self, actor_ids: Iterable[str], tail: int) -> list[str]:
        ids = list(actor_ids)
        dashboard = self._cluster.dashboard_url if self._cluster is not None else None
        if len(ids) == 1:
            return _logs.fetch_actor_logs(ids[0], tail, dashboard)
        tagged = [
            [f"[replica {i}] {line}" for line in _logs.fetch_actor_logs(actor, tail, dashboard)]
            for i, actor in enumerate(ids)
        ]
        return [line for stream in tagged for line in stream][-tail:]

    def _failure_reason(self, message: str) -> str:
        """vLLM's own error for a replica that failed to start, from its logs; else Serve's last error line."""
        actor = re.search(r"actor_id=([0-9a-f]+)", message)
        lines = self._replica_logs([actor.group(1)], 2000) if actor else []
        cause = _logs.root_cause(lines) or _logs.root_cause(message.splitlines())
        return cause or (message.strip().splitlines() or ["no reason given"])[-1]

    async def _record(self, name: str | None) -> registry.DeploymentRecord:
        await self.initialize_ray(start_local=False)
        records = await asyncio.to_thread(registry.models)
        if name is None:
            if len(records) == 1:
                return records[0]
            if not records:
                raise NotDeployedError(
                    "No model is deployed. Start one with rayvllm_nb.start(CONFIG), `%rayvllm start CONFIG` "
                    "or `rayvllm serve CONFIG`."
                )
            raise ConfigError(
                f"Several models are deployed ({', '.join(r.name for r in records)}): name the one you mean."
            )
        for record in records:
            if record.name == name:
                return record
        running = ", ".join(r.name for r in records) or "none"
        raise NotDeployedError(f"No model named {name!r} is deployed (running: {running}).")


_CONNECTED_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("rayvllm_nb_connected_only", default=False)
"""Set by :meth:`RayBackend.connected_only`."""


def serve_address(config: ModelConfig, running: tuple[str, int] | None) -> tuple[str, int]:
    """The host and port ``config`` asks Serve for: its own, else the running Serve's, else
    127.0.0.1 and ``$RAYVLLM_NB_SERVE_PORT`` (8000 when unset)."""
    default = running or (_DEFAULT_HOST, int(os.environ.get(SERVE_PORT_ENV) or _DEFAULT_PORT))
    return config.host or default[0], config.port or default[1]


def _new_record(
    config: ModelConfig, plan: PlacementPlan, engine_deployment: str, http: tuple[str, int],
    cluster: ClusterInfo | None,
) -> registry.DeploymentRecord:
    host, port = http
    host = config.endpoint_host or host
    if host in ("0.0.0.0", "::", "localhost"):
        host = cluster.host if cluster is not None and not cluster.is_local else "127.0.0.1"
    return registry.DeploymentRecord(
        name=config.name,
        app_name=_app_name(config.name),
        engine_deployment=engine_deployment,
        base_url=f"http://{host}:{port}{config.route_prefix or ''}/v1",
        route_prefix=_serve_prefix(config),
        device=plan.device,
        bundles=plan.bundles,
        config=config.public_dict(),
        started_at=time.time(),
    )


def _serve_prefix(config: ModelConfig) -> str:
    """Where the model's own Serve app lives: its ``route_prefix``, or its place under the shared endpoint."""
    return config.route_prefix or shared_endpoint.model_prefix(_app_name(config.name))


def _ensure_router() -> None:
    """Deploy the shared endpoint's router unless Serve already runs it."""
    details = ray_api.serve_details() or {}
    if shared_endpoint.ROUTER_APP not in (details.get("applications") or {}):
        ray_api.deploy_without_waiting(build_router_application(), shared_endpoint.ROUTER_APP, "/")


def _delete_router_when_unneeded() -> None:
    """Delete the router unless a model still needs it (``shared_endpoint.needs_router``)."""
    from ray import serve

    if any(shared_endpoint.needs_router(record) for record in registry.models()):
        return
    details = ray_api.serve_details() or {}
    if shared_endpoint.ROUTER_APP in (details.get("applications") or {}):
        serve.delete(shared_endpoint.ROUTER_APP, _blocking=True)


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


def _resolve_adapter_source(name: str, path: str, cluster_is_local: bool) -> str:
    """What the replicas load for an adapter; a local folder is checked here when they share this machine."""
    try:
        check_adapter_name(name)
    except ValueError as error:
        raise ConfigError(f"Invalid adapter name: {error}.") from None
    if path == TINY_ADAPTER_REF or not cluster_is_local or not _looks_like_path(path):
        return path
    folder = Path(path).expanduser().resolve()
    if not (folder / "adapter_config.json").is_file():
        problem = "does not exist" if not folder.exists() else "has no adapter_config.json (not a PEFT adapter)"
        raise ConfigError(
            f"Adapter folder {str(folder)!r} {problem}. Pass a folder holding a PEFT LoRA adapter "
            f"(`rayvllm make-tiny-adapter PATH` builds one for the tiny model), a Hugging Face adapter id, "
            f"or {TINY_ADAPTER_REF!r}."
        )
    return str(folder)


def _lora_enabled(record: registry.DeploymentRecord) -> bool:
    return bool(record.config.get("enable_lora") or record.config.get("lora_adapters"))


def _check_port_free(host: str, port: int) -> None:
    """The Serve port must be free; what a stopped cluster left holding it is ended first."""
    if bind_error(host, port):
        processes.end_orphans()
    if problem := bind_error(host, port):
        raise ConfigError(
            f"Port {port} on {host} is already used by another program ({problem}), so Serve cannot "
            f"listen there. Stop that program or set another port (e.g. `--set port={port + 1}`)."
        )


def _status(cluster: ClusterInfo) -> Status:
    details = ray_api.serve_details()
    http = (details or {}).get("http_options") or {}
    models = [_status_of(record, details) for record in registry.models()]
    vllm_versions = sorted({model.vllm_version for model in models if model.vllm_version})
    return Status(
        cluster=cluster,
        serve_running=details is not None,
        http_address=f"{http.get('host')}:{http.get('port')}" if http else None,
        models=models,
        versions={
            "rayvllm_nb": importlib.metadata.version("rayvllm_nb"),
            "Ray": cluster.ray_version,
            "vLLM": ", ".join(vllm_versions) or "no replica running",
        },
    )


def _status_of(record: registry.DeploymentRecord, details: dict[str, Any] | None) -> ModelStatus:
    app = ((details or {}).get("applications") or {}).get(record.app_name)
    replica_states: dict[str, int] = {}
    actor_ids: list[str] = []
    replica_state_by_id: dict[str, str] = {}
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
                    replica_state_by_id[replica.get("replica_id", "")] = replica["state"]
                    if replica.get("actor_id"):
                        actor_ids.append(replica["actor_id"])
    replica_records = registry.replicas(record.name)
    crashes = registry.crashes(replica_records, actor_ids)
    status = app["status"] if app else "NOT_RUNNING"
    if "UNHEALTHY" in deployment_statuses and status != "RUNNING":
        status = "UNHEALTHY"
    autoscaling = record.config.get("autoscaling")
    target = autoscaling["min_replicas"] if autoscaling else record.config["num_replicas"]
    engine_dead = any(r.ended == "crashed" and r.replica_id in replica_state_by_id for r in replica_records)
    if app and crashes.count and (engine_dead or status != "RUNNING" or replica_states.get("RUNNING", 0) < target):
        status = "RESTARTING"
    message = "\n".join(m for m in messages if m)
    if record.failure:
        status, message = "FAILED", record.failure
    live = [r for r in replica_records if not r.ended and r.replica_id in replica_state_by_id]
    return ModelStatus(
        name=record.name,
        app_name=record.app_name,
        status=status,
        ready=status == "RUNNING",
        model=record.config["model"],
        device=record.device,
        tensor_parallel_size=record.config["tensor_parallel_size"],
        num_replicas=target,
        replica_states=replica_states,
        base_url=record.base_url,
        message=message,
        replica_actor_ids=tuple(actor_ids),
        restarts=crashes.count,
        last_failure=crashes.last_cause,
        replicas=tuple(
            ReplicaInfo(
                replica_id=r.replica_id, state=replica_state_by_id[r.replica_id], node_ip=r.node_ip,
                kv_cache_gib=None if r.kv_cache_bytes is None else r.kv_cache_bytes / 2**30,
                kv_cache_choice=r.kv_cache_choice, cpu_placement=r.cpu_placement, adapters=r.adapters,
            )
            for r in live
        ),
        vllm_version=", ".join(sorted({r.vllm_version for r in live})),
        adapters=registry.adapters(record.name),
        autoscaling=(
            f"{autoscaling['min_replicas']}-{autoscaling['max_replicas']} replicas, "
            f"{autoscaling['target_ongoing_requests']:g} requests each" if autoscaling else ""
        ),
        scales_to_zero=shared_endpoint.scales_to_zero(record),
    )


async def _serves(http: httpx.AsyncClient, base_url: str, name: str) -> bool:
    try:
        response = await http.get(f"{base_url}/models")
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and any(m.get("id") == name for m in response.json().get("data", []))

