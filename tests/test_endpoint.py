"""The Serve endpoint of a cluster of its own, as a user's shells see it: served through the Ray
Client address and used through the GCS address, an API key, loopback-only listeners, a port taken
by another program, and `ray stop --force` typed by hand between two serves.

Everything runs through the `rayvllm` command in new processes against a second head on free
ports (this test process stays connected to the tests' shared cluster).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from rayvllm_nb import DEMO_PROMPT, TINY_MODEL_REPLY
from rayvllm_nb._internal import processes, ray_api
from rayvllm_nb._internal.cluster import stop_started_heads
from rayvllm_nb._internal.net import free_port
from tests._suite import alone, start_test_head
from tests.conftest import head_processes, head_session, model_processes, process_name, run_cli, start_cli

pytestmark = pytest.mark.slow
KEY = "sk-" + secrets.token_hex(16)
CHAT = {"model": "keyed", "messages": [{"role": "user", "content": DEMO_PROMPT}], "max_tokens": 64, "temperature": 0}


def _head() -> str:
    return start_test_head(num_cpus=2, min_worker_port=33000, max_worker_port=39999)


def cli(address: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`rayvllm --address ADDRESS ARGS` in a new process (no RAY_ADDRESS of the tests' cluster)."""
    return run_cli("--address", address, *args, env={"RAY_ADDRESS": "", **env})


def client_address(address: str) -> str:
    """The Ray Client address (``ray://``) of the head at ``address``, as `rayvllm cluster get-address
    --client` prints it."""
    printed = run_cli("cluster", "get-address", "--client", env={"RAY_ADDRESS": address})
    assert printed.returncode == 0, printed.stderr
    client = printed.stdout.strip().splitlines()[-1]
    assert client.startswith("ray://"), printed.stdout
    return client


@pytest.fixture(scope="module")
def keyed() -> Iterator[dict[str, Any]]:
    """A head of its own where serving first meets a port taken by another program (refused), then
    serves the tiny model behind an API key (from an environment variable) through Ray Client."""
    address = _head()
    port = free_port("127.0.0.1")
    try:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            taken = squatter.getsockname()[1]
            refused = cli(address, "serve", "tiny-cpu", "--set", f"port={taken}")
        status_after_refusal = cli(address, "status").stdout
        client = client_address(address)
        served = cli(client, "serve", "tiny-cpu", "--set", "served_model_name=keyed", "--set", f"port={port}",
                     "--set", "api_key_env=TEST_RAYVLLM_KEY", TEST_RAYVLLM_KEY=KEY)
        assert served.returncode == 0, served.stderr
        yield {"address": address, "client": client, "base": f"http://127.0.0.1:{port}",
               "serve_stdout": served.stdout, "refused": refused, "taken": taken,
               "status_after_refusal": status_after_refusal}
    finally:
        stop_started_heads(address)


def test_a_port_taken_by_another_program_is_refused_before_serve_starts(keyed: dict[str, Any]) -> None:
    refused = keyed["refused"]
    assert refused.returncode == 2
    assert f"Port {keyed['taken']} on 127.0.0.1 is already used by another program" in refused.stderr
    assert "serve    not running" in keyed["status_after_refusal"]


