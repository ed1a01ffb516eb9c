"""Live engine metrics of a model: each replica's vLLM counters, read where vLLM keeps them.

The source: every replica serves its own process's Prometheus registry on a loopback port it
records in the deployment registry; vLLM's ``PrometheusStatLogger`` updates that registry on
every engine step, in that process, so a read is exact at the moment it is made (a request that
finished a moment ago is counted). Read over HTTP from this machine, or through a small Ray task
on the replica's node when the replica runs elsewhere. Not Serve's ``/metrics`` route: the router
sends it to one replica of several. Not Ray's metrics agent: it exports every few seconds, and
rayvllm_nb's heads run with Ray's metrics collection off (it costs the serving path CPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from rayvllm_nb._internal import registry
from rayvllm_nb._internal.cluster import is_this_machine
from rayvllm_nb.types import ModelMetrics, ReplicaMetrics

RATE_WINDOW_S = 10.0
"""tok/s is the generation rate over (at most) this many seconds before the read."""
_FIRST_RATE_GAP_S = 1.0
_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Sample:
    """One read of one replica's registry."""

    at: float
    running: float
    waiting: float
    kv_cache_usage: float
    prompt_tokens: float
    generation_tokens: float
    preemptions: float
    ttft_buckets: tuple[tuple[float, float], ...]
    """(upper bound in seconds, cumulative count) of the time-to-first-token histogram."""
    itl_buckets: tuple[tuple[float, float], ...]


def parse(text: str, at: float) -> Sample:
    """A replica's Prometheus text as a :class:`Sample` (values summed over vLLM's label sets)."""
    values: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {"ttft": {}, "itl": {}}
    histograms = {"vllm:time_to_first_token_seconds_bucket": "ttft", "vllm:inter_token_latency_seconds_bucket": "itl"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in histograms:
                bound = float(sample.labels["le"])
                target = buckets[histograms[sample.name]]
                target[bound] = target.get(bound, 0.0) + sample.value
            else:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return Sample(
        at=at,
        running=values.get("vllm:num_requests_running", 0.0),
        waiting=values.get("vllm:num_requests_waiting", 0.0),
        kv_cache_usage=values.get("vllm:kv_cache_usage_perc", 0.0),
        prompt_tokens=values.get("vllm:prompt_tokens_total", 0.0),
        generation_tokens=values.get("vllm:generation_tokens_total", 0.0),
        preemptions=values.get("vllm:num_preemptions_total", 0.0),
        ttft_buckets=tuple(sorted(buckets["ttft"].items())),
        itl_buckets=tuple(sorted(buckets["itl"].items())),
    )


def quantile(buckets: Iterable[tuple[float, float]], q: float) -> float:
    """The ``q`` quantile of a cumulative histogram, interpolated inside its bucket (as
    Prometheus' histogram_quantile does); 0.0 when it holds nothing."""
    buckets = list(buckets)
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return 0.0
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            share = (rank - below) / (count - below) if count > below else 1.0
            return lower + (upper - lower) * share
        lower, below = upper, count
    return lower


class MetricsReader:
    """Reads a model's replicas and keeps their last samples (tok/s needs two reads)."""

    def __init__(self) -> None:
        self._history: dict[str, list[Sample]] = {}

    def read(self, model: str) -> ModelMetrics:
        """The model's metrics now: totals over its running replicas, and each replica's."""
        records = [r for r in registry.replicas(model) if not r.ended and r.metrics_port]
        samples = {record.replica_id: self._sample(record) for record in records}
        if any(not self._earlier(replica_id, sample) for replica_id, sample in samples.items()):
            time.sleep(_FIRST_RATE_GAP_S)
            samples = {record.replica_id: self._sample(record) for record in records}
        replicas = [self._replica(replica_id, sample) for replica_id, sample in samples.items()]
        return ModelMetrics.of(model, replicas)

    def _sample(self, record: registry.ReplicaRecord) -> Sample:
        text = _scrape(record.node_ip, record.metrics_port)
        sample = parse(text, time.monotonic())
        history = self._history.setdefault(record.replica_id, [])
        history.append(sample)
        del history[:-50]
        return sample

    def _earlier(self, replica_id: str, now: Sample) -> Sample | None:
        """The oldest kept sample within the rate window, at least a moment older than ``now``."""
        kept = [s for s in self._history.get(replica_id, []) if 0.5 <= now.at - s.at <= RATE_WINDOW_S]
        return kept[0] if kept else None

    def _replica(self, replica_id: str, sample: Sample) -> ReplicaMetrics:
        earlier = self._earlier(replica_id, sample)
        rate = 0.0
        if earlier is not None:
            rate = max(sample.generation_tokens - earlier.generation_tokens, 0.0) / (sample.at - earlier.at)
        return ReplicaMetrics(
            replica_id=replica_id,
            requests_running=int(sample.running),
            requests_waiting=int(sample.waiting),
            kv_cache_usage=sample.kv_cache_usage,
            prompt_tokens_total=int(sample.prompt_tokens),
            generation_tokens_total=int(sample.generation_tokens),
            generation_tok_s=rate,
            ttft_p50_ms=quantile(sample.ttft_buckets, 0.5) * 1000,
            itl_p50_ms=quantile(sample.itl_buckets, 0.5) * 1000,
            preemptions_total=int(sample.preemptions),
        )


def _scrape(node_ip: str, port: int) -> str:
    """A replica's Prometheus text: over HTTP when its node is this machine, else from a Ray task there."""
    if is_this_machine(node_ip):
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=_TIMEOUT_S).text
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = next(node["NodeID"] for node in ray.nodes() if node["Alive"] and node["NodeManagerAddress"] == node_ip)
    remote = ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))(
        _read_loopback
    )
    return str(ray.get(remote.remote(port), timeout=30))


def _read_loopback(port: int) -> str:
    """Run on the replica's node: its loopback metrics page."""
    import httpx as http

    return http.get(f"http://127.0.0.1:{port}/metrics", timeout=_TIMEOUT_S).text
