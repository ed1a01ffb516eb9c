"""The seed's plain dict on CPU with tensor parallelism 2 (the minimal one, tensor parallelism 1:
the first cycle of tests/test_backend_lifecycle.py)."""

from __future__ import annotations

import pytest

import rayvllm_nb
from rayvllm_nb import DEMO_PROMPT, TINY_MODEL_REPLY
from rayvllm_nb.tiny_model import tiny_model_path
from rayvllm_nb.types import ClusterInfo
from tests._suite import serve_port
from tests.conftest import leftovers

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
