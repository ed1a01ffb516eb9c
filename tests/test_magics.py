"""The magics through a bare InteractiveShell (no kernel): each subcommand and each error."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import rayvllm_nb
from rayvllm_nb import TINY_MODEL_REPLY
from rayvllm_nb.types import ClusterInfo


@pytest.fixture(scope="module")
def ip() -> Iterator[InteractiveShell]:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "rayvllm_nb")
    yield shell
    shell.run_line_magic("unload_ext", "rayvllm_nb")


def test_load_unload_and_reload_register_and_remove_the_magics(ip: InteractiveShell) -> None:
    assert ip.find_line_magic("rayvllm") and ip.find_cell_magic("chat")
    ip.run_line_magic("unload_ext", "rayvllm_nb")
    assert ip.find_line_magic("rayvllm") is None and ip.find_cell_magic("chat") is None
    ip.run_line_magic("load_ext", "rayvllm_nb")
    ip.run_line_magic("reload_ext", "rayvllm_nb")
    assert ip.find_line_magic("rayvllm") and ip.find_cell_magic("chat")


def test_help_describes_every_command_its_options_defaults_configs_and_examples(ip: InteractiveShell) -> None:
    doc = ip.find_line_magic("rayvllm").__doc__
    for word in ("init", "start", "CONFIG_OR_MODEL", "--tp", "status", "logs", "stop", "panel", "%%chat"):
        assert word in doc
    with capture_output() as captured:
        ip.run_line_magic("rayvllm", "help")
    for text in ("--no-wait          return once deployed", "seconds to wait until it answers (default: 900.0)",
                 "configs: ", "tiny-cpu", "%rayvllm start tiny-cpu --set max_model_len=512", "%rayvllm stop --all",
                 "longest answer, in tokens (default: 128)"):
        assert text in captured.stdout, text
    with capture_output() as one:
        ip.run_line_magic("rayvllm", "help logs")
    assert one.stdout.startswith("usage: %rayvllm logs") and "%rayvllm start" not in one.stdout


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("start", "the following arguments are required: CONFIG_OR_MODEL"),
        ("launch tiny", "invalid choice: 'launch'"),
        ("start tiny-cpu --tp two", "invalid int value: 'two'"),
        ("start tiny-cpu --set tensor_paralel_size=2", "did you mean 'tensor_parallel_size'"),
        ("logs -n", "expected one argument"),
        ('start "unbalanced', "No closing quotation"),
        ("stauts", r"did you mean 'status'\?"),
        ("help stauts", r"no command 'stauts' \(did you mean 'status'\?\)"),
        ("start tiny-cup", r"'tiny-cup' is not a config name \(did you mean 'tiny-cpu'\?\)"),
        ("start tiny-cpu --set max_model_len=-5", r"max_model_len=-5 \(your override\): "),
    ],
)
def test_bad_arguments_are_one_line_usage_errors_before_anything_deploys(
    ip: InteractiveShell, line: str, message: str
) -> None:
    started = time.monotonic()
    with pytest.raises(UsageError, match=message):
        ip.run_line_magic("rayvllm", line)
    assert time.monotonic() - started < 10, "refused only after trying to deploy"


def test_usage_errors_show_one_line_without_traceback(ip: InteractiveShell) -> None:
    with capture_output() as captured:
        result = ip.run_cell("%rayvllm start")
    assert isinstance(result.error_in_exec, UsageError)
    assert "Traceback" not in captured.stdout + captured.stderr


def test_chat_cell_needs_text(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="the cell is empty"):
        ip.run_cell_magic("chat", "", "   ")


@pytest.mark.slow
def test_missing_deployment_is_a_usage_error(ip: InteractiveShell, cluster: ClusterInfo) -> None:
    with pytest.raises(UsageError, match="No model named 'nope' is deployed"):
        ip.run_line_magic("rayvllm", "stop nope")
    with pytest.raises(UsageError, match="No model named 'nope' is deployed"):
        ip.run_cell_magic("chat", "--model nope", "Say hello.")


@pytest.mark.slow
def test_init_and_status_render_html_and_text(ip: InteractiveShell, cluster: ClusterInfo) -> None:
    info = ip.run_line_magic("rayvllm", "init")
    assert info.address == cluster.address
    status = ip.run_line_magic("rayvllm", "status")
    assert "<p><b>Ray</b>" in status._repr_html_() and cluster.address in status._repr_html_()
    assert f"cluster  {cluster.address}" in str(status) and "versions rayvllm_nb" in str(status)


@pytest.mark.slow
def test_start_no_wait_returns_before_the_model_is_ready(ip: InteractiveShell, cluster: ClusterInfo) -> None:
    started = time.monotonic()
    early = ip.run_line_magic("rayvllm", "start tiny-cpu --name nb-early --no-wait")
    try:
        # It returned while the engine still loads (no replica runs yet), not after a time bound: on a
        # loaded 2-core machine the deploy call alone took 28 s.
        took = f"returned after {time.monotonic() - started:.0f} s"
        assert not early.status.ready and "RUNNING" not in early.status.replica_states, (took, early.status)
        assert str(early).startswith("nb-early deploying at http://127.0.0.1:")
    finally:  # a failure here must not leave nb-early holding a CPU of the worker's cluster
        with capture_output() as captured:
            ip.run_line_magic("rayvllm", "stop nb-early")
    assert captured.stdout.strip() == "stopped nb-early"
    assert "nb-early" not in [model.name for model in rayvllm_nb.status().models]


@pytest.mark.slow
def test_start_chat_logs_stop(ip: InteractiveShell, cluster: ClusterInfo) -> None:
    with capture_output() as captured:
        started = ip.run_line_magic("rayvllm", "start tiny-cpu --name nb-tiny --tp 1")
    assert started.status.ready and started.status.name == "nb-tiny"
    assert re.fullmatch(rf"nb-tiny ready at {re.escape(started.status.base_url)} in \d+ s", str(started))
    assert "loading nb-tiny" in captured.stderr and "starting the engine" in captured.stderr
    try:
        with capture_output() as chat:
            ip.run_cell_magic("chat", "--model nb-tiny --max-tokens 64 --system 'Be brief.'", "Say hello.")
        markdown = [o.data.get("text/markdown", "") for o in chat.outputs]
        assert TINY_MODEL_REPLY in markdown
        assert any("TTFT" in text and "tok/s" in text for text in markdown)

        with capture_output() as logs:
            ip.run_line_magic("rayvllm", "logs nb-tiny -n 7")
        assert len(logs.stdout.strip().splitlines()) == 7

        html = ip.run_line_magic("rayvllm", "status")._repr_html_()
        assert "<table>" in html and "nb-tiny" in html and "RUNNING" in html
        metrics = ip.run_line_magic("rayvllm", "metrics nb-tiny")
        assert metrics.name == "nb-tiny" and metrics.generation_tokens_total > 0, metrics
        assert "generation_tok_s" in metrics._repr_html_()
    finally:
        with capture_output() as stopped:
            ip.run_line_magic("rayvllm", "stop nb-tiny")
    assert stopped.stdout.strip() == "stopped nb-tiny"
