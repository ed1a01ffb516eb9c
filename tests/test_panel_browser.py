"""The panel in a real browser: JupyterLab on 127.0.0.1 with a token, Debian's Chromium
driven by Playwright (its own browser download does not work here). The widget views must
render: the Launch button and the config dropdown are on the page, no widget error."""

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

_PANEL_NOTEBOOK = {
    "cells": [{
        "cell_type": "code", "execution_count": None, "id": "panel", "metadata": {}, "outputs": [],
        "source": "import rayvllm_nb\nrayvllm_nb.panel()",
    }],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}


@pytest.fixture
def jupyterlab(tmp_path: Path) -> Iterator[str]:
    """JupyterLab on a free loopback port with a random token; yields the notebook's URL."""
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


def test_panel_widgets_render_in_jupyterlab(jupyterlab: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(jupyterlab)
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell .cm-content", timeout=120_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            try:
                # A run sent before the kernel connection is up is dropped, not queued: retry.
                for _ in range(6):
                    page.click(".jp-NotebookPanel .jp-Cell .cm-content")
                    page.keyboard.press("Control+Enter")
                    try:
                        launch = page.wait_for_selector(".widget-button:has-text('Launch')", timeout=20_000)
                        break
                    except PlaywrightTimeout:
                        continue
                else:
                    pytest.fail("the panel's Launch button never rendered")
                dropdown = page.wait_for_selector(".widget-dropdown select", timeout=30_000)
                page.wait_for_timeout(1000)
            finally:
                page.screenshot(path=str(ARTIFACTS / "panel-in-jupyterlab.png"), full_page=True)
            options = dropdown.evaluate("select => Array.from(select.options).map(o => o.textContent)")
            text = page.inner_text("body")
            launch_visible = launch.is_visible()
        finally:
            browser.close()
    assert launch_visible
    assert "tiny-cpu" in options
    assert "Error displaying widget" not in text and "model not found" not in text
    assert "Stop generating" in text and "Chat" in text
