"""Serve's HAProxy as the heads rayvllm_nb starts run it: loopback only, and a fast, OpenAI-shaped 503.

Ray 2.60 renders HAProxy's config from a fixed template (``ray/serve/_private/haproxy_templates.py``)
with no setting for what we need. Serve starts HAProxy through ``RAY_SERVE_HAPROXY_BINARY_PATH`` when
it is set, so our heads point it at this file (through a small script): it edits the rendered config,
then ``exec``\\ s the real binary with the same arguments, as Serve requires (it checks the pid and
the command line). The edits, each checked by the tests against Ray 2.60.0's output:

- the stats page (``*:8404``) and Prometheus exporter (``:9101``) listen on every interface: both go
  (Serve talks to HAProxy only through its admin socket); two heads on one machine also no longer
  fight over those ports;
- a backend whose replicas are all down falls back to the head's Serve proxy, which holds a request
  until a replica is back (a minute when a vLLM engine restarts): that ``backup`` line goes, so
  HAProxy answers at once; except in the backends of models that scale to zero (``HOLD_LIST``,
  beside the config; kept by the shared router): there the proxy's hold is what wakes the model;
- HAProxy's own 502/503/504 become Serve's plain-text 500: ours are OpenAI-shaped JSON, 503 with
  ``Retry-After`` (no replica can serve now: retry) and 504;
- Serve's plain-text backpressure 503 (a model's ``max_queued_requests`` reached) becomes an
  OpenAI-shaped one with ``Retry-After``;
- the shared endpoint's fast path: a POST under ``/v1/`` whose JSON body (up to HAProxy's buffer,
  16 KB) names a model in the routes map (``ROUTES_MAP``, beside the config; kept by the shared
  router, ``engines/_router``) goes straight to that model's own prefix; anything else reaches
  the router at ``/``.

Standard library only, and run with ``python -I``: it starts on every HAProxy reload.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
from pathlib import Path

RETRY_AFTER_S = 5
_REMOVED_SECTIONS = re.compile(r"^(?:frontend prometheus|listen stats)\n(?:[ \t]+.*\n?)*", re.MULTILINE)
_FALLBACK_SERVER = re.compile(r"^[ \t]*#[^\n]*[Ff]allback[^\n]*\n[ \t]*server \S+ \S+ check backup\n", re.MULTILINE)
_BACKEND_SECTION = re.compile(r"^backend (\S+)\n(?:[ \t]+.*\n?|\n)*", re.MULTILINE)
_ERROR_FILE = re.compile(r"^([ \t]*errorfile (50[234])) \S+$", re.MULTILINE)
_ERROR_FILES = {"502": "503.http", "503": "503.http", "504": "504.http"}
_FIRST_ROUTING_RULE = re.compile(r"^[ \t]+(?:use_backend|default_backend) ", re.MULTILINE)
ROUTES_MAP = "rayvllm-nb-routes.map"
"""The routes map's file name (beside HAProxy's config): a served name per line, then its model's prefix."""
_MODEL_ROUTING = """\
    # rayvllm_nb's shared endpoint: a POST under /v1/ goes to the own prefix of the model its JSON
    # body names (a model or adapter name -> that model's prefix, kept by rayvllm_nb's shared router).
    acl rayvllm_nb_shared path_beg /v1/
    http-request wait-for-body time 30s at-least 8k if METH_POST rayvllm_nb_shared
    http-request set-var(txn.rayvllm_nb_model) req.body,json_query('$.model') if METH_POST rayvllm_nb_shared
    http-request set-var(txn.rayvllm_nb_prefix) var(txn.rayvllm_nb_model),map({routes})
    http-request set-path %[var(txn.rayvllm_nb_prefix)]%[path] if {{ var(txn.rayvllm_nb_prefix) -m found }}
    # rayvllm_nb: Serve's backpressure answer (plain text) as an OpenAI-shaped error.
    http-response return status 503 content-type application/json file {backpressure} hdr Retry-After {retry} \
if {{ status 503 }} {{ res.hdr(content-type) -m beg text/plain }}
"""
BACKPRESSURE_BODY = "backpressure.json"
HOLD_LIST = "rayvllm-nb-hold.list"
"""The hold list's file name (beside HAProxy's config): a backend name per line whose fallback stays."""


