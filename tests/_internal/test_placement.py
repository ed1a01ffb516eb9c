"""The placement plan, checked as data: GPU plans are what would be sent to a GPU cluster."""

from __future__ import annotations

import pytest

from rayvllm_nb._internal.placement import plan_placement
from rayvllm_nb.config import load_config
from rayvllm_nb.errors import ConfigError


def test_gpu_plan_tp1_is_one_bundle_with_two_cpus_planned_not_run() -> None:
    plan = plan_placement(load_config({"model": "m"}), {"CPU": 16, "GPU": 4}, 16)
    assert (plan.device, plan.bundles, plan.strategy) == ("gpu", [{"GPU": 1.0, "CPU": 2.0}], "PACK")


def test_gpu_plan_tp2_is_one_gpu_bundle_per_rank_packed_planned_not_run() -> None:
    plan = plan_placement(load_config({"model": "m", "tensor_parallel_size": 2}), {"CPU": 16, "GPU": 2}, 16)
    assert plan.bundles == [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0, "CPU": 1.0}]
    assert plan.strategy == "PACK" and plan.env_vars == {}


def test_cpu_plan_binds_one_core_range_per_rank() -> None:
    config = load_config("tiny-cpu", ["tensor_parallel_size=2"])
    two = plan_placement(config, {"CPU": 2}, 2)
    assert two.device == "cpu" and two.bundles == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert two.env_vars == {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    assert plan_placement(config, {"CPU": 8}, 8).env_vars["VLLM_CPU_OMP_THREADS_BIND"] == "0-3|4-7"


def test_cpu_plan_tp1_leaves_vllms_default_binding() -> None:
    plan = plan_placement(load_config("tiny-cpu"), {"CPU": 2}, 2)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in plan.env_vars


def test_auto_device_follows_the_cluster() -> None:
    config = load_config({"model": "m"})
    assert plan_placement(config, {"CPU": 2}, 2).device == "cpu"
    assert plan_placement(config, {"CPU": 2, "GPU": 1}, 2).device == "gpu"


def test_gpu_device_on_a_cluster_without_gpus_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no GPUs"):
        plan_placement(load_config({"model": "m", "device": "gpu"}), {"CPU": 2}, 2)
