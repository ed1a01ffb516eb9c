"""What a chat answer's figures say: tok/s over the whole answer, steady when chunks merge."""

from __future__ import annotations

import pytest

from rayvllm_nb._internal.chat import ChatResult


def test_tok_s_is_over_the_whole_answer_so_merged_chunks_do_not_inflate_it() -> None:
    spread = ChatResult(text="x", completion_tokens=15, ttft_s=0.010, total_s=0.050)
    merged = ChatResult(text="x", completion_tokens=15, ttft_s=0.0499, total_s=0.050)  # all in one chunk
    assert spread.tokens_per_s == merged.tokens_per_s == pytest.approx(300.0)
    assert spread.summary() == "15 tokens in 50 ms (TTFT 10 ms), 300 tok/s"
    assert ChatResult(text="", completion_tokens=0, ttft_s=0.0, total_s=0.0).tokens_per_s == 0.0
