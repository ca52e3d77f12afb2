"""The Cache protocol: what the gateway keeps outside a request, with TTLs everywhere.

Two implementations with identical semantics: :mod:`cache.memory` (in-process, the embedded
default) and a Redis one (the cache issue). Keys are namespaced by the implementation's prefix;
callers pass the bare key. Every value is bounded by a TTL (seconds) or by the implementation's
size bound, so nothing grows forever.

Key schema (callers build keys only through :func:`key`; no patient data ever appears in a key):

    qido:{node}:{gen}:{sha256 of normalised identifier}  -> cached C-FIND result set (bytes)
    gen:{node}                                            -> generation counter, bumped by STOW
    loc:study:{StudyInstanceUID}                          -> set of node names holding the study
    loc:series:{SeriesInstanceUID}                        -> set with the parent StudyInstanceUID
"""

from __future__ import annotations

from typing import Protocol

StrSet = set[str]


def key(*parts: str) -> str:
    """Join key parts with ':' (UIDs and node names never contain ':')."""
    return ":".join(parts)


class Cache(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def delete(self, *keys: str) -> None: ...

    async def incr(self, key: str) -> int:
        """Atomically increment an integer counter (created at 0); counters do not expire."""
        ...

    async def get_int(self, key: str) -> int:
        """An integer counter's value, 0 when absent."""
        ...

    async def sadd(self, key: str, members: list[str], ttl: float) -> None:
        """Add members to a set and (re)arm the set's TTL."""
        ...

    async def smembers(self, key: str) -> StrSet: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...
