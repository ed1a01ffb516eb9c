"""The panel in a real browser: JupyterLab on 127.0.0.1 with a token, Debian's Chromium
driven by Playwright (its own browser download does not work here). A walk as a user takes it:
launch from the panel, send with Enter, see the Markdown answer, stop the model from a magic and
see the panel follow, a magic's start that fails (its progress bar and vLLM's reason), shut down
(what it stopped, no Ray noise) and see Send disabled. A screenshot of each step is kept in
test-artifacts/."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import rayvllm_nb
from rayvllm_nb import DEMO_PROMPT, TINY_MODEL_REPLY
from rayvllm_nb.types import ClusterInfo
from tests.conftest import REPO

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
_REQUIRED = os.environ.get("RAYVLLM_NB_REQUIRE_BROWSER") == "1"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists() and not _REQUIRED,
        reason="needs Debian's chromium (apt-get install chromium); CI installs it and requires this test",
    ),
]

_CELLS = ("import rayvllm_nb\npanel = rayvllm_nb.panel()\npanel",
          "%load_ext rayvllm_nb\n%rayvllm stop tiny",
          "%rayvllm start tiny-cpu --name broken --set max_model_len=100000",
          "rayvllm_nb.shutdown()")
_PANEL_NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": f"cell{index}", "metadata": {}, "outputs": [],
               "source": source} for index, source in enumerate(_CELLS)],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}


_WALK_MODELS = ("tiny", "broken")
"""The models the walk starts on the suite's cluster."""


@pytest.fixture
def jupyterlab(tmp_path: Path, cluster: ClusterInfo) -> Iterator[str]:
    """JupyterLab on a free loopback port with a random token; yields the notebook's URL. Its kernel
    uses the suite's cluster (``RAY_ADDRESS``); what the walk started there is stopped afterwards."""
    (tmp_path / "panel.ipynb").write_text(json.dumps(_PANEL_NOTEBOOK))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = secrets.token_hex(16)
    with open(tmp_path / "jupyterlab.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
             "--ServerApp.open_browser=False", *(["--allow-root"] if os.geteuid() == 0 else [])],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/status", params={"token": token}).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "jupyterlab.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "JupyterLab did not start in 120 s"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/lab/tree/panel.ipynb?token={token}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        # A walk that failed half-way leaves its models on the suite's cluster: the next test or
        # notebook there would find "tiny" taken.
        running = [model.name for model in rayvllm_nb.status().models]
        for name in set(_WALK_MODELS) & set(running):
            rayvllm_nb.stop(name)


def test_a_user_walks_the_panel_in_jupyterlab(jupyterlab: str) -> None:
    from playwright.sync_api import Page, sync_playwright
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    ARTIFACTS.mkdir(exist_ok=True)

    def run_cell(page: Page, index: int) -> None:
        # A loaded machine (the other worker loading a model) has kept JupyterLab busy for over 30 s.
        page.locator(".jp-NotebookPanel .jp-Cell .cm-content").nth(index).click(timeout=120_000)
        page.keyboard.press("Control+Enter")

    def snap(page: Page, name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"panel-walk-{name}.png"), full_page=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.goto(jupyterlab)
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell .cm-content", timeout=120_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            # A run sent before the kernel connection is up is dropped, not queued: retry.
            for _ in range(6):
                run_cell(page, 0)
                try:
                    launch = page.wait_for_selector(".widget-button:has-text('Launch')", timeout=20_000)
                    break
                except PlaywrightTimeout:
                    continue
            else:
                snap(page, "0-never-rendered")
                pytest.fail("the panel's Launch button never rendered")
            page.wait_for_selector("textarea.rayvllm-message", timeout=30_000)
            snap(page, "1-panel")
            text = page.inner_text("body")
            assert "Error displaying widget" not in text and "model not found" not in text

            launch.click()
            try:
                page.wait_for_selector("text=tiny ready at", timeout=600_000)
                page.wait_for_selector("td:has-text('RUNNING')", timeout=30_000)
            finally:
                snap(page, "2-launched")
            text = page.inner_text("body")
            assert "node(s)" in text and " INFO " in text, "the cluster line and the log tail are shown"

            box = page.locator("textarea.rayvllm-message")
            box.click()
            page.keyboard.type("first line")
            page.keyboard.press("Shift+Enter")
            page.keyboard.type("second line")
            assert box.input_value() == "first line\nsecond line", "Shift+Enter adds a line"
            page.wait_for_timeout(500)
            assert page.locator("[data-role='user']").count() == 0, "Shift+Enter must not send"
            box.fill(DEMO_PROMPT)
            page.keyboard.press("Enter")
            page.wait_for_selector(f"[data-role='assistant'] p:has-text('{TINY_MODEL_REPLY[:20]}')", timeout=120_000)
            # The chat's own line, shown once the answer is whole (the live strip shows "tok/s" sooner).
            page.wait_for_selector(r"text=/\d+ tokens in \d+ ms/", timeout=60_000)
            page.wait_for_selector("[data-live='tiny']", timeout=30_000)
            snap(page, "3-answer-and-live-metrics")
            assert "KV cache" in page.inner_text("[data-live='tiny']")
            # Read from the page as it is now: each chunk re-renders the answer, so an element found
            # mid-stream is a detached copy (a suite run read it one token short).
            answer = page.locator("[data-role='assistant'] p").last.inner_text()
            assert answer.strip() == TINY_MODEL_REPLY, "the answer is rendered as Markdown (a <p>)"
            assert box.input_value() == "", "a sent message leaves the box"

            run_cell(page, 1)
            page.wait_for_selector("text=tiny stopped.", timeout=60_000)
            page.wait_for_timeout(500)
            snap(page, "4-stopped-by-a-magic")
            assert page.locator(".widget-button:has-text('Send')").is_disabled()
            # The panel sees the model gone before the magic returns (it then deletes the shared router).
            page.locator(".jp-NotebookPanel .jp-Cell").nth(1).locator("text=stopped tiny").wait_for(timeout=60_000)

            run_cell(page, 2)
            failed_start = page.locator(".jp-NotebookPanel .jp-Cell").nth(2)
            failed_start.locator("text=is greater than the derived max_model_len").wait_for(timeout=300_000)
            snap(page, "5-magic-start-failed")
            assert failed_start.locator(".widget-hprogress").count() == 1, "a progress bar, not an empty box"
            shown = failed_start.inner_text().replace("\u2007", " ").replace("\xa0", " ")
            assert "loading broken" in shown and "Traceback" not in shown

            run_cell(page, 3)
            page.wait_for_selector("text=Not connected to Ray", timeout=60_000)
            shutdown = page.locator(".jp-NotebookPanel .jp-Cell").nth(3)
            shutdown.locator("text=Disconnected from the Ray cluster").wait_for(timeout=30_000)
            snap(page, "6-shut-down")
            assert "raylet" not in shutdown.inner_text(), "shutdown() prints no Ray noise"
            assert page.locator(".widget-button:has-text('Send')").is_disabled()
            assert not page.locator(".widget-button:has-text('Launch')").is_disabled()
        finally:
            browser.close()
