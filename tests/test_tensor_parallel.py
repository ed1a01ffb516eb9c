"""The seed's plain dicts on CPU: the minimal one (a local model folder, nothing else), and
tensor parallelism 2."""

from __future__ import annotations

import pytest

import rayvllm_nb
from rayvllm_nb import DEMO_PROMPT, TINY_MODEL_REPLY
from rayvllm_nb.tiny_model import tiny_model_path
from rayvllm_nb.types import ClusterInfo
from tests.conftest import leftovers, serve_port

pytestmark = pytest.mark.slow


def test_seed_dict_with_tp2_answers_the_known_sentence_and_stops_clean(cluster: ClusterInfo) -> None:
    seed = {"model": str(tiny_model_path()), "tensor_parallel_size": 2, "gpu_memory_utilization": 0.9,
            "port": serve_port()}
    status = rayvllm_nb.start(
        {**seed, "served_model_name": "tiny-tp2", "dtype": "bfloat16", "max_model_len": 256,
         "enforce_eager": True, "cpu_kvcache_space_gb": 1},
        wait_ready=True, timeout=600,
    )
    try:
        assert (status.device, status.tensor_parallel_size) == ("cpu", 2)
        reply = rayvllm_nb.client("tiny-tp2").chat.completions.create(
            model="tiny-tp2", messages=[{"role": "user", "content": DEMO_PROMPT}], temperature=0, max_tokens=64
        )
        assert reply.choices[0].message.content == TINY_MODEL_REPLY
        from ray.util.state import list_placement_groups

        bundles = [pg.bundles for pg in list_placement_groups(detail=True)
                   if pg.state == "CREATED" and (pg.name or "").startswith(f"SERVE_REPLICA::{status.app_name}#")]
        assert [[b["unit_resources"] for b in group] for group in bundles] == [[{"CPU": 1.0}, {"CPU": 1.0}]]
    finally:
        rayvllm_nb.stop("tiny-tp2")
    assert leftovers(status.app_name) == {"replica_actors": [], "placement_groups": []}


def test_minimal_seed_dict_on_cpu_sizes_its_kv_cache_to_the_node(cluster: ClusterInfo) -> None:
    """A local model folder and nothing else: vLLM's default (90 % of the node's memory) would not
    start here; the replica sizes the KV cache to its node, and status says what it chose."""
    status = rayvllm_nb.start(
        {"model": str(tiny_model_path()), "tensor_parallel_size": 1, "port": serve_port(),
         "served_model_name": "tiny-minimal", "route_prefix": "/minimal"},
        wait_ready=True, timeout=600,
    )
    try:
        reply = rayvllm_nb.client("tiny-minimal").chat.completions.create(
            model="tiny-minimal", messages=[{"role": "user", "content": DEMO_PROMPT}], temperature=0, max_tokens=64
        )
        assert reply.choices[0].message.content == TINY_MODEL_REPLY
        [replica] = status.replicas
        # The tiny Llama's KV cache: 2 layers x 1 KV head x 64 dims x (K, V) x 2 bytes = 512 B per token.
        assert replica.kv_cache_gib == pytest.approx(512 * 2048 * 256 / 2**30)
        assert replica.kv_cache_choice.startswith("auto: 0.25 GiB per rank (what 256 sequences of 2048 tokens need")
        assert "kv_cache=auto: 0.25 GiB" in str(rayvllm_nb.status())
    finally:
        rayvllm_nb.stop("tiny-minimal")
