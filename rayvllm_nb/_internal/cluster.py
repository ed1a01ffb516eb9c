"""Connecting to Ray, or starting a detached local cluster that outlives its caller.

All functions here block; the backend calls them from a worker thread.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

from rayvllm_nb._internal.net import address_host, bind_error, free_port
from rayvllm_nb._internal.paths import log_dir
from rayvllm_nb.config import ClusterConfig
from rayvllm_nb.errors import ClusterError

ClusterMode = Literal["started-local", "existing-local", "remote"]
_RAY_CLI = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]


@dataclass(frozen=True)
class ClusterInfo:
    """The Ray cluster this process is connected to."""

    mode: ClusterMode
    address: str
    nodes: int
    resources: dict[str, float]
    dashboard_url: str | None

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


def connect(address: str | None, num_cpus: int | None, num_gpus: int | None, start_local: bool = True) -> ClusterInfo:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else a running local cluster, else start one
    (unless ``start_local`` is False)."""

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        dashboard = _init(address)
        return _describe("existing-local" if _is_this_machine(address) else "remote", address, dashboard)
    # "auto" (not the address itself) lets Ray pick up the local token of a head
    # started with token authentication, Ray's default for `ray start`.
    running = local_head_address()
    if running:
        return _describe("existing-local", running, _init("auto"))
    if not start_local:
        raise ClusterError(
            "No Ray cluster is running on this machine and no address was given. Start one with "
            "`rayvllm serve CONFIG` or `ray start --head`, or pass --address / set RAY_ADDRESS."
        )
    started = start_local_cluster(num_cpus=num_cpus, num_gpus=num_gpus)
    return _describe("started-local", started, _init("auto"))


def start_local_cluster(num_cpus: int | None, num_gpus: int | None) -> str:
    """A head with the defaults of an embedded cluster: all cores (or ``num_cpus``), no GPUs
    unless asked, the first free GCS port from 6379; returns its GCS address."""
    config = ClusterConfig(num_cpus=num_cpus if num_cpus is not None else os.cpu_count() or 1, num_gpus=num_gpus or 0)
    return start_head(config.model_copy(update={"port": free_port("127.0.0.1", config.port)}))


def check_can_start(config: ClusterConfig) -> None:
    """Raise ClusterError before any process starts if this machine cannot host the head."""
    running = local_head_address()
    if running:
        raise ClusterError(
            f"A Ray head already runs on this machine at {running}. Use it (`rayvllm cluster get-address`), "
            "or stop it first with `rayvllm cluster stop`."
        )
    for key, port in config.listening_ports().items():
        host = config.dashboard_host if key == "dashboard_port" else "0.0.0.0"
        if problem := bind_error(host, port):
            raise ClusterError(
                f"Port {port} ({key}) on {host} is already in use ({problem}), so the head cannot "
                f"listen there. Stop the program using it, or pick another port (e.g. `--set {key}={port + 1}`)."
            )


def start_head(config: ClusterConfig) -> str:
    """``ray start --head`` with ``config``, its output in a log file; returns the GCS address.

    The daemons outlive the caller (detached, in their own session, output in a file).
    """
    check_can_start(config)
    log_file = log_dir() / f"ray-start-{time.strftime('%Y%m%d-%H%M%S')}.log"
    # The user's own RAY_SERVE_* settings win over the direct-ingress defaults.
    env = {
        **(_DIRECT_INGRESS_ENV if config.serve_direct_ingress else {}), **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token" if config.token_auth else "disabled",
    }
    if config.token_auth:
        ensure_auth_token()
    with open(log_file, "ab") as log:
        # A new session keeps the daemons out of the caller's process group (Ctrl-C in a
        # notebook must not kill the cluster) and away from its stdout.
        result = subprocess.run(
            [*_RAY_CLI, "start", "--head", *head_arguments(config)], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, timeout=180, env=env,
        )
    if result.returncode != 0:
        raise ClusterError(
            f"Starting a local Ray head failed (exit {result.returncode}); its output is in {log_file}. "
            "Fix what it reports, or start one yourself with `ray start --head` and retry."
        )
    address = local_head_address()
    if address is None:
        raise ClusterError(f"`ray start` reported success but no head answers; see {log_file}.")
    return address


_DIRECT_INGRESS_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # One HAProxy thread forwards thousands of streams; the default 4 compete with vLLM for cores.
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
    # Per-request metrics are parsed in Python by Serve's HAProxy manager: off unless asked.
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    # A stopped replica leaves HAProxy's pool after 1 s instead of 30 s (stop_model waits for it).
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}
"""Environment of a head started with ``serve_direct_ingress`` (Serve reads it in every process)."""


