"""Replicas sharing retrievals through Redis (docs/architecture.md, "Replicas").

Active when the cache is shared (Redis) and ``cluster.internal_port`` + ``cluster.shared_secret`` are
set; otherwise each replica's :class:`gateway.retrieval.coordinator.LocalCoordinator` works alone.

``coordinator`` the single-flight across replicas: who retrieves a series, who follows (the
                :class:`~gateway.retrieval.coordinator.Coordinator` the retrieval service calls)
``lease``       the series lease in Redis and the patience with Redis blips
``arrivals``    the per-retrieval stream of announced instances and its end entry
``copies``      copying announced instances from the holder's internal endpoint into our spool
``moves``       C-MOVE sub-operations that reach another replica's storage SCP

The internal endpoint the copies read from is a route (:mod:`gateway.routes.internal`), started by
the app's lifespan next to the public server.
"""

from __future__ import annotations

import logging

from cache.base import Cache
from gateway.settings import Settings

log = logging.getLogger(__name__)


def cluster_enabled(settings: Settings, cache: Cache) -> bool:
    """Whether this replica shares retrievals (shared cache, internal port and secret configured)."""
    if not cache.shared or settings.cluster.internal_port is None:
        if cache.shared:
            log.info("cluster.internal_port is not set: replicas share the cache but not retrievals")
        return False
    if not settings.cluster.shared_secret:
        log.error(
            "cluster.internal_port is set but cluster.shared_secret is not: refusing to start the "
            "internal endpoint (it would serve instances to anyone); replicas will not share "
            "retrievals until a shared secret is configured"
        )
        return False
    return True
