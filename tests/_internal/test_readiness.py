"""The readiness watcher on recorded Serve states and vLLM log lines, without Ray."""

from __future__ import annotations

from rayvllm_nb._internal.readiness import CHECKING, CREATING, STARTING, WAITING, ReadinessWatcher, stage_of
from rayvllm_nb.types import ModelStatus

UNSCHEDULED = (
    "Deployment 'VllmServer:tiny-tp2' in application 'tiny-tp2' has 1 replicas that have taken more than 30s to be "
    'scheduled. This may be due to waiting for the cluster to auto-scale or for a runtime environment to be installed. '
    'Resources required for each replica: [{"CPU": 1.0, "GPU": 0.0}, {"CPU": 1.0}], total resources available: '
    '{"CPU": 1.0}. Use `ray status` for more details.'
)
LOADING = [
    "INFO 11-27 05:06:20 [model.py:684] Resolved architecture: LlamaForCausalLM",
    "(Worker pid=15278) INFO 11-27 05:06:36 [cpu_model_runner.py:131] Starting to load model /m/tiny...",
]
ENGINE_FAILED = [
    "(EngineCore pid=4242) ValueError: User-specified max_model_len (100000) is greater than the derived "
    "max_model_len (max_position_embeddings=2048 in model's config.json).",
    "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
]


def _status(status: str, states: dict[str, int], message: str = "") -> ModelStatus:
    return ModelStatus(name="tiny", app_name="tiny", status=status, ready=False, model="/m/tiny", device="cpu",
                       tensor_parallel_size=1, num_replicas=1, replica_states=states, base_url="http://x/v1",
                       message=message, replica_actor_ids=("a1",) if states else ())


def test_stages_follow_serves_replica_states() -> None:
    assert stage_of(_status("DEPLOYING", {})) == CREATING
    assert stage_of(_status("DEPLOYING", {"PENDING_ALLOCATION": 1})) == WAITING
    assert stage_of(_status("DEPLOYING", {"STARTING": 1})) == STARTING
    assert stage_of(_status("RUNNING", {"RUNNING": 1})) == CHECKING


def test_a_replica_serve_cannot_schedule_is_waiting_for_resources_not_starting() -> None:
    """Serve counts a replica whose placement group is pending as STARTING; only its message tells."""
    watcher = ReadinessWatcher("tiny", started_at=0.0)
    pending = _status("DEPLOYING", {"STARTING": 1}, UNSCHEDULED)
    assert watcher.wants_logs(pending, now=31.0)
    verdict = watcher.observe(pending, [], now=31.0)
    assert verdict.progress is not None and (verdict.progress.stage, verdict.progress.detail) == (WAITING, "")
    assert watcher.observe(pending, None, now=31.5).progress is None, "an unchanged stage is not reported again"
    # Scheduled at last: Serve keeps its message for a while, the engine's log shows it loading.
    assert watcher.wants_logs(pending, now=40.0)
    verdict = watcher.observe(pending, LOADING, now=40.0)
    assert verdict.progress is not None and verdict.progress.stage == STARTING
    assert verdict.progress.detail == "loading weights"


def test_an_engine_that_fails_while_its_replica_was_reported_waiting_is_a_failure() -> None:
    watcher = ReadinessWatcher("tiny", started_at=0.0)
    verdict = watcher.observe(_status("DEPLOYING", {"STARTING": 1}, UNSCHEDULED), ENGINE_FAILED, now=45.0)
    assert verdict.engine_failure is not None and "is greater than the derived max_model_len" in verdict.engine_failure


def test_serve_reporting_the_deployment_failed_is_a_failure_at_once() -> None:
    verdict = ReadinessWatcher("tiny", 0.0).observe(_status("DEPLOY_FAILED", {}, "The replica failed to start"),
                                                    None, now=1.0)
    assert verdict.serve_failure == "The replica failed to start" and verdict.progress is None
