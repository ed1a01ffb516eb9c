"""The widget panel driven headlessly: set values, click(), assert on widget state.

ipywidgets callbacks swallow exceptions, so every check is on state, never on "it did not raise".
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import rayvllm_nb
from rayvllm_nb import DEMO_PROMPT, TINY_MODEL_REPLY
from rayvllm_nb.types import ClusterInfo
from tests.conftest import REPO, serve_port

_CREATE_IN_A_FRESH_PROCESS = r"""
import time
import rayvllm_nb, ray
started = time.monotonic()
panel = rayvllm_nb.panel()
elapsed = time.monotonic() - started
assert not ray.is_initialized(), "creating the panel connected to Ray"
assert elapsed < 2.0, f"creating the panel took {elapsed:.2f} s (connecting to Ray takes longer: it must not)"
assert panel.launch.disabled is False and panel.stop.disabled is True and panel.send.disabled is True
assert "tiny-cpu" in panel.config.options and "model: builtin:tiny" in panel.preview.value
print(f"OK {elapsed:.2f}")
"""


def test_creating_the_panel_makes_no_ray_call_and_returns_at_once() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _CREATE_IN_A_FRESH_PROCESS], capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("OK ")


def test_preview_follows_the_selected_config() -> None:
    panel = rayvllm_nb.panel()
    panel.config.value = "llama2-7b-tp2-gpu"
    assert "tensor_parallel_size: 2" in panel.preview.value
    panel.config.value = "tiny-cpu"
    assert "builtin:tiny" in panel.preview.value


@pytest.mark.slow
def test_launch_chat_and_stop_from_the_panel(cluster: ClusterInfo) -> None:
    panel = rayvllm_nb.panel()
    panel.config.value = "tiny-cpu"
    panel.model_override.value = ""
    panel.launch.click()
    assert panel.launch.disabled, "Launch must be disabled while loading"
    panel.wait(600)
    assert panel.error.value == "", panel.error.value
    assert f"tiny ready at http://127.0.0.1:{serve_port()}/v1" in panel.progress.value
    assert "RUNNING" in panel.status.value and "<table>" in panel.status.value
    assert panel.log_tail.value.strip()
    assert "node(s)" in panel.cluster.value
    assert panel.tensor_parallel.max == cluster.resources["CPU"]
    assert (panel.launch.disabled, panel.stop.disabled, panel.send.disabled) == (True, False, False)
    try:
        panel.system_prompt.value = "You are terse."
        panel.message.value = DEMO_PROMPT
        panel.send.click()
        panel.wait(120)
        assert panel.error.value == "", panel.error.value
        assert f"<b>assistant:</b> {TINY_MODEL_REPLY}" in panel.history.value
        assert f"<b>user:</b> {DEMO_PROMPT}" in panel.history.value
        assert "TTFT" in panel.chat_stats.value and "tok/s" in panel.chat_stats.value
        assert panel.message.value == "" and panel.stop_generating.disabled

        panel.max_tokens.value = 30000
        panel.message.value = DEMO_PROMPT
        panel.send.click()
        panel.wait(120)
        assert "max_tokens" in panel.error.value, "an engine error must be shown in the panel"

        panel.clear.click()
        assert panel.history.value == "" and panel.chat_stats.value == ""
    finally:
        panel.stop.click()
        panel.wait(120)
    assert "tiny" not in [model.name for model in rayvllm_nb.status().models]
    assert panel.progress.value == "tiny stopped." and ">tiny<" not in panel.status.value
    assert (panel.launch.disabled, panel.stop.disabled, panel.send.disabled) == (False, True, True)
