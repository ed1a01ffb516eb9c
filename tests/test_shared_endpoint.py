"""One OpenAI endpoint for several models: two tiny models started without a route_prefix answer at
one base URL, chosen by the request's ``model`` (HAProxy's routes map, or the router), and the
router goes away with the last of them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

import rayvllm_nb
from rayvllm_nb import TINY_MODEL_REPLY
from rayvllm_nb._internal import ray_api, shared_endpoint
from rayvllm_nb.types import ClusterInfo, ModelStatus
from tests._suite import serve_port
from tests.conftest import leftovers

pytestmark = pytest.mark.slow

NAMES = ("alpha", "beta")
SAY_HELLO = [{"role": "user", "content": "Say hello."}]
_ROUTES_SETTLE_S = 10.0


@pytest.fixture(scope="module")
def two_models(cluster: ClusterInfo) -> Iterator[dict[str, ModelStatus]]:
    """alpha and beta at the shared endpoint (both deployed, then both awaited)."""
    for name in NAMES:
        rayvllm_nb.start("tiny-cpu", [f"served_model_name={name}", "max_model_len=2048"], wait_ready=False)
    try:
        yield {name: rayvllm_nb.wait_for_ready(name, timeout=600) for name in NAMES}
    finally:
        running = {model.name for model in rayvllm_nb.status().models}
        for name in NAMES:
            if name in running:
                rayvllm_nb.stop(name)


def _shared_url() -> str:
    return f"http://127.0.0.1:{serve_port()}/v1"


def _chat(name: str, **extra: Any) -> httpx.Response:
    body = {**extra, "model": name, "messages": SAY_HELLO, "max_tokens": 32, "temperature": 0}
    return httpx.post(f"{_shared_url()}/chat/completions", json=body, timeout=120)


def _until_404(ask: Callable[[], httpx.Response], what: str) -> None:
    """Ask, from the moment a stop returns, until the answer is 404. Meanwhile (Serve reloads its
    HAProxy, and the router reads its routes, a moment after an app is deleted) the answer may only be
    the OpenAI-shaped 503 that tells the client to retry: asked at once, a suite run got it."""
    deadline = time.monotonic() + _ROUTES_SETTLE_S
    while (answer := ask()).status_code != 404:
        assert answer.status_code == 503 and answer.headers.get("Retry-After"), f"{what}: {answer.text}"
        assert answer.json()["error"]["type"] == "ServiceUnavailableError", answer.text
        assert time.monotonic() < deadline, f"{what}: still 503 after {_ROUTES_SETTLE_S:.0f} s: {answer.text}"
        time.sleep(0.1)


def test_two_models_answer_at_one_base_url_chosen_by_the_requests_model(two_models: dict[str, ModelStatus]) -> None:
    assert {status.base_url for status in two_models.values()} == {_shared_url()}
    client = rayvllm_nb.client()
    assert str(client.base_url).rstrip("/") == _shared_url()
    for name in NAMES:
        answer = client.chat.completions.create(model=name, messages=SAY_HELLO, max_tokens=32, temperature=0)  # type: ignore[arg-type]
        assert (answer.model, answer.choices[0].message.content) == (name, TINY_MODEL_REPLY)
    listed = {card.id for card in client.models.list().data}
    assert set(NAMES) <= listed
    assert "shared-tiny" not in listed, "a model with a route_prefix of its own is not at the shared endpoint"


def test_haproxy_routes_a_small_body_itself_and_the_router_takes_what_does_not_fit_its_buffer(
    two_models: dict[str, ModelStatus],
) -> None:
    small = _chat("beta")
    assert small.status_code == 200 and small.json()["model"] == "beta"
    assert shared_endpoint.VIA_HEADER not in small.headers, "HAProxy's routes map should have routed it"
    # `user` (an OpenAI field vLLM ignores) first: 20 KB of it puts `model` beyond HAProxy's 16 KB buffer.
    large = _chat("alpha", user="x" * 20_000)
    assert large.status_code == 200, large.text
    assert large.headers.get(shared_endpoint.VIA_HEADER) == "router"
    assert (large.json()["model"], large.json()["choices"][0]["message"]["content"]) == ("alpha", TINY_MODEL_REPLY)
    body = {"user": "x" * 20_000, "model": "alpha", "messages": SAY_HELLO, "max_tokens": 32, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{_shared_url()}/chat/completions", json=body, timeout=120) as streamed:
        assert streamed.headers.get(shared_endpoint.VIA_HEADER) == "router"
        pieces = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    assert "".join(piece["choices"][0]["delta"].get("content") or "" for piece in pieces if piece["choices"]) == (
        TINY_MODEL_REPLY
    )


def test_a_model_that_is_not_there_gets_an_openai_404_and_no_model_named_a_400_listing_them(
    two_models: dict[str, ModelStatus],
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        rayvllm_nb.client().chat.completions.create(model="gamma", messages=SAY_HELLO, max_tokens=8)  # type: ignore[arg-type]
    assert "gamma" in str(missing.value) and missing.value.body["param"] == "model"  # type: ignore[index]
    unnamed = httpx.post(f"{_shared_url()}/chat/completions", json={"messages": SAY_HELLO}, timeout=30)
    assert unnamed.status_code == 400
    assert "alpha" in unnamed.json()["error"]["message"] and "beta" in unnamed.json()["error"]["message"]


def test_a_stream_from_one_model_survives_the_other_stopping_and_the_router_goes_with_the_last(
    two_models: dict[str, ModelStatus],
) -> None:
    finished: dict[str, Any] = {}

    def stream_from_beta() -> None:
        body = {"model": "beta", "prompt": "Say hello.", "max_tokens": 1200, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{_shared_url()}/completions", json=body, timeout=300) as response:
            finished["status"] = response.status_code
            finished["lines"] = [line for line in response.iter_lines() if line.startswith("data: {")]

    streaming = threading.Thread(target=stream_from_beta)
    streaming.start()
    rayvllm_nb.stop("alpha")
    _until_404(lambda: _chat("alpha"), "alpha, stopped")
    streaming.join(timeout=300)
    assert finished["status"] == 200
    assert '"completion_tokens":1200' in finished["lines"][-1].replace(" ", ""), finished["lines"][-1]
    assert _chat("beta").json()["choices"][0]["message"]["content"] == TINY_MODEL_REPLY

    rayvllm_nb.stop("beta")
    _until_404(lambda: httpx.get(f"{_shared_url()}/models", timeout=30), "the list of models, none left")
    applications = (ray_api.serve_details() or {}).get("applications") or {}
    assert shared_endpoint.ROUTER_APP not in applications
    assert leftovers(shared_endpoint.ROUTER_APP) == {"replica_actors": [], "placement_groups": []}
