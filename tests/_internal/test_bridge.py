from __future__ import annotations

import asyncio
import threading

import pytest

from rayvllm_nb._internal.bridge import LoopThread


async def _thread_name() -> str:
    await asyncio.sleep(0)
    return threading.current_thread().name


def test_runs_coroutines_on_its_own_thread_even_inside_a_running_loop() -> None:
    bridge = LoopThread(name="bridge-under-test")

    async def inside_a_running_loop() -> str:
        return bridge.run(_thread_name())

    assert asyncio.run(inside_a_running_loop()) == "bridge-under-test"


def test_errors_propagate_to_the_caller() -> None:
    async def boom() -> None:
        raise ValueError("from the loop")

    with pytest.raises(ValueError, match="from the loop"):
        LoopThread().run(boom())


def test_refuses_to_block_its_own_loop() -> None:
    bridge = LoopThread()

    async def reentrant() -> None:
        bridge.run(_thread_name())

    with pytest.raises(RuntimeError, match="own loop thread"):
        bridge.run(reentrant())
