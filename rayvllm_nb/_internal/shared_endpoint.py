"""The shared endpoint: one OpenAI base URL (``http://HOST:PORT/v1``) for every model started
without a ``route_prefix``, routed by the request's ``model``.

Each such model still is a Serve app of its own, at a prefix of its own under ``MODELS_ROOT``;
a router app at ``/`` (``engines/_router``) lists the models, answers unknown names with an
OpenAI-shaped 404 and forwards what it receives to the model's prefix. On heads rayvllm_nb
starts, HAProxy sends most requests to the model's prefix itself (``serve_haproxy``), reading
the name from the body through a routes map that the router keeps equal to the registry
(``sync_haproxy``): no Python process in between, so the shared URL costs the direct path
nothing measurable (docs/performance.md). The router also keeps HAProxy's hold list: the models
that scale to zero, whose requests must wait for a replica instead of a fast 503 (so it also runs
for such a model with a ``route_prefix`` of its own).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil

from rayvllm_nb._internal import cpu_placement, registry, serve_haproxy

ROUTER_APP = "rayvllm-nb-router"
"""The Serve app of the shared endpoint's router (at ``/``)."""
MODELS_ROOT = "/rayvllm-nb/models"
"""Under this, each shared model's own prefix."""
VIA_HEADER = "x-rayvllm-nb-via"
"""Set to ``router`` on answers the router forwarded (HAProxy's fast path sets nothing)."""
_MAP_KEY = re.compile(r"^\S+$")


def model_prefix(app_name: str) -> str:
    """The own prefix of the shared model whose Serve app is ``app_name``."""
    return f"{MODELS_ROOT}/{app_name}"


def is_shared(record: registry.DeploymentRecord) -> bool:
    """Whether the model serves at the shared endpoint (started without a ``route_prefix``)."""
    return record.config.get("route_prefix") is None


def scales_to_zero(record: registry.DeploymentRecord) -> bool:
    """Whether the model gives up its last replica when idle (``autoscaling.min_replicas: 0``)."""
    autoscaling = record.config.get("autoscaling") or {}
    return autoscaling.get("min_replicas") == 0


def needs_router(record: registry.DeploymentRecord) -> bool:
    """Whether the router must run for this model: it routes the shared endpoint, and it keeps the
    HAProxy hold list that lets a request wake a model scaled to zero."""
    return is_shared(record) or scales_to_zero(record)


def held_backends(records: Iterable[registry.DeploymentRecord]) -> frozenset[str]:
    """The HAProxy backends that keep Serve's holding fallback: those of models that scale to zero."""
    return frozenset(serve_haproxy.backend_name(record.app_name) for record in records if scales_to_zero(record))


def asleep_cards() -> dict[str, list[dict[str, Any]]]:
    """OpenAI model cards of the shared models scaled to zero now (no live replica), by their prefix, as
    vLLM lists them (the model, then its adapters with their ``parent``): listing must not wake a model."""
    cards: dict[str, list[dict[str, Any]]] = {}
    for record in registry.models():
        if not (is_shared(record) and scales_to_zero(record)):
            continue
        if any(not replica.ended for replica in registry.replicas(record.name)):
            continue
        card = {"object": "model", "created": int(record.started_at), "owned_by": "vllm"}
        cards[record.route_prefix] = [
            {"id": record.name, **card, "root": record.config["model"], "parent": None},
            *({"id": name, **card, "root": path, "parent": record.name}
              for name, path in registry.adapters(record.name).items()),
        ]
    return cards


def routes(records: Iterable[registry.DeploymentRecord], adapter_owners: Mapping[str, str]) -> dict[str, str]:
    """Served name -> own prefix, for every model at the shared endpoint and each of its LoRA
    adapters (``adapter_owners``: adapter name -> model name)."""
    table = {record.name: record.route_prefix for record in records if is_shared(record)}
    table.update({name: table[owner] for name, owner in adapter_owners.items() if owner in table})
    return table


def current_routes() -> dict[str, str]:
    """:func:`routes` of what the registry holds now."""
    return routes(registry.models(), registry.all_adapters())


def map_text(table: Mapping[str, str]) -> str:
    """The routes map HAProxy reads (names HAProxy cannot key on, e.g. with spaces, go through the router)."""
    return "".join(f"{name} {prefix}\n" for name, prefix in sorted(table.items()) if _MAP_KEY.match(name))


def sync_haproxy(table: Mapping[str, str], held: frozenset[str], raylet_pid: str) -> list[Path]:
    """Make the routes map of this node's rayvllm_nb-patched HAProxy equal ``table``: the file (read on
    every HAProxy reload) and the running process (through its admin socket); and its hold list
    ``held`` (read on every reload: Serve reloads HAProxy whenever a model's replicas change, so
    before a model scales to zero). Returns the maps updated; none on a node without such a HAProxy
    (requests then all go through the router)."""
    text = map_text(table)
    updated = []
    for config in _haproxy_configs(raylet_pid):
        routes_file = serve_haproxy.routes_map(config)
        with contextlib.suppress(OSError):
            config_text = config.read_text()
            if str(routes_file) not in config_text:
                continue
            _write_if_changed(serve_haproxy.hold_list(config), "".join(f"{name}\n" for name in sorted(held)))
            if not _write_if_changed(routes_file, text):
                continue
            admin = re.search(r"^\s*stats socket (\S+)", config_text, re.MULTILINE)
            if admin is not None:
                _send(admin.group(1), _replace_map_commands(routes_file, text))
            updated.append(routes_file)
    return updated


def _write_if_changed(path: Path, text: str) -> bool:
    """Replace the file at ``path`` with ``text`` at once (HAProxy may read it any time) unless it holds it."""
    if path.exists() and path.read_text() == text:
        return False
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(path)
    return True


def _replace_map_commands(routes_file: Path, text: str) -> str:
    """HAProxy runtime API commands that make the loaded map equal ``text`` (one line, run in order)."""
    commands = [f"clear map {routes_file}"]
    commands += [f"add map {routes_file} {line}" for line in text.splitlines()]
    return "; ".join(commands) + "\n"


def _send(socket_path: str, command: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as admin:
        admin.settimeout(5.0)
        admin.connect(socket_path)
        admin.sendall(command.encode())
        answer = b""
        while chunk := admin.recv(65536):
            answer += chunk
    return answer.decode(errors="replace")


def _haproxy_configs(raylet_pid: str) -> set[Path]:
    """The config files of the HAProxy processes Serve runs for this node (its raylet's pid)."""
    configs = set()
    for process in cpu_placement.serve_ingress_processes(raylet_pid):
        with contextlib.suppress(psutil.Error):
            if process.name() != "haproxy":
                continue  # the actor that starts HAProxy
            for flag, value in itertools.pairwise(process.cmdline()):
                if flag == "-f" and os.path.isfile(value):
                    configs.add(Path(value))
    return configs
