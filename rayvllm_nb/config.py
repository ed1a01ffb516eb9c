"""Configs: YAML or a dict in, a validated model out.

A :class:`ModelConfig` names the model, how to place it (device, tensor parallelism)
and how vLLM should run it; ``load_config`` is its one way in: it accepts a
``ModelConfig``, a dict (the seed's plain dict works), a YAML path or a config name,
applies ``key=value`` overrides and turns every validation problem into one
actionable :class:`~rayvllm_nb.errors.ConfigError`. A :class:`ClusterConfig`
describes a local Ray head node; ``load_cluster_config`` reads it the same way.

Named configs come from the package itself (``rayvllm_nb/configs/{models,cluster}``,
which a checkout also shows as ``configs/``), then ``./configs/<kind>`` of the current
folder, ``~/.config/rayvllm_nb/<kind>`` and each folder of ``$RAYVLLM_NB_CONFIG_PATH``:
a later folder's config wins over an earlier one of the same name.
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from rayvllm_nb._internal.paths import config_home
from rayvllm_nb.errors import ConfigError
from rayvllm_nb.tiny_model import TINY_MODEL_REF

ConfigKind = Literal["models", "cluster"]
CONFIG_PATH_ENV = "RAYVLLM_NB_CONFIG_PATH"
"""Folders (separated like PATH) whose ``models/`` and ``cluster/`` hold the user's own named configs."""


