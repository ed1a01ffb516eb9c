"""The cluster launcher on real Ray processes: a head from local_cpu.yaml on non-default ports,
a second node joining from this machine, the tiny model deployed, watched and stopped through
the GCS address and through Ray Client (ray://).

These tests need a machine where no Ray runs: conftest orders them before anything that
starts the session's cluster.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from rayvllm_nb import TINY_MODEL_REPLY
from rayvllm_nb._internal.cluster import _ray_process_kind
from tests.conftest import REPO, run_cli

PORTS = {"port": 26379, "ray_client_server_port": 26380, "dashboard_port": 26381}
SETS = [arg for key, port in PORTS.items() for arg in ("--set", f"{key}={port}")]


def launcher(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The seed's form: `python -m rayvllm_nb.launch_cluster ARGS`, in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "rayvllm_nb.launch_cluster", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=REPO,
    )


def ray_processes() -> list[str]:
    """Ray daemons and workers alive on this machine, and vLLM engines of Serve replicas
    (children of a Ray worker, or orphaned); a vLLM server of its own is not counted."""
    found = []
    for process in psutil.process_iter(["name", "cmdline", "ppid"]):
        try:
            name, cmdline = process.info["name"] or "", process.info["cmdline"] or []
            kind = _ray_process_kind(name, cmdline)
            if kind is None and name.startswith("VLLM::"):
                parent = psutil.Process(process.info["ppid"])
                kind = name if process.info["ppid"] == 1 or parent.name().startswith("ray::") else None
        except psutil.Error:
            continue
        if kind is not None:
            found.append(kind)
    return found


def test_machine_has_no_ray_running_before_the_launcher_tests() -> None:
    assert ray_processes() == [], "stop the Ray cluster on this machine (`rayvllm cluster stop`) and rerun"


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("num_cpus: -2\n", "num_cpus=-2: Input should be greater than or equal to 0"),
        ("resources: {accelerator: -1}\n", "resource amounts must be >= 0"),
        ("dashbord: false\n", "unknown key 'dashbord' (did you mean 'dashboard'?)"),
        ("port: 12000\n", "port=12000 lies in Ray's worker port range"),
    ],
)
def test_bad_local_config_fails_before_any_process_starts(tmp_path: Path, yaml_text: str, message: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    result = launcher("--config", str(config), "start")
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert ray_processes() == []


def test_a_taken_port_fails_before_any_process_starts() -> None:
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", PORTS["port"]))
        squatter.listen()
        result = run_cli("cluster", "start", "--config", "configs/cluster/local_cpu.yaml", *SETS)
    assert result.returncode == 1
    assert f"Port {PORTS['port']} (port) on 0.0.0.0 is already in use" in result.stderr
    assert "--set port=26380" in result.stderr
    assert ray_processes() == []


def test_get_address_without_a_cluster_fails_clearly() -> None:
    result = launcher("get-address")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "No Ray head runs on this machine" in result.stderr


def test_autoscaler_dry_run_validates_the_multi_node_example() -> None:
    result = launcher("--config", "configs/cluster/multi_node_example.yaml", "start-autoscaler", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "is valid for Ray's cluster launcher" in result.stdout
    assert f"up {REPO / 'configs/cluster/multi_node_example.yaml'} --yes --no-config-cache" in result.stdout
    # The filled-in config shows Ray's defaults merged with ours, the pinned install step included.
    assert "cluster_synced_files" in result.stdout
    assert 'pip install "$HOME/rayvllm_nb[gpu]"' in result.stdout
    assert ray_processes() == []


def test_autoscaler_dry_run_rejects_a_misspelled_key_through_rays_schema(tmp_path: Path) -> None:
    original = (REPO / "configs/cluster/multi_node_example.yaml").read_text()
    assert "\nmax_workers: 4\n" in original
    misspelled = tmp_path / "misspelled.yaml"
    misspelled.write_text(original.replace("\nmax_workers: 4\n", "\nmax_worker: 4\n"))
    result = run_cli("cluster", "start-autoscaler", "--config", str(misspelled), "--dry-run")
    assert result.returncode == 2
    assert "Ray's cluster-config schema rejects" in result.stderr
    assert "'max_worker' was unexpected" in result.stderr
    assert "Would run" not in result.stdout


@pytest.fixture(scope="module")
def head() -> Iterator[dict[str, str]]:
    """A head from local_cpu.yaml on non-default ports; everything on this machine is stopped after."""
    started = launcher("--config", "configs/cluster/local_cpu.yaml", *SETS, "start")
    try:
        assert started.returncode == 0, started.stderr
        address = run_cli("cluster", "get-address")
        client = run_cli("cluster", "get-address", "--client")
        assert address.returncode == 0 and client.returncode == 0, address.stderr + client.stderr
        yield {"start": started.stdout, "address": address.stdout.strip(), "client": client.stdout.strip()}
    finally:
        launcher("stop")


@pytest.mark.slow
def test_head_starts_with_the_configs_ports_and_a_local_dashboard(head: dict[str, str]) -> None:
    assert head["address"].endswith(f":{PORTS['port']}")
    assert head["client"] == f"ray://{head['address'].rpartition(':')[0]}:{PORTS['ray_client_server_port']}"
    assert f"Ray head started at {head['address']}" in head["start"]
    assert f"dashboard:  http://127.0.0.1:{PORTS['dashboard_port']}" in head["start"]
    dashboard = f"http://127.0.0.1:{PORTS['dashboard_port']}/api/version"
    # Token authentication guards the dashboard too: refused without the token, served with it.
    assert httpx.get(dashboard, timeout=10).status_code == 401
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    assert httpx.get(dashboard, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200
    dashboard_binds = {
        c.laddr.ip for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == PORTS["dashboard_port"]
    }
    assert dashboard_binds == {"127.0.0.1"}

    status = launcher("status")
    assert status.returncode == 0, status.stderr
    assert f"Ray cluster {head['address']}: 1 node(s) alive" in status.stdout
    assert "object_store_memory    1.00 GiB / 1.00 GiB" in status.stdout
    assert "GPU" not in status.stdout
    assert "Serve applications: none" in status.stdout


@pytest.mark.slow
def test_a_second_node_joins_from_this_machine(head: dict[str, str]) -> None:
    joined = subprocess.run(
        [shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray", "start",
         f"--address={head['address']}", "--num-cpus=1", '--resources={"second_node": 1}',
         "--object-store-memory=500000000", "--min-worker-port=20002", "--max-worker-port=20999",
         "--dashboard-agent-listen-port=26382", "--disable-usage-stats"],
        capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    assert joined.returncode == 0, joined.stdout + joined.stderr
    status = run_cli("cluster", "status", "--address", head["address"])
    assert status.returncode == 0, status.stderr
    assert "2 node(s) alive" in status.stdout
    assert "second_node            1 / 1" in status.stdout
    assert "CPU                    3 / 3" in status.stdout


@pytest.mark.slow
def test_tiny_model_through_ray_client_and_the_gcs_address(head: dict[str, str]) -> None:
    client, address = head["client"], head["address"]
    served = run_cli("--address", client, "serve", "tiny-cpu", "--set", "served_model_name=cluster-tiny")
    assert served.returncode == 0, served.stderr
    assert "cluster-tiny ready at http://127.0.0.1:8000/v1" in served.stdout
    try:
        chat = run_cli("--address", address, "chat", "Say hello.")
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.strip() == TINY_MODEL_REPLY

        for target in (client, address):
            status = run_cli("--address", target, "status")
            assert status.returncode == 0, status.stderr
            assert "cluster-tiny: RUNNING (ready)" in status.stdout

        logs = run_cli("--address", client, "logs", "-n", "200")
        assert logs.returncode == 0, logs.stderr
        assert "EngineCore" in logs.stdout

        apps = run_cli("cluster", "status", "--address", address)
        assert "cluster-tiny: RUNNING" in apps.stdout
    finally:
        stopped = run_cli("--address", client, "stop", "cluster-tiny")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped cluster-tiny" in stopped.stdout
    after = run_cli("--address", address, "status")
    assert "models   none" in after.stdout


@pytest.mark.slow
def test_stop_leaves_no_ray_process(head: dict[str, str]) -> None:
    stopped = run_cli("cluster", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "Ray process(es) on this machine" in stopped.stdout
    assert "gcs_server" in stopped.stdout and "raylet" in stopped.stdout
    assert ray_processes() == []
    again = launcher("stop")
    assert again.stdout.strip() == "No Ray processes were running on this machine."
    assert launcher("get-address").returncode == 1

