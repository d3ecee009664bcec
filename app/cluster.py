"""Connecting to Ray: an embedded local cluster by default, or an existing cluster by address.

Importing this module never starts Ray; jobs call ``connect(cfg.cluster)`` once, and their
``__main__`` goes through ``run_job`` so that Ctrl-C and SIGTERM stop them cleanly in every phase.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from app.config import ClusterArgs

log = logging.getLogger(__name__)
T = TypeVar("T")

EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so the same cleanup runs."""


_embedded = False
"""Whether this process started its own local Ray cluster (``connect`` without an address)."""


def _processes() -> dict[int, tuple[int, int]]:
    """``pid -> (parent pid, process group)`` of every process, from /proc (Linux)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            found[int(entry)] = (int(fields[1]), int(fields[2]))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def _is_ray(pid: int) -> bool:
    """Whether ``pid`` is a Ray process (a worker, an agent, the raylet, the GCS ...)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    first = argv[0]
    return (
        first.startswith("ray::")
        or os.path.basename(first) in ("raylet", "gcs_server")
        or any(f"{os.sep}ray{os.sep}" in a for a in argv[:3])
    )


def _kill_job_processes() -> None:
    # Fate-sharing stops the raylet and GCS with the driver, but a process the raylet started
    # can outlive it (seen: the dashboard agent, for more than 15 s, once the raylet it was a
    # child of had died). So kill what this job started: its descendants, and the processes
    # of its process group that are Ray's (not the commands that launched it, nor a `tee`).
    if not os.path.isdir("/proc"):
        return
    procs = _processes()
    me, group = os.getpid(), os.getpgrp()
    keep, pid = {me}, me
    while pid in procs and pid not in (0, 1):
        pid = procs[pid][0]
        keep.add(pid)
    children: dict[int, list[int]] = {}
    for p, (parent, _) in procs.items():
        children.setdefault(parent, []).append(p)
    doomed, stack = set(), [me]
    while stack:
        for child in children.get(stack.pop(), []):
            doomed.add(child)
            stack.append(child)
    doomed |= {p for p, (_, g) in procs.items() if g == group and _is_ray(p)}
    for p in doomed - keep:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass  # gone already


def _raise_terminated(signum: int, frame: Any) -> None:
    if _embedded:
        # A SIGTERM to the process group reaches Ray's own processes too, and the driver's
        # core worker exits with status 1 once it sees its raylet gone, so an orderly
        # shutdown would race it. Exit now instead: every process of the embedded cluster
        # is started to die with its parent (kernel fate-sharing), which stops Serve, Ray
        # Train and Ray Data with it; the rest is killed here.
        sys.stdout.flush()
        print("\nterminated: stopping Ray", file=sys.stderr, flush=True)
        _kill_job_processes()
        os._exit(EXIT_SIGTERM)
    raise _Terminated()


def _force_exit(signum: int, frame: Any) -> None:
    os._exit(EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT)


def run_job(main: Callable[[], Any]) -> None:
    """Run a job's ``main``; on Ctrl-C or SIGTERM stop Serve and Ray and exit 130 / 143.

    A second signal during that cleanup exits at once.
    """
    own_signals()
    try:
        main()
    except KeyboardInterrupt as exc:
        code = EXIT_SIGTERM if isinstance(exc, _Terminated) else EXIT_SIGINT
        signal.signal(signal.SIGINT, _force_exit)
        signal.signal(signal.SIGTERM, _force_exit)
        what = "terminated" if code == EXIT_SIGTERM else "interrupted"
        print(f"\n{what}: stopping Ray", file=sys.stderr)
        shutdown()
        sys.exit(code)
    _exit_when_done()


# How long a finished job waits for Ray to disconnect before it exits anyway.
_SHUTDOWN_WAIT_S = 60.0


def _exit_when_done() -> None:
    """Disconnect and exit 0 once ``main`` has returned, even if Ray's cleanup hangs.

    After a node is lost mid-run, Ray's exit hooks (and threads Ray Data leaves behind) could
    wait on the dead node forever: the job had done its work and printed its result, yet its
    status never became SUCCEEDED.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    done = threading.Thread(target=shutdown, daemon=True)
    done.start()
    done.join(_SHUTDOWN_WAIT_S)
    if done.is_alive():
        print(f"Ray did not disconnect in {_SHUTDOWN_WAIT_S:.0f} s; exiting", file=sys.stderr)
        sys.stderr.flush()
    os._exit(0)


def own_signals() -> None:
    """Install the job's Ctrl-C / SIGTERM handlers (again).

    Ray replaces the process's SIGTERM handler while it starts (``ray.init``, and Ray's native
    failure handler later, which prints a stack dump and aborts), so the waits that outlast
    startup (training, serving) call this before they block. Only the main thread may.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_terminated)


def shutdown() -> None:
    """Stop the embedded Ray cluster (and Serve in it), or disconnect from a remote one."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def call_in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a helper thread and wait for it in the main thread.

    Ray Train's ``fit()`` installs a SIGINT handler when it runs in the main thread, and that
    handler aborts the run but never stops the process. In a helper thread it installs none,
    so Ctrl-C raises ``KeyboardInterrupt`` here and ``run_job`` stops Ray, which ends ``fn``.
    """
    if threading.current_thread() is not threading.main_thread():
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="scalerec-fit", daemon=True)
    worker.start()
    own_signals()
    while worker.is_alive():
        worker.join(0.2)  # a bounded wait, so that signals are handled promptly
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def bounded(fn: Callable[[], Any], timeout_s: float, what: str) -> None:
    """Run ``fn`` for at most ``timeout_s`` seconds; on a timeout log it and go on.

    For cleanup that waits on Ray actors that may be gone already (a node lost, a signal that
    reached them too): Ray's own waits would hold the exit for their full timeout.
    """
    worker = threading.Thread(target=fn, name=f"scalerec-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning("%s did not finish within %.0f s; going on", what, timeout_s)


def connect(cluster: ClusterArgs) -> None:
    """Start (or join) Ray once per process; a no-op when Ray is already initialised."""
    global _embedded
    import ray

    if not cluster.progress_bars:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        address = cluster.address or os.environ.get("RAY_ADDRESS")
        if address:
            log.info("joining Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=True)
        else:
            log.info("starting an embedded local Ray cluster (num_cpus=%s)", cluster.num_cpus)
            # address="local": never join another Ray instance running on this host.
            ray.init(address="local", num_cpus=cluster.num_cpus, log_to_driver=True)
            _embedded = True
    own_signals()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cluster.progress_bars
