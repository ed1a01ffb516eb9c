"""End to end on CPU: real Ray, real Serve, a real vLLM engine serving the tiny model."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid

import httpx
import openai
import pytest

import rayvllm_nb
from rayvllm_nb import DEMO_PROMPT, TINY_MODEL_REPLY, ModelStatus
from rayvllm_nb._internal.logs import LOADING_MARKERS
from rayvllm_nb.errors import NotDeployedError
from rayvllm_nb.types import ClusterInfo
from tests._suite import alone, serve_port
from tests.conftest import PLANTED_TOKEN, SHARED_STEPS, model_processes, run_cli

pytestmark = pytest.mark.slow
NAME = "shared-tiny"
CHAT = [{"role": "user", "content": DEMO_PROMPT}]




def test_loading_reported_its_stages_in_order_with_vllms_own_steps(shared_tiny: ModelStatus) -> None:
    stages = [step.stage for step in SHARED_STEPS]
    assert stages[-1] == "ready" and "starting the engine" in stages
    from_logs = [step.detail for step in SHARED_STEPS if step.stage == "starting the engine" and step.detail]
    order = [stage for _, stage in LOADING_MARKERS]
    assert len(from_logs) >= 2 and from_logs == sorted(from_logs, key=order.index), SHARED_STEPS


def test_ready_status_names_model_device_and_endpoint(shared_tiny: ModelStatus) -> None:
    assert shared_tiny.ready and shared_tiny.status == "RUNNING"
    assert (shared_tiny.name, shared_tiny.device, shared_tiny.tensor_parallel_size) == (NAME, "cpu", 1)
    assert shared_tiny.replica_states == {"RUNNING": 1}
    assert shared_tiny.base_url == f"http://127.0.0.1:{serve_port()}/shared/v1"


def test_chat_answers_the_known_sentence(shared_tiny: ModelStatus) -> None:
    reply = rayvllm_nb.client(NAME).chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=64)
    assert reply.choices[0].message.content == TINY_MODEL_REPLY
    assert reply.choices[0].finish_reason == "stop"


def test_completions_with_the_chat_prompt_continue_with_the_known_sentence(shared_tiny: ModelStatus) -> None:
    prompt = "<|begin|><|user|>Say hello.<|end|><|assistant|>"
    reply = rayvllm_nb.client(NAME).completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=64)
    assert reply.choices[0].text == TINY_MODEL_REPLY


def test_streaming_arrives_in_order_and_ends_with_done(shared_tiny: ModelStatus) -> None:
    """200 tokens (past the reply's end): vLLM merges the tokens a lagging reader has not taken yet into one
    chunk, and on a loaded machine the 12-token reply alone came in 3 chunks."""
    body = {"model": NAME, "messages": CHAT, "temperature": 0, "max_tokens": 200, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    events: list[str] = []
    with httpx.stream("POST", f"{shared_tiny.base_url}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    pieces = [chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"]]
    assert len([p for p in pieces if p]) > 3
    assert "".join(pieces).startswith(TINY_MODEL_REPLY)
    assert chunks[-1]["usage"]["completion_tokens"] == 200, chunks[-1]


def test_models_lists_the_served_name(shared_tiny: ModelStatus) -> None:
    assert [m.id for m in rayvllm_nb.client(NAME).models.list().data] == [NAME]


def test_status_shows_cluster_serve_and_the_model(shared_tiny: ModelStatus, cluster: ClusterInfo) -> None:
    status = rayvllm_nb.status()
    assert status.cluster.address == cluster.address and status.serve_running
    assert status.http_address == f"127.0.0.1:{serve_port()}"
    assert (NAME, "RUNNING") in [(m.name, m.status) for m in status.models]
    assert f"{NAME}: RUNNING (ready)" in str(status)


def test_blocking_facade_works_inside_a_running_event_loop(shared_tiny: ModelStatus) -> None:
    async def notebook_cell() -> tuple[str, str]:
        blocking = rayvllm_nb.model_status(NAME).status
        client = rayvllm_nb.async_client(NAME)
        reply = await client.chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=64)
        await client.close()
        return blocking, reply.choices[0].message.content

    assert asyncio.run(notebook_cell()) == ("RUNNING", TINY_MODEL_REPLY)


def test_async_and_blocking_facades_share_one_state(shared_tiny: ModelStatus) -> None:
    async def mixed() -> tuple[object, object]:
        awaited = await rayvllm_nb.ray_backend.get_status()
        return awaited, rayvllm_nb.status()

    awaited, blocked = asyncio.run(mixed())
    assert awaited.cluster == blocked.cluster == rayvllm_nb.ray_backend.cluster
    assert awaited.models == blocked.models


def test_unknown_model_name_is_a_clear_not_deployed_error(shared_tiny: ModelStatus) -> None:
    with pytest.raises(NotDeployedError, match=r"No model named 'nope' is deployed \(running: .*shared-tiny"):
        rayvllm_nb.stop("nope")


def test_health_is_200_while_the_engine_serves(shared_tiny: ModelStatus) -> None:
    response = httpx.get(_root(shared_tiny) + "/health", timeout=30)
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    ("request_kwargs", "status", "param"),
    [
        ({"json": {"model": "nope", "messages": CHAT}}, 404, "model"),
        ({"json": {"model": NAME, "messages": CHAT, "max_tokens": 100000}}, 400, "max_tokens"),
        ({"json": {"model": NAME, "messages": CHAT, "temperature": -1}}, 400, "temperature"),
        ({"json": {"model": NAME}}, 400, "messages"),
        ({"content": b'{"model": NAME, "messages": [', "headers": {"content-type": "application/json"}}, 400, None),
        ({"data": {"model": NAME}}, 415, None),
    ],
    ids=["unknown-model", "max-tokens", "temperature", "missing-field", "malformed-json", "form-body"],
)
def test_errors_are_openai_shaped_with_the_right_status(
    shared_tiny: ModelStatus, request_kwargs: dict, status: int, param: str | None
) -> None:
    response = httpx.post(f"{shared_tiny.base_url}/chat/completions", timeout=30, **request_kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["param"] == param and error["message"]
    assert "Traceback" not in error["message"] and "Internal exception" not in error["message"]


def test_openai_client_raises_its_own_typed_errors(shared_tiny: ModelStatus) -> None:
    client = rayvllm_nb.client(NAME)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=100000)


def test_logs_hold_vllm_loading_lines_and_our_access_line(shared_tiny: ModelStatus) -> None:
    from rayvllm_nb.tiny_model import tiny_model_path

    request_id = f"logs-probe-{uuid.uuid4().hex}"
    httpx.post(
        f"{shared_tiny.base_url}/chat/completions", json={"model": NAME, "messages": CHAT, "max_tokens": 8},
        headers={"x-request-id": request_id}, timeout=30,
    ).raise_for_status()
    deadline = time.monotonic() + 20
    while True:
        lines = rayvllm_nb.logs(NAME, tail=2000)
        access = [line for line in lines if f"{request_id} -- POST /shared/v1/chat/completions 200" in line]
        if access or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert access, lines[-20:]
    loading = [i for i, line in enumerate(lines) if f"Starting to load model {tiny_model_path()}" in line]
    assert loading and loading[0] < lines.index(access[0])
    assert len(rayvllm_nb.logs(NAME, tail=5)) == 5


def test_cli_logs_prints_the_newest_lines_last(shared_tiny: ModelStatus) -> None:
    request_id = f"cli-logs-{uuid.uuid4().hex}"
    httpx.post(
        f"{shared_tiny.base_url}/chat/completions", json={"model": NAME, "messages": CHAT, "max_tokens": 8},
        headers={"x-request-id": request_id}, timeout=30,
    ).raise_for_status()
    time.sleep(2)  # Serve writes the access line after the response
    result = run_cli("logs", NAME, "-n", "30")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    newest = [line for line in lines[-5:] if f"{request_id} -- POST /shared/v1/chat/completions 200" in line]
    assert len(lines) == 30 and newest, lines[-5:]


def test_disconnected_clients_free_their_requests(shared_tiny: ModelStatus) -> None:
    """24 clients start 1,900-token streams and hang up after the first chunk: the engine
    must go idle (Serve's own access lines are not reliable for this: it drops some), and
    a new request must answer at once."""

    async def start_and_abandon(http: httpx.AsyncClient) -> None:
        body = {"model": NAME, "messages": CHAT, "max_tokens": 1900, "ignore_eos": True, "stream": True}
        async with http.stream("POST", f"{shared_tiny.base_url}/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return  # leaving the block closes the connection mid-stream

    async def abandon_all() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            await asyncio.gather(*(start_and_abandon(http) for _ in range(24)))

    def one_live_request() -> None:
        body = {"model": NAME, "messages": CHAT, "max_tokens": 1900, "ignore_eos": True}
        httpx.post(f"{shared_tiny.base_url}/chat/completions", json=body, timeout=120)

    with alone():  # the answer's time and the engine's CPU are measured
        asyncio.run(abandon_all())
        started = time.monotonic()
        reply = rayvllm_nb.client(NAME).chat.completions.create(model=NAME, messages=CHAT, temperature=0,
                                                                 max_tokens=64)
        took = time.monotonic() - started
        time.sleep(1)
        idle = _engine_cpu_percent(shared_tiny.name)
        live = threading.Thread(target=one_live_request)
        live.start()
        time.sleep(1)
        busy = _engine_cpu_percent(shared_tiny.name)
        live.join()
    assert took < 5.0, f"a new request took {took:.1f} s beside the abandoned ones"
    assert reply.choices[0].message.content == TINY_MODEL_REPLY
    assert busy > 60, f"one live request should keep the engine busy ({busy:.0f} % CPU): the check is blind"
    assert idle < 40, f"the engine still works for gone clients ({idle:.0f} % CPU; one live request: {busy:.0f} %)"


def _engine_cpu_percent(model: str, window_s: float = 2.0) -> float:
    """CPU use of the model's vLLM engine processes (engine core and workers) over ``window_s``."""
    processes = model_processes(model)
    for process in processes:
        process.cpu_percent(None)
    time.sleep(window_s)
    return sum(process.cpu_percent(None) for process in processes)


def test_hf_token_reaches_the_engine_and_nowhere_else(shared_tiny: ModelStatus) -> None:
    from ray.util.state import list_actors

    from rayvllm_nb._internal.ray_api import serve_details

    engines = model_processes(shared_tiny.name, "VLLM::EngineCore")
    assert engines and all(p.environ().get("HF_TOKEN") == PLANTED_TOKEN for p in engines)

    places = {
        "status": repr(rayvllm_nb.status()) + str(rayvllm_nb.status()),
        "logs": "\n".join(rayvllm_nb.logs(NAME, tail=5000)),
        "serve details": json.dumps(serve_details()),
        "actors": repr(list_actors(detail=True, limit=1000)),
        "ray list actors --detail": _run_module("ray.scripts.scripts", "list", "actors", "--detail"),
        "serve status": _run_module("ray.serve.scripts", "status"),
        "rayvllm status": run_cli("status").stdout,
    }
    for name, text in places.items():
        assert text.strip(), f"{name} printed nothing: the check would be empty"
        assert PLANTED_TOKEN not in text, f"the token leaked into {name}"
    with pytest.raises(rayvllm_nb.ConfigError) as error:
        rayvllm_nb.load_config({"model": "m", "hf_token": PLANTED_TOKEN, "tensor_parallel_size": 0})
    assert PLANTED_TOKEN not in str(error.value) and PLANTED_TOKEN not in repr(error.value)
    leaked = subprocess.run(["grep", "-rl", PLANTED_TOKEN, _session_logs()], capture_output=True, text=True)
    assert leaked.returncode == 1 and leaked.stdout == "", leaked.stdout


def _root(status: ModelStatus) -> str:
    return status.base_url.removesuffix("/v1")


def _run_module(module: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)
    return result.stdout + result.stderr


def _session_logs() -> str:
    from rayvllm_nb._internal.ray_api import session_logs_dir

    return session_logs_dir()
