"""The cluster a command works on, opened once, with its dashboard link printed first thing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from srdvol.app.say import say
from srdvol.options import ClusterOptions

__all__ = ["cluster_session", "wants_cluster_training"]


@contextmanager
def cluster_session(options: ClusterOptions, client: Any = None) -> Iterator[Any]:
    """Yield ``client`` if given, else open the cluster ``options`` ask for and print the
    dashboard link first thing, so users can watch from the start."""
    if client is not None:
        yield client
        return
    from srdvol.dask.cluster import dashboard_link, open_cluster
    from srdvol.dask.workers import CloseStoreSessions, QuietTaskErrors

    with open_cluster(options) as opened:
        if not options.scheduler:  # our own workers only
            opened.register_plugin(QuietTaskErrors())
            opened.register_plugin(CloseStoreSessions())
        link = dashboard_link(opened)
        if link:
            say(f"dashboard: {link}{_port_taken(options.dashboard_address, link)}")
        yield opened


def _port_taken(asked: str | None, link: str) -> str:
    """`` (port N was in use)`` when the dashboard could not have the port asked for."""
    from urllib.parse import urlparse

    port = (asked or "").rpartition(":")[2]
    if not port.isdigit() or int(port) == 0 or urlparse(link).port == int(port):
        return ""
    return f" (port {port} was in use)"


def wants_cluster_training(options: ClusterOptions) -> bool:
    """Distributed training when a scheduler, several workers or several GPUs are asked for."""
    from srdvol.dask.gpus import visible_gpus

    if options.scheduler:
        return True
    if (options.workers or 1) > 1:
        return True
    gpus = options.gpus
    if isinstance(gpus, list):
        return len(gpus) > 1
    if gpus == "none":
        return False
    return len(visible_gpus()) > 1
