"""Helpers for tests that run vLLM's own server (vLLM alone) on the tiny model."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import psutil

from rayvllm_nb._internal.vllm_alone import VllmAloneServer
from rayvllm_nb.tiny_model import tiny_model_path

ENGINE_ARGS = {"dtype": "bfloat16", "max_model_len": 256, "enforce_eager": True}
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
TEST_PORTS = range(18100, 18200)


def free_test_port() -> int:
    """A free port in the range these tests may use."""
    for port in TEST_PORTS:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"No free port in {TEST_PORTS}.")


def tiny_server(
    log_dir: Path, model_source: str | None = None, engine_args: dict[str, Any] | None = None, *,
    pin_cpu: bool = False,
) -> VllmAloneServer:
    """A server for the tiny model (or ``model_source``) named "tiny", not started yet."""
    return VllmAloneServer(
        model_source or str(tiny_model_path()), "tiny", engine_args or ENGINE_ARGS, ENV,
        port=free_test_port(), log_file=log_dir / "vllm.log", pin_cpu=pin_cpu,
    )


def living_group_members(pgid: int) -> list[psutil.Process]:
    """Processes of a process group that still run (zombies wait for init to reap them and run nothing)."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