class AutoscalingConfig(BaseModel):
    """How many replicas a model runs as load comes and goes (Serve's autoscaler)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    min_replicas: int = Field(
        default=1, ge=0,
        description=(
            "Replicas kept when idle. 0 scales the model to zero: it still loads once at start, goes when idle, "
            "and the next request waits while a replica loads."
        ),
    )
    max_replicas: int = Field(
        ge=1, description="Most replicas under load; the cluster must hold this many (checked before deploying)."
    )
    target_ongoing_requests: float = Field(
        default=2.0, gt=0,
        description="Requests per replica Serve aims for: above it adds replicas, below it removes them.",
    )
    upscale_delay_s: float = Field(
        default=30.0, ge=0, description="Seconds the load must stay above the target before a replica is added."
    )
    downscale_delay_s: float = Field(
        default=600.0, ge=0, description="Seconds the load must stay below the target before a replica goes."
    )
    downscale_to_zero_delay_s: float | None = Field(
        default=None, ge=0,
        description=(
            "Seconds a model with min_replicas 0 stays idle before its last replica goes (unset: downscale_delay_s)."
        ),
    )

    @model_validator(mode="after")
    def _min_within_max(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        if self.downscale_to_zero_delay_s is not None and self.min_replicas > 0:
            raise ValueError(
                "downscale_to_zero_delay_s needs min_replicas: 0 (it is how long an idle model keeps its last replica)"
            )
        return self

    @property
    def scales_to_zero(self) -> bool:
        """Whether an idle model gives up its last replica."""
        return self.min_replicas == 0


class ModelConfig(BaseModel):
    """One model to deploy: what to load, where to place it and how vLLM runs it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(
        description=(
            "Hugging Face model id, local folder, or 'builtin:tiny' for the embedded tiny "
            "CPU model (built and cached on first use)."
        )
    )
    served_model_name: str | None = Field(
        default=None,
        description="Name clients pass as `model`; defaults to the model id or folder name.",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="Devices one replica spans (GPUs, or CPU workers in CPU mode)."
    )
    num_replicas: int = Field(
        default=1, ge=1, description="Identical replicas Serve routes requests across (fixed; see autoscaling)."
    )
    autoscaling: AutoscalingConfig | None = Field(
        default=None,
        description="Replicas that follow the load, between min_replicas and max_replicas (instead of num_replicas).",
    )
    max_ongoing_requests: int | None = Field(
        default=None, ge=1,
        description="Requests one replica handles at once; more wait in its queue (Serve LLM's default: no limit).",
    )
    max_queued_requests: int | None = Field(
        default=None, ge=1,
        description=(
            "Requests that may wait per replica once max_ongoing_requests run; more are answered at once with an "
            "OpenAI-shaped 503 and Retry-After (backpressure) instead of a growing queue. Unset: no bound."
        ),
    )
    device: Literal["auto", "cpu", "gpu"] = Field(
        default="auto", description="Where to run; 'auto' means GPU when the cluster has GPUs, else CPU."
    )
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = Field(
        default="auto", description="Weight and activation dtype passed to vLLM."
    )
    max_model_len: int | None = Field(
        default=None, gt=0, description="Context length; vLLM derives it from the model when unset."
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description=(
            "Fraction of each GPU's memory vLLM may use (vLLM's default when unset). In CPU mode vLLM reads it "
            "as the share of the node's memory; unset there (and no cpu_kvcache_space_gb), each replica sizes "
            "its KV cache to what its node has free."
        ),
    )
    enforce_eager: bool = Field(default=False, description="Disable CUDA graphs / compilation (faster start).")
    trust_remote_code: bool = Field(default=False, description="Allow model repositories to run their own code.")
    download_dir: str | None = Field(default=None, description="Where vLLM downloads weights on the nodes.")
    load_format: str = Field(default="auto", description="vLLM weight format ('auto', 'safetensors', 'pt', ...).")
    enable_prefix_caching: bool | None = Field(
        default=None, description="Reuse KV cache across shared prompt prefixes; vLLM's default when unset."
    )
    chat_template: str | None = Field(
        default=None, description="Jinja chat template (text or file path) overriding the tokenizer's."
    )
    hf_token: SecretStr | None = Field(
        default=None, description="Hugging Face token for gated models; sent to replicas, never shown."
    )
    cpu_kvcache_space_gb: int | None = Field(
        default=None,
        ge=1,
        description="KV cache size in whole GiB per CPU engine (CPU mode); vLLM's default when unset.",
    )
    cpu_omp_threads_bind: str | None = Field(
        default=None,
        description="CPU cores each TP rank binds, e.g. '0|1' (CPU mode); split evenly when unset and TP > 1.",
    )
    cpu_pinning: bool = Field(
        default=True,
        description=(
            "CPU mode: pin vLLM's engine core beside its rank-0 worker and the streaming processes (replica, "
            "Serve's HAProxy) on the cores no worker binds, so the scheduler never takes the streamer's core "
            "(docs/performance.md); False leaves them to the OS."
        ),
    )
    host: str | None = Field(
        default=None,
        description=(
            "Serve's HTTP host (0.0.0.0 opens it to the network); unset: the running Serve's, else 127.0.0.1. "
            "Fixed when Serve first starts."
        ),
    )
    endpoint_host: str | None = Field(
        default=None,
        description=(
            "Host the notebook's OpenAI client uses to reach Serve (e.g. 127.0.0.1 through an SSH tunnel); "
            "default: Serve's host, or the cluster address's host when Serve listens on all interfaces."
        ),
    )
    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description=(
            "Serve's HTTP port; unset: the running Serve's, else $RAYVLLM_NB_SERVE_PORT, else 8000. Fixed when "
            "Serve first starts."
        ),
    )
    api_key: SecretStr | None = Field(
        default=None,
        description=(
            "API key every request but /health must send (`Authorization: Bearer KEY`). It belongs to the Serve "
            "endpoint: set when Serve first starts, for every model on it; never shown."
        ),
    )
    api_key_env: str | None = Field(
        default=None,
        description="Name of an environment variable holding the API key (read when the config is loaded).",
    )
    route_prefix: str | None = Field(
        default=None,
        description=(
            "URL prefix of an OpenAI endpoint of this model's own (e.g. /mine: http://HOST:PORT/mine/v1). Unset: "
            "the shared endpoint, http://HOST:PORT/v1, where every model started without one is served, "
            "chosen by the request's `model`."
        ),
    )
    max_restarts: int = Field(
        default=3,
        ge=0,
        description=(
            "Crashes of the model's replicas (engine or replica process died) that Serve may restart within "
            "10 minutes; one more and the model is stopped, its root cause kept in status."
        ),
    )
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="Seconds a stopping replica (stop, replace, scale-down) lets running requests finish.",
    )
    engine: str = Field(default="serve-llm", description="Engine implementation, by registry name.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra vLLM engine arguments (AsyncEngineArgs names)."
    )
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment variables set on the replicas.")
    lora_adapters: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "LoRA adapters served with the model from its start: name (what clients pass as `model`) -> a local "
            "adapter folder (PEFT format) or a Hugging Face id. Turns LoRA on."
        ),
    )
    enable_lora: bool = Field(
        default=False,
        description=(
            "Serve LoRA adapters loaded at run time (rayvllm_nb.load_adapter) even with no lora_adapters. Off by "
            "default: LoRA costs the engine memory and speed."
        ),
    )
    max_loras: int | None = Field(
        default=None, ge=1, description="LoRA adapters one batch may mix (vLLM's max_loras; its default when unset)."
    )
    max_lora_rank: int | None = Field(
        default=None, ge=1, description="Largest adapter rank accepted (vLLM's max_lora_rank; its default when unset)."
    )

    @model_validator(mode="after")
    def _replicas_fixed_or_autoscaled(self) -> ModelConfig:
        if self.autoscaling is not None and self.num_replicas > 1:
            raise ValueError("set num_replicas or autoscaling, not both (autoscaling sets min and max replicas)")
        if self.max_queued_requests is not None and self.max_ongoing_requests is None:
            raise ValueError("max_queued_requests needs max_ongoing_requests (a queue forms only beyond it)")
        return self

    @property
    def max_replicas(self) -> int:
        """The most replicas this model may run at once."""
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas

    @field_validator("lora_adapters")
    @classmethod
    def _adapter_names_are_model_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            check_adapter_name(name)
            if not path:
                raise ValueError(f"lora_adapters.{name} needs a folder or a Hugging Face id")
        return value

    @property
    def lora_enabled(self) -> bool:
        """Whether the engine runs with LoRA (adapters from the start, or loadable at run time)."""
        return self.enable_lora or bool(self.lora_adapters)

    @field_validator("env_vars", mode="before")
    @classmethod
    def _env_values_are_text(cls, value: Any) -> Any:
        """YAML reads `LEVEL: 1` as a number; environment values are text."""
        if isinstance(value, Mapping):
            return {k: str(v).lower() if isinstance(v, bool) else str(v) if isinstance(v, int | float) else v
                    for k, v in value.items()}
        return value

    @field_validator("api_key_env")
    @classmethod
    def _api_key_env_is_set(cls, name: str | None) -> str | None:
        if name is not None and not os.environ.get(name):
            raise ValueError(f"the environment variable {name!r} is not set here: export it first")
        return name

    @model_validator(mode="after")
    def _api_key_from_environment(self) -> ModelConfig:
        if self.api_key_env is None:
            return self
        value = os.environ[self.api_key_env]
        if self.api_key is not None and self.api_key.get_secret_value() != value:
            raise ValueError("set api_key or api_key_env, not both")
        # validate_assignment would run this validator again: set the field directly.
        self.__dict__["api_key"] = SecretStr(value)
        return self

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix_is_a_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", value):
            raise ValueError(f"route_prefix must be a URL path starting with '/', got {value!r}")
        value = value.rstrip("/") or "/"
        if value == "/" or value.split("/")[1] in ("v1", "rayvllm-nb"):
            raise ValueError(
                f"route_prefix {value!r} belongs to the shared endpoint (/, /v1, /rayvllm-nb): leave route_prefix "
                "unset to serve this model there, or give it a prefix of its own such as /mine"
            )
        return value

    @property
    def name(self) -> str:
        """The served model name: what clients pass as ``model``."""
        if self.served_model_name:
            return self.served_model_name
        if self.model == TINY_MODEL_REF:
            return "tiny"
        if _looks_like_path(self.model):
            return Path(self.model).expanduser().resolve().name
        return self.model

    def public_dict(self) -> dict[str, Any]:
        """The config as plain data with secrets masked: safe to log, show and store."""
        data = self.model_dump(mode="json", exclude=set(SECRET_FIELDS))
        data.update({key: _MASK if getattr(self, key) else None for key in SECRET_FIELDS})
        data["served_model_name"] = self.name
        return data


