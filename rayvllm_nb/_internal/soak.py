"""A soak run: many concurrent streams against a running model for minutes, reported per minute.

What it watches is what degrades over time rather than what is fast: errors, TTFT p50/p99 per
minute, and the memory of the model's processes at the start and at the end. The load comes from
the benchmark's own generator (one httpx client, ``ignore_eos`` completions of a fixed length).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from rayvllm_nb._internal.clients import Endpoint
from rayvllm_nb._internal.loadgen import RequestRecord, make_prompts, percentile, stream_one, to_ms


@dataclass(frozen=True)
class MinuteStats:
    """One minute of a soak (by when requests were sent)."""

    minute: int
    requests: int
    errors: int
    output_tokens: int
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None


@dataclass
class SoakReport:
    """A soak run: settings, each minute, and the model's memory before and after."""

    model: str
    concurrency: int
    duration_s: float
    output_len: int
    rss_start_mb: float
    rss_end_mb: float
    minutes: list[MinuteStats] = field(default_factory=list)
    first_errors: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        """Failed requests over the whole run."""
        return sum(minute.errors for minute in self.minutes)

    @property
    def requests(self) -> int:
        """Requests over the whole run."""
        return sum(minute.requests for minute in self.minutes)

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        """The run as text: one line per minute, then memory."""
        lines = [
            f"{self.model}: {self.concurrency} concurrent streams for {self.duration_s:.0f} s, "
            f"{self.output_len} tokens each",
            f"{'minute':>6} {'requests':>9} {'errors':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9}",
        ]
        for minute in self.minutes:
            span = min(60.0, self.duration_s - 60 * minute.minute)
            lines.append(
                f"{minute.minute + 1:>6} {minute.requests:>9} {minute.errors:>7} {minute.output_tokens / span:>8.0f} "
                f"{_shown(minute.ttft_p50_ms):>9} {_shown(minute.ttft_p99_ms):>9}"
            )
        lines.append(
            f"memory of the model's processes: {self.rss_start_mb:,.0f} MB at the start, {self.rss_end_mb:,.0f} MB at "
            f"the end ({self.rss_end_mb - self.rss_start_mb:+,.0f} MB)"
        )
        lines += [f"error: {error}" for error in self.first_errors]
        return "\n".join(lines)

    def to_json(self) -> str:
        """The report as JSON."""
        return json.dumps({**self.__dict__, "minutes": [m.__dict__ for m in self.minutes]}, indent=2)


async def soak(
    endpoint: Endpoint,
    model: str,
    *,
    duration_s: float,
    concurrency: int = 32,
    output_len: int = 64,
    memory_mb: Callable[[], float],
) -> SoakReport:
    """Keep ``concurrency`` streams busy for ``duration_s``; ``memory_mb`` measures the model's processes."""
    report = SoakReport(model, concurrency, duration_s, output_len, memory_mb(), 0.0)
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(None, connect=30.0)
    base_url = endpoint.base_url.removesuffix("/v1")
    async with httpx.AsyncClient(base_url=base_url, headers=endpoint.headers, limits=limits, timeout=timeout) as http:
        started = time.perf_counter()
        deadline = started + duration_s

        async def worker(index: int) -> None:
            for number in itertools.count():
                if time.perf_counter() >= deadline:
                    return
                [prompt] = make_prompts(1, 24, seed=index * 1_000_000 + number)
                body = {
                    "model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                }
                records.append(await stream_one(http, json.dumps(body).encode(), started))

        await asyncio.gather(*(worker(index) for index in range(concurrency)))
    report.rss_end_mb = memory_mb()
    for minute in range(math.ceil(duration_s / 60)):
        sent = [r for r in records if 60 * minute <= r.start_s < 60 * (minute + 1)]
        ok = [r for r in sent if r.error is None]
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        report.minutes.append(MinuteStats(
            minute=minute, requests=len(sent), errors=len(sent) - len(ok),
            output_tokens=sum(r.output_tokens for r in ok),
            ttft_p50_ms=to_ms(percentile(ttfts, 50)), ttft_p99_ms=to_ms(percentile(ttfts, 99)),
        ))
    report.first_errors = list(dict.fromkeys(r.error for r in records if r.error))[:3]
    return report


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"
