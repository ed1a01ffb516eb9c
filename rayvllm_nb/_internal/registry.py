"""The cluster-wide registry of rayvllm_nb's deployments, kept in Ray's KV store (the GCS).

Serve is the source of truth for what runs; the registry adds what Serve does not keep, so that
any process connected to the cluster (a CLI call, a second notebook) sees the same thing:

- ``model:<name>``: each model's public config (never a secret), endpoint and placement;
- ``replica:<name>:<replica id>``: what each engine replica reported about itself (node, vLLM
  version, the KV cache it chose) and how it ended (stopped, or crashed with a cause);
- ``adapter:<model>:<name>``: the LoRA adapters each model's replicas load (name -> path);
- ``endpoint``: the Serve endpoint's settings (whether it requires an API key).

Secrets live in a namespace of their own and are read only where they are used: a model's HF
token (``model:<name>``) by its replicas, the endpoint's API key (``endpoint:api_key``) by the
replicas and by the clients rayvllm_nb builds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from rayvllm_nb._internal import ray_api

NAMESPACE = "rayvllm_nb"
SECRET_NAMESPACE = "rayvllm_nb_secrets"
_MODEL = "model:"
_REPLICA = "replica:"
_ADAPTER = "adapter:"
_ENDPOINT = "endpoint"
_API_KEY = "endpoint:api_key"
RESTART_WINDOW_S = 600.0
"""Crashes older than this do not count toward a model's ``max_restarts``."""


@dataclass(frozen=True)
class DeploymentRecord:
    """What the registry keeps per model: public config, where it serves, and a terminal failure."""

    name: str
    app_name: str
    engine_deployment: str
    base_url: str
    device: str
    bundles: list[dict[str, float]]
    config: dict[str, Any]
    started_at: float
    route_prefix: str = ""
    """The prefix of the model's own Serve app (its ``route_prefix``, or one under the shared endpoint's)."""
    failure: str = ""
    """Set when rayvllm_nb stopped the model after it kept crashing: why."""


@dataclass(frozen=True)
class ReplicaRecord:
    """One engine replica, written by the replica itself when its engine is up, then when it ends."""

    replica_id: str
    actor_id: str
    node_ip: str
    pid: int
    started_at: float
    vllm_version: str
    kv_cache_bytes: int | None
    kv_cache_choice: str
    cpu_placement: str = ""
    """Where its CPU engine's processes were pinned (empty on GPU or when pinning is off)."""
    metrics_port: int = 0
    """The loopback port on its node where it serves its Prometheus registry (vLLM's metrics)."""
    adapters: dict[str, str] = field(default_factory=dict)
    """The LoRA adapters it was asked to load: name -> "" once loaded, else vLLM's error."""
    ended: str = ""
    """"" while running; "stopped" (by Serve: stop, replace, scale-down) or "crashed"."""
    cause: str = ""
    ended_at: float | None = None


def put_model(record: DeploymentRecord) -> None:
    """Register (or replace) a model's record."""
    ray_api.kv_put(_MODEL + record.name, json.dumps(asdict(record)), NAMESPACE)


def models() -> list[DeploymentRecord]:
    """Every registered model, by name."""
    return [DeploymentRecord(**json.loads(raw)) for raw in ray_api.kv_items(_MODEL, NAMESPACE).values()]


def model(name: str) -> DeploymentRecord | None:
    """The record of ``name``, or None."""
    raw = ray_api.kv_get(_MODEL + name, NAMESPACE)
    return None if raw is None else DeploymentRecord(**json.loads(raw))


def mark_failed(name: str, failure: str) -> None:
    """Record that ``name`` was stopped after crashing too often (status shows it until it is stopped)."""
    record = model(name)
    if record is not None:
        put_model(replace(record, failure=failure))


def forget_model(name: str) -> None:
    """Remove a model's record and every replica and adapter record of it."""
    ray_api.kv_delete(_MODEL + name, NAMESPACE)
    for prefix in (_REPLICA, _ADAPTER):
        for key in ray_api.kv_items(f"{prefix}{name}:", NAMESPACE):
            ray_api.kv_delete(key, NAMESPACE)


def put_adapter(model_name: str, name: str, path: str) -> None:
    """Ask every replica of ``model_name`` (and those started later) to serve the LoRA adapter ``name``."""
    ray_api.kv_put(f"{_ADAPTER}{model_name}:{name}", path, NAMESPACE)


def forget_adapter(model_name: str, name: str) -> None:
    """Ask the replicas of ``model_name`` to unload ``name``."""
    ray_api.kv_delete(f"{_ADAPTER}{model_name}:{name}", NAMESPACE)


def adapters(model_name: str) -> dict[str, str]:
    """The LoRA adapters ``model_name``'s replicas serve: name -> path (folder or HF id)."""
    prefix = f"{_ADAPTER}{model_name}:"
    return {key.removeprefix(prefix): value for key, value in ray_api.kv_items(prefix, NAMESPACE).items()}


def all_adapters() -> dict[str, str]:
    """Every registered adapter's name -> the model it belongs to."""
    owners = {}
    for key in ray_api.kv_items(_ADAPTER, NAMESPACE):
        model_name, _, name = key.removeprefix(_ADAPTER).rpartition(":")
        owners[name] = model_name
    return owners


