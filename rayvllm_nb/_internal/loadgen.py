"""A small load generator for OpenAI-compatible streaming completions (vLLM's benchmark_serving, in little).

One httpx client and a fixed pool of ``concurrency`` workers pulling prompts from one queue.
The client shares the machine's few cores with the server it measures, so it stays cheap:
server-sent events are split from raw bytes by hand and each chunk is one ``json.loads``, no
SDK objects. A failed request (an HTTP error status, a broken stream) is recorded, never raised.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import httpx

from rayvllm_nb.errors import ConfigError, DeploymentError

_WARM_UP_TIMEOUT_S = 300.0
_CONNECT_TIMEOUT_S = 30.0
_ERROR_BODY_CHARS = 500
_WORDS = (
    "river", "mountain", "engine", "window", "garden", "signal", "paper", "orange", "silver", "market",
    "cloud", "forest", "number", "letter", "bridge", "planet", "candle", "pocket", "winter", "summer",
    "model", "server", "token", "stream", "notebook", "cluster", "replica", "memory", "kernel", "thread",
    "quiet", "rapid", "gentle", "bright", "hollow", "narrow", "simple", "golden", "distant", "careful",
    "runs", "builds", "carries", "follows", "measures", "answers", "counts", "writes", "opens", "holds",
)


def make_prompts(count: int, input_words: int, seed: int) -> list[str]:
    """``count`` distinct prompts of about ``input_words`` words, the same ones for the same seed.

    Each starts with its own request number (and the seed), so prefix caching cannot share
    them; use a new seed for each run when the server caches prefixes across runs.
    """
    rng = random.Random(seed)
    filler = max(input_words - 2, 0)
    return [" ".join([f"Request {seed}-{index}:", *rng.choices(_WORDS, k=filler)]) for index in range(count)]


@dataclass(frozen=True)
class RequestRecord:
    """One streamed request: seconds (``time.perf_counter``) and token counts; ``error`` when it failed."""

    start_s: float
    """When it was sent, from the start of the run."""
    e2e_s: float
    """From sending to the end of the stream (or the failure)."""
    ttft_s: float | None
    """From sending to the first chunk with text; None when no text came."""
    output_tokens: int
    """The server's usage count, else the number of streamed chunks."""
    prompt_tokens: int | None
    error: str | None = None


@dataclass(frozen=True)
class LoadResult:
    """Every request of one run, in prompt order, and the run's wall time."""

    concurrency: int
    records: tuple[RequestRecord, ...]
    wall_s: float

    def summary(self) -> dict[str, float | int | None]:
        """Throughput over the wall time and latency percentiles (nearest rank) of successful requests.

        Rates and percentiles count successful requests only; a percentile with no data is None.
        TPOT is per request ``(e2e - ttft) / (output_tokens - 1)``, then its median.
        """
        ok = [record for record in self.records if record.error is None]
        ttfts = [record.ttft_s for record in ok if record.ttft_s is not None]
        tpots = [
            (record.e2e_s - record.ttft_s) / (record.output_tokens - 1)
            for record in ok if record.ttft_s is not None and record.output_tokens > 1
        ]
        prompt_tokens = [record.prompt_tokens for record in ok if record.prompt_tokens is not None]
        output_tokens = sum(record.output_tokens for record in ok)
        return {
            "requests": len(self.records),
            "errors": len(self.records) - len(ok),
            "output_tokens": output_tokens,
            "duration_s": self.wall_s,
            "output_tok_per_s": output_tokens / self.wall_s,
            "req_per_s": len(ok) / self.wall_s,
            "ttft_p50_ms": to_ms(percentile(ttfts, 50)),
            "ttft_p90_ms": to_ms(percentile(ttfts, 90)),
            "tpot_p50_ms": to_ms(percentile(tpots, 50)),
            "e2e_p50_ms": to_ms(percentile([record.e2e_s for record in ok], 50)),
            "mean_prompt_tokens": statistics.fmean(prompt_tokens) if prompt_tokens else None,
        }


async def run_load(
    base_url: str,
    model: str,
    prompts: Sequence[str],
    *,
    concurrency: int,
    output_len: int,
    api_key: str | None = None,
) -> LoadResult:
    """Stream a completion of exactly ``output_len`` tokens (``ignore_eos``) for each prompt, ``concurrency`` at a time.

    ``base_url`` is the server's root (requests go to ``{base_url}/v1/completions``).
    """
    if concurrency < 1 or not prompts:
        raise ConfigError(f"A load run needs prompts and a concurrency of at least 1 (got {concurrency}).")
    # One iterator shared by the workers is the queue: each takes the next prompt when it is free.
    pending = iter(enumerate(prompts))
    records: dict[int, RequestRecord] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # No read timeout: a long stream, or a request queued behind others, must not be cut short.
    timeout = httpx.Timeout(None, connect=_CONNECT_TIMEOUT_S)
    client = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), limits=limits, timeout=timeout)
    async with client:
        started = time.perf_counter()

        async def worker() -> None:
            for index, prompt in pending:
                body = {
                    "model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True},
                }
                records[index] = await stream_one(client, json.dumps(body).encode(), started)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
        wall_s = time.perf_counter() - started
    return LoadResult(concurrency=concurrency, records=tuple(records[i] for i in range(len(prompts))), wall_s=wall_s)


