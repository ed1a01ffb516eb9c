"""An ipywidgets panel to launch a model, watch it load, chat with it and stop it.

Creating the panel makes no Ray call. Every action runs on the facade's background
loop, so the kernel stays responsive; the panel only changes widget values from there
(no printing), so nothing lands in whatever cell runs next.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import ipywidgets as widgets
import openai

from rayvllm_nb._internal.chat import stream_chat
from rayvllm_nb._internal.clients import async_openai_client
from rayvllm_nb._internal.facade import BRIDGE
from rayvllm_nb.backend import RayBackend
from rayvllm_nb.config import available_configs, load_config
from rayvllm_nb.errors import RayVllmError
from rayvllm_nb.placement import resolve_device
from rayvllm_nb.types import ModelStatus, Progress

_REFRESH_S = 2.0
_DISPLAY_INTERVAL_S = 0.05


class Panel(widgets.VBox):
    """Launch, status and chat areas for one model."""

    def __init__(self, backend: RayBackend) -> None:
        self._backend = backend
        self._model: str | None = None
        self._lifecycle: Future[Any] | None = None
        self._chat_future: Future[Any] | None = None
        self._messages: list[dict[str, str]] = []
        self._clients: dict[str, openai.AsyncOpenAI] = {}
        self._follower: asyncio.Task[None] | None = None

        configs = available_configs()
        self.config = widgets.Dropdown(
            options=list(configs), value="tiny-cpu" if "tiny-cpu" in configs else None, description="Config"
        )
        self.preview = widgets.Textarea(disabled=True, layout=widgets.Layout(width="100%", height="120px"))
        self.model_override = widgets.Text(description="Model", placeholder="override: HF id or local path")
        self.tensor_parallel = widgets.BoundedIntText(value=1, min=1, max=8, description="TP")
        self.device = widgets.Dropdown(options=["from config", "auto", "cpu", "gpu"], description="Device")
        self.max_model_len = widgets.BoundedIntText(
            value=0, min=0, max=1_048_576, description="Max len", tooltip="0: from the config or the model"
        )
        self.launch = widgets.Button(description="Launch", button_style="success", icon="play")
        self.stop = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.progress = widgets.HTML("Not connected: Launch connects to Ray.")
        self.cluster = widgets.HTML("")
        self.status = widgets.HTML("")
        self.log_tail = widgets.Textarea(disabled=True, layout=widgets.Layout(width="100%", height="160px"))

        self.history = widgets.HTML("", layout=widgets.Layout(width="100%"))
        self.system_prompt = widgets.Text(description="System", placeholder="optional system prompt")
        self.temperature = widgets.FloatSlider(value=0.0, min=0.0, max=2.0, step=0.1, description="Temperature")
        self.max_tokens = widgets.BoundedIntText(value=128, min=1, max=32_768, description="Max tokens")
        self.message = widgets.Textarea(placeholder="Your message", layout=widgets.Layout(width="100%"))
        self.send = widgets.Button(description="Send", button_style="primary", icon="paper-plane", disabled=True)
        self.stop_generating = widgets.Button(description="Stop generating", disabled=True)
        self.clear = widgets.Button(description="Clear")
        self.chat_stats = widgets.HTML("")
        self.error = widgets.HTML("")

        self.config.observe(self._show_preview, names="value")
        self.device.observe(lambda _: self._submit(self._bound_tensor_parallel()), names="value")
        self.launch.on_click(lambda _: self._start_launch())
        self.stop.on_click(lambda _: self._start_stop())
        self.send.on_click(lambda _: self._start_chat())
        self.stop_generating.on_click(lambda _: self._chat_future and self._chat_future.cancel())
        self.clear.on_click(lambda _: self._clear_chat())
        self._show_preview()

        launch_area = widgets.VBox([
            widgets.HTML("<b>Launch</b>"), self.config, self.preview, self.model_override,
            widgets.HBox([self.tensor_parallel, self.device, self.max_model_len]),
            widgets.HBox([self.launch, self.stop]), self.progress, self.cluster,
        ])
        status_area = widgets.VBox([widgets.HTML("<b>Status</b>"), self.status, self.log_tail])
        chat_area = widgets.VBox([
            widgets.HTML("<b>Chat</b>"), self.history, self.system_prompt,
            widgets.HBox([self.temperature, self.max_tokens]), self.message,
            widgets.HBox([self.send, self.stop_generating, self.clear]), self.chat_stats,
        ])
        super().__init__([launch_area, status_area, chat_area, self.error])
        if backend.cluster is not None:
            self._submit(self._attach())

    def show(self, name: str) -> None:
        """Attach the panel to the running model ``name`` (started anywhere: a magic, the CLI, another
        kernel): its status follows the model live, and Stop and Send act on it."""
        self.error.value = ""
        self._lifecycle = self._submit(self._show(name))

    def wait(self, timeout: float = 600.0) -> None:
        """Block until the panel's launch, stop and chat work is done (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        for future in (self._lifecycle, self._chat_future):
            if future is not None:
                with contextlib.suppress(BaseException):  # failures are shown in the panel
                    future.result(timeout=max(deadline - time.monotonic(), 0.0))

    def _submit(self, coroutine: Any) -> Future[Any]:
        return BRIDGE.submit(self._reporting(coroutine))

    async def _reporting(self, coroutine: Any) -> Any:
        try:
            return await coroutine
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - shown in the panel, not lost in a log
            self.error.value = f"<span style='color:#b00'>{html.escape(type(error).__name__)}: " \
                f"{html.escape(str(error))}</span>"
            return None

    def _show_preview(self, _: Any = None) -> None:
        """Show the selected YAML and start the TP selector at its tensor_parallel_size."""
        path = available_configs().get(self.config.value or "")
        self.preview.value = path.read_text() if path else ""
        if path:
            self.tensor_parallel.value = min(load_config(path).tensor_parallel_size, self.tensor_parallel.max)

    def _start_launch(self) -> None:
        self.error.value = ""
        self.launch.disabled = True
        self._lifecycle = self._submit(self._launch())

    async def _launch(self) -> None:
        started = time.monotonic()
        try:
            config = load_config(self.config.value, self._overrides())
            self.progress.value = f"Connecting to Ray for {html.escape(config.name)}..."
            await self._backend.initialize_ray()
            self._show_cluster()
            await self._bound_tensor_parallel()
            stage = "deploying"

            def show_progress() -> None:
                self.progress.value = f"{html.escape(config.name)}: {html.escape(stage)} " \
                    f"({time.monotonic() - started:.0f} s)"

            def on_progress(progress: Progress) -> None:
                nonlocal stage
                stage = str(progress)
                show_progress()

            refresher = asyncio.ensure_future(self._refresh_while_loading(config.name, show_progress))

            try:
                status = await self._backend.start_model(config, wait_ready=True, on_progress=on_progress)
            finally:
                refresher.cancel()
            self._model = status.name
            self.progress.value = f"{html.escape(status.name)} ready at {html.escape(status.base_url)} " \
                f"({time.monotonic() - started:.0f} s)"
            await self._refresh(status.name)
            self._follow(status)
        finally:
            self._set_buttons()

    async def _show(self, name: str) -> None:
        await self._backend.initialize_ray()
        self._show_cluster()
        status = await self._backend.model_status(name)
        self._model = status.name
        self.progress.value = _status_line(status)
        self._set_buttons()
        await self._refresh(status.name)
        self._follow(status)

    def _follow(self, status: ModelStatus) -> None:
        """Keep the progress line and status table true to the model while the panel shows it."""
        if self._follower is not None:
            self._follower.cancel()
        self._follower = asyncio.ensure_future(self._follow_live(status.name, _status_line(status)))

    async def _follow_live(self, name: str, shown: str) -> None:
        """Every few seconds while the panel shows ``name``: its state (e.g. RESTARTING after a crash,
        with the restart count and cause, then ready again); the tables are redrawn when it changes."""
        while self._model == name:
            await asyncio.sleep(_REFRESH_S)
            try:
                status = await self._backend.model_status(name)
            except RayVllmError:
                return
            line = _status_line(status)
            if line != shown and self._model == name:
                shown = line
                self.progress.value = line
                self.status.value = (await self._backend.get_status())._repr_html_()

    def _overrides(self) -> dict[str, Any]:
        overrides: dict[str, Any] = {"tensor_parallel_size": self.tensor_parallel.value}
        if self.model_override.value.strip():
            overrides["model"] = self.model_override.value.strip()
        if self.device.value != "from config":
            overrides["device"] = self.device.value
        if self.max_model_len.value:
            overrides["max_model_len"] = self.max_model_len.value
        return overrides

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
        """While loading: the elapsed time, replica states and log tail, every few seconds."""
        while True:
            await asyncio.sleep(_REFRESH_S)
            tick()
            try:
                await self._refresh(name)
            except Exception:  # noqa: BLE001 - the model may not be registered yet
                continue

    async def _refresh(self, name: str) -> None:
        status = await self._backend.get_status()
        self.status.value = status._repr_html_()
        lines = await self._backend.get_logs(name, tail=40)
        self.log_tail.value = "\n".join(lines)

    async def _attach(self) -> None:
        """Show what already runs when the process is connected already."""
        self._show_cluster()
        status = await self._backend.get_status()
        self.status.value = status._repr_html_()
        if len(status.models) == 1 and status.models[0].ready:
            self._model = status.models[0].name
            self.progress.value = f"{html.escape(self._model)} is running at {html.escape(status.models[0].base_url)}"
            self._follow(status.models[0])
        self._set_buttons()

    def _show_cluster(self) -> None:
        if self._backend.cluster is not None:
            self.cluster.value = f"Ray {html.escape(self._backend.cluster.summary())}"

    def _start_stop(self) -> None:
        self.error.value = ""
        self._lifecycle = self._submit(self._stop())

    async def _stop(self) -> None:
        if self._model is None:
            return
        name, self._model = self._model, None
        if self._follower is not None:
            self._follower.cancel()
        self._set_buttons()
        self.progress.value = f"Stopping {html.escape(name)}..."
        await self._backend.stop_model(name)
        self.progress.value = f"{html.escape(name)} stopped."
        self.status.value = (await self._backend.get_status())._repr_html_()
        self._set_buttons()

    def _set_buttons(self) -> None:
        """Enable what makes sense: one model per panel; no stop or send while generating."""
        chatting = self._chat_future is not None and not self._chat_future.done()
        self.launch.disabled = self._model is not None
        self.stop.disabled = self._model is None or chatting
        self.send.disabled = self._model is None or chatting
        self.stop_generating.disabled = not chatting

    def _start_chat(self) -> None:
        text = self.message.value.strip()
        if not text or self._model is None:
            return
        self.error.value = ""
        self.message.value = ""
        self._messages.append({"role": "user", "content": text})
        self._chat_future = self._submit(self._chat(self._model))
        self._chat_future.add_done_callback(lambda _: self._set_buttons())
        self._set_buttons()

    async def _chat(self, name: str) -> None:
        endpoint = await self._backend.endpoint(name)
        client = self._clients.get(endpoint.base_url)
        if client is None:
            client = self._clients[endpoint.base_url] = async_openai_client(endpoint)
        system = self.system_prompt.value.strip()
        messages = ([{"role": "system", "content": system}] if system else []) + self._messages
        reply = {"role": "assistant", "content": ""}
        self._messages.append(reply)
        shown = 0.0

        def on_text(piece: str) -> None:
            nonlocal shown
            reply["content"] += piece
            if time.perf_counter() - shown > _DISPLAY_INTERVAL_S:
                self._render_history()
                shown = time.perf_counter()

        try:
            result = await stream_chat(
                client, name, messages, on_text, max_tokens=self.max_tokens.value, temperature=self.temperature.value
            )
        except asyncio.CancelledError:
            reply["content"] += " [stopped]"
            self._render_history()
            raise
        except openai.APIError as error:
            self._messages.remove(reply)
            self._render_history()
            raise RuntimeError(f"the model answered with an error: {error}") from None
        self._render_history()
        self.chat_stats.value = result.summary()

    def _render_history(self) -> None:
        rows = [
            f"<div><b>{html.escape(m['role'])}:</b> {html.escape(m['content'])}</div>" for m in self._messages
        ]
        self.history.value = "".join(rows)

    def _clear_chat(self) -> None:
        self._messages.clear()
        self.history.value = ""
        self.chat_stats.value = ""


def _status_line(status: ModelStatus) -> str:
    """The progress line for a model the panel shows: where it serves, or what is wrong and why."""
    restarts = f" (restarts: {status.restarts})" if status.restarts else ""
    if status.ready and status.status == "RUNNING":
        return f"{html.escape(status.name)} ready at {html.escape(status.base_url)}{restarts}"
    problem = status.problem()
    return f"{html.escape(status.name)}: {html.escape(status.status)}{restarts}" + (
        f": {html.escape(problem)}" if problem else ""
    )
