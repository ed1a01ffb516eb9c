"""The blocking facade: each function runs the async backend's coroutine on the bridge loop.

An ``on_progress`` callback given to a blocking call runs in the caller's thread (pumped from the
loop), so a notebook cell's progress output lands in that cell and a terminal prints in order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from rayvllm_nb._internal.bridge import LoopThread

P = ParamSpec("P")
T = TypeVar("T")

BRIDGE = LoopThread()


def blocking(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """Wrap an async backend method into a blocking function with the same signature."""

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        on_progress = kwargs.get("on_progress")
        if not callable(on_progress):
            return BRIDGE.run(method(*args, **kwargs))

        def start(put: Callable[[Any], None]) -> Coroutine[Any, Any, T]:
            kwargs["on_progress"] = put
            return method(*args, **kwargs)

        return BRIDGE.pump(start, on_progress)

    return call