SECRET_FIELDS = ("hf_token", "api_key")
"""Config keys whose values are never shown, logged or stored in plain text."""
_MASK = "**********"


class ClusterConfig(BaseModel):
    """A local Ray head node: its ports, resources and what it exposes.

    Ray's own ports (GCS, Ray Client) listen on the node's IP and are protected by Ray's
    token authentication; the dashboard binds ``dashboard_host`` (127.0.0.1 unless opened).
    """

    model_config = ConfigDict(extra="forbid")

    node_ip_address: str | None = Field(
        default=None,
        description="IP other nodes and drivers reach this head at; Ray picks the machine's IP when unset.",
    )
    port: int = Field(default=6379, ge=1, le=65535, description="GCS port: the address is <node IP>:<port>.")
    ray_client_server_port: int = Field(
        default=10001, ge=1, le=65535, description="Ray Client server port (ray://<host>:<port>)."
    )
    dashboard: bool = Field(default=True, description="Run Ray's dashboard (also serves logs and the state API).")
    dashboard_host: str = Field(
        default="127.0.0.1", description="Interface the dashboard binds; 0.0.0.0 opens it to the network."
    )
    dashboard_port: int = Field(default=8265, ge=1, le=65535, description="Dashboard HTTP port.")
    dashboard_agent_port: int = Field(
        default=52365,
        ge=1,
        le=65535,
        description="Port of the node's dashboard agent (serves replica logs); each head on one machine needs its own.",
    )
    num_cpus: int | None = Field(
        default=None, ge=0, description="CPUs this node offers to Ray; all of the machine's cores when unset."
    )
    num_gpus: int | None = Field(default=None, ge=0, description="GPUs this node offers; Ray detects them when unset.")
    object_store_memory_gb: float | None = Field(
        default=None, gt=0, description="Object store size in GiB; Ray's default (30 % of memory) when unset."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom resources this node offers, e.g. {accelerator_a10g: 4}."
    )
    min_worker_port: int = Field(default=10002, ge=1024, le=65535, description="Lowest port of Ray's worker processes.")
    max_worker_port: int = Field(
        default=19999, ge=1024, le=65535, description="Highest port of Ray's worker processes."
    )
    token_auth: bool = Field(
        default=True,
        description="Require Ray's token authentication (the token in ~/.ray/auth_token, created if missing).",
    )
    serve_direct_ingress: bool = Field(
        default=True,
        description=(
            "Serve's HAProxy mode: HAProxy on the Serve port streams from each replica's own HTTP server "
            "(no Ray actor call per token). Replicas on other machines then need the model's host: 0.0.0.0."
        ),
    )

    @field_validator("resources")
    @classmethod
    def _resources_not_negative(cls, value: dict[str, float]) -> dict[str, float]:
        negative = {name: amount for name, amount in value.items() if amount < 0}
        if negative:
            raise ValueError(f"resource amounts must be >= 0, got {negative}")
        reserved = {"CPU", "GPU", "memory", "object_store_memory"} & set(value)
        if reserved:
            raise ValueError(f"{sorted(reserved)} have keys of their own (num_cpus, num_gpus, ...)")
        return value

    @model_validator(mode="after")
    def _ports_do_not_collide(self) -> ClusterConfig:
        if self.min_worker_port > self.max_worker_port:
            raise ValueError(f"min_worker_port {self.min_worker_port} is above max_worker_port {self.max_worker_port}")
        named = self.listening_ports()
        seen: dict[int, str] = {}
        for name, port in named.items():
            if port in seen:
                raise ValueError(f"{name} and {seen[port]} both use port {port}; give each its own")
            if self.min_worker_port <= port <= self.max_worker_port:
                raise ValueError(
                    f"{name}={port} lies in Ray's worker port range {self.min_worker_port}-{self.max_worker_port}; "
                    "pick a port outside it or move the range (min_worker_port/max_worker_port)"
                )
            seen[port] = name
        return self

    def listening_ports(self) -> dict[str, int]:
        """The fixed ports the head listens on, by config key."""
        ports = {"port": self.port, "ray_client_server_port": self.ray_client_server_port}
        if self.dashboard:
            ports["dashboard_port"] = self.dashboard_port
        ports["dashboard_agent_port"] = self.dashboard_agent_port
        return ports


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(model))


