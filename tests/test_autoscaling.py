"""Replicas that follow the load (Serve's autoscaler: 0 to 2 tiny replicas), down to zero when idle
and woken by the next request, a bound on queued requests answered with an OpenAI-shaped 503, and
the checks made before deploying either."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

import rayvllm_nb
from rayvllm_nb import DEMO_PROMPT, TINY_MODEL_REPLY
from rayvllm_nb.errors import ConfigError
from rayvllm_nb.types import ClusterInfo, ModelStatus
from tests.conftest import leftovers, model_processes, serve_port, tiny_running

pytestmark = pytest.mark.slow

NAME = "elastic"


@pytest.fixture(scope="module")
def elastic(cluster: ClusterInfo) -> Iterator[ModelStatus]:
    """The tiny model between 0 and 2 replicas (a replica per 2 ongoing requests, quick to react; its last
    replica goes after 30 idle seconds), each running at most 8 requests with 2 more queued."""
    with tiny_running([f"served_model_name={NAME}", "max_model_len=2048", "autoscaling.min_replicas=0",
                       "autoscaling.max_replicas=2", "autoscaling.upscale_delay_s=1",
                       "autoscaling.downscale_delay_s=5", "autoscaling.downscale_to_zero_delay_s=30",
                       "max_ongoing_requests=8", "max_queued_requests=2"]) as status:
        yield status


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s: {rayvllm_nb.model_status(NAME)}"
        time.sleep(1)


def _stream(answers: list[int], stop: threading.Event) -> None:
    body = {"model": NAME, "prompt": "Say hello.", "max_tokens": 400, "ignore_eos": True, "stream": True}
    while not stop.is_set():
        with httpx.stream("POST", f"http://127.0.0.1:{serve_port()}/v1/completions", json=body,
                          timeout=300) as response:
            answers.append(response.status_code)
            for _ in response.iter_bytes():
                pass


def test_the_model_rises_to_two_replicas_under_load_and_falls_back_to_one_when_idle(elastic: ModelStatus) -> None:
    assert elastic.replica_states == {"RUNNING": 1}, "a model that scales to zero loads one replica at start"
    assert "autoscaling 0-2 replicas, 2 requests each" in str(rayvllm_nb.status())
    stop, answers = threading.Event(), []  # type: ignore[var-annotated]
    streams = [threading.Thread(target=_stream, args=(answers, stop)) for _ in range(8)]
    for stream in streams:
        stream.start()
    try:
        _until(lambda: rayvllm_nb.model_status(NAME).replica_states.get("RUNNING") == 2, 240,
               "no second RUNNING replica under 8 streams")
    finally:
        stop.set()
        for stream in streams:
            stream.join(timeout=300)
    assert set(answers) == {200}, "8 streams fit in one replica's 8 running requests: none is refused"
    _until(lambda: rayvllm_nb.model_status(NAME).replica_states == {"RUNNING": 1}, 120, "not back to one replica")


def test_requests_beyond_the_queue_bound_get_an_openai_503_with_retry_after_at_once(elastic: ModelStatus) -> None:
    body = {"model": NAME, "prompt": "Say hello.", "max_tokens": 300, "ignore_eos": True}
    statuses: list[httpx.Response] = []

    def post() -> None:
        statuses.append(httpx.post(f"http://127.0.0.1:{serve_port()}/v1/completions", json=body, timeout=300))

    # One replica now (or two while it rises): 8 running + 2 queued each; 30 at once overflow the bound.
    posts = [threading.Thread(target=post) for _ in range(30)]
    for thread in posts:
        thread.start()
    for thread in posts:
        thread.join(timeout=300)
    refused = [response for response in statuses if response.status_code == 503]
    assert refused, f"no request was refused: {[r.status_code for r in statuses]}"
    assert {r.status_code for r in statuses} <= {200, 503}
    error = refused[0].json()["error"]
    assert error["type"] == "ServiceUnavailableError" and "max_queued_requests" in error["message"]
    assert refused[0].headers["Retry-After"] == "5"


def test_an_idle_model_scales_to_zero_says_so_and_the_next_request_wakes_it(elastic: ModelStatus) -> None:
    _until(lambda: rayvllm_nb.model_status(NAME).scaled_to_zero, 180, "not scaled to zero after 30 idle seconds")
    status = rayvllm_nb.model_status(NAME)
    assert status.ready and "none: scaled to zero, the next request waits for a replica to load" in str(status)
    assert model_processes(NAME) == [] and leftovers(status.app_name)["replica_actors"] == []
    listed = rayvllm_nb.client().models.list()
    assert NAME in [card.id for card in listed.data], "a model scaled to zero is still listed"
    time.sleep(3)
    assert rayvllm_nb.model_status(NAME).scaled_to_zero, "listing the models woke it"
    started = time.monotonic()
    reply = rayvllm_nb.client().chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": DEMO_PROMPT}], temperature=0, max_tokens=64,
    )
    assert reply.choices[0].message.content == TINY_MODEL_REPLY
    assert rayvllm_nb.model_status(NAME).replica_states == {"RUNNING": 1}
    assert time.monotonic() - started > 5, "the answer came from a replica that loaded for it"


def test_autoscaling_is_checked_against_the_cluster_and_num_replicas_before_deploying(cluster: ClusterInfo) -> None:
    with pytest.raises(ConfigError, match=r"100 replicas of 'wide' need 100 CPU in all .*autoscaling\.max_replicas"):
        rayvllm_nb.start("tiny-cpu", ["served_model_name=wide", "autoscaling.max_replicas=100"])
    with pytest.raises(ConfigError, match="set num_replicas or autoscaling, not both"):
        rayvllm_nb.start("tiny-cpu", ["num_replicas=2", "autoscaling.max_replicas=2"])
    with pytest.raises(ConfigError, match=r"min_replicas \(3\) must not exceed max_replicas \(2\)"):
        rayvllm_nb.start("tiny-cpu", ["autoscaling.max_replicas=2", "autoscaling.min_replicas=3"])
    assert "wide" not in [model.name for model in rayvllm_nb.status().models]
