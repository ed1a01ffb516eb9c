"""An ipywidgets panel to launch a model, watch it load and work, chat with it and stop it.

Three areas (launch, status with a live metrics strip, chat) are plain widget boxes; :class:`Panel` wires them to the
backend. The panel is true to the backend: a watcher follows what runs (models started or
stopped by a magic, the CLI, another process; a cluster that went away) and the buttons follow
it. Creating the panel makes no Ray call and only Launch ever starts a cluster. Every action
runs on the facade's background loop, so the kernel stays responsive; the panel only changes
widget values from there (no printing), so nothing lands in whatever cell runs next.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import anywidget
import ipywidgets as widgets
import openai
import traitlets
from markdown_it import MarkdownIt

from rayvllm_nb._internal.clients import async_openai_client
from rayvllm_nb._internal.conversation import Conversation, Message
from rayvllm_nb._internal.facade import BRIDGE
from rayvllm_nb.backend import RayBackend
from rayvllm_nb.config import available_configs, load_config, resolve_start_target
from rayvllm_nb.errors import ConfigError, RayVllmError
from rayvllm_nb.placement import resolve_device
from rayvllm_nb.types import ModelMetrics, ModelStatus, Progress, Status

_WATCH_S = 2.0
_FULL_LOOK_EVERY = 3
_LOOK_TIMEOUT_S = 8.0
_DISPLAY_INTERVAL_S = 0.05
_WIDE = {"description_width": "initial"}
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")
_SPARK = "▁▂▃▄▅▆▇█"
_SPARK_POINTS = 30
_BOTTOM_FIRST = "display:flex;flex-direction:column-reverse;overflow:auto"
"""A scroll box that shows its end (the newest line) without scrolling."""


class MessageBox(anywidget.AnyWidget):
    """A text area where Enter sends (``submits`` counts the presses) and Shift+Enter adds a line."""

    _esm = Path(__file__).parent / "_static" / "message_box.js"
    value = traitlets.Unicode("").tag(sync=True)
    placeholder = traitlets.Unicode("").tag(sync=True)
    disabled = traitlets.Bool(False).tag(sync=True)
    submits = traitlets.Int(0).tag(sync=True)


class LaunchArea(widgets.VBox):
    """Pick a config and adjust it (a name of its own launches a second model beside the first, at the
    same endpoint); Launch, Stop (which also cancels a launch), the progress line."""

    def __init__(self) -> None:
        configs = available_configs()
        self.config = widgets.Dropdown(options=list(configs), value="tiny-cpu" if "tiny-cpu" in configs else None,
                                       description="Config")
        self.preview = widgets.Textarea(disabled=True, layout=widgets.Layout(width="100%"))
        self.model_override = widgets.Text(description="Model", placeholder="from config (or an HF id, a folder)",
                                           layout=widgets.Layout(width="100%"))
        self.served_name = widgets.Text(description="Name", placeholder="from config: what clients pass as model",
                                        layout=widgets.Layout(width="100%"))
        self.tensor_parallel = widgets.BoundedIntText(value=1, min=1, max=8, description="TP",
                                                      layout=widgets.Layout(width="140px"))
        self.device = widgets.Dropdown(options=["from config", "auto", "cpu", "gpu"], description="Device")
        self.max_model_len = widgets.Text(description="Max len", placeholder="from config", style=_WIDE,
                                          layout=widgets.Layout(width="220px"))
        self.launch = widgets.Button(description="Launch", button_style="success", icon="play")
        self.stop = widgets.Button(description="Stop", icon="stop", disabled=True,
                                   tooltip="stop the model, or cancel its launch")
        self.progress = widgets.HTML("Not connected: Launch connects to Ray.")
        self.cluster = widgets.HTML("")
        super().__init__([
            widgets.HTML("<b>Launch</b>"), self.config, self.preview, self.model_override, self.served_name,
            widgets.HBox([self.tensor_parallel, self.device, self.max_model_len]),
            widgets.HBox([self.launch, self.stop]), self.progress, self.cluster,
        ])

    def overrides(self) -> dict[str, Any]:
        """The launch settings as config overrides (the model field checked like a `start` target)."""
        overrides: dict[str, Any] = {"tensor_parallel_size": self.tensor_parallel.value}
        if model := self.model_override.value.strip():
            target = resolve_start_target(model)
            if not isinstance(target, dict):
                raise ConfigError(f"{model!r} is a config, not a model: pick it under Config.")
            overrides["model"] = target["model"]
        if name := self.served_name.value.strip():
            overrides["served_model_name"] = name
        if self.device.value != "from config":
            overrides["device"] = self.device.value
        if text := self.max_model_len.value.strip():
            if not text.isdigit():
                raise ConfigError(f"Max len {text!r} is not a number of tokens: write e.g. 2048, or leave it empty.")
            overrides["max_model_len"] = int(text)
        return overrides


class StatusArea(widgets.VBox):
    """The cluster's models (a table), the shown model's live metrics strip and newest log lines."""

    def __init__(self) -> None:
        self.status = widgets.HTML("", layout=widgets.Layout(min_height="80px"))
        self.live = widgets.HTML("")
        self.log_tail = widgets.HTML("")
        self._rates: deque[float] = deque(maxlen=_SPARK_POINTS)
        self.show_logs([])
        super().__init__([widgets.HTML("<b>Status</b>"), self.status, self.live, self.log_tail])

    def show_metrics(self, metrics: ModelMetrics | None) -> None:
        """The live strip: KV-cache gauge, requests running and waiting, tok/s with its recent history."""
        if metrics is None:
            self._rates.clear()
            self.live.value = ""
            return
        self._rates.append(metrics.generation_tok_s)
        usage = min(max(metrics.kv_cache_usage, 0.0), 1.0)
        gauge = (f"<span style='display:inline-block;width:80px;height:10px;background:#eee;vertical-align:middle'>"
                 f"<span style='display:block;height:10px;width:{usage * 100:.0f}%;background:#4a90d9'></span></span>")
        self.live.value = (
            f"<span data-live='{html.escape(metrics.name)}'>KV cache {gauge} {usage:.0%} · "
            f"running {metrics.requests_running} · waiting {metrics.requests_waiting} · "
            f"{metrics.generation_tok_s:.0f} tok/s <span style='font-family:monospace'>{_sparkline(self._rates)}</span>"
            f" · TTFT p50 {metrics.ttft_p50_ms:.0f} ms</span>"
        )

    def show_logs(self, lines: list[str]) -> None:
        """The log tail, newest line at the bottom and in view."""
        text = html.escape("\n".join(lines))
        self.log_tail.value = (f"<div style='{_BOTTOM_FIRST};height:160px;border:1px solid #ddd'>"
                               f"<pre style='margin:0;font-size:11px'>{text}</pre></div>")


class ChatArea(widgets.VBox):
    """Pick a running model; the turns (Markdown, user and assistant told apart, newest in view);
    the message box and its buttons; what the last answer cost and the room left."""

    def __init__(self) -> None:
        self.model = widgets.Dropdown(options=[], description="Model", disabled=True)
        self.answer_as = widgets.Dropdown(options=[], description="Answer as", style=_WIDE,
                                          layout=widgets.Layout(display="none"))
        self.history = widgets.HTML("", layout=widgets.Layout(width="100%"))
        self.system_prompt = widgets.Text(description="System", placeholder="optional system prompt",
                                          layout=widgets.Layout(width="100%"))
        self.temperature = widgets.FloatSlider(value=0.0, min=0.0, max=2.0, step=0.1, description="Temperature",
                                               style=_WIDE)
        self.max_tokens = widgets.BoundedIntText(value=128, min=1, max=1_048_576, description="Max tokens",
                                                 style=_WIDE, layout=widgets.Layout(width="200px"))
        self.context = widgets.HTML("")
        self.message = MessageBox(placeholder="Your message (Enter sends, Shift+Enter adds a line)",
                                  layout=widgets.Layout(width="100%"))
        self.send = widgets.Button(description="Send", button_style="primary", icon="paper-plane", disabled=True)
        self.stop_generating = widgets.Button(description="Stop generating", disabled=True)
        self.regenerate = widgets.Button(description="Regenerate", icon="refresh", disabled=True)
        self.clear = widgets.Button(description="Clear")
        self.chat_stats = widgets.HTML("")
        self.chat_error = widgets.HTML("")
        super().__init__([
            widgets.HTML("<b>Chat</b>"), widgets.HBox([self.model, self.answer_as]), self.history, self.system_prompt,
            widgets.HBox([self.temperature, self.max_tokens, self.context]), self.message,
            widgets.HBox([self.send, self.stop_generating, self.regenerate, self.clear]),
            self.chat_stats, self.chat_error,
        ])

    def show_adapters(self, status: ModelStatus | None) -> None:
        """Offer the shown model and its LoRA adapters to answer (hidden when it has none)."""
        choices = [] if status is None else [(status.name, status.name)] + [
            (f"{name} (LoRA)", name) for name in sorted(status.adapters)
        ]
        if list(self.answer_as.options) != choices:
            kept, values = self.answer_as.value, [value for _, value in choices]
            self.answer_as.options = choices
            self.answer_as.value = kept if kept in values else (values[0] if values else None)
        self.answer_as.layout.display = "flex" if len(choices) > 1 else "none"

    def show_turns(self, turns: list[Message]) -> None:
        """Draw the turns: the user's on the right, the model's answers rendered as Markdown."""
        rows = []
        for turn in turns:
            if turn["role"] == "user":
                body = html.escape(turn["content"]).replace("\n", "<br>")
                rows.append(f"<div style='align-self:flex-end;max-width:80%;background:#e3effd;border-radius:8px;"
                            f"padding:4px 10px;margin:4px' data-role='user'>{body}</div>")
            else:
                rows.append(f"<div style='align-self:flex-start;max-width:90%;background:#f4f4f4;border-radius:8px;"
                            f"padding:4px 10px;margin:4px' data-role='assistant'>{_MARKDOWN.render(turn['content'])}"
                            "</div>")
        inner = "<div style='display:flex;flex-direction:column'>" + "".join(rows) + "</div>"
        self.history.value = f"<div style='{_BOTTOM_FIRST};max-height:400px'>{inner}</div>" if rows else ""


class Panel(widgets.VBox):
    """Launch, status and chat areas, true to what runs."""

    def __init__(self, backend: RayBackend) -> None:
        self._backend = backend
        self._model: str | None = None
        self._connected = False
        self._launch_future: Future[Any] | None = None
        self._launching = False
        self._launch_task: asyncio.Future[None] | None = None
        self._stop_future: Future[Any] | None = None
        self._chat_future: Future[Any] | None = None
        self._clients: dict[str, openai.AsyncOpenAI] = {}
        self._setting_model = False
        self._failure_shown = False
        # Show a running model by itself; off once the shown one stopped (the user picks or launches next).
        self._adopt = True
        self._line_shown = ""
        self.conversation = Conversation()

        self.launch_area, self.status_area, self.chat_area = LaunchArea(), StatusArea(), ChatArea()
        area = self.launch_area
        self.config, self.preview, self.model_override = area.config, area.preview, area.model_override
        self.served_name = area.served_name
        self.tensor_parallel, self.device, self.max_model_len = area.tensor_parallel, area.device, area.max_model_len
        self.launch, self.stop, self.progress, self.cluster = area.launch, area.stop, area.progress, area.cluster
        self.status, self.log_tail = self.status_area.status, self.status_area.log_tail
        chat = self.chat_area
        self.model, self.history, self.system_prompt = chat.model, chat.history, chat.system_prompt
        self.temperature, self.max_tokens, self.message = chat.temperature, chat.max_tokens, chat.message
        self.send, self.stop_generating, self.regenerate = chat.send, chat.stop_generating, chat.regenerate
        self.clear, self.chat_stats, self.chat_error = chat.clear, chat.chat_stats, chat.chat_error
        self.answer_as = chat.answer_as

        self.config.observe(self._show_preview, names="value")
        self.device.observe(lambda _: self._submit(self._bound_tensor_parallel()), names="value")
        self.model.observe(lambda change: self._pick(change["new"]), names="value")
        self.launch.on_click(lambda _: self._start_launch())
        self.stop.on_click(lambda _: self._start_stop())
        self.send.on_click(lambda _: self._start_chat(self.message.value.strip()))
        self.message.observe(lambda _: self._submit_message(), names="submits")
        self.regenerate.on_click(lambda _: self._start_regenerate())
        self.stop_generating.on_click(lambda _: self._chat_future and self._chat_future.cancel())
        self.clear.on_click(lambda _: self._clear_chat())
        self._show_preview()
        super().__init__([self.launch_area, self.status_area, self.chat_area])
        self._watcher = self._submit(self._watch())

    def show(self, name: str) -> None:
        """Show the running model ``name`` (started anywhere: a magic, the CLI, another kernel): the
        progress line follows it live, and Stop and Send act on it."""
        self._stop_future = self._submit(self._show(name))

    def wait(self, timeout: float = 600.0) -> None:
        """Block until the panel's launch, stop and chat work is done (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        for future in (self._launch_future, self._stop_future, self._chat_future):
            if future is not None:
                with contextlib.suppress(BaseException):  # failures are shown in the panel
                    future.result(timeout=max(deadline - time.monotonic(), 0.0))

    def close(self) -> None:
        """Close the panel's views and stop following the backend."""
        self._watcher.cancel()
        super().close()

    # -- following the backend -------------------------------------------------------------------

    async def _watch(self) -> None:
        """Every 2 s the shown model's live metrics, every 6 s the whole state (what runs, shown as it
        is): the status read costs the cluster more than the metrics read costs the replica. Asks Ray
        only once this process is connected. A look that hangs (a cluster going away under it) is
        given up after a while, so a shutdown is always shown."""
        looks = 0
        with self._backend.connected_only():  # never reconnects what the user shut down
            while True:
                with contextlib.suppress(Exception):  # a failed look is retried; the next one shows the state
                    async with asyncio.timeout(_LOOK_TIMEOUT_S):
                        if looks % _FULL_LOOK_EVERY == 0 or not await self._glance():
                            await self._look()
                looks += 1
                await asyncio.sleep(_WATCH_S)

    async def _glance(self) -> bool:
        """Only the shown model's metrics; False when that is not enough (no model shown, it went)."""
        if self._backend.cluster is None or self._model is None or not self._line_shown.startswith(
            f"{html.escape(self._model)} ready at "
        ):
            return False
        try:
            self.status_area.show_metrics(await self._backend.get_metrics(self._model))
        except RayVllmError:
            return False
        return True

    async def _look(self) -> None:
        launching = self._launching
        if self._backend.cluster is None:
            if self._connected or self._model is not None:
                self._connected, self._model = False, None
                self.progress.value = "Not connected to Ray (shut down): Launch connects again."
                self.cluster.value = ""
                self._set_model_choice((), None)
                self.status_area.show_metrics(None)
                self._set_buttons()
            return
        self._connected = True
        self._show_cluster()
        try:
            status = await self._backend.get_status()
        except RayVllmError as error:
            if self._backend.cluster is None:  # shut down meanwhile: the next look says so
                return
            self._model = None
            self.progress.value = _failed(f"the Ray cluster does not answer: {error}")
            self._set_buttons()
            return
        if self._backend.cluster is None:  # shut down while reading: the next look says so
            return
        self._show_status(status)
        if launching:
            return
        names = [model.name for model in status.models]
        if self._model is not None and self._model not in names:
            self.progress.value = f"{html.escape(self._model)} stopped."
            self._model, self._adopt = None, False
        if self._model is None and names and self._adopt:
            self._model = names[0] if len(names) == 1 or self.model.value not in names else self.model.value
        if self._model is not None:
            shown = next(model for model in status.models if model.name == self._model)
            self.chat_area.show_adapters(shown)
            line = _status_line(shown)
            if line != self._line_shown:  # a model newly shown, or its state changed: its newest log lines too
                self._line_shown = line
                self.status_area.show_logs(await self._backend.get_logs(self._model, tail=40))
            self._set_model_choice(tuple(names), self._model)
            self._set_buttons()
            if not self._failure_shown:
                self.progress.value = line
            self.status_area.show_metrics(await self._backend.get_metrics(self._model) if shown.ready else None)
        else:
            self.chat_area.show_adapters(None)
            self.status_area.show_metrics(None)
        self._set_buttons()

    def _show_status(self, status: Status) -> None:
        self.status.value = status._repr_html_()
        names = tuple(model.name for model in status.models)
        if tuple(self.model.options) != names:
            self._set_model_choice(names, self._model)

    def _set_model_choice(self, names: tuple[str, ...], value: str | None) -> None:
        """Change the model picker without it counting as the user's pick."""
        self._setting_model = True
        try:
            self.model.options = names
            self.model.value = value if value in names else None
        finally:
            self._setting_model = False

    def _show_cluster(self) -> None:
        if self._backend.cluster is not None:
            self.cluster.value = f"Ray {html.escape(self._backend.cluster.summary())}"

    def _pick(self, name: str | None) -> None:
        """Chat with (and show) another running model; its conversation starts afresh."""
        if name and name != self._model and self._connected and not self._setting_model:
            self._model = name
            self._clear_chat()
            self._stop_future = self._submit(self._show(name))

    async def _show(self, name: str) -> None:
        await self._backend.initialize_ray(start_local=False)
        self._connected = True
        self._show_cluster()
        status = await self._backend.model_status(name)
        self._model = status.name
        self._failure_shown = False
        self._show_status(await self._backend.get_status())
        self._set_model_choice(tuple(self.model.options), status.name)
        self.chat_area.show_adapters(status)
        self.status_area.show_logs(await self._backend.get_logs(name, tail=40))
        self._set_buttons()
        self._line_shown = self.progress.value = _status_line(status)  # last: the panel is ready to use

    # -- launch and stop -------------------------------------------------------------------------

    def _show_preview(self, _: Any = None) -> None:
        """Show the selected YAML (every line) and start the TP selector at its tensor_parallel_size."""
        path = available_configs().get(self.config.value or "")
        self.preview.value = path.read_text() if path else ""
        self.preview.rows = max(self.preview.value.count("\n") + 1, 2)
        if path:
            self.tensor_parallel.value = min(load_config(path).tensor_parallel_size, self.tensor_parallel.max)

    def _start_launch(self) -> None:
        self._launching = True
        self._launch_future = self._submit(self._cancellable_launch())
        self._set_buttons()

    async def _cancellable_launch(self) -> None:
        """The launch as a task Stop can cancel; done once its cancellation has been cleaned up (and
        the buttons say so: Launch is back before anyone waiting on the launch wakes)."""
        self._launch_task = asyncio.ensure_future(self._launch())
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._launch_task
        finally:
            self._launching = False
            self._set_buttons()

    async def _launch(self) -> None:
        started = time.monotonic()
        name: str | None = None
        stage = "connecting to Ray"

        def show() -> None:
            label = html.escape(name or "")
            self.progress.value = f"<span style='color:#b60'>⏳</span> {label}: {html.escape(stage)} " \
                f"({time.monotonic() - started:.0f} s)"

        def on_progress(progress: Progress) -> None:
            nonlocal stage
            stage = str(progress)
            show()

        refresher: asyncio.Task[None] | None = None
        self._failure_shown = False
        try:
            config = load_config(self.config.value, self.launch_area.overrides())
            name = config.name
            show()
            await self._backend.initialize_ray()
            self._connected = True
            self._show_cluster()
            await self._bound_tensor_parallel()
            refresher = asyncio.ensure_future(self._refresh_while_loading(config.name, show))
            status = await self._backend.start_model(config, wait_ready=True, on_progress=on_progress)
        except asyncio.CancelledError:  # start_model removed what it had deployed
            self._failure_shown = True
            self.progress.value = _failed(f"launch of {name or 'the model'} cancelled; nothing of it runs")
            raise
        except Exception as error:  # noqa: BLE001 - the root cause is shown under Launch, not lost in a log
            self._failure_shown = True
            self.progress.value = _failed(f"{type(error).__name__}: {error}")
            if name is not None:
                with contextlib.suppress(Exception):
                    self.status_area.show_logs(await self._backend.get_logs(name, tail=40))
            return
        finally:
            if refresher is not None:
                refresher.cancel()
            self._set_buttons()
        self._model = status.name
        self.progress.value = f"<span style='color:#080'>✔</span> {html.escape(status.name)} ready at " \
            f"{html.escape(status.base_url)} in {time.monotonic() - started:.0f} s"
        self._show_status(await self._backend.get_status())
        self._set_model_choice(tuple(self.model.options), status.name)
        self.status_area.show_logs(await self._backend.get_logs(status.name, tail=40))
        self._set_buttons()

    async def _bound_tensor_parallel(self) -> None:
        """Bound TP by the cluster's GPUs (GPU mode) or its largest node's CPUs (CPU mode)."""
        if self._backend.cluster is None:
            return
        from rayvllm_nb._internal.cluster import cluster_resources

        resources, node_cpus = await asyncio.to_thread(cluster_resources)
        gpus = int(resources.get("GPU", 0))
        device = self.device.value
        if device == "from config":
            device = load_config(self.config.value).device
        uses_gpu = resolve_device(device, gpus) == "gpu"
        self.tensor_parallel.max = max(gpus if uses_gpu else node_cpus, 1)

    async def _refresh_while_loading(self, name: str, tick: Callable[[], None]) -> None:
        """While loading: the elapsed time, the status table and the log tail, every few seconds."""
        while True:
            await asyncio.sleep(_WATCH_S)
            tick()
            with contextlib.suppress(Exception):  # the model may not be registered yet
                self._show_status(await self._backend.get_status())
                self.status_area.show_logs(await self._backend.get_logs(name, tail=40))

    def _start_stop(self) -> None:
        if self._launching and self._launch_task is not None:
            self.progress.value = "Cancelling the launch..."
            BRIDGE.loop.call_soon_threadsafe(self._launch_task.cancel)
            return
        self._stop_future = self._submit(self._stop())

    async def _stop(self) -> None:
        if self._model is None:
            return
        name, self._model, self._adopt = self._model, None, False
        self._failure_shown = False
        self._set_buttons()
        self.progress.value = f"Stopping {html.escape(name)}..."
        await self._backend.stop_model(name)
        self.progress.value = f"{html.escape(name)} stopped."
        self._clear_chat()
        self._show_status(await self._backend.get_status())
        self._set_buttons()

    def _set_buttons(self) -> None:
        """Enable what makes sense: Launch when nothing loads; Stop for the shown model or a launch;
        Send and Regenerate for a running model when no answer is streaming."""
        launching = self._launching
        chatting = self._chat_future is not None and not self._chat_future.done()
        serving = self._model is not None and self._connected
        self.launch.disabled = launching
        self.stop.disabled = not (launching or (serving and not chatting))
        self.stop.button_style = "" if self.stop.disabled else "danger"
        self.send.disabled = not serving or chatting
        self.regenerate.disabled = not serving or chatting or len(self.conversation.turns) < 2
        self.stop_generating.disabled = not chatting
        self.model.disabled = launching or chatting or not self.model.options

    # -- chat ------------------------------------------------------------------------------------

    def _start_chat(self, text: str, redo: list[Message] | None = None) -> None:
        if not text or self._model is None or self._backend.cluster is None:
            return
        self.chat_error.value = ""
        self._chat_future = self._submit(self._chat(self._model, text, redo), report=False)
        self._chat_future.add_done_callback(lambda _: self._set_buttons())
        self._set_buttons()

    def _submit_message(self) -> None:
        """Enter in the message box: Send, when Send may be pressed."""
        if not self.send.disabled:
            self._start_chat(self.message.value.strip())

    def _start_regenerate(self) -> None:
        removed = self.conversation.turns[-2:]
        text = self.conversation.take_last_exchange()
        if text is not None:
            self._start_chat(text, redo=removed)

    async def _chat(self, name: str, text: str, redo: list[Message] | None) -> None:
        """One exchange: shown as it streams; kept only when whole (a failure restores what was)."""
        self.conversation.system = self.system_prompt.value
        answer = {"role": "assistant", "content": ""}
        pending = [*self.conversation.turns, {"role": "user", "content": text}, answer]
        self.chat_area.show_turns(pending)
        shown = 0.0

        def on_text(piece: str) -> None:
            nonlocal shown
            answer["content"] += piece
            if time.perf_counter() - shown > _DISPLAY_INTERVAL_S:
                self.chat_area.show_turns(pending)
                shown = time.perf_counter()

        try:
            endpoint = await self._backend.endpoint(name)
            client = self._clients.get(endpoint.base_url)
            if client is None:
                client = self._clients[endpoint.base_url] = async_openai_client(endpoint)
            result = await self.conversation.send(client, endpoint, self.answer_as.value or name, text, on_text,
                                                  max_tokens=self.max_tokens.value,
                                                  temperature=self.temperature.value)
        except BaseException as error:
            if redo is not None:
                self.conversation.turns += redo
            self.chat_area.show_turns(self.conversation.turns)
            if not isinstance(error, asyncio.CancelledError):
                why = f"the model answered with an error: {error}" if isinstance(error, openai.APIError) else str(error)
                self.chat_error.value = _failed(why)
            raise
        if self.message.value.strip() == text:
            self.message.value = ""
        self.chat_area.show_turns(self.conversation.turns)
        self.chat_stats.value = html.escape(result.summary())
        if self.conversation.context is not None:
            self.chat_area.context.value = f"<span style='color:#666'>{self.conversation.context} " \
                f"({self.conversation.context.room} left)</span>"

    def _clear_chat(self) -> None:
        self.conversation.clear()
        self.history.value = self.chat_stats.value = self.chat_error.value = self.chat_area.context.value = ""
        self._set_buttons()

    def _submit(self, coroutine: Coroutine[Any, Any, Any], report: bool = True) -> Future[Any]:
        return BRIDGE.submit(self._reporting(coroutine) if report else coroutine)

    async def _reporting(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run a panel action; a failure ends on the progress line (where the user looks)."""
        try:
            return await coroutine
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - shown in the panel, not lost in a log
            self.progress.value = _failed(f"{type(error).__name__}: {error}")
            self._set_buttons()
            return None


def _sparkline(values: deque[float]) -> str:
    """Recent values as a line of block characters, scaled to their maximum."""
    top = max(values, default=0.0)
    if top <= 0:
        return _SPARK[0] * len(values)
    return "".join(_SPARK[min(int(value / top * (len(_SPARK) - 1)), len(_SPARK) - 1)] for value in values)


def _failed(why: str) -> str:
    """A progress or chat line that says something failed, and why."""
    return f"<span style='color:#b00'>✘ {html.escape(why)}</span>"


def _status_line(status: ModelStatus) -> str:
    """The progress line for a model the panel shows: where it serves, or what is wrong and why."""
    restarts = f" (restarts: {status.restarts})" if status.restarts else ""
    if status.ready and status.status == "RUNNING":
        return f"{html.escape(status.name)} ready at {html.escape(status.base_url)}{restarts}"
    problem = status.problem()
    return f"{html.escape(status.name)}: {html.escape(status.status)}{restarts}" + (
        f": {html.escape(problem)}" if problem else ""
    )