def config_folders(kind: ConfigKind = "models") -> list[Path]:
    """Folders searched for named configs of ``kind``, lowest precedence first (see the module docstring)."""
    builtin = Path(str(importlib.resources.files("rayvllm_nb") / "configs" / kind))
    entries = [entry for entry in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if entry]
    extra = [Path(entry).expanduser() / kind for entry in entries]
    return [builtin, Path.cwd() / "configs" / kind, config_home() / kind, *extra]


def available_configs(kind: ConfigKind = "models") -> dict[str, Path]:
    """Named configs of ``kind`` (``"models"`` or ``"cluster"``): name -> YAML file."""
    found: dict[str, Path] = {}
    for folder in config_folders(kind):
        if folder.is_dir():
            found.update({path.stem: path for path in sorted(folder.glob("*.yaml"))})
    return found


def load_config(
    source: ModelConfig | Mapping[str, Any] | str | os.PathLike[str],
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> ModelConfig:
    """Build a validated :class:`ModelConfig`.

    ``source`` is a ``ModelConfig``, a dict, a YAML file path, or a config name (e.g.
    ``"tiny-cpu"``; see :func:`available_configs`). ``overrides`` is a mapping or
    ``"key=value"`` strings (values parsed as YAML; ``engine_kwargs.max_num_seqs=8``
    sets a nested key).
    """
    return _load(ModelConfig, "models", source, overrides)


def load_cluster_config(
    source: ClusterConfig | Mapping[str, Any] | str | os.PathLike[str],
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> ClusterConfig:
    """Build a validated :class:`ClusterConfig` from a dict, a YAML path or a config name
    (e.g. ``"local_cpu"``), with ``key=value`` overrides."""
    return _load(ClusterConfig, "cluster", source, overrides)


_Config = TypeVar("_Config", ModelConfig, ClusterConfig)


def _load(
    kind: type[_Config],
    folder: ConfigKind,
    source: BaseModel | Mapping[str, Any] | str | os.PathLike[str],
    overrides: Mapping[str, Any] | Iterable[str] | None,
) -> _Config:
    """The one way from a source to a validated config: source -> dict -> overrides -> validation."""
    if isinstance(source, BaseModel):
        data, origin = _plain_data(source), f"the given {type(source).__name__}"
    elif isinstance(source, Mapping):
        data, origin = dict(source), "the given dict"
    else:
        path = find_config_file(str(source), folder)
        data, origin = read_yaml(path), str(path)
        if kind is ClusterConfig and {"cluster_name", "provider"} & set(data):
            raise ConfigError(
                f"{path} is a Ray cluster-launcher file (it has cluster_name/provider), not a local head config. "
                f"Start it with `rayvllm cluster start-autoscaler --config {path}`; `start` takes a config like "
                "configs/cluster/local_cpu.yaml."
            )
    parsed = _parse_overrides(overrides)
    for key, value in parsed.items():
        _set_dotted(data, key, value)
    return _validate(kind, data, origin, set(parsed))


def _plain_data(config: BaseModel) -> dict[str, Any]:
    """A config's fields as plain data, secrets revealed (they are validated again right after)."""
    data = config.model_dump()
    for key, value in data.items():
        if isinstance(value, SecretStr):
            data[key] = value.get_secret_value()
    return data


def find_config_file(source: str, kind: ConfigKind) -> Path:
    """The YAML file ``source`` names: a path, or a config name (ConfigError with "did you mean" otherwise)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    named = available_configs(kind)
    if source in named:
        return named[source]
    raise ConfigError(
        f"Config {source!r} is neither a YAML file nor a known config name{did_you_mean(source, named)}. "
        f"Known configs: {', '.join(named) or 'none'}; or pass a path to a YAML file."
    )


def resolve_start_target(target: str) -> str | dict[str, str]:
    """What `serve TARGET` / `%rayvllm start TARGET` deploys, checked before anything starts: a
    config name or YAML file as given; a local model folder, ``builtin:tiny`` or a Hugging Face
    model id as ``{"model": ...}``. Anything else (a mistyped config name, a missing folder, a model
    the hub does not have) is a ConfigError with "did you mean", not a minute of loading."""
    named = available_configs()
    if target in named or target.endswith((".yaml", ".yml")):
        return target
    if target == TINY_MODEL_REF:
        return {"model": target}
    path = Path(target).expanduser()
    if path.is_dir():
        return {"model": str(path.resolve())}
    known = _hub_knows(target) if not _looks_like_path(target) else False
    if known or (known is None and _in_hub_cache(target)):
        return {"model": target}
    why = {
        False: "nor a model the Hugging Face hub has (a private or gated one needs HF_TOKEN)",
        None: "nor a model in this machine's Hugging Face cache, and the hub could not be reached to look it up",
    }[known]
    raise ConfigError(
        f"{target!r} is not a config name{did_you_mean(target, named)}, a YAML file, a local model folder, "
        f"{why}. Known configs: {', '.join(named)}; pass one of them, a folder that exists, or a hub id "
        "such as Qwen/Qwen2.5-0.5B-Instruct."
    )


_HUB_TIMEOUT_S = 5.0


def _hub_knows(model_id: str) -> bool | None:
    """Whether the Hugging Face hub (``HF_ENDPOINT`` when set) has ``model_id``; None when it could
    not be asked (offline, unreachable, rate limited)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).model_info(model_id, timeout=_HUB_TIMEOUT_S)
    except GatedRepoError:
        return True
    except (RepositoryNotFoundError, HFValidationError):
        return False
    except Exception:  # noqa: BLE001 - any failure to ask (network, offline mode, 5xx) means "unknown"
        return None
    return True


def _in_hub_cache(model_id: str) -> bool:
    """Whether this machine's Hugging Face cache holds ``model_id`` (vLLM loads it offline then)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except HFValidationError:
        return False


def check_adapter_name(name: str) -> str:
    """``name`` if it can name a LoRA adapter (what clients pass as ``model``), else ValueError."""
    if not re.fullmatch(r"[A-Za-z0-9._/-]+", name):
        raise ValueError(
            f"adapter name {name!r} may hold only letters, digits and . _ / - (clients pass it as `model`)"
        )
    return name


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""`` when none is close."""
    hint = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's mapping (SafeLoader); ConfigError when it is not YAML or not a mapping."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"Config file {path} is not valid YAML: {error}. Fix the file and retry.") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file {path} must hold a mapping of keys (model: ..., tensor_parallel_size: ...), "
            f"not a {type(data).__name__}."
        )
    return data


