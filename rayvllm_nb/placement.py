"""The placement plan: which Ray resources one replica asks for, decided before deploying.

Kept apart from the engine so the GPU plan can be tested on machines without GPUs:
the plan is plain data that a test compares with what it expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rayvllm_nb._internal.replica_env import AUTO_KV_CACHE_ENV, CPU_PINNING_ENV
from rayvllm_nb.config import ModelConfig
from rayvllm_nb.errors import ConfigError


@dataclass(frozen=True)
class PlacementPlan:
    """Resources of one replica: one placement-group bundle per tensor-parallel rank."""

    device: Literal["cpu", "gpu"]
    bundles: list[dict[str, float]]
    strategy: str
    env_vars: dict[str, str] = field(default_factory=dict)


def plan_placement(config: ModelConfig, cluster_resources: dict[str, float], node_cpus: int) -> PlacementPlan:
    """Plan one replica of ``config`` on a cluster with ``cluster_resources`` in total
    and ``node_cpus`` CPUs on its largest node (CPU-mode ranks share one node).

    GPU, TP=1: one bundle ``{GPU: 1, CPU: 2}``. GPU, TP>1: ``{GPU: 1, CPU: 1}`` per rank,
    PACK. CPU: ``{CPU: 1}`` per rank, PACK, with the KV-cache size (or, when the user sized
    none, the replica sizes it on its node), for TP>1 the per-rank core binding vLLM's CPU
    workers need when the node reports no NUMA layout, and whether the replica pins its engine's
    processes (``cpu_pinning``).
    """
    gpus = int(cluster_resources.get("GPU", 0))
    device = resolve_device(config.device, gpus)
    tp = config.tensor_parallel_size
    if device == "gpu":
        if gpus == 0:
            raise ConfigError(
                f"device='gpu' was asked for {config.name!r} but the cluster has no GPUs. "
                "Use device='cpu' (or 'auto'), or connect to a cluster with GPUs."
            )
        if tp > gpus:
            raise ConfigError(
                f"tensor_parallel_size={tp} needs {tp} GPUs but the cluster has {gpus}. "
                f"Use tensor_parallel_size<={gpus}, or add GPU nodes to the cluster."
            )
        bundles = [{"GPU": 1.0, "CPU": 2.0}] if tp == 1 else [{"GPU": 1.0, "CPU": 1.0} for _ in range(tp)]
        _check_room_for_every_replica(config, bundles, cluster_resources)
        return PlacementPlan(device="gpu", bundles=bundles, strategy="PACK")

    if tp > node_cpus:
        raise ConfigError(
            f"tensor_parallel_size={tp} in CPU mode needs {tp} CPUs on one node but the largest node has "
            f"{node_cpus}. Use tensor_parallel_size<={node_cpus}, or a node with more CPUs."
        )
    env_vars: dict[str, str] = {}
    if config.cpu_kvcache_space_gb is not None:
        env_vars["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kvcache_space_gb)
    elif not _kv_cache_sized(config):
        env_vars[AUTO_KV_CACHE_ENV] = "1"
    binding = config.cpu_omp_threads_bind or (_split_cores(node_cpus, tp) if tp > 1 else None)
    if binding:
        env_vars["VLLM_CPU_OMP_THREADS_BIND"] = binding
    if config.cpu_pinning:
        env_vars[CPU_PINNING_ENV] = "1"
    bundles = [{"CPU": 1.0} for _ in range(tp)]
    _check_room_for_every_replica(config, bundles, cluster_resources)
    return PlacementPlan(device="cpu", bundles=bundles, strategy="PACK", env_vars=env_vars)


def _check_room_for_every_replica(
    config: ModelConfig, bundles: list[dict[str, float]], cluster_resources: dict[str, float]
) -> None:
    """The most replicas the model may run (``num_replicas``, or autoscaling's ``max_replicas``) must
    fit in the cluster's total resources, or the last ones would wait for resources forever."""
    replicas = config.max_replicas
    for resource in ("GPU", "CPU"):
        needed = replicas * sum(bundle.get(resource, 0.0) for bundle in bundles)
        have = cluster_resources.get(resource, 0.0)
        if needed > have:
            key = "autoscaling.max_replicas" if config.autoscaling is not None else "num_replicas"
            raise ConfigError(
                f"{replicas} replicas of {config.name!r} need {needed:g} {resource} in all ({needed / replicas:g} "
                f"each) but the cluster has {have:g}. Lower {key}, or add nodes (or logical {resource}s) to the "
                "cluster."
            )


def check_room_to_start(
    config: ModelConfig, plan: PlacementPlan, free: dict[str, float], running: list[str]
) -> None:
    """On a cluster that does not grow, the replicas a model starts with must fit in what is free now,
    or Serve would wait for resources until the start times out. ``free``: the cluster's unreserved
    resources; ``running``: the models of rayvllm_nb that hold some."""
    replicas = max(config.autoscaling.min_replicas, 1) if config.autoscaling is not None else config.num_replicas
    for resource in ("GPU", "CPU"):
        each = sum(bundle.get(resource, 0.0) for bundle in plan.bundles)
        needed, have = replicas * each, free.get(resource, 0.0)
        if needed > have + 1e-9:
            holders = f"running models: {', '.join(running)}" if running else "no model of rayvllm_nb runs"
            raise ConfigError(
                f"{config.name!r} needs {needed:g} {resource} to start ({replicas} replica(s) of {each:g}) but only "
                f"{have:g} {resource} of this cluster are free now ({holders}; other Ray work may hold the rest). "
                "The cluster does not grow by itself, so the model would wait for resources forever. Stop a model "
                "(`rayvllm stop NAME`), lower tensor_parallel_size or the replicas, or start the cluster with more "
                f"logical {resource}s (num_{resource.lower()}s in the cluster config)."
            )


def resolve_device(device: str, cluster_gpus: int) -> Literal["cpu", "gpu"]:
    """The device a config's ``device`` means on a cluster with ``cluster_gpus``: "auto" is GPU when there are any."""
    if device == "auto":
        return "gpu" if cluster_gpus > 0 else "cpu"
    return "gpu" if device == "gpu" else "cpu"


def _kv_cache_sized(config: ModelConfig) -> bool:
    """Whether the user sized the KV cache themselves (a share of memory, bytes, or GiB)."""
    sizing = ("gpu_memory_utilization", "kv_cache_memory_bytes")
    return (
        config.gpu_memory_utilization is not None
        or any(key in config.engine_kwargs for key in sizing)
        or "VLLM_CPU_KVCACHE_SPACE" in config.env_vars
    )


def _split_cores(cores: int, ranks: int) -> str:
    """Contiguous, disjoint core ranges, one per rank, leaving the last core to the processes that
    stream (as vLLM's own default binding does) when there are more cores than ranks:
    2 cores, 2 ranks -> '0|1'; 5 cores -> '0-1|2-3'; 8 cores -> '0-2|3-5'."""
    usable = cores - 1 if cores > ranks else cores
    per_rank = max(usable // ranks, 1)
    ranges = []
    for rank in range(ranks):
        first = (rank * per_rank) % max(cores, 1)
        last = first + per_rank - 1
        ranges.append(str(first) if first == last else f"{first}-{last}")
    return "|".join(ranges)

