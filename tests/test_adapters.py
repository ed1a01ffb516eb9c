"""LoRA adapters on a real engine: one from the config, one loaded at run time, both answered at the
shared endpoint by name; bad folders refused with the reason; a replica started later serves them."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import rayvllm_nb
from rayvllm_nb import TINY_ADAPTER_REPLY, TINY_MODEL_REPLY
from rayvllm_nb._internal import ray_api, shared_endpoint
from rayvllm_nb.backend import RayBackend
from rayvllm_nb.errors import ConfigError, DeploymentError, NotDeployedError
from rayvllm_nb.tiny_model import TINY_ADAPTER_REF, tiny_adapter_path, tiny_model_path
from rayvllm_nb.types import ClusterInfo, ModelStatus
from rayvllm_nb.widget import Panel
from tests._suite import serve_port
from tests.conftest import run_cli, tiny_running

pytestmark = pytest.mark.slow

NAME = "lora-tiny"
SAY_HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def lora_model(cluster: ClusterInfo) -> Iterator[ModelStatus]:
    """The tiny model with the tiny adapter (as `hello-adapter`) from its config, at the shared endpoint."""
    with tiny_running([f"served_model_name={NAME}", "max_model_len=512", "max_lora_rank=8",
                       f"lora_adapters.hello-adapter={TINY_ADAPTER_REF}"]) as status:
        yield status


def _answer(model: str) -> httpx.Response:
    body = {"model": model, "messages": SAY_HELLO, "max_tokens": 32, "temperature": 0}
    return httpx.post(f"http://127.0.0.1:{serve_port()}/v1/chat/completions", json=body, timeout=120)


def _reply(model: str) -> str:
    response = _answer(model)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_the_base_and_its_adapter_answer_their_own_sentences_at_one_endpoint(lora_model: ModelStatus) -> None:
    assert _reply(NAME) == TINY_MODEL_REPLY
    through_adapter = _answer("hello-adapter")
    assert through_adapter.json()["choices"][0]["message"]["content"] == TINY_ADAPTER_REPLY
    assert shared_endpoint.VIA_HEADER not in through_adapter.headers, "HAProxy's map should route the adapter too"
    cards = {card.id: card for card in rayvllm_nb.client().models.list().data}
    assert cards["hello-adapter"].parent == NAME  # type: ignore[attr-defined]
    assert rayvllm_nb.model_status(NAME).adapters == {"hello-adapter": TINY_ADAPTER_REF}
    assert "adapters=hello-adapter" in str(rayvllm_nb.status())


def test_an_adapter_loaded_at_run_time_is_served_listed_and_unloaded(lora_model: ModelStatus, tmp_path: Path) -> None:
    second = tmp_path / "second-adapter"
    shutil.copytree(tiny_adapter_path(), second)
    assert rayvllm_nb.load_adapter("second", str(second)) == "second"
    assert _reply("second") == TINY_ADAPTER_REPLY
    listed = run_cli("adapter", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"second -> {NAME} ({second})" in listed.stdout and f"hello-adapter -> {NAME}" in listed.stdout
    unloaded = run_cli("adapter", "unload", "second")
    assert (unloaded.returncode, unloaded.stdout.strip()) == (0, "second unloaded"), unloaded.stderr
    gone = _answer("second")
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
    with pytest.raises(NotDeployedError, match="No adapter named 'second'"):
        rayvllm_nb.unload_adapter("second")


def test_folders_that_are_not_adapters_of_this_model_are_refused_with_the_reason(
    lora_model: ModelStatus, tmp_path: Path,
) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=f"Adapter folder '{missing}' does not exist"):
        rayvllm_nb.load_adapter("ghost", str(missing))
    with pytest.raises(ConfigError, match=r"has no adapter_config\.json"):
        rayvllm_nb.load_adapter("not-an-adapter", str(tiny_model_path()))
    too_wide = tmp_path / "rank-16"
    shutil.copytree(tiny_adapter_path(), too_wide)
    config = json.loads((too_wide / "adapter_config.json").read_text())
    (too_wide / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    with pytest.raises(DeploymentError, match=r"Adapter 'wide' \(.*rank-16\) could not be loaded .*vLLM said: .*16"):
        rayvllm_nb.load_adapter("wide", str(too_wide))
    assert "wide" not in rayvllm_nb.model_status(NAME).adapters, "a refused adapter stays registered nowhere"
    assert _answer("wide").status_code == 404
    with pytest.raises(ConfigError, match="already names a model"):
        rayvllm_nb.load_adapter(NAME, str(tiny_adapter_path()))


def test_a_model_without_lora_refuses_adapters_saying_how_to_turn_it_on(shared_tiny: ModelStatus) -> None:
    with pytest.raises(ConfigError, match=r"runs without LoRA.*enable_lora: true"):
        rayvllm_nb.load_adapter("hello", TINY_ADAPTER_REF, shared_tiny.name)


def test_a_replica_started_later_serves_the_adapters_loaded_before_it(lora_model: ModelStatus, tmp_path: Path) -> None:
    import ray

    later = tmp_path / "later-adapter"
    shutil.copytree(tiny_adapter_path(), later)
    rayvllm_nb.load_adapter("later", str(later))
    [replica] = [
        r for app in ray_api.serve_details()["applications"].values() for d in app["deployments"].values()
        for r in d["replicas"] if d["name"].endswith(f":{NAME}")
    ]
    try:
        ray.kill(ray.get_actor(replica["actor_name"], namespace="serve"), no_restart=True)
        deadline = time.monotonic() + 300
        while True:
            status = rayvllm_nb.model_status(NAME)
            fresh = [r for r in status.replicas if r.state == "RUNNING" and r.replica_id != replica["replica_id"]]
            if fresh:
                break
            assert time.monotonic() < deadline, f"no new replica after 5 minutes: {status}"
            time.sleep(1)
        assert fresh[0].adapters == {"hello-adapter": "", "later": ""}
        # HAProxy routes to the new replica once its health check passes, a moment after Serve calls it
        # RUNNING; meanwhile the endpoint answers 503 with Retry-After, as a client is told to expect.
        deadline = time.monotonic() + 60
        while (first := _answer("later")).status_code == 503:
            assert time.monotonic() < deadline, f"the new replica was not routed to within 60 s: {first.text}"
            time.sleep(1)
        assert first.status_code == 200, first.text
        assert first.json()["choices"][0]["message"]["content"] == TINY_ADAPTER_REPLY
        assert _reply("hello-adapter") == TINY_ADAPTER_REPLY
    finally:
        rayvllm_nb.unload_adapter("later")


def test_the_panel_offers_the_models_adapters_and_answers_as_the_one_picked(lora_model: ModelStatus) -> None:
    panel = Panel(RayBackend())
    try:
        panel.show(NAME)
        panel.wait(60)
        assert [value for _, value in panel.answer_as.options] == [NAME, "hello-adapter"]
        assert panel.answer_as.layout.display == "flex"
        panel.answer_as.value = "hello-adapter"
        panel.message.value = "Say hello."
        panel.send.click()
        panel.wait(120)
        assert panel.chat_error.value == "", panel.chat_error.value
        assert panel.conversation.turns[-1] == {"role": "assistant", "content": TINY_ADAPTER_REPLY}
        panel.answer_as.value = NAME
        panel.message.value = "Say hello."
        panel.send.click()
        panel.wait(120)
        assert panel.conversation.turns[-1] == {"role": "assistant", "content": TINY_MODEL_REPLY}
    finally:
        panel.close()


def test_the_panel_launches_a_second_model_beside_the_first_at_the_same_endpoint(lora_model: ModelStatus) -> None:
    panel = Panel(RayBackend())
    try:
        panel.config.value = "tiny-cpu"
        panel.served_name.value = "beside"
        panel.launch.click()
        panel.wait(600)
        assert "beside ready at " in panel.progress.value, panel.progress.value
        assert {NAME, "beside"} <= set(panel.model.options)
        assert rayvllm_nb.model_status("beside").base_url == lora_model.base_url, "one endpoint for both"
        panel.message.value = "Say hello."
        panel.send.click()
        panel.wait(120)
        assert panel.conversation.turns[-1] == {"role": "assistant", "content": TINY_MODEL_REPLY}
        panel.stop.click()
        panel.wait(120)
        assert [model.name for model in rayvllm_nb.status().models].count(NAME) == 1
        assert "beside" not in [model.name for model in rayvllm_nb.status().models]
    finally:
        panel.close()
        if "beside" in [model.name for model in rayvllm_nb.status().models]:
            rayvllm_nb.stop("beside")
