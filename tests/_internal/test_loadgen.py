"""The streaming load generator: prompts, statistics, and failed requests recorded, never raised.

The server tests run it against vLLM's own OpenAI server on the tiny model (one start, ~30 s).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest

from rayvllm_nb._internal.loadgen import LoadResult, RequestRecord, make_prompts, run_load, warm_up
from rayvllm_nb._internal.vllm_alone import VllmAloneServer
from rayvllm_nb.errors import DeploymentError
from tests._internal.conftest import free_test_port, living_group_members, tiny_server


def test_prompts_are_distinct_deterministic_and_about_the_asked_length() -> None:
    prompts = make_prompts(50, 30, seed=7)
    assert prompts == make_prompts(50, 30, seed=7)
    assert len(set(prompts)) == 50
    assert {len(prompt.split()) for prompt in prompts} == {30}
    assert [prompt.split()[1] for prompt in prompts[:3]] == ["7-0:", "7-1:", "7-2:"]
    assert not set(make_prompts(50, 30, seed=8)) & set(prompts)


def _record(ttft_s: float | None, e2e_s: float, tokens: int, error: str | None = None) -> RequestRecord:
    return RequestRecord(start_s=0.0, e2e_s=e2e_s, ttft_s=ttft_s, output_tokens=tokens, prompt_tokens=10, error=error)


def test_summary_counts_successes_only_and_uses_nearest_rank_percentiles() -> None:
    records = (
        *(_record(ttft_s=t / 1000, e2e_s=t / 1000 + 0.09, tokens=10) for t in range(10, 110, 10)),
        _record(ttft_s=None, e2e_s=0.5, tokens=0, error="HTTP 404: no such model"),
    )
    summary = LoadResult(concurrency=4, records=records, wall_s=2.0).summary()
    assert summary["requests"] == 11 and summary["errors"] == 1
    assert summary["output_tokens"] == 100
    assert summary["output_tok_per_s"] == 50.0 and summary["req_per_s"] == 5.0
    # Nearest rank over 10, 20, ..., 100 ms: the 5th and the 9th value.
    assert summary["ttft_p50_ms"] == pytest.approx(50.0) and summary["ttft_p90_ms"] == pytest.approx(90.0)
    assert summary["tpot_p50_ms"] == pytest.approx(10.0)
    assert summary["e2e_p50_ms"] == pytest.approx(140.0)
    assert summary["mean_prompt_tokens"] == 10


def test_summary_of_failures_only_has_no_latencies() -> None:
    summary = LoadResult(concurrency=1, records=(_record(None, 0.1, 0, "ConnectError: refused"),), wall_s=0.1).summary()
    assert summary["errors"] == 1 and summary["output_tokens"] == 0 and summary["output_tok_per_s"] == 0
    assert summary["ttft_p50_ms"] is None and summary["mean_prompt_tokens"] is None


def test_an_unreachable_server_is_recorded_per_request_and_fails_the_warm_up() -> None:
    base_url = f"http://127.0.0.1:{free_test_port()}"
    result = asyncio.run(run_load(base_url, "tiny", make_prompts(3, 5, seed=0), concurrency=2, output_len=4))
    assert [record.error.split(":")[0] for record in result.records if record.error] == ["ConnectError"] * 3
    with pytest.raises(DeploymentError, match="Check that the server runs there"):
        asyncio.run(warm_up(base_url, "tiny"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmAloneServer]:
    with tiny_server(tmp_path_factory.mktemp("loadgen")) as running:
        running.start(timeout_s=300)
        asyncio.run(warm_up(running.base_url, "tiny"))
        yield running


@pytest.mark.slow
def test_a_wrong_model_name_is_a_404_record_and_fails_the_warm_up(server: VllmAloneServer) -> None:
    result = asyncio.run(run_load(server.base_url, "no-such-model", ["Hello"], concurrency=1, output_len=4))
    (record,) = result.records
    assert record.error is not None and record.error.startswith("HTTP 404: ")
    assert "no-such-model" in record.error and record.output_tokens == 0 and record.ttft_s is None
    assert result.summary()["errors"] == 1
    with pytest.raises(DeploymentError, match=r"HTTP 404: .*The model `no-such-model` does not exist"):
        asyncio.run(warm_up(server.base_url, "no-such-model"))


@pytest.mark.slow
def test_a_rejected_request_does_not_disturb_the_others(server: VllmAloneServer) -> None:
    prompts = make_prompts(4, 8, seed=2)
    prompts[1] = " ".join(make_prompts(1, 400, seed=3))  # longer than max_model_len (256 tokens)
    result = asyncio.run(run_load(server.base_url, "tiny", prompts, concurrency=2, output_len=8))
    assert [record.error is None for record in result.records] == [True, False, True, True]
    assert (result.records[1].error or "").startswith("HTTP 400: ")
    assert [record.output_tokens for record in result.records] == [8, 0, 8, 8]
    assert result.summary()["output_tokens"] == 24


@pytest.mark.slow
def test_at_most_concurrency_requests_are_in_flight(server: VllmAloneServer) -> None:
    result = asyncio.run(run_load(server.base_url, "tiny", make_prompts(7, 10, seed=4), concurrency=3, output_len=24))
    assert all(record.error is None and record.output_tokens == 24 for record in result.records)
    # +1 when a request is sent, -1 when it ends; at equal times an end counts first.
    events = sorted([(r.start_s, 1) for r in result.records] + [(r.start_s + r.e2e_s, -1) for r in result.records])
    in_flight = peak = 0
    for _, change in events:
        in_flight += change
        peak = max(peak, in_flight)
    assert peak == 3


@pytest.mark.slow
def test_a_stream_broken_by_a_dying_server_is_recorded_not_raised(server: VllmAloneServer) -> None:
    async def run_and_kill() -> LoadResult:
        run = asyncio.create_task(
            run_load(server.base_url, "tiny", make_prompts(8, 4, seed=5), concurrency=2, output_len=200)
        )
        await asyncio.sleep(0.5)
        assert server.pid is not None
        os.killpg(server.pid, signal.SIGKILL)
        return await run

    result = asyncio.run(run_and_kill())
    assert len(result.records) == 8
    errors = [record.error for record in result.records if record.error is not None]
    # Streams cut mid-way (the kernel closes the dead server's sockets), then refused connections.
    assert {error.split(":")[0] for error in errors} <= {"RemoteProtocolError", "ReadError", "ConnectError"}, errors
    assert any(not error.startswith("ConnectError") for error in errors), errors
    assert all(record.output_tokens == 200 for record in result.records if record.error is None)
    assert result.summary()["errors"] == len(errors)
    server.stop()
    assert not living_group_members(server.pid)
