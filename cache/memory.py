"""In-process Cache: the embedded default (single process, tests, the demo).

Same semantics as the Redis implementation: TTL per key, counters without TTL, a value of the
wrong kind is a miss, and bounds on the number of entries and on their bytes (least recently used
evicted first) so memory stays bounded whatever the values' sizes. Streams are a list per key;
readers wait on futures woken by ``xadd``.
Everything runs on the event loop's thread, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from cache.base import StreamEntry, StrSet, Versioned, VersionedKey

StreamId = tuple[int, int]


@dataclass
class _Stream:
    entries: list[tuple[StreamId, dict[bytes, bytes]]] = field(default_factory=list)
    last: StreamId = (0, 0)
    size: int = 0       # bytes of the entries' fields, kept as they are appended and trimmed


Value = bytes | StrSet | _Stream
OVERHEAD = 64   # bytes counted per entry and per set member / stream entry besides their data


def _entry_size(fields: dict[bytes, bytes]) -> int:
    return OVERHEAD + sum(len(k) + len(v) for k, v in fields.items())


def _size(value: Value) -> int:
    if isinstance(value, bytes):
        return OVERHEAD + len(value)
    if isinstance(value, _Stream):
        return OVERHEAD + value.size
    return OVERHEAD + sum(OVERHEAD + len(m) for m in value)


def _parse_id(raw: bytes) -> StreamId | None:
    ms, sep, seq = raw.partition(b"-")
    try:
        parsed = (int(ms), int(seq) if sep else 0)
    except ValueError:
        return None
    return parsed if parsed[0] >= 0 and parsed[1] >= 0 else None


def _format_id(sid: StreamId) -> bytes:
    return b"%d-%d" % sid


class MemoryCache:
    shared = False          # one process only
    degraded = False        # never unreachable

    def __init__(self, max_entries: int = 10000, prefix: str = "dwg:", max_bytes: int = 256 << 20) -> None:
        self._max = max_entries
        self._max_bytes = max_bytes
        self._prefix = prefix
        self._data: OrderedDict[str, tuple[float, Value]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.bytes = 0
        """Bytes held by the values (approximate: data plus a fixed overhead per item)."""
        self._counters: dict[str, int] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    def _k(self, key: str) -> str:
        return self._prefix + key

    def _live(self, key: str) -> Value | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= time.monotonic():
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return value

    def _store(self, key: str, value: Value, ttl: float) -> None:
        self._data[key] = (time.monotonic() + ttl, value)
        self._data.move_to_end(key)
        size = _size(value)
        self.bytes += size - self._sizes.get(key, 0)
        self._sizes[key] = size
        while self._data and (len(self._data) > self._max or self.bytes > self._max_bytes):
            self._drop(next(iter(self._data)))

    def _drop(self, key: str) -> None:
        if self._data.pop(key, None) is not None:
            self.bytes -= self._sizes.pop(key, 0)

    async def get(self, key: str) -> bytes | None:
        value = self._live(self._k(key))
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        if ttl > 0:
            self._store(self._k(key), value, ttl)

    async def get_versioned(self, key: VersionedKey) -> Versioned:
        generations = [self._counters.get(self._k(c), 0) for c in key.counters]
        bare = key.at(generations)
        return Versioned(await self.get(bare), bare)

    async def delete(self, *keys: str) -> None:
        for k in keys:
            self._drop(self._k(k))
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
        if current is not None and not isinstance(current, set):
            return      # another kind of value: Redis answers WRONGTYPE and leaves it alone
        merged = set(current) if current is not None else set()
        merged.update(members)
        self._store(k, merged, ttl)

    async def smembers(self, key: str) -> StrSet:
        value = self._live(self._k(key))
        return set(value) if isinstance(value, set) else set()

    async def set_nx(self, key: str, value: bytes, ttl: float) -> bool:
        k = self._k(key)
        if ttl <= 0 or self._live(k) is not None:
            return False
        self._store(k, value, ttl)
        return True

    async def extend_if(self, key: str, value: bytes, ttl: float) -> bool:
        k = self._k(key)
        if ttl <= 0 or self._live(k) != value:
            return False
        self._store(k, value, ttl)
        return True

    async def delete_if(self, key: str, value: bytes) -> bool:
        k = self._k(key)
        if self._live(k) != value:
            return False
        self._drop(k)
        return True

    async def xadd(self, key: str, fields: dict[bytes, bytes], ttl: float, maxlen: int = 100000) -> None:
        k = self._k(key)
        stream = self._live(k)
        if stream is None:
            stream = _Stream()
        elif not isinstance(stream, _Stream):
            return
        # Redis ids: milliseconds-sequence, strictly increasing even if the clock steps back.
        now_ms = int(time.time() * 1000)
        sid = (now_ms, 0) if now_ms > stream.last[0] else (stream.last[0], stream.last[1] + 1)
        stream.last = sid
        stream.entries.append((sid, dict(fields)))
        stream.size += _entry_size(fields)
        if len(stream.entries) > maxlen:
            cut = len(stream.entries) - max(maxlen, 0)
            stream.size -= sum(_entry_size(f) for _, f in stream.entries[:cut])
            del stream.entries[:cut]
        if ttl > 0:
            self._store(k, stream, ttl)
        else:
            self._drop(k)
        for waiter in self._waiters.pop(k, set()):
            if not waiter.done():
                waiter.set_result(None)

    def _entries_after(self, k: str, after: StreamId) -> list[StreamEntry] | None:
        stream = self._live(k)
        if stream is None:
            return []
        if not isinstance(stream, _Stream):
            return None
        return [(_format_id(sid), dict(f)) for sid, f in stream.entries if sid > after]

    async def xread_from(self, key: str, last_id: bytes, block_ms: int) -> list[StreamEntry]:
        k = self._k(key)
        if last_id == b"$":
            current = self._live(k)
            after: StreamId | None = current.last if isinstance(current, _Stream) else (0, 0)
        else:
            after = _parse_id(last_id)
        if after is None:
            return []
        found = self._entries_after(k, after)
        if found is None:
            return []
        deadline = time.monotonic() + block_ms / 1000
        while not found and time.monotonic() < deadline:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(k, set()).add(waiter)
            try:
                await asyncio.wait_for(waiter, deadline - time.monotonic())
            except TimeoutError:
                pass
            finally:
                waiters = self._waiters.get(k)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[k]
            found = self._entries_after(k, after) or []
        return found

    async def next_counter(self, key: str, modulo: int) -> int:
        if modulo < 1:
            raise ValueError(f"modulo must be >= 1, got {modulo}")
        return (await self.incr(key) - 1) % modulo + 1

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._data.clear()
        self._sizes.clear()
        self.bytes = 0
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self._waiters.clear()
