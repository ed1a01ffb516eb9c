"""Importing vLLM and Ray Serve LLM in a driver (a notebook kernel, a CLI) without side effects on it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

_VLLM_LOG_LEVEL = "VLLM_LOGGING_LEVEL"


@contextmanager
def quiet_driver_imports() -> Iterator[None]:
    """Import vLLM and Serve LLM in the caller's process without side effects on it.

    Importing ``ray.serve.llm`` replaces the root logger's handlers and level (undone
    here), and vLLM prints import-time warnings to stdout unless its log level, read once
    at import, is raised (a user's own VLLM_LOGGING_LEVEL wins).
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    explicit_level = os.environ.get(_VLLM_LOG_LEVEL)
    os.environ[_VLLM_LOG_LEVEL] = explicit_level or "ERROR"
    try:
        yield
    finally:
        root.handlers, root.level = handlers, level
        if explicit_level is None:
            os.environ.pop(_VLLM_LOG_LEVEL, None)
