"""Connecting to Ray, or starting a detached local cluster that outlives its caller.

All functions here block; the backend calls them from a worker thread.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rayvllm_nb._internal.paths import cache_root
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
    def is_local(self) -> bool:
        """True when the cluster's head runs on this machine."""
        return self.mode != "remote"


def connect(address: str | None, num_cpus: int | None, num_gpus: int | None, start_local: bool = True) -> ClusterInfo:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else a running local cluster, else start one
    (unless ``start_local`` is False)."""

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _init(address)
        return _describe("existing-local" if _is_this_machine(address) else "remote", address)
    # "auto" (not the address itself) lets Ray pick up the local token of a head
    # started with token authentication, Ray's default for `ray start`.
    running = _running_local_head()
    if running:
        _init("auto")
        return _describe("existing-local", running)
    if not start_local:
        raise ClusterError(
            "No Ray cluster is running on this machine and no address was given. Start one with "
            "`rayvllm serve CONFIG` or `ray start --head`, or pass --address / set RAY_ADDRESS."
        )
    started = start_local_cluster(num_cpus=num_cpus, num_gpus=num_gpus)
    _init("auto")
    return _describe("started-local", started)


def start_local_cluster(num_cpus: int | None, num_gpus: int | None) -> str:
    """``ray start --head``, its output in a log file; returns the GCS address.

    The dashboard binds 127.0.0.1; Ray's own ports use the node's IP and Ray's token
    authentication (on by default since Ray 2.5x).
    """
    port = _free_port(6379)
    log_file = _log_dir() / f"ray-start-{time.strftime('%Y%m%d-%H%M%S')}.log"
    command = [
        *_RAY_CLI, "start", "--head", f"--port={port}",
        "--dashboard-host=127.0.0.1", "--disable-usage-stats",
        f"--num-cpus={num_cpus if num_cpus is not None else os.cpu_count() or 1}",
        f"--num-gpus={num_gpus or 0}",
    ]
    with open(log_file, "ab") as log:
        # A new session keeps the daemons out of the caller's process group (Ctrl-C in a
        # notebook must not kill the cluster) and away from its stdout.
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, timeout=180, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
    if result.returncode != 0:
        raise ClusterError(
            f"Starting a local Ray cluster failed (exit {result.returncode}); its output is in {log_file}. "
            "Fix what it reports, or start one yourself with `ray start --head` and retry."
        )
    address = _running_local_head()
    if address is None:
        raise ClusterError(f"`ray start` reported success but no head answers; see {log_file}.")
    return address


def stop_local_cluster() -> None:
    """``ray stop`` for the local cluster, then end what Ray does not know it started.

    vLLM's engine-core and worker processes are children of Serve replicas but not Ray
    workers: ``ray stop`` would leave them running, orphaned.
    """
    import psutil

    descendants = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "raylet" or any(p.endswith("/raylet") for p in process.info["cmdline"] or []):
            try:
                descendants += process.children(recursive=True)
            except psutil.Error:
                continue
    with open(_log_dir() / "ray-stop.log", "ab") as log:
        subprocess.run(
            [*_RAY_CLI, "stop", "--force"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, timeout=120, check=False,
        )
    for process in descendants:
        try:
            process.kill()
        except psutil.Error:
            continue


def cluster_resources() -> tuple[dict[str, float], int]:
    """Total resources of the cluster, and the CPUs of its largest alive node."""
    import ray

    node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]]
    return dict(ray.cluster_resources()), max(node_cpus, default=0)


def _init(address: str) -> None:
    import ray

    try:
        # Replica logs go to files and get_logs(), never into a notebook cell.
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
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


def _describe(mode: ClusterMode, address: str) -> ClusterInfo:
    import ray

    nodes = [node for node in ray.nodes() if node["Alive"]]
    dashboard = ray.get_runtime_context().worker.node.address_info.get("webui_url") if mode != "remote" else None
    return ClusterInfo(
        mode=mode,
        address=address,
        nodes=len(nodes),
        resources={k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")},
        dashboard_url=f"http://{dashboard}" if dashboard else None,
    )


def _running_local_head() -> str | None:
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


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return probe.getsockname()[1]
            except OSError:
                continue
    raise ClusterError("No free TCP port on 127.0.0.1 for a local Ray head.")


def _is_this_machine(address: str) -> bool:
    from ray._private.services import get_node_ip_address

    host = address.removeprefix("ray://").rpartition(":")[0] or address
    return host in ("127.0.0.1", "localhost", get_node_ip_address())


def _log_dir() -> Path:
    folder = cache_root() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
