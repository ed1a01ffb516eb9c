"""Replica logs: fetch them through Ray's state API, merge them in time order, read them.

A Serve replica writes two files: vLLM (and its engine-core and worker subprocesses)
print to stdout, Serve's replica logger (access lines with request ids) to stderr.
Both are fetched and merged by their timestamps, so lines read newest last.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_RAY_MARKERS = (":job_id:", ":actor_name:", ":task_name:", ":task_attempt_start", ":task_attempt_end")
# vLLM: "INFO 11-27 05:06:20 [file.py:12] ..." (maybe after "(EngineCore pid=1) ").
_VLLM_TIME = re.compile(r"^(?:\([^)]*\) )?[A-Z]+ (\d\d-\d\d \d\d:\d\d:\d\d)")
# Serve: "INFO 2026-11-27 05:06:12,029 ..."
_SERVE_TIME = re.compile(r"^[A-Z]+ \d{4}-(\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})")
_ERROR_LINE = re.compile(r"((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception)): (.+)$")
_WRAPPER_ERRORS = (
    "WorkerProc initialization failed",
    "Engine core initialization failed",
    "Traceback",
    "A replica failed to start",
)

# vLLM lines after which its engine will not start: Serve only retries the same failure.
_FATAL_MARKERS = ("WorkerProc failed to start", "Engine core initialization failed")

# vLLM log lines that mark a loading stage, in the order they appear.
LOADING_MARKERS: tuple[tuple[str, str], ...] = (
    ("Resolved architecture", "reading the model config"),
    ("Initializing a V1 LLM engine", "starting the engine core"),
    ("Starting to load model", "loading weights"),
    ("Loading weights took", "weights loaded, sizing the KV cache"),
    ("init engine (profile, create kv cache, warmup model)", "warming up"),
    ("Started vLLM engine", "engine started"),
)


def fetch_actor_logs(actor_id: str, tail: int, dashboard_url: str | None = None) -> list[str]:
    """The last ``tail`` lines an actor's worker printed (stdout and stderr, merged).

    Read through the log API of the dashboard at ``dashboard_url``, by default the dashboard of
    the cluster this process is connected to (Ray's own ``get_log`` looks for "the" cluster of
    this machine: the wrong one beside another head).
    """
    import httpx

    from rayvllm_nb._internal import ray_api

    streams = []
    for suffix in ("out", "err"):
        try:
            response = httpx.get(
                f"{(dashboard_url or ray_api.dashboard_url()).rstrip('/')}/api/v0/logs/file",
                params={"actor_id": actor_id, "lines": tail, "suffix": suffix, "timeout": 10},
                headers=ray_api.dashboard_auth_headers(), timeout=15,
            )
            response.raise_for_status()
            text = response.text
        except (httpx.HTTPError, ValueError, RuntimeError):  # a replica that never started has no file
            text = ""
        streams.append(text.splitlines())
    return merge_by_time(streams)[-tail:] if tail > 0 else []


def merge_by_time(streams: Iterable[list[str]]) -> list[str]:
    """Merge line lists by their timestamps; untimed lines stay after the line before them."""
    keyed = []
    for stream_index, lines in enumerate(streams):
        last = ""
        for line_index, line in enumerate(lines):
            if not line.strip() or line.startswith(_RAY_MARKERS):
                continue
            last = _timestamp(line) or last
            keyed.append((last, stream_index, line_index, line))
    return [line for *_, line in sorted(keyed)]


def _timestamp(line: str) -> str:
    if match := _SERVE_TIME.match(line):
        return f"{match.group(1)}.{match.group(2)}"
    if match := _VLLM_TIME.match(line):
        return f"{match.group(1)}.999"
    return ""


def loading_stage(lines: Iterable[str]) -> str | None:
    """The latest loading stage the log lines reached, if any."""
    reached = None
    for line in lines:
        for marker, stage in LOADING_MARKERS:
            if marker in line:
                reached = stage
    return reached


def engine_failed(lines: Iterable[str]) -> bool:
    """Whether vLLM logged that its engine could not start (it will not recover by itself)."""
    return any(marker in line for line in lines for marker in _FATAL_MARKERS)


# vLLM's INFO/WARNING lines can quote an error as advice ("... errors like `OSError: ...`").
_ADVICE_LINE = re.compile(r"^(?:\([^)]*\) )?(?:INFO|WARNING|DEBUG) ")


_PYDANTIC_SUMMARY = re.compile(r"\d+ validation errors? for \w+$")
_PYDANTIC_TYPE = re.compile(r"\s*\[type=.*$")
_PROCESS_PREFIX = re.compile(r"^\([^)]*\) ")


def root_cause(lines: Iterable[str]) -> str | None:
    """The first ``SomeError: message`` line that is not a generic wrapper or a log line's
    advice, without log prefixes. A pydantic summary ("1 validation error for ModelConfig", as vLLM
    raises for a bad engine argument) gets the lines after it: the field and the reason."""
    lines = list(lines)
    for index, line in enumerate(lines):
        if _ADVICE_LINE.match(line):
            continue
        match = _ERROR_LINE.search(line)
        if match and not any(wrapper in match.group(2) for wrapper in _WRAPPER_ERRORS):
            message = match.group(2).strip()
            if _PYDANTIC_SUMMARY.search(message):
                message = " ".join([message + ":", *_pydantic_details(lines[index + 1:])])
            return f"{match.group(1)}: {message}"
    return None


def _pydantic_details(following: list[str]) -> list[str]:
    """The indented field and reason lines of a pydantic error, up to its documentation link
    (without pydantic's ``[type=..., input_value=...]`` suffix)."""
    details = []
    for line in following[:8]:
        text = _PROCESS_PREFIX.sub("", line)
        if not text.startswith((" ", "\t")) or "For further information" in text:
            break
        details.append(_PYDANTIC_TYPE.sub("", text.strip()))
    return details
