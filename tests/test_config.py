from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rayvllm_nb._internal.net import free_port
from rayvllm_nb.config import ModelConfig, available_configs, load_cluster_config, load_config, resolve_start_target
from rayvllm_nb.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_seed_dict_is_accepted_with_defaults_for_the_rest() -> None:
    seed = {"model": "meta-llama/Llama-2-7b-chat-hf", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.9}
    config = load_config({**seed, "port": 8000})
    assert config.tensor_parallel_size == 2 and config.port == 8000
    assert config.name == "meta-llama/Llama-2-7b-chat-hf"


def test_serve_address_is_the_configs_else_the_running_serves_else_loopback_8000(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rayvllm_nb.backend import SERVE_PORT_ENV, serve_address

    monkeypatch.delenv(SERVE_PORT_ENV, raising=False)
    unset = load_config({"model": "m"})
    assert serve_address(unset, None) == ("127.0.0.1", 8000)
    assert serve_address(unset, ("0.0.0.0", 9000)) == ("0.0.0.0", 9000)
    assert serve_address(load_config({"model": "m", "port": 8123}), ("0.0.0.0", 9000)) == ("0.0.0.0", 8123)
    monkeypatch.setenv(SERVE_PORT_ENV, "8765")
    assert serve_address(unset, None) == ("127.0.0.1", 8765)


def test_every_shipped_config_validates() -> None:
    names = available_configs()
    assert {"tiny-cpu", "qwen2.5-0.5b-gpu", "llama2-7b-tp2-gpu"} <= set(names)
    for name in names:
        assert isinstance(load_config(name), ModelConfig)


def test_tiny_cpu_config_matches_the_embedded_default() -> None:
    config = load_config(REPO / "configs" / "models" / "tiny-cpu.yaml")
    assert (config.model, config.device, config.dtype) == ("builtin:tiny", "cpu", "bfloat16")
    assert (config.max_model_len, config.enforce_eager, config.cpu_kvcache_space_gb) == (256, True, 1)
    assert config.name == "tiny"


def test_overrides_are_parsed_as_yaml_and_may_be_nested() -> None:
    config = load_config("tiny-cpu", ["tensor_parallel_size=2", "engine_kwargs.max_num_seqs=8", "model=/x/y"])
    assert config.tensor_parallel_size == 2
    assert config.engine_kwargs == {"max_num_seqs": 8}
    assert config.name == "y"


def test_unknown_key_is_named_with_a_suggestion() -> None:
    expected = r"unknown key 'tensor_paralel_size' \(did you mean 'tensor_parallel_size'\?\)"
    with pytest.raises(ConfigError, match=expected):
        load_config({"model": "m", "tensor_paralel_size": 2})


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("tensor_parallel_size", 0, "tensor_parallel_size=0"),
        ("gpu_memory_utilization", 1.5, "gpu_memory_utilization=1.5"),
        ("dtype", "fp7", "dtype='fp7'"),
        ("route_prefix", "v1", "route_prefix='v1'"),
    ],
)
def test_bad_values_fail_with_the_key_and_value(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config({"model": "m", key: value})


def test_unknown_config_name_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'tiny-cpu'"):
        load_config("tiny-cup")


def test_malformed_override_is_rejected() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny-cpu", ["tensor_parallel_size"])


def test_hf_token_never_shows_in_repr_errors_or_public_dict() -> None:
    secret = "hf_planted_secret_123"
    config = load_config({"model": "m", "hf_token": secret})
    assert secret not in repr(config) and secret not in str(config.public_dict())
    assert config.hf_token is not None and config.hf_token.get_secret_value() == secret
    with pytest.raises(ConfigError) as error:
        load_config({"model": "m", "hf_token": 12345678})
    assert "12345678" not in str(error.value)
    assert load_config(config).hf_token.get_secret_value() == secret


def test_shipped_cluster_configs_validate_and_keep_the_dashboard_local() -> None:
    names = available_configs("cluster")
    assert {"local_basic", "local_cpu", "local_gpu", "multi_node_example"} <= set(names)
    for name in ("local_basic", "local_cpu", "local_gpu"):
        config = load_cluster_config(name)
        assert config.dashboard_host == "127.0.0.1" and config.token_auth
    assert load_cluster_config("local_cpu").num_gpus == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_cpus": -1}, "num_cpus=-1 (your override): Input should be greater than or equal to 0"),
        ({"resources": {"accelerator": -2}}, "resource amounts must be >= 0"),
        ({"object_store_memory_gb": 0}, "object_store_memory_gb=0"),
        ({"dashbord": False}, "unknown key 'dashbord' (your override) (did you mean 'dashboard'?)"),
        ({"port": 10005}, "port=10005 lies in Ray's worker port range 10002-19999"),
        ({"port": 8265}, "dashboard_port and port both use port 8265"),
        ({"resources": {"GPU": 1}}, "have keys of their own"),
    ],
)
def test_bad_cluster_configs_say_what_to_fix(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match="Invalid cluster config") as error:
        load_cluster_config("local_cpu", overrides)
    assert message in str(error.value)