def head_arguments(config: ClusterConfig) -> list[str]:
    """``ray start --head`` flags for ``config``."""
    arguments = [
        f"--port={config.port}",
        f"--ray-client-server-port={config.ray_client_server_port}",
        f"--min-worker-port={config.min_worker_port}",
        f"--max-worker-port={config.max_worker_port}",
        f"--include-dashboard={str(config.dashboard).lower()}",
        "--disable-usage-stats",
    ]
    if config.dashboard:
        arguments += [f"--dashboard-host={config.dashboard_host}", f"--dashboard-port={config.dashboard_port}"]
    if config.node_ip_address:
        arguments.append(f"--node-ip-address={config.node_ip_address}")
    if config.num_cpus is not None:
        arguments.append(f"--num-cpus={config.num_cpus}")
    if config.num_gpus is not None:
        arguments.append(f"--num-gpus={config.num_gpus}")
    if config.object_store_memory_gb is not None:
        arguments.append(f"--object-store-memory={int(config.object_store_memory_gb * 2**30)}")
    if config.resources:
        arguments.append(f"--resources={json.dumps(config.resources)}")
    return arguments


def stop_local_cluster() -> list[str]:
    """``ray stop`` for the local cluster, then end what Ray does not know it started;
    returns a description of each process that was running (empty when none was).

    vLLM's engine-core and worker processes are children of Serve replicas, and Serve's
    HAProxy is started by an actor, but none is a Ray worker: ``ray stop`` would leave them
    running, orphaned (HAProxy keeping the Serve port).
    """
    import psutil

    ray_processes, leftovers = [], []
    for process in psutil.process_iter(["name", "cmdline", "pid"]):
        try:
            kind = _ray_process_kind(process.info["name"] or "", process.info["cmdline"] or [])
            if kind is None:
                continue
            ray_processes.append(f"{kind} (pid {process.info['pid']})")
            if kind == "raylet":
                leftovers += process.children(recursive=True)
            elif kind == _SERVE_HAPROXY:
                leftovers.append(process)
        except psutil.Error:
            continue
    with open(log_dir() / "ray-stop.log", "ab") as log:
        subprocess.run(
            [*_RAY_CLI, "stop", "--force"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, timeout=120, check=False,
        )
    for process in leftovers:
        try:
            process.kill()
        except psutil.Error:
            continue
    return ray_processes


_RAY_DAEMONS = {
    "dashboard/dashboard.py": "dashboard",
    "dashboard/agent.py": "dashboard agent",
    "runtime_env/agent/main.py": "runtime env agent",
    "ray.util.client.server": "Ray Client server",
    "_private/log_monitor.py": "log_monitor",
    "autoscaler/_private/monitor.py": "monitor",
}


_SERVE_HAPROXY = "Serve HAProxy"


def _ray_process_kind(name: str, cmdline: list[str]) -> str | None:
    """Which Ray daemon or worker a process is, from its name and command line."""
    if name in ("gcs_server", "raylet"):
        return name
    if name == "haproxy" and any("/haproxy-serve/" in part for part in cmdline):
        return _SERVE_HAPROXY
    if name.startswith("ray::"):
        return "worker " + name
    if cmdline and cmdline[0].startswith("ray-dashboard-"):
        return "dashboard module " + cmdline[0].split(" ", 1)[0].removeprefix("ray-dashboard-")
    joined = " ".join(cmdline[:3])
    return next((kind for marker, kind in _RAY_DAEMONS.items() if marker in joined), None)


def running_client_server_port() -> int:
    """The port of the Ray Client server on this machine, read from its command line."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(part.endswith(("ray.util.client.server", "util/client/server.py")) for part in cmdline[:4]):
            for part in cmdline:
                if part.startswith("--port="):
                    return int(part.removeprefix("--port="))
    raise ClusterError(
        "No Ray Client server runs on this machine (a head started by `rayvllm cluster start` runs one). "
        "Use the GCS address from `rayvllm cluster get-address` instead."
    )


def running_head_address() -> str:
    """The GCS address of the Ray head running on this machine; ClusterError when none runs."""
    address = local_head_address()
    if address is None:
        raise ClusterError(
            "No Ray head runs on this machine. Start one with `rayvllm cluster start --config "
            "configs/cluster/local_cpu.yaml` (or `ray start --head`), or pass the remote cluster's address."
        )
    return address


@dataclass(frozen=True)
class NodeReport:
    """One node as Ray sees it."""

    node_id: str
    address: str
    alive: bool
    is_head: bool
    resources: dict[str, float]


@dataclass(frozen=True)
class ClusterReport:
    """Nodes, resources (total and free) and Serve applications of a cluster."""

    address: str
    nodes: list[NodeReport]
    total: dict[str, float]
    available: dict[str, float]
    serve_apps: dict[str, str]

    def __str__(self) -> str:
        alive = [node for node in self.nodes if node.alive]
        lines = [f"Ray cluster {self.address}: {len(alive)} node(s) alive"]
        for node in self.nodes:
            role = "head" if node.is_head else "worker"
            state = "alive" if node.alive else "dead"
            resources = _format_resources(node.resources)
            lines.append(f"  {node.node_id[:12]}  {node.address:<15} {role:<6} {state:<5} {resources}")
        lines.append("Resources (free / total):")
        for key in sorted(self.total):
            lines.append(f"  {key:<22} {_amount(key, self.available.get(key, 0.0))} / {_amount(key, self.total[key])}")
        if self.serve_apps:
            lines.append("Serve applications:")
            lines += [f"  {name}: {state}" for name, state in sorted(self.serve_apps.items())]
        else:
            lines.append("Serve applications: none")
        return "\n".join(lines)


def describe_cluster(address: str) -> ClusterReport:
    """What runs on the cluster this process is connected to (``address`` is for display)."""
    import ray
    from ray.serve.context import _get_global_client

    nodes = [
        NodeReport(
            node_id=node["NodeID"],
            address=node["NodeManagerAddress"],
            alive=node["Alive"],
            is_head="node:__internal_head__" in node["Resources"],
            resources=_user_resources(node["Resources"]),
        )
        for node in ray.nodes()
    ]
    client = _get_global_client(raise_if_no_controller_running=False)
    apps = client.get_serve_details().get("applications", {}) if client is not None else {}
    return ClusterReport(
        address=address,
        nodes=nodes,
        total=_user_resources(ray.cluster_resources()),
        available=_user_resources(ray.available_resources()),
        serve_apps={name: str(getattr(app["status"], "value", app["status"])) for name, app in apps.items()},
    )


def _user_resources(resources: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in resources.items() if not key.startswith("node:")}


def _amount(key: str, value: float) -> str:
    return f"{value / 2**30:.2f} GiB" if key in ("memory", "object_store_memory") else f"{value:g}"


def _format_resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{key} {_amount(key, value)}" for key, value in sorted(resources.items()))


def cluster_resources() -> tuple[dict[str, float], int]:
    """Total resources of the cluster, and the CPUs of its largest alive node."""
    import ray

    node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]]
    return dict(ray.cluster_resources()), max(node_cpus, default=0)


def _init(address: str) -> str | None:
    """``ray.init`` for a driver that prints nothing into cells; returns the dashboard's URL."""
    import ray

    if address != "auto" and _is_this_machine(address):
        _use_local_token()
    try:
        context = _ray_init(address)
        import ray.serve  # noqa: F401  (its import sets the driver's Serve logger to INFO)

        # Serve's driver-side INFO lines (deployment option dumps) are noise in a notebook cell.
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ClusterError(
            f"Could not connect to Ray at {address!r}: {str(error).splitlines()[0]}. Check that the cluster "
            "runs (`ray status`) and that the address is its GCS address (host:port) or a Ray Client "
            "address (ray://host:10001); a cluster with token authentication also needs RAY_AUTH_MODE=token "
            "and its token (RAY_AUTH_TOKEN or ~/.ray/auth_token)."
        ) from None
    return getattr(context, "dashboard_url", None) or None


def _ray_init(address: str) -> Any:
    """``ray.init`` with replica logs kept out of the driver (they go to files and get_logs()).

    A Ray Client server sometimes fails to start the per-client server of a connection
    ("Initialization failure from server"); the next connection works, so one retry.
    """
    import ray

    attempts = 2 if address.startswith("ray://") else 1
    for attempt in range(attempts):
        try:
            return ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except ConnectionError as error:
            if attempt + 1 == attempts or "Initialization failure" not in str(error):
                raise
            ray.shutdown()
    raise AssertionError("unreachable")


def ensure_auth_token() -> None:
    """Create Ray's token file (~/.ray/auth_token) when no token is configured."""
    from ray._private.authentication.authentication_token_setup import generate_and_save_token
    from ray._raylet import AuthenticationTokenLoader

    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        generate_and_save_token()


def _use_local_token() -> None:
    """Send this machine's Ray token, as ``ray.init("auto")`` does, to a head on this machine.

    Ray only does it for "auto"; an explicit local address or ray://127.0.0.1 would
    otherwise fail against a token-protected head. Remote heads never get the local token.
    """
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR, _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader

    if AUTH_MODE_ENV_VAR not in os.environ and AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        _enable_token_auth()


def _describe(mode: ClusterMode, address: str, dashboard: str | None) -> ClusterInfo:
    import ray

    nodes = [node for node in ray.nodes() if node["Alive"]]
    return ClusterInfo(
        mode=mode,
        address=address,
        nodes=len(nodes),
        resources={k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")},
        dashboard_url=(dashboard if "://" in dashboard else f"http://{dashboard}") if dashboard else None,
    )


def local_head_address() -> str | None:
    """The GCS address of a live head that `ray start` left on this machine, if any."""
    from ray._private.services import find_gcs_addresses

    for address in sorted(find_gcs_addresses()):
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return address
        except OSError:
            continue
    return None


def _is_this_machine(address: str) -> bool:
    from ray._private.services import get_node_ip_address

    return address_host(address) in ("127.0.0.1", "localhost", get_node_ip_address())

