"""Every verb of `rayvllm` and `%rayvllm`, defined once: its arguments (help and defaults), its
examples, and a handler that returns an object.

The surfaces differ only at the edge: the CLI prints ``str(result)`` and maps errors to exit
codes (:func:`rayvllm_nb.errors.exit_code`); the magic shows the result in the cell and raises
errors as one-paragraph usage errors. A handler never prints: what it has to say while it runs
(loading progress, streamed text, commentary, warnings) goes through the surface's :class:`Ui`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rayvllm_nb import api
from rayvllm_nb._internal.chat import ChatResult, stream_chat_blocking
from rayvllm_nb.config import ModelConfig, available_configs, did_you_mean, load_config, resolve_start_target
from rayvllm_nb.errors import ClusterError, ConfigError, DeploymentError
from rayvllm_nb.types import ClusterInfo, ModelStatus, Progress


class Ui(Protocol):
    """What a surface shows while a handler runs."""

    prog: str
    """How the user types the command here: ``rayvllm`` or ``%rayvllm``."""

    def progress(self, title: str) -> Callable[[Progress], None]:
        """A callback drawing a model's loading steps (called on the caller's thread)."""

    def text(self, piece: str) -> None:
        """A streamed piece of a chat answer."""

    def say(self, message: str) -> None:
        """A line of running commentary (a long command's steps)."""

    def warn(self, message: str) -> None:
        """Something the user should know that is not the result (stderr in a terminal)."""


@dataclass(frozen=True)
class Command:
    """One verb: its arguments, its handler, where it is offered."""

    name: str
    summary: str
    define: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Ui], object]
    examples: tuple[str, ...] = ()
    """Argument lines (after the verb)."""
    notebook_name: str | None = None
    """The verb in a notebook when it differs (``%rayvllm start``, the CLI's ``serve``: both accepted)."""
    surfaces: frozenset[str] = field(default_factory=lambda: frozenset({"cli", "magic"}))

    def names(self, surface: str) -> list[str]:
        """The verb on ``surface`` first, then its alias."""
        if self.notebook_name is None:
            return [self.name]
        return [self.notebook_name, self.name] if surface == "magic" else [self.name, self.notebook_name]


@dataclass(frozen=True)
class Started:
    """A model `serve`/`start` deployed."""

    status: ModelStatus
    elapsed_s: float

    def __str__(self) -> str:
        if not self.status.ready:
            return f"{self.status.name} deploying at {self.status.base_url} (`status` shows when it is ready)"
        return f"{self.status.name} ready at {self.status.base_url} in {self.elapsed_s:.0f} s"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))


@dataclass(frozen=True)
class Stopped:
    """What `stop` ended."""

    models: tuple[str, ...]
    cluster: str | None = None

    def __str__(self) -> str:
        lines = [f"stopped {name}" for name in self.models]
        if self.cluster:
            lines.append(f"stopped the local Ray cluster at {self.cluster}")
        return "\n".join(lines) or "no model was running"


@dataclass(frozen=True)
class LogTail:
    """The newest log lines of a model's replica, newest last."""

    lines: tuple[str, ...]

    def __str__(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True)
class Answer:
    """A streamed chat answer (its text was shown as it came)."""

    model: str
    result: ChatResult

    def __str__(self) -> str:
        return f"{self.model}: {self.result.summary()}"


def connect(args: argparse.Namespace, ui: Ui, start_local: bool = False) -> ClusterInfo:
    """Connect to the cluster (only commands that deploy start one); say what a stopped cluster left
    behind and connecting ended."""
    cluster = api.init(getattr(args, "address", None), start_local=start_local)
    if cluster.reclaimed:
        ui.warn("Ended what a stopped Ray cluster left on this machine:\n  " + "\n  ".join(cluster.reclaimed))
    return cluster


def _define_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="CONFIG_OR_MODEL",
                        help="a config name (see below), a YAML file, a local model folder or a Hugging Face model id")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set max_model_len=512")
    parser.add_argument("--tp", type=int, metavar="N", help="tensor_parallel_size (GPUs or CPU ranks per replica)")
    parser.add_argument("--name", help="served_model_name (the `model` of OpenAI requests)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait until it answers")
    parser.add_argument("--no-wait", action="store_true", help="return once deployed; it keeps loading")
    parser.add_argument("--replace", action="store_true", help="replace a running model of the same name")