def _parse_overrides(overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Override {item!r} is not of the form key=value (e.g. tensor_parallel_size=2).")
        parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return parsed


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    target = data
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"Override {key!r}: {part!r} is not a mapping, so it has no key {leaf!r}.")
    target[leaf] = value


def _validate(kind: type[_Config], data: dict[str, Any], origin: str, overridden: set[str]) -> _Config:
    """Validate; each problem is blamed on what the user typed: an override, or the source."""
    try:
        return kind.model_validate(data)
    except ValidationError as error:
        problems, from_source = [], False
        for problem in error.errors():
            location = ".".join(str(part) for part in problem["loc"])
            by_override = location in overridden or any(location.startswith(f"{key}.") for key in overridden)
            from_source = from_source or not by_override
            problems.append(_describe(kind, problem, " (your override)" if by_override else ""))
        what = "model config" if kind is ModelConfig else "cluster config"
        where = f" from {origin}" if from_source else ""
        raise ConfigError(
            f"Invalid {what}{where}: " + "; ".join(problems) + ". "
            "Fix these keys (see the field descriptions in the README or docs/cluster-setup.md) and retry."
        ) from None


def _describe(kind: type[BaseModel], problem: Mapping[str, Any], label: str = "") -> str:
    """One validation problem as ``key=value (label): why``."""
    location = ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "extra_forbidden":
        return f"unknown key {location!r}{label}{did_you_mean(str(problem['loc'][-1]), kind.model_fields)}"
    if problem["type"] == "missing":
        return f"missing required key {location!r}"
    message = str(problem["msg"]).removeprefix("Value error, ")
    if not location:
        return message
    shown = _MASK if location in SECRET_FIELDS else repr(problem.get("input"))
    return f"{location}={shown}{label}: {message}"
