"""IPython magics: ``%load_ext rayvllm_nb``, then ``%rayvllm ...`` and ``%%chat``.

The magics only call the blocking facade (never Ray directly). Long waits run on the
facade's loop thread while this cell's thread draws the progress bar, so output lands
in the cell that asked for it.
"""

from __future__ import annotations

import argparse
import shlex
import time
from collections.abc import Callable
from typing import Any

import openai
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.display import Markdown, display

from rayvllm_nb import api
from rayvllm_nb._internal.chat import stream_chat_blocking
from rayvllm_nb._internal.facade import BRIDGE
from rayvllm_nb.config import available_configs, load_config
from rayvllm_nb.errors import RayVllmError
from rayvllm_nb.types import Progress

_DISPLAY_INTERVAL_S = 0.05


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting the kernel."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise UsageError(message or f"{self.prog}: exit {status}")


def _rayvllm_parser() -> _Parser:
    parser = _Parser(prog="%rayvllm", description="Deploy vLLM on Ray Serve from this notebook.", add_help=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    init = commands.add_parser("init", help="connect to Ray (or start a local cluster)", add_help=False)
    init.add_argument("--address", help="host:port or ray://host:10001")
    start = commands.add_parser("start", help="deploy a config (name or YAML path) or a model id", add_help=False)
    start.add_argument("target", metavar="CONFIG_OR_MODEL")
    start.add_argument("--tp", type=int, help="tensor_parallel_size")
    start.add_argument("--name", help="served_model_name")
    start.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    start.add_argument("--no-wait", action="store_true", help="return at once; the model keeps loading")
    start.add_argument("--replace", action="store_true", help="replace a running model of the same name")
    start.add_argument("--timeout", type=float, default=900.0)
    commands.add_parser("status", help="cluster, Serve and models (an HTML table)", add_help=False)
    logs = commands.add_parser("logs", help="the engine replica's last log lines", add_help=False)
    logs.add_argument("name", nargs="?")
    logs.add_argument("-n", "--lines", type=int, default=50)
    stop = commands.add_parser("stop", help="stop a model (the only one without NAME)", add_help=False)
    stop.add_argument("name", nargs="?")
    commands.add_parser("panel", help="the launch-and-chat widget panel", add_help=False)
    commands.add_parser("help", help="this help", add_help=False)
    return parser


def _chat_parser() -> _Parser:
    parser = _Parser(prog="%%chat", description="Send the cell to the model; stream the answer.", add_help=False)
    parser.add_argument("--model", help="served model name (default: the only one)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--system", help="system prompt")
    return parser


def _full_help() -> str:
    parser = _rayvllm_parser()
    sections = [parser.format_help()]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sections += [sub.format_usage() for sub in subparsers.choices.values()]
    return "\n".join(sections) + "\n" + _chat_parser().format_help()


@magics_class
class RayVllmMagics(Magics):
    """``%rayvllm`` (subcommands) and ``%%chat``."""

    @line_magic
    def rayvllm(self, line: str) -> Any:
        args = _parse(_rayvllm_parser(), line)
        if args.command in (None, "help"):
            print(_full_help())
            return None
        try:
            return getattr(self, f"_{args.command}")(args)
        except RayVllmError as error:
            raise UsageError(str(error)) from None

    rayvllm.__doc__ = _full_help()

    @cell_magic
    def chat(self, line: str, cell: str) -> None:
        args = _parse(_chat_parser(), line)
        if not cell.strip():
            raise UsageError("%%chat: the cell is empty; write the message below the magic line.")
        try:
            model = api.model_status(args.model)
        except RayVllmError as error:
            raise UsageError(str(error)) from None
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": cell.strip()}
        ]
        answer = display(Markdown(""), display_id=True)
        pieces: list[str] = []
        shown = 0.0

        def on_text(piece: str) -> None:
            nonlocal shown
            pieces.append(piece)
            if time.monotonic() - shown > _DISPLAY_INTERVAL_S:
                answer.update(Markdown("".join(pieces)))
                shown = time.monotonic()

        try:
            result = stream_chat_blocking(
                api.endpoint(model.name), model.name, messages, on_text,
                max_tokens=args.max_tokens, temperature=args.temperature,
            )
        except openai.APIError as error:  # the engine's answer to a bad request: one line
            raise UsageError(f"%%chat: {type(error).__name__}: {error}") from None
        answer.update(Markdown(result.text))
        display(Markdown(f"*{model.name}: {result.summary()}*"))

    chat.__doc__ = _chat_parser().format_help()

    def _init(self, args: argparse.Namespace) -> Any:
        return api.init(args.address)

    def _start(self, args: argparse.Namespace) -> Any:
        target = args.target if args.target in available_configs() or args.target.endswith((".yaml", ".yml")) else {
            "model": args.target
        }
        overrides = list(args.overrides)
        if args.tp is not None:
            overrides.append(f"tensor_parallel_size={args.tp}")
        if args.name:
            overrides.append(f"served_model_name={args.name}")
        config = load_config(target, overrides)
        if args.no_wait:
            return api.start(config, replace=args.replace)
        return _run_with_progress(
            lambda on_progress: api.ray_backend.start_model(
                config, replace=args.replace, wait_ready=True, timeout=args.timeout, on_progress=on_progress
            ),
            title=f"loading {config.name}",
        )

    def _status(self, args: argparse.Namespace) -> Any:
        return api.status()

    def _logs(self, args: argparse.Namespace) -> None:
        print("\n".join(api.logs(args.name, tail=args.lines)))

    def _stop(self, args: argparse.Namespace) -> None:
        print(f"stopped {api.stop(args.name)}")

    def _panel(self, args: argparse.Namespace) -> Any:
        return api.panel()


def _parse(parser: _Parser, line: str) -> argparse.Namespace:
    try:
        return parser.parse_args(shlex.split(line))
    except ValueError as error:  # unbalanced quotes
        raise UsageError(f"{parser.prog}: {error}") from None


def _run_with_progress(start: Callable[[Callable[[Progress], None]], Any], title: str) -> Any:
    """Run ``start(on_progress)`` on the facade's loop; draw its progress from this thread."""
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=title, bar_format="{desc} [{elapsed}]")
    try:
        return BRIDGE.pump(start, lambda progress: bar.set_description_str(f"{title}: {progress}"), bar.refresh)
    finally:
        bar.close()


def load(ipython: Any) -> None:
    """Register the magics on ``ipython``."""
    ipython.register_magics(RayVllmMagics)


def unload(ipython: Any) -> None:
    """Remove the magics from ``ipython``."""
    magics = ipython.magics_manager.magics
    for kind, name in (("line", "rayvllm"), ("cell", "chat")):
        magics[kind].pop(name, None)
    ipython.magics_manager.registry.pop("RayVllmMagics", None)


__all__ = ["RayVllmMagics", "load", "unload"]
