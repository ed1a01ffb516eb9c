"""Faults while serving, on a real deployment: a replace while a request streams, a killed vLLM
engine, a replica killed outright, and a model that keeps crashing.

One model goes through all of it, in order (each restart costs a model load): `max_restarts=2`,
so the third crash stops it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

import rayvllm_nb
from rayvllm_nb import DEMO_PROMPT, TINY_MODEL_REPLY, ModelStatus
from rayvllm_nb._internal import ray_api
from rayvllm_nb.types import ClusterInfo
from rayvllm_nb.widget import Panel
from tests._suite import alone
from tests.conftest import leftovers, model_processes, run_cli

pytestmark = pytest.mark.slow
NAME = "faulty"
CONFIG = ["served_model_name=faulty", "route_prefix=/faulty", "max_restarts=2", "max_model_len=2048"]
CHAT = {"model": NAME, "messages": [{"role": "user", "content": DEMO_PROMPT}], "max_tokens": 64, "temperature": 0}
LONG = {**CHAT, "max_tokens": 1900, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
FAST_S = 2.0


@pytest.fixture(scope="module")
def faulty(cluster: ClusterInfo) -> Iterator[ModelStatus]:
    status = rayvllm_nb.start("tiny-cpu", CONFIG, wait_ready=True, timeout=600)
    try:
        yield status
    finally:
        if NAME in [model.name for model in rayvllm_nb.status().models]:
            rayvllm_nb.stop(NAME)


@dataclass
class Stream:
    """One long streamed completion, read in a thread: what came, and how it ended."""

    base_url: str
    chunks: int = 0
    completion_tokens: int = 0
    """The server's count in the last chunk: vLLM merges tokens into one chunk when the reader lags."""
    finish_reason: str | None = None
    done: bool = False
    error: str | None = None
    ended_at: float | None = None
    started: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.base_url}/chat/completions", json=LONG, timeout=120) as response:
                if response.status_code != 200:
                    self.error = f"HTTP {response.status_code}: {response.read().decode()[:200]}"
                    return
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        self.done = True
                    elif "error" in (chunk := json.loads(data)):
                        self.error = json.dumps(chunk["error"])
                    else:
                        self.chunks += 1
                        if chunk.get("usage"):
                            self.completion_tokens = chunk["usage"]["completion_tokens"]
                        for choice in chunk.get("choices") or ():
                            self.finish_reason = choice.get("finish_reason") or self.finish_reason
                        self.started.set()
        except httpx.HTTPError as failure:
            self.error = f"{type(failure).__name__}: {failure}"
        finally:
            self.ended_at = time.monotonic()
            self.started.set()


def _streams(base_url: str, count: int) -> tuple[list[Stream], list[threading.Thread]]:
    streams = [Stream(base_url) for _ in range(count)]
    threads = [threading.Thread(target=stream.run, daemon=True) for stream in streams]
    for thread in threads:
        thread.start()
    for stream in streams:
        assert stream.started.wait(60), "a stream never started"
    return streams, threads


def _root(status: ModelStatus) -> str:
    return status.base_url.removesuffix("/v1")


def _answer() -> str:
    reply = rayvllm_nb.client(NAME).chat.completions.create(**CHAT)
    return reply.choices[0].message.content


def _ride_out_the_restart(status: ModelStatus, restarts: int) -> list[str]:
    """Until the model serves again: every request and /health must answer 503 (OpenAI-shaped, with
    Retry-After) within 2 s, and status must say RESTARTING with the crash counted and its cause
    (also in the HTML that `%rayvllm status` shows). Returns the statuses seen."""
    seen: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for method, path, body in (("POST", "/v1/chat/completions", CHAT), ("GET", "/health", None)):
            sent = time.monotonic()
            response = _request_as_openai_clients_do(method, _root(status) + path, body)
            took = time.monotonic() - sent
            if response.status_code == 200:
                continue
            assert took < FAST_S, f"{path} took {took:.1f} s to answer {response.status_code}"
            assert response.status_code == 503, (path, response.status_code, response.text)
            assert response.headers.get("retry-after"), response.headers
            error = response.json()["error"]
            assert error["code"] == 503 and error["type"] == "ServiceUnavailableError" and error["message"]
        now = rayvllm_nb.model_status(NAME)
        seen.append(now.status)
        if now.status == "RESTARTING":
            assert now.restarts == restarts and now.last_failure, now
            if "RESTARTING" not in seen[:-1]:
                assert "RESTARTING" in rayvllm_nb.status()._repr_html_(), "what %rayvllm status shows"
        serving = now.ready and httpx.get(_root(status) + "/health", timeout=30).status_code == 200
        if serving and "RESTARTING" in seen:
            return seen
        time.sleep(0.3)
    raise AssertionError(f"the model did not serve again in 5 minutes (statuses seen: {seen[-10:]})")


def _request_as_openai_clients_do(method: str, url: str, body: dict | None) -> httpx.Response:
    """One request, sent again at once if its new connection was closed before any answer: HAProxy
    reloads its config when a replica goes or comes, and a connection it accepted just then can be
    closed unread (about 1 in 200 here); the OpenAI client retries exactly that. A second such
    close fails the test."""
    try:
        return httpx.request(method, url, json=body, timeout=30)
    except httpx.RemoteProtocolError:
        return httpx.request(method, url, json=body, timeout=30)