def routes_map(config: Path) -> Path:
    """The routes map of the HAProxy that runs ``config``."""
    return config.with_name(ROUTES_MAP)


def hold_list(config: Path) -> Path:
    """The hold list of the HAProxy that runs ``config``."""
    return config.with_name(HOLD_LIST)


def backend_name(app_name: str) -> str:
    """The name Serve gives the HAProxy backend of the HTTP app ``app_name`` (``get_safe_name`` in
    ``ray/serve/_private/haproxy.py``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"http-{app_name}".replace("#", "-").replace("/", "."))


def patch_config(text: str, error_dir: Path, routes: Path, held: frozenset[str] = frozenset()) -> str:
    """The config HAProxy runs: ``text`` (as Serve rendered it) with the edits of the module docstring;
    ``held``: the backends that keep their fallback."""
    text = _REMOVED_SECTIONS.sub("", text)
    text = _BACKEND_SECTION.sub(
        lambda section: section.group(0) if section.group(1) in held else _FALLBACK_SERVER.sub("", section.group(0)),
        text,
    )
    text = _ERROR_FILE.sub(lambda match: f"{match.group(1)} {error_dir / _ERROR_FILES[match.group(2)]}", text)
    first_rule = _FIRST_ROUTING_RULE.search(text)
    if first_rule is None:
        return text
    rules = _MODEL_ROUTING.format(routes=routes, backpressure=error_dir / BACKPRESSURE_BODY, retry=RETRY_AFTER_S)
    return text[: first_rule.start()] + rules + text[first_rule.start():]


def error_responses() -> dict[str, str]:
    """The raw HTTP responses HAProxy sends for its own errors, by file name."""
    responses = {
        "503.http": (503, "Service Unavailable", "No replica of this model can serve right now (it is starting or "
                     f"restarting). Retry in {RETRY_AFTER_S} s; its status says more.", "ServiceUnavailableError"),
        "504.http": (504, "Gateway Timeout", "The model's replica did not answer in time.", "GatewayTimeoutError"),
    }
    files = {}
    for name, (status, reason, message, kind) in responses.items():
        body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}})
        headers = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(body)}",
                   "Cache-Control: no-cache", "Connection: close"]
        if status == 503:
            headers.append(f"Retry-After: {RETRY_AFTER_S}")
        files[name] = "\r\n".join(headers) + "\r\n\r\n" + body
    return files


def install(folder: Path, real_binary: str) -> Path:
    """Write the wrapper script and error files into ``folder``; returns the script (for
    ``RAY_SERVE_HAPROXY_BINARY_PATH``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in error_responses().items():
        (folder / name).write_text(content)
    (folder / BACKPRESSURE_BODY).write_text(json.dumps({"error": {
        "message": f"The model's queue is full (max_queued_requests): retry in {RETRY_AFTER_S} s, or send fewer "
                   "requests at once.",
        "type": "ServiceUnavailableError", "param": None, "code": 503,
    }}))
    script = folder / "haproxy"
    script.write_text(
        "#!/bin/sh\n# Serve's HAProxy for heads started by rayvllm_nb (see rayvllm_nb/_internal/serve_haproxy.py).\n"
        f'exec "{sys.executable}" -I "{Path(__file__).resolve()}" "{real_binary}" "{folder}" "$@"\n'
    )
    script.chmod(0o755)
    return script


def _main(argv: list[str]) -> None:
    """``serve_haproxy.py REAL_BINARY ERROR_DIR HAPROXY_ARGS...``: patch the ``-f`` config, then exec HAProxy."""
    real_binary, error_dir, arguments = argv[1], Path(argv[2]), argv[3:]
    for flag, value in itertools.pairwise(arguments):
        if flag == "-f" and os.path.isfile(value):
            config = Path(value)
            routes = routes_map(config)
            if not routes.exists():
                routes.write_text("")
            hold = hold_list(config)
            held = frozenset(hold.read_text().split()) if hold.exists() else frozenset()
            config.write_text(patch_config(config.read_text(), error_dir, routes, held))
    os.execv(real_binary, [real_binary, *arguments])


if __name__ == "__main__":
    _main(sys.argv)
