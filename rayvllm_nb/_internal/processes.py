"""Processes of the Ray clusters on this machine: stopping a head rayvllm_nb started, and
ending what a stopped cluster left behind.

A head that rayvllm_nb starts runs in a session of its own (``start_new_session``): its
daemons, its workers (Serve replicas), Serve's HAProxy and the vLLM engine processes under
replicas all keep that session id, whatever process group they make. Stopping that cluster
ends exactly that session: nothing else on the machine (a user's own Ray or vLLM) is
touched. Each such head is recorded under ``~/.cache/rayvllm_nb/heads/`` so that another
process (the CLI, a new kernel) can stop it too.

``ray stop`` ends Ray's daemons and workers, but neither Serve's HAProxy (started by an
actor, not a Ray worker) nor vLLM's engine processes (children of a replica): they keep
the Serve port and gigabytes of memory. Every process Ray starts for a node carries
``RAY_RAYLET_PID``; once that raylet is gone, such a process belongs to no cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from rayvllm_nb._internal.paths import cache_root
from rayvllm_nb._internal.replica_env import MODEL_ENV

_STOP_GRACE_S = 10.0
_KILL_WAIT_S = 5.0
_HAPROXY_CONFIG_DIR = "/haproxy-serve/"


@dataclass(frozen=True)
class HeadRecord:
    """A head rayvllm_nb started on this machine: its GCS address and the session it runs in."""

    address: str
    session_id: int
    log_file: str
    started_at: float
    serve_ports: tuple[int, ...] = ()
    """Ports given to the head's Serve, which listens on them only once it starts (another head
    started meanwhile must not be given them too)."""


def _heads_dir() -> Path:
    folder = cache_root() / "heads"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def record_head(address: str, session_id: int, log_file: Path, serve_ports: tuple[int, ...] = ()) -> HeadRecord:
    """Remember a head this machine's rayvllm_nb started (read back by :func:`recorded_heads`)."""
    record = HeadRecord(address, session_id, str(log_file), time.time(), serve_ports)
    (_heads_dir() / f"{session_id}.json").write_text(json.dumps(asdict(record)))
    return record


def recorded_heads() -> list[HeadRecord]:
    """Heads rayvllm_nb started that still have processes; records of gone ones are dropped."""
    heads = []
    for path in sorted(_heads_dir().glob("*.json")):
        try:
            fields = json.loads(path.read_text())
            record = HeadRecord(**{**fields, "serve_ports": tuple(fields.get("serve_ports", ()))})
        except (ValueError, TypeError, AttributeError):
            path.unlink(missing_ok=True)
            continue
        if session_processes(record.session_id):
            heads.append(record)
        else:
            path.unlink(missing_ok=True)
    return heads


def session_processes(session_id: int) -> list[psutil.Process]:
    """Every live process of a session (never this process or its own session's)."""
    if session_id <= 1 or session_id == os.getsid(0):
        return []
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getsid(process.pid) == session_id and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def stop_head(record: HeadRecord) -> list[str]:
    """End every process of a recorded head's session (Ray, Serve's HAProxy, vLLM engines);
    returns a description of each; the record is removed."""
    stopped = end_processes(session_processes(record.session_id))
    (_heads_dir() / f"{record.session_id}.json").unlink(missing_ok=True)
    return stopped


def end_processes(processes: list[psutil.Process]) -> list[str]:
    """SIGTERM, then SIGKILL what is still running after a grace period; returns their descriptions."""
    described = []
    for process in processes:
        try:
            described.append(describe(process))
            process.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(processes, timeout=_STOP_GRACE_S)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=_KILL_WAIT_S)
    return described


def orphans() -> list[psutil.Process]:
    """Serve HAProxy processes and vLLM engines of our replicas whose Ray node (raylet) is gone."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            name, cmdline = process.info["name"] or "", process.info["cmdline"] or []
            is_haproxy = name == "haproxy" and any(_HAPROXY_CONFIG_DIR in part for part in cmdline)
            if not (is_haproxy or name.startswith("VLLM::")):
                continue
            environment = process.environ()
            if not is_haproxy and MODEL_ENV not in environment:
                continue
            if not _raylet_alive(environment.get("RAY_RAYLET_PID", "")):
                found.append(process)
        except psutil.Error:
            continue
    return found


MODEL_TITLES = ("VLLM::", "ray::ServeReplica")


def model_processes(model: str, titles: tuple[str, ...] = MODEL_TITLES) -> list[psutil.Process]:
    """This machine's processes of one of our models (replicas, vLLM engine cores and workers),
    found by the model name every replica's environment carries; never another program's vLLM.
    Titles are matched on the command line too (the kernel cuts a process name at 15 characters)."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            shown = " ".join(process.info["cmdline"] or []) or process.info["name"] or ""
            if shown.startswith(titles) and process.environ().get(MODEL_ENV) == model:
                found.append(process)
        except psutil.Error:
            continue
    return found


def local_cluster_processes() -> list[psutil.Process]:
    """This machine's processes of the Ray cluster(s) running here: Ray's daemons and workers, Serve's
    HAProxy, and vLLM engines under replicas."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            name, cmdline = process.info["name"] or "", process.info["cmdline"] or []
            if ray_process_kind(name, cmdline) is not None or (
                name.startswith("VLLM::") and MODEL_ENV in process.environ()
            ):
                found.append(process)
        except psutil.Error:
            continue
    return found


def end_orphans() -> list[str]:
    """End :func:`orphans`; returns what was ended, e.g. ``"VLLM::EngineCore (pid 12, model tiny, 1.2 GB)"``."""
    return end_processes(orphans())


def _raylet_alive(pid_text: str) -> bool:
    try:
        return psutil.Process(int(pid_text)).name() == "raylet"
    except (ValueError, psutil.Error):
        return False


def describe(process: psutil.Process) -> str:
    """What a process is, for people: Ray's daemons and workers by kind, vLLM engines with their model."""
    name, cmdline = process.name(), process.cmdline()
    kind = ray_process_kind(name, cmdline) or name
    details = [f"pid {process.pid}"]
    with contextlib.suppress(psutil.Error):
        if name.startswith("VLLM::"):
            details.append(f"model {process.environ().get(MODEL_ENV, '?')}")
        details.append(f"{process.memory_info().rss / 1e9:.1f} GB")
    return f"{kind} ({', '.join(details)})"


_RAY_DAEMONS = {
    "dashboard/dashboard.py": "dashboard",
    "dashboard/agent.py": "dashboard agent",
    "runtime_env/agent/main.py": "runtime env agent",
    "ray.util.client.server": "Ray Client server",
    "_private/log_monitor.py": "log_monitor",
    "autoscaler/_private/monitor.py": "monitor",
}
SERVE_HAPROXY = "Serve HAProxy"


def ray_process_kind(name: str, cmdline: list[str]) -> str | None:
    """Which Ray daemon or worker a process is (Serve's HAProxy included), from its name and command line."""
    if name in ("gcs_server", "raylet"):
        return name
    if name == "haproxy" and any(_HAPROXY_CONFIG_DIR in part for part in cmdline):
        return SERVE_HAPROXY
    if name.startswith("ray::"):
        return "worker " + name
    if cmdline and cmdline[0].startswith("ray-dashboard-"):
        return "dashboard module " + cmdline[0].split(" ", 1)[0].removeprefix("ray-dashboard-")
    joined = " ".join(cmdline[:3])
    return next((kind for marker, kind in _RAY_DAEMONS.items() if marker in joined), None)
