"""The shared endpoint's router: a Serve app at ``/`` on the head node (see ``_internal/shared_endpoint``).

It answers what HAProxy's fast path leaves to it: ``GET /v1/models`` (every shared model and its
adapters, each model's own list), ``/health``, a model that is not there (OpenAI-shaped 404), a
request naming no model, and requests HAProxy could not route (a body beyond its buffer, a
cluster without rayvllm_nb's HAProxy), which it forwards to the model's own prefix through the
local Serve endpoint, streaming. Every second it makes HAProxy's routes map, and its hold list
(models that scale to zero), equal to the registry. It imports neither vLLM nor torch: it starts
in a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from typing import Any

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from rayvllm_nb._internal import registry, shared_endpoint
from rayvllm_nb._internal.openai_http import WRONG_KEY, authorized, error_response, expected_authorization

_ROUTES_TTL_S = 1.0
_HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade"}
_logger = logging.getLogger("ray.serve")


class SharedRouter:
    """Routes the shared endpoint's requests by their ``model`` (see the module docstring)."""

    async def __init__(self) -> None:  # type: ignore[misc]  # Serve awaits it
        endpoint = await asyncio.to_thread(registry.endpoint)
        host, port = (endpoint.host, endpoint.port) if endpoint is not None else ("127.0.0.1", 8000)
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "localhost") else host
        self._upstream = f"http://{host}:{port}"
        self._expected = expected_authorization(await asyncio.to_thread(registry.api_key))
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=64,
        ))
        self._routes: dict[str, str] = {}
        self._routes_read_at = 0.0
        self._syncing = asyncio.get_running_loop().create_task(self._keep_haproxy_in_sync())

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path.startswith(shared_endpoint.MODELS_ROOT + "/"):
            # A model's own prefix with no replica behind it yet (else HAProxy or Serve would have
            # routed it there): it is starting, or it just stopped.
            return error_response(503, "This model has no replica serving yet: it is starting. Retry soon.",
                                  retry_after=True)
        if path != "/health" and not authorized(request.headers.raw, self._expected):
            return error_response(401, WRONG_KEY)
        table = await self._current_routes()
        if path == "/health":
            return await self._health(table)
        if request.method == "GET" and path.rstrip("/") == "/v1/models":
            return await self._list_models(request, table)
        body = await request.body()
        name = _requested_model(body)
        if name is None and len(table) == 1:
            name = next(iter(table))
        if name is None:
            served = ", ".join(sorted(table)) or "none"
            return error_response(400, f"Name the model in the request's `model` (served here: {served}).", "model")
        prefix = table.get(name) or (await self._current_routes(fresh=True)).get(name)
        if prefix is None:
            return error_response(404, f"The model `{name}` does not exist.", "model")
        return await self._forward(request, prefix, body)

    async def _current_routes(self, *, fresh: bool = False) -> dict[str, str]:
        """The routes, read from the registry at most every second (``fresh``: now, e.g. for a name not
        seen yet: a model or adapter added since the last read is routed at once, not 404'd)."""
        if fresh or time.monotonic() - self._routes_read_at > _ROUTES_TTL_S:
            self._routes = await asyncio.to_thread(shared_endpoint.current_routes)
            self._routes_read_at = time.monotonic()
        return self._routes

    async def _forward(self, request: Request, prefix: str, body: bytes) -> Response:
        url = f"{self._upstream}{prefix}{request.url.path}"
        if request.url.query:
            url += f"?{request.url.query}"
        headers = [(key, value) for key, value in request.headers.items() if key.lower() not in _HOP_HEADERS]
        upstream = self._http.build_request(request.method, url, headers=headers, content=body)
        try:
            answer = await self._http.send(upstream, stream=True)
        except httpx.HTTPError as error:
            return error_response(503, f"The model could not be reached ({type(error).__name__}). Retry soon.",
                                  retry_after=True)
        kept = {key: value for key, value in answer.headers.items() if key.lower() not in _HOP_HEADERS}
        kept[shared_endpoint.VIA_HEADER] = "router"
        return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code, headers=kept,
                                 background=BackgroundTask(answer.aclose))

    async def _list_models(self, request: Request, table: dict[str, str]) -> Response:
        """Every shared model's own ``/v1/models`` (vLLM lists its adapters there, with their parent);
        a model scaled to zero is listed from the registry, not woken."""
        headers = {"authorization": request.headers["authorization"]} if "authorization" in request.headers else {}
        asleep = await asyncio.to_thread(shared_endpoint.asleep_cards)
        cards = [card for prefix in sorted(asleep) for card in asleep[prefix]]
        for answer in await self._ask_every_model(set(table.values()) - set(asleep), "/v1/models", headers):
            cards.extend(answer.json().get("data", []))
        return JSONResponse({"object": "list", "data": cards})

    async def _health(self, table: dict[str, str]) -> Response:
        """200 when some model of the shared endpoint answers its health check or waits scaled to zero
        (a request wakes it), else 503."""
        asleep = await asyncio.to_thread(shared_endpoint.asleep_cards)
        if asleep or await self._ask_every_model(set(table.values()), "/health", {}):
            return JSONResponse({"status": "ok"})
        return error_response(503, "No model of the shared endpoint can serve right now.", retry_after=True)

    async def _ask_every_model(self, prefixes: set[str], path: str, headers: dict[str, str]) -> list[httpx.Response]:
        """GET ``path`` under each model prefix at once; the answers that were 200."""
        answers = await asyncio.gather(
            *(self._http.get(f"{self._upstream}{prefix}{path}", headers=headers, timeout=5.0) for prefix in prefixes),
            return_exceptions=True,
        )
        return [answer for answer in answers if isinstance(answer, httpx.Response) and answer.status_code == 200]

    async def _keep_haproxy_in_sync(self) -> None:
        raylet = os.environ.get("RAY_RAYLET_PID", "")
        while True:
            try:
                table = await self._current_routes()
                held = await asyncio.to_thread(lambda: shared_endpoint.held_backends(registry.models()))
                await asyncio.to_thread(shared_endpoint.sync_haproxy, table, held, raylet)
            except Exception:  # HAProxy's map is an optimisation: the router serves meanwhile
                _logger.exception("Could not update HAProxy's routes map; requests go through the router.")
            await asyncio.sleep(_ROUTES_TTL_S)

    async def __del__(self) -> None:
        self._syncing.cancel()
        with contextlib.suppress(BaseException):
            await self._syncing
        await self._http.aclose()


def _requested_model(body: bytes) -> str | None:
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        payload = json.loads(body)
        if isinstance(payload, dict) and isinstance(payload.get("model"), str):
            return str(payload["model"])
    return None


def build_router_application() -> Any:
    """The router's Serve application: one replica, no CPU asked, on the head node (beside
    HAProxy, whose routes map it keeps, and Serve's HTTP endpoint, to which it forwards)."""
    from ray import serve

    deployment = serve.deployment(
        SharedRouter, name="SharedRouter", num_replicas=1, max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
        health_check_period_s=2.0,
    )
    return deployment.bind()
