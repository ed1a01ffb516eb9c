"""Code that runs inside the Serve replicas of the ``serve-llm`` engine.

Each replica is its model's HTTP ingress: Serve LLM's ``LLMServer`` builds vLLM's own OpenAI
app around its running engine (``__serve_build_asgi_app__``), and Serve serves it from the
replica itself. Under HAProxy mode (direct ingress) a request then goes HAProxy → the replica's
own HTTP server → vLLM, with no Ray actor call per streamed chunk; under Serve's classic proxy
the proxy forwards to the replica in one hop.

``VllmServer`` adds, before vLLM starts: the model's secrets (its HF token, from the cluster's
KV store) in its environment, the embedded tiny model built on its own node, a KV cache sized
to its node when the user sized none (CPU), and the refusal to start a model that keeps
crashing (after ``max_restarts`` crashes it deletes its own app, with the cause in status);
once vLLM runs, its CPU engine's processes pinned (``cpu_placement``: the engine core beside its
worker, the streaming on the cores left).
Around vLLM's app (pure ASGI, nothing per streamed chunk): the endpoint's API key, a fast
OpenAI-shaped 503 with ``Retry-After`` once the engine is dead, ``GET /health`` (503 when the
engine cannot serve), 400s naming the request field and 415 for a body that is not JSON. Each
replica registers itself (node, vLLM version, KV cache) and how it ended: "stopped" when Serve
stops it, "crashed" with vLLM's own cause when its engine died.

``ReplicaCallback`` keeps the secrets out of the runtime env of Serve LLM's download tasks and
loads them inside those tasks instead (and skips the tasks for a local model folder). Tokens
thus never travel in a runtime env, which Serve's app config, ``serve status``, ``ray list
actors --detail`` and the runtime-env agent's log would all show.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import prometheus_client
import psutil
import ray
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.serve.llm import LLMConfig, LLMServer
from starlette.responses import JSONResponse
from starlette.routing import Route, get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from rayvllm_nb._internal import cpu_placement, kv_cache, logs, ray_api, registry, vllm_api
from rayvllm_nb._internal.openai_http import WRONG_KEY, authorized, error_response, expected_authorization
from rayvllm_nb._internal.replica_env import (
    AUTO_KV_CACHE_ENV,
    CPU_PINNING_ENV,
    LORA_ENV,
    MODEL_ENV,
    SECRET_ENV_NAMES,
    SECRET_REF_ENV,
)
from rayvllm_nb._internal.serve_haproxy import RETRY_AFTER_S
from rayvllm_nb.tiny_model import adapter_source, model_source

_HEALTH_TIMEOUT_S = 5.0
_ADAPTER_SYNC_S = 1.0
_logger = logging.getLogger("ray.serve")


class VllmServer(LLMServer):
    """``LLMServer`` serving vLLM's own OpenAI app as its replica's ingress (see the module docstring)."""

    async def __init__(self, llm_config: LLMConfig, **kwargs: Any) -> None:  # type: ignore[misc]  # Serve awaits it
        self._model_name = os.environ[MODEL_ENV]
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        load_secret_env()
        await asyncio.to_thread(_refuse_a_crash_loop, self._model_name)
        llm_config, self._kv_cache = await asyncio.to_thread(_prepare, llm_config)
        self._api_key = await asyncio.to_thread(registry.api_key)
        self._crash_recorder: asyncio.Task[None] | None = None
        await super().__init__(llm_config, **kwargs)
        pinned = await asyncio.to_thread(_pin_cpu_processes) if os.environ.get(CPU_PINNING_ENV) else ""
        # vLLM's metrics (its Prometheus registry in this process), for rayvllm_nb.metrics(): on
        # loopback, read by the driver or a task on this node (see _internal/metrics).
        self._metrics_server, _ = prometheus_client.start_http_server(0, addr="127.0.0.1")
        self._adapters: dict[str, str] = {}
        self._adapter_paths: dict[str, str] = {}
        if os.environ.get(LORA_ENV):
            await self._sync_adapters(report=False)
        await asyncio.to_thread(self._register, pinned, self._metrics_server.server_port)
        self._adapter_keeper = asyncio.create_task(self._keep_adapters()) if os.environ.get(LORA_ENV) else None

    async def _start_engine(self) -> None:
        """Serve LLM's engine start, without its usage telemetry when Ray's usage stats are off (see
        ``ray_api.start_serve_llm_engine_quietly``)."""
        if await asyncio.to_thread(ray_api.usage_stats_enabled):
            await super()._start_engine()
        else:
            await ray_api.start_serve_llm_engine_quietly(self)

    async def _keep_adapters(self) -> None:
        """Keep the LoRA adapters this replica serves equal to the registry's, every second: a load
        (``rayvllm_nb.load_adapter``) reaches every replica, those started later included."""
        while True:
            await asyncio.sleep(_ADAPTER_SYNC_S)
            try:
                await self._sync_adapters(report=True)
            except Exception:  # one failed round is retried a second later
                _logger.exception("Could not bring this replica's LoRA adapters up to date")

    async def _sync_adapters(self, *, report: bool) -> None:
        """Load what the registry asks for (once per path: a failure is reported, not retried), unload
        what it no longer lists; each adapter's outcome ("" or vLLM's error) goes to this replica's record."""
        wanted = await asyncio.to_thread(registry.adapters, self._model_name)
        serving_models = ray_api.serve_llm_serving_models(self.engine)
        loaded = vllm_api.loaded_adapters(serving_models)
        outcomes = {name: outcome for name, outcome in self._adapters.items() if name in wanted}
        for name, path in wanted.items():
            if self._adapter_paths.get(name) == path and (name in loaded or outcomes.get(name)):
                continue
            outcomes[name] = await vllm_api.load_adapter(serving_models, name, await asyncio.to_thread(
                adapter_source, path))
            self._adapter_paths[name] = path
        for name in set(loaded) - set(wanted):
            await vllm_api.unload_adapter(serving_models, name)
        for name in set(self._adapter_paths) - set(wanted):
            del self._adapter_paths[name]
        if outcomes != self._adapters:
            self._adapters = outcomes
            if report:
                await asyncio.to_thread(registry.set_replica_adapters, self._model_name, self._replica_id, outcomes)

    def _register(self, cpu_placement: str, metrics_port: int) -> None:
        import vllm

        kv_bytes, kv_choice = self._kv_cache
        registry.put_replica(self._model_name, registry.ReplicaRecord(
            replica_id=self._replica_id, actor_id=ray.get_runtime_context().get_actor_id() or "",
            node_ip=ray.util.get_node_ip_address(), pid=os.getpid(), started_at=time.time(),
            vllm_version=vllm.__version__, kv_cache_bytes=kv_bytes, kv_cache_choice=kv_choice,
            cpu_placement=cpu_placement, metrics_port=metrics_port, adapters=self._adapters,
        ))

    async def __serve_build_asgi_app__(self) -> FastAPI:
        app: FastAPI = await super().__serve_build_asgi_app__()
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/health"]
        app.router.routes.append(Route("/health", self._health, methods=["GET"]))
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.add_middleware(JsonBodiesOnly)
        app.add_middleware(ServingGuard, engine_dead=self._engine_dead, api_key=self._api_key)
        return app

    def _engine_dead(self) -> bool:
        client = getattr(self.engine, "_engine_client", None)
        return bool(getattr(client, "errored", False))

    async def _health(self, request: Any) -> JSONResponse:
        """200 when the engine answers its health check, else 503 (OpenAI-shaped)."""
        try:
            async with asyncio.timeout(_HEALTH_TIMEOUT_S):
                await self.check_health()
        except Exception as error:  # noqa: BLE001 - any failure means "cannot serve"
            reason = "timed out" if isinstance(error, TimeoutError) else f"{type(error).__name__}: {error}"
            return error_response(503, f"The engine cannot serve: {reason}", retry_after=True)
        return JSONResponse({"status": "ok"})

    async def check_health(self) -> None:
        """Serve's health check; when the engine died, its crash is recorded (with vLLM's cause) on the side."""
        try:
            await super().check_health()
        except BaseException as error:
            if self._engine_dead() and self._crash_recorder is None:
                self._crash_recorder = asyncio.create_task(asyncio.to_thread(self._record_crash, error))
            raise

    def _record_crash(self, error: BaseException) -> None:
        """Mark this replica crashed at once (a replacement may start any moment and counts crashes),
        then say why: how vLLM's engine process ended, and vLLM's own error line from this replica's log."""
        registry.end_replica(self._model_name, self._replica_id, "crashed", f"vLLM's engine died ({error})")
        actor_id = ray.get_runtime_context().get_actor_id() or ""
        lines = logs.fetch_actor_logs(actor_id, 400) if actor_id else []
        details = [*self._engine_exits(), logs.root_cause(lines) or f"{type(error).__name__}: {error}"]
        registry.set_cause(self._model_name, self._replica_id, "vLLM's engine died: " + "; ".join(details))

    def _engine_exits(self) -> list[str]:
        """How vLLM's engine processes ended, e.g. "EngineCore_DP0 was killed (SIGKILL)" (vLLM's
        process manager keeps their exit codes; its internals, so nothing when they change)."""
        client = getattr(getattr(self.engine, "_engine_client", None), "engine_core", None)
        manager = getattr(getattr(client, "resources", None), "engine_manager", None)
        exits = []
        for process in getattr(manager, "processes", None) or []:
            code = getattr(process, "exitcode", None)
            if isinstance(code, int) and code < 0:
                exits.append(f"{process.name} was killed ({signal.Signals(-code).name})")
            elif isinstance(code, int):
                exits.append(f"{process.name} exited with code {code}")
        return exits

    async def __del__(self) -> None:
        """Serve stops this replica (stop, replace, scale-down, or after a failed health check)."""
        keeper = getattr(self, "_adapter_keeper", None)
        if keeper is not None:
            keeper.cancel()
        await asyncio.to_thread(registry.end_replica, self._model_name, self._replica_id, "stopped")
        if getattr(self, "_metrics_server", None) is not None:
            self._metrics_server.shutdown()
        await super().__del__()


