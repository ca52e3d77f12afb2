"""Redis Cache (``redis.asyncio``): the cache every replica shares.

One connection pool per process, raw bytes (``decode_responses=False``), RESP2 (the widest server
compatibility; response shapes do not change between redis-py releases). Every key carries the
prefix; every key but a counter is written with a TTL in the same round trip (``SET PX``,
``MULTI`` for ``SADD``/``XADD`` + ``PEXPIRE``); compare-and-extend and compare-and-delete are Lua.

Security: a ``rediss://`` URL is TLS (the server's certificate checked against ``tls_ca_file``, or
the system CAs, host name included; TLS 1.2 at least; a client certificate when given). The password
comes apart from the URL (``cache.password_env``, so it never sits in the config) and wins over one
in the URL. Log lines and ``repr`` name scheme, host, port and database, never the URL.

Degradation (docs/architecture.md, "Cache": Redis failures never fail a request):

- Each call is bounded by ``timeout`` seconds (``cache.timeout``), also set as the socket connect
  and read timeout; redis-py's own retries are off, so one call costs at most ``timeout``.
- A connection error or timeout starts an *outage*: one warning is logged, every failed or skipped
  call adds to :attr:`RedisCache.failures`, and for ``retry_interval`` seconds calls skip Redis
  and answer at once with the miss value. The first call that succeeds afterwards (or a
  :meth:`RedisCache.ping`) ends the outage with one info line.
- A value of the wrong type (``WRONGTYPE``), a non-integer counter or a malformed stream id is a
  miss, counted in :attr:`RedisCache.foreign_values`; it is not an outage.
- The connection pool is bounded (``max_connections``; None: no bound). A full pool is local
  back-pressure, not an outage: the call answers its miss value and counts in
  :attr:`RedisCache.pool_full`, Redis stays in use for the others. (redis-py bounds a pool at 100
  unless told; past that it raises ``MaxConnectionsError``, a ``ConnectionError``: 100 concurrent
  requests sent the whole process to "serving without cache" for ``retry_interval``.)
- Every command runs in its own task that the caller awaits through :func:`asyncio.shield`: a
  request that is cancelled (client gone) or out of time stops waiting, but the command itself is
  never cancelled mid-way. (Cancelling redis-py while it sets a fresh connection up can leave that
  connection in the pool without its ``SELECT``/``AUTH`` done.) Detached commands end on the socket
  timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cache.base import StreamEntry, StrSet, Versioned, VersionedKey

log = logging.getLogger(__name__)

T = TypeVar("T")

# KEYS[1] = lease key, ARGV[1] = expected token, ARGV[2] = new TTL in ms. A key of another type is
# "not our lease" (0), not a WRONGTYPE error: that would read as an outage and fail open.
_EXTEND_IF = """
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] = lease key, ARGV[1] = expected token.
_DELETE_IF = """
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS = the counters, ARGV[1] = the value key's head, ARGV[2] = its tail (cache.base.VersionedKey).
# The value's key is composed here from the counters, so counters and value cost one round trip
# (docs/architecture.md, "Cache"). That key is not declared in KEYS: right for one Redis (what the
# gateway supports), not for Redis Cluster. Replies: {1, value or false, counter, ...};
# {0, counter, ...} for a value of another type; {-1} for a counter that is not a canonical integer
# (its key would not be the one Python composes). An absent counter is 0, as for INCR.
_GET_VERSIONED = """
local gens = {}
for i, k in ipairs(KEYS) do
  local t = redis.call('TYPE', k).ok
  if t == 'none' then
    gens[i] = '0'
  elseif t == 'string' then
    local v = redis.call('GET', k)
    if v ~= '0' and not string.match(v, '^[1-9]%d*$') then return {-1} end
    gens[i] = v
  else
    return {-1}
  end
