"""Where rayvllm_nb keeps files on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$RAYVLLM_NB_CACHE``, else ``$XDG_CACHE_HOME/rayvllm_nb``, else ``~/.cache/rayvllm_nb``."""
    explicit = os.environ.get("RAYVLLM_NB_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rayvllm_nb"


def log_dir() -> Path:
    """Where the processes rayvllm_nb starts (Ray heads, vLLM alone) write their output; created."""
    folder = cache_root() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def config_home() -> Path:
    """The user's own named configs: ``$XDG_CONFIG_HOME/rayvllm_nb``, else ``~/.config/rayvllm_nb``."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "rayvllm_nb"
