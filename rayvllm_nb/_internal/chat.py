"""Streaming chat through the OpenAI client, with the timings users ask about (TTFT, tok/s).

One async implementation; ``stream_chat_blocking`` runs it on the facade's loop and hands
each piece of text to the calling thread, so a notebook cell's output stays in that cell.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import openai

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

from rayvllm_nb._internal.clients import Endpoint, async_openai_client
from rayvllm_nb._internal.facade import BRIDGE


@dataclass(frozen=True)
class ChatResult:
    """A finished streamed answer and how fast it came."""

    text: str
    completion_tokens: int
    ttft_s: float
    total_s: float

    @property
    def tokens_per_s(self) -> float:
        """Output tokens per second over the whole answer. (Not "after the first token": vLLM merges
        tokens into fewer chunks when the reader lags, so the time between the first and the last
        chunk of a short answer can be near zero and that rate meaningless.)"""
        return self.completion_tokens / self.total_s if self.total_s > 0 else 0.0

    def summary(self) -> str:
        """One line: tokens, time, time to first token, speed."""
        return (f"{self.completion_tokens} tokens in {self.total_s * 1000:.0f} ms "
                f"(TTFT {self.ttft_s * 1000:.0f} ms), {self.tokens_per_s:.0f} tok/s")


async def stream_chat(
    client: openai.AsyncOpenAI,
    model: str,
    messages: list[dict[str, str]],
    on_text: Callable[[str], None],
    *,
    max_tokens: int = 128,
    temperature: float = 0.0,
) -> ChatResult:
    """Stream one chat answer, calling ``on_text`` with each piece as it arrives."""
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=cast("list[ChatCompletionMessageParam]", messages), max_tokens=max_tokens,
        temperature=temperature, stream=True, stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                first = first if first is not None else time.perf_counter()
                pieces.append(choice.delta.content)
                on_text(choice.delta.content)
    ended = time.perf_counter()
    return ChatResult(
        text="".join(pieces),
        completion_tokens=tokens,
        ttft_s=(first if first is not None else ended) - started,
        total_s=ended - started,
    )


def stream_chat_blocking(
    endpoint: Endpoint,
    model: str,
    messages: list[dict[str, str]],
    on_text: Callable[[str], None],
    *,
    max_tokens: int = 128,
    temperature: float = 0.0,
) -> ChatResult:
    """:func:`stream_chat` on the facade's loop; ``on_text`` runs in the calling thread."""

    async def run(put: Callable[[str], None]) -> ChatResult:
        async with async_openai_client(endpoint) as client:
            return await stream_chat(client, model, messages, put, max_tokens=max_tokens, temperature=temperature)

    return BRIDGE.pump(run, on_text)
