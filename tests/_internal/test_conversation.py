"""The widget-free conversation against the shared tiny model: what a send keeps, what a failure
leaves (nothing), and the room left in the context as the model's own tokenizer counts it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import openai
import pytest

import rayvllm_nb
from rayvllm_nb import DEMO_PROMPT, TINY_MODEL_REPLY, ModelStatus
from rayvllm_nb._internal.clients import async_openai_client
from rayvllm_nb._internal.conversation import Conversation, measure_context
from rayvllm_nb.errors import ConfigError

T = TypeVar("T")


def _run(make: Callable[[openai.AsyncOpenAI], Coroutine[Any, Any, T]], model: ModelStatus) -> T:
    async def run() -> T:
        async with async_openai_client(rayvllm_nb.endpoint(model.name)) as client:
            return await make(client)

    return asyncio.run(run())


@pytest.mark.slow
def test_a_whole_answer_joins_the_history_with_the_context_it_filled(shared_tiny: ModelStatus) -> None:
    conversation = Conversation(system="Be brief.")
    endpoint = rayvllm_nb.endpoint(shared_tiny.name)
    pieces: list[str] = []
    result = _run(lambda client: conversation.send(client, endpoint, shared_tiny.name, DEMO_PROMPT, pieces.append,
                                                   max_tokens=64, temperature=0.0), shared_tiny)
    assert "".join(pieces) == result.text == TINY_MODEL_REPLY
    assert conversation.turns == [{"role": "user", "content": DEMO_PROMPT},
                                  {"role": "assistant", "content": TINY_MODEL_REPLY}]
    direct = rayvllm_nb.client(shared_tiny.name).chat.completions.create(
        model=shared_tiny.name, messages=conversation.messages()[:-1], max_tokens=64, temperature=0)
    assert direct.usage is not None and conversation.context is not None
    assert conversation.context.used == direct.usage.prompt_tokens + result.completion_tokens
    assert conversation.context.max_model_len == 2048 and str(conversation.context).startswith("context ")


@pytest.mark.slow
def test_a_failed_send_leaves_the_history_as_it_was(shared_tiny: ModelStatus) -> None:
    conversation = Conversation(turns=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    before = list(conversation.turns)
    endpoint = rayvllm_nb.endpoint(shared_tiny.name)
    with pytest.raises(openai.BadRequestError):
        _run(lambda client: conversation.send(client, endpoint, shared_tiny.name, DEMO_PROMPT, print,
                                              max_tokens=16, temperature=-1.0), shared_tiny)
    assert conversation.turns == before and conversation.context is None


@pytest.mark.slow
def test_max_tokens_is_bounded_by_the_room_left_and_a_full_context_is_refused(shared_tiny: ModelStatus) -> None:
    endpoint = rayvllm_nb.endpoint(shared_tiny.name)
    conversation = Conversation()

    def room_with(words: int) -> int:
        conversation.system = " ".join(["word"] * words)
        return asyncio.run(measure_context(endpoint, shared_tiny.name, conversation.messages(DEMO_PROMPT))).room

    per_word = (room_with(0) - room_with(100)) / 100
    room = room_with(int((room_with(0) - 100) / per_word))
    assert 0 < room < 200, room
    result = _run(lambda client: conversation.send(client, endpoint, shared_tiny.name, DEMO_PROMPT, lambda _: None,
                                                   max_tokens=100_000, temperature=0.0), shared_tiny)
    assert result.completion_tokens <= room
    conversation.system = " ".join(["word"] * int(2100 / per_word))
    with pytest.raises(ConfigError, match="fills the model's context"):
        _run(lambda client: conversation.send(client, endpoint, shared_tiny.name, DEMO_PROMPT, lambda _: None,
                                              max_tokens=16, temperature=0.0), shared_tiny)
    assert len(conversation.turns) == 2


def test_asking_again_takes_the_last_exchange_and_clear_forgets_every_turn() -> None:
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    conversation = Conversation(system="s", turns=turns)
    assert conversation.take_last_exchange() == "c" and len(conversation.turns) == 2
    conversation.clear()
    assert conversation.turns == [] and conversation.take_last_exchange() is None
    assert conversation.messages("x") == [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]