end
local key = ARGV[1] .. table.concat(gens, '.') .. ARGV[2]
local t = redis.call('TYPE', key).ok
if t == 'string' then return {1, redis.call('GET', key), unpack(gens)} end
if t == 'none' then return {1, false, unpack(gens)} end
return {0, unpack(gens)}
"""

# Error replies that mean "this key holds something we did not write" (or the caller passed a stream
# id that is not one): a miss, not an outage. redis-py strips the leading "ERR ".
_FOREIGN_REPLIES = ("WRONGTYPE", "value is not an integer", "Invalid stream ID")


def _ms(ttl: float) -> int:
    return max(1, int(ttl * 1000))


def _is_outage(exc: BaseException) -> bool:
    return isinstance(exc, RedisConnectionError | RedisTimeoutError | TimeoutError | OSError) or (
        isinstance(exc, RedisError) and not str(exc).startswith(_FOREIGN_REPLIES))


class _Foreign(Exception):
    """A reply we cannot use (wrong type, not a number): the call answers its miss value."""


UNBOUNDED = 2**31 - 1   # max_connections None: no bound of ours (redis-py's own default is 100)


class RedisCache:
    shared = True

    def __init__(self, url: str, *, prefix: str = "dwg:", timeout: float = 0.25,
                 retry_interval: float = 1.0, max_connections: int | None = None,
                 password: str | None = None, tls_ca_file: str | None = None,
                 tls_cert_file: str | None = None, tls_key_file: str | None = None) -> None:
        self._prefix = prefix
        secure = url.startswith("rediss://")
        tls: dict[str, Any] = {}
        if secure:
            tls = {"ssl_ca_certs": tls_ca_file, "ssl_certfile": tls_cert_file, "ssl_keyfile": tls_key_file,
                   "ssl_cert_reqs": "required", "ssl_check_hostname": True,
                   "ssl_min_version": ssl.TLSVersion.TLSv1_2}
        elif tls_ca_file or tls_cert_file or tls_key_file:
            raise ValueError("Redis TLS settings need a rediss:// URL")
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._pool: ConnectionPool = ConnectionPool.from_url(
            url,
            decode_responses=False,
            protocol=2,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),     # no hidden retries: one call costs at most `timeout`
            max_connections=max_connections or UNBOUNDED,
            **tls,
        )
        if password is not None:
            # After from_url, which lets a password in the URL override keyword arguments.
            self._pool.connection_kwargs["password"] = password
        self._client: Redis = Redis.from_pool(self._pool)
        self._extend_if = self._client.register_script(_EXTEND_IF)
        self._delete_if = self._client.register_script(_DELETE_IF)
        self._get_versioned = self._client.register_script(_GET_VERSIONED)
        kw = self._pool.connection_kwargs
        # For log lines: never the URL itself, which may carry a password.
        scheme = "rediss" if secure else "redis"
        self._where = kw.get("path") or f"{scheme}://{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"
        self._inflight: set[asyncio.Future[Any]] = set()
        self._local_counters: dict[str, int] = {}
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._outage_failures = 0
        self.failures = 0
        """Calls that fell back to the miss value because Redis was unreachable or slow."""
        self.foreign_values = 0
        """Calls that met a value of the wrong type or shape under one of our keys."""
        self.pool_full = 0
        """Calls answered with their miss value because every pooled connection was busy."""

    def __repr__(self) -> str:
        return f"RedisCache({self._where}, prefix={self._prefix!r}, timeout={self._timeout})"

    @property
    def degraded(self) -> bool:
        """True during an outage (between its warning and its recovery line)."""
        return self._down_since is not None

    def _k(self, key: str) -> str:
        return self._prefix + key

    # ------------------------------------------------------------ the one place errors are handled

    async def _call(self, op: Callable[[], Awaitable[T]], miss: T, *, budget: float | None = None,
                    probe: bool = False) -> T:
        if not probe and self._down_since is not None and time.monotonic() < self._retry_at:
            self.failures += 1
            self._outage_failures += 1
            return miss
        task = asyncio.ensure_future(op())
        self._inflight.add(task)
        task.add_done_callback(self._detach)
        try:
            async with asyncio.timeout(self._timeout if budget is None else budget):
                result = await asyncio.shield(task)
        except _Foreign as exc:
            self._foreign(str(exc))
            return miss
        except MaxConnectionsError:
            self.pool_full += 1
            level = logging.WARNING if self.pool_full == 1 else logging.DEBUG
            log.log(level, "Redis cache at %s: all %d pooled connections busy; a call served as a miss",
                    self._where, self._pool.max_connections)
            return miss
        except (RedisError, OSError) as exc:    # OSError covers the builtin TimeoutError
            if not _is_outage(exc):
                self._foreign(str(exc))
                return miss
            self._outage(exc)
            return miss
        self._recovered()
        return result

    def _detach(self, task: asyncio.Future[Any]) -> None:
        self._inflight.discard(task)
        if not task.cancelled():
            task.exception()    # retrieved: a detached command's error is no one's business now

    def _outage(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.failures += 1
        self._outage_failures += 1
        self._retry_at = now + self._retry_interval
        if self._down_since is None:
            self._down_since = now
            log.warning("Redis cache at %s unavailable (%s: %s); serving without cache, retrying every %.1fs",
                        self._where, type(exc).__name__, exc or "timed out", self._retry_interval)

    def _recovered(self) -> None:
        if self._down_since is not None:
            log.info("Redis cache at %s is back after %.1fs (%d calls served without cache)",
                     self._where, time.monotonic() - self._down_since, self._outage_failures)
            self._down_since = None
            self._outage_failures = 0

    def _foreign(self, detail: str) -> None:
        self.foreign_values += 1
        # Another program writing under our prefix is a configuration problem worth one warning.
        level = logging.WARNING if self.foreign_values == 1 else logging.DEBUG
        log.log(level, "Redis cache: ignoring a value of the wrong kind under prefix %r (%s)",
                self._prefix, detail)

    # ------------------------------------------------------------ plain values and counters

    async def get(self, key: str) -> bytes | None:
        async def op() -> bytes | None:
            return cast(bytes | None, await self._client.get(self._k(key)))
        return await self._call(op, None)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        if ttl <= 0:
            return

        async def op() -> None:
            await self._client.set(self._k(key), value, px=_ms(ttl))
        await self._call(op, None)

    async def get_versioned(self, key: VersionedKey) -> Versioned:
        async def op() -> Versioned:
            reply = await self._get_versioned(keys=[self._k(c) for c in key.counters],
                                              args=[self._k(key.head), key.tail])
            try:
                status, rest = int(reply[0]), list(reply[1:])
                if status < 0:
                    raise _Foreign("a generation counter holds a non-integer")
                value = rest.pop(0) if status == 1 else None
                bare = key.at([int(g) for g in rest])
            except (TypeError, ValueError, IndexError):
                raise _Foreign("unexpected reply to the versioned read") from None
            if status == 0:
                self._foreign("a versioned value of another type")
            return Versioned(value if isinstance(value, bytes) else None, bare)
        return await self._call(op, Versioned(None, None))

    async def delete(self, *keys: str) -> None:
        if not keys:
            return

        async def op() -> None:
            await self._client.delete(*(self._k(k) for k in keys))
        await self._call(op, None)

    async def incr(self, key: str) -> int:
        async def op() -> int:
            return int(await self._client.incr(self._k(key)))
        return await self._call(op, -1)

    async def get_int(self, key: str) -> int:
        async def op() -> int:
            raw = await self._client.get(self._k(key))
            if raw is None:
                return 0
            try:
                return int(raw)
            except ValueError:
                raise _Foreign(f"counter {key!r} holds a non-integer") from None
        return await self._call(op, 0)

    async def next_counter(self, key: str, modulo: int) -> int:
        if modulo < 1:
            raise ValueError(f"modulo must be >= 1, got {modulo}")

        async def op() -> int:
            return int(await self._client.incr(self._k(key)))
        value = await self._call(op, -1)
        if value < 0:
            # Without Redis a process-local counter stands in (randomly seeded so two replicas
            # are unlikely to walk the same values); C-MOVE arrivals are cross-checked by UID anyway.
            value = self._local_counters.get(key, random.randrange(modulo)) + 1
            self._local_counters[key] = value
        return (value - 1) % modulo + 1

    # ------------------------------------------------------------ sets

    async def sadd(self, key: str, members: list[str], ttl: float) -> None:
        k = self._k(key)

        async def op() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                if members:
                    pipe.sadd(k, *members)
                if ttl > 0:
                    pipe.pexpire(k, _ms(ttl))
                else:
                    pipe.delete(k)
                _raise_first(await pipe.execute(raise_on_error=False))
        await self._call(op, None)

    async def smembers(self, key: str) -> StrSet:
        async def op() -> StrSet:
            raw = cast(set[bytes], await self._client.smembers(self._k(key)))
            members = set()
            for m in raw:
                try:
                    members.add(m.decode())
                except UnicodeDecodeError:
                    self._foreign(f"set {key!r} has a member that is not UTF-8")
            return members
        return await self._call(op, set())

    # ------------------------------------------------------------ leases

    async def set_nx(self, key: str, value: bytes, ttl: float) -> bool:
        if ttl <= 0:
            return False

        async def op() -> bool:
            return bool(await self._client.set(self._k(key), value, nx=True, px=_ms(ttl)))
        return await self._call(op, True)      # fail open (see Cache.set_nx)

    async def extend_if(self, key: str, value: bytes, ttl: float) -> bool:
        if ttl <= 0:
            return False

        async def op() -> bool:
            return bool(await self._extend_if(keys=[self._k(key)], args=[value, _ms(ttl)]))
        return await self._call(op, True)      # fail open (see Cache.extend_if)

    async def delete_if(self, key: str, value: bytes) -> bool:
        async def op() -> bool:
            return bool(await self._delete_if(keys=[self._k(key)], args=[value]))
        return await self._call(op, False)

    # ------------------------------------------------------------ streams

    async def xadd(self, key: str, fields: dict[bytes, bytes], ttl: float, maxlen: int = 100000) -> None:
        k = self._k(key)

        async def op() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.xadd(k, cast(Any, fields), maxlen=max(maxlen, 0), approximate=False)
                if ttl > 0:
                    pipe.pexpire(k, _ms(ttl))
                else:
                    pipe.delete(k)
                _raise_first(await pipe.execute(raise_on_error=False))
        await self._call(op, None)

    async def xread_from(self, key: str, last_id: bytes, block_ms: int) -> list[StreamEntry]:
        k = self._k(key)
        block_ms = max(int(block_ms), 0)
        wait = block_ms / 1000

        async def op() -> list[StreamEntry]:
            if not block_ms:
                return _stream_entries(await self._client.xread({k: last_id}))
            # XREAD BLOCK outlives socket_timeout, so it gets a connection of its own and a read
            # bounded by block + timeout. The connection is set up before the bound starts:
            # cancelling redis-py mid-setup is what must never happen (see the module docstring).
            conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]  # redis-py: untyped
            try:
                async with asyncio.timeout(wait + self._timeout):
                    await conn.send_command("XREAD", "BLOCK", block_ms, "STREAMS", k, last_id)
                    reply = await conn.read_response(timeout=math.inf)
            finally:
                await self._pool.release(conn)   # read_response dropped the socket if cut short
            return _stream_entries(reply)

        start = time.monotonic()
        entries = await self._call(op, cast(list[StreamEntry], []), budget=wait + self._timeout)
        if not entries and self.degraded:
            # Keep a polling caller at its pace instead of spinning on instant misses.
            await asyncio.sleep(max(0.0, wait - (time.monotonic() - start)))
        return entries

    # ------------------------------------------------------------ lifecycle

    async def ping(self) -> bool:
        async def op() -> bool:
            return bool(await self._client.ping())
        return await self._call(op, False, probe=True)

    async def close(self) -> None:
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=self._timeout)
        await self._client.aclose()    # from_pool: closing the client disconnects the pool


def _raise_first(results: list[Any]) -> None:
    """MULTI runs every command even when one fails (SADD on a string still re-arms its TTL, which
    keeps even a foreign key bounded); the first error reply is re-raised as Redis sent it."""
    for result in results:
        if isinstance(result, RedisError):
            raise result


def _stream_entries(reply: Any) -> list[StreamEntry]:
    """XREAD's reply for one stream -> [(id, fields)]; accepts redis-py's parsed and the raw shape."""
    if not reply:
        return []
    try:
        (_name, raw_entries), = reply
        entries: list[StreamEntry] = []
        for entry_id, raw_fields in raw_entries:
            if isinstance(raw_fields, dict):
                fields = dict(raw_fields)
            else:
                flat = list(raw_fields or ())
                fields = dict(zip(flat[::2], flat[1::2], strict=True))
            if not isinstance(entry_id, bytes) or not all(
                    isinstance(f, bytes) and isinstance(v, bytes) for f, v in fields.items()):
                raise TypeError("stream entry with non-bytes id or fields")
            entries.append((entry_id, fields))
    except (TypeError, ValueError) as exc:
        raise _Foreign(f"unexpected XREAD reply: {exc}") from None
    return entries
