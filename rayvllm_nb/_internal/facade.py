"""The blocking facade: each function runs the async backend's coroutine on the bridge loop."""

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
        return BRIDGE.run(method(*args, **kwargs))

    return call
