"""Code that runs inside the Serve replicas of the ``serve-llm`` engine.

Each replica is its model's HTTP ingress: Serve LLM's ``LLMServer`` builds vLLM's own
OpenAI app around its running engine (``__serve_build_asgi_app__``), and Serve serves it
from the replica itself. Under HAProxy mode (direct ingress) a request then goes HAProxy →
the replica's own HTTP server → vLLM, with no Ray actor call per streamed chunk; under
Serve's classic proxy the proxy forwards to the replica in one hop.

- ``VllmServer`` adds to vLLM's app: ``GET /health`` answering 503 in OpenAI's error shape
  when the engine cannot serve, 400s that name the request field, and 415 for a POST whose
  body is not JSON. It loads the
  model's secrets (the HF token, kept in the cluster's KV store) into its environment before
  vLLM starts, and builds the embedded tiny model on its own node.
- ``ReplicaCallback`` keeps the secrets out of the runtime env of Serve LLM's download tasks
  and loads them inside those tasks instead (and skips the tasks for a local model folder).
  Tokens thus never travel in a runtime env, which Serve's app config, ``serve status``,
  ``ray list actors --detail`` and the runtime-env agent's log would all show.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.serve.core.server.llm_server import LLMServer
from ray.serve.llm import LLMConfig
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rayvllm_nb.engines.serve_llm import SECRET_ENV_NAMES, SECRET_NAMESPACE, SECRET_REF_ENV
from rayvllm_nb.tiny_model import TINY_MODEL_REF, tiny_model_path

_HEALTH_TIMEOUT_S = 5.0
_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    415: "UnsupportedMediaTypeError",
    503: "ServiceUnavailableError",
}


class VllmServer(LLMServer):
    """``LLMServer`` serving vLLM's own OpenAI app as its replica's ingress (see the module docstring)."""

    async def __init__(self, llm_config: LLMConfig, **kwargs: Any) -> None:
        load_secret_env()
        if llm_config.model_loading_config.model_source == TINY_MODEL_REF:
            loading = llm_config.model_loading_config.model_copy(
                update={"model_source": str(await asyncio.to_thread(tiny_model_path))}
            )
            llm_config = llm_config.model_copy(update={"model_loading_config": loading})
            # Serve LLM caches the engine config derived from the old source on first use.
            llm_config._engine_config = None
        await super().__init__(llm_config, **kwargs)

    async def __serve_build_asgi_app__(self) -> FastAPI:
        app: FastAPI = await super().__serve_build_asgi_app__()
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/health"]
        app.router.routes.append(Route("/health", self._health, methods=["GET"]))
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.add_middleware(JsonBodiesOnly)
        return app

    async def _health(self, request: Any) -> JSONResponse:
        """200 when the engine answers its health check, else 503 (OpenAI-shaped)."""
        try:
            async with asyncio.timeout(_HEALTH_TIMEOUT_S):
                await self.check_health()
        except Exception as error:  # noqa: BLE001 - any failure means "cannot serve"
            reason = "timed out" if isinstance(error, TimeoutError) else f"{type(error).__name__}: {error}"
            return error_response(503, f"The engine cannot serve: {reason}")
        return JSONResponse({"status": "ok"})


async def _validation_error(request: Any, error: RequestValidationError) -> JSONResponse:
    """400 naming the request field (``messages``, not vLLM's ``body.messages``), or saying the JSON is broken."""
    problem = error.errors()[0] if error.errors() else {"msg": "invalid request", "loc": ()}
    if problem.get("type") == "json_invalid":
        return error_response(400, f"The request body is not valid JSON: {problem.get('ctx', {}).get('error')}.")
    where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
    message = f"{problem.get('msg', 'invalid request')}" + (f" (at {where})" if where else "")
    return error_response(400, message, where or None)


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


class ReplicaCallback(CallbackBase):
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
    from ray.experimental.internal_kv import _internal_kv_get

    ref = os.environ.get(SECRET_REF_ENV)
    if not ref:
        return
    raw = _internal_kv_get(ref, namespace=SECRET_NAMESPACE)
    if raw is None:
        raise RuntimeError(f"The secrets of this model ({SECRET_REF_ENV}) are gone from the cluster's KV store.")
    os.environ.update(json.loads(raw))


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    """An OpenAI-shaped error body with ``status``."""
    kind = _ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status
    )
