"""The Cache protocol: what the gateway keeps outside a request, with TTLs everywhere.

Two implementations with identical semantics: :mod:`cache.memory` (in-process, the embedded
default) and :mod:`cache.redis` (shared by every replica). Keys are namespaced by the
implementation's prefix (``cache.prefix``, default ``dwg:``); callers pass the bare key. Every
value except a counter is bounded by a TTL (seconds); the in-process cache also bounds the number
of entries (least recently used first), so nothing grows forever.

Never fatal: a cache that cannot reach its store answers like an empty cache (``get`` -> None,
``smembers`` -> empty set, writes are no-ops, ``incr`` -> -1, ``ping`` -> False); a value of the
wrong kind under a key (another program's data, a corrupt entry) is a miss too. The return value
of each method on that path is given in its docstring. Callers never need ``try`` around a call.

Keys: every key is built by :mod:`cache.keys` (the schema and the freshness rule are documented
there); no patient data ever appears in a key name.

Counters are the one exception to "TTL everywhere": expiring one would reset it and could make an
old generation current again. Their number is bounded by nodes + studies written through STOW.
Counters are read with :meth:`Cache.get_int` only (the in-process cache keeps them apart from
plain values), or together with the value they version by :meth:`Cache.get_versioned`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

StrSet = set[str]
StreamEntry = tuple[bytes, dict[bytes, bytes]]


@dataclass(frozen=True)
class VersionedKey:
    """A key whose name carries the generations its value was computed under (docs/architecture.md,
    "Freshness"): ``head`` + the counters' values joined by ``.`` + ``tail``. Built by
    :mod:`cache.keys`; read with :meth:`Cache.get_versioned`, which reads the counters and the
    value in one round trip."""

    counters: tuple[str, ...]
    head: str
    tail: str

    def at(self, generations: Sequence[int]) -> str:
        """The bare key under ``generations`` (one per counter, in order)."""
        return self.head + ".".join(str(g) for g in generations) + self.tail


@dataclass(frozen=True)
class Versioned:
    """What :meth:`Cache.get_versioned` read: the value under the current generations, and the key
    to write a freshly computed value to (None when the counters could not be read: then nothing
    may be written, since the generations it would be filed under are unknown)."""

    value: bytes | None
    key: str | None


class Cache(Protocol):
    shared: bool
    """True when other processes see the same data (Redis): replicas can coordinate through it."""

    @property
    def degraded(self) -> bool:
        """True while the store is unreachable (the calls answer their miss values meanwhile)."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The value, or None when absent, expired, of another type, or the store is unreachable."""
        ...

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Store a value for ``ttl`` seconds (``ttl <= 0``: nothing is stored)."""
        ...

    async def get_versioned(self, key: VersionedKey) -> Versioned:
        """The counters of ``key`` and the value under their current values, in one round trip.

        A counter that is absent counts as 0. The store unreachable, or a counter that is not an
        integer: ``Versioned(None, None)``. A value of another type: ``value`` None, ``key`` set.
        A caller that misses computes the value and writes it to ``key``: a generation bumped
        meanwhile files it under the old generation, where no later reader looks.
        """
        ...

    async def delete(self, *keys: str) -> None: ...

    async def incr(self, key: str) -> int:
        """Atomically increment an integer counter (created at 0); counters do not expire.

        Returns the new value, or -1 when the store is unreachable or the key holds a non-integer.
        """
        ...

    async def get_int(self, key: str) -> int:
        """An integer counter's value, 0 when absent (or unreadable)."""
        ...

    async def sadd(self, key: str, members: list[str], ttl: float) -> None:
        """Add members to a set and (re)arm the set's TTL."""
        ...

    async def smembers(self, key: str) -> StrSet:
        """The set's members; empty when absent, of another type, or the store is unreachable."""
        ...

    async def set_nx(self, key: str, value: bytes, ttl: float) -> bool:
        """Store ``value`` only if ``key`` does not exist (a lease acquire: SET NX PX).

        True when stored. Unreachable store: True (fail open: the caller proceeds alone, and
        duplicate work across replicas is the accepted cost of running without Redis).
        """
        ...

    async def extend_if(self, key: str, value: bytes, ttl: float) -> bool:
        """Re-arm ``key``'s TTL if it still holds ``value`` (atomic compare-and-extend).

        True when extended; False when the key expired or holds another value (the lease was lost).
        Unreachable store: True (fail open, as for :meth:`set_nx`).
        """
        ...

    async def delete_if(self, key: str, value: bytes) -> bool:
        """Delete ``key`` if it holds ``value`` (atomic compare-and-delete). False otherwise/unreachable."""
        ...

    async def xadd(self, key: str, fields: dict[bytes, bytes], ttl: float, maxlen: int = 100000) -> None:
        """Append an entry to a stream, keep its newest ``maxlen`` entries, re-arm its TTL."""
        ...

    async def xread_from(self, key: str, last_id: bytes, block_ms: int) -> list[StreamEntry]:
        """Entries with an id after ``last_id`` (``b"0"``: all of them; ``b"$"``: only new ones).

        When there are none and ``block_ms > 0``, wait up to ``block_ms`` for one; ``block_ms <= 0``
        never waits. Returns ``[(id, fields), ...]`` in order; empty on timeout, for a key of
        another type or a malformed id, and when the store is unreachable (after waiting up to
        ``block_ms``, so a polling caller keeps its pace).
        """
        ...

    async def next_counter(self, key: str, modulo: int) -> int:
        """The next value of a shared counter wrapped into ``1..modulo`` (INCR, then mod).

        Unreachable store: a process-local counter (randomly seeded) stands in, so the caller
        still gets a value; uniqueness across processes is then not guaranteed.
        """
        ...

    async def ping(self) -> bool:
        """True when the store answers (a probe: it also ends a recorded outage)."""
        ...

    async def close(self) -> None: ...
