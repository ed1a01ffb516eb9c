"""Watching a model load: Serve's replica states and vLLM's log lines in, progress and a verdict out.

Pure logic (no Ray, no I/O), so it is tested on recorded states and lines; the backend feeds
it what it polls and acts on what it says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rayvllm_nb._internal import logs
from rayvllm_nb.types import ModelStatus, Progress

CREATING = "creating the deployment"
WAITING = "waiting for resources"
STARTING = "starting the engine"
CHECKING = "checking the endpoint"
READY = "ready"
STAGES = (CREATING, WAITING, STARTING, CHECKING, READY)
"""The loading stages in order (a progress bar's steps)."""
LOG_POLL_S = 1.0
_UNSCHEDULED = re.compile(r"taken more than [\d.]+s to be scheduled")
"""Serve's message for a replica whose placement group waits for resources (Serve counts it STARTING)."""


@dataclass(frozen=True)
class Verdict:
    """What one observation means: a new progress step (when the stage changed), a failure, and
    whether Serve says the app runs (then the caller checks the endpoint itself)."""

    progress: Progress | None = None
    serve_failure: str | None = None
    """Serve reports the deployment failed: its message (the caller looks up vLLM's cause)."""
    engine_failure: str | None = None
    """vLLM logged that its engine will not start: the root cause line."""
    serve_running: bool = False


class ReadinessWatcher:
    """Turns successive observations of one model into progress steps and a verdict."""

    def __init__(self, name: str, started_at: float) -> None:
        self.name = name
        self.started_at = started_at
        self._shown: tuple[str, str] | None = None
        self._log_detail = ""
        self._logs_read_at = float("-inf")

    def wants_logs(self, status: ModelStatus, now: float) -> bool:
        """Whether to read the replica logs for this observation (while the engine starts or its replica
        waits to be scheduled, once a second)."""
        if stage_of(status) in (WAITING, STARTING) and now - self._logs_read_at >= LOG_POLL_S:
            self._logs_read_at = now
            return True
        return False

    def observe(self, status: ModelStatus, log_lines: list[str] | None, now: float) -> Verdict:
        """One observation: the model's status and, when :meth:`wants_logs` said so, its log lines."""
        if status.status in ("DEPLOY_FAILED", "UNHEALTHY") or "failed to start" in status.message:
            return Verdict(serve_failure=status.message)
        if log_lines is not None:
            self._log_detail = logs.loading_stage(log_lines) or self._log_detail
            if logs.engine_failed(log_lines):
                cause = logs.root_cause(log_lines) or "the vLLM engine failed to start (see its logs)"
                return Verdict(engine_failure=cause)
        stage = stage_of(status)
        if stage == WAITING and self._log_detail:
            stage = STARTING  # the engine logs its loading: Serve's "to be scheduled" message is stale
        detail = self._log_detail if stage == STARTING else ""
        return Verdict(progress=self._step(stage, detail, now), serve_running=status.status == "RUNNING")

    def ready(self, now: float) -> Progress:
        """The last step: the endpoint answered."""
        return Progress(self.name, READY, now - self.started_at)

    def _step(self, stage: str, detail: str, now: float) -> Progress | None:
        if self._shown == (stage, detail):
            return None
        self._shown = (stage, detail)
        return Progress(self.name, stage, now - self.started_at, detail)


def stage_of(status: ModelStatus) -> str:
    """The loading stage Serve's view of a model shows."""
    if status.status == "RUNNING":
        return CHECKING
    states = status.replica_states
    if not states:
        return CREATING
    if states.get("PENDING_ALLOCATION") or states.get("PENDING_MIGRATION") or _UNSCHEDULED.search(status.message):
        return WAITING
    if states.get("STARTING"):
        return STARTING
    return "deploying (" + ", ".join(sorted(states)) + ")"
