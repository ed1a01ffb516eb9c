"""End to end on CPU: real Ray, real Serve, a real vLLM engine serving the tiny model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

import rayvllm_nb
from rayvllm_nb import DEMO_PROMPT, TINY_MODEL_REPLY, ModelStatus
from rayvllm_nb._internal.cluster import ClusterInfo
from rayvllm_nb.errors import NotDeployedError
from tests.conftest import leftovers

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": DEMO_PROMPT}]


@pytest.fixture(scope="module")
def tiny(cluster: ClusterInfo) -> Iterator[ModelStatus]:
    stages: list[str] = []
    status = rayvllm_nb.start("tiny-cpu", wait_ready=True, timeout=600, on_progress=lambda p: stages.append(p.stage))
    assert stages[-1] == "ready" and "starting the engine (loading the model)" in stages
    try:
        yield status
    finally:
        if status.name in [m.name for m in rayvllm_nb.status().models]:
            rayvllm_nb.stop(status.name)


def test_ready_status_names_model_device_and_endpoint(tiny: ModelStatus) -> None:
    assert tiny.ready and tiny.status == "RUNNING"
    assert (tiny.name, tiny.device, tiny.tensor_parallel_size) == ("tiny", "cpu", 1)
    assert tiny.replica_states == {"RUNNING": 1}
    assert tiny.base_url == "http://127.0.0.1:8000/v1"


def test_chat_answers_the_known_sentence(tiny: ModelStatus) -> None:
    reply = rayvllm_nb.client().chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=64)
    assert reply.choices[0].message.content == TINY_MODEL_REPLY
    assert reply.choices[0].finish_reason == "stop"


def test_completions_with_the_chat_prompt_continue_with_the_known_sentence(tiny: ModelStatus) -> None:
    prompt = "<|begin|><|user|>Say hello.<|end|><|assistant|>"
    reply = rayvllm_nb.client().completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=64)
    assert reply.choices[0].text == TINY_MODEL_REPLY


def test_streaming_arrives_in_order_and_ends_with_done(tiny: ModelStatus) -> None:
    body = {"model": "tiny", "messages": CHAT, "temperature": 0, "max_tokens": 64, "stream": True}
    events: list[str] = []
    with httpx.stream("POST", f"{tiny.base_url}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    pieces = [chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"]]
    assert len([p for p in pieces if p]) > 3
    assert "".join(pieces) == TINY_MODEL_REPLY


def test_models_lists_the_served_name(tiny: ModelStatus) -> None:
    assert [m.id for m in rayvllm_nb.client().models.list().data] == ["tiny"]


def test_status_shows_cluster_serve_and_the_model(tiny: ModelStatus, cluster: ClusterInfo) -> None:
    status = rayvllm_nb.status()
    assert status.cluster.address == cluster.address and status.serve_running
    assert status.http_address == "127.0.0.1:8000"
    assert [(m.name, m.status) for m in status.models] == [("tiny", "RUNNING")]
    assert "tiny: RUNNING (ready)" in str(status)


def test_blocking_facade_works_inside_a_running_event_loop(tiny: ModelStatus) -> None:
    async def notebook_cell() -> tuple[str, str]:
        blocking = rayvllm_nb.model_status("tiny").status
        client = rayvllm_nb.async_client()
        reply = await client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=64)
        await client.close()
        return blocking, reply.choices[0].message.content

    assert asyncio.run(notebook_cell()) == ("RUNNING", TINY_MODEL_REPLY)


def test_async_and_blocking_facades_share_one_state(tiny: ModelStatus) -> None:
    async def mixed() -> tuple[object, object]:
        awaited = await rayvllm_nb.ray_backend.get_status()
        return awaited, rayvllm_nb.status()

    awaited, blocked = asyncio.run(mixed())
    assert awaited.cluster == blocked.cluster == rayvllm_nb.ray_backend.cluster
    assert awaited.models == blocked.models


def test_unknown_model_name_is_a_clear_not_deployed_error(tiny: ModelStatus) -> None:
    with pytest.raises(NotDeployedError, match="No model named 'nope' is deployed \\(running: tiny\\)"):
        rayvllm_nb.stop("nope")


def test_stop_leaves_no_app_placement_group_or_replica_actor(tiny: ModelStatus) -> None:
    assert leftovers(tiny.app_name)["replica_actors"], "the running model should have replica actors"
    assert rayvllm_nb.stop() == "tiny"
    assert rayvllm_nb.status().models == []
    from ray import serve

    assert tiny.app_name not in serve.status().applications
    assert leftovers(tiny.app_name) == {"replica_actors": [], "placement_groups": []}
