"""`rayvllm`: the same verbs as the Python API and `%rayvllm`, each usable from a new process.

The verbs are defined once (``_internal/commands``); this module is their terminal edge: it prints
what a handler returns, streams progress and answers to stdout, warnings to stderr, and turns an
error into one line and an exit code (2: what was typed is wrong; 1: something failed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from rayvllm_nb import launch_cluster
from rayvllm_nb._internal import commands
from rayvllm_nb._internal.commands import Answer
from rayvllm_nb.errors import RayVllmError, exit_code
from rayvllm_nb.types import Progress


class _Terminal:
    """The CLI's :class:`commands.Ui`: plain lines."""

    prog = "rayvllm"

    def progress(self, title: str) -> Callable[[Progress], None]:
        return lambda progress: print(f"[{progress.elapsed_s:6.1f} s] {progress.name}: {progress}", flush=True)

    def text(self, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    def say(self, message: str) -> None:
        print(message, flush=True)

    def warn(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rayvllm` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    if getattr(args, "handler", None) is None:
        return launch_cluster.run(args)
    try:
        result = args.handler(args, _Terminal())
    except RayVllmError as error:
        print(f"rayvllm: error: {error}", file=sys.stderr)
        return exit_code(error)
    except KeyboardInterrupt:
        return 130
    if isinstance(result, Answer):
        print()
        print(result.result.summary(), file=sys.stderr)
    elif result is not None:
        print(result)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for a mistyped command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        super().error(commands.with_command_hint(message, "cli"))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rayvllm", description="Deploy vLLM on Ray Serve and use it.")
    parser.add_argument("--address", help="Ray address (host:port or ray://host:10001); default: local cluster")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_commands(subparsers, "cli", "rayvllm")
    cluster = subparsers.add_parser("cluster", help="start, inspect and stop the Ray cluster (see `cluster -h`)")
    launch_cluster.add_commands(cluster.add_subparsers(
        dest="cluster_command", required=True, metavar="COMMAND", parser_class=argparse.ArgumentParser))
    return parser


if __name__ == "__main__":
    sys.exit(main())