async def warm_up(base_url: str, model: str, api_key: str | None = None) -> None:
    """Send one short completion so a run does not time first-request costs; raise DeploymentError if it fails."""
    url = f"{base_url.rstrip('/')}/v1/completions"
    body = {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    try:
        async with httpx.AsyncClient(headers=_headers(api_key), timeout=_WARM_UP_TIMEOUT_S) as client:
            response = await client.post(url, json=body)
    except httpx.HTTPError as error:
        raise DeploymentError(
            f"The warm-up request to {url} failed ({type(error).__name__}: {error}). Check that the server runs there."
        ) from None
    if response.status_code != 200:
        raise DeploymentError(
            f"The warm-up request to {url} for model {model!r} failed with HTTP {response.status_code}: {response.text}"
        )


async def stream_one(client: httpx.AsyncClient, body: bytes, run_started: float) -> RequestRecord:
    sent = time.perf_counter()
    first: float | None = None
    chunks = 0
    usage: dict[str, int] = {}
    error: str | None = None
    try:
        async with client.stream(
            "POST", "/v1/completions", content=body, headers={"Content-Type": "application/json"}
        ) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                error = f"HTTP {response.status_code}: {text[:_ERROR_BODY_CHARS]}"
            else:
                done = False
                async for data in _sse_data(response):
                    if data == b"[DONE]":
                        done = True
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = f"error in stream: {json.dumps(chunk['error'])[:_ERROR_BODY_CHARS]}"
                    for choice in chunk.get("choices") or ():
                        chunks += 1
                        if first is None and choice.get("text"):
                            first = time.perf_counter()
                    usage = chunk.get("usage") or usage
                if error is None and not done:
                    error = "the stream ended without [DONE]"
    except (httpx.HTTPError, ValueError) as failure:
        error = type(failure).__name__ + (f": {failure}" if str(failure) else "")
    ended = time.perf_counter()
    return RequestRecord(
        start_s=sent - run_started,
        e2e_s=ended - sent,
        ttft_s=None if first is None else first - sent,
        output_tokens=usage.get("completion_tokens", chunks),
        prompt_tokens=usage.get("prompt_tokens"),
        error=error,
    )


async def _sse_data(response: httpx.Response) -> AsyncIterator[bytes]:
    """The payload of each ``data:`` line of a server-sent event stream."""
    pending = b""
    async for piece in response.aiter_bytes():
        *lines, pending = (pending + piece).split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if pending.startswith(b"data:"):
        yield pending[5:].strip()


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least ``pct`` % of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(pct / 100 * len(ordered)) - 1, 0)]


def to_ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def run_load_in_subprocess(
    base_url: str, model: str, *, count: int, input_words: int, seed: int, concurrency: int, output_len: int,
    api_key: str | None = None,
) -> tuple[dict[str, float | int | None], float]:
    """:func:`run_load` in a process of its own (so the benchmark's own work never competes with it
    inside one interpreter): the run's summary, and the CPU-seconds the load generator spent on it."""
    request = {
        "base_url": base_url, "model": model, "count": count, "input_words": input_words, "seed": seed,
        "concurrency": concurrency, "output_len": output_len, "api_key": api_key,
    }
    result = subprocess.run(
        [sys.executable, "-m", __name__], input=json.dumps(request), capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise DeploymentError(f"The load generator failed (exit code {result.returncode}): {result.stderr[-2000:]}")
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    return answer["summary"], answer["cpu_s"]


def _main() -> None:
    """One load run described by a JSON object on stdin; its summary and CPU time as JSON on stdout."""
    request = json.loads(sys.stdin.read())
    prompts = make_prompts(request["count"], request["input_words"], request["seed"])
    cpu_started = time.process_time()
    result = asyncio.run(run_load(
        request["base_url"], request["model"], prompts, concurrency=request["concurrency"],
        output_len=request["output_len"], api_key=request["api_key"],
    ))
    print(json.dumps({"summary": result.summary(), "cpu_s": time.process_time() - cpu_started}))


if __name__ == "__main__":
    _main()