def test_a_cluster_launcher_file_is_not_a_local_head_config() -> None:
    with pytest.raises(ConfigError, match="start-autoscaler"):
        load_cluster_config("multi_node_example")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A stand-in for the Hugging Face hub (HF_ENDPOINT): it has ``someorg/known-model`` and
    answers 404 RepoNotFound for anything else, as the real hub does. An empty HF cache."""

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            known = self.path.split("?")[0] == "/api/models/someorg/known-model"
            body = json.dumps({"id": "someorg/known-model", "sha": "0" * 40} if known else {"error": "not found"})
            self.send_response(200 if known else 404)
            if not known:
                self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    try:
        yield "someorg/known-model"
    finally:
        server.shutdown()


def test_a_start_target_the_hub_has_is_a_model_and_one_it_lacks_is_refused_at_once(hub: str) -> None:
    assert resolve_start_target(hub) == {"model": hub}
    with pytest.raises(ConfigError, match="nor a model the Hugging Face hub has") as refused:
        resolve_start_target("someorg/no-such-model")
    assert "Known configs: " in str(refused.value) and "tiny-cpu" in str(refused.value)


def test_a_mistyped_config_name_is_refused_with_did_you_mean_when_the_hub_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port('127.0.0.1')}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ConfigError, match=r"'tiny-cup' is not a config name \(did you mean 'tiny-cpu'\?\)") as refused:
        resolve_start_target("tiny-cup")
    assert "the hub could not be reached" in str(refused.value)


def test_config_names_yaml_files_folders_and_the_builtin_model_are_start_targets(tmp_path: Path) -> None:
    assert resolve_start_target("tiny-cpu") == "tiny-cpu"
    assert resolve_start_target("mine.yaml") == "mine.yaml"
    assert resolve_start_target("builtin:tiny") == {"model": "builtin:tiny"}
    assert resolve_start_target(str(tmp_path)) == {"model": str(tmp_path.resolve())}
    with pytest.raises(ConfigError, match="a local model folder"):
        resolve_start_target(str(tmp_path / "missing"))


def test_a_bad_override_is_blamed_on_the_override_not_the_file() -> None:
    with pytest.raises(ConfigError) as bad:
        load_config("tiny-cpu", ["max_model_len=-5"])
    assert "max_model_len=-5 (your override): " in str(bad.value)
    assert "tiny-cpu.yaml" not in str(bad.value)


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        (["route_prefix=/"], "route_prefix '/' belongs to the shared endpoint"),
        (["route_prefix=/v1"], "route_prefix '/v1' belongs to the shared endpoint"),
        (["lora_adapters.bad name=./x"], "adapter name 'bad name' may hold only"),
        (["autoscaling.max_replicas=2", "autoscaling.min_replicas=3"], "min_replicas (3) must not exceed"),
        (["autoscaling.max_replicas=2", "num_replicas=2"], "set num_replicas or autoscaling, not both"),
        (["autoscaling.min_replicas=1"], "autoscaling.max_replicas"),
        (["autoscaling.max_replicas=2", "autoscaling.min_replicas=-1"], "greater than or equal to 0"),
        (["autoscaling.max_replicas=2", "autoscaling.downscale_to_zero_delay_s=5"],
         "downscale_to_zero_delay_s needs min_replicas: 0"),
        (["max_queued_requests=4"], "max_queued_requests needs max_ongoing_requests"),
    ],
)
def test_serving_many_keys_are_checked_with_what_to_do(overrides: list[str], complaint: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config("tiny-cpu", overrides)
    assert complaint in str(error.value)


def test_adapters_turn_lora_on_and_autoscaling_sets_the_most_replicas() -> None:
    from rayvllm_nb.engines.serve_llm import ServeLLMEngine

    plain = load_config("tiny-cpu")
    assert (plain.route_prefix, plain.lora_enabled, plain.max_replicas) == (None, False, 1)
    config = load_config("tiny-cpu", ["lora_adapters.hello=builtin:tiny-adapter", "max_lora_rank=8",
                                      "autoscaling.max_replicas=3", "autoscaling.min_replicas=2"])
    assert config.lora_enabled and config.max_replicas == 3 and config.autoscaling is not None
    arguments = ServeLLMEngine().engine_arguments(config)
    assert arguments["enable_lora"] is True and arguments["max_lora_rank"] == 8
    assert "enable_lora" not in ServeLLMEngine().engine_arguments(plain)


def test_a_model_that_scales_to_zero_loads_one_replica_at_start_and_gives_it_up_when_idle() -> None:
    """The plan Serve is sent: its autoscaler between 0 and the most, one replica at first."""
    from rayvllm_nb.engines.serve_llm import _replica_settings

    config = load_config("tiny-cpu", ["autoscaling.min_replicas=0", "autoscaling.max_replicas=2",
                                      "autoscaling.downscale_to_zero_delay_s=20"])
    assert config.autoscaling is not None and config.autoscaling.scales_to_zero
    autoscaling = _replica_settings(config)["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["initial_replicas"], autoscaling["max_replicas"]) == (0, 1, 2)
    assert autoscaling["downscale_to_zero_delay_s"] == 20
    kept = _replica_settings(load_config("tiny-cpu", ["autoscaling.max_replicas=2"]))["autoscaling_config"]
    assert "initial_replicas" not in kept and "downscale_to_zero_delay_s" not in kept


def test_an_adapter_folder_becomes_absolute_and_a_hub_id_is_passed_on_as_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the replicas are told to load (a hub id is a plan here: no hub is reachable)."""
    from rayvllm_nb.backend import _resolve_adapter_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "adapter_config.json").write_text("{}")
    assert _resolve_adapter_source("hello", "./mine", cluster_is_local=True) == str(tmp_path / "mine")
    assert _resolve_adapter_source("hello", "someone/their-adapter", cluster_is_local=True) == "someone/their-adapter"
    assert _resolve_adapter_source("hello", "./mine", cluster_is_local=False) == "./mine", "checked on the nodes"
    with pytest.raises(ConfigError, match="Invalid adapter name"):
        _resolve_adapter_source("no spaces", "./mine", cluster_is_local=True)