def _pin_cpu_processes() -> str:
    """Pin this replica's CPU engine beside its worker, and this replica with its node's HAProxy on
    the cores left (``cpu_placement``); what was done, for status."""
    ingress = cpu_placement.serve_ingress_processes(os.environ.get("RAY_RAYLET_PID", ""))
    placement = cpu_placement.place(psutil.Process(), ingress)
    return placement.summary() if placement else "not pinned: no vLLM CPU worker under this replica"


def _refuse_a_crash_loop(model_name: str) -> None:
    """Before loading: a model whose replicas crashed more than ``max_restarts`` times in the last
    ten minutes is stopped (its app deleted) with the cause in its record, instead of restarting."""
    record = registry.model(model_name)
    if record is None:
        return
    deployment: dict[str, Any] = next(
        (d for app in ((ray_api.serve_details() or {}).get("applications") or {}).values()
         for d in (app.get("deployments") or {}).values() if d.get("name") == record.engine_deployment),
        {},
    )
    live = [replica.get("actor_id") for replica in deployment.get("replicas", []) if replica.get("actor_id")]
    crashes = registry.crashes(registry.replicas(model_name), live)
    for gone in crashes.vanished:
        registry.end_replica(model_name, gone.replica_id, "crashed", crashes.last_cause)
    limit = int(record.config.get("max_restarts", 3))
    if crashes.recent <= limit:
        return
    failure = (
        f"stopped after {crashes.recent} crashes within {registry.RESTART_WINDOW_S / 60:.0f} minutes "
        f"(max_restarts={limit}); the last: {crashes.last_cause}"
    )
    registry.mark_failed(model_name, failure)
    threading.Thread(target=serve.delete, args=(record.app_name,), kwargs={"_blocking": False}, daemon=True).start()
    raise RuntimeError(f"Model {model_name!r} {failure}")


