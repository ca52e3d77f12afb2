"""The in-process cache is bounded by bytes as well as by entries (least recently used first)."""

from __future__ import annotations

import asyncio

from cache.memory import MemoryCache


def run(coro):
    return asyncio.run(coro)


def test_large_values_evict_least_recently_used_until_under_the_byte_bound():
    cache = MemoryCache(max_entries=1000, max_bytes=10_000)

    async def scenario():
        for i in range(20):
            await cache.set(f"k{i}", b"x" * 1000, 60)
        await cache.get("k15")                          # recently used: survives
        await cache.set("big", b"y" * 3000, 60)
        kept = [i for i in range(20) if await cache.get(f"k{i}") is not None]
        return kept, await cache.get("big")

    kept, big = run(scenario())
    assert cache.bytes <= 10_000 and big is not None and 15 in kept and 0 not in kept
    assert len(kept) < 10


def test_a_value_larger_than_the_bound_is_not_kept_and_nothing_leaks():
    cache = MemoryCache(max_bytes=1000)

    async def scenario():
        await cache.set("small", b"s", 60)
        await cache.set("huge", b"h" * 5000, 60)
        await cache.sadd("set", ["a" * 10, "b" * 10], 60)
        await cache.xadd("stream", {b"f": b"v" * 100}, 60)
        await cache.delete("set", "stream")
        return await cache.get("huge")

    assert run(scenario()) is None
    assert cache.bytes == sum(cache._sizes.values()) and cache.bytes <= 1000


def test_expired_and_replaced_values_give_their_bytes_back():
    cache = MemoryCache(max_bytes=1 << 20)

    async def scenario():
        await cache.set("a", b"1" * 500, 60)
        await cache.set("a", b"2" * 100, 60)
        await cache.set("gone", b"3" * 500, 0.01)
        await asyncio.sleep(0.05)
        assert await cache.get("gone") is None

    run(scenario())
    assert cache.bytes == cache._sizes["dwg:a"] and cache.bytes < 300
