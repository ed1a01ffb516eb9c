"""Cluster launcher: start, inspect and stop the Ray cluster a notebook connects to.

``python -m rayvllm_nb.launch_cluster --config FILE CMD`` and ``rayvllm cluster CMD --config FILE``
are the same commands:

- ``start``: a local head from a config under ``configs/cluster/`` (ports, resources, dashboard);
- ``stop``: ``ray stop`` on this machine, and what it stopped;
- ``status``: nodes, resources total and free, Serve applications;
- ``get-address``: the address to pass to ``initialize_ray(address=...)``;
- ``start-autoscaler``: ``ray up`` with a Ray cluster-launcher YAML, checked against Ray's schema first.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rayvllm_nb._internal import cluster as _cluster
from rayvllm_nb._internal import ray_api
from rayvllm_nb._internal.net import address_host
from rayvllm_nb.config import ClusterConfig, find_config_file, load_cluster_config, read_yaml
from rayvllm_nb.errors import ConfigError, RayVllmError, exit_code

__all__ = ["HeadNode", "get_address", "main", "start", "start_autoscaler", "status", "stop"]


@dataclass(frozen=True)
class HeadNode:
    """A head started by :func:`start`: where drivers, Ray Client and browsers reach it."""

    address: str
    client_address: str
    dashboard_url: str | None

    def __str__(self) -> str:
        lines = [
            f"Ray head started at {self.address}",
            f"  notebook:   rayvllm_nb.init({self.address!r})",
            f"  Ray Client: rayvllm_nb.init({self.client_address!r})",
        ]
        lines.append(f"  dashboard:  {self.dashboard_url}" if self.dashboard_url else "  dashboard:  off")
        lines.append(f"  plain Ray:  {plain_ray_hint(self.address)}")
        return "\n".join(lines)


def plain_ray_hint(address: str) -> str:
    """How a plain ``ray.init`` reaches a token-protected head: Ray sends its token only when told to."""
    return f"RAY_AUTH_MODE=token python -c \"import ray; ray.init(address='{address}')\""


def start(config: ClusterConfig) -> HeadNode:
    """Start a local head from ``config``; every check (ports, a running head) happens first."""
    address = _cluster.start_head(config)
    host = address_host(address)
    dashboard_host = host if config.dashboard_host in ("0.0.0.0", "::") else config.dashboard_host
    return HeadNode(
        address=address,
        client_address=f"ray://{host}:{config.ray_client_server_port}",
        dashboard_url=f"http://{dashboard_host}:{config.dashboard_port}" if config.dashboard else None,
    )


def stop(address: str | None = None) -> list[str]:
    """Stop the heads rayvllm_nb started on this machine (the one at ``address`` if given), with
    every process of theirs (Serve's HAProxy, vLLM engines); returns what was running.

    A cluster started otherwise (``ray start`` by hand) is left alone: ``ray stop`` is its command.
    """
    return _cluster.stop_started_heads(address)


def status(address: str | None = None) -> _cluster.ClusterReport:
    """Nodes, resources and Serve applications of the cluster at ``address`` (default: the one
    this process is connected to, else this machine's head). A process already connected to
    Ray keeps its connection."""
    import ray

    if ray.is_initialized():
        from rayvllm_nb.api import ray_backend

        gcs = ray.get_runtime_context().gcs_address
        label = ray_backend.cluster.address if ray_backend.cluster is not None else gcs
        if address not in (None, gcs, label):
            raise ConfigError(
                f"This process is connected to Ray at {label}, not {address}. Ask from a new process "
                f"(`rayvllm cluster status --address {address}`) or call status() without an address."
            )
        return _cluster.describe_cluster(label)
    target = address or _cluster.running_head_address()
    _cluster.connect(target, num_cpus=None, num_gpus=None, start_local=False)
    try:
        return _cluster.describe_cluster(target)
    finally:
        ray.shutdown()


def get_address() -> str:
    """The GCS address of the head running on this machine; ClusterError when none runs."""
    return _cluster.running_head_address()


def validate_autoscaler_config(source: str | Path) -> dict[str, Any]:
    """Read a Ray cluster-launcher YAML and check it as ``ray up`` would, with Ray's own schema;
    returns the config with Ray's defaults filled in."""
    import jsonschema

    path = find_config_file(str(source), "cluster")
    raw = read_yaml(path)
    if not {"cluster_name", "provider"} <= set(raw):
        raise ConfigError(
            f"{path} is not a Ray cluster-launcher file (it needs cluster_name and provider). A local head "
            f"config like this one starts with `rayvllm cluster start --config {path}`."
        )
    try:
        prepared = ray_api.validate_cluster_launcher_config(copy.deepcopy(raw))
    except jsonschema.ValidationError as error:
        where = "/".join(str(part) for part in error.absolute_path) or "top level"
        raise ConfigError(
            f"Ray's cluster-config schema rejects {path} at {where}: {error.message}. Fix that key (Ray's "
            "reference: https://docs.ray.io/en/latest/cluster/vms/references/ray-cluster-configuration.html)."
        ) from None
    except (ValueError, KeyError, RuntimeError) as error:
        raise ConfigError(f"Ray rejects the cluster-launcher file {path}: {error}. Fix it and retry.") from None
    return prepared


def autoscaler_command(source: str | Path) -> list[str]:
    """The ``ray up`` command ``start-autoscaler`` runs for ``source``."""
    path = find_config_file(str(source), "cluster").absolute()
    return [sys.executable, "-m", "ray.scripts.scripts", "up", str(path), "--yes", "--no-config-cache"]


def start_autoscaler(source: str | Path, dry_run: bool = False) -> int:
    """Validate ``source``, then run ``ray up`` (or, with ``dry_run``, print what it would run)."""
    prepared = validate_autoscaler_config(source)
    command = autoscaler_command(source)
    if dry_run:
        print(f"Config {source} is valid for Ray's cluster launcher (defaults filled in below).")
        print("Would run: " + shlex.join(command))
        print(yaml.safe_dump(prepared, sort_keys=False), end="")
        return 0
    ray_api.ensure_auth_token()
    return subprocess.run(command, check=False, stdin=sys.stdin).returncode


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The launcher's subcommands, shared by ``rayvllm cluster`` and ``python -m rayvllm_nb.launch_cluster``."""
    options = _config_options()
    start_parser = commands.add_parser("start", parents=[options], help="start a local Ray head from a config")
    start_parser.set_defaults(run=_start)
    stop_parser = commands.add_parser(
        "stop", parents=[options], help="stop the Ray heads rayvllm started on this machine, and all their processes"
    )
    stop_parser.add_argument("--address", default=argparse.SUPPRESS, help="only the head at this GCS address")
    stop_parser.set_defaults(run=_stop)
    status_parser = commands.add_parser("status", parents=[options], help="nodes, resources, Serve applications")
    status_parser.add_argument("--address", default=argparse.SUPPRESS,
                               help="cluster address (default: the head on this machine)")
    status_parser.set_defaults(run=_status)
    address_parser = commands.add_parser("get-address", parents=[options], help="the address to connect to")
    address_parser.add_argument("--client", action="store_true", help="print the Ray Client (ray://) address")
    address_parser.set_defaults(run=_get_address)
    autoscaler = commands.add_parser("start-autoscaler", parents=[options], help="`ray up` a cluster-launcher YAML")
    autoscaler.add_argument(
        "--dry-run", action="store_true", help="validate, print the command and config, run nothing"
    )
    autoscaler.set_defaults(run=_start_autoscaler)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rayvllm_nb.launch_cluster [--config FILE] CMD``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m rayvllm_nb.launch_cluster", parents=[_config_options()],
        description="Start, inspect and stop the Ray cluster rayvllm_nb deploys on.",
    )
    parser.add_argument("--address", help="cluster address for `status` (default: the head on this machine)")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run a parsed launcher command: print what it returns (an int is `ray up`'s own exit code),
    or its error as one message and an exit code."""
    try:
        result = args.run(args)
    except RayVllmError as error:
        print(f"rayvllm cluster: error: {error}", file=sys.stderr)
        return exit_code(error)
    if isinstance(result, int):
        return result
    print(result)
    return 0


def _config_options() -> argparse.ArgumentParser:
    """``--config`` and ``--set``, accepted before or after the command (no defaults, so a
    subcommand does not overwrite what was given before it: read them with :func:`_option`)."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", default=argparse.SUPPRESS, help="config file or name under configs/cluster/")
    options.add_argument("--set", dest="overrides", action="append", default=argparse.SUPPRESS,
                         metavar="KEY=VALUE", help="override a config key (repeatable), e.g. --set port=26379")
    return options


def _option(args: argparse.Namespace, name: str) -> Any:
    return getattr(args, name, [] if name == "overrides" else None)


def _start(args: argparse.Namespace) -> HeadNode:
    return start(load_cluster_config(_option(args, "config") or "local_basic", _option(args, "overrides")))


def _stop(args: argparse.Namespace) -> str:
    stopped = stop(_option(args, "address"))
    if not stopped:
        return "No Ray head started by rayvllm runs on this machine (stop one started by hand with `ray stop`)."
    return "\n  ".join([f"Stopped {len(stopped)} process(es) on this machine:", *stopped])


def _status(args: argparse.Namespace) -> _cluster.ClusterReport:
    return status(_option(args, "address"))


def _get_address(args: argparse.Namespace) -> str:
    """The bare address, the last line of stdout (scripts read it); plain Ray's hint on stderr."""
    address = get_address()
    if args.client:
        address = f"ray://{address_host(address)}:{_cluster.running_client_server_port(address)}"
    print(f"for plain Ray (token authentication is on): {plain_ray_hint(address)}", file=sys.stderr)
    return address


def _start_autoscaler(args: argparse.Namespace) -> int:
    if not _option(args, "config"):
        raise ConfigError(
            "start-autoscaler needs --config FILE: a Ray cluster-launcher YAML such as "
            "configs/cluster/multi_node_example.yaml."
        )
    return start_autoscaler(_option(args, "config"), dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())

