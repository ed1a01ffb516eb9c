"""Every private Ray API rayvllm_nb uses, fenced in one module; checked against Ray 2.60.0.

Ray 2.60 has no public equivalent for what is here (its public API is used everywhere else:
``ray.init``, ``serve.start``/``delete``/``shutdown``, ``ray.serve.llm``, ``ray.util.state``).
Each function says what it wraps and what breaks if Ray changes it; the test suite exercises
every one of them against the pinned version (``ray[serve]==2.60.0``). Imports are lazy:
importing this module costs nothing, and a replica imports only what it calls.
"""

from __future__ import annotations

import json
from typing import Any

RAY_VERSION_CHECKED = "2.60.0"


def kv_put(key: str, value: str, namespace: str) -> None:
    """Store ``value`` in the cluster's KV store (GCS), visible to every process of the cluster.

    Wraps ``ray.experimental.internal_kv._internal_kv_put``; if it goes, deployment records and
    secrets cannot be shared between processes (status from a new shell sees no model).
    """
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, value, overwrite=True, namespace=namespace)


def kv_get(key: str, namespace: str) -> str | None:
    """The value stored under ``key``, or None (``_internal_kv_get``)."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(key, namespace=namespace)
    return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)


def kv_delete(key: str, namespace: str) -> None:
    """Remove ``key`` (``_internal_kv_del``; no error when absent)."""
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(key, namespace=namespace)


def kv_items(prefix: str, namespace: str) -> dict[str, str]:
    """Every key under ``prefix`` with its value, sorted by key (``_internal_kv_list`` + get)."""
    from ray.experimental.internal_kv import _internal_kv_list

    items = {}
    for raw_key in sorted(_internal_kv_list(prefix, namespace=namespace)):
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        value = kv_get(key, namespace)
        if value is not None:
            items[key] = value
    return items


def serve_details() -> dict[str, Any] | None:
    """Serve's own view of its apps, deployments, replicas and HTTP options as plain JSON data;
    None when Serve is not running.

    Wraps ``ray.serve.context._get_global_client().get_serve_details()`` (``serve.status()``
    is public but has neither replica actor ids nor the HTTP address); without it status,
    logs and readiness cannot see replicas.
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    return json.loads(json.dumps(client.get_serve_details(), default=lambda value: getattr(value, "value", str(value))))


def deploy_without_waiting(application: Any, name: str, route_prefix: str) -> None:
    """Deploy a Serve application and return at once (``serve._run(..., _blocking=False)``).

    The public ``serve.run`` waits until the app runs, which hides loading progress and the
    engine's own errors; if ``_run`` changes, deploying fails at once (every slow test deploys).
    """
    from ray import serve

    serve._run(application, _blocking=False, name=name, route_prefix=route_prefix)


def serve_llm_callback_base() -> type:
    """Serve LLM's callback base class (``ray.llm._internal.common.callbacks.base.CallbackBase``),
    which ``LLMConfig.callback_config`` requires; without it secrets would travel in runtime envs."""
    from ray.llm._internal.common.callbacks.base import CallbackBase

    return CallbackBase


def usage_stats_enabled() -> bool:
    """Whether Ray's usage stats are on for this process (``ray._common.usage.usage_lib.usage_stats_enabled``:
    ``RAY_USAGE_STATS_ENABLED`` or ``~/.ray/config.json``; heads rayvllm_nb starts turn them off)."""
    from ray._common.usage.usage_lib import usage_stats_enabled

    return bool(usage_stats_enabled())


async def start_serve_llm_engine_quietly(server: Any) -> None:
    """What Serve LLM's ``LLMServer._start_engine`` does (the hook ``engines/_replica`` overrides) but
    its usage telemetry: that starts a detached ``TelemetryAgent`` actor (400 MB, never stopped) and
    blocks the replica's event loop on it, even when usage stats are off. If Ray renames the hook,
    the override is skipped and the actor comes back (tests/engines/test_replica.py checks it does not)."""
    await server.engine.start()


def serve_llm_serving_models(engine: Any) -> Any:
    """vLLM's ``OpenAIServingModels`` inside a Serve LLM replica's engine (``VLLMEngine._oai_models``,
    the registry vLLM's HTTP handlers share, per Ray's own comment). Without it, LoRA adapters
    cannot be loaded at run time (the replica reports why for each one)."""
    serving_models = getattr(engine, "_oai_models", None)
    if serving_models is None:
        raise RuntimeError("Serve LLM's engine has no _oai_models here (Ray changed): adapters cannot be loaded")
    return serving_models


def gcs_addresses_on_this_machine() -> set[str]:
    """GCS addresses of Ray heads running on this machine (``ray._private.services.find_gcs_addresses``,
    a process scan, the one ``ray.init("auto")`` falls back to)."""
    from ray._private.services import find_gcs_addresses

    return set(find_gcs_addresses())


def node_ip_address() -> str:
    """The IP Ray uses for this machine (``ray._private.services.get_node_ip_address``)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def ensure_auth_token() -> None:
    """Create Ray's token file (``~/.ray/auth_token``) when no token is configured.

    Wraps ``generate_and_save_token`` and ``AuthenticationTokenLoader``; if they change, heads
    start without token authentication's token and drivers cannot connect.
    """
    from ray._private.authentication.authentication_token_setup import generate_and_save_token
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]  # compiled module, no types

    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        generate_and_save_token()


def send_local_token() -> None:
    """Make this driver send this machine's Ray token, as ``ray.init("auto")`` does by itself.

    Ray does it only for "auto"; an explicit local address or ``ray://127.0.0.1`` would otherwise
    fail against a token-protected head (``_enable_token_auth``, ``AUTH_MODE_ENV_VAR``).
    """
    import os

    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR, _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]  # compiled module, no types

    if AUTH_MODE_ENV_VAR not in os.environ and AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        _enable_token_auth()


def dashboard_url() -> str:
    """The HTTP address of the dashboard of the cluster this process is connected to, as its GCS
    publishes it (``ray.dashboard.utils.ray_address_to_api_server_url``)."""
    import ray
    from ray.dashboard.utils import ray_address_to_api_server_url

    return ray_address_to_api_server_url(ray.get_runtime_context().gcs_address)


def dashboard_auth_headers() -> dict[str, str]:
    """Headers that authenticate this process to the cluster's dashboard (its Ray token, when token
    authentication is on), as Ray's own state API sends them
    (``ray._private.authentication.http_token_authentication.get_auth_headers_if_auth_enabled``)."""
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    return dict(get_auth_headers_if_auth_enabled({}))


def session_logs_dir() -> str:
    """The logs folder of the Ray session this driver is connected to (``global_worker.node``)."""
    import ray

    return ray._private.worker.global_worker.node.get_logs_dir_path()


def ray_stop_process_filters() -> list[tuple[str, bool]]:
    """What ``ray stop`` kills: (keyword, match the process name rather than the command line)
    pairs (``ray.autoscaler._private.constants.RAY_PROCESSES``)."""
    from ray.autoscaler._private.constants import RAY_PROCESSES

    return [(keyword, bool(by_name)) for keyword, by_name in RAY_PROCESSES]


def validate_cluster_launcher_config(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's own ``ray up`` checks: defaults filled in (``prepare_config``), then its JSON schema
    (``validate_config``), both from ``ray.autoscaler._private.util``. Raises
    ``jsonschema.ValidationError`` or ``ValueError`` as Ray does."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared
