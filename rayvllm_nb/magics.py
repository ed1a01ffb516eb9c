"""IPython magics: ``%load_ext rayvllm_nb``, then ``%rayvllm ...`` and ``%%chat``.

The verbs and their arguments are the CLI's (``_internal/commands``); this module is their cell
edge: a progress bar while a model loads, one line or an HTML table as the result, and errors as
one-paragraph usage errors. Callbacks run in the cell's thread (the facade pumps them there), so
output lands in the cell that asked for it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import openai
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.display import Markdown, display

from rayvllm_nb._internal import commands, readiness
from rayvllm_nb._internal.commands import Answer, LogTail, Stopped
from rayvllm_nb.config import available_configs
from rayvllm_nb.errors import RayVllmError
from rayvllm_nb.types import Progress

_DISPLAY_INTERVAL_S = 0.05


class _HelpShown(Exception):
    """argparse printed a command's help (``-h``): nothing else to do."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting the kernel, with "did you mean" for a command."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {commands.with_command_hint(message, 'magic')}. See `%rayvllm help`.")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if status == 0:
            raise _HelpShown
        raise UsageError(message or f"{self.prog}: exit {status}")


def _rayvllm_parser() -> _Parser:
    parser = _Parser(prog="%rayvllm", description="Deploy vLLM on Ray Serve from this notebook.", add_help=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.add_commands(subparsers, "magic", "%rayvllm")
    subparsers.add_parser("help", help="this help, or one command's: %rayvllm help start", add_help=False) \
        .add_argument("topic", nargs="?", metavar="COMMAND")
    return parser


def _chat_parser() -> _Parser:
    parser = _Parser(prog="%%chat", description="Send the cell to the model; stream the answer as Markdown.",
                     epilog="example:\n  %%chat --model tiny --max-tokens 64\n  Say hello.\n",
                     formatter_class=commands.HelpFormatter)
    commands.define_chat_options(parser)
    return parser


def _full_help(topic: str | None = None) -> str:
    """Every command with its options, defaults and examples, the config names, and ``%%chat``."""
    parser = _rayvllm_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if topic is not None:
        if topic in ("chat", "%%chat"):
            return _chat_parser().format_help()
        if topic not in subparsers.choices:
            raise UsageError(f"%rayvllm help: no command {topic!r}{commands.unknown_command_hint(topic, 'magic')}.")
        return subparsers.choices[topic].format_help()
    sections = [parser.format_help().rstrip(), f"configs: {', '.join(available_configs())}"]
    seen: set[int] = set()
    for sub in subparsers.choices.values():
        if id(sub) not in seen and sub.prog != "%rayvllm help":
            seen.add(id(sub))
            sections.append("-" * 60 + "\n" + sub.format_help().rstrip())
    sections.append("-" * 60 + "\n" + _chat_parser().format_help().rstrip())
    return "\n\n".join(sections) + "\n"


class _Cell:
    """The magic's :class:`commands.Ui`: a progress bar for a load, plain lines otherwise."""

    prog = "%rayvllm"

    def __init__(self) -> None:
        self._bars: list[Any] = []

    def progress(self, title: str) -> Callable[[Progress], None]:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(readiness.STAGES) - 1, desc=title, bar_format="{desc} {bar} {elapsed} {postfix}")
        self._bars.append(bar)

        def show(progress: Progress) -> None:
            if progress.stage in readiness.STAGES:
                bar.n = readiness.STAGES.index(progress.stage)
            bar.set_postfix_str(str(progress), refresh=True)

        return show

    def text(self, piece: str) -> None:
        sys.stdout.write(piece)

    def say(self, message: str) -> None:
        print(message)

    def warn(self, message: str) -> None:
        print(message, file=sys.stderr)

    def close(self) -> None:
        """End the bars: full and green when loading finished, red where it stopped otherwise."""
        for bar in self._bars:
            bar.close()


@magics_class
class RayVllmMagics(Magics):
    """``%rayvllm`` (subcommands) and ``%%chat``."""

    @line_magic
    def rayvllm(self, line: str) -> Any:
        try:
            args = _parse(_rayvllm_parser(), line)
        except _HelpShown:
            return None
        if args.command in (None, "help"):
            print(_full_help(getattr(args, "topic", None)))
            return None
        cell = _Cell()
        try:
            result = args.handler(args, cell)
        except RayVllmError as error:
            raise UsageError(str(error)) from None
        finally:
            cell.close()
        if isinstance(result, (Stopped, LogTail)):
            print(result)
            return None
        return result

    rayvllm.__doc__ = _full_help()

    @cell_magic
    def chat(self, line: str, cell: str) -> None:
        try:
            args = _parse(_chat_parser(), line)
        except _HelpShown:
            return
        if not cell.strip():
            raise UsageError("%%chat: the cell is empty; write the message below the magic line.")
        args.text = cell
        answer = display(Markdown(""), display_id=True)
        pieces: list[str] = []
        shown = 0.0

        class _Stream(_Cell):
            def text(self, piece: str) -> None:
                nonlocal shown
                pieces.append(piece)
                if time.monotonic() - shown > _DISPLAY_INTERVAL_S:
                    answer.update(Markdown("".join(pieces)))
                    shown = time.monotonic()

        try:
            result: Answer = commands.run_chat(args, _Stream())
        except RayVllmError as error:
            raise UsageError(str(error)) from None
        except openai.APIError as error:  # the engine's answer to a bad request: one line
            raise UsageError(f"%%chat: {type(error).__name__}: {error}") from None
        answer.update(Markdown(result.result.text))
        display(Markdown(f"*{result}*"))

    chat.__doc__ = _chat_parser().format_help()


def _parse(parser: _Parser, line: str) -> argparse.Namespace:
    try:
        return parser.parse_args(shlex.split(line))
    except ValueError as error:  # unbalanced quotes
        raise UsageError(f"{parser.prog}: {error}") from None


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
