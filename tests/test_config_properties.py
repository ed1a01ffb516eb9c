"""Property-based: any model-config dict is either a valid config or one ConfigError naming a key."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayvllm_nb.config import ModelConfig, load_config
from rayvllm_nb.errors import ConfigError

_KEYS = [*ModelConfig.model_fields, "tensor_paralel_size", "gpu_memory", "", "model.name", "port "]
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 70_000), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["auto", "cpu", "gpu", "bfloat16", "/", "/x", "builtin:tiny", "1"]),
    st.lists(st.integers(-2, 3), max_size=3), st.dictionaries(st.text(max_size=6), st.integers(-2, 9), max_size=2),
)
_CONFIGS = st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=8)


# Derandomized: the same 400 examples each run, so a CI result is reproducible.
@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=_CONFIGS, with_model=st.booleans())
def test_a_config_dict_is_valid_or_one_config_error_naming_a_key(data: dict[str, Any], with_model: bool) -> None:
    if with_model:
        data = {**data, "model": "m"}
    try:
        config = load_config(data)
    except ConfigError as error:
        message = str(error)
        assert message.startswith("Invalid model config from the given dict: "), message
        assert any(repr(key) in message or f"{key}=" in message for key in [*data, "model"]), message
        assert "Traceback" not in message and "\n" not in message
        return
    assert isinstance(config, ModelConfig)
    assert load_config(config) == config, "a valid config must load again unchanged"
