"""Connecting to Ray: an embedded local cluster by default, or an existing cluster by address.

Importing this module never starts Ray; jobs call ``connect(cfg.cluster)`` once.
"""

from __future__ import annotations

import logging
import os

from app.config import ClusterArgs

log = logging.getLogger(__name__)


def connect(cluster: ClusterArgs) -> None:
    """Start (or join) Ray once per process; a no-op when Ray is already initialised."""
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
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cluster.progress_bars
