"""The HAProxy launcher's rewrite of Serve's admin listeners (app/serve/haproxy.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

from app.serve.haproxy import (
    BINARY_ENV,
    LAUNCHER,
    config_path,
    loopback_admin,
    with_launcher,
)

SAMPLE = """global
    stats socket /tmp/x/admin.sock mode 666 level admin expose-fd listeners
defaults
    mode http
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind *:8000
backend b1
    server r1 127.0.0.1:30000 check
listen stats
  bind *:8404
  stats enable
"""


def test_admin_listeners_move_to_loopback_and_traffic_stays() -> None:
    out = loopback_admin(SAMPLE)
    assert "    bind 127.0.0.1:9101\n" in out
    assert "  bind 127.0.0.1:8404\n" in out
    assert "    bind *:8000\n" in out  # the traffic frontend follows http_options.host
    assert out.count("\n") == SAMPLE.count("\n")
    assert loopback_admin(out) == out


def test_other_host_and_options_kept() -> None:
    out = loopback_admin("listen stats\n  bind 0.0.0.0:8404 v4v6\n", "10.0.0.5")
    assert out == "listen stats\n  bind 10.0.0.5:8404 v4v6\n"


def test_serves_template_has_the_binds_the_launcher_rewrites() -> None:
    # Ray is pinned; this fails when an upgrade renames the sections or moves the binds.
    rendered = HAPROXY_CONFIG_TEMPLATE.replace("{{ config.stats_port }}", "8404").replace(
        "{{ config.metrics_port }}", "9101"
    )
    out = loopback_admin(rendered)
    assert "bind 127.0.0.1:8404" in out and "bind 127.0.0.1:9101" in out
    assert "bind *:8404" not in out and "bind :9101" not in out
    assert "bind {{ config.frontend_host }}:{{ config.frontend_port }}" in out


def test_config_path() -> None:
    assert config_path(["-db", "-f", "/tmp/h.cfg", "-dR"]) == "/tmp/h.cfg"
    assert config_path(["-v"]) is None


def test_launcher_named_by_file_name_resolves_to_this_interpreters_copy() -> None:
    env = {BINARY_ENV: f".venv/bin/{LAUNCHER}", "X": "1"}
    out = with_launcher(env)
    installed = Path(sys.executable).with_name(LAUNCHER)
    assert out[BINARY_ENV] == (str(installed) if installed.is_file() else env[BINARY_ENV])
    assert out["X"] == "1"
    assert with_launcher({BINARY_ENV: "/usr/sbin/haproxy"})[BINARY_ENV] == "/usr/sbin/haproxy"