def start_config(args: argparse.Namespace) -> ModelConfig:
    """The validated config `serve ARGS` deploys (checked before anything starts)."""
    overrides = list(args.overrides)
    if args.tp is not None:
        overrides.append(f"tensor_parallel_size={args.tp}")
    if args.name:
        overrides.append(f"served_model_name={args.name}")
    return load_config(resolve_start_target(args.target), overrides)


def _run_serve(args: argparse.Namespace, ui: Ui) -> Started:
    config = start_config(args)
    connect(args, ui, start_local=True)
    started = time.perf_counter()
    status = api.start(config, replace=args.replace, wait_ready=not args.no_wait, timeout=args.timeout,
                       on_progress=None if args.no_wait else ui.progress(f"loading {config.name}"))
    return Started(status, time.perf_counter() - started)


def _define_name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="served model name (default: the only one)")


def _run_status(args: argparse.Namespace, ui: Ui) -> object:
    connect(args, ui)
    return api.status()


def _define_logs(parser: argparse.ArgumentParser) -> None:
    _define_name(parser)
    parser.add_argument("-n", "--lines", type=int, default=100, help="how many lines")


def _run_logs(args: argparse.Namespace, ui: Ui) -> LogTail:
    connect(args, ui)
    return LogTail(tuple(api.logs(args.name, tail=args.lines)))


def _define_stop(parser: argparse.ArgumentParser) -> None:
    _define_name(parser)
    parser.add_argument("--all", action="store_true", help="stop every model deployed through rayvllm_nb")
    parser.add_argument("--cluster", action="store_true",
                        help="then stop the local Ray cluster too (only one rayvllm started)")


def _run_stop(args: argparse.Namespace, ui: Ui) -> Stopped:
    from rayvllm_nb import launch_cluster

    cluster = connect(args, ui)
    if args.cluster and not cluster.is_local:
        raise ConfigError(f"--cluster only stops a Ray cluster on this machine; {cluster.address} is remote.")
    everything = args.all or (args.cluster and not args.name)
    names = [model.name for model in api.status().models] if everything else [args.name]
    stopped = tuple(api.stop(name) for name in names)
    if not args.cluster:
        return Stopped(stopped)
    api.shutdown()
    if not launch_cluster.stop(cluster.address):
        raise ClusterError(
            f"The Ray cluster at {cluster.address} was not started by rayvllm, so it is left running: "
            "stop it with `ray stop` (it ends every Ray process of this machine's user)."
        )
    return Stopped(stopped, cluster.address)


def define_chat_options(parser: argparse.ArgumentParser) -> None:
    """The options of `rayvllm chat` and `%%chat` (the text is the argument or the cell)."""
    parser.add_argument("--model", help="served model name (default: the only one)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=128, help="longest answer, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 answers the same every time")


def _define_chat(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="the user message")
    define_chat_options(parser)


def run_chat(args: argparse.Namespace, ui: Ui) -> Answer:
    """Send ``args.text`` and stream the answer through ``ui.text``."""
    if not args.text.strip():
        raise ConfigError("The message is empty: write what to send to the model.")
    connect(args, ui)
    model = api.model_status(args.model)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.text.strip()}
    ]
    result = stream_chat_blocking(api.endpoint(model.name), model.name, messages, ui.text,
                                  max_tokens=args.max_tokens, temperature=args.temperature)
    return Answer(model.name, result)


def _run_metrics(args: argparse.Namespace, ui: Ui) -> object:
    connect(args, ui)
    return api.metrics(args.name)


def _run_top(args: argparse.Namespace, ui: Ui) -> None:
    from rayvllm_nb._internal.top import run_top

    connect(args, ui)
    run_top()


def _define_init(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="host:port or ray://host:10001 (default: this machine's cluster, "
                                          "or a new local one)")


def _run_init(args: argparse.Namespace, ui: Ui) -> ClusterInfo:
    return connect(args, ui, start_local=True)


def _run_panel(args: argparse.Namespace, ui: Ui) -> object:
    return api.panel()


def _define_nothing(parser: argparse.ArgumentParser) -> None:
    """A command without arguments."""


