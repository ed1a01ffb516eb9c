"""The widget panel driven headlessly: set values, click(), assert on widget state.

ipywidgets callbacks swallow exceptions, so every check is on state, never on "it did not raise".
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

import rayvllm_nb
from rayvllm_nb import DEMO_PROMPT, TINY_MODEL_REPLY, ModelStatus
from rayvllm_nb.backend import RayBackend
from rayvllm_nb.errors import ConfigError
from rayvllm_nb.types import ClusterInfo
from rayvllm_nb.widget import ChatArea, LaunchArea, Panel
from tests.conftest import REPO, leftovers

_CREATE_IN_A_FRESH_PROCESS = r"""
import time
import rayvllm_nb, ray
started = time.monotonic()
panel = rayvllm_nb.panel()
elapsed = time.monotonic() - started
time.sleep(3)  # the panel's watcher has looked at least once
assert not ray.is_initialized(), "the panel connected to Ray before Launch"
assert elapsed < 2.0, f"creating the panel took {elapsed:.2f} s (connecting to Ray takes longer: it must not)"
assert panel.launch.disabled is False and panel.stop.disabled is True and panel.send.disabled is True
assert "tiny-cpu" in panel.config.options and "model: builtin:tiny" in panel.preview.value
print(f"OK {elapsed:.2f}")
"""


@pytest.fixture
def panel() -> Iterator[Panel]:
    shown = rayvllm_nb.panel()
    yield shown
    shown.close()


@pytest.fixture
def unconnected_panel() -> Iterator[Panel]:
    """A panel over a backend of its own that is not connected (whatever this process is connected
    to, models running elsewhere do not show up in it)."""
    shown = Panel(RayBackend())
    yield shown
    shown.close()


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait for what the panel's watcher shows (it looks every 2 s)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the panel did not get there"
        time.sleep(0.2)


def test_creating_the_panel_makes_no_ray_call_and_returns_at_once() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _CREATE_IN_A_FRESH_PROCESS], capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("OK ")


def test_preview_follows_the_selected_config_and_shows_every_line(unconnected_panel: Panel) -> None:
    panel = unconnected_panel
    panel.config.value = "llama2-7b-tp2-gpu"
    assert "tensor_parallel_size: 2" in panel.preview.value
    assert panel.preview.rows > panel.preview.value.rstrip().count("\n")
    panel.config.value = "tiny-cpu"
    assert "builtin:tiny" in panel.preview.value


def test_a_launch_refused_before_connecting_ends_with_the_reason_under_launch(unconnected_panel: Panel) -> None:
    panel = unconnected_panel
    panel.model_override.value = "/no/such/model"
    panel.launch.click()
    panel.wait(30)
    assert panel.progress.value.startswith("<span style='color:#b00'>✘ ConfigError: "), panel.progress.value
    assert "/no/such/model" in panel.progress.value and "is not a config name" in panel.progress.value
    assert not panel.launch.disabled and panel.stop.disabled


def test_labels_fit_and_a_disabled_stop_does_not_look_pressable(unconnected_panel: Panel) -> None:
    panel = unconnected_panel
    assert panel.stop.disabled and panel.stop.button_style == ""
    assert panel.temperature.style.description_width == "initial"
    assert panel.max_tokens.style.description_width == "initial"
    assert panel.max_model_len.placeholder == "from config"


def test_answers_render_as_markdown_and_turns_are_told_apart_without_raw_html() -> None:
    chat = ChatArea()
    chat.show_turns([{"role": "user", "content": "Show **code**\n<script>x</script>"},
                     {"role": "assistant", "content": "Here:\n\n```python\nprint(1)\n```\n\n**done** <b>raw</b>"}])
    shown = chat.history.value
    assert "data-role='user'" in shown and "data-role='assistant'" in shown
    assert "Show **code**<br>&lt;script&gt;" in shown, "the user's text is shown as typed"
    assert '<pre><code class="language-python">print(1)' in shown and "<strong>done</strong>" in shown
    assert "<b>raw</b>" not in shown and "<script>" not in shown
    assert "column-reverse" in shown, "the newest turn is in view"


def test_a_name_of_its_own_is_a_served_model_name_override() -> None:
    area = LaunchArea()
    assert "served_model_name" not in area.overrides()
    area.served_name.value = " second "
    assert area.overrides()["served_model_name"] == "second"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_model_len", "lots", "Max len 'lots' is not a number of tokens"),
        ("model_override", "tiny-cpu", "'tiny-cpu' is a config, not a model"),
        ("model_override", "/no/such/model", "'/no/such/model' is not a config name"),
    ],
)
def test_launch_settings_are_checked_before_anything_starts(field: str, value: str, message: str) -> None:
    area = LaunchArea()
    getattr(area, field).value = value
    with pytest.raises(ConfigError, match=message):
        area.overrides()


@pytest.mark.slow
def test_a_model_started_elsewhere_is_followed_picked_and_chatted_with(shared_tiny: ModelStatus, panel: Panel) -> None:
    """The chat on the shared model (launching from the panel is walked in the browser test): Enter,
    the context shown, Regenerate, a turn that does not fit (nothing kept, the text stays), Clear."""
    eventually(lambda: shared_tiny.name in panel.model.options)
    panel.model.value = shared_tiny.name
    eventually(lambda: panel.progress.value.startswith(f"{shared_tiny.name} ready at "))
    assert "RUNNING" in panel.status.value and "<table>" in panel.status.value
    assert "column-reverse" in panel.log_tail.value and re.search(r"(^|\s)INFO ", panel.log_tail.value, re.M)
    assert "node(s)" in panel.cluster.value
    assert (panel.stop.disabled, panel.send.disabled) == (False, False)

    panel.system_prompt.value = "You are terse."
    panel.message.value = DEMO_PROMPT
    panel.message.submits += 1  # Enter in the message box
    panel.wait(120)
    assert panel.chat_error.value == "", panel.chat_error.value
    assert panel.conversation.turns[-1] == {"role": "assistant", "content": TINY_MODEL_REPLY}
    assert panel.history.value.count("data-role=") == 2 and TINY_MODEL_REPLY in panel.history.value
    assert "TTFT" in panel.chat_stats.value and "tok/s" in panel.chat_stats.value
    assert "context " in panel.chat_area.context.value and "/ 2048 tokens" in panel.chat_area.context.value
    assert panel.message.value == "" and panel.stop_generating.disabled and not panel.regenerate.disabled

    eventually(lambda: f"data-live='{shared_tiny.name}'" in panel.status_area.live.value)
    assert "KV cache" in panel.status_area.live.value and " tok/s " in panel.status_area.live.value

    panel.regenerate.click()
    panel.wait(120)
    assert len(panel.conversation.turns) == 2 and panel.conversation.turns[-1]["content"] == TINY_MODEL_REPLY

    panel.system_prompt.value = " ".join(["word"] * 3000)
    panel.message.value = "A message that does not fit."
    panel.send.click()
    panel.wait(120)
    assert "fills the model&#x27;s context" in panel.chat_error.value, panel.chat_error.value
    assert len(panel.conversation.turns) == 2 and panel.history.value.count("data-role=") == 2
    assert panel.message.value == "A message that does not fit.", "the typed text is kept"

    panel.clear.click()
    assert (panel.history.value, panel.chat_stats.value, panel.chat_error.value,
            panel.chat_area.context.value, panel.conversation.turns) == ("", "", "", "", [])


@pytest.mark.slow
def test_a_failed_launch_ends_with_vllms_reason_under_launch_and_leaves_nothing(
    cluster: ClusterInfo, panel: Panel
) -> None:
    panel.config.value = "tiny-cpu"
    panel.max_model_len.value = "100000"
    panel.launch.click()
    panel.wait(600)
    assert panel.progress.value.startswith("<span style='color:#b00'>✘ DeploymentError: "), panel.progress.value
    assert "max_model_len" in panel.progress.value and "100000" in panel.progress.value, panel.progress.value
    assert not panel.launch.disabled and panel.model.value != "tiny"
    assert panel.tensor_parallel.max == cluster.resources["CPU"], "TP is bounded by the node's CPUs in CPU mode"
    assert "tiny" not in [model.name for model in rayvllm_nb.status().models]
    time.sleep(3)
    assert "✘" in panel.progress.value, "the watcher must not hide the failure"


@pytest.mark.slow
def test_stop_cancels_a_launch_and_nothing_of_it_runs(cluster: ClusterInfo, panel: Panel) -> None:
    panel.config.value = "tiny-cpu"
    panel.launch.click()
    eventually(lambda: "starting the engine" in panel.progress.value, timeout=120)
    panel.stop.click()
    panel.wait(120)
    assert "launch of tiny cancelled; nothing of it runs" in panel.progress.value, panel.progress.value
    assert "tiny" not in [model.name for model in rayvllm_nb.status().models]
    eventually(lambda: leftovers("tiny") == {"replica_actors": [], "placement_groups": []}, timeout=60)
    assert not panel.launch.disabled


_SHUTDOWN_UNDER_THE_PANEL = r"""
import time
import ray
import rayvllm_nb
rayvllm_nb.init()
panel = rayvllm_nb.panel()
deadline = time.monotonic() + 30
while "node(s)" not in panel.cluster.value:
    assert time.monotonic() < deadline, "the panel never showed the cluster"
    time.sleep(0.2)
rayvllm_nb.shutdown()
deadline = time.monotonic() + 15
while "Not connected" not in panel.progress.value:
    assert time.monotonic() < deadline, panel.progress.value
    time.sleep(0.2)
assert panel.send.disabled and panel.stop.disabled and not panel.launch.disabled
panel.message.value = "hello"
panel.send.click()
time.sleep(3)
assert not ray.is_initialized(), "Send connected to Ray again"
print("OK")
"""


@pytest.mark.slow
def test_after_shutdown_the_panel_says_so_and_send_starts_nothing(cluster: ClusterInfo) -> None:
    result = subprocess.run([sys.executable, "-c", _SHUTDOWN_UNDER_THE_PANEL], capture_output=True, text=True,
                            timeout=180, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-2000:]