def test_replace_lets_a_running_request_finish_first(faulty: ModelStatus) -> None:
    with alone():  # the stream must end within the old replica's drain time (30 s)
        streams, threads = _streams(faulty.base_url, 1)
        replaced = rayvllm_nb.start("tiny-cpu", CONFIG, replace=True, wait_ready=True, timeout=600)
        for thread in threads:
            thread.join(120)
    stream = streams[0]
    assert stream.done and stream.error is None, stream
    assert stream.completion_tokens == 1900 and stream.finish_reason == "length", f"the whole answer: {stream}"
    assert replaced.ready and _answer() == TINY_MODEL_REPLY


def _panel_lines(panel: Panel, stop: threading.Event) -> list[str]:
    """Every distinct progress line the panel shows until ``stop`` (read from a thread, as a user sees it)."""
    lines: list[str] = []

    def read() -> None:
        while not stop.is_set():
            if not lines or lines[-1] != panel.progress.value:
                lines.append(panel.progress.value)
            time.sleep(0.2)

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_a_killed_engine_fails_requests_fast_then_the_model_comes_back(faulty: ModelStatus) -> None:
    engines = model_processes(NAME, "VLLM::EngineCore")
    assert engines, "the model's engine process was not found: nothing would be killed"
    panel = rayvllm_nb.panel()
    panel.show(NAME)
    panel.wait(60)
    assert panel.progress.value.startswith(f"{NAME} ready at "), panel.progress.value
    stop_reading = threading.Event()
    shown = _panel_lines(panel, stop_reading)
    with alone():  # answers are timed from the kill until the model serves again
        streams, threads = _streams(faulty.base_url, 4)
        killed_at = time.monotonic()
        for process in engines:
            process.kill()
        for thread in threads:
            thread.join(30)
        for stream in streams:
            # An OpenAI-shaped error chunk in the stream, within 2 s of the kill.
            assert stream.error and stream.error.startswith("{"), stream
            assert stream.ended_at is not None and stream.ended_at - killed_at < FAST_S, stream
        seen = _ride_out_the_restart(faulty, restarts=1)
    assert "RESTARTING" in seen
    status = rayvllm_nb.model_status(NAME)
    assert status.restarts == 1 and "EngineCore was killed (SIGKILL)" in status.last_failure, status
    assert _answer() == TINY_MODEL_REPLY
    deadline = time.monotonic() + 10
    while not shown[-1].startswith(f"{NAME} ready at ") and time.monotonic() < deadline:
        time.sleep(0.2)
    stop_reading.set()
    panel.close()
    restarting = [line for line in shown if line.startswith(f"{NAME}: RESTARTING (restarts: 1): ")]
    assert restarting and "EngineCore was killed (SIGKILL)" in restarting[-1], shown
    assert shown[-1].startswith(f"{NAME} ready at ") and shown[-1].endswith("(restarts: 1)"), shown


def test_a_replica_killed_outright_recovers_the_same_way_and_a_new_shell_sees_it(faulty: ModelStatus) -> None:
    import ray

    [replica] = [
        r for app in ray_api.serve_details()["applications"].values() for d in app["deployments"].values()
        for r in d["replicas"] if d["name"].endswith(f":{NAME}")
    ]
    with alone():  # answers are timed from the kill until the model serves again
        ray.kill(ray.get_actor(replica["actor_name"], namespace="serve"), no_restart=True)
        _ride_out_the_restart(faulty, restarts=2)
    chat = run_cli("chat", "Say hello.", "--model", NAME)
    assert chat.returncode == 0 and chat.stdout.strip() == TINY_MODEL_REPLY, chat.stderr
    status = run_cli("status")
    assert f"{NAME}: RUNNING (ready)" in status.stdout and "restarts=2" in status.stdout, status.stdout


def test_a_model_that_keeps_crashing_is_stopped_with_its_cause(faulty: ModelStatus) -> None:
    engines = model_processes(NAME, "VLLM::EngineCore")
    assert engines, "the model's engine process was not found: nothing would be killed"
    for process in engines:
        process.kill()
    deadline = time.monotonic() + 180
    while (status := rayvllm_nb.model_status(NAME)).status != "FAILED":
        assert time.monotonic() < deadline, f"still {status.status} after 3 minutes: {status}"
        time.sleep(1)
    assert "stopped after 3 crashes within 10 minutes (max_restarts=2)" in status.message, status.message
    assert "EngineCore was killed (SIGKILL)" in status.message
    assert "FAILED" in str(rayvllm_nb.status()) and status.message in str(rayvllm_nb.status())
    deadline = time.monotonic() + 60
    while leftovers(faulty.app_name)["replica_actors"] or model_processes(NAME):
        assert time.monotonic() < deadline, leftovers(faulty.app_name)
        time.sleep(1)
    stopped = run_cli("stop", NAME)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"stopped {NAME}", stopped.stderr
    assert NAME not in [model.name for model in rayvllm_nb.status().models]
