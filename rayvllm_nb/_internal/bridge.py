"""The one bridge from blocking code to the async implementation.

A single daemon thread runs an event loop; blocking calls submit coroutines to it
and wait. This works inside a running loop (a Jupyter cell) without patching that
loop, and every blocking call runs the very coroutine the async API runs.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
Item = TypeVar("Item")
_PUMP_WAIT_S = 0.05


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
            self._refuse_own_thread()
        return self.pump(lambda _: coroutine, lambda _: None)

    def pump(
        self,
        start: Callable[[Callable[[Item], None]], Coroutine[Any, Any, T]],
        on_item: Callable[[Item], None],
        on_idle: Callable[[], None] | None = None,
    ) -> T:
        """Run ``start(put)`` on the background loop and block until it finishes, calling
        ``on_item`` in *this* thread for each item the coroutine puts (and ``on_idle`` when
        nothing came for a while): a notebook cell's output then lands in that cell.
        Ctrl-C cancels the coroutine."""
        if threading.current_thread() is self._thread:
            self._refuse_own_thread()
        items: queue.Queue[Item] = queue.Queue()
        future = self.submit(start(items.put))
        try:
            while not (future.done() and items.empty()):
                try:
                    on_item(items.get(timeout=_PUMP_WAIT_S))
                except queue.Empty:
                    if on_idle is not None:
                        on_idle()
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    @staticmethod
    def _refuse_own_thread() -> None:
        raise RuntimeError("A blocking rayvllm_nb call was made from its own loop thread; await the async API there.")

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()
