"""Property-based: whatever body a client sends, our layer never answers 500 and errors keep OpenAI's shape.

Against the shared tiny deployment (a real replica behind Serve's HAProxy): chat and completion
bodies built from the fields clients send, with values of every kind, some of them broken JSON.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayvllm_nb import ModelStatus

pytestmark = pytest.mark.slow

_ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "nobody", ""])},
    optional={"content": st.one_of(st.text(max_size=30), _ANY), "name": st.text(max_size=5)},
)
_FIELDS = {
    "model": st.one_of(st.just("shared-tiny"), st.text(max_size=10), _ANY),
    "messages": st.one_of(st.lists(_MESSAGE, max_size=3), _ANY),
    "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(0, 600), max_size=5), _ANY),
    "max_tokens": st.one_of(st.integers(-5, 5000), _ANY),
    "temperature": st.one_of(st.floats(-1, 3), _ANY),
    "top_p": st.one_of(st.floats(-1, 2), _ANY),
    "n": st.one_of(st.integers(-1, 3), _ANY),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2), _ANY),
    "stream": st.one_of(st.booleans(), _ANY),
    "logprobs": _ANY,
    "seed": _ANY,
}
_BODIES = st.fixed_dictionaries({}, optional=_FIELDS)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=_BODIES, path=st.sampled_from(["/chat/completions", "/completions"]), broken=st.booleans())
def test_no_body_gets_a_500_and_every_error_is_openai_shaped(
    shared_tiny: ModelStatus, body: dict[str, Any], path: str, broken: bool
) -> None:
    content = json.dumps(body).encode()
    if broken:
        content = content[: max(len(content) // 2, 1)]
    response = httpx.post(shared_tiny.base_url + path, content=content, timeout=120,
                          headers={"Content-Type": "application/json"})
    assert response.status_code != 500 and response.status_code < 502, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == response.status_code
        assert "Traceback" not in error["message"]