def _define_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default="tiny-cpu", help="YAML file or config name")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--starts", type=int, default=5,
                        help="server starts per side (1-2 to screen a variant, 5+ for figures you report)")
    parser.add_argument("--rounds", type=int, default=3, help="loads of each side per start, alternating")
    parser.add_argument("--concurrency", type=_int_list, default=[1, 8], help="comma-separated, e.g. 1,8")
    parser.add_argument("--requests-per-stream", type=int, default=16,
                        help="requests per concurrent stream in each load (16: 128 at c=8)")
    parser.add_argument("--input-len", type=int, default=32, help="prompt length in words")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens per request (ignore_eos)")
    parser.add_argument("--no-pinned-baseline", dest="pinned_baseline", action="store_false",
                        help="skip the third side: vLLM alone with rayvllm_nb's CPU placement")
    parser.add_argument("--output", help="JSON file (default: bench-results/bench-<time>.json)")


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8,32, got {text!r}") from None


def _run_bench(args: argparse.Namespace, ui: Ui) -> object:
    if getattr(args, "address", None):
        api.init(args.address)
    output = args.output or f"bench-results/bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    return api.bench(
        args.config, args.overrides, starts=args.starts, rounds=args.rounds, concurrency=args.concurrency,
        requests_per_stream=args.requests_per_stream, input_len=args.input_len, output_len=args.output_len,
        pinned_baseline=args.pinned_baseline, output=output, on_event=ui.say,
    )


def _define_soak(parser: argparse.ArgumentParser) -> None:
    _define_name(parser)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent streams")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens per request (ignore_eos)")
    parser.add_argument("--output", help="also save the report as JSON here")


def _run_soak(args: argparse.Namespace, ui: Ui) -> object:
    connect(args, ui)
    report = api.soak(args.name, minutes=args.minutes, concurrency=args.concurrency, output_len=args.output_len)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(report.to_json())
    if report.errors:
        raise DeploymentError(f"{report.errors} of the soak's requests failed:\n{report.table()}")
    return report


def _run_demo(args: argparse.Namespace, ui: Ui) -> str:
    from rayvllm_nb.demo import run_demo

    if not run_demo(out=ui.say):
        raise DeploymentError("The demo's answer differs from the known sentence (see above).")
    return "demo passed"


@dataclass(frozen=True)
class Adapters:
    """The LoRA adapters served, per model (what `adapter list` shows)."""

    by_model: dict[str, dict[str, str]]

    def __str__(self) -> str:
        lines = [f"{name} -> {model} ({path})" for model, adapters in sorted(self.by_model.items())
                 for name, path in sorted(adapters.items())]
        return "\n".join(lines) or "no adapter is loaded"


def _define_adapter(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["load", "unload", "list"], help="what to do")
    parser.add_argument("name", nargs="?", help="the adapter's name (clients pass it as `model`)")
    parser.add_argument("path", nargs="?", help="load: a PEFT adapter folder, a Hugging Face id, or "
                                                "builtin:tiny-adapter")
    parser.add_argument("--model", help="the base model (default: the only one with LoRA on)")


def _run_adapter(args: argparse.Namespace, ui: Ui) -> object:
    if args.action != "list" and not args.name:
        raise ConfigError(f"`adapter {args.action}` needs the adapter's NAME.")
    if args.action == "load" and not args.path:
        raise ConfigError("`adapter load NAME PATH` needs the adapter's PATH (a folder or a Hugging Face id).")
    connect(args, ui)
    if args.action == "load":
        return f"{api.load_adapter(args.name, args.path, args.model)} loaded"
    if args.action == "unload":
        return f"{api.unload_adapter(args.name, args.model)} unloaded"
    return Adapters({model.name: model.adapters for model in api.status().models if model.adapters})


def _define_path(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="the folder to build it in")


def _run_make_tiny_model(args: argparse.Namespace, ui: Ui) -> Path:
    from rayvllm_nb.tiny_model import make_tiny_model

    return make_tiny_model(args.path)


def _run_make_tiny_adapter(args: argparse.Namespace, ui: Ui) -> Path:
    from rayvllm_nb.tiny_model import make_tiny_adapter

    return make_tiny_adapter(args.path)


_MAGIC = frozenset({"magic"})
_CLI = frozenset({"cli"})

