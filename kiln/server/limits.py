"""The server's limits, in one place: what one request, one connection and one client may hold, each with
its ``kiln serve`` flag, and the process's descriptor limit raised to what they need.

- ``max_request_size``: an HTTP body, counted as it arrives and again after decompression, and a gRPC
  message; past it, 413 / ``RESOURCE_EXHAUSTED`` (``--max-request-size``).
- ``max_connections``: open connections per port (HTTP, metrics, gRPC); one more is closed at once
  (``--max-connections``).
- ``header_timeout``: the seconds a client has to send a request's head, and between two pieces of its
  body; then the connection is closed, or 408 (``--header-timeout``). Slow-header clients cannot hold
  connections open.
- ``idle_timeout``: the seconds an HTTP keep-alive or gRPC connection may sit idle (``--idle-timeout``).
- ``shm_max_regions`` / ``shm_max_bytes``: registered system shared-memory regions, and their total
  registered size (``--shm-max-regions``, ``--shm-max-bytes``).
- ``cancel_grace``: the seconds a model has to end a request after its client left, or to finish the
  requests in flight when it is unloaded; then its instance is stopped (and restarted for the next
  request), so an unload always ends (``--cancel-grace``).
"""
from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

log = logging.getLogger("kiln.server")


@dataclass(frozen=True, slots=True)
class Limits:
    max_request_size: int = 64 * 2**20
    max_connections: int = 1000
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    shm_max_regions: int = 256
    shm_max_bytes: int = 64 * 2**30
    cancel_grace: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_request_size", "max_connections", "shm_max_regions", "shm_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("header_timeout", "idle_timeout", "cancel_grace"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0 seconds, got {getattr(self, name)}")

    def descriptors_needed(self) -> int:
        """Descriptors the limits allow at once: three ports' connections, the regions, and a margin for
        models (files, sockets to their processes)."""
        return 3 * self.max_connections + self.shm_max_regions + 1024


def raise_descriptor_limit(limits: Limits) -> None:
    """Raise the soft limit on open files toward the hard one, so the limits above are what binds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = limits.descriptors_needed()
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("this process may open %d files (hard limit); the server's limits allow %d at once: "
                        "lower --max-connections or --shm-max-regions, or raise the limit (ulimit -n)", new, want)
