"""The series lease: which replica retrieves a series from its node (one at a time, cluster-wide).

``lease:series:{node}:{study}:{series}`` (cache.keys) holds the holder's retrieval id: taken with
``set_nx`` for :data:`LEASE_TTL`, re-armed with ``extend_if`` every third of it, freed with
``delete_if``; it expires if the holder dies. The cache fails open during a Redis outage
(``set_nx`` answers True), which would make every replica retrieve: :class:`RedisPatience` waits a
blip out, and only a real outage sends each replica its own way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cache.base import Cache

log = logging.getLogger(__name__)

LEASE_TTL = 10.0  # a GC pause or a slow Redis call must not cost the lease; a dead holder ~10 s
ACQUIRE_PATIENCE = 2.0  # how long a retrieval waits out a Redis blip before going without the lease


class RedisPatience:
    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self._gave_up = False

    async def unsure(self) -> bool:
        """True when Redis stays unreachable for ``ACQUIRE_PATIENCE`` seconds.

        A blip (a burst of new connections, a starved event loop) is waited out; a real outage costs
        each new retrieval this wait once, then it goes alone.
        """
        if not self.cache.degraded:
            self._gave_up = False
            return False
        if self._gave_up:
            return True  # this outage was waited for once already: no more waits
        deadline = time.monotonic() + ACQUIRE_PATIENCE
        while self.cache.degraded:
            if time.monotonic() > deadline:
                self._gave_up = True
                return True
            await asyncio.sleep(0.1)
            await self.cache.ping()  # a probe: it ends the outage as soon as Redis answers
        return False

    async def write(self, op: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """A write others wait for (announcement, end entry, lease release). The cache swallows
        failures, so a write that coincided with a blip is repeated once Redis answers again;
        repeating is harmless (followers ignore duplicates; compare-and-delete is idempotent)."""
        await op(*args)
        if self.cache.degraded and not await self.unsure():
            await op(*args)


async def keep(cache: Cache, lease: str, rid: bytes) -> None:
    """Re-arm the lease until cancelled; stop quietly if it was lost."""
    while True:
        await asyncio.sleep(LEASE_TTL / 3)
        if not await cache.extend_if(lease, rid, LEASE_TTL):
            # Expired (we were stalled) or taken over: finish anyway; at worst work is duplicated.
            log.warning("lost the lease of a series retrieval; finishing it without the lease")
            return