def put_replica(model_name: str, record: ReplicaRecord) -> None:
    """Register (or update) what a replica reports about itself."""
    ray_api.kv_put(f"{_REPLICA}{model_name}:{record.replica_id}", json.dumps(asdict(record)), NAMESPACE)


def replicas(model_name: str) -> list[ReplicaRecord]:
    """Every replica record of ``model_name``, oldest first."""
    stored = ray_api.kv_items(f"{_REPLICA}{model_name}:", NAMESPACE).values()
    records = [ReplicaRecord(**json.loads(raw)) for raw in stored]
    return sorted(records, key=lambda record: record.started_at)


def end_replica(model_name: str, replica_id: str, how: str, cause: str = "") -> None:
    """Mark a replica as ended ("stopped" or "crashed"); the first mark wins."""
    raw = ray_api.kv_get(f"{_REPLICA}{model_name}:{replica_id}", NAMESPACE)
    if raw is None:
        return
    record = ReplicaRecord(**json.loads(raw))
    if not record.ended:
        put_replica(model_name, replace(record, ended=how, cause=cause, ended_at=time.time()))


def set_replica_adapters(model_name: str, replica_id: str, adapters: dict[str, str]) -> None:
    """Record which LoRA adapters a replica serves now (name -> "" or the error that kept it out)."""
    raw = ray_api.kv_get(f"{_REPLICA}{model_name}:{replica_id}", NAMESPACE)
    if raw is not None:
        put_replica(model_name, replace(ReplicaRecord(**json.loads(raw)), adapters=adapters))


def set_cause(model_name: str, replica_id: str, cause: str) -> None:
    """Give an ended replica a better cause (its own log's words, found after it was marked)."""
    raw = ray_api.kv_get(f"{_REPLICA}{model_name}:{replica_id}", NAMESPACE)
    if raw is not None:
        put_replica(model_name, replace(ReplicaRecord(**json.loads(raw)), cause=cause))


@dataclass(frozen=True)
class Crashes:
    """The crashes of a model's replicas: replicas that crashed, or whose process vanished."""

    count: int
    recent: int
    """Crashes within the window the restart limit counts."""
    last_cause: str
    vanished: list[ReplicaRecord] = field(default_factory=list)


def crashes(
    records: Iterable[ReplicaRecord], live_actor_ids: Iterable[str], window_s: float = RESTART_WINDOW_S
) -> Crashes:
    """Count crashes: replicas marked "crashed", and replicas gone from Serve without a mark
    (their process was killed outright). ``live_actor_ids`` are the actors Serve still runs."""
    live = set(live_actor_ids)
    now = time.time()
    crashed = [r for r in records if r.ended == "crashed" or (not r.ended and r.actor_id not in live)]
    vanished = [r for r in crashed if not r.ended]
    recent = [r for r in crashed if now - (r.ended_at or now) <= window_s]
    last = max(crashed, key=lambda r: r.ended_at or r.started_at, default=None)
    cause = ""
    if last is not None:
        cause = last.cause or f"the replica's process ended without an error (pid {last.pid} on {last.node_ip})"
    return Crashes(count=len(crashed), recent=len(recent), last_cause=cause, vanished=vanished)


@dataclass(frozen=True)
class EndpointRecord:
    """The Serve endpoint as rayvllm_nb started it: fixed until Serve stops."""

    host: str
    port: int
    requires_api_key: bool


def put_endpoint(record: EndpointRecord, api_key: str | None) -> None:
    """Register the endpoint Serve was just started with, and its API key (or none)."""
    ray_api.kv_put(_ENDPOINT, json.dumps(asdict(record)), NAMESPACE)
    if api_key:
        ray_api.kv_put(_API_KEY, api_key, SECRET_NAMESPACE)
    else:
        ray_api.kv_delete(_API_KEY, SECRET_NAMESPACE)


def endpoint() -> EndpointRecord | None:
    """The registered endpoint, or None (Serve not started by rayvllm_nb)."""
    raw = ray_api.kv_get(_ENDPOINT, NAMESPACE)
    return None if raw is None else EndpointRecord(**json.loads(raw))


def api_key() -> str | None:
    """The endpoint's API key (a secret: for clients and replicas, never to show)."""
    return ray_api.kv_get(_API_KEY, SECRET_NAMESPACE)


def forget_endpoint() -> None:
    """Remove the endpoint's record and key (Serve stopped)."""
    ray_api.kv_delete(_ENDPOINT, NAMESPACE)
    ray_api.kv_delete(_API_KEY, SECRET_NAMESPACE)


def put_model_secrets(name: str, environment: dict[str, str]) -> str:
    """Keep a model's secret environment (its HF token) for its replicas; returns the key they read."""
    key = _MODEL + name
    ray_api.kv_put(key, json.dumps(environment), SECRET_NAMESPACE)
    return key


def model_secrets(key: str) -> dict[str, str] | None:
    """The secret environment stored under ``key`` (None when it is gone)."""
    raw = ray_api.kv_get(key, SECRET_NAMESPACE)
    return None if raw is None else json.loads(raw)


def forget_model_secrets(name: str) -> None:
    """Remove a model's secrets (it stopped)."""
    ray_api.kv_delete(_MODEL + name, SECRET_NAMESPACE)
