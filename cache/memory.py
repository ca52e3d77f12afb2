"""In-process Cache: the embedded default (single process, tests, the demo).

Same semantics as the Redis implementation: TTL per key, counters without TTL, and a bound on
the number of entries (least recently used evicted first) so memory stays bounded.
"""

from __future__ import annotations

import time
from collections import OrderedDict

StrSet = set[str]


class MemoryCache:
    def __init__(self, max_entries: int = 10000, prefix: str = "dwg:") -> None:
        self._max = max_entries
        self._prefix = prefix
        self._data: OrderedDict[str, tuple[float, bytes | StrSet]] = OrderedDict()
        self._counters: dict[str, int] = {}

    def _k(self, key: str) -> str:
        return self._prefix + key

    def _live(self, key: str) -> bytes | StrSet | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= time.monotonic():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def _store(self, key: str, value: bytes | StrSet, ttl: float) -> None:
        self._data[key] = (time.monotonic() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    async def get(self, key: str) -> bytes | None:
        value = self._live(self._k(key))
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        if ttl > 0:
            self._store(self._k(key), value, ttl)

    async def delete(self, *keys: str) -> None:
        for k in keys:
            self._data.pop(self._k(k), None)
            self._counters.pop(self._k(k), None)

    async def incr(self, key: str) -> int:
        k = self._k(key)
        self._counters[k] = self._counters.get(k, 0) + 1
        return self._counters[k]

    async def get_int(self, key: str) -> int:
        return self._counters.get(self._k(key), 0)

    async def sadd(self, key: str, members: list[str], ttl: float) -> None:
        k = self._k(key)
        current = self._live(k)
        merged = set(current) if isinstance(current, set) else set()
        merged.update(members)
        self._store(k, merged, ttl)

    async def smembers(self, key: str) -> StrSet:
        value = self._live(self._k(key))
        return set(value) if isinstance(value, set) else set()

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._data.clear()