COMMANDS: tuple[Command, ...] = (
    Command("init", "connect to Ray (a new local cluster when none runs)", _define_init, _run_init,
            ("", "--address ray://head:10001"), surfaces=_MAGIC),
    Command("serve", "deploy a model and wait until it answers (it keeps running)", _define_serve, _run_serve,
            ("tiny-cpu", "tiny-cpu --set max_model_len=512 --name small", "./my-model-folder --tp 2",
             "Qwen/Qwen2.5-0.5B-Instruct --no-wait"), notebook_name="start"),
    Command("status", "cluster, Serve and the deployed models", _define_nothing, _run_status, ("",)),
    Command("logs", "a model replica's newest log lines (vLLM and Serve), newest last", _define_logs, _run_logs,
            ("", "tiny -n 20")),
    Command("stop", "stop a model (the only one when NAME is omitted)", _define_stop, _run_stop,
            ("", "tiny", "--all --cluster")),
    Command("metrics", "what a model's engine is doing now: requests, KV cache, tok/s, TTFT, ITL, tokens",
            _define_name, _run_metrics, ("", "tiny")),
    Command("adapter", "load, unload or list a model's LoRA adapters (every replica serves them)",
            _define_adapter, _run_adapter,
            ("load hello ./my-adapter", "load hello builtin:tiny-adapter --model tiny", "unload hello", "list")),
    Command("top", "every model's metrics, live, refreshed each second (q quits)", _define_nothing, _run_top,
            ("",), surfaces=_CLI),
    Command("chat", "send one message and stream the answer", _define_chat, run_chat,
            ("'Say hello.'", "'Hi' --model tiny --max-tokens 32"), surfaces=_CLI),
    Command("panel", "the launch-and-chat panel", _define_nothing, _run_panel, ("",), surfaces=_MAGIC),
    Command("bench", "vLLM alone vs rayvllm_nb on the same model, over several server starts", _define_bench,
            _run_bench, ("tiny-cpu --starts 5 --rounds 3",), surfaces=_CLI),
    Command("soak", "many concurrent streams for minutes: errors, TTFT and memory per minute", _define_soak,
            _run_soak, ("tiny --minutes 5 --concurrency 32",), surfaces=_CLI),
    Command("demo", "the tiny CPU model: build, deploy, chat, status, stop", _define_nothing, _run_demo,
            ("",), surfaces=_CLI),
    Command("make-tiny-model", "build the tiny chat model into PATH", _define_path, _run_make_tiny_model,
            ("./tiny",), surfaces=_CLI),
    Command("make-tiny-adapter", "build a LoRA adapter of the tiny model into PATH (answers another sentence)",
            _define_path, _run_make_tiny_adapter, ("./tiny-adapter",), surfaces=_CLI),
)


def commands(surface: str) -> list[Command]:
    """The commands offered on ``surface`` (``"cli"`` or ``"magic"``)."""
    return [command for command in COMMANDS if surface in command.surfaces]


def add_commands(subparsers: Any, surface: str, prog: str) -> None:
    """Add every command of ``surface`` to an argparse subparsers object."""
    for command in commands(surface):
        verb, *aliases = command.names(surface)
        examples = "\n".join(f"  {prog} {verb} {example}".rstrip() for example in command.examples)
        epilog = f"examples:\n{examples}\n"
        if command.name == "serve":
            epilog = f"configs: {', '.join(available_configs())}\n\n{epilog}"
        sub = subparsers.add_parser(
            verb, aliases=aliases, help=command.summary, description=command.summary, epilog=epilog,
            formatter_class=HelpFormatter,
        )
        command.define(sub)
        sub.set_defaults(handler=command.run)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default in its help when it has one worth saying; examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def unknown_command_hint(word: str, surface: str) -> str:
    """``" (did you mean 'status'?)"`` for a mistyped command."""
    names = [name for command in commands(surface) for name in command.names(surface)]
    return did_you_mean(word, names)


def with_command_hint(message: str, surface: str) -> str:
    """argparse's error ``message``, with "did you mean" when it is about a mistyped command."""
    if "invalid choice: '" not in message:
        return message
    word = message.split("invalid choice: '", 1)[1].split("'", 1)[0]
    return message + unknown_command_hint(word, surface)