def test_without_the_key_every_route_but_health_is_401_in_openais_shape(keyed: dict[str, Any]) -> None:
    base = keyed["base"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics")):
            response = httpx.request(method, base + path, json=CHAT if method == "POST" else None,
                                     headers=headers, timeout=30)
            assert response.status_code == 401, (method, path, headers, response.text)
            error = response.json()["error"]
            assert error["code"] == 401 and error["type"] == "AuthenticationError" and "API key" in error["message"]
    assert httpx.get(base + "/health", timeout=30).status_code == 200
    answer = httpx.post(base + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {KEY}"},
                        timeout=60)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == TINY_MODEL_REPLY


def test_a_new_shell_chats_with_the_key_it_never_saw(keyed: dict[str, Any]) -> None:
    chat = cli(keyed["address"], "chat", "Say hello.")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() == TINY_MODEL_REPLY


def test_served_through_ray_client_the_model_is_seen_and_read_through_either_address(keyed: dict[str, Any]) -> None:
    assert f"keyed ready at {keyed['base']}/v1" in keyed["serve_stdout"]
    status = cli(keyed["client"], "status")
    assert status.returncode == 0 and "keyed: RUNNING (ready)" in status.stdout, status.stderr
    logs = cli(keyed["client"], "logs", "-n", "200")
    assert logs.returncode == 0 and "EngineCore" in logs.stdout, logs.stderr
    apps = run_cli("cluster", "status", "--address", keyed["address"])
    assert apps.returncode == 0 and "keyed: RUNNING" in apps.stdout, apps.stderr


def test_another_key_for_a_second_model_is_refused(keyed: dict[str, Any]) -> None:
    refused = cli(keyed["address"], "serve", "tiny-cpu", "--set", "served_model_name=other",
                  "--set", "route_prefix=/other", "--set", "api_key=sk-another", "--no-wait")
    assert refused.returncode == 2
    assert "with another API key" in refused.stderr and "sk-another" not in refused.stderr


def test_the_key_appears_nowhere_a_user_can_read(keyed: dict[str, Any]) -> None:
    script = (
        "import json, rayvllm_nb\n"
        "from rayvllm_nb._internal import ray_api\n"
        "rayvllm_nb.init()\n"
        "status = rayvllm_nb.status()\n"
        "print(repr(status), status, repr(rayvllm_nb.endpoint('keyed')), repr(rayvllm_nb.model_status('keyed')))\n"
        "print(json.dumps(ray_api.serve_details()))\n"
        "print('\\n'.join(rayvllm_nb.logs('keyed', tail=5000)))\n"
        "print('LOGS_DIR=' + ray_api.session_logs_dir())\n"
    )
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "RAY_ADDRESS": keyed["address"]})
    assert shown.returncode == 0, shown.stderr[-2000:]
    logs_dir = shown.stdout.rsplit("LOGS_DIR=", 1)[1].strip()
    places = {
        "status, endpoint, model status, serve details, logs": shown.stdout + shown.stderr,
        "rayvllm status": cli(keyed["address"], "status").stdout,
        "serve's output": keyed["serve_stdout"],
        "ray list actors --detail": subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "list", "actors", "--detail", "--address",
             keyed["address"]], capture_output=True, text=True, timeout=120,
            env={**os.environ, "RAY_AUTH_MODE": "token"}).stdout,
    }
    for name, text in places.items():
        assert text.strip(), f"{name} printed nothing: the check would be empty"
        assert KEY not in text, f"the API key leaked into {name}"
    leaked = subprocess.run(["grep", "-rl", KEY, logs_dir], capture_output=True, text=True)
    assert leaked.returncode == 1 and leaked.stdout == "", leaked.stdout


def test_every_listener_of_haproxy_the_replica_and_vllm_is_on_loopback(keyed: dict[str, Any]) -> None:
    haproxy = head_processes(keyed["address"], "haproxy")
    ours = [*haproxy, *model_processes("keyed", ("VLLM::", "ray::ServeReplica"), keyed["address"])]
    assert haproxy and len(ours) >= 4, ours
    listeners = {
        (process.name(), connection.laddr.ip, connection.laddr.port)
        for process in ours for connection in process.net_connections("tcp")
        if connection.status == psutil.CONN_LISTEN
    }
    haproxy_ports = {port for name, _, port in listeners if name == "haproxy"}
    assert haproxy_ports == {int(keyed["base"].rpartition(":")[2])}, listeners
    # Ray's own gRPC ports (the worker's, Serve's internal one) are token-protected and out of scope:
    # every listener that answers HTTP/1.1 is ours or vLLM's, and must be on loopback.
    http = {(name, ip, port) for name, ip, port in listeners if _speaks_http(ip, port)}
    assert any(name.startswith("ray::ServeReplica") for name, _, _ in http), listeners
    assert {ip for _, ip, _ in http} == {"127.0.0.1"}, http


def test_serves_fallback_proxy_listens_on_a_port_of_this_heads_own(keyed: dict[str, Any]) -> None:
    """Serve's fallback proxy (where HAProxy holds a request until a replica is up) listens on 8500 by
    default, one per machine: this head's must not be the one of the tests' cluster beside it."""
    records = {record.address: record for record in processes.recorded_heads()}
    mine = records[keyed["address"]].serve_ports
    others = {port for address, record in records.items() if address != keyed["address"] for port in record.serve_ports}
    assert mine and others, records
    assert not set(mine) & others, records
    listening = {
        connection.laddr.port for process in head_processes(keyed["address"])
        for connection in process.net_connections("tcp") if connection.status == psutil.CONN_LISTEN
    }
    assert mine[0] in listening, (mine, sorted(listening))


