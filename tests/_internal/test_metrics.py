"""Live metrics: vLLM's Prometheus text read into numbers, exact after a known load on the shared
model, and `rayvllm top` in a pseudo-terminal (CI has no terminal)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import threading
import time

import pytest

import rayvllm_nb
from rayvllm_nb import ModelStatus
from rayvllm_nb._internal.metrics import parse, quantile
from rayvllm_nb._internal.top import render
from rayvllm_nb.types import ModelMetrics
from tests.conftest import REPO

# What a vLLM replica's registry shows (two label sets, as with two engines), abridged.
_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 2.0
vllm:num_requests_running{engine="1",model_name="tiny"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 120.0
vllm:prompt_tokens_created{engine="0",model_name="tiny"} 1.7e9
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="tiny"} 640.0
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="tiny"} 3.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="tiny"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.02",model_name="tiny"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.04",model_name="tiny"} 10.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 10.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny"} 10.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny"} 0.25
"""


def test_a_replicas_page_becomes_its_numbers_summed_over_label_sets() -> None:
    sample = parse(_PAGE, at=5.0)
    assert (sample.running, sample.waiting, sample.kv_cache_usage) == (3.0, 4.0, 0.25)
    assert (sample.prompt_tokens, sample.generation_tokens, sample.preemptions) == (120.0, 640.0, 3.0)
    assert sample.ttft_buckets == ((0.01, 0.0), (0.02, 4.0), (0.04, 10.0), (float("inf"), 10.0))
    assert sample.itl_buckets == ()


def test_quantiles_interpolate_inside_the_bucket_as_prometheus_does() -> None:
    buckets = [(0.01, 0.0), (0.02, 4.0), (0.04, 10.0), (float("inf"), 10.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.02 + 0.02 * (1 / 6))
    assert quantile(buckets, 0.2) == pytest.approx(0.015)
    assert quantile([], 0.5) == 0.0 and quantile([(1.0, 0.0), (float("inf"), 0.0)], 0.5) == 0.0
    assert quantile([(0.1, 0.0), (float("inf"), 2.0)], 0.5) == 0.1, "beyond the last bound: that bound"


def test_a_model_without_replicas_reads_zeros_and_top_renders_a_row_per_model() -> None:
    empty = ModelMetrics.of("tiny", [])
    assert (empty.requests_running, empty.generation_tokens_total, empty.kv_cache_usage) == (0, 0, 0.0)
    screen = render([empty], "12:00:00")
    assert screen.startswith("rayvllm top  12:00:00  (q quits)") and "\ntiny " in screen
    assert "no model deployed" in render([], "12:00:00")


@pytest.mark.slow
def test_after_a_known_load_the_counts_are_exact_and_nothing_runs(shared_tiny: ModelStatus) -> None:
    before = rayvllm_nb.metrics(shared_tiny.name)
    client = rayvllm_nb.client(shared_tiny.name)
    usages = []
    for index in range(6):
        reply = client.chat.completions.create(
            model=shared_tiny.name, messages=[{"role": "user", "content": f"Count to {index}."}],
            max_tokens=16 + index, temperature=0, extra_body={"ignore_eos": True},
        )
        assert reply.usage is not None
        usages.append(reply.usage)
    time.sleep(5)
    after = rayvllm_nb.metrics(shared_tiny.name)
    assert after.generation_tokens_total - before.generation_tokens_total == sum(u.completion_tokens for u in usages)
    assert after.prompt_tokens_total - before.prompt_tokens_total == sum(u.prompt_tokens for u in usages)
    assert after.requests_running == 0 and after.requests_waiting == 0
    assert 0.0 <= after.kv_cache_usage <= 1.0 and after.ttft_p50_ms > 0 and after.itl_p50_ms > 0
    assert len(after.replicas) == 1 and after.replicas[0].generation_tokens_total == after.generation_tokens_total
    frame = after.to_frame()
    assert list(frame.index) == [after.replicas[0].replica_id, "total"]
    assert "<table>" in after._repr_html_() and f"{after.generation_tokens_total}" in after._repr_html_()


@pytest.mark.slow
def test_tok_s_shows_a_running_load(shared_tiny: ModelStatus) -> None:
    client = rayvllm_nb.client(shared_tiny.name)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            client.chat.completions.create(model=shared_tiny.name, messages=[{"role": "user", "content": "Go."}],
                                           max_tokens=64, temperature=0, extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        reads = []
        for _ in range(6):
            reads.append(rayvllm_nb.metrics(shared_tiny.name))
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert all(read.generation_tok_s > 0 for read in reads[1:]), reads
    assert max(read.requests_running for read in reads) >= 1, reads


@pytest.mark.slow
def test_rayvllm_top_redraws_each_second_and_quits_on_q(shared_tiny: ModelStatus) -> None:
    controller, terminal = pty.openpty()
    top = subprocess.Popen([sys.executable, "-m", "rayvllm_nb.cli", "top"], stdin=terminal, stdout=terminal,
                           stderr=subprocess.PIPE, cwd=REPO, start_new_session=True)
    os.close(terminal)
    shown = b""
    try:
        deadline = time.monotonic() + 120
        while shown.count(b"rayvllm top ") < 3:
            assert time.monotonic() < deadline and top.poll() is None, shown[-2000:]
            if select.select([controller], [], [], 1.0)[0]:
                shown += os.read(controller, 65536)
        os.write(controller, b"q")
        assert top.wait(timeout=15) == 0
    finally:
        if top.poll() is None:
            top.kill()
        os.close(controller)
    assert shared_tiny.name.encode() in shown and b"tok/s" in shown and b"\x1b[2J" in shown
