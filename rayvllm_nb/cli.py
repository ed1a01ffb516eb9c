"""`rayvllm`: the same verbs as the Python API, each usable from a new process."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rayvllm_nb import api, launch_cluster
from rayvllm_nb._internal.chat import stream_chat_blocking
from rayvllm_nb.config import load_config
from rayvllm_nb.errors import ClusterError, ConfigError, RayVllmError
from rayvllm_nb.tiny_model import make_tiny_model
from rayvllm_nb.types import ClusterInfo, Progress


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rayvllm` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except RayVllmError as error:
        print(f"rayvllm: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayvllm", description="Deploy vLLM on Ray Serve and use it.")
    parser.add_argument("--address", help="Ray address (host:port or ray://host:10001); default: local cluster")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="deploy a model and exit once it is ready (it keeps running)")
    serve.add_argument("config", help="YAML file or config name under configs/models (e.g. tiny-cpu)")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (repeatable), e.g. --set tensor_parallel_size=2")
    serve.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for readiness")
    serve.add_argument("--no-wait", action="store_true", help="return once deployed, without waiting")
    serve.add_argument("--replace", action="store_true", help="stop a running model of the same name first")
    serve.set_defaults(run=_serve)

    status = commands.add_parser("status", help="cluster, Serve and deployed models")
    status.set_defaults(run=_status)

    logs = commands.add_parser("logs", help="the engine replica's last log lines (vLLM and Serve), newest last")
    logs.add_argument("name", nargs="?", help="served model name (default: the only one)")
    logs.add_argument("-n", "--lines", type=int, default=100, help="how many lines")
    logs.set_defaults(run=_logs)

    stop = commands.add_parser("stop", help="stop a model (the only one when NAME is omitted)")
    stop.add_argument("name", nargs="?", help="served model name")
    stop.add_argument("--all", action="store_true", help="stop every model deployed through rayvllm_nb")
    stop.add_argument("--cluster", action="store_true", help="then stop the local Ray cluster too (ray stop)")
    stop.set_defaults(run=_stop)

    chat = commands.add_parser("chat", help="send one message and stream the answer")
    chat.add_argument("text", help="the user message")
    chat.add_argument("--model", help="served model name (default: the only one)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(run=_chat)

    bench = commands.add_parser("bench", help="vLLM alone vs rayvllm_nb on the same model: a side-by-side table")
    bench.add_argument("config", nargs="?", default="tiny-cpu", help="YAML file or config name (default: tiny-cpu)")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (repeatable)")
    bench.add_argument("--starts", type=int, default=5,
                       help="server starts per side (default 5; 1-2 to screen a variant, 5+ for figures you report)")
    bench.add_argument("--rounds", type=int, default=3, help="loads of each side per start, alternating (default 3)")
    bench.add_argument("--concurrency", type=_int_list, default=[1, 8], help="comma-separated, e.g. 1,8 (default)")
    bench.add_argument("--requests-per-stream", type=int, default=16,
                       help="requests per concurrent stream in each load (default 16: 128 at c=8)")
    bench.add_argument("--input-len", type=int, default=32, help="prompt length in words")
    bench.add_argument("--output-len", type=int, default=64, help="output tokens per request (ignore_eos)")
    bench.add_argument("--no-pinned-baseline", dest="pinned_baseline", action="store_false",
                       help="skip the third side: vLLM alone with rayvllm_nb's CPU placement")
    bench.add_argument("--output", help="JSON file (default: bench-results/bench-<time>.json)")
    bench.set_defaults(run=_bench)

    soak = commands.add_parser("soak", help="many concurrent streams for minutes: errors, TTFT and memory per minute")
    soak.add_argument("name", nargs="?", help="served model name (default: the only one)")
    soak.add_argument("--minutes", type=float, default=5.0, help="how long (default 5)")
    soak.add_argument("--concurrency", type=int, default=32, help="concurrent streams (default 32)")
    soak.add_argument("--output-len", type=int, default=64, help="output tokens per request (ignore_eos)")
    soak.add_argument("--output", help="also save the report as JSON here")
    soak.set_defaults(run=_soak)

    demo = commands.add_parser("demo", help="tiny CPU model: build, deploy, chat, status, stop")
    demo.set_defaults(run=_demo)

    cluster = commands.add_parser("cluster", help="start, inspect and stop the Ray cluster (see `cluster -h`)")
    launch_cluster.add_commands(cluster.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND"))

    tiny = commands.add_parser("make-tiny-model", help="build the tiny chat model into PATH")
    tiny.add_argument("path")
    tiny.set_defaults(run=_make_tiny_model)
    return parser


def _connect(args: argparse.Namespace, start_local: bool = False) -> ClusterInfo:
    """Connect to the cluster (only `serve` and `demo` start one); say what a stopped cluster left
    behind and connecting ended."""
    cluster = api.init(args.address, start_local=start_local)
    if cluster.reclaimed:
        print("Ended what a stopped Ray cluster left on this machine:", file=sys.stderr)
        for description in cluster.reclaimed:
            print(f"  {description}", file=sys.stderr)
    return cluster


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    _connect(args, start_local=True)
    status = api.start(
        config, replace=args.replace, wait_ready=not args.no_wait, timeout=args.timeout, on_progress=_print_progress
    )
    verb = "ready" if status.ready else "deploying"
    print(f"{status.name} {verb} at {status.base_url}")
    return 0


def _status(args: argparse.Namespace) -> int:
    _connect(args)
    print(api.status())
    return 0


def _logs(args: argparse.Namespace) -> int:
    _connect(args)
    for line in api.logs(args.name, tail=args.lines):
        print(line)
    return 0


def _stop(args: argparse.Namespace) -> int:
    cluster = _connect(args)
    if args.cluster and not cluster.is_local:
        raise ConfigError(f"--cluster only stops a Ray cluster on this machine; {cluster.address} is remote.")
    everything = args.all or (args.cluster and not args.name)
    names = [model.name for model in api.status().models] if everything else [args.name]
    for name in names:
        print(f"stopped {api.stop(name)}")
    if args.cluster:
        api.shutdown()
        if not launch_cluster.stop(cluster.address):
            raise ClusterError(
                f"The Ray cluster at {cluster.address} was not started by rayvllm, so it is left running: "
                "stop it with `ray stop` (it ends every Ray process of this machine's user)."
            )
        print(f"stopped the local Ray cluster at {cluster.address}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    _connect(args)
    model = api.model_status(args.model)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.text}
    ]
    result = stream_chat_blocking(
        api.endpoint(model.name), model.name, messages,
        on_text=_write,
        max_tokens=args.max_tokens, temperature=args.temperature,
    )
    print()
    print(result.summary(), file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.address:
        api.init(args.address)
    output = args.output or f"bench-results/bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = api.bench(
        args.config, args.overrides, starts=args.starts, rounds=args.rounds, concurrency=args.concurrency,
        requests_per_stream=args.requests_per_stream, input_len=args.input_len, output_len=args.output_len,
        pinned_baseline=args.pinned_baseline, output=output,
        on_event=lambda message: print(message, flush=True),
    )
    print(report.table())
    return 0


def _soak(args: argparse.Namespace) -> int:
    _connect(args)
    report = api.soak(args.name, minutes=args.minutes, concurrency=args.concurrency, output_len=args.output_len)
    print(report.table())
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(report.to_json())
    return 0 if report.errors == 0 else 1


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8,32, got {text!r}") from None


def _demo(args: argparse.Namespace) -> int:
    from rayvllm_nb.demo import run_demo

    return 0 if run_demo() else 1


def _make_tiny_model(args: argparse.Namespace) -> int:
    print(make_tiny_model(args.path))
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _print_progress(progress: Progress) -> None:
    print(f"[{progress.elapsed_s:6.1f} s] {progress.name}: {progress}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
