"""Engine registry: the config's ``engine`` key names one of these."""

from __future__ import annotations

from rayvllm_nb.config import did_you_mean
from rayvllm_nb.engines.base import Engine
from rayvllm_nb.engines.serve_llm import ServeLLMEngine
from rayvllm_nb.errors import ConfigError

_ENGINES: dict[str, type[Engine]] = {ServeLLMEngine.name: ServeLLMEngine}


def register_engine(engine: type[Engine]) -> None:
    """Make ``engine`` selectable with ``engine: <engine.name>`` in a config."""
    _ENGINES[engine.name] = engine


def get_engine(name: str) -> Engine:
    """Return a new instance of the engine registered as ``name``."""
    try:
        return _ENGINES[name]()
    except KeyError:
        raise ConfigError(
            f"Unknown engine {name!r}{did_you_mean(name, _ENGINES)}. Registered engines: {', '.join(sorted(_ENGINES))}."
        ) from None


__all__ = ["Engine", "get_engine", "register_engine"]
