"""The cluster launcher on real Ray processes: a head from local_cpu.yaml on free ports, a
second node joining from this machine, and `cluster stop` ending exactly that head's processes
(a user's vLLM beside it survives). A model served through Ray Client (``ray://``) and used
through the GCS address: tests/test_endpoint.py, on a head of its own.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rayvllm_nb._internal import processes
from rayvllm_nb._internal.net import bind_error, free_port
from tests._suite import alone
from tests.conftest import REPO, head_session, run_cli


def fresh_ports() -> dict[str, int]:
    """Distinct ports free on every interface now, for a head's ``--set`` keys: picked at random between
    Ray's worker ports (10002-19999 by default, 20000-26999 in the suite) and the kernel's ephemeral
    ports (from 32768), so that no outgoing connection or Ray process picks one before the head binds it."""
    keys = ("port", "ray_client_server_port", "dashboard_port", "dashboard_agent_port")
    ports: list[int] = []
    while len(ports) < len(keys):
        if (port := random.randint(27000, 32767)) not in ports and bind_error("0.0.0.0", port) is None:
            ports.append(port)
    return dict(zip(keys, ports, strict=True))


def port_settings(ports: dict[str, int]) -> list[str]:
    """``ports`` as the launcher's ``--set KEY=PORT`` arguments."""
    return [arg for key, port in ports.items() for arg in ("--set", f"{key}={port}")]


def launcher(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The seed's form: `python -m rayvllm_nb.launch_cluster ARGS`, in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "rayvllm_nb.launch_cluster", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def own_cache(tmp_path: Path) -> dict[str, str]:
    """The environment of a command that keeps rayvllm_nb's files (its head records) in ``tmp_path``: what
    it started is told apart from the heads of other tests running beside it."""
    return {"RAYVLLM_NB_CACHE": str(tmp_path / "cache")}


def heads_recorded(env: dict[str, str]) -> list[Path]:
    """The heads a command run with ``env`` (from :func:`own_cache`) started and recorded."""
    return sorted((Path(env["RAYVLLM_NB_CACHE"]) / "heads").glob("*.json"))


def listening(port: int) -> bool:
    return any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in psutil.net_connections("tcp"))


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
    env = own_cache(tmp_path)
    result = launcher("--config", str(config), "start", env=env)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert heads_recorded(env) == []


def test_a_taken_port_fails_before_any_process_starts(tmp_path: Path) -> None:
    env, ports = own_cache(tmp_path), fresh_ports()
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", ports["port"]))
        squatter.listen()
        result = run_cli("cluster", "start", "--config", "configs/cluster/local_cpu.yaml", *port_settings(ports),
                         env=env)
    assert result.returncode == 1
    assert f"Port {ports['port']} (port) on 0.0.0.0 is already in use" in result.stderr
    assert f"--set port={ports['port'] + 1}" in result.stderr
    assert heads_recorded(env) == [] and not listening(ports["ray_client_server_port"])


def test_get_address_without_a_cluster_fails_clearly() -> None:
    from rayvllm_nb._internal.cluster import local_head_address

    if local_head_address() is not None:
        pytest.skip("a Ray head runs on this machine: `get-address` would rightly find it")
    result = launcher("get-address", env={"RAY_ADDRESS": ""})
    assert result.returncode == 1
    assert result.stdout == ""
    assert "No Ray head runs on this machine" in result.stderr


