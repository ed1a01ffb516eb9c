"""The engine interface: turn a validated config and its placement plan into a Serve app."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from rayvllm_nb.config import ModelConfig
from rayvllm_nb.placement import PlacementPlan

if TYPE_CHECKING:
    from ray.serve.deployment import Application


class Engine(ABC):
    """Builds the Ray Serve application that serves one model behind an OpenAI API."""

    name: ClassVar[str]

    @abstractmethod
    def build_application(self, config: ModelConfig, model_source: str, plan: PlacementPlan) -> Application:
        """Return the Serve application for ``config``, loading weights from ``model_source``."""

    @abstractmethod
    def engine_arguments(self, config: ModelConfig) -> dict[str, Any]:
        """The vLLM engine arguments ``config`` means (also what vLLM alone gets in a benchmark)."""

    @abstractmethod
    def engine_deployment(self, config: ModelConfig) -> str:
        """Name of the deployment whose replicas run the vLLM engine (for status and logs)."""

    def validate(self, config: ModelConfig) -> None:
        """Raise :class:`~rayvllm_nb.errors.ConfigError` for engine arguments the engine would reject."""
        return

    def release(self, config_name: str) -> None:
        """Free what the engine kept on the cluster for the model (e.g. its secrets) after it stopped."""
        return
