"""The placement plan, checked as data: GPU plans are what would be sent to a GPU cluster."""

from __future__ import annotations

import pytest

from rayvllm_nb.config import load_config
from rayvllm_nb.errors import ConfigError
from rayvllm_nb.placement import check_room_to_start, plan_placement
from tests._suite import alone


def test_gpu_plan_tp1_is_one_bundle_with_two_cpus_planned_not_run() -> None:
    plan = plan_placement(load_config({"model": "m"}), {"CPU": 16, "GPU": 4}, 16)
    assert (plan.device, plan.bundles, plan.strategy) == ("gpu", [{"GPU": 1.0, "CPU": 2.0}], "PACK")


def test_gpu_plan_tp2_is_one_gpu_bundle_per_rank_packed_planned_not_run() -> None:
    plan = plan_placement(load_config({"model": "m", "tensor_parallel_size": 2}), {"CPU": 16, "GPU": 2}, 16)
    assert plan.bundles == [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0, "CPU": 1.0}]
    assert plan.strategy == "PACK" and plan.env_vars == {}


def test_cpu_plan_binds_one_core_range_per_rank_and_leaves_a_core_to_stream_when_it_can() -> None:
    config = load_config("tiny-cpu", ["tensor_parallel_size=2"])
    two = plan_placement(config, {"CPU": 2}, 2)
    assert two.device == "cpu" and two.bundles == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert two.env_vars == {
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1", "RAYVLLM_NB_CPU_PINNING": "1",
    }
    bindings = {cores: plan_placement(config, {"CPU": cores}, cores).env_vars["VLLM_CPU_OMP_THREADS_BIND"]
                for cores in (3, 5, 8)}
    assert bindings == {3: "0|1", 5: "0-1|2-3", 8: "0-2|3-5"}


def test_cpu_pinning_can_be_turned_off() -> None:
    plan = plan_placement(load_config("tiny-cpu", ["cpu_pinning=false"]), {"CPU": 2}, 2)
    assert "RAYVLLM_NB_CPU_PINNING" not in plan.env_vars
    assert "RAYVLLM_NB_CPU_PINNING" not in plan_placement(load_config({"model": "m"}), {"CPU": 2, "GPU": 1}, 2).env_vars


def test_cpu_plan_tp1_leaves_vllms_default_binding() -> None:
    plan = plan_placement(load_config("tiny-cpu"), {"CPU": 2}, 2)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in plan.env_vars


def test_a_start_that_does_not_fit_in_what_is_free_is_refused_naming_what_runs() -> None:
    config = load_config("tiny-cpu", ["tensor_parallel_size=2", "served_model_name=wide"])
    plan = plan_placement(config, {"CPU": 3}, 3)
    check_room_to_start(config, plan, {"CPU": 2.0, "GPU": 0.0}, ["shared"])
    with pytest.raises(ConfigError, match=r"'wide' needs 2 CPU to start \(1 replica\(s\) of 2\) but only 1 CPU .*"
                                          r"running models: shared, tiny.*Stop a model"):
        check_room_to_start(config, plan, {"CPU": 1.0, "GPU": 0.0}, ["shared", "tiny"])


def test_the_room_to_start_counts_the_replicas_a_model_starts_with_not_its_most() -> None:
    two = load_config("tiny-cpu", ["num_replicas=2"])
    with pytest.raises(ConfigError, match=r"needs 2 CPU to start \(2 replica\(s\) of 1\)"):
        check_room_to_start(two, plan_placement(two, {"CPU": 3}, 3), {"CPU": 1.0}, [])
    for autoscaling in ("min_replicas: 0, max_replicas: 3", "min_replicas: 1, max_replicas: 3"):
        scaling = load_config("tiny-cpu", [f"autoscaling={{{autoscaling}}}"])
        check_room_to_start(scaling, plan_placement(scaling, {"CPU": 3}, 3), {"CPU": 1.0}, [])
        with pytest.raises(ConfigError, match="no model of rayvllm_nb runs"):
            check_room_to_start(scaling, plan_placement(scaling, {"CPU": 3}, 3), {"CPU": 0.0}, [])


def test_auto_device_follows_the_cluster() -> None:
    config = load_config({"model": "m"})
    assert plan_placement(config, {"CPU": 2}, 2).device == "cpu"
    assert plan_placement(config, {"CPU": 2, "GPU": 1}, 2).device == "gpu"


def test_gpu_device_on_a_cluster_without_gpus_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no GPUs"):
        plan_placement(load_config({"model": "m", "device": "gpu"}), {"CPU": 2}, 2)


_GPU_PROBE = r"""
import json
import ray
from ray.util.placement_group import placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from rayvllm_nb.placement import check_room_to_start, plan_placement
from tests._suite import alone
from rayvllm_nb.config import load_config
from rayvllm_nb.engines import get_engine

ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
config = load_config("llama2-7b-tp2-gpu")
plan = plan_placement(config, ray.cluster_resources(), 4)
app = get_engine(config.engine).build_application(config, config.model, plan)
engine = app._bound_deployment
bundles = engine._replica_config.placement_group_bundles
strategy = engine._replica_config.placement_group_strategy
group = placement_group(bundles, strategy=strategy)
ray.get(group.ready(), timeout=60)

@ray.remote
class Probe:
    def report(self):
        return {"gpu_ids": ray.get_gpu_ids(), "node": ray.get_runtime_context().get_node_id()}

probes = [
    Probe.options(num_gpus=1, num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=index)).remote()
    for index in range(len(bundles))
]
table = placement_group_table(group)
print("RESULT " + json.dumps({
    "deployment": engine.name, "plan": plan.bundles, "sent": bundles, "strategy": strategy,
    "table_strategy": table["strategy"], "table_bundles": list(table["bundles"].values()),
    "reports": ray.get([probe.report.remote() for probe in probes], timeout=60),
}))
ray.shutdown()
"""


def test_gpu_tp2_plan_schedules_on_two_logical_gpus_no_real_gpu() -> None:
    """No GPU exists here: a private local cluster with 2 *logical* GPUs receives the exact
    placement group the engine would send to Serve for a TP=2 GPU config, and one probe
    actor per bundle reports the GPU id Ray assigned it."""
    import json
    import subprocess
    import sys

    # Ray's own node start fails when its agents start slower than 15 s (ray#65983): on its own, again if so.
    with alone():
        for _ in range(3):
            result = subprocess.run([sys.executable, "-c", _GPU_PROBE], capture_output=True, text=True, timeout=300,
                                    stdin=subprocess.DEVNULL)
            if "timed out during startup" not in result.stderr:
                break
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])
    expected = [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0, "CPU": 1.0}]
    assert report["deployment"] == "VllmServer:meta-llama--Llama-2-7b-chat-hf"
    assert report["plan"] == expected and report["sent"] == expected
    assert report["strategy"] == "PACK" and report["table_strategy"] == "PACK"
    assert report["table_bundles"] == expected
    gpu_ids = [tuple(r["gpu_ids"]) for r in report["reports"]]
    assert len(gpu_ids) == 2 and all(len(ids) == 1 for ids in gpu_ids) and len(set(gpu_ids)) == 2
    assert len({r["node"] for r in report["reports"]}) == 1