def test_autoscaler_dry_run_validates_the_multi_node_example(tmp_path: Path) -> None:
    env = own_cache(tmp_path)
    result = launcher("--config", "configs/cluster/multi_node_example.yaml", "start-autoscaler", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert "is valid for Ray's cluster launcher" in result.stdout
    assert f"up {REPO / 'configs/cluster/multi_node_example.yaml'} --yes --no-config-cache" in result.stdout
    # The filled-in config shows Ray's defaults merged with ours, the pinned install step included.
    assert "cluster_synced_files" in result.stdout
    assert 'pip install "$HOME/rayvllm_nb[gpu]"' in result.stdout
    assert heads_recorded(env) == []


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
def head() -> Iterator[dict[str, Any]]:
    """A head from local_cpu.yaml on ports free when it starts (and any node joined to it), stopped after: only its
    own processes."""
    with alone():  # a head's raylet dies when its agents start slower than 15 s (ray#65983)
        ports = fresh_ports()
        started = launcher("--config", "configs/cluster/local_cpu.yaml", *port_settings(ports), "start")
    joined: list[int] = []
    try:
        assert started.returncode == 0, started.stderr
        address = started.stdout.split("Ray head started at ", 1)[1].split()[0]
        client = run_cli("cluster", "get-address", "--client", env={"RAY_ADDRESS": address})
        assert client.returncode == 0, client.stderr
        yield {"ports": ports, "start": started.stdout, "address": address,
               "client": client.stdout.strip().splitlines()[-1], "client_stderr": client.stderr, "joined": joined}
    finally:
        launcher("stop", "--address", address) if started.returncode == 0 else None
        for session in joined:
            processes.end_processes(processes.session_processes(session))


@pytest.mark.slow
def test_head_starts_with_the_configs_ports_and_a_local_dashboard(head: dict[str, Any]) -> None:
    assert head["address"].endswith(f":{head['ports']['port']}")
    assert head["client"] == f"ray://{head['address'].rpartition(':')[0]}:{head['ports']['ray_client_server_port']}"
    assert f"Ray head started at {head['address']}" in head["start"]
    assert f"dashboard:  http://127.0.0.1:{head['ports']['dashboard_port']}" in head["start"]
    dashboard = f"http://127.0.0.1:{head['ports']['dashboard_port']}/api/version"
    # Token authentication guards the dashboard too: refused without the token, served with it.
    assert httpx.get(dashboard, timeout=10).status_code == 401
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    assert httpx.get(dashboard, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200
    dashboard_binds = {
        c.laddr.ip for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == head["ports"]["dashboard_port"]
    }
    assert dashboard_binds == {"127.0.0.1"}

    status = launcher("status", "--address", head["address"])
    assert status.returncode == 0, status.stderr
    assert f"Ray cluster {head['address']}: 1 node(s) alive" in status.stdout
    assert "object_store_memory    1.00 GiB / 1.00 GiB" in status.stdout
    assert "GPU" not in status.stdout
    assert "Serve applications: none" in status.stdout


@pytest.mark.slow
def test_the_printed_plain_ray_line_connects_where_the_bare_address_is_refused(head: dict[str, Any]) -> None:
    """`get-address` keeps the bare address as its last stdout line (scripts read it) and says on
    stderr how plain Ray connects to a token-protected head: that line must work, the bare one not."""
    address = run_cli("cluster", "get-address", env={"RAY_ADDRESS": head["address"]})
    assert address.returncode == 0 and address.stdout.strip().splitlines()[-1] == head["address"]
    hint = next(line for line in address.stderr.splitlines() if "plain Ray" in line)
    command = hint.split(": ", 1)[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this checkout's `python`
    works = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, env=env)
    assert works.returncode == 0, works.stderr[-2000:]
    bare = command.removeprefix("RAY_AUTH_MODE=token ")
    refused = subprocess.run(["bash", "-c", bare], capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode != 0 and "auth" in refused.stderr.lower()
    assert "plain Ray:  RAY_AUTH_MODE=token" in head["start"]


@pytest.mark.slow
def test_a_second_node_joins_from_this_machine(head: dict[str, Any]) -> None:
    with alone():  # its raylet waits for its agents as a head's does
        joining = subprocess.Popen(
            [shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray", "start",
             f"--address={head['address']}", "--num-cpus=1", '--resources={"second_node": 1}',
             "--object-store-memory=500000000", "--min-worker-port=20002", "--max-worker-port=20999",
             f"--dashboard-agent-listen-port={free_port('127.0.0.1')}", "--disable-usage-stats"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "RAY_AUTH_MODE": "token"},
        )
        head["joined"].append(joining.pid)
        output, _ = joining.communicate(timeout=180)
    assert joining.returncode == 0, output
    status = run_cli("cluster", "status", "--address", head["address"])
    assert status.returncode == 0, status.stderr
    assert "2 node(s) alive" in status.stdout
    assert "second_node            1 / 1" in status.stdout
    assert "CPU                    3 / 3" in status.stdout


_START_SERVE = """
import sys, ray
from ray import serve
ray.init(sys.argv[1])
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})
"""


@pytest.mark.slow
def test_stop_ends_every_process_of_the_head_and_nothing_else(head: dict[str, Any]) -> None:
    session = head_session(head["address"])
    serve_port = free_port("127.0.0.1")
    started = subprocess.run(  # Serve on this head (its HAProxy is a process of the head's session too)
        [sys.executable, "-c", _START_SERVE, head["address"], str(serve_port)], capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL, env={**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token"},
    )
    assert started.returncode == 0, started.stderr[-2000:]
    kinds = []
    for process in processes.session_processes(session):
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker Ray ends while they are listed
            kinds.append(processes.ray_process_kind(process.name(), process.cmdline()))
    assert {"gcs_server", "raylet", processes.SERVE_HAPROXY} <= set(kinds), kinds
    # A user's own vLLM beside ours: same process title, not started by rayvllm_nb.
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import setproctitle, time; setproctitle.setproctitle('VLLM::EngineCore'); "
         "time.sleep(600)"], start_new_session=True, stdin=subprocess.DEVNULL,
    )
    try:
        stopped = run_cli("cluster", "stop", "--address", head["address"])
        assert stopped.returncode == 0, stopped.stderr
        assert "process(es) on this machine" in stopped.stdout
        assert "gcs_server" in stopped.stdout and "raylet" in stopped.stdout and "Serve HAProxy" in stopped.stdout
        assert processes.session_processes(session) == []
        assert not listening(head["ports"]["port"]) and not listening(head["ports"]["dashboard_port"])
        assert bystander.poll() is None, "a vLLM process rayvllm_nb did not start was ended"
    finally:
        bystander.kill()
        bystander.wait()
    again = launcher("stop", "--address", head["address"])
    assert again.stdout.strip().startswith("No Ray head started by rayvllm runs on this machine")
