"""The one bridge from blocking code to the async implementation.

A single daemon thread runs an event loop; blocking calls submit coroutines to it
and wait. This works inside a running loop (a Jupyter cell) without patching that
loop, and every blocking call runs the very coroutine the async API runs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """A background event loop, started on first use."""

    def __init__(self, name: str = "rayvllm-nb-loop") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running background loop (started if needed)."""
        with self._lock:
            if self._loop is None or self._thread is None or not self._thread.is_alive():
                ready = threading.Event()
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._serve, args=(self._loop, ready), name=self._name, daemon=True
                )
                self._thread.start()
                ready.wait()
            return self._loop

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule ``coroutine`` on the background loop; returns a concurrent future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the background loop and block until it finishes."""
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError(
                "A blocking rayvllm_nb call was made from its own loop thread; await the async API there."
            )
        future = self.submit(coroutine)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()
