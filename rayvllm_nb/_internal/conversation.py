"""A chat conversation without widgets: its turns, what a send adds, the room left in the context.

The panel draws one; tests drive it directly. A turn joins the history only when its answer
arrived whole: a failed or stopped send leaves the history as it was (and the caller keeps the
typed text), so nothing broken is sent again with the next message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import openai

from rayvllm_nb._internal.chat import ChatResult, stream_chat
from rayvllm_nb._internal.clients import Endpoint
from rayvllm_nb.errors import ConfigError

Message = dict[str, str]


@dataclass(frozen=True)
class Context:
    """How much of the model's context a conversation fills."""

    used: int
    """Tokens of the prompt the next answer would follow (system, turns, template)."""
    max_model_len: int

    @property
    def room(self) -> int:
        """Tokens an answer can still take."""
        return max(self.max_model_len - self.used, 0)

    def __str__(self) -> str:
        return f"context {self.used} / {self.max_model_len} tokens"


@dataclass
class Conversation:
    """The turns of one chat with one model, and the system prompt they follow."""

    system: str = ""
    turns: list[Message] = field(default_factory=list)
    context: Context | None = None
    """The context after the last answer (None before the first)."""

    def messages(self, text: str | None = None) -> list[Message]:
        """What the model is sent: the system prompt, the turns, then ``text`` as the user's."""
        system = [{"role": "system", "content": self.system}] if self.system.strip() else []
        return system + self.turns + ([{"role": "user", "content": text}] if text is not None else [])

    async def send(
        self,
        client: openai.AsyncOpenAI,
        endpoint: Endpoint,
        model: str,
        text: str,
        on_text: Callable[[str], None],
        *,
        max_tokens: int,
        temperature: float,
    ) -> ChatResult:
        """Stream the answer to ``text``; the user turn and the answer join the history only once it
        arrived whole. ``max_tokens`` is bounded by the room left in the context."""
        messages = self.messages(text)
        before = await measure_context(endpoint, model, messages)
        if before.room < 1:
            raise ConfigError(
                f"The conversation fills the model's context ({before}): there is no room for an answer. "
                "Clear the chat, shorten the message or the system prompt, or start the model with a "
                "larger max_model_len."
            )
        result = await stream_chat(client, model, messages, on_text, max_tokens=min(max_tokens, before.room),
                                   temperature=temperature)
        self.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": result.text}]
        self.context = Context(before.used + result.completion_tokens, before.max_model_len)
        return result

    def take_last_exchange(self) -> str | None:
        """Remove the last user turn and its answer (to ask again); the user's text, or None."""
        if len(self.turns) < 2:
            return None
        user, _ = self.turns[-2:]
        del self.turns[-2:]
        return user["content"]

    def clear(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.turns.clear()
        self.context = None


async def measure_context(endpoint: Endpoint, model: str, messages: list[Message]) -> Context:
    """The prompt's length as the model's own tokenizer and chat template make it (vLLM's /tokenize)."""
    root = endpoint.base_url.removesuffix("/").removesuffix("/v1")
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(f"{root}/tokenize", headers=endpoint.headers,
                                   json={"model": model, "messages": messages, "add_generation_prompt": True})
    response.raise_for_status()
    body = response.json()
    return Context(int(body["count"]), int(body["max_model_len"]))
