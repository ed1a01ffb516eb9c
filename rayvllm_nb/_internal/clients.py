"""The one place OpenAI clients for a deployment are built (blocking, async, panel, chat, CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import openai

_NO_KEY = "none"
"""The OpenAI client insists on a key; an endpoint without one ignores what it gets."""


@dataclass(frozen=True)
class Endpoint:
    """Where a model answers, and the API key it requires (never shown in reprs)."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers for raw requests (httpx) to this endpoint."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def openai_client(endpoint: Endpoint, **kwargs: Any) -> openai.OpenAI:
    """An ``openai.OpenAI`` client for ``endpoint`` (``kwargs`` go to the client, e.g. ``timeout``)."""
    return openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key or _NO_KEY, **kwargs)


def async_openai_client(endpoint: Endpoint, **kwargs: Any) -> openai.AsyncOpenAI:
    """An ``openai.AsyncOpenAI`` client for ``endpoint``."""
    return openai.AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key or _NO_KEY, **kwargs)
