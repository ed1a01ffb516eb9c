"""Replicas that follow the load (Serve's autoscaler: 1 to 2 tiny replicas), a bound on queued
requests answered with an OpenAI-shaped 503, and the checks made before deploying either. Scaling
to zero: tests/test_scale_to_zero.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

import rayvllm_nb
from rayvllm_nb.errors import ConfigError
from rayvllm_nb.types import ClusterInfo, ModelStatus
from tests._suite import alone, serve_port
from tests.conftest import tiny_running, until_model

pytestmark = pytest.mark.slow

NAME = "elastic"


@pytest.fixture(scope="module")
def elastic(cluster: ClusterInfo) -> Iterator[ModelStatus]:
    """The tiny model between 1 and 2 replicas (a replica per 2 ongoing requests, quick to react), each
    running at most 16 requests with 10 more queued (Serve counts a request as queued from its arrival
    until it has a slot, so a burst of more than that many at once is refused while slots are free)."""
    with tiny_running([f"served_model_name={NAME}", "max_model_len=2048", "autoscaling.max_replicas=2",
                       "autoscaling.upscale_delay_s=1", "autoscaling.downscale_delay_s=5", "max_ongoing_requests=16",
                       "max_queued_requests=10"]) as status:
        yield status


def _stream(answers: list[int], stop: threading.Event, refusals: list[str]) -> None:
    body = {"model": NAME, "prompt": "Say hello.", "max_tokens": 400, "ignore_eos": True, "stream": True}
    while not stop.is_set():
        with httpx.stream("POST", f"http://127.0.0.1:{serve_port()}/v1/completions", json=body,
                          timeout=300) as response:
            answers.append(response.status_code)
            text = b"".join(response.iter_bytes())
            if response.status_code != 200:
                refusals.append(f"{response.status_code} {dict(response.headers)} {text[:300]!r}")


def test_the_model_rises_to_two_replicas_under_load_and_falls_back_to_one_when_idle(elastic: ModelStatus) -> None:
    assert elastic.replica_states == {"RUNNING": 1}
    assert "autoscaling 1-2 replicas, 2 requests each" in str(rayvllm_nb.status())
    stop, answers, refusals = threading.Event(), [], []  # type: ignore[var-annotated]
    streams = [threading.Thread(target=_stream, args=(answers, stop, refusals)) for _ in range(8)]
    # Alone: the second replica loads on what the 8 streams leave of the 2 cores, and a model loading on
    # the other worker's cluster left it too little to start within the time (CI: still STARTING at 240 s).
    with alone():
        for stream in streams:
            stream.start()
        try:
            until_model(NAME, lambda: rayvllm_nb.model_status(NAME).replica_states.get("RUNNING") == 2, 240,
                        "no second RUNNING replica under 8 streams")
        finally:
            stop.set()
            for stream in streams:
                stream.join(timeout=300)
    assert set(answers) == {200}, f"8 streams fit in one replica's 16 running requests, none is refused: {refusals}"
    until_model(NAME, lambda: rayvllm_nb.model_status(NAME).replica_states == {"RUNNING": 1}, 120,
                "not back to one replica")


def test_requests_beyond_the_queue_bound_get_an_openai_503_with_retry_after_at_once(elastic: ModelStatus) -> None:
    body = {"model": NAME, "prompt": "Say hello.", "max_tokens": 300, "ignore_eos": True}
    statuses: list[httpx.Response] = []

    def post() -> None:
        statuses.append(httpx.post(f"http://127.0.0.1:{serve_port()}/v1/completions", json=body, timeout=300))

    # One replica now (or two while it rises): 16 running + 10 queued each; 60 at once overflow the bound.
    posts = [threading.Thread(target=post) for _ in range(60)]
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


def test_autoscaling_is_checked_against_the_cluster_and_num_replicas_before_deploying(cluster: ClusterInfo) -> None:
    with pytest.raises(ConfigError, match=r"100 replicas of 'wide' need 100 CPU in all .*autoscaling\.max_replicas"):
        rayvllm_nb.start("tiny-cpu", ["served_model_name=wide", "autoscaling.max_replicas=100"])
    with pytest.raises(ConfigError, match="set num_replicas or autoscaling, not both"):
        rayvllm_nb.start("tiny-cpu", ["num_replicas=2", "autoscaling.max_replicas=2"])
    with pytest.raises(ConfigError, match=r"min_replicas \(3\) must not exceed max_replicas \(2\)"):
        rayvllm_nb.start("tiny-cpu", ["autoscaling.max_replicas=2", "autoscaling.min_replicas=3"])
    assert "wide" not in [model.name for model in rayvllm_nb.status().models]
