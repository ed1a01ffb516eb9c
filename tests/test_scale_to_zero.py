"""A model that scales to zero (``autoscaling.min_replicas: 0``): it loads once at start, gives its
replica up when idle (status says so, nothing of it runs), is still listed without being woken,
and the next request waits while a replica loads, then is answered."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import rayvllm_nb
from rayvllm_nb import DEMO_PROMPT, TINY_MODEL_REPLY
from rayvllm_nb._internal.shared_endpoint import ROUTER_APP
from rayvllm_nb.types import ClusterInfo, ModelStatus
from tests.conftest import leftovers, model_processes, tiny_running, until_model

pytestmark = pytest.mark.slow

NAME = "sleepy"


@pytest.fixture(scope="module")
def sleepy(cluster: ClusterInfo) -> Iterator[ModelStatus]:
    """The tiny model between 0 and 1 replica, its replica given up after 5 idle seconds."""
    with tiny_running([f"served_model_name={NAME}", "autoscaling.min_replicas=0", "autoscaling.max_replicas=1",
                       "autoscaling.downscale_to_zero_delay_s=5"]) as status:
        yield status


def test_an_idle_model_scales_to_zero_says_so_and_the_next_request_wakes_it(sleepy: ModelStatus) -> None:
    assert sleepy.replica_states == {"RUNNING": 1}, "a model that scales to zero loads one replica at start"
    assert "autoscaling 0-1 replicas, 2 requests each" in str(rayvllm_nb.status())
    until_model(NAME, lambda: rayvllm_nb.model_status(NAME).scaled_to_zero, 120,
                "not scaled to zero after 5 idle seconds")
    until_model(NAME, lambda: model_processes(NAME) == [], 30, "its vLLM engine still runs")
    status = rayvllm_nb.model_status(NAME)
    assert status.ready and "none: scaled to zero, the next request waits for a replica to load" in status.summary()
    assert "scaled to zero" in rayvllm_nb.status()._repr_html_()
    assert leftovers(status.app_name)["replica_actors"] == []

    listed = rayvllm_nb.client().models.list()
    assert NAME in [card.id for card in listed.data], "a model scaled to zero is still listed"
    time.sleep(3)
    assert rayvllm_nb.model_status(NAME).scaled_to_zero, "listing the models woke it"

    started = time.monotonic()
    reply = rayvllm_nb.client().chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": DEMO_PROMPT}], temperature=0, max_tokens=64,
    )
    assert reply.choices[0].message.content == TINY_MODEL_REPLY
    assert time.monotonic() - started > 5, "answered at once: no replica loaded for it"
    assert rayvllm_nb.model_status(NAME).replica_states == {"RUNNING": 1}


def test_stopped_it_leaves_nothing_and_the_router_goes_with_it(sleepy: ModelStatus) -> None:
    rayvllm_nb.stop(NAME)
    assert NAME not in [model.name for model in rayvllm_nb.status().models]
    assert leftovers(sleepy.app_name) == {"replica_actors": [], "placement_groups": []}
    assert leftovers(ROUTER_APP)["replica_actors"] == [], "the router goes with the last model that needs it"