def _prepare(llm_config: LLMConfig) -> tuple[LLMConfig, tuple[int | None, str]]:
    """The tiny model's real folder, and the KV cache this node can hold when the user sized none."""
    loading = llm_config.model_loading_config
    update: dict[str, Any] = {}
    resolved = model_source(loading.model_source) if isinstance(loading.model_source, str) else loading.model_source
    if resolved != loading.model_source:
        update["model_loading_config"] = loading.model_copy(update={"model_source": resolved})
    engine_kwargs = dict(llm_config.engine_kwargs)
    choice: tuple[int | None, str] = _reported_kv_cache(engine_kwargs)
    if os.environ.get(AUTO_KV_CACHE_ENV):
        model_dir = Path(resolved) if isinstance(resolved, str) and os.path.isdir(resolved) else None
        size, reason = kv_cache.choose(
            model_dir, engine_kwargs, int(engine_kwargs.get("tensor_parallel_size", 1)),
            psutil.virtual_memory().available,
        )
        engine_kwargs["kv_cache_memory_bytes"] = size
        update["engine_kwargs"] = engine_kwargs
        choice = (size, f"auto: {reason}")
    if not update:
        return llm_config, choice
    llm_config = llm_config.model_copy(update=update)
    # Serve LLM caches the engine config derived from the old source and arguments on first use.
    llm_config._engine_config = None
    return llm_config, choice