def _speaks_http(ip: str, port: int) -> bool:
    """Whether the listener answers a plain HTTP/1.1 request (gRPC servers do not). The path is one no
    server has, answered at once (a health check would wait for the engine)."""
    host = "127.0.0.1" if ip in ("0.0.0.0", "::") else ip
    try:
        with socket.create_connection((host, port), timeout=1.5) as connection:
            connection.sendall(b"GET /no-such-path HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            return connection.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def test_ray_stop_typed_by_hand_then_serve_again_leaves_nothing_of_the_first(keyed: dict[str, Any]) -> None:
    """`ray stop --force` ends Ray's processes but not Serve's HAProxy (which keeps the port) nor the
    replica's vLLM engine (GBs of memory). The next serve ends them, says so, and serves; then chat,
    status and stop, each a new `rayvllm` process, see the model and end it."""
    port = keyed["base"].rpartition(":")[2]
    second, serving = "", None
    try:
        with alone():  # until the next serve ends what ray stop left (any rayvllm process would end it)
            left = _ray_stop_force(head_session(keyed["address"]))
            kinds = sorted({process_name(p) or "" for p in left})
            assert "haproxy" in kinds and "VLLM::EngineCore" in kinds, f"ray stop left {kinds}: nothing to reclaim"
            second = _head()
            serving = start_cli("--address", second, "serve", "tiny-cpu", "--set", f"port={port}",
                                "--set", "served_model_name=again", env={"RAY_ADDRESS": ""})
            assert serving.stderr is not None
            early = []
            for line in iter(serving.stderr.readline, ""):
                early.append(line)
                if "Ended what a stopped Ray cluster left on this machine" in line:
                    break
        assert serving.stdout is not None
        stderr = "".join(early) + serving.stderr.read()  # its stdout is a few lines: the pipe cannot fill
        stdout = serving.stdout.read()
        assert serving.wait(60) == 0, stderr
        assert "Ended what a stopped Ray cluster left on this machine" in stderr
        assert "Serve HAProxy" in stderr and "VLLM::EngineCore" in stderr
        assert "starting the engine" in stdout
        assert f"again ready at http://127.0.0.1:{port}/v1" in stdout
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in left)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                            json={**CHAT, "model": "again"})
        assert answer.json()["choices"][0]["message"]["content"] == TINY_MODEL_REPLY
        chat = cli(second, "chat", "Say hello.", "--model", "again")
        assert (chat.returncode, chat.stdout.strip()) == (0, TINY_MODEL_REPLY), chat.stderr
        assert "TTFT" in chat.stderr
        assert "again: RUNNING (ready)" in cli(second, "status").stdout
        stopped = cli(client_address(second), "stop", "again")
        assert (stopped.returncode, stopped.stdout.strip()) == (0, "stopped again"), stopped.stderr
        after = cli(second, "status")
        assert "models   none" in after.stdout and "again" not in after.stdout, after.stdout
    finally:
        if serving is not None and serving.poll() is None:
            serving.kill()
        if second:
            stop_started_heads(second)


def _ray_stop_force(session: int) -> list[psutil.Process]:
    """What `ray stop --force` does, to this head only: SIGKILL every process its filters match
    (the real command would end every Ray cluster of this machine's user). Returns what is left."""
    members = processes.session_processes(session)
    # In Ray's order, the raylet first and the GCS last: a raylet that outlives its GCS shuts down by
    # itself and ends its workers' process groups (HAProxy and vLLM's engines with them).
    for keyword, by_name in ray_api.ray_stop_process_filters():
        for process in members:
            try:  # killing a process may already have ended its children (the dashboard's heads)
                if keyword in (process.name() if by_name else subprocess.list2cmdline(process.cmdline())):
                    process.kill()
            except psutil.NoSuchProcess:
                continue
    psutil.wait_procs(members, timeout=10)
    # Serve may have been reloading HAProxy: our wrapper (python) becomes haproxy once it has patched the config.
    deadline = time.monotonic() + 15
    while any(process_name(p) == "python" for p in members) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in members if process_name(p) is not None]


def test_ray_stop_filters_are_what_this_test_mimics() -> None:
    """The simulation above uses Ray's own list; `gcs_server` and `ray::` workers are on it."""
    keywords = {keyword for keyword, _ in ray_api.ray_stop_process_filters()}
    assert {"raylet", "gcs_server", "ray::"} <= keywords
