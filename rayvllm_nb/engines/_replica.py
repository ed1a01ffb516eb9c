"""Code that runs inside the Serve replicas of the ``serve-llm`` engine.

- ``VllmServer`` and ``SecretsCallback``: the model's secrets (the HF token) live in the
  cluster's KV store. The server puts them in its own environment before vLLM starts;
  the callback keeps them out of the runtime env of Serve LLM's download tasks and loads
  them inside those tasks instead. Tokens thus never travel in a runtime env, which
  Serve's app config, ``serve status``, ``ray list actors --detail`` and the runtime-env
  agent's log would all show.
- ``OpenAIIngress``: Serve LLM's OpenAI ingress plus ``GET /health`` and error bodies in
  OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with the right status.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, OpenAiIngress
from ray.llm._internal.serve.core.ingress.ingress import init as _serve_llm_fastapi
from ray.llm._internal.serve.core.server.llm_server import LLMServer
from ray.serve.llm import LLMConfig
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from rayvllm_nb.engines.serve_llm import SECRET_ENV_NAMES, SECRET_NAMESPACE, SECRET_REF_ENV
from rayvllm_nb.tiny_model import TINY_MODEL_REF, tiny_model_path

_HEALTH_TIMEOUT_S = 5.0
_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    415: "UnsupportedMediaTypeError",
    422: "BadRequestError",
    503: "ServiceUnavailableError",
}


class VllmServer(LLMServer):
    """``LLMServer`` that loads the model's secrets into its environment before vLLM starts,
    and builds the embedded tiny model on the replica's own node (a driver's path means
    nothing on a remote cluster)."""

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


class SecretsCallback(CallbackBase):
    """Serve LLM callback: download tasks fetch the secrets themselves, not via their runtime env."""

    async def on_before_node_init(self) -> None:
        env_vars = (self.ctx.runtime_env or {}).get("env_vars") or {}
        for name in SECRET_ENV_NAMES:
            env_vars.pop(name, None)

    def on_before_download_model_files_distributed(self) -> None:
        load_secret_env()


def load_secret_env() -> None:
    """Put the model's secrets (named by ``RAYVLLM_NB_SECRET_REF``) into ``os.environ``."""
    import json

    from ray.experimental.internal_kv import _internal_kv_get

    ref = os.environ.get(SECRET_REF_ENV)
    if not ref:
        return
    raw = _internal_kv_get(ref, namespace=SECRET_NAMESPACE)
    if raw is None:
        raise RuntimeError(f"The secrets of this model ({SECRET_REF_ENV}) are gone from the cluster's KV store.")
    os.environ.update(json.loads(raw))


class OpenAIIngress(OpenAiIngress):
    """Serve LLM's OpenAI ingress with a health route."""

    async def health(self) -> JSONResponse:
        """200 when every engine answers its health check, else 503 (OpenAI-shaped)."""
        try:
            async with asyncio.timeout(_HEALTH_TIMEOUT_S):
                await asyncio.gather(*(h.check_health.remote() for h in self._default_serve_handles.values()))
        except Exception as error:  # noqa: BLE001 - any failure means "cannot serve"
            reason = "timed out" if isinstance(error, TimeoutError) else f"{type(error).__name__}: {error}"
            return error_response(503, f"The engine cannot serve: {reason}")
        return JSONResponse({"status": "ok"})


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    """An OpenAI-shaped error body with ``status``."""
    kind = _ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status
    )


def make_fastapi_app() -> FastAPI:
    """Serve LLM's FastAPI app (middleware, metrics) with OpenAI-shaped errors everywhere."""
    app = _serve_llm_fastapi()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(OpenAIHTTPException)
    async def _engine_error(request: Request, error: OpenAIHTTPException) -> JSONResponse:
        param = re.search(r"\(parameter=(\w+)", error.message)
        message = re.sub(r"^Message: ", "", error.message).split(" (Request ID:")[0]
        return error_response(error.status_code, message, param.group(1) if param else None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problem = error.errors()[0] if error.errors() else {"msg": "invalid request", "loc": ()}
        if problem.get("type") == "json_invalid":
            return error_response(400, f"The request body is not valid JSON: {problem.get('ctx', {}).get('error')}.")
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
        message = f"{problem.get('msg', 'invalid request')}" + (f" (at {where})" if where else "")
        return error_response(400, message, where or None)

    @app.middleware("http")
    async def _json_only(request: Request, call_next: Any) -> Any:
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and not content_type.split(";")[0].strip().endswith("json"):
            return error_response(415, f"Content-Type must be application/json, got {content_type or 'none'!r}.")
        return await call_next(request)

    return app


ENDPOINTS = {**DEFAULT_ENDPOINTS, "health": lambda app: app.get("/health")}