def _reported_kv_cache(engine_kwargs: dict[str, Any]) -> tuple[int | None, str]:
    """What the user's own settings make the KV cache, for status."""
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        size = int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * 2**30
        return size, f"{size / 2**30:.2f} GiB per rank (cpu_kvcache_space_gb)"
    if engine_kwargs.get("kv_cache_memory_bytes"):
        size = int(engine_kwargs["kv_cache_memory_bytes"])
        return size, f"{size / 2**30:.2f} GiB per rank (kv_cache_memory_bytes)"
    share = engine_kwargs.get("gpu_memory_utilization")
    return None, f"vLLM's, {share} of memory" if share else "vLLM's default"


async def _validation_error(request: Any, error: RequestValidationError) -> JSONResponse:
    """400 naming the request field (``messages``, not vLLM's ``body.messages``), or saying the JSON is broken."""
    problem: dict[str, Any] = dict(error.errors()[0]) if error.errors() else {"msg": "invalid request", "loc": ()}
    if problem.get("type") == "json_invalid":
        return error_response(400, f"The request body is not valid JSON: {problem.get('ctx', {}).get('error')}.")
    where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
    message = f"{problem.get('msg', 'invalid request')}" + (f" (at {where})" if where else "")
    return error_response(400, message, where or None)


class ServingGuard:
    """Pure ASGI middleware in front of vLLM's app (nothing per streamed chunk).

    With an API key, every route but ``/health`` answers 401 without ``Authorization: Bearer KEY``.
    Once the engine is dead, every route but ``/health`` answers 503 with ``Retry-After`` at once
    (vLLM's app would fail each request on its own; Serve replaces this replica).
    """

    def __init__(self, app: ASGIApp, engine_dead: Any, api_key: str | None) -> None:
        self.app = app
        self._engine_dead = engine_dead
        self._expected = expected_authorization(api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The route path: without the app's prefix (its own route_prefix, or its place at the shared endpoint).
        if scope["type"] == "http" and (path := get_route_path(scope)) != "/health" and not path.startswith("/-/"):
            if not authorized(scope["headers"], self._expected):
                await error_response(401, WRONG_KEY)(scope, receive, send)
                return
            if self._engine_dead():
                message = f"The model's engine stopped; a new replica is starting. Retry in {RETRY_AFTER_S} s."
                await error_response(503, message, retry_after=True)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class JsonBodiesOnly:
    """Pure ASGI middleware (nothing per streamed chunk): a POST whose body is not JSON gets 415."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
            if not content_type.split(";")[0].strip().endswith("json"):
                message = f"Content-Type must be application/json, got {content_type or 'none'!r}."
                await error_response(415, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ReplicaCallback(ray_api.serve_llm_callback_base()):  # type: ignore[misc]
    """Serve LLM callback: download tasks fetch the secrets themselves, not via their runtime env;
    a model folder already on this node needs no download task at all (one Ray task, ~10 s here)."""

    async def on_before_node_init(self) -> None:
        env_vars = (self.ctx.runtime_env or {}).get("env_vars") or {}
        for name in SECRET_ENV_NAMES:
            env_vars.pop(name, None)
        source = self.llm_config.model_loading_config.model_source
        if isinstance(source, str) and os.path.isdir(source):
            self.ctx.run_init_node = False

    def on_before_download_model_files_distributed(self) -> None:
        load_secret_env()


def load_secret_env() -> None:
    """Put the model's secrets (named by ``RAYVLLM_NB_SECRET_REF``) into ``os.environ``."""
    ref = os.environ.get(SECRET_REF_ENV)
    if not ref:
        return
    secrets = registry.model_secrets(ref)
    if secrets is None:
        raise RuntimeError(f"The secrets of this model ({SECRET_REF_ENV}) are gone from the cluster's KV store.")
    os.environ.update(secrets)
